"""Built-in schedulers: one module per plugin."""
