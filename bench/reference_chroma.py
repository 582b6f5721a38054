"""The reference LoRA step (../shared/bench/reference_step.py: diffusers + peft + bf16 autocast + torch AdamW,
checkpointing) extended to Chroma, which it lacks: full-size ChromaTransformer2DModel (Chroma1-HD's config,
diffusers' default, random weights), 1024², bs 1, 512 T5 tokens, LoRA rank 16 on the reference's FLUX.1 names.
It reuses that file's `run` unchanged and adds only the model and its inputs.

  python3 bench/reference_chroma.py PATH/TO/reference_step.py     # prints and writes chroma_bs1_ckpt
"""
import importlib.util
import json
import os
import sys

import torch


def main():
    spec = importlib.util.spec_from_file_location("reference_step", sys.argv[1])
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    build, inputs = ref.build, ref.inputs

    def build_chroma(name):
        if name != "chroma":
            return build(name)
        from diffusers import ChromaTransformer2DModel

        torch.set_default_dtype(torch.bfloat16)
        with torch.device(ref.dev):
            m = ChromaTransformer2DModel()
        torch.set_default_dtype(torch.float32)
        # the reference's FLUX.1 targets (Chroma's blocks have the same Linear names, no modulation layers)
        return m, ["to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_q_proj", "add_v_proj", "to_add_out",
                   "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out"]

    def inputs_chroma(name, bs):
        if name != "chroma":
            return inputs(name, bs)
        kw, shape = inputs("flux", bs)  # FLUX.1's packed 64x64 latents, 512 text tokens, ids
        for key in ("pooled_projections", "guidance"):  # Chroma has no pooled CLIP and no guidance embedding
            kw.pop(key)
        return kw, shape

    ref.build, ref.inputs = build_chroma, inputs_chroma
    result = ref.run("chroma", 1, True)
    print(json.dumps({"chroma_bs1_ckpt": result}), flush=True)
    json.dump({"chroma_bs1_ckpt": result}, open(os.path.join(ref.OUT, "reference_chroma.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
