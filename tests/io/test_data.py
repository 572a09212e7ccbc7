"""Tests of the dataset loaders on small files written here; nothing is downloaded."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import shutil
import struct
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusevae.io import data
from diffusevae.config import DataConfig
from diffusevae.io.data import (build_dataset, dataset_description, open_image_folder, random_hflip,
                                read_image)
from diffusevae.errors import DataError


def _no_network(url: str, dest: Path) -> None:
    raise AssertionError(f"a test tried to download {url}")


@pytest.fixture(autouse=True)
def _forbid_downloads(monkeypatch):
    monkeypatch.setattr(data, "_fetch", _no_network)


# --------------------------------------------------------------------------------------------
# IDX (fashion-mnist, mnist)
# --------------------------------------------------------------------------------------------

def _idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def _idx_arrays(n: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
    i, r, c = np.meshgrid(np.arange(n), np.arange(28), np.arange(28), indexing="ij")
    images = ((i * 7 + r * 28 + c + offset) % 256).astype(np.uint8)
    labels = ((np.arange(n) + offset) % 10).astype(np.uint8)
    return images, labels


def _write_idx_dir(folder: Path, gz: bool) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"train": _idx_arrays(10, 0), "t10k": _idx_arrays(4, 3)}
    for prefix, (images, labels) in arrays.items():
        for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
            raw = _idx_bytes(arr)
            name = f"{prefix}-{kind}-ubyte"
            if gz:
                (folder / f"{name}.gz").write_bytes(gzip.compress(raw))
            else:
                (folder / name).write_bytes(raw)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dataset", ["fashion-mnist", "mnist"])
def test_idx_exact_values_and_labels(tmp_path, gz, dataset):
    arrays = _write_idx_dir(tmp_path, gz)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        ds = build_dataset(DataConfig(dataset, str(tmp_path), image_size=28), split)
        images, labels = arrays[prefix]
        assert len(ds) == len(images)
        for k in (0, len(ds) - 1):
            x, y = ds[k]
            assert x.dtype == torch.float32 and x.shape == (1, 28, 28)
            expected = torch.from_numpy(images[k].astype(np.float32)) / 127.5 - 1.0
            assert torch.equal(x[0], expected)
            assert y == int(labels[k]) and isinstance(y, int)
    assert str(tmp_path) in dataset_description(ds)


def test_idx_resize_and_channels(tmp_path):
    _write_idx_dir(tmp_path, gz=True)
    ds = build_dataset(DataConfig("mnist", str(tmp_path), image_size=14, channels=3))
    x, _ = ds[2]
    assert x.shape == (3, 14, 14)
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    assert -1.0 <= x.min() and x.max() <= 1.0 and x.std() > 0.1


def test_idx_truncated_or_bad_magic_names_the_file(tmp_path):
    _write_idx_dir(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    cfg = DataConfig("mnist", str(tmp_path), image_size=28)
    with pytest.raises(DataError, match="train-images-idx3-ubyte.*truncated"):
        build_dataset(cfg)
    path.write_bytes(b"\x00\x00\x09\x03" + b"\x00" * 20)
    with pytest.raises(DataError, match="train-images-idx3-ubyte.*not an IDX file"):
        build_dataset(cfg)
    path.unlink()
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"x" * 5000)[:30])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz.*gzip"):
        build_dataset(cfg)


def test_idx_missing_files_without_download_is_clear(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(DataError) as err:
        build_dataset(DataConfig("fashion-mnist", None, image_size=28))
    message = str(err.value)
    for needle in ("dataset-fashion-mnist", "data.data_dir", "train-images-idx3-ubyte[.gz]",
                   "data.download", str(tmp_path / "home" / ".cache" / "diffusevae")):
        assert needle in message
    with pytest.raises(DataError, match="mnist test files not found.*data.download"):
        build_dataset(DataConfig("mnist", str(tmp_path / "nowhere")), "test")


def test_idx_download_uses_fetch_and_writes_atomically(tmp_path, monkeypatch):
    source = tmp_path / "mirror"
    arrays = _write_idx_dir(source, gz=True)
    fetched = []

    def fake_fetch(url: str, dest: Path) -> None:
        fetched.append(url)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source / url.rsplit("/", 1)[1], dest)

    monkeypatch.setattr(data, "_fetch", fake_fetch)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    ds = build_dataset(DataConfig("mnist", None, image_size=28, download=True), "test")
    assert fetched == [data.IDX_URLS["mnist"] + "t10k-images-idx3-ubyte.gz",
                       data.IDX_URLS["mnist"] + "t10k-labels-idx1-ubyte.gz"]
    cache = tmp_path / "home" / ".cache" / "diffusevae" / "mnist"
    assert sorted(p.name for p in cache.iterdir()) == ["t10k-images-idx3-ubyte.gz",
                                                       "t10k-labels-idx1-ubyte.gz"]
    assert len(ds) == 4 and ds[1][1] == int(arrays["t10k"][1][1])
    # Files already there are not fetched again, and without --download the cache is found.
    build_dataset(DataConfig("mnist", None, image_size=28, download=True), "test")
    monkeypatch.setattr(data, "_fetch", _no_network)
    assert len(build_dataset(DataConfig("mnist", None, image_size=28), "test")) == 4
    assert len(fetched) == 2


def test_real_fetch_is_atomic_on_failure(tmp_path, monkeypatch):
    monkeypatch.undo()  # the real _fetch, pointed at a local file URL that does not exist
    dest = tmp_path / "out" / "file.gz"
    with pytest.raises(DataError, match="could not download"):
        data._fetch((tmp_path / "absent").as_uri(), dest)
    assert list(dest.parent.iterdir()) == []
    (tmp_path / "present").write_bytes(b"payload")
    data._fetch((tmp_path / "present").as_uri(), dest)
    assert dest.read_bytes() == b"payload" and len(list(dest.parent.iterdir())) == 1


@pytest.mark.skipif(not data.DEBIAN_FASHION_MNIST.is_dir(),
                    reason="Debian package dataset-fashion-mnist is not installed")
def test_fashion_mnist_from_debian_package():
    cfg = DataConfig("fashion-mnist", None, image_size=28)
    train, test = build_dataset(cfg, "train"), build_dataset(cfg, "test")
    assert (len(train), len(test)) == (60000, 10000)
    x, y = train[0]
    assert x.shape == (1, 28, 28) and -1.0 <= x.min() < x.max() <= 1.0
    assert set(train.labels.tolist()) == set(range(10))
    assert "/usr/share/datasets/fashion-mnist" in dataset_description(train)


# --------------------------------------------------------------------------------------------
# CIFAR-10
# --------------------------------------------------------------------------------------------

def _py2_pickle(rows: np.ndarray, labels: list[int]) -> bytes:
    """A batch pickled the way the real files are (Python 2, protocol 2, str keys)."""
    def s(b: bytes) -> bytes:
        return b"T" + struct.pack("<i", len(b)) + b

    def k(i: int) -> bytes:
        return b"J" + struct.pack("<i", i)

    return (b"\x80\x02}(" + s(b"data") + b"cnumpy.core.multiarray\n_reconstruct\n"
            + b"cnumpy\nndarray\n" + k(0) + b"\x85" + s(b"b") + b"\x87R(" + k(1)
            + k(rows.shape[0]) + k(rows.shape[1]) + b"\x86cnumpy\ndtype\n" + s(b"u1") + k(0)
            + k(1) + b"\x87R(" + k(3) + s(b"|") + b"NNN" + k(-1) + k(-1) + k(0) + b"tb\x89"
            + s(rows.tobytes()) + b"tb" + s(b"labels") + b"](" + b"".join(map(k, labels))
            + b"eu.")


def _cifar_rows(first: int, n: int) -> np.ndarray:
    # Image j of value v: red plane v, green v + 1, blue v + 2.
    rows = np.zeros((n, 3072), np.uint8)
    for j in range(n):
        for c in range(3):
            rows[j, c * 1024:(c + 1) * 1024] = first + j + c
    return rows


def _write_cifar(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for b in range(1, 6):
        batch = {b"data": _cifar_rows(10 * b, 3), b"labels": [b, b + 1, b + 2],
                 b"batch_label": b"training batch"}
        protocol = 5 if b == 2 else 4  # protocol 5 rebuilds arrays through _frombuffer
        (folder / f"data_batch_{b}").write_bytes(pickle.dumps(batch, protocol=protocol))
    (folder / "test_batch").write_bytes(_py2_pickle(_cifar_rows(100, 2), [7, 9]))


@pytest.mark.parametrize("point_at", ["parent", "folder"])
def test_cifar10_train_and_test(tmp_path, point_at):
    _write_cifar(tmp_path / "cifar-10-batches-py")
    root = tmp_path if point_at == "parent" else tmp_path / "cifar-10-batches-py"
    cfg = DataConfig("cifar10", str(root), image_size=32, channels=3)
    train, test = build_dataset(cfg, "train"), build_dataset(cfg, "test")
    assert (len(train), len(test)) == (15, 2)
    x, y = train[4]  # batch 2, image 1: value 21
    assert x.shape == (3, 32, 32) and y == 3
    assert torch.allclose(x[:, 0, 0], torch.tensor([21.0, 22.0, 23.0]) / 127.5 - 1.0)
    assert [train[i][1] for i in range(15)] == [b + j for b in range(1, 6) for j in range(3)]
    x, y = test[1]
    assert y == 9 and torch.allclose(x[:, 5, 7], torch.tensor([101.0, 102.0, 103.0]) / 127.5 - 1)


def test_cifar10_gray_and_resized(tmp_path):
    _write_cifar(tmp_path / "cifar-10-batches-py")
    ds = build_dataset(DataConfig("cifar10", str(tmp_path), image_size=16, channels=1))
    x, _ = ds[0]  # value 10: luma of (10, 11, 12)
    luma = 0.299 * 10 + 0.587 * 11 + 0.114 * 12
    assert x.shape == (1, 16, 16)
    assert torch.allclose(x, torch.full_like(x, luma / 127.5 - 1.0), atol=1e-5)


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_cifar10_malicious_pickle_is_refused_and_not_run(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar(folder)
    marker = tmp_path / "pwned"
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": _Evil(marker), b"labels": []}))
    with pytest.raises(DataError, match="test_batch.*refused global"):
        build_dataset(DataConfig("cifar10", str(tmp_path), image_size=32, channels=3), "test")
    assert not marker.exists()
    # The file is a real attack: an ordinary unpickler would run it.
    pickle.loads((folder / "test_batch").read_bytes())
    assert marker.exists()


def test_cifar10_wrong_content_and_missing(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar(folder)
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": np.zeros((2, 5), np.uint8)}))
    cfg = DataConfig("cifar10", str(tmp_path), image_size=32, channels=3)
    with pytest.raises(DataError, match="data_batch_3 is not a CIFAR-10 batch"):
        build_dataset(cfg)
    with pytest.raises(DataError, match="data.data_dir.*data.download"):
        build_dataset(DataConfig("cifar10", str(tmp_path / "empty"), 32, 3))


def _tar_of(members: dict[str, bytes], path: Path) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def test_cifar10_download_extracts_safely(tmp_path, monkeypatch):
    _write_cifar(tmp_path / "src" / "cifar-10-batches-py")
    members = {f"cifar-10-batches-py/{p.name}": p.read_bytes()
               for p in (tmp_path / "src" / "cifar-10-batches-py").iterdir()}
    _tar_of(members, tmp_path / "good.tar.gz")
    _tar_of({"../escaped": b"x"}, tmp_path / "evil.tar.gz")
    served = {"archive": tmp_path / "good.tar.gz"}

    def fake_fetch(url: str, dest: Path) -> None:
        assert url == data.CIFAR_URL
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(served["archive"], dest)

    monkeypatch.setattr(data, "_fetch", fake_fetch)
    root = tmp_path / "dl"
    ds = build_dataset(DataConfig("cifar10", str(root), 32, 3, download=True), "test")
    assert len(ds) == 2 and (root / "cifar-10-batches-py" / "data_batch_5").is_file()
    assert not (root / "cifar-10-python.tar.gz").exists()
    served["archive"] = tmp_path / "evil.tar.gz"
    with pytest.raises(DataError, match="cannot extract"):
        build_dataset(DataConfig("cifar10", str(tmp_path / "dl2"), 32, 3, download=True))
    assert not (tmp_path / "escaped").exists()


# --------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------

def _noise(mode: str, size: tuple[int, int], seed: int) -> Image.Image:
    bands = len(Image.new(mode, (1, 1)).getbands())
    arr = np.random.RandomState(seed).randint(0, 256, (size[1], size[0], bands), np.uint8)
    return Image.fromarray(arr.squeeze(-1) if bands == 1 else arr, mode)


def _write_folder(root: Path) -> None:
    (root / "sub" / "deeper").mkdir(parents=True)
    _noise("RGB", (40, 30), 0).save(root / "a.png")
    _noise("RGB", (20, 50), 1).save(root / "sub" / "C.JPG", format="JPEG")
    _noise("L", (25, 25), 2).save(root / "sub" / "deeper" / "d.png")
    _noise("RGBA", (30, 20), 3).save(root / "e.png")
    _noise("RGB", (9, 9), 4).save(root / "sub" / "f.bmp")
    (root / "notes.txt").write_text("not an image")
    (root / "x.png").write_bytes(np.random.RandomState(5).bytes(500))
    buf = io.BytesIO()
    _noise("RGB", (64, 64), 6).save(buf, format="PNG")
    (root / "sub" / "trunc.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


@pytest.mark.parametrize("channels", [3, 1])
def test_folder_loads_good_files_and_names_bad_ones(tmp_path, channels):
    _write_folder(tmp_path)
    with pytest.warns(UserWarning) as record:
        ds = build_dataset(DataConfig("folder", str(tmp_path), image_size=12, channels=channels))
    message = str(record[0].message)
    assert len(record) == 1 and "skipped 2 " in message
    assert "x.png" in message and os.path.join("sub", "trunc.png") in message
    assert [p.name for p in ds.paths] == ["a.png", "e.png", "C.JPG", "d.png", "f.bmp"]
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.dtype == torch.float32 and x.shape == (channels, 12, 12) and y == -1
        assert -1.0 <= x.min() and x.max() <= 1.0 and x.std() > 0.05
    assert torch.equal(ds[0][0], ds[0][0])


def test_folder_centre_crop_and_transparency(tmp_path):
    arr = np.zeros((10, 30), np.uint8)
    arr[:, 10:20] = 255  # only the centre square is white
    Image.fromarray(arr, "L").save(tmp_path / "wide.png")
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "clear.png")  # transparent black
    ds = build_dataset(DataConfig("folder", str(tmp_path), image_size=6, channels=3))
    assert [p.name for p in ds.paths] == ["clear.png", "wide.png"]
    assert torch.equal(ds[1][0], torch.ones(3, 6, 6))
    assert torch.equal(ds[0][0], torch.ones(3, 6, 6))  # transparency shows as white


def test_folder_warning_lists_ten_then_counts(tmp_path):
    Image.new("L", (4, 4)).save(tmp_path / "good.png")
    for k in range(12):
        (tmp_path / f"bad{k:02d}.png").write_bytes(b"junk")
    with pytest.warns(UserWarning) as record:
        ds = build_dataset(DataConfig("folder", str(tmp_path), 4, 1))
    message = str(record[0].message)
    assert "skipped 12 " in message and "bad00.png, bad01.png" in message
    assert "bad09.png and 2 more" in message and "bad10" not in message
    assert len(ds) == 1


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_dataset(DataConfig("folder", str(tmp_path / "missing"), 8, 3))
    (tmp_path / "empty" / "nested").mkdir(parents=True)
    with pytest.raises(DataError, match="no image files"):
        build_dataset(DataConfig("folder", str(tmp_path / "empty"), 8, 3))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "only.png").write_bytes(b"junk")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        with pytest.raises(DataError, match="none readable"):
            build_dataset(DataConfig("folder", str(tmp_path / "bad"), 8, 3))
    Image.new("L", (4, 4)).save(tmp_path / "ok.png")
    with pytest.raises(DataError, match="only a train split"):
        build_dataset(DataConfig("folder", str(tmp_path), 8, 3), "test")
    with pytest.raises(DataError, match="data.data_dir"):
        build_dataset(DataConfig("folder", None, 8, 3))


# --------------------------------------------------------------------------------------------
# digits, splits, flips
# --------------------------------------------------------------------------------------------

def test_digits_split_shape_range_and_determinism():
    from sklearn.datasets import load_digits

    cfg = DataConfig("digits")
    train, test = build_dataset(cfg, "train"), build_dataset(cfg, "test")
    assert (len(train), len(test)) == (1497, 300)
    x, y = test[0]
    assert x.shape == (1, 16, 16) and x.dtype == torch.float32
    assert -1.0 <= x.min() and x.max() <= 1.0 and x.min() < -0.9 and x.max() > 0.5
    first = int(np.random.RandomState(0).permutation(1797)[0])
    assert y == int(load_digits().target[first])
    again = build_dataset(cfg, "test")
    assert torch.equal(again[0][0], x) and torch.equal(train[5][0], build_dataset(cfg)[5][0])
    all_labels = sorted(train.labels.tolist() + test.labels.tolist())
    assert all_labels == sorted(load_digits().target.tolist())


def test_bad_split_and_dataset():
    with pytest.raises(DataError, match="split must be one of train, test"):
        build_dataset(DataConfig("digits"), "val")
    with pytest.raises(DataError, match="unknown dataset"):
        build_dataset(DataConfig("imagenet"))


def test_random_hflip_flips_exactly_the_masked_images():
    x = torch.randn(64, 2, 3, 5)
    out = random_hflip(x, torch.Generator().manual_seed(7))
    mask = torch.rand(64, generator=torch.Generator().manual_seed(7)) < 0.5
    assert 10 < int(mask.sum()) < 54
    assert torch.equal(out[mask], x[mask].flip(-1)) and torch.equal(out[~mask], x[~mask])
    assert torch.equal(out, random_hflip(x, torch.Generator().manual_seed(7)))
    assert not torch.equal(out, random_hflip(x, torch.Generator().manual_seed(8)))
    with pytest.raises(ValueError, match="batch"):
        random_hflip(x[0])


def test_user_images_with_another_channel_count_are_refused(tmp_path):
    Image.fromarray(np.full((20, 20, 3), 90, np.uint8)).save(tmp_path / "gray_as_rgb.png")
    assert len(open_image_folder(tmp_path, 16, 1)) == 1  # equal channels: grayscale
    colour = np.zeros((20, 20, 3), np.uint8)
    colour[..., 0] = 200
    Image.fromarray(colour).save(tmp_path / "red.png")
    with pytest.raises(DataError, match="red.png.*`convert_channels`"):
        open_image_folder(tmp_path, 16, 1)
    assert len(open_image_folder(tmp_path, 16, 1, convert=True)) == 2
    with pytest.raises(DataError, match="grayscale"):
        open_image_folder(tmp_path, 16, 3)
    one = read_image(tmp_path / "gray_as_rgb.png", 16, 1)  # one file: the same loading
    torch.testing.assert_close(one, open_image_folder(tmp_path, 16, 1, convert=True)[0][0])
    assert one.shape == (1, 16, 16) and abs(float(one.mean()) - (90 / 127.5 - 1)) < 1e-6
    with pytest.raises(DataError, match="red.png is colour.*`convert_channels`"):
        read_image(tmp_path / "red.png", 16, 1)
    assert read_image(tmp_path / "red.png", 16, 3).shape == (3, 16, 16)
