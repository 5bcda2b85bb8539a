"""Read PyTorch checkpoint files safely, without PyTorch.

``read_pth`` accepts exactly the zip format that ``torch.save`` writes since torch 1.6:

* a zip archive with one ``<top>/data.pkl`` (``<top>`` is any folder name), its storages
  in ``<top>/data/<key>`` and an optional ``<top>/byteorder`` (``little``, the default, or
  ``big``); every entry read must be stored uncompressed, as torch writes it;
* ``data.pkl`` may use only the pickle opcodes in ``_OPCODES``: those plain data needs at
  protocols 2-4 (so no ``INST``/``OBJ``/``NEWOBJ``/``EXT``, no protocol-0 text opcodes
  but ``GLOBAL``, no out-of-band buffers), with memo indices below its size, and only
  these globals:
  ``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2``,
  ``torch._utils._rebuild_parameter`` and ``torch.<T>Storage`` for
  T in Float, Double, Half, BFloat16, Long, Int, Short, Char, Byte, Bool;
* persistent ids of the form ``('storage', <T>Storage, key, location, numel)``, and
  tensors with non-negative offset, size and stride that lie within their storage and
  hold no more elements than it (expanded views are refused, so memory stays bounded by
  the file's size).

Nothing from the file is ever executed: each global maps to a fixed function of this
module. Anything else raises ``CheckpointError`` naming the problem and the file.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import pickletools
import reprlib
import warnings
import zipfile
from typing import NamedTuple

import numpy as np
from etils import epath

from srno_jax.errors import CheckpointError

# The legacy (pre-1.6) format starts with a pickled magic number: PROTO 2, LONG1 of 10 bytes.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")

# torch storage type -> (dtype of the raw bytes, dtype returned).
_STORAGE_DTYPES = {
    "DoubleStorage": ("f8", np.float64),
    "FloatStorage": ("f4", np.float32),
    "HalfStorage": ("f2", np.float16),
    "BFloat16Storage": ("u2", np.float32),  # numpy has no bfloat16: widen the bits
    "LongStorage": ("i8", np.int64),
    "IntStorage": ("i4", np.int32),
    "ShortStorage": ("i2", np.int16),
    "CharStorage": ("i1", np.int8),
    "ByteStorage": ("u1", np.uint8),
    "BoolStorage": ("u1", np.bool_),
}

_OPCODES = frozenset(
    "PROTO FRAME STOP MARK POP POP_MARK DUP NONE NEWTRUE NEWFALSE BININT BININT1 BININT2 "
    "LONG1 LONG4 BINFLOAT SHORT_BINUNICODE BINUNICODE BINUNICODE8 SHORT_BINBYTES BINBYTES "
    "BINBYTES8 EMPTY_TUPLE TUPLE TUPLE1 TUPLE2 TUPLE3 EMPTY_LIST APPEND APPENDS EMPTY_DICT "
    "SETITEM SETITEMS EMPTY_SET ADDITEMS FROZENSET BINPUT LONG_BINPUT MEMOIZE BINGET "
    "LONG_BINGET GLOBAL STACK_GLOBAL REDUCE BUILD BINPERSID".split()
)
_MEMO_OPCODES = frozenset(["BINPUT", "LONG_BINPUT", "BINGET", "LONG_BINGET"])


def read_pth(path) -> object:
    """Load a ``torch.save`` checkpoint (zip format) as plain Python and numpy.

    Args:
      path: the ``.pth`` file.
    Returns:
      the pickled structure built from dict, collections.OrderedDict (state dicts, with
      torch's ``_metadata`` attribute), list, tuple, set, frozenset, str, bytes, int,
      float, bool and None, with every tensor (or parameter) as a new C-contiguous numpy
      array of its dtype, shape and values (bfloat16 widened to float32).
    Raises:
      CheckpointError: the file is missing, not a zip-format checkpoint, corrupt, or uses
        anything beyond what the module docstring lists.
    """
    path = epath.Path(path)  # a local file or a bucket's (gs://)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {path}")
    with path.open("rb") as f:
        head = f.read(len(_LEGACY_MAGIC))
        if head == _LEGACY_MAGIC:
            raise CheckpointError(
                f"{path} is in PyTorch's legacy (pre-1.6) format, which is not supported: "
                "re-save it in the zip format with torch: torch.save(torch.load(p), p2)"
            )
        f.seek(0)
        try:
            zf = zipfile.ZipFile(f)
        except Exception as e:  # zipfile raises many types for bad bytes
            if head.startswith(b"PK"):
                raise _corrupt(path, e) from e
            raise CheckpointError(
                f"{path} is not a PyTorch checkpoint: not a zip archive (torch.save writes "
                "zip files since torch 1.6)"
            ) from e
        with zf:
            return _Archive(zf, path).load()


def _corrupt(path: epath.Path, e: Exception) -> CheckpointError:
    return CheckpointError(f"{path} is a truncated or corrupt zip archive ({e})")


class _Storage(NamedTuple):
    """A storage named by a persistent id; immutable so a pickle's BUILD cannot alter it."""

    archive: "_Archive"
    kind: str
    key: str
    numel: int


class _Archive:
    """One open checkpoint: reads its records and builds its tensors."""

    def __init__(self, zf: zipfile.ZipFile, path: epath.Path):
        self.zf, self.path = zf, path
        names = zf.namelist()
        pickles = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
        if not pickles:
            raise CheckpointError(f"{path} holds no <top>/data.pkl: not a torch.save checkpoint")
        if len(set(pickles)) > 1:
            raise CheckpointError(f"{path} holds several data.pkl files {sorted(set(pickles))}")
        self.top = pickles[0][: -len("/data.pkl")]
        byteorder = b"little"
        if f"{self.top}/byteorder" in names:
            byteorder = self._read(f"{self.top}/byteorder")
        if byteorder not in (b"little", b"big"):
            raise CheckpointError(
                f"unknown byteorder {reprlib.repr(byteorder)} in {path} (expected little or big)"
            )
        self.order = "<" if byteorder == b"little" else ">"
        self.records: dict[str, bytes] = {}

    def _read(self, name: str) -> bytes:
        try:
            info = self.zf.getinfo(name)
            if info.compress_type != zipfile.ZIP_STORED:
                # Only stored entries have a size bounded by the file's: no zip bombs.
                raise CheckpointError(
                    f"entry {name} in {self.path} is compressed, but torch.save stores entries "
                    "uncompressed: re-save the checkpoint with torch.save"
                )
            return self.zf.read(info)
        except CheckpointError:
            raise
        except Exception as e:  # zipfile raises many types for bad bytes
            raise _corrupt(self.path, e) from e

    def load(self) -> object:
        name = f"{self.top}/data.pkl"
        data = self._read(name)
        _check_opcodes(data, f"{name} in {self.path}")
        try:
            return _Unpickler(data, self).load()
        except CheckpointError:
            raise
        except Exception as e:  # anything going wrong while interpreting untrusted bytes
            raise CheckpointError(
                f"malformed pickle {name} in {self.path}: {type(e).__name__}: {e}"
            ) from e

    def storage(self, pid: object) -> _Storage:
        """The storage a persistent id ``('storage', type, key, location, numel)`` names."""
        if not (
            type(pid) is tuple
            and len(pid) == 5
            and type(pid[0]) is str
            and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)
            and type(pid[2]) is str
            and type(pid[3]) is str
            and type(pid[4]) is int
            and pid[4] >= 0
        ):
            raise CheckpointError(f"malformed storage reference {reprlib.repr(pid)} in {self.path}")
        return _Storage(self, str(pid[1]), pid[2], pid[4])

    def tensor(self, storage: _Storage, offset: object, size: object, stride: object) -> np.ndarray:
        """A contiguous copy of ``storage``'s elements at ``offset`` with ``size``/``stride``."""
        if not (
            type(offset) is int
            and isinstance(size, (tuple, list))
            and isinstance(stride, (tuple, list))
            and len(size) == len(stride)
            and all(type(n) is int for n in (*size, *stride))
        ):
            raise CheckpointError(
                f"malformed tensor layout in {self.path}: offset {reprlib.repr(offset)}, "
                f"size {reprlib.repr(size)}, stride {reprlib.repr(stride)}"
            )
        if offset < 0 or any(n < 0 for n in (*size, *stride)):
            raise CheckpointError(
                f"negative offset, size or stride in {self.path}: offset {offset}, "
                f"size {tuple(size)}, stride {tuple(stride)}"
            )
        raw, out = _STORAGE_DTYPES[storage.kind]
        dtype = np.dtype(raw).newbyteorder(self.order)
        if 0 in size:
            return np.zeros(size, out)
        # Check the extent in Python ints before touching memory: a shape may be huge.
        count = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1
        name = f"{self.top}/data/{storage.key}"
        try:
            have = min(self.zf.getinfo(name).file_size, storage.numel * dtype.itemsize)
        except KeyError:
            raise CheckpointError(f"storage record {name} is missing from {self.path}") from None
        if count * dtype.itemsize > have:
            raise CheckpointError(
                f"storage {name} in {self.path} is too small: a tensor of size {tuple(size)}, "
                f"stride {tuple(stride)} at offset {offset} needs {count * dtype.itemsize} "
                f"bytes, the storage has {have}"
            )
        if math.prod(size) * dtype.itemsize > have:
            # Bounds the output by the file's size, which an expanded view could exceed.
            raise CheckpointError(
                f"tensor of size {tuple(size)} in {self.path} has more elements than its storage "
                f"{name}: expanded (stride-0) views are not supported"
            )
        if name not in self.records:
            self.records[name] = self._read(name)
        flat = np.frombuffer(self.records[name], dtype, count=count)[offset:]
        view = np.lib.stride_tricks.as_strided(
            flat, size, [s * dtype.itemsize for s in stride], writeable=False
        )
        if storage.kind == "BFloat16Storage":
            return (view.astype(np.uint32, order="C") << 16).view(np.float32)
        return view.astype(out, order="C")


def _check_opcodes(data: bytes, where: str) -> None:
    """Parse the pickle without running it: refuse opcodes outside ``_OPCODES``.

    Also refuses memo indices beyond the pickle's size, because the C unpickler grows its
    memo to twice the largest index (gigabytes for a 4-byte index).
    """
    try:
        with warnings.catch_warnings():
            # Parsing a text opcode's argument may warn about bad escapes before we refuse it.
            warnings.simplefilter("ignore", DeprecationWarning)
            for op, arg, pos in pickletools.genops(data):
                if op.name not in _OPCODES:
                    raise CheckpointError(
                        f"refusing pickle opcode {op.name} at byte {pos} of {where}: a "
                        "checkpoint may only hold tensors and plain containers"
                    )
                if op.name in _MEMO_OPCODES and arg > len(data):
                    raise CheckpointError(
                        f"malformed pickle {where}: memo index {arg} at byte {pos}"
                    )
    except CheckpointError:
        raise
    except Exception as e:  # pickletools raises ValueError and friends for bad bytes
        raise CheckpointError(f"malformed pickle {where}: {type(e).__name__}: {e}") from e


class _StorageType(str):
    """A ``torch.<T>Storage`` global: its name. Not callable, no ``__dict__``."""

    __slots__ = ()


class _OrderedDict:
    """``collections.OrderedDict``: builds a real one."""

    __slots__ = ()  # no __dict__: a pickle's BUILD cannot alter this shared object

    def __call__(self, *args):
        return collections.OrderedDict(*args)


class _RebuildTensorV2:
    """``torch._utils._rebuild_tensor_v2``: the tensor as a numpy array."""

    __slots__ = ()

    def __call__(
        self, storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None
    ):
        if not isinstance(storage, _Storage):
            raise TypeError(f"_rebuild_tensor_v2 got {type(storage).__name__}, not a storage")
        return storage.archive.tensor(storage, storage_offset, size, stride)


class _RebuildParameter:
    """``torch._utils._rebuild_parameter``: the parameter's tensor."""

    __slots__ = ()

    def __call__(self, data, requires_grad, backward_hooks):
        if not isinstance(data, np.ndarray):
            raise TypeError(f"_rebuild_parameter got {type(data).__name__}, not a tensor")
        return data


_GLOBALS = {
    ("collections", "OrderedDict"): _OrderedDict(),
    ("torch._utils", "_rebuild_tensor_v2"): _RebuildTensorV2(),
    ("torch._utils", "_rebuild_parameter"): _RebuildParameter(),
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
}


class _Unpickler(pickle.Unpickler):
    """Resolves only ``_GLOBALS`` and storage persistent ids."""

    def __init__(self, data: bytes, archive: _Archive):
        super().__init__(io.BytesIO(data))
        self.archive = archive

    def find_class(self, module: str, name: str) -> object:
        try:
            return _GLOBALS[module, name]
        except KeyError:
            raise CheckpointError(
                f"refusing global {module}.{name} in {self.archive.path}: a checkpoint may only "
                "hold tensors and plain containers"
            ) from None

    def persistent_load(self, pid: object) -> _Storage:
        return self.archive.storage(pid)
