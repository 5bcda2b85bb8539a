"""Image sources: a folder, TFDS ``div2k``, the demo photographs of scikit-image, and
folders of LR / HR pairs.

Every source has ``name`` and ``len(source)`` and is safe to read from several threads
at once. An HR source gives ``source[i] -> (H, W, 3) uint8`` RGB; a `PairedSource` gives
``source[i] -> (lr, hr, scale)``. Sources that decode a file at each read say so with
``decodes_each_read`` and name what they hold with ``content_key()`` (JSON-able): the
loader's worker processes then decode each image once for all of them, and for every
loader of the same content on the machine.
"""

from __future__ import annotations

import importlib.resources
import logging
import os
import threading
import warnings

import numpy as np
from etils import epath
from PIL import Image

from srno_jax.errors import ConfigError, DataError
from srno_jax.images import IMAGE_EXTENSIONS, image_files, load_image
from srno_jax.pairs import find_pairs, image_hw, pair_images
from srno_jax.workdir import is_uri

# A child of the package's logger, which main.py shows; the root logger is absl's.
log = logging.getLogger("srno_jax.data")


def _stamp(path: str) -> list:
    """A file's path with its size and modification time (a bucket's file: its path), so
    that a changed file gets a new `content_key`."""
    if is_uri(path):
        return [path]
    st = os.stat(path)
    return [path, st.st_size, st.st_mtime_ns]


class _SkipsUnreadable:
    """Reading item i of a source, or the next readable one when i fails to decode.

    Each item that fails is warned about once, counted in ``skipped`` and not tried
    again; the substitute is the next readable item (deterministic). ``first_failure``
    names the first item skipped and why (None while none was). Subclasses set ``path``
    and ``skipped`` and call `_read`.
    """

    first_failure: str | None = None

    def _skip(self, what: str, error: Exception) -> None:
        self.skipped += 1
        self.first_failure = self.first_failure or f"{what}: {error}"
        log.warning("skipping unreadable %s: %s", what, error)

    def __getstate__(self):  # for worker processes: a lock does not pickle
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state):
        self.__dict__.update(state, _lock=threading.Lock())

    def _read(self, i: int, n: int, read, describe):
        """read(j) for the first j of i, i + 1, ... (mod n) that decodes; describe(j)
        names item j in the warning."""
        for j in range(i, i + n):
            j %= n
            if j in self._bad:
                continue
            try:
                return read(j)
            except DataError as e:
                with self._lock:
                    if j not in self._bad:
                        self._bad.add(j)
                        self._skip(describe(j), e)
        raise DataError(
            f"no image in {self.path} could be decoded (the first: {self.first_failure})"
        )


class FolderSource(_SkipsUnreadable):
    """The images directly inside a folder (not its subfolders), sorted by file name.

    Files with an image extension (case-insensitive) are checked at construction with
    PIL's ``verify`` (the header; for PNG also every chunk's CRC, so truncated files are
    caught without decoding) and PIL's pixel limit (``MAX_IMAGE_PIXELS``, which decoding
    enforces). Unreadable ones are skipped with one warning each and counted in
    ``skipped``. A file that passes the check but fails to decode later is
    warned about once, counted, and replaced by the next readable image (deterministic).
    Each read decodes (``decodes_each_read``).

    Raises `DataError` naming the path if it is not a folder or holds no readable image.
    """

    decodes_each_read = True

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.name = self.path
        if not epath.Path(self.path).is_dir():
            raise DataError(f"image folder not found: {self.path}")
        self.skipped = 0
        self.files = []
        for full in image_files(self.path):
            try:
                with warnings.catch_warnings():  # over the limit: decoding would refuse it
                    warnings.simplefilter("error", Image.DecompressionBombWarning)
                    with epath.Path(full).open("rb") as f, Image.open(f) as img:
                        img.verify()
                self.files.append(full)
            except Exception as e:  # PIL raises many kinds for bad files
                self._skip(f"image {full}", e)
        if not self.files:
            raise DataError(
                f"no readable images ({', '.join(IMAGE_EXTENSIONS)}) in folder "
                f"{self.path}" + (f" ({self.skipped} skipped)" if self.skipped else "")
            )
        self._bad = set()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.files)

    def content_key(self) -> list:
        return [self.path, *map(_stamp, self.files)]

    def __getitem__(self, i: int) -> np.ndarray:
        return self._read(
            int(i),
            len(self.files),
            lambda j: load_image(self.files[j]),
            lambda j: f"image {self.files[j]}",
        )


_TFDS_FIX = (
    "pip install tensorflow tensorflow-datasets && "
    "tfds build {name} --file_format=array_record{dir_flag}"
)


class TFDSSource:
    """The HR images (feature ``hr``) of a TFDS data set, by default ``div2k``, decoded at
    each read (``decodes_each_read``).

    Reads through ``tfds.data_source`` (random access to an ``array_record`` build; no
    TensorFlow needed to read, nothing downloaded). Raises `DataError` with the command
    that fixes it when tensorflow-datasets is missing or the data is not prepared.
    """

    def __init__(self, name: str = "div2k", split: str = "train", data_dir: str | None = None):
        self.name = f"tfds:{name}/{split}"
        self._data_dir = data_dir
        fix = _TFDS_FIX.format(name=name, dir_flag=f" --data_dir={data_dir}" if data_dir else "")
        try:
            import tensorflow_datasets as tfds
        except ImportError as e:
            raise DataError(
                f"TFDS source {name!r} needs tensorflow-datasets ({e}); "
                f"install and prepare it with: {fix}"
            ) from None
        if not hasattr(tfds, "data_source"):
            raise DataError(
                f"tensorflow-datasets {getattr(tfds, '__version__', '?')} has no "
                f"random-access data_source; upgrade: pip install -U "
                f"'tensorflow-datasets>=4.9'"
            )
        try:
            self._ds = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except Exception as e:  # TFDS raises various types for data that is not prepared
            raise DataError(
                f"TFDS data set {name!r} split {split!r} is not prepared in "
                f"array_record format under {data_dir or 'the default TFDS data dir'}"
                f" ({type(e).__name__}: {e}); prepare it with: {fix}"
            ) from None

    decodes_each_read = True

    def content_key(self) -> list:
        return [self.name, self._data_dir, len(self._ds)]

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, i: int) -> np.ndarray:
        return np.asarray(self._ds[int(i)]["hr"], np.uint8)


# Photographs that ship inside the scikit-image wheel (skimage/data/), all with a short
# side of at least 300 px; grayscale ones become RGB. The holdout ones never train.
DEMO_FILES = {
    "train": (
        "astronaut.png",
        "rocket.jpg",
        "motorcycle_left.png",
        "hubble_deep_field.jpg",
        "ihc.png",
        "retina.jpg",
        "camera.png",
        "moon.png",
        "coins.png",
        "grass.png",
        "gravel.png",
        "brick.png",
    ),
    "holdout": ("chelsea.png", "coffee.png"),
}


class DemoSource:
    """A few real photographs from scikit-image, split into 'train' and 'holdout'.

    No download: the files are read from the installed ``skimage/data`` folder and kept
    in memory. Files missing from the installed wheel are left out; none at all is a
    `DataError`.
    """

    def __init__(self, split: str = "train"):
        if split not in DEMO_FILES:
            raise DataError(f"demo split must be one of {sorted(DEMO_FILES)}, got {split!r}")
        self.name = f"demo/{split}"
        try:
            folder = importlib.resources.files("skimage.data")
        except ModuleNotFoundError:
            raise DataError("the demo data needs scikit-image: pip install scikit-image") from None
        self.files = [str(folder / f) for f in DEMO_FILES[split] if (folder / f).is_file()]
        if not self.files:
            raise DataError(
                f"none of the demo photos {DEMO_FILES[split]} is in {folder}; "
                f"reinstall scikit-image: pip install --force-reinstall scikit-image"
            )
        self._images = [None] * len(self.files)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> np.ndarray:
        i = int(i)
        if self._images[i] is None:
            self._images[i] = load_image(self.files[i])
        return self._images[i]


class PairedSource(_SkipsUnreadable):
    """The LR / HR pairs of a paired folder (``HR/`` beside ``LR/`` or ``X<s>/``; see
    `srno_jax.pairs.find_pairs`), read from disk at each access (``decodes_each_read``).

    ``source[i]`` is (lr (h, w, 3), hr cropped to the LR grid, scale) of pair i
    (`pairs.pair_images`), both images uint8. A pair that fails to decode is warned about
    once, counted in ``skipped`` and replaced by the next readable pair (deterministic).
    Raises `DataError` when `path` is not a paired layout, or as `find_pairs` does.
    """

    decodes_each_read = True

    def __init__(self, path: str | os.PathLike):
        self.path = self.name = os.fspath(path)
        pairs = find_pairs(self.path)
        if pairs is None:
            raise DataError(
                f"{self.path} is not a paired folder: it needs an HR/ subfolder "
                f"beside LR/ or X2/, X3/, ... (one per scale)"
            )
        self.pairs = pairs
        self._lr_hw = None  # the LR images' sizes, read once
        self.skipped = 0
        self._bad = set()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.pairs)

    def content_key(self) -> list:
        return [self.path, *([*_stamp(p.hr_path), *_stamp(p.lr_path), p.scale] for p in self.pairs)]

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray, float]:
        return self._read(
            int(i),
            len(self.pairs),
            lambda j: (*pair_images(self.pairs[j]), self.pairs[j].scale),
            lambda j: f"pair {self.pairs[j].hr_path} / {self.pairs[j].lr_path}",
        )

    def check_inp_size(self, inp_size: int) -> None:
        """Raises `ConfigError`, naming the pair, when an LR image is smaller than
        inp_size x inp_size (a given LR cannot be resized without changing its
        degradation), or when an LR side of exactly inp_size was rounded up from an HR
        side too short for the round(inp_size * scale) pixels of an HR patch."""
        if self._lr_hw is None:
            self._lr_hw = [image_hw(p.lr_path) for p in self.pairs]
        (h, w), path = min(
            zip(self._lr_hw, (p.lr_path for p in self.pairs)), key=lambda x: min(x[0])
        )
        if min(h, w) < inp_size:
            raise ConfigError(
                f"LR image {path} is {h}x{w}, smaller than data.inp_size {inp_size}; lower "
                "data.inp_size or remove the pair"
            )
        for pair, lr_hw in zip(self.pairs, self._lr_hw):
            if inp_size not in lr_hw:  # a longer side leaves its patch room
                continue
            hr_hw = image_hw(pair.hr_path)
            patch = round(inp_size * pair.scale)
            if any(lr == inp_size and hr < patch for lr, hr in zip(lr_hw, hr_hw)):
                raise ConfigError(
                    f"pair {pair.hr_path} / {pair.lr_path}: its HR image is "
                    f"{hr_hw[0]}x{hr_hw[1]}, short of the {patch} pixels that an LR side of "
                    f"data.inp_size {inp_size} covers at x{pair.scale:g} (the LR side was "
                    "rounded up); lower data.inp_size or remove the pair"
                )


def describe(source) -> str:
    """One line on what a source holds: its size, a paired source's scales (naming the
    pairs of a scale that few have: a stray LR of the wrong size), and what was skipped."""
    if isinstance(source, PairedSource):
        by_scale = {}
        for p in source.pairs:
            by_scale.setdefault(p.scale, []).append(p.name)
        most = max(map(len, by_scale.values()))
        scales = ", ".join(
            f"{len(names)} at x{s:g}"
            + (f" ({', '.join(names)})" if len(names) <= min(3, most - 1) else "")
            for s, names in sorted(by_scale.items())
        )
        text = f"{len(source)} pairs in {source.name}: {scales}"
    else:
        text = f"{len(source)} images from {source.name}"
    if getattr(source, "first_failure", None):
        text += f"; {source.skipped} unreadable, skipped (the first {source.first_failure})"
    return text


def make_source(spec: str, split: str = "train", data_dir: str | None = None):
    """A source from a spec: 'demo', 'div2k' (TFDS, in `data_dir`), a paired folder
    (`PairedSource`) or a folder of HR images.

    `split` is 'train' or an evaluation split: for 'demo', 'validation' / 'valid' /
    'test' mean 'holdout'; for 'div2k', 'holdout' / 'valid' mean 'validation'. A folder
    is one split and ignores it.
    """
    if spec == "demo":
        return DemoSource("holdout" if split in ("validation", "valid", "test") else split)
    if spec == "div2k":
        return TFDSSource(
            "div2k", "validation" if split in ("holdout", "valid") else split, data_dir
        )
    if not epath.Path(spec).is_dir():  # a local folder or a bucket's (gs://...)
        raise DataError(
            f"data source {spec!r} is neither 'demo', 'div2k' nor an existing folder of images"
        )
    if find_pairs(spec) is not None:
        return PairedSource(spec)
    return FolderSource(spec)
