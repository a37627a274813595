"""Two gloo processes on the CPU, for the tests that compare them with one process.

``run(cmd)`` runs a command in a clean environment (no torchrun variables of the caller, one
intra-op thread, no GPU: gloo on the CPU also on a GPU machine) and fails the test with its
output; ``two_ranks(worker, *args)`` runs ``worker`` under ``torch.distributed.run`` on two
local processes; ``assert_ranks_equal(two, model)`` checks what a ``fit`` worker wrote there.
"""

import json
import os
import socket
import subprocess
import sys

import torch

import fastnoise


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd, cwd=None) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{cmd} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"


def two_ranks(worker: str, *args: str, cwd=None) -> None:
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
         "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), worker, *args], cwd)


def assert_ranks_equal(two: str, model) -> dict:
    """Both ranks' ``rank{i}.json`` (a ``fit`` worker's) hold the noise state and the weights of
    ``model``, trained in one process; returns rank 0's record (its ``metrics``)."""
    r0, r1 = (json.load(open(os.path.join(two, f"rank{i}.json"))) for i in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["noise"] == r1["noise"] == fastnoise.noise_state_dict(model)
    for k, v in model.state_dict().items():
        b, c = torch.tensor(r0["weights"][k]), torch.tensor(r1["weights"][k])
        assert torch.equal(b, c), f"ranks disagree on {k}"
        torch.testing.assert_close(b, v, rtol=1e-4, atol=1e-5, msg=k)
    return r0
