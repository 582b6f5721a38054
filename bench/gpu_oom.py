"""CUDA out of memory mid-run: the run saves the last complete step and names the settings that use less
memory. Fills the GPU after set-up so that the next training step cannot allocate.

  PYTHONPATH=src python3 bench/gpu_oom.py WORKDIR
"""
import shutil
import sys
from pathlib import Path

import torch
import yaml

from eridiffusion import cli
from eridiffusion.archs import get_arch_class
from eridiffusion.config import parse_config
from eridiffusion.demo import DEMO_DATA_DIR
from eridiffusion.train.loop import Run


def main(work: Path) -> int:
    model = get_arch_class("flux").build_tiny(work / "tiny-flux")
    data = Path(shutil.copytree(DEMO_DATA_DIR, work / "dataset", dirs_exist_ok=True))
    config = yaml.safe_load((Path(cli.__file__).with_name("demo.yaml")).read_text().replace("${ERI_DEMO_DIR}", str(work)))
    proc = config["config"]["process"][0]
    proc.update(device="cuda:0", training_folder=str(work / "out"))
    proc["train"].update(dtype="bf16", steps=30, skip_first_sample=True)
    proc["model"].update(name_or_path=str(model), compile=False)
    proc["datasets"][0]["folder_path"] = str(data)
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
