"""Every save checks the adapter it wrote: NaN stops the save and keeps the last checkpoint; an adapter that
changes nothing, or a file whose keys fit no module, is a loud warning; a healthy run saves silently."""
from __future__ import annotations

import logging

import pytest
import torch

from eridiffusion.config import parse_config
from eridiffusion.train.checkpoint import latest_state
from eridiffusion.train.loop import Run
from eridiffusion.train.save_checks import check_modules

from .conftest import train_config


@pytest.fixture
def run(tiny_flux, dataset, tmp_path):
    cfg = train_config(tiny_flux, dataset, tmp_path / "out", steps=2, sample={"prompts": []})
    r = Run(parse_config(cfg).config.process[0], {})
    r.run_dir.mkdir(parents=True)
    return r


def test_a_healthy_save_is_silent(run, caplog):
    run.train()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "adapter" in r.getMessage()]


def test_nan_weights_stop_the_save_and_keep_the_last_checkpoint(run):
    run.train()
    last = latest_state(run.run_dir)
    with torch.no_grad():
        run.params[0].fill_(float("nan"))
    run.step += 1
    with pytest.raises(FloatingPointError, match="NaN/inf weights at step 3"):
        run.save(final=False)
    assert latest_state(run.run_dir) == last and not (run.run_dir / "test_lora_000000003.safetensors").exists()


def test_an_adapter_that_changes_nothing_is_a_warning(run, caplog):
    with torch.no_grad():  # every LoRA B still zero after "training"
        for p in run.params:
            p.zero_()
    run.step = 5
    with caplog.at_level(logging.WARNING):
        run.save(final=False)
    assert "changes nothing measurable after 5 steps" in caplog.text


def test_keys_that_fit_no_module_are_named(run):
    model = run.components["transformer"].module
    problems = check_modules({"transformer": {"not_a_block.to_q.lora_A.weight": torch.zeros(1)}}, {"transformer": model})
    assert problems == ["transformer: no module 'not_a_block.to_q' for the file's keys"]
