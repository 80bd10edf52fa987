"""`memory-efficient`: the causal-transformer encoder with bounded memory in training and generation.

The weights and blocks are causal-transformer's; what changes is what a frame attends to
(:class:`scdkit.nn.memory.MemoryPolicy`): the last ``recent_frames`` frames at full
resolution, the ``compressed_frames`` before them average-pooled ``pool`` x ``pool`` (FAR's
long/short-term context), nothing older. Hence:

- generation: a fixed-capacity memory per layer (:class:`StreamingMemory`); cache size and
  per-frame cost stop growing after ``recent_frames + compressed_frames`` frames;
- training: the clip is attended in query groups, each over its own window of keys
  (:class:`ClipMemory`), so no attention spans the whole clip, and every block is wrapped in
  activation checkpointing (``torch.utils.checkpoint``, non-reentrant): only block inputs are
  kept, one block's internals are recomputed during backward;
- attention is the runtime's backend like every encoder's (the registry builds every pipeline with
  one); the bounds above hold under any of them, and ``--attention chunked`` also bounds the
  scratch memory of each attention call.

Trade-off of parameter-free pooling: the encoder declares ``weight_family =
"causal-transformer"``, so a causal-transformer checkpoint loads unchanged and the two agree
exactly while a clip is no longer than ``recent_frames``. A learned pooling (or a recurrent
summary) could compress better but would add weights that a causal-transformer checkpoint lacks,
forcing a retrain. Known approximation: a pooled token receives the softmax weight of *one*
token, not of the pool² tokens it replaces, so compressed frames weigh less than they did
uncompressed; correcting that needs an additive attention bias that the backends' boolean masks
cannot express. RoPE positions stay absolute; only lags up to ``recent_frames +
compressed_frames - 1`` are ever seen, so keep that sum near the training clip length to stay
inside the trained range of relative positions.

``forward`` and ``step`` implement the same policy (step: one frame at a time through the
fixed buffers; forward: masks over query groups), so they agree to float rounding.
"""

from __future__ import annotations

import torch
from einops import rearrange
from pydantic import NonNegativeInt, PositiveInt
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from scdkit.hookspecs import hookimpl
from scdkit.interfaces import Conditioning, EncoderState, FrameSpec
from scdkit.nn.dit import DiTBlock
from scdkit.nn.cache import compute_dtype
from scdkit.nn.memory import ClipMemory, MemoryPolicy, StreamingMemory
from scdkit.plugins.encoders.causal_transformer import CausalTransformerConfig, CausalTransformerEncoder


class MemoryEfficientConfig(CausalTransformerConfig):
    recent_frames: PositiveInt = 4
    compressed_frames: NonNegativeInt = 12
    pool: PositiveInt = 2


class MemoryEfficientState(EncoderState):
    def __init__(self, memories: list[StreamingMemory]):
        self.memories = memories
        self.frames = 0

    def nbytes(self) -> int:
        return sum(memory.nbytes() for memory in self.memories)


class MemoryEfficientEncoder(CausalTransformerEncoder):
    plugin_name = "memory-efficient"
    plugin_version = "0.1.0"
    config_class = MemoryEfficientConfig
    weight_family = "causal-transformer"

    @classmethod
    def example_config(cls) -> MemoryEfficientConfig:
        # 2 + 2 frames of memory, so the kit's 5-6 frame clips exercise pooling and forgetting
        return MemoryEfficientConfig(width=32, layers=2, heads=2, recent_frames=2, compressed_frames=2)

    def __init__(self, config: MemoryEfficientConfig, frame: FrameSpec):
        super().__init__(config, frame)
        self.policy = MemoryPolicy(config.recent_frames, config.compressed_frames, frame.grid, config.pool)
        #: activation checkpointing of every block while gradients are on; a runtime switch, not config
        self.checkpointing = True

    def forward(self, patches: Tensor, conditioning: Conditioning | None = None) -> Tensor:
        tokens = patches.shape[2]
        x = self.embed_frames(patches, conditioning)
        cond = self.clean.expand(x.shape[0], -1)
        rope = self.rope(0, patches.shape[1])
        for block in self.blocks:
            if self.checkpointing and torch.is_grad_enabled():
                x = checkpoint(self.run_block, block, x, cond, rope, use_reentrant=False)
            else:
                x = self.run_block(block, x, cond, rope)
        return rearrange(self.final(x, cond), "b (f n) d -> b f n d", n=tokens)

    def run_block(self, block: DiTBlock, x: Tensor, cond: Tensor, rope: Tensor) -> Tensor:
        """One block over the clip [b (f n) d], query group by query group. A pure function of its
        inputs (a fresh ClipMemory per call), as checkpointing's recomputation requires."""
        n, memory, out = self.frame.tokens, ClipMemory(self.policy), []
        for start, stop in self.policy.groups(x.shape[1] // n):
            rows = slice(start * n, stop * n)
            mask = self.policy.group_mask(start, stop, x.device)
            out.append(block(x[:, rows], cond, rope[:, rows], mask, cache=memory))
        return torch.cat(out, dim=1)

    def new_state(self, batch: int, max_frames: int) -> MemoryEfficientState:
        """The memory is bounded whatever ``max_frames`` is: its capacity is the policy's."""
        p = self.clean
        return MemoryEfficientState([StreamingMemory(self.policy, batch, self.config.heads, self.head_dim,
                                                     compute_dtype(p), p.device) for _ in self.blocks])

    def step(self, state: MemoryEfficientState, patches: Tensor,
             conditioning: Conditioning | None = None) -> tuple[Tensor, MemoryEfficientState]:
        # One frame at a time: that is what the fixed buffers take, and a prefill of any length
        # then needs no more memory than generation does.
        out = []
        for i in range(patches.shape[1]):
            frame_conditioning = None if conditioning is None else conditioning.frames(i, i + 1)
            out.append(self.run_blocks(patches[:, i:i + 1], state.frames, None, state.memories, frame_conditioning))
            state.frames += 1
        return torch.cat(out, dim=1), state


@hookimpl
def scdkit_register_encoders(register):
    register(MemoryEfficientEncoder)
