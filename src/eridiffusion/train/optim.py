"""Optimizers and learning-rate schedules by ai-toolkit's names, built on torch, bitsandbytes,
transformers and diffusers implementations."""
from __future__ import annotations

import torch

SCHEDULER_PARAMS = {"num_warmup_steps", "warmup_steps", "num_cycles", "power"}


def build_optimizer(name: str, params: list, lr: float, extra: dict) -> torch.optim.Optimizer:
    """`params`: tensors or torch param groups (dicts with "params" and their own "lr")."""
    name = name.lower()
    first = params[0]["params"][0] if isinstance(params[0], dict) else params[0]
    on_cuda = first.is_cuda
    if name in ("adamw", "adam"):
        cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
        kw = {"eps": 1e-6, **extra}  # ai-toolkit's eps for its torch Adam/AdamW
        if "foreach" not in kw:  # one kernel for every tensor, and a NaN/inf step skipped without a host sync
            kw.setdefault("fused", True)
        return cls(params, lr=lr, **kw)
    if name in ("adamw8bit", "adam8bit"):
        if not on_cuda:
            raise RuntimeError(f"train.optimizer '{name}' needs bitsandbytes on a CUDA GPU; on this device use 'adamw'")
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise RuntimeError(f"train.optimizer '{name}' needs bitsandbytes: pip install bitsandbytes") from e
        cls = bnb.optim.AdamW8bit if name == "adamw8bit" else bnb.optim.Adam8bit
        return cls(params, lr=lr, **extra)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, **extra)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        kw = {"relative_step": False, "scale_parameter": False, "warmup_init": False, **extra}
        return Adafactor(params, lr=lr, **kw)
    if name in ("prodigy", "prodigyopt"):
        try:
            from prodigyopt import Prodigy
        except ImportError as e:
            raise RuntimeError("train.optimizer 'prodigy' needs the prodigyopt package: pip install prodigyopt") from e
        # Prodigy estimates the step size itself; like ai-toolkit, a small configured lr becomes 1.0
        groups = [{**g, "lr": g["lr"] if g["lr"] >= 0.1 else 1.0} for g in params] if isinstance(params[0], dict) else params
        return Prodigy(groups, lr=lr if lr >= 0.1 else 1.0, **extra)
    raise ValueError(f"train.optimizer '{name}' is not supported yet (adamw, adam, adamw8bit, adam8bit, sgd, adafactor, prodigy)")


def build_scheduler(name: str, optimizer: torch.optim.Optimizer, params: dict, total_steps: int):
    """`lr_scheduler` + `lr_scheduler_params` -> a diffusers LambdaLR, stepped once per optimizer step."""
    from diffusers.optimization import SchedulerType, get_scheduler

    unknown = set(params) - SCHEDULER_PARAMS
    if unknown:
        raise ValueError(f"train.lr_scheduler_params: unknown key(s) {sorted(unknown)} (known: {sorted(SCHEDULER_PARAMS)})")
    names = {s.value for s in SchedulerType}
    if name not in names:
        raise ValueError(f"train.lr_scheduler '{name}' is not supported yet (supported: {', '.join(sorted(names))})")
    warmup = int(params["num_warmup_steps"] if "num_warmup_steps" in params else params.get("warmup_steps", 0))
    kw = {k: params[k] for k in ("num_cycles", "power") if k in params}
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps, **kw)


class PerParameterOptimizer(torch.optim.Optimizer):
    """train.fused_backward: one optimizer per parameter, stepped inside backward as soon as that parameter's
    gradient is complete (torch's register_post_accumulate_grad_hook), its gradient freed at once, so the
    full-size gradients of a full fine-tune never all exist together. `step()` itself has nothing left to do;
    the LR schedule drives this object's one param group, whose rate each parameter's optimizer takes on.
    Fused Adam/AdamW skip a parameter whose gradient is not finite on the device (no host sync)."""

    def __init__(self, name: str, params: list, lr: float, extra: dict):
        super().__init__(params, {"lr": lr})
        self.inner = {p: build_optimizer(name, [p], lr, extra) for p in self.param_groups[0]["params"]}
        self.skips_on_device = all(o.defaults.get("fused") for o in self.inner.values())
        self._hooks = [p.register_post_accumulate_grad_hook(self._step_one) for p in self.inner]

    @torch.no_grad()
    def _step_one(self, p: torch.nn.Parameter) -> None:
        opt = self.inner[p]
        for group in opt.param_groups:
            group["lr"] = self.param_groups[0]["lr"]
        if self.skips_on_device:
            opt.found_inf = (~torch.isfinite(p.grad).all()).float()
        opt.step()
        p.grad = None

    def step(self, closure=None):  # every parameter was stepped in backward
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.inner:
            p.grad = None

    def state_dict(self):
        return {"lr": self.param_groups[0]["lr"], "initial_lr": self.param_groups[0].get("initial_lr"),
                "inner": [o.state_dict() for o in self.inner.values()]}

    def load_state_dict(self, state) -> None:
        self.param_groups[0]["lr"] = state["lr"]
        if state.get("initial_lr") is not None:
            self.param_groups[0]["initial_lr"] = state["initial_lr"]
        for opt, s in zip(self.inner.values(), state["inner"], strict=True):
            opt.load_state_dict(s)
