"""End to end on a tiny random-weight Wan 2.1 I2V (`model.arch: wan21_i2v`): the conditioning is what
WanImageToVideoPipeline builds from the clip's first frame (mask channels + VAE latents of the frame followed by
zeros, CLIP vision's penultimate states); the CLI trains on clips with falling loss, caching the conditioning with the
latents, and samples a clip from the prompt's --ctrl_img; the LoRA (the image layers included) is in ComfyUI's layout
and WanImageToVideoPipeline.load_lora_weights applies every tensor with the trainer's outputs; an I2V single file in
ComfyUI's layout loads with its config read from the tensors."""
from __future__ import annotations

import logging
import re

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from eridiffusion import cli
from eridiffusion.adapters import LoraSpec, inject_lora, load_lora_state
from eridiffusion.archs.wan21 import Wan21, formats
from eridiffusion.archs.wan21.i2v import Wan21I2V
from eridiffusion.config import parse_config
from eridiffusion.train.checkpoint import latest_state, load_state

from .conftest import train_config
from .test_flux_e2e import read_log
from .test_video_data import frame, write_clip


@pytest.fixture(scope="module")
def tiny_i2v(tmp_path_factory):
    return Wan21I2V.build_tiny(tmp_path_factory.mktemp("models") / "tiny-wan21-i2v")


def i2v_config(folder, dataset, out, **kw):
    return train_config(folder, dataset, out, arch="wan21_i2v", **kw)


def load_arch(folder, **model):
    cfg = i2v_config(folder, folder, folder, model={"name_or_path": str(folder), "arch": "wan21_i2v", **model})
    arch = Wan21I2V(parse_config(cfg).config.process[0], torch.device("cpu"), torch.float32)
    arch.load()
    return arch


def transformer_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(1, 36, 2, 4, 6, generator=g), timestep=torch.tensor([500.0]),
                encoder_hidden_states=torch.randn(1, 512, 32, generator=g),
                encoder_hidden_states_image=torch.randn(1, 17, 16, generator=g), return_dict=False)


def test_conditioning_is_the_pipelines(tiny_i2v):
    from eridiffusion.archs.wan21.i2v import first_frame_mask

    arch = load_arch(tiny_i2v)
    clip = torch.rand(1, 3, 9, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    clip[:, :, 0] = (clip[:, :, 0] * 127.5 + 127.5).round() / 127.5 - 1  # a first frame exact in 8 bits
    parts = arch.encode_images(clip)
    assert parts["latent"].shape == parts["condition"].shape == (1, 16, 3, 4, 6)
    torch.testing.assert_close(parts["latent"], Wan21.encode_images(arch, clip))  # the T2V encoding of the clip
    pipe = arch.pipe
    _, condition = pipe.prepare_latents(clip[:, :, 0], 1, 16, 32, 48, 9, torch.float32, torch.device("cpu"),
                                        torch.Generator().manual_seed(0))
    ours = torch.cat([first_frame_mask(parts["latent"]), parts["condition"]], 1)
    torch.testing.assert_close(ours, condition, atol=1e-5, rtol=1e-5)
    pil = Image.fromarray(((clip[0, :, 0] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())
    torch.testing.assert_close(parts["image_embeds"], pipe.encode_image(pil, torch.device("cpu")))
    assert parts["image_embeds"].shape == (1, 17, 16)  # the penultimate states: 16 patches + class token


def test_trains_on_clips_through_the_cli_and_samples_from_ctrl_img(tiny_i2v, tmp_path, write_config):
    import av

    data = tmp_path / "clips"
    for i, ext in enumerate([".mp4", ".webm"]):
        write_clip(data / f"clip{i}{ext}", 48, 32, 12, invert=bool(i % 2)).with_suffix(".txt").write_text("a moving square")
    start = tmp_path / "start.png"
    frame(0, 48, 32).save(start)
    cfg = i2v_config(tiny_i2v, data, tmp_path / "out", steps=24, save={"save_every": 1000},
                     train={"lr": 1e-2, "timestep_type": "linear", "batch_size": 1},
                     sample={"sample_every": 1000, "width": 48, "height": 32, "fps": 8,
                             "prompts": [f"a moving square --frames 5 --ctrl_img {start}"]})
    cfg["config"]["process"][0]["datasets"][0].update(num_frames=9, resolution=[32])
    assert cli.main([str(write_config(cfg))]) == 0
    run = tmp_path / "out" / "test_lora"
    losses = [r["loss"] for r in read_log(run)]
    assert sum(losses[-6:]) < 0.85 * sum(losses[:6]), losses
    entries = [load_file(p) for p in (data / "_latent_cache").glob("*.safetensors")]
    assert len(entries) == 2 and all(e["latent.condition"].shape == e["latent.latent"].shape
                                     and e["latent.latent"].shape[:2] == (16, 3)  # 9 frames: 3 latent frames
                                     and e["latent.image_embeds"].shape == (17, 16) for e in entries)
    clips = sorted((run / "samples").glob("*.mp4"))
    assert len(clips) == 2
    with av.open(str(clips[-1])) as container:
        assert len(list(container.decode(video=0))) == 5


def test_samples_without_a_start_image_are_refused(tiny_i2v):
    from eridiffusion.archs import SampleRequest

    arch = load_arch(tiny_i2v)
    request = SampleRequest(text=arch.encode_prompts(["a"]), neg_text=None, width=48, height=32, steps=1,
                            guidance_scale=1.0, seed=0)
    with pytest.raises(ValueError, match="ctrl_img"):
        arch.generate(request)


def test_lora_with_image_layers_loads_in_the_i2v_pipeline_with_the_trainers_outputs(tiny_i2v, dataset, tmp_path,
                                                                                    write_config, caplog):
    from diffusers import WanImageToVideoPipeline, WanTransformer3DModel

    cfg = i2v_config(tiny_i2v, dataset, tmp_path / "out", steps=3, network={"linear": 4, "linear_alpha": 8, "transformer_only": False},
                     sample={"sample_every": 1000, "prompts": []})
    assert cli.main([str(write_config(cfg))]) == 0
    run = tmp_path / "out" / "test_lora"
    file = run / "test_lora.safetensors"
    saved = load_file(file)
    modules = {k[len("diffusion_model."):].rsplit(".lora_", 1)[0] for k in saved}
    assert all(k.startswith("diffusion_model.") for k in saved)
    assert {"img_emb.proj.1", "img_emb.proj.3", "blocks.0.cross_attn.k_img", "blocks.1.cross_attn.v_img"} <= modules
    assert len(saved) == 2 * (2 * 12 + 6 + 2)  # (A, B) x (2 blocks x 12 Linears, 6 embedder/head, 2 image embedder)

    pipe = WanImageToVideoPipeline.from_pretrained(tiny_i2v, local_files_only=True)
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(file)
    problems = [r.getMessage() for r in caplog.records if re.search(r"unexpected keys|missing keys", r.getMessage(), re.I)]
    assert not problems
    loaded = {k: v for k, v in pipe.transformer.state_dict().items() if ".lora_" in k}
    assert len(loaded) == len(saved)  # every tensor applied
    for k, v in saved.items():
        assert torch.equal(loaded[formats.to_diffusers(k[len("diffusion_model."):]).replace(".weight", ".default_0.weight")], v)

    ours = WanTransformer3DModel.from_pretrained(tiny_i2v, subfolder="transformer", local_files_only=True)
    inject_lora(ours, sorted(formats.to_diffusers(m) for m in modules), LoraSpec(rank=4, alpha=8))
    load_lora_state(ours, load_state(latest_state(run))["lora"]["transformer"])
    with torch.no_grad():
        expected, got = ours.eval()(**transformer_inputs())[0], pipe.transformer.eval()(**transformer_inputs())[0]
        base = WanTransformer3DModel.from_pretrained(tiny_i2v, subfolder="transformer",
                                                     local_files_only=True)(**transformer_inputs())[0]
    assert not torch.allclose(base, expected, atol=1e-4)  # the LoRA changes the output...
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)  # ...and diffusers applies it the same way


def test_i2v_single_file_loads_with_the_config_read_from_the_tensors(tiny_i2v, tiny_wan21, tmp_path):
    from diffusers import WanTransformer3DModel

    reference = WanTransformer3DModel.from_pretrained(tiny_i2v, subfolder="transformer", local_files_only=True)
    stored = {"model.diffusion_model." + k: v.to(torch.bfloat16)
              for k, v in formats.diffusers_to_original(reference.state_dict()).items()}
    path = tmp_path / "wan2.1_i2v_480p_tiny_bf16.safetensors"
    save_file(stored, str(path))
    arch = load_arch(tiny_i2v, name_or_path=str(path), extras_name_or_path=str(tiny_i2v))
    config = arch.transformer.config
    assert (config.in_channels, config.image_dim, config.added_kv_proj_dim) == (36, 16, 24)
    got = arch.transformer.state_dict()
    for name, value in reference.state_dict().items():
        assert torch.equal(got[name], stored["model.diffusion_model." + formats.to_original(name)].float()), name
    with pytest.raises(ValueError, match="image-to-video.*set model.arch: wan21_i2v"):  # the T2V arch points here
        from .test_wan21 import load_arch as load_t2v
        load_t2v(tiny_wan21, name_or_path=str(path), extras_name_or_path=str(tiny_wan21))
    with pytest.raises(ValueError, match="text-to-video.*set model.arch: wan21"):  # and back
        load_arch(tiny_i2v, name_or_path=str(tiny_wan21))
