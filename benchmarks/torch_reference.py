"""The reference PyTorch SRNO (EDSR-baseline encoder), as a CPU speed baseline for srno-jax.

A self-contained translation of the official SRNO code (Wei & Zhang, CVPR 2023: models
`edsr-baseline` from LIIF, `sronet`, `galerkin.simple_attn`): NCHW, nn.Conv2d,
F.grid_sample for the four nearest neighbours, per-head LayerNorm with unbiased std and
eps on the std. Module names match the reference state dict, so its checkpoints load
with strict=True. Written the way the reference is, not optimised: it is the baseline.

Install (CPU build only, in its own venv; the project's venv does not need torch):
  python3 -m venv torchref && torchref/bin/pip install torch==2.13.0 numpy   # the CPU wheel

Usage:
  python benchmarks/torch_reference.py [--json OUT] [--repeats 5]   # timing, 2 threads
  python benchmarks/torch_reference.py --check GOLDEN_DIR   # e.g. tests/golden

Timed cases (width 256, 16 heads, random weights; one warm-up, then the median):
  inference_x4_128_to_512  torch.no_grad forward, LR 1x3x128x128 -> all 512x512 queries
                           at once, cell 2/512 (as the reference demo runs a whole image).
  train_step_b4_48         batch 4, 48x48 LR, 2304 random queries each, L1, backward, Adam.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import numpy as np

try:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
except ImportError:  # the project's venv has no torch
    raise SystemExit(
        "torch_reference.py needs PyTorch, in its own venv: python3 -m venv torchref && "
        "torchref/bin/pip install torch==2.13.0 numpy"
    ) from None

# --- EDSR-baseline (LIIF's edsr.py, no upsampling) --------------------------------------


class MeanShift(nn.Conv2d):
    """Frozen; unused in the forward pass, kept so the reference state dict loads strictly."""

    def __init__(self, sign=-1, rgb_mean=(0.4488, 0.4371, 0.4040)):
        super().__init__(3, 3, kernel_size=1)
        self.weight.data, self.bias.data = (
            torch.eye(3).view(3, 3, 1, 1),
            sign * torch.tensor(rgb_mean),
        )
        self.requires_grad_(False)


def conv3(c_in, c_out):  # the reference's default_conv, k = 3
    return nn.Conv2d(c_in, c_out, 3, padding=1)


class ResBlock(nn.Module):
    def __init__(self, n_feats, res_scale=1.0):
        super().__init__()
        self.body, self.res_scale = (
            nn.Sequential(conv3(n_feats, n_feats), nn.ReLU(True), conv3(n_feats, n_feats)),
            res_scale,
        )

    def forward(self, x):
        return self.body(x).mul(self.res_scale).add_(x)  # res += x, in place as the reference


class EDSR(nn.Module):
    def __init__(self, n_resblocks=16, n_feats=64, res_scale=1.0):
        super().__init__()
        self.sub_mean, self.add_mean = MeanShift(sign=-1), MeanShift(sign=1)
        self.head = nn.Sequential(conv3(3, n_feats))
        self.body = nn.Sequential(
            *[ResBlock(n_feats, res_scale) for _ in range(n_resblocks)], conv3(n_feats, n_feats)
        )
        self.out_dim = n_feats

    def forward(self, x):  # the reference skips sub_mean / add_mean
        x = self.head(x)
        return self.body(x).add_(x)


# --- SRNO (sronet.py, galerkin.py) --------------------------------------------------------


def make_coord(shape):
    """Pixel centres in [-1, 1], (*shape, 2), op by op in float32 as the reference's."""
    seqs = []
    for n in shape:
        r = 1 / n
        seqs.append(-1 + r + (2 * r) * torch.arange(n).float())
    return torch.stack(torch.meshgrid(*seqs, indexing="ij"), dim=-1)


class LayerNorm(nn.Module):
    """The reference's: weight * (x - mean) / (unbiased std + eps) + bias."""

    def __init__(self, shape, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(shape))
        self.bias = nn.Parameter(torch.zeros(shape))
        self.eps = eps

    def forward(self, x):
        mean = x.mean(-1, keepdim=True)
        std = x.std(-1, keepdim=True)
        return self.weight * (x - mean) / (std + self.eps) + self.bias


class SimpleAttn(nn.Module):
    """Galerkin-type kernel integral: q (k^T v) / N + x, then o_proj2(gelu(o_proj1)) + x."""

    def __init__(self, midc, heads):
        super().__init__()
        self.headc, self.heads = midc // heads, heads
        self.qkv_proj = nn.Conv2d(midc, 3 * midc, 1)
        self.o_proj1 = nn.Conv2d(midc, midc, 1)
        self.o_proj2 = nn.Conv2d(midc, midc, 1)
        self.kln = LayerNorm((heads, 1, self.headc))
        self.vln = LayerNorm((heads, 1, self.headc))
        self.act = nn.GELU()

    def forward(self, x):
        b, c, h, w = x.shape
        bias = x
        # per head: 3 * headc contiguous channels, q then k then v
        qkv = self.qkv_proj(x).permute(0, 2, 3, 1).reshape(b, h * w, self.heads, 3 * self.headc)
        q, k, v = qkv.permute(0, 2, 1, 3).chunk(3, dim=-1)  # (B, heads, N, d) each
        k, v = self.kln(k), self.vln(v)
        v = torch.matmul(k.transpose(-2, -1), v) / (h * w)
        v = torch.matmul(q, v).permute(0, 2, 1, 3).reshape(b, h, w, c)
        ret = v.permute(0, 3, 1, 2) + bias
        return self.o_proj2(self.act(self.o_proj1(ret))) + bias


class SRNO(nn.Module):
    def __init__(self, n_resblocks=16, width=256, blocks=16):
        super().__init__()
        self.encoder = EDSR(n_resblocks)
        self.conv00 = nn.Conv2d((64 + 2) * 4 + 2, width, 1)
        self.conv0 = SimpleAttn(width, blocks)
        self.conv1 = SimpleAttn(width, blocks)
        self.fc1 = nn.Conv2d(width, 256, 1)
        self.fc2 = nn.Conv2d(256, 3, 1)

    def query_rgb(self, inp, feat, coord, cell):
        """coord (B, H, W, 2) as (row, col); returns (B, 3, H, W)."""
        h, w = feat.shape[-2:]
        pos_lr = make_coord((h, w)).permute(2, 0, 1).unsqueeze(0).expand(feat.shape[0], 2, h, w)
        rx, ry, eps_shift = 1 / h, 1 / w, 1e-6
        rel_coords, feat_s, areas = [], [], []
        for vx in (-1, 1):
            for vy in (-1, 1):
                coord_ = coord.clone()
                coord_[:, :, :, 0] += vx * rx + eps_shift
                coord_[:, :, :, 1] += vy * ry + eps_shift
                coord_.clamp_(-1 + 1e-6, 1 - 1e-6)
                # grid_sample takes (x, y): flip; nearest LR feature and its pixel centre
                feat_s.append(
                    F.grid_sample(feat, coord_.flip(-1), mode="nearest", align_corners=False)
                )
                old = F.grid_sample(pos_lr, coord_.flip(-1), mode="nearest", align_corners=False)
                rel = coord.permute(0, 3, 1, 2) - old
                rel[:, 0] *= h
                rel[:, 1] *= w
                areas.append(torch.abs(rel[:, 0] * rel[:, 1]) + 1e-9)
                rel_coords.append(rel)
        rel_cell = cell.clone()
        rel_cell[:, 0] *= h
        rel_cell[:, 1] *= w
        tot_area = torch.stack(areas).sum(dim=0)
        areas = areas[::-1]  # weight of neighbour i: area of the diagonally opposite one
        feat_s = [f * (a / tot_area).unsqueeze(1) for f, a in zip(feat_s, areas)]
        grid = torch.cat(
            [
                *rel_coords,
                *feat_s,
                rel_cell.unsqueeze(-1).unsqueeze(-1).repeat(1, 1, coord.shape[1], coord.shape[2]),
            ],
            dim=1,
        )
        x = self.conv1(self.conv0(self.conv00(grid)))
        ret = self.fc2(F.gelu(self.fc1(x)))
        return ret + F.grid_sample(
            inp, coord.flip(-1), mode="bilinear", padding_mode="border", align_corners=False
        )

    def forward(self, inp, coord, cell):
        return self.query_rgb(inp, self.encoder(inp), coord, cell)


# --- golden check --------------------------------------------------------------------------


def check(golden_dir):
    """Loads each golden EDSR-baseline checkpoint strictly; compares feat, pred, loss, grads."""
    ok = True
    for name in ("small_edsr_srno", "edsr_srno"):
        folder = os.path.join(golden_dir, name)
        if not os.path.isdir(folder):
            continue
        ckpt = torch.load(
            os.path.join(folder, "checkpoint.pth"), map_location="cpu", weights_only=False
        )
        args = ckpt["model"]["args"]
        if args["encoder_spec"]["name"] != "edsr-baseline":
            continue
        sd = ckpt["model"]["sd"]
        n_res = len({k.split(".")[2] for k in sd if k.startswith("encoder.body.")}) - 1
        model = SRNO(n_res, args.get("width", 256), args.get("blocks", 16))
        model.load_state_dict(sd, strict=True)
        z = np.load(os.path.join(folder, "cases.npz"))
        print(
            f"{name}: {n_res} resblocks, width {args.get('width', 256)}, heads {args.get('blocks', 16)}"
        )
        for case in ("grid_x2.5", "grid_x7_mcell", "train_batch_x3.3"):
            t = {k: torch.from_numpy(z[f"{case}/{k}"]) for k in ("inp", "coord", "cell")}
            model.zero_grad()
            feat = model.encoder(t["inp"])
            pred = model.query_rgb(t["inp"], feat, t["coord"], t["cell"])
            err = np.abs(pred.detach().numpy() - z[case + "/pred"]).max()
            line = (
                f"  {case:18s} feat {np.abs(feat.detach().numpy() - z[case + '/feat']).max():.2e}"
                f"  pred {err:.2e}"
            )
            if case.startswith("train"):
                gt = (torch.from_numpy(z[case + "/gt"]) - 0.5) / 0.5  # train.py normalises gt
                loss = F.l1_loss(pred, gt)
                loss.backward()
                rel = max(
                    np.linalg.norm(p.grad.numpy() - z["grad/" + k]) / np.linalg.norm(z["grad/" + k])
                    for k, p in model.named_parameters()
                    if p.requires_grad
                )
                dl = abs(loss.item() - float(z[case + "/loss"]))
                line += f"  loss {dl:.2e}  grad max rel {rel:.2e}"
                ok &= dl <= 1e-5 and rel <= 1e-3
            print(line)
            ok &= err <= 1e-4
    print("golden check:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


# --- timing --------------------------------------------------------------------------------


def timed(fn, repeats):
    """One warm-up call, then `repeats` timed calls (seconds)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def cpu_name():
    with open("/proc/cpuinfo") as f:
        return next(
            (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
            platform.processor(),
        )


def bench(repeats):
    torch.manual_seed(0)
    model, results = SRNO(), []
    # inference: 128x128 -> the whole 512x512 grid in one pass
    inp = torch.rand(1, 3, 128, 128) * 2 - 1
    coord = make_coord((512, 512)).unsqueeze(0)
    cell = torch.full((1, 2), 2 / 512)
    model.eval()

    def infer():
        with torch.no_grad():
            model(inp, coord, cell)

    results.append(("inference_x4_128_to_512", timed(infer, repeats)))
    # training step: batch 4, 48x48 LR, 2304 random HR queries (as a 48x48 "grid")
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=4e-5)
    inp = torch.rand(4, 3, 48, 48) * 2 - 1
    coord = torch.rand(4, 48, 48, 2) * 2 - 1
    cell = torch.full((4, 2), 2 / 144)  # scale 3
    gt = torch.rand(4, 3, 48, 48) * 2 - 1

    def step():
        loss = F.l1_loss(model(inp, coord, cell), gt)
        opt.zero_grad()
        loss.backward()
        opt.step()

    results.append(("train_step_b4_48", timed(step, repeats)))
    return [{"name": n, "median_s": statistics.median(t), "times_s": t} for n, t in results]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--check", metavar="GOLDEN_DIR", help="compare with the golden vectors instead")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.check:
        raise SystemExit(check(a.check))
    results = bench(a.repeats)
    machine = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "threads": a.threads,
        "torch_version": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    print(f"torch {torch.__version__}, {machine['cpu']}, {a.threads} threads")
    print(f"{'case':28s} {'median_s':>9s}  times_s")
    for r in results:
        print(
            f"{r['name']:28s} {r['median_s']:9.3f}  " + " ".join(f"{t:.3f}" for t in r["times_s"])
        )
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump({"machine": machine, "results": results}, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
