"""FSDP2 worker of tests/test_train_fsdp.py: a tiny Llama converted on the meta device, sharded
with ``fully_shard`` per decoder layer (and at the root), given its weights by a loaded state
dict, trained a few steps with weight noise (``noise``) or KD + noise (``kd``, the clean teacher
replicated on every rank) on this rank's share of each global batch.

Without torchrun (no ``WORLD_SIZE``) it trains the unsharded model on the whole batch: the one
process FSDP must equal. Writes ``OUT/MODE-rank{r}.json`` for each mode: the mean loss of every
step over the global batch, the final full weights (rank 0), the layers' noise counters.

    python _fsdp_worker.py OUT noise kd
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _lm_models import tiny_llama, token_data  # noqa: E402

import fastnoise  # noqa: E402
from fastnoise.convert import noise_state_dict  # noqa: E402
from fastnoise.lm import as_batch  # noqa: E402
from fastnoise.train.lm import CausalLMTask, LMDistillationTask  # noqa: E402

STEPS, GLOBAL_BATCH = 3, 4
SPEC = fastnoise.NoiseSpec(eta=0.1)


def main(out: str, modes: list) -> None:
    torch.set_num_threads(1)
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        import torch.distributed as dist

        dist.init_process_group("gloo")
    for mode in modes:
        train(out, mode, distributed)
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


def train(out: str, mode: str, distributed: bool) -> None:
    rank, world = 0, 1
    if distributed:
        import torch.distributed as dist

        rank, world = dist.get_rank(), dist.get_world_size()
    fastnoise.manual_seed(0)
    reference = fastnoise.convert(tiny_llama(seed=0), SPEC)  # the weights every run starts from
    full = {k: v.clone() for k, v in reference.state_dict().items()}
    if distributed:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        from torch.distributed.fsdp import fully_shard

        with torch.device("meta"):
            model = tiny_llama(seed=0)
        fastnoise.convert(model, SPEC)  # on the meta device: no memory, no initialisation
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        model.to_empty(device="cpu")
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True))
        for name, buf in reference.named_buffers():  # non-persistent buffers: rotary inv_freq, the
            model.get_buffer(name).copy_(buf)          # noise call counters
    else:
        model = reference
    model.train()
    if mode == "kd":
        teacher = tiny_llama(seed=3)  # replicated: every rank holds all of it
        task = LMDistillationTask(model, teacher, temperature=2.0, alpha=0.5)
    else:
        task = CausalLMTask(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = torch.stack(token_data(STEPS * GLOBAL_BATCH, length=10))
    share = GLOBAL_BATCH // world
    losses = []
    for step in range(STEPS):
        batch = data[step * GLOBAL_BATCH:(step + 1) * GLOBAL_BATCH][rank * share:(rank + 1) * share]
        result = task(as_batch(batch))
        result["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = result["loss"].detach().clone()
        if distributed:
            dist.all_reduce(loss)
            loss /= world
        losses.append(float(loss))
    if distributed:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(model, options=options)
    else:
        weights = model.state_dict()
    record = {"world": world, "losses": losses,
              "noise": {k: v for k, v in noise_state_dict(model).items()}}
    if rank == 0:
        record["weights"] = {k: v.tolist() for k, v in weights.items()}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{mode}-rank{rank}.json"), "w") as f:
        json.dump(record, f, default=str)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
