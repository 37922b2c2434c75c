"""`prepare_scenes`: composing Fashion-MNIST scenes, their boxes and masks, determinism, no leakage, clear errors."""

import pytest
import torch

from deepzoo.config import ConfigError, validate
from deepzoo.data import scenes

CANVAS, THRESHOLD, MAX_OVERLAP = 64, 30, 0.2
PARAMS = dict(canvas=CANVAS, min_items=1, max_items=4, min_size=16, max_size=30, max_overlap=MAX_OVERLAP,
              mask_threshold=THRESHOLD, train_scenes=60, val_scenes=20, test_scenes=30)
# Each fake split has its own brightness and its own classes, so a scene shows where its items came from.
FAKE = {"train": (40, 250, (0, 5)), "val": (20, 180, (5, 8)), "test": (20, 110, (8, 10))}


def fake_fashion_mnist(root, uniform=False):
    """Processed Fashion-MNIST splits of black 28×28 images holding one bright rectangle (or all bright)."""
    root.mkdir()
    g = torch.Generator().manual_seed(0)
    draw = lambda low, high: int(torch.randint(low, high, (), generator=g))  # noqa: E731
    for split, (n, brightness, (low, high)) in FAKE.items():
        images = torch.zeros(n, 28, 28, dtype=torch.uint8)
        for image in images:
            h, w = (28, 28) if uniform else (draw(5, 22), draw(5, 22))
            y, x = draw(0, 29 - h), draw(0, 29 - w)
            image[y : y + h, x : x + w] = brightness
        torch.save({"images": images, "labels": torch.randint(low, high, (n,), generator=g)}, root / f"{split}.pt")
    return root


def prepare(tmp_path, name="scenes", seed=0, source=None, **overrides):
    source = source or fake_fashion_mnist(tmp_path / f"{name}_source")
    counts = scenes.prepare(scenes.Params(**{**PARAMS, **overrides}), seed, tmp_path / name, source)
    return counts, tmp_path / name


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    counts, output = prepare(tmp_path_factory.mktemp("scenes"))
    return counts, output, {split: scenes.load(split, output) for split in scenes.SPLITS}


def scene_items(data):
    for s in range(len(data["images"])):
        yield s, *scenes.items(data, s)


def box_union(boxes):
    covered = torch.zeros(CANVAS, CANVAS, dtype=torch.bool)
    for x1, y1, x2, y2 in boxes.int().tolist():
        covered[y1:y2, x1:x2] = True
    return covered


def iou(a, b):
    a, b = a.double(), b.double()
    inter = (torch.minimum(a[2:], b[2:]) - torch.maximum(a[:2], b[:2])).clamp(min=0).prod()
    return float(inter / ((a[2:] - a[:2]).prod() + (b[2:] - b[:2]).prod() - inter))


def test_shapes_dtypes_and_counts(prepared):
    counts, _, data = prepared
    assert counts == {"train": 60, "val": 20, "test": 30, "items": sum(len(d["labels"]) for d in data.values())}
    for split, d in data.items():
        S, K = counts[split], len(d["labels"])
        assert d["images"].shape == d["masks"].shape == (S, CANVAS, CANVAS)
        assert d["images"].dtype == d["masks"].dtype == torch.uint8
        assert d["boxes"].shape == (K, 4) and d["boxes"].dtype == torch.float32
        assert d["labels"].dtype == d["offsets"].dtype == torch.int64 and d["offsets"].shape == (S + 1,)
        per_scene = d["offsets"].diff()
        assert per_scene.min() >= PARAMS["min_items"] and per_scene.max() <= PARAMS["max_items"]
    assert len(set(data["train"]["offsets"].diff().tolist())) > 1  # the item count does vary


def test_boxes_lie_inside_the_canvas_and_are_tight(prepared):
    for d in prepared[2].values():
        boxes = d["boxes"]
        assert (boxes >= 0).all() and (boxes <= CANVAS).all() and (boxes[:, 2:] > boxes[:, :2]).all()
        assert torch.equal(boxes, boxes.round())  # pixel edges
        for s, scene_boxes, _ in scene_items(d):
            bright = d["images"][s] > THRESHOLD
            assert torch.equal(d["masks"][s] > 0, bright)  # the mask covers exactly the bright pixels
            assert not (bright & ~box_union(scene_boxes)).any()  # no bright pixel outside every box
            for x1, y1, x2, y2 in scene_boxes.int().tolist():  # every side of a box touches a bright pixel
                inside = bright[y1:y2, x1:x2]
                assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()


def test_a_lone_item_has_exactly_the_box_and_class_of_its_mask(tmp_path):
    _, output = prepare(tmp_path, min_items=1, max_items=1)
    d = scenes.load("train", output)
    for s, boxes, labels in scene_items(d):
        rows, columns = (d["masks"][s] > 0).nonzero().unbind(1)
        tight = [columns.min(), rows.min(), columns.max() + 1, rows.max() + 1]
        assert boxes.tolist() == [[float(v) for v in tight]]
        assert set(d["masks"][s].unique().tolist()) == {0, int(labels[0]) + 1}


def test_mask_classes_are_the_labels_plus_one_of_the_items_there(prepared):
    for d in prepared[2].values():
        for s, boxes, labels in scene_items(d):
            mask = d["masks"][s]
            assert set(mask.unique().tolist()) <= {0, *(labels + 1).tolist()}
            for label in labels.unique().tolist():  # a class's pixels lie within that class's boxes
                assert not ((mask == label + 1) & ~box_union(boxes[labels == label])).any()


def test_boxes_of_a_scene_overlap_at_most_max_overlap(prepared):
    worst = 0.0
    for d in prepared[2].values():
        for _, boxes, _ in scene_items(d):
            for i in range(len(boxes)):
                for j in range(i):
                    worst = max(worst, iou(boxes[i], boxes[j]))
    # Placement checks the stored (tight) boxes themselves, so no slack is needed beyond float rounding.
    assert 0 < worst <= MAX_OVERLAP + 1e-6


def test_the_same_seed_gives_identical_scenes(tmp_path):
    source = fake_fashion_mnist(tmp_path / "source")
    _, first = prepare(tmp_path, "first", source=source)
    _, second = prepare(tmp_path, "second", source=source)
    _, reseeded = prepare(tmp_path, "reseeded", seed=1, source=source)
    _, more_test = prepare(tmp_path, "more_test", source=source, test_scenes=50)
    for split in scenes.SPLITS:
        a, b = scenes.load(split, first), scenes.load(split, second)
        assert all(torch.equal(a[key], b[key]) for key in scenes.KEYS)
        assert (first / f"{split}.pt").read_bytes() == (second / f"{split}.pt").read_bytes()
    assert not torch.equal(scenes.load("train", first)["images"], scenes.load("train", reseeded)["images"])
    # One random stream per split: more test scenes leave the training scenes as they were.
    assert torch.equal(scenes.load("train", first)["images"], scenes.load("train", more_test)["images"])


def test_each_split_draws_only_its_own_images(tmp_path):
    source = fake_fashion_mnist(tmp_path / "source", uniform=True)  # every image one flat brightness per split
    _, output = prepare(tmp_path, source=source)
    for split, (_, brightness, (low, high)) in FAKE.items():
        d = scenes.load(split, output)
        assert set(d["images"].unique().tolist()) == {0, brightness}
        assert d["labels"].min() >= low and d["labels"].max() < high


def test_fresh_training_scenes_are_composed_like_the_stored_ones_from_training_images_only(tmp_path):
    source = fake_fashion_mnist(tmp_path / "source", uniform=True)
    _, output = prepare(tmp_path, source=source, train_scenes=40)
    draw = scenes.fresh_training_scenes(25, output, source)
    first, again = draw(torch.Generator().manual_seed(7)), draw(torch.Generator().manual_seed(7))
    assert all(torch.equal(first[key], again[key]) for key in scenes.KEYS)  # the generator decides everything
    other = draw(torch.Generator().manual_seed(8))
    assert not torch.equal(first["images"], other["images"])
    assert first["images"].shape == (25, CANVAS, CANVAS) and scenes.problem(first) is None
    brightness, (low, high) = FAKE["train"][1], FAKE["train"][2]
    assert set(first["images"].unique().tolist()) == {0, brightness}
    assert first["labels"].min() >= low and first["labels"].max() < high
    assert ((first["masks"] > 0) == (first["images"] > THRESHOLD)).all()


def test_fresh_training_scenes_need_the_params_the_stored_ones_were_composed_with(tmp_path, prepared):
    assert scenes.Params.model_validate_json((prepared[1] / scenes.PARAMS).read_text()) == scenes.Params(**PARAMS)
    with pytest.raises(scenes.SceneDataError, match="params.json not found: run `dvc repro prepare_scenes`"):
        scenes.fresh_training_scenes(5, tmp_path)


def test_the_examples_figure_is_written(prepared):
    figure = prepared[1] / "examples.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and figure.stat().st_size > 10_000


def corrupt(data, key, change):
    data = {k: v.clone() for k, v in data.items()}
    data[key] = change(data[key])
    return data


def swap_first_offsets(offsets):
    offsets[1], offsets[2] = offsets[2].clone(), offsets[1].clone()
    return offsets


@pytest.mark.parametrize("key, change, message", [
    ("images", lambda t: t.float(), "images must be a torch.uint8 tensor"),
    ("masks", lambda t: t[:, :-1], "masks of the same shape"),
    ("masks", lambda t: t.index_fill(0, torch.tensor([0]), 11), "mask values must be 0"),
    ("boxes", lambda t: t[:, :3], r"boxes \[K, 4\]"),
    ("labels", lambda t: t[:-1], r"labels \[K\]"),
    ("offsets", lambda t: t[:-1], r"offsets must be \[S \+ 1\]"),
    ("offsets", lambda t: t.index_fill(0, torch.tensor([len(t) - 1]), int(t[-1]) + 1), "running from 0"),
    ("offsets", swap_first_offsets, "offsets decrease at scene 1"),
    ("offsets", lambda t: t.index_fill(0, torch.tensor([1]), 0), "scene 0 has no item"),
    ("boxes", lambda t: t.index_fill(1, torch.tensor([2]), CANVAS + 1.0), "box 0 .* lies outside the 64×64 canvas"),
    ("boxes", lambda t: t.index_fill(1, torch.tensor([1]), -1.0), "lies outside the 64×64 canvas"),
    ("boxes", lambda t: torch.cat([t[:1, [0, 1, 0, 3]], t[1:]]), r"box 0 .* is empty \(x2 <= x1"),
    ("labels", lambda t: torch.cat([t[:-1], torch.tensor([10])]), "label outside 0–9"),
    ("labels", lambda t: torch.cat([torch.tensor([-1]), t[1:]]), "box 0 .* label outside 0–9"),
    ("boxes", lambda t: t.tolist(), "boxes must be a torch.float32 tensor"),
])  # fmt: skip
def test_load_rejects_a_corrupted_file(tmp_path, prepared, key, change, message):
    torch.save(corrupt(prepared[2]["val"], key, change), tmp_path / "val.pt")
    with pytest.raises(scenes.SceneDataError, match=message) as err:
        scenes.load("val", tmp_path)
    assert str(tmp_path / "val.pt") in str(err.value)


def test_load_names_the_missing_stage_and_unreadable_files(tmp_path, prepared):
    with pytest.raises(scenes.SceneDataError, match=r"train.pt not found: run `dvc repro prepare_scenes` first"):
        scenes.load("train", tmp_path)
    (tmp_path / "train.pt").write_bytes(b"not a torch file")
    with pytest.raises(scenes.SceneDataError, match="train.pt: not a readable torch file"):
        scenes.load("train", tmp_path)
    torch.save({"images": prepared[2]["val"]["images"]}, tmp_path / "val.pt")
    with pytest.raises(scenes.SceneDataError, match="val.pt: expected a dict with keys"):
        scenes.load("val", tmp_path)


def test_blank_source_images_fail_clearly_and_write_nothing(tmp_path):
    source = fake_fashion_mnist(tmp_path / "source")
    torch.save({"images": torch.zeros(5, 28, 28, dtype=torch.uint8), "labels": torch.zeros(5, dtype=torch.int64)},
               source / "val.pt")
    with pytest.raises(scenes.SceneDataError, match="val.pt: no image has a pixel above mask_threshold"):
        prepare(tmp_path, source=source)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source"]


@pytest.mark.parametrize("overrides, message", [
    ({"min_items": 3, "max_items": 2}, r"min_items \(3\) must be <= max_items \(2\)"),
    ({"max_size": 80}, "min_size <= max_size <= canvas"),
    ({"max_overlap": 1.5}, "scenes.max_overlap must be <= 1"),
])
def test_inconsistent_params_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate("scenes", {**PARAMS, **overrides}, scenes.Params)
    with pytest.raises(ConfigError, match="scenes.canvas is required"):
        validate("scenes", {k: v for k, v in PARAMS.items() if k != "canvas"}, scenes.Params)
