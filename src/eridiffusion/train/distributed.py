"""Several processes, one run, through torch.distributed: started by `torchrun`, `accelerate launch` or
`trainer --gpus N` (which starts torchrun), each process on its own GPU (gloo on the CPU). The engine's
DistributedDataParallel averages the trained weights' gradients; this module only says who is who."""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class Processes:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """The one process that writes files, samples, logs and the progress bar."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def broadcast(self, value):
        """Rank 0's value of a picklable object, on every process."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def exchange(self, entries: dict) -> dict:
        """Every process's dict merged, on every process (a cache filled in shares)."""
        if self.world == 1:
            return entries
        gathered = [None] * self.world
        dist.all_gather_object(gathered, {k: {n: t.cpu() for n, t in v.items()} for k, v in entries.items()})
        return {k: v for part in gathered for k, v in part.items()}

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean over processes of a device scalar (the logged loss), without a host sync on CUDA."""
        if self.world == 1:
            return value
        value = value.clone()
        dist.all_reduce(value)  # gloo has no AVG
        return value / self.world

    def any(self, flag: bool) -> bool:
        """True on every process when it is true on one (a stop request must stop all at the same step)."""
        if self.world == 1:
            return flag
        t = torch.tensor([float(flag)], device=_collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def start(device: torch.device) -> tuple[Processes, torch.device]:
    """Join the process group the launcher describes (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT in the
    environment); one process without them. Returns who this process is and the device it trains on: with
    several processes on CUDA, cuda:LOCAL_RANK whatever index the config names."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Processes(), device
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"process {rank} (local rank {local}) has no GPU: this machine has "
                               f"{torch.cuda.device_count()}; start at most that many processes per machine")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if rank:  # one process says what the run does (its plan, its progress); errors still reach stderr from all
        sys.stdout = open(os.devnull, "w")
    if not dist.is_initialized():
        # process 0 renders samples and writes checkpoints while the others wait in their next all-reduce
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=1),
                                **({"device_id": device} if device.type == "cuda" else {}))
    return Processes(rank, world, local), device


def stop(finished: bool = False) -> None:
    """The process group closed. After a finished run every process first waits for the others, so no collective is
    still in flight when the group goes (without it a gloo process aborted once at exit in CI, its run already saved);
    after a failure it closes at once (torchrun stops the others)."""
    if dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


class LossModule(torch.nn.Module):
    """What DistributedDataParallel wraps: the modules whose weights train, and a forward that is the
    architecture's training loss (DDP must see the forward to average the gradients of its backward)."""

    def __init__(self, arch, modules: dict[str, torch.nn.Module]):
        super().__init__()
        self.trained = torch.nn.ModuleDict(modules)
        self.loss = arch.training_loss

    def forward(self, latents, text, batch, generator):
        return self.loss(latents, text, batch, generator)


def data_parallel(arch, modules: dict[str, torch.nn.Module], device: torch.device, some_unused: bool = False):
    """The engine's DDP over the trained parameters only: frozen weights (quantized or not) are neither
    broadcast nor reduced. `some_unused`: a step may skip some trained layers (module dropout). Otherwise the
    graph is static (the same trained parameters every step), which spares DDP its per-step search of the graph:
    a UNet's LoRA has ~1,500 trained tensors and its step is bound by the host."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    wrapper = LossModule(arch, modules)
    frozen = [n for n, p in wrapper.named_parameters() if not p.requires_grad] + [n for n, _ in wrapper.named_buffers()]
    DDP._set_params_and_buffers_to_ignore_for_model(wrapper, frozen)
    return DDP(wrapper, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False,
               find_unused_parameters=some_unused, static_graph=not some_unused, gradient_as_bucket_view=True)


def shard(model: torch.nn.Module, blocks: list[torch.nn.Module], device: torch.device) -> None:
    """A full fine-tune on several processes: the engine's FSDP2 shards parameters, gradients and optimizer
    state over the processes, each repeated block gathered only while it runs (the root holds the rest)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def full_state(model: torch.nn.Module, optimizer) -> tuple[dict, dict]:
    """The sharded model's and optimizer's whole state, gathered onto process 0's CPU (every process must call
    this; the others get empty dicts). Parameter names as in an unsharded model, so any process count resumes."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)


def load_optimizer_state(model: torch.nn.Module, optimizer, state: dict) -> None:
    """An optimizer state saved by full_state, into a sharded or unsharded model's optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))


def no_sync(synced, last: bool):
    """Gradient accumulation: gradients are averaged across processes on the last batch only (`synced`: the
    DDP wrapper or the FSDP-sharded model)."""
    if synced is None or last:
        return contextlib.nullcontext()
    if hasattr(synced, "no_sync"):
        return synced.no_sync()
    return _fsdp_no_sync(synced)


@contextlib.contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)
