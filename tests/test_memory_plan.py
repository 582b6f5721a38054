"""The memory plan: its estimate against peaks measured on an H200 for full-size FLUX.1 (a meta-device model,
no weights), the settings it picks for a card's budget, and the config keys that ask for block swap."""
from __future__ import annotations

import pytest
import torch
from diffusers import FluxTransformer2DModel

from eridiffusion import cli
from eridiffusion.archs.blockwise import block_units
from eridiffusion.archs.flux import Flux
from eridiffusion.archs.flux.formats import known_flux_configs
from eridiffusion.config import parse_config
from eridiffusion.train.memory import (_ATTENTION_OPS, FULL_CANDIDATES, ModelSize, estimate, lora_state_bytes, make_plan,
                                       quantized_candidates, swap_request)
from torch.utils._python_dispatch import TorchDispatchMode

from .conftest import train_config

GIB = 2**30
# bench/RESULTS.md: torch.cuda.max_memory_allocated of bench/lora_step.py flux (1024², bs 1, rank 16), and the
# reference step's no-checkpointing figure; the estimate adds a 1.5 GiB reserve for the CUDA context
MEASURED = {(None, 0, True): 25.56, ("float8", 0, True): 14.65, ("float8", 16, True): 12.67, (None, 0, False): 56.5}


@pytest.fixture(scope="module")
def flux_size():
    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(known_flux_configs()["flux-dev"])
    return ModelSize.of(model, block_units(model, Flux.block_lists), Flux.quantize_exclude)


def kw(size, budget_gib):
    return dict(budget=budget_gib * GIB, tokens=64 * 64 + 512, batch=1, lora_bytes=lora_state_bytes(size, 16))


@pytest.mark.parametrize("settings", sorted(MEASURED, key=str))
def test_estimate_is_close_to_what_was_measured_and_never_below(flux_size, settings):
    peak = estimate(flux_size, *settings, **kw(flux_size, 24)).expected_peak / GIB
    assert MEASURED[settings] <= peak <= MEASURED[settings] * 1.15 + 0.5


def test_plan_picks_the_fastest_settings_that_fit(flux_size):
    card = make_plan(flux_size, **kw(flux_size, 22.5))  # a 24 GB card after the CUDA context
    assert (card.storage, card.swap_blocks, card.checkpointing) == ("float8", 0, True)
    # the room left keeps blocks whole (no recompute); fp8 matmuls save no dequantized weights, so more fit
    assert 0 < card.whole_blocks < 57 and card.expected_peak <= 22.5 * GIB
    assert estimate(flux_size, "float8", 0, True, whole=card.whole_blocks + 1, **kw(flux_size, 22.5)).expected_peak > 22.5 * GIB
    fp8 = make_plan(flux_size, **kw(flux_size, 22.5), fp8_matmul=True)
    assert fp8.whole_blocks > card.whole_blocks and "but for the first" in fp8.line()
    # fp8 matmuls are float8's: an nf4 block kept whole still saves its dequantized weights
    nf4 = [estimate(flux_size, "nf4", 0, True, whole=6, fp8_matmul=f, **kw(flux_size, 24)).expected_peak for f in (False, True)]
    assert nf4[0] == nf4[1]
    small = make_plan(flux_size, **kw(flux_size, 12))
    assert small.storage == "float8" and 0 < small.swap_blocks < 57 and small.expected_peak <= 12 * GIB
    fewer = make_plan(flux_size, **kw(flux_size, 10))
    assert fewer.swap_blocks > small.swap_blocks
    big = make_plan(flux_size, **kw(flux_size, 80))
    assert (big.storage, big.swap_blocks, big.checkpointing) == (None, 0, False)
    hopeless = make_plan(flux_size, **kw(flux_size, 2))
    assert hopeless.expected_peak > 2 * GIB and "nothing fits" in hopeless.line()
    assert "expected peak" in card.line() and '"storage": "float8"' in card.to_json()


# bench/RESULTS.md: float8 base with fp8 matmuls, the first K blocks not checkpointed (bench/lora_step.py --keep K)
MEASURED_WHOLE = {6: 17.47, 12: 20.5}


@pytest.mark.parametrize("whole", sorted(MEASURED_WHOLE))
def test_estimate_of_blocks_kept_whole(flux_size, whole):
    peak = estimate(flux_size, "float8", 0, True, whole=whole, fp8_matmul=True, **kw(flux_size, 24)).expected_peak / GIB
    assert MEASURED_WHOLE[whole] <= peak <= MEASURED_WHOLE[whole] * 1.15 + 0.5


def test_plan_for_a_unet_turns_checkpointing_off_where_it_fits():
    """A model without block lists (SDXL's UNet) is estimated as a whole: measured 6.18 GiB checkpointed, 11.62
    without (1024², bs 1, rank 16); on a 24 GB card the plan drops checkpointing (0.39x the reference's step)."""
    from diffusers import UNet2DConditionModel

    from eridiffusion.archs.sdxl import SDXL

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(SDXL_UNET)
    size = ModelSize.of(unet, [], SDXL.quantize_exclude)
    args = dict(budget=24 * GIB, tokens=64 * 64 + 512, batch=1, lora_bytes=lora_state_bytes(size, 16))
    for ckpt, measured in ((True, 6.18), (False, 11.62)):
        peak = estimate(size, None, 0, ckpt, **args).expected_peak / GIB
        assert measured <= peak <= measured * 1.15 + 0.5
    plan = make_plan(size, **{**args, "budget": 22.5 * GIB})
    assert (plan.storage, plan.checkpointing, plan.whole_blocks) == (None, False, 0)
    assert make_plan(size, **{**args, "budget": 10 * GIB}).checkpointing


SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280), layers_per_block=2,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=2048,
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)


def test_wan14b_long_clip_plan_keeps_block_inputs_in_host_memory():
    """Wan 2.1 14B at 832x480x81 (21 x 30 x 52 latent patches + 512 text tokens): its 40 checkpointed block inputs
    alone are 13 GiB, so on a 24 GB card no storage or swap count fits until the inputs wait in host memory; at
    480x272x41 block swap alone fits."""
    from diffusers import WanTransformer3DModel

    from eridiffusion.archs.wan21 import Wan21
    from eridiffusion.archs.wan21.formats import known_configs

    with torch.device("meta"):
        model = WanTransformer3DModel.from_config(known_configs()["wan2.1-t2v-14b"]["transformer"])
    size = ModelSize.of(model, block_units(model, Wan21.block_lists), Wan21.quantize_exclude)
    args = dict(budget=22.5 * GIB, batch=1, lora_bytes=lora_state_bytes(size, 16))
    long = make_plan(size, tokens=21 * 30 * 52 + 512, **args)
    assert long.offload_activations and long.storage == "float8" and long.checkpointing
    assert long.expected_peak <= 22.5 * GIB and "host memory" in long.line()
    assert estimate(size, "float8", len(size.blocks), True, tokens=21 * 30 * 52 + 512, **args).expected_peak > 22.5 * GIB
    short = make_plan(size, tokens=11 * 17 * 30 + 512, **args)
    assert not short.offload_activations and short.storage == "float8" and short.expected_peak <= 22.5 * GIB


class AttentionCount(TorchDispatchMode):
    """Counts the attention kernels that run (a kept output served from selective checkpointing's cache never
    reaches this mode)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func in _ATTENTION_OPS
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("whole,offload,keep", [(1, False, False), (0, True, False), (0, False, True)])
def test_blocks_kept_whole_offloaded_or_keeping_attention_give_the_same_gradients(tiny_flux, whole, offload, keep):
    """Checkpointing all blocks, all but the first, all with their inputs in host memory, or all keeping their
    attention outputs: the same LoRA gradients, bit for bit; kept attention runs once per block, not twice."""
    from eridiffusion.adapters import LoraSpec, inject_lora
    from eridiffusion.train.memory import enable_checkpointing

    from .test_quant import inputs

    grads, attention = [], []
    for whole, offload, keep in ((0, False, False), (whole, offload, keep)):
        model = FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer", local_files_only=True).train()
        params = inject_lora(model, [n for n, m in model.named_modules() if n.endswith("attn.to_q")], LoraSpec(rank=4, alpha=4), seed=0)
        for p in params:  # B starts at zero: give the LoRA something to pass on
            torch.nn.init.normal_(p.data, std=0.1, generator=torch.Generator().manual_seed(p.numel()))
        blocks = [model.get_submodule(b) for b in block_units(model, Flux.block_lists)]
        enable_checkpointing(model, whole=blocks[:whole], offload=offload, keep_attention=keep)
        runs = {0: 0, -1: 0}  # a checkpointed block runs twice (forward, recompute), a whole one once
        for i in runs:
            blocks[i].register_forward_pre_hook(lambda m, a, i=i: runs.__setitem__(i, runs[i] + 1))
        with AttentionCount() as count:
            model(**inputs())[0].square().mean().backward()
        assert runs == {0: 1 if whole else 2, -1: 2}
        grads.append([p.grad for p in params])
        attention.append(count.n)
    assert all(torch.equal(a, b) for a, b in zip(*grads)) and any(g.abs().sum() > 0 for g in grads[0])
    assert attention == [2 * len(blocks), len(blocks) if keep else 2 * len(blocks) - whole]


def test_swap_keys(tiny_flux, dataset, tmp_path):
    def proc(**model):
        return parse_config(train_config(tiny_flux, dataset, tmp_path, model=model)).config.process[0]

    assert swap_request(proc(), 57) == 0
    assert swap_request(proc(layer_offloading=True), 57) == 57
    assert swap_request(proc(layer_offloading=True, layer_offloading_transformer_percent=0.5), 57) == 29
    assert swap_request(proc(swap_blocks=10, layer_offloading=True), 57) == 10  # the count wins
    with pytest.raises(ValueError, match="57 repeated blocks"):
        swap_request(proc(swap_blocks=60), 57)


def test_block_swap_and_offloaded_inputs_runs_match_a_plain_run(tiny_flux, dataset, tmp_path, write_config):
    from safetensors.torch import load_file

    runs = (("plain", {}, {}), ("swapped", {"swap_blocks": 2}, {}),
            ("offloaded", {"swap_blocks": 1}, {"gradient_checkpointing_cpu_offload": True}),
            ("kept", {}, {"gradient_checkpointing_keep_attention": True}))
    for name, model, train in runs:
        cfg = train_config(tiny_flux, dataset, tmp_path / name, steps=4, model=model, train=train)
        assert cli.main([str(write_config(cfg, f"{name}.yaml"))]) == 0
    a = load_file(tmp_path / "plain" / "test_lora" / "test_lora.safetensors")
    for name in ("swapped", "offloaded", "kept"):
        b = load_file(tmp_path / name / "test_lora" / "test_lora.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.parametrize("key", [{"model": {"swap_blocks": 1}}, {"train": {"gradient_checkpointing_cpu_offload": True}},
                                 {"train": {"gradient_checkpointing_keep_attention": True}}])
def test_block_swap_or_offload_without_checkpointing_is_a_clear_error(tiny_flux, dataset, tmp_path, write_config, capsys, key):
    cfg = train_config(tiny_flux, dataset, tmp_path / "o", model=key.get("model", {}),
                       train={"gradient_checkpointing": False, **key.get("train", {})})
    assert cli.main([str(write_config(cfg))]) == 1
    assert "gradient_checkpointing: true" in capsys.readouterr().err


def test_plan_for_a_full_fine_tune_never_quantizes_or_swaps(flux_size):
    plan = make_plan(flux_size, **kw(flux_size, 22.5), candidates=FULL_CANDIDATES)
    assert plan.storage is None and plan.swap_blocks == 0 and "nothing fits" in plan.line()  # 12B weights alone: 22 GiB


def test_plan_keeps_the_quantization_the_config_asks_for(flux_size):
    """model.quantize: true with train.memory: auto (ai-toolkit's 24 GB examples set quantize): the base stays
    quantized where bf16 would fit, and the room saved keeps more blocks whole; nf4 asked for is never widened."""
    wide = make_plan(flux_size, **kw(flux_size, 40), fp8_matmul=True)
    assert wide.storage is None
    kept = make_plan(flux_size, **kw(flux_size, 40), fp8_matmul=True, candidates=quantized_candidates("float8"))
    assert kept.storage == "float8" and kept.swap_blocks == 0 and kept.expected_peak <= 40 * GIB
    assert kept.whole_blocks > wide.whole_blocks or not kept.checkpointing
    assert make_plan(flux_size, **kw(flux_size, 40), candidates=quantized_candidates("nf4")).storage == "nf4"
    # int8 asked for: the plan may pick float8 (the same bits, the faster kernels) or nf4 to fit, never bf16
    assert {c[0] for c in quantized_candidates("int8")} == {"float8", "nf4"}
    tight = make_plan(flux_size, **kw(flux_size, 8), candidates=quantized_candidates("float8"))
    assert tight.storage in ("float8", "nf4") and tight.swap_blocks > 0


def test_hidream_plan_for_a_24gb_card_keeps_every_block_checkpointed():
    """bench/RESULTS.md issue 11.6 (H200, 24 GiB cap): float8 with 3 MoE blocks kept whole ran out of memory; float8
    with every block checkpointed peaked at 18.57 GiB. The plan must pick the latter, estimated at or above it."""
    from diffusers import HiDreamImageTransformer2DModel

    from eridiffusion.archs.hidream import HiDream
    from eridiffusion.archs.hidream.formats import known_configs

    with torch.device("meta"):
        model = HiDreamImageTransformer2DModel.from_config(known_configs()["hidream-i1-full"]["transformer"])
    size = ModelSize.of(model, block_units(model, HiDream.block_lists), HiDream.quantize_exclude)
    plan = make_plan(size, **kw(size, 24), keep_whole=HiDream.plan_whole_blocks)
    assert (plan.storage, plan.swap_blocks, plan.checkpointing, plan.whole_blocks) == ("float8", 0, True, 0)
    assert 18.57 <= plan.expected_peak / GIB <= 18.57 * 1.15 + 0.5
    assert make_plan(size, **kw(size, 24)).whole_blocks > 0  # what the estimate alone would have kept whole


def test_kept_attention_with_compile_is_a_clear_error(tiny_flux, dataset, tmp_path, write_config, capsys):
    cfg = train_config(tiny_flux, dataset, tmp_path / "o", model={"compile": True},
                       train={"gradient_checkpointing_keep_attention": True})
    assert cli.main([str(write_config(cfg))]) == 1
    assert "model.compile: false" in capsys.readouterr().err
