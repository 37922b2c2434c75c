"""Irish folk tunes in ABC notation: split the file into tunes, keep the complete ones, encode characters.

Output `data/processed/tunes/`:
    vocab.json                       id → token: ids 0 and 1 are the start/end-of-tune tokens, then characters
    train.pt, val.pt                 int64 [T]: the split's tunes one after another, each <start> chars <end>;
                                     training's also transposed to the keys `transpositions` says
    train_tunes.abc, val_tunes.abc   the split's tunes as text, blank-line separated (for the novelty measure)
    reference.json                   what the validity and novelty measures score on the held-out human tunes
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import Field

from deepzoo.config import Section
from deepzoo.storage import atomic_path

RAW = Path("data/raw/irish-folk-tunes/irish.abc")
OUTPUT = Path("data/processed/tunes")
REFERENCE = "reference.json"
REQUIRED_HEADERS = ("X", "M", "L", "K")  # reference number, meter, unit note length, key (last header)
START, END = "<tune>", "</tune>"
HEADER_LINE = re.compile(r"([A-Za-z]):(.*)")
# Control characters never occur in ABC text; finding one means the file is binary (or corrupt).
BINARY = re.compile(rb"[\x00-\x08\x0b\x0e-\x1f\x7f]")


class TuneDataError(ValueError):
    """The tune file is empty, not text, or holds no complete tune; the message names the file and why."""


class Params(Section):
    val_fraction: float = Field(gt=0, lt=0.5)  # share of the tunes held out (whole tunes, never parts)
    limit: int | None = Field(None, ge=2)  # keep only the first N complete tunes (smoke runs)
    # Extra copies of every training tune, each moved this many steps round the circle of fifths (`transpose`):
    # the held-out tunes stay as they were written.
    transpositions: tuple[int, ...]


@dataclass(frozen=True)
class Tune:
    headers: dict[str, str]  # the first value of each header field, e.g. {"X": "1", "M": "C|", "K": "D Major"}
    body: str  # the music: every line after the K: line


def parse(text: str) -> Tune:
    """Split one tune into its header fields (up to and including K:, the last header) and its body."""
    headers: dict[str, str] = {}
    lines = text.split("\n")
    for number, line in enumerate(lines):
        match = HEADER_LINE.match(line)
        if match is None:
            if line.startswith("%"):  # comment line
                continue
            return Tune(headers, "\n".join(lines[number:]))  # music before any K: line
        field, value = match.groups()
        headers.setdefault(field, value.strip())
        if field == "K":
            return Tune(headers, "\n".join(lines[number + 1 :]))
    return Tune(headers, "")


LETTERS = "CDEFGAB"
NATURAL = (0, 2, 4, 5, 7, 9, 11)  # semitones of the letters above C
ACCIDENTALS = {"__": -2, "_": -1, "=": 0, "^": 1, "^^": 2}
SIGNS = {offset: sign for sign, offset in ACCIDENTALS.items()}
KEY_SIGNS = {"b": -1, "": 0, "#": 1}  # a key's tonic: Bb, G, F#
TONIC_SIGNS = {offset: sign for sign, offset in KEY_SIGNS.items()}
NOTE = re.compile(r"(\^\^|\^|__|_|=)?([A-Ga-g])([,']*)")
KEY = re.compile(r"(\s*)([A-G])([#b]?)(.*)", re.DOTALL)
UNMOVABLE = re.compile(r'"|\[[A-Za-z]:')  # chord symbols and annotations, inline fields: left as they are


def transpose(tune: str, fifths: int) -> str | None:
    """`tune` moved `fifths` steps round the circle of fifths (+1: a fifth up or, here, a fourth down: one sharp
    more in its key; −1: one flat more), or None when it holds something this does not move (chord symbols, inline
    fields, a key it cannot read or that would need a double accidental, a note that would need a triple one).

    Every note moves by the same number of letters (at most 3 up or down, so the tune keeps its range) and its key
    by the same interval: notes without an accidental then follow the new key signature, and an explicit accidental
    is recomputed from the pitch (B↔F is the one letter step that is not a fifth: G major's ^c becomes D major's ^G,
    its _B becomes =F). Accidentals apply to the rest of a bar per letter and octave, so a note's successors in the
    bar stay consistent. Rhythm, bars and every other header are untouched.
    """
    letters = (4 * fifths + 3) % 7 - 3  # letter steps: a fifth is 4 up or 3 down
    semitones = 7 * fifths - 12 * ((4 * fifths - letters) // 7)

    def moved(letter: int, octave: int, accidental: int) -> tuple[int, int, int]:
        position = 7 * octave + letter + letters
        new_octave, new_letter = divmod(position, 7)
        pitch = 12 * octave + NATURAL[letter] + accidental + semitones
        return new_letter, new_octave, pitch - 12 * new_octave - NATURAL[new_letter]

    def note(match: re.Match[str]) -> str:
        sign, name, marks = match.groups()
        octave = (1 if name.islower() else 0) + marks.count("'") - marks.count(",")
        letter, octave, accidental = moved(LETTERS.index(name.upper()), octave, ACCIDENTALS.get(sign, 0))
        written = LETTERS[letter] if octave <= 0 else LETTERS[letter].lower()
        # a note with no accidental takes the new key's, which moved with it; an explicit one is recomputed
        return (SIGNS[accidental] if sign else "") + written + "," * -octave + "'" * (octave - 1)

    def key(value: str) -> str | None:
        found = KEY.fullmatch(value)
        if found is None:
            return None
        space, name, sign, mode = found.groups()
        letter, _, accidental = moved(LETTERS.index(name), 0, KEY_SIGNS[sign])
        tonic = TONIC_SIGNS.get((accidental + 6) % 12 - 6)  # None: a double sharp or flat
        return None if tonic is None else space + LETTERS[letter] + tonic + mode

    if UNMOVABLE.search(tune):
        return None
    lines, in_body = [], False
    for line in tune.split("\n"):
        field = HEADER_LINE.match(line)
        if field is not None and (not in_body or field.group(1) in "KM"):  # a header, or a key or metre change
            if field.group(1) == "K":
                if (value := key(field.group(2))) is None:
                    return None
                line, in_body = "K:" + value, True
        elif not line.startswith("%"):
            try:
                line = NOTE.sub(note, line)
            except KeyError:  # a note that would need a triple sharp or flat: ABC has none
                return None
        lines.append(line)
    return "\n".join(lines)


def problems(tune: Tune) -> list[str]:
    """Why a tune is incomplete: missing required headers and/or an empty body; [] when complete."""
    found = [f"no {h}: header" for h in REQUIRED_HEADERS if h not in tune.headers]
    return found + ([] if tune.body.strip() else ["no body after the K: line"])


def read_text(path: Path) -> str:
    """The file as text with Unix line ends; empty, binary or non-UTF-8 files are errors."""
    raw = path.read_bytes()
    if not raw.strip():
        raise TuneDataError(f"{path}: the file is empty; expected ABC tunes separated by blank lines")
    if (control := BINARY.search(raw)) is not None:
        raise TuneDataError(f"{path}: looks binary (control byte 0x{control.group()[0]:02x} at offset "
                            f"{control.start()}); expected ABC text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise TuneDataError(f"{path}: not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start}); "
                            "convert it to UTF-8 or replace it with the original irish.abc") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def split_tunes(text: str) -> list[str]:
    """Blank-line separated blocks, with trailing whitespace removed from every line."""
    lines = [line.rstrip() for line in text.split("\n")]
    blocks = "\n".join(lines).split("\n\n")
    return [block.strip("\n") for block in blocks if block.strip()]


def complete_tunes(path: Path) -> tuple[list[str], int]:
    """The complete tunes of `path` and how many blocks were dropped as incomplete."""
    blocks = split_tunes(read_text(path))
    kept = [block for block in blocks if not problems(parse(block))]
    if not kept:
        first = "; ".join(problems(parse(blocks[0])))
        raise TuneDataError(f"{path}: none of its {len(blocks)} blank-line separated blocks is a complete tune "
                            f"(the first has {first}); a tune needs X:, M:, L: and K: header lines and a body")
    return kept, len(blocks) - len(kept)


def split_by_tune(tunes: Sequence[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """A seeded split of whole tunes, so no validation tune is partly seen in training."""
    order = list(range(len(tunes)))
    random.Random(seed).shuffle(order)
    n_val = min(max(1, round(val_fraction * len(tunes))), len(tunes) - 1)
    return [tunes[i] for i in sorted(order[n_val:])], [tunes[i] for i in sorted(order[:n_val])]


class Vocabulary:
    """Characters ↔ ids, with start/end-of-tune tokens so that a model learns where tunes begin and end."""

    start, end = 0, 1  # the ids of START and END

    def __init__(self, tokens: Sequence[str]):
        if list(tokens[:2]) != [START, END]:
            raise ValueError(f"a vocabulary starts with {START!r}, {END!r}; got {list(tokens[:2])}")
        self.tokens = list(tokens)
        self.ids = {token: i for i, token in enumerate(self.tokens)}

    @classmethod
    def of(cls, tunes: Iterable[str]) -> Vocabulary:
        return cls([START, END, *sorted({char for tune in tunes for char in tune})])

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.ids[char] for char in text]
        except KeyError as err:
            raise ValueError(f"character {err.args[0]!r} is not in the vocabulary") from None

    def encode_tunes(self, tunes: Iterable[str]) -> torch.Tensor:
        """[T] int64: <start> tune <end>, one tune after another."""
        ids = [i for tune in tunes for i in [self.start, *self.encode(tune), self.end]]
        return torch.tensor(ids, dtype=torch.int64)

    def decode(self, ids: Iterable[int]) -> str:
        """Characters only: the start/end tokens are structure, not text."""
        return "".join(self.tokens[i] for i in ids if i > self.end)

    def decode_tunes(self, ids: torch.Tensor) -> list[str]:
        tunes, current = [], []
        for i in ids.tolist():
            if i == self.start:
                current = []
            elif i == self.end:
                tunes.append(self.decode(current))
            else:
                current.append(i)
        return tunes


def prepare(params: Params, seed: int, raw: Path = RAW, output: Path = OUTPUT) -> dict[str, int]:
    from deepzoo.metrics import tunes as tune_metrics  # it parses tunes with this module: import it when used

    tunes, dropped = complete_tunes(raw)
    tunes = tunes[: params.limit]
    if len(tunes) < 2:
        raise TuneDataError(f"{raw}: only one complete tune; the split by tune needs at least two")
    train, val = split_by_tune(tunes, params.val_fraction, seed)
    train += [moved for fifths in params.transpositions for tune in train
              if (moved := transpose(tune, fifths)) is not None]
    # The alphabet comes from every kept tune: it is a property of the notation, not learned content, and
    # a validation-only character then needs no <unknown> token that training never shows.
    vocab = Vocabulary.of(tunes + train)
    with atomic_path(output) as tmp:
        tmp.mkdir()
        (tmp / "vocab.json").write_text(json.dumps({"start": START, "end": END, "tokens": vocab.tokens}, indent=1))
        for name, split in (("train", train), ("val", val)):
            torch.save(vocab.encode_tunes(split), tmp / f"{name}.pt")
            (tmp / f"{name}_tunes.abc").write_text("\n\n".join(split) + "\n")
        (tmp / REFERENCE).write_text(json.dumps(tune_metrics.reference(val, train), indent=1) + "\n")
    return {"kept": len(tunes), "dropped": dropped, "train_tunes": len(train), "val_tunes": len(val),
            "vocab": len(vocab), "train_chars": sum(map(len, train)), "val_chars": sum(map(len, val))}


def _processed(name: str, root: Path) -> Path:
    path = root / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `dvc repro prepare_tunes` first")
    return path


def load(split: str, root: Path = OUTPUT) -> torch.Tensor:
    return torch.load(_processed(f"{split}.pt", root))


def load_vocab(root: Path = OUTPUT) -> Vocabulary:
    return Vocabulary(json.loads(_processed("vocab.json", root).read_text())["tokens"])


def load_tunes(split: str, root: Path = OUTPUT) -> list[str]:
    return split_tunes(_processed(f"{split}_tunes.abc", root).read_text())


def load_reference(root: Path = OUTPUT) -> dict[str, float]:
    return json.loads(_processed(REFERENCE, root).read_text())
