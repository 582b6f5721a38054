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
    parser.add_argument("--gpus", type=int, default=1,
                        help="train on this many GPUs of this machine (starts torchrun with one process per GPU)")
    parser.add_argument("--version", action="version", version=f"eridiffusion {__version__}")
    args = parser.parse_args(argv)
    # video buckets change the activations' sizes from step to step; expandable segments keep the freed memory usable
    # (without them a 14B video transformer's step in a 24 GiB cap ran out with 4.2 GiB reserved but unallocated).
    # Read when CUDA first allocates, so set here, before any model is loaded; a user's own setting wins.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if args.gpus > 1 and "WORLD_SIZE" not in os.environ:
        return launch(args.gpus, [a for a in argv if a != f"--gpus={args.gpus}"])
    # warnings (skipped images, truncated captions, ...) reach the terminal
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    finished = False
    try:
        for arg in args.config:
            run_job(arg, args.name)
        finished = True
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a clear one-line message; ERI_DEBUG=1 shows the traceback
        if os.environ.get("ERI_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        from .train.distributed import stop

        stop(finished)
    return 0


def launch(n: int, argv: list[str]) -> int:
    """`trainer --gpus N CONFIG`: torchrun on this machine, one process per GPU, each running `trainer CONFIG`."""
    from torch.distributed import run as torchrun

    rest, skip = [], False
    for a in argv:  # the same command line without --gpus N
        if skip or a == "--gpus":
            skip = not skip
            continue
        rest.append(a)
    try:
        torchrun.main(["--standalone", f"--nproc-per-node={n}", "-m", "eridiffusion.cli", *rest])
    except Exception as e:  # torchrun has printed which process failed and why
        print(f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", file=sys.stderr)
        return 1
    return 0


def lora_tool(argv: list[str]) -> int:
    """`trainer lora inspect|convert ...`: tools for adapter files (training stays `trainer CONFIG`)."""
    parser = argparse.ArgumentParser(prog="trainer lora", description="Tools for LoRA and other adapter files.")
    sub = parser.add_subparsers(dest="command", required=True)
    inspect = sub.add_parser("inspect", help="architecture, adapter type, rank/alpha, key layout, modules, metadata")
    inspect.add_argument("file")
    inspect.add_argument("--json", action="store_true", help="the report as JSON")
    convert = sub.add_parser("convert", help="rewrite a LoRA file in another key layout")
    convert.add_argument("file")
    convert.add_argument("--to", required=True, help="diffusers, comfy or kohya")
    convert.add_argument("-o", "--output", required=True)
    convert.add_argument("--arch", help="the architecture, when the file's metadata does not name it")
    merge = sub.add_parser("merge", help="merge LoRA files into a base model, written in the base's own layout")
    merge.add_argument("--base", required=True, help="a diffusers folder or single model file")
    merge.add_argument("--lora", action="append", required=True, help="an adapter file (repeat for several)")
    merge.add_argument("--strength", action="append", type=float, help="one per --lora (default 1.0)")
    merge.add_argument("-o", "--output", required=True)
    merge.add_argument("--arch", help="the architecture, when the first file's metadata does not name it")
    args = parser.parse_args(argv)
    try:
        if args.command == "merge":
            merge_loras(args.base, args.lora, args.strength or [], args.output, args.arch)
        elif args.command == "inspect":
            from .adapters.inspect import inspect_file

            report = inspect_file(args.file)
            print(report.json() if args.json else report.text())
        else:
            convert_lora(args.file, args.to, args.output, args.arch)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def merge_loras(base: str, loras: list[str], strengths: list[float], output: str, arch: str | None) -> None:
    from pathlib import Path

    from safetensors import safe_open

    from .adapters.merge import merge_into
    from .archs import get_arch_class

    if strengths and len(strengths) != len(loras):
        raise ValueError(f"--strength given {len(strengths)} times for {len(loras)} --lora files: give one per file or none")
    out = Path(output)
    if out.exists():
        raise ValueError(f"-o {out} exists; name a new file or folder")
    files = []
    for path in loras:
        with safe_open(path, "pt") as f:
            files.append((path, dict(f.metadata() or {}), {k: f.get_tensor(k) for k in f.keys()}))
    arch = arch or files[0][1].get("eri_arch")
    if not arch:
        raise ValueError(f"{loras[0]}: its metadata names no architecture; pass --arch (e.g. --arch flux)")
    cls = get_arch_class(arch)
    if not hasattr(cls, "open_for_merge"):
        raise ValueError(f"trainer lora merge is not supported yet for {arch}")
    modules, write, read = cls.open_for_merge(base)
    for (path, _, tensors), strength in zip(files, strengths or [1.0] * len(files)):
        for component, state in read(tensors).items():
            if component not in modules:
                raise ValueError(f"{path}: adapts {component}, which merge does not write for {arch}")
            n = merge_into(modules[component], state, strength)
            print(f"{path}: {n} layers of the {component} merged at strength {strength:g}")
    write(out)
    print(f"{out}: merged {arch} model")


def convert_lora(path: str, layout: str, output: str, arch: str | None) -> None:
    from pathlib import Path

    from safetensors import safe_open
    from safetensors.torch import save_file

    from .archs import get_arch_class

    with safe_open(path, "pt") as f:
        metadata, tensors = dict(f.metadata() or {}), {k: f.get_tensor(k) for k in f.keys()}
    arch = arch or metadata.get("eri_arch")
    if not arch:
        raise ValueError(f"{path}: its metadata names no architecture; pass --arch (e.g. --arch flux)")
    cls = get_arch_class(arch)
    layouts = getattr(cls, "lora_layouts", ())
    if layout not in layouts:
        raise ValueError(f"--to {layout}: {arch} LoRA files convert to {', '.join(layouts) or 'no other layout yet'}")
    out = Path(output)
    if out.resolve() == Path(path).resolve():
        raise ValueError("-o must name a new file, not the input")
    save_file({k: v.clone().contiguous() for k, v in cls.lora_to_layout(tensors, layout).items()}, str(out),
              metadata={**metadata, "eri_layout": layout})
    print(f"{out}: {arch} LoRA in {layout} layout")


def run_job(arg: str, name: str | None) -> None:
    from .config import load_config, resolved_dict
    from .train.loop import Run

    job = load_config(arg, name_override=name)
    for proc in job.config.process:
        run = Run(proc, job.meta)
        if run.processes.main:
            run.run_dir.mkdir(parents=True, exist_ok=True)
            (run.run_dir / "config.yaml").write_text(yaml.safe_dump(resolved_dict(job), sort_keys=False))
        out = run.train()
        if run.processes.main:
            print(f"{proc.name}: finished at step {run.step}; LoRA: {out}")


if __name__ == "__main__":
    sys.exit(main())
