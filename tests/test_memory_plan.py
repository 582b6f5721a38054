"""The memory plan: its estimate against peaks measured on an H200 for full-size FLUX.1 (a meta-device model,
no weights), the settings it picks for a card's budget, and the config keys that ask for block swap."""
from __future__ import annotations

import pytest
import torch
from diffusers import FluxTransformer2DModel

from eridiffusion import cli
from eridiffusion.archs.blockwise import block_units
from eridiffusion.archs.flux import Flux
from eridiffusion.archs.flux_formats import known_flux_configs
from eridiffusion.config import parse_config
from eridiffusion.train.memory import ModelSize, estimate, lora_state_bytes, make_plan, swap_request

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
    small = make_plan(flux_size, **kw(flux_size, 12))
    assert small.storage == "float8" and 0 < small.swap_blocks < 57 and small.expected_peak <= 12 * GIB
    fewer = make_plan(flux_size, **kw(flux_size, 10))
    assert fewer.swap_blocks > small.swap_blocks
    big = make_plan(flux_size, **kw(flux_size, 80))
    assert (big.storage, big.swap_blocks, big.checkpointing) == (None, 0, False)
    hopeless = make_plan(flux_size, **kw(flux_size, 2))
    assert hopeless.expected_peak > 2 * GIB and "nothing fits" in hopeless.line()
    assert "expected peak" in card.line() and '"storage": "float8"' in card.to_json()


def test_swap_keys(tiny_flux, dataset, tmp_path):
    def proc(**model):
        return parse_config(train_config(tiny_flux, dataset, tmp_path, model=model)).config.process[0]

    assert swap_request(proc(), 57) == 0
    assert swap_request(proc(layer_offloading=True), 57) == 57
    assert swap_request(proc(layer_offloading=True, layer_offloading_transformer_percent=0.5), 57) == 29
    assert swap_request(proc(swap_blocks=10, layer_offloading=True), 57) == 10  # the count wins
    with pytest.raises(ValueError, match="57 repeated blocks"):
        swap_request(proc(swap_blocks=60), 57)


def test_block_swap_run_matches_an_unswapped_run(tiny_flux, dataset, tmp_path, write_config):
    from safetensors.torch import load_file

    for name, model in (("plain", {}), ("swapped", {"swap_blocks": 2})):
        cfg = train_config(tiny_flux, dataset, tmp_path / name, steps=4, model=model)
        assert cli.main([str(write_config(cfg, f"{name}.yaml"))]) == 0
    a = load_file(tmp_path / "plain" / "test_lora" / "test_lora.safetensors")
    b = load_file(tmp_path / "swapped" / "test_lora" / "test_lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_block_swap_without_checkpointing_is_a_clear_error(tiny_flux, dataset, tmp_path, write_config, capsys):
    cfg = train_config(tiny_flux, dataset, tmp_path / "o", model={"swap_blocks": 1}, train={"gradient_checkpointing": False})
    assert cli.main([str(write_config(cfg))]) == 1
    assert "gradient_checkpointing: true" in capsys.readouterr().err


def test_plan_for_a_full_fine_tune_never_quantizes_or_swaps(flux_size):
    plan = make_plan(flux_size, **kw(flux_size, 22.5), candidates=((None, False, False), (None, True, False)))
    assert plan.storage is None and plan.swap_blocks == 0 and "nothing fits" in plan.line()  # 12B weights alone: 22 GiB
