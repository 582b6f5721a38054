"""Quantized frozen bases (model.quantize): each storage on the tiny Flux, block-by-block loading, float8
files used as they are, training on a quantized base, and its LoRA file on the unquantized base."""
from __future__ import annotations

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from safetensors.torch import load_file, save_file

from eridiffusion import cli
from eridiffusion.adapters import LoraSpec, inject_lora, load_lora_state
from eridiffusion.archs.blockwise import FrozenBase, folder_readers, materialize, read_units
from eridiffusion.archs.flux import Flux
from eridiffusion.archs.flux.formats import BLOCK_LISTS, diffusers_to_bfl, load_flux_single_file
from eridiffusion.quant import Quantizer, is_quantized, relative_error, storage_of, tensor_bytes, weight_bytes
from eridiffusion.train.checkpoint import latest_state, load_state

from .conftest import train_config
from .test_flux_e2e import read_log

# relative output error of the whole tiny transformer vs full precision, per storage (random weights are
# harder to quantize than trained ones; figures for FLUX.1 full size are in bench/RESULTS.md)
MAX_ERROR = {"float8": 0.08, "int8": 0.02, "nf4": 0.25}


def inputs():
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, 64, 16, generator=g), encoder_hidden_states=torch.randn(1, 12, 32, generator=g),
                pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]),
                img_ids=torch.zeros(64, 3), txt_ids=torch.zeros(12, 3), guidance=torch.tensor([1.0]), return_dict=False)


def plain(tiny_flux):
    return FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer", local_files_only=True).eval()


def blockwise(tiny_flux, base):
    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(FluxTransformer2DModel.load_config(tiny_flux, subfolder="transformer"))
    folder = tiny_flux / "transformer"
    return materialize(model, read_units(folder_readers(folder), BLOCK_LISTS), base, BLOCK_LISTS, str(folder))


def test_blockwise_loading_equals_from_pretrained(tiny_flux):
    ours = blockwise(tiny_flux, FrozenBase(torch.device("cpu"), torch.float32))
    reference = plain(tiny_flux)
    assert ours.state_dict().keys() == reference.state_dict().keys()
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in ours.state_dict().items())


@pytest.mark.parametrize("storage", ["float8", "int8", "nf4"])
def test_each_storage_quantizes_the_blocks_and_keeps_the_exclusions(tiny_flux, storage):
    exclude = [*Flux.quantize_exclude, "*ff_context*"]
    model = blockwise(tiny_flux, FrozenBase(torch.device("cpu"), torch.float32, quantizer=Quantizer(storage, exclude)))
    reference = plain(tiny_flux)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for name, layer in layers.items():
        kept = name.startswith(("x_embedder", "context_embedder", "proj_out", "norm_out", "time_text_embed")) or "ff_context" in name
        assert is_quantized(layer.weight) != kept, name
    # stored at the storage's size: 1 byte a weight for 8 bits, about half a byte for nf4 (plus scales)
    per_weight = {"float8": 1.0, "int8": 1.0, "nf4": 0.5}[storage]
    for name, layer in layers.items():
        if is_quantized(layer.weight):
            assert per_weight <= tensor_bytes(layer.weight) / layer.weight.numel() < per_weight * 1.2 + 0.1, name
    assert weight_bytes(model) < weight_bytes(reference)
    with torch.no_grad():
        error = relative_error(model(**inputs())[0], reference(**inputs())[0])
    assert 0 < error <= MAX_ERROR[storage]


def test_config_qtypes_name_storages():
    assert [storage_of(q) for q in ("qfloat8", "float8", "qint8", "int8", "uint4", "nf4")] == \
        ["float8", "float8", "int8", "int8", "nf4", "nf4"]
    with pytest.raises(ValueError, match="accuracy recovery"):
        storage_of("uint3|ostris/ara.safetensors")


def test_float8_file_is_used_as_it_is(tiny_flux, tmp_path):
    """A ComfyUI *_fp8_e4m3fn file (here scaled fp8) becomes the float8 base without being widened: the
    stored bytes are the file's, with the file's scale."""
    reference = plain(tiny_flux)
    scale = torch.tensor(0.5)
    state = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}
    for k, v in diffusers_to_bfl(reference.state_dict()).items():
        if k.endswith(".weight") and v.dim() == 2:
            state[k] = (v / scale).to(torch.float8_e4m3fn)
            state[k.removesuffix("weight") + "scale_weight"] = scale.clone()
        else:
            state[k] = v
    save_file(state, str(tmp_path / "flux1-tiny_fp8_scaled.safetensors"))
    base = FrozenBase(torch.device("cpu"), torch.float32, quantizer=Quantizer("float8", Flux.quantize_exclude))
    model = load_flux_single_file(tmp_path / "flux1-tiny_fp8_scaled.safetensors", torch.float32, base)
    q = model.single_transformer_blocks[0].proj_out.weight
    assert is_quantized(q) and torch.equal(q.qdata.view(torch.uint8),
                                           state["single_blocks.0.linear2.weight"].view(torch.uint8))
    assert torch.equal(q.scale, torch.full_like(q.scale, 0.5))
    assert not is_quantized(model.x_embedder.weight)  # excluded: widened alone
    with torch.no_grad():
        assert relative_error(model(**inputs())[0], reference(**inputs())[0]) <= MAX_ERROR["float8"]


@pytest.mark.parametrize("qtype", ["qfloat8", "int8", "nf4"])
def test_lora_trained_on_a_quantized_base_works_on_the_full_precision_base(qtype, tiny_flux, dataset, tmp_path,
                                                                         write_config):
    cfg = train_config(tiny_flux, dataset, tmp_path / "out", steps=30, model={"quantize": True, "qtype": qtype},
                       train={"lr": 3e-3, "batch_size": 4}, save={"save_every": 30})
    cfg["config"]["process"][0]["sample"] = None
    assert cli.main([str(write_config(cfg))]) == 0
    run = tmp_path / "out" / "test_lora"
    losses = [r["loss"] for r in read_log(run)]
    assert sum(losses[-8:]) / 8 < sum(losses[:8]) / 8  # it learns on the quantized base

    # the file on the unquantized base, through diffusers' own loader
    pipe = FluxPipeline.from_pretrained(tiny_flux, local_files_only=True)
    pipe.load_lora_weights(str(run / "test_lora.safetensors"))
    # the trainer's model: quantized base + the run's LoRA
    saved = load_file(run / "test_lora.safetensors")
    modules = sorted({k[len("transformer."):].rsplit(".lora_", 1)[0] for k in saved if ".lora_" in k})
    storage = storage_of(qtype)
    ours = blockwise(tiny_flux, FrozenBase(torch.device("cpu"), torch.float32, quantizer=Quantizer(storage, Flux.quantize_exclude)))
    inject_lora(ours, modules, LoraSpec(rank=4, alpha=8))
    load_lora_state(ours, load_state(latest_state(run))["lora"]["transformer"])
    with torch.no_grad():
        on_full, on_quantized, base = pipe.transformer(**inputs())[0], ours(**inputs())[0], plain(tiny_flux)(**inputs())[0]
    assert relative_error(on_full, base) > 0.01  # the LoRA does something...
    assert relative_error(on_quantized, on_full) <= MAX_ERROR[storage]  # ...and the same on either base


def test_unet_base_quantizes_and_trains(tiny_sdxl, dataset, tmp_path, write_config):
    """The same shared code quantizes a UNet (SDXL): its attention/feed-forward Linears are stored in float8,
    the time and micro-conditioning embeddings are kept, and a run trains on it."""
    from eridiffusion.archs.sdxl import SDXL
    from eridiffusion.config import parse_config

    cfg = train_config(tiny_sdxl, dataset, tmp_path / "out", arch="sdxl", steps=3, model={"quantize": True})
    arch = SDXL(parse_config(cfg).config.process[0], torch.device("cpu"), torch.float32)
    arch.load(FrozenBase(torch.device("cpu"), torch.float32, quantizer=Quantizer("float8", SDXL.quantize_exclude)))
    layers = {n: m for n, m in arch.unet.named_modules() if isinstance(m, torch.nn.Linear)}
    assert all(is_quantized(m.weight) for n, m in layers.items() if ".attn1." in n or ".ff." in n)
    assert not any(is_quantized(m.weight) for n, m in layers.items() if n.startswith(("time_embedding", "add_embedding")))
    assert cli.main([str(write_config(cfg))]) == 0
    assert (tmp_path / "out" / "test_lora" / "test_lora.safetensors").is_file()


def test_float8_matmuls_train_close_to_the_dequantizing_path(tiny_flux, dataset, tmp_path, write_config):
    """model.float8_matmul: the float8 layers multiply in fp8 (activations scaled per row); outputs and input
    gradients stay close to full precision, and a run on them learns."""
    from eridiffusion.quant import Float8Matmul, use_float8_matmuls

    model = blockwise(tiny_flux, FrozenBase(torch.device("cpu"), torch.float32, quantizer=Quantizer("float8", Flux.quantize_exclude)))
    reference = plain(tiny_flux)
    assert use_float8_matmuls(model) > 0
    calls = []
    original = Float8Matmul.forward
    Float8Matmul.forward = staticmethod(lambda *a: calls.append(1) or original(*a))
    try:
        with torch.no_grad():
            error = relative_error(model(**inputs())[0], reference(**inputs())[0])
    finally:
        Float8Matmul.forward = staticmethod(original)
    assert calls and 0 < error <= MAX_ERROR["float8"] + 0.02
    cfg = train_config(tiny_flux, dataset, tmp_path / "out", steps=30, train={"lr": 3e-3, "batch_size": 4},
                       model={"quantize": True, "float8_matmul": True}, save={"save_every": 30})
    cfg["config"]["process"][0]["sample"] = None
    assert cli.main([str(write_config(cfg))]) == 0
    losses = [r["loss"] for r in read_log(tmp_path / "out" / "test_lora")]
    assert sum(losses[-8:]) / 8 < sum(losses[:8]) / 8


def test_float8_matmul_input_gradient_is_close():
    """The fp8 backward folds W's row scales into the gradient and multiplies the stored e4m3 rows: the input
    gradient stays within a few percent of full precision, also with one row far larger than the rest."""
    from eridiffusion.quant import Float8Matmul, quantize_weight

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(256, 512, generator=g) * 0.02
    weight[3] *= 50  # per-row scales: one outlier row must not swamp the others
    q = quantize_weight(weight, "float8")
    x = torch.randn(2, 64, 512, generator=g, requires_grad=True)
    grad = torch.randn(2, 64, 256, generator=g)
    Float8Matmul.apply(x, q.qdata, q.scale, None).backward(grad)
    exact = grad @ weight
    assert x.grad.shape == x.shape and x.grad.dtype == x.dtype
    assert 0 < relative_error(x.grad, exact) < 0.05
    # the gradient through the outlier row alone: folding its scale keeps it as exact as the others
    only = torch.zeros_like(grad)
    only[..., 3] = grad[..., 3]
    x.grad = None
    Float8Matmul.apply(x, q.qdata, q.scale, None).backward(only)
    assert relative_error(x.grad, only @ weight) < 0.05
