"""Built-in data sets: one module per plugin."""
