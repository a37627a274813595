"""bench/run_gpu.py without a GPU: the plan fits the budget and lists every target, a small budget
drops parts in value order, a part past its time is stopped with its figures kept, and the
cheap parts run on tiny shapes (``--smoke``; the whole smoke run takes minutes on two cores:
``python bench/run_gpu.py --smoke --out DIR`` before a GPU is lent)."""

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "run_gpu.py")


@pytest.fixture(scope="module")
def run_gpu():
    spec = importlib.util.spec_from_file_location("fastnoise_bench_run_gpu", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_dry_run_prints_a_plan_that_fits_and_covers_every_target(run_gpu):
    out = subprocess.run([sys.executable, SCRIPT, "--budget", "480", "--dry-run"], capture_output=True,
                         text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for p in run_gpu.PARTS:
        assert p.name in text
    planned = float(text.split("planned: ")[1].split(" s")[0])
    assert planned <= 480
    assert "targets not covered: none" in text
    assert "dropped" not in text
    kept, dropped = run_gpu.plan(480)
    assert kept == run_gpu.PARTS and dropped == []
    assert run_gpu.STARTUP_S + sum(p.est_s for p in kept) == planned <= run_gpu.MAX_BUDGET_S


def test_every_target_of_the_issue_is_a_part_s_and_every_part_s_target_exists(run_gpu):
    named = [t for p in run_gpu.PARTS for t in p.targets]
    assert sorted(named) == sorted(run_gpu.TARGETS)  # each once, none unknown
    for key in ("linear_vs_naive", "linear_vs_aihwkit", "linear_small_m_vs_clean", "linear_large_m_vs_clean",
                "mlp_peak_memory", "rn50_kd_vs_clean", "rn50_kd_vs_naive", "rn50_kd_memory",
                "conv_layer_vs_cudnn", "robustness_vs_naive", "fused_max_m", "fused_max_output_pixels",
                "fused_min_weight_numel", "linear_correct", "conv_correct", "noise_moments", "noise_ks"):
        assert key in run_gpu.TARGETS
    names = [p.name for p in run_gpu.PARTS]
    assert names[:2] == ["linear_correctness", "conv_correctness"]  # correctness is worth most
    assert len(set(names)) == len(names)


@pytest.mark.parametrize("budget", [30, 100, 150, 200, 300, 400])
def test_a_small_budget_drops_the_lowest_value_parts(run_gpu, budget):
    kept, dropped = run_gpu.plan(budget)
    assert kept + dropped == run_gpu.PARTS  # a prefix kept, the rest dropped, order unchanged
    assert run_gpu.STARTUP_S + sum(p.est_s for p in kept) <= budget
    assert dropped, "these budgets are under the full plan"
    assert run_gpu.STARTUP_S + sum(p.est_s for p in kept) + dropped[0].est_s > budget


def test_the_dry_run_lists_what_it_drops(run_gpu):
    budget = run_gpu.STARTUP_S + sum(p.est_s for p in run_gpu.PARTS[:3])
    out = subprocess.run([sys.executable, SCRIPT, "--budget", str(budget), "--dry-run"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    dropped = out.stdout.split("dropped (over budget, lowest value first): ")[1].split("\n")[0]
    assert [d.split(" (")[0] for d in dropped.split(", ")] == [p.name for p in run_gpu.PARTS[3:]]
    assert "targets not covered: linear_vs_naive" in out.stdout


@pytest.mark.parametrize("argv,message", [
    (["--budget", "600", "--dry-run"], "600"),
    (["--budget", "0", "--dry-run"], "--budget"),
    (["--only", "no_such_part", "--dry-run"], "no_such_part"),
])
def test_bad_arguments_are_refused_naming_the_value(run_gpu, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        run_gpu.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_only_and_skip_keep_value_order(run_gpu):
    parts = run_gpu.select(run_gpu.PARTS, ["mlp_memory", "linear_correctness"], None)
    assert [p.name for p in parts] == ["linear_correctness", "mlp_memory"]
    parts = run_gpu.select(run_gpu.PARTS, None, ["decoder_sweep"])
    assert "decoder_sweep" not in [p.name for p in parts] and len(parts) == len(run_gpu.PARTS) - 1


def test_a_part_past_the_budget_is_stopped_and_keeps_its_figures(run_gpu, tmp_path):
    """The runner's guard: the slow part is cut by the alarm (its first figure stays in
    results.jsonl), the next is dropped since it no longer fits, a failing one is reported."""
    def slow(ctx):
        ctx.emit("first", "ms", 1.0)
        t = time.perf_counter()
        while time.perf_counter() - t < 20:
            time.sleep(0.01)
        ctx.emit("never", "ms", 2.0)

    def broken(ctx):
        raise RuntimeError("on purpose")

    parts = [run_gpu.Part("broken", 0.1, broken), run_gpu.Part("slow", 0.1, slow),
             run_gpu.Part("later", 5, broken)]
    ctx = run_gpu.Context(str(tmp_path), smoke=False, device="cpu", log=lambda s: None)
    with run_gpu.stop_signals():
        status = run_gpu.run_parts(ctx, parts, budget_s=1.5)
    ctx.close()
    got = {s["name"]: s["status"] for s in status}
    assert got == {"broken": "failed", "slow": "timeout", "later": "dropped"}
    assert "on purpose" in status[0]["error"]
    lines = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    rows = [x for x in lines if x["kind"] == "row"]
    assert [r["case"] for r in rows] == ["first"]
    assert [x["name"] for x in lines if x["kind"] == "part"] == ["broken", "slow", "later"]


@pytest.mark.slow
def test_smoke_runs_the_cheap_parts_and_writes_the_summary(run_gpu, tmp_path, capsys):
    """The GPU parts' code on tiny shapes on the CPU, through main(): figures, targets (not
    judged in a smoke run), the summary files and the table. The costly parts (the Triton
    interpreter's correctness matrix, the sweeps) are left to the command in the docstring."""
    pytest.importorskip("torchvision")
    cheap = ["mlp_memory", "resnet50_step", "conv_per_layer", "robustness", "ceilings"]
    rc = run_gpu.main(["--smoke", "--only", ",".join(cheap), "--out", str(tmp_path)])
    assert rc == 0, capsys.readouterr().out[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [p["name"] for p in summary["parts"]] == cheap
    assert all(p["status"] == "ok" for p in summary["parts"]), summary["parts"]
    want = {t for p in run_gpu.PARTS if p.name in cheap for t in p.targets}
    assert set(summary["targets"]) == want
    assert all(t["ok"] is None for t in summary["targets"].values())  # smoke: nothing judged
    env = json.loads((tmp_path / "environment.json").read_text())
    assert {"device", "torch", "triton", "cuda", "date_utc", "commit", "dispatch"} <= set(env)
    table = (tmp_path / "summary.txt").read_text()
    assert "rn50_kd_vs_clean" in table and "robustness" in table
    assert table in capsys.readouterr().out


@pytest.mark.slow
def test_a_bare_checkout_gets_its_kernels_and_the_short_autotune_lists():
    """As on the device machine: no install (the editable finder removed) and no interpreter.
    ``fastnoise.kernels`` and its submodules load from this checkout's ``kernels/``; every config
    named in TUNING is in its kernel's list, "check" leaves one config per kernel and "time" the
    named few. (A fresh process: the kernels read TRITON_INTERPRET when imported.)"""
    code = """if True:
        import json, os, sys
        sys.meta_path = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")
                         and "editable" not in getattr(f, "__name__", "")]
        for name in [n for n in sys.modules if n.startswith("fastnoise")]:
            del sys.modules[name]
        try:
            import fastnoise.kernels
            raise SystemExit("fastnoise.kernels imported without the shim: the test proves nothing")
        except ImportError:
            pass
        for name in [n for n in sys.modules if n.startswith("fastnoise")]:
            del sys.modules[name]
        sys.path.insert(0, "bench")
        import run_gpu
        where = run_gpu._ensure_package()
        from fastnoise.kernels import noisy_matmul
        lists = run_gpu.short_autotune()
        kernels = run_gpu._kernels()
        out = {}
        for mode in ("check", "time", "check"):
            run_gpu.use_tuning(mode)
            for name, (kern, keys) in kernels.items():
                out[mode + " " + name] = [[c.kwargs[k] for k in keys] for c in kern.configs]
        print(json.dumps({"where": where, "file": os.path.realpath(noisy_matmul.__file__), "out": out,
                          "tuning": {m: {k: [list(c) for c in v] for k, v in d.items()}
                                     for m, d in run_gpu.TUNING.items()}}))
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=ROOT, env=env)
    assert res.returncode == 0, res.stdout[-1000:] + res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["where"] == "checkout"
    assert got["file"] == os.path.realpath(os.path.join(ROOT, "kernels", "noisy_matmul.py"))
    for mode, kernels in got["tuning"].items():
        for name, want in kernels.items():
            assert sorted(got["out"][f"{mode} {name}"]) == sorted(want), (mode, name)
    assert all(len(v) == 1 for k, v in got["out"].items() if k.startswith("check"))
