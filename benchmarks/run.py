"""Speed, FLOP rate and peak memory of SRNO inference, training and the input pipeline.

  python benchmarks/run.py [--json OUT] [--only NAME,...] [--repeats 5] [--quick] [--list]

Cases (the paper's EDSR-baseline SRNO, width 256, 16 heads, random weights):
  inference_x4_128_to_512   `inference.predict` (what eval.py and upscale run): LR
                            128 x 128 -> the whole 512 x 512 grid, batch 1.
  inference_x4_128_to_512_sub2048  (GPU/TPU only) the same with the CPU's 2,048-query
                            sub-chunks instead of the accelerator's (`sub_chunk`).
  train_step_b4_48          main.py's jitted step (`train.jit_step`), batch 4,
                            48 x 48 LR, 2,304 queries, on a fixed batch on device.
  train_step_b64_128        the paper's step: batch 64, 128 x 128 LR, 16,384 queries
  train_step_b64_128_bf16   (GPU/TPU only), in float32 and in bfloat16 compute; on a
                            GPU with the kernel integrals' Pallas kernel (`fused`).
  train_step_b64_128_bf16_xla  the bfloat16 step with `fused_kernels` off: what the
                            Pallas kernel saves.
  main_b64_128_bf16         (GPU/TPU only) `main.py` as users run it: the paper's config
                            in bfloat16 on the demo photographs (nothing to download, no
                            validation), 200 steps in a new workdir, the loader's worker
                            processes and checkpoints included; the rate is the median
                            of those main.py logs every 50 steps after step 50.
  input_pipeline_128        `TrainLoader` alone, the paper's patch (scale U(1, 4),
                            augment), batch 64, one worker process per core, over
                            in-memory 2040 x 1356 photographs; and one worker thread
                            alone on the same batches (``single_process_samples_per_s``,
                            ``per_core_share`` = the rate per core over that).
  eval_mixed_sizes          eval.py's path (`evaluation.plan`, `evaluate_task`, the
                            model upsampler) over 20 HR images of 20 sizes (160..320
                            a side) at x2, x3, x4, once, with the persistent
                            compilation cache in a new folder: wall time, compile
                            time and compilations; then again in a second process
                            with that cache (``rerun``), which should compile nothing.

Each case runs in its own subprocess, so its peak memory is its own: the device's
``peak_bytes_in_use`` on GPU/TPU, the process's peak RSS on CPU. A jitted case is
compiled once (``compile_s``), run once to warm up (a training step three times:
its first calls grow the heap that `compiler.retain_freed_memory` then keeps, a cost
paid once per run), then timed `repeats` times
(``block_until_ready``); ``median_s`` is the median (for eval_mixed_sizes, the wall
time of its one run). ``ceiling_gflops_per_s`` is a large XLA matmul (float32 on CPU,
bfloat16 on GPU/TPU), the practical peak to read ``gflops_per_s`` against: for the
inference and training cases it is timed in the case's own process, once after each
timed call, so that both see the same moments of a machine whose speed drifts; the
other rows carry the run's, measured first (``ceiling`` in the JSON). ``gflop`` counts
the reference model's operations (`benchmarks/flops.py`). With ``--profile DIR`` the
inference and training cases trace one more call into DIR/<case> and record in the JSON
(``profile``) and the printed table its longest operations (on a GPU, its kernels), so the
report alone says where the time went; the case's timings are printed before that call,
so a failure while tracing keeps them. ``--case_timeout S`` kills a case (with every
process it started) after S seconds and records it as an error. ``--quick`` (2 repeats)
is for developing the harness, not for numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import flops  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from harness import (  # noqa: E402
    compile_timed,
    in_child,
    machine_info,
    peak_memory_mb,
    time_fn,
    trace_call,
    write_json,
)

CASES = (
    "inference_x4_128_to_512",
    "inference_x4_128_to_512_sub2048",
    "train_step_b4_48",
    "train_step_b64_128",
    "train_step_b64_128_bf16",
    "train_step_b64_128_bf16_xla",
    "main_b64_128_bf16",
    "input_pipeline_128",
    "eval_mixed_sizes",
)
ACCELERATOR_ONLY = (
    "inference_x4_128_to_512_sub2048",
    "train_step_b64_128",
    "train_step_b64_128_bf16",
    "train_step_b64_128_bf16_xla",
    "main_b64_128_bf16",
)
# The reference PyTorch timed by benchmarks/torch_reference.py: one *_torch.json per machine.
TORCH_RESULTS = Path(__file__).resolve().parent / "results"
MACHINE_KEYS = ("backend", "device_kind", "devices", "cpu", "cores", "jax_version", "date")
RESULT_KEYS = (
    "name",
    "median_s",
    "gflop",
    "gflops_per_s",
    "ceiling_gflops_per_s",
    "peak_memory_mb",
    "compile_s",
)
EVAL_SCALES = (2.0, 3.0, 4.0)
PROFILE = {"call": None}  # in a child: its timed call, which --profile traces once more


# --- records ---------------------------------------------------------------------------------


def torch_seconds(machine: dict, folder=TORCH_RESULTS) -> dict:
    """{case: median s} of the reference PyTorch from the `*_torch.json` in `folder` that
    was measured on a CPU of this model with this many cores; {} if none was (no
    like-for-like baseline)."""
    for path in sorted(Path(folder).glob("*_torch.json")):
        report = json.loads(path.read_text())
        if all(report["machine"].get(k) == machine.get(k) for k in ("cpu", "cores")):
            return {r["name"]: r["median_s"] for r in report["results"]}
    return {}


def result_record(
    name: str,
    median_s: float,
    gflop: float,
    ceiling_gflops_per_s: float | None,
    peak_memory_mb: float,
    compile_s: float | None,
    backend: str,
    torch_s: dict | None = None,
    **extra,
) -> dict:
    """One row of the JSON: the documented keys, then the case's extras; on CPU the
    reference PyTorch time (`torch_s`, from `torch_seconds`) and our speed-up over it
    where the case has one."""
    rec = {
        "name": name,
        "median_s": median_s,
        "gflop": gflop,
        "gflops_per_s": gflop / median_s if gflop else None,
        "ceiling_gflops_per_s": ceiling_gflops_per_s,
        "peak_memory_mb": peak_memory_mb,
        "compile_s": compile_s,
        **extra,
    }
    if backend == "cpu" and name in (torch_s or {}):
        rec["torch_cpu_s"] = torch_s[name]
        rec["speedup_vs_torch"] = torch_s[name] / median_s
    return rec


def make_report(machine: dict, ceiling: dict, results: list[dict], quick: bool) -> dict:
    """The JSON document: machine, the ceiling measurement, the results, the quick flag."""
    return {
        "machine": {k: machine[k] for k in MACHINE_KEYS},
        "ceiling": ceiling,
        "quick": quick,
        "results": results,
    }


# --- the cases (each runs in a child process) ----------------------------------------------


def ceiling_matmul():
    """(call, GFLOP per call, {'matmul_n', 'matmul_dtype'}) of the ceiling, compiled and
    run once: n x n @ n x n
    through XLA, n = 4096 float32 on CPU; on an accelerator n = 8192 bfloat16, 10
    products queued per call, since one (about 1.4 ms on an H200) is too short to time
    against dispatch and sync overhead."""
    cpu = jax.default_backend() == "cpu"
    n, dtype, per_call = (4096, jnp.float32, 1) if cpu else (8192, jnp.bfloat16, 10)
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    mm, _ = compile_timed(jax.jit(jnp.matmul), a, b)
    call = lambda: [mm(a, b) for _ in range(per_call)]
    jax.block_until_ready(call())
    return call, per_call * 2 * n**3 / 1e9, {"matmul_n": n, "matmul_dtype": jnp.dtype(dtype).name}


def run_ceiling(repeats: int) -> dict:
    """The run's ceiling: `ceiling_matmul`, median of at least 5 calls."""
    call, gflop, matmul = ceiling_matmul()
    t = time_fn(call, max(repeats, 5), warmup=0)
    return {"ceiling_gflops_per_s": gflop / t["median_s"], **matmul, "machine": machine_info()}


def time_against_ceiling(run, repeats: int, warmup: int = 1) -> dict:
    """`time_fn` of a case with the ceiling matmul timed after each of its calls (a
    shared machine's speed drifts by 10% within a minute; paired, case and ceiling see
    the same drift). The case's peak memory is read after `warmup` and `repeats` calls
    of it alone, before the matmul's arrays exist. Returns time_fn's dict of the paired
    calls, 'ceiling_gflops_per_s' and 'peak_memory'."""
    time_fn(run, repeats, warmup)
    memory = peak_memory_mb()
    call, gflop, _ = ceiling_matmul()
    t = time_fn(run, repeats, warmup=0, paired=call)
    PROFILE["call"] = run  # traced once the record is printed: see main
    ceiling = gflop / statistics.median(t["paired_times_s"])
    return {**t, "ceiling_gflops_per_s": ceiling, "peak_memory": memory}


def _case_inference(repeats: int, accelerator_sub_chunk: int | None = None) -> dict:
    from srno_jax import inference
    from srno_jax.coords import make_coord
    from srno_jax.inference import predict
    from srno_jax.models import init_variables, make_model

    if accelerator_sub_chunk:
        inference.ACCELERATOR_SUB_CHUNK = accelerator_sub_chunk
    lr, out = 128, 512
    model = make_model()
    variables = init_variables(model)
    inp = jax.random.uniform(jax.random.key(1), (1, lr, lr, 3), minval=-1, maxval=1)
    coord = jnp.asarray(make_coord((out, out))[None])
    cell = jnp.full((1, 2), 2 / out, jnp.float32)
    run = lambda: predict(model, variables, inp, coord, cell)
    start = time.perf_counter()
    run()  # compiles
    first = time.perf_counter() - start
    t = time_against_ceiling(run, repeats, warmup=0)
    return {
        **t,
        "compile_s": max(first - t["median_s"], 0.0),
        "gflop": flops.forward_flop(model, 1, (lr, lr), out * out) / 1e9,
        "sub_chunk": inference._chunk_len(out * out, None)[1],
    }


def _case_train_step(
    repeats: int, batch: int, lr: int, queries: int, dtype: str = "float32", fused=True
) -> dict:
    from configs import default
    from srno_jax import sharding, train

    config = default.get_config()
    config.batch_size, config.data.inp_size, config.data.sample_q = batch, lr, queries
    config.compute_dtype, config.fused_kernels = dtype, fused
    mesh = sharding.make_mesh()
    model, tx = train.model_from_config(config, mesh), train.make_optimizer(config)
    state = train.init_state(model, tx, config.seed)
    state = jax.device_put(state, train.state_shardings(state, mesh))
    rng = np.random.default_rng(0)
    u = lambda *shape: rng.uniform(-1, 1, shape).astype(np.float32)
    data = sharding.to_global(
        {
            "inp": u(batch, lr, lr, 3),
            "coord": u(batch, queries, 2),
            "cell": np.full((batch, 2), 1 / lr, np.float32),  # scale 2
            "gt": u(batch, queries, 3),
        },
        mesh,
    )
    votes = sharding.host_values(0, mesh)  # no host votes to stop
    step, compile_s = compile_timed(
        train.jit_step(model, tx, config, 250, mesh, state), state, data, votes
    )

    def run():  # the state is donated: carry the returned one forward
        nonlocal state
        state, metrics = step(state, data, votes)
        return metrics

    t = time_against_ceiling(run, repeats, warmup=3)
    return {
        **t,
        "compile_s": compile_s,
        "gflop": flops.train_step_flop(model, batch, (lr, lr), queries) / 1e9,
        "samples_per_s": batch / t["median_s"],
        "compute_dtype": dtype,
        "fused": model.fused,
    }


def _case_main(steps: int = 200, every: int = 50, config: str = "default", args=()) -> dict:
    """main.py in a child process on `config` in bfloat16 (more `args` after), the demo
    photographs, no validation, `steps` steps in a new workdir. Its progress lines give
    the rate of each `every` steps; those after step `every` (past compilation and the
    loader's start) are kept. Nothing here touches the accelerator, which main.py needs
    whole."""
    with tempfile.TemporaryDirectory() as work:
        cmd = [
            sys.executable,
            str(ROOT / "main.py"),
            f"--config={config}",
            f"--workdir={work}",
            "--config.compute_dtype=bfloat16",
            "--config.data.train=demo",
            "--config.data.val=",
            f"--config.total_steps={steps}",
            f"--config.log_every_steps={every}",
            *args,
        ]
        p = subprocess.run(cmd, capture_output=True, text=True)
    log = p.stdout + p.stderr
    if p.returncode:
        raise RuntimeError(f"main.py exit status {p.returncode}: {log.strip()[-2000:]}")
    logged = re.findall(r"step (\d+)/\d+ .*? ([\d.]+) samples/s", log)
    rates = [float(r) for s, r in logged if int(s) > every]
    if not rates:
        raise RuntimeError(f"main.py logged no rate after step {every}: {log.strip()[-2000:]}")
    batch = int(re.search(r"batch (\d+) \(", log).group(1))
    rate = statistics.median(rates)
    # Peak RSS of main.py or its largest worker process (this child ran nothing else).
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {
        "median_s": batch / rate,
        "gflop": 0.0,
        "compile_s": None,
        "samples_per_s": rate,
        "logged_samples_per_s": rates,
        "peak_memory": (rss, "host_rss"),
    }


class MemorySource:
    """HR images held in memory, with the source interface (`name`, len, [i])."""

    def __init__(self, images: list[np.ndarray], name: str = "memory"):
        self.images, self.name = images, name

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.images[int(i)]


def div2k_like_images(count: int = 4, size=(1356, 2040)) -> list[np.ndarray]:
    """`count` scikit-image photographs resized (bicubic) to DIV2K's usual H x W."""
    from input_pipeline import DemoSource
    from srno_jax.images import resize_bicubic

    demo = DemoSource("train")
    return [resize_bicubic(demo[i % len(demo)], size) for i in range(count)]


def _case_input_pipeline(repeats: int, rounds: int = 4) -> dict:
    """The loader as main.py runs it (one worker process per core), and the same batches
    built by one worker thread with nothing in flight: the single-process rate that
    each core's share is read against. The two alternate, `rounds` times `repeats`
    batches each, a new pool each round (so none works while the single thread is
    timed); the medians over all batches are kept, since other work on a shared
    machine takes its time from both alike."""
    from input_pipeline import TrainLoader

    batch, cores = 64, os.cpu_count()
    source = MemorySource(div2k_like_images(), "div2k-like")
    kw = dict(
        global_batch=batch,
        seed=0,
        inp_size=128,
        scale_min=1.0,
        scale_max=4.0,
        augment=True,
        sample_q=128 * 128,
        repeat=20,
    )
    single, pool = [], []
    with TrainLoader(source, workers=1, prefetch=0, **kw) as loader:
        for _ in range(rounds):
            first = loader.step
            single += time_fn(lambda: next(loader), repeats)["times_s"]
            with TrainLoader(  # the same batches: content varies the time per batch
                source, workers=cores, prefetch=2, processes=True, start_step=first, **kw
            ) as workers:
                # The pool never idles (the next batch is queued as one is taken), so the
                # wait for each batch in turn is the time to build one.
                pool += time_fn(lambda: next(workers), repeats)["times_s"]
    median, single_median = statistics.median(pool), statistics.median(single)
    rate, single_rate = batch / median, batch / single_median
    return {
        "median_s": median,
        "times_s": pool,
        "compile_s": None,
        "gflop": 0.0,
        "samples_per_s": rate,
        "workers": cores,
        "single_process_samples_per_s": single_rate,
        "single_process_times_s": single,
        "per_core_share": rate / cores / single_rate,
    }


def mixed_sizes(count: int = 20, low: int = 160, high: int = 320) -> list[tuple[int, int]]:
    """`count` distinct HR sizes (H, W), each side in [low, high], landscape and portrait."""
    rng = np.random.default_rng(0)
    sizes = []
    while len(sizes) < count:
        size = tuple(int(x) for x in rng.integers(low, high + 1, 2))
        if size not in sizes:
            sizes.append(size)
    return sizes


def write_images(folder, sizes) -> None:
    """Smooth synthetic RGB photographs-to-be of the given sizes as PNGs in `folder`
    (the content does not change the time)."""
    from PIL import Image

    for i, (h, w) in enumerate(sizes):
        y, x = np.mgrid[0:h, 0:w] / 37.0
        img = np.stack([np.sin(x + i), np.cos(y * 1.3), np.sin(x * y / 9)], -1) * 127.5 + 127.5
        Image.fromarray(img.round().astype(np.uint8)).save(Path(folder) / f"{i:02d}_{h}x{w}.png")


def eval_mixed_sizes(model, variables, sizes, scales=EVAL_SCALES) -> dict:
    """eval.py's path (`evaluation.plan`, `evaluate_task` with `model_upsampler`) over
    images of `sizes` at `scales`, once: {'median_s': wall seconds, 'compile_s',
    'compilations' (those the persistent cache did not serve), 'gflop' (reference FLOPs
    of the predictions)}."""
    from srno_jax import compiler, evaluation
    from srno_jax.metrics import eval_sizes

    with tempfile.TemporaryDirectory() as folder:
        write_images(folder, sizes)
        upsampler = evaluation.model_upsampler(model, variables)
        with compiler.CompileClock() as clock:
            start = time.perf_counter()
            for task in evaluation.plan([("mixed", folder)], list(scales)):
                evaluation.evaluate_task(upsampler, task, strict=True)
            wall = time.perf_counter() - start
    gflop = 0.0
    for size in sizes:
        for s in scales:
            lr_h, lr_w, hr_h, hr_w = eval_sizes(size, s)
            gflop += flops.forward_flop(model, 1, (lr_h, lr_w), hr_h * hr_w) / 1e9
    return {
        "median_s": wall,
        "compile_s": clock.compile_s,
        "compilations": clock.compiled,
        "gflop": gflop,
        "images": len(sizes),
        "scales": list(scales),
    }


def _case_eval_mixed_sizes() -> dict:
    from srno_jax import compiler
    from srno_jax.models import init_variables, make_model

    cache = compiler.enable_compilation_cache()  # the folder the parent passes in the environment
    model = make_model()
    out = eval_mixed_sizes(model, init_variables(model), mixed_sizes())
    return {**out, "compile_share": out["compile_s"] / out["median_s"], "cache": bool(cache)}


def run_case(name: str, repeats: int, ceiling: float | None) -> dict:
    """Runs one case in this process and returns its JSON record."""
    runners = {
        "inference_x4_128_to_512": lambda: _case_inference(repeats),
        "inference_x4_128_to_512_sub2048": lambda: _case_inference(repeats, 2048),
        "train_step_b4_48": lambda: _case_train_step(repeats, 4, 48, 48 * 48),
        "train_step_b64_128": lambda: _case_train_step(repeats, 64, 128, 128 * 128),
        "train_step_b64_128_bf16": lambda: _case_train_step(
            repeats, 64, 128, 128 * 128, "bfloat16"
        ),
        "train_step_b64_128_bf16_xla": lambda: _case_train_step(
            repeats, 64, 128, 128 * 128, "bfloat16", fused=False
        ),
        "main_b64_128_bf16": _case_main,
        "input_pipeline_128": lambda: _case_input_pipeline(repeats),
        "eval_mixed_sizes": _case_eval_mixed_sizes,
    }
    out = runners[name]()
    # The loader is host-only.
    mem, kind = out.pop("peak_memory", None) or peak_memory_mb(name != "input_pipeline_128")
    return result_record(
        name,
        out.pop("median_s"),
        out.pop("gflop"),
        out.pop("ceiling_gflops_per_s", ceiling),
        mem,
        out.pop("compile_s"),
        jax.default_backend(),
        torch_seconds(machine_info()),
        peak_memory_kind=kind,
        repeats=repeats,
        **out,
    )


# --- the parent: one subprocess per case ---------------------------------------------------


def _run_eval_mixed_sizes(args: list[str], timeout: float | None) -> dict:
    """eval_mixed_sizes in a child with a new persistent cache, then in a second child
    with that cache: the first's record, and the second's as 'rerun'."""
    with tempfile.TemporaryDirectory() as cache:
        env = {"JAX_COMPILATION_CACHE_DIR": cache}
        first = in_child(__file__, *args, env=env, timeout=timeout)
        if "error" in first:
            return first
        again = in_child(__file__, *args, env=env, timeout=timeout)
    keys = ("median_s", "compile_s", "compilations", "compile_share")
    return {**first, "rerun": again if "error" in again else {k: again[k] for k in keys}}


def _fmt(x, width: int, spec: str = ".1f") -> str:
    return f"{'-' if x is None else format(x, spec):>{width}}"


def print_table(report: dict) -> None:
    m = report["machine"]
    print(
        f"\n{m['backend']} ({m['device_kind']} x{m['devices']}), {m['cpu']}, {m['cores']} cores, "
        f"jax {m['jax_version']}, {m['date']}" + ("  [--quick]" if report["quick"] else "")
    )
    head = (
        f"{'case':31} {'median s':>9} {'GFLOP':>8} {'GFLOP/s':>8} {'% ceil':>7} "
        f"{'samples/s':>10} {'peak MB':>8} {'compile s':>9} {'torch s':>8} {'speed-up':>9}"
    )
    print(head + "\n" + "-" * len(head))
    for r in report["results"]:
        if "skipped" in r or "error" in r:
            print(f"{r['name']:31} {r.get('skipped') or r.get('error')}")
            continue
        frac = (
            100 * r["gflops_per_s"] / r["ceiling_gflops_per_s"]
            if r["gflops_per_s"] and r["ceiling_gflops_per_s"]
            else None
        )
        print(
            f"{r['name']:31} {r['median_s']:9.3f} {_fmt(r['gflop'] or None, 8)} "
            f"{_fmt(r['gflops_per_s'], 8)} {_fmt(frac, 7)} {_fmt(r.get('samples_per_s'), 10)} "
            f"{r['peak_memory_mb']:8.0f} {_fmt(r['compile_s'], 9)} "
            f"{_fmt(r.get('torch_cpu_s'), 8, '.2f')} "
            f"{_fmt(r.get('speedup_vs_torch'), 8, '.2f')}" + ("x" if "torch_cpu_s" in r else "")
        )
    for r in report["results"]:
        if "fused" in r:
            how = "the Pallas kernel" if r["fused"] else "XLA (no Pallas kernel)"
            print(f"{r['name']}: kernel integrals through {how}")
        if r.get("error_after"):
            print(f"{r['name']}: after its result: {r['error_after']}")
        if "compile_share" in r:
            again = r.get("rerun", {})
            print(
                f"{r['name']}: {r['compilations']} compilations, {r['compile_s']:.1f} s of "
                f"{r['median_s']:.1f} s ({100 * r['compile_share']:.0f}%); a second process "
                f"with the persistent cache: {again.get('compilations', '-')} compilations, "
                f"{again.get('median_s', float('nan')):.1f} s"
            )
        if "per_core_share" in r:
            print(
                f"{r['name']}: {r['samples_per_s']:.0f} samples/s on {r['workers']} worker "
                f"processes; one process alone {r['single_process_samples_per_s']:.0f}/s; "
                f"per core {100 * r['per_core_share']:.0f}% of that"
            )
        if r.get("profile", {}).get("top"):
            busy = ", ".join(
                f"{w} {ms:.1f} ms" for w, ms in list(r["profile"]["busy_ms"].items())[:4]
            )
            print(f"{r['name']}, one traced call: {busy}; its longest operations:")
            for op in r["profile"]["top"][:12]:
                print(f"  {op['ms']:9.3f} ms {op['calls']:5d}x  {op['name'][:90]}")
    c = report["ceiling"]
    print(
        f"ceiling: {c['matmul_n']}^3 {c['matmul_dtype']} matmul through XLA, "
        f"{c['ceiling_gflops_per_s']:.0f} GFLOP/s at the start; the inference and training "
        f"rows timed it after each of their calls (their % ceil)"
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("--only", default=",".join(CASES), help="comma-separated case names")
    p.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="timed runs per case, their median reported (default 5)",
    )
    p.add_argument("--quick", action="store_true", help="2 repeats; for developing the harness")
    p.add_argument("--list", action="store_true", help="print the selected cases and exit")
    p.add_argument(
        "--profile",
        default=None,
        help="trace one more call of each timed case into PROFILE/<case> (jax.profiler)",
    )
    p.add_argument(
        "--case_timeout",
        type=float,
        default=None,
        help="seconds a case may take before it is killed and recorded as an error",
    )
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_ceiling", type=float, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    repeats = 2 if a.quick else a.repeats
    if a._child == "ceiling" or (a._child or "").startswith("train_step"):
        from srno_jax import compiler

        compiler.retain_freed_memory()  # as main.py does; eval.py and srno-upscale do not
    if a._child == "ceiling":
        print(json.dumps(run_ceiling(repeats)))
        return
    if a._child:
        record = run_case(a._child, repeats, a._ceiling)
        # Printed before the trace: if tracing fails, the parent keeps the timings.
        print(json.dumps(record), flush=True)
        if a.profile and PROFILE["call"]:
            record["profile"] = trace_call(PROFILE["call"], Path(a.profile) / a._child)
            print(json.dumps(record))
        return
    names = [n for n in a.only.split(",") if n]
    unknown = set(names) - set(CASES)
    if unknown:
        p.error(f"unknown case(s) {sorted(unknown)}; choose from {', '.join(CASES)}")
    base = (
        ["--repeats", str(repeats)]
        + (["--quick"] if a.quick else [])
        + (["--profile", a.profile] if a.profile else [])
    )
    if a.list:
        print("\n".join(names))
        return
    ceiling = in_child(__file__, "--_child", "ceiling", *base, timeout=a.case_timeout)
    if "error" in ceiling:
        raise SystemExit(f"the ceiling matmul failed ({ceiling['error']})")
    machine = ceiling.pop("machine")
    results = []
    for name in names:
        if name in ACCELERATOR_ONLY and machine["backend"] not in ("gpu", "tpu"):
            r = {"name": name, "skipped": f"needs a GPU or TPU; backend is {machine['backend']}"}
        else:
            print(f"running {name} ...", file=sys.stderr, flush=True)
            args = ["--_child", name, "--_ceiling", str(ceiling["ceiling_gflops_per_s"]), *base]
            if name == "eval_mixed_sizes":
                r = _run_eval_mixed_sizes(args, a.case_timeout)
            else:
                r = in_child(__file__, *args, timeout=a.case_timeout)
            r = {"name": name, **r} if "error" in r else r
        r.setdefault("ceiling_gflops_per_s", ceiling["ceiling_gflops_per_s"])
        results.append(r)
        if a.json:  # after each case: a run stopped by a time limit keeps what it measured
            write_json(a.json, make_report(machine, ceiling, results, a.quick))
    report = make_report(machine, ceiling, results, a.quick)
    print_table(report)
    if a.json:
        write_json(a.json, report)


if __name__ == "__main__":
    # A SIGTERM (a time limit) ends a run as Ctrl-C does: the running case's processes
    # are killed with it (`in_child`), and the JSON keeps the cases finished.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        main()
    except KeyboardInterrupt:
        raise SystemExit("run.py: stopped; the JSON holds the cases finished before") from None
