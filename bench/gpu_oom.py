"""CUDA out of memory mid-run: the run saves the last complete step and names the settings that use less
memory. Fills the GPU after set-up so that the next training step cannot allocate.

  PYTHONPATH=src python3 bench/gpu_oom.py WORKDIR
"""
import sys
from pathlib import Path

import torch
from gpu_smoke import tiny_cuda_config

from eridiffusion.config import parse_config
from eridiffusion.train.loop import Run


def main(work: Path) -> int:
    config = tiny_cuda_config(work, steps=30, skip_first_sample=True)
    proc = config["config"]["process"][0]
    proc["model"]["compile"] = False
    proc["save"]["save_every"] = 1000
    run = Run(parse_config(config).config.process[0], {})
    free, _ = torch.cuda.mem_get_info()
    hog = torch.empty(free - (8 << 20), dtype=torch.uint8, device="cuda")  # leave 8 MB  # noqa: F841
    try:
        run.train()
    except MemoryError as e:
        print("MemoryError:", e)
        print("saved states:", sorted(p.name for p in (run.run_dir / "state").iterdir()))
        return 0
    print("no out-of-memory happened")
    return 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
