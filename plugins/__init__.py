"""Built-in plugins, installed as ``scdkit.plugins``. Each module registers through the same
hooks as a third-party plugin (see :mod:`scdkit.hookspecs`)."""
