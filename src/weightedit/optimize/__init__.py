"""``weightedit optimize``: search the edit's shape for the best refusal/KL trade-off in every language.

:mod:`.space` (the parameters), :mod:`.objective` (what a trial is scored on, and the judged re-measurement),
:mod:`.study` (Optuna's search, the front and the choice) and :mod:`.report` (JSON, markdown, PNG).
"""

from .objective import LanguageTarget, Setup, judged_refusal, measure, prepare
from .options import OptimizeOptions, Sampler
from .report import SCHEMA, payload, write_study_report
from .space import EditPoint, direction_vector, point_from_params, suggest
from .study import StudyResult, TrialRecord, VerifiedPoint, run_study

__all__ = [
    "OptimizeOptions",
    "Sampler",
    "EditPoint",
    "suggest",
    "point_from_params",
    "direction_vector",
    "LanguageTarget",
    "Setup",
    "prepare",
    "measure",
    "judged_refusal",
    "StudyResult",
    "TrialRecord",
    "VerifiedPoint",
    "run_study",
    "SCHEMA",
    "payload",
    "write_study_report",
]
