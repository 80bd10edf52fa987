"""`scdkit probe`: the paper's two regularities, measured on any pipeline through its own streaming loop.

While the pipeline denoises the frame after a clean context, at every denoising step, for every
DiT block that runs in ``predict`` (every layer of a causal-DiT baseline; the decoder's layers of
an SCD pipeline):

- the block output for that frame's tokens, giving per layer a cosine-similarity matrix across
  denoising steps [T T] (summary: mean off-diagonal similarity). High similarity means the layer
  computes nearly the same features at every step: work an SCD encoder would do once per frame.
- the share of the attention mass that the frame's queries put on keys other than the frame's own
  tokens: past frames for the baseline, the previous frame's conditioning tokens for an SCD
  decoder. Low shares in deep layers mean they barely look across frames.

Nothing is re-implemented: the probe runs the pipeline's own ``predict`` with a forward hook on each
block and a recording wrapper around each block's attention function, so what it measures is
exactly what generation computes.

Axis legend: b batch (clips) · h heads · n tokens per frame · d width · L keys · T denoising steps.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from scdkit.checkpoint import read_metadata
from scdkit.errors import NotFinite, UsageError
from scdkit.evaluate import held_out_clips
from scdkit.figures import save_png
from scdkit.files import write_text_atomic
from scdkit.data import as_dataset
from scdkit.interfaces import Batch, VideoDataset
from scdkit.nn.attention import attention_weights
from scdkit.nn.dit import DiTBlock
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
            return torch.ones(self.layers, device=self.similarity.device)
        off = ~torch.eye(steps, dtype=torch.bool, device=self.similarity.device)
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


class Recorder:
    """While active: each DiT block's output for the frame's last ``tokens`` tokens, and the attention
    share its frame queries put on keys other than the frame's own (the last ``tokens`` keys)."""

    def __init__(self, blocks: list[DiTBlock], tokens: int):
        self.blocks, self.tokens = blocks, tokens
        self.features: dict[int, list[Tensor]] = {}
        self.past: dict[int, list[float]] = {}
        self.current: dict[int, list[float]] = {}

    def __enter__(self) -> Recorder:
        self.hooks = [block.register_forward_hook(self._feature_hook(i)) for i, block in enumerate(self.blocks)]
        self.attend = [block.attend for block in self.blocks]
        for i, block in enumerate(self.blocks):
            block.attend = self._recording(i, block.attend)
        return self

    def __exit__(self, *exc) -> None:
        for hook in self.hooks:
            hook.remove()
        for block, attend in zip(self.blocks, self.attend):
            block.attend = attend

    def _feature_hook(self, i: int):
        def hook(module, inputs, output):
            self.features.setdefault(i, []).append(output[:, -self.tokens:].flatten(1).float())
        return hook

    def _recording(self, i: int, attend):
        n = self.tokens

        def recording(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
            rows = None if mask is None else mask[-n:]
            weights = attention_weights(q[:, :, -n:].float(), k.float(), rows)  # [b h n L]
            self.past.setdefault(i, []).append(float(weights[..., :-n].sum(dim=-1).mean()))
            self.current.setdefault(i, []).append(float(weights[..., -n:].sum(dim=-1).mean()))
            return attend(q, k, v, mask)
        return recording


@torch.no_grad()
def probe_pipeline(pipeline: Pipeline, context: Batch, steps: int | None = None,
                   generator: torch.Generator | None = None) -> ProbeResult:
    """Denoise the frame after ``context`` (its video [b k c H W] is the context) with the pipeline's own
    streaming protocol, recording every block that runs in ``predict`` at every step."""
    model, device = pipeline.model, pipeline.device
    batch = context.to(device, pipeline.dtype)
    b, k = batch.video.shape[:2]
    pipeline.train(False)
    times = pipeline.sampling_times(steps)
    blocks = [m for m in model.modules() if isinstance(m, DiTBlock)]
    recorder = Recorder(blocks, pipeline.frame.tokens)
    with pipeline.autocast():
        state = model.new_state(b, k + 1, batch.conditioning)
        model.prepare(state, times[:-1])
        model.observe(state, patchify(to_model_range(batch.video), pipeline.frame), batch.conditioning.frames(0, k))
        x = torch.randn(b, pipeline.frame.tokens, pipeline.frame.patch_dim, generator=generator, device=device,
                        dtype=pipeline.dtype)
        sampling = pipeline.scheduler.begin(steps, device)
        with recorder:
            for t in times[:-1]:
                x = pipeline.scheduler.step(sampling, model.predict(state, x, t), x, generator)
    layers = sorted(recorder.features)  # the blocks that ran in predict, in model order
    similarity = torch.stack([_cosine_matrix(torch.stack(recorder.features[i], dim=1)).cpu() for i in layers])
    past = torch.tensor([recorder.past[i] for i in layers], device="cpu")  # a report: on the CPU, like similarity
    current = torch.tensor([recorder.current[i] for i in layers], device="cpu")
    return ProbeResult(similarity, past, current, x, context=k, clips=b)


def _cosine_matrix(features: Tensor) -> Tensor:
    """features [b T (n d)] -> [T T] cosine similarity between steps, averaged over clips."""
    unit = torch.nn.functional.normalize(features, dim=-1)
    return (unit @ unit.transpose(1, 2)).mean(dim=0)


def load_probe_pipeline(registry, name: str, checkpoint: str | Path | None = None,
                        **build_options) -> tuple[Pipeline, int]:
    """Build a pipeline with its trained weights; returns it with the training step. ``build_options``
    (attention, device, precision) go to ``Registry.build``."""
    if checkpoint is None and name in registry.pipelines and registry.checkpoint_dir(name) is None:
        raise UsageError(f"pipeline {name!r} has no checkpoint directory; pass --checkpoint DIR")
    pipeline = registry.build(name, checkpoint=checkpoint, **build_options)
    directory = Path(checkpoint) if checkpoint else registry.checkpoint_dir(name)
    role = next(iter(pipeline.components))
    return pipeline, int(read_metadata(directory / f"{role}.safetensors").get("step", 0))


class ProbeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    context: int = Field(4, ge=1, description="clean context frames before the probed frame")
    steps: int | None = Field(None, ge=1, description="sampling steps (default: the scheduler's)")
    clips: int = Field(8, ge=1, description="held-out clips averaged over")
    seed: int = Field(0, ge=0, description="seed of the held-out clips and the noise")


def run_probe(pipeline: Pipeline, data: VideoDataset | str, config: ProbeConfig = ProbeConfig()) -> ProbeResult:
    """Probe ``pipeline`` on held-out clips; a NotFinite error (before anything is written) when a figure or the
    denoised frame is nan or inf."""
    batch = held_out_clips(as_dataset(data, pipeline.frame), config.clips, config.context + 1, config.seed).context(config.context)
    result = probe_pipeline(pipeline, batch, config.steps, pipeline.generator(config.seed))
    figures = {"feature similarity": result.similarity, "attention shares": result.past_share,
               "denoised frame": result.sample}
    broken = [name for name, values in figures.items() if not torch.isfinite(values).all()]
    if broken:
        raise NotFinite(f"{pipeline.name}: the probe's {' and '.join(broken)} are not finite (nan or inf): the weights "
                        f"are broken or {pipeline.autocast_dtype or 'the precision'} overflows; nothing was written")
    return result


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
    write_text_atomic(path, json.dumps(payload, indent=1))
