"""The assistant LoRA: fused per block like diffusers applies a LoRA, taken out by hooks for samples."""
from __future__ import annotations

import copy

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from safetensors.torch import load_file, save_file

from eridiffusion.adapters import LoraSpec, inject_lora, load_lora_state, lora_state
from eridiffusion.adapters.assistant import AssistantLora
from eridiffusion.archs.flux import Flux

TARGETS = ["x_embedder", "transformer_blocks.0.attn.to_q", "transformer_blocks.0.ff.net.2",
           "single_transformer_blocks.0.proj_out", "single_transformer_blocks.0.attn.to_k", "proj_out"]
RANK, ALPHA = 4, 8.0


def tiny_transformer() -> FluxTransformer2DModel:
    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6),
        guidance_embeds=False,
    ).eval()


def run(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        return model(hidden_states=torch.randn(1, 8, 16, generator=g),
                     encoder_hidden_states=torch.randn(1, 4, 32, generator=g),
                     pooled_projections=torch.randn(1, 16, generator=g), timestep=torch.tensor([0.5]),
                     img_ids=torch.zeros(8, 3), txt_ids=torch.zeros(4, 3), return_dict=False)[0]


def write_lora(path, model, names=TARGETS, extra=None):
    """A random LoRA over `names` in the diffusers file layout, as the schnell training adapter ships."""
    g = torch.Generator().manual_seed(2)
    modules = dict(model.named_modules())
    tensors = {}
    for name in names:
        out_f, in_f = modules[name].weight.shape
        tensors[f"transformer.{name}.lora_A.weight"] = torch.randn(RANK, in_f, generator=g) * 0.1
        tensors[f"transformer.{name}.lora_B.weight"] = torch.randn(out_f, RANK, generator=g) * 0.1
        tensors[f"transformer.{name}.alpha"] = torch.tensor(ALPHA)
    save_file({**tensors, **(extra or {})}, str(path))
    return path


def read_assistant(path) -> AssistantLora:
    # lora_from_file reads no state of the instance
    return AssistantLora.from_component_state(Flux.lora_from_file(None, load_file(str(path)))["transformer"], path)


def fuse_block_by_block(assistant: AssistantLora, model) -> int:
    """As a loader does: each block, then each top-level module, under its own name."""
    count = 0
    for child_name, child in model.named_children():
        if isinstance(child, torch.nn.ModuleList):
            count += sum(assistant.fuse_into(block, f"{child_name}.{i}") for i, block in enumerate(child))
        else:
            count += assistant.fuse_into(child, child_name)
    return count


def rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture
def setup(tmp_path):
    model = tiny_transformer()
    path = write_lora(tmp_path / "adapter.safetensors", model)
    original = copy.deepcopy(model)
    assistant = read_assistant(path)
    assert fuse_block_by_block(assistant, model) == len(TARGETS)
    assert assistant.unfused() == []
    return model, original, assistant, path


def test_fusing_block_by_block_matches_diffusers_lora_loading(setup):
    fused, original, _, path = setup
    state, alphas = FluxPipeline.lora_state_dict(str(path), return_alphas=True)
    FluxPipeline.load_lora_into_transformer(state, alphas, transformer=original)
    expected = run(original)
    assert rel(run(tiny_transformer()), expected) > 0.1  # the adapter does change the output
    torch.testing.assert_close(run(fused), expected, atol=1e-5, rtol=1e-5)


def test_removed_gives_back_the_base_and_hooks_go_away(setup):
    fused, original, assistant, _ = setup
    fused_out, original_out = run(fused), run(original)
    with assistant.removed(fused):
        torch.testing.assert_close(run(fused), original_out, atol=1e-5, rtol=1e-5)
    assert torch.equal(run(fused), fused_out)
    assert not any(m._forward_hooks for m in fused.modules())


def test_removed_hooks_the_base_layer_under_a_user_lora(setup):
    fused, original, assistant, _ = setup
    targets = ["transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_k", "proj_out"]
    for m in (fused, original):
        inject_lora(m, targets, LoraSpec(rank=2, alpha=2), seed=0)
    g = torch.Generator().manual_seed(3)
    user = {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in lora_state(fused).items()}  # B != 0
    load_lora_state(fused, user)
    load_lora_state(original, user)
    fused_out = run(fused)
    with assistant.removed(fused):
        assert fused.proj_out.base_layer._forward_hooks and not fused.proj_out._forward_hooks
        torch.testing.assert_close(run(fused), run(original), atol=1e-5, rtol=1e-5)
    assert torch.equal(run(fused), fused_out)


def test_removed_after_fp8_quantization(setup):
    from torchao.quantization import Float8WeightOnlyConfig, quantize_

    fused, original, assistant, _ = setup
    original_out = run(original)
    quantized_original = copy.deepcopy(original)
    quantize_(quantized_original, Float8WeightOnlyConfig())
    quantize_(fused, Float8WeightOnlyConfig())
    assert type(fused.proj_out.weight) is not torch.nn.Parameter  # really a quantized tensor subclass
    fused_out = run(fused)
    with assistant.removed(fused):
        removed_out = run(fused)
    error = rel(removed_out, original_out)
    assert error < 0.1 and error < rel(fused_out, original_out) / 5
    assert error < 2 * rel(run(quantized_original), original_out)  # about what fp8 alone costs
    assert torch.equal(run(fused), fused_out)
    with pytest.raises(ValueError, match="unquantized"):  # fusing must come before quantizing
        AssistantLora({"proj_out": assistant.deltas["proj_out"]}).fuse_into(fused)


def test_unmatched_names_are_reported(tmp_path):
    model = tiny_transformer()
    # a module that does not exist, and one that is not a Linear
    path = write_lora(tmp_path / "a.safetensors", model, names=["proj_out"])
    tensors = load_file(str(path))
    for name in ("transformer_blocks.0.attn.nope", "transformer_blocks.0.norm1"):
        tensors[f"transformer.{name}.lora_A.weight"] = torch.ones(RANK, 32)
        tensors[f"transformer.{name}.lora_B.weight"] = torch.ones(32, RANK)
    save_file(tensors, str(path))
    assistant = read_assistant(path)
    assert fuse_block_by_block(assistant, model) == 1
    assert assistant.unfused() == ["transformer_blocks.0.attn.nope", "transformer_blocks.0.norm1"]
    with pytest.raises(ValueError, match="already fused"):
        assistant.fuse_into(model)
    with pytest.raises(ValueError, match="nope.*not a Linear"):
        with assistant.removed(model):
            pass
    assert not any(m._forward_hooks for m in model.modules())  # hooks placed before the error are gone


def test_scale_without_alpha_is_one(tmp_path):
    model = tiny_transformer()
    path = write_lora(tmp_path / "a.safetensors", model, names=["proj_out"])
    tensors = {k: v for k, v in load_file(str(path)).items() if not k.endswith(".alpha")}
    state = Flux.lora_from_file(None, tensors)["transformer"]
    assert AssistantLora.from_component_state(state, path).deltas["proj_out"][2] == 1.0
    assert read_assistant(path).deltas["proj_out"][2] == ALPHA / RANK


def test_bad_files_name_the_file_and_key(tmp_path):
    model = tiny_transformer()
    path = write_lora(tmp_path / "broken.safetensors", model, names=["proj_out", "x_embedder"])
    tensors = load_file(str(path))
    del tensors["transformer.x_embedder.lora_B.weight"]
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match=r"broken\.safetensors.*'x_embedder' has no lora_B"):
        read_assistant(path)
    with pytest.raises(ValueError, match=r"broken\.safetensors.*'proj_out.lora_down.weight'"):
        AssistantLora.from_component_state({"proj_out.lora_down.weight": torch.ones(4, 4)}, path)
    wrong = AssistantLora({"proj_out": (torch.ones(RANK, 3), torch.ones(3, RANK), 1.0)}, "w.safetensors")
    with pytest.raises(ValueError, match="w.safetensors.*'proj_out' is 3x3"):
        wrong.fuse_into(model)
