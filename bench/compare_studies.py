"""Paired differences between two studies' models on the same chips over time.

    python bench/compare_studies.py STUDY_A STUDY_B [--models noise kd consistency] [--base-model clean]

Two ``fastnoise study --hardware ...`` folders with the same seeds, chips and layer names see
the same chips (checked: the teachers' chip accuracies must be equal, as they are when B was
given A's teacher). For each model in both, prints ``B - A`` per time (points of top-1, same seed
and chip; mean [95% CI], t over the per-seed means, as the studies' own tables), and each of B's
models against A's ``--base-model``. Used for docs/chip.md ("which training eta carries over").
"""

from __future__ import annotations

import argparse
import collections
import csv
import os

from fastnoise.train.study import paired_difference


def load(folder: str) -> dict:
    out: dict = collections.defaultdict(dict)
    with open(os.path.join(folder, "chip_accuracies.csv")) as f:
        for r in csv.DictReader(f):
            out[(r["model"], float(r["t"]))][(int(r["seed"]), int(r["draw"]))] = float(r["top1"])
    return out


def diff(b: dict, a: dict) -> list:
    seeds = sorted({s for s, _ in b})
    return [[b[(s, k)] - a[(s, k)] for k in sorted(k for s2, k in b if s2 == s)] for s in seeds]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--models", nargs="+", default=["noise", "kd", "consistency"])
    ap.add_argument("--base-model", default="clean")
    args = ap.parse_args()
    a, b = load(args.a), load(args.b)
    times = sorted({t for _, t in b})
    for t in times:
        if a.get(("teacher", t)) != b.get(("teacher", t)):
            raise SystemExit(f"the teachers differ on the chips at t={t:g}: not the same chips or teacher")
    for name, base in [(m, m) for m in args.models] + [(m, args.base_model) for m in args.models]:
        for t in times:
            if (name, t) in b and (base, t) in a:
                d = paired_difference(diff(b[(name, t)], a[(base, t)]))
                ci = f"[{d['low']:+.2f}, {d['high']:+.2f}]"
                print(f"B {name} - A {base} at t={t:g} s: {d['mean']:+.2f} {ci}")


if __name__ == "__main__":
    main()
