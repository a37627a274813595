"""A small language study on text every Debian system has: the license texts of Debian's
``base-files`` package (``/usr/share/common-licenses``, ~250 KB of English), read as bytes.

A byte-level tiny Llama (vocabulary 256) is trained clean as the teacher; then, from it, the
noise-only, KD and consistency students over several seeds, every model measured by perplexity
over the same simulated chips (``fastnoise.train.fit_study``); the tables go to stdout and to
``OUT/tables.md``. The data and the model are those of the ``licenses-llama`` recipe
(``fastnoise.train.data.license_sequences``, ``fastnoise.train.models.tiny_llama``), which
``fastnoise train / eval / study --recipe licenses-llama`` run from the command line.

    python bench/lm_study.py [OUT] [--seeds 0 1 2] [--epochs 2]
    python bench/lm_study.py OUT2 --teacher-weights OUT/teacher/model.pth --epochs 1

By default the students start from fresh weights (the builder, under each seed) and a clean
teacher is trained first (``--teacher-epochs``); with ``--teacher-weights`` (a ``model.pth`` of a
clean teacher) every student starts from that teacher, as in Noisy Machines.
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def main() -> None:
    import transformers

    from fastnoise import NoiseSpec
    from fastnoise.train import fit_study
    from fastnoise.train.data import BYTE_VOCAB, license_sequences
    from fastnoise.train.models import tiny_llama

    p = argparse.ArgumentParser()
    p.add_argument("out", nargs="?", default="runs/lm-study")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--teacher-epochs", type=int, default=6)
    p.add_argument("--eta", type=float, default=0.1)
    p.add_argument("--draws", type=int, default=4)
    p.add_argument("--teacher-weights", default=None,
                   help="a clean teacher's model.pth: every student starts from it")
    a = p.parse_args()
    transformers.utils.logging.set_verbosity_error()
    train, val = license_sequences()  # the licenses recipe's data (fastnoise.train.data)

    def build():
        return tiny_llama(BYTE_VOCAB)  # the recipe's model.arch=tiny_llama

    start, teacher, teacher_epochs = build, None, a.teacher_epochs
    if a.teacher_weights is not None:
        teacher = build()
        teacher.load_state_dict(torch.load(a.teacher_weights, weights_only=True))
        start, teacher_epochs = teacher, 0
    t0 = time.time()
    study = fit_study(start, train, val, teacher=teacher, teacher_epochs=teacher_epochs, seeds=a.seeds,
                      methods=("noise", "kd", "consistency"), spec=NoiseSpec(eta=a.eta),
                      method={"temperature": 2.0, "alpha": 0.5,
                              "layers": ["model.layers.0", "model.layers.1"]},
                      draws=a.draws, epochs=a.epochs, batch_size=32, out=a.out, resume=os.path.isdir(a.out),
                      optim={"name": "adamw", "lr": 3e-3, "weight_decay": 0.0}, log={"progress": False},
                      messages=lambda m: None)
    print(f"{len(train)} training and {len(val)} validation sequences of 64 bytes; {time.time() - t0:.0f} s")
    print(study.tables)


if __name__ == "__main__":
    main()
