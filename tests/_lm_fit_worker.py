"""Worker of tests/test_train_lm.py's DDP test: ``fit`` of a tiny Llama with KD + noise on token
data, in this process (one) or under torchrun (each rank a share of every global batch); writes
``OUT/rank{r}.json`` with the final weights, the noise state and the metrics.

    python _lm_fit_worker.py OUT
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _lm_models import tiny_llama, token_data  # noqa: E402

import fastnoise  # noqa: E402
from fastnoise.train import fit  # noqa: E402

SETTINGS = {"optim": {"name": "adamw", "lr": 1e-2}, "eval": {"etas": [0.0, 0.05], "draws": 2},
            "log": {"progress": False, "every": 1}}


def run(out):
    return fit(tiny_llama(), token_data(32), token_data(16, seed=2),
               method={"name": "kd", "temperature": 2.0}, teacher=tiny_llama(seed=7),
               spec=fastnoise.NoiseSpec(eta=0.05), epochs=1, batch_size=8, out_dir=out, overwrite=True,
               messages=lambda m: None, **SETTINGS)


def main(out: str) -> None:
    torch.set_num_threads(1)
    result = run(out)
    rank = int(os.environ.get("RANK", "0"))
    info = {"world_size": int(os.environ.get("WORLD_SIZE", "1")),
            "noise": fastnoise.noise_state_dict(result.model),
            "weights": {k: v.tolist() for k, v in result.model.state_dict().items()},
            "metrics": result.history}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(info, f)


if __name__ == "__main__":
    main(sys.argv[1])
