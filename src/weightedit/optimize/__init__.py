"""``weightedit optimize``: search the edit's shape for the best refusal/KL trade-off in every language.

:mod:`.space` (the parameters), :mod:`.objective` (what a trial is scored on, and the judged re-measurement),
:mod:`.study` (Optuna's search, the front and the choice) and :mod:`.report` (JSON, markdown, PNG).

Import from those modules: the package itself imports nothing, so that the CLI, which needs only
:class:`.options.Sampler` to build its options, does not load torch, SciPy and Optuna at start-up.
"""
