"""Few-step decoders distilled under a frozen encoder (``scdkit train --teacher NAME``).

SCD's decoder runs at every sampling step of every frame, so its step count bounds streaming speed; the encoder
runs once per frame and can stay as it is. Distillation trains a *student* decoder to reach, in its scheduler's
few steps, the frame the *teacher* pipeline (the same frozen encoder, its own decoder and sampler) reaches from the
same noise in many:

- noise ``e`` and the teacher's sample ``x = teacher(e)`` from the encoder features of the training clip are a
  fixed pair (the teacher's sampler maps one to the other);
- the student is trained with its scheduler's own loss on that pair, ``training_loss(student(x_t, t), x, e, t)`` with
  ``x_t = add_noise(x, e, t)``, at the times of its own sampling grid (``scheduler.begin().times``).

A deterministic one-step solver (Euler for flow matching, DDIM with eta 0) given the exact prediction at a point of
``add_noise(x, e, ·)`` lands on the same line at its next time, so a student that fits the pairs samples ``x`` in
its few steps: the teacher's sharp sample, not the blurred mean that few steps of a many-step model give. This is
rectified flow's "reflow" (Liu et al. 2022) restricted to the student's grid, or knowledge distillation of the
sampler (Luhman & Luhman 2021) for a one-step grid. :func:`pair_problem` checks a student scheduler for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from scdkit.checkpoint import weights_digest
from scdkit.errors import UsageError
from scdkit.interfaces import Conditioning, NoiseScheduler

if TYPE_CHECKING:
    from scdkit.pipeline import Pipeline


@dataclass
class Teacher:
    """A trained SCD pipeline whose samples a student decoder learns to reach in fewer steps."""

    pipeline: Pipeline  # trained, in evaluation mode; never trained here
    steps: int | None = None  # its sampling steps (None: its scheduler's)
    name: str = "teacher"

    def __post_init__(self):
        self.pipeline.train(False).requires_grad_(False)
        self.times = self.pipeline.sampling_times(self.steps)

    @torch.no_grad()
    def sample(self, noise: Tensor, cond: Tensor, conditioning: Conditioning,
               generator: torch.Generator | None = None) -> Tensor:
        """The teacher's clean frames [m n p] from ``noise`` [m n p], decoded from encoder features ``cond``
        [m n_c d_c] with per-item ``conditioning`` (labels [m], actions [m a]) as its sampler makes them."""
        model = self.pipeline.model
        state = model.decoding_state(cond.detach(), conditioning)
        model.prepare(state, self.times[:-1])
        return self.pipeline.denoise_frame(state, noise.shape[0], self.steps, generator, noise=noise)

    def grid_times(self, scheduler: NoiseScheduler, count: int, generator: torch.Generator | None,
                   device: torch.device) -> Tensor:
        """``count`` training times drawn from the student scheduler's sampling grid (its noisy end included,
        clean excluded)."""
        grid = torch.tensor(scheduler.begin(None, device).times[:-1], device=device)
        return grid[torch.randint(len(grid), (count,), generator=generator, device=device)]


def pair_problem(scheduler: NoiseScheduler) -> str | None:
    """Why ``scheduler`` cannot sample a distilled student, or None: given the exact prediction for a fixed pair
    (clean x, noise e) at each step, starting from their mix at its first time, it must end at x (deterministic
    solvers do; ancestral ones add fresh noise and do not)."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    clean = torch.randn(4, 16, generator=generator, device="cpu")
    noise = torch.randn(4, 16, generator=generator, device="cpu")
    sampling = scheduler.begin(None, "cpu")
    x = scheduler.add_noise(clean, noise, torch.full((clean.shape[0],), float(sampling.times[0]), device="cpu"))
    for t in sampling.times[:-1]:
        t = torch.full((clean.shape[0],), float(t), device="cpu")
        x = scheduler.step(sampling, scheduler.training_target(clean, noise, t), x,
                           torch.Generator(device="cpu").manual_seed(1))
    error = (x - clean).abs().max().item()
    if error > 1e-3:
        return (f"{scheduler.plugin_name} does not follow a fixed (noise, clean) pair given exact predictions (ends "
                f"{error:.2g} away): a distilled student needs a deterministic one-step solver, e.g. flow-match-euler or "
                "ddim with eta 0")
    return None


def check_student(pipeline: Pipeline, teacher: Teacher, frozen: dict) -> None:
    """A one-line UsageError unless ``pipeline`` can be distilled from ``teacher``: SCD both, the student's encoder
    frozen with the teacher's weights (the decoders see the same features), its scheduler following pairs, and the
    same prediction type and noise family for both samplers."""
    roles = set(pipeline.components)
    if roles != {"encoder", "decoder"} or set(teacher.pipeline.components) != roles:
        raise UsageError("--teacher: distillation trains an SCD decoder under a frozen encoder; both the pipeline and "
                         "the teacher must have an encoder and a decoder")
    if "encoder" not in frozen or "decoder" in frozen:
        raise UsageError("--teacher: the student's encoder must be frozen and its decoder trained (--init the "
                         "teacher's checkpoint, --freeze encoder)")
    mine, theirs = (weights_digest(p.components["encoder"]) for p in (pipeline, teacher.pipeline))
    if mine != theirs:
        raise UsageError(f"--teacher {teacher.name}: its encoder weights (sha256 {theirs[:12]}) are not the frozen "
                         f"encoder's ({mine[:12]}); the student must decode the teacher's encoder features")
    problem = pair_problem(pipeline.scheduler)
    if problem:
        raise UsageError(f"--teacher: the student's scheduler {problem}")
    student, master = pipeline.scheduler, teacher.pipeline.scheduler
    if (student.prediction_type, student.noise_family) != (master.prediction_type, master.noise_family):
        raise UsageError(f"--teacher {teacher.name}: its scheduler predicts {master.prediction_type} "
                         f"({master.noise_family}), the student's {student.prediction_type} ({student.noise_family}); "
                         "the student starts from the teacher's decoder, so they must agree")


def teacher_identity(teacher: Teacher) -> dict:
    """What a run's ``run.json`` records of its teacher: resuming continues with the same one."""
    return {"name": teacher.name, "steps": len(teacher.times) - 1,
            "decoder_sha256": weights_digest(teacher.pipeline.components["decoder"])}
