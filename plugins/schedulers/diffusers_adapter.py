"""`diffusers`: a diffusers noise scheduler, chosen by class name and configured from the registry table.

    [schedulers.dpm]
    plugin = "diffusers"
    class_name = "DPMSolverMultistepScheduler"
    steps = 10
    config = { prediction_type = "v_prediction", beta_schedule = "squaredcos_cap_v2" }   # its constructor's

diffusers is an optional extra (``pip install "scdkit[diffusers]"``). The plugin is always registered and
imports diffusers only when a registry table uses it, so ``scdkit plugins`` stays fast and works without it;
without diffusers such a table is a registry error that says what to install.

Two kinds of diffusers scheduler fit; the others are refused when the table is validated:

- **DDPM family** (it has ``alphas_cumprod``; ``prediction_type`` ``epsilon``, ``v_prediction`` or
  ``sample``, here ``epsilon``, ``v``, ``sample``): diffusers' timestep j is our time t = (j + 1) / T
  (``scdkit.interfaces``), and training draws j uniformly and noises with its ``alphas_cumprod``
  (``scdkit.diffusion``). Its sample must be x_t itself (``init_noise_sigma`` 1, ``scale_model_input`` the
  identity): DDPM, DDIM, DPMSolverMultistep, UniPCMultistep; not the sigma-scaled Euler, Heun or LMS kind.
- **Flow matching** (``FlowMatch*``: x_t = (1 − σ)·x0 + σ·ε, the model predicts ε − x0, our ``velocity``):
  our t is σ, and training draws σ uniformly from its training sigmas (shift included).

Sampling must take one model evaluation per step, run strictly from noise to clean and end at the clean
sample (t = 0: ``final_sigmas_type = "zero"``, DDIM's ``set_alpha_to_one = true``).

The plugin object never changes: every ``begin`` copies a fresh diffusers scheduler into the
``SamplingState``, where its multistep memory and step index live. Its tables stay on the CPU; the tensors
it steps follow the inputs' device.
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import Field, PositiveInt, field_validator
from torch import Tensor

from scdkit import diffusion
from scdkit.errors import did_you_mean
from scdkit.hookspecs import hookimpl
from scdkit.interfaces import ComponentConfig, NoiseScheduler, SamplingState

INSTALL = "pip install 'scdkit[diffusers]' (from a clone: pip install -e \".[diffusers]\")"
#: diffusers' prediction_type of a DDPM-family scheduler -> ours
PREDICTIONS = {"epsilon": "epsilon", "v_prediction": "v", "sample": "sample"}


def diffusers_schedulers():
    """The ``diffusers.schedulers`` module, or a ValueError that says what to install."""
    if importlib.util.find_spec("diffusers") is None:
        raise ValueError(f"the diffusers plugin needs diffusers, which is not installed: {INSTALL}")
    try:
        import diffusers.schedulers
    except Exception as exc:  # installed but broken (built for another torch, a missing library)
        raise ValueError(f"diffusers is installed but failed to import: {type(exc).__name__}: {exc}") from None
    return diffusers.schedulers


def scheduler_class(name: str) -> type:
    """diffusers' scheduler class ``name``, or a ValueError with close matches."""
    schedulers = diffusers_schedulers()
    try:
        cls = getattr(schedulers, name, None)
    except Exception as exc:  # a scheduler whose optional dependency (scipy, torchsde) is missing
        raise ValueError(f"diffusers scheduler {name!r} cannot be imported: {type(exc).__name__}: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, schedulers.SchedulerMixin)):
        names = [n for n in dir(schedulers) if n.endswith("Scheduler")]
        raise ValueError(f"diffusers has no scheduler class {name!r}{did_you_mean(name, names)}")
    return cls


@dataclass(frozen=True)
class Wrapped:
    """A diffusers scheduler that fits, never stepped itself (``begin`` copies it), and what it means here."""

    solver: Any
    flow: bool  # flow matching, else DDPM family
    prediction_type: str  # ours
    table: Tensor  # ᾱ_0..ᾱ_T (DDPM family) or the training sigmas (flow matching), CPU
    takes_generator: bool

    @property
    def train_timesteps(self) -> int:
        return self.solver.config.num_train_timesteps

    def times(self, solver, steps: int) -> list[float]:
        """Our decoder times of a solver after ``set_timesteps(steps)``; a ValueError if they do not fit."""
        name = type(solver).__name__
        if len(solver.timesteps) != steps:
            raise ValueError(f"{name} evaluates the model {len(solver.timesteps)} times in {steps} steps; the "
                             "diffusers plugin needs one evaluation per step")
        if self.flow:  # its sigmas, the last one after the last step
            times, clean = [float(s) for s in solver.sigmas[:steps]], float(solver.sigmas[-1]) == 0
        else:
            times, clean = [(float(j) + 1) / self.train_timesteps for j in solver.timesteps], _ends_clean(solver)
        if not clean:
            raise ValueError(f"{name} does not end at the clean sample (set final_sigmas_type = \"zero\" or "
                             "set_alpha_to_one = true where it has them)")
        times.append(0.0)
        if not all(1 >= a > b for a, b in zip(times, times[1:])):
            raise ValueError(f"{name} gives times that do not run strictly from noise to clean: {times}")
        return times


def _ends_clean(solver) -> bool:
    """Whether a DDPM-family solver's last step lands on the clean sample."""
    sigmas = getattr(solver, "sigmas", None)
    if isinstance(sigmas, Tensor) and len(sigmas) == len(solver.timesteps) + 1:
        return float(sigmas[-1]) == 0
    return float(getattr(solver, "final_alpha_cumprod", 1.0)) == 1.0


def wrap(class_name: str, options: dict[str, Any], steps: int) -> Wrapped:
    """diffusers' ``class_name(**options)``, checked to fit (at ``steps`` steps); a ValueError says why not.
    It is built on the CPU, even when a pipeline is built under the meta device."""
    cls = scheduler_class(class_name)
    with torch.device("cpu"):
        try:
            solver = cls(**options)
        except Exception as exc:
            raise ValueError(f"{class_name}({', '.join(f'{k}={v!r}' for k, v in options.items())}) fails: "
                             f"{type(exc).__name__}: {exc}") from None
        takes_generator = "generator" in inspect.signature(solver.step).parameters
        if hasattr(solver, "alphas_cumprod"):
            kind = solver.config.get("prediction_type", "epsilon")
            if kind not in PREDICTIONS:
                raise ValueError(f"{class_name}: prediction_type {kind!r} is not supported on DDPM-family noise "
                                 "(epsilon, v_prediction or sample; for flow matching use "
                                 "FlowMatchEulerDiscreteScheduler)")
            table = torch.cat([torch.ones(1, dtype=torch.float64), solver.alphas_cumprod.double()])
            wrapped = Wrapped(solver, False, PREDICTIONS[kind], table, takes_generator)
        elif class_name.startswith("FlowMatch") and isinstance(getattr(solver, "sigmas", None), Tensor):
            wrapped = Wrapped(solver, True, "velocity", solver.sigmas.double(), takes_generator)
        else:
            raise ValueError(f"{class_name} is neither DDPM-family (alphas_cumprod) nor flow matching (FlowMatch*): "
                             "the diffusers plugin cannot map its times")
        trial = copy.deepcopy(solver)
        try:
            trial.set_timesteps(steps)
        except Exception as exc:
            raise ValueError(f"{class_name}.set_timesteps({steps}) fails: {type(exc).__name__}: {exc}") from None
        wrapped.times(trial, steps)
        probe = torch.ones(2)
        scaled = trial.scale_model_input(probe, trial.timesteps[0]) if hasattr(trial, "scale_model_input") else probe
        noise_scale = float(getattr(trial, "init_noise_sigma", 1.0))
        if noise_scale != 1.0 or not torch.equal(scaled, probe):
            raise ValueError(f"{class_name} samples a scaled x (init_noise_sigma {noise_scale:g}, scale_model_input): "
                             "the diffusers plugin needs schedulers whose sample is x_t itself")
    return wrapped


class DiffusersConfig(ComponentConfig):
    class_name: str = Field(description="a diffusers scheduler class, e.g. DPMSolverMultistepScheduler")
    steps: PositiveInt = Field(20, description="default sampling steps")
    config: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of its constructor")

    @field_validator("class_name")
    @classmethod
    def _known_class(cls, name: str) -> str:
        scheduler_class(name)
        return name

    @field_validator("config")
    @classmethod
    def _fits(cls, options: dict[str, Any], info) -> dict[str, Any]:
        if "class_name" in info.data and "steps" in info.data:
            wrap(info.data["class_name"], options, info.data["steps"])
        return options


@dataclass
class DiffusersState(SamplingState):
    solver: Any = None  # this run's diffusers scheduler, stepped in place


class DiffusersScheduler(NoiseScheduler):
    plugin_name = "diffusers"
    plugin_version = "0.1.0"
    config_class = DiffusersConfig

    @classmethod
    def example_config(cls) -> DiffusersConfig:
        return DiffusersConfig(class_name="DPMSolverMultistepScheduler", steps=10,
                               config={"prediction_type": "v_prediction"})

    def __init__(self, config: DiffusersConfig):
        super().__init__(config)
        self.wrapped = wrap(config.class_name, config.config, config.steps)

    @property
    def steps(self) -> int:
        return self.config.steps

    @property
    def prediction_type(self) -> str:
        return self.wrapped.prediction_type

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        if self.wrapped.flow:
            return 1 - t, t
        return diffusion.alpha_sigma(self.wrapped.table, t)

    def sample_timesteps(self, shape, generator=None, device=None) -> Tensor:
        if self.wrapped.flow:
            table = self.wrapped.table
            index = torch.randint(0, len(table), shape, generator=generator, device=device)
            return table.to(index.device, torch.float32)[index]
        return diffusion.sample_timesteps(self.wrapped.train_timesteps, shape, generator, device)

    def training_target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        if self.wrapped.flow:
            return noise - x0
        return diffusion.target(self.prediction_type, x0, noise, *self.alpha_sigma(t))

    def begin(self, steps=None, device=None) -> DiffusersState:
        steps = self.check_steps(steps, self.config.steps)
        solver = copy.deepcopy(self.wrapped.solver)
        with torch.device("cpu"):
            solver.set_timesteps(steps)
        return DiffusersState(self.wrapped.times(solver, steps), torch.device(device or "cpu"), solver=solver)

    def step(self, state: DiffusersState, prediction: Tensor, x: Tensor, generator=None) -> Tensor:
        solver = state.solver
        seeded = {"generator": generator} if self.wrapped.takes_generator else {}
        x = solver.step(prediction, solver.timesteps[state.index], x, return_dict=False, **seeded)[0]
        state.index += 1
        return x


@hookimpl
def scdkit_register_schedulers(register):
    register(DiffusersScheduler)
