"""Every shipped example config (and the demo's) validates, and resolves to what its comments promise."""
from pathlib import Path

import pytest

from eridiffusion.config import load_config

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def test_there_are_examples():
    assert len(EXAMPLES) >= 3


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_validates(path):
    proc = load_config(str(path)).config.process[0]
    assert proc.model.arch_name in ("flux", "sdxl", "chroma", "hidream", "wan21", "wan21_vace") and proc.network.linear == 16 and proc.train.dtype == "bf16"
    clips = proc.datasets[0].num_frames > 1
    assert proc.datasets[0].resolution == ([1024] if proc.model.arch_name == "sdxl" else [480] if clips else [512, 768, 1024])


def test_demo_config_validates(monkeypatch, tmp_path):
    monkeypatch.setenv("ERI_DEMO_DIR", str(tmp_path))
    proc = load_config(str(ROOT / "src" / "eridiffusion" / "demo.yaml")).config.process[0]
    assert proc.device == "cpu" and proc.model.name_or_path == f"{tmp_path}/tiny-flux"
