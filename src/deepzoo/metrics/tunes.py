"""Is a generated tune music, and is it new? A real ABC parser (abc2midi) decides the first.

Valid: the required headers (X:, M:, L:, K:), a body of at least `MIN_BARS` bars, and abc2midi converts it
to MIDI without an error (its warnings, e.g. a bar one beat short, are counted apart).
Metre-correct: valid, and abc2midi finds no bar whose length differs from what `M:` and `L:` say. abc2midi
leaves the first bar (a pickup may be short) and the last bar unchecked, and checks a short bar before a
repeat together with the bar the repeat returns to (its pickup), as they are played.
Novel: its body shares no run of `NOVELTY_CHARS` characters with any training tune's body. 30 characters
is about three bars of eighth notes: common cadences and ornaments are shorter, so sharing them is not
copying, while a shared 30-character run is a whole phrase lifted from one tune. `prepare_tunes` measures
the held-out human tunes once (`reference_*_fraction`), the yardstick for every family's generated tunes.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from deepzoo.data.tunes import parse, problems

MIN_BARS = 4
NOVELTY_CHARS = 30
ABC2MIDI_TIMEOUT_S = 20
# What is not music inside a body: "quoted" chord symbols and annotations, !decorations!, %comments.
NOT_MUSIC = re.compile(r'"[^"\n]*"|![^!\n]*!|%[^\n]*')
# A bar line: |, ||, |], [|, :|, |:, ::|, |:: ... (a run of bar-line characters containing a |).
BAR_LINE = re.compile(r"[\[:]*\|[\]|:]*")
# abc2midi's complaint about a bar's length, e.g. "Track 0 Bar 3 has 7/2 time units while the time signature has 4".
BAR_LENGTH = re.compile(r"Bar \d+ has \S+ time units")


@dataclass
class TuneCheck:
    problems: list[str] = field(default_factory=list)  # missing headers, short body, abc2midi errors
    warnings: list[str] = field(default_factory=list)  # abc2midi warnings

    @property
    def valid(self) -> bool:
        return not self.problems

    @property
    def metre_correct(self) -> bool:
        return self.valid and not any(BAR_LENGTH.search(warning) for warning in self.warnings)


def count_bars(body: str) -> int:
    """Bar lines in the body: each closes a bar (a leading |: opens the first one and is not counted)."""
    music = NOT_MUSIC.sub("", body).lstrip()
    return len(BAR_LINE.findall(music)) - (1 if BAR_LINE.match(music) else 0)


def abc2midi(text: str, midi: Path) -> tuple[list[str], list[str]]:
    """Convert one tune to `midi`; return abc2midi's error and warning lines (it exits 0 even on errors)."""
    if shutil.which("abc2midi") is None:
        raise FileNotFoundError("abc2midi not found: install the abcmidi package (Debian: apt-get install abcmidi)")
    midi.unlink(missing_ok=True)  # so that a file left from an earlier run cannot pass for this one
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "tune.abc"
        source.write_text(text + "\n")
        try:
            done = subprocess.run(["abc2midi", str(source), "-o", str(midi)], capture_output=True, text=True,
                                  timeout=ABC2MIDI_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return [f"abc2midi did not finish in {ABC2MIDI_TIMEOUT_S} s"], []
    lines = (done.stdout + done.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    if done.returncode != 0:
        errors.append(f"abc2midi exited with status {done.returncode}")
    if not midi.is_file():
        errors.append("abc2midi wrote no MIDI file")
    return errors, [line for line in lines if line.startswith("Warning")]


def check(text: str, midi: Path) -> TuneCheck:
    """Check one tune and write its MIDI file (when abc2midi can) to `midi`."""
    tune = parse(text)
    result = TuneCheck(problems=problems(tune))
    if (bars := count_bars(tune.body)) < MIN_BARS:
        result.problems.append(f"{bars} bars, fewer than {MIN_BARS}")
    errors, result.warnings = abc2midi(text, midi)
    result.problems += errors
    return result


class Novelty:
    """Tells whether a tune's body copies a phrase of at least `chars` characters from a training body."""

    def __init__(self, training_tunes: Iterable[str], chars: int = NOVELTY_CHARS):
        self.chars = chars
        self.phrases = {body[i : i + chars] for tune in training_tunes
                        for body in [parse(tune).body] for i in range(len(body) - chars + 1)}

    def is_novel(self, tune: str) -> bool:
        body = parse(tune).body
        return not any(body[i : i + self.chars] in self.phrases for i in range(len(body) - self.chars + 1))


def mean(values: Iterable[float]) -> float:
    values = list(values)
    return round(sum(values) / max(len(values), 1), 4)


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95 % for z = 1.96): unlike p ± z·√(p(1 − p)/n), it stays
    inside [0, 1] and keeps a width when none or all of the n succeed."""
    centre, spread = 2 * successes + z * z, z * math.sqrt(z * z + 4 * successes * (n - successes) / n)
    return (centre - spread) / (2 * (n + z * z)), (centre + spread) / (2 * (n + z * z))


def fraction(name: str, flags: Iterable[bool]) -> dict[str, float]:
    """`name`: the share of true flags, with its 95 % Wilson interval as `name_low` and `name_high`."""
    flags = list(flags)
    low, high = wilson(sum(flags), len(flags))
    return {name: mean(flags), f"{name}_low": round(low, 4), f"{name}_high": round(high, 4)}


def check_all(texts: Iterable[str]) -> list[TuneCheck]:
    """`check` each tune, its MIDI file written to a scratch folder and dropped."""
    with tempfile.TemporaryDirectory() as scratch:
        return [check(text, Path(scratch) / "tune.mid") for text in texts]


def reference(held_out: list[str], training: list[str]) -> dict[str, float]:
    """What 'valid', 'metre-correct' and 'novel' score on held-out human tunes (novel: against the training tunes)."""
    novelty, checks = Novelty(training), check_all(held_out)
    return {"reference_valid_tune_fraction": mean(c.valid for c in checks),
            "reference_metre_correct_fraction": mean(c.metre_correct for c in checks),
            "reference_novel_tune_fraction": mean(novelty.is_novel(tune) for tune in held_out)}
