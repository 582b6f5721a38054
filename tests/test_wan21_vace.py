"""End to end on a tiny random-weight Wan 2.1 VACE (`model.arch: wan21_vace`): the control input is what
WanVACEPipeline gives its transformer for a control video without a mask; the CLI trains on clips paired with control
clips (control_path) with falling loss, caching the control latents with the clip's, and samples a clip from the
prompt's --ctrl_img; datasets without control_path and samples without ctrl_img are refused; the LoRA (the control
blocks included) is in ComfyUI's layout, and `trainer lora convert --to diffusers` writes a file that
WanVACEPipeline.load_lora_weights applies completely with the trainer's outputs; VACE single files in ComfyUI's layout
(bf16, fp8, scaled fp8) load with their config read from the tensors, and the variants refuse each other's files."""
from __future__ import annotations

import logging
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from eridiffusion import cli
from eridiffusion.adapters import LoraSpec, inject_lora, load_lora_state
from eridiffusion.adapters.inspect import inspect_file
from eridiffusion.archs import SampleRequest
from eridiffusion.archs.wan21 import formats
from eridiffusion.archs.wan21.tiny import write_tiny_wan21_single_file
from eridiffusion.archs.wan21.vace import Wan21VACE
from eridiffusion.config import parse_config
from eridiffusion.data import read_frames
from eridiffusion.data.buckets import to_tensor
from eridiffusion.train.checkpoint import latest_state, load_state

from .conftest import train_config
from .test_flux_e2e import read_log
from .test_video_data import write_clip
from .test_wan21 import _scaled_fp8

# the Linears of the control blocks as ComfyUI's VACE model names them
VACE_LINEAR = re.compile(r"diffusion_model\.vace_blocks\.\d+\.(self_attn\.[qkvo]|cross_attn\.[qkvo]|ffn\.[02]|before_proj"
                         r"|after_proj)\.lora_[AB]\.weight")


@pytest.fixture(scope="module")
def tiny_vace(tmp_path_factory):
    return Wan21VACE.build_tiny(tmp_path_factory.mktemp("models") / "tiny-wan21-vace")


@pytest.fixture
def clips(tmp_path):
    """Two clips of a moving square, each with its control clip (the same motion inverted) under the same stem."""
    data, control = tmp_path / "clips", tmp_path / "control"
    for i, ext in enumerate([".mp4", ".webm"]):
        write_clip(data / f"clip{i}{ext}", 48, 32, 12).with_suffix(".txt").write_text("a moving square")
        write_clip(control / f"clip{i}.mkv", 48, 32, 12, invert=True)
    return data, control


def vace_config(folder, dataset, out, control=None, **kw):
    cfg = train_config(folder, dataset, out, arch="wan21_vace", **kw)
    cfg["config"]["process"][0]["datasets"][0].update(control_path=str(control) if control else None)
    return cfg


def load_arch(folder, **model):
    cfg = vace_config(folder, folder, folder, model={"name_or_path": str(folder), "arch": "wan21_vace", **model})
    arch = Wan21VACE(parse_config(cfg).config.process[0], torch.device("cpu"), torch.float32)
    arch.load()
    return arch


def transformer_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(1, 16, 2, 4, 6, generator=g), timestep=torch.tensor([500.0]),
                encoder_hidden_states=torch.randn(1, 12, 32, generator=g),
                control_hidden_states=torch.randn(1, 96, 2, 4, 6, generator=g), return_dict=False)


def test_control_input_is_what_the_pipeline_gives_its_transformer(tiny_vace, clips):
    """A sample from a control clip (the pipeline's `video`, no mask): the transformer's control_hidden_states equal
    ours from the same frames (encode_images' control latents + the all-ones mask), and its scale is 1."""
    arch = load_arch(tiny_vace)
    path = clips[1] / "clip0.mkv"
    seen = []
    hook = arch.transformer.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs), with_kwargs=True)
    frames = arch.generate(SampleRequest(text=arch.encode_prompts(["a"]), neg_text=None, width=48, height=32, steps=1,
                                         guidance_scale=1.0, seed=0, num_frames=5, ctrl_img=str(path)))
    hook.remove()
    assert len(frames) == 5 and frames[0].size == (48, 32)
    control = torch.stack([to_tensor(f) for f in read_frames(path, list(range(5)))], 1)[None]
    parts = arch.encode_images(control.flip(-1), control)  # the clip itself plays no part in the control
    assert parts["latent"].shape == (1, 16, 2, 4, 6) and parts["control"].shape == (1, 32, 2, 4, 6)
    ours = arch.vace_context(parts["control"])
    assert ours.shape == (1, 96, 2, 4, 6)
    torch.testing.assert_close(seen[0]["control_hidden_states"], ours, atol=1e-5, rtol=1e-5)
    assert torch.equal(seen[0]["control_hidden_states_scale"], torch.ones(2))
    # a control image is a still control video of the clip's frames
    still = arch.encode_images(control, control[:, :, 0])["control"]
    torch.testing.assert_close(still, arch.encode_images(control, control[:, :, :1].expand_as(control))["control"])


def test_trains_on_clips_with_control_clips_through_the_cli(tiny_vace, clips, tmp_path, write_config, capsys):
    import av

    data, control = clips
    cfg = vace_config(tiny_vace, data, tmp_path / "out", control, steps=24, save={"save_every": 1000},
                      train={"lr": 1e-2, "timestep_type": "linear", "batch_size": 1},
                      sample={"sample_every": 1000, "width": 48, "height": 32, "fps": 8,
                              "prompts": [f"a moving square --frames 5 --ctrl_img {control / 'clip1.mkv'}"]})
    cfg["config"]["process"][0]["datasets"][0].update(num_frames=9, resolution=[32])
    assert cli.main([str(write_config(cfg))]) == 0
    run = tmp_path / "out" / "test_lora"
    losses = [r["loss"] for r in read_log(run)]
    assert sum(losses[-6:]) < 0.85 * sum(losses[:6]), losses
    entries = [load_file(p) for p in (data / "_latent_cache").glob("*.safetensors")]
    assert len(entries) == 2 and all(e["latent.latent"].shape[:2] == (16, 3)  # 9 frames: 3 latent frames
                                     and e["latent.control"].shape == (32, *e["latent.latent"].shape[1:]) for e in entries)
    clips_out = sorted((run / "samples").glob("*.mp4"))
    assert len(clips_out) == 2
    with av.open(str(clips_out[-1])) as container:
        assert len(list(container.decode(video=0))) == 5

    cfg["config"]["process"][0]["datasets"][0]["control_path"] = None
    assert cli.main([str(write_config(cfg, "no_control.yaml"))]) == 1
    assert "datasets[0].control_path" in capsys.readouterr().err


def test_samples_without_a_control_are_refused(tiny_vace):
    arch = load_arch(tiny_vace)
    with pytest.raises(ValueError, match="ctrl_img"):
        arch.generate(SampleRequest(text=arch.encode_prompts(["a"]), neg_text=None, width=48, height=32, steps=1,
                                    guidance_scale=1.0, seed=0))


def test_lora_in_comfyui_layout_converts_to_what_the_vace_pipeline_applies(tiny_vace, dataset, tmp_path, write_config,
                                                                            caplog):
    from diffusers import WanVACEPipeline, WanVACETransformer3DModel

    cfg = vace_config(tiny_vace, dataset, tmp_path / "out", dataset, steps=3, network={"linear": 4, "linear_alpha": 8},
                      sample={"sample_every": 1000, "prompts": []})  # each image its own control
    assert cli.main([str(write_config(cfg))]) == 0
    run = tmp_path / "out" / "test_lora"
    file = run / "test_lora.safetensors"
    saved = load_file(file)
    assert all(k.startswith("diffusion_model.") for k in saved)
    vace = {k for k in saved if ".vace_blocks." in k}
    assert vace and all(VACE_LINEAR.fullmatch(k) for k in vace), sorted(vace)[:4]
    # 2 main blocks x 10 Linears, 2 control blocks x 11 (10 + after_proj), block 0's before_proj; x (A, B)
    assert len(saved) == 2 * (2 * 10 + 2 * 11 + 1) and "diffusion_model.vace_blocks.0.before_proj.lora_A.weight" in saved

    out, back = tmp_path / "diffusers.safetensors", tmp_path / "back.safetensors"
    assert cli.main(["lora", "convert", str(file), "--to", "diffusers", "-o", str(out)]) == 0
    assert cli.main(["lora", "convert", str(out), "--to", "comfy", "-o", str(back), "--arch", "wan21_vace"]) == 0
    again = load_file(back)
    assert again.keys() == saved.keys() and all(torch.equal(again[k], saved[k]) for k in saved)
    converted = load_file(out)
    assert "transformer.vace_blocks.0.proj_in.lora_A.weight" in converted
    save_file(converted, str(tmp_path / "no_metadata.safetensors"))
    assert inspect_file(tmp_path / "no_metadata.safetensors").architecture == "wan21_vace (from module names)"

    pipe = WanVACEPipeline.from_pretrained(tiny_vace, local_files_only=True)
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(out)
    problems = [r.getMessage() for r in caplog.records if re.search(r"unexpected keys|missing keys", r.getMessage(), re.I)]
    assert not problems
    loaded = {k: v for k, v in pipe.transformer.state_dict().items() if ".lora_" in k}
    assert len(loaded) == len(converted)  # every tensor applied
    for k, v in converted.items():
        assert torch.equal(loaded[k[len("transformer."):].replace(".weight", ".default_0.weight")], v)

    modules = sorted({formats.to_diffusers(k[len("diffusion_model."):].rsplit(".lora_", 1)[0]) for k in saved})
    ours = WanVACETransformer3DModel.from_pretrained(tiny_vace, subfolder="transformer", local_files_only=True)
    inject_lora(ours, modules, LoraSpec(rank=4, alpha=8))
    load_lora_state(ours, load_state(latest_state(run))["lora"]["transformer"])
    with torch.no_grad():
        expected, got = ours.eval()(**transformer_inputs())[0], pipe.transformer.eval()(**transformer_inputs())[0]
        base = WanVACETransformer3DModel.from_pretrained(tiny_vace, subfolder="transformer",
                                                         local_files_only=True)(**transformer_inputs())[0]
    assert not torch.allclose(base, expected, atol=1e-4)  # the LoRA changes the output...
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)  # ...and diffusers applies it the same way


@pytest.fixture(scope="module")
def vace_4_layers(tmp_path_factory):
    """Control blocks before main blocks 0 and 2 of 4: the spacing the file does not store."""
    return Wan21VACE.build_tiny(tmp_path_factory.mktemp("models") / "vace-4", num_layers=4, vace_layers=[0, 2])


@pytest.mark.parametrize("kind", ["bf16_prefixed", "fp8", "scaled_fp8"])
def test_single_files_load_with_the_config_read_from_the_tensors(kind, vace_4_layers, tiny_vace, tmp_path):
    from diffusers import WanVACETransformer3DModel

    reference = WanVACETransformer3DModel.from_pretrained(vace_4_layers, subfolder="transformer", local_files_only=True)
    original = formats.diffusers_to_original(reference.state_dict())
    assert "vace_blocks.0.before_proj.weight" in original and "vace_blocks.1.after_proj.weight" in original
    prefix = "model.diffusion_model." if kind == "bf16_prefixed" else ""
    stored = {"bf16_prefixed": lambda: {k: v.to(torch.bfloat16) for k, v in original.items()},
              "fp8": lambda: {k: v.to(torch.float8_e4m3fn) if v.dim() == 2 else v for k, v in original.items()},
              "scaled_fp8": lambda: _scaled_fp8(original)}[kind]()
    path = tmp_path / "wan2.1_vace_tiny.safetensors"
    save_file({prefix + k: v.contiguous() for k, v in stored.items()}, str(path))
    # the components folder's transformer has 2 control blocks: the file's 2 of 4 blocks are read from the tensors
    arch = load_arch(tiny_vace, name_or_path=str(path), extras_name_or_path=str(tiny_vace))
    config = arch.transformer.config
    assert (config.num_layers, list(config.vace_layers), config.vace_in_channels) == (4, [0, 2], 96)
    got = arch.transformer.state_dict()
    for name in reference.state_dict():
        key = formats.to_original(name)
        v = stored[key].float()
        if kind == "scaled_fp8" and key[: -len("weight")] + "scale_weight" in stored:
            v = v * stored[key[: -len("weight")] + "scale_weight"]
        assert torch.equal(got[name], v), name


def test_original_layout_is_what_diffusers_single_file_loader_reads(vace_4_layers, tmp_path):
    from diffusers import WanVACETransformer3DModel

    path = write_tiny_wan21_single_file(vace_4_layers, tmp_path / "t.safetensors")
    theirs = WanVACETransformer3DModel.from_single_file(str(path), config=str(vace_4_layers), subfolder="transformer",
                                                        local_files_only=True)
    reference = WanVACETransformer3DModel.from_pretrained(vace_4_layers, subfolder="transformer", local_files_only=True)
    a, b = reference.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_variants_refuse_each_others_models(tiny_vace, tiny_wan21, tmp_path):
    from .test_wan21 import load_arch as load_t2v

    vace_file = write_tiny_wan21_single_file(tiny_vace, tmp_path / "vace.safetensors")
    for source in (vace_file, tiny_vace):  # a single file, a diffusers folder
        with pytest.raises(ValueError, match="VACE model.*set model.arch: wan21_vace"):
            load_t2v(tiny_wan21, name_or_path=str(source), extras_name_or_path=str(tiny_wan21))
    t2v_file = write_tiny_wan21_single_file(tiny_wan21, tmp_path / "t2v.safetensors")
    for source in (t2v_file, tiny_wan21):
        with pytest.raises(ValueError, match="text-to-video.*set model.arch: wan21 "):
            load_arch(tiny_vace, name_or_path=str(source), extras_name_or_path=str(tiny_vace))


@pytest.mark.parametrize("base_kind", ["single_file", "folder"])
def test_lora_merge_into_a_vace_base(base_kind, tiny_vace, tmp_path):
    from diffusers import WanVACETransformer3DModel

    g = torch.Generator().manual_seed(0)
    lora = {}
    for name, (out_f, in_f) in {"vace_blocks.0.before_proj": (24, 24), "vace_blocks.1.ffn.2": (24, 48),
                                "blocks.1.self_attn.q": (24, 24)}.items():
        lora[f"diffusion_model.{name}.lora_A.weight"] = torch.randn(4, in_f, generator=g)
        lora[f"diffusion_model.{name}.lora_B.weight"] = torch.randn(out_f, 4, generator=g)
    save_file(lora, str(tmp_path / "lora.safetensors"))
    base = write_tiny_wan21_single_file(tiny_vace, tmp_path / "base.safetensors") if base_kind == "single_file" else tiny_vace
    out = tmp_path / ("merged.safetensors" if base_kind == "single_file" else "merged")
    assert cli.main(["lora", "merge", "--base", str(base), "--lora", str(tmp_path / "lora.safetensors"), "-o", str(out),
                     "--arch", "wan21_vace"]) == 0
    read = lambda folder: formats.diffusers_to_original(
        WanVACETransformer3DModel.from_pretrained(folder, subfolder="transformer", local_files_only=True).state_dict())
    before, after = read(tiny_vace), load_file(out) if base_kind == "single_file" else read(out)
    assert after.keys() == before.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"vace_blocks.0.before_proj.weight", "vace_blocks.1.ffn.2.weight", "blocks.1.self_attn.q.weight"}
    name = "vace_blocks.0.before_proj"
    delta = lora[f"diffusion_model.{name}.lora_B.weight"] @ lora[f"diffusion_model.{name}.lora_A.weight"]
    torch.testing.assert_close(after[f"{name}.weight"], before[f"{name}.weight"] + delta, atol=1e-5, rtol=1e-5)
