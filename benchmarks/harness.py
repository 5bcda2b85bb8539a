"""What the benchmark scripts share: one child process per measurement, timing, memory
and the machine's description (compilations are counted by `srno_jax.compiler.CompileClock`).

A script runs each measurement in a fresh child process (`in_child`): its peak memory and
compilations are then its own. The child is the same script run with the arguments
given; it prints its result as one JSON object on the last line of its stdout.
"""

from __future__ import annotations

import collections
import datetime
import gzip
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax


def in_child(script, *args: str, env: dict | None = None, timeout: float | None = None) -> dict:
    """Runs ``python script *args`` and returns the JSON object on the last stdout line
    that holds one, or {'error': ...} when it printed none (its stderr passes through).

    A child that printed its result and then failed (a profiler crashing while it traces
    one more call) keeps that result, the failure under 'error_after'. The child runs in
    a session of its own, so that it is killed with every process it started: when it
    is still running after `timeout` seconds, or when this process is interrupted.
    """
    proc = subprocess.Popen(
        [sys.executable, str(script), *args],
        stdout=subprocess.PIPE,
        text=True,
        env=None if env is None else {**os.environ, **env},
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
        failure = f"exit status {proc.returncode}" if proc.returncode else None
    except subprocess.TimeoutExpired:
        _kill_session(proc)
        out, _ = proc.communicate()
        failure = f"timed out after {timeout:g} s"
    except BaseException:
        _kill_session(proc)
        raise
    records = []
    for line in out.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    records = [r for r in records if isinstance(r, dict)]
    if not records:
        return {"error": failure or "printed no result"}
    return {**records[-1], "error_after": failure} if failure else records[-1]


def _kill_session(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # it had ended
        pass
    proc.wait()


def time_fn(fn, repeats: int, warmup: int = 1, paired=None) -> dict:
    """Calls fn() `warmup` times, then times `repeats` calls, each until its result is ready;
    with `paired`, one call of paired() is timed after each timed call of fn (the two then
    see the same moments of a shared machine).

    Returns {'median_s', 'times_s'}, and 'paired_times_s' with `paired`.
    """
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times, paired_times = [], []
    for _ in range(repeats):
        for f, out in ((fn, times), (paired, paired_times)) if paired else ((fn, times),):
            t = time.perf_counter()
            jax.block_until_ready(f())
            out.append(time.perf_counter() - t)
    result = {"median_s": statistics.median(times), "times_s": times}
    if paired:
        result["paired_times_s"] = paired_times
    return result


def trace_call(fn, trace_dir) -> dict:
    """Traces one call of fn() into `trace_dir` (`jax.profiler.trace`) and returns its
    `trace_summary`."""
    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
        jax.block_until_ready(fn())
    return trace_summary(trace_dir)


def trace_summary(trace_dir, top: int = 40) -> dict:
    """What the newest perfetto trace under `trace_dir` spent its time on, readable
    without a trace viewer: {'busy_ms': {process and thread: ms of its events}, 'top':
    the `top` (thread, event name) pairs by total time as {'where', 'name', 'ms',
    'calls'}}. The Python thread (the caller's own functions) is left out; on a GPU the
    rest are the kernels of each stream, on the CPU XLA's thunks."""
    paths = sorted(Path(trace_dir).rglob("*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not paths:
        return {"busy_ms": {}, "top": []}
    with gzip.open(paths[-1]) as f:
        doc = json.load(f)
    events = doc["traceEvents"] if isinstance(doc, dict) else doc
    names = {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") in ("process_name", "thread_name"):
            tid = e.get("tid") if e["name"] == "thread_name" else None
            names[e["name"], e["pid"], tid] = e["args"]["name"]
    ops = collections.defaultdict(lambda: [0.0, 0])
    busy = collections.defaultdict(float)
    for e in events:
        thread = names.get(("thread_name", e.get("pid"), e.get("tid")), str(e.get("tid")))
        if e.get("ph") != "X" or thread == "python":
            continue
        where = f"{names.get(('process_name', e['pid'], None), e['pid'])} {thread}"
        ms = e.get("dur", 0) / 1e3
        ops[where, e["name"]][0] += ms
        ops[where, e["name"]][1] += 1
        busy[where] += ms
    rows = sorted(ops.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "busy_ms": {k: round(v, 3) for k, v in sorted(busy.items(), key=lambda kv: -kv[1])},
        "top": [
            {"where": w, "name": n, "ms": round(ms, 3), "calls": c} for (w, n), (ms, c) in rows
        ],
    }


def compile_timed(jitted, *args):
    """(compiled executable, seconds spent lowering and compiling)."""
    t = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - t


def peak_memory_mb(on_device: bool = True) -> tuple[float, str]:
    """(peak MB, 'device' or 'host_rss') of this process: with `on_device`, the
    accelerator's peak_bytes_in_use where the backend reports it; else getrusage's peak RSS."""
    stats = (jax.local_devices()[0].memory_stats() or {}) if on_device else {}
    if "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**20, "device"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "host_rss"  # KiB on Linux


def machine_info() -> dict:
    """Backend, device kind and count, CPU model and cores, jax version, UTC date."""
    dev = jax.local_devices()[0]
    cpu = platform.processor()
    if Path("/proc/cpuinfo").exists():
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        names = [row.split(":", 1)[1].strip() for row in lines if row.startswith("model name")]
        cpu = names[0] if names else cpu
    return {
        "backend": jax.default_backend(),
        "device_kind": dev.device_kind,
        "devices": jax.device_count(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "jax_version": jax.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_json(path, report: dict) -> None:
    """Writes `report` to `path` whole or not at all (a run killed while writing leaves
    the last complete report)."""
    part = Path(f"{path}.partial")
    part.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(part, path)
