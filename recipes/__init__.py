"""Recipe YAML files; installed as the data package ``weightedit._recipes``."""
