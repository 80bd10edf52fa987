"""Built-in monolithic video models (the causal-DiT baseline): one module per plugin."""
