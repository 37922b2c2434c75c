"""The FCN: logits of the input's size for any number of skips, a loss that falls, and a clear config error."""

from __future__ import annotations

import pytest
import torch

from deepzoo.families import fcn


@pytest.mark.parametrize("skips", [0, 1, 2])
def test_logits_have_the_input_size_and_eleven_labels(skips):
    model = fcn.FCN(fcn.ModelConfig(widths=(4, 8, 16), skips=skips))
    assert len(model.score) == skips + 1
    assert model(torch.rand(2, 1, 96, 96)).shape == (2, 11, 96, 96)
    assert model(torch.rand(1, 1, 32, 48)).shape == (1, 11, 32, 48)  # fully convolutional: any size


def test_a_few_steps_fit_one_scene():
    torch.manual_seed(0)
    model = fcn.FCN(fcn.ModelConfig(widths=(8, 16), skips=1))
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
    with pytest.raises(ValueError, match=r"skips \(3\) must be below the number of levels \(3\)"):
        fcn.FCN(fcn.ModelConfig(widths=(4, 8, 16), skips=3))
