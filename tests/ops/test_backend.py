"""ops.backend: compiling every Triton kernel of a step ahead, in parallel."""
import pytest
import torch
import triton.language as tl
from triton.runtime.jit import JITFunction

from gdn_exp.ops.backend import compile_ahead, compiled_kernels


def add_one(x_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    tl.store(x_ptr + offsets, tl.load(x_ptr + offsets, mask=offsets < n) + 1, mask=offsets < n)


def test_compile_ahead_records_the_launches_and_compiles_each_once(monkeypatch):
    """fn's launches do not run; each distinct one is compiled once (warmup=True), in a pool, and loaded."""
    compiled, loaded = [], []

    class Compiled:
        def __init__(self, launch):
            self.launch = launch

        def _init_handles(self):
            loaded.append(self.launch)

    def run(kernel, *args, grid, warmup, **kwargs):
        compiled.append((kernel.fn.__name__, args[1], kwargs["BLOCK"], warmup))
        return Compiled(compiled[-1])

    monkeypatch.setattr(JITFunction, "run", run)
    kernel = JITFunction(add_one)  # a compiled-kernel object even where the interpreter is on
    x = torch.zeros(8)

    def step():
        kernel[(1,)](x, 8, BLOCK=8)
        kernel[(1,)](x, 8, BLOCK=8)   # the same launch again
        kernel[(1,)](x, 5, BLOCK=16)

    assert compile_ahead(step) == 2
    assert sorted(compiled) == [("add_one", 5, 16, True), ("add_one", 8, 8, True)]
    assert sorted(loaded) == sorted(compiled)
    assert (x == 0).all()  # nothing ran
    kernel[(1,)](x, 8, BLOCK=8)  # the recorder is gone: a launch reaches `run` again
    assert compiled[-1] == ("add_one", 8, 8, False)


@pytest.mark.gpu
def test_after_compile_ahead_the_first_step_compiles_nothing():
    from gdn_exp.model import LanguageModel, ModelConfig

    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(name="t", vocab_size=96, d_model=48, n_layers=2, num_heads=2,
                                      head_dim=24)).cuda()  # a shape no other test compiles
    x = torch.randint(0, 96, (3, 40), device="cuda")
    before = [p.detach().clone() for p in model.parameters()]

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(x).float().square().mean().backward()

    cached = {id(kernel) for kernel in compiled_kernels()}
    assert compile_ahead(step) > 5
    new = [kernel for kernel in compiled_kernels() if id(kernel) not in cached]
    assert len(new) > 5
    assert all(kernel.module is not None for kernel in new)  # loaded: the first launch builds no launcher
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    model.zero_grad(set_to_none=True)
    cached = len(compiled_kernels())
    step()
    assert len(compiled_kernels()) == cached
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
