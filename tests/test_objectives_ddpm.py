"""The noise-prediction objective: noising, targets, timestep sampling and min-SNR weights."""
from __future__ import annotations

import pytest
import torch

from eridiffusion.objectives import ddpm


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def sched():
    return ddpm.train_scheduler()


def test_default_schedule_is_scaled_linear(sched):
    acp = sched.alphas_cumprod
    assert acp.shape == (1000,)
    assert sched.betas[0].item() == pytest.approx(0.00085)
    assert sched.betas[-1].item() == pytest.approx(0.012)
    # scaled_linear: sqrt(beta) is linear in t
    assert sched.betas[500].sqrt().item() == pytest.approx((0.00085**0.5 + (0.012**0.5 - 0.00085**0.5) * 500 / 999))
    assert torch.all(acp[1:] < acp[:-1])


def test_scheduler_from_a_model_config_keeps_its_schedule():
    from diffusers import EulerDiscreteScheduler

    euler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.014,
                                   num_train_timesteps=1100, prediction_type="v_prediction")
    s = ddpm.train_scheduler(euler.config)
    assert s.config.num_train_timesteps == 1100 and s.alphas_cumprod.shape == (1100,)
    assert torch.allclose(s.alphas_cumprod, euler.alphas_cumprod)


def test_add_noise_matches_the_forward_process(sched):
    x0, eps = torch.randn(4, 4, 8, 8, generator=gen(1)), torch.randn(4, 4, 8, 8, generator=gen(2))
    t = torch.tensor([0, 250, 600, 999])
    acp = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(sched.add_noise(x0, eps, t), acp.sqrt() * x0 + (1 - acp).sqrt() * eps, atol=1e-6)
    # the bundled draw noises with the same formula at its own timesteps
    draw = ddpm.training_draw(sched, x0, generator=gen())
    acp = sched.alphas_cumprod[draw.timesteps].view(-1, 1, 1, 1)
    noise = (draw.noisy - acp.sqrt() * x0) / (1 - acp).sqrt()
    assert torch.allclose(draw.target, noise, atol=1e-4)  # epsilon target is that noise


def test_targets(sched):
    x0, eps = torch.randn(3, 4, 8, 8, generator=gen(1)), torch.randn(3, 4, 8, 8, generator=gen(2))
    t = torch.tensor([10, 500, 990])
    acp = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.equal(ddpm.target(sched, x0, eps, t, "epsilon"), eps)
    v = ddpm.target(sched, x0, eps, t, "v_prediction")
    assert torch.allclose(v, acp.sqrt() * eps - (1 - acp).sqrt() * x0, atol=1e-6)
    with pytest.raises(ValueError, match="'sample'"):
        ddpm.target(sched, x0, eps, t, "sample")
    with pytest.raises(ValueError, match="'flow'"):
        ddpm.snr_weights(sched, t, 5.0, "flow")


@pytest.mark.parametrize("lo,hi", [(0, 999), (100, 400), (0, 40), (7, 7), (998, 999)])
@pytest.mark.parametrize("mode", ["balanced", "content", "style"])
def test_timesteps_stay_in_range(mode, lo, hi):
    t = ddpm.sample_timesteps(20000, generator=gen(), content_or_style=mode, min_step=lo, max_step=hi)
    assert t.dtype == torch.long and t.shape == (20000,)
    assert t.min().item() >= lo and t.max().item() <= hi


def test_balanced_is_uniform_over_every_integer():
    n, lo, hi = 200_000, 0, 9
    t = ddpm.sample_timesteps(n, generator=gen(), min_step=lo, max_step=hi)
    counts = torch.bincount(t, minlength=10).float()
    assert counts.min() > 0
    assert torch.allclose(counts / n, torch.full((10,), 0.1), atol=0.005)
    t = ddpm.sample_timesteps(n, generator=gen())
    assert t.float().mean().item() == pytest.approx(499.5, abs=3)
    assert (t == 0).any() and (t == 999).any()


def test_content_favours_noise_and_style_favours_detail():
    means = {m: ddpm.sample_timesteps(50_000, generator=gen(), content_or_style=m, min_step=100, max_step=899)
             .float().mean().item() for m in ("balanced", "content", "style")}
    # E[1 - (1-u)^3] = 3/4, E[u^3] = 1/4 over the 800-step window
    assert means["balanced"] == pytest.approx(100 + 800 * 0.5, abs=5)
    assert means["content"] == pytest.approx(100 + 800 * 0.75, abs=5)
    assert means["style"] == pytest.approx(100 + 800 * 0.25, abs=5)
    with pytest.raises(ValueError, match="content_or_style"):
        ddpm.sample_timesteps(4, generator=gen(), content_or_style="both")


def test_min_snr_weights(sched):
    t = torch.arange(0, 1000, 37)
    acp = sched.alphas_cumprod[t].double()
    snr = acp / (1 - acp)
    gamma = 5.0
    w_eps = ddpm.snr_weights(sched, t, gamma, "epsilon")
    w_v = ddpm.snr_weights(sched, t, gamma, "v_prediction")
    assert torch.allclose(w_eps.double(), snr.clamp(max=gamma) / snr, rtol=1e-4)
    assert torch.allclose(w_v.double(), snr.clamp(max=gamma) / (snr + 1), rtol=1e-4)
    assert torch.all(w_eps <= 1) and torch.all(w_eps > 0) and torch.all(w_v <= 1)
    assert w_eps[-1].item() == 1.0 and w_eps[0].item() < 0.01  # low-noise steps are damped
    assert torch.equal(ddpm.snr_weights(sched, t, None, "epsilon"), torch.ones(len(t)))


def test_min_snr_weights_survive_zero_terminal_snr():
    s = ddpm.train_scheduler({**ddpm.DEFAULT_SCHEDULE, "rescale_betas_zero_snr": True})
    w = ddpm.snr_weights(s, torch.tensor([0, 999]), 5.0, "epsilon")
    assert torch.isfinite(w).all() and w[1].item() == 1.0


def test_gamma_choice_in_draw(sched):
    x0 = torch.randn(8, 4, 8, 8, generator=gen(1))
    plain = ddpm.training_draw(sched, x0, generator=gen())
    assert torch.equal(plain.weight, torch.ones(8))
    d_snr = ddpm.training_draw(sched, x0, generator=gen(), snr_gamma=5.0)
    d_both = ddpm.training_draw(sched, x0, generator=gen(), snr_gamma=5.0, min_snr_gamma=1.0)
    assert torch.allclose(d_snr.weight, ddpm.snr_weights(sched, d_snr.timesteps, 5.0, "epsilon"))
    assert torch.allclose(d_both.weight, ddpm.snr_weights(sched, d_both.timesteps, 1.0, "epsilon"))


def test_draw_v_prediction_target(sched):
    x0 = torch.randn(4, 4, 8, 8, generator=gen(1))
    d = ddpm.training_draw(sched, x0, generator=gen(), prediction_type="v_prediction", min_snr_gamma=5.0)
    acp = sched.alphas_cumprod[d.timesteps].view(-1, 1, 1, 1)
    eps = (d.noisy - acp.sqrt() * x0) / (1 - acp).sqrt()
    assert torch.allclose(d.target, acp.sqrt() * eps - (1 - acp).sqrt() * x0, atol=1e-4)
    assert torch.allclose(d.weight, ddpm.snr_weights(sched, d.timesteps, 5.0, "v_prediction"))
    with pytest.raises(ValueError, match="'x0'"):
        ddpm.training_draw(sched, x0, generator=gen(), prediction_type="x0")


def test_offset_noise_shifts_channel_means(sched):
    x0 = torch.zeros(16, 4, 32, 32)
    # with x0 = 0 and t fixed, noisy / sqrt(1 - acp) is exactly the noise
    scale = (1 - sched.alphas_cumprod[999]).sqrt()
    plain = ddpm.training_draw(sched, x0, generator=gen(), min_step=999).noisy / scale
    offset = ddpm.training_draw(sched, x0, generator=gen(), min_step=999, noise_offset=0.5).noisy / scale
    plain_means, offset_means = plain.mean((2, 3)), offset.mean((2, 3))
    assert plain_means.std().item() < 0.05  # ~1/32 from 1024 pixels
    assert offset_means.std().item() > 0.3  # ~0.5 from the per-channel shift
    # the shift is constant over space: removing channel means gives back the same noise
    assert torch.allclose(plain - plain_means[..., None, None], offset - offset_means[..., None, None], atol=1e-5)


def test_deterministic_for_a_fixed_generator(sched):
    x0 = torch.randn(4, 4, 8, 8, generator=gen(1))
    kw = dict(content_or_style="content", noise_offset=0.1, min_snr_gamma=5.0, prediction_type="v_prediction")
    a = ddpm.training_draw(sched, x0, generator=gen(7), **kw)
    b = ddpm.training_draw(sched, x0, generator=gen(7), **kw)
    c = ddpm.training_draw(sched, x0, generator=gen(8), **kw)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a.noisy, c.noisy)
    assert torch.equal(ddpm.sample_timesteps(64, generator=gen(3)), ddpm.sample_timesteps(64, generator=gen(3)))
