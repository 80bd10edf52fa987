"""`gated-recurrent`: an SCD encoder whose memory of the past is a gated linear recurrence, not a KV cache.

Every layer mixes in time, then in space:

- **time**, per token and channel: the layer input is normalised (z_f) and compared with the previous
  frame's (z_f - z_{f-1}, zero at the first frame), so motion is there at a glance. From both, a
  data-dependent decay a_f in (0, 1) and a candidate u_f; the state h_f = a_f·h_{f-1} + (1 - a_f)·u_f;
  the layer adds a projection of h_f to its input.
- **space**, within the frame: a DiT block (``scdkit.nn.dit.DiTBlock``: bidirectional attention over the
  frame's tokens with row/column RoPE, adaLN from a learned constant, as in ``causal-transformer``).

The output is the final adaLN LayerNorm (``FinalLayer``): one conditioning token of width ``width`` per
frame token, the contract of ``causal-transformer`` at the same width, so it fits under decoders trained
with it.

A stream's state is, for every layer, h and z of the last frame seen: 2·layers·n·d numbers however long
the stream. ``forward`` runs the per-frame parts over all frames at once (frames folded into the batch)
and the recurrence as a loop over frames; ``step`` runs the same operations from the stream's state.

Axis legend: b batch · f frames · n tokens per frame · p patch values · d width.
"""

from __future__ import annotations

import torch
from einops import rearrange
from pydantic import PositiveInt
from torch import Tensor, nn

from scdkit.hookspecs import hookimpl
from scdkit.interfaces import CausalEncoder, CondSpec, EncoderState, FrameSpec
from scdkit.nn.cache import compute_dtype
from scdkit.nn.dit import DiTBlock, DiTConfig, FinalLayer, init_linear_weights
from scdkit.nn.rope import rope_table

__version__ = "0.1.0"

#: Initial decays of the recurrence, spread over the channels: from forgetting most of the past at every
#: frame to keeping most of it.
DECAY_RANGE = (0.3, 0.9)
#: Initial residual gates of the DiT blocks: open (a plain pre-norm block) rather than adaLN-Zero's 0, so
#: attention and MLP learn from the first step of a short fit under a frozen decoder (200 steps under the
#: shipped dit-s: validation loss 0.102 against 0.104 with closed gates).
GATE_INIT = 1.0


class GatedRecurrentConfig(DiTConfig):
    """``width``, ``heads`` and ``mlp_ratio`` of the DiT blocks (head width a multiple of 16), and ``layers``
    time-then-space layers."""

    layers: PositiveInt = 3


class GatedRecurrentState(EncoderState):
    """Per layer: ``h`` the recurrent state and ``z`` the normalised input of the last frame, both [b n d]."""

    def __init__(self, h: list[Tensor], z: list[Tensor]):
        self.h, self.z = h, z
        self.frames = 0

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.h + self.z)


class GatedRecurrence(nn.Module):
    """Per-token, per-channel gated linear recurrence over frames, fed each frame and its change."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.gates = nn.Linear(2 * width, 2 * width)  # [z, z - z_prev] -> decay logits, candidate
        self.out = nn.Linear(width, width)

    def reset_decay(self) -> None:
        """Decay biases spread over :data:`DECAY_RANGE` (call after the weights are initialised)."""
        width = self.out.in_features
        with torch.no_grad():
            self.gates.bias[:width] = torch.linspace(*DECAY_RANGE, width, device=self.gates.bias.device).logit()

    def forward(self, x: Tensor, h: Tensor, z_prev: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Frames x [b f n d] in order, from state h [b n d] and the normalised input z_prev [b n d] of the
        frame before them (None: x starts the stream). Returns the update [b f n d] to add to x, and the
        state and normalised input after the last frame."""
        z = self.norm(x)
        before = torch.cat([z[:, :1] if z_prev is None else z_prev[:, None], z[:, :-1]], dim=1)
        decay, candidate = self.gates(torch.cat([z, z - before], dim=-1)).chunk(2, dim=-1)
        decay = decay.sigmoid()
        states = []
        for f in range(x.shape[1]):
            h = torch.lerp(candidate[:, f], h, decay[:, f])  # a·h + (1 - a)·u
            states.append(h)
        return self.out(torch.stack(states, dim=1)), h, z[:, -1]


def open_gates(block: DiTBlock, value: float) -> None:
    """Set the adaLN biases of a block's two residual gates (chunks 3 and 6 of ``DiTBlock.modulation``)."""
    with torch.no_grad():
        block.ada.bias.view(6, -1)[[2, 5]] = value


class GatedRecurrentEncoder(CausalEncoder):
    plugin_name = "gated-recurrent"
    plugin_version = __version__
    config_class = GatedRecurrentConfig

    @classmethod
    def example_config(cls) -> GatedRecurrentConfig:
        return GatedRecurrentConfig(width=32, layers=2, heads=2)

    def __init__(self, config: GatedRecurrentConfig, frame: FrameSpec):
        super().__init__(config, frame)
        width = config.width
        self.embed = nn.Linear(frame.patch_dim, width)
        self.clean = nn.Parameter(torch.zeros(width))  # the adaLN conditioning: a learned constant
        self.recurrences = nn.ModuleList(GatedRecurrence(width) for _ in range(config.layers))
        self.blocks = nn.ModuleList(DiTBlock(width, config.heads, config.mlp_ratio) for _ in range(config.layers))
        self.final = FinalLayer(width)
        # every frame at the same time position: only rows and columns rotate
        rope = rope_table(torch.zeros(1, dtype=torch.long), frame.grid, width // config.heads)
        self.register_buffer("rope", rope, persistent=False)
        init_linear_weights(self)
        nn.init.normal_(self.clean, std=0.02)
        for recurrence, block in zip(self.recurrences, self.blocks):
            recurrence.reset_decay()
            open_gates(block, GATE_INIT)

    @property
    def contract(self) -> CondSpec:
        return CondSpec(dim=self.config.width, tokens=self.frame.tokens)

    def run(self, patches: Tensor, h: list[Tensor], z: list[Tensor | None]) -> Tensor:
        """Conditioning [b f n d] of frames [b f n p]; ``h`` and ``z`` (per layer) are read and replaced."""
        b = patches.shape[0]
        x = self.embed(patches)
        cond = self.clean[None]  # modulations [1 1 d] broadcast over frames and tokens
        for i, (recurrence, block) in enumerate(zip(self.recurrences, self.blocks)):
            update, h[i], z[i] = recurrence(x, h[i], z[i])
            x = rearrange(x + update, "b f n d -> (b f) n d")
            x = block(x, None, self.rope, modulation=block.modulation(cond))
            x = rearrange(x, "(b f) n d -> b f n d", b=b)
        return self.final(x, None, modulation=self.final.modulation(cond))

    def forward(self, patches: Tensor) -> Tensor:
        b, _, n, _ = patches.shape
        h = [patches.new_zeros(b, n, self.config.width, dtype=compute_dtype(self.clean)) for _ in self.blocks]
        return self.run(patches, h, [None] * len(self.blocks))

    def new_state(self, batch: int, max_frames: int) -> GatedRecurrentState:
        """Zeros on the parameters' device; ``max_frames`` is ignored (the state does not grow)."""
        p = self.clean
        shape = (batch, self.frame.tokens, self.config.width)

        def zeros() -> list[Tensor]:
            return [torch.zeros(shape, dtype=compute_dtype(p), device=p.device) for _ in self.blocks]
        return GatedRecurrentState(h=zeros(), z=zeros())

    def step(self, state: GatedRecurrentState, patches: Tensor) -> tuple[Tensor, GatedRecurrentState]:
        z = state.z if state.frames else [None] * len(self.blocks)  # the first frame has no predecessor
        out = self.run(patches, state.h, z)
        state.z = z
        state.frames += patches.shape[1]
        return out, state


@hookimpl
def scdkit_register_encoders(register):
    register(GatedRecurrentEncoder)
