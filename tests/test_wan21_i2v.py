"""End to end on a tiny random-weight Wan 2.1 I2V (`model.arch: wan21_i2v`): the conditioning is what
WanImageToVideoPipeline builds from the clip's first frame (mask channels + VAE latents of the frame followed by
zeros, CLIP vision's penultimate states); the CLI trains on clips with falling loss, caching the conditioning with the
latents, and samples a clip from the prompt's --ctrl_img; the LoRA (the image layers included) is in ComfyUI's layout
and WanImageToVideoPipeline.load_lora_weights applies every tensor with the trainer's outputs; an I2V single file in
ComfyUI's layout loads with its config read from the tensors; the CLIP vision encoder loads from a file as ComfyUI
keeps it (models/clip_vision/, or open_clip's layout) through model.model_paths.image_encoder, and a wrong file is named;
datasets[].do_i2v is accepted here and refused by text-to-video and image architectures."""
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
    cfg["config"]["process"][0]["datasets"][0].update(num_frames=9, resolution=[32], do_i2v=True)  # as without it
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


# ---- the image encoder from ComfyUI's models/clip_vision/ ---------------------------------------------------------------
def clip_vision_file(folder, path, **extra):
    """The folder's image encoder as ComfyUI's clip_vision_h.safetensors holds it: CLIPVisionModelWithProjection's
    tensors as transformers 4 named them (`vision_model.` + CLIPVisionModel's names, and `visual_projection.weight`)."""
    from transformers import CLIPVisionModel

    encoder = CLIPVisionModel.from_pretrained(folder / "image_encoder", local_files_only=True)
    width = encoder.config.hidden_size
    state = {"vision_model." + k: v for k, v in encoder.state_dict().items()}
    save_file({**state, "visual_projection.weight": torch.randn(8, width), **extra}, str(path))
    return encoder


def random_images(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray(torch.randint(0, 256, (40, 56, 3), generator=g, dtype=torch.uint8).numpy()) for _ in range(n)]


def test_clip_vision_file_through_model_paths_gives_the_folders_embeddings(tiny_i2v, tiny_wan21, tmp_path):
    from eridiffusion.archs.wan21.tiny import write_tiny_wan21_single_file

    clip_vision = tmp_path / "clip_vision_h.safetensors"
    clip_vision_file(tiny_i2v, clip_vision)
    single = write_tiny_wan21_single_file(tiny_i2v, tmp_path / "wan2.1_i2v_480p_tiny.safetensors")
    # ComfyUI's files: the I2V transformer alone, the rest from a text-to-video folder (no image_encoder/ there)
    assert not (tiny_wan21 / "image_encoder").exists() and not (tiny_wan21 / "image_processor").exists()
    model = dict(name_or_path=str(single), extras_name_or_path=str(tiny_wan21), model_paths={"image_encoder": str(clip_vision)})
    arch, reference = load_arch(tiny_i2v, **model), load_arch(tiny_i2v)
    processor = arch.pipe.image_processor  # CLIP's standard preprocessing (the Wan I2V repos') at the model's 32 px
    assert list(processor.image_mean) == [0.48145466, 0.4578275, 0.40821073] and processor.resample == 3  # bicubic
    keys = ("size", "crop_size", "do_center_crop", "image_mean", "image_std", "resample", "rescale_factor")
    assert {k: getattr(processor, k) for k in keys} == {k: getattr(reference.pipe.image_processor, k) for k in keys}
    images = random_images()
    got = arch.pipe.encode_image(images, torch.device("cpu"))
    expected = reference.pipe.encode_image(images, torch.device("cpu"))
    assert got.shape == (2, 17, 16)
    torch.testing.assert_close(got, expected)
    # the latent cache's fingerprint follows the file
    fingerprint = arch.latent_fingerprint
    clip_vision_file(tiny_i2v, clip_vision, **{"vision_model.post_layernorm.weight": torch.zeros(16)})
    assert load_arch(tiny_i2v, **model).latent_fingerprint != fingerprint


def test_clip_vision_in_open_clip_layout_loads_the_same_model(tiny_i2v, tmp_path):
    """open_clip's `visual.` names (q, k, v stacked in in_proj), which ComfyUI's loader also converts; the text tower and
    the projection of a whole CLIP file are dropped."""
    from transformers import CLIPVisionModel

    from eridiffusion.archs.wan21.i2v import load_clip_vision_file

    encoder = CLIPVisionModel.from_pretrained(tiny_i2v / "image_encoder", local_files_only=True)
    sd = encoder.state_dict()
    names = {"embeddings.class_embedding": "class_embedding", "embeddings.patch_embedding.weight": "conv1.weight",
             "embeddings.position_embedding.weight": "positional_embedding", "pre_layrnorm.weight": "ln_pre.weight",
             "pre_layrnorm.bias": "ln_pre.bias", "post_layernorm.weight": "ln_post.weight", "post_layernorm.bias": "ln_post.bias"}
    state = {"visual." + v: sd[k] for k, v in names.items()}
    for i in range(encoder.config.num_hidden_layers):
        layer, block = f"encoder.layers.{i}.", f"visual.transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            state[block + f"attn.in_proj_{kind}"] = torch.cat([sd[layer + f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
            for ours, theirs in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                                 ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                state[block + f"{theirs}.{kind}"] = sd[layer + f"{ours}.{kind}"]
    text_tower = {"token_embedding.weight": torch.randn(10, 16), "transformer.resblocks.0.ln_1.weight": torch.ones(16),
                  "logit_scale": torch.tensor(1.0), "visual.proj": torch.randn(16, 8)}
    path = tmp_path / "open_clip_pytorch_model.safetensors"
    save_file({**state, **text_tower}, str(path))
    loaded = load_clip_vision_file(path, torch.float32, "model.model_paths.image_encoder")
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = loaded(pixels, output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(got, encoder(pixels, output_hidden_states=True).hidden_states[-2])


def test_a_wrong_image_encoder_file_is_named(tiny_i2v, tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel

    clip_l = tmp_path / "clip_l.safetensors"  # a text encoder, as ComfyUI's text_encoders/clip_l.safetensors
    text = CLIPTextModel(CLIPTextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=16))
    save_file({"text_model." + k: v for k, v in text.state_dict().items()}, str(clip_l))
    with pytest.raises(ValueError, match=r"model\.model_paths\.image_encoder: .*clip_l.safetensors holds a text encoder"):
        load_arch(tiny_i2v, model_paths={"image_encoder": str(clip_l)})
    narrow = tmp_path / "clip_vision_vit_l.safetensors"  # a vision tower of another width than the image embedder's
    vision = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=32, num_hidden_layers=3,
                                              num_attention_heads=16, image_size=32, patch_size=8))
    save_file({"vision_model." + k: v for k, v in vision.state_dict().items()}, str(narrow))
    with pytest.raises(ValueError, match=r"model\.model_paths\.image_encoder: .* holds a 3-layer CLIP vision model 32 "
                                         r"wide .* takes 16-wide image states"):
        load_arch(tiny_i2v, model_paths={"image_encoder": str(narrow)})


@pytest.mark.parametrize("arch", ["wan21", "flux"])
def test_do_i2v_is_refused_where_clips_are_not_conditioned_on_their_first_frame(arch, request, dataset, tmp_path,
                                                                                write_config, capsys):
    cfg = train_config(request.getfixturevalue(f"tiny_{arch}"), dataset, tmp_path / "out", arch=arch, steps=1)
    cfg["config"]["process"][0]["datasets"][0]["do_i2v"] = True
    assert cli.main([str(write_config(cfg))]) == 1
    err = capsys.readouterr().err
    assert f"datasets[0].do_i2v: {arch} does not condition on a clip's first frame (model.arch wan21_i2v does)" in err


def test_full_fine_tune_from_comfyui_files_saves_an_i2v_folder(tiny_i2v, tiny_wan21, dataset, tmp_path, write_config):
    """The I2V transformer from a single file, the rest from a text-to-video folder and the image encoder from
    clip_vision_h.safetensors: save_format diffusers writes a folder WanImageToVideoPipeline loads, with the trained
    transformer and the image encoder and processor the run used; the base folder is left as it was."""
    from diffusers import WanImageToVideoPipeline

    from eridiffusion.archs.wan21.tiny import write_tiny_wan21_single_file

    clip_vision = tmp_path / "clip_vision_h.safetensors"
    clip_vision_file(tiny_i2v, clip_vision)
    single = write_tiny_wan21_single_file(tiny_i2v, tmp_path / "wan2.1_i2v_480p_tiny.safetensors")
    index_before = (tiny_wan21 / "model_index.json").read_text()
    cfg = i2v_config(single, dataset, tmp_path / "out", steps=2, sample={"prompts": []},
                     train={"optimizer": "adafactor", "lr": 3e-4},
                     model={"extras_name_or_path": str(tiny_wan21), "model_paths": {"image_encoder": str(clip_vision)},
                            "only_if_contains": ["transformer.blocks."]},
                     save={"save_format": "diffusers"})
    del cfg["config"]["process"][0]["network"]
    assert cli.main([str(write_config(cfg))]) == 0
    run = tmp_path / "out" / "test_lora"
    pipe = WanImageToVideoPipeline.from_pretrained(run / "test_lora", local_files_only=True)
    trained = load_arch(tiny_i2v, name_or_path=str(run / "test_lora.safetensors"),
                        extras_name_or_path=str(tiny_wan21), model_paths={"image_encoder": str(clip_vision)})
    assert all(torch.equal(v, trained.transformer.state_dict()[k]) for k, v in pipe.transformer.state_dict().items())
    images = random_images()
    torch.testing.assert_close(pipe.encode_image(images, torch.device("cpu")),
                               trained.pipe.encode_image(images, torch.device("cpu")))
    assert (tiny_wan21 / "model_index.json").read_text() == index_before
