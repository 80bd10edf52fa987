"""Training on several processes with torchrun: torch.distributed, DDP and FSDP2, as ``scdkit.train`` uses them.

``torchrun --nproc-per-node N -m scdkit.cli train …`` starts N processes; each finds its place in the environment
torchrun gives it (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``: :func:`from_environment`), joins the process group
(NCCL on CUDA, one GPU per ``LOCAL_RANK``; gloo on the CPU) and trains on its shard of every step's global batch.
A process started any other way is a world of one: no process group, nothing wrapped, the single-process code
path untouched.

What the processes must agree on goes through :class:`Ranks`: a stop signal (:meth:`Ranks.any`), the loss
(:meth:`Ranks.mean`, so a non-finite loss on one rank stops all), and what they read from disk
(:meth:`Ranks.agree`). Rank 0 alone writes; the others wait for it where a write must be whole before anyone
moves on (:meth:`Ranks.barrier`), since torchrun ends every process when one of them exits with an error.

Two ways to spread a model:

- ``ddp`` (:func:`replicate`): every process holds the whole pipeline; ``DistributedDataParallel`` averages the
  gradients once per step. DDP hooks ``forward``, and the training loss is ``Pipeline.loss``, so the wrapped
  module is :class:`LossModule`, whose forward is that loss.
- ``fsdp`` (:func:`shard`): FSDP2's ``fully_shard`` on each trained component, one unit per component (plugins
  call submodules of a block outside the block's ``forward``, so per-block units would miss their parameters).
  The weights at rest, their gradients, the AdamW moments and the EMA are sharded; a component's weights are
  gathered for its forward and backward. Checkpoints stay the same safetensors files: saving gathers full state
  dicts (:func:`full_state_dict`, :func:`full_optimizer_state`) to rank 0's CPU.
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from scdkit.errors import ScdkitError, UsageError

#: The variables torchrun sets in each process it starts; all three present means "started by torchrun".
ENVIRONMENT = ("WORLD_SIZE", "RANK", "LOCAL_RANK")


class DistributedSetupError(ScdkitError):
    """A process cannot take its place in the run (its GPU, the process group, what it reads): unlike a
    usage error, it may be this rank's alone, so every rank reports its own."""

    exit_code = 2


@dataclass(frozen=True)
class Place:
    """Where torchrun put this process: ``rank`` of ``world`` processes, ``local_rank`` on its machine."""

    rank: int
    world: int
    local_rank: int


def from_environment(environ=None) -> Place | None:
    """This process's place when torchrun started it (``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` all set), else None."""
    environ = os.environ if environ is None else environ
    if not all(name in environ for name in ENVIRONMENT):
        return None
    try:
        rank, world, local = (int(environ[name]) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except ValueError:
        raise DistributedSetupError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (as torchrun sets them), got "
                                    + ", ".join(f"{name}={environ[name]!r}" for name in ENVIRONMENT)) from None
    if not (world >= 1 and 0 <= rank < world and local >= 0):
        raise DistributedSetupError(f"RANK {rank}, WORLD_SIZE {world}, LOCAL_RANK {local}: not a place in a run")
    return Place(rank, world, local)


def is_main_process() -> bool:
    """Whether this process speaks for the run: rank 0 under torchrun, always otherwise."""
    try:
        place = from_environment()
    except DistributedSetupError:
        return True
    return place is None or place.rank == 0


def device_name(requested: str, place: Place) -> str:
    """The device of this process for ``--device requested`` under torchrun: ``cuda:LOCAL_RANK`` for ``cuda`` (and
    for ``auto`` on a machine with CUDA), else the CPU. One GPU per process: ``cuda:N`` is refused."""
    kind = requested.split(":")[0]
    if requested == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cpu":
        return "cpu"
    if kind != "cuda":
        raise UsageError(f"--device {requested}: training under torchrun runs on cuda (NCCL) or cpu (gloo)")
    if ":" in requested:
        raise UsageError(f"--device {requested}: under torchrun each process uses the GPU of its LOCAL_RANK; "
                         "pass --device cuda")
    if not torch.cuda.is_available():
        return "cuda"  # resolve_device says it is not available, in one line
    count = torch.cuda.device_count()
    if place.local_rank >= count:
        raise DistributedSetupError(f"LOCAL_RANK {place.local_rank}: this machine has {count} CUDA device(s); start at "
                                    f"most {count} processes on it (torchrun --nproc-per-node)")
    return f"cuda:{place.local_rank}"


@dataclass
class Ranks:
    """The processes training together, as this one sees them; the default is a world of one, where every
    collective is the identity and nothing is communicated."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    distributed: bool = False  # a process group is up (started by torchrun)

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes checkpoints and the log and shows progress."""
        return self.rank == 0

    def _reduce(self, values: list[float], op) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(tensor, op=op)
        return tensor.tolist()

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any rank (every rank gets the same answer)."""
        if not self.distributed:
            return flag
        return bool(self._reduce([float(flag)], torch.distributed.ReduceOp.MAX)[0])

    def mean(self, value: float) -> float:
        """The mean of ``value`` over the ranks (a nan or inf on any rank makes it non-finite everywhere)."""
        if not self.distributed:
            return value
        return self._reduce([value], torch.distributed.ReduceOp.SUM)[0] / self.world

    def agree(self, value: int, what: str) -> None:
        """A DistributedSetupError on every rank unless every rank has the same ``value`` (e.g. what it read from a
        folder that must be shared)."""
        if not self.distributed:
            return
        high, low = self._reduce([value, -value], torch.distributed.ReduceOp.MAX)
        low = -low
        if low != high:
            raise DistributedSetupError(f"the processes disagree on {what} ({low:g} to {high:g}); every machine must "
                                        "see the same files (a shared folder for --out)")

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()


def start(place: Place, device: torch.device) -> Ranks:
    """Join the process group torchrun set up (NCCL for a CUDA device, gloo otherwise)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    except (RuntimeError, ValueError) as exc:
        raise DistributedSetupError(f"rank {place.rank} cannot join the process group: {exc}") from None
    return Ranks(place.rank, place.world, place.local_rank, device, distributed=True)


def stop() -> None:
    """Leave the process group, if this process is in one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# -- DDP ------------------------------------------------------------------------------------------

class LossModule(nn.Module):
    """The training loss as a module: DDP hooks ``forward``, and a pipeline's loss is ``Pipeline.loss``."""

    def __init__(self, pipeline: nn.Module):
        super().__init__()
        self.pipeline = pipeline

    def forward(self, batch, recipe, generator, teacher=None) -> Tensor:
        return self.pipeline.loss(batch, recipe, generator, teacher)


def replicate(pipeline: nn.Module, probe) -> nn.Module:
    """``pipeline``'s loss under DistributedDataParallel, over the parameters that train now (frozen ones have
    ``requires_grad`` False and are left out; build it again when that changes). A plugin may hold a parameter the
    loss never reaches (e.g. a label table without labels), which DDP would wait for forever: one backward of
    ``probe()`` (a loss) finds them, and DDP ignores them, rather than searching the graph at every step
    (``find_unused_parameters``)."""
    from torch.nn.parallel import DistributedDataParallel

    module = LossModule(pipeline)
    trained = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(probe(), [p for _, p in trained], allow_unused=True)
    unused = [name for (name, _), grad in zip(trained, grads) if grad is None]
    if unused:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, unused)
    return DistributedDataParallel(module)


# -- FSDP2 ----------------------------------------------------------------------------------------

def shard(component: nn.Module, ranks: Ranks) -> None:
    """FSDP2 on ``component``, in place: its parameters become DTensors sharded over the ranks (one FSDP unit)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # FSDP2 warns of every component whose output is a view (an in-place op on it would skip its backward
    # all-gather); Pipeline.loss uses component outputs out of place, and tests/test_distributed.py checks
    # FSDP2's gradients against DDP's
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    fully_shard(component, mesh=init_device_mesh(ranks.device.type, (ranks.world,)))


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def local(tensor: Tensor) -> Tensor:
    """This rank's part of ``tensor``: the local shard of a DTensor, any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full(tensor: Tensor) -> Tensor:
    """The whole of ``tensor``: a DTensor gathered (a collective: every rank calls it), any other as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _options(**extra):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **extra)


def full_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """``module``'s state dict in full: gathered to rank 0's CPU when sharded (the other ranks get an empty dict;
    every rank must call it), ``module.state_dict()`` otherwise."""
    if not is_sharded(module):
        return module.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module, options=_options(cpu_offload=True))


def load_full_state_dict(module: nn.Module, tensors: dict[str, Tensor]) -> None:
    """Load full tensors into ``module``: each rank keeps its shard when it is sharded (every rank must call it
    with the same tensors)."""
    if not is_sharded(module):
        module.load_state_dict(tensors)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(module, tensors, options=_options())


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[Tensor, dict[str, Tensor]]:
    """Each parameter's optimizer state in full, on rank 0's CPU, keyed by the parameter (gathered from the shards;
    every rank must call it; the other ranks get an empty dict)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    names = {id(p): name for name, p in model.named_parameters()}
    by_name = {names[id(p)]: p for group in optimizer.param_groups for p in group["params"]}
    state = get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True)).get("state", {})
    return {by_name[name]: values for name, values in state.items()}


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                              state: dict[Tensor, dict[str, Tensor]]) -> None:
    """Load each parameter's full optimizer state (keyed by the parameter; every rank must call it with the same
    tensors): each rank keeps its shard. The optimizer's ``param_groups`` are new dicts afterwards."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    names = {id(p): name for name, p in model.named_parameters()}
    groups = [{**{k: v for k, v in group.items() if k != "params"}, "params": [names[id(p)] for p in group["params"]]}
              for group in optimizer.param_groups]
    set_optimizer_state_dict(model, optimizer, {"state": {names[id(p)]: values for p, values in state.items()},
                                                "param_groups": groups}, options=_options())


@contextmanager
def gradient_sync(replicated: nn.Module | None, sharded: list[nn.Module], enabled: bool):
    """Gradients are averaged over the ranks only in the backward passes run with ``enabled`` (the last
    micro-batch of a step): DDP's ``no_sync`` on the ``replicated`` loss, FSDP2's ``set_requires_gradient_sync``
    on the ``sharded`` components. Nothing to do for a single process."""
    for component in sharded:
        component.set_requires_gradient_sync(enabled)
    with replicated.no_sync() if replicated is not None and not enabled else nullcontext():
        yield
