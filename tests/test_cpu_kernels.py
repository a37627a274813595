"""The C++ CPU kernels (``csrc/``, :mod:`fastnoise._cpu`) and the CPU ``auto`` path, against the
contract of :mod:`fastnoise.rng` and the in-package reference.

- Philox words: bit-exact against ``rng.philox4x32`` (random seeds, offsets, streams, odd shapes).
- Normals: within 3 float32 ulps of ``rng.normal_grid`` (float64 rounded once); the largest
  difference seen is printed by ``test_normals_match_the_contract`` (``-s``).
- The same bits for 1, 2 and 3 threads, and for the baseline and AVX2 copies of the kernels.
- ``W + sigma z`` and the noisy bias: every mode, input and output dtype, 2-D to 5-D weights,
  strided and channels_last layouts; rounding exactly as torch's ``.to(dtype)`` with sigma 0.
- The CPU ``auto`` path (C++ + BLAS / oneDNN) forward and every gradient against a float64
  reference on the same noise (the tests of ``test_linear_kernels`` / ``test_conv_kernels``).
- No library (``FASTNOISE_NO_EXT=1`` or a failed build): the reference, with one warning.
"""

import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
from test_conv_kernels import Case
from test_conv_kernels import _run as run_conv
from test_linear_kernels import _inputs as linear_inputs
from test_linear_kernels import check_against_reference

from fastnoise import (
    NoiseSpec,
    _backends,
    _backends_conv,
    _backends_cpu,
    _backends_linear,
    _cpu,
    dispatch,
    reference,
    rng,
)
from fastnoise.spec import MODE_PROPORTIONAL, MODE_ROW, MODE_TENSOR

pytestmark = pytest.mark.skipif(not _cpu.available(), reason=f"no C++ CPU kernels ({_cpu.why_unavailable()})")

F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
DTYPE_IDS = {F32: "f32", BF16: "bf16", F16: "f16", F64: "f64"}
EPS32 = torch.finfo(F32).eps
def _isas():
    """The kernel copies this CPU can run."""
    if not _cpu.available():
        return ["baseline"]
    previous = _cpu.kernel_isa()
    isas = ["baseline"]
    try:
        for isa in ("avx2", "avx512"):
            _cpu.set_kernel_isa(isa)
            isas.append(isa)
    except RuntimeError:  # no AVX2 + FMA, or no AVX-512
        pass
    finally:
        _cpu.set_kernel_isa(previous)
    return isas


ISAS = _isas()
SEEDS = [(0, 0), (2**63 - 1, 2**32 - 1), (0x0BAD_CAFE_1234_5678, 9), (987654321, 2**31 + 5)]


@pytest.fixture(params=ISAS)
def isa(request):
    previous = _cpu.set_kernel_isa(request.param)
    yield request.param
    _cpu.set_kernel_isa(previous)


def _threads(n):
    class _Ctx:
        def __enter__(self):
            self.n = torch.get_num_threads()
            torch.set_num_threads(n)

        def __exit__(self, *exc):
            torch.set_num_threads(self.n)

    return _Ctx()


# ----------------------------------------------------------------------------- the contract
@pytest.mark.parametrize("seed,offset", SEEDS)
@pytest.mark.parametrize("stream", [0, 1])
def test_philox_words_are_bit_exact(isa, seed, offset, stream):
    rows, groups = 7, 37  # more than two lane blocks, partial last block
    got = _cpu.philox_words(seed, offset, stream, rows, groups)
    g = torch.arange(groups).expand(rows, groups)
    r = torch.arange(rows)[:, None].expand(rows, groups)
    want = torch.stack(rng.philox4x32(g, r, stream, offset & 0xFFFFFFFF, seed & 0xFFFFFFFF, seed >> 32), -1)
    assert got.dtype == torch.int64 and torch.equal(got, want)


def test_philox_known_answer():
    """Random123's known-answer vector for Philox4x32-10, counter and key all ones."""
    m = 0xFFFFFFFF
    words = rng.philox4x32(*(torch.tensor([m]),) * 4, m, m)
    assert [int(w) for w in words] == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    # the C++ counter (g, r, stream, offset) = (0, 0, 0, 0) with key (0, 0): Random123's zero vector
    assert _cpu.philox_words(0, 0, 0, 1, 1).flatten().tolist() == [0x6627E8D5, 0xE169C58D,
                                                                   0xBC57AC4C, 0x9B00DBD8]


@pytest.mark.parametrize("seed,offset", SEEDS)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (41, 401), (5, 1271), (2, 129)], ids=str)
def test_normals_match_the_contract(isa, seed, offset, shape):
    got = _cpu.normal_grid(seed, offset, *shape)
    want = rng.normal_grid(seed, offset, *shape)
    assert got.shape == want.shape and got.dtype == F32
    err = (got.double() - want.double()).abs()
    ulps = (err / (EPS32 * want.double().abs())).max().item()
    print(f"{shape} seed {seed:#x}: max |diff| {err.max().item():.3g}, {ulps:.2f} ulps")
    assert ulps <= 3.0
    assert got.abs().max().item() <= rng.Z_MAX
    bias = _cpu.normal_grid(seed, offset, 1, shape[1], rng.STREAM_BIAS)
    want_b = rng.normal_grid(seed, offset, 1, shape[1], rng.STREAM_BIAS)
    assert (bias.double() - want_b.double()).abs().max().item() <= 3 * EPS32 * rng.Z_MAX


def test_normals_cover_every_radius_and_angle():
    """2**20 Philox words cover each of the 65536 radii and angles (all but ~1e-7 of them); every
    normal within 3 ulps of the contract's Box-Muller in float64 on the same words."""
    rows, groups = 64, 16384
    words = _cpu.philox_words(42, 7, 0, rows, groups)  # bit-exact (test above)
    assert torch.unique(words & 0xFFFF).numel() == 65536 and torch.unique(words >> 16).numel() == 65536
    got = _cpu.normal_grid(42, 7, rows, groups * 8).reshape(rows, groups, 8)
    for i in range(4):
        cos, sin = rng._box_muller(words[..., i])
        for n, want in ((2 * i, cos), (2 * i + 1, sin)):
            ulps = ((got[..., n].double() - want).abs() / (EPS32 * want.abs())).max().item()
            assert ulps <= 3.0, (n, ulps)


@pytest.mark.parametrize("rows", [257, 31, 1])
def test_one_two_and_three_threads_give_the_same_bits(rows):
    # rows go out in blocks of 15 here (16 Ki elements / 1031 columns), taken by whichever thread
    # is free: 257 rows are 18 blocks with a short last one, 31 rows 3 blocks, 1 row one block
    w = torch.randn(rows, 1031)
    sigma = NoiseSpec(0.1, "absmax_per_channel").sigma(w)
    got = []
    for n in (1, 2, 3):
        with _threads(n):
            got.append((_cpu.normal_grid(5, 6, rows, 1031),
                        _cpu.noisy_weight(w, sigma, MODE_ROW, 5, 6, BF16)))
    want = rng.normal_grid(5, 6, rows, 1031).double()
    for z, n in got:  # every row written (not left from an earlier buffer), then the same bits
        assert ((z.double() - want).abs() <= 3 * EPS32 * want.abs()).all()
        assert torch.equal(z, got[0][0]) and torch.equal(n, got[0][1])


@pytest.mark.skipif(len(ISAS) < 2, reason="this CPU has no AVX2 + FMA")
def test_baseline_avx2_and_avx512_give_the_same_bits():
    w = torch.randn(33, 517).to(F16)
    sigma = torch.tensor([0.05])
    out = {}
    for isa in ISAS:
        previous = _cpu.set_kernel_isa(isa)
        try:
            out[isa] = (_cpu.normal_grid(3, 4, 19, 1000),
                        _cpu.noisy_weight(w, sigma, MODE_PROPORTIONAL, 3, 4, BF16))
        finally:
            _cpu.set_kernel_isa(previous)
    for isa in ISAS[1:]:
        assert all(torch.equal(a, b) for a, b in zip(out["baseline"], out[isa], strict=True)), isa


def test_only_the_avx2_and_avx512_copies_use_avx():
    """The build runs on any x86-64 CPU: no VEX- or EVEX-encoded (AVX) instruction outside the
    AVX2 and AVX-512 copies of the kernels, which run only where the CPU has those (objdump of
    the library)."""
    import re
    import shutil

    objdump = shutil.which("objdump")
    if objdump is None or not _cpu.library_path() or not sys.platform.startswith("linux"):
        pytest.skip("needs objdump and the built library on Linux x86-64")
    text = subprocess.run([objdump, "-d", "--no-show-raw-insn", "-C", _cpu.library_path()],
                          capture_output=True, text=True, check=True).stdout
    fn, vex_outside, avx2_ymm, avx512_zmm = None, set(), 0, 0
    for line in text.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if m:
            fn = m.group(1)
            continue
        m = re.match(r"\s+[0-9a-f]+:\s+(v\w+)\s", line)
        if m and fn is not None:
            if "fastnoise_cpu::avx2::" in fn:
                avx2_ymm += "%ymm" in line
                assert "%zmm" not in line, (fn, line)
            elif "fastnoise_cpu::avx512::" in fn:
                avx512_zmm += "%zmm" in line
            else:
                vex_outside.add(fn)
    assert not vex_outside, sorted(vex_outside)[:5]
    assert avx2_ymm > 1000  # the AVX2 copy is vectorised (256-bit registers)
    assert avx512_zmm > 1000  # the AVX-512 copy with 512-bit registers


# ----------------------------------------------------------------------------- W + sigma z
def _sigma(spec_scale, w, b=None, eta=0.1):
    spec = NoiseSpec(eta, spec_scale, noise_bias=b is not None)
    return spec.sigma(w, b), spec.mode


def _close(got, want, sigma_max, name):
    """Same values up to the normals' 3 ulps times sigma, plus one rounding of the output dtype."""
    assert got.dtype == want.dtype and got.shape == want.shape, name
    g, w = got.double(), want.double()
    ulp = torch.finfo(got.dtype).eps
    bound = ulp * w.abs() + 3 * EPS32 * rng.Z_MAX * sigma_max + 1e-30
    bad = (g - w).abs() > bound
    assert not bad.any(), f"{name}: {bad.sum().item()} elements off, max {(g - w).abs().max().item():.3g}"


@pytest.mark.parametrize("scale", ["range", "absmax_per_channel", "proportional"])
@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("wdtype", [F32, BF16, F16], ids=DTYPE_IDS.get)
def test_noisy_weight_every_mode_and_dtype(isa, scale, dtype, wdtype):
    w = (torch.randn(37, 5, 3, 3) * 0.2).to(wdtype)  # K = 45: a partial block per row
    b = torch.randn(37).to(wdtype)
    sigma, mode = _sigma(scale, w, b)
    got = _cpu.noisy_weight(w, sigma, mode, *SEEDS[2], dtype)
    want = reference.noisy_weight(w, sigma, mode, *SEEDS[2], dtype)
    smax = sigma.max().item() * (w.abs().max().item() if mode == MODE_PROPORTIONAL else 1.0)
    _close(got, want, smax, "weight")
    got_b = _cpu.noisy_bias(b, sigma, mode, *SEEDS[2], dtype)
    want_b = reference.noisy_bias(b, sigma, mode, *SEEDS[2], dtype)
    smax_b = sigma.max().item() * (b.abs().max().item() if mode == MODE_PROPORTIONAL else 1.0)
    _close(got_b, want_b, smax_b, "bias")


def _layouts():
    base = torch.randn(11, 6, 3, 5)
    return {
        "2d": torch.randn(41, 401),
        "2d-transposed": torch.randn(130, 41).t(),
        "3d": torch.randn(9, 7, 19),
        "4d-channels-last": base.to(memory_format=torch.channels_last),
        "4d-sliced": base[:, ::2, :, 1:4],
        "5d": torch.randn(4, 3, 2, 3, 5),
        "1d": torch.randn(300),
    }


@pytest.mark.parametrize("layout", list(_layouts()))
def test_noisy_weight_layouts(layout):
    w = _layouts()[layout]
    sigma, mode = _sigma("absmax_per_channel", w)
    got = _cpu.noisy_weight(w, sigma, mode, 77, 3, F32)
    want = reference.noisy_weight(w, sigma, mode, 77, 3, F32)
    _close(got, want, sigma.max().item(), layout)
    if w.dim() == 4 and w.is_contiguous(memory_format=torch.channels_last):
        assert got.is_contiguous(memory_format=torch.channels_last)  # the weight's memory format kept


def test_noisy_bias_strided_and_per_channel():
    b = torch.randn(2 * 131)[::2]
    sigma = torch.rand(131) * 0.1
    got = _cpu.noisy_bias(b, sigma, MODE_ROW, 5, 6, F32)
    want = reference.noisy_bias(b, sigma, MODE_ROW, 5, 6, F32)
    _close(got, want, sigma.max().item(), "bias")


def _special_values(dtype):
    v = [0.0, -0.0, 1.0, -1.0, 65504.0, 65519.99, 65520.0, -70000.0, 2.0**-14, 2.0**-24, 2.0**-25,
         3 * 2.0**-26, 2.0**-126, 1e-40, -1e-42, 3.4e38, math.inf, -math.inf, 1 + 2**-8, 1 + 3 * 2**-9,
         1 + 2**-11, 1 + 3 * 2**-12]
    x = torch.tensor(v, dtype=F64).to(dtype)
    rnd = torch.randint(-(2**31), 2**31 - 1, (4096,), dtype=torch.int32).view(F32)
    rnd = rnd[torch.isfinite(rnd)].to(dtype)
    return torch.cat([x, rnd, torch.randn(2048).to(dtype) * 1e-5])


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("wdtype", [F32, BF16, F16], ids=DTYPE_IDS.get)
def test_rounding_is_torchs(isa, wdtype, dtype):
    """sigma = 0: the output is the input rounded as ``Tensor.to`` rounds it, bit for bit."""
    w = _special_values(wdtype).reshape(1, -1)
    got = _cpu.noisy_weight(w, torch.zeros(1), MODE_TENSOR, 1, 2, dtype)
    want = reference.noisy_weight(w, torch.zeros(1), MODE_TENSOR, 1, 2, dtype)
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    bits = {F32: torch.int32, BF16: torch.int16, F16: torch.int16}[dtype]
    assert torch.equal(got[~nan].view(bits), want[~nan].view(bits))
    nan_in = torch.tensor([[math.nan, 1.0]], dtype=wdtype)
    assert torch.isnan(_cpu.noisy_weight(nan_in, torch.zeros(1), MODE_TENSOR, 1, 2, dtype)[0, 0])


def test_bad_arguments_raise():
    w = torch.randn(4, 5)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        _cpu.noisy_weight(w.double(), torch.ones(1), MODE_TENSOR, 1, 2, F32)
    with pytest.raises(RuntimeError, match="needs 4 sigma"):
        _cpu.noisy_weight(w, torch.ones(1), MODE_ROW, 1, 2, F32)
    with pytest.raises(RuntimeError, match="unknown noise mode"):
        _cpu.noisy_weight(w, torch.ones(1), 7, 1, 2, F32)
    with pytest.raises(RuntimeError, match="seed"):
        _cpu.noisy_weight(w, torch.ones(1), MODE_TENSOR, -1, 2, F32)
    with pytest.raises(RuntimeError, match="isa must be"):
        _cpu.set_kernel_isa("sse9")


def test_empty_weight():
    assert _cpu.noisy_weight(torch.empty(0, 5), torch.ones(1), MODE_TENSOR, 1, 2, F32).shape == (0, 5)
    assert _cpu.noisy_weight(torch.empty(3, 0), torch.ones(3), MODE_ROW, 1, 2, BF16).shape == (3, 0)


# ----------------------------------------------------------------------------- the device helpers
@pytest.mark.parametrize("shape", [(13, 21), (5, 7, 9), (6, 4, 3, 3), (3, 2, 2, 3, 3)], ids=str)
@pytest.mark.parametrize("scale", ["range", "absmax_per_channel", "proportional"])
def test_backends_noisy_weight_and_bias(shape, scale):
    w = torch.randn(shape) * 0.3
    b = torch.randn(shape[0])
    sigma, mode = _sigma(scale, w, b)
    for dtype in (F32, BF16):
        got = _backends.noisy_weight(w, sigma, mode, 11, torch.tensor(4), dtype)
        want = reference.noisy_weight(w, sigma, mode, 11, 4, dtype)
        smax = sigma.max().item() * (w.abs().max().item() if mode == MODE_PROPORTIONAL else 1.0)
        _close(got, want, smax, f"weight {dtype}")
        got_b = _backends.noisy_bias(b, sigma, mode, 11, 4, dtype)
        want_b = reference.noisy_bias(b, sigma, mode, 11, 4, dtype)
        _close(got_b, want_b, sigma.max().item() * max(1.0, b.abs().max().item()), f"bias {dtype}")
    # float64 runs the reference itself
    w64 = w.double()
    assert torch.equal(_backends.noisy_weight(w64, sigma, mode, 11, 4, F64),
                       reference.noisy_weight(w64, sigma, mode, 11, 4, F64))


@pytest.mark.skipif(not dispatch.triton_usable(torch.empty(1))[0], reason="no Triton device")
@pytest.mark.parametrize("shape", [(13,), (13, 21), (5, 7, 9), (6, 4, 3, 3), (3, 2, 2, 3, 3)], ids=str)
def test_backends_triton_route_any_rank(shape):
    """The CUDA route of _backends.noisy_weight (here through the Triton interpreter): any rank."""
    w = torch.randn(shape) * 0.3
    sigma, mode = _sigma("absmax_per_channel", w if w.dim() > 1 else w.reshape(-1, 1))
    got = _backends.triton_noisy_weight(w, sigma, mode, 11, 4, F32)
    want = reference.noisy_weight(w, sigma, mode, 11, 4, F32)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- the auto path
def test_auto_takes_the_cpp_path_on_cpu():
    x, w = torch.randn(3, 8), torch.randn(4, 8)
    xc, wc = torch.randn(1, 4, 5, 5), torch.randn(4, 4, 3, 3)
    geo = ([1, 1], [1, 1], [1, 1], 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backends_linear.choose("auto", x, w) is _backends_cpu.CPU_LINEAR
        assert _backends_linear.choose("auto", x, w, backward=True) is _backends_cpu.CPU_LINEAR
        assert _backends_conv.choose("auto", xc, wc, geo) is _backends_cpu.CPU_CONV2D
        assert _backends_conv.choose("auto", xc, wc, geo, backward=True) is _backends_cpu.CPU_CONV2D
        assert _backends_linear.choose("reference", x, w).name == "reference"
        assert _backends_conv.choose("reference", xc, wc, geo).name == "reference"
        assert _backends_linear.choose("auto", x.double(), w.double()).name == "reference"
        assert _backends_conv.choose("auto", xc.double(), wc.double(), geo).name == "reference"


@pytest.mark.parametrize("scale", ["range", "absmax_per_channel", "proportional"])
@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=DTYPE_IDS.get)
def test_auto_linear_matches_reference(dtype, scale):
    x, w, b = linear_inputs((2, 35), 150, 131, dtype, device="cpu")
    check_against_reference(x, w, b, NoiseSpec(0.1, scale, noise_bias=True), "auto")


def test_auto_linear_odd_shape_and_autocast():
    x, w, b = linear_inputs((3, 41), 401, 127, F32, device="cpu")
    check_against_reference(x, w, b, NoiseSpec(0.1, "absmax_per_channel", noise_bias=True), "auto",
                            autocast=BF16)
    x, w, _ = linear_inputs((7,), 1271, 3, F32, bias=False, device="cpu")
    check_against_reference(x, w, None, NoiseSpec(0.05, "absmax"), "auto")


AUTO_CONV_CASES = [
    Case("3x3-s1-p1-f32", 5, 7, (11, 10), (3, 3), padding=(1, 1)),
    Case("3x3-s2-p1x2-noisebias-absmax-f32-cl", 5, 7, (12, 13), (3, 3), (2, 2), (1, 2), bias="noise",
         scale="absmax", channels_last=True),
    Case("5x3-p2x1-d2-noisebias-perchannel-f16", 5, 7, (13, 11), (5, 3), padding=(2, 1),
         dilation=(2, 2), bias="noise", scale="absmax_per_channel", dtype=F16),
    Case("3x3-g2-cin34-noisebias-proportional-f32-cl", 34, 10, (9, 10), (3, 3), groups=2,
         bias="noise", scale="proportional", channels_last=True),
    Case("depthwise-x2-5x3-s2-d1x2-noisebias-proportional-bf16", 4, 8, (11, 12), (5, 3), (2, 2),
         (2, 2), (1, 2), groups=4, bias="noise", scale="proportional", dtype=BF16),
    Case("1x1-s2-cin37-nobias-perchannel-bf16-cl", 37, 5, (9, 9), (1, 1), (2, 2), bias="none",
         scale="absmax_per_channel", dtype=BF16, channels_last=True),
]


@pytest.mark.parametrize("case", AUTO_CONV_CASES, ids=lambda c: c.name)
def test_auto_conv2d_matches_reference(case):
    run_conv(case, "auto")


def test_auto_conv2d_autocast_bf16():
    run_conv(Case("3x3-autocast-bf16-cl", 5, 7, (9, 11), (3, 3), padding=(1, 1), bias="noise",
                  dtype=BF16, channels_last=True), "auto", autocast=True)


# ----------------------------------------------------------------------------- no library
def test_a_failed_build_falls_back_with_one_warning(monkeypatch):
    def fail():
        raise RuntimeError("compiler exploded\nc++: fatal error: no input files")

    monkeypatch.setattr(_cpu, "_state", {"loaded": None, "why": ""})
    monkeypatch.setattr(_cpu, "_build_and_load", fail)
    monkeypatch.setattr(dispatch, "_warned", set())
    x, w = torch.randn(3, 8), torch.randn(4, 8)
    with pytest.warns(RuntimeWarning, match="no input files.*pure-PyTorch reference") as record:
        assert _backends_linear.choose("auto", x, w).name == "reference"
        assert _backends_linear.choose("auto", x, w, backward=True).name == "reference"
        sigma = torch.tensor([0.1])
        assert torch.equal(_backends.noisy_weight(w, sigma, 0, 1, 2, F32),
                           reference.noisy_weight(w, sigma, 0, 1, 2, F32))
    assert len([r for r in record if issubclass(r.category, RuntimeWarning)]) == 1
    assert not _cpu.available() and "no input files" in _cpu.why_unavailable()


@pytest.mark.slow
def test_fastnoise_no_ext_runs_the_reference_with_one_warning():
    code = (
        "import warnings, torch, fastnoise\n"
        "from fastnoise import _cpu\n"
        "warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as rec:\n"
        "    layer = fastnoise.Linear(8, 4)\n"
        "    x = torch.randn(3, 8, requires_grad=True)\n"
        "    y = layer(x); y.sum().backward(); layer(x)\n"
        "msgs = [str(r.message) for r in rec if issubclass(r.category, RuntimeWarning)]\n"
        "assert len(msgs) == 1 and 'FASTNOISE_NO_EXT=1' in msgs[0], msgs\n"
        "assert not _cpu.available() and torch.isfinite(x.grad).all()\n"
        "print('ok')\n"
    )
    env = dict(os.environ, FASTNOISE_NO_EXT="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
