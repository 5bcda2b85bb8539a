"""The benchmark harness: FLOP formulas against a hand count, timing, compile counts,
case selection, the JSON report."""

import importlib.util
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from srno_jax.models import init_variables, make_model

_BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", _BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run = _load("run")  # puts benchmarks/ on sys.path, so its modules import as run does
import flops  # noqa: E402
import harness  # noqa: E402


def test_edsr_flop_hand_count():
    # 2 x 2 map: head 3 -> 4 (2*9*3*4*4 = 864) and three 4 -> 4 convs (2*9*4*4*4 = 1152 each).
    model = make_model(encoder_args={"n_resblocks": 1, "n_feats": 4}, width=4, heads=2)
    assert flops.encoder_flop(model.encoder, 2, 2) == 864 + 3 * 1152


def test_rdn_flop_hand_count():
    # Config A (20 blocks of 6 convs, growth 32), G0 = 2, k = 3, on a 1 x 1 map.
    model = make_model("rdn", {"G0": 2, "RDNconfig": "A"}, width=4, heads=2)
    block = sum(2 * 9 * (2 + 32 * j) * 32 for j in range(6)) + 2 * (2 + 6 * 32) * 2
    expected = 2 * 9 * 3 * 2 + 2 * 9 * 2 * 2 + 20 * block + 2 * 40 * 2 + 2 * 9 * 2 * 2
    assert flops.encoder_flop(model.encoder, 1, 1) == expected


def test_operator_flop_hand_count():
    # n = 3, C = 4, width 4, 2 heads (d = 2):
    model = make_model(encoder_args={"n_resblocks": 1, "n_feats": 4}, width=4, heads=2)
    lifting = 2 * 26 * 4 * 3  # 4 * (4 + 2) + 2 = 26 inputs
    integral = 2 * 3 * 4 * 12 + 2 * 3 * 2 * 4 * 2 + 2 * 2 * 3 * 16  # qkv, kv and q(kv), o_proj
    projection = 2 * 3 * (4 * 256 + 256 * 3)
    assert flops.operator_flop(model, 3) == lifting + 2 * integral + projection


def test_forward_and_train_flop():
    model = make_model(encoder_args={"n_resblocks": 1, "n_feats": 4}, width=4, heads=2)
    forward = 2 * (flops.encoder_flop(model.encoder, 2, 3) + flops.operator_flop(model, 5))
    assert flops.forward_flop(model, 2, (2, 3), 5) == forward
    assert flops.train_step_flop(model, 2, (2, 3), 5) == 3 * forward
    # shared/docs/reference.md: x4 128 -> 512 inference is about 462 GFLOP.
    gflop = flops.forward_flop(make_model(), 1, (128, 128), 512 * 512) / 1e9
    assert gflop == pytest.approx(462, abs=1)


def test_time_fn_warms_up_then_times_each_call():
    calls = []
    out = harness.time_fn(lambda: calls.append(1) or 0, repeats=3, warmup=2)
    assert len(calls) == 5 and len(out["times_s"]) == 3
    assert out["median_s"] == sorted(out["times_s"])[1]


def test_time_fn_pairs_each_timed_call():
    order = []
    out = harness.time_fn(
        lambda: order.append("case") or 0, 3, warmup=1, paired=lambda: order.append("ceiling")
    )
    assert order == ["case"] + ["case", "ceiling"] * 3
    assert len(out["times_s"]) == len(out["paired_times_s"]) == 3


def test_report_has_documented_keys(tmp_path):
    machine = {k: "x" for k in run.MACHINE_KEYS}
    rec = run.result_record(
        "train_step_b4_48",
        median_s=0.25,
        gflop=100.0,
        ceiling_gflops_per_s=400.0,
        peak_memory_mb=1000.0,
        compile_s=3.0,
        backend="cpu",
        torch_s={"train_step_b4_48": 0.5},
        samples_per_s=16.0,
    )
    path = tmp_path / "out.json"
    harness.write_json(path, run.make_report(machine, {"ceiling_gflops_per_s": 400.0}, [rec], True))
    report = json.loads(path.read_text())
    assert set(report["machine"]) == set(run.MACHINE_KEYS) and report["quick"] is True
    (r,) = report["results"]
    assert set(run.RESULT_KEYS) <= set(r)
    assert r["gflops_per_s"] == pytest.approx(400.0)
    assert r["speedup_vs_torch"] == pytest.approx(0.50 / 0.25)
    gpu = run.result_record(
        "train_step_b4_48",
        0.25,
        100.0,
        400.0,
        1.0,
        3.0,
        backend="gpu",
        torch_s={"train_step_b4_48": 0.5},
    )
    assert "speedup_vs_torch" not in gpu  # the PyTorch reference is a CPU figure


def test_torch_baseline_only_from_the_same_cpu(tmp_path):
    path = tmp_path / "xeon_torch.json"
    (tmp_path / "other.json").write_text("not read")
    path.write_text(
        json.dumps(
            {
                "machine": {"cpu": "Xeon X", "cores": 2},
                "results": [{"name": "train_step_b4_48", "median_s": 0.8}],
            }
        )
    )
    folder = tmp_path
    assert run.torch_seconds({"cpu": "Xeon X", "cores": 2}, folder) == {"train_step_b4_48": 0.8}
    assert run.torch_seconds({"cpu": "EPYC Y", "cores": 2}, folder) == {}
    assert run.torch_seconds({"cpu": "Xeon X", "cores": 16}, folder) == {}
    assert run.torch_seconds({"cpu": "Xeon X", "cores": 2}, tmp_path / "none") == {}


def test_unknown_case_is_rejected():
    with pytest.raises(SystemExit):
        run.main(["--only", "no_such_case"])


def test_only_selects_cases(capsys):
    run.main(["--only", "eval_mixed_sizes,inference_x4_128_to_512", "--list"])
    assert capsys.readouterr().out.split() == ["eval_mixed_sizes", "inference_x4_128_to_512"]


def test_in_child_returns_the_last_json_line(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(
        "import json, os, sys\nprint('log line')\n"
        "print(json.dumps({'args': sys.argv[1:], 'env': os.environ.get('X')}))\n"
    )
    assert harness.in_child(script, "a", env={"X": "1"}) == {"args": ["a"], "env": "1"}
    script.write_text("raise SystemExit(3)\n")
    assert harness.in_child(script) == {"error": "exit status 3"}
    # A result printed before a failure (a profiler crashing in the extra traced call).
    script.write_text("print('{\"median_s\": 1.0}', flush=True)\nimport os\nos.abort()\n")
    assert harness.in_child(script) == {"median_s": 1.0, "error_after": "exit status -6"}


def test_in_child_timeout_kills_the_child_and_what_it_started(tmp_path):
    import os
    import time

    pid_file = tmp_path / "grandchild"
    script = tmp_path / "child.py"
    script.write_text(
        "import subprocess, sys, time\n"
        "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(g.pid))\n"
        "print('{\"median_s\": 2.0}', flush=True)\n"
        "time.sleep(60)\n"
    )
    start = time.monotonic()
    out = harness.in_child(script, timeout=3)
    assert time.monotonic() - start < 30
    assert out == {"median_s": 2.0, "error_after": "timed out after 3 s"}
    grandchild = int(pid_file.read_text())
    for _ in range(50):  # killed, then reaped by init
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the child's own child outlived the timeout")
    script.write_text("import time\ntime.sleep(60)\n")
    assert harness.in_child(script, timeout=1) == {"error": "timed out after 1 s"}


def test_eval_mixed_sizes_counts_compilations():
    """eval.py's path over 3 sizes: compiles the first time, nothing the second."""
    model = make_model(encoder_args={"n_resblocks": 1, "n_feats": 8}, width=16, heads=2)
    variables = init_variables(model)
    sizes = run.mixed_sizes(3, low=20, high=30)
    assert len(set(sizes)) == 3
    first = run.eval_mixed_sizes(model, variables, sizes, scales=(2.0, 3.0))
    assert first["compilations"] > 0 and first["compile_s"] > 0
    again = run.eval_mixed_sizes(model, variables, sizes, scales=(2.0, 3.0))
    assert again["compilations"] == 0
    assert first["gflop"] == pytest.approx(again["gflop"]) and first["gflop"] > 0


def test_no_machine_specific_paths():
    for path in [*_BENCH.glob("*.py"), *_BENCH.glob("*.sh"), *_BENCH.glob("results/*.md")]:
        text = path.read_text()
        for prefix in ("/work/", "/home/", "/tmp/", "/Users/"):
            assert prefix not in text, f"{path.name} names {prefix}"


def test_gpu_script_dry_run(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "out")}
    proc = subprocess.run(
        ["bash", str(_BENCH / "gpu.sh"), "--dry-run"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    (line,) = [row for row in proc.stdout.splitlines() if "benchmarks/run.py" in row]
    cases = line.split("--only ")[1].split()[0].split(",")
    assert cases and set(cases) <= set(run.CASES)  # every case it asks for exists
    assert "--profile" in line and str(tmp_path / "out" / "gpu.json") in line
    assert not (tmp_path / "out").exists()  # a dry run does nothing
    bad = subprocess.run(
        ["bash", str(_BENCH / "gpu.sh"), "--no-such"], capture_output=True, text=True, env=env
    )
    assert bad.returncode == 2 and "unknown argument" in bad.stderr
    # A Python that has JAX for the backend is used as it is, in the preview too.
    proc = subprocess.run(
        ["bash", str(_BENCH / "gpu.sh"), "--dry-run"],
        capture_output=True,
        text=True,
        env=dict(env, PYTHON=sys.executable, BACKEND="cpu"),
        check=True,
    )
    assert "-m venv" not in proc.stdout, proc.stdout
    assert f"+ {sys.executable} benchmarks/run.py --only" in proc.stdout, proc.stdout


def test_trace_call_summarises_the_traced_call(tmp_path):
    import jax
    import jax.numpy as jnp

    f = jax.jit(lambda a: jnp.tanh(a @ a).sum())
    a = jnp.ones((256, 256))
    prof = harness.trace_call(lambda: f(a), tmp_path)
    assert prof["top"] and prof["busy_ms"]
    assert all(op["ms"] >= 0 and op["calls"] >= 1 for op in prof["top"])
    assert [op["ms"] for op in prof["top"]] == sorted(
        (op["ms"] for op in prof["top"]), reverse=True
    )
    # The caller's own thread is left out.
    assert not any(w.endswith(" python") for w in prof["busy_ms"])
    json.dumps(prof)  # goes into the report as it is


TINY_MAIN = ("--config.batch_size=2", "--config.data.sample_q=256", "--config.data.inp_size=16")


def test_main_case_keeps_the_rates_main_py_logs_after_the_first():
    """The end-to-end case runs main.py as users do (here a tiny demo run on the CPU) and
    keeps the rates it logs after the first `every` steps: compilation is not in them."""
    r = run._case_main(steps=4, every=1, config="demo", args=TINY_MAIN)
    assert len(r["logged_samples_per_s"]) == 3  # steps 2, 3 and 4
    assert r["samples_per_s"] == statistics.median(r["logged_samples_per_s"])
    assert r["median_s"] == pytest.approx(2 / r["samples_per_s"])
    mem, kind = r["peak_memory"]
    assert mem > 100 and kind == "host_rss"


def test_main_case_reports_what_main_py_refused():
    with pytest.raises(RuntimeError, match="batch_size"):
        run._case_main(steps=4, every=1, config="demo", args=("--config.batch_size=0",))


def test_report_is_written_after_each_case(tmp_path, monkeypatch):
    """A run stopped during a case (a device's time limit) leaves the cases before it in
    the JSON."""
    machine = {k: "x" for k in run.MACHINE_KEYS} | {"backend": "gpu"}
    ceiling = {"machine": machine, "ceiling_gflops_per_s": 1.0, "matmul_n": 1}
    record = {k: 1.0 for k in run.RESULT_KEYS} | {"name": "inference_x4_128_to_512"}

    def child(script, *args, env=None, timeout=None):
        if args[1] == "ceiling":
            return dict(ceiling)
        if args[1] == "inference_x4_128_to_512":
            return dict(record)
        raise KeyboardInterrupt  # the time limit, during the second case

    monkeypatch.setattr(run, "in_child", child)
    out = tmp_path / "r.json"
    with pytest.raises(KeyboardInterrupt):
        run.main(["--only", "inference_x4_128_to_512,train_step_b4_48", "--json", str(out)])
    (r,) = json.loads(out.read_text())["results"]
    assert r["name"] == "inference_x4_128_to_512"
    assert not (tmp_path / "r.json.partial").exists()
