"""SIGTERM (or Ctrl-C) finishes the current step, saves a checkpoint and exits saying how to resume; the
resumed run ends with exactly the weights of an uninterrupted one."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from eridiffusion import cli
from eridiffusion.train.checkpoint import latest_state

from .conftest import train_config


def test_sigterm_saves_and_the_run_resumes_to_identical_weights(tiny_flux, dataset, tmp_path, write_config):
    cfg = train_config(tiny_flux, dataset, tmp_path / "a", steps=40, sample={"prompts": []}, save={"save_every": 1000})
    config = write_config(cfg, "a.yaml")
    run = tmp_path / "a" / "test_lora"
    proc = subprocess.Popen([sys.executable, "-m", "eridiffusion.cli", str(config)], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 120
    log = run / "log.jsonl"
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 3):
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Run the same config again to resume" in err
    stopped_at = int(latest_state(run).stem)
    assert 3 <= stopped_at < 40 and (run / f"test_lora_{stopped_at:09d}.safetensors").is_file()

    assert cli.main([str(config)]) == 0  # resumes and finishes
    uninterrupted = train_config(tiny_flux, dataset, tmp_path / "b", steps=40, sample={"prompts": []}, save={"save_every": 1000})
    assert cli.main([str(write_config(uninterrupted, "b.yaml"))]) == 0
    a, b = load_file(run / "test_lora.safetensors"), load_file(tmp_path / "b" / "test_lora" / "test_lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_nan_losses_in_a_row_stop_the_run_with_a_checkpoint(tiny_flux, dataset, tmp_path, write_config, capsys):
    cfg = train_config(tiny_flux, dataset, tmp_path / "out", steps=40, sample={"prompts": []}, save={"save_every": 1000},
                       train={"optimizer": "sgd", "lr": 1e38, "max_grad_norm": 0})  # weights blow up to inf at once
    assert cli.main([str(write_config(cfg))]) == 1
    assert "NaN/inf for 10 steps in a row" in capsys.readouterr().err
    assert latest_state(tmp_path / "out" / "test_lora") is not None


def test_an_unwritable_save_stops_with_a_message_and_keeps_the_last_checkpoint(tiny_flux, dataset, tmp_path, write_config, capsys):
    cfg = train_config(tiny_flux, dataset, tmp_path / "out", steps=4, sample={"prompts": []}, save={"save_every": 2})
    config = write_config(cfg)
    assert cli.main([str(config)]) == 0
    run = tmp_path / "out" / "test_lora"
    (run / "state" / "000000004.pt").unlink()  # pretend the run stopped after step 2 ...
    (run / "test_lora.safetensors").unlink()
    (run / "test_lora.safetensors").mkdir()  # ... and the final file cannot be written
    assert cli.main([str(config)]) == 1
    err = capsys.readouterr().err
    assert "could not save step 4" in err and "000000002.pt" in err and "run the same config again" in err
    assert latest_state(run).name == "000000002.pt"
    assert not list(run.glob(".*.tmp*"))


def test_sigkill_at_random_moments_then_resume_gives_identical_weights(tiny_flux, dataset, tmp_path, write_config):
    import random

    cfg = train_config(tiny_flux, dataset, tmp_path / "a", steps=30, sample={"prompts": []}, save={"save_every": 2})
    config = write_config(cfg, "a.yaml")
    run = tmp_path / "a" / "test_lora"
    rng = random.Random(0)
    for _ in range(3):  # kill -9 after a random number of logged steps, wherever the run is (saving included)
        proc = subprocess.Popen([sys.executable, "-m", "eridiffusion.cli", str(config)], stderr=subprocess.DEVNULL)
        log, target, deadline = run / "log.jsonl", rng.randint(1, 8), time.time() + 120
        start = len(log.read_text().splitlines()) if log.exists() else 0
        while proc.poll() is None and time.time() < deadline and (
                not log.exists() or len(log.read_text().splitlines()) < start + target):
            time.sleep(0.01)
        proc.kill()
        proc.wait()
    assert cli.main([str(config)]) == 0
    straight = train_config(tiny_flux, dataset, tmp_path / "b", steps=30, sample={"prompts": []}, save={"save_every": 2})
    assert cli.main([str(write_config(straight, "b.yaml"))]) == 0
    a, b = load_file(run / "test_lora.safetensors"), load_file(tmp_path / "b" / "test_lora" / "test_lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 31))  # the log lines of lost steps were dropped on resume
