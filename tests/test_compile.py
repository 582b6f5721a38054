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
