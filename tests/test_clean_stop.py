"""SIGTERM (or Ctrl-C) finishes the current step, saves a checkpoint and exits saying how to resume; the
resumed run ends with exactly the weights of an uninterrupted one."""
from __future__ import annotations

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
