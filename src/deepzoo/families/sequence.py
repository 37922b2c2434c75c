"""What the character models of folk tunes (`rnn`, `lstm`) share: Embedding → recurrent core → head.

A family only supplies the core: a module mapping (x [B, T, embedding_dim], state or None) to
(outputs [B, T, hidden_size], state), the interface of `torch.nn.LSTM(batch_first=True)`.

Training is truncated backpropagation through time: the training stream is cut into sequences of
`carried_windows` windows of `seq_length` characters. Each sequence starts from a zero state, and the state
flows on from one window into the next while gradients stop at the window's edge, with an optimizer step
after every window (Williams & Peng 1990; char-rnn's stateful batches). So the model learns to use more
context than one window, as it must when it reads a whole tune. Evaluation is exact: every validation tune
from its start token to its end token, so no character is predicted from a truncated context.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from deepzoo.config import Section, TrainConfig
from deepzoo.data import tunes
from deepzoo.engine.stages import Context, Variant
from deepzoo.engine.trainer import Batch, Trainable
from deepzoo.layers import Dense
from deepzoo.metrics import metre
from deepzoo.metrics import tunes as tune_metrics

EXPERIMENT = "folk-tunes"
LN2 = math.log(2)
GENERATED = "generated.json"  # [[tune text, ended by the model], ...]: what generate hands to evaluate
MIDI_TUNES = 5  # tunes written as MIDI too: enough to listen to, while tunes.abc holds all of them


class ModelConfig(Section):
    embedding_dim: int = Field(ge=1)  # learned vector per character
    hidden_size: int = Field(ge=1)
    dropout: float = Field(ge=0, lt=1)  # before the output head


class SequenceTrainConfig(TrainConfig):
    seq_length: int = Field(ge=2)  # characters per window: how far back gradients flow (truncated BPTT)
    carried_windows: int = Field(ge=1)  # consecutive windows the state flows through; 1 = each from zero
    clip_grad_norm: float | None = Field(gt=0)  # recurrent nets' gradients explode: every recipe says how it clips


class EvaluateConfig(Section):
    batch_size: int = Field(ge=1)  # validation tunes per batch


class GenerateConfig(Section):
    count: int = Field(ge=1)  # tunes to sample
    temperature: float = Field(gt=0)  # < 1 sharpens the distribution: fewer errors, less variety
    max_length: int = Field(ge=10)  # characters per tune, if the end-of-tune token never comes
    metre: bool  # draw only characters that keep every bar the length M: and L: give it (metrics/metre.py)
    seed: int


class Config(Section):
    """A sequence family's params; a family overrides `model` with its own `ModelConfig` subclass."""

    model: ModelConfig
    train: SequenceTrainConfig
    evaluate: EvaluateConfig
    generate: GenerateConfig


class CharModel(Trainable):
    """Next-character logits at every step: ids [B, T] → logits [B, T, vocab]."""

    def __init__(self, core: nn.Module, cfg: ModelConfig, vocab_size: int, window: int):
        super().__init__()
        self.window = window  # training's truncation: gradients flow back this many characters
        self.embedding = nn.Embedding(vocab_size, cfg.embedding_dim)
        self.core = core
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = Dense(cfg.hidden_size, vocab_size)  # ŷ_t = W_hyᵀ h_t (+ b): the same head at every step

    def step(self, ids: Tensor, state: object = None) -> tuple[Tensor, object]:
        """Logits and the core's state after `ids`: continue from `state` to sample one character at a time."""
        outputs, state = self.core(self.embedding(ids), state)
        return self.head(self.dropout(outputs)), state

    def forward(self, ids: Tensor) -> Tensor:
        return self.step(ids)[0]

    def prepare(self, batch: Batch) -> Batch:
        (ids,) = batch  # [B, carried_windows · seq_length + 1]: sequences of consecutive windows
        return ids[:, :-1], ids[:, 1:]  # each input character's target is the next one

    def nats(self, inputs: Tensor, targets: Tensor, state: object = None) -> tuple[Tensor, object]:
        """Mean cross-entropy of every step's next character, continuing from `state`; and the state after."""
        logits, state = self.step(inputs, state)
        # A loss at every step, averaged: [B, T, vocab] → [B·T, vocab] against [B·T].
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten()), state

    def loss(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        nats, _ = self.nats(*batch)
        return nats, {"bits_per_char": nats / LN2}

    def training_losses(self, batch: Batch) -> Iterator[tuple[str, Tensor, dict[str, Tensor]]]:
        """One loss per window of the batch's sequences, the trainer stepping after each; the state goes on into
        the next window, cut off from the graph of the one before (truncated BPTT)."""
        inputs, targets = batch
        state, total = None, 0.0
        for count, (x, y) in enumerate(zip(inputs.split(self.window, 1), targets.split(self.window, 1),
                                           strict=True), 1):
            nats, state = self.nats(x, y, state)
            total = total + nats.detach()
            # "loss" here overrides the trainer's record of this step's loss: the batch reports all its windows.
            yield "model", nats, {"loss": total / count, "bits_per_char": total / count / LN2}
            state = tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()


def sequences(ids: Tensor, seq_length: int, carried_windows: int = 1) -> Tensor:
    """[T] → [N, carried_windows · seq_length + 1]: consecutive sequences overlapping by one id, so each id is a
    target once (the last incomplete sequence is left out)."""
    length = carried_windows * seq_length
    if len(ids) < length + 1:
        raise ValueError(f"{len(ids)} characters are fewer than one sequence of train.carried_windows × "
                         f"train.seq_length + 1 = {length + 1}; lower them or prepare more tunes")
    return ids.unfold(0, length + 1, length)


def single_variant(name: str, cfg: Config, core: nn.Module) -> dict[str, Variant]:
    vocab = tunes.load_vocab()
    t = cfg.train
    data = {split: (sequences(tunes.load(split), t.seq_length, t.carried_windows),) for split in ("train", "val")}
    return {name: Variant(CharModel(core, cfg.model, len(vocab), t.seq_length), data)}


@torch.no_grad()
def tune_nats(model: CharModel, stream: Tensor, batch_size: int, device: torch.device) -> list[tuple[float, int]]:
    """(summed nats, predicted tokens) of each tune in `stream`, read whole from its start token."""
    model.eval()
    starts = (stream == tunes.Vocabulary.start).nonzero().flatten().tolist()
    pieces = torch.tensor_split(stream, starts[1:])
    order = sorted(range(len(pieces)), key=lambda i: len(pieces[i]))  # similar lengths share a batch
    results: dict[int, tuple[float, int]] = {}
    for first in range(0, len(order), batch_size):
        batch = order[first : first + batch_size]
        # Right padding: outputs before the padding do not depend on it, and its targets are ignored.
        padded = nn.utils.rnn.pad_sequence([pieces[i] for i in batch], batch_first=True,
                                           padding_value=-100).to(device)  # [B, longest]
        inputs, targets = padded[:, :-1].clamp(min=0), padded[:, 1:]
        logits = model(inputs).transpose(1, 2)  # [B, vocab, longest - 1], the class axis where F expects it
        nats = F.cross_entropy(logits, targets, ignore_index=-100, reduction="none").sum(1)  # [B]
        results |= zip(batch, zip(nats.tolist(), (targets != -100).sum(1).tolist(), strict=True), strict=True)
    return [results[i] for i in range(len(pieces))]


def evaluate(ctx: Context) -> dict[str, float]:
    """Bits per character of the validation tunes, overall and per tune (`val_tunes.csv`); then the tunes the
    generate stage wrote: how many are valid music, in metre and new (`tunes.csv`), beside what the held-out human
    tunes score on the same measures (computed once, by `prepare_tunes`)."""
    (variant,) = ctx.variants.values()
    per_tune = tune_nats(variant.model, tunes.load("val"), ctx.cfg.evaluate.batch_size, ctx.device)
    with (ctx.out / "val_tunes.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["tune", "title", "chars", "bits_per_char"])
        for i, (text, (nats, count)) in enumerate(zip(tunes.load_tunes("val"), per_tune, strict=True), 1):
            writer.writerow([i, tunes.parse(text).headers.get("T", ""), len(text), f"{nats / count / LN2:.4f}"])
    nats = sum(n for n, _ in per_tune) / sum(c for _, c in per_tune)
    return {"val_loss": round(nats, 4), "val_bits_per_char": round(nats / LN2, 4),
            "val_perplexity": round(math.exp(nats), 4), **measure_generated(ctx.samples, ctx.out),
            **tunes.load_reference()}


def measure_generated(samples: Path, out: Path) -> dict[str, float]:
    """Validity, metre and novelty of the tunes that generate wrote (`samples/generated.json`), with 95 % intervals
    for the fractions that compare families, and a per-tune report in `out/tunes.csv`."""
    generated = samples / GENERATED
    if not generated.is_file():
        raise FileNotFoundError(f"{generated} not found: run the generate stage first (dvc repro)")
    texts, ended = zip(*json.loads(generated.read_text()), strict=True)
    checks = tune_metrics.check_all(texts)
    novelty = tune_metrics.Novelty(tunes.load_tunes("train"))
    novel = [novelty.is_novel(text) for text in texts]
    write_report(out / "tunes.csv", texts, checks, novel)
    return {
        **tune_metrics.fraction("valid_tune_fraction", (c.valid for c in checks)),
        **tune_metrics.fraction("metre_correct_fraction", (c.metre_correct for c in checks)),
        "abc2midi_warning_fraction": tune_metrics.mean(bool(c.warnings) for c in checks),
        "novel_tune_fraction": tune_metrics.mean(novel),
        "ended_tune_fraction": tune_metrics.mean(ended),
        "mean_tune_chars": tune_metrics.mean(len(text) for text in texts),
    }


@torch.no_grad()
def sample(model: CharModel, vocab: tunes.Vocabulary, primes: list[str], cfg: GenerateConfig,
           generator: torch.Generator) -> list[tuple[str, bool]]:
    """Tunes sampled side by side, one from <start> + each prime; each tune's text and whether the model ended
    it itself (else it stopped at `max_length` characters). With `cfg.metre`, the characters that would break a
    bar's length (`metrics.metre`) get probability 0, and the others share theirs."""
    model.eval()
    device = next(model.parameters()).device
    # Each prime replaces the draws of its first steps, so that primes of any length share one batch.
    forced = nn.utils.rnn.pad_sequence([torch.tensor(vocab.encode(prime)) for prime in primes], batch_first=True,
                                       padding_value=-1)  # [B, longest prime]
    ids, state = torch.full((len(primes), 1), vocab.start), None  # [B, 1]: each tune's latest character
    ended, drawn = torch.zeros(len(primes), dtype=torch.bool), []
    bars, tokens = [metre.Bar()] * len(primes), tuple(vocab.tokens)  # where each tune stands in its bar
    for t in range(cfg.max_length):
        logits, state = model.step(ids.to(device), state)
        # Sampling on the CPU with one seeded generator makes the tunes the same on any device.
        logits = logits[:, -1].float().cpu() / cfg.temperature
        if cfg.metre:
            keeps = torch.tensor([metre.allowed(bar, tokens) for bar in bars])  # [B, vocab]
            logits = logits.masked_fill(~keeps, float("-inf"))
        ids = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
        if t < forced.shape[1]:
            ids = torch.where(forced[:, t, None] >= 0, forced[:, t, None], ids)
        if cfg.metre:
            bars = [metre.step(bar, tokens[i])[0] for bar, i in zip(bars, ids[:, 0].tolist(), strict=True)]
        drawn.append(ids)
        ended |= ids[:, 0] == vocab.end
        if ended.all():
            break
    samples = []
    for row in torch.cat(drawn, 1).tolist():
        end = row.index(vocab.end) if vocab.end in row else len(row)
        samples.append((vocab.decode(row[:end]), end < len(row)))
    return samples


def generate(ctx: Context) -> None:
    """Sample tunes into `tunes.abc` (a tune book) and `generated.json` for the evaluation: each tune with whether
    the model ended it itself; the first `MIDI_TUNES` also as MIDI, to listen to."""
    (variant,) = ctx.variants.values()
    cfg: GenerateConfig = ctx.cfg.generate
    vocab, generator = tunes.load_vocab(), torch.Generator().manual_seed(cfg.seed)
    # Prime with the start of a tune: its first header line, numbered so that tunes.abc plays as a tune book.
    samples = sample(variant.model, vocab, [f"X:{i}\n" for i in range(1, cfg.count + 1)], cfg, generator)
    (ctx.out / "tunes.abc").write_text("\n\n".join(text for text, _ in samples) + "\n")
    (ctx.out / GENERATED).write_text(json.dumps(samples, indent=1) + "\n")
    for i, (text, _) in enumerate(samples[:MIDI_TUNES], 1):
        tune_metrics.abc2midi(text, ctx.out / f"tune_{i:02d}.mid")  # a tune abc2midi rejects gets no MIDI
    render_wav(ctx.out / "tune_01.mid")


def write_report(path: Path, texts: list[str], checks: list[tune_metrics.TuneCheck], novel: list[bool]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["tune", "chars", "valid", "metre_correct", "novel", "warnings", "problems"])
        for i, (text, check, new) in enumerate(zip(texts, checks, novel, strict=True), 1):
            writer.writerow([i, len(text), check.valid, check.metre_correct, new, len(check.warnings),
                             "; ".join(check.problems)])


def render_wav(midi: Path) -> None:
    """One tune as audio, when TiMidity++ is installed (one is enough to listen to; WAVs are large)."""
    if shutil.which("timidity") is None or not midi.is_file():
        return
    done = subprocess.run(["timidity", "-Ow", "--output-mono", "-s", "22050", "-o", str(midi.with_suffix(".wav")),
                           str(midi)], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        print(f"note: timidity could not render {midi.name} ({done.stderr.strip()[-200:]}); no WAV written")
