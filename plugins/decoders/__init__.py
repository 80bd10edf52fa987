"""Built-in decoders: one module per plugin."""
