"""scdkit: Separable Causal Diffusion video models as pluggable components.

The three interfaces live in :mod:`scdkit.interfaces`, the plugin hooks in
:mod:`scdkit.hookspecs`, and the registry that assembles pipelines in :mod:`scdkit.registry`.
"""

__version__ = "0.4.0"
