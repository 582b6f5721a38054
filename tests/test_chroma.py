"""Chroma end to end on a tiny random-weight model: the saved LoRA loads through ChromaPipeline.load_lora_weights with
every key applied and gives the trainer's outputs; cutting each prompt to its unmasked tokens gives what the masked
transformer gives, with gradient checkpointing too; single files in lodestones' layout load with the block counts of
their tensors; a full fine-tune round-trips through that layout; the LoRA tools read and write Chroma's files."""
from __future__ import annotations

import logging
import shutil
import re

import pytest
import torch
from diffusers import ChromaPipeline, ChromaTransformer2DModel
from safetensors.torch import load_file

from eridiffusion import cli
from eridiffusion.adapters import LoraSpec, inject_lora, load_lora_state, lora_state
from eridiffusion.archs.chroma import Chroma
from eridiffusion.archs.chroma.formats import bfl_to_diffusers, diffusers_to_bfl, infer_chroma_config, load_chroma_single_file
from eridiffusion.archs.chroma.tiny import build_tiny_chroma, write_single_file
from eridiffusion.config import parse_config
from eridiffusion.train.checkpoint import latest_state, load_state

from .conftest import train_config

PROMPTS = ["a red circle", "a photo of a dog in the park at sunset"]  # prompts of different lengths


def chroma_config(folder, dataset, out, **kw):
    return train_config(folder, dataset, out, arch="chroma", **kw)


def inputs(arch, batch=2):
    g = torch.Generator().manual_seed(0)
    noisy = torch.randn(batch, 16, 8, 12, generator=g)
    return noisy, torch.tensor([0.3, 0.8][:batch]), arch.encode_prompts(PROMPTS[:batch])


def masked(transformer, noisy, sigma, text):
    """The transformer as ChromaPipeline calls it: every prompt padded to max_text_length, with Chroma's mask (as
    booleans) over the text and the image tokens."""
    b, c, h, w = noisy.shape
    packed = ChromaPipeline._pack_latents(noisy, b, c, h, w)
    embeds = text["prompt_embeds"]
    mask = torch.cat([text["attention_mask"], torch.ones(b, packed.shape[1], dtype=torch.bool)], 1)
    out = transformer(hidden_states=packed, encoder_hidden_states=embeds, timestep=sigma, attention_mask=mask,
                      img_ids=ChromaPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32),
                      txt_ids=torch.zeros(embeds.shape[1], 3), return_dict=False)[0]
    return ChromaPipeline._unpack_latents(out, h * 2, w * 2, 2)


def loaded_arch(model, dataset, tmp_path, **model_keys):
    arch = Chroma(parse_config(chroma_config(model, dataset, tmp_path, model=model_keys)).config.process[0],
                  torch.device("cpu"), torch.float32)
    arch.load()
    return arch


def test_saved_lora_loads_in_diffusers_and_gives_the_trainer_outputs(tiny_chroma, dataset, tmp_path, write_config, caplog):
    from eridiffusion.train.loop import Run

    cfg = chroma_config(tiny_chroma, dataset, tmp_path / "out", steps=2,
                        network={"linear": 4, "linear_alpha": 2, "transformer_only": False})
    assert cli.main([str(write_config(cfg))]) == 0
    run = tmp_path / "out" / "test_lora"
    assert len(list((run / "samples").glob("*.jpg"))) == 2  # step 0 and the end, through ChromaPipeline
    file = run / "test_lora.safetensors"
    saved = load_file(file)
    modules = {k[len("transformer."):].rsplit(".", 2 if ".lora_" in k else 1)[0] for k in saved}
    assert all(k.startswith("transformer.") for k in saved)
    assert {"x_embedder", "context_embedder", "proj_out"} <= modules  # all Linears ComfyUI names, the approximator not
    assert not any(m.startswith("distilled_guidance_layer") for m in modules)

    pipe = ChromaPipeline.from_pretrained(tiny_chroma, local_files_only=True)
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(file)
    assert not [r.getMessage() for r in caplog.records if re.search(r"unexpected keys|missing keys", r.getMessage(), re.I)]
    loaded = {k: v for k, v in pipe.transformer.state_dict().items() if ".lora_" in k}
    assert len(loaded) == 2 * len(modules) == len([k for k in saved if ".lora_" in k])
    for k, v in saved.items():
        if ".lora_" in k:
            assert torch.equal(loaded[k.replace("transformer.", "", 1).replace(".weight", ".default_0.weight")], v)

    # the trainer at its last step, predicting with each prompt cut to its tokens; diffusers' transformer with the
    # LoRA it loaded, called the pipeline's way (padded prompts, masked)
    cfg["config"]["process"][0]["train"]["cache_text_embeddings"] = False
    trainer = Run(parse_config(cfg).config.process[0], {})
    load_lora_state(trainer.components["transformer"].module, load_state(latest_state(run))["lora"]["transformer"])
    noisy, sigma, text = inputs(trainer.arch)
    assert len(set(text["attention_mask"].sum(1).tolist())) == 2
    with torch.no_grad():
        ours = trainer.arch.predict(noisy, sigma, text)
        theirs = masked(pipe.transformer, noisy, sigma, text)
        base = masked(ChromaTransformer2DModel.from_pretrained(tiny_chroma, subfolder="transformer"), noisy, sigma, text)
    assert not torch.allclose(base, ours, atol=1e-4)  # the LoRA changes the output...
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)  # ...and diffusers applies it the same way


def test_mask_is_chromas_and_cut_prompts_train_as_masked_ones_with_checkpointing(tiny_chroma, dataset, tmp_path):
    arch = loaded_arch(tiny_chroma, dataset, tmp_path)
    noisy, sigma, text = inputs(arch)
    ids = arch.pipe.tokenizer(PROMPTS, padding="max_length", max_length=512, return_tensors="pt").attention_mask
    assert torch.equal(text["attention_mask"].sum(1), ids.sum(1) + 1)  # the prompt's tokens and one padding token
    assert text["prompt_embeds"].shape == (2, 512, 32) and text["attention_mask"].dtype == torch.bool
    params = inject_lora(arch.transformer, [n for n, m in arch.transformer.named_modules()
                                            if isinstance(m, torch.nn.Linear) and "blocks." in n], LoraSpec(rank=2, alpha=2), seed=0)
    with torch.no_grad():
        for p in params:
            p.normal_(std=0.05)
    arch.transformer.train()

    def loss_and_grads(predict, checkpointing):
        if checkpointing:
            arch.transformer.enable_gradient_checkpointing()
        else:
            arch.transformer.disable_gradient_checkpointing()
        loss = predict().square().mean()
        return loss.detach(), torch.autograd.grad(loss, params)

    reference = loss_and_grads(lambda: masked(arch.transformer, noisy, sigma, text), checkpointing=False)
    for checkpointing in (False, True):
        loss, grads = loss_and_grads(lambda: arch.predict(noisy, sigma, text), checkpointing)
        torch.testing.assert_close(loss, reference[0])
        for a, b in zip(grads, reference[1]):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    # diffusers' own checkpointing drops the single blocks' mask: with it, the masked call no longer agrees
    assert not torch.allclose(loss_and_grads(lambda: masked(arch.transformer, noisy, sigma, text), True)[0], reference[0])


def test_single_file_loads_with_the_block_counts_of_its_tensors_and_trains(dataset, tmp_path, write_config):
    folder = build_tiny_chroma(tmp_path / "chroma", num_layers=2, num_single_layers=3)
    reference = ChromaTransformer2DModel.from_pretrained(folder, subfolder="transformer", local_files_only=True).state_dict()
    for prefix in ("", "model.diffusion_model."):
        file = write_single_file(folder, tmp_path / f"chroma-unlocked-v50{prefix[:5]}.safetensors", torch.float32, prefix)
        model = load_chroma_single_file(file, torch.float32)
        assert (model.config.num_layers, model.config.num_single_layers, model.config.approximator_layers) == (2, 3, 2)
        assert model.state_dict().keys() == reference.keys() and all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())
    # and the same tensors as diffusers' own single-file converter gives
    bfl = load_file(file)
    assert all(torch.equal(v, reference[k]) for k, v in bfl_to_diffusers(bfl, infer_chroma_config(bfl)).items())

    bf16 = write_single_file(folder, tmp_path / "Chroma1-HD.safetensors")  # bf16, as lodestones ships it
    cfg = chroma_config(bf16, dataset, tmp_path / "out", steps=2, model={"extras_name_or_path": str(folder)})
    assert cli.main([str(write_config(cfg))]) == 0
    assert (tmp_path / "out" / "test_lora" / "test_lora.safetensors").is_file()


def test_wrong_files_are_named(tiny_chroma, tiny_flux, dataset, tmp_path, write_config, capsys):
    from eridiffusion.archs.flux.formats import diffusers_to_bfl as flux_to_bfl
    from safetensors.torch import save_file

    flux = {k: v for k, v in flux_to_bfl(load_file(tiny_flux / "transformer" / "diffusion_pytorch_model.safetensors")).items()}
    save_file(flux, str(tmp_path / "flux1-dev.safetensors"))
    cfg = chroma_config(tmp_path / "flux1-dev.safetensors", dataset, tmp_path / "o1", model={"extras_name_or_path": str(tiny_chroma)})
    assert cli.main([str(write_config(cfg, "a.yaml"))]) == 1
    assert "is not a Chroma transformer" in (err := capsys.readouterr().err) and "FLUX.1 transformer" in err
    # a folder with no T5 at all: refused, saying where Chroma's T5 can come from
    file = write_single_file(tiny_chroma, tmp_path / "chroma.safetensors")
    clip_only = tmp_path / "clip-only"
    shutil.copytree(tiny_flux, clip_only, ignore=shutil.ignore_patterns("text_encoder_2", "tokenizer_2"))
    cfg = chroma_config(file, dataset, tmp_path / "o2", model={"extras_name_or_path": str(clip_only)})
    assert cli.main([str(write_config(cfg, "b.yaml"))]) == 1
    assert "not Chroma's T5" in capsys.readouterr().err


def test_ai_toolkit_names_load_from_the_hf_cache(tiny_chroma, tiny_flux, dataset, tmp_path, monkeypatch, capsys):
    """ai-toolkit's config says `name_or_path: lodestones/Chroma` (the repo's newest chroma-unlocked-vNN file) or
    `lodestones/Chroma/vNN`, and takes T5, VAE and scheduler from ostris/Flex.1-alpha (a Flex.1 folder: its T5 is
    text_encoder_2). Both come from the local HF cache, nothing is downloaded."""
    from .test_sources import fake_cached_repo

    cache = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    one = write_single_file(tiny_chroma, tmp_path / "one.safetensors", torch.float32).read_bytes()
    fake_cached_repo(cache, "lodestones/Chroma", {f"chroma-unlocked-v{v}.safetensors": one for v in (9, 27)})
    flex = {str(f.relative_to(tiny_flux)): f.read_bytes() for f in tiny_flux.rglob("*") if f.is_file()}
    fake_cached_repo(cache, "ostris/Flex.1-alpha", flex)

    arch = loaded_arch("lodestones/Chroma", dataset, tmp_path / "a")
    out = capsys.readouterr().out
    assert "chroma-unlocked-v27.safetensors" in out and "ostris/Flex.1-alpha" in out and "text_encoder_2" in out
    assert arch.text_encoder.config.model_type == "t5"
    reference = loaded_arch(tiny_chroma, dataset, tmp_path / "b")  # the same T5 weights and transformer
    noisy, sigma, text = inputs(arch)
    torch.testing.assert_close(text["prompt_embeds"], reference.encode_prompts(PROMPTS)["prompt_embeds"])
    torch.testing.assert_close(arch.predict(noisy, sigma, text), reference.predict(noisy, sigma, text))

    loaded_arch("lodestones/Chroma/v9", dataset, tmp_path / "c")
    assert "chroma-unlocked-v9.safetensors" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="cached versions: v9, v27"):
        loaded_arch("lodestones/Chroma/v50", dataset, tmp_path / "d")


def test_full_fine_tune_round_trips_through_the_single_file_layout(tiny_chroma, dataset, tmp_path, write_config):
    cfg = chroma_config(tiny_chroma, dataset, tmp_path / "out", steps=3, sample={"prompts": []},
                        train={"optimizer": "adafactor", "lr": 3e-4}, save={"save_every": 3, "save_format": "diffusers"})
    del cfg["config"]["process"][0]["network"]
    assert cli.main([str(write_config(cfg))]) == 0
    run = tmp_path / "out" / "test_lora"
    file = load_file(run / "test_lora.safetensors")
    assert not any(".img_mod." in k or k.startswith(("vector_in", "time_in", "guidance_in")) for k in file)
    base = ChromaTransformer2DModel.from_pretrained(tiny_chroma, subfolder="transformer", local_files_only=True).state_dict()
    single = load_chroma_single_file(run / "test_lora.safetensors", torch.float32).state_dict()
    folder = ChromaTransformer2DModel.from_pretrained(run / "test_lora", subfolder="transformer", local_files_only=True).state_dict()
    assert single.keys() == base.keys() and all(torch.equal(single[k], folder[k]) for k in base)
    changed = {k.split(".")[0] for k in base if not torch.equal(base[k], single[k])}
    assert {"transformer_blocks", "single_transformer_blocks", "distilled_guidance_layer"} <= changed
    back = diffusers_to_bfl(single)
    assert back.keys() == file.keys() and all(torch.equal(back[k], v) for k, v in file.items())


@pytest.fixture(scope="module")
def lora_file(tiny_chroma, tmp_path_factory):
    import shutil

    import yaml

    from eridiffusion.demo import DEMO_DATA_DIR

    tmp = tmp_path_factory.mktemp("chroma-lora")
    data = shutil.copytree(DEMO_DATA_DIR, tmp / "data")
    cfg = chroma_config(tiny_chroma, data, tmp / "out", steps=3, sample={"prompts": []}, train={"lr": 1e-2},
                        network={"linear": 4, "linear_alpha": 8, "transformer_only": False})
    (tmp / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert cli.main([str(tmp / "c.yaml")]) == 0
    return tmp / "out" / "test_lora" / "test_lora.safetensors"


@pytest.mark.parametrize("layout", ["comfy", "kohya"])
def test_lora_converts_to_chromas_bfl_names_and_back(layout, lora_file, tmp_path):
    out, back = tmp_path / f"{layout}.safetensors", tmp_path / "back.safetensors"
    assert cli.main(["lora", "convert", str(lora_file), "--to", layout, "-o", str(out)]) == 0
    assert cli.main(["lora", "convert", str(out), "--to", "diffusers", "-o", str(back)]) == 0
    if layout == "comfy":  # ComfyUI's generic rule: diffusion_model.<a weight of its Chroma model>
        with torch.device("meta"):
            names = {k.rsplit(".", 1)[0] for k in diffusers_to_bfl(ChromaTransformer2DModel().state_dict())}
        assert {k[len("diffusion_model."):].rsplit(".", 2 if ".lora_" in k else 1)[0] for k in load_file(out)} <= names
    original = Chroma.lora_from_file(None, load_file(lora_file))["transformer"]
    returned = Chroma.lora_from_file(None, load_file(back))["transformer"]

    def update(state, m):
        down = state[f"{m}.lora_A.weight"]
        return float(state[f"{m}.alpha"]) / down.shape[0] * state[f"{m}.lora_B.weight"] @ down
    for m in {k.rsplit(".", 2)[0] for k in original if ".lora_A." in k}:
        torch.testing.assert_close(update(returned, m), update(original, m), atol=1e-6, rtol=1e-5)


def test_lora_merges_into_a_single_file(lora_file, tiny_chroma, tmp_path):
    single = write_single_file(tiny_chroma, tmp_path / "chroma.safetensors", torch.float32)
    out = tmp_path / "merged.safetensors"
    assert cli.main(["lora", "merge", "--base", str(single), "--lora", str(lora_file), "-o", str(out)]) == 0
    merged = load_chroma_single_file(out, torch.float32)
    live = ChromaTransformer2DModel.from_pretrained(tiny_chroma, subfolder="transformer", local_files_only=True)
    state = Chroma.lora_from_file(None, load_file(lora_file))["transformer"]
    inject_lora(live, sorted({k.rsplit(".", 2)[0] for k in state if ".lora_A." in k}), LoraSpec(rank=4, alpha=8))
    load_lora_state(live, {k: v for k, v in state.items() if not k.endswith(".alpha")})
    assert lora_state(live)
    g = torch.Generator().manual_seed(0)
    kw = dict(hidden_states=torch.randn(1, 24, 64, generator=g), encoder_hidden_states=torch.randn(1, 5, 32, generator=g),
              timestep=torch.tensor([0.5]), img_ids=torch.zeros(24, 3), txt_ids=torch.zeros(5, 3), return_dict=False)
    with torch.no_grad():
        torch.testing.assert_close(merged(**kw)[0], live(**kw)[0], atol=1e-5, rtol=1e-5)
