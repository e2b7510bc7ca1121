"""The ``weightedit`` command line (installed as ``weightedit.cli``): thin typer commands over the library."""
