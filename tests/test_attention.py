"""train.attention_backend: which SDPA kernel runs first, outside and inside compiled blocks."""
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

from eridiffusion.archs import ARCHS, get_arch_class
from eridiffusion.train.attention import BACKENDS, attention_kernels, choose_attention, through_sdpa
from eridiffusion.train.compile import compile_denoiser


class Attend(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(16, 48)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)  # (3, batch, heads, tokens, dim)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


def test_choice_on_the_cpu_and_for_kernels_outside_sdpa():
    cpu = torch.device("cpu")
    for backend in ("native", "_native_cudnn", "_native_flash", "flash", "sage", "_flash_3"):
        assert choose_attention(backend, cpu) == "default"
        assert choose_attention(backend, cpu, "cudnn") == "default"
    # what this module steers; diffusers' set_attention_backend runs the rest
    assert [through_sdpa(b) for b in ("native", "_native_cudnn", "_native_math", "_native_npu", "flash", "sage")] == \
        [True, True, True, False, False, False]


def test_architectures_prefer_only_sdpa_kernels():
    preferred = {name: getattr(get_arch_class(name), "attention_kernel", None) for name in ARCHS}
    assert preferred["flux"] == preferred["chroma"] == preferred["wan21"] == "cudnn"  # measured faster with it
    assert preferred["sdxl"] == preferred["sd3"] == preferred["hidream"] == "flash"  # cuDNN's measured slower
    assert set(preferred.values()) <= {*BACKENDS, None}


def test_kernels_context_puts_the_choice_first_and_restores_the_order():
    before = torch._C._get_sdp_priority_order()
    with attention_kernels("math"):
        order = torch._C._get_sdp_priority_order()
        assert order[0] == int(SDPBackend.MATH)
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()  # the rest stay
    assert torch._C._get_sdp_priority_order() == before
    with attention_kernels("default"):
        assert torch._C._get_sdp_priority_order() == before


def test_compiled_block_carries_the_choice_in_its_graph():
    # torch.compile picks the SDPA kernel when it traces, and its caches do not key on the global SDPA settings:
    # the choice must be a node of the compiled graph, and the block must give the eager result
    torch._dynamo.reset()
    graphs = []

    def record(gm, inputs):
        graphs.append(gm)
        return gm.forward

    block = Attend()
    x = torch.randn(2, 5, 16)
    want = block(x)
    compile_denoiser(block, [block], backend=record, attention="math")
    torch.testing.assert_close(block(x), want)
    assert len(graphs) == 1  # one graph: the context did not break it
    targets = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert torch.nn.attention._sdpa_kernel in targets

    torch._dynamo.reset()
    graphs.clear()
    plain = Attend()
    compile_denoiser(plain, [plain], backend=record)  # default: no context, nothing added
    plain(x)
    assert torch.nn.attention._sdpa_kernel not in [n.target for n in graphs[0].graph.nodes]
