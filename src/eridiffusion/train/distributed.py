"""Several processes, one run, through torch.distributed: started by `torchrun`, `accelerate launch` or
`trainer --gpus N` (which starts torchrun), each process on its own GPU (gloo on the CPU). The engine's
DistributedDataParallel averages the trained weights' gradients; this module only says who is who."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

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
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                **({"device_id": device} if device.type == "cuda" else {}))
    return Processes(rank, world, local), device


def stop() -> None:
    if dist.is_initialized():
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


def data_parallel(arch, modules: dict[str, torch.nn.Module], device: torch.device):
    """The engine's DDP over the trained parameters only: frozen weights (quantized or not) are neither
    broadcast nor reduced."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    wrapper = LossModule(arch, modules)
    frozen = [n for n, p in wrapper.named_parameters() if not p.requires_grad] + [n for n, _ in wrapper.named_buffers()]
    DDP._set_params_and_buffers_to_ignore_for_model(wrapper, frozen)
    return DDP(wrapper, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)


def no_sync(ddp, last: bool):
    """Gradient accumulation: gradients are averaged across processes on the last batch only."""
    return contextlib.nullcontext() if ddp is None or last else ddp.no_sync()
