"""Running a model: loading and chat formatting (``modeling``), forward hooks (``hooks``), batched passes
(``activations``) and refusal scores (``scoring``)."""
