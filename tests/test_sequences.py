"""The sequence families: the recurrent cell, truncated BPTT windows, clipping, exact evaluation, sampling,
and the validity and novelty measures of generated tunes."""

import json
import shutil

import pytest
import torch
from configs import shipped
from test_metre import read
from torch import nn

from deepzoo.config import TrainConfig
from deepzoo.data import tunes
from deepzoo.engine.stages import Context, Variant
from deepzoo.engine.trainer import fit
from deepzoo.families import lstm, rnn, sequence
from deepzoo.layers import Dense, Recurrent
from deepzoo.metrics import tunes as tune_metrics

CPU = torch.device("cpu")
GOOD = "X:1\nT:Good\nM:C|\nL:1/8\nK:D Major\ndAFA DFAd|fdcd FAdf|gfge fefd|(3efe dc d4:|!\n"
needs_abc2midi = pytest.mark.skipif(shutil.which("abc2midi") is None, reason="abc2midi (Debian abcmidi) not installed")


def tiny_config(core: str = "rnn", hidden: int = 16) -> sequence.ModelConfig:
    """The shipped smoke-scale model section (embedding_dim 8) with `hidden` units."""
    return shipped(core, {"rnn": rnn.Config, "lstm": lstm.Config}[core], model={"hidden_size": hidden}).model


def tiny_model(vocab_size: int, core: str = "rnn", hidden: int = 16, window: int = 8) -> sequence.CharModel:
    cfg = tiny_config(core, hidden)
    cores = {"rnn": lambda: Recurrent(8, hidden), "lstm": lambda: nn.LSTM(8, hidden, batch_first=True)}
    return sequence.CharModel(cores[core](), cfg, vocab_size, window)


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_cell_written_out_equals_torch_rnn_with_a_linear_head(activation):
    torch.manual_seed(0)
    ours, head = Recurrent(5, 7, activation), Dense(7, 3)
    reference, linear = nn.RNN(5, 7, nonlinearity=activation, batch_first=True), nn.Linear(7, 3)
    with torch.no_grad():  # torch stores weights as [out, in]: W_xh = weight_ihᵀ, W_hh = weight_hhᵀ
        ours.cell.W_xh.copy_(reference.weight_ih_l0.T)
        ours.cell.W_hh.copy_(reference.weight_hh_l0.T)
        ours.cell.b.copy_(reference.bias_ih_l0 + reference.bias_hh_l0)
        head.W.copy_(linear.weight.T)
        head.b.copy_(linear.bias)
    x, h0 = torch.randn(4, 11, 5), torch.randn(4, 7)
    states, last = ours(x, h0)
    expected_states, expected_last = reference(x, h0.unsqueeze(0))
    torch.testing.assert_close(states, expected_states, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last, expected_last[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(head(states), linear(expected_states), atol=1e-5, rtol=1e-5)


def test_identity_initialisation_starts_with_w_hh_identity_and_zero_bias():
    cell = Recurrent(4, 6, "relu", identity_init=True).cell
    assert torch.equal(cell.W_hh, torch.eye(6)) and not cell.b.any()
    # With no input, a ReLU cell initialised so carries a non-negative state forward unchanged.
    h = torch.rand(2, 6)
    assert torch.equal(cell.step(torch.zeros(2, 6), h), h)


def test_sequences_overlap_by_one_so_every_id_is_a_target_once():
    ids = torch.arange(23)
    w = sequence.sequences(ids, seq_length=5)  # [4, 6]
    assert w.shape == (4, 6)
    assert torch.equal(w[:, 1:].flatten(), ids[1:21])  # targets: each once, in order
    assert torch.equal(w[1:, 0], w[:-1, -1])
    carried = sequence.sequences(ids, seq_length=5, carried_windows=2)  # [2, 11]: two windows each
    assert carried.shape == (2, 11) and torch.equal(carried[:, 1:].flatten(), ids[1:21])
    with pytest.raises(ValueError, match="train.seq_length"):
        sequence.sequences(ids[:5], seq_length=5)


@pytest.mark.parametrize("core", ["rnn", "lstm"])
def test_state_flows_from_window_to_window_while_gradients_stop_at_each_edge(core):
    model = tiny_model(10, core, window=4).eval()  # no dropout: the passes below must agree
    batch = model.prepare((torch.randint(0, 10, (3, 13)),))  # three windows of 4
    losses = []
    for group, loss, metrics in model.training_losses(batch):
        loss.backward()  # without retain_graph: fails if the graph reached back into the window before
        losses.append(loss.detach())
    assert group == "model" and len(losses) == 3
    whole, _ = model.loss(batch)  # one pass over all 12 steps: the state flows the same way
    torch.testing.assert_close(torch.stack(losses).mean(), whole)
    torch.testing.assert_close(metrics["loss"], whole)  # the batch reports all its windows
    torch.testing.assert_close(metrics["bits_per_char"], whole / torch.log(torch.tensor(2.0)))


def test_loss_is_cross_entropy_in_nats_with_bits_per_char_alongside():
    model = tiny_model(10).eval()  # no dropout: the two forward passes below must agree
    batch = model.prepare((torch.randint(0, 10, (3, 9)),))
    assert batch[0].shape == batch[1].shape == (3, 8)
    nats, metrics = model.loss(batch)
    logits = model(batch[0])
    torch.testing.assert_close(nats, nn.functional.cross_entropy(logits.reshape(-1, 10), batch[1].reshape(-1)))
    torch.testing.assert_close(metrics["bits_per_char"], nats / torch.log(torch.tensor(2.0)))


def test_clipping_bounds_the_gradient_norm_of_each_step():
    """An RNN whose W_hh grows the state explodes its gradients; clipping caps every update."""
    torch.manual_seed(0)
    model = sequence.CharModel(Recurrent(8, 16, "relu", identity_init=True), tiny_config(), 12, window=40)
    with torch.no_grad():
        model.core.cell.W_hh.mul_(1.3)  # the state grows 1.3× per step: gradients through 40 steps explode
    before = [p.detach().clone() for p in model.parameters()]
    # Plain SGD with lr 1: the update equals the (clipped) gradient.
    cfg = TrainConfig(epochs=1, batch_size=4, optimizer="sgd", lr=1.0, momentum=0.0, clip_grad_norm=0.5,
                      max_batches=1, schedule="none", patience=None)
    result = fit(model, (torch.randint(0, 12, (4, 41)),), None, cfg, CPU, torch.Generator().manual_seed(0))
    update = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters(), strict=True)])
    assert result.history[0]["train/grad_norm_max"] > 100  # the norm before clipping, as recorded
    assert update.norm().item() == pytest.approx(0.5, rel=1e-4)


def test_evaluation_reads_each_tune_whole_so_batching_does_not_change_it():
    torch.manual_seed(0)
    model = tiny_model(9, "lstm")
    vocab = tunes.Vocabulary.of(["abc", "de|f"])
    stream = vocab.encode_tunes(["abc|", "de|fab|c", "f", "cab|cab|cab|"])
    one_by_one = sequence.tune_nats(model, stream, 1, CPU)
    batched = sequence.tune_nats(model, stream, 3, CPU)  # padded, and in another order
    assert [count for _, count in batched] == [5, 9, 2, 13]  # each tune's characters and its end token
    for (nats, count), (expected_nats, expected_count) in zip(batched, one_by_one, strict=True):
        assert count == expected_count and nats == pytest.approx(expected_nats, rel=1e-5)
    # By hand, each tune from a fresh state: <start> a b c | → predict a b c | <end>.
    pieces = torch.tensor_split(stream, [6, 16, 19])
    by_hand = [nn.functional.cross_entropy(model(p[None, :-1])[0], p[1:], reduction="sum").item() for p in pieces]
    assert [nats for nats, _ in batched] == pytest.approx(by_hand, rel=1e-5)


def test_sampling_is_deterministic_for_a_seed_and_keeps_each_prime():
    torch.manual_seed(0)
    vocab = tunes.Vocabulary.of([GOOD])
    model = tiny_model(len(vocab))
    cfg = shipped("rnn", rnn.Config, generate={"temperature": 1.0, "max_length": 80}).generate
    primes = ["X:1\n", "X:11\n", "X:1\nT:"]  # of different lengths, in one batch
    draw = lambda seed: sequence.sample(model, vocab, primes, cfg, torch.Generator().manual_seed(seed))  # noqa: E731
    samples = draw(3)
    for prime, (text, _) in zip(primes, samples, strict=True):
        assert text.startswith(prime) and len(text) <= 80
    assert draw(3) == samples
    assert draw(4) != samples


def test_metre_aware_sampling_keeps_every_bar_its_length():
    """An untrained model that writes notes and bar lines at random: masked, it writes only whole bars (as the
    bar reader counts them); unmasked, bars of any length."""
    torch.manual_seed(0)
    vocab = tunes.Vocabulary.of([GOOD])
    model = tiny_model(len(vocab))
    with torch.no_grad():
        model.head.b[vocab.encode("dAF4 |")] += 4
    primes = ["X:1\nM:C|\nL:1/8\nK:D\n"] * 8  # the header, so that the body has a bar length to keep

    def bodies(metre: bool) -> list[str]:
        cfg = shipped("rnn", rnn.Config, generate={"temperature": 1.0, "max_length": 150, "metre": metre}).generate
        return [text for text, _ in sequence.sample(model, vocab, primes, cfg, torch.Generator().manual_seed(0))]

    masked, plain = bodies(True), bodies(False)
    assert all(read(text)[1] == [] for text in masked)
    assert sum(text.count("|") for text in masked) >= 5 * len(masked)  # bars were written, not only avoided
    assert sum(read(text)[1] != [] for text in plain) >= 4


def test_generate_writes_every_tune_to_the_book_and_only_the_first_few_as_midi(tmp_path, monkeypatch):
    monkeypatch.setattr(tunes, "load_vocab", lambda: tunes.Vocabulary.of([GOOD]))
    monkeypatch.setattr(sequence, "sample", lambda model, vocab, primes, cfg, generator: [
        (GOOD.replace("X:1\n", prime).rstrip(), True) for prime in primes])
    count = sequence.MIDI_TUNES + 3
    cfg = shipped("rnn", rnn.Config, generate={"count": count})
    ctx = Context({"rnn": Variant(None, {})}, cfg, CPU, tmp_path, seed=0, samples=tmp_path)
    monkeypatch.setattr(tune_metrics, "abc2midi", lambda text, midi: midi.write_text(text))  # no abc2midi needed
    monkeypatch.setattr(sequence, "render_wav", lambda midi: None)
    rnn.generate(ctx)
    midi = [f"tune_{i:02d}.mid" for i in range(1, sequence.MIDI_TUNES + 1)]
    assert sorted(p.name for p in tmp_path.glob("*.mid")) == midi
    assert (tmp_path / "tunes.abc").read_text().count("X:") == count
    assert len(json.loads((tmp_path / sequence.GENERATED).read_text())) == count


@needs_abc2midi
def test_generate_then_evaluate_is_reproducible_and_measures_the_generated_tunes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = tmp_path / "raw.abc"
    raw.write_text("\n\n".join(GOOD.replace("X:1", f"X:{i}") for i in range(1, 5)))
    tunes.prepare(shipped("tunes", tunes.Params, val_fraction=0.25, limit=None), seed=0, raw=raw)
    cfg = shipped("rnn", rnn.Config, train={"seq_length": 20}, generate={"count": 3, "max_length": 120})
    torch.manual_seed(0)
    variants = rnn.variants(cfg)
    runs = []
    for run in ("first", "second"):
        ctx = Context(variants, cfg, CPU, tmp_path / run / "samples", seed=0, samples=tmp_path / run / "samples")
        ctx.out.mkdir(parents=True)
        rnn.generate(ctx)
        ctx.out = tmp_path / run / "evaluation"
        ctx.out.mkdir()
        metrics = rnn.evaluate(ctx)
        runs.append((metrics, {p.name: p.read_bytes() for folder in (ctx.samples, ctx.out) for p in folder.iterdir()}))
    assert runs[0] == runs[1]  # the same metrics and byte-identical tunes.abc, tunes.csv and MIDI files
    metrics, files = runs[0]
    assert files["tunes.abc"].decode().count("X:") == 3 and files["tunes.csv"].decode().count("\n") == 4
    assert {"valid_tune_fraction", "novel_tune_fraction", "abc2midi_warning_fraction", "metre_correct_fraction",
            "valid_tune_fraction_low", "metre_correct_fraction_high"} <= set(metrics)
    # The held-out copy of GOOD is valid and in metre, measured once.
    assert metrics["reference_valid_tune_fraction"] == metrics["reference_metre_correct_fraction"] == 1.0
    reference = json.loads((tmp_path / "data/processed/tunes/reference.json").read_text())
    assert reference["reference_valid_tune_fraction"] == reference["reference_metre_correct_fraction"] == 1.0


def test_family_configs_extend_the_shared_one_with_the_four_stage_sections():
    rnn_cfg = shipped("rnn", rnn.Config, model={"activation": "relu", "identity_init": True})
    lstm_cfg = shipped("lstm", lstm.Config, model={"layers": 3, "dropout": 0.1})
    assert rnn_cfg.model.activation == "relu" and lstm_cfg.model.layers == 3
    assert set(rnn.Config.model_fields) == set(lstm.Config.model_fields) == {"model", "train", "evaluate", "generate"}


@pytest.mark.parametrize("body, bars", [
    ("dAFA DFAd|fdcd FAdf|gfge fefd|(3efe dc d2:|", 4),
    ("|:GAB c2d|e2f g3:|", 2),  # the opening |: starts a bar and closes none
    ('"G"GAB "C"c2d|!trill!e2f g3||', 2),  # chord symbols and decorations are not bar lines
    ("[1 GAB c2d :|[2 GAB c3|]", 2),
    ("abc def", 0),
])
def test_count_bars(body, bars):
    assert tune_metrics.count_bars(body) == bars


@needs_abc2midi
def test_validity_checker_accepts_good_tunes(tmp_path):
    check = tune_metrics.check(GOOD, tmp_path / "good.mid")
    assert check.valid, check.problems
    assert (tmp_path / "good.mid").stat().st_size > 0
    repeated = "X:7\nT:Two parts\nM:6/8\nL:1/8\nK:G\n|:GAB c2d|e2f g3|GAB c2d|B2A G3:|\n|:d2e f2g|a3 g3|d2e f2g|a3 g3:|"
    assert tune_metrics.check(repeated, tmp_path / "repeated.mid").valid


@needs_abc2midi
@pytest.mark.parametrize("tune, problem", [
    (GOOD.replace("M:C|\n", ""), "no M: header"),
    (GOOD.replace("L:1/8\n", ""), "no L: header"),
    ("X:1\nT:Short\nM:C|\nL:1/8\nK:D\ndAFA DFAd|fdcd FAdf|", "2 bars"),
    ("X:1\nT:Header only\nM:C|\nL:1/8\nK:D\n", "no body"),
    (GOOD.replace("fdcd", "fd}cd"), "Error"),  # abc2midi: } without matching {
    (GOOD.replace("gfge", "g>>>>fge"), "Error"),  # abc2midi: too many >'s
])
def test_validity_checker_rejects_bad_tunes(tmp_path, tune, problem):
    check = tune_metrics.check(tune, tmp_path / "bad.mid")
    assert not check.valid
    assert any(problem in p for p in check.problems), check.problems


@needs_abc2midi
def test_abc2midi_warnings_are_counted_apart_from_errors(tmp_path):
    one_beat_long = GOOD.replace("fdcd FAdf|", "fdcd FAdf f2|")
    check = tune_metrics.check(one_beat_long, tmp_path / "long.mid")
    assert check.valid and check.warnings


@needs_abc2midi
@pytest.mark.parametrize("tune, metre_correct", [
    (GOOD, True),
    (GOOD.replace("d4:|", "d2:|"), False),  # a short closing bar, and no pickup for the repeat to complete it
    # A pickup bar, and a last bar shortened by as much: the repeat plays them as one whole bar.
    ("X:2\nT:Pickup\nM:6/8\nL:1/8\nK:G\nD|GAB c2d|e2f g3|GAB c2d|B2A G2:|", True),
    (GOOD.replace("gfge", "gfg"), False),  # a bar one unit short
    (GOOD.replace("fdcd FAdf|", "fdcd FAdf f2|"), False),  # a bar two units long
    ("X:2\nT:Pickup\nM:6/8\nL:1/8\nK:G\nD|GAB c2d|e2f g3|GAB c2d|B2A G3:|", False),  # the repeat adds the pickup
    (GOOD.replace("M:C|\n", ""), False),  # not valid (no M: header), so not in metre either
])
def test_metre_is_correct_when_abc2midi_finds_no_bar_of_the_wrong_length(tmp_path, tune, metre_correct):
    assert tune_metrics.check(tune, tmp_path / "tune.mid").metre_correct == metre_correct


@pytest.mark.parametrize("successes, n, low, high", [
    # Newcombe (1998), "Two-sided confidence intervals for the single proportion": its score-method examples.
    (81, 263, 0.2553, 0.3662),
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0, 0.1611),
    (1, 29, 0.0061, 0.1718),
    (29, 29, 0.8830, 1.0),
])
def test_wilson_interval_on_published_numbers(successes, n, low, high):
    assert tune_metrics.wilson(successes, n) == pytest.approx((low, high), abs=5e-5)
    assert tune_metrics.fraction("valid", [True] * successes + [False] * (n - successes)) == {
        "valid": round(successes / n, 4), "valid_low": low, "valid_high": high}


def test_novelty_flags_a_copied_phrase_but_not_shared_short_figures():
    training = [GOOD, "X:2\nT:Other\nM:6/8\nL:1/8\nK:G\nGAB c2d|e2f g3|GAB c2d|B2A G3:|"]
    novelty = tune_metrics.Novelty(training, chars=30)
    copied = "X:9\nT:Copy\nM:C|\nL:1/8\nK:D\nABAB|dAFA DFAd|fdcd FAdf|gfge fefd|\n"  # 30+ chars of GOOD's body
    fresh = "X:9\nT:New\nM:C|\nL:1/8\nK:D\nABcd efga|bagf edcB|dAFA DFAG|ABcd e4|\n"  # shares only "dAFA DFA"
    assert not novelty.is_novel(copied)
    assert novelty.is_novel(fresh)
    assert not novelty.is_novel(GOOD)  # headers differ or not, the body is what counts
