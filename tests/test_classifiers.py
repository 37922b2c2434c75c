"""The Fashion-MNIST classifiers' shared parts (augmentation, label smoothing) and the `resnet` family."""

import copy
import hashlib

import pytest
import torch
import torch.nn.functional as F
from configs import shipped

from deepzoo.engine import stages
from deepzoo.families import classifier, residual, resnet


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
    features = model.trunk(torch.rand(1, 1, 28, 28))  # before pooling
    assert features.shape[1:] == (widths[-1], *[-(-28 // 2 ** len(widths))] * 2)
    assert sum(isinstance(m, residual.ResidualBlock) for m in model.modules()) == len(widths) * blocks


def save_resnet(path, **model) -> resnet.ResNet:
    """A resnet's checkpoint as `train@resnet` writes it: its config and (here random) weights."""
    torch.manual_seed(0)
    cfg = shipped("resnet", resnet.Config, model=model)
    trained = resnet.ResNet(cfg.model)
    torch.save({"config": cfg.model_dump(mode="json"), "state_dict": trained.state_dict()}, path)
    return trained.eval()


def test_a_backbone_starts_from_the_trained_resnets_stem_and_first_stages(tmp_path):
    trained = save_resnet(tmp_path / "resnet.pt", widths=[4, 8, 16], blocks=1)
    backbone = residual.Backbone(widths=(4, 8), blocks=1, pretrained=True, frozen=0)
    levels = backbone.build()
    tags = backbone.load_pretrained(levels, path=tmp_path / "resnet.pt")
    expected = trained.trunk[:3].state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in levels.state_dict().items())
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(levels.eval()(x), trained.trunk[:3](x))  # the same up to memory layout
    assert tags == {"pretrained_from": str(tmp_path / "resnet.pt"), "pretrained_run_id": "unknown",
                    "pretrained_sha256": hashlib.sha256((tmp_path / "resnet.pt").read_bytes()).hexdigest(),
                    "pretrained_stages": "2", "pretrained_classifier": "false"}  # not asked for, nor the whole trunk


def test_a_layer_scoring_background_and_the_classes_starts_as_the_trained_resnets_classifier(tmp_path):
    trained = save_resnet(tmp_path / "resnet.pt", widths=[4, 8], blocks=1)
    backbone = residual.Backbone(widths=(4, 8), blocks=1, pretrained=True, frozen=0)
    dense, conv = torch.nn.Linear(8, 11), torch.nn.Conv2d(8, 11, 1)  # R-CNN's classifier, FCN's score layer
    for scores in (dense, conv):
        tags = backbone.load_pretrained(backbone.build(), scores, tmp_path / "resnet.pt")
        assert tags["pretrained_classifier"] == "true"
    features = torch.rand(3, 8)
    for logits in (dense(features), conv(features[:, :, None, None])[:, :, 0, 0]):
        torch.testing.assert_close(logits[:, 1:], trained.head[2](features))
        assert torch.equal(logits[:, 0], torch.zeros(3))  # background starts at zero
    short = residual.Backbone(widths=(4,), blocks=1, pretrained=True, frozen=0)  # not the features resnet scored
    assert short.load_pretrained(short.build(), dense, tmp_path / "resnet.pt")["pretrained_classifier"] == "false"


def test_a_pretrained_backbones_warm_start_loads_the_resnet_when_called_and_a_random_one_has_none(tmp_path,
                                                                                                  monkeypatch):
    monkeypatch.chdir(tmp_path)  # the checkpoint where `train@resnet` writes it
    residual.CHECKPOINT.parent.mkdir(parents=True)
    trained = save_resnet(residual.CHECKPOINT, widths=[4, 8], blocks=1)
    backbone = residual.Backbone(widths=(4, 8), blocks=1, pretrained=True, frozen=0)
    levels, dense = backbone.build(), torch.nn.Linear(8, 11)
    warm_start = backbone.warm_start(levels, dense)
    assert not torch.equal(dense.weight[1:], trained.head[2].weight)  # nothing loaded yet
    assert warm_start()["pretrained_from"] == str(residual.CHECKPOINT)
    assert torch.equal(dense.weight[1:], trained.head[2].weight)
    assert backbone.model_copy(update={"pretrained": False}).warm_start(levels, dense) is None


@pytest.mark.parametrize("widths, blocks", [((4, 16), 1), ((4, 8), 2)])
def test_a_backbone_that_is_not_the_start_of_the_trained_resnet_is_a_clear_error(tmp_path, widths, blocks):
    save_resnet(tmp_path / "resnet.pt", widths=[4, 8, 16], blocks=1)
    backbone = residual.Backbone(widths=widths, blocks=blocks, pretrained=True, frozen=0)
    with pytest.raises(ValueError, match=r"is not the start of the resnet trained in .*pretrained: false"):
        backbone.load_pretrained(backbone.build(), path=tmp_path / "resnet.pt")
    with pytest.raises(FileNotFoundError, match=r"dvc repro train@resnet"):
        backbone.load_pretrained(backbone.build(), path=tmp_path / "missing.pt")
    (tmp_path / "torn.pt").write_bytes((tmp_path / "resnet.pt").read_bytes()[:100])
    with pytest.raises(stages.CheckpointError, match=r"torn.pt cannot be read .*dvc checkout models/resnet"):
        backbone.load_pretrained(backbone.build(), path=tmp_path / "torn.pt")


def test_frozen_levels_keep_their_trained_weights_and_statistics_while_the_rest_trains(tmp_path):
    save_resnet(tmp_path / "resnet.pt", widths=[4, 8, 16], blocks=1)
    backbone = residual.Backbone(widths=(4, 8, 16), blocks=1, pretrained=True, frozen=2)
    levels = backbone.build()
    backbone.load_pretrained(levels, path=tmp_path / "resnet.pt")
    assert not any(p.requires_grad for p in levels[:2].parameters())
    assert all(p.requires_grad for p in levels[2:].parameters())
    before = copy.deepcopy(levels.state_dict())
    optimizer = torch.optim.SGD(levels.parameters(), lr=0.1)  # as the trainer: every parameter in the optimizer
    levels.train()
    levels(torch.rand(4, 1, 28, 28)).square().mean().backward()
    optimizer.step()
    changed = {key for key, value in levels.state_dict().items() if not torch.equal(value, before[key])}
    assert {key.split(".")[0] for key in changed} == {"2", "3"}  # weights and batch-norm statistics
    assert any(key.endswith("running_mean") for key in changed)


def trained_statistics(norm: torch.nn.Module) -> None:
    """Give a (frozen) batch norm an affine and running statistics far from its identity start, as training would."""
    with torch.no_grad():
        for tensor in (norm.weight, norm.bias, norm.running_mean):
            tensor.normal_()
        norm.running_var.uniform_(0.5, 2)


def test_frozen_batch_norm_normalises_as_batch_norm_does_at_evaluation_in_both_modes():
    norm = torch.nn.BatchNorm2d(3)
    trained_statistics(norm)
    frozen = residual.FrozenBatchNorm2d(3)
    frozen.load_state_dict(norm.state_dict())  # the same keys: a trained resnet loads into it
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(frozen.train()(x), norm.eval()(x))


@pytest.mark.parametrize("frozen, pretrained, message", [(4, True, "more levels than the backbone's 3"),
                                                         (1, False, "randomly initialised levels")])
def test_freezing_levels_that_do_not_exist_or_were_never_trained_is_a_clear_error(frozen, pretrained, message):
    with pytest.raises(ValueError, match=message):
        residual.Backbone(widths=(4, 8), blocks=1, pretrained=pretrained, frozen=frozen)


def test_folding_batch_norm_into_the_convs_keeps_a_trunks_outputs_and_leaves_no_norm():
    trunk = residual.trunk((4, 8), blocks=1, frozen=1)  # a frozen stem: FrozenBatchNorm2d folds as well
    for norm in (m for m in trunk.modules() if hasattr(m, "running_var")):
        trained_statistics(norm)
    trunk.eval()
    x = torch.rand(2, 1, 12, 12)
    folded = residual.fold_batch_norm(trunk)
    assert not any(hasattr(m, "running_var") for m in folded.modules())
    assert sum(hasattr(m, "running_var") for m in trunk.modules()) == 7  # a copy: the trunk keeps every norm
    assert sum(isinstance(m, torch.nn.Conv2d) for m in folded.modules()) == 7  # the stem, 3 per block: none lost
    torch.testing.assert_close(folded(x), trunk(x), rtol=1e-4, atol=1e-5)


def test_a_residual_block_with_a_zero_residual_passes_its_input_through():
    block = residual.ResidualBlock(4, 4, stride=1).eval()
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
