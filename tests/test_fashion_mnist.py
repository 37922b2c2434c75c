import gzip
import hashlib
import struct

import numpy as np
import pytest
import torch

from deepzoo.data import fashion_mnist as fm


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def test_parse_idx_round_trip():
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    np.testing.assert_array_equal(fm.parse_idx(idx_bytes(images), "x"), images)


@pytest.mark.parametrize(
    "raw, problem",
    [
        (b"", "bad magic number empty"),
        (b"\x1f\x8b\x08\x00rest", "bad magic number 1f8b0800"),
        (bytes([0, 0, 0x0D, 1]) + struct.pack(">I", 1) + b"\0\0\0\0", "unsupported IDX element type 0x0d"),
        (bytes([0, 0, 0x08, 3]) + b"\0\0", "truncated IDX header"),
        (bytes([0, 0, 0x08, 1]) + struct.pack(">I", 10) + b"\0" * 9, "header says \\(10,\\) = 18 bytes, file has 17"),
    ],
)
def test_parse_idx_rejects_corrupt_input_naming_file_and_problem(raw, problem):
    with pytest.raises(fm.DataError, match=f"labels.idx: .*{problem}"):
        fm.parse_idx(raw, "labels.idx")


@pytest.fixture
def fake_raw(tmp_path, monkeypatch):
    """Four small IDX files with their checksums pinned, in a folder on the search path."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "raw"
    folder.mkdir()
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (400, 28, 28)),
        "train-labels-idx1-ubyte.gz": np.repeat(np.arange(10), 40),
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (50, 28, 28)),
        "t10k-labels-idx1-ubyte.gz": np.repeat(np.arange(10), 5),
    }
    checksums = {}
    for name, array in arrays.items():
        raw = idx_bytes(array)
        (folder / name).write_bytes(gzip.compress(raw))
        checksums[name] = hashlib.sha256(raw).hexdigest()
    monkeypatch.setattr(fm, "FILES", checksums)
    return folder


def test_prepare_writes_stratified_splits(fake_raw, tmp_path):
    counts = fm.prepare(fm.Params(val_size=100), seed=1, output=tmp_path / "out", search=(fake_raw,), download=False)
    assert counts == {"train": 300, "val": 100, "test": 50}
    val = fm.load("val", tmp_path / "out")
    assert val["images"].dtype == torch.uint8 and val["images"].shape == (100, 28, 28)
    assert np.bincount(val["labels"].numpy()).tolist() == [10] * 10  # stratified


def test_split_is_seeded(fake_raw):
    arrays = fm.load_raw((fake_raw,), download=False)
    a, b = (fm.split(arrays, fm.Params(val_size=100), seed=3) for _ in range(2))
    assert (a["val"]["labels"] == b["val"]["labels"]).all()


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "not_gzip"])
def test_corrupt_file_fails_with_its_name_and_leaves_no_output(fake_raw, tmp_path, damage):
    path = fake_raw / "t10k-images-idx3-ubyte.gz"
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip_byte":
        raw = bytearray(gzip.decompress(data))
        raw[-1] ^= 0xFF
        path.write_bytes(gzip.compress(bytes(raw)))
    else:
        path.write_bytes(b"plain text, not an archive")
    output = tmp_path / "out"
    with pytest.raises(fm.DataError, match=r"t10k-images-idx3-ubyte\.gz: (not a complete gzip|checksum mismatch)"):
        fm.prepare(fm.Params(val_size=100), seed=1, output=output, search=(fake_raw,), download=False)
    assert not output.exists()
    assert [p.name for p in output.parent.iterdir() if p.name.startswith(".")] == []


def test_missing_file_without_download_says_where_it_looked(fake_raw):
    (fake_raw / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(fm.DataError, match=f"train-labels-idx1-ubyte.gz not found in {fake_raw}"):
        fm.load_raw((fake_raw,), download=False)
