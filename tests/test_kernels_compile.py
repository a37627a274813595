"""Every Triton kernel in ``kernels/`` compiles ahead of time for an H100 (sm_90), on the CPU.

The other kernel tests run under ``TRITON_INTERPRET=1``, which never calls the real compiler,
so errors only the compiler raises (a plain module global inside ``@triton.jit``, an unsupported
dtype in ``tl.dot``, a ptxas failure) would first show on a GPU. Here a subprocess without
``TRITON_INTERPRET`` (``tests/_compile_kernels.py``) compiles each kernel with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` down to a cubin, with the
signatures the host launchers really pass (recorded from the launchers themselves) for every
dtype they accept (fp32, bf16, fp16, and fp32 weights with bf16 compute as under autocast),
every noise mode, the bias / noise-bias flags, split-K, the depthwise kernel and every config of
the modules' autotune lists. ``FASTNOISE_COMPILE_FULL=1`` widens it to every config in every
dtype and mode (minutes: for a many-core machine); ``-s`` prints registers and spills.

Spills (``n_spills`` = ptxas's spill-store bytes / 4) are asserted where the code claims none:
every 16-bit / autocast case of noise_gen, the conv kernels, the matmul (but its last config) and
the crossbar tile's kernel; the others are recorded. Measured with
Triton 3.8's ptxas, default tier, after the 16-bit noise contract (2026-11-25): noise_gen spills
in no case; 16-bit and autocast matmul spill in no config but the last (BM128 BP128 BR32: 2);
float32 matmul (IEEE dots, which the dispatcher sends to cuBLAS) spills 0-10 with the first
config (earlier FULL-tier runs saw up to ~2700 with the large configs); the implicit-GEMM conv
spills in no config in 16-bit or under autocast (its config list was chosen for that, see
``kernels/noisy_conv.py``) and 6-7 in float32 (sent to cuDNN); the depthwise conv spills in no
dtype. The tile kernel (2026-12-02): no spills in 16-bit or under autocast in any config, none
in float32 with IEEE dots, 1 with TF32; two things gave it frames before, both calls: IEEE
float32 division (``div_rn``'s slow path; it divides by a float64 reciprocal instead) and int64
division (its row index is divided in int32). Stack frames come from spills only: the
libdevice sin/cos slow path (a 32-byte frame in every kernel before) is gone with the contract's
quadrant polynomials.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).with_name("_compile_kernels.py")
MODULES = ("noise_gen", "noisy_matmul", "noisy_conv", "pcm_chip", "tile_matmul")
# the (parameter -> compute dtype, mode) pairs every kernel must be compiled for
DTYPE_TAGS = ("fp32->fp32", "bf16->bf16", "fp16->fp16", "fp32->bf16")
MODES = (0, 1, 2)
# modules whose kernels have one dtype and no noise mode by design (the PCM chip's kernels read a
# float32 [out, K] view of any weight): every entry point compiled for each of these cases instead
ONE_DTYPE_CASES = {"pcm_chip": ("float32 conv-sized weight", "float32 odd weight")}


def _ptxas():
    if os.environ.get("TRITON_PTXAS_PATH"):
        path = Path(os.environ["TRITON_PTXAS_PATH"])
    else:
        spec = importlib.util.find_spec("triton")
        if spec is None or spec.origin is None:
            return None
        path = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return path if path.is_file() else None


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One subprocess compiles all kernel files (one interpreter start, one worker pool)."""
    if _ptxas() is None:
        pytest.skip("ptxas not found (shipped in the triton wheel under triton/backends/nvidia/bin)")
    tmp = tmp_path_factory.mktemp("aot_compile")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # a fresh cache: every kernel really compiles (and ptxas prints its -v log)
    env.update(TRITON_CACHE_DIR=str(tmp / "cache"), TRITON_DUMP_PTXAS_LOG="1")
    out = tmp / "report.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out), *MODULES], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and out.exists(), \
        f"{SCRIPT.name} exited with {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    rep = json.loads(out.read_text())
    if rep["status"] == "skip":
        pytest.skip(rep["reason"])
    busy = sum(r.get("seconds", 0) for m in rep["modules"].values() for r in m["results"])
    print(f"\n[aot] triton {rep['triton']} {rep['arch']}: {rep['jobs']} compiles, {busy:.0f} s of "
          f"compiling in {rep['wall_seconds']} s on {rep['workers']} workers")
    return rep


def _table(results):
    rows = [f"{'kernel':<28} {'case':<46} {'config':<24} n_regs n_spills stack_B"]
    for r in results:
        if r["ok"]:
            rows.append(f"{r['kernel']:<28} {r['case']:<46} {r['config']:<24} {r['n_regs']!s:>6} "
                        f"{r['n_spills']!s:>8} {r['stack_bytes']!s:>7}")
        else:
            rows.append(f"{r['kernel']:<28} {r['case']:<46} {r['config']:<24} FAILED")
    return "\n".join(rows)


@pytest.mark.parametrize("module", MODULES)
def test_kernels_compile_for_sm90(report, module):
    rep = report["modules"][module]
    assert rep["error"] is None, f"recording {module}'s launches failed: {rep['error']}"
    results = rep["results"]
    print(f"\n[aot] kernels/{module}.py\n{_table(results)}")

    failed = [r for r in results if not r["ok"]]
    assert not failed, "\n\n".join(f"{r['kernel']} [{r['case']}] [{r['config']}]:\n{r['error']}"
                                   for r in failed)
    for r in results:
        assert r["cubin_bytes"] > 0 and r["cubin_elf"], r
        assert r["n_regs"] is not None and 0 < r["n_regs"] <= 255, r

    # every kernel of the file, in every dtype and mode, and with every config of its autotune list
    assert rep["entry_points"], f"no @triton.jit kernel found in kernels/{module}.py"
    for kernel in rep["entry_points"]:
        mine = [r for r in results if r["kernel"] == kernel]
        if module in ONE_DTYPE_CASES:
            missing = set(ONE_DTYPE_CASES[module]) - {r["case"] for r in mine}
        else:
            done = {tuple(r["case"].split()[:2]) for r in mine}
            missing = {(t, f"mode{m}") for t in DTYPE_TAGS for m in MODES} - done
        assert not missing, f"{kernel}: not compiled for {sorted(missing)}"
        configs = sorted({r["config"] for r in mine})
        assert len(configs) == rep["configs"][kernel], \
            f"{kernel}: {rep['configs'][kernel]} autotune configs, compiled {configs}"

    # spill-free where the code says so (16-bit compute; matmul: all configs but the last)
    last_matmul = "BM128 BP128 BR32 w8 s3"
    spilling = [r for r in results if not r["case"].startswith("fp32->fp32")
                and not (module == "noisy_matmul" and r["config"] == last_matmul)
                and r["n_spills"]]
    assert not spilling, "\n".join(f"{r['kernel']} [{r['case']}] [{r['config']}]: "
                                   f"{r['n_spills']} spills" for r in spilling)


def test_rng_cost_contract_is_cheaper_than_textbook_box_muller():
    """``bench/rng_cost.py``: the contract's normal_tile compiles for sm_90 to fewer than half the
    instructions per normal of four-per-call Box-Muller with libdevice log/sin/cos, with no
    local-memory traffic and no branches beyond the loop-free kernel's own."""
    if _ptxas() is None:
        pytest.skip("ptxas not found (shipped in the triton wheel under triton/backends/nvidia/bin)")
    script = Path(__file__).parents[1] / "bench" / "rng_cost.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(script), "--json"], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    by = {(r["variant"], r["tile"]): r for r in rows}
    for (variant, tile), r in by.items():
        if variant != "contract":
            continue
        base = by[("baseline", tile)]
        assert r["per_normal"] < 0.5 * base["per_normal"], (r, base)
        assert r["local"] == 0 and r["branches"] <= 0.25, r
        assert r["per_normal"] < 60, r  # 47 with Triton 3.8
