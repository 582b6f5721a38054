"""`python -m eridiffusion.demo`: a smoke demo of the whole engine on CPU in about a minute.

Builds a tiny random-weight model of the real Flux architecture (real diffusers/transformers classes,
tiny tokenizers) and copies the bundled dataset, then runs the trainer on the embedded `demo.yaml`.
The images it makes are noise-like: the weights are random. It shows the run folder, not quality.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from importlib.resources import files
from pathlib import Path

from . import cli
from .archs import get_arch_class

# Small captioned images (png, jpg, webp; 64x64, 96x64, 64x96) shipped as package data.
DEMO_DATA_DIR = Path(__file__).with_name("demo_data")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eridiffusion.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="demo", help="working folder for the model, data and output (default ./demo)")
    args = parser.parse_args(argv)
    root = Path(args.dir).resolve()
    model, dataset = root / "tiny-flux", root / "dataset"
    if not (model / "model_index.json").is_file():
        get_arch_class("flux").build_tiny(model)
    if not dataset.is_dir():
        shutil.copytree(DEMO_DATA_DIR, dataset)
    os.environ["ERI_DEMO_DIR"] = str(root)
    code = cli.main([str(files("eridiffusion") / "demo.yaml")])
    if code == 0:
        print(f"Demo run folder: {root / 'output' / 'demo_flux_lora'} (LoRA files, samples/, log.jsonl, config.yaml)")
    return code


if __name__ == "__main__":
    sys.exit(main())
