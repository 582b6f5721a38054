"""End to end on a tiny random-weight Wan 2.1 T2V: the CLI trains with falling loss on images (1-frame videos) and
writes video samples; the LoRA file is in the original (ComfyUI) layout and loads through WanPipeline.load_lora_weights
with every tensor applied and the trainer's outputs; `trainer lora convert` round-trips it through diffusers' and
kohya's layouts; original-layout single files (bf16, fp8, ComfyUI scaled fp8) load with their config read from the
tensors and are the layout diffusers' own converter reads; full fine-tunes are saved in it; I2V and VACE files are
refused clearly; the text encoder comes from a ComfyUI-style file in model.model_paths."""
from __future__ import annotations

import io
import logging
import re
import shutil

import av
import pytest
import torch
from safetensors.torch import load_file, save_file

from eridiffusion import cli
from eridiffusion.adapters import LoraSpec, inject_lora, load_lora_state
from eridiffusion.archs.wan21 import Wan21, formats
from eridiffusion.archs.wan21.tiny import write_tiny_wan21_single_file
from eridiffusion.config import parse_config
from eridiffusion.train.checkpoint import latest_state, load_state

from .conftest import train_config
from .test_flux_e2e import read_log

ORIGINAL_LINEAR = re.compile(r"diffusion_model\.blocks\.\d+\.(self_attn\.[qkvo]|cross_attn\.[qkvo]|ffn\.[02])\.lora_[AB]\.weight")


def wan_config(folder, dataset, out, **kw):
    return train_config(folder, dataset, out, arch="wan21", **kw)


def load_arch(tiny_wan21, **model):
    cfg = wan_config(tiny_wan21, tiny_wan21, tiny_wan21, model={"name_or_path": str(tiny_wan21), "arch": "wan21", **model})
    arch = Wan21(parse_config(cfg).config.process[0], torch.device("cpu"), torch.float32)
    arch.load()
    return arch


def transformer_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(1, 16, 2, 4, 6, generator=g), timestep=torch.tensor([500.0]),
                encoder_hidden_states=torch.randn(1, 12, 32, generator=g), return_dict=False)


def test_loss_falls_and_samples_are_clips_or_stills(tiny_wan21, dataset, tmp_path, write_config):
    cfg = wan_config(tiny_wan21, dataset, tmp_path / "out", steps=30, save={"save_every": 1000},
                     train={"lr": 1e-2, "timestep_type": "linear"},
                     sample={"sample_every": 1000, "width": 48, "height": 32, "fps": 8,
                             "prompts": ["[trigger] a red circle --frames 5", "a blue square"]})
    cfg["config"]["process"][0]["datasets"][0]["resolution"] = [32]
    assert cli.main([str(write_config(cfg))]) == 0
    run = tmp_path / "out" / "test_lora"
    losses = [r["loss"] for r in read_log(run)]
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < 0.85 * first, (first, last)
    clips, stills = sorted((run / "samples").glob("*.mp4")), sorted((run / "samples").glob("*.jpg"))
    assert len(clips) == len(stills) == 2  # step 0 and the last step
    with av.open(io.BytesIO(clips[-1].read_bytes())) as container:
        stream = container.streams.video[0]
        frames = list(container.decode(stream))
        assert len(frames) == 5 and (frames[0].width, frames[0].height) == (48, 32) and stream.average_rate == 8


def test_frames_encode_to_the_vae_latent_frames(tiny_wan21):
    arch = load_arch(tiny_wan21)
    clip = torch.rand(1, 3, 9, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert arch.encode_images(clip).shape == (1, 16, 3, 4, 6)
    assert arch.encode_images(clip[:, :, 0]).shape == (1, 16, 1, 4, 6)  # an image: one frame
    with pytest.raises(ValueError, match="4k \\+ 1 frames"):
        arch.encode_images(clip[:, :, :4])
    assert arch.shift.shift == 3.0  # the Wan T2V repos' flow_shift, which training samples with too
    frames = arch.generate(_request(arch, num_frames=5))
    assert len(frames) == 5 and frames[0].size == (48, 32)


def _request(arch, num_frames):
    from eridiffusion.archs import SampleRequest

    return SampleRequest(text=arch.encode_prompts(["a red circle"]), neg_text=None, width=48, height=32, steps=2,
                         guidance_scale=3.0, seed=0, num_frames=num_frames)


def test_saved_lora_is_comfyui_layout_and_loads_in_diffusers_with_the_trainers_outputs(tiny_wan21, dataset, tmp_path,
                                                                                     write_config, caplog):
    from diffusers import WanPipeline, WanTransformer3DModel

    cfg = wan_config(tiny_wan21, dataset, tmp_path / "out", steps=4, network={"linear": 4, "linear_alpha": 8},
                     sample={"sample_every": 1000, "prompts": []})
    assert cli.main([str(write_config(cfg))]) == 0
    run = tmp_path / "out" / "test_lora"
    file = run / "test_lora.safetensors"
    saved = load_file(file)
    # the original Wan names under diffusion_model. (what ComfyUI's Wan models apply), every block's attention and
    # feed-forward, and no `.alpha`: alpha / rank = 2 is inside lora_B
    assert saved and all(ORIGINAL_LINEAR.fullmatch(k) for k in saved), sorted(saved)[:4]
    assert len(saved) == 2 * 2 * 10  # 2 blocks x 10 Linears x (A, B)

    pipe = WanPipeline.from_pretrained(tiny_wan21, local_files_only=True)
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(file)
    problems = [r.getMessage() for r in caplog.records if re.search(r"unexpected keys|missing keys", r.getMessage(), re.I)]
    assert not problems
    loaded = {k: v for k, v in pipe.transformer.state_dict().items() if ".lora_" in k}
    assert len(loaded) == len(saved)  # every tensor applied
    for k, v in saved.items():
        assert torch.equal(loaded[formats.to_diffusers(k[len("diffusion_model."):]).replace(".weight", ".default_0.weight")], v)

    modules = sorted({formats.to_diffusers(k[len("diffusion_model."):].rsplit(".lora_", 1)[0]) for k in saved})
    ours = WanTransformer3DModel.from_pretrained(tiny_wan21, subfolder="transformer", local_files_only=True)
    inject_lora(ours, modules, LoraSpec(rank=4, alpha=8))
    load_lora_state(ours, load_state(latest_state(run))["lora"]["transformer"])
    with torch.no_grad():
        expected, got = ours.eval()(**transformer_inputs())[0], pipe.transformer.eval()(**transformer_inputs())[0]
        base = WanTransformer3DModel.from_pretrained(tiny_wan21, subfolder="transformer",
                                                     local_files_only=True)(**transformer_inputs())[0]
    assert not torch.allclose(base, expected, atol=1e-4)  # the LoRA changes the output...
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)  # ...and diffusers applies it the same way

    # trainer lora convert: diffusers' own layout (which WanPipeline also reads) and kohya's (musubi-tuner's), and back
    for layout, pattern in (("diffusers", r"transformer\.blocks\.\d+\.(attn[12]\.(to_[qkv]|to_out\.0)|ffn\.net\.(0\.proj|2))"
                                          r"\.lora_[AB]\.weight"),
                            ("kohya", r"lora_unet_blocks_\d+_(self_attn|cross_attn|ffn)_\w+\.(lora_(down|up)\.weight|alpha)")):
        out, back = tmp_path / f"{layout}.safetensors", tmp_path / f"{layout}_back.safetensors"
        assert cli.main(["lora", "convert", str(file), "--to", layout, "-o", str(out)]) == 0
        assert cli.main(["lora", "convert", str(out), "--to", "comfy", "-o", str(back), "--arch", "wan21"]) == 0
        converted, again = load_file(out), load_file(back)
        assert all(re.fullmatch(pattern, k) for k in converted), sorted(converted)[:4]
        assert again.keys() == saved.keys() and all(torch.equal(again[k], saved[k]) for k in saved)
        if layout == "diffusers":
            other = WanPipeline.from_pretrained(tiny_wan21, local_files_only=True)
            other.load_lora_weights(out)
            with torch.no_grad():
                torch.testing.assert_close(other.transformer.eval()(**transformer_inputs())[0], expected, atol=1e-5, rtol=1e-5)


def _scaled_fp8(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI's scaled fp8 layout: each Linear weight (2-D) divided by its scale and stored in float8_e4m3fn, with
    `<layer>.scale_weight`, a `scaled_fp8` marker; the rest bf16."""
    out = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    for k, v in state.items():
        if v.dim() == 2 and k.endswith(".weight"):
            scale = v.abs().max().float() / 448
            out[k], out[k[: -len("weight")] + "scale_weight"] = (v.float() / scale).to(torch.float8_e4m3fn), scale
        else:
            out[k] = v.to(torch.bfloat16)
    return out


@pytest.mark.parametrize("kind", ["bf16_prefixed", "fp8", "scaled_fp8"])
def test_single_files_load_with_the_config_read_from_the_tensors(kind, tiny_wan21, tmp_path):
    from diffusers import WanTransformer3DModel

    reference = WanTransformer3DModel.from_pretrained(tiny_wan21, subfolder="transformer", local_files_only=True)
    original = formats.diffusers_to_original(reference.state_dict())
    if kind == "bf16_prefixed":
        stored = {"model.diffusion_model." + k: v.to(torch.bfloat16) for k, v in original.items()}
    elif kind == "fp8":
        stored = {k: v.to(torch.float8_e4m3fn) if v.dim() == 2 else v for k, v in original.items()}
    else:
        stored = _scaled_fp8(original)
    path = tmp_path / "wan2.1_t2v_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in stored.items()}, str(path))
    arch = load_arch(tiny_wan21, name_or_path=str(path), extras_name_or_path=str(tiny_wan21))
    assert arch.transformer.config.num_layers == reference.config.num_layers
    assert arch.transformer.config.ffn_dim == reference.config.ffn_dim
    got = arch.transformer.state_dict()
    for name, value in reference.state_dict().items():
        key = "model.diffusion_model." + formats.to_original(name) if kind == "bf16_prefixed" else formats.to_original(name)
        v = stored[key].float()
        if kind == "scaled_fp8" and key[: -len("weight")] + "scale_weight" in stored:
            v = v * stored[key[: -len("weight")] + "scale_weight"]
        assert torch.equal(got[name], v), name
    assert torch.equal(arch.transformer.rope.freqs_cos, reference.rope.freqs_cos)  # computed, in its own precision
    with torch.no_grad():
        out = arch.transformer(**transformer_inputs())[0]
    assert torch.isfinite(out).all()


def test_original_layout_is_what_diffusers_single_file_loader_reads(tiny_wan21, tmp_path):
    """Our original-layout writer is the inverse of diffusers' own converter (convert_wan_transformer_to_diffusers)."""
    from diffusers import WanTransformer3DModel

    path = write_tiny_wan21_single_file(tiny_wan21, tmp_path / "t.safetensors")
    theirs = WanTransformer3DModel.from_single_file(str(path), config=str(tiny_wan21), subfolder="transformer",
                                                    local_files_only=True)
    reference = WanTransformer3DModel.from_pretrained(tiny_wan21, subfolder="transformer", local_files_only=True)
    a, b = reference.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("extra, message", [({"img_emb.proj.1.weight": (8, 8), "blocks.0.cross_attn.k_img.weight": (24, 8)},
                                             "image-to-video.*set model.arch: wan21_i2v"),
                                            ({"vace_blocks.0.before_proj.weight": (24, 24)}, "VACE.*set model.arch: wan21_vace")])
def test_i2v_and_vace_files_are_refused(extra, message, tiny_wan21, tmp_path):
    path = write_tiny_wan21_single_file(tiny_wan21, tmp_path / "t.safetensors")
    state = {**load_file(path), **{k: torch.zeros(s) for k, s in extra.items()}}
    save_file(state, str(path))
    with pytest.raises(ValueError, match=message):
        load_arch(tiny_wan21, name_or_path=str(path), extras_name_or_path=str(tiny_wan21))


def test_full_fine_tune_saves_the_original_layout(tiny_wan21, dataset, tmp_path, write_config):
    from diffusers import WanTransformer3DModel

    cfg = wan_config(tiny_wan21, dataset, tmp_path / "out", steps=2, sample={"prompts": []},
                     train={"optimizer": "adafactor", "lr": 3e-4}, model={"only_if_contains": ["transformer.blocks."]})
    del cfg["config"]["process"][0]["network"]
    assert cli.main([str(write_config(cfg))]) == 0
    file = tmp_path / "out" / "test_lora" / "test_lora.safetensors"
    saved = load_file(file)
    assert "blocks.0.self_attn.q.weight" in saved and "head.modulation" in saved and "blocks.1.norm3.weight" in saved
    single = load_arch(tiny_wan21, name_or_path=str(file), extras_name_or_path=str(tiny_wan21)).transformer.state_dict()
    base = WanTransformer3DModel.from_pretrained(tiny_wan21, subfolder="transformer", local_files_only=True).state_dict()
    changed = {k for k in base if not torch.equal(base[k], single[k])}
    assert changed and all(k.startswith("blocks.") for k in changed)


@pytest.mark.parametrize("scaled", [False, True])
def test_text_encoder_from_a_comfyui_file(scaled, tiny_wan21, tmp_path):
    """model.model_paths.text_encoder: a UMT5 weights file as ComfyUI's text_encoders/umt5_xxl_fp16.safetensors (the
    encoder in transformers' names) or umt5_xxl_fp8_e4m3fn_scaled.safetensors; the components folder needs only its
    config."""
    from transformers import UMT5EncoderModel

    folder = shutil.copytree(tiny_wan21, tmp_path / "wan")
    file = tmp_path / "umt5_xxl.safetensors"
    encoder = UMT5EncoderModel.from_pretrained(folder / "text_encoder", local_files_only=True)
    state = {k: v.contiguous() for k, v in encoder.state_dict().items() if k != "encoder.embed_tokens.weight"}
    save_file(_scaled_fp8(state) if scaled else state, str(file))
    (folder / "text_encoder" / "model.safetensors").unlink()
    arch = load_arch(folder, model_paths={"text_encoder": str(file)})
    if scaled:
        stored, loaded = _scaled_fp8(state), arch.pipe.text_encoder.state_dict()
        w = "encoder.block.0.layer.0.SelfAttention.q.weight"
        assert torch.equal(loaded[w], stored[w].float() * stored[w[: -len("weight")] + "scale_weight"])
    else:
        expected = load_arch(tiny_wan21).encode_prompts(["a red circle"])["prompt_embeds"]
        torch.testing.assert_close(arch.encode_prompts(["a red circle"])["prompt_embeds"], expected)


@pytest.mark.parametrize("base_kind", ["single_file", "folder"])
def test_lora_merge_into_the_base_as_the_user_keeps_it(base_kind, tiny_wan21, tmp_path):
    from diffusers import WanTransformer3DModel

    g = torch.Generator().manual_seed(0)
    lora = {}
    for name, (out_f, in_f) in {"blocks.0.self_attn.q": (24, 24), "blocks.1.ffn.2": (24, 48)}.items():
        lora[f"diffusion_model.{name}.lora_A.weight"] = torch.randn(4, in_f, generator=g)
        lora[f"diffusion_model.{name}.lora_B.weight"] = torch.randn(out_f, 4, generator=g)
        lora[f"diffusion_model.{name}.alpha"] = torch.tensor(2.0)
    save_file(lora, str(tmp_path / "lora.safetensors"))
    base = write_tiny_wan21_single_file(tiny_wan21, tmp_path / "base.safetensors") if base_kind == "single_file" else tiny_wan21
    out = tmp_path / ("merged.safetensors" if base_kind == "single_file" else "merged")
    assert cli.main(["lora", "merge", "--base", str(base), "--lora", str(tmp_path / "lora.safetensors"), "-o", str(out),
                     "--arch", "wan21"]) == 0
    before = formats.diffusers_to_original(
        WanTransformer3DModel.from_pretrained(tiny_wan21, subfolder="transformer", local_files_only=True).state_dict())
    after = load_file(out) if base_kind == "single_file" else formats.diffusers_to_original(
        WanTransformer3DModel.from_pretrained(out, subfolder="transformer", local_files_only=True).state_dict())
    assert after.keys() == before.keys()
    for name in ("blocks.0.self_attn.q", "blocks.1.ffn.2"):
        delta = 0.5 * lora[f"diffusion_model.{name}.lora_B.weight"] @ lora[f"diffusion_model.{name}.lora_A.weight"]
        torch.testing.assert_close(after[f"{name}.weight"], before[f"{name}.weight"] + delta, atol=1e-5, rtol=1e-5)
    assert torch.equal(after["blocks.0.self_attn.k.weight"], before["blocks.0.self_attn.k.weight"])


def test_trains_on_clips_and_images_through_the_cli(tiny_wan21, tmp_path, write_config):
    """A dataset of short clips of a moving square (and an image, a 1-frame video) with num_frames 9: clips become 3
    latent frames, the image 1, each in its own frame bucket, cached to disk; the loss falls."""
    from .test_video_data import frame, write_clip

    data = tmp_path / "clips"
    for i, ext in enumerate([".mp4", ".webm", ".gif"]):
        write_clip(data / f"clip{i}{ext}", 48, 32, 12, invert=bool(i % 2)).with_suffix(".txt").write_text("a moving square")
    frame(0, 48, 32).save(data / "still.png")
    (data / "still.txt").write_text("a square")
    cfg = wan_config(tiny_wan21, data, tmp_path / "out", steps=24, save={"save_every": 1000},
                     train={"lr": 1e-2, "timestep_type": "linear", "batch_size": 1},
                     sample={"sample_every": 1000, "prompts": []})
    cfg["config"]["process"][0]["datasets"][0].update(num_frames=9, resolution=[32])
    assert cli.main([str(write_config(cfg))]) == 0
    losses = [r["loss"] for r in read_log(tmp_path / "out" / "test_lora")]
    assert sum(losses[-6:]) < 0.85 * sum(losses[:6]), losses
    cached = {load_file(p)["latent"].shape[1] for p in (data / "_latent_cache").glob("*.safetensors")}
    assert cached == {3, 1}  # 9 frames -> 1 + 8 / 4 latent frames; the image one
