"""FLUX.1 single files in Black Forest Labs' layout: conversion both ways, config inference, loading."""
import json

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from safetensors.torch import save_file

from eridiffusion.archs.flux.formats import (
    CONFIG_DIR,
    bfl_to_diffusers,
    describe_checkpoint,
    diffusers_to_bfl,
    infer_flux_config,
    is_bfl_flux,
    known_flux_configs,
    known_flux_variant,
    load_flux_single_file,
)
from eridiffusion.archs.flux.tiny import build_tiny_flux

VARIANTS = {"dev_1x1": dict(guidance_embeds=True, num_layers=1, num_single_layers=1),
            "schnell_2x3": dict(guidance_embeds=False, num_layers=2, num_single_layers=3)}


@pytest.fixture(scope="module", params=list(VARIANTS))
def original(request, tmp_path_factory) -> FluxTransformer2DModel:
    folder = build_tiny_flux(tmp_path_factory.mktemp("flux") / request.param, **VARIANTS[request.param])
    return FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer", local_files_only=True).eval()


def _config(model) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in model.config.items() if not k.startswith("_")}


@torch.no_grad()
def _forward(model: FluxTransformer2DModel) -> torch.Tensor:
    cfg, g = model.config, torch.Generator().manual_seed(0)
    dtype = next(model.parameters()).dtype
    h = w = 4
    return model(
        hidden_states=torch.randn(1, h * w, cfg.in_channels, generator=g).to(dtype),
        encoder_hidden_states=torch.randn(1, 5, cfg.joint_attention_dim, generator=g).to(dtype),
        pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g).to(dtype),
        timestep=torch.tensor([0.7], dtype=dtype),
        img_ids=FluxPipeline._prepare_latent_image_ids(1, h, w, "cpu", dtype),
        txt_ids=torch.zeros(5, 3, dtype=dtype),
        guidance=torch.tensor([3.5]) if cfg.guidance_embeds else None,
        return_dict=False,
    )[0]


def test_bfl_layout_names_for_one_block_each():
    with torch.device("meta"):
        model = FluxTransformer2DModel(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                                       joint_attention_dim=32, pooled_projection_dim=32, in_channels=16,
                                       guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    bfl = diffusers_to_bfl(model.state_dict())
    linear = lambda *names: [f"{n}.{p}" for n in names for p in ("weight", "bias")]  # noqa: E731
    double = [f"double_blocks.0.{n}" for n in ("img_mod.lin", "txt_mod.lin", "img_attn.qkv", "txt_attn.qkv",
                                               "img_attn.proj", "txt_attn.proj", "img_mlp.0", "img_mlp.2",
                                               "txt_mlp.0", "txt_mlp.2")]
    norms = [f"double_blocks.0.{s}_attn.norm.{q}_norm.scale" for s in ("img", "txt") for q in ("query", "key")]
    norms += [f"single_blocks.0.norm.{q}_norm.scale" for q in ("query", "key")]
    expected = linear(*double, "single_blocks.0.linear1", "single_blocks.0.linear2", "single_blocks.0.modulation.lin",
                      "img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "vector_in.in_layer",
                      "vector_in.out_layer", "guidance_in.in_layer", "guidance_in.out_layer", "final_layer.linear",
                      "final_layer.adaLN_modulation.1") + norms
    assert sorted(bfl) == sorted(expected)
    assert bfl["double_blocks.0.img_attn.qkv.weight"].shape == (3 * 32, 32)
    assert bfl["single_blocks.0.linear1.weight"].shape == (3 * 32 + 4 * 32, 32)


def test_diffusers_bfl_diffusers_is_exact(original):
    sd = original.state_dict()
    bfl = diffusers_to_bfl(sd)
    assert is_bfl_flux(bfl) and not is_bfl_flux(sd)
    back = bfl_to_diffusers(bfl, _config(original))
    assert sorted(back) == sorted(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


def test_fused_weights_are_in_bfl_order(original):
    # The round trip cannot see an order both directions share; these are ComfyUI's slices (0, i*H, H)
    sd, bfl = original.state_dict(), diffusers_to_bfl(original.state_dict())
    h = original.config.num_attention_heads * original.config.attention_head_dim
    for i, name in enumerate(("to_q", "to_k", "to_v")):
        rows = slice(i * h, (i + 1) * h)
        double, single = "transformer_blocks.0.attn.", "single_transformer_blocks.0.attn."
        assert torch.equal(bfl["double_blocks.0.img_attn.qkv.weight"][rows], sd[f"{double}{name}.weight"])
        assert torch.equal(bfl["double_blocks.0.txt_attn.qkv.bias"][rows], sd[f"{double}add_{name[-1]}_proj.bias"])
        assert torch.equal(bfl["single_blocks.0.linear1.weight"][rows], sd[f"{single}{name}.weight"])
    assert torch.equal(bfl["single_blocks.0.linear1.weight"][3 * h:], sd["single_transformer_blocks.0.proj_mlp.weight"])
    diff, final = sd["norm_out.linear.weight"], bfl["final_layer.adaLN_modulation.1.weight"]
    assert torch.equal(final[:h], diff[h:]) and torch.equal(final[h:], diff[:h])  # (scale, shift) <-> (shift, scale)


def test_inferred_config_is_the_one_built(original):
    assert infer_flux_config(diffusers_to_bfl(original.state_dict())) == _config(original)


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
@pytest.mark.parametrize("file_dtype", [torch.float32, torch.bfloat16])
def test_single_file_loads_exactly(original, tmp_path, prefix, file_dtype):
    path = tmp_path / "flux1.safetensors"
    bfl = {prefix + k: v.to(file_dtype).contiguous() for k, v in diffusers_to_bfl(original.state_dict()).items()}
    if prefix:  # an all-in-one checkpoint also holds other components, outside the prefix
        bfl["first_stage_model.decoder.conv_in.weight"] = torch.zeros(2, 2)
    save_file(bfl, path)
    loaded = load_flux_single_file(path, dtype=file_dtype)
    assert _config(loaded) == _config(original)
    assert all(p.dtype == file_dtype and p.device.type == "cpu" for p in loaded.state_dict().values())
    rounded = {k: v.to(file_dtype) for k, v in original.state_dict().items()}
    _assert_same_weights(loaded, rounded)
    reference = FluxTransformer2DModel.from_config(original.config).eval()
    reference.load_state_dict(rounded, assign=True)  # the original in the file's dtype
    torch.testing.assert_close(_forward(loaded), _forward(reference))


def _assert_same_weights(model, expected: dict) -> None:
    # Bitwise on the weights; outputs are compared with a tolerance only because CPU matmuls round
    # differently depending on where a tensor sits in memory (a cloned copy of the same model differs ~1e-7)
    got = model.state_dict()
    assert sorted(got) == sorted(expected)
    for k, v in expected.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


@pytest.mark.parametrize("fp8, max_error", [(torch.float8_e4m3fn, 0.1), (torch.float8_e5m2, 0.2)])  # 3 / 2 mantissa bits
def test_float8_file_loads_within_float8_error(original, tmp_path, fp8, max_error):
    path = tmp_path / "flux1-fp8.safetensors"
    save_file({k: v.to(fp8) for k, v in diffusers_to_bfl(original.state_dict()).items()}, path)
    loaded = load_flux_single_file(path, dtype=torch.float32)
    assert _config(loaded) == _config(original)
    _assert_same_weights(loaded, {k: v.to(fp8).float() for k, v in original.state_dict().items()})
    out, expected = _forward(loaded), _forward(original)
    assert (out - expected).norm() / expected.norm() < max_error


def test_comfyui_scaled_fp8_file_is_dequantised(original, tmp_path):
    bfl = diffusers_to_bfl(original.state_dict())
    scaled = {"model.diffusion_model.scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}
    expected = {}
    for k, v in bfl.items():
        key = "model.diffusion_model." + k
        if v.ndim == 2:  # ComfyUI scales the linear weights; norms and biases stay as they are
            scale = v.abs().max() / 448
            scaled[key] = (v / scale).to(torch.float8_e4m3fn)
            scaled[key.removesuffix("weight") + "scale_weight"] = scale.reshape(())
            scaled[key.removesuffix("weight") + "scale_input"] = torch.ones(())
            expected[k] = scaled[key].float() * scale
        else:
            scaled[key] = expected[k] = v
    save_file(scaled, tmp_path / "flux1-fp8-scaled.safetensors")
    loaded = load_flux_single_file(tmp_path / "flux1-fp8-scaled.safetensors", dtype=torch.float32)
    _assert_same_weights(loaded, bfl_to_diffusers(expected, _config(original)))


def test_truncated_file_names_the_missing_keys(original, tmp_path):
    bfl = diffusers_to_bfl(original.state_dict())
    del bfl["double_blocks.0.txt_mlp.2.bias"]
    bfl["double_blocks.0.extra.weight"] = torch.zeros(1)
    save_file(bfl, tmp_path / "broken.safetensors")
    with pytest.raises(ValueError, match=r"broken\.safetensors.*1 missing \['double_blocks\.0\.txt_mlp\.2\.bias'\]"
                                         r".*1 unexpected \['double_blocks\.0\.extra\.weight'\]"):
        load_flux_single_file(tmp_path / "broken.safetensors", dtype=torch.float32)


WRONG_FILES = {
    "sdxl": ({"model.diffusion_model.input_blocks.0.0.weight": (4, 4, 3, 3),
              "model.diffusion_model.label_emb.0.0.weight": (4, 4),
              "conditioner.embedders.1.model.ln_final.weight": (4,)}, "an SDXL checkpoint"),
    "vae": ({"encoder.down.0.block.0.conv1.weight": (4, 4, 3, 3),
             "decoder.up.0.block.0.conv1.weight": (4, 4, 3, 3)}, "a VAE"),
    "clip": ({"text_model.encoder.layers.0.mlp.fc1.weight": (4, 4)}, "a CLIP text encoder"),
    "t5": ({"encoder.block.0.layer.0.SelfAttention.q.weight": (4, 4), "shared.weight": (8, 4)}, "a T5 encoder"),
    "lora": ({"diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": (2, 4)}, "a LoRA"),
}


@pytest.mark.parametrize("kind", list(WRONG_FILES))
def test_wrong_architecture_says_what_the_file_looks_like(kind, tmp_path):
    shapes, what = WRONG_FILES[kind]
    path = tmp_path / f"{kind}.safetensors"
    save_file({k: torch.zeros(s) for k, s in shapes.items()}, path)
    with pytest.raises(ValueError, match=rf"{kind}\.safetensors is not a FLUX\.1 transformer.*looks like {what}"):
        load_flux_single_file(path)


def test_diffusers_layout_file_is_named_as_such(original):
    assert describe_checkpoint(original.state_dict()).startswith("looks like a diffusers-layout Flux transformer")
    assert describe_checkpoint(["foo.weight"]).startswith("does not look like any model")


def test_shipped_configs_are_flux_transformer_configs_and_are_inferred_back():
    assert sorted(known_flux_configs()) == ["flux-dev", "flux-flex1", "flux-schnell"]
    for path in sorted(CONFIG_DIR.glob("flux-*.json")):
        raw = json.loads(path.read_text())
        assert raw["_class_name"] == "FluxTransformer2DModel"
        with torch.device("meta"):
            model = FluxTransformer2DModel.from_config(raw)
        assert _config(model) == known_flux_configs()[path.stem]
        bfl = diffusers_to_bfl(model.state_dict())  # meta tensors: full-size shapes, no memory
        inferred = infer_flux_config(bfl)
        assert inferred == known_flux_configs()[path.stem] and known_flux_variant(inferred) == path.stem
        back = bfl_to_diffusers(bfl, inferred)  # diffusers' converter at FLUX.1's own widths
        assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in model.state_dict().items()}
    dev, flex = known_flux_configs()["flux-dev"], known_flux_configs()["flux-flex1"]
    assert (dev["num_layers"], flex["num_layers"], dev["axes_dims_rope"]) == (19, 8, [16, 56, 56])
