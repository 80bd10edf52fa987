"""Built-in encoders: one module per plugin."""
