"""Check and time everything on one GPU in one call; print a short table last.

    python bench/run_gpu.py                 # on the GPU machine; full results under $OUT
    python bench/run_gpu.py --quick         # tiny shapes; also runs on CPU (TRITON_INTERPRET=1)
    python bench/run_gpu.py --only linear   # one part

Each part (``bench/gpu_linear.py``, ``bench/gpu_conv.py``) checks correctness at full sizes
against the in-package reference first, then times with medians, and returns rows
``{"case", "metric", "value", "target", "ok"}``. A part that raises is reported as a failed row;
the others still run. Full JSON goes to ``$OUT`` (or ``--out``), the summary table to stdout.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import sys
import time
import traceback

PARTS = ("linear", "conv")


def environment() -> dict:
    import torch

    env = {
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def table(rows: list[dict]) -> str:
    head = ("part", "case", "metric", "value", "target", "ok")
    cells = [head] + [tuple(_fmt(r.get(k)) for k in head) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(len(head))) for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke test of the script)")
    ap.add_argument("--only", choices=PARTS, action="append", help="run only these parts")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"), help="results folder ($OUT)")
    args = ap.parse_args(argv)

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
    os.makedirs(args.out, exist_ok=True)
    env = environment()
    print(json.dumps(env), flush=True)
    rows: list[dict] = []
    for part in args.only or PARTS:
        t0 = time.perf_counter()
        part_dir = os.path.join(args.out, part)
        os.makedirs(part_dir, exist_ok=True)
        try:
            mod = importlib.import_module(f"bench.gpu_{part}")
            part_rows = mod.run(part_dir, quick=args.quick)
        except Exception as e:  # report and go on with the other parts
            traceback.print_exc()
            part_rows = [{"case": "run", "metric": "error", "value": f"{type(e).__name__}: {e}"[:120],
                          "target": None, "ok": False}]
        for r in part_rows:
            rows.append({"part": part, **r})
        print(f"[{part}] {len(part_rows)} rows in {time.perf_counter() - t0:.1f} s", flush=True)

    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"environment": env, "rows": rows}, f, indent=1, default=str)
    summary = table(rows)
    with open(os.path.join(args.out, "summary.txt"), "w") as f:
        f.write(json.dumps(env) + "\n" + summary + "\n")
    failed = [r for r in rows if r.get("ok") is False]
    print()
    print(summary)
    print(f"\n{len(rows)} rows, {len(failed)} not ok; environment: {env['device']}, torch {env['torch']}, "
          f"triton {env['triton']}, CUDA {env['cuda']}, {env['date']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
