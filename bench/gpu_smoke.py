"""The whole run on a CUDA device, on the tiny Flux model: bf16 autocast, fused AdamW, regional compile,
EMA, caching, samples, saves and a resume. A smoke check for the GPU code paths CI cannot reach.

  PYTHONPATH=src python3 bench/gpu_smoke.py WORKDIR [--quantized]

--quantized: the same with a float8 base and block swap (half the blocks), the memory estimate printed.
"""
import json
import shutil
import sys
from pathlib import Path

import yaml

from eridiffusion import cli
from eridiffusion.archs import get_arch_class
from eridiffusion.demo import DEMO_DATA_DIR


def tiny_cuda_config(work: Path, **train) -> dict:
    """The demo config on CUDA in bf16, pointed at a tiny Flux and the bundled data under `work`."""
    model = get_arch_class("flux").build_tiny(work / "tiny-flux")
    data = Path(shutil.copytree(DEMO_DATA_DIR, work / "dataset", dirs_exist_ok=True))
    config = yaml.safe_load((Path(cli.__file__).with_name("demo.yaml")).read_text().replace("${ERI_DEMO_DIR}", str(work)))
    proc = config["config"]["process"][0]
    proc.update(device="cuda:0", training_folder=str(work / "out"))
    proc["train"].update(dtype="bf16", **train)
    proc["model"]["name_or_path"] = str(model)
    proc["datasets"][0]["folder_path"] = str(data)
    return config


def main(work: Path, quantized: bool) -> int:
    config = tiny_cuda_config(work, steps=30)
    proc = config["config"]["process"][0]
    if quantized:
        proc["model"].update(quantize=True, qtype="qfloat8", layer_offloading=True, layer_offloading_transformer_percent=0.5)
    proc["save"]["save_every"] = 20
    path = work / "gpu.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli.main([str(path)]) == 0
    proc["train"]["steps"] = 40  # continue the same run
    path.write_text(yaml.safe_dump(config))
    assert cli.main([str(path)]) == 0
    run = work / "out" / "demo_flux_lora"
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    print("steps", [r["step"] for r in log][-3:], "first/last loss", log[0]["loss"], log[-1]["loss"])
    print(sorted(p.name for p in run.iterdir()), len(list((run / "samples").iterdir())), "samples")
    if quantized:
        print("plan", (run / "memory_plan.json").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), "--quantized" in sys.argv))
