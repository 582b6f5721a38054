"""End to end on a tiny random-weight HiDream-I1: the CLI trains with falling loss; the sampling pipeline steps with
the velocity the loss trains (HiDream's transformer predicts its negative); the LoRA file loads through
HiDreamImagePipeline.load_lora_weights with every tensor applied and gives the trainer's outputs; the MoE experts
are left out when network_kwargs.ignore_if_contains says so; full fine-tunes round-trip through the single-file
layout; Llama comes from llama_model_path; the released variants' shifts are those their schedulers name."""
from __future__ import annotations

import logging
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from eridiffusion import cli
from eridiffusion.adapters import LoraSpec, inject_lora, load_lora_state
from eridiffusion.archs.blockwise import FrozenBase
from eridiffusion.archs.hidream import HiDream, _sample_size_keeping, formats
from eridiffusion.archs.hidream.tiny import build_tiny_hidream
from eridiffusion.config import parse_config
from eridiffusion.train.checkpoint import latest_state, load_state

from .conftest import train_config
from .test_flux_e2e import read_log


def hidream_config(folder, dataset, out, **kw):
    return train_config(folder, dataset, out, arch="hidream", **kw)


@pytest.fixture(scope="module")
def arch(tiny_hidream):
    proc = parse_config(hidream_config(tiny_hidream, tiny_hidream, tiny_hidream)).config.process[0]
    arch = HiDream(proc, torch.device("cpu"), torch.float32)
    arch.load()
    return arch


def test_loss_falls(tiny_hidream, dataset, tmp_path, write_config):
    cfg = hidream_config(tiny_hidream, dataset, tmp_path / "out", steps=60, save={"save_every": 1000},
                         train={"lr": 5e-3, "timestep_type": "linear"}, sample={"sample_every": 1000, "prompts": []})
    assert cli.main([str(write_config(cfg))]) == 0
    losses = [r["loss"] for r in read_log(tmp_path / "out" / "test_lora")]
    first, last = sum(losses[:12]) / 12, sum(losses[-12:]) / 12
    assert last < 0.85 * first, (first, last)


@pytest.mark.parametrize("shape", [(4, 4), (4, 6)])
def test_sampling_steps_with_the_velocity_the_loss_trains(arch, shape):
    """One Euler step of HiDreamImagePipeline from sigma 1 to 0 moves x by -v, v the velocity the loss regresses
    (noise - x0): the pipeline's negation and ours agree. Training mode (where gradients reach the routed experts
    and diffusers returns the patch sequence) predicts what eval mode does, square or padded non-square."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    x = torch.randn(1, 16, *shape, generator=torch.Generator().manual_seed(0))
    text = arch.encode_prompts(["a red circle"])
    cond, sigma = arch._conditioning(text), torch.ones(1)
    with torch.no_grad():
        arch.transformer.eval()
        velocity = arch.predict(x, sigma, cond)
        arch.transformer.train()
        torch.testing.assert_close(arch.predict(x, sigma, cond), velocity, atol=1e-5, rtol=1e-5)
        arch.transformer.eval()
    pipe, scheduler = arch.pipe, arch.pipe.scheduler
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    try:
        h, w = (s * arch.vae_scale_factor for s in shape)
        pipe.default_sample_size = _sample_size_keeping(w, h, arch.vae_scale_factor)
        out = pipe(prompt_embeds_t5=cond["t5"], prompt_embeds_llama3=cond["llama3"], pooled_prompt_embeds=cond["pooled"],
                   width=w, height=h, num_inference_steps=1, guidance_scale=1.0, latents=x.clone(),
                   output_type="latent").images
    finally:
        pipe.scheduler = scheduler
    torch.testing.assert_close(out, x - velocity, atol=1e-5, rtol=1e-5)


def test_saved_lora_loads_in_diffusers_and_matches_the_trainer(tiny_hidream, dataset, tmp_path, write_config, caplog):
    from diffusers import HiDreamImagePipeline, HiDreamImageTransformer2DModel

    cfg = hidream_config(tiny_hidream, dataset, tmp_path / "out", steps=4, network={"linear": 4, "linear_alpha": 8})
    assert cli.main([str(write_config(cfg))]) == 0
    run = tmp_path / "out" / "test_lora"
    assert any((run / "samples").iterdir())  # the previews went through HiDreamImagePipeline
    file = run / "test_lora.safetensors"
    saved = load_file(file)
    # diffusers' names, every block's attention and feed-forwards (the MoE experts too: nothing ignores them here),
    # and no `.alpha` (diffusers refuses it): alpha / rank = 2 is inside lora_B
    assert saved and all(k.startswith(("transformer.double_stream_blocks.", "transformer.single_stream_blocks."))
                         and ".lora_" in k for k in saved)
    assert any(".ff_i.experts.3.w2." in k for k in saved) and any(".ff_i.shared_experts.w1." in k for k in saved)

    pipe = HiDreamImagePipeline.from_pretrained(tiny_hidream, local_files_only=True)
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(file)
    problems = [r.getMessage() for r in caplog.records if re.search(r"unexpected keys|missing keys", r.getMessage(), re.I)]
    assert not problems
    loaded = {k: v for k, v in pipe.transformer.state_dict().items() if ".lora_" in k}
    assert len(loaded) == len(saved)
    for k, v in saved.items():
        assert torch.equal(loaded[k.replace("transformer.", "", 1).replace(".weight", ".default_0.weight")], v)

    modules = sorted({k[len("transformer."):].rsplit(".lora_", 1)[0] for k in saved})
    ours = HiDreamImageTransformer2DModel.from_pretrained(tiny_hidream, subfolder="transformer", local_files_only=True)
    inject_lora(ours, modules, LoraSpec(rank=4, alpha=8))
    load_lora_state(ours, load_state(latest_state(run))["lora"]["transformer"])
    g = torch.Generator().manual_seed(0)
    kw = dict(hidden_states=torch.randn(1, 16, 8, 8, generator=g), timesteps=torch.tensor([500.0]),
              encoder_hidden_states_t5=torch.randn(1, 10, 32, generator=g),
              encoder_hidden_states_llama3=torch.randn(3, 1, 10, 48, generator=g),
              pooled_embeds=torch.randn(1, 64, generator=g), return_dict=False)
    with torch.no_grad():
        expected, got = ours.eval()(**kw)[0], pipe.transformer.eval()(**kw)[0]
        base = HiDreamImageTransformer2DModel.from_pretrained(tiny_hidream, subfolder="transformer",
                                                              local_files_only=True)(**kw)[0]
    assert not torch.allclose(base, expected, atol=1e-4)  # the LoRA changes the output...
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)  # ...and diffusers applies it the same way


def test_moe_experts_are_left_out_as_ignore_if_contains_says(tiny_hidream, dataset, tmp_path, write_config):
    network = {"linear": 4, "linear_alpha": 4, "network_kwargs": {"ignore_if_contains": ["ff_i.experts", "ff_i.gate"]}}
    cfg = hidream_config(tiny_hidream, dataset, tmp_path / "out", steps=1, network=network, sample=None)
    assert cli.main([str(write_config(cfg))]) == 0
    modules = {k.rsplit(".lora_", 1)[0] for k in load_file(tmp_path / "out" / "test_lora" / "test_lora.safetensors")}
    assert not [m for m in modules if ".ff_i.experts." in m]
    # the rest of every feed-forward still trains: the shared experts and the text stream's
    assert {m for m in modules if m.endswith(".ff_i.shared_experts.w1")} and {m for m in modules if ".ff_t." in m}
    assert any(m.endswith("attn1.to_q") for m in modules)


def test_full_fine_tune_round_trips_through_the_single_file_layout(tiny_hidream, dataset, tmp_path, write_config):
    from diffusers import HiDreamImageTransformer2DModel

    cfg = hidream_config(tiny_hidream, dataset, tmp_path / "out", steps=3, sample=None,
                         train={"optimizer": "adafactor", "lr": 3e-4}, save={"save_format": "diffusers"},
                         model={"name_or_path": str(tiny_hidream), "arch": "hidream",
                                "only_if_contains": ["transformer.double_stream_blocks."]})
    del cfg["config"]["process"][0]["network"]
    assert cli.main([str(write_config(cfg))]) == 0
    run = tmp_path / "out" / "test_lora"
    file = run / "test_lora.safetensors"
    folder = HiDreamImageTransformer2DModel.from_pretrained(run / "test_lora", subfolder="transformer", local_files_only=True)
    base = HiDreamImageTransformer2DModel.from_pretrained(tiny_hidream, subfolder="transformer", local_files_only=True)
    assert set(load_file(file)) == set(base.state_dict())  # diffusers' names, bare, as ComfyUI's HiDream files
    prefixed = tmp_path / "prefixed.safetensors"  # ComfyUI / diffusers also read a model.diffusion_model. prefix
    save_file({f"model.diffusion_model.{k}": v for k, v in load_file(file).items()}, str(prefixed))
    for path in (file, prefixed):
        single = formats.load_single_file(path, FrozenBase(torch.device("cpu"), torch.float32),
                                          [HiDreamImageTransformer2DModel.load_config(tiny_hidream / "transformer")])
        assert single.config.llama_layers == base.config.llama_layers
        a, b, c = base.state_dict(), single.state_dict(), folder.state_dict()
        assert all(torch.equal(b[k], c[k]) for k in a)
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all(k.startswith("double_stream_blocks.") for k in changed)

    # a LoRA run from that single file, the rest from the base folder
    cfg = hidream_config(file, dataset, tmp_path / "lora", steps=1, sample=None,
                         model={"name_or_path": str(file), "arch": "hidream", "extras_name_or_path": str(tiny_hidream)})
    assert cli.main([str(write_config(cfg, "lora.yaml"))]) == 0


def test_single_file_of_unknown_shape_says_what_to_set(tiny_hidream, tmp_path):
    file = tmp_path / "hidream.safetensors"
    save_file(load_file(tiny_hidream / "transformer" / "diffusion_pytorch_model.safetensors"), str(file))
    with pytest.raises(ValueError, match="extras_name_or_path to a HiDream diffusers folder"):
        formats.load_single_file(file, FrozenBase(torch.device("cpu"), torch.float32))


def test_llama_from_llama_model_path(tiny_llama, dataset, tmp_path, write_config, capsys):
    model = build_tiny_hidream(tmp_path / "no-llama", with_llama=False)
    assert not (model / "text_encoder_4").exists()
    cfg = hidream_config(model, dataset, tmp_path / "out", steps=1, sample=None,
                         model={"name_or_path": str(model), "arch": "hidream",
                                "model_kwargs": {"llama_model_path": str(tiny_llama)}})
    assert cli.main([str(write_config(cfg))]) == 0
    del cfg["config"]["process"][0]["model"]["model_kwargs"]  # ai-toolkit's default repo, not in this cache
    assert cli.main([str(write_config(cfg, "b.yaml"))]) == 1
    err = capsys.readouterr().err
    assert "unsloth/Meta-Llama-3.1-8B-Instruct" in err and "llama_model_path" in err


def test_released_variants_shift_as_their_schedulers_say():
    import diffusers
    from diffusers import HiDreamImageTransformer2DModel

    configs = formats.known_configs()
    assert {name: formats.static_shift(c["scheduler"]) for name, c in configs.items()} == {
        "hidream-i1-full": 3.0, "hidream-i1-dev": 6.0, "hidream-i1-fast": 3.0}
    for c in configs.values():  # each names a diffusers scheduler that HiDreamImagePipeline steps
        getattr(diffusers, c["scheduler"]["_class_name"]).from_config(c["scheduler"])
    with torch.device("meta"):
        model = HiDreamImageTransformer2DModel.from_config(configs["hidream-i1-full"]["transformer"])
    assert 16.5e9 < sum(p.numel() for p in model.parameters()) < 17.5e9  # "17B"
    assert len(model.double_stream_blocks) == 16 and len(model.single_stream_blocks) == 32


@pytest.mark.parametrize("storage", [None, "int8"])
def test_blockwise_load_equals_from_pretrained_and_quantizes_all_but_the_exclusions(tiny_hidream, storage):
    from diffusers import HiDreamImageTransformer2DModel

    from eridiffusion.quant import Quantizer, is_quantized

    proc = parse_config(hidream_config(tiny_hidream, tiny_hidream, tiny_hidream)).config.process[0]
    arch = HiDream(proc, torch.device("cpu"), torch.float32)
    arch.load(FrozenBase(torch.device("cpu"), torch.float32, quantizer=Quantizer(storage, HiDream.quantize_exclude)))
    reference = HiDreamImageTransformer2DModel.from_pretrained(tiny_hidream, subfolder="transformer", local_files_only=True)
    if storage is None:
        ours = arch.transformer.state_dict()
        assert ours.keys() == reference.state_dict().keys()
        assert all(torch.equal(v, reference.state_dict()[k]) for k, v in ours.items())
        return
    for name, layer in arch.transformer.named_modules():
        if isinstance(layer, torch.nn.Linear):
            kept = name.startswith(("x_embedder", "t_embedder", "p_embedder", "final_layer"))
            assert is_quantized(layer.weight) != kept, name


@pytest.mark.parametrize("cached", [True, False])
def test_transformer_loads_after_the_text_encoders_are_freed(cached, tiny_hidream, dataset, tmp_path, write_config, monkeypatch):
    """Llama-3.1-8B and T5-XXL do not fit a 24 GB card beside the transformer: with cached text embeddings the
    transformer loads once they are cached and the encoders freed; without, the encoders stay and load first."""
    seen = []
    load_denoiser = HiDream.load_denoiser

    def recording(self):
        seen.append([getattr(self.pipe, f"text_encoder{s}") is None for s in ("", "_2", "_3", "_4")])
        load_denoiser(self)
    monkeypatch.setattr(HiDream, "load_denoiser", recording)
    cfg = hidream_config(tiny_hidream, dataset, tmp_path / "out", steps=1, train={"cache_text_embeddings": cached})
    assert cli.main([str(write_config(cfg))]) == 0
    assert seen == [[cached] * 4]

