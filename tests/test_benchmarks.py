"""The benchmark harness: FLOP formulas against a hand count, timing, the JSON report."""
import importlib.util
import json
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "benchmarks_run", Path(__file__).resolve().parents[1] / "benchmarks" / "run.py")
run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run)

TINY = dict(n_resblocks=1, n_feats=4, width=4, heads=2)


def test_edsr_flop_hand_count():
    # 2 x 2 map: head 3 -> 4 (2*9*3*4*4 = 864) and three 4 -> 4 convs (2*9*4*4*4 = 1152 each).
    assert run.edsr_flop(2, 2, n_resblocks=1, n_feats=4) == 864 + 3 * 1152


def test_operator_flop_hand_count():
    # n = 3, C = 4, width 4, 2 heads (d = 2):
    lifting = 2 * 26 * 4 * 3  # 4 * (4 + 2) + 2 = 26 inputs
    integral = 2 * 3 * 4 * 12 + 2 * 3 * 2 * 4 * 2 + 2 * 2 * 3 * 16  # qkv, kv and q(kv), o_proj
    projection = 2 * 3 * (4 * 256 + 256 * 3)
    assert run.operator_flop(3, feat_dim=4, width=4, heads=2) == lifting + 2 * integral + projection


def test_forward_and_train_flop():
    forward = 2 * (run.edsr_flop(2, 2, 1, 4) + run.operator_flop(3, 4, 4, 2))
    assert run.srno_forward_flop(2, 2, 3, **TINY) == forward
    assert run.train_step_flop(2, 2, 3, **TINY) == 3 * forward
    # shared/docs/reference.md: x4 128 -> 512 inference is about 462 GFLOP.
    assert run.srno_forward_flop(1, 128, 512 * 512) / 1e9 == pytest.approx(462, abs=1)


def test_time_fn_warms_up_then_times_each_call():
    calls = []
    out = run.time_fn(lambda: calls.append(1) or 0, repeats=3, warmup=2)
    assert len(calls) == 5 and len(out["times_s"]) == 3
    assert out["median_s"] == sorted(out["times_s"])[1]


def test_report_has_documented_keys(tmp_path):
    machine = {k: "x" for k in run.MACHINE_KEYS}
    rec = run.result_record("train_step_b4_48", median_s=0.25, gflop=100.0,
                            ceiling_gflops_per_s=400.0, peak_memory_mb=1000.0, compile_s=3.0,
                            backend="cpu", torch_s={"train_step_b4_48": 0.5},
                            samples_per_s=16.0)
    path = tmp_path / "out.json"
    run.write_json(path, run.make_report(machine, {"ceiling_gflops_per_s": 400.0}, [rec], True))
    report = json.loads(path.read_text())
    assert set(report["machine"]) == set(run.MACHINE_KEYS) and report["quick"] is True
    (r,) = report["results"]
    assert set(run.RESULT_KEYS) <= set(r)
    assert r["gflops_per_s"] == pytest.approx(400.0)
    assert r["speedup_vs_torch"] == pytest.approx(0.50 / 0.25)
    gpu = run.result_record("train_step_b4_48", 0.25, 100.0, 400.0, 1.0, 3.0, backend="gpu",
                            torch_s={"train_step_b4_48": 0.5})
    assert "speedup_vs_torch" not in gpu  # the PyTorch reference is a CPU figure


def test_torch_baseline_only_from_the_same_cpu(tmp_path):
    path = tmp_path / "torch.json"
    path.write_text(json.dumps({"machine": {"cpu": "Xeon X", "cores": 2},
                                "results": [{"name": "train_step_b4_48", "median_s": 0.8}]}))
    assert run.torch_seconds({"cpu": "Xeon X", "cores": 2}, path) == {"train_step_b4_48": 0.8}
    assert run.torch_seconds({"cpu": "EPYC Y", "cores": 2}, path) == {}
    assert run.torch_seconds({"cpu": "Xeon X", "cores": 16}, path) == {}
    assert run.torch_seconds({"cpu": "Xeon X", "cores": 2}, tmp_path / "none.json") == {}


def test_unknown_case_is_rejected():
    with pytest.raises(SystemExit):
        run.main(["--only", "no_such_case"])
