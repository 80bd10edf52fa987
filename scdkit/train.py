"""`scdkit train`: the SCD (or baseline) training loop.

One encoder pass per clip, conditioning shifted by one frame, the decoder on all frames in
parallel with several noise draws (see ``Pipeline.loss``); AdamW with warm-up and a doubled
decoder learning rate (PAPER.md), gradient clipping, EMA weights, periodic atomic checkpoints
(EMA weights per component + a resumable training state), and a held-out check against
"repeat the last context frame".
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from scdkit.checkpoint import atomic_save, load_component, read_checkpoint, save_component
from scdkit.data import make_clips
from scdkit.errors import CheckpointError
from scdkit.evaluate import EvalConfig, evaluate_continuation
from scdkit.files import write_text_atomic
from scdkit.interfaces import Recipe
from scdkit.pipeline import Pipeline


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    steps: int = Field(1500, ge=1, description="total optimizer steps (a resumed run continues up to it)")
    batch: int = Field(16, ge=1, description="clips per step")
    frames: int = Field(7, ge=2, description="frames per training clip")
    lr: float = Field(3e-4, gt=0, description="AdamW learning rate (after warm-up; cosine decay to a tenth of it)")
    decoder_lr_scale: float = Field(2.0, gt=0, description="the decoder's learning rate is lr times this")
    warmup: int = Field(100, ge=0, description="linear warm-up steps")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    grad_clip: float = Field(1.0, gt=0, description="gradient norm clip")
    ema: float = Field(0.999, ge=0, lt=1, description="EMA decay of the saved weights")
    checkpoint_every: int = Field(100, ge=1, description="steps between checkpoints")
    eval_every: int = Field(250, ge=0, description="steps between held-out checks (0: none)")
    eval_steps: int = Field(10, ge=1, description="sampling steps of the held-out check")
    seed: int = Field(0, description="seed of the training clips and noise")
    recipe: Recipe = Recipe()


def _param_groups(pipeline: Pipeline, config: TrainConfig) -> list[dict]:
    """One AdamW group per component; the decoder's learning rate is scaled (PAPER.md: decoder lr x2)."""
    return [{"params": list(module.parameters()),
             "lr": config.lr * (config.decoder_lr_scale if role == "decoder" else 1.0)}
            for role, module in pipeline.components.items()]


def _lr_factor(step: int, warmup: int, total: int, floor: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to ``floor`` of the base rate at ``total`` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class Trainer:
    def __init__(self, pipeline: Pipeline, config: TrainConfig, out: Path, data: str, console: Console | None = None):
        self.pipeline, self.config, self.out, self.data = pipeline, config, Path(out), data
        self.console = console or Console()
        self.groups = _param_groups(pipeline, config)
        self.base_lrs = [g["lr"] for g in self.groups]
        self.optimizer = torch.optim.AdamW(self.groups, weight_decay=config.weight_decay, betas=(0.9, 0.99))
        # fp16 autocast needs loss scaling against gradient underflow; a no-op otherwise
        self.scaler = torch.amp.GradScaler(pipeline.device.type, enabled=pipeline.autocast_dtype == torch.float16)
        self.ema = copy.deepcopy(pipeline).requires_grad_(False)  # the weights that are saved and evaluated
        self.step = 0

    # -- state -------------------------------------------------------------------------------
    def save(self) -> None:
        for role, module in self.ema.components.items():
            save_component(module, self.out / f"{role}.safetensors", role, self.step)
        tensors = {f"{role}.{k}": v for role, m in self.pipeline.components.items() for k, v in m.state_dict().items()}
        params = [p for g in self.groups for p in g["params"]]
        for i, p in enumerate(params):
            for key, value in self.optimizer.state.get(p, {}).items():
                tensors[f"optimizer.{i}.{key}"] = value.reshape(-1) if value.dim() == 0 else value
        meta = {"step": str(self.step), "train_config": self.config.model_dump_json()}
        atomic_save(tensors, self.out / "train_state.safetensors", meta)

    def resume(self) -> bool:
        path = self.out / "train_state.safetensors"
        if not path.exists():
            return False
        tensors, meta = read_checkpoint(path)
        for role, module in self.pipeline.components.items():
            prefix = f"{role}."
            module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
            load_component(self.ema.components[role], self.out / f"{role}.safetensors", role)
        params = [p for g in self.groups for p in g["params"]]
        for i, p in enumerate(params):
            state = {k.split(".", 2)[2]: v.to(p.device) for k, v in tensors.items() if k.startswith(f"optimizer.{i}.")}
            if state:
                state["step"] = state["step"].reshape(()).cpu()  # AdamW keeps its step count on the CPU
                self.optimizer.state[p] = state
        self.step = int(meta["step"])
        return True

    # -- loop --------------------------------------------------------------------------------
    @torch.no_grad()
    def update_ema(self) -> None:
        decay = min(self.config.ema, (1 + self.step) / (10 + self.step))
        torch._foreach_lerp_(list(self.ema.parameters()), list(self.pipeline.parameters()), 1 - decay)

    def train_step(self) -> float:
        cfg = self.config
        batch = make_clips(self.data, cfg.batch, cfg.frames, self.pipeline.frame, seed=cfg.seed * 1_000_003 + self.step)
        generator = self.pipeline.generator(cfg.seed * 7919 + self.step)
        for group, base in zip(self.groups, self.base_lrs):
            group["lr"] = base * _lr_factor(self.step, cfg.warmup, cfg.steps)
        self.pipeline.train(True)
        loss = self.pipeline.loss(batch, cfg.recipe, generator)
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"loss became {value} at step {self.step}")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.pipeline.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        self.update_ema()
        return value

    def evaluate(self) -> dict[str, float]:
        result = evaluate_continuation(self.ema, self.data, EvalConfig(frames=4, steps=self.config.eval_steps))
        return {"psnr": result.model.mean()["psnr"], "repeat_last_psnr": result.repeat_last.mean()["psnr"],
                "sharpness": result.model.mean()["sharpness"], "true_sharpness": sum(result.truth_sharpness) / 4}

    def run(self, log: Path | None = None) -> list[float]:
        cfg, losses = self.config, []
        columns = [TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.4f}"),
                   TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn()]
        started = time.perf_counter()
        with Progress(*columns, console=self.console, transient=False) as progress:
            task = progress.add_task("train", total=cfg.steps, completed=self.step, loss=float("nan"), rate="")
            first = self.step
            while self.step < cfg.steps:
                losses.append(self.train_step())
                rate = (time.perf_counter() - started) / (self.step - first)
                progress.update(task, completed=self.step, loss=sum(losses[-20:]) / len(losses[-20:]), rate=f"{rate:.2f} s/step")
                record = {"step": self.step, "loss": losses[-1], "elapsed_s": round(time.perf_counter() - started, 1)}
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                    self.save()
                if cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == cfg.steps):
                    record |= self.evaluate()
                    progress.console.print(
                        f"step {self.step}: held-out PSNR {record['psnr']:.2f} dB vs repeat-last "
                        f"{record['repeat_last_psnr']:.2f} dB; sharpness {record['sharpness']:.4f} (true {record['true_sharpness']:.4f})")
                if log is not None:
                    with open(log, "a") as fh:
                        fh.write(json.dumps(record) + "\n")
        return losses


def train(pipeline: Pipeline, config: TrainConfig, out: Path, data: str, resume: bool = True,
          console: Console | None = None) -> Trainer:
    Path(out).mkdir(parents=True, exist_ok=True)
    trainer = Trainer(pipeline, config, out, data, console)
    if resume:
        try:
            if trainer.resume():
                trainer.console.print(f"resumed from {out} at step {trainer.step}")
        except (KeyError, RuntimeError) as exc:
            raise CheckpointError(f"{out}/train_state.safetensors cannot be resumed: {exc}") from None
    log = Path(out) / "train_log.jsonl"
    trim_log(log, trainer.step)
    trainer.run(log=log)
    return trainer


def trim_log(log: Path, step: int) -> None:
    """Keep the log lines of steps up to ``step``, where training (re)starts: a resumed run drops the
    lines that an interrupted run wrote after its last checkpoint, a fresh run starts an empty log."""
    if not log.exists():
        return
    kept = [line for line in log.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    write_text_atomic(log, "".join(f"{line}\n" for line in kept))
