"""`scdkit train`: the SCD (or baseline) training loop.

One encoder pass per clip, conditioning shifted by one frame, the decoder on all frames in
parallel with several noise draws (see ``Pipeline.loss``); AdamW with warm-up and a doubled
decoder learning rate (PAPER.md), gradient clipping, EMA weights, periodic atomic checkpoints
(EMA weights per component + a resumable training state), and a held-out check against
"repeat the last context frame".

A checkpoint is never a mix of steps. Each save writes the step's log line, then the training state
(``train_state.safetensors``: the raw and the EMA weights, the optimizer, the step, and the digest of
each component file it is about to write), then the component files, each atomically. Resume reads the
state alone and rewrites any component file that does not match it (a save interrupted after the state);
``scdkit generate`` refuses component files of one run from different steps (``runs.mixed_steps_problem``).
SIGINT (Ctrl-C) and SIGTERM finish the current step, save, and stop (exit 130).

Components can start from trained checkpoints (``--init``) and stay frozen (``--freeze``): a frozen
component gets no gradients and no optimizer state and is never written back; the run folder's
``run.json`` points to the checkpoint it came from (``scdkit.runs``). ``freeze_encoder_after`` is the
seed's recipe: joint training, then the encoder frozen (at its EMA weights) after a causal pre-training
phase.
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from scdkit.checkpoint import (atomic_save, load_component, read_checkpoint, read_metadata, save_component,
                               scheduler_metadata, shape_problems, weights_digest)
from scdkit.data import as_dataset
from scdkit.distill import Teacher, check_student, teacher_identity
from scdkit.distributed import (Ranks, full, full_optimizer_state, full_state_dict, gradient_sync, load_full_optimizer_state,
                                load_full_state_dict, local, replicate, shard)
from scdkit.errors import CheckpointError, Interrupted, TrainingDiverged, UsageError
from scdkit.evaluate import EvalConfig, evaluate_continuation
from scdkit.files import stale_temporaries, write_text_atomic
from scdkit.interfaces import Batch, Recipe, VideoDataset
from scdkit.pipeline import Pipeline
from scdkit.runs import (STATE, Source, checkpoint_files, init_components, load_source, provenance, read_manifest,
                         trained_weights, write_manifest)


#: The held-out check during training: 4 true frames of context, 4 generated (8 frames per held-out clip).
HELD_OUT_CHECK = EvalConfig(frames=4)
HELD_OUT_CHECK_FRAMES = HELD_OUT_CHECK.context + HELD_OUT_CHECK.frames


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    steps: int = Field(1500, ge=1, description="total optimizer steps (a resumed run continues up to it)")
    batch: int = Field(16, ge=1, description="clips per step, over all processes (under torchrun each takes its "
                       "share: a multiple of the number of processes times --accumulate)")
    accumulate: int = Field(1, ge=1, description="micro-batches per step and process: each process's share of the batch "
                            "is split into this many, one backward each (the same step in less memory)")
    parallel: Literal["ddp", "fsdp"] = Field("ddp", description="under torchrun: ddp (every process holds the whole model) "
                                             "or fsdp (FSDP2: weights, gradients, optimizer state and EMA sharded)")
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
    seed: int = Field(0, ge=0, description="seed of the training clips and noise")
    freeze_encoder_after: int | None = Field(
        None, ge=0, description="train jointly for this many steps, then freeze the encoder at its EMA weights "
        "and train the decoder alone (the seed's recipe; default: never)")
    teacher: str | None = Field(None, description="distil a few-step decoder: the registry pipeline whose samples the "
                                "decoder learns to reach in its scheduler's steps, under the teacher's frozen encoder "
                                "(--init its checkpoint, --freeze encoder; scdkit.distill)")
    teacher_steps: int | None = Field(None, ge=1, description="the teacher's sampling steps (default: its scheduler's)")
    recipe: Recipe = Recipe()


#: Micro-batch i of a step (i = rank·accumulate + j, its place in the global batch) draws its noise from
#: ``seed·7919 + step + i·MICRO_BATCH_STRIDE``: micro-batch 0 keeps the single-process seed, and a prime above any
#: step count keeps the streams of different (step, i) apart.
MICRO_BATCH_STRIDE = 1_000_000_007


def micro_batch_size(config: TrainConfig, world: int = 1) -> int:
    """The clips of one micro-batch: ``--batch`` split over ``world`` processes and ``--accumulate`` micro-batches
    each; a one-line UsageError when it does not split evenly."""
    parts = world * config.accumulate
    if config.batch % parts:
        processes = f" over {world} processes ×" if world > 1 else " into"
        raise UsageError(f"--batch {config.batch}: the clips of a step are split{processes} {config.accumulate} "
                         f"micro-batch{'es' * (config.accumulate > 1)}{' each' * (world > 1)} (--accumulate): give a "
                         f"multiple of {parts}")
    return config.batch // parts


def _lr_factor(step: int, warmup: int, total: int, floor: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to ``floor`` of the base rate at ``total`` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class Trainer:
    """Trains ``pipeline`` into the folder ``out`` on data set ``data``. ``names``: each role's registry name
    (recorded in the checkpoints; default: the plugin names); ``frozen``: the components loaded from trained
    checkpoints that stay as they are. ``ranks``: the processes training together (``scdkit.distributed``; default:
    this one alone). Every rank runs the same steps and takes the same decisions; rank 0 alone writes."""

    def __init__(self, pipeline: Pipeline, config: TrainConfig, out: Path, data: VideoDataset | str,
                 console: Console | None = None, names: dict[str, str] | None = None,
                 frozen: dict[str, Source] | None = None, ranks: Ranks | None = None, teacher: Teacher | None = None):
        self.pipeline, self.config, self.out, self.data = pipeline, config, Path(out), as_dataset(data, pipeline.frame)
        self.ranks = ranks or Ranks()
        micro_batch_size(config, self.ranks.world)
        self.console = console or Console(quiet=not self.ranks.main)
        self.names = names or {role: module.plugin_name for role, module in pipeline.components.items()}
        self.frozen = frozen or {}
        self.teacher = teacher  # distillation: the loss's targets are its samples (scdkit.distill)
        self.trained = [role for role in pipeline.components if role not in self.frozen]
        for role in self.frozen:
            pipeline.components[role].requires_grad_(False)
        # the weights that are saved and evaluated; sharded (FSDP2), the EMA is kept in shards beside the weights',
        # and this full copy lives on rank 0's CPU alone, which gathers the shards for each save and held-out check
        sharding = self.ranks.distributed and config.parallel == "fsdp"
        self.ema = copy.deepcopy(pipeline).requires_grad_(False) if self.ranks.main or not sharding else None
        self.ema_shards: dict[str, torch.nn.Module] = {}
        if sharding:
            if self.ema is not None:
                self.ema = self.ema.cpu()
            for role in self.trained:
                self.ema_shards[role] = copy.deepcopy(pipeline.components[role]).requires_grad_(False)
                shard(self.ema_shards[role], self.ranks)
                shard(pipeline.components[role], self.ranks)
        # one AdamW group per trained component; the decoder's learning rate is scaled (PAPER.md: decoder lr x2)
        self.groups = [{"params": list(pipeline.components[role].parameters()),
                        "lr": config.lr * (config.decoder_lr_scale if role == "decoder" else 1.0)}
                       for role in self.trained]
        self.base_lrs = [g["lr"] for g in self.groups]
        self.optimizer = torch.optim.AdamW(self.groups, weight_decay=config.weight_decay, betas=(0.9, 0.99))
        # fp16 autocast needs loss scaling against gradient underflow; a no-op otherwise
        self.scaler = torch.amp.GradScaler(pipeline.device.type, enabled=pipeline.autocast_dtype == torch.float16)
        self.replicated = None  # the loss under DDP, over the parameters in ``replicated_for``
        self.replicated_for: tuple[bool, ...] = ()
        self.step = 0
        self.saved_step: int | None = None  # the step of the checkpoint on disk
        self.stop: str | None = None  # the signal that asked this process to stop, e.g. "SIGTERM"

    @property
    def sharded(self) -> bool:
        return bool(self.ema_shards)

    @property
    def encoder_frozen_by_recipe(self) -> bool:
        after = self.config.freeze_encoder_after
        return after is not None and self.step >= after and "encoder" in self.trained

    def ema_of(self, role: str) -> torch.nn.Module:
        """The module whose weights are the up-to-date EMA of ``role`` on this rank (its shards when sharded)."""
        return self.ema_shards[role] if self.sharded else self.ema.components[role]

    def freeze_encoder(self) -> None:
        """The recipe's switch to decoder-only training: the encoder takes its EMA weights (the ones that are
        saved) and keeps them, so the decoder trains against exactly the encoder it ships with."""
        encoder = self.pipeline.components["encoder"]
        encoder.load_state_dict(self.ema_of("encoder").state_dict())
        encoder.requires_grad_(False)

    # -- state -------------------------------------------------------------------------------
    def identity(self, role: str) -> dict:
        """What the component in ``role`` is right now: a frozen one as loaded, a trained one as saved."""
        if role in self.frozen:
            return self.frozen[role].identity() | {"name": self.frozen[role].name or self.names[role]}
        module = self.ema.components[role]
        return {"name": self.names[role], "plugin": module.plugin_name, "step": self.step,
                "weights_sha256": weights_digest(module)}

    def diverged(self, what: str) -> None:
        saved = f"step {self.saved_step}" if self.saved_step is not None else "none written yet"
        raise TrainingDiverged(f"training diverged: {what}; the last checkpoint in {self.out} ({saved}) is "
                               "untouched: resume from it with a lower --lr or a tighter --grad-clip")

    def check_finite(self) -> None:
        broken = [role for role in self.trained if self.ranks.any(
            not all(torch.isfinite(local(p)).all() for p in self.pipeline.components[role].parameters()))]
        if broken:  # never write non-finite weights over a good checkpoint
            self.diverged(f"the {' and '.join(broken)} weights are no longer finite at step {self.step}")

    def gather_ema(self) -> None:
        """Sharded: the EMA shards gathered into rank 0's full copy (every rank takes part); otherwise nothing."""
        for role, shards in self.ema_shards.items():
            tensors = full_state_dict(shards)
            if self.ranks.main:
                self.ema.components[role].load_state_dict(tensors)

    def save(self) -> None:
        """The training state first, then the component files (see the module doc). Every rank takes part (a
        sharded model is gathered); rank 0 writes, and the others wait until it has."""
        self.check_finite()
        self.gather_ema()
        weights = {role: full_state_dict(self.pipeline.components[role]) for role in self.trained}
        optimizer = full_optimizer_state(self.pipeline, self.optimizer) if self.sharded else self.optimizer.state
        if self.ranks.main:
            identities = {role: self.identity(role) for role in self.pipeline.components}
            tensors = {f"{role}.{k}": v for role in self.trained for k, v in weights[role].items()}
            tensors |= {f"ema.{role}.{k}": v for role in self.trained
                        for k, v in self.ema.components[role].state_dict().items()}
            params = [p for g in self.groups for p in g["params"]]
            for i, p in enumerate(params):
                for key, value in optimizer.get(p, {}).items():
                    tensors[f"optimizer.{i}.{key}"] = value.reshape(-1) if value.dim() == 0 else value
            meta = {"step": str(self.step), "train_config": self.config.model_dump_json(),
                    "components": json.dumps({role: identities[role] for role in self.trained}, sort_keys=True)}
            atomic_save(tensors, self.out / STATE, meta)
            fault_point("after-state", self.step)
            self.write_components(identities)
        self.ranks.barrier()  # torchrun ends every process when one exits: none leaves while rank 0 writes
        self.saved_step = self.step

    def write_components(self, identities: dict[str, dict]) -> None:
        """Each trained component's EMA weights, with their provenance (``runs.provenance``) and what the
        scheduler trained it to predict (``checkpoint.scheduler_metadata``)."""
        for role in self.trained:
            others = {other: identity for other, identity in identities.items() if other != role}
            extra = (provenance(self.names[role], identities[role]["weights_sha256"], others)
                     | scheduler_metadata(self.pipeline.scheduler))
            save_component(self.ema.components[role], self.out / f"{role}.safetensors", role, self.step, extra)
            fault_point(f"after-{role}", self.step)

    def resume(self) -> bool:
        """Load the training state in ``out``; every rank reads it (the folder must be shared)."""
        path = self.out / STATE
        if not path.exists():
            return False
        tensors, meta = read_checkpoint(path)
        step = meta.get("step", "")
        if not step.isdigit():  # also refuses "-5": a step is a count
            raise CheckpointError(f"{path}: 'step' in its metadata is {step!r}, not a step count; start over with --fresh")
        for role in self.trained:
            self._load_state(path, self.pipeline.components[role], tensors, f"{role}.", f"the {role}")
            if any(k.startswith(f"ema.{role}.") for k in tensors):
                self._load_state(path, self.ema_of(role), tensors, f"ema.{role}.", f"the {role}'s EMA")
            else:  # a state written by an older scdkit holds no EMA weights: the component file has them
                file = self.out / f"{role}.safetensors"
                if read_metadata(file).get("step") != step:
                    raise CheckpointError(f"{file} is not from step {step} of {path} (a save was interrupted, and this "
                                          "state is too old to repair it): start over with --fresh")
                if self.sharded:
                    self._load_state(file, self.ema_of(role), read_checkpoint(file)[0], "", f"the {role}'s EMA")
                else:
                    load_component(self.ema.components[role], file, role)
        params = [p for g in self.groups for p in g["params"]]
        states = {}
        for i, p in enumerate(params):
            state = {k.split(".", 2)[2]: v.to(p.device) for k, v in tensors.items() if k.startswith(f"optimizer.{i}.")}
            if state:
                state["step"] = state["step"].reshape(()).cpu()  # AdamW keeps its step count on the CPU
                states[p] = state
        if self.sharded:
            load_full_optimizer_state(self.pipeline, self.optimizer, states)
            self.groups = self.optimizer.param_groups  # loading replaced them: the step's learning rates go here
        else:
            self.optimizer.state.update(states)
        self.gather_ema()
        self.step = self.saved_step = int(meta["step"])
        if self.encoder_frozen_by_recipe:
            self.pipeline.components["encoder"].requires_grad_(False)  # its saved weights are the frozen ones
        return True

    @staticmethod
    def _load_state(path: Path, module: torch.nn.Module, tensors: dict, prefix: str, what: str) -> None:
        """Load the ``prefix`` tensors of a training state into ``module``; a one-line error naming each tensor
        that does not fit (not torch's size-mismatch report)."""
        problems = shape_problems({k: tuple(v.shape) for k, v in tensors.items() if k.startswith(prefix)},
                                  {prefix + k: tuple(v.shape) for k, v in module.state_dict().items()}, what)
        if problems:
            raise CheckpointError(f"{path} cannot be resumed: {'; '.join(problems)}")
        load_full_state_dict(module, {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})

    def repair(self) -> list[str]:
        """Rewrite the component files when one does not hold the EMA weights of the training state just
        resumed (a save killed between the state and them); the roles that were stale. Rank 0's work."""
        identities = {role: self.identity(role) for role in self.pipeline.components}
        stale = []
        for role in self.trained:
            try:
                metadata = read_metadata(self.out / f"{role}.safetensors")
            except CheckpointError:
                metadata = {}
            saved = (metadata.get("step"), metadata.get("weights_sha256"))
            if saved != (str(self.step), identities[role]["weights_sha256"]):
                stale.append(role)
        if stale:
            self.write_components(identities)
        return stale

    # -- loop --------------------------------------------------------------------------------
    @torch.no_grad()
    def update_ema(self) -> None:
        decay = min(self.config.ema, (1 + self.step) / (10 + self.step))
        if self.sharded:  # shard by shard
            pairs = [(local(e), local(p)) for role in self.trained
                     for e, p in zip(self.ema_shards[role].parameters(), self.pipeline.components[role].parameters())
                     if p.requires_grad]
        else:
            pairs = [(e, p) for e, p in zip(self.ema.parameters(), self.pipeline.parameters()) if p.requires_grad]
        torch._foreach_lerp_([e for e, _ in pairs], [p for _, p in pairs], 1 - decay)

    def loss_module(self, batch: Batch):
        """What computes a micro-batch's loss: the pipeline's ``loss`` itself, or under DDP that loss wrapped
        (built again when the set of trained parameters changes, e.g. the recipe freezing the encoder; ``batch``
        is a micro-batch to find the parameters the loss reaches with)."""
        if not self.ranks.distributed or self.sharded:
            return self.pipeline.loss
        trains = tuple(p.requires_grad for p in self.pipeline.parameters())
        if trains != self.replicated_for:
            if self.replicated is not None:
                self.replicated._remove_autograd_hooks()
            def probe():
                return self.pipeline.loss(batch, self.config.recipe, self.pipeline.generator(self.config.seed),
                                          self.teacher)
            self.replicated, self.replicated_for = replicate(self.pipeline, probe), trains
        return self.replicated

    def train_step(self) -> float:
        """One optimizer step on the global batch of this step: this rank's shard of it, in ``accumulate``
        micro-batches; the gradients are averaged over the ranks once, in the last backward. The loss returned
        (and checked) is the mean over the whole batch."""
        cfg, ranks = self.config, self.ranks
        size = micro_batch_size(cfg, ranks.world)
        for group, base in zip(self.groups, self.base_lrs):
            group["lr"] = base * _lr_factor(self.step, cfg.warmup, cfg.steps)
        if self.config.freeze_encoder_after == self.step and "encoder" in self.trained:
            self.freeze_encoder()
            self.console.print(f"step {self.step}: encoder frozen at its EMA weights; the decoder trains on alone")
        self.pipeline.train(True)
        for role, module in self.pipeline.components.items():
            module.train(any(p.requires_grad for p in module.parameters()))  # frozen: evaluation mode
        batch = self.data.batch(cfg.batch, cfg.frames, seed=cfg.seed * 1_000_003 + self.step,
                                shard=(ranks.rank, ranks.world))
        compute = self.loss_module(batch.clips(0, size))
        replicated = self.replicated if compute is self.replicated else None
        sharded = [self.pipeline.components[role] for role in self.ema_shards]
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for j in range(cfg.accumulate):
            i = ranks.rank * cfg.accumulate + j  # the micro-batch's place in the global batch
            generator = self.pipeline.generator(cfg.seed * 7919 + self.step + i * MICRO_BATCH_STRIDE)
            micro = batch if cfg.accumulate == 1 else batch.clips(j * size, (j + 1) * size)
            last = j == cfg.accumulate - 1
            with gradient_sync(replicated, sharded, last):
                loss = compute(micro, cfg.recipe, generator, self.teacher)
                total += loss.item()
                self.scaler.scale(loss if cfg.accumulate == 1 else loss / cfg.accumulate).backward()
        value = ranks.mean(total / cfg.accumulate)  # every rank sees the same value, finite or not
        if not math.isfinite(value):
            self.diverged(f"the loss became {value} at step {self.step + 1}")
        self.scaler.unscale_(self.optimizer)
        dump = os.environ.get("SCDKIT_TEST_GRADS_DIR")
        grads = self._gradients() if dump else None
        torch.nn.utils.clip_grad_norm_([p for g in self.groups for p in g["params"]], cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        for component in sharded:  # a root FSDP2 module stays gathered after its forward until its backward, and a
            component.reshard()    # frozen one has none: shard it again (a no-op for the others)
        self.step += 1
        self.update_ema()
        if dump:
            self._dump(Path(dump), grads)
        return value

    def _gradients(self) -> dict[str, torch.Tensor]:
        """Every trained parameter's gradient in full, as the optimizer sees it (for the test hook)."""
        return {f"grad.{role}.{name}": full(p.grad).detach().cpu().clone()
                for role in self.trained for name, p in self.pipeline.components[role].named_parameters()
                if p.grad is not None}

    def _dump(self, folder: Path, grads: dict[str, torch.Tensor]) -> None:
        """Test hook ``SCDKIT_TEST_GRADS_DIR=FOLDER``: rank 0 writes ``FOLDER/step-N.safetensors`` after step N, with the
        step's averaged gradients before clipping (``grad.ROLE.NAME``) and the weights after it (``weight.ROLE.NAME``),
        so tests compare a torchrun step with a single-process one."""
        from safetensors.torch import save_file

        weights = {f"weight.{role}.{k}": v.detach().cpu().contiguous() for role in self.trained
                   for k, v in full_state_dict(self.pipeline.components[role]).items()}
        if self.ranks.main:
            folder.mkdir(parents=True, exist_ok=True)
            save_file(grads | weights, str(folder / f"step-{self.step}.safetensors"))

    def evaluate(self) -> dict[str, float]:
        result = evaluate_continuation(self.ema, self.data, HELD_OUT_CHECK.model_copy(update={"steps": self.config.eval_steps}))
        return {"psnr": result.model.mean()["psnr"], "repeat_last_psnr": result.repeat_last.mean()["psnr"],
                "constant_velocity_psnr": result.constant_velocity.mean()["psnr"],
                "sharpness": result.model.mean()["sharpness"], "true_sharpness": sum(result.truth_sharpness) / 4}

    def run(self, log: Path | None = None) -> list[float]:
        """Train up to ``config.steps``. A checkpoint step first checks the weights, evaluates (when due) and
        appends its log line, then saves: a resumed run finds the line of every step it resumes from. Under
        torchrun, rank 0 evaluates (the others wait) and writes; a stop signal to any rank stops all at one step."""
        cfg, ranks, losses = self.config, self.ranks, []
        columns = [TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.4f}"),
                   TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn()]
        started = time.perf_counter()
        with Progress(*columns, console=self.console, transient=False) as progress, self.stop_on_signals(progress.console):
            task = progress.add_task("train", total=cfg.steps, completed=self.step, loss=float("nan"), rate="")
            first = self.step
            while self.step < cfg.steps:
                losses.append(self.train_step())
                fault_point("after-step", self.step)
                rate = (time.perf_counter() - started) / (self.step - first)
                progress.update(task, completed=self.step, loss=sum(losses[-20:]) / len(losses[-20:]), rate=f"{rate:.2f} s/step")
                record = {"step": self.step, "loss": losses[-1], "elapsed_s": round(time.perf_counter() - started, 1),
                          "world_size": ranks.world, "accumulate": cfg.accumulate}
                checkpoint = self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps
                if checkpoint:
                    self.check_finite()  # a diverged step logs nothing and saves nothing
                if cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == cfg.steps):
                    self.gather_ema()
                    if ranks.main:
                        record |= self.evaluate()
                        progress.console.print(
                            f"step {self.step}: held-out PSNR {record['psnr']:.2f} dB vs repeat-last "
                            f"{record['repeat_last_psnr']:.2f} dB; sharpness {record['sharpness']:.4f} (true {record['true_sharpness']:.4f})")
                    ranks.barrier()
                if log is not None and ranks.main:
                    with open(log, "a") as fh:
                        fh.write(json.dumps(record) + "\n")
                fault_point("after-log", self.step)
                if checkpoint:
                    self.save()
                    fault_point("after-save", self.step)
                stopping = ranks.any(self.stop is not None)  # the same answer on every rank, at the same step
                if stopping and self.step < cfg.steps:  # a signal: this step is saved, then stop
                    if self.saved_step != self.step:
                        self.save()
                    raise Interrupted(f"{self.stop or 'a stop signal to another process'} at step {self.step}: saved a "
                                      f"checkpoint in {self.out}; the same command resumes from it")
        return losses

    @contextmanager
    def stop_on_signals(self, console: Console):
        """While training: SIGINT (Ctrl-C) and SIGTERM stop the loop after the current step, which is saved;
        a second signal stops at once (the last checkpoint stays whole). Outside the main thread, signals
        are left alone."""
        def request_stop(signum, frame):
            if self.stop is not None:
                raise KeyboardInterrupt
            self.stop = signal.Signals(signum).name
            console.print(f"{self.stop}: stopping after this step, with a checkpoint (again: stop at once)")

        previous = {}
        try:
            for number in (signal.SIGINT, signal.SIGTERM):
                previous[number] = signal.signal(number, request_stop)
        except ValueError:  # not the main thread
            pass
        try:
            yield
        finally:
            for number, handler in previous.items():
                signal.signal(number, signal.SIG_DFL if handler is None else handler)


def fault_point(name: str, step: int) -> None:
    """A hook for the fault tests (tests/test_kills.py, tests/test_distributed.py), inert unless its environment
    variable names this point: ``SCDKIT_TEST_STOP_AT=NAME[@STEP]`` ends the process here as ``kill -9`` would
    (``os._exit(137)``: nothing flushed, nothing cleaned up); ``SCDKIT_TEST_TERM_AT=NAME[@STEP]`` sends it SIGTERM.
    Under torchrun, ``SCDKIT_TEST_FAULT_RANK=R`` confines them to rank R. The points: ``after-step``, ``after-log``,
    ``after-state``, ``after-ROLE`` (each component file), ``after-save``."""
    only = os.environ.get("SCDKIT_TEST_FAULT_RANK")
    if only is not None and only != os.environ.get("RANK", "0"):
        return
    point = (name, f"{name}@{step}")
    if os.environ.get("SCDKIT_TEST_STOP_AT") in point:
        os._exit(137)
    if os.environ.get("SCDKIT_TEST_TERM_AT") in point:
        os.kill(os.getpid(), signal.SIGTERM)


def train(pipeline: Pipeline, config: TrainConfig, out: Path, data: VideoDataset | str, resume: bool = True,
          console: Console | None = None, names: dict[str, str] | None = None, init: list[str] = (),
          freeze: list[str] = (), overwrite: bool = False, ranks: Ranks | None = None,
          teacher: Teacher | None = None) -> Trainer:
    """Train ``pipeline`` (built, not loaded) into ``out``: resume its training state if there is one, else
    start from ``init`` (``runs.init_components``) with the ``freeze`` roles frozen. Refuses to replace
    trained weights it did not write (a folder with weights but no training state) unless ``overwrite``.
    Under torchrun (``ranks``), every rank reads what it needs; rank 0 alone locks the folder and writes.
    ``teacher``: distil the decoder from its samples (:mod:`scdkit.distill`)."""
    out = Path(out)
    ranks = ranks or Ranks()
    console = console or Console(quiet=not ranks.main)
    names = names or {role: module.plugin_name for role, module in pipeline.components.items()}
    unknown = [role for role in freeze if role not in pipeline.components]
    if unknown:
        raise UsageError(f"--freeze {','.join(unknown)}: not a role of this pipeline ({', '.join(pipeline.components)})")
    if len(freeze) == len(pipeline.components):
        raise UsageError(f"--freeze {','.join(freeze)}: that freezes every component; nothing would train")
    resuming = resume and (out / STATE).exists()
    identity = None if teacher is None else teacher_identity(teacher)  # what run.json records of it
    ranks.agree(resuming, f"whether {out} holds a training state to resume")
    if resuming:
        frozen = _frozen_on_resume(pipeline, out, init, freeze)
        _check_same_teacher(out, read_manifest(out).get("teacher"), identity)
    else:
        if not (out / STATE).exists():  # a run folder of ours is started over only by --fresh
            _check_replaceable(out, overwrite)
        report = init_components(pipeline.components, list(init))
        for line in report.skipped:
            console.print(f"init: not loaded: {line}")
        for role, source in report.loaded.items():
            console.print(f"init: {role} <- {source.describe()}")
        missing = [role for role in freeze if role not in report.loaded]
        if missing:
            raise UsageError(f"--freeze {','.join(missing)}: no trained weights to freeze; give them with --init")
        frozen = {role: report.loaded[role] for role in freeze}
    if config.freeze_encoder_after is not None and ("encoder" not in pipeline.components or freeze):
        raise UsageError("--freeze-encoder-after: only for joint training of an encoder and a decoder "
                         f"({'nothing may be frozen from the start' if freeze else 'this pipeline has no encoder'})")
    if teacher is not None:
        check_student(pipeline, teacher, frozen)
    lock = None
    if ranks.main:
        out.mkdir(parents=True, exist_ok=True)
        lock = _lock(out)  # held until the process ends: one training run per folder
        stale = stale_temporaries(out)  # left by a killed run: no one else writes here while we hold the lock
        if stale:
            size = sum(path.stat().st_size for path in stale)
            for path in stale:
                path.unlink(missing_ok=True)
            console.print(f"removed {len(stale)} temporary file{'s' * (len(stale) > 1)} ({size / 2**20:.1f} MB) that an "
                          f"interrupted run left in {out}")
    trainer = Trainer(pipeline, config, out, data, console, names=names, frozen=frozen, ranks=ranks, teacher=teacher)
    if resuming:
        try:
            trainer.resume()
        except (KeyError, RuntimeError) as exc:
            raise CheckpointError(f"{out / STATE} cannot be resumed: {exc}") from None
        ranks.agree(trainer.step, f"the step of {out / STATE}")
        console.print(f"resumed from {out} at step {trainer.step}")
        rewritten = trainer.repair() if ranks.main else []
        if rewritten:
            console.print(f"rewrote {', '.join(f'{role}.safetensors' for role in rewritten)} from the training state of "
                          f"step {trainer.step} (a save was interrupted)")
    log = out / "train_log.jsonl"
    if ranks.main:
        write_manifest(out, pipeline.name, names, {role: trainer.identity(role) | {"path": source.path}
                                                   for role, source in frozen.items()},
                       teacher=identity)
        if not resuming:
            set_aside(log)
        trim_log(log, trainer.step)
    trainer.run(log=log if ranks.main else None)
    del lock
    return trainer


def _check_same_teacher(out: Path, recorded: dict | None, given: dict | None) -> None:
    """A resumed run distils from the teacher it started with (``distill.teacher_identity``), or from none."""
    if recorded == given:
        return
    if recorded is None:
        raise UsageError(f"{out}: the run was trained without a teacher; resume it without --teacher, or pass --fresh")

    def said(who: dict | None) -> str:
        return f"{who['name']!r} at {who['steps']} steps (decoder sha256 {who['decoder_sha256'][:12]})" if who else "no teacher"

    raise UsageError(f"{out}: the run was distilled from {said(recorded)}, this one would be from {said(given)}; "
                     "resume it the same way, or pass --fresh")


def _lock(out: Path):
    """An exclusive lock on ``out``, or a UsageError if another training run holds it."""
    try:
        import fcntl
    except ImportError:  # not on POSIX: no lock
        return None
    handle = open(out / ".train.lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise UsageError(f"{out}: another `scdkit train` is writing to this folder; wait for it or use another --out") from None
    return handle


def _frozen_on_resume(pipeline: Pipeline, out: Path, init: list[str], freeze: list[str]) -> dict[str, Source]:
    """The frozen components of the run being resumed, loaded again from the checkpoints its run.json names."""
    if init:
        raise UsageError(f"--init: {out} holds a training state to resume; drop --init, or pass --fresh to start "
                         "over from the --init weights")
    recorded = read_manifest(out).get("frozen", {})
    if set(freeze) - set(recorded) or (freeze and set(recorded) - set(freeze)):
        raise UsageError(f"--freeze {','.join(freeze)}: the run in {out} froze {','.join(recorded) or 'nothing'}; "
                         "resume it as it was, or pass --fresh")
    files = checkpoint_files(out, recorded)
    frozen = {}
    for role, entry in recorded.items():
        frozen[role] = load_source(pipeline.components[role], files[role], role)
        if frozen[role].digest != entry.get("weights_sha256"):
            raise CheckpointError(f"{files[role]}: the frozen {role} of the run in {out} has changed since the run "
                                  "started (its weights digest differs from run.json)")
    return frozen


def _check_replaceable(out: Path, overwrite: bool) -> None:
    """A trained checkpoint is never replaced by accident: weights without a training state to resume are
    replaced only with ``--overwrite``, even by a run that starts from them (``--init`` naming this folder, or
    a forgotten ``--out`` whose default is the pipeline's own folder)."""
    weights = trained_weights(out) if out.is_dir() else []
    if weights and not overwrite:
        raise UsageError(f"{out} holds trained weights ({', '.join(weights)}) and no training state to resume: "
                         f"training would replace them. Train into another folder (--out runs/NAME; add --init {out} "
                         f"to start from these weights), or pass --overwrite to replace them")


def set_aside(path: Path) -> Path | None:
    """Move ``path`` to the first free ``NAME.N.SUFFIX`` beside it, so that a new run never erases an old log."""
    if not path.exists():
        return None
    n = 1
    while (target := path.with_name(f"{path.stem}.{n}{path.suffix}")).exists():
        n += 1
    os.replace(path, target)
    return target


def trim_log(log: Path, step: int) -> None:
    """Keep the log lines of steps up to ``step``, where training (re)starts: a resumed run drops the
    lines that an interrupted run wrote after its last checkpoint, a fresh run starts an empty log."""
    if not log.exists():
        return
    kept = [line for line in log.read_text(errors="replace").splitlines() if _logged_step(line) <= step]
    write_text_atomic(log, "".join(f"{line}\n" for line in kept))


def _logged_step(line: str) -> float:
    """The step of a log line; a torn or garbled line (a kill mid-write) counts as past any step, so it is dropped."""
    try:
        step = json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf
    return step if isinstance(step, int) else math.inf
