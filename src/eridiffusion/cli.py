"""`trainer CONFIG`: load and validate the config, then train each process in it."""
from __future__ import annotations

import argparse
import logging
import os
import sys

import yaml

from . import __version__


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["lora"]:
        return lora_tool(argv[1:])
    parser = argparse.ArgumentParser(prog="trainer", description="Train a diffusion-model LoRA from an ai-toolkit style config.")
    parser.add_argument("config", nargs="+", help="config file, or a name looked up in ./config/ (.yaml/.yml/.json)")
    parser.add_argument("-n", "--name", help="replaces config.name and every [name] in the config")
    parser.add_argument("--version", action="version", version=f"eridiffusion {__version__}")
    args = parser.parse_args(argv)
    # warnings (skipped images, truncated captions, ...) reach the terminal
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        for arg in args.config:
            run_job(arg, args.name)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a clear one-line message; ERI_DEBUG=1 shows the traceback
        if os.environ.get("ERI_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def lora_tool(argv: list[str]) -> int:
    """`trainer lora inspect FILE`: tools for adapter files (training stays `trainer CONFIG`)."""
    parser = argparse.ArgumentParser(prog="trainer lora", description="Tools for LoRA and other adapter files.")
    sub = parser.add_subparsers(dest="command", required=True)
    inspect = sub.add_parser("inspect", help="architecture, adapter type, rank/alpha, key layout, modules, metadata")
    inspect.add_argument("file")
    inspect.add_argument("--json", action="store_true", help="the report as JSON")
    args = parser.parse_args(argv)
    from .adapters.inspect import inspect_file

    try:
        report = inspect_file(args.file)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(report.json() if args.json else report.text())
    return 0


def run_job(arg: str, name: str | None) -> None:
    from .config import load_config, resolved_dict
    from .train.loop import Run

    job = load_config(arg, name_override=name)
    for proc in job.config.process:
        run = Run(proc, job.meta)
        run.run_dir.mkdir(parents=True, exist_ok=True)
        (run.run_dir / "config.yaml").write_text(yaml.safe_dump(resolved_dict(job), sort_keys=False))
        out = run.train()
        print(f"{proc.name}: finished at step {run.step}; LoRA: {out}")


if __name__ == "__main__":
    sys.exit(main())
