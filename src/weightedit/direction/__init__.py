"""Finding the refusal direction: candidates and selection (``selection``), and per-language comparison
(``crosslingual``). The file a direction is stored in is the edit's input: :mod:`weightedit.edit.direction_file`."""
