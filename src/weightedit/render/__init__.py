"""How results look: plots (``plots``), number formats (``format``) and the model card template
(``card_templates/``)."""
