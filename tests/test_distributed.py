"""Several processes through torch.distributed (gloo on the CPU, 2 processes started by torchrun or
`trainer --gpus 2`): the same run as one process with the same global batch, one writer, resumable on
another process count."""
from __future__ import annotations

import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from eridiffusion import cli
from eridiffusion.data import DataPipeline
from eridiffusion.config import parse_config

from .conftest import train_config
from .test_flux_e2e import read_log


def one_step_config(tiny_flux, dataset, out, steps, processes):
    """batch 1 per process; one process accumulates as many batches as the processes take together."""
    cfg = train_config(tiny_flux, dataset, out, steps=steps, train={"batch_size": 1, "gradient_accumulation": 2 // processes},
                       save={"save_every": 3})
    cfg["config"]["process"][0]["sample"] = None
    return cfg


def launch(*args, timeout=900) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def torchrun(config_path) -> None:
    launch("torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "eridiffusion.cli", str(config_path))


def lora(out):
    return load_file(out / "test_lora" / "test_lora.safetensors")


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)


def test_batches_are_shared_out_disjoint_and_bucket_consistent(dataset, tiny_flux, tmp_path):
    cfg = train_config(tiny_flux, dataset, tmp_path, datasets=[{"folder_path": str(dataset), "resolution": [32, 64]}])
    datasets = parse_config(cfg).config.process[0].datasets
    pipes = lambda: DataPipeline(datasets, process_trigger=None, divisibility=16, batch_size=2, seed=3)
    alone, ranks = pipes(), [pipes(), pipes()]
    steps = len(alone) + 3  # into the second epoch
    for _ in range(steps):
        pair = [alone.next_batch(), alone.next_batch()]
        shared = [ranks[r].next_batch(r, 2) for r in range(2)]
        for a, b in zip(pair, shared):
            assert a.paths == b.paths and a.noise_seed == b.noise_seed  # rank r takes the r-th of each pair
            assert len({tuple(x.shape[-2:]) for x in b.pixels}) == 1  # one bucket per batch
        assert shared[0].noise_seed != shared[1].noise_seed
    assert ranks[0].state_dict() == ranks[1].state_dict() == alone.state_dict()


def test_data_parallel_run_equals_one_process_and_one_process_writes(tiny_flux, dataset, tmp_path, write_config):
    assert cli.main([str(write_config(one_step_config(tiny_flux, dataset, tmp_path / "one", 6, 1), "one.yaml"))]) == 0
    # the documented switch: `trainer --gpus 2 CONFIG` starts torchrun (gloo here: the config says cpu)
    launch("eridiffusion.cli", "--gpus", "2", str(write_config(one_step_config(tiny_flux, dataset, tmp_path / "two", 6, 2), "two.yaml")))
    assert_same_weights(lora(tmp_path / "one"), lora(tmp_path / "two"))
    one, two = read_log(tmp_path / "one" / "test_lora"), read_log(tmp_path / "two" / "test_lora")
    assert [r["step"] for r in two] == list(range(1, 7))  # one writer: no line twice
    assert all(abs(a["loss"] - b["loss"]) < 1e-5 for a, b in zip(one, two))  # the loss logged: the processes' mean
    files = lambda out: sorted(p.relative_to(out).as_posix() for p in (out / "test_lora").rglob("*") if p.is_file())
    assert files(tmp_path / "two") == files(tmp_path / "one")
    # the caches were filled in shares, each file written once and complete
    assert not [p for p in dataset.rglob("*") if ".tmp" in p.name]


def test_two_process_checkpoint_resumes_in_one_process(tiny_flux, dataset, tmp_path, write_config):
    assert cli.main([str(write_config(one_step_config(tiny_flux, dataset, tmp_path / "straight", 6, 1), "a.yaml"))]) == 0
    torchrun(write_config(one_step_config(tiny_flux, dataset, tmp_path / "moved", 3, 2), "b.yaml"))
    assert (tmp_path / "moved" / "test_lora" / "state" / f"{3:09d}.pt").is_file()
    # the same run continues on one process, which takes both processes' batches (accumulation 2)
    assert cli.main([str(write_config(one_step_config(tiny_flux, dataset, tmp_path / "moved", 6, 1), "c.yaml"))]) == 0
    assert_same_weights(lora(tmp_path / "straight"), lora(tmp_path / "moved"))
    assert [r["step"] for r in read_log(tmp_path / "moved" / "test_lora")] == list(range(1, 7))


def sharded_config(tiny_flux, dataset, out, steps, processes):
    """A full fine-tune (no network section), AdamW, batch 1 per process."""
    cfg = one_step_config(tiny_flux, dataset, out, steps, processes)
    cfg["config"]["process"][0]["model"]["only_if_contains"] = ["transformer.transformer_blocks.", "transformer.single_transformer_blocks."]
    cfg["config"]["process"][0]["train"]["lr"] = 3e-4
    del cfg["config"]["process"][0]["network"]
    return cfg


def test_sharded_full_fine_tune_saves_a_normal_file_and_matches_one_process(tiny_flux, dataset, tmp_path, write_config):
    """FSDP2 over 2 processes: the saved file is the whole model in its single-file layout (not shards), with the
    weights one process accumulating both batches gets; its checkpoint resumes on 2 processes."""
    from eridiffusion.archs.flux.formats import load_flux_single_file

    assert cli.main([str(write_config(sharded_config(tiny_flux, dataset, tmp_path / "one", 6, 1), "one.yaml"))]) == 0
    torchrun(write_config(sharded_config(tiny_flux, dataset, tmp_path / "two", 3, 2), "two3.yaml"))
    torchrun(write_config(sharded_config(tiny_flux, dataset, tmp_path / "two", 6, 2), "two6.yaml"))  # resumed at 3
    one, two = lora(tmp_path / "one"), lora(tmp_path / "two")
    assert_same_weights(one, two)
    # a whole model: it loads as FLUX.1 in BFL layout, every weight full-size, the blocks trained
    from diffusers import FluxTransformer2DModel

    base = FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer", local_files_only=True).state_dict()
    trained = load_flux_single_file(tmp_path / "two" / "test_lora" / "test_lora.safetensors", torch.float32).state_dict()
    assert trained.keys() == base.keys() and all(trained[k].shape == base[k].shape for k in base)
    assert any(not torch.equal(trained[k], base[k]) for k in base if k.startswith("transformer_blocks."))


def test_one_process_full_fine_tune_resumes_sharded(tiny_flux, dataset, tmp_path, write_config):
    assert cli.main([str(write_config(sharded_config(tiny_flux, dataset, tmp_path / "one", 6, 1), "one.yaml"))]) == 0
    assert cli.main([str(write_config(sharded_config(tiny_flux, dataset, tmp_path / "moved", 3, 1), "a.yaml"))]) == 0
    torchrun(write_config(sharded_config(tiny_flux, dataset, tmp_path / "moved", 6, 2), "b.yaml"))
    assert_same_weights(lora(tmp_path / "one"), lora(tmp_path / "moved"))


def test_module_dropout_runs_on_two_processes(tiny_flux, dataset, tmp_path, write_config):
    """LoKr with module dropout skips whole layers in some steps: DDP must not wait for their gradients."""
    cfg = one_step_config(tiny_flux, dataset, tmp_path / "drop", 4, 2)
    cfg["config"]["process"][0]["network"] = {"type": "lokr", "lokr_factor": 4, "network_kwargs": {"module_dropout": 0.5}}
    torchrun(write_config(cfg))
    saved = lora(tmp_path / "drop")
    assert any(k.endswith(".lokr_w1") for k in saved) and all(torch.isfinite(v).all() for v in saved.values())
