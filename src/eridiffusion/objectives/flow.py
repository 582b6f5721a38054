"""Rectified-flow (flow matching) objective, as the flow-matching models are trained:
x_t = (1 - sigma) * x0 + sigma * noise, the model predicts the velocity noise - x0."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

TIMESTEP_TYPES = ("sigmoid", "linear", "shift", "flux_shift", "weighted")


@dataclass(frozen=True)
class FlowShift:
    """Inference-style sigma shift: static `shift`, or resolution-dependent (mu from the image sequence length)."""

    shift: float = 3.0
    dynamic: bool = False
    base_seq_len: int = 256
    max_seq_len: int = 4096
    base_shift: float = 0.5
    max_shift: float = 1.15

    @classmethod
    def from_scheduler(cls, config) -> FlowShift:
        """The shift a FlowMatchEulerDiscreteScheduler's config samples with, or a UniPC / DPM-Solver config over flow
        sigmas (its static `flow_shift`, as some video repos ship)."""
        if dict(config).get("use_flow_sigmas"):
            return cls(shift=float(config["flow_shift"]))
        return cls(shift=config.shift, dynamic=bool(config.use_dynamic_shifting), base_seq_len=config.base_image_seq_len,
                   max_seq_len=config.max_image_seq_len, base_shift=config.base_shift, max_shift=config.max_shift)

    def mu(self, seq_len: int) -> float:
        slope = (self.max_shift - self.base_shift) / (self.max_seq_len - self.base_seq_len)
        return self.base_shift + slope * (seq_len - self.base_seq_len)

    def apply(self, sigma: torch.Tensor, seq_len: int) -> torch.Tensor:
        if self.dynamic:
            e = math.exp(self.mu(seq_len))
            return e / (e + (1 / sigma - 1))
        return self.shift * sigma / (1 + (self.shift - 1) * sigma)


def uniform_quantiles(n: int, *, generator: torch.Generator, content_or_style: str = "balanced",
                      min_step: int = 0, max_step: int = 999, num_steps: int = 1000) -> torch.Tensor:
    """u in (0, 1], restricted to [min_step, max_step] of `num_steps` and biased towards high noise
    (`content`) or low noise (`style`) with a cubic, as ai-toolkit biases its timestep index."""
    u = torch.rand(n, generator=generator, device=generator.device)
    if content_or_style == "content":
        u = 1 - (1 - u) ** 3
    elif content_or_style == "style":
        u = u**3
    elif content_or_style != "balanced":
        raise ValueError(f"train.content_or_style must be balanced, content or style, not '{content_or_style}'")
    lo, hi = min_step / num_steps, (max_step + 1) / num_steps
    return (lo + (hi - lo) * u).clamp(1 / num_steps, 1.0)


def sample_sigmas(kind: str, u: torch.Tensor, *, shift: FlowShift, seq_len: int) -> torch.Tensor:
    """Map uniform quantiles to noise levels sigma in (0, 1] for `train.timestep_type`."""
    if kind == "sigmoid":  # logit-normal(0, 1): sigmoid of a standard normal, through its quantile function
        return torch.sigmoid(math.sqrt(2) * torch.erfinv((2 * u - 1).clamp(-1 + 1e-6, 1 - 1e-6)))
    if kind in ("linear", "weighted"):
        return u
    if kind in ("shift", "flux_shift"):
        return shift.apply(u, seq_len)
    raise ValueError(f"train.timestep_type '{kind}' is not supported yet (supported: {', '.join(TIMESTEP_TYPES)})")


def timestep_weights(kind: str, sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weights; only `weighted` changes them."""
    if kind != "weighted":
        return torch.ones_like(sigma)
    from .flow_weights import WEIGHT_KNOTS

    knots = torch.tensor(WEIGHT_KNOTS, dtype=sigma.dtype, device=sigma.device)
    index = (1 - sigma) * 999  # index 0 is the noisiest entry of the 1000-long curve
    pos = (index / 10).clamp(0, len(knots) - 2)  # knots every 10 entries, the last one at 999
    lo = pos.floor().long()
    frac = pos - lo
    return knots[lo] * (1 - frac) + knots[lo + 1] * frac


def offset_noise(noise: torch.Tensor, offset: float, generator: torch.Generator) -> torch.Tensor:
    """`train.noise_offset`: add a per-sample, per-channel constant to the noise (helps very dark/bright images)."""
    if not offset:
        return noise
    shift = torch.randn(noise.shape[:2] + (1,) * (noise.dim() - 2), generator=generator, device=noise.device)
    return noise + offset * shift.to(noise.dtype)


def noise_latents(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    s = sigma.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


def training_loss(latents: torch.Tensor, predict, train_cfg, *, shift: FlowShift, seq_len: int,
                  generator: torch.Generator) -> torch.Tensor:
    """The per-sample flow-matching loss of one batch: noise (with train.noise_offset), sigma drawn as
    train.timestep_type says, `predict(noisy, sigma)` the model's velocity, weighted per timestep type."""
    tc = train_cfg
    noise = offset_noise(torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype),
                         tc.noise_offset, generator)
    u = uniform_quantiles(latents.shape[0], generator=generator, content_or_style=tc.content_or_style,
                          min_step=tc.min_denoising_steps, max_step=tc.max_denoising_steps, num_steps=tc.num_train_timesteps)
    sigma = sample_sigmas(tc.timestep_type, u, shift=shift, seq_len=seq_len)
    pred = predict(noise_latents(latents, noise, sigma), sigma)
    return per_sample_mse(pred, velocity_target(latents, noise)) * timestep_weights(tc.timestep_type, sigma)
