"""Model card templates; installed as the data package ``weightedit._model_cards``."""
