"""A roofline estimate of the paper's training step on one H200, without a GPU.

  python benchmarks/gpu_estimate.py [--no-fused] [--float32] [--devices 1] [--top 20]
                                    [--json OUT]

Needs JAX's CUDA plugin (``pip install "jax[cuda13]"`` in a virtualenv; no GPU and no
driver): XLA compiles the step for an H200 (sm_90, its memory bandwidth and SM count)
as it would on the device, Triton kernels down to PTX included, and this script reads
the optimised program's kernels. Each kernel is charged its operands' and results' bytes
at 4.0 TB/s or its matmul/convolution FLOPs at 600 TFLOP/s (bfloat16; 300 for float32
inputs, which the GPU runs as TF32), whichever is longer, and the kernels are added up
by part of the model (from the operations' names). With ``--devices N`` the step is
compiled for N H200s with the batch split over them, as main.py runs it: the estimate is
then one device's, and the all-gathers XLA inserted are listed (the step needs none).

Written against JAX 0.10.2, whose Pallas lowers Triton kernels for CUDA without a GPU
(from 0.11 Pallas's Triton lowering asks for a GPU device).

This is a lower bound, not a measurement: real kernels reach neither figure. On
2026-11-30 the version measured on an H200 at 62.5 ms (README, "One NVIDIA H200") was
estimated here at 43.5 ms, a factor of 1.44. It is for comparing versions of the code
where no GPU is at hand: bytes moved is what the operator's elementwise work costs.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import re
import sys
from pathlib import Path

os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")  # no driver to check
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # no device either: compile only
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

BANDWIDTH, BF16_FLOPS, F32_FLOPS = 4.0e12, 600e12, 300e12
H200 = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: 4800000000000 l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: 150000000000
  shared_memory_per_block_optin: 232448 cuda_compute_capability { major: 9 }
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 10 }
runtime_version { major: 13 minor: 0 patch: 0 }
device_description_str: "NVIDIA H200"
"""
PARTS = ("encoder", "kernel_integrals_0", "kernel_integrals_1", "lift", "project")
BYTES = {"bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1}
SHAPE = re.compile(r"\b(bf16|f16|f32|s32|u32|s8|u8|pred)\[([\d,]*)\]")
INSTRUCTION = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = (.*?) ([\w\-]+)\((.*?)\)(.*)$")
FREE = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "after-all"}


def compile_step(fused: bool, dtype: str, devices: int = 1) -> str:
    """The optimised HLO text of main.py's step on the paper's batch, for `devices`
    H200s."""
    jax.default_backend = lambda: "gpu"  # the model's GPU-only choices (it runs no code)
    from configs import default
    from srno_jax import checkpoints, train

    config = default.get_config()
    b, lr, q = config.batch_size, config.data.inp_size, config.data.sample_q
    topology = topologies.get_topology_desc(
        platform="cuda", target_config=H200, topology=f"1x1x{devices}"
    )
    mesh = topologies.make_mesh(topology, (devices,), ("data",))
    rep, bat = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    # As train.model_from_config builds it on a GPU where the kernel runs.
    model = checkpoints.model_from_spec(checkpoints.model_spec(config), dtype, fused, mesh)
    tx = train.make_optimizer(config)
    state = jax.eval_shape(lambda: train.init_state(model, tx, 0))
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), state)
    f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32, sharding=bat)
    batch = {"inp": f32(b, lr, lr, 3), "coord": f32(b, q, 2), "cell": f32(b, 2), "gt": f32(b, q, 3)}
    votes = jax.ShapeDtypeStruct((devices,), jnp.int32, sharding=bat)
    jitted = train.jit_step(model, tx, config, 250, mesh, state)  # main.py's, as it is
    return jitted.lower(state, batch, votes).compile().as_text()


def shapes(text: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(t, tuple(int(d) for d in dims.split(",") if d)) for t, dims in SHAPE.findall(text)]


def nbytes(shape_list) -> int:
    return sum(BYTES[t] * math.prod(dims) for t, dims in shape_list)


def computation(hlo: str, name: str) -> str:
    start = hlo.find(f"\n%{name} ")
    return "" if start < 0 else hlo[start : hlo.find("\n}\n", start)]


def dot_flops(body: str) -> float:
    """2 x output elements x contracted size of the first dot in a fused computation."""
    sizes = {}
    for line in body.splitlines()[1:]:
        m = INSTRUCTION.match(line)
        if not m:
            continue
        name, out, op, args, rest = m.groups()
        sizes[name] = shapes(out)
        if op == "dot":
            lhs = re.findall(r"%([\w.\-]+)", args)[0]
            dims = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest).group(1)
            k = math.prod(sizes[lhs][0][1][int(c)] for c in dims.split(",") if c)
            return 2.0 * math.prod(sizes[name][0][1]) * k
    return 0.0


def conv_flops(in_shapes, out_shapes) -> float:
    """2 x activation elements x filter taps x channels in, from the 4-D shapes around a
    cuDNN convolution (forward or either gradient)."""
    four = [d for _, d in in_shapes + out_shapes if len(d) == 4]
    filt, act = min(four, key=math.prod), max(four, key=math.prod)
    channels = act[-1] if act[-1] in filt else act[1]
    return 2.0 * math.prod(act) * math.prod(filt) / channels


def kernels(hlo: str) -> list[dict]:
    """Each kernel of the entry computation: bytes in and out, FLOPs, time, part."""
    entry = hlo[hlo.index("\nENTRY ") :]
    entry = entry[: entry.index("\n}\n")]
    sizes, rows = {}, []
    for line in entry.splitlines()[1:]:
        m = INSTRUCTION.match(line)
        if not m:
            continue
        name, out, op, args, rest = m.groups()
        out_shapes = shapes(out)
        sizes[name] = out_shapes
        if op in FREE:
            continue
        in_shapes = [s for a in re.findall(r"%([\w.\-]+)", args) for s in sizes.get(a, [])]
        # cuBLAS's workspace (a 1-D s8 result) is scratch, not traffic.
        moved = nbytes(in_shapes) + nbytes([s for s in out_shapes if s[0] != "s8"])
        target = re.search(r'custom_call_target="([^"]+)"', rest)
        kind = re.search(r"kind=(\w+)", rest)
        called = re.search(r"calls=%?([\w.\-]+)", rest)
        flops = 0.0
        if target and "conv" in target.group(1):
            flops = conv_flops(in_shapes, out_shapes)
        elif kind and kind.group(1) == "kCustom" and called:
            flops = dot_flops(computation(hlo, called.group(1)))
        f32 = any(t == "f32" for t, _ in in_shapes[:2])
        seconds = max(moved / BANDWIDTH, flops / (F32_FLOPS if f32 else BF16_FLOPS))
        named = re.search(r'op_name="([^"]+)"', rest)
        if not named and called:
            named = re.search(r'op_name="([^"]+)"', computation(hlo, called.group(1)))
        op_name = named.group(1) if named else ""
        part = next((p for p in PARTS if p in op_name), "other")
        label = target.group(1) if target else f"{op}:{kind.group(1) if kind else ''}"
        rows.append(
            dict(op=op_name, label=label, part=part, bytes=moved, flops=flops, seconds=seconds)
        )
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--no-fused", action="store_true", help="fused_kernels off")
    p.add_argument("--float32", action="store_true", help="float32 compute")
    p.add_argument("--devices", type=int, default=1, help="H200s the batch is split over")
    p.add_argument("--top", type=int, default=20, help="longest kernels to list")
    p.add_argument("--json", help="write the totals and parts here")
    args = p.parse_args(argv)
    hlo = compile_step(not args.no_fused, "float32" if args.float32 else "bfloat16", args.devices)
    rows = kernels(hlo)
    gathers = re.findall(r"= \(?(\S+?),? .*all-gather-start\(", hlo)
    total = sum(r["seconds"] for r in rows)
    parts = collections.defaultdict(float)
    for r in rows:
        parts[r["part"]] += r["seconds"]
    print(
        f"{len(rows)} kernels: {total * 1e3:.1f} ms, {sum(r['bytes'] for r in rows) / 1e9:.1f} GB, "
        f"{sum(r['flops'] for r in rows) / 1e12:.2f} TFLOP"
    )
    for part, s in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"  {part:20s} {s * 1e3:6.2f} ms")
    if args.devices > 1:
        print(f"all-gathers: {len(gathers)}", *gathers[:8])
    for r in sorted(rows, key=lambda r: -r["seconds"])[: args.top]:
        print(
            f"{r['seconds'] * 1e3:6.2f} ms {r['bytes'] / 1e9:6.2f} GB {r['label'][:26]:26s} {r['op'][-70:]}"
        )
    if args.json:
        report = {
            "fused": not args.no_fused,
            "compute_dtype": "float32" if args.float32 else "bfloat16",
            "devices": args.devices,
            "all_gathers": len(gathers),
            "estimate_ms": total * 1e3,
            "gbytes": sum(r["bytes"] for r in rows) / 1e9,
            "parts_ms": {k: v * 1e3 for k, v in parts.items()},
        }
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
