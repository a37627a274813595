"""Noisy conv2d kernels (fused implicit GEMM, generate + cuDNN) against the in-package reference.

Every case runs the public op ``noisy_conv2d(..., path=...)`` forward and backward and compares
output, grad input, grad weight and grad bias with :mod:`fastnoise.reference` on the same seed
and offset: the kernel may be at most 2x further from a float64 reference than the same-dtype
reference is (:func:`fastnoise.testing.assert_close_to_reference`). On CPU the kernels run
through the Triton interpreter on small odd shapes; full ResNet-50 sizes are GPU tests.
"""

import importlib.util
import os
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from fastnoise.kernels import noisy_conv

from fastnoise import NoiseSpec, reference
from fastnoise import _backends_conv as backends
from fastnoise.functional import noisy_conv2d
from fastnoise.testing import assert_close_to_reference, nan_like

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"  # CPU: the Triton interpreter (tests/conftest.py)
SEED, OFFSET = 0x5EED_0000_1234_ABCD, 11
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


@dataclass(frozen=True)
class Case:
    name: str
    cin: int
    cout: int
    hw: tuple
    kernel: tuple
    stride: tuple = (1, 1)
    padding: tuple = (0, 0)
    dilation: tuple = (1, 1)
    groups: int = 1
    bias: str = "bias"  # "none", "bias" or "noise" (noisy bias)
    scale: str = "range"
    dtype: torch.dtype = F32
    channels_last: bool = False

    def spec(self, eta=0.1):
        return NoiseSpec(eta, self.scale, noise_bias=self.bias == "noise")


FUSED_CASES = [
    Case("3x3-s1-p1-f32-nchw", 5, 7, (11, 10), (3, 3), padding=(1, 1)),
    Case("3x3-s2-p1x2-noisebias-absmax-f32-cl", 5, 7, (12, 13), (3, 3), (2, 2), (1, 2), bias="noise",
         scale="absmax", channels_last=True),
    Case("1x1-perchannel-bf16-cl", 6, 9, (9, 11), (1, 1), scale="absmax_per_channel", dtype=BF16,
         channels_last=True),
    Case("1x1-s2-cin37-nobias-proportional-f32", 37, 5, (9, 9), (1, 1), (2, 2), bias="none",
         scale="proportional"),
    Case("5x3-p2x1-d2-noisebias-perchannel-f16", 5, 7, (13, 11), (5, 3), padding=(2, 1),
         dilation=(2, 2), bias="noise", scale="absmax_per_channel", dtype=F16),
    Case("7x7-s2-p3-bf16-cl", 3, 8, (13, 13), (7, 7), (2, 2), (3, 3), dtype=BF16, channels_last=True),
    Case("3x3-g2-cin34-noisebias-proportional-f32-cl", 34, 10, (9, 10), (3, 3), groups=2,
         bias="noise", scale="proportional", channels_last=True),
    Case("3x3-g2-absmax-bf16", 6, 8, (10, 9), (3, 3), padding=(1, 1), groups=2, scale="absmax",
         dtype=BF16),
    Case("depthwise-3x3-p1-f32-cl", 5, 5, (10, 9), (3, 3), padding=(1, 1), groups=5,
         channels_last=True),
    Case("depthwise-x2-5x3-s2-d1x2-noisebias-proportional-bf16", 4, 8, (11, 12), (5, 3), (2, 2),
         (2, 2), (1, 2), groups=4, bias="noise", scale="proportional", dtype=BF16),
    Case("3x3-s2x1-p0x2-d1x2-nobias-absmax-f16-cl", 5, 6, (11, 9), (3, 3), (2, 1), (0, 2), (1, 2),
         bias="none", scale="absmax", dtype=F16, channels_last=True),
]
GENERATE_CASES = [FUSED_CASES[i] for i in (0, 2, 6, 9)]
# the quick subset (-m "not slow") keeps the cheapest fused case: under the Triton
# interpreter the others take 3 to 9 times as long
QUICK_FUSED = ("1x1-s2-cin37-nobias-proportional-f32",)
SLOW = pytest.mark.slow


def _fused_params():
    return [c if c.name in QUICK_FUSED else pytest.param(c, marks=SLOW) for c in FUSED_CASES]


def _inputs(case: Case, weight_dtype=None, batch=2):
    g = torch.Generator().manual_seed(3)
    kh, kw = case.kernel
    x = torch.randn(batch, case.cin, *case.hw, generator=g).to(case.dtype)
    if case.channels_last:
        x = x.to(memory_format=torch.channels_last)
    wdt = weight_dtype or case.dtype
    w = (torch.randn(case.cout, case.cin // case.groups, kh, kw, generator=g) * 0.3).to(wdt)
    b = None if case.bias == "none" else torch.randn(case.cout, generator=g).to(wdt)
    return [t if t is None else t.to(DEVICE) for t in (x, w, b)]


def _geometry(case: Case):
    return list(case.stride), list(case.padding), list(case.dilation), case.groups


def _reference(case: Case, x, w, b, grad, compute_dtype, upcast: bool):
    """Reference forward and (dx, dw, db); in float64 when ``upcast``."""
    spec = case.spec()
    sigma = spec.sigma(w, b)  # float32, from the weights as given
    off = torch.tensor(OFFSET, device=x.device)
    geo = _geometry(case)
    if upcast:
        x, w, grad = x.double(), w.double(), grad.double()
        b = None if b is None else b.double()
    else:
        x, grad = x.to(compute_dtype), grad.to(compute_dtype)
    y = reference.conv2d_forward(x, w, b, sigma, spec.mode, spec.noise_bias and b is not None, SEED,
                                 off, *geo)
    dx, dw, db = reference.conv2d_backward(grad, x, w, sigma, spec.mode, SEED, off, *geo, True, True,
                                           b is not None)
    return y, dx, dw, db


def _run(case: Case, path: str, backward_path=None, autocast=False, batch=2):
    x, w, b = _inputs(case, weight_dtype=F32 if autocast else None, batch=batch)
    leaves = [t if t is None else t.detach().clone().requires_grad_(True) for t in (x, w, b)]
    ctx = torch.autocast(x.device.type, dtype=case.dtype) if autocast else torch.autocast(x.device.type,
                                                                                          enabled=False)
    with ctx:
        y = noisy_conv2d(leaves[0], leaves[1], leaves[2], case.stride, case.padding, case.dilation,
                         case.groups, case.spec(), SEED, OFFSET, path=path, backward_path=backward_path)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(y.device, y.dtype)
    y.backward(grad)
    got = [y] + [t if t is None else t.grad for t in leaves]

    same = _reference(case, x, w, b, grad, case.dtype, upcast=False)
    up = _reference(case, x, w, b, grad, case.dtype, upcast=True)
    for name, g, s, u in zip(("output", "grad input", "grad weight", "grad bias"), got, same, up,
                             strict=True):
        if u is None:
            assert g is None, name
            continue
        assert g is not None, f"{name} missing"
        assert_close_to_reference(g.to(s.dtype), s, u, name=name)
    assert y.dtype == case.dtype
    # the layout F.conv2d would give
    cl = torch.channels_last
    assert y.is_contiguous(memory_format=cl) == same[0].is_contiguous(memory_format=cl)
    assert y.is_contiguous() == same[0].is_contiguous()
    return got


@pytest.mark.parametrize("case", _fused_params(), ids=lambda c: c.name)
def test_fused_matches_reference(case):
    _run(case, "fused")


@pytest.mark.parametrize("case", GENERATE_CASES, ids=lambda c: c.name)
def test_generate_matches_reference(case):
    _run(case, "generate")


@pytest.mark.slow
@pytest.mark.parametrize("split", [1, 3], ids=["nosplit", "split3"])
def test_fused_split_k(split, monkeypatch):
    monkeypatch.setattr(noisy_conv, "_pick_split_k", lambda *a: split)
    _run(Case("3x3-cin20-noisebias-perchannel-f32-cl", 20, 9, (9, 10), (3, 3), padding=(1, 1),
              bias="noise", scale="absmax_per_channel", channels_last=True), "fused")


@pytest.mark.parametrize("path", [pytest.param("fused", marks=SLOW), "generate"])
def test_autocast_rounds_the_noisy_weight_once(path):
    """float32 weights, bfloat16 compute: W + sigma z is rounded to bf16 once, as the reference."""
    _run(Case("3x3-autocast-bf16-cl", 5, 7, (9, 11), (3, 3), padding=(1, 1), bias="noise",
              dtype=BF16, channels_last=True), path, autocast=True)


@pytest.mark.parametrize("fwd,bwd", [pytest.param("fused", "generate", marks=SLOW),
                                     ("generate", "reference"), ("reference", "generate")])
def test_backward_sees_the_forward_noise(fwd, bwd):
    """Without bias y is linear in x, so <g, y> = <dx, x> holds only if the backward's noisy
    weight is the forward's (same seed, same offset, any pair of paths)."""
    case = Case("3x3-s2", 6, 7, (11, 12), (3, 3), (2, 2), (1, 1), bias="none")
    x, w, _ = _inputs(case)
    x.requires_grad_(True)
    y = noisy_conv2d(x, w, None, case.stride, case.padding, 1, 1, case.spec(0.5), SEED, OFFSET,
                     path=fwd, backward_path=bwd)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.device)
    (dx,) = torch.autograd.grad(y, x, g)
    lhs, rhs = (g.double() * y.double()).sum().item(), (dx.double() * x.double()).sum().item()
    assert abs(lhs - rhs) <= 1e-4 * max(1.0, abs(lhs))
    # and a different offset would not satisfy it
    y2 = noisy_conv2d(x, w, None, case.stride, case.padding, 1, 1, case.spec(0.5), SEED, OFFSET + 1,
                      path=fwd)
    assert abs((g.double() * y2.double()).sum().item() - rhs) > 1e-3 * max(1.0, abs(lhs))


@pytest.mark.parametrize("path", [pytest.param("fused", marks=SLOW), "generate"])
def test_grad_weight_alone(path):
    """Input without grad (a first layer): the backward builds no noisy weight, dW is still right."""
    case = FUSED_CASES[2]
    x, w, b = _inputs(case)
    w.requires_grad_(True)
    y = noisy_conv2d(x, w, b, case.stride, case.padding, 1, 1, case.spec(), SEED, OFFSET, path=path)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(y.device, y.dtype)
    (dw,) = torch.autograd.grad(y, w, grad)
    _, _, same, _ = _reference(case, x, w.detach(), b, grad, case.dtype, upcast=False)
    _, _, up, _ = _reference(case, x, w.detach(), b, grad, case.dtype, upcast=True)
    # the weight's layout (strides of size-1 dims are free, torch.compile ignores them too)
    assert [st for st, n in zip(dw.stride(), dw.shape, strict=True) if n > 1] == \
        [st for st, n in zip(w.stride(), w.shape, strict=True) if n > 1]
    assert_close_to_reference(dw, same, up, name="grad weight")


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("case", [FUSED_CASES[1], FUSED_CASES[8]], ids=lambda c: c.name)
def test_fused_kernel_writes_every_output_element(case, layout):
    """The launcher writes into a NaN-filled buffer of either layout: nothing is left unwritten."""
    x, w, b = _inputs(case)
    spec = case.spec()
    sigma = spec.sigma(w, b)
    off = torch.tensor(OFFSET, device=x.device)
    want = reference.conv2d_forward(x, w, b, sigma, spec.mode, spec.noise_bias, SEED, off, *_geometry(case))
    fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
    out = nan_like(want.contiguous(memory_format=fmt))
    for split in (1, 2):
        got = noisy_conv.noisy_conv2d_fwd(x, w, b, sigma, spec.mode, spec.noise_bias, SEED, off,
                                          *_geometry(case), split_k=split, out=out)
        assert got is out
        up = reference.conv2d_forward(x.double(), w.double(), None if b is None else b.double(), sigma,
                                      spec.mode, spec.noise_bias, SEED, off, *_geometry(case))
        assert_close_to_reference(got, want, up)
        out.fill_(float("nan"))


@pytest.mark.slow
def test_same_padding_with_an_even_kernel():
    """padding='same' with a 4x4 kernel pads the input asymmetrically before the kernel."""
    x = torch.randn(1, 3, 9, 8, device=DEVICE)
    w = torch.randn(5, 3, 4, 4, device=DEVICE) * 0.2
    spec = NoiseSpec(0.1)
    got = noisy_conv2d(x, w, None, 1, "same", 1, 1, spec, SEED, OFFSET, path="fused")
    want = noisy_conv2d(x, w, None, 1, "same", 1, 1, spec, SEED, OFFSET, path="reference")
    up = noisy_conv2d(x.double(), w.double(), None, 1, "same", 1, 1, spec, SEED, OFFSET, path="reference")
    assert got.shape == (1, 5, 9, 8)
    assert_close_to_reference(got, want, up)


# ----------------------------------------------------------------------------- dispatch
def _geo():
    return ([1, 1], [1, 1], [1, 1], 1)


def test_auto_on_cpu_takes_the_cpp_path_or_the_reference():
    """The C++ generator when built (tests/test_cpu_kernels.py tests it), else the reference."""
    from fastnoise import _cpu

    x, w = torch.randn(1, 4, 5, 5), torch.randn(4, 4, 3, 3)
    want = "cpu" if _cpu.available() else "reference"
    assert backends.choose("auto", x, w, _geo()).name == want
    assert backends.choose("auto", x, w, _geo(), backward=True).name == want
    assert backends.choose("auto", x.double(), w.double(), _geo()).name == "reference"


@pytest.mark.skipif(not (HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1"), reason="no Triton device")
def test_explicit_paths_are_honoured():
    x, w = torch.randn(1, 4, 5, 5, device=DEVICE), torch.randn(4, 4, 3, 3, device=DEVICE)
    assert backends.choose("fused", x, w, _geo()).name == "fused"
    assert backends.choose("generate", x, w, _geo()).name == "generate"
    assert backends.choose("reference", x, w, _geo()).name == "reference"
    # the fused path's backward regenerates the weight once
    assert backends.FUSED_CONV2D.backward is backends.GENERATE_CONV2D.backward


def test_float64_falls_back_to_the_reference_with_a_warning():
    x, w = torch.randn(1, 4, 5, 5, dtype=torch.float64), torch.randn(4, 4, 3, 3, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="noisy_conv2d"):
        assert backends.choose("fused", x, w, _geo()).name == "reference"


def test_auto_path_thresholds():
    geo = ([1, 1], [1, 1], [1, 1], 1)
    bf16 = {"device": "meta", "dtype": torch.bfloat16}
    w = torch.empty(512, 512, 3, 3, **bf16)
    small = torch.empty(1, 512, 7, 7, **bf16)  # M = 49
    large = torch.empty(32, 512, 7, 7, **bf16)  # M = 1568
    assert backends.output_pixels(small, w, geo) == 49
    assert backends.auto_path(small, w, geo) == "fused"
    assert backends.auto_path(large, w, geo) == "generate"
    tiny_w = torch.empty(8, 8, 3, 3, **bf16)  # below FUSED_MIN_WEIGHT_NUMEL
    assert backends.auto_path(torch.empty(1, 8, 7, 7, **bf16), tiny_w, geo) == "generate"
    # float32 stays on cuDNN (the fused kernel's IEEE float32 dot spills on sm_90)
    assert backends.auto_path(small.float(), w.float(), geo) == "generate"


def test_output_memory_format_follows_conv2d():
    x = torch.randn(2, 3, 6, 5)
    w = torch.randn(4, 3, 3, 3)
    cl = torch.channels_last
    assert backends.conv_output_memory_format(x, w) == torch.contiguous_format
    assert backends.conv_output_memory_format(x.to(memory_format=cl), w) == cl
    assert backends.conv_output_memory_format(x, w.to(memory_format=cl)) == cl
    for xx, ww in [(x, w), (x.to(memory_format=cl), w), (x, w.to(memory_format=cl))]:
        want_cl = F.conv2d(xx, ww).is_contiguous(memory_format=cl)
        assert (backends.conv_output_memory_format(xx, ww) == cl) == want_cl


# ----------------------------------------------------------------------------- ResNet-50 shapes
def _gpu_conv():
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "gpu_conv.py")
    spec = importlib.util.spec_from_file_location("fastnoise_bench_gpu_conv", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_resnet50_conv_shapes_match_torchvision():
    """The 53 conv shapes the GPU tests and benchmarks use are those of torchvision's ResNet-50."""
    torchvision = pytest.importorskip("torchvision")
    gpu_conv = _gpu_conv()
    model = torchvision.models.resnet50().to("meta")
    seen = []
    hooks = [m.register_forward_hook(lambda m, a, o: seen.append(
        (m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, tuple(a[0].shape[2:]))))
        for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    model(torch.empty(2, 3, 224, 224, device="meta"))
    for h in hooks:
        h.remove()
    shapes = gpu_conv.resnet50_conv_shapes()
    assert len(shapes) == 53 == len(seen)
    got = [(s.cin, s.cout, (s.k, s.k), (s.stride, s.stride), (s.k // 2, s.k // 2), (s.hw, s.hw))
           for s in shapes]
    assert got == seen
    assert len(gpu_conv.distinct_shapes(shapes)) < 53


@pytest.mark.slow
def test_gpu_conv_quick_run_on_cpu(tmp_path):
    """bench/gpu_conv.run's logic at tiny sizes: every correctness row passes, timings are there."""
    rows = _gpu_conv().run(str(tmp_path), quick=True)
    checks = [r for r in rows if r["metric"] == "max_err_ratio"]
    assert checks and all(r["ok"] for r in checks), [r for r in checks if not r["ok"]]
    assert {r["metric"] for r in rows} >= {"max_err_ratio", "ms", "images_per_s", "time_ratio"}
    assert (tmp_path / "conv.json").exists()


# ----------------------------------------------------------------------------- GPU, full size
GPU_DTYPES = [BF16, F32, F16]


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["fused", "generate"])
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("batch", [1, 32])
def test_resnet50_shapes_gpu(batch, dtype, path):
    """All 53 ResNet-50 convs (distinct shapes once), forward and every gradient, channels_last."""
    gpu_conv = _gpu_conv()
    for shape in gpu_conv.distinct_shapes(gpu_conv.resnet50_conv_shapes()):
        case = Case(f"rn50-{shape}", shape.cin, shape.cout, (shape.hw, shape.hw), (shape.k, shape.k),
                    (shape.stride,) * 2, (shape.k // 2,) * 2, dtype=dtype, channels_last=True,
                    bias="noise", scale="absmax_per_channel")
        _run(case, path, batch=batch)


# ----------------------------------------------------------------------------- torch.compile
LAYOUTS = {"nchw": (False, False), "cl-input": (True, False), "cl-weight": (False, True)}


@pytest.mark.parametrize("layout,path", [("nchw", "reference"), ("cl-input", "reference"),
                                         ("cl-weight", "reference"),
                                         pytest.param("cl-input", "fused", marks=SLOW)])
def test_fake_kernels_give_the_real_layouts(layout, path):
    """torch.compile trusts the ops' fake kernels for strides: forward and backward ops must
    report the layouts the real ones produce (channels_last in, channels_last out)."""
    cl_x, cl_w = LAYOUTS[layout]
    x = torch.randn(2, 4, 7, 6, device=DEVICE)
    w = torch.randn(6, 4, 3, 3, device=DEVICE)
    x = x.to(memory_format=torch.channels_last) if cl_x else x
    w = w.to(memory_format=torch.channels_last) if cl_w else w
    sigma, off = torch.full((1,), 0.1, device=DEVICE), torch.tensor(3, device=DEVICE)
    geo = ([1, 1], [1, 1], [1, 1], 1)
    fwd = (x, w, None, sigma, 0, False, SEED, off, *geo, path, "generate")
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.fastnoise.noisy_conv2d.default, fwd, test_utils=checks)
    y = torch.ops.fastnoise.noisy_conv2d(*fwd)
    grad = torch.randn_like(y)
    bwd = (grad, x, w, sigma, 0, SEED, off, *geo, "generate", True, True, True)
    torch.library.opcheck(torch.ops.fastnoise.noisy_conv2d_backward.default, bwd, test_utils=checks)
    dx, dw, _ = torch.ops.fastnoise.noisy_conv2d_backward(*bwd)
    assert dx.stride() == x.stride() and dw.stride() == w.stride()
    assert y.is_contiguous(memory_format=torch.channels_last) == (cl_x or cl_w)
