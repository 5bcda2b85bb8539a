"""The demo config trained the same number of steps in float32 and in bfloat16 compute.

  python benchmarks/bf16_demo.py [--steps 2000] [--json OUT]

Each run is `configs/demo.py` (same seed, so the same initial parameters and batches)
with ``total_steps`` fixed and no time limit, in its own child process and a new
temporary workdir; the held-out PSNR (benchmark protocol, the demo's photographs) at
x2, x3 and x4 is what `main.py` prints at the end. The target: bfloat16 within 0.05 dB of
float32 at every scale.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import in_child, machine_info, write_json  # noqa: E402


def _child(dtype: str, steps: int) -> dict:
    from configs import demo
    from srno_jax import train_cli

    config = demo.get_config()
    config.compute_dtype = dtype
    config.total_steps = steps
    config.max_train_minutes = 0.0  # no time limit: the same steps for both
    config.eval.every_steps = steps  # validate once, at the end
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        results = train_cli.run(config, workdir)
    return {
        "compute_dtype": dtype,
        "steps": steps,
        "seconds": time.perf_counter() - start,
        "psnr": {f"{s:g}": r[0] for s, r in results.items()},
        "bicubic_psnr": {f"{s:g}": r[1] for s, r in results.items()},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=2000, help="training steps of each run")
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._child:
        print(json.dumps(_child(a._child, a.steps)))
        return
    runs = []
    for dtype in ("float32", "bfloat16"):
        r = in_child(__file__, "--_child", dtype, "--steps", str(a.steps))
        if "error" in r:
            raise SystemExit(f"the {dtype} run failed ({r['error']})")
        runs.append(r)
    f32, bf16 = runs
    diff = {s: bf16["psnr"][s] - f32["psnr"][s] for s in f32["psnr"]}
    print(f"{'scale':>6} {'float32':>8} {'bfloat16':>9} {'diff dB':>8}")
    for s in f32["psnr"]:
        print(f"{'x' + s:>6} {f32['psnr'][s]:8.3f} {bf16['psnr'][s]:9.3f} {diff[s]:+8.3f}")
    print(
        f"{a.steps} steps each: {f32['seconds']:.0f} s (float32), {bf16['seconds']:.0f} s "
        f"(bfloat16); worst |diff| {max(abs(d) for d in diff.values()):.3f} dB (target 0.05)"
    )
    if a.json:
        write_json(a.json, {"machine": machine_info(), "runs": runs, "psnr_diff_db": diff})


if __name__ == "__main__":
    main()
