"""Noisy linear kernels (fused Triton matmul, generate + cuBLAS) against the in-package reference.

Every case runs the public op ``noisy_linear(..., path=...)`` forward and backward and compares
the output and the gradients of input, weight and bias with :mod:`fastnoise.reference` on the
same seed and offset: the kernel may be at most 2x further from a float64 reference than the
same-dtype reference is (:func:`fastnoise.testing.assert_close_to_reference`). On CPU the
kernels run through the Triton interpreter on small odd shapes; full sizes are GPU tests.
"""

import importlib.util
import os
import warnings

import numpy as np
import pytest
import torch
from fastnoise.kernels import noisy_matmul
from scipy import stats

from fastnoise import NoiseSpec, dispatch, reference, rng
from fastnoise import _backends_linear as backends
from fastnoise.functional import noisy_linear
from fastnoise.testing import assert_close_to_reference, nan_like

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"  # CPU: the Triton interpreter (tests/conftest.py)
KERNELS_RUN = HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1"
needs_kernels = pytest.mark.skipif(not KERNELS_RUN, reason="no Triton device")
SEED, OFFSET = 0x0BAD_CAFE_1234_5678, 9
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
DTYPE_IDS = {F32: "f32", BF16: "bf16", F16: "f16"}
MODE_SCALES = ["range", "absmax_per_channel", "proportional"]  # one scale per kernel mode


def _inputs(lead, k, n, dtype, bias=True, device=DEVICE):
    x = torch.randn(*lead, k, device=device).to(dtype)
    w = (torch.randn(n, k, device=device) / k**0.5).to(dtype)
    b = torch.randn(n, device=device).to(dtype) if bias else None
    return x, w, b


def _fwd_bwd(x, w, b, spec, path, backward_path=None, grad=None, seed=SEED, offset=OFFSET):
    """(y, dx, dw, db) through the public op; inputs are used as given (strides kept)."""
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    b = None if b is None else b.detach().requires_grad_()
    y = noisy_linear(x, w, b, spec, seed, offset, path=path, backward_path=backward_path)
    if grad is None:
        grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(y)
    leaves = [t for t in (x, w, b) if t is not None]
    grads = torch.autograd.grad(y, leaves, grad.to(y.dtype))
    dx, dw = grads[0], grads[1]
    return y.detach(), dx, dw, (grads[2] if b is not None else None), grad


def check_against_reference(x, w, b, spec, path, backward_path=None, autocast=None):
    """The op on ``path`` vs the same-dtype reference vs a float64 reference, forward and grads."""
    def run(xx, ww, bb, p, bp=None, grad=None, cast=autocast):
        if cast is None:
            return _fwd_bwd(xx, ww, bb, spec, p, bp, grad)
        with torch.autocast(xx.device.type, dtype=cast):
            return _fwd_bwd(xx, ww, bb, spec, p, bp, grad)

    got = run(x, w, b, path, backward_path)
    grad = got[4]
    same = run(x, w, b, "reference", grad=grad)
    # float64 reference; under autocast the input is first rounded as autocast rounds it
    x64 = (x.to(autocast) if autocast is not None else x).double()
    up = run(x64, w.double(), None if b is None else b.double(), "reference", grad=grad.double(),
             cast=None)
    names = ("output", "grad input", "grad weight", "grad bias")
    for name, a, t, r in zip(names, got[:4], same[:4], up[:4], strict=True):
        if r is None:
            assert a is None, f"{name}: unexpected gradient"
            continue
        assert a.dtype == t.dtype, f"{name}: dtype {a.dtype} != reference's {t.dtype}"
        assert_close_to_reference(a, t, r.to(torch.float64), name=f"{path} {name}")
    return got


# ----------------------------------------------------------------------------- the matrix
def _matrix():
    """path x dtype x scale; the quick subset (-m "not slow") keeps the cheapest case (the Triton
    interpreter makes each of them one of the suite's longer tests)."""
    return [pytest.param(p, d, s, id=f"{p}-{DTYPE_IDS[d]}-{s}",
                         marks=() if (p, d, s) == ("fused", F32, "proportional") else pytest.mark.slow)
            for p in ("fused", "generate") for d in (F32, BF16, F16) for s in MODE_SCALES]


@needs_kernels
@pytest.mark.parametrize("path,dtype,scale", _matrix())
def test_paths_match_reference(path, dtype, scale):
    """[2, 35, 150] -> 131 with a noisy bias (partial tiles; two along M in the interpreter's
    config; several along N and K in the odd-shape and launcher tests)."""
    x, w, b = _inputs((2, 35), 150, 131, dtype)
    check_against_reference(x, w, b, NoiseSpec(0.1, scale, noise_bias=True), path)


@pytest.mark.slow
@needs_kernels
@pytest.mark.parametrize("bias", ["none", "plain"])
@pytest.mark.parametrize("path", ["fused", "generate"])
def test_bias_variants(path, bias):
    x, w, b = _inputs((37,), 75, 53, F32, bias=bias == "plain")
    check_against_reference(x, w, b, NoiseSpec(0.2, "absmax"), path)


@pytest.mark.slow
@needs_kernels
def test_odd_shape_3x41x401_to_1271():
    x, w, b = _inputs((3, 41), 401, 1271, BF16)
    check_against_reference(x, w, b, NoiseSpec(0.1, "absmax_per_channel", noise_bias=True), "fused")


def _layouts(k):
    """name -> a [..., k] float32 input with the given layout."""
    base = torch.randn(2, 40, 2 * k, device=DEVICE)
    return {
        "4d": torch.randn(2, 3, 5, k, device=DEVICE),
        "transposed": torch.randn(k, 21, device=DEVICE).t(),  # strides (1, 21)
        "sliced": base[:, 3:38, ::2],  # leading dims that do not fold into one
        "permuted": torch.randn(5, 3, 7, k, device=DEVICE).transpose(0, 1),  # needs a copy
    }


@pytest.mark.slow
@needs_kernels
@pytest.mark.parametrize("layout", ["4d", "transposed", "sliced", "permuted"])
@pytest.mark.parametrize("path", ["fused", "generate"])
def test_leading_dims_and_strides(path, layout):
    x = _layouts(70)[layout]
    _, w, b = _inputs((1,), 70, 45, F32)
    y = check_against_reference(x, w, b, NoiseSpec(0.1, "range"), path)[0]
    assert y.shape == (*x.shape[:-1], 45)


def test_rows_view_copies_only_when_it_must():
    def shares(a, b):
        return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()

    layouts = _layouts(70)
    for name in ("4d", "transposed", "sliced"):
        x = layouts[name]
        v, T, s_b, s_t, s_r = noisy_matmul._rows_view(x)
        assert shares(v, x), name
        m = torch.arange(x.numel() // 70)
        # rows addressed through (T, s_b, s_t) are the rows of x in order
        flat = x.reshape(-1, 70)
        got = torch.stack([torch.as_strided(x, (70,), (s_r,), x.storage_offset() + int(
            (i // T) * s_b + (i % T) * s_t)) for i in m.tolist()])
        assert torch.equal(got, flat), name
    v = noisy_matmul._rows_view(layouts["permuted"])[0]
    assert not shares(v, layouts["permuted"])


@pytest.mark.slow
@needs_kernels
@pytest.mark.parametrize("dtype", [F32, BF16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("split", [1, 3])
def test_launchers_write_every_element(split, dtype):
    """Direct launcher calls into NaN-filled buffers, without and with a split reduction."""
    x, w, b = _inputs((9,), 300, 70, dtype)  # K = 300: three splits of 128
    spec = NoiseSpec(0.1, "absmax_per_channel", noise_bias=True)
    sigma = spec.sigma(w, b)
    off = torch.tensor(OFFSET, device=DEVICE)
    args = (sigma, spec.mode, True, SEED, off)
    y = noisy_matmul.noisy_matmul_fwd(x, w, b, *args, out=nan_like(torch.empty(9, 70, dtype=dtype,
                                      device=DEVICE)), split_k=split)
    want = reference.linear_forward(x, w, b, *args)
    up = reference.linear_forward(x.double(), w.double(), b.double(), *args)
    assert_close_to_reference(y, want, up, name="forward")
    g = torch.randn(9, 70, device=DEVICE).to(dtype)
    dx = noisy_matmul.noisy_matmul_dx(g, w, sigma, spec.mode, SEED, off,
                                      out=nan_like(x), split_k=split)
    want = reference.linear_backward(g, x, w, sigma, spec.mode, SEED, off, True, False, False)[0]
    up = reference.linear_backward(g.double(), x.double(), w.double(), sigma, spec.mode, SEED, off,
                                   True, False, False)[0]
    assert_close_to_reference(dx, want, up, name="grad input")


@pytest.mark.slow
@needs_kernels
@pytest.mark.parametrize("fwd,bwd", [("fused", "generate"), ("generate", "fused")])
def test_forward_by_one_path_backward_by_the_other(fwd, bwd):
    """Both paths draw the same z, so mixing them gives the gradients of one noisy weight."""
    x, w, b = _inputs((3, 11), 90, 37, F32)
    spec = NoiseSpec(0.2, "proportional", noise_bias=True)
    mixed = check_against_reference(x, w, b, spec, fwd, backward_path=bwd)
    plain = _fwd_bwd(x, w, b, spec, fwd, grad=mixed[4])
    for a, c in zip(mixed[:4], plain[:4], strict=True):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@needs_kernels
@pytest.mark.parametrize("path", ["fused", "generate"])
def test_autocast_bf16_with_fp32_weights(path):
    x, w, b = _inputs((4, 9), 100, 33, F32)
    dtype = BF16 if DEVICE == "cpu" or torch.cuda.is_bf16_supported() else F16
    y, dx, dw, db, _ = check_against_reference(x, w, b, NoiseSpec(0.1, "range", noise_bias=True), path,
                                               autocast=dtype)
    assert y.dtype == dtype and dx.dtype == dw.dtype == db.dtype == F32


@needs_kernels
@pytest.mark.parametrize("path", ["fused", "generate"])
def test_nothing_weight_sized_saved_for_backward(path):
    x, w, b = _inputs((2, 4), 96, 80, F32)  # |x| < |W|, so a weight-sized save would show
    w.requires_grad_()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = noisy_linear(x, w, b, NoiseSpec(0.1, noise_bias=True), SEED, OFFSET, path=path)
    assert saved
    big = [t for t in saved if t.numel() >= w.numel() and t.data_ptr() != w.data_ptr()]
    assert not big, [tuple(t.shape) for t in big]
    y.sum().backward()
    assert w.grad is not None


@pytest.mark.slow
@needs_kernels
@pytest.mark.parametrize("path", ["fused", "generate"])
def test_partial_gradients(path):
    """Only the weight, or only the input, needs a gradient: the other is not computed."""
    x, w, b = _inputs((6,), 40, 24, F32)
    spec = NoiseSpec(0.1, noise_bias=True)
    want = _fwd_bwd(x, w, b, spec, "reference")
    for which in ("weight", "input"):
        xx = x.clone().requires_grad_(which == "input")
        ww = w.clone().requires_grad_(which == "weight")
        y = noisy_linear(xx, ww, b, spec, SEED, OFFSET, path=path)
        y.backward(want[4])
        got, other, ref = (ww.grad, xx.grad, want[2]) if which == "weight" else (xx.grad, ww.grad, want[1])
        assert other is None
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("path", ["fused", "generate"])
def test_empty_batch(path):
    x, w, b = _inputs((0,), 20, 12, F32)
    y, dx, dw, db, _ = _fwd_bwd(x, w, b, NoiseSpec(0.1), path)
    assert y.shape == (0, 12) and dx.shape == (0, 20)
    assert torch.equal(dw, torch.zeros_like(w)) and torch.equal(db, torch.zeros_like(b))


def test_launcher_rejects_bad_arguments():
    x, w, _ = _inputs((3,), 8, 4, F32, bias=False)
    sigma, off = torch.ones(1, device=DEVICE), torch.tensor(0, device=DEVICE)
    with pytest.raises(ValueError, match="out must be"):
        noisy_matmul.noisy_matmul_fwd(x, w, None, sigma, 0, False, 1, off, out=torch.empty(3, 5))
    with pytest.raises(ValueError, match="split_k"):
        noisy_matmul.noisy_matmul_fwd(x, w, None, sigma, 0, False, 1, off, split_k=0)
    with pytest.raises(TypeError, match="float64"):
        noisy_matmul.noisy_matmul_fwd(x.double(), w, None, sigma, 0, False, 1, off)


# ----------------------------------------------------------------------------- the noise itself
def extract_noise(n, k, device, split_k=None):
    """z [n, k] read back through the fused kernel: identity input, zero weight, sigma = 1.

    Forward: ``I_k @ (0 + z)^T = z^T``; input gradient: ``I_n @ (0 + z) = z``. float32 with
    IEEE products, so each output is exactly one z value.
    """
    w = torch.zeros(n, k, device=device)
    sigma = torch.ones(1, device=device)
    off = torch.tensor(OFFSET, device=device)
    fwd = noisy_matmul.noisy_matmul_fwd(torch.eye(k, device=device), w, None, sigma, 0, False, SEED,
                                        off, split_k=split_k)
    bwd = noisy_matmul.noisy_matmul_dx(torch.eye(n, device=device), w, sigma, 0, SEED, off,
                                       split_k=split_k)
    return fwd.t(), bwd


@pytest.mark.slow
@needs_kernels
def test_extracted_noise_is_the_contract():
    """The kernel's z equals ``rng.normal_grid`` (float32 vs float64 math: ~1e-6)."""
    n, k = 70, 132
    zf, zb = extract_noise(n, k, DEVICE)
    want = rng.normal_grid(SEED, OFFSET, n, k, device=DEVICE)
    torch.testing.assert_close(zf, want, rtol=0, atol=2e-5)
    torch.testing.assert_close(zb, want, rtol=0, atol=2e-5)
    assert torch.equal(zf, zb)  # forward and backward draw bit-identical noise


# ----------------------------------------------------------------------------- dispatch
def test_auto_on_cpu_is_the_cpp_path_or_the_reference_silently():
    """The C++ generator when built (tests/test_cpu_kernels.py tests it), else the reference."""
    from fastnoise import _cpu

    x, w = torch.randn(3, 8), torch.randn(4, 8)
    want = "cpu" if _cpu.available() else "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.choose("auto", x, w).name == want
        assert backends.choose("auto", x, w, backward=True).name == want
        assert backends.choose("auto", x.double(), w.double()).name == "reference"
        assert backends.choose("reference", x, w).name == "reference"


@needs_kernels
def test_explicit_paths_are_honoured():
    x, w = torch.randn(3, 8, device=DEVICE), torch.randn(4, 8, device=DEVICE)
    assert backends.choose("fused", x, w) is backends.FUSED_LINEAR
    assert backends.choose("generate", x, w, backward=True) is backends.GENERATE_LINEAR


def test_gpu_path_without_triton_device_warns_once(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(dispatch, "_warned", set())
    x, w = torch.randn(3, 8), torch.randn(4, 8)
    with pytest.warns(RuntimeWarning, match="path='fused' unavailable"):
        assert backends.choose("fused", x, w).name == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second time: silent
        assert backends.choose("fused", x, w).name == "reference"
    y = noisy_linear(x, w, None, NoiseSpec(0.1), SEED, OFFSET, path="fused")
    torch.testing.assert_close(y, noisy_linear(x, w, None, NoiseSpec(0.1), SEED, OFFSET, path="reference"),
                               rtol=0, atol=0)


def test_float64_falls_back_to_the_reference_with_a_warning(monkeypatch):
    monkeypatch.setattr(dispatch, "_warned", set())
    x, w = torch.randn(3, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="float64"):
        assert backends.choose("generate", x, w).name == "reference"


def test_auto_path_thresholds():
    m = backends.FUSED_MAX_M

    def x(*shape, dtype=BF16):
        return torch.empty(*shape, 64, device="meta", dtype=dtype)

    assert backends.auto_path(x(m)) == "fused"
    assert backends.auto_path(x(2, m // 2, dtype=F16)) == "fused"
    assert backends.auto_path(x(m + 1)) == "generate"
    assert backends.auto_path(x(8192)) == "generate"
    # float32: fused only with TF32 products
    tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert backends.auto_path(x(1, dtype=F32)) == "generate"
        torch.backends.cuda.matmul.allow_tf32 = True
        assert backends.auto_path(x(1, dtype=F32)) == "fused"
        assert backends.auto_path(x(m + 1, dtype=F32)) == "generate"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def test_split_heuristic():
    cpu = torch.device("cpu")
    assert noisy_matmul.split_for(16, 4096, 4096, cpu) == 1  # no SMs to fill off the GPU
    if HAS_CUDA:
        dev = torch.device("cuda")
        assert noisy_matmul.split_for(16, 4096, 4096, dev) > 1
        assert noisy_matmul.split_for(8192, 4096, 4096, dev) == 1
        assert noisy_matmul.split_for(16, 4096, 256, dev) == 1  # short reductions stay whole


# ----------------------------------------------------------------------------- bench/gpu_linear.py
def _gpu_linear():
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench",
                        "gpu_linear.py")
    spec = importlib.util.spec_from_file_location("fastnoise_bench_gpu_linear", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
@needs_kernels
def test_gpu_linear_quick_run(tmp_path):
    """bench/gpu_linear.run's logic at tiny sizes: every correctness row passes, timings are there."""
    rows = _gpu_linear().run(str(tmp_path), quick=True)
    metrics = ("max_err_ratio", "noise_max_abs_err", "noise_moment_z", "noise_stats_p", "saved_vs_clean")
    checks = [r for r in rows if r["metric"] in metrics]
    assert {r["metric"] for r in checks} == set(metrics)
    assert all(r["ok"] for r in checks), [r for r in checks if not r["ok"]]
    want = {"ms", "saved_mb"} | ({"peak_mb"} if HAS_CUDA else set())
    assert {r["metric"] for r in rows} >= want
    assert os.path.exists(tmp_path / "linear.json")


# ----------------------------------------------------------------------------- GPU, full sizes
GPU_SHAPES = [((1,), 4096, 4096), ((16,), 4096, 4096), ((256,), 4096, 4096), ((2048,), 4096, 4096),
              ((8192,), 4096, 4096), ((3, 41), 401, 1271), ((7,), 1271, 4091)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [BF16, F32, F16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: f"{'x'.join(map(str, s[0]))}x{s[1]}->{s[2]}")
@pytest.mark.parametrize("path", ["fused", "generate"])
def test_gpu_full_sizes(path, shape, dtype):
    lead, k, n = shape
    x, w, b = _inputs(lead, k, n, dtype)
    check_against_reference(x, w, b, NoiseSpec(0.06, "range", noise_bias=True), path)


@pytest.mark.gpu
@pytest.mark.parametrize("scale", MODE_SCALES)
def test_gpu_modes_and_autocast(scale):
    x, w, b = _inputs((64,), 4096, 4096, F32)
    for path in ("fused", "generate"):
        check_against_reference(x, w, b, NoiseSpec(0.06, scale, noise_bias=True), path, autocast=BF16)


@pytest.mark.gpu
@pytest.mark.parametrize("split_k", [1, 4], ids=["whole-K", "split-K"])
def test_gpu_extracted_noise_statistics(split_k):
    """z read back from the fused kernel (N = K = 2048: 4M draws) is N(0, 1) and the contract's."""
    zf, zb = extract_noise(2048, 2048, "cuda", split_k=split_k)
    want = rng.normal_grid(SEED, OFFSET, 2048, 2048, device="cuda")
    torch.testing.assert_close(zf, want, rtol=0, atol=2e-5)
    assert torch.equal(zf, zb)
    z = zf.double().flatten().cpu().numpy()
    n = z.size
    assert abs(z.mean()) < 6 / np.sqrt(n)
    assert abs(z.var() - 1) < 6 * np.sqrt(2 / n)
    assert abs(stats.skew(z)) < 6 * np.sqrt(6 / n)
    assert abs(stats.kurtosis(z)) < 6 * np.sqrt(24 / n)
    assert stats.kstest(z, "norm").pvalue > 1e-3
