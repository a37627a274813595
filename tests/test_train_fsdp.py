"""FSDP2: a tiny Llama converted on the meta device, ``fully_shard`` per decoder layer, weights from
a loaded state dict, trained on 2 gloo processes with weight noise equals one process (losses and
final weights), for noise-only and for KD (teacher replicated). Each rank generates the noise of
the all-gathered weight from the same (seed, layer name, call counter)."""

import json
import os
import sys

import pytest
import torch
from _torchrun import run, two_ranks

pytest.importorskip("transformers")
fsdp = pytest.importorskip("torch.distributed.fsdp")
if not hasattr(fsdp, "fully_shard"):
    pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)", allow_module_level=True)

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.slow
def test_fsdp2_on_two_gloo_ranks_equals_one_process(tmp_path):
    worker = os.path.join(HERE, "_fsdp_worker.py")
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    run([sys.executable, worker, one, "noise", "kd"], tmp_path)
    two_ranks(worker, two, "noise", "kd", cwd=tmp_path)
    for mode in ("noise", "kd"):
        solo = json.load(open(os.path.join(one, f"{mode}-rank0.json")))
        r0 = json.load(open(os.path.join(two, f"{mode}-rank0.json")))
        r1 = json.load(open(os.path.join(two, f"{mode}-rank1.json")))
        assert solo["world"] == 1 and r0["world"] == r1["world"] == 2
        # the same noise: same layer ids, every layer called once per step on each rank
        assert r0["noise"] == r1["noise"] == solo["noise"], mode
        assert all(s["calls"] == 3 for s in solo["noise"].values())
        assert r0["losses"] == pytest.approx(solo["losses"], rel=1e-6, abs=1e-6), mode
        assert len(set(solo["losses"])) == 3
        assert set(r0["weights"]) == set(solo["weights"])
        for k, v in solo["weights"].items():
            got = torch.tensor(r0["weights"][k])
            torch.testing.assert_close(got, torch.tensor(v), rtol=1e-5, atol=1e-5, msg=f"{mode} {k}")
