"""Fashion-MNIST: find and verify the four IDX files, parse them, split off a validation set.

Output `data/processed/fashion_mnist/{train,val,test}.pt`, each `{"images": uint8 [N, 28, 28],
"labels": int64 [N]}`: images stay bytes in [0, 255] on disk and become floats per batch.
"""

from __future__ import annotations

import gzip
import hashlib
import struct
import urllib.request
from pathlib import Path

import numpy as np
import torch
from pydantic import Field

from deepzoo.config import Section
from deepzoo.storage import atomic_path

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")  # fmt: skip
SEARCH_PATHS = (Path("data/raw/fashion-mnist"), Path("/usr/share/datasets/fashion-mnist"))
URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
OUTPUT = Path("data/processed/fashion_mnist")
# SHA-256 of the *decompressed* IDX bytes: the official .gz files and Debian's recompressed copies
# (package dataset-fashion-mnist) differ as archives but hold the same bytes.
FILES = {
    "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
IDX_DTYPES = {0x08: np.uint8}  # the only element type Fashion-MNIST uses


class DataError(ValueError):
    """An input file is missing or corrupt; the message names the file and the problem."""


class Params(Section):
    val_size: int = Field(ge=1)  # images split off the training set, stratified by class
    limit: int | None = Field(None, ge=100)  # keep only this many training images (smoke runs)


def parse_idx(raw: bytes, name: str) -> np.ndarray:
    """Parse IDX bytes: magic (0, 0, dtype, ndim), big-endian dimension sizes, then the data."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{name}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    dtype, ndim = raw[2], raw[3]
    if dtype not in IDX_DTYPES:
        raise DataError(f"{name}: unsupported IDX element type 0x{dtype:02x} (expected 0x08, unsigned byte)")
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataError(f"{name}: truncated IDX header ({len(raw)} bytes, {ndim} dimensions)")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise DataError(f"{name}: IDX size mismatch: header says {shape} = {expected} bytes, file has {len(raw)}")
    return np.frombuffer(raw, dtype=IDX_DTYPES[dtype], offset=header).reshape(shape)


def read_verified(path: Path, sha256: str) -> bytes:
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as err:
        raise DataError(f"{path}: not a complete gzip file ({err}); delete it and run again") from err
    digest = hashlib.sha256(raw).hexdigest()
    if digest != sha256:
        raise DataError(f"{path}: checksum mismatch (sha256 {digest}, expected {sha256}); "
                        "the file is corrupt or not Fashion-MNIST: delete it and run again")
    return raw


def locate(name: str, search: tuple[Path, ...] = SEARCH_PATHS, download_to: Path | None = None) -> Path:
    """First existing copy of `name` on the search path, else a download into `download_to`."""
    for folder in search:
        if (folder / name).is_file():
            return folder / name
    if download_to is None:
        raise DataError(f"{name} not found in {', '.join(map(str, search))}")
    try:
        with atomic_path(download_to / name) as tmp, urllib.request.urlopen(URL + name, timeout=60) as response:
            tmp.write_bytes(response.read())
    except OSError as err:  # URLError, timeouts and refused connections are all OSErrors
        raise DataError(f"{name} is in none of {', '.join(map(str, search))} and its download from {URL} failed "
                        f"({getattr(err, 'reason', err)}): install Debian's dataset-fashion-mnist or copy the four "
                        f"IDX .gz files into {search[0]}") from None
    return download_to / name


def load_raw(search: tuple[Path, ...] = SEARCH_PATHS, download: bool = True) -> dict[str, np.ndarray]:
    arrays = {}
    for name, sha in FILES.items():
        path = locate(name, search, search[0] if download else None)
        arrays[name.split("-idx")[0]] = parse_idx(read_verified(path, sha), str(path))
    for split in ("train", "t10k"):
        images, labels = arrays[f"{split}-images"], arrays[f"{split}-labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"{split}: {len(images)} images of shape {images.shape[1:]} vs {len(labels)} labels")
    return arrays


def split(arrays: dict[str, np.ndarray], params: Params, seed: int) -> dict[str, dict[str, torch.Tensor]]:
    from sklearn.model_selection import train_test_split  # here: every stage that only loads the data saves 3 s

    images, labels = arrays["train-images"], arrays["train-labels"]
    kept = min(params.limit or len(labels), len(labels))
    classes = len(np.unique(labels))
    if not classes <= params.val_size <= kept - classes:  # a stratified split needs each class on both sides
        raise DataError(f"fashion_mnist.val_size = {params.val_size} does not fit the {kept} training images kept "
                        f"(fashion_mnist.limit = {params.limit}): choose a val_size from {classes} to {kept - classes}")
    if params.limit is not None and params.limit < len(labels):
        images, _, labels, _ = train_test_split(images, labels, train_size=params.limit,
                                                stratify=labels, random_state=seed)
    train_x, val_x, train_y, val_y = train_test_split(images, labels, test_size=params.val_size,
                                                      stratify=labels, random_state=seed)
    test_x, test_y = arrays["t10k-images"], arrays["t10k-labels"]
    if params.limit is not None:  # smoke runs keep the test set in proportion
        test_x, test_y = test_x[: params.limit], test_y[: params.limit]
    tensors = lambda x, y: {"images": torch.from_numpy(np.array(x)),  # noqa: E731
                            "labels": torch.from_numpy(y.astype(np.int64))}
    return {"train": tensors(train_x, train_y), "val": tensors(val_x, val_y), "test": tensors(test_x, test_y)}


def prepare(params: Params, seed: int, output: Path = OUTPUT, search: tuple[Path, ...] = SEARCH_PATHS,
            download: bool = True) -> dict[str, int]:
    splits = split(load_raw(search, download), params, seed)
    with atomic_path(output) as tmp:
        tmp.mkdir()
        for name, tensors in splits.items():
            torch.save(tensors, tmp / f"{name}.pt")
    return {name: len(t["labels"]) for name, t in splits.items()}


def load(split_name: str, root: Path = OUTPUT) -> dict[str, torch.Tensor]:
    path = root / f"{split_name}.pt"
    if not path.is_file():
        raise DataError(f"{path} not found: run `dvc repro prepare_images` first")
    return torch.load(path)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """Stored bytes [N, 28, 28] in [0, 255] → floats [N, 1, 28, 28] in [0, 1] (per batch, on its device)."""
    return images.unsqueeze(1).float().div_(255)


def splits(root: Path = OUTPUT) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) of each split, as the trainer batches them."""
    return {name: (t["images"], t["labels"]) for name in ("train", "val", "test") for t in [load(name, root)]}
