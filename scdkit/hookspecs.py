"""Every scdkit hook. Implementations may accept fewer arguments than the spec.

A plugin is a module (or object) with functions marked ``@scdkit.hookimpl``. Built-in
plugins live in ``scdkit.plugins.*``; third-party ones are found through the ``scdkit``
entry-point group. Each registration hook is called once per plugin and receives a
``register`` callable; call it once per thing you provide.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("scdkit")
hookimpl = pluggy.HookimplMarker("scdkit")


@hookspec
def scdkit_register_encoders(register):
    """Register causal encoders: ``register(cls)`` for each ``CausalEncoder`` subclass.

    The class declares ``plugin_name``, ``plugin_version`` and ``config_class``.
    Called for every plugin; results are ignored. Since 0.1.0.
    """


@hookspec
def scdkit_register_decoders(register):
    """Register frame decoders: ``register(cls)`` for each ``FrameDecoder`` subclass. Since 0.1.0; conditioning
    (``accepts`` and a ``conditioning`` argument, only for decoders that declare it) since 0.2.0."""


@hookspec
def scdkit_register_schedulers(register):
    """Register noise schedulers: ``register(cls)`` for each ``NoiseScheduler`` subclass. Since 0.1.0; the
    contract (``steps``, ``prediction_type``, ``alpha_sigma``, sampling through ``begin``/``step`` with a
    per-run ``SamplingState`` and a generator) since 0.2.0."""


@hookspec
def scdkit_register_attention_backends(register):
    """Register attention backends: ``register(backend)`` for each ``scdkit.nn.attention.AttentionBackend``.

    Since 0.1.0.
    """


@hookspec
def scdkit_register_models(register):
    """Register monolithic streaming video models (e.g. the causal-DiT baseline):
    ``register(cls)`` for each ``scdkit.interfaces.VideoModel`` subclass. Since 0.1.0.
    """


@hookspec
def scdkit_register_datasets(register):
    """Register data sets: ``register(cls)`` for each ``scdkit.interfaces.VideoDataset`` subclass, configured in
    ``[datasets.NAME]`` registry tables and named by a pipeline's ``data`` key. Since 0.4.0."""
