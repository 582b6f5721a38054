"""Full fine-tune (no network section): the denoiser's own weights train (filtered by model.only_if_contains),
the single file in the original layout reloads with the trained weights, save_format diffusers writes a folder,
and a resumed run ends where an uninterrupted one does."""
from __future__ import annotations

import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import load_file

from eridiffusion import cli
from eridiffusion.archs.flux.formats import load_flux_single_file
from eridiffusion.train.checkpoint import latest_state, load_state

from .conftest import train_config
from .test_flux_e2e import read_log


def full(tiny_flux, dataset, out, steps, **model):
    cfg = train_config(tiny_flux, dataset, out, steps=steps, sample={"prompts": []},
                       train={"optimizer": "adafactor", "lr": 3e-4, "batch_size": 4}, save={"save_every": 3},
                       model={"only_if_contains": ["transformer.transformer_blocks.", "transformer.single_transformer_blocks."],
                              **model})
    del cfg["config"]["process"][0]["network"]
    return cfg


def test_full_fine_tune_trains_and_saves_a_single_file_and_a_folder(tiny_flux, dataset, tmp_path, write_config):
    cfg = full(tiny_flux, dataset, tmp_path / "out", 12)
    cfg["config"]["process"][0]["save"]["save_format"] = "diffusers"
    assert cli.main([str(write_config(cfg))]) == 0
    run = tmp_path / "out" / "test_lora"
    losses = [r["loss"] for r in read_log(run)]
    assert sum(losses[-4:]) < sum(losses[:4])
    base = FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer", local_files_only=True)
    single = load_flux_single_file(run / "test_lora.safetensors", torch.float32)  # BFL layout, as ComfyUI keeps it
    folder = FluxTransformer2DModel.from_pretrained(run / "test_lora", subfolder="transformer", local_files_only=True)
    a, b, c = base.state_dict(), single.state_dict(), folder.state_dict()
    assert all(torch.equal(b[k], c[k]) for k in a)
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all(k.startswith(("transformer_blocks.", "single_transformer_blocks.")) for k in changed)
    assert (run / "test_lora" / "vae" / "config.json").is_file()  # the rest of the base, beside it


def test_full_fine_tune_resumes_exactly(tiny_flux, dataset, tmp_path, write_config):
    assert cli.main([str(write_config(full(tiny_flux, dataset, tmp_path / "a", 6), "a.yaml"))]) == 0
    assert cli.main([str(write_config(full(tiny_flux, dataset, tmp_path / "b", 3), "b1.yaml"))]) == 0
    assert cli.main([str(write_config(full(tiny_flux, dataset, tmp_path / "b", 6), "b2.yaml"))]) == 0
    a = load_file(tmp_path / "a" / "test_lora" / "test_lora.safetensors")
    b = load_file(tmp_path / "b" / "test_lora" / "test_lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_full_fine_tune_refuses_a_quantized_base(tiny_flux, dataset, tmp_path, write_config, capsys):
    assert cli.main([str(write_config(full(tiny_flux, dataset, tmp_path / "q", 2, quantize=True)))]) == 1
    assert "model.quantize is not supported with a full fine-tune" in capsys.readouterr().err


def test_fused_backward_gives_the_same_weights_and_resumes(tiny_flux, dataset, tmp_path, write_config):
    """Each parameter's AdamW step inside backward (gradients freed at once) is the same math as one AdamW step
    after backward: the same weights, and a resumed fused run ends where an uninterrupted one does."""
    def cfg(out, steps, fused):
        c = full(tiny_flux, dataset, tmp_path / out, steps)
        c["config"]["process"][0]["train"].update(optimizer="adamw", max_grad_norm=0, fused_backward=fused)
        return c

    assert cli.main([str(write_config(cfg("plain", 6, False), "p.yaml"))]) == 0
    assert cli.main([str(write_config(cfg("fused", 6, True), "f.yaml"))]) == 0
    assert cli.main([str(write_config(cfg("resumed", 3, True), "r1.yaml"))]) == 0
    assert cli.main([str(write_config(cfg("resumed", 6, True), "r2.yaml"))]) == 0
    files = [load_file(tmp_path / d / "test_lora" / "test_lora.safetensors") for d in ("plain", "fused", "resumed")]
    base = FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer", local_files_only=True)
    assert any(not torch.equal(files[0][k], v) for k, v in _bfl(base).items())  # it trained
    for other in files[1:]:
        assert all(torch.equal(files[0][k], other[k]) for k in files[0])


def _bfl(model):
    from eridiffusion.archs.flux.formats import diffusers_to_bfl

    return diffusers_to_bfl(model.state_dict())


def test_sdxl_full_fine_tune_file_reloads_in_diffusers(tiny_sdxl, dataset, tmp_path, write_config):
    """The SGM single file of an SDXL full fine-tune reloads through diffusers' own single-file loader with the
    trained UNet weights."""
    from diffusers import UNet2DConditionModel

    cfg = train_config(tiny_sdxl, dataset, tmp_path / "out", arch="sdxl", steps=3, sample={"prompts": []},
                       train={"optimizer": "adamw", "lr": 1e-3}, model={"only_if_contains": ["unet.up_blocks."]})
    del cfg["config"]["process"][0]["network"]
    assert cli.main([str(write_config(cfg))]) == 0
    file = tmp_path / "out" / "test_lora" / "test_lora.safetensors"
    reloaded = UNet2DConditionModel.from_single_file(str(file), config=str(tiny_sdxl), subfolder="unet",
                                                     local_files_only=True)
    base = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet", local_files_only=True)
    state = load_state(latest_state(tmp_path / "out" / "test_lora"))["weights"]
    got, before = reloaded.state_dict(), base.state_dict()
    assert state and all(k.startswith("up_blocks.") for k in state)
    assert all(torch.equal(got[k], w) for k, w in state.items())  # the trained weights, as saved (fp32)
    assert all(torch.equal(got[k], before[k]) for k in before if k not in state)  # the rest untouched
    assert any(not torch.equal(got[k], before[k]) for k in state)


def test_kolors_full_fine_tune_saves_its_unet_as_kolors_ships_it(tmp_path, dataset, write_config):
    from eridiffusion.archs import get_arch_class

    model = get_arch_class("kolors").build_tiny(tmp_path / "kolors")
    cfg = train_config(model, dataset, tmp_path / "out", arch="kolors", steps=2, sample={"prompts": []},
                       train={"optimizer": "adamw", "lr": 1e-3})
    del cfg["config"]["process"][0]["network"]
    assert cli.main([str(write_config(cfg))]) == 0
    from diffusers import UNet2DConditionModel

    saved = load_file(tmp_path / "out" / "test_lora" / "test_lora.safetensors")
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", local_files_only=True)
    assert saved.keys() == unet.state_dict().keys() and "encoder_hid_proj.weight" in saved
    unet.load_state_dict(saved)  # loads as Kolors' own unet weights file
