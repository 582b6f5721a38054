"""train.cuda_graphs: what keeps a run's step from CUDA graphs, said before it starts; and, on a CUDA machine, a
tiny Flux trained with the step replayed from graphs gives the losses and the LoRA of the same run without them."""
from __future__ import annotations

import json

import pytest
import torch

from eridiffusion import cli
from eridiffusion.archs import get_arch_class
from eridiffusion.config import parse_config
from eridiffusion.train.graphs import graph_blockers
from eridiffusion.train.optim import build_optimizer

from .conftest import train_config


def _blockers(arch_name, *, optimizer="adamw", device="cuda", dtype=torch.bfloat16, **kw):
    proc = parse_config(train_config("unused", "unused", "unused", arch=arch_name)).config.process[0]
    arch = get_arch_class(arch_name)(proc, torch.device("cpu"), dtype)
    opt = build_optimizer(optimizer, [torch.nn.Parameter(torch.zeros(2))], 1e-3, {})
    args = dict(compiled=True, world=1, block_swap=False, offload=False, train_text_encoder=False, dropout=False)
    return graph_blockers(arch=arch, device=torch.device(device), optimizer=opt, dtype=dtype, **{**args, **kw})


def test_a_flux_run_as_a_24gb_card_runs_it_has_nothing_blocking_graphs():
    assert _blockers("flux") == []


@pytest.mark.parametrize("change, words", [
    (dict(arch_name="sdxl"), "SDXL's step is not checked"),
    (dict(device="cpu"), "not CUDA"),
    (dict(optimizer="sgd"), "fused Adam/AdamW"),
    (dict(dtype=torch.float16), "fp16"),
    (dict(compiled=False), "model.compile"),
    (dict(world=2), "several processes"),
    (dict(block_swap=True), "block swap"),
    (dict(train_text_encoder=True), "text encoders train"),
    (dict(dropout=True), "dropout"),
])
def test_each_blocker_is_named(change, words):
    change = dict(change)
    found = _blockers(change.pop("arch_name", "flux"), **change)
    assert len(found) == 1 and words in found[0], found


def test_cuda_graphs_on_where_they_cannot_run_is_an_error_naming_why(tiny_flux, dataset, tmp_path, write_config, capsys):
    cfg = train_config(tiny_flux, dataset, tmp_path / "out", train={"cuda_graphs": "on"})
    assert cli.main([str(write_config(cfg))]) == 1
    err = capsys.readouterr().err
    assert "train.cuda_graphs: on, but the device is not CUDA" in err, err
    assert not (tmp_path / "out" / "test_lora" / "log.jsonl").exists() or not (
        tmp_path / "out" / "test_lora" / "log.jsonl").read_text()  # no step ran


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graphed_steps_train_as_the_eager_ones(tiny_flux, dataset, tmp_path, write_config, capsys):
    """Two aspect buckets (two graphs), gradient accumulation (each micro-batch replays its graph), a warm-up LR
    schedule (the learning rate reaches the replayed optimizer), the same seed: the same losses and LoRA."""
    from safetensors.torch import load_file

    runs = {}
    for mode in ("off", "on"):
        cfg = train_config(tiny_flux, dataset, tmp_path / mode, steps=10, device="cuda:0",
                           save={"save_every": 1000, "dtype": "float32"}, sample={"sample_every": 1000, "prompts": []},
                           train={"cuda_graphs": mode, "dtype": "bf16", "gradient_accumulation": 2, "batch_size": 1,
                                  "lr_scheduler": "constant_with_warmup", "lr_scheduler_params": {"num_warmup_steps": 6}})
        cfg["config"]["process"][0]["datasets"][0]["resolution"] = [64, 48]
        assert cli.main([str(write_config(cfg, f"{mode}.yaml"))]) == 0
        out = capsys.readouterr()
        assert "failed" not in out.err, out.err
        assert ("CUDA graphs: on" in out.out) == (mode == "on"), out.out
        run = tmp_path / mode / "test_lora"
        runs[mode] = ([json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()],
                      load_file(run / "test_lora.safetensors"))
    (eager_log, eager_lora), (graph_log, graph_lora) = runs["off"], runs["on"]
    assert [r["lr"] for r in graph_log] == [r["lr"] for r in eager_log]
    assert [r["loss"] for r in graph_log] == pytest.approx([r["loss"] for r in eager_log], rel=2e-2)
    assert eager_lora.keys() == graph_lora.keys()
    moved = max((eager_lora[k] - graph_lora[k]).abs().max().item() for k in eager_lora)
    scale = max(eager_lora[k].abs().max().item() for k in eager_lora)
    assert moved <= 2e-2 * scale, (moved, scale)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("room", [True, False])
def test_step_graphs_follow_shapes_seeds_and_learning_rates(room):
    """StepGraphs against the same steps run eagerly: two batch shapes in an irregular order, a noise seed per batch,
    a learning rate that changes every step. Without room the graphs are dropped for each new shape and captured
    again when next met (more captures), with the same results."""
    from eridiffusion.data.dataset import Batch
    from eridiffusion.train.graphs import StepGraphs
    from eridiffusion.train.optim import build_scheduler

    dev = torch.device("cuda")
    shapes = [5, 5, 5, 3, 5, 3, 3, 5, 3, 5, 5, 3, 3, 5]
    g = torch.Generator().manual_seed(1)
    batches = [Batch(pixels=None, latents=torch.randn(2, n, 8, generator=g), captions=[], text={"e": torch.randn(2, 1, 8, generator=g)},
                     original_sizes=[], crop_top_lefts=[], target_sizes=[], paths=[], loss_weights=torch.rand(2, generator=g),
                     noise_seed=i) for i, n in enumerate(shapes)]

    def train(graphed):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8)).to(dev)
        params = list(model.parameters())
        opt = build_optimizer("adamw", params, 1e-2, {})
        schedule = build_scheduler("linear", opt, {"num_warmup_steps": 4}, len(batches))
        gen = torch.Generator(dev)
        graphs = StepGraphs(params, opt, gen, room=room) if graphed else None

        def forward_backward(batch):
            noise = torch.randn(batch.latents.shape, generator=gen, device=dev)
            y = model(batch.latents.to(dev) + 0.1 * noise + batch.text["e"].to(dev))
            loss = (y.pow(2).mean(dim=(1, 2)) * batch.loss_weights.to(dev)).mean()
            loss.backward()
            return loss.detach()

        def update(total):
            torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
            opt.step()
            opt.zero_grad(set_to_none=not graphed)

        losses = []
        for batch in batches:
            gen.manual_seed(batch.noise_seed)
            loss = graphs.forward_backward(batch, forward_backward) if graphs else forward_backward(batch)
            graphs.update(loss, update) if graphs else update(loss)
            schedule.step()
            losses.append(loss)
        return torch.stack(losses).cpu(), [p.detach().cpu() for p in params], graphs

    eager_losses, eager_params, _ = train(False)
    losses, params, graphs = train(True)
    assert graphs.failed is None
    assert graphs.captures == 3 if room else graphs.captures > 3  # two shapes and the update
    torch.testing.assert_close(losses, eager_losses, rtol=1e-4, atol=1e-6)
    for p, q in zip(params, eager_params):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
