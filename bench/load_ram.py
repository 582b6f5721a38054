"""Peak host RAM while loading and quantizing a full-size FLUX.1 transformer from one file in Black Forest
Labs' layout (random weights written to disk first), against the file's size.

  PYTHONPATH=src python3 bench/load_ram.py write /tmp/flux1-random.safetensors [--fp8]
  PYTHONPATH=src python3 bench/load_ram.py load /tmp/flux1-random.safetensors float8|none [cuda|cpu]

`load` runs in a fresh process so ru_maxrss is this load's alone.
"""
import json
import os
import resource
import sys
import time

import torch


def write(path: str, fp8: bool) -> None:
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    from eridiffusion.archs.flux.formats import diffusers_to_bfl, known_flux_configs

    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(known_flux_configs()["flux-dev"])
    state = {}
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # random numbers are drawn much faster there
    for k, v in diffusers_to_bfl(model.state_dict()).items():
        t = (torch.randn(v.shape, dtype=torch.bfloat16, device=dev) * 0.02).cpu()
        state[k] = t.to(torch.float8_e4m3fn) if fp8 and t.dim() == 2 else t
    save_file(state, path)


def load(path: str, qtype: str, device: str) -> None:
    from eridiffusion.archs.blockwise import FrozenBase
    from eridiffusion.archs.flux import Flux
    from eridiffusion.archs.flux.formats import load_flux_single_file
    from eridiffusion.quant import Quantizer, weight_bytes

    t = time.perf_counter()
    base = FrozenBase(torch.device(device), torch.bfloat16,
                      quantizer=Quantizer(None if qtype == "none" else qtype, Flux.quantize_exclude))
    model = load_flux_single_file(path, torch.bfloat16, base)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    size = os.path.getsize(path)
    print(json.dumps({f"load_{os.path.basename(path)}_{qtype}_{device}": {
        "file_gib": round(size / 2**30, 2), "peak_rss_gib": round(peak / 2**30, 2),
        "over_file_gib": round((peak - size) / 2**30, 2), "model_gib": round(weight_bytes(model) / 2**30, 2),
        "seconds": round(time.perf_counter() - t, 1), "quantized": base.quantizer.describe()}}))


if __name__ == "__main__":
    if sys.argv[1] == "write":
        write(sys.argv[2], "--fp8" in sys.argv)
    else:
        load(sys.argv[2], sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else "cuda")
