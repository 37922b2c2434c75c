import pytest
import torch

from deepzoo.ops.detection import (
    anchors,
    batched_nms,
    box_area,
    box_iou,
    clip_boxes,
    decode_boxes,
    encode_boxes,
    match_anchors,
    mirror,
    nms,
    region_targets,
    remove_small,
    roi_align,
    sample_labels,
    training_regions,
    truth_iou,
)


def random_boxes(n: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    corner = torch.rand(n, 2, generator=generator, dtype=dtype) * 100
    size = 5 + torch.rand(n, 2, generator=generator, dtype=dtype) * 35
    return torch.cat([corner, corner + size], dim=1)


def test_a_mirrored_scene_keeps_its_boxes_tight_around_its_items():
    images = torch.zeros(2, 1, 12, 20)
    images[:, 0, 2:5, 3:9] = 1  # an item at x 3–9, y 2–5 in both scenes
    boxes = torch.tensor([[[3.0, 2.0, 9.0, 5.0]]]).repeat(2, 1, 1)
    flipped, moved = mirror(images, boxes, torch.tensor([True, False]))
    assert torch.equal(flipped[0, 0].nonzero().amin(0), torch.tensor([2, 11]))  # columns 20 − 9 … 20 − 3 − 1
    assert torch.equal(moved[0], torch.tensor([[11.0, 2.0, 17.0, 5.0]]))
    assert torch.equal(flipped[1], images[1]) and torch.equal(moved[1], boxes[1])
    twice = mirror(flipped, moved, torch.tensor([True, False]))
    assert torch.equal(twice[0], images) and torch.equal(twice[1], boxes)


def test_iou_against_hand_computed_values():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 2.0, 4.0]])
    b = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0], [5.0, 5.0, 15.0, 15.0]])
    iou = box_iou(a, b)
    assert iou.shape == (2, 3)
    # identical 1, disjoint 0, shifted by half in x and y: 25 / (100 + 100 − 25); [0,0,2,4] inside the first: 8 / 100
    expected = torch.tensor([[1.0, 0.0, 25 / 175], [8 / 100, 0.0, 0.0]])
    torch.testing.assert_close(iou, expected)
    torch.testing.assert_close(box_area(a), torch.tensor([100.0, 8.0]))


def test_zero_area_boxes_have_zero_iou_not_nan():
    empty = torch.tensor([[3.0, 3.0, 3.0, 3.0], [0.0, 0.0, 0.0, 5.0]])
    iou = box_iou(empty, torch.cat([empty, torch.tensor([[0.0, 0.0, 10.0, 10.0]])]))
    assert not iou.isnan().any()
    assert (iou == 0).all()


def test_encode_decode_round_trip():
    generator = torch.Generator().manual_seed(0)
    reference, target = random_boxes(500, seed=1), random_boxes(500, seed=2)
    for weights in [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)]:
        deltas = encode_boxes(reference, target, weights)
        torch.testing.assert_close(decode_boxes(reference, deltas, weights), target, rtol=1e-5, atol=1e-4)
    deltas = torch.randn(500, 4, generator=generator)
    torch.testing.assert_close(encode_boxes(reference, decode_boxes(reference, deltas)), deltas, rtol=1e-4, atol=1e-4)
    assert encode_boxes(reference[:1], reference[:1]).abs().max() == 0


def test_decode_clamps_huge_size_deltas():
    decoded = decode_boxes(torch.tensor([[0.0, 0.0, 16.0, 16.0]]), torch.tensor([[0.0, 0.0, 100.0, 100.0]]))
    assert torch.isfinite(decoded).all()
    torch.testing.assert_close(decoded[0, 2] - decoded[0, 0], torch.tensor(1000.0))


def test_clip_and_remove_small():
    boxes = torch.tensor([[-5.0, -5.0, 50.0, 50.0], [10.0, 10.0, 12.0, 30.0], [0.0, 0.0, 5.0, 5.0]])
    torch.testing.assert_close(clip_boxes(boxes, height=40, width=30)[0], torch.tensor([0.0, 0.0, 30.0, 40.0]))
    assert remove_small(boxes, min_size=4).tolist() == [0, 2]


def reference_nms(boxes: list[list[float]], scores: list[float], threshold: float) -> list[int]:
    """Greedy NMS as the paper states it, one pair at a time, in pure Python."""

    def iou(p: list[float], q: list[float]) -> float:
        w = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
        h = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
        union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - w * h
        return w * h / union

    keep: list[int] = []
    for i in sorted(range(len(boxes)), key=lambda i: -scores[i]):
        if all(iou(boxes[i], boxes[k]) <= threshold for k in keep):
            keep.append(i)
    return keep


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_nms_equals_brute_force(seed: int, threshold: float):
    boxes = random_boxes(300, seed, dtype=torch.float64)
    scores = torch.randperm(300, generator=torch.Generator().manual_seed(seed + 100)).double()  # no ties
    keep = nms(boxes, scores, threshold)
    assert keep.tolist() == reference_nms(boxes.tolist(), scores.tolist(), threshold)
    assert 0 < len(keep) < 300  # the sets overlap enough for suppression to matter
    assert (scores[keep].diff() < 0).all()


def test_batched_nms_never_suppresses_across_labels():
    boxes = random_boxes(300, seed=5, dtype=torch.float64)
    scores = torch.randperm(300, generator=torch.Generator().manual_seed(6)).double()
    labels = torch.randint(0, 3, (300,), generator=torch.Generator().manual_seed(7))
    keep = batched_nms(boxes, scores, labels, 0.5)
    per_label = set()
    for label in range(3):
        (index,) = torch.where(labels == label)
        per_label |= set(index[nms(boxes[index], scores[index], 0.5)].tolist())
    assert set(keep.tolist()) == per_label
    assert (scores[keep].diff() < 0).all()
    # identical boxes: one survives within a label, both across labels
    same = torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 2)
    assert batched_nms(same, torch.tensor([0.9, 0.8]), torch.tensor([1, 1]), 0.5).tolist() == [0]
    assert batched_nms(same, torch.tensor([0.9, 0.8]), torch.tensor([1, 2]), 0.5).tolist() == [0, 1]
    assert batched_nms(torch.empty(0, 4), torch.empty(0), torch.empty(0, dtype=torch.long), 0.5).numel() == 0


def test_anchors_count_centres_areas_and_ratios():
    height, width, stride, sizes, ratios = 3, 4, 16, (32.0, 64.0), (0.5, 1.0, 2.0)
    boxes = anchors(height, width, stride, sizes, ratios)
    assert boxes.shape == (height * width * 6, 4)
    grid = boxes.reshape(height, width, 6, 4)  # row-major cells, then anchors per cell
    centre_x, centre_y = (grid[..., 0] + grid[..., 2]) / 2, (grid[..., 1] + grid[..., 3]) / 2
    torch.testing.assert_close(centre_x, ((torch.arange(width) + 0.5) * stride)[None, :, None].expand(3, 4, 6))
    torch.testing.assert_close(centre_y, ((torch.arange(height) + 0.5) * stride)[:, None, None].expand(3, 4, 6))
    w, h = grid[..., 2] - grid[..., 0], grid[..., 3] - grid[..., 1]
    expected_area = torch.tensor([s * s for s in sizes for _ in ratios])
    expected_ratio = torch.tensor([r for _ in sizes for r in ratios])
    torch.testing.assert_close(w * h, expected_area.expand(3, 4, 6))
    torch.testing.assert_close(h / w, expected_ratio.expand(3, 4, 6))


def test_roi_align_is_exact_on_a_linear_map():
    """Bilinear interpolation reproduces a linear function, and the mean of a linear function is its centre value."""
    height, width, scale, out = 10, 12, 0.5, 3
    a, b, c = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([3.0, 0.25, -1.0]), torch.tensor([0.0, 5.0, 2.0])
    x = torch.arange(width) + 0.5  # pixel centres in feature coordinates
    y = torch.arange(height) + 0.5
    plane = a[:, None, None] * x + b[:, None, None] * y[:, None] + c[:, None, None]  # [3, H, W]
    features = torch.stack([plane, 2 * plane])  # [2, 3, H, W]
    feature_boxes = torch.tensor([[0.5, 0.5, 11.5, 9.5], [2.0, 3.0, 5.0, 4.0], [1.3, 0.7, 9.9, 8.2]])
    batch_index = torch.tensor([1, 0, 1])
    pooled = roi_align(features, feature_boxes / scale, batch_index, out, spatial_scale=scale, sampling=2)
    assert pooled.shape == (3, 3, out, out)
    steps = (torch.arange(out) + 0.5) / out
    for k, (x1, y1, x2, y2) in enumerate(feature_boxes.tolist()):
        cx, cy = x1 + steps * (x2 - x1), y1 + steps * (y2 - y1)
        expected = a[:, None, None] * cx + b[:, None, None] * cy[:, None] + c[:, None, None]  # [3, out, out]
        torch.testing.assert_close(pooled[k], (1 + batch_index[k]) * expected, rtol=1e-5, atol=1e-5)


def test_roi_align_over_the_whole_map_is_its_mean_and_pools_evenly():
    features = torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    whole = torch.tensor([[0.0, 0.0, 8.0, 8.0]])
    zero = torch.zeros(1, dtype=torch.long)
    # 8 samples per side land exactly on the pixel centres
    torch.testing.assert_close(roi_align(features, whole, zero, 1, 1.0, sampling=8), features.mean((2, 3), True))
    quarters = roi_align(features, whole, zero, 4, 1.0, sampling=2)  # 2×2 samples on the centres of each 2×2 block
    torch.testing.assert_close(quarters, torch.nn.functional.avg_pool2d(features, 2))
    assert (roi_align(features, whole, zero, 1, 1.0) - features.mean()).abs().max() < 1.5  # coarse 2×2 estimate


def test_roi_align_of_no_boxes_is_empty():
    pooled = roi_align(torch.randn(2, 3, 6, 6), torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), 2, 0.25)
    assert pooled.shape == (0, 3, 2, 2)


def test_roi_align_gradient_flows_to_features():
    features = torch.randn(2, 3, 6, 6, requires_grad=True)
    boxes = torch.tensor([[0.0, 0.0, 20.0, 20.0], [4.0, 2.0, 10.0, 14.0]])
    pooled = roi_align(features, boxes, torch.tensor([0, 1]), 2, spatial_scale=0.25)
    pooled.sum().backward()
    assert features.grad is not None and features.grad.abs().sum() > 0
    # every output averages samples whose bilinear weights sum to 1: the gradient's total is the output count
    torch.testing.assert_close(features.grad.sum(), torch.tensor(float(pooled.numel())))
    assert features.grad[0].abs().sum() > 0 and features.grad[1].abs().sum() > 0


def test_roi_align_of_bf16_features_under_autocast_keeps_their_dtype_and_exact_coordinates():
    features = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    boxes = torch.tensor([[60.3, 10.1, 90.7, 40.9], [0.0, 0.0, 95.0, 95.0]])  # in pixels of a 96-px image
    exact = roi_align(features.bfloat16().float(), boxes, torch.tensor([0, 1]), 4, spatial_scale=0.125, sampling=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pooled = roi_align(features.bfloat16(), boxes, torch.tensor([0, 1]), 4, spatial_scale=0.125, sampling=1)
    assert pooled.dtype == torch.bfloat16
    torch.testing.assert_close(pooled.float(), exact.bfloat16().float())  # only the result is rounded


def test_match_anchors_follows_the_faster_rcnn_rule():
    boxes = torch.tensor(
        [
            [0.0, 0.0, 10.0, 10.0],  # identical to gt 0: positive
            [100.0, 100.0, 110.0, 110.0],  # far from everything: negative
            [0.0, 0.0, 10.0, 20.0],  # IoU 0.5 with gt 0: ignored
            [200.0, 200.0, 210.0, 210.0],  # IoU 100/900 with gt 1, but its best anchor: positive
        ]
    )
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [200.0, 200.0, 230.0, 230.0]])
    labels, matched = match_anchors(boxes, gt[None], torch.tensor([[3, 7]]), high=0.7, low=0.3)
    assert labels.tolist() == [[1, 0, -1, 1]]
    assert matched[0, 0] == 0 and matched[0, 3] == 1
    labels, matched = match_anchors(boxes, torch.empty(1, 0, 4), torch.empty(1, 0, dtype=torch.long))
    assert labels.tolist() == [[0, 0, 0, 0]] and matched.shape == (1, 4)


def test_padding_of_a_batch_ground_truth_matches_nothing():
    """A batch pads each image's gt to the most boxes with label −1 (box 0): the result per image is what that
    image alone gives, and an image with only padding has background anchors."""
    boxes = random_boxes(300, seed=3)
    gt = torch.stack([random_boxes(3, seed=4), torch.cat([random_boxes(1, seed=5), torch.zeros(2, 4)]),
                      torch.zeros(3, 4)])
    gt_labels = torch.tensor([[1, 2, 3], [4, -1, -1], [-1, -1, -1]])
    labels, matched = match_anchors(boxes, gt, gt_labels, high=0.5, low=0.2)
    for image in range(2):
        real = gt_labels[image] >= 0
        alone, alone_matched = match_anchors(boxes, gt[image][real][None], gt_labels[image][real][None], 0.5, 0.2)
        assert torch.equal(labels[image], alone[0]) and torch.equal(matched[image], alone_matched[0])
    assert (labels[1] == 1).any() and (labels[2] == 0).all()
    assert (truth_iou(boxes, gt, gt_labels)[gt_labels[:, None, :].expand(-1, 300, -1) < 0] == -1).all()


def test_training_regions_add_the_truth_and_give_each_region_its_role_class_and_target():
    proposals = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 20.0], [50.0, 50.0, 60.0, 60.0]],
                              [[20.0, 20.0, 30.0, 30.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]])
    valid = torch.tensor([[True, True, True], [True, False, False]])  # image 1 has one proposal, then padding
    gt = torch.tensor([[[0.0, 0.0, 10.0, 12.0], [0.0, 0.0, 0.0, 0.0]], [[20.0, 20.0, 30.0, 30.0], [0.0, 0.0, 5.0, 5.0]]])
    gt_labels = torch.tensor([[4, -1], [0, 9]])
    regions, role, nearest = training_regions(proposals, gt, gt_labels, 0.7, 0.3, valid)
    assert torch.equal(regions[:, 3:], gt)  # the ground truth follows the proposals
    # IoU 100/120, 120/200 (neither), 0; the gt itself, padding | the gt box; padding, padding; both gt boxes
    assert role.tolist() == [[1, -1, 0, 1, -1], [1, -1, -1, 1, 1]]
    assert nearest[1].tolist()[3:] == [0, 1]
    chosen = role >= 0
    boxes, image, classes, deltas = region_targets(regions, chosen, role, nearest, gt, gt_labels, (1.0,) * 4)
    assert image.tolist() == [0, 0, 0, 1, 1, 1] and classes.tolist() == [5, 0, 5, 1, 1, 10]
    assert torch.equal(boxes, regions[chosen])
    torch.testing.assert_close(decode_boxes(boxes[classes > 0], deltas[classes > 0]),
                               gt[image[classes > 0], nearest[chosen][classes > 0]])


def test_sample_labels_respects_the_quota_and_the_seed():
    labels = torch.cat([torch.ones(100), torch.zeros(1000), torch.full((50,), -1.0)]).long()
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]

    def sample(seed: int, source: torch.Tensor = labels) -> torch.Tensor:
        return sample_labels(source, 256, 0.25, torch.Generator().manual_seed(seed))

    sampled = sample(1)
    assert (sampled == 1).sum() == 64 and (sampled == 0).sum() == 192
    kept = sampled != -1
    assert (sampled[kept] == labels[kept]).all()  # only drops labels, never changes them
    assert torch.equal(sample(1), sampled) and not torch.equal(sample(2), sampled)
    few = labels.clone()
    few[torch.where(few == 1)[0][10:]] = -1  # 10 positives: negatives fill the batch
    sampled = sample(1, few)
    assert (sampled == 1).sum() == 10 and (sampled == 0).sum() == 246
    assert (sample(1, torch.zeros(100, dtype=torch.long)) == 0).all()  # fewer anchors than the batch: all kept
