"""train.optimizer_state_device: cpu: the optimizer's state in host memory, through torchao (imported only when
a run asks for it)."""
from __future__ import annotations

import torch
from torchao.optim import CPUOffloadOptimizer

from .optim import build_optimizer


class CPUStateOptimizer(CPUOffloadOptimizer):
    """train.optimizer_state_device: cpu on a GPU, through torchao: each trained parameter has a host copy in pinned
    memory with its own optimizer there; backward copies each gradient to the host as soon as it is complete (a
    post-accumulate hook, on a side stream), `step()` runs the optimizers on the CPU and copies the weights back.
    Parameters under torchao's minimal_size (biases, norms) keep their small state on the device. With
    `free_device_grads` (train.fused_backward) each device gradient is freed once copied, so the full set of
    gradients never exists on the device. Not for DDP: the hooks would copy gradients before they are reduced.
    torchao leaves clipping, host weights that follow a resume and the LR of groups loaded on the device to its
    caller: the overrides below."""

    def __init__(self, name: str, groups: list, lr: float, extra: dict, *, max_grad_norm: float,
                 free_device_grads: bool, device: torch.device):
        def per_parameter(groups):
            # a group holds one host tensor, or the list of the small device ones; the dicts themselves must stay
            # the optimizer's, as torchao hands them to the LR schedule
            for g in groups:
                g["params"] = [g["params"]] if torch.is_tensor(g["params"]) else g["params"]
            return build_optimizer(name, groups, lr, extra)

        with torch.cuda.device(device):  # torchao's side stream is made on the current device
            super().__init__([dict(g) for g in groups], per_parameter, offload_gradients=free_device_grads)
        self.max_grad_norm = max_grad_norm
        self.defaults = {}  # torchao skips Optimizer.__init__; nothing here skips a non-finite step on the device

    @torch.no_grad()
    def step(self, closure=None):
        if self.max_grad_norm:  # the CPU steps read the host copies (the device ones may be freed): clip those
            for copied in self.queue.values():
                copied.synchronize()
            params = [self.param_d2h_map[p] for p in self.queue]
            params += [p for g in self.d_param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        return super().step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        # a step skipped for a NaN/inf loss leaves its copies queued: finish and drop them
        self.stream.synchronize()
        self.queue.clear()
        super().zero_grad(set_to_none)

    def load_state_dict(self, state_dict) -> None:
        # resume writes the checkpoint's weights into the device parameters after this optimizer was built: the
        # host copies that the CPU steps update must start from them
        for p_device, p_host in self.param_d2h_map.items():
            p_host.copy_(p_device.detach())
        super().load_state_dict(state_dict)
        if self.d_opt is not None:  # torch loads new group dicts: the LR schedule must reach those (torchao keeps the old)
            self.d_param_groups = self.d_opt.param_groups
