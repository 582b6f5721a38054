"""SDXL single-file (SGM / ComfyUI) checkpoints: the shipped base configs, the key mapping both ways at
SDXL's real size (on the meta device) and exactly on the tiny model, and loading one file."""
import json
import shutil

import pytest
import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from eridiffusion.archs.sdxl.formats import (BASE_CONFIGS, diffusers_to_sgm, infer_sdxl_unet_config,
                                             infer_sdxl_vae_latent_channels, is_sgm_sdxl, load_sdxl_single_file,
                                             load_sdxl_tokenizers, read_configs, sgm_to_diffusers)

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
# names from stabilityai's sd_xl_base_1.0.safetensors
REAL_KEYS = [
    "model.diffusion_model.input_blocks.0.0.weight",
    "model.diffusion_model.input_blocks.3.0.op.weight",
    "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight",
    "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.ff.net.0.proj.weight",
    "model.diffusion_model.middle_block.1.transformer_blocks.9.norm3.weight",
    "model.diffusion_model.middle_block.2.emb_layers.1.weight",
    "model.diffusion_model.output_blocks.2.2.conv.weight",
    "model.diffusion_model.output_blocks.8.0.skip_connection.weight",
    "model.diffusion_model.label_emb.0.0.weight",
    "model.diffusion_model.time_embed.2.bias",
    "model.diffusion_model.out.2.weight",
    "first_stage_model.encoder.down.0.downsample.conv.weight",
    "first_stage_model.decoder.up.3.upsample.conv.weight",
    "first_stage_model.decoder.up.1.block.0.nin_shortcut.weight",
    "first_stage_model.decoder.mid.attn_1.proj_out.weight",
    "first_stage_model.quant_conv.weight",
    "conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
    "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.bias",
    "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
    "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight",
    "conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_fc.weight",
    "conditioner.embedders.1.model.text_projection",
    "conditioner.embedders.1.model.ln_final.bias",
    "conditioner.embedders.1.model.positional_embedding",
    "conditioner.embedders.1.model.token_embedding.weight",
]
PROMPT = "a photo of a cat sitting on a red chair"


def _tiny_components(root) -> dict[str, dict[str, torch.Tensor]]:
    name = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model"}
    return {c: load_file(root / c / f"{name.get(c, 'model')}.safetensors") for c in COMPONENTS}


@pytest.fixture(scope="module")
def sgm_file(tiny_sdxl, tmp_path_factory):
    path = tmp_path_factory.mktemp("sgm") / "tiny_sdxl.safetensors"
    save_file(diffusers_to_sgm(_tiny_components(tiny_sdxl)), path)
    return path


def test_shipped_sdxl_base_configs_parse():
    unet = UNet2DConditionModel.load_config(BASE_CONFIGS, subfolder="unet")
    assert unet["block_out_channels"] == [320, 640, 1280] and unet["transformer_layers_per_block"] == [1, 2, 10]
    assert unet["cross_attention_dim"] == 2048 and unet["projection_class_embeddings_input_dim"] == 2816
    vae = AutoencoderKL.load_config(BASE_CONFIGS, subfolder="vae")
    assert vae["scaling_factor"] == 0.13025 and vae["force_upcast"] and vae["block_out_channels"] == [128, 256, 512, 512]
    te1 = CLIPTextConfig.from_pretrained(BASE_CONFIGS / "text_encoder")
    te2 = CLIPTextConfig.from_pretrained(BASE_CONFIGS / "text_encoder_2")
    assert (te1.hidden_size, te1.num_hidden_layers, te1.hidden_act) == (768, 12, "quick_gelu")
    assert (te2.hidden_size, te2.num_hidden_layers, te2.projection_dim, te2.hidden_act) == (1280, 32, 1280, "gelu")
    scheduler = EulerDiscreteScheduler.from_pretrained(BASE_CONFIGS, subfolder="scheduler")
    assert scheduler.config.timestep_spacing == "leading" and scheduler.config.steps_offset == 1
    index = json.loads((BASE_CONFIGS / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert not list(BASE_CONFIGS.rglob("tokenizer*"))


def test_real_size_sdxl_maps_to_the_original_key_layout():
    """At SDXL base's real size (meta tensors): the original file's names, its 2515 keys less OpenCLIP's
    unused logit_scale, the config inferred back exactly, and the diffusers readers taking it all back."""
    configs = read_configs(BASE_CONFIGS)
    with torch.device("meta"):
        states = {"unet": UNet2DConditionModel.from_config(configs["unet"]).state_dict(),
                  "vae": AutoencoderKL.from_config(configs["vae"]).state_dict(),
                  "text_encoder": CLIPTextModel(configs["text_encoder"]).state_dict(),
                  "text_encoder_2": CLIPTextModelWithProjection(configs["text_encoder_2"]).state_dict()}
    sgm = diffusers_to_sgm(states)
    assert len(sgm) == 2515 - 1
    assert set(REAL_KEYS) <= set(sgm)
    assert sgm["first_stage_model.decoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert sgm["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * 1280, 1280)
    assert is_sgm_sdxl(sgm)
    assert infer_sdxl_unet_config(sgm) == configs["unet"]
    assert infer_sdxl_vae_latent_channels(sgm) == 4
    back = sgm_to_diffusers(sgm, configs)
    for name, state in states.items():
        assert {k: v.shape for k, v in back[name].items()} == {k: v.shape for k, v in state.items()}, name


def test_tiny_sdxl_round_trips_exactly(tiny_sdxl):
    components = _tiny_components(tiny_sdxl)
    configs = read_configs(tiny_sdxl)
    sgm = diffusers_to_sgm(components)
    assert is_sgm_sdxl(sgm)
    back = sgm_to_diffusers(sgm, configs)
    assert set(back) == set(COMPONENTS)
    for name, state in components.items():
        assert set(back[name]) == set(state), name
        for key, tensor in state.items():
            assert back[name][key].dtype == tensor.dtype and torch.equal(back[name][key], tensor), f"{name}: {key}"
    again = diffusers_to_sgm(back)
    assert set(again) == set(sgm) and all(torch.equal(again[k], sgm[k]) for k in sgm)
    # OpenCLIP keeps q, k, v fused and the projection transposed
    te2, prefix = components["text_encoder_2"], "conditioner.embedders.1.model."
    assert torch.equal(sgm[prefix + "text_projection"], te2["text_projection.weight"].T)
    fused = sgm[prefix + "transformer.resblocks.1.attn.in_proj_weight"]
    assert torch.equal(fused[32:64], te2["text_model.encoder.layers.1.self_attn.k_proj.weight"])


def test_inferred_unet_config_reproduces_the_tiny_one(tiny_sdxl, sgm_file):
    """No weight shows head counts or GroupNorm groups: gcd(64, widths)-channel heads and gcd(32, widths)
    groups give the tiny model's 8 and 8. What no weight shows either comes from SDXL base's config: its
    default resolution (sample_size 128) and upcast_attention null (diffusers' default is False; the same)."""
    state = load_file(sgm_file)
    tiny = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet").eval()
    unet = UNet2DConditionModel.from_config(infer_sdxl_unet_config(state)).eval()
    bookkeeping = {"_diffusers_version", "_name_or_path", "_use_default_values"}
    differ = {k: (v, tiny.config[k]) for k, v in unet.config.items() if k not in bookkeeping and v != tiny.config[k]}
    assert differ == {"sample_size": (128, 16), "upcast_attention": (None, False)}
    unet.load_state_dict(sgm_to_diffusers(state, read_configs(tiny_sdxl))["unet"], strict=True)
    torch.testing.assert_close(_unet_out(unet), _unet_out(tiny))  # so the inferred heads and groups are right
    assert infer_sdxl_unet_config(state, reference=tiny.config) == dict(tiny.config)


def test_single_file_loads_like_the_diffusers_folder(tiny_sdxl, sgm_file):
    """The same weights bit for bit, and the same outputs. Outputs are compared to float32 rounding: CPU kernels
    round differently by the weights' memory alignment, which depends on where a file put each tensor."""
    loaded = load_sdxl_single_file(sgm_file, tokenizer_folder=tiny_sdxl, config_folder=tiny_sdxl)
    assert isinstance(loaded["scheduler"], EulerDiscreteScheduler)
    originals = {"unet": UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet"),
                 "vae": AutoencoderKL.from_pretrained(tiny_sdxl, subfolder="vae"),
                 "text_encoder": CLIPTextModel.from_pretrained(tiny_sdxl / "text_encoder"),
                 "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(tiny_sdxl / "text_encoder_2")}
    for name, original in originals.items():
        assert type(loaded[name]) is type(original) and not loaded[name].training
        ours, theirs = loaded[name].state_dict(), original.eval().state_dict()
        assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs), name

    torch.testing.assert_close(_unet_out(loaded["unet"]), _unet_out(originals["unet"]))
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded["vae"].decode(latents).sample, originals["vae"].decode(latents).sample)

    for encoder, tokenizer in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        ids = CLIPTokenizer.from_pretrained(tiny_sdxl / tokenizer)(PROMPT, padding="max_length", return_tensors="pt").input_ids
        assert torch.equal(loaded[tokenizer](PROMPT, padding="max_length", return_tensors="pt").input_ids, ids)
        with torch.no_grad():
            got, want = loaded[encoder](ids, output_hidden_states=True), originals[encoder](ids, output_hidden_states=True)
        torch.testing.assert_close(got.hidden_states[-2], want.hidden_states[-2])  # what SDXL's UNet reads
        torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state)
        if encoder == "text_encoder_2":
            torch.testing.assert_close(got.text_embeds, want.text_embeds)  # SDXL's pooled embedding


def test_single_file_dtypes_per_component(tiny_sdxl, sgm_file):
    dtypes = {"unet": torch.bfloat16, "vae": torch.float32, "text_encoder": torch.float16, "text_encoder_2": torch.bfloat16}
    loaded = load_sdxl_single_file(sgm_file, tokenizer_folder=tiny_sdxl, config_folder=tiny_sdxl, dtype=dtypes)
    for name, dtype in dtypes.items():
        assert {p.dtype for p in loaded[name].parameters()} == {dtype}, name


def test_shipped_configs_reject_weights_of_another_size(tiny_sdxl, sgm_file):
    # the UNet's config comes from its weights; the VAE's (but its latent channels) from the config folder
    with pytest.raises(ValueError, match="the vae weights do not fit its config"):
        load_sdxl_single_file(sgm_file, tokenizer_folder=tiny_sdxl)


def test_missing_tokenizer_files_are_named(tmp_path):
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "vocab.json").write_text("{}")
    with pytest.raises(ValueError) as error:
        load_sdxl_single_file(tmp_path / "never_read.safetensors", tokenizer_folder=tmp_path)
    message = str(error.value)
    for path in ("tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer_2/vocab.json", "tokenizer_2/merges.txt"):
        assert path in message
    assert message.split("missing: ")[1] == "tokenizer/merges.txt, tokenizer_2/vocab.json, tokenizer_2/merges.txt"


def test_bare_vocab_and_merges_tokenize_like_sdxl(tiny_sdxl, tmp_path):
    for sub in ("tokenizer", "tokenizer_2"):
        (tmp_path / sub).mkdir()
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(tiny_sdxl / sub / name, tmp_path / sub / name)
    bare, full = load_sdxl_tokenizers(tmp_path), load_sdxl_tokenizers(tiny_sdxl)
    assert bare["tokenizer_2"].pad_token == "!" and bare["tokenizer"].model_max_length == 77
    for sub in ("tokenizer", "tokenizer_2"):
        assert bare[sub](PROMPT, padding="max_length").input_ids == full[sub](PROMPT, padding="max_length").input_ids


def test_unknown_component_is_refused():
    with pytest.raises(ValueError, match="unknown SDXL components"):
        diffusers_to_sgm({"transformer": {}})


def _unet_out(unet) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 16, 16, generator=g)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    pooled = torch.randn(1, 32, generator=g)
    time_ids = torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]])
    with torch.no_grad():
        return unet(sample.to(unet.dtype), torch.tensor([500]), encoder_hidden_states=text.to(unet.dtype),
                    added_cond_kwargs={"text_embeds": pooled.to(unet.dtype), "time_ids": time_ids.to(unet.dtype)}).sample
