"""trainer lora convert / merge / inspect for HiDream on the tiny model: our file (`transformer.<diffusers name>`, alpha
folded) <-> ComfyUI's generic `diffusion_model.<name>` <-> kohya's `lora_unet_<name with _>` (SimpleTuner's `lycoris_`
read too), the same update per module every way and our own file back; diffusers applies the `diffusion_model.` file
with the trainer's outputs; merge into a diffusers folder and into a prefixed single file gives the live adapter's
outputs."""
from __future__ import annotations

import shutil

import pytest
import torch
from diffusers import HiDreamImagePipeline, HiDreamImageTransformer2DModel
from safetensors.torch import load_file, save_file

from eridiffusion import cli
from eridiffusion.adapters import LoraSpec, inject_lora, load_lora_state, lora_alphas, lora_file_state
from eridiffusion.adapters.inspect import inspect_file
from eridiffusion.adapters.merge import adapter_modules, update
from eridiffusion.archs.blockwise import FrozenBase
from eridiffusion.archs.hidream import HiDream, formats
from eridiffusion.train.checkpoint import latest_state, load_state

from .conftest import train_config

# trained: every transformer Linear (embedders, caption projections, final layer), alpha != rank
NETWORKS = {"lora": {"linear": 4, "linear_alpha": 8, "transformer_only": False},
            "dora": {"linear": 4, "linear_alpha": 8, "type": "dora"}}
# written by the trainer's file code from random factors (their conversion is renaming alone: no training needed)
UNTRAINED = {"loha": LoraSpec(4, 8, kind="loha"), "lokr": LoraSpec(2, 4, kind="lokr", factor=4)}


def inputs():
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, 16, 8, 8, generator=g), timesteps=torch.tensor([500.0]),
                encoder_hidden_states_t5=torch.randn(1, 10, 32, generator=g),
                encoder_hidden_states_llama3=torch.randn(3, 1, 10, 48, generator=g),
                pooled_embeds=torch.randn(1, 64, generator=g), return_dict=False)


@pytest.fixture(scope="module")
def runs(tiny_hidream, tmp_path_factory):
    import yaml

    from eridiffusion.demo import DEMO_DATA_DIR

    tmp = tmp_path_factory.mktemp("hidream-lora")
    data = tmp / "data"  # two small images: one batch, little to cache or compute
    data.mkdir()
    for name in ("green_square.jpg", "green_square.txt", "orange_ring.jpg", "orange_ring.txt"):
        shutil.copy(DEMO_DATA_DIR / name, data)
    out = {}
    for kind, network in NETWORKS.items():
        cfg = train_config(tiny_hidream, data, tmp / kind, arch="hidream", steps=1, network=network,
                           sample={"prompts": []}, train={"lr": 1e-2}, save={"save_every": 1},
                           datasets=[{"folder_path": str(data), "caption_ext": "txt", "resolution": [32]}])
        (tmp / f"{kind}.yaml").write_text(yaml.safe_dump(cfg))
        assert cli.main([str(tmp / f"{kind}.yaml")]) == 0
        out[kind] = tmp / kind / "test_lora"
    for kind, spec in UNTRAINED.items():
        model = transformer(tiny_hidream)
        linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        g = torch.Generator().manual_seed(0)
        for param in inject_lora(model, linears, spec, seed=0):
            param.data = torch.randn(param.shape, generator=g) * 0.1
        state = {**lora_file_state(model), **{f"{m}.alpha": torch.tensor(a) for m, a in lora_alphas(model).items()}}
        (tmp / kind).mkdir()
        save_file(HiDream.lora_to_file(None, {"transformer": state}), str(tmp / kind / "test_lora.safetensors"),
                  metadata={"eri_arch": "hidream"})
        out[kind] = tmp / kind
    return out


def transformer(folder) -> HiDreamImageTransformer2DModel:
    return HiDreamImageTransformer2DModel.from_pretrained(folder, subfolder="transformer", local_files_only=True).eval()


def live_output(tiny_hidream, run, kind) -> torch.Tensor:
    """The trainer's model: the last checkpoint's adapter, unmerged, in the base transformer."""
    state = load_state(latest_state(run))["lora"]["transformer"]
    model = transformer(tiny_hidream)
    inject_lora(model, sorted({k.rsplit(".lora_", 1)[0] for k in state}), LoraSpec(rank=4, alpha=8, kind=kind))
    load_lora_state(model, state)
    with torch.no_grad():
        return model.eval()(**inputs())[0]


def convert(path, layout, out, *extra) -> dict[str, torch.Tensor]:
    assert cli.main(["lora", "convert", str(path), "--to", layout, "-o", str(out), *extra]) == 0
    return load_file(out)


@pytest.mark.parametrize("kind", [*NETWORKS, *UNTRAINED])
def test_layouts_round_trip_with_the_same_updates(kind, runs, tmp_path):
    ours_path = runs[kind] / "test_lora.safetensors"
    ours = load_file(ours_path)
    comfy = convert(ours_path, "comfy", tmp_path / "c.safetensors")
    kohya = convert(tmp_path / "c.safetensors", "kohya", tmp_path / "k.safetensors")
    back = convert(tmp_path / "k.safetensors", "diffusers", tmp_path / "d.safetensors")
    assert comfy.keys() == {"diffusion_model." + k[len("transformer."):] for k in ours}
    assert all(k.startswith("lora_unet_") for k in kohya) and "lora_unet_double_stream_blocks_0_block_attn1_to_q.alpha" in kohya
    modules = adapter_modules(formats.lora_from_file(ours))
    assert {k.rsplit(".", 1)[0] for k in kohya if k.endswith(".alpha")} == {
        "lora_unet_" + m.replace(".", "_") for m in modules}  # kohya's layout: every module with its alpha
    # ours -> comfy -> kohya -> diffusers is our own file again
    assert back.keys() == ours.keys() and all(torch.equal(back[k], v) for k, v in ours.items())
    lycoris = {"lycoris_" + k[len("lora_unet_"):]: v for k, v in kohya.items()}  # SimpleTuner's names: read the same
    for tensors in (comfy, kohya, lycoris):
        got = adapter_modules(formats.lora_from_file(tensors))
        assert got.keys() == modules.keys()
        for name, t in modules.items():
            torch.testing.assert_close(update(got[name]), update(t), atol=1e-6, rtol=1e-5)
            if "dora_scale" in t:
                assert torch.equal(got[name]["dora_scale"], t["dora_scale"])


def test_diffusers_applies_the_comfy_layout_as_trained(runs, tiny_hidream, tmp_path):
    convert(runs["lora"] / "test_lora.safetensors", "comfy", tmp_path / "c.safetensors")
    pipe = HiDreamImagePipeline.from_pretrained(tiny_hidream, local_files_only=True)
    pipe.load_lora_weights(str(tmp_path / "c.safetensors"))
    with torch.no_grad():
        got = pipe.transformer.eval()(**inputs())[0]
    torch.testing.assert_close(got, live_output(tiny_hidream, runs["lora"], "lora"), atol=1e-5, rtol=1e-5)


def test_merge_into_a_folder_and_into_a_single_file(runs, tiny_hidream, tmp_path):
    with torch.no_grad():
        base = transformer(tiny_hidream)(**inputs())[0]
    kohya = tmp_path / "k.safetensors"  # merge reads any layout convert writes
    convert(runs["lora"] / "test_lora.safetensors", "kohya", kohya)
    out = tmp_path / "merged"
    assert cli.main(["lora", "merge", "--base", str(tiny_hidream), "--lora", str(kohya), "--arch", "hidream",
                     "-o", str(out)]) == 0
    assert (out / "model_index.json").is_file() and (out / "text_encoder_4").is_dir()
    want = live_output(tiny_hidream, runs["lora"], "lora")
    assert not torch.allclose(want, base, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(transformer(out)(**inputs())[0], want, atol=1e-5, rtol=1e-5)

    # ComfyUI's diffusion_models/ file layout, as a full checkpoint prefixes it; a DoRA merged by name
    single = tmp_path / "hidream_i1_tiny.safetensors"
    save_file({f"model.diffusion_model.{k}": v for k, v in load_file(
        tiny_hidream / "transformer" / "diffusion_pytorch_model.safetensors").items()}, str(single))
    out = tmp_path / "hidream_i1_tiny_merged.safetensors"
    assert cli.main(["lora", "merge", "--base", str(single), "--lora", str(runs["dora"] / "test_lora.safetensors"),
                     "-o", str(out)]) == 0
    assert load_file(out).keys() == load_file(single).keys()
    model = formats.load_single_file(out, FrozenBase(torch.device("cpu"), torch.float32),
                                     [HiDreamImageTransformer2DModel.load_config(tiny_hidream / "transformer")])
    want = live_output(tiny_hidream, runs["dora"], "dora")
    assert not torch.allclose(want, base, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**inputs())[0], want, atol=1e-5, rtol=1e-5)


def test_inspect_and_errors(runs, tiny_hidream, tmp_path, capsys):
    ours = load_file(runs["lora"] / "test_lora.safetensors")
    kohya = convert(runs["lora"] / "test_lora.safetensors", "kohya", tmp_path / "k.safetensors")
    save_file(kohya, str(tmp_path / "bare.safetensors"))  # no metadata: the architecture comes from the names
    report = inspect_file(tmp_path / "bare.safetensors")
    assert report.architecture == "hidream (from module names)" and report.layout == "kohya"
    capsys.readouterr()
    for extra in ({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(1, 32)},
                  {"transformer.caption_projection.0.linear.lora_A.weight": torch.zeros(1, 32)}):
        save_file({**kohya, **extra}, str(tmp_path / "x.safetensors"))  # another layout's key: never dropped
        assert cli.main(["lora", "convert", str(tmp_path / "x.safetensors"), "--to", "comfy", "-o",
                         str(tmp_path / "y.safetensors"), "--arch", "hidream"]) == 1
        assert f"not a HiDream LoRA key: '{next(iter(extra))}'" in capsys.readouterr().err
    save_file({**ours, "transformer.no_such_block.lora_A.weight": torch.zeros(4, 8),
               "transformer.no_such_block.lora_B.weight": torch.zeros(8, 4)}, str(tmp_path / "z.safetensors"))
    assert cli.main(["lora", "merge", "--base", str(tiny_hidream), "--lora", str(tmp_path / "z.safetensors"),
                     "--arch", "hidream", "-o", str(tmp_path / "m")]) == 1
    assert "names 'no_such_block', which this model does not have" in capsys.readouterr().err
    assert cli.main(["lora", "merge", "--base", str(tiny_hidream / "vae" / "diffusion_pytorch_model.safetensors"),
                     "--lora", str(tmp_path / "bare.safetensors"), "--arch", "hidream", "-o", str(tmp_path / "m.safetensors")]) == 1
    assert "is not a HiDream-I1 transformer" in capsys.readouterr().err
    fp8 = tmp_path / "hidream_fp8.safetensors"
    save_file({k: v.to(torch.float8_e4m3fn) for k, v in transformer(tiny_hidream).state_dict().items()}, str(fp8))
    assert cli.main(["lora", "merge", "--base", str(fp8), "--lora", str(tmp_path / "bare.safetensors"), "--arch",
                     "hidream", "-o", str(tmp_path / "m.safetensors")]) == 1
    assert "a float8 model; merge into its bf16/fp16 release" in capsys.readouterr().err
