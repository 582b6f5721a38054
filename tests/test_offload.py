"""Block swap gives bit-identical training to the unswapped model (plain and torchao-quantized frozen weights),
keeps the frozen weights in their host masters, and holds at most two swapped blocks on the device."""
import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from peft import LoraConfig, inject_adapter_in_model

from eridiffusion.train.compile import compile_denoiser
from eridiffusion.train.offload import BlockSwap, swap_count

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_thread():
    # tiny models: one thread is fastest, and stays fast when other processes load the CPUs
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_flux(quantize=None) -> FluxTransformer2DModel:
    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                                   num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
                                   guidance_embeds=False, axes_dims_rope=(4, 6, 6))
    if quantize is not None:
        from torchao.quantization import quantize_

        quantize_(model, quantize())
    model.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "proj_mlp"]), model)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # non-zero, so gradients reach lora_A too
            p.data = torch.randn_like(p) * 0.1
    return model


def blocks(model) -> list[torch.nn.Module]:
    return list(model.transformer_blocks) + list(model.single_transformer_blocks)


def inputs(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    b, c, h, w = 1, 4, 8, 8
    return dict(hidden_states=FluxPipeline._pack_latents(torch.randn(b, c, h, w, generator=g), b, c, h, w),
                encoder_hidden_states=torch.randn(b, 8, 32, generator=g), pooled_projections=torch.randn(b, 16, generator=g),
                timestep=torch.rand(b, generator=g), img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, CPU, torch.float32),
                txt_ids=torch.zeros(8, 3), return_dict=False)


def steps(model, n=2, checkpointing=True):
    """Loss and LoRA gradients of each of `n` optimizer steps, so later steps run on updated weights."""
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    lora = {name: p for name, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(lora.values(), lr=1e-2)
    for step in range(n):
        loss = model(**inputs(step))[0].square().mean()
        loss.backward()
        yield loss.detach(), {name: p.grad.clone() for name, p in lora.items()}
        opt.step()
        opt.zero_grad()


def train(model, n=2, checkpointing=True):
    return list(steps(model, n, checkpointing))


def assert_identical(got, expected):
    for (loss, grads), (ref_loss, ref_grads) in zip(got, expected, strict=True):
        assert torch.equal(loss, ref_loss)
        assert grads.keys() == ref_grads.keys() and all(g.any() for g in grads.values())  # lora_A's too
        for name in grads:
            assert torch.equal(grads[name], ref_grads[name]), name


def float8():
    from torchao.quantization import Float8WeightOnlyConfig

    return Float8WeightOnlyConfig()


def int8():
    from torchao.quantization import Int8WeightOnlyConfig

    return Int8WeightOnlyConfig()


@pytest.mark.parametrize("quantize,n_swapped", [(None, 4), (None, 3), (float8, 4), (int8, 2)])
def test_training_is_bit_identical(quantize, n_swapped):
    expected = train(tiny_flux(quantize))
    model = tiny_flux(quantize)
    swap = BlockSwap(blocks(model), n_swapped, CPU)
    swap.attach()
    assert_identical(train(model), expected)
    assert swap.max_resident == min(2, n_swapped)
    assert swap.copies == 2 * (2 * n_swapped - 1)  # each block copied once a pass, the last one kept for backward


def frozen(block) -> dict[str, torch.Tensor]:
    return {f"{path}.{name}": t for path, m in block.named_modules() for name, t in {**m._parameters, **m._buffers}.items()
            if t is not None and not t.requires_grad}


def data(t: torch.Tensor) -> torch.Tensor:
    return t.qdata if hasattr(t, "qdata") else t  # a Float8Tensor's payload


def test_frozen_weights_live_in_host_masters():
    model = tiny_flux(float8)
    swap = BlockSwap(blocks(model), 3, CPU)
    before = [{k: data(t).clone() for k, t in frozen(b).items()} for b in swap.swapped]
    lora = {n: p.data_ptr() for n, p in model.named_parameters() if p.requires_grad}
    swap.attach()
    masters = [frozen(b) for b in swap.swapped]
    assert any(k.endswith("base_layer.weight") for k in masters[0])  # the frozen weight under peft's LoRA wrapper

    seen = []  # from inside each swapped block's forward: (block, all its frozen tensors are fresh copies)

    def spy(i):
        def hook(block, args):
            now = frozen(block)
            seen.append((i, all(now[k] is not t and data(now[k]).data_ptr() != data(t).data_ptr()
                                for k, t in masters[i].items())))
        return hook

    for i, block in enumerate(swap.swapped):
        block.register_forward_pre_hook(spy(i))  # runs after the swap's own hook
    train(model)
    assert seen == [(i, True) for i in [0, 1, 2, 2, 1, 0] * 2]  # forward, then the recompute in reverse
    assert swap.max_resident == 2
    for block, master, old in zip(swap.swapped, masters, before, strict=True):
        now = frozen(block)
        assert now.keys() == master.keys() and all(now[k] is master[k] for k in now)  # host masters between steps
        assert all(torch.equal(data(now[k]), old[k]) for k in now)  # never written back to
    assert lora == {n: p.data_ptr() for n, p in model.named_parameters() if p.requires_grad}  # never moved


def test_memory_plan_bytes():
    model = tiny_flux()
    swap = BlockSwap(blocks(model), 3, CPU)
    per_block = [sum(t.numel() * t.element_size() for t in frozen(b).values()) for b in blocks(model)]
    assert (swap.resident_bytes, swap.host_bytes) == (per_block[0], sum(per_block[1:]))
    fp8 = BlockSwap(blocks(tiny_flux(float8)), 3, CPU)
    assert fp8.host_bytes < swap.host_bytes / 2  # quantized weights counted by their payload


def test_without_checkpointing_asks_for_it():
    model = tiny_flux()
    BlockSwap(blocks(model), 2, CPU).attach()
    with pytest.raises(ValueError, match="gradient_checkpointing: true"):
        train(model, 1, checkpointing=False)


def test_inference_and_detach_give_identical_output():
    reference, model = tiny_flux(int8), tiny_flux(int8)
    with torch.no_grad():
        expected = reference(**inputs(0))[0]
        swap = BlockSwap(blocks(model), 4, CPU)
        swap.attach()
        assert torch.equal(model(**inputs(0))[0], expected)  # no gradients, so no checkpointing needed
        assert swap.copies == 4
        swap.detach()
        assert torch.equal(model(**inputs(0))[0], expected)
        assert swap.copies == 4  # no hooks left


def test_nf4_weights():
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    def stack():
        torch.manual_seed(0)
        layers = [torch.nn.Linear(64, 64, dtype=torch.bfloat16) for _ in range(3)]
        for layer in layers:
            layer.weight = torch.nn.Parameter(to_nf4(layer.weight.detach(), 64, 16), requires_grad=False)
        return layers

    def run(layers):
        x = torch.randn(4, 64, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(1))
        for layer in layers:
            x = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False).relu()
        x.float().square().sum().backward()
        return x, [layer.bias.grad for layer in layers]

    expected, layers = run(stack()), stack()
    swap = BlockSwap(layers, 2, CPU)
    swap.attach()
    got = run(layers)
    assert torch.equal(got[0], expected[0]) and all(map(torch.equal, got[1], expected[1]))
    assert type(layers[2].weight).__name__ == "NF4Tensor" and swap.copies == 3


def test_compiled_blocks_do_not_recompile_on_swapped_weights():
    expected = train(tiny_flux())
    model = tiny_flux()
    compile_denoiser(model, backend="eager")
    BlockSwap(blocks(model), 3, CPU).attach()
    torch._dynamo.reset()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    run = steps(model)
    got = [next(run)]
    with torch._dynamo.config.patch(error_on_recompile=True):  # new Parameter objects each call: no new graphs
        got += list(run)
    assert_identical(got, expected)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs  # the blocks did run compiled


def test_swap_count():
    assert swap_count(0.5, 57) == 29 and swap_count(0.0, 57) == 0 and swap_count(1.0, 57) == 57
    assert swap_count(0.35, 20) == 7 and swap_count(0.01, 57) == 1
    with pytest.raises(ValueError, match="between 0 and 1"):
        swap_count(35, 57)
