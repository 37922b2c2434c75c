"""Faster R-CNN: the RPN's outputs line up with its anchors, training lowers every loss, a fitted model finds an
item, and the logged model's output is one fixed-size tensor."""

from __future__ import annotations

from pathlib import Path

import torch

from deepzoo.engine.stages import Context, Variant
from deepzoo.families import faster_rcnn
from deepzoo.families.residual import Backbone
from deepzoo.ops.detection import box_iou

MODEL = faster_rcnn.ModelConfig(backbone=Backbone(widths=(8, 16, 16), blocks=1, pretrained=False, frozen=0),
                                roi_size=4, flip=False, anchor_sizes=(16.0, 32.0),
                                anchor_ratios=(0.5, 1.0, 2.0), rpn_batch=64,
                                proposals_train=32, proposals_test=16, rpn_nms=0.7, head_batch=16,
                                head_positive_fraction=0.25, score_threshold=0.05, nms=0.5, max_detections=10)


def scene() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One 32×32 scene with a 12×8 bright bag (class 8): images [1, 32, 32], boxes [1, 1, 4], labels [1, 1]."""
    images = torch.zeros(1, 32, 32, dtype=torch.uint8)
    images[0, 10:18, 6:18] = 200
    return images, torch.tensor([[[6.0, 10.0, 18.0, 18.0]]]), torch.tensor([[8]])


def test_each_objectness_logit_belongs_to_the_anchor_of_its_cell_and_shape():
    model = faster_rcnn.FasterRCNN(MODEL, 32).eval()
    cells, per_cell = 32 // model.stride, 6
    cell, shape = (2, 5), 4  # row 2, column 5 (of 8 × 8); size 32, ratio 1

    class Spike(torch.nn.Module):
        def forward(self, hidden):
            logits = torch.full((len(hidden), per_cell, cells, cells), -10.0)
            logits[:, shape, cell[0], cell[1]] = 10.0
            return logits

    model.objectness = Spike()
    torch.nn.init.zeros_(model.rpn_deltas.weight)
    torch.nn.init.zeros_(model.rpn_deltas.bias)
    _, _, _, proposals = model.propose(torch.zeros(1, 1, 32, 32))
    centre = ((cell[1] + 0.5) * model.stride, (cell[0] + 0.5) * model.stride)
    expected = torch.tensor([[centre[0] - 16, centre[1] - 16, centre[0] + 16, centre[1] + 16]]).clamp(0, 32)
    torch.testing.assert_close(proposals[0][:1], expected)


def test_training_lowers_the_loss_and_the_fitted_model_finds_the_item():
    torch.manual_seed(0)
    model = faster_rcnn.FasterRCNN(MODEL, 32)
    batch = model.prepare(scene())
    optimizer = torch.optim.Adam(model.parameters(), 3e-3)
    first, _ = model.loss(batch)
    for _ in range(150):
        optimizer.zero_grad()
        loss, metrics = model.loss(batch)
        loss.backward()
        optimizer.step()
    assert loss.item() < first.item() / 4
    model.eval()
    found = model.detect(batch[0])[0]
    assert found.labels[0] == 8 and found.scores[0] > 0.5
    assert box_iou(found.boxes[:1], batch[1][0]).item() > 0.7
    assert 0 < found.proposals <= MODEL.proposals_test
    ctx = Context({"faster_rcnn": Variant(model, {})}, None, torch.device("cpu"), Path(), 0, Path())
    folded = faster_rcnn.detector(ctx)(scene()[0])[0]  # as evaluation times it: batch norms folded into a copy
    torch.testing.assert_close(folded.boxes, found.boxes, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(folded.labels, found.labels)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # the logged model keeps its own


def test_the_logged_forward_pads_detections_to_a_fixed_size():
    model = faster_rcnn.FasterRCNN(MODEL, 32).eval()
    images = model.prepare(scene())[0].repeat(3, 1, 1, 1)
    rows = model(images)
    assert rows.shape == (3, MODEL.max_detections, 6)
    found = model.detect(images)[0]
    torch.testing.assert_close(rows[0, : len(found.labels), :4], found.boxes)
    assert (rows[0, len(found.labels) :] == 0).all()
