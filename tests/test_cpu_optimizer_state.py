"""train.optimizer_state_device: cpu. On a GPU torchao's CPUOffloadOptimizer keeps the state in host memory; its
math must be the same as the optimizer's on the device (clipping, accumulation, schedule, fused backward), and a
resumed run must continue where it stopped. CI has no GPU: the offload code runs here with torchao's stream calls
made no-ops (`host_streams`), and once more end to end on CUDA when there is one. On a CPU run the key changes
nothing, as the state is in host memory already."""
from __future__ import annotations

import contextlib
import io

import pytest
import torch
from safetensors.torch import load_file

from eridiffusion import cli
from eridiffusion.train.optim import build_optimizer, build_scheduler

from .test_flux_e2e import read_log
from .test_full_finetune import full


class _Stream:  # one stream that is always done
    def wait_stream(self, other):
        pass

    def record_event(self):
        return self

    def synchronize(self):
        pass


@pytest.fixture
def host_streams(monkeypatch):
    """torchao's CPUOffloadOptimizer on a machine without an accelerator: its "device" tensors are CPU tensors and
    its copies synchronous, so what is left is its bookkeeping and ours, which is what these tests check."""
    import torchao.optim.cpu_offload as cpu_offload

    empty_like = torch.empty_like
    monkeypatch.setattr(cpu_offload, "get_available_devices", lambda: ["cpu", "cuda"])
    monkeypatch.setattr(torch.cuda, "Stream", _Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: _Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(torch, "empty_like", lambda *a, pin_memory=False, **kw: empty_like(*a, **kw))
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, s: None)


def _model(seed=0):
    torch.manual_seed(seed)  # 64x128 weights go to the host, the biases (< torchao's minimal_size) stay
    return torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.GELU(), torch.nn.Linear(128, 64))


def _train(model, opt, sched, steps, *, accumulation=1, clip=0.0, first=0):
    for step in range(first, first + steps):
        for micro in range(accumulation):
            g = torch.Generator().manual_seed(step * 10 + micro)
            x, y = torch.randn(8, 32, generator=g), torch.randn(8, 64, generator=g)
            (torch.nn.functional.mse_loss(model(x), y) / accumulation).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)


def _groups(model):  # two learning rates, as a LoRA of the denoiser and a text encoder has
    return [{"params": list(model[0].parameters()), "lr": 1e-2}, {"params": list(model[2].parameters()), "lr": 3e-3}]


def _cpu_state(model, name="adamw", **kw):
    from eridiffusion.train.cpu_state import CPUStateOptimizer

    opt = CPUStateOptimizer(name, _groups(model), 1e-2, {"weight_decay": 0.1}, device=torch.device("cpu"),
                            **{"max_grad_norm": 0.0, "free_device_grads": False, **kw})
    return opt, build_scheduler("cosine", opt, {"num_warmup_steps": 2}, 8)


def _plain(model, name="adamw"):
    opt = build_optimizer(name, _groups(model), 1e-2, {"weight_decay": 0.1})
    return opt, build_scheduler("cosine", opt, {"num_warmup_steps": 2}, 8)


def _close(a, b):
    return all(torch.allclose(p, q, rtol=1e-5, atol=1e-6) for p, q in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize("name,accumulation,clip,free", [("adamw", 1, 0.0, False), ("adamw", 3, 0.05, False),
                                                         ("adafactor", 2, 0.05, False), ("adamw", 1, 0.05, True)])
def test_host_state_steps_like_the_optimizer_on_the_device(host_streams, name, accumulation, clip, free):
    """Accumulated gradients, clipping (of the host copies, norm over every parameter), the LR schedule, and with
    free_device_grads (fused backward) the device gradients gone after each backward."""
    plain, host = _model(), _model()
    opt, sched = _plain(plain, name)
    _train(plain, opt, sched, 6, accumulation=accumulation, clip=clip)
    opt, sched = _cpu_state(host, name, max_grad_norm=clip, free_device_grads=free)
    assert len(opt.optim_dict) == 2 and opt.d_opt is not None  # both paths of torchao's are used
    _train(host, opt, sched, 6, accumulation=accumulation)
    assert not _close(host, _model()) and _close(plain, host)


def test_host_state_resumes_into_a_new_optimizer(host_streams):
    """The checkpoint's weights are loaded into the model after the optimizer is built (as a resumed run does):
    the host copies follow them, and the run continues as if never stopped."""
    straight = _model()
    opt, sched = _cpu_state(straight, max_grad_norm=0.05)
    _train(straight, opt, sched, 6, accumulation=2)

    first = _model()
    opt, sched = _cpu_state(first, max_grad_norm=0.05)
    _train(first, opt, sched, 3, accumulation=2)
    buffer = io.BytesIO()
    torch.save({"weights": first.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    resumed = _model()
    opt, sched = _cpu_state(resumed, max_grad_norm=0.05)
    resumed.load_state_dict(state["weights"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    _train(resumed, opt, sched, 3, accumulation=2, first=3)
    assert all(torch.equal(p, q) for p, q in zip(straight.parameters(), resumed.parameters()))


def _cfg(tiny_flux, dataset, out, steps, state_device, **train):
    c = full(tiny_flux, dataset, out, steps)
    c["config"]["process"][0]["train"].update({"optimizer": "adamw", "optimizer_state_device": state_device,
                                               "ema_config": {"use_ema": True, "ema_decay": 0.9}, **train})
    return c


def test_cpu_run_with_the_key_trains_as_without_it_and_resumes(tiny_flux, dataset, tmp_path, write_config):
    assert cli.main([str(write_config(_cfg(tiny_flux, dataset, tmp_path / "dev", 6, "device"), "d.yaml"))]) == 0
    assert cli.main([str(write_config(_cfg(tiny_flux, dataset, tmp_path / "res", 3, "cpu"), "r1.yaml"))]) == 0
    assert cli.main([str(write_config(_cfg(tiny_flux, dataset, tmp_path / "res", 6, "cpu"), "r2.yaml"))]) == 0
    losses = [r["loss"] for r in read_log(tmp_path / "res" / "test_lora")]
    assert len(losses) == 6 and sum(losses[-3:]) < sum(losses[:3])
    a, b = (load_file(tmp_path / d / "test_lora" / "test_lora.safetensors") for d in ("dev", "res"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("train,named", [({"optimizer": "adamw8bit"}, "train.optimizer: adamw8bit"),
                                         ({"optimizer": "prodigy"}, "train.optimizer: prodigy"),
                                         ({"dtype": "fp16"}, "train.dtype: fp16")])
def test_cpu_state_refuses_what_it_cannot_do(tiny_flux, dataset, tmp_path, write_config, capsys, train, named):
    assert cli.main([str(write_config(_cfg(tiny_flux, dataset, tmp_path / "x", 2, "cpu", **train)))]) == 1
    err = capsys.readouterr().err
    assert "train.optimizer_state_device: cpu cannot be combined with" in err and named in err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("train,lora", [({"max_grad_norm": 0.05, "gradient_accumulation": 2}, False),
                                        ({"max_grad_norm": 0.05, "fused_backward": True}, False),
                                        ({"max_grad_norm": 0.05}, True)])
def test_cuda_training_with_state_on_the_host(tiny_flux, dataset, tmp_path, write_config, train, lora):
    """On a GPU, full fine-tune and LoRA: the same weights as the state on the device (up to the order of float
    sums), and a resume that continues exactly."""
    def cfg(out, steps, state_device):
        c = _cfg(tiny_flux, dataset, tmp_path / out, steps, state_device, **train)
        c["config"]["process"][0]["device"] = "cuda:0"
        if lora:
            c["config"]["process"][0].update(network={"type": "lora", "linear": 4, "linear_alpha": 8}, model={
                "name_or_path": str(tiny_flux), "arch": "flux"})
        return c

    for out, steps, state_device in (("dev", 6, "device"), ("host", 6, "cpu"), ("res", 3, "cpu"), ("res", 6, "cpu")):
        assert cli.main([str(write_config(cfg(out, steps, state_device), f"{out}{steps}.yaml"))]) == 0
    dev, host, res = (load_file(tmp_path / d / "test_lora" / "test_lora.safetensors") for d in ("dev", "host", "res"))
    assert all(torch.allclose(dev[k], host[k], rtol=1e-4, atol=1e-5) for k in dev)
    assert all(torch.equal(host[k], res[k]) for k in host)
