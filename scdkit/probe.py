"""`scdkit probe`: the paper's two regularities, measured on a monolithic causal-DiT baseline.

While the model denoises the frame after a clean context, at every denoising step and every layer:

- the block output for that frame's tokens, giving per layer a cosine-similarity matrix across
  denoising steps [T T] (summary: mean off-diagonal similarity). High similarity means the layer
  computes nearly the same features at every step: work an SCD encoder would do once per frame.
- the share of the attention mass that the frame's queries put on past-frame keys (the rest
  goes to the frame itself). Low shares in deep layers mean they barely look across frames.

The probe walks the model's blocks itself (recomputing q and k for the attention weights), so
the model's own ``predict`` carries no inspection code; a test checks both paths agree.

Axis legend: b batch (clips) · h heads · n tokens per frame · d width · L keys · T denoising steps.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from scdkit.checkpoint import read_metadata
from scdkit.errors import UsageError
from scdkit.evaluate import held_out_clips
from scdkit.figures import save_png
from scdkit.interfaces import VideoModel
from scdkit.nn.attention import attention_weights
from scdkit.nn.dit import modulate
from scdkit.pipeline import Pipeline, patchify, to_model_range


@dataclass
class ProbeResult:
    similarity: Tensor     # [layers T T] cosine similarity of one frame's features across steps, mean over clips
    past_share: Tensor     # [layers T] attention mass of the frame's queries on past-frame keys
    current_share: Tensor  # [layers T] attention mass on the frame's own keys
    sample: Tensor         # [b n p] the denoised frame (the same as the model's own predict loop gives)
    context: int
    clips: int

    @property
    def layers(self) -> int:
        return self.similarity.shape[0]

    @property
    def steps(self) -> int:
        return self.similarity.shape[1]

    def mean_similarity(self) -> Tensor:
        """[layers] mean off-diagonal similarity (the diagonal is 1 by definition)."""
        steps = self.steps
        if steps < 2:
            return torch.ones(self.layers)
        off = ~torch.eye(steps, dtype=torch.bool)
        return self.similarity[:, off].mean(dim=1)

    def summary(self) -> dict:
        """The per-layer figures, without the full matrices."""
        return {
            "layers": self.layers, "steps": self.steps, "context": self.context, "clips": self.clips,
            "mean_similarity": _rounded(self.mean_similarity()),
            "min_similarity": _rounded(self.similarity.flatten(1).min(dim=1).values),
            "past_attention_share": _rounded(self.past_share.mean(dim=1)),
        }

    def to_json(self) -> dict:
        return self.summary() | {
            "current_attention_share": _rounded(self.current_share.mean(dim=1)),
            "past_attention_share_per_step": _rounded(self.past_share),
            "similarity": _rounded(self.similarity),
        }


def _rounded(t: Tensor, digits: int = 4):
    return torch.round(t.double(), decimals=digits).tolist()


@torch.no_grad()
def probe_model(model: VideoModel, scheduler, context: Tensor, steps: int | None = None,
                generator: torch.Generator | None = None) -> ProbeResult:
    """Denoise the frame after ``context`` (patches [b k n p]) and record every layer at every step."""
    if not all(hasattr(model, a) for a in ("blocks", "noisy_inputs")):
        raise UsageError(f"{model.plugin_name} does not expose its DiT blocks; probe needs a causal-DiT-style model")
    model.eval()
    b, k, n, p = context.shape
    state = model.new_state(b, k + 1)
    model.observe(state, context)
    past = state.caches[0].length  # keys of the clean context, the same in every layer
    times = scheduler.timesteps(steps).tolist()
    features = [[] for _ in model.blocks]
    past_share = torch.zeros(len(model.blocks), len(times) - 1)
    current_share = torch.zeros_like(past_share)
    x = torch.randn(b, n, p, generator=generator)
    for s, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
        h, cond, rope = model.noisy_inputs(state, x, torch.full((b,), t))
        for i, (block, slot) in enumerate(zip(model.blocks, state.scratch)):
            mod = block.modulation(cond)
            q, k_new, _ = block.qkv_heads(modulate(block.norm1(h), mod[0], mod[1]), rope)
            keys = torch.cat([state.caches[i].keys[:, :, :past], k_new], dim=2)  # probe-only copy
            weights = attention_weights(q, keys)  # [b h n L]
            past_share[i, s] = weights[..., :past].sum(dim=-1).mean()
            current_share[i, s] = weights[..., past:].sum(dim=-1).mean()
            h = block(h, cond, rope, cache=slot, modulation=mod)
            features[i].append(h.flatten(1))
        x = scheduler.step(model.final(h, cond), t, t_next, x)
    similarity = torch.stack([_cosine_matrix(torch.stack(f, dim=1)) for f in features])
    return ProbeResult(similarity, past_share, current_share, x, context=k, clips=b)


def _cosine_matrix(features: Tensor) -> Tensor:
    """features [b T (n d)] -> [T T] cosine similarity between steps, averaged over clips."""
    unit = torch.nn.functional.normalize(features, dim=-1)
    return (unit @ unit.transpose(1, 2)).mean(dim=0)


def load_probe_pipeline(registry, name: str, checkpoint: str | Path | None = None) -> tuple[Pipeline, int]:
    """Build a monolithic pipeline with its trained weights; returns it with the training step."""
    entry = registry.pipelines.get(name)  # an unknown name gets the registry's own error from build()
    if entry is not None and entry.model is None:
        raise UsageError(f"pipeline {name!r} is an SCD pipeline; probe needs a monolithic one (model = ...), "
                         "e.g. --pipeline baseline-digits")
    if entry is not None and checkpoint is None and entry.checkpoint is None:
        raise UsageError(f"pipeline {name!r} has no checkpoint directory; pass --checkpoint DIR")
    pipeline = registry.build(name, checkpoint=checkpoint)
    directory = Path(checkpoint) if checkpoint else registry.checkpoint_dir(name)
    return pipeline, int(read_metadata(directory / "model.safetensors").get("step", 0))


def run_probe(pipeline: Pipeline, data: str, context: int = 4, steps: int | None = None, clips: int = 8,
              seed: int = 0) -> ProbeResult:
    video = held_out_clips(pipeline, data, clips, context, seed)
    patches = patchify(to_model_range(video), pipeline.frame)
    return probe_model(pipeline.model, pipeline.scheduler, patches, steps, torch.Generator().manual_seed(seed))


# -- figures -----------------------------------------------------------------------------------

def plot_probe(result: ProbeResult, out: Path, title: str = "") -> dict[str, str]:
    """Two PNGs: a grid of per-layer similarity heatmaps, and the per-layer curves."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

    out = Path(out)
    layers = result.layers
    cols = min(layers, 4)
    rows = -(-layers // cols)
    fig = Figure(figsize=(3.2 * cols, 3.0 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    low = float(result.similarity.min())
    for i, ax in enumerate(axes.flat):
        if i >= layers:
            ax.set_axis_off()
            continue
        image = ax.imshow(result.similarity[i].numpy(), vmin=min(low, 0.9), vmax=1.0, cmap="viridis")
        ax.set_title(f"layer {i + 1}: mean {float(result.mean_similarity()[i]):.3f}", fontsize=9)
        ax.set_xlabel("denoising step", fontsize=8)
        ax.set_ylabel("denoising step", fontsize=8)
    fig.colorbar(image, ax=axes, shrink=0.8, label="cosine similarity")
    fig.suptitle(f"{title} feature similarity across denoising steps".strip())
    heatmaps = out / "probe_similarity.png"
    save_png(fig, heatmaps)

    fig = Figure(figsize=(6.5, 3.2), layout="constrained")
    left, right = fig.subplots(1, 2)
    depth = range(1, layers + 1)
    left.plot(depth, result.past_share.mean(dim=1).numpy(), marker="o")
    left.set(xlabel="layer", ylabel="attention share on past frames", ylim=(0, 1), xticks=list(depth))
    right.plot(depth, result.mean_similarity().numpy(), marker="o", color="tab:orange")
    right.set(xlabel="layer", ylabel="mean off-diagonal similarity", ylim=(min(0.0, low), 1.0), xticks=list(depth))
    fig.suptitle(title or "probe")
    curves = out / "probe_curves.png"
    save_png(fig, curves)
    return {"similarity_png": str(heatmaps), "curves_png": str(curves)}


def write_json(payload: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)
