"""Tests for srno_jax.torch_pickle: golden checkpoints, crafted files, refusals, fuzzing."""

from __future__ import annotations

import collections
import io
import os
import pickle
import pickletools
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import require_golden
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from srno_jax.errors import CheckpointError
from srno_jax.torch_pickle import read_pth

# --- a tiny torch.save writer, so crafted checkpoints need no torch ------------------


class Global:
    """Pickled as the GLOBAL ``module name``, whether or not that module exists here."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self):  # the pickler insists that a reduce function be callable
        raise AssertionError("never called")


class Call:
    """Pickled as ``func(*args)`` (REDUCE)."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


class Storage:
    """Pickled as the persistent id torch writes for a storage."""

    def __init__(self, kind: str, key: str, numel: int):
        self.pid = ("storage", Global("torch", kind), key, "cpu", numel)


def tensor(storage, offset, size, stride):
    return Call(
        Global("torch._utils", "_rebuild_tensor_v2"),
        storage,
        offset,
        size,
        stride,
        False,
        collections.OrderedDict(),
    )


class Writer(pickle._Pickler):
    dispatch = pickle._Pickler.dispatch.copy()
    dispatch[Global] = lambda self, g: self.write(f"c{g.module}\n{g.name}\n".encode())

    def persistent_id(self, obj):
        return obj.pid if isinstance(obj, Storage) else None


def dumps(obj) -> bytes:
    buf = io.BytesIO()
    Writer(buf, protocol=2).dump(obj)
    return buf.getvalue()


def write_zip(path: Path, entries: dict[str, bytes], compress=zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compress) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return path


def write_ckpt(path: Path, obj=None, storages=None, pkl=None, top="archive", byteorder=b"little"):
    entries = {f"{top}/data.pkl": dumps(obj) if pkl is None else pkl, f"{top}/byteorder": byteorder}
    entries.update({f"{top}/data/{k}": v for k, v in (storages or {}).items()})
    return write_zip(path, entries)


def small_entries() -> dict[str, bytes]:
    with zipfile.ZipFile(require_golden("small_edsr_srno") / "checkpoint.pth") as zf:
        return {name: zf.read(name) for name in zf.namelist()}


# --- golden checkpoints ---------------------------------------------------------------

EDSR_SPEC = {"name": "edsr-baseline", "args": {"no_upsampling": True}}


@pytest.mark.parametrize(
    "name, args, shapes",
    [
        (
            "small_edsr_srno",
            {
                "encoder_spec": {
                    "name": "edsr-baseline",
                    "args": {"no_upsampling": True, "n_resblocks": 2},
                },
                "width": 64,
                "blocks": 4,
            },
            {
                "encoder.head.0.weight": (64, 3, 3, 3),
                "conv00.weight": (64, 266, 1, 1),
                "conv0.qkv_proj.weight": (192, 64, 1, 1),
                "fc2.weight": (3, 256, 1, 1),
            },
        ),
        (
            "edsr_srno",
            {"encoder_spec": EDSR_SPEC, "width": 256, "blocks": 16},
            {
                "encoder.head.0.weight": (64, 3, 3, 3),
                "conv00.weight": (256, 266, 1, 1),
                "conv0.qkv_proj.weight": (768, 256, 1, 1),
                "fc2.bias": (3,),
            },
        ),
        (
            "rdn_srno",
            {
                "encoder_spec": {"name": "rdn", "args": {"no_upsampling": True, "RDNconfig": "A"}},
                "width": 256,
                "blocks": 16,
            },
            {
                "encoder.SFENet1.weight": (64, 3, 3, 3),
                "encoder.RDBs.0.convs.0.conv.0.weight": (32, 64, 3, 3),
                "conv00.weight": (256, 266, 1, 1),
            },
        ),
    ],
)
def test_golden_checkpoints_load(name, args, shapes):
    ckpt = read_pth(require_golden(name) / "checkpoint.pth")
    assert ckpt["epoch"] == 1
    assert ckpt["model"]["name"] == "sronet"
    assert ckpt["model"]["args"] == args
    assert ckpt["optimizer"]["name"] == "adam"
    sd = ckpt["model"]["sd"]
    assert type(sd) is collections.OrderedDict
    assert sd._metadata[""] == {"version": 1}  # as torch sets it
    for key, shape in shapes.items():
        assert sd[key].shape == shape
    for value in sd.values():
        assert value.dtype == np.float32 and value.flags.c_contiguous and np.isfinite(value).all()


def test_small_keys_match_golden_gradients():
    root = require_golden("small_edsr_srno")
    sd = read_pth(root / "checkpoint.pth")["model"]["sd"]
    with np.load(root / "cases.npz") as cases:
        grads = {k[len("grad/") :]: cases[k].shape for k in cases.files if k.startswith("grad/")}
    means = {f"encoder.{m}.{p}" for m in ("sub_mean", "add_mean") for p in ("weight", "bias")}
    assert set(sd) == set(grads) | means
    assert all(sd[k].shape == shape for k, shape in grads.items())


def test_values_match_the_raw_storage():
    """Find conv00.weight's storage key in the pickle text and decode the record by hand."""
    entries = small_entries()
    strings = [
        arg
        for op, arg, _ in pickletools.genops(entries["checkpoint/data.pkl"])
        if op.name == "BINUNICODE"
    ]
    after = strings[strings.index("conv00.weight") + 1 :]
    key = next(s for s in after if s.isdigit())
    raw = np.frombuffer(entries[f"checkpoint/data/{key}"], "<f4")
    loaded = read_pth(require_golden("small_edsr_srno") / "checkpoint.pth")["model"]["sd"][
        "conv00.weight"
    ]
    np.testing.assert_array_equal(loaded, raw.reshape(loaded.shape))


# --- crafted checkpoints: layouts and dtypes -----------------------------------------


def test_offset_stride_and_big_endian(tmp_path):
    values = np.arange(40, dtype=">f8")
    s = Storage("DoubleStorage", "7", 40)
    obj = {
        "t": tensor(s, 3, (3, 4), (1, 6)),
        "bcast": tensor(s, 39, (2, 3), (0, 0)),
        "flat": tensor(s, 0, (40,), (1,)),
        "empty": tensor(s, 0, (0, 5), (5, 1)),
    }
    got = read_pth(write_ckpt(tmp_path / "c.pth", obj, {"7": values.tobytes()}, byteorder=b"big"))
    i, j = np.meshgrid(np.arange(3), np.arange(4), indexing="ij")
    np.testing.assert_array_equal(got["t"], 3 + i + 6 * j)
    assert got["t"].flags.c_contiguous and got["t"].dtype == np.float64
    np.testing.assert_array_equal(got["bcast"], np.full((2, 3), 39.0))
    np.testing.assert_array_equal(got["flat"], np.arange(40.0))
    assert got["empty"].shape == (0, 5)


@pytest.mark.parametrize(
    "kind, raw, expected",
    [
        ("FloatStorage", np.array([1.5, -2], "<f4"), np.array([1.5, -2], np.float32)),
        ("HalfStorage", np.array([0.5, 3], "<f2"), np.array([0.5, 3], np.float16)),
        (
            "BFloat16Storage",
            np.array([1.0, -2.5, 0.15625], "<f4").view("<u4") >> 16,
            np.array([1.0, -2.5, 0.15625], np.float32),
        ),
        ("LongStorage", np.array([-(2**40), 5], "<i8"), np.array([-(2**40), 5], np.int64)),
        ("IntStorage", np.array([-7, 9], "<i4"), np.array([-7, 9], np.int32)),
        ("ShortStorage", np.array([-300, 2], "<i2"), np.array([-300, 2], np.int16)),
        ("CharStorage", np.array([-5, 6], "i1"), np.array([-5, 6], np.int8)),
        ("ByteStorage", np.array([200, 6], "u1"), np.array([200, 6], np.uint8)),
        ("BoolStorage", np.array([0, 1, 2], "u1"), np.array([False, True, True])),
    ],
)
def test_dtypes(tmp_path, kind, raw, expected):
    raw = raw.astype("<u2") if kind == "BFloat16Storage" else raw
    s = Storage(kind, "0", len(raw))
    obj = [
        Call(
            Global("torch._utils", "_rebuild_parameter"),
            tensor(s, 0, (len(raw),), (1,)),
            True,
            collections.OrderedDict(),
        )
    ]
    got = read_pth(write_ckpt(tmp_path / "c.pth", obj, {"0": raw.tobytes()}))[0]
    assert got.dtype == expected.dtype
    np.testing.assert_array_equal(got, expected)


# --- refusals, each with its own message ---------------------------------------------


def test_refuses_os_system_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    obj = {"x": Call(Global("os", "system"), f"echo pwned > {marker}")}
    with pytest.raises(CheckpointError, match=r"refusing global os\.system in .*c\.pth"):
        read_pth(write_ckpt(tmp_path / "c.pth", obj))
    assert not marker.exists()


@pytest.mark.parametrize(
    "func, arg, refused",
    [
        (eval, "1 + 1", "builtins.eval"),
        (os.system, "echo pwned", f"{os.system.__module__}.system"),  # posix.system on Linux
    ],
)
@pytest.mark.parametrize("protocol", [2, 4])
def test_refuses_real_pickles_of_functions(tmp_path, func, arg, refused, protocol):
    pkl = pickle.dumps(Call(func, arg), protocol=protocol, fix_imports=False)
    with pytest.raises(CheckpointError, match=f"refusing global {refused} in"):
        read_pth(write_ckpt(tmp_path / "c.pth", pkl=pkl))


def test_refuses_other_opcodes(tmp_path):
    pkl = pickle.dumps({"a": [1]}, protocol=0)
    match = "refusing pickle opcode DICT at byte 1 of archive/data.pkl in"
    with pytest.raises(CheckpointError, match=match):
        read_pth(write_ckpt(tmp_path / "c.pth", pkl=pkl))


def test_refuses_huge_memo_index_fast(tmp_path):
    pkl = b"\x80\x02Nr\x00\x00\x00\x08."  # LONG_BINPUT 2**27: the C unpickler would fill GBs
    with pytest.raises(CheckpointError, match="malformed pickle .*memo index 134217728"):
        read_pth(write_ckpt(tmp_path / "c.pth", pkl=pkl))


@pytest.mark.parametrize(
    "pkl, match",
    [
        (b"\x80\x02}q\x00(X", "malformed pickle archive/data.pkl in .*: ValueError"),
        (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n)R.", "malformed pickle .*TypeError"),
        (b"\x80\x02ctorch\nFloatStorage\n)R.", "malformed pickle .*TypeError"),
        (b"\x80\x02h\x05.", "malformed pickle .*UnpicklingError"),
    ],
)
def test_malformed_pickles(tmp_path, pkl, match):
    with pytest.raises(CheckpointError, match=match):
        read_pth(write_ckpt(tmp_path / "c.pth", pkl=pkl))


@pytest.mark.parametrize(
    "pid",
    [
        ("storage", "FloatStorage", "0", "cpu", 4),  # a str, not the storage global
        ("storage", Global("torch", "FloatStorage"), 0, "cpu", 4),
        ("storage", Global("torch", "FloatStorage"), "0", "cpu", -1),
        ("module", Global("torch", "FloatStorage"), "0", "cpu", 4),
        "storage",
    ],
)
def test_refuses_malformed_storage_references(tmp_path, pid):
    s = Storage("FloatStorage", "0", 4)
    s.pid = pid
    path = write_ckpt(tmp_path / "c.pth", tensor(s, 0, (4,), (1,)), {"0": bytes(16)})
    with pytest.raises(CheckpointError, match="malformed storage reference .* in .*c.pth"):
        read_pth(path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"no checkpoint file at .*nothing\.pth"):
        read_pth(tmp_path / "nothing.pth")


def test_legacy_format(tmp_path):
    path = tmp_path / "old.pth"
    path.write_bytes(b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.\x80\x02}q\x00.")
    match = r"legacy \(pre-1\.6\) format.*torch\.save\(torch\.load\(p\), p2\)"
    with pytest.raises(CheckpointError, match=match):
        read_pth(path)


def test_not_a_zip(tmp_path):
    path = tmp_path / "noise.pth"
    path.write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(CheckpointError, match="noise.pth is not a PyTorch checkpoint: not a zip"):
        read_pth(path)


@pytest.mark.parametrize("keep", [10, 1000, 500_000, -22, -1])
def test_truncated(tmp_path, keep):
    data = (require_golden("small_edsr_srno") / "checkpoint.pth").read_bytes()
    path = tmp_path / "cut.pth"
    path.write_bytes(data[:keep])
    with pytest.raises(CheckpointError, match="cut.pth is a truncated or corrupt zip archive"):
        read_pth(path)


def test_corrupt_storage_bytes(tmp_path):
    data = bytearray((require_golden("small_edsr_srno") / "checkpoint.pth").read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside a storage: the CRC check catches it
    path = tmp_path / "bad.pth"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="truncated or corrupt zip archive .*CRC"):
        read_pth(path)


def test_no_data_pkl(tmp_path):
    entries = {"archive/data/0": bytes(4), "archive/nested/data.pkl": b""}
    path = write_zip(tmp_path / "c.pth", entries)
    with pytest.raises(CheckpointError, match=r"holds no <top>/data\.pkl"):
        read_pth(path)


def test_several_data_pkl(tmp_path):
    pkl = dumps({})
    path = write_zip(tmp_path / "c.pth", {"a/data.pkl": pkl, "b/data.pkl": pkl})
    match = r"several data\.pkl files \['a/data\.pkl', 'b/data\.pkl'\]"
    with pytest.raises(CheckpointError, match=match):
        read_pth(path)


def test_compressed_entry(tmp_path):
    path = write_zip(tmp_path / "c.pth", {"archive/data.pkl": dumps({})}, zipfile.ZIP_DEFLATED)
    with pytest.raises(CheckpointError, match="entry archive/data.pkl in .* is compressed"):
        read_pth(path)


def test_unknown_byteorder(tmp_path):
    with pytest.raises(CheckpointError, match="unknown byteorder b'middle' in"):
        read_pth(write_ckpt(tmp_path / "c.pth", {}, byteorder=b"middle"))


def test_missing_storage(tmp_path):
    obj = tensor(Storage("FloatStorage", "3", 4), 0, (4,), (1,))
    with pytest.raises(CheckpointError, match="storage record archive/data/3 is missing from"):
        read_pth(write_ckpt(tmp_path / "c.pth", obj, {"0": bytes(16)}))


@pytest.mark.parametrize(
    "numel, record, offset, size, stride",
    [
        (4, 16, 1, (4,), (1,)),  # the offset pushes past the end
        (4, 16, 0, (2, 2), (1, 3)),  # the stride does
        (5, 16, 0, (5,), (1,)),  # the record is shorter than numel says
        (3, 16, 0, (4,), (1,)),  # numel is smaller than the record
    ],
)
def test_storage_too_small(tmp_path, numel, record, offset, size, stride):
    obj = tensor(Storage("FloatStorage", "0", numel), offset, size, stride)
    with pytest.raises(CheckpointError, match="storage archive/data/0 in .* is too small"):
        read_pth(write_ckpt(tmp_path / "c.pth", obj, {"0": bytes(record)}))


@pytest.mark.parametrize(
    "size, stride, match",
    [
        ((10**6,) * 4, (10**18, 10**12, 10**6, 1), "is too small"),
        ((2**70,), (1,), "is too small"),
        ((2**31, 2**31), (0, 0), "has more elements than its storage archive/data/0: expanded"),
    ],
)
def test_huge_shape_fails_fast(tmp_path, size, stride, match):
    obj = tensor(Storage("FloatStorage", "0", 2**62), 0, size, stride)
    path = write_ckpt(tmp_path / "c.pth", obj, {"0": bytes(16)})
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=match):
        read_pth(path)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize(
    "offset, size, stride", [(-1, (4,), (1,)), (0, (-4,), (1,)), (0, (4,), (-1,))]
)
def test_negative_layout(tmp_path, offset, size, stride):
    obj = tensor(Storage("FloatStorage", "0", 4), offset, size, stride)
    with pytest.raises(CheckpointError, match="negative offset, size or stride in"):
        read_pth(write_ckpt(tmp_path / "c.pth", obj, {"0": bytes(16)}))


@pytest.mark.parametrize(
    "offset, size, stride",
    [(0.0, (4,), (1,)), (0, (4, 1), (1,)), (0, "4", (1,)), (0, (True,), (1,))],
)
def test_malformed_layout(tmp_path, offset, size, stride):
    obj = tensor(Storage("FloatStorage", "0", 4), offset, size, stride)
    with pytest.raises(CheckpointError, match="malformed tensor layout in"):
        read_pth(write_ckpt(tmp_path / "c.pth", obj, {"0": bytes(16)}))


# --- fuzzing: only CheckpointError, never anything else ------------------------------


def read_bytes(data: bytes):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "f.pth"
        path.write_bytes(data)
        try:
            read_pth(path)
        except CheckpointError:
            pass


@st.composite
def mutate(draw, base: bytes, hot: int):
    """Up to 4 bit flips, overwrites, deletions or insertions, often within the first or
    last ``hot`` bytes, where headers, the pickle and the zip directory sit."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        n = len(data)
        i = draw(
            st.one_of(
                st.integers(0, n), st.integers(0, min(n, hot)), st.integers(max(0, n - hot), n)
            )
        )
        kind = draw(st.sampled_from(["flip", "overwrite", "delete", "insert"]))
        if kind == "flip" and i < n:
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=8))
            data[i : i + len(chunk)] = chunk
        elif kind == "delete":
            del data[i : i + draw(st.integers(1, 64))]
        else:
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=2048))
def test_fuzz_random_bytes(data):
    read_bytes(data)


@pytest.fixture(scope="module")
def small_bytes() -> bytes:
    return (require_golden("small_edsr_srno") / "checkpoint.pth").read_bytes()


@FUZZ
@given(data=st.data())
def test_fuzz_mutated_zip(small_bytes, data):
    read_bytes(data.draw(mutate(small_bytes, hot=8000)))


@pytest.fixture(scope="module")
def small_rezip() -> tuple[bytes, bytes]:
    """The small checkpoint's data.pkl, and a zip of everything else."""
    entries = small_entries()
    pkl = entries.pop("checkpoint/data.pkl")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return pkl, buf.getvalue()


@FUZZ
@given(data=st.data())
def test_fuzz_mutated_pickle(small_rezip, data):
    pkl, rest = small_rezip
    buf = io.BytesIO(rest)
    with zipfile.ZipFile(buf, "a") as zf:
        zf.writestr("checkpoint/data.pkl", data.draw(mutate(pkl, hot=len(pkl))))
    read_bytes(buf.getvalue())
