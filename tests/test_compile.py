"""Regional compilation falls back to eager, with a warning, when the compiler fails."""
import torch
from diffusers import FluxTransformer2DModel

from eridiffusion.train.compile import compile_denoiser, want_compile


def failing_compiler(graph_module, example_inputs):
    raise RuntimeError("this backend cannot compile anything")


def test_compiler_failure_falls_back_to_eager(tiny_flux, capsys):
    model = FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer", local_files_only=True)
    torch.manual_seed(0)
    kw = dict(hidden_states=torch.randn(1, 16, 16), encoder_hidden_states=torch.randn(1, 8, 32),
              pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.5]), img_ids=torch.zeros(16, 3),
              txt_ids=torch.zeros(8, 3), guidance=torch.tensor([1.0]), return_dict=False)
    with torch.no_grad():
        expected = model(**kw)[0]
        compile_denoiser(model, backend=failing_compiler)
        blocks = [m for m in model.modules() if type(m).__name__ in model._repeated_blocks]
        assert blocks and not any(b.__dict__.get("_eri_eager") for b in blocks)
        got = model(**kw)[0]
    torch.testing.assert_close(got, expected)
    assert all(b._eri_eager for b in blocks)
    assert "torch.compile failed" in capsys.readouterr().err


def test_compile_default():
    assert want_compile(None, torch.device("cpu")) is False
    assert want_compile(True, torch.device("cpu")) is True and want_compile(False, torch.device("cuda")) is False


def test_the_architectures_blocks_are_compiled_one_by_one(tiny_sd3):
    """SD3's diffusers class names no repeated blocks: the blocks the architecture lists are compiled each on its
    own (one small graph per block), never the whole model as one graph."""
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel.from_pretrained(tiny_sd3, subfolder="transformer", local_files_only=True)
    assert not getattr(model, "_repeated_blocks", None)
    graphs = []

    def counting(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    compile_denoiser(model, list(model.transformer_blocks), backend=counting)
    cfg = model.config
    kw = dict(hidden_states=torch.randn(1, 16, 8, 8), encoder_hidden_states=torch.randn(1, 5, cfg.joint_attention_dim),
              pooled_projections=torch.randn(1, cfg.pooled_projection_dim), timestep=torch.tensor([500.0]), return_dict=False)
    with torch.no_grad():
        model(**kw)
    assert graphs  # the blocks ran compiled
    ops = lambda g: sum(1 for n in g.graph.nodes if n.op == "call_function")
    # no graph holds the patch embedding or the output projection: each is one block's
    assert not any("proj_out" in str(g.code) or "pos_embed" in str(g.code) for g in graphs), [ops(g) for g in graphs]
