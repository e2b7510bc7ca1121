"""Built-in multilingual prompt sets and loaders for user prompt files."""
