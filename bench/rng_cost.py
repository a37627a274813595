"""Static cost of the noise generation: sm_90 SASS instructions per normal, no GPU needed.

    python bench/rng_cost.py            # table: contract's normal_tile vs the generic baseline
    python bench/rng_cost.py --json     # the rows as JSON (tests/test_kernels_compile.py)

RNG, not memory, is what a noisy matmul pays for (DESIGN.md), and generating normals is pure
arithmetic without branches, so the number of machine instructions per normal is a fair
first measure of its cost before any GPU is at hand. Each variant is compiled by Triton for
sm_90 into a kernel that writes one ``[BR, BC]`` tile of z per program; ``cuobjdump -sass``
(shipped in Triton's wheel) lists the instructions, counted per opcode and divided by the
normals one thread makes. ``LDL`` / ``STL`` are local-memory traffic (spills or stack arrays).

Variants:

- ``contract``: :func:`fastnoise.kernels.philox.normal_tile`, the package's stream (Philox4x32-10,
  eight normals per call from 16-bit uniforms, cos/sin by quadrant polynomials).
- ``baseline``: the textbook way, four normals per Philox4x32-10 call from 32-bit uniforms with
  ``tl.log``, ``tl.cos`` and ``tl.sin`` (libdevice: general range reduction, a slow path for
  large arguments). This was the package's contract before 2026-11-25.

Static counts include code that rarely runs (the baseline's slow path of sin/cos); timings on a
GPU are the final word (``bench/run_gpu.py``).
"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
import tempfile

import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

from fastnoise.kernels.philox import PHILOX_ROUNDS, normal_tile, philox4x32  # noqa: E402

ARCH = 90
NUM_WARPS = 4


@triton.jit
def _baseline_tile(seed_lo, seed_hi, offset, row0, col0, BR: tl.constexpr, BC: tl.constexpr):
    G: tl.constexpr = BC // 4
    rows = (row0 + tl.arange(0, BR)).to(tl.uint32)
    groups = (col0 // 4 + tl.arange(0, G)).to(tl.uint32)
    c0 = groups[None, :] + tl.zeros((BR, G), tl.uint32)
    c1 = rows[:, None] + tl.zeros((BR, G), tl.uint32)
    c2 = tl.zeros((BR, G), tl.uint32)
    c3 = (tl.zeros((BR, G), tl.uint32) + offset).to(tl.uint32)
    x0, x1, x2, x3 = philox4x32(c0, c1, c2, c3, seed_lo.to(tl.uint32), seed_hi.to(tl.uint32),
                                PHILOX_ROUNDS)
    u0 = ((x0 >> 9).to(tl.float32) * 2.0 + 1.0) * 5.9604644775390625e-08
    u1 = ((x1 >> 9).to(tl.float32) * 2.0 + 1.0) * 5.9604644775390625e-08
    u2 = ((x2 >> 9).to(tl.float32) * 2.0 + 1.0) * 5.9604644775390625e-08
    u3 = ((x3 >> 9).to(tl.float32) * 2.0 + 1.0) * 5.9604644775390625e-08
    r0 = tl.sqrt(-2.0 * tl.log(u0))
    r1 = tl.sqrt(-2.0 * tl.log(u2))
    t0 = 6.283185307179586 * u1
    t1 = 6.283185307179586 * u3
    return tl.interleave(tl.interleave(r0 * tl.cos(t0), r1 * tl.cos(t1)),
                         tl.interleave(r0 * tl.sin(t0), r1 * tl.sin(t1)))


@triton.jit
def _contract_kernel(out, seed_lo, seed_hi, offset, BR: tl.constexpr, BC: tl.constexpr):
    r0 = tl.program_id(0) * BR
    c0 = tl.program_id(1) * BC
    z = normal_tile(seed_lo, seed_hi, offset, 0, r0, c0, BR, BC)
    rows = r0 + tl.arange(0, BR)
    cols = c0 + tl.arange(0, BC)
    tl.store(out + rows[:, None] * 4096 + cols[None, :], z)


@triton.jit
def _baseline_kernel(out, seed_lo, seed_hi, offset, BR: tl.constexpr, BC: tl.constexpr):
    r0 = tl.program_id(0) * BR
    c0 = tl.program_id(1) * BC
    z = _baseline_tile(seed_lo, seed_hi, offset, r0, c0, BR, BC)
    rows = r0 + tl.arange(0, BR)
    cols = c0 + tl.arange(0, BC)
    tl.store(out + rows[:, None] * 4096 + cols[None, :], z)


VARIANTS = {"contract": _contract_kernel, "baseline": _baseline_kernel}
TILES = ((16, 128), (32, 64))
_OPCODE = re.compile(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")


def cuobjdump() -> str:
    return os.path.join(triton.__path__[0], "backends", "nvidia", "bin", "cuobjdump")


def sass_opcodes(kernel, br: int, bc: int) -> collections.Counter:
    """Opcode counts of ``kernel`` compiled for sm_90 with a ``[br, bc]`` tile."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {"out": "*fp32", "seed_lo": "i32", "seed_hi": "i32", "offset": "i32",
           "BR": "constexpr", "BC": "constexpr"}
    src = ASTSource(kernel, sig, {(4,): br, (5,): bc})
    ck = triton.compile(src, target=GPUTarget("cuda", ARCH, 32), options={"num_warps": NUM_WARPS})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(ck.asm["cubin"])
        f.flush()
        sass = subprocess.run([cuobjdump(), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    ops = collections.Counter()
    for line in sass.splitlines():
        m = _OPCODE.match(line)
        if m and m.group(1) != "NOP":
            ops[m.group(1)] += 1
    return ops


def measure() -> list[dict]:
    """One row per (variant, tile): instructions per normal, in all and for a few opcodes."""
    rows = []
    for name, kernel in VARIANTS.items():
        for br, bc in TILES:
            ops = sass_opcodes(kernel, br, bc)
            per_thread = br * bc / (32 * NUM_WARPS)
            rows.append({
                "variant": name, "tile": f"{br}x{bc}",
                "per_normal": sum(ops.values()) / per_thread,
                "integer": sum(ops[k] for k in ("IMAD", "LOP3", "SHF", "IADD3")) / per_thread,
                "float": sum(ops[k] for k in ("FFMA", "FMUL", "FADD")) / per_thread,
                "mufu": ops["MUFU"] / per_thread,
                "local": (ops["LDL"] + ops["STL"]) / per_thread,
                "branches": ops["BRA"] / per_thread,
            })
    return rows


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    rows = measure()
    if "--json" in argv:
        print(json.dumps(rows))
        return 0
    keys = ("variant", "tile", "per_normal", "integer", "float", "mufu", "local", "branches")
    print(f"sm_{ARCH} SASS instructions per generated normal (Triton {triton.__version__}, "
          f"{NUM_WARPS} warps)")
    print("  ".join(f"{k:>10}" for k in keys))
    for r in rows:
        print("  ".join(f"{r[k]:>10.1f}" if isinstance(r[k], float) else f"{r[k]:>10}" for k in keys))
    return 0


if __name__ == "__main__":
    sys.exit(main())
