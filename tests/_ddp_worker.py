"""Run by tests/test_train_ddp.py, under torchrun or alone: train the digits recipe with the given
overrides into OUT and dump this rank's noise state and weights to OUT/rank{RANK}.json."""

import json
import os
import sys

import fastnoise
from fastnoise import reference
from fastnoise.train.recipes import resolve
from fastnoise.train.trainer import Trainer


def main(out: str, overrides: list) -> None:
    trainer = Trainer(resolve("digits", overrides), out, overwrite=True, progress=False, log=lambda m: None)
    trainer.fit()
    model = trainer.base
    # the noise the last training step drew in fc1, regenerated from its (seed, counter)
    fc1 = model.fc1
    seed = fastnoise.rng.mix64(fastnoise.initial_seed(), fc1.noise_id)
    sigma = fc1.spec.sigma(fc1.weight)
    noisy = reference.noisy_weight(fc1.weight, sigma, fc1.spec.mode, seed, int(fc1.noise_calls) - 1)
    info = {
        "rank": trainer.dist.rank,
        "world_size": trainer.dist.world_size,
        "noise_seed": fastnoise.initial_seed(),
        "noise": fastnoise.noise_state_dict(model),
        "last_noise": (noisy - fc1.weight).tolist(),
        "weights": {k: v.tolist() for k, v in model.state_dict().items()},
        "metrics": trainer.metrics,
    }
    with open(os.path.join(out, f"rank{trainer.dist.rank}.json"), "w") as f:
        json.dump(info, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
