"""Peak memory of exact chunked inference at a large output, against one-pass inference.

  python benchmarks/large_output.py [--lr 256] [--out 4096] [--chunk_sizes 16384,65536]
      [--onepass_sizes 512,724] [--json OUT]

Each configuration runs in its own subprocess, whose peak resident memory (getrusage
``ru_maxrss``) is reported: XLA's buffers are outside Python's allocator, so tracemalloc
would not see them. The model is the paper's EDSR-baseline SRNO (width 256, 16 heads)
with *random* weights: memory and time do not depend on the weight values. The LR input
is a smooth synthetic lr x lr RGB image.

One-pass inference (``model.apply`` on the whole grid) cannot run at the large output
on this machine, so it is measured at smaller outputs and extrapolated linearly in the
number of queries N: rss(N) = a + b N, with b / (width * 4 bytes) the number of live
(N, width) float32 buffers.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import in_child  # noqa: E402


def _child(mode: str, lr: int, out: int, chunk_size: int) -> dict:
    import jax
    import numpy as np

    from srno_jax.coords import make_coord
    from srno_jax.image_api import upscale
    from srno_jax.images import normalise
    from srno_jax.metrics import eval_cell
    from srno_jax.models import init_variables, make_model

    model = make_model()
    variables = init_variables(model)
    y, x = np.mgrid[0:lr, 0:lr] / lr
    img = np.stack([np.sin(7 * x * y), np.cos(5 * x), y], -1) * 127.5 + 127.5
    img = img.round().astype(np.uint8)
    start = time.perf_counter()
    if mode == "chunked":
        result = upscale(model, variables, img, size=(out, out), chunk_size=chunk_size)
    else:
        fn = jax.jit(model.apply)
        result = np.asarray(
            fn(
                variables,
                normalise(img)[None],
                make_coord((out, out))[None],
                eval_cell((out, out), out / lr)[None],
            )
        )[0]
    seconds = time.perf_counter() - start
    assert result.shape[:2] == (out, out)
    return {
        "mode": mode,
        "lr": lr,
        "out": out,
        "queries": out * out,
        "chunk_size": chunk_size if mode == "chunked" else None,
        "seconds": round(seconds, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def _run(mode: str, lr: int, out: int, chunk_size: int = 0) -> dict:
    r = in_child(
        __file__,
        "--_child",
        mode,
        "--lr",
        str(lr),
        "--out",
        str(out),
        "--chunk_sizes",
        str(chunk_size),
    )
    if "error" in r:
        raise SystemExit(f"{mode} at {out}x{out} failed ({r['error']})")
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lr", type=int, default=256, help="LR input side")
    p.add_argument("--out", type=int, default=4096, help="output side for chunked inference")
    p.add_argument("--chunk_sizes", default="65536", help="comma-separated chunk sizes")
    p.add_argument("--onepass_sizes", default="512,724", help="two output sides for one-pass")
    p.add_argument("--json", default=None)
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._child:
        print(json.dumps(_child(a._child, a.lr, a.out, int(a.chunk_sizes))))
        return
    width = 256
    print(f"{'mode':8} {'output':>11} {'chunk':>7} {'seconds':>8} {'peak RSS MiB':>13}", flush=True)
    rows = []
    for mode, out, chunk in [("onepass", int(s), 0) for s in a.onepass_sizes.split(",")] + [
        ("chunked", a.out, int(c)) for c in a.chunk_sizes.split(",")
    ]:
        r = _run(mode, a.lr, out, chunk)
        rows.append(r)
        print(
            f"{r['mode']:8} {str(r['out']) + 'x' + str(r['out']):>11} {r['chunk_size'] or '-':>7} "
            f"{r['seconds']:8.1f} {r['peak_rss_mib']:13.1f}",
            flush=True,
        )
    (n0, r0), (n1, r1) = ((r["queries"], r["peak_rss_mib"]) for r in rows[:2])
    slope = (r1 - r0) / (n1 - n0)  # MiB per query
    n = a.out * a.out
    estimate = {
        "queries": n,
        "peak_rss_mib": round(r0 + slope * (n - n0), 1),
        "live_width_buffers": round(slope * 2**20 / (width * 4), 1),
    }
    print(
        f"one-pass at {a.out}x{a.out}, extrapolated: {estimate['peak_rss_mib']:.0f} MiB "
        f"(about {estimate['live_width_buffers']} live (N, {width}) float32 buffers per query)"
    )
    if a.json:
        Path(a.json).write_text(json.dumps({"runs": rows, "onepass_estimate": estimate}, indent=1))


if __name__ == "__main__":
    main()
