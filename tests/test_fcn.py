"""The FCN: logits of the input's size for any number of skips, a loss that falls, flip test-time averaging, and
a clear config error."""

from __future__ import annotations

import pytest
import torch

from deepzoo.families import fcn
from deepzoo.families.residual import Backbone


def config(widths: tuple[int, ...], skips: int) -> fcn.ModelConfig:
    return fcn.ModelConfig(backbone=Backbone(widths=widths, blocks=1, pretrained=False, frozen=0), skips=skips,
                           flip=False, fresh_scenes=False, flip_tta=False)


@pytest.mark.parametrize("skips", [0, 1, 2])
def test_logits_have_the_input_size_and_eleven_labels(skips):
    model = fcn.FCN(config((4, 8), skips))
    assert len(model.score) == skips + 1
    assert model(torch.rand(2, 1, 96, 96)).shape == (2, 11, 96, 96)
    assert model(torch.rand(1, 1, 32, 48)).shape == (1, 11, 32, 48)  # fully convolutional: any size


def test_an_untrained_fcn_predicts_with_its_deepest_level_alone():
    """The finer levels' score layers start at zero (as FCN's): at first the deepest scores, upsampled, are all."""
    torch.manual_seed(0)
    model = fcn.FCN(config((4, 8), 2)).eval()
    x = torch.rand(2, 1, 32, 32)
    expected = model.score[0](model.encoder(x))
    for size in (16, 32):  # upsampled onto each finer level's map, whose own scores add nothing yet
        expected = torch.nn.functional.interpolate(expected, size=(size, size), mode="bilinear", align_corners=False)
    assert torch.allclose(model(x), expected, atol=1e-6)


def test_a_few_steps_fit_one_scene():
    torch.manual_seed(0)
    model = fcn.FCN(config((8, 16), 1))
    images = torch.zeros(1, 32, 32, dtype=torch.uint8)
    images[0, 8:20, 8:20] = 200
    masks = (images > 30).byte() * 3
    batch = model.prepare((images, masks))
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    first = model.loss(batch)[0].item()
    for _ in range(60):
        optimizer.zero_grad()
        loss, metrics = model.loss(batch)
        loss.backward()
        optimizer.step()
    assert loss.item() < first / 4 and metrics["pixel_accuracy"] > 0.95


def test_more_skips_than_finer_levels_is_a_clear_error():
    with pytest.raises(ValueError, match=r"skips \(3\) must be below the number of encoder levels \(the stem and 2"):
        config((4, 8), 3)


def test_training_mirrors_about_half_the_scenes_each_with_its_mask_and_evaluation_none():
    model = fcn.FCN(config((4, 8), 1).model_copy(update={"flip": True}))
    images = torch.randint(0, 256, (64, 6, 6), dtype=torch.uint8)
    torch.manual_seed(0)
    x, masks = model.train().prepare((images, images.clone()))  # a mask equal to its image shows where it went
    assert torch.equal(masks, (x[:, 0] * 255).round().long())
    mirrored = torch.tensor([not torch.equal(masks[i], images[i].long()) for i in range(len(images))])
    assert 16 < mirrored.sum() < 48 and torch.equal(masks[mirrored], images[mirrored].flip(-1).long())
    assert torch.equal(model.eval().prepare((images, images))[1], images.long())


def test_flip_tta_makes_evaluation_mirror_symmetric_and_leaves_training_alone():
    torch.manual_seed(0)
    model = fcn.FCN(config((4, 8), 2).model_copy(update={"flip_tta": True}))
    x = torch.rand(2, 1, 32, 32)
    model.eval()
    assert torch.allclose(model(x.flip(-1)), model(x).flip(-1), atol=1e-6)  # the mirror of a scene, the mirror's masks
    assert torch.allclose(model(x), (model.segment(x) + model.segment(x.flip(-1)).flip(-1)) / 2)
    model.train()
    assert torch.equal(model(x), model.segment(x))
