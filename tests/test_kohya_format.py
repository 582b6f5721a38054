"""kohya LoRA files (`lora_unet_` / `lora_te1_` / `lora_te2_`, `.lora_down` / `.lora_up` / `.alpha`) from our
peft LoRA, checked on a tiny SDXL: exact round trip, kohya's names, and the file loading in diffusers'
StableDiffusionXLPipeline with the same outputs as our own LoRA'd models (alpha != rank, conv included)."""
from __future__ import annotations

import copy
import re

import pytest
import torch
from safetensors.torch import save_file

from eridiffusion.adapters import LoraSpec, filter_names, inject_lora, lora_alphas, lora_state
from eridiffusion.adapters.kohya import from_kohya, to_kohya
from eridiffusion.archs.sdxl.tiny import euler_scheduler, tiny_sdxl_unet, tiny_sdxl_vae
from eridiffusion.archs.tiny_parts import tiny_clip_text_config, tiny_clip_tokenizer

CONVS = ["conv_in", "down_blocks.0.resnets.0.conv1", "down_blocks.0.downsamplers.0.conv",  # 3x3, the last stride 2
         "up_blocks.1.resnets.0.conv2", "up_blocks.0.resnets.0.conv_shortcut", "conv_out"]   # and a 1x1
KEY = re.compile(r"(lora_unet|lora_te1|lora_te2)_[A-Za-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)")


@pytest.fixture(scope="module")
def sdxl():
    """Tiny random SDXL parts, in memory: UNet (text_time conditioning), CLIP-L- and CLIP-G-like encoders, VAE."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer, tokenizer_2 = tiny_clip_tokenizer(), tiny_clip_tokenizer(pad_token="!")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        te1 = CLIPTextModel(tiny_clip_text_config(tokenizer))
        te2 = CLIPTextModelWithProjection(tiny_clip_text_config(tokenizer_2, hidden_act="gelu"))
        unet = tiny_sdxl_unet(cross_attention_dim=te1.config.hidden_size + te2.config.hidden_size,
                              pooled_dim=te2.config.projection_dim)
        vae = tiny_sdxl_vae()
    return dict(unet=unet, text_encoder=te1, text_encoder_2=te2, vae=vae, tokenizer=tokenizer, tokenizer_2=tokenizer_2)


def te_prefix(encoder: torch.nn.Module, prefix: str) -> str:
    """kohya's CLIP names start at `text_model.`, which transformers 5's CLIPTextModel no longer has."""
    return prefix if hasattr(encoder, "text_model") else f"{prefix}_text_model"


def linears(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def with_lora(sdxl, seed=0):
    """Copies of UNet / te1 / te2 with random LoRA weights, alpha != rank; the UNet's convs get their own
    rank and alpha (LoCon), so loaders must scale per module."""
    unet, te1, te2 = (copy.deepcopy(sdxl[k]) for k in ("unet", "text_encoder", "text_encoder_2"))
    attention = filter_names(linears(unet), only_if_contains=["attn1.to_", "attn2.to_"], ignore_if_contains=None)
    inject_lora(unet, attention, LoraSpec(rank=4, alpha=2), conv_targets=CONVS, conv_spec=LoraSpec(rank=8, alpha=1))
    for te in (te1, te2):  # every Linear: q/k/v/out_proj, mlp fc1/fc2, and te2's text_projection
        inject_lora(te, linears(te), LoraSpec(rank=4, alpha=2))
    gen = torch.Generator().manual_seed(seed)
    for model in (unet, te1, te2):
        for name, p in model.named_parameters():
            if "lora_" in name:  # peft starts lora_B at zero: make every factor count
                p.data = torch.randn(p.shape, generator=gen) * 0.2
    return unet, te1, te2


def with_prefixes(unet, te1, te2):
    return [(unet, "lora_unet"), (te1, te_prefix(te1, "lora_te1")), (te2, te_prefix(te2, "lora_te2"))]


def kohya_file(unet, te1, te2) -> dict[str, torch.Tensor]:
    return {k: v for model, prefix in with_prefixes(unet, te1, te2)
            for k, v in to_kohya(lora_state(model), lora_alphas(model), prefix).items()}


def test_round_trip_is_exact(sdxl):
    models = with_lora(sdxl)
    file = kohya_file(*models)  # one file: each prefix reads back only its own keys
    for model, prefix in with_prefixes(*models):
        state, alphas = from_kohya(file, [n for n, _ in model.named_modules()], prefix)
        assert state.keys() == lora_state(model).keys()
        assert all(torch.equal(state[k], v) for k, v in lora_state(model).items())
        assert alphas == lora_alphas(model)
    assert set(lora_alphas(models[0]).values()) == {1.0, 2.0}  # linear and conv alphas differ


def test_names_shapes_and_alphas_are_kohyas(sdxl):
    unet, te1, te2 = with_lora(sdxl)
    file = kohya_file(unet, te1, te2)
    assert all(KEY.fullmatch(k) for k in file)
    for key in ["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight",
                "lora_unet_up_blocks_0_attentions_1_transformer_blocks_0_attn2_to_out_0.lora_up.weight",
                "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.alpha",
                "lora_unet_down_blocks_0_downsamplers_0_conv.lora_down.weight",
                "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
                "lora_te1_text_model_encoder_layers_1_mlp_fc2.alpha",
                "lora_te2_text_model_encoder_layers_1_self_attn_out_proj.lora_up.weight",
                "lora_te2_text_projection.lora_down.weight"]:
        assert key in file, key
    n_modules = len(lora_alphas(unet)) + len(lora_alphas(te1)) + len(lora_alphas(te2))
    assert len(file) == 3 * n_modules
    for name in CONVS:  # LoCon layout: down is a conv like the base one into the rank, up a 1x1 conv out of it
        conv = sdxl["unet"].get_submodule(name)
        flat = "lora_unet_" + name.replace(".", "_")
        assert file[f"{flat}.lora_down.weight"].shape == (8, conv.in_channels, *conv.kernel_size)
        assert file[f"{flat}.lora_up.weight"].shape == (conv.out_channels, 8, 1, 1)
    assert file["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape[2:] == (3, 3)
    alpha = file["lora_unet_conv_in.alpha"]
    assert alpha.shape == () and alpha.item() == 1.0 and alpha.dtype == torch.float32
    assert file["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha"].item() == 2.0
    half = to_kohya({k: v.bfloat16() for k, v in lora_state(te2).items()}, lora_alphas(te2), "lora_te2")
    assert {v.dtype for v in half.values()} == {torch.bfloat16}


def test_diffusers_sdxl_pipeline_loads_the_file_with_our_outputs(sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    ours = dict(zip(("unet", "text_encoder", "text_encoder_2"), with_lora(sdxl)))
    save_file(kohya_file(*ours.values()), tmp_path / "lora.safetensors")
    pipe = StableDiffusionXLPipeline(
        vae=sdxl["vae"], tokenizer=sdxl["tokenizer"], tokenizer_2=sdxl["tokenizer_2"],
        scheduler=euler_scheduler(num_train_timesteps=1000, beta_end=0.012), add_watermarker=False,
        **{k: copy.deepcopy(sdxl[k]) for k in ("unet", "text_encoder", "text_encoder_2")})
    pipe.load_lora_weights(str(tmp_path), weight_name="lora.safetensors")

    with torch.no_grad():
        for name, tokenizer in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
            ids = sdxl[tokenizer]("a photo of a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
            theirs, mine, base = (m(ids, output_hidden_states=True) for m in (getattr(pipe, name), ours[name], sdxl[name]))
            torch.testing.assert_close(theirs.hidden_states[-2], mine.hidden_states[-2])  # what SDXL conditions on
            torch.testing.assert_close(theirs[0], mine[0])  # te1: last hidden state; te2: pooled text_embeds
            assert not torch.allclose(mine[0], base[0], atol=1e-3)

        gen, config = torch.Generator().manual_seed(1), sdxl["unet"].config
        inputs = dict(sample=torch.randn(2, 4, 8, 8, generator=gen), timestep=torch.tensor([10, 700]),
                      encoder_hidden_states=torch.randn(2, 7, config.cross_attention_dim, generator=gen),
                      added_cond_kwargs={"text_embeds": torch.randn(2, sdxl["text_encoder_2"].config.projection_dim,
                                                                    generator=gen),
                                         "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)})
        theirs, mine, base = (m(**inputs).sample for m in (pipe.unet, ours["unet"], sdxl["unet"]))
    torch.testing.assert_close(theirs, mine)
    assert not torch.allclose(mine, base, atol=1e-3)


def test_from_kohya_reads_other_tools_files_and_rejects_what_it_cannot_place():
    model = torch.nn.Sequential()
    model.add_module("to_out", torch.nn.ModuleList([torch.nn.Linear(4, 4)]))
    model.add_module("to_out_1", torch.nn.Linear(4, 4))
    names = [n for n, _ in model.named_modules()]
    down, up = torch.randn(2, 4), torch.randn(4, 2)
    file = {"lora_unet_to_out_0.lora_down.weight": down, "lora_unet_to_out_0.lora_up.weight": up,  # no alpha
            "lora_te1_whatever.lora_down.weight": down}  # another prefix: not ours to read
    state, alphas = from_kohya(file, names, "lora_unet")
    assert state.keys() == {"to_out.0.lora_A.weight", "to_out.0.lora_B.weight"}
    assert alphas == {"to_out.0": 2.0}  # kohya's default: alpha = rank, scale 1

    with pytest.raises(ValueError, match="lora_unet_to_in"):
        from_kohya({**file, "lora_unet_to_in.lora_down.weight": down}, names, "lora_unet")
    with pytest.raises(ValueError, match="lora_up"):
        from_kohya({"lora_unet_to_out_1.lora_down.weight": down}, names, "lora_unet")
    with pytest.raises(ValueError, match="no .lora_down"):
        from_kohya({**file, "lora_unet_to_out_1.alpha": torch.tensor(1.0)}, names, "lora_unet")
    with pytest.raises(ValueError, match="not a LoRA, DoRA, LoHa or LoKr tensor"):
        from_kohya({**file, "lora_unet_to_out_0.oft_blocks": up}, names, "lora_unet")
    with pytest.raises(ValueError, match="incomplete LoHa/LoKr"):
        from_kohya({"lora_unet_to_out_1.hada_w1_a": up}, names, "lora_unet")
    dora, _ = from_kohya({**file, "lora_unet_to_out_0.dora_scale": up[:, :1]}, names, "lora_unet")
    assert torch.equal(dora["to_out.0.dora_scale"], up[:, :1])  # DoRA's magnitude travels with its module
    clash = torch.nn.Sequential()
    clash.add_module("a_b", torch.nn.ModuleDict({"c": torch.nn.Linear(4, 4)}))
    clash.add_module("a", torch.nn.ModuleDict({"b_c": torch.nn.Linear(4, 4)}))
    with pytest.raises(ValueError, match="more than one module"):
        from_kohya({"lora_unet_a_b_c.lora_down.weight": down}, [n for n, _ in clash.named_modules()], "lora_unet")
    with pytest.raises(ValueError, match="no alpha"):
        to_kohya({"to_out.0.lora_A.weight": down, "to_out.0.lora_B.weight": up}, {}, "lora_unet")
