"""The reference LoRA step (../shared/bench/reference_step.py: diffusers + peft + bf16 autocast + torch AdamW,
checkpointing) for Wan 2.1 at a clip size its cases lack (they are 832x480x81 only): the same `run` on the same
WanTransformer3DModel configs and LoRA names, with the latents of WIDTHxHEIGHTxFRAMES (1 + (F - 1) / 4 latent frames,
H / 8 x W / 8) and 512 text tokens.

  python3 bench/reference_wan.py PATH/TO/reference_step.py 480x272x41 wan13b wan14b   # prints and writes each case
"""
import importlib.util
import json
import os
import sys


def main():
    spec = importlib.util.spec_from_file_location("reference_step", sys.argv[1])
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    w, h, f = (int(v) for v in sys.argv[2].split("x"))
    ref.WAN_LATENT = (1 + (f - 1) // 4, h // 8, w // 8)  # read by ref.inputs
    results = {}
    for name in sys.argv[3:] or ["wan13b", "wan14b"]:
        key = f"{name}_{sys.argv[2]}_ckpt"
        results[key] = ref.run(name, 1, True, steps=4 if name == "wan14b" else 8)
        print(json.dumps({key: results[key]}), flush=True)
        json.dump(results, open(os.path.join(ref.OUT, "reference_wan.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
