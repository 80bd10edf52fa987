"""Shared building blocks that plugins compose: attention dispatch, RoPE, KV caches, DiT blocks."""
