"""The read-back barrier for inductor (lowbit.kernels.inductor_fix): when it applies, that it is installed
in inductor, and on a GPU that the generated kernel carries it and computes what eager does."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from lowbit.kernels import inductor_fix
from lowbit.kernels.inductor_fix import BARRIER_LINE, codegen_body_with_barrier, reads_back


class _Body:
    def __init__(self):
        self.lines = []

    def writeline(self, line):
        self.lines.append(line)


def _kernel(stored=("buf1",), reloaded=("buf1",), loop=True, reduction=True, loads=True, mix=False):
    kernel = SimpleNamespace(
        cse=SimpleNamespace(invalidated_stores=set(stored)),
        inside_reduction=reduction,
        mix_order_reduction=mix,
        range_trees=[SimpleNamespace(is_loop=False), SimpleNamespace(is_loop=loop)],
        loads=["tmp0 = tl.load(out_ptr0 + r0_index)"] if loads else [],
        compute=[],
        stores=[],
        body=_Body(),
    )
    if reloaded is not None:
        kernel.must_keep_buffers = set(reloaded)
    return kernel


def test_reads_back_only_a_loop_that_loads_an_earlier_loops_store():
    assert reads_back(_kernel())
    assert reads_back(_kernel(stored=("buf1", "buf2"), reloaded=("buf7", "buf2")))
    assert not reads_back(_kernel(stored=()))  # nothing stored by an earlier loop
    assert not reads_back(_kernel(reloaded=("buf9",)))  # stored, but not read back here
    assert not reads_back(_kernel(loop=False))  # no reduction loop (persistent reduction)
    assert not reads_back(_kernel(reduction=False))  # pointwise
    assert not reads_back(_kernel(mix=True))
    assert not reads_back(_kernel(loads=False))  # an empty body
    assert reads_back(_kernel(reloaded=None))  # no record of the reloads: every loop after a store


def test_barrier_is_written_before_the_loop_only_where_it_reads_back():
    calls = []

    def original(kernel):
        calls.append(list(kernel.body.lines))
        kernel.body.writeline("for r0_offset in tl.range(0, r0_numel, R0_BLOCK):")

    racy, clean = _kernel(), _kernel(reloaded=("buf9",))
    codegen_body_with_barrier(racy, original)
    codegen_body_with_barrier(clean, original)
    assert racy.body.lines == [BARRIER_LINE, "for r0_offset in tl.range(0, r0_numel, R0_BLOCK):"]
    assert calls[0] == [BARRIER_LINE]  # written before inductor's loop header
    assert clean.body.lines == ["for r0_offset in tl.range(0, r0_numel, R0_BLOCK):"]


def test_patch_is_installed_in_inductor_once():
    triton_codegen = pytest.importorskip("torch._inductor.codegen.triton")
    if inductor_fix._fixed_upstream(triton_codegen.TritonKernel):
        assert not inductor_fix.patch_inductor_read_back()
        pytest.skip("this torch already guards the read-back itself")
    assert inductor_fix.patch_inductor_read_back()
    patched = triton_codegen.TritonKernel.codegen_body
    assert getattr(patched, inductor_fix._MARK)
    assert inductor_fix.patch_inductor_read_back()  # idempotent: the same wrapper, not a second one
    assert triton_codegen.TritonKernel.codegen_body is patched
    assert not getattr(patched.__wrapped__, inductor_fix._MARK, False)
    import torch.compiler.config as cc

    assert inductor_fix.CACHE_TAG in cc.cache_key_tag  # graphs cached without the barrier are not reused


def test_environment_switch_keeps_inductor_unpatched(monkeypatch):
    triton_codegen = pytest.importorskip("torch._inductor.codegen.triton")
    kernel_cls = triton_codegen.TritonKernel
    monkeypatch.setattr(kernel_cls, "codegen_body", kernel_cls.codegen_body)  # restored afterwards
    if getattr(kernel_cls.codegen_body, inductor_fix._MARK, False):
        monkeypatch.setattr(kernel_cls, "codegen_body", kernel_cls.codegen_body.__wrapped__)
    monkeypatch.setenv("LOWBIT_INDUCTOR_READ_BACK_BARRIER", "0")
    assert not inductor_fix.patch_inductor_read_back()
    assert not getattr(kernel_cls.codegen_body, inductor_fix._MARK, False)


def _residual_layer_norm(x_f32, a_bf16, b_bf16, weight):
    """fp32 residual + two bf16 branch outputs, then LayerNorm to bf16: inductor fuses it into one kernel
    that stores the residual in its first loop over the row and reads it back in the second."""
    h = x_f32 + a_bf16.float() + b_bf16.float()
    return h, F.layer_norm(h, (h.shape[-1],), weight).to(torch.bfloat16)


@pytest.mark.gpu
def test_compiled_read_back_kernel_has_the_barrier_and_matches_eager():
    from torch._inductor.utils import run_and_get_code

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA (inductor's Triton kernels)")
    inductor_fix.patch_inductor_read_back()  # (or this torch's own fix: the same barrier, inside the loop)
    torch.manual_seed(0)
    n, c = 8192, 2048  # rows too long for a persistent reduction: a looped kernel
    x = torch.randn(n, c, device="cuda")
    a = torch.randn(n, c, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, c, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(c, device="cuda") + 0.5
    torch._dynamo.reset()
    fn = torch.compile(_residual_layer_norm, dynamic=False)
    (h, y), codes = run_and_get_code(fn, x, a, b, w)
    source = "\n".join(codes)
    assert "tl.range(" in source and BARRIER_LINE in source
    h_ref, y_ref = _residual_layer_norm(x, a, b, w)
    torch.testing.assert_close(h, h_ref, rtol=0, atol=0)  # the same three fp32 additions in the same order
    # LayerNorm in fp32 (inductor's Welford vs eager's), then one rounding to bf16 each: at most one bf16
    # ulp apart (2^-7 relative) plus the fp32 difference, far below a read of stale memory.
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=2**-7, atol=1e-5)
    for _ in range(3):  # and the same on every call
        assert torch.equal(fn(x, a, b, w)[1], y)


def test_read_back_guarded_after_the_patch():
    triton_codegen = pytest.importorskip("torch._inductor.codegen.triton")
    inductor_fix.patch_inductor_read_back()
    assert inductor_fix.read_back_guarded()
    if not inductor_fix._fixed_upstream(triton_codegen.TritonKernel):
        original = triton_codegen.TritonKernel.codegen_body.__wrapped__
        saved = triton_codegen.TritonKernel.codegen_body
        try:
            triton_codegen.TritonKernel.codegen_body = original
            assert not inductor_fix.read_back_guarded()
        finally:
            triton_codegen.TritonKernel.codegen_body = saved
