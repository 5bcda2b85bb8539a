"""Tests of input_pipeline: the sampler against the reference's rules, the sources and the
deterministic loader. Small images only; nothing is downloaded."""

import itertools
import logging
import multiprocessing
import os
import sys

import numpy as np
import pytest
from PIL import Image

from input_pipeline import (
    DEMO_FILES,
    DemoSource,
    FolderSource,
    PairedSource,
    TFDSSource,
    TrainLoader,
    check_sampler_settings,
    describe,
    make_source,
    sample_pair_patch,
    sample_patch,
    steps_per_epoch,
)
from srno_jax.coords import make_coord
from srno_jax.errors import ConfigError, DataError, HostError
from srno_jax.images import resize_bicubic


def positional_image(h, w):
    """R = row, G = col, B = a hash: every pixel tells where it came from."""
    r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return np.stack([r, c, (r * 31 + c * 17) % 256], -1).astype(np.uint8)


def to_uint8(x):
    return np.round((x * 0.5 + 0.5) * 255).astype(np.uint8)


def augment(x, flip_rows, flip_cols, transpose):
    x = x[::-1] if flip_rows else x
    x = x[:, ::-1] if flip_cols else x
    return x.transpose(1, 0, 2) if transpose else x


def reconstruct(hr, out, inp_size):
    """Finds the crop origin and flips that explain a sample; checks gt and coord on
    the way. Returns (x0, y0, w_hr, flips)."""
    w = round(2 / float(out["cell"][0]))
    assert np.float32(2 / w) == out["cell"][0] == out["cell"][1]
    idx = np.round((out["coord"].astype(np.float64) + 1) * w / 2 - 0.5).astype(int)
    np.testing.assert_array_equal(out["coord"], make_coord((w, w))[idx[:, 0], idx[:, 1]])
    gt = to_uint8(out["gt"]).astype(int)  # absolute (row, col) of each point in hr
    grid = np.stack(np.meshgrid(np.arange(w), np.arange(w), indexing="ij"), -1)
    found = []
    for flips in itertools.product([False, True], repeat=3):
        src = augment(grid, *flips)[idx[:, 0], idx[:, 1]]  # index in the un-augmented crop
        x0, y0 = gt[:, 0] - src[:, 0], gt[:, 1] - src[:, 1]
        if (x0 == x0[0]).all() and (y0 == y0[0]).all():
            found.append((int(x0[0]), int(y0[0]), w, flips))
    assert len(found) == 1, found
    x0, y0, w, flips = found[0]
    np.testing.assert_array_equal(
        to_uint8(out["gt"]), augment(hr[x0 : x0 + w, y0 : y0 + w], *flips)[idx[:, 0], idx[:, 1]]
    )
    return found[0]


@pytest.mark.parametrize("augment_on", [False, True])
def test_sample_matches_reference_rules(augment_on):
    hr = positional_image(90, 100)
    inp_size, flips_seen = 16, set()
    for seed in range(12):
        out = sample_patch(
            hr,
            np.random.default_rng(seed),
            inp_size=inp_size,
            scale_min=1.0,
            scale_max=4.0,
            augment=augment_on,
        )
        assert {k: (v.shape, v.dtype) for k, v in out.items()} == {
            "inp": ((16, 16, 3), np.float32),
            "coord": ((256, 2), np.float32),
            "cell": ((2,), np.float32),
            "gt": ((256, 3), np.float32),
        }
        for k in ("inp", "gt", "coord"):
            assert -1 <= out[k].min() and out[k].max() <= 1
        assert len(np.unique(out["coord"], axis=0)) == 256
        x0, y0, w, flips = reconstruct(hr, out, inp_size)
        assert 16 <= w <= 64 and x0 + w <= 90 and y0 + w <= 100
        lr = resize_bicubic(np.ascontiguousarray(hr[x0 : x0 + w, y0 : y0 + w]), (16, 16))
        np.testing.assert_array_equal(to_uint8(out["inp"]), augment(lr, *flips))
        flips_seen.add(flips)
    if augment_on:
        assert len(flips_seen) > 3
    else:
        assert flips_seen == {(False, False, False)}


def test_sample_replays_reference_draws():
    """The reference's __getitem__, line by line on CHW arrays, with its draws in order."""
    hr = positional_image(70, 100)
    for seed in range(6):
        rng = np.random.default_rng(seed)
        s = rng.uniform(1.0, 4.0)
        w_hr = round(16 * s)
        x0 = rng.integers(0, hr.shape[0] - w_hr + 1)
        y0 = rng.integers(0, hr.shape[1] - w_hr + 1)
        crop_hr = hr[x0 : x0 + w_hr, y0 : y0 + w_hr].transpose(2, 0, 1)
        crop_lr = resize_bicubic(np.ascontiguousarray(crop_hr.transpose(1, 2, 0)), (16, 16))
        crop_lr = crop_lr.transpose(2, 0, 1)
        hflip, vflip, dflip = (rng.random() < 0.5 for _ in range(3))

        def aug(x):
            x = np.flip(x, -2) if hflip else x
            x = np.flip(x, -1) if vflip else x
            return np.swapaxes(x, -2, -1) if dflip else x

        crop_lr, crop_hr = aug(crop_lr), aug(crop_hr)
        idx = rng.choice(w_hr * w_hr, 16 * 16, replace=False)
        out = sample_patch(hr, np.random.default_rng(seed), inp_size=16)
        np.testing.assert_array_equal(to_uint8(out["inp"]), crop_lr.transpose(1, 2, 0))
        np.testing.assert_array_equal(out["coord"], make_coord((w_hr, w_hr)).reshape(-1, 2)[idx])
        np.testing.assert_array_equal(to_uint8(out["gt"]), crop_hr.reshape(3, -1)[:, idx].T)
        np.testing.assert_array_equal(out["cell"], np.float32([2 / w_hr, 2 / w_hr]))


def test_sample_q_and_scale_one():
    hr = positional_image(40, 50)
    out = sample_patch(hr, np.random.default_rng(0), inp_size=16, scale_max=1.0, sample_q=100)
    assert out["coord"].shape == (100, 2) and out["cell"][0] == np.float32(2 / 16)
    assert (
        check_sampler_settings(16, 1.0, 4.0, None) == 256
        and check_sampler_settings(16, 1.0, 1.0, 100) == 100
    )
    for bad in [(16, 1.0, 4.0, 257), (16, 0.5, 4.0, None), (16, 3.0, 2.0, None), (0, 1, 1, 1)]:
        with pytest.raises(ConfigError):
            check_sampler_settings(*bad)


def test_config_checked_once_not_per_sample(tmp_path, monkeypatch):
    import input_pipeline.loader

    calls = []
    checked = input_pipeline.loader.check_sampler_settings
    monkeypatch.setattr(
        input_pipeline.loader, "check_sampler_settings", lambda *a: calls.append(a) or checked(*a)
    )
    source = FolderSource(write_images(tmp_path / "imgs", 2))
    batches(source, 3, workers=2)
    assert calls == [(8, 1.0, 4.0, None)]


def test_small_images(caplog, tmp_path):
    """Each image is warned about once per reason (names are unique: once per process)."""
    hr = positional_image(30, 100)  # shorter than w_hr for most scales
    short = str(tmp_path / "short.png")
    with caplog.at_level(logging.WARNING):
        for seed in range(5):
            out = sample_patch(
                hr,
                np.random.default_rng(seed),
                inp_size=16,
                scale_min=3.0,
                scale_max=4.0,
                augment=False,
                name=short,
            )
            x0, y0, w, _ = reconstruct(hr, out, 16)
            assert w == 30 and x0 == 0
    (warning,) = [r.getMessage() for r in caplog.records if short in r.getMessage()]
    assert "is 30x100, smaller than the x4 crop (64 pixels): its samples above x1.88" in warning
    tiny = positional_image(10, 30)  # shorter than inp_size: upscaled to 16 x 48
    name = str(tmp_path / "tiny.png")
    with caplog.at_level(logging.WARNING):
        for seed in range(3):
            out = sample_patch(tiny, np.random.default_rng(seed), inp_size=16, name=name)
            assert out["cell"][0] == np.float32(2 / 16) and out["inp"].shape == (16, 16, 3)
    said = [r.getMessage() for r in caplog.records if name in r.getMessage()]
    assert len(said) == 2 and "upscaled" in said[0] and "x4 crop" in said[1], said


def write_images(folder, n, size=(64, 80), seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(
            folder / f"img{i:02d}.png"
        )
    return folder


LOADER_KW = dict(global_batch=4, seed=3, inp_size=8, scale_max=4.0, augment=True, repeat=2)


def batches(source, n, **kw):
    with TrainLoader(source, **{**LOADER_KW, **kw}) as loader:
        out = [next(loader) for _ in range(n)]
        assert loader.step == kw.get("start_step", 0) + n
    return out


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_loader_determinism(tmp_path):
    source = FolderSource(write_images(tmp_path / "imgs", 5))
    ref = batches(source, 4, workers=1)
    assert ref[0]["inp"].shape == (4, 8, 8, 3) and ref[0]["gt"].shape == (4, 64, 3)
    assert ref[0]["cell"].shape == (4, 2) and ref[0]["coord"].dtype == np.float32
    assert_batches_equal(ref, batches(source, 4, workers=1))
    assert_batches_equal(ref, batches(source, 4, workers=3, prefetch=0))
    assert_batches_equal(ref[2:], batches(source, 2, start_step=2))
    halves = [batches(source, 4, process_index=p, process_count=2) for p in range(2)]
    merged = [{k: np.concatenate([h0[k], h1[k]]) for k in h0} for h0, h1 in zip(*halves)]
    assert_batches_equal(ref, merged)
    assert halves[0][0]["inp"].shape[0] == 2
    assert not np.array_equal(ref[0]["inp"], batches(source, 1, seed=4)[0]["inp"])


def test_loader_epochs_and_config(tmp_path):
    source = FolderSource(write_images(tmp_path / "imgs", 5))
    loader = TrainLoader(source, **LOADER_KW, workers=1, prefetch=0)
    loader.close()
    # An epoch (5 images * repeat 2 = 10 samples) shows each image exactly twice.
    epoch = [loader.image_index(g // 4, g % 4) for g in range(10)]
    assert sorted(epoch) == sorted(list(range(5)) * 2)
    assert epoch != [loader.image_index(g // 4, g % 4) for g in range(10, 20)]
    with pytest.raises(RuntimeError):
        next(loader)
    with pytest.raises(ConfigError):
        TrainLoader(source, **{**LOADER_KW, "global_batch": 5}, process_count=2)
    with pytest.raises(ConfigError):
        TrainLoader(source, **LOADER_KW, sample_q=65)
    assert steps_per_epoch(800, 20, 64) == 250 and steps_per_epoch(10, 1, 4) == 3


def test_folder_bad_files_are_skipped(tmp_path, caplog):
    folder = write_images(tmp_path / "imgs", 2)
    good = (folder / "img00.png").read_bytes()
    (folder / "a_truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "b_text.png").write_text("not an image")
    (folder / "c_empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("ignored: not an image extension")
    with caplog.at_level(logging.WARNING):
        source = FolderSource(folder)
    assert len(source) == 2 and source.skipped == 3
    for name in ("a_truncated.png", "b_text.png", "c_empty.png"):
        assert sum(name in r.getMessage() for r in caplog.records) == 1
    assert source[1].shape == (64, 80, 3)


def test_folder_decode_failure_substitutes_next(tmp_path, caplog):
    folder = write_images(tmp_path / "imgs", 3)
    source = FolderSource(folder)
    (folder / "img01.png").write_bytes(b"broken after the check")
    with caplog.at_level(logging.WARNING):
        np.testing.assert_array_equal(source[1], source[2])  # img01.png -> img02.png
        source[1]
    assert source.skipped == 1 and len(source) == 3
    assert sum("img01.png" in r.getMessage() for r in caplog.records) == 1


def test_an_image_pil_fails_on_oddly_is_skipped_by_name(tmp_path, monkeypatch, caplog):
    """A corrupt TIFF can pass verify() and then raise TypeError ("Missing dimensions")
    while decoding: skipped like any unreadable file, and named, not a crash with no name."""
    from PIL import ImageFile

    folder = write_images(tmp_path / "imgs", 2)
    source = FolderSource(folder)
    real = ImageFile.ImageFile.load

    def load(self):
        if str(getattr(self, "filename", "")).endswith("img00.png"):
            raise TypeError("Missing dimensions")
        return real(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    with caplog.at_level(logging.WARNING):
        np.testing.assert_array_equal(source[0], source[1])
    assert source.skipped == 1
    assert "img00.png: cannot read image" in source.first_failure
    assert "TypeError: Missing dimensions" in source.first_failure
    monkeypatch.setattr(
        ImageFile.ImageFile, "load", lambda self: (_ for _ in ()).throw(TypeError("x"))
    )
    with pytest.raises(
        DataError, match=r"no image in .* could be decoded \(the first: image .*img01"
    ):
        FolderSource(folder)[1]


def test_images_over_pils_pixel_limit_are_skipped_at_the_start(tmp_path, monkeypatch):
    """Past MAX_IMAGE_PIXELS (PIL warns below twice that, and decoding refuses): skipped
    when the folder is listed, not substituted during training."""
    folder = write_images(tmp_path / "imgs", 1)
    write_images(tmp_path / "imgs", 1, size=(100, 100), seed=1)  # overwrites img00
    Image.fromarray(np.zeros((64, 80, 3), np.uint8)).save(folder / "img01.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)  # 100 x 100 is over, not twice
    source = FolderSource(folder)
    assert source.files == [str(folder / "img01.png")] and source.skipped == 1
    assert "img00.png" in source.first_failure
    assert "1 images from" in describe(source) and "1 unreadable, skipped" in describe(source)


def test_describe_names_the_pairs_of_a_rare_scale(tmp_path):
    folder = write_pairs(
        tmp_path / "pairs",
        {"a": ((32, 40), (8, 10)), "b": ((32, 40), (8, 10)), "odd": ((48, 48), (25, 25))},
    )
    assert describe(PairedSource(folder)) == (f"3 pairs in {folder}: 1 at x1.92 (odd), 2 at x4")


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="missing_dir"):
        FolderSource(tmp_path / "missing_dir")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="empty_dir"):
        FolderSource(tmp_path / "empty_dir")
    with pytest.raises(DataError, match="nowhere"):
        make_source(str(tmp_path / "nowhere"))


def test_folder_modes_load_as_rgb(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb[..., 0]).save(tmp_path / "a_gray.png")
    Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(tmp_path / "b_rgba.png")
    Image.fromarray(rgb).convert("P").save(tmp_path / "c_palette.png")
    Image.fromarray(rng.integers(0, 65536, (20, 30)).astype(np.uint16)).save(tmp_path / "d16.png")
    Image.fromarray(rgb).save(tmp_path / "e.bmp")
    source = FolderSource(tmp_path)
    assert len(source) == 5
    for i in range(5):
        img = source[i]
        assert img.shape == (20, 30, 3) and img.dtype == np.uint8
    np.testing.assert_array_equal(source[0][..., 2], rgb[..., 0])
    np.testing.assert_array_equal(source[1], rgb)
    np.testing.assert_array_equal(source[4], rgb)


def test_demo_source():
    train, holdout = DemoSource("train"), DemoSource("holdout")
    assert len(train) >= 8 and 2 <= len(holdout) <= 3
    assert not set(train.files) & set(holdout.files)
    for f in train.files + holdout.files:
        with Image.open(f) as img:
            assert min(img.size) >= 256
    for img in (train[0], holdout[0]):
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
        assert img.std() > 20  # a real photo, not a flat placeholder
    assert make_source("demo", "validation").files == holdout.files
    assert set(DEMO_FILES) == {"train", "holdout"}
    with pytest.raises(DataError):
        DemoSource("test")


def test_tfds_missing_gives_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import now fails
    with pytest.raises(DataError, match="tfds build div2k --file_format=array_record"):
        TFDSSource()
    with pytest.raises(DataError, match="pip install"):
        make_source("div2k", "train")


def test_tfds_unprepared_gives_fix(tmp_path):
    with pytest.raises(DataError, match=f"--data_dir={tmp_path}"):
        TFDSSource("div2k", "train", data_dir=str(tmp_path))


def test_process_workers_give_the_same_batches(tmp_path):
    """Spawned worker processes (for many-core hosts) produce exactly the threads' batches."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    source = FolderSource(folder)
    kw = dict(global_batch=4, seed=5, inp_size=8, sample_q=32, workers=2, start_step=1)
    with TrainLoader(source, **kw) as threads, TrainLoader(source, processes=True, **kw) as procs:
        assert len(procs._pool._processes) == 2  # all started at construction
        for _ in range(2):
            a, b = next(threads), next(procs)
            for key in a:
                np.testing.assert_array_equal(a[key], b[key])
        # The workers read the images decoded once, from shared memory.
        assert any(f.startswith("image-") for f in os.listdir(procs._decoded_dir))


def write_pairs(folder, hr_lr_sizes, seed=0):
    """HR/ and LR/ subfolders of random pairs: {stem: ((H, W), (h, w))}."""
    rng = np.random.default_rng(seed)
    for stem, (hr_hw, lr_hw) in hr_lr_sizes.items():
        for sub, hw in (("HR", hr_hw), ("LR", lr_hw)):
            (folder / sub).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8)).save(
                folder / sub / f"{stem}.png"
            )
    return folder


@pytest.mark.parametrize("scale", [2.0, 2.5, 42 / 17])
def test_pair_patch_is_aligned(scale):
    """An LR and an HR image that spell out their own pixel positions: each query's coord,
    read on the (flipped) LR patch, is its HR pixel's centre on the LR image, exactly."""
    h, w, p = 40, 36, 8
    lr = positional_image(h, w)
    hr = positional_image(round(h * scale), round(w * scale))
    maps_seen = set()
    for seed in range(10):
        out = sample_pair_patch(lr, hr, scale, np.random.default_rng(seed), inp_size=p, sample_q=50)
        assert {k: v.shape for k, v in out.items()} == {
            "inp": (p, p, 3),
            "coord": (50, 2),
            "cell": (2,),
            "gt": (50, 3),
        }
        assert (out["cell"] == np.float32(2 / (p * scale))).all()
        # The patch's pixel centres on the LR image: an affine map of the patch's own
        # (row, col), with the flips in its matrix.
        inp = to_uint8(out["inp"]).astype(float)[..., :2] + 0.5
        t = inp[0, 0] - 0.5 * (inp[1, 0] - inp[0, 0]) - 0.5 * (inp[0, 1] - inp[0, 0])
        A = np.stack([inp[1, 0] - inp[0, 0], inp[0, 1] - inp[0, 0]], -1)
        u = (out["coord"].astype(np.float64) + 1) / 2 * p
        on_lr = u @ A.T + t
        hr_centre = (to_uint8(out["gt"])[:, :2].astype(float) + 0.5) / scale
        np.testing.assert_allclose(on_lr, hr_centre, atol=1e-4)
        maps_seen.add(tuple(A.ravel()))
    assert len(maps_seen) > 3  # the flips were exercised


def test_paired_folder_loader(tmp_path):
    """A paired folder becomes a PairedSource; each sample has its pair's scale; threads
    and processes give the same batches; an LR smaller than inp_size is refused once."""
    folder = write_pairs(tmp_path / "pairs", {"a": ((32, 40), (16, 20)), "b": ((40, 50), (16, 20))})
    source = make_source(str(folder))
    assert isinstance(source, PairedSource) and len(source) == 2
    assert [source[i][2] for i in range(2)] == [2.0, 2.5]
    kw = dict(global_batch=4, seed=1, inp_size=8, sample_q=32, workers=2, repeat=2)
    with TrainLoader(source, **kw) as threads, TrainLoader(source, processes=True, **kw) as procs:
        for step in range(2):
            a, b = next(threads), next(procs)
            for key in a:
                np.testing.assert_array_equal(a[key], b[key])
            for k in range(4):
                s = source.pairs[threads.image_index(step, k)].scale
                assert a["cell"][k, 0] == np.float32(2 / round(8 * s))
        # The workers read each pair decoded once, from shared memory.
        assert any(f.endswith(".parts") for f in os.listdir(procs._decoded_dir))
    with pytest.raises(
        ConfigError,
        match=r"LR image .*a\.png is 16x20, smaller than "
        r"data\.inp_size 17",
    ):
        TrainLoader(source, **{**kw, "inp_size": 17, "sample_q": 1})


def test_a_pair_whose_hr_is_short_of_an_lr_patch_is_refused_at_start(tmp_path):
    """HR 19 x 40 with an LR of 10 x 20 (x2, the 9.5 rows rounded up): a 10-pixel LR
    patch covers 20 HR rows, one more than the image has. Refused before training,
    naming the pair, not a ValueError at its first sample."""
    folder = write_pairs(tmp_path / "pairs", {"a": ((19, 40), (10, 20)), "b": ((40, 40), (20, 20))})
    source = make_source(str(folder))
    assert [p.scale for p in source.pairs] == [2.0, 2.0]
    kw = dict(global_batch=2, seed=1, inp_size=10, sample_q=16, workers=1)
    with pytest.raises(
        ConfigError, match=r"pair .*a\.png / .*a\.png: its HR image is 19x40, short of the 20"
    ):
        TrainLoader(source, **kw)
    with TrainLoader(source, **{**kw, "inp_size": 9}) as loader:  # 18 rows fit
        for _ in range(3):
            next(loader)


def test_loader_batches_are_not_overwritten(tmp_path):
    """A batch still referenced keeps its memory; dropped batches' memory is reused."""
    source = FolderSource(write_images(tmp_path / "imgs", 3))
    with TrainLoader(source, **LOADER_KW, workers=2, processes=True) as loader:
        kept = next(loader)
        inp_view = kept["inp"][1:]  # a view outlives the dict
        copy = {k: v.copy() for k, v in kept.items()}
        del kept
        for _ in range(6):
            next(loader)
        np.testing.assert_array_equal(inp_view, copy["inp"][1:])
        assert len(loader._blocks) <= loader.prefetch + 3
        shm_dir = loader._shm_dir
    assert not os.path.exists(shm_dir)
    np.testing.assert_array_equal(inp_view, copy["inp"][1:])  # still readable after close


def test_a_killed_worker_process_stops_the_loader_within_seconds(tmp_path):
    """Workers killed outright (the out-of-memory killer) break the pool; one of them may
    die holding the task queue's lock, on which the others then wait forever, ignoring
    the pool's SIGTERM. The loader must fail in one line and close, not hang the run."""
    import signal

    source = FolderSource(write_images(tmp_path / "imgs", 3))
    loader = TrainLoader(source, **LOADER_KW, workers=3, processes=True)
    next(loader)
    workers = list(loader._pool._processes.values())
    for p in workers[:2]:  # whichever held the lock, the third may be left waiting on it
        os.kill(p.pid, signal.SIGKILL)
    _assert_fails_and_closes(loader, workers, r"worker process died .*see dmesg.*rerun to resume")


def _assert_fails_and_closes(loader, workers, error):
    """The next batches raise HostError matching `error`; close() then returns within a
    minute and no worker is left alive."""
    import threading

    with pytest.raises(HostError, match=error):
        for _ in range(20):
            next(loader)
    closing = threading.Thread(target=loader.close, daemon=True)
    closing.start()
    closing.join(60)
    assert not closing.is_alive(), "close() hangs on the workers"
    assert not any(p.is_alive() for p in workers)


def test_stuck_worker_processes_are_an_error_not_a_hang(tmp_path):
    """Workers that stop making progress (stopped here; in life a stalled network file
    system) would leave the run waiting for its batch until the job's time limit."""
    import signal

    source = FolderSource(write_images(tmp_path / "imgs", 3))
    loader = TrainLoader(source, **LOADER_KW, workers=2, processes=True, stall_timeout_s=2)
    next(loader)
    workers = list(loader._pool._processes.values())
    for p in workers:
        os.kill(p.pid, signal.SIGSTOP)
    _assert_fails_and_closes(
        loader, workers, r"no batch for step \d+ in 2 s: a worker process is stuck"
    )


class _StuckWhenUnpickled(FolderSource):
    """A folder whose copy in a worker process never arrives (a stalled file system)."""

    def __setstate__(self, state):
        super().__setstate__(state)
        import time

        time.sleep(120)


def test_workers_stuck_at_their_start_are_an_error_not_a_hang(tmp_path):
    import time

    source = _StuckWhenUnpickled(write_images(tmp_path / "imgs", 2))
    start = time.monotonic()
    with pytest.raises(HostError, match=r"2 worker processes did not all start in 2 s"):
        TrainLoader(source, **LOADER_KW, workers=2, processes=True, stall_timeout_s=2)
    assert time.monotonic() - start < 60
    assert not multiprocessing.active_children()


class _FailsOnce:
    """Image i fails at its first read; image j takes a second at its first read."""

    name = "flaky"

    def __init__(self, fail=-1, slow=-1):
        import threading

        self.fail, self.slow, self.reads, self.lock = fail, slow, {}, threading.Lock()

    def __len__(self):
        return 4

    def __getitem__(self, i):
        import time

        with self.lock:
            n = self.reads[i] = self.reads.get(i, 0) + 1
        if i == self.fail and n == 1:
            raise DataError("a transient failure")
        if i == self.slow and n == 1:
            time.sleep(1.0)
        return np.full((40, 40, 3), 60 * i, np.uint8)


def test_a_failed_batch_ends_the_loader():
    """One chunk of a batch fails while another is still being built: retrying would skip
    that step and hand out a later batch that the straggler chunk overwrote."""
    kw = dict(global_batch=2, seed=0, inp_size=8, workers=2, prefetch=2, repeat=4)
    with TrainLoader(_FailsOnce(), **kw) as probe:
        first, second = probe.image_index(0, 0), probe.image_index(0, 1)
    assert first != second
    with TrainLoader(_FailsOnce(fail=first, slow=second), **kw) as loader:
        with pytest.raises(DataError, match="transient"):
            next(loader)
        with pytest.raises(RuntimeError, match="failed at step 0; .* start_step=0"):
            next(loader)


def test_full_shared_memory_is_one_clear_error(tmp_path, monkeypatch):
    """No room in /dev/shm (Docker's default is 64 MB) is refused at construction with
    the fix, before any training, and leaves no worker or folder behind."""
    source = FolderSource(write_images(tmp_path / "imgs", 2))

    def full(fd, offset, length):
        raise OSError(28, "No space left on device")

    import input_pipeline.loader

    made = []
    make_dir = input_pipeline.loader._shared_memory_dir
    monkeypatch.setattr(
        input_pipeline.loader, "_shared_memory_dir", lambda: made.append(make_dir()) or made[-1]
    )
    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    with pytest.raises(ConfigError, match=r"no room for the loader's batches .*--shm-size"):
        TrainLoader(source, **LOADER_KW, workers=1, processes=True)
    assert not multiprocessing.active_children()
    assert len(made) == 1 and not os.path.exists(made[0][0])


def test_folders_of_killed_loaders_are_removed(tmp_path):
    """A loader killed before its cleanup leaves its folder in /dev/shm; the next loader
    removes it, but never the folder of a loader that still runs."""
    import input_pipeline.loader

    source = FolderSource(write_images(tmp_path / "imgs", 2))
    stale, fd = input_pipeline.loader._shared_memory_dir()
    (open(os.path.join(stale, "0"), "wb")).close()
    os.close(fd)  # as the kernel does for a killed process
    other = FolderSource(write_images(tmp_path / "other", 2, seed=1))
    stale_decoded, fd = input_pipeline.loader._decoded_cache_dir(other)
    os.close(fd)
    with TrainLoader(source, **LOADER_KW, workers=1, processes=True) as running:
        assert not os.path.exists(stale) and not os.path.exists(stale_decoded)
        with TrainLoader(source, **LOADER_KW, workers=1, processes=True):
            assert os.path.isdir(running._shm_dir) and os.path.isdir(running._decoded_dir)
        next(running)


def test_a_sweep_never_removes_a_decoded_folder_made_anew(tmp_path):
    """A sweep opens a decoded folder's lock; the folder's last loader leaves (removing
    it) and another makes it anew under the same name; the sweep's lock on the old,
    orphaned file then succeeds, and must not remove the new folder."""
    import fcntl

    from input_pipeline import loader

    source = FolderSource(write_images(tmp_path / "imgs", 1))
    folder, first = loader._decoded_cache_dir(source)
    sweep = os.open(os.path.join(folder, "lock"), os.O_RDONLY)
    loader._remove_if_alone(folder, first)
    again, second = loader._decoded_cache_dir(source)
    assert again == folder
    fcntl.flock(sweep, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the orphaned file: nobody holds it
    loader._remove_locked(folder, sweep)
    assert os.path.isdir(folder)
    loader._remove_if_alone(folder, second)
    assert not os.path.exists(folder)


def test_loaders_of_the_same_images_share_one_decoded_copy(tmp_path):
    """Two hosts' loaders on one machine (the tasks of a SLURM node) decode each image
    once between them; the copy goes with the last of them. Other images, or the same
    folder after a file changed, get a copy of their own."""
    import time

    folder = write_images(tmp_path / "imgs", 3)
    kw = dict(LOADER_KW, workers=1, processes=True, process_count=2)
    first = TrainLoader(FolderSource(folder), **kw, process_index=0)
    second = TrainLoader(FolderSource(folder), **kw, process_index=1)
    shared = first._decoded_dir
    assert second._decoded_dir == shared and shared != first._shm_dir
    for _ in range(4):
        next(first), next(second)
    parts = [f for f in os.listdir(shared) if f.endswith(".parts")]
    assert len(parts) == 3  # each image once, for both loaders
    with TrainLoader(FolderSource(write_images(tmp_path / "other", 2)), **kw) as other:
        assert other._decoded_dir != shared
    first.close()
    assert os.path.isdir(shared)  # the second still reads it
    next(second)
    second.close()
    assert not os.path.exists(shared)
    time.sleep(0.01)  # a new modification time
    write_images(tmp_path / "imgs", 3, seed=5)
    with TrainLoader(FolderSource(folder), **kw) as changed:
        assert changed._decoded_dir != shared


def test_paired_decode_failure_substitutes_next(tmp_path, caplog):
    folder = write_pairs(tmp_path / "pairs", {s: ((32, 40), (16, 20)) for s in "abc"})
    source = PairedSource(folder)
    (folder / "LR" / "b.png").write_bytes(b"broken after the listing")
    with caplog.at_level(logging.WARNING):
        for x, y in zip(source[1], source[2]):  # b -> c
            np.testing.assert_array_equal(x, y)
        source[1]
    assert source.skipped == 1 and len(source) == 3
    assert sum("b.png" in r.getMessage() for r in caplog.records) == 1


def test_images_are_decoded_once_for_all_workers(tmp_path, monkeypatch, caplog):
    from input_pipeline.loader import _DecodedOnce

    source = FolderSource(write_images(tmp_path / "imgs", 2))
    reads = []
    monkeypatch.setattr(
        FolderSource,
        "__getitem__",
        lambda self, i, read=FolderSource.__getitem__: reads.append(i) or read(self, i),
    )

    class Roomy:  # statvfs of a file system with 90% of its 4 GB free
        f_bavail, f_blocks, f_frsize = 900_000, 1_000_000, 4096

    class Full:  # and one with 10% free: keep it for the batches
        f_bavail, f_blocks, f_frsize = 100_000, 1_000_000, 4096

    monkeypatch.setattr(os, "statvfs", lambda path: Roomy)
    cache_dir = tmp_path / "shm"
    cache_dir.mkdir()
    first, second = _DecodedOnce(source, str(cache_dir)), _DecodedOnce(source, str(cache_dir))
    img = first[1]
    np.testing.assert_array_equal(second[1], img)  # another worker: mapped, not decoded
    np.testing.assert_array_equal(first[1], img)
    assert reads == [1] and sorted(os.listdir(cache_dir)) == ["image-1-0.npy", "image-1.parts"]
    assert not img.flags.writeable

    monkeypatch.setattr(os, "statvfs", lambda path: Full)
    with caplog.at_level(logging.WARNING, logger="srno_jax.data"):
        np.testing.assert_array_equal(first[0], source[0])
        second[0]
    assert reads == [1, 0, 0, 0] and sorted(os.listdir(cache_dir)) == [
        "full",
        "image-1-0.npy",
        "image-1.parts",
    ]
    # Said once, by whichever worker found it first: decoding at every read is slow.
    assert sum("is half full" in r.getMessage() for r in caplog.records) == 1


def test_pairs_are_decoded_once_with_their_scale(tmp_path):
    from input_pipeline.loader import _DecodedOnce

    source = PairedSource(write_pairs(tmp_path / "pairs", {"a": ((40, 50), (16, 20))}))
    cache_dir = tmp_path / "shm"
    cache_dir.mkdir()
    _DecodedOnce(source, str(cache_dir))[0]
    lr, hr, scale = _DecodedOnce(source, str(cache_dir))[0]  # another worker: mapped
    want = source[0]
    np.testing.assert_array_equal(lr, want[0])
    np.testing.assert_array_equal(hr, want[1])
    assert type(scale) is float and scale == want[2] == 2.5
