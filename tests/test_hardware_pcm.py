"""fastnoise.PCM: the published formulas, stateless chips, the layers' paths, and aihwkit itself."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from _aihwkit import aihwkit_modules
from torch import nn

import fastnoise
from fastnoise import PCM, rng
from fastnoise._hardware_ops import _cpu_normal, _triton_normal, hardware_weight
from fastnoise.hardware import HardwareRead, by_name, reference_normal
from fastnoise.modules import _DRAW_TAG

T0 = 20.0
HOUR, DAY, YEAR = 3600.0, 86400.0, 3.15e7


def _weights(out=256, k=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(out, k, generator=g, dtype=torch.float64) * 2 - 1


def _bins(w, n=5):
    """Masks of |W| / max|W| in n equal bins (the lowest bin skipped: conductances near 0)."""
    a = w.abs() / w.abs().max()
    edges = torch.linspace(0, 1, n + 1)
    pairs = zip(edges[1:-1], edges[2:], strict=True)
    return [(float(lo), float(hi), (a >= lo) & (a < hi)) for lo, hi in pairs]


# ----------------------------------------------------------------------------- the formulas
def test_programming_std_per_conductance_bin():
    """Only programming: W_p s = g+_p - g-_p, g- = max(0, c0 z) (its target is 0), so per bin
    var = sigma_p(g)^2 + c0^2 (1/2 - 1/(2 pi)) for targets far above 0."""
    pcm = PCM(drift_scale=0.0, read_noise_scale=0.0, compensation=False)
    w = _weights(256, 512).abs()
    we = pcm.effective_weight(w, key=7, chip=3, t=0.0)
    s = pcm.g_max / w.abs().max()
    err = (we - w) * s  # uS
    c0, c1, c2 = pcm.prog_coeff
    for lo, hi, m in _bins(w):
        x = (w * s / pcm.g_max)[m]
        sig2 = (c0 + c1 * x + c2 * x * x) ** 2
        expect = math.sqrt(float(sig2.mean()) + c0 ** 2 * (0.5 - 1 / (2 * math.pi)))
        got = float(err[m].std())
        n = int(m.sum())
        assert abs(got / expect - 1) < 4 / math.sqrt(2 * n) + 0.01, (lo, hi, got, expect)
        # the mean error: E max(0, g + sigma z) - E max(0, c0 z) ~ -c0 / sqrt(2 pi)
        assert abs(float(err[m].mean()) + c0 / math.sqrt(2 * math.pi)) < 5 * expect / math.sqrt(n)


@pytest.mark.parametrize("t", [HOUR, DAY, YEAR], ids=["1h", "1day", "1year"])
def test_mean_drift_factor(t):
    """Only drift: W_t / W = ((t + t0) / t0)^-nu, nu = |mu + sd z|; the mean per bin against the
    expectation over z (a fine quadrature), within sampling error."""
    pcm = PCM(prog_noise_scale=0.0, read_noise_scale=0.0, compensation=False)
    w = _weights(128, 256).abs().clamp(min=1e-3)
    ratio = pcm.effective_weight(w, key=11, chip=0, t=t) / w
    L = math.log((t + T0) / T0)
    z = torch.linspace(-6, 6, 241, dtype=torch.float64)
    pdf = torch.exp(-z * z / 2) / math.sqrt(2 * math.pi)
    g = w / w.max() * pcm.g_max
    for lo, hi, m in _bins(w):
        mu, sd = pcm.drift_stats(g[m])
        f = torch.exp(-(mu[:, None] + sd[:, None] * z[None, :]).abs() * L)  # [n, z]
        expect = float(((f * pdf).sum(1) * (z[1] - z[0])).mean())
        got = ratio[m]
        se = float(got.std()) / math.sqrt(int(m.sum()))
        assert abs(float(got.mean()) - expect) < 5 * se + 1e-4, (t, lo, hi, float(got.mean()), expect)
    # and the headline numbers: a device at g_max keeps (1 + t/t0)^-mu on average, mu = 0.049
    top = ratio[w >= 0.95 * w.max()]
    assert float(top.mean()) == pytest.approx(((t + T0) / T0) ** -0.049, rel=0.02)


@pytest.mark.parametrize("t", [0.0, DAY, YEAR], ids=["0", "1day", "1year"])
def test_read_noise_std(t):
    """Only read noise: W_t / W - 1 has std Q(g) sqrt(ln((t + t0 + t_read) / (2 t_read))) per bin."""
    pcm = PCM(prog_noise_scale=0.0, drift_scale=0.0, compensation=False)
    w = _weights(256, 256).abs()
    rel = pcm.effective_weight(w, key=5, chip=2, t=t, read=9) / w - 1
    g = w / w.max() * pcm.g_max
    q = (0.0088 / ((g / pcm.g_max) ** 0.65).clamp(min=1e-3)).clamp(max=0.2)
    root = math.sqrt(math.log((t + T0 + pcm.t_read) / (2 * pcm.t_read)))
    for lo, hi, m in _bins(w):
        expect = float((q[m] ** 2).mean().sqrt()) * root
        n = int(m.sum())
        assert float(rel[m].std()) == pytest.approx(expect, rel=4 / math.sqrt(2 * n) + 0.01), (lo, hi)


def test_compensation_restores_the_mean_magnitude():
    pcm = PCM()
    w = _weights(128, 128)
    for t in (DAY, YEAR):
        on = pcm.effective_weight(w, 1, 0, t)
        off = PCM(compensation=False).effective_weight(w, 1, 0, t)
        wp, _ = pcm.programmed(w, 1, 0)
        assert float(on.abs().mean()) == pytest.approx(float(wp.abs().mean()), rel=1e-6)
        assert float(off.abs().mean()) < 0.8 * float(wp.abs().mean())  # drift shrinks it
        torch.testing.assert_close(on, off * (on.abs().mean() / off.abs().mean()))


# ----------------------------------------------------------------------------- stateless chips
def test_chips_are_functions_of_key_chip_and_read():
    pcm = PCM()
    w = _weights(37, 41).float()
    a = pcm.effective_weight(w, 3, 5, DAY, read=0)
    assert torch.equal(a, pcm.effective_weight(w, 3, 5, DAY, read=0))
    assert not torch.allclose(a, pcm.effective_weight(w, 3, 6, DAY, read=0))  # another chip
    assert not torch.allclose(a, pcm.effective_weight(w, 4, 5, DAY, read=0))  # another key (weight)
    b = pcm.effective_weight(w, 3, 5, DAY, read=1)
    assert not torch.allclose(a, b)  # a fresh read
    # programming and drift are the chip's: without read noise every read (and 0 s) agree
    quiet = PCM(read_noise_scale=0.0)
    assert torch.equal(quiet.effective_weight(w, 3, 5, DAY, read=0),
                       quiet.effective_weight(w, 3, 5, DAY, read=7))
    assert torch.equal(pcm.programmed(w, 3, 5)[0], pcm.programmed(w, 3, 5)[0])
    # the same devices age: the chip's nu, not a new draw, at every time
    nodrift = PCM(read_noise_scale=0.0, compensation=False)
    d1, d2 = (nodrift.effective_weight(w, 3, 5, t) for t in (HOUR, YEAR))
    nu1 = -torch.log(d1 / pcm.programmed(w, 3, 5)[0]) / math.log((HOUR + T0) / T0)
    nu2 = -torch.log(d2 / pcm.programmed(w, 3, 5)[0]) / math.log((YEAR + T0) / T0)
    ok = pcm.programmed(w, 3, 5)[0].abs() > 1e-3
    torch.testing.assert_close(nu1[ok], nu2[ok], rtol=1e-3, atol=1e-4)


def test_streams_and_counter_words():
    """The documented draws: stream 2 rows d * out + r at offset chip, 3 and 4 as documented."""
    seen = []

    def spy(key, offset, rows, cols, stream, device):
        seen.append((key, offset, rows, cols, stream))
        return reference_normal(key, offset, rows, cols, stream, device)

    PCM().effective_weight(torch.ones(3, 10), 99, 4, 1.0, read=6, normal=spy)
    assert seen == [(99, 4, 6, 10, 2), (99, 4, 3, 10, 3), (rng.mix64(99, 0x7EAD, 4), 6, 3, 10, 4)]


_CHILD = """
import torch, fastnoise
w = (torch.arange(35 * 29, dtype=torch.float32).reshape(35, 29) % 17 - 8) / 8
print(repr(fastnoise.PCM().effective_weight(w, 12345, 2, 86400.0, 3).double().sum().item()))
"""


@pytest.mark.slow
def test_same_chip_in_another_process():
    w = (torch.arange(35 * 29, dtype=torch.float32).reshape(35, 29) % 17 - 8) / 8
    here = PCM().effective_weight(w, 12345, 2, 86400.0, 3).double().sum().item()
    out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, check=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert float(out.stdout.strip()) == here


@pytest.mark.parametrize("gen", ["cpu", "triton"])
def test_generators_match_the_reference(gen):
    """The C++ and Triton generators give the reference's chip (normals within a few ulps)."""
    from fastnoise import _cpu

    if gen == "cpu" and not _cpu.available():
        pytest.skip(f"the C++ CPU library is not built: {_cpu.why_unavailable()}")
    if gen == "triton":
        from fastnoise import dispatch

        if not dispatch.triton_usable(torch.empty(1))[0]:
            pytest.skip("Triton cannot run here")
    normal = _cpu_normal if gen == "cpu" else _triton_normal
    w = _weights(19, 41).float()
    ref = PCM().effective_weight(w, 77, 3, DAY, read=2)
    got = PCM().effective_weight(w, 77, 3, DAY, read=2, normal=normal)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6 * float(w.abs().max()))


# ----------------------------------------------------------------------------- the C++ chip op
def _cpu_or_skip():
    from fastnoise import _cpu

    if not _cpu.available():
        pytest.skip(f"the C++ CPU library is not built: {_cpu.why_unavailable()}")
    return _cpu


_CPU_CASES = {
    "default": PCM(),
    "no-compensation": PCM(compensation=False),
    "scaled": PCM(g_max=10.0, prog_noise_scale=2.0, read_noise_scale=0.5, drift_scale=1.5),
    "cubic-programming": PCM(prog_coeff=(0.1, 0.5, 0.2, 0.3)),
    "noise-off": PCM(prog_noise_scale=0.0, read_noise_scale=0.0, drift_scale=0.0),
}


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
@pytest.mark.parametrize("case", list(_CPU_CASES))
def test_cpu_chip_op_computes_the_reference_chip(isa, case):
    """The C++ op (three passes, polynomial ln / exp) is the reference's chip on the same normals:
    odd shapes (a conv's 4-D weight, a row shorter than a Philox block, rows of several blocks),
    a zero element, every t from 0 to a year, each kernel copy."""
    cpu = _cpu_or_skip()
    try:
        previous = cpu.set_kernel_isa(isa)
    except RuntimeError as e:
        pytest.skip(str(e))
    try:
        pcm = _CPU_CASES[case]
        g = torch.Generator().manual_seed(3)
        for shape in ((5, 3, 3, 3), (7, 3), (33, 301)):
            w = torch.randn(*shape, generator=g) * 0.1
            w.view(-1)[1] = 0.0
            for t in (0.0, 1.0, DAY, YEAR):
                r = HardwareRead(pcm, t, 3, 7)
                got = hardware_weight(w, r, 12345)  # the op
                ref = hardware_weight(w, r, 12345, normal=reference_normal)  # PyTorch, same normals
                assert got.shape == w.shape and got.dtype == w.dtype
                torch.testing.assert_close(got, ref, rtol=1e-5, atol=2e-6 * float(w.abs().max()))
    finally:
        cpu.set_kernel_isa(previous)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_chip_op_half_weights(dtype):
    """A half-precision weight: the chip of its float32 value, rounded once to its dtype."""
    _cpu_or_skip()
    w = (torch.randn(17, 40, generator=torch.Generator().manual_seed(1)) * 0.1).to(dtype)
    r = HardwareRead(PCM(), DAY, 2, 0)
    got = hardware_weight(w, r, 99)
    ref = PCM().effective_weight(w.float(), 99, 2, DAY, 0).to(dtype)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), ref.float(), rtol=1e-2, atol=1e-3 * float(w.abs().max()))


def test_cpu_chip_op_does_not_depend_on_threads():
    _cpu_or_skip()
    w = torch.randn(300, 700, generator=torch.Generator().manual_seed(2))
    r = HardwareRead(PCM(), YEAR, 1, 4)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = hardware_weight(w, r, 5)
        torch.set_num_threads(2)
        two = hardware_weight(w, r, 5)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


@pytest.mark.parametrize("case", ["default", "no-compensation", "cubic-programming"])
def test_triton_chip_kernels_compute_the_reference_chip(case):
    """kernels/pcm_chip.py (what a CUDA weight runs), here under the interpreter: the reference's
    chip for odd shapes (rows and columns past one block) and times 0 .. a year, a read number
    past 2**31."""
    from fastnoise import dispatch
    from fastnoise._hardware_ops import _pcm_triton

    if not dispatch.triton_usable(torch.empty(1))[0]:
        pytest.skip("Triton cannot run here")
    pcm = _CPU_CASES[case]
    g = torch.Generator().manual_seed(5)
    for shape in ((5, 2, 3, 3), (19, 150)):
        w = torch.randn(*shape, generator=g) * 0.1
        for t in (0.0, DAY, YEAR):
            got = _pcm_triton(pcm, w, 2**40 + 3, 6, t, 2**31 + 1).reshape(w.shape)
            ref = pcm.effective_weight(w, 2**40 + 3, 6, t, 2**31 + 1).reshape(w.shape)
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=2e-6 * float(w.abs().max()))


class _OwnDevice(PCM):
    """A device of one's own: the C++ op must not stand in for its functions."""

    def read_std(self, g, t):
        return torch.full_like(g, 0.05)


def test_own_device_functions_are_not_replaced_by_the_cpu_op():
    _cpu_or_skip()
    w = torch.randn(9, 31, generator=torch.Generator().manual_seed(4))
    r = HardwareRead(_OwnDevice(), DAY, 0, 0)
    got = hardware_weight(w, r, 7)
    torch.testing.assert_close(got, _OwnDevice().effective_weight(w, 7, 0, DAY, 0))
    assert not torch.allclose(got, PCM().effective_weight(w, 7, 0, DAY, 0))
    five = PCM(prog_coeff=(0.2, 0.1, 0.1, 0.1, 0.1))  # over the op's four coefficients: PyTorch
    torch.testing.assert_close(hardware_weight(w, HardwareRead(five, DAY, 0, 0), 7),
                               five.effective_weight(w, 7, 0, DAY, 0))


# ----------------------------------------------------------------------------- the layers
def _key(layer, name="weight", seed=0):
    return rng.mix64(seed, *layer._noise_wids[name], _DRAW_TAG)


class _MatmulUser(nn.Module):
    """A weight used outside any module forward (the intercept path)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 9))

    def forward(self, x):
        return x @ self.w.t()


def test_layers_compute_the_reference_chip(one_thread):
    model = nn.Sequential(nn.Conv2d(2, 5, 3), nn.Flatten(), nn.Linear(5 * 4 * 4, 9), _MatmulUser())
    model = fastnoise.convert(model, fastnoise.NoiseSpec(eta=0.05)).eval()
    x = torch.randn(3, 2, 6, 6)
    pcm = PCM()
    conv, lin, mm = model[0], model[2], model[3]
    with torch.no_grad(), fastnoise.noise(hardware=pcm, t=DAY, draw=4, seed=9):
        y = model(x)
        y2 = model(x)

    def chip(layer, name, read):
        w = getattr(layer, name)
        return pcm.effective_weight(w, _key(layer, name, 9), 4, DAY, read).reshape(w.shape)

    with torch.no_grad():
        for out, read in ((y, 0), (y2, 1)):
            h = F.conv2d(x, chip(conv, "weight", read), conv.bias).flatten(1)
            h = F.linear(h, chip(lin, "weight", read), lin.bias)
            ref = h @ chip(mm, "w", read).t()
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(y, y2)  # a fresh read per forward
    with torch.no_grad(), fastnoise.noise(hardware=pcm, t=DAY, draw=4, seed=9):
        assert torch.equal(model(x), y)  # a new block reads from 0 again
    with torch.no_grad(), fastnoise.noise(hardware=pcm, t=DAY, draw=5, seed=9):
        assert not torch.allclose(model(x), y)


def test_straight_through_gradient():
    lin = fastnoise.Linear(7, 3)
    with fastnoise.noise(hardware="pcm", t=1.0, draw=0):
        lin(torch.randn(2, 7)).sum().backward()
    assert lin.weight.grad is not None and lin.weight.grad.shape == lin.weight.shape
    r = HardwareRead(PCM(), 1.0, 0, 0)
    w = torch.randn(4, 5, requires_grad=True)
    out = hardware_weight(w, r, 3)
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


def test_evaluate_robustness_over_time(tmp_path, one_thread):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))
    x = torch.randn(64, 12)
    y = model(x).argmax(-1)
    loader = [(x[:32], y[:32]), (x[32:], y[32:])]
    a = fastnoise.convert(model, fastnoise.NoiseSpec(eta=0.05))
    b = fastnoise.convert(nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3)),
                          fastnoise.NoiseSpec(eta=0.05))
    b.load_state_dict(a.state_dict())
    times = [0, 1, DAY, YEAR]
    ra = fastnoise.evaluate_robustness(a, loader, hardware=PCM(), times=times, draws=3, seed=4,
                                       progress=False)
    rb = fastnoise.evaluate_robustness(b, loader, hardware="pcm", times=times, draws=3, seed=4,
                                       progress=False)
    assert ra.times == [0.0, 1.0, DAY, YEAR] and [len(v) for v in ra.accuracies] == [3] * 4
    assert ra.accuracies == rb.accuracies  # the same chips for the same layer names
    assert "| t (s) |" in ra.table() and "pcm chips" in ra.table()
    ra.to_csv(tmp_path / "r.csv")
    assert (tmp_path / "r.csv").read_text().startswith("t,draws,mean")
    from fastnoise.robustness import results_table

    assert results_table({"a": ra, "b": rb}).startswith("| t (s) | a | b |")
    ra.plot(str(tmp_path / "r.png"))
    assert (tmp_path / "r.png").stat().st_size > 0
    # the chips differ from each other and from the clean model at a year
    assert len(set(ra.accuracies[-1])) > 1 or ra.accuracies[-1][0] < 100.0


@pytest.mark.parametrize("call, match", [
    (lambda: PCM(g_max=0), "g_max must be a finite number > 0, got 0"),
    (lambda: PCM(g_max=-25.0), "g_max .* got -25.0"),
    (lambda: PCM(prog_noise_scale=-1), "prog_noise_scale .* >= 0, got -1"),
    (lambda: PCM(read_noise_scale=float("nan")), "read_noise_scale .* got nan"),
    (lambda: PCM(drift_scale=-0.5), "drift_scale .* got -0.5"),
    (lambda: by_name("rram"), "unknown hardware model 'rram'"),
    (lambda: fastnoise.noise(hardware="rram", t=1).__enter__(), "unknown hardware model 'rram'"),
    (lambda: fastnoise.noise(hardware=PCM(), t=-1).__enter__(), r"t \(seconds after programming\).* got -1"),
    (lambda: fastnoise.noise(hardware=PCM()).__enter__(), "needs t="),
    (lambda: fastnoise.noise(t=5).__enter__(), "t=5 is the time on a chip"),
    (lambda: PCM().effective_weight(torch.ones(2, 2), 0, 0, -3.0), "got -3.0"),
], ids=["g_max0", "g_max_neg", "prog_neg", "read_nan", "drift_neg", "name", "ctx_name", "t_neg",
        "no_t", "t_alone", "ew_t_neg"])
def test_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_errors_of_evaluate_robustness():
    model = fastnoise.convert(nn.Sequential(nn.Linear(3, 2)), fastnoise.NoiseSpec(eta=0.05))
    loader = [(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))]
    ev = fastnoise.evaluate_robustness
    with pytest.raises(ValueError, match="draws must be an int >= 1, got 0"):
        ev(model, loader, hardware=PCM(), times=[1], draws=0, progress=False)
    with pytest.raises(ValueError, match=r"t \(seconds after programming\).* got -5"):
        ev(model, loader, hardware=PCM(), times=[1, -5], draws=1, progress=False)
    with pytest.raises(ValueError, match="unknown hardware model 'foo'"):
        ev(model, loader, hardware="foo", times=[1], draws=1, progress=False)
    with pytest.raises(ValueError, match="hardware='pcm' was given, but the model has no fastnoise layers"):
        ev(nn.Sequential(nn.Linear(3, 2)), loader, hardware=PCM(), times=[1], draws=1, progress=False)
    with pytest.raises(ValueError, match="needs times="):
        ev(model, loader, hardware=PCM(), draws=1, progress=False)


# ----------------------------------------------------------------------------- aihwkit itself
@pytest.mark.parametrize("t", [1.0, DAY, YEAR], ids=["1s", "1day", "1year"])
def test_against_aihwkit_pcm_like_noise_model(t, one_thread):
    """aihwkit 1.2.0's PCMLikeNoiseModel through its tile's flow (program_weights: programming noise
    and nu; drift_weights(t): drift and read noise of the programmed weights; GlobalDriftCompensation
    of the identity's readout) against fastnoise's chip: the error's mean and std per |W| bin agree
    within sampling error."""
    pcm_mod, drift_mod = aihwkit_modules()
    w = _weights(256, 256).float()
    amax = float(w.abs().max())
    torch.manual_seed(123)
    nm = pcm_mod.PCMLikeNoiseModel()
    comp = drift_mod.GlobalDriftCompensation()
    eye = torch.eye(w.shape[1])
    ref_err, ours_err = [], []
    for chip in range(2):
        wp, nus = nm.apply_programming_noise(w)
        baseline = comp.readout(eye @ wp.t())
        wt = nm.apply_drift_noise(wp, nus, t)
        alpha = comp.apply(eye @ wt.t(), baseline)
        ref_err.append((alpha * wt - w) / amax)
        ours_err.append((PCM().effective_weight(w, 31, chip, t) - w) / amax)
    ref_err, ours_err = torch.cat(ref_err), torch.cat(ours_err)
    ww = torch.cat([w, w])
    for lo, hi, m in _bins(ww):
        n = int(m.sum())
        a, b = ref_err[m], ours_err[m]
        assert float(b.std()) == pytest.approx(float(a.std()), rel=5 / math.sqrt(n) + 0.03), (lo, hi)
        se = math.sqrt((float(a.var()) + float(b.var())) / n)
        assert abs(float(a.mean()) - float(b.mean())) < 5 * se + 2e-3, (lo, hi)


# ----------------------------------------------------------------------------- the CLI
_TINY = ["model.arch=digits_mlp", "method.layers=[fc1]", "teacher.epochs=1", "schedule.epochs=1",
         "data.batch_size=256", "eval.epoch_draws=0"]


def test_cli_study_and_eval_on_chips(tmp_path, capsys, one_thread):
    import csv

    from fastnoise.cli import main

    out = str(tmp_path / "study")
    argv = ["study", "--recipe", "digits", "--out", out, "--seeds", "0", "1", "--etas", "0", "0.1",
            "--draws", "2", "--methods", "noise", "kd", "--no-progress", "--device", "cpu", *_TINY]
    assert main([*argv, "--hardware", "pcm", "--times", "1", "86400"]) == 0
    text = capsys.readouterr().out
    assert "pcm chips over time" in text and "| t (s) | teacher | noise | kd |" in text
    assert "| t (s) | kd - noise |" in text and "| 86400 |" in text
    with open(os.path.join(out, "chip_accuracies.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 2 * 2 * 2  # models x seeds x times x chips
    assert os.path.getsize(os.path.join(out, "chip.png")) > 0
    # the teacher met the same chips as evaluate_robustness gives it (chips = the seed)
    assert main(["eval", "--run", os.path.join(out, "seed0", "noise"), "--hardware", "pcm", "--times", "1",
                 "--draws", "2", "--no-progress", "--device", "cpu", "--out", str(tmp_path / "ev")]) == 0
    assert "| t (s) | draws |" in capsys.readouterr().out
    assert main([*argv, "--resume", "--hardware", "pcm", "--times", "1"]) == 2
    assert "hardware differ" in capsys.readouterr().err
    assert main([*argv, "--out", str(tmp_path / "s2"), "--hardware", "rram"]) == 2
    assert "unknown hardware model 'rram'" in capsys.readouterr().err
    assert main([*argv, "--out", str(tmp_path / "s3"), "--times", "5"]) == 2
    assert "give --hardware too" in capsys.readouterr().err
    assert main([*argv, "--out", str(tmp_path / "s4"), "--hardware", "pcm", "--times", "-1"]) == 2
    assert "got -1.0" in capsys.readouterr().err


class _TiledMatmulUser(nn.Module):
    """A tiled layer whose weight is also used outside its forward (the intercept path)."""

    def __init__(self, tile):
        super().__init__()
        self.lin = nn.Linear(12, 5)
        self.tile = tile

    def forward(self, x):
        return F.linear(x, self.lin.weight, self.lin.bias)


def test_a_layer_on_a_crossbar_tile_runs_the_chip_through_its_tile():
    """On a chip a tiled layer is the chip's weight through the tile's converters (DAC, ADC with
    its bound, output noise per read; no weight noise): the reference tile on the reference chip,
    for a Linear, a Conv2d and a weight used outside its module (the intercept path)."""
    from fastnoise.hardware.base import read_key
    from fastnoise.reference import tile_linear_forward

    tile = fastnoise.TileSpec(max_input_size=8, inp_bits=8, out_bits=8, out_bound=10.0, out_noise=0.05)
    pcm = PCM()
    lin = fastnoise.Linear(12, 5, tile=tile).eval()
    conv = fastnoise.Conv2d(2, 3, 2, tile=tile).eval()
    user = fastnoise.convert(_TiledMatmulUser(tile), fastnoise.NoiseSpec(0.05), tile=tile).eval()
    x, xc = torch.randn(3, 12), torch.randn(2, 2, 4, 4)

    def ref(layer, w2d, x2d, read, seed=9):
        key = _key(layer, "weight", seed)
        w = pcm.effective_weight(w2d, key, 4, DAY, read)
        r = layer._parameters.get("input_range")
        return tile_linear_forward(x2d, w, layer.bias, r, tile, None, 0, False, read_key(key, 4), read,
                                   weight_noise=False)

    with torch.no_grad(), fastnoise.noise(hardware=pcm, t=DAY, draw=4, seed=9):
        y0, y1 = lin(x), lin(x)
        yc = conv(xc)
        yu = user(x)
    with torch.no_grad():
        torch.testing.assert_close(y0, ref(lin, lin.weight, x, 0), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(y1, ref(lin, lin.weight, x, 1), rtol=1e-4, atol=1e-5)
        cols = F.unfold(xc, 2).transpose(1, 2)
        want = ref(conv, conv.weight.reshape(3, -1), cols, 0).transpose(1, 2).reshape(2, 3, 3, 3)
        torch.testing.assert_close(yc, want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(yu, ref(user.lin, user.lin.weight, x, 0), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(y0, y1)  # a fresh read (and output noise) per forward
        # and not the chip without its tile
        assert not torch.allclose(y0, F.linear(x, pcm.effective_weight(lin.weight, _key(lin, "weight", 9),
                                                                        4, DAY, 0), lin.bias), atol=1e-3)
