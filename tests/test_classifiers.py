"""The Fashion-MNIST classifiers' shared parts (augmentation, label smoothing) and the `resnet` family."""

import pytest
import torch
import torch.nn.functional as F
from configs import shipped

from deepzoo.families import classifier, resnet


def test_shift_and_flip_moves_each_image_on_its_own_and_keeps_every_pixel_value():
    torch.manual_seed(0)
    images = torch.zeros(64, 1, 28, 28)
    images[:, 0, 14, 10] = 1.0  # one lit pixel, left of centre
    moved = classifier.shift_and_flip(images, max_shift=2)
    assert moved.shape == images.shape and torch.equal(moved.sum((1, 2, 3)), images.sum((1, 2, 3)))
    where = moved[:, 0].flatten(1).argmax(1)
    rows, cols = where // 28, where % 28
    assert (rows - 14).abs().max() <= 2 and len(set(zip(rows.tolist(), cols.tolist(), strict=True))) > 5
    flipped = (cols - (27 - 10)).abs() <= 2
    assert 0 < flipped.sum() < 64  # some mirrored, some not
    assert ((cols - 10).abs() <= 2)[~flipped].all()


def shipped_resnet(**model):
    return resnet.ResNet(shipped("resnet", resnet.Config, model=model).model)


@pytest.mark.parametrize("widths, blocks", [([4], 1), ([4, 8], 2), ([4, 8, 8, 16], 1)])
def test_resnet_maps_images_to_ten_logits_and_halves_the_map_per_stage(widths, blocks):
    model = shipped_resnet(widths=widths, blocks=blocks)
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    features = model.net[:-3](torch.rand(1, 1, 28, 28))  # before pooling
    assert features.shape[1:] == (widths[-1], *[-(-28 // 2 ** len(widths))] * 2)
    assert sum(isinstance(m, resnet.ResidualBlock) for m in model.modules()) == len(widths) * blocks


def test_a_residual_block_with_a_zero_residual_passes_its_input_through():
    block = resnet.ResidualBlock(4, 4, stride=1).eval()
    torch.nn.init.zeros_(block.residual[-1].weight)  # the last BN's scale: F(x) = 0
    x = torch.rand(2, 4, 7, 7)
    assert torch.allclose(block(x), x)


def test_flip_tta_averages_an_image_with_its_mirror_at_evaluation_only():
    torch.manual_seed(0)
    model = shipped_resnet(widths=[4, 8], flip_tta=True).eval()
    x = torch.rand(2, 1, 28, 28)
    assert torch.allclose(model(x), model(x.flip(-1)), atol=1e-6)
    model.train()
    assert not torch.allclose(model(x), model(x.flip(-1)), atol=1e-4)


def test_label_smoothing_reaches_the_loss():
    torch.manual_seed(0)
    smooth, sharp = shipped_resnet(label_smoothing=0.2), shipped_resnet(label_smoothing=0.0)
    sharp.load_state_dict(smooth.state_dict())
    batch = (torch.randint(0, 256, (8, 28, 28), dtype=torch.uint8), torch.randint(0, 10, (8,)))
    smooth.eval(), sharp.eval()
    logits = sharp(sharp.prepare(batch)[0])
    assert smooth.loss(smooth.prepare(batch))[0].item() == pytest.approx(
        F.cross_entropy(logits, batch[1], label_smoothing=0.2).item(), rel=1e-5)
    assert sharp.loss(sharp.prepare(batch))[0].item() == pytest.approx(F.cross_entropy(logits, batch[1]).item(),
                                                                       rel=1e-5)


def test_resnet_learns_a_small_training_set():
    torch.manual_seed(0)
    model = shipped_resnet(widths=[8, 16], shift=0, flip_tta=False)
    images = torch.randint(0, 256, (40, 28, 28), dtype=torch.uint8)
    labels = torch.arange(40) % 10
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(60):
        loss, _ = model.loss(model.prepare((images, labels)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    assert model.loss(model.prepare((images, labels)))[1]["accuracy"] == 1.0
