"""Noise-prediction (DDPM-family) objective, as the UNet latent-diffusion models are trained:
x_t = sqrt(acp_t) * x0 + sqrt(1 - acp_t) * noise at an integer timestep t, the model predicts the noise
(`epsilon`) or the velocity (`v_prediction`). The schedule itself is diffusers' `DDPMScheduler`."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from .flow import offset_noise, uniform_quantiles

PREDICTION_TYPES = ("epsilon", "v_prediction")

# The latent-diffusion training schedule, used when a model ships no scheduler config.
DEFAULT_SCHEDULE = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                    "num_train_timesteps": 1000}


def train_scheduler(config: Mapping[str, Any] | None = None) -> DDPMScheduler:
    """A DDPM scheduler from a model's scheduler config (any diffusers scheduler's: only the beta schedule
    and step count matter for training), or from the default latent-diffusion schedule."""
    return DDPMScheduler.from_config(dict(config)) if config is not None else DDPMScheduler(**DEFAULT_SCHEDULE)


def sample_timesteps(n: int, *, generator: torch.Generator, content_or_style: str = "balanced",
                     min_step: int = 0, max_step: int = 999, num_steps: int = 1000) -> torch.Tensor:
    """n integer timesteps in [min_step, max_step]: uniform for `balanced`, cubic-biased towards high noise
    (`content`) or low noise (`style`)."""
    u = uniform_quantiles(n, generator=generator, content_or_style=content_or_style,
                          min_step=min_step, max_step=max_step, num_steps=num_steps)
    # u * N lies in [min, max + 1); the unit cell (k, k + 1] is timestep k, so `balanced` is uniform over integers.
    return (u * num_steps).ceil().long().sub(1).clamp(min_step, max_step)


def check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction type '{prediction_type}' is not supported "
                         f"(supported: {', '.join(PREDICTION_TYPES)})")


def target(scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
           prediction_type: str) -> torch.Tensor:
    """What the model regresses to: the noise, or the velocity sqrt(acp) * noise - sqrt(1 - acp) * x0."""
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return noise
    return scheduler.get_velocity(latents, noise, timesteps)


def snr_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float | None,
                prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023): min(snr, gamma) / snr for epsilon, / (snr + 1) for
    v-prediction; ones when gamma is None."""
    check_prediction_type(prediction_type)
    if gamma is None:
        return torch.ones(timesteps.shape, device=timesteps.device)
    snr = compute_snr(scheduler, timesteps)
    if prediction_type == "epsilon":
        return (gamma / snr).clamp(max=1.0)  # = min(snr, gamma) / snr, and 1 (not 0/0) at zero terminal SNR
    return snr.clamp(max=gamma) / (snr + 1)


class TrainingDraw(NamedTuple):
    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor


def training_draw(scheduler: DDPMScheduler, latents: torch.Tensor, *, generator: torch.Generator,
                  prediction_type: str = "epsilon", content_or_style: str = "balanced", min_step: int = 0,
                  max_step: int = 999, noise_offset: float = 0.0, snr_gamma: float | None = None,
                  min_snr_gamma: float | None = None) -> TrainingDraw:
    """Everything one training step needs besides the model: noisy latents, timesteps, the regression
    target and per-sample loss weights. `min_snr_gamma` wins over `snr_gamma` when both are set."""
    check_prediction_type(prediction_type)
    num_steps = scheduler.config.num_train_timesteps
    noise = offset_noise(torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype),
                         noise_offset, generator)
    t = sample_timesteps(latents.shape[0], generator=generator, content_or_style=content_or_style,
                         min_step=min_step, max_step=min(max_step, num_steps - 1), num_steps=num_steps)
    t = t.to(latents.device)
    gamma = min_snr_gamma if min_snr_gamma is not None else snr_gamma
    return TrainingDraw(noisy=scheduler.add_noise(latents, noise, t), timesteps=t,
                        target=target(scheduler, latents, noise, t, prediction_type),
                        weight=snr_weights(scheduler, t, gamma, prediction_type))
