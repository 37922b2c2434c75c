"""How full is the bar? An ABC tune read one character at a time, for decoding that keeps every bar its length.

`step(bar, char)` gives the state after `char` and whether `char` keeps the metre: some way to finish the note
being written still fits in the bar, or, at a bar line, the bar closes with the length abc2midi checks; a bar
that is full takes only a bar line (or white space). `allowed` asks that of every token, for sampling.
Lengths are fractions of a whole note: the unit (`L:`, else 1/8 for metres of 3/4 and more, 1/16 below, as
ABC 2.1 says) times the note's suffix (2, 3/2, /, //), times its share of a tuplet ((3: three notes in the
time of two) or of a broken rhythm (A>B is A3/2 B/2). A chord [CEG] lasts as its first note; grace notes
{...}, !decorations!, "chord symbols", ties, slurs and accidentals take no time.

Bars follow abc2midi's check (see `metrics.tunes`): the first bar is a pickup of any length up to a whole bar;
every later bar is whole, except that a bar closed by a repeat (:|) lacks the pickup's length, as the repeat
plays them as one bar, and the next bar is that pickup again (unless it is a second ending, [2: whole). The
last bar, which abc2midi leaves unchecked, is held to the same rule: a bar line does not tell it is the last.
Where abc2midi would reject the music, and a masked model would be pushed to write it, the character is
refused too: a stray length or octave mark, an accidental with no note, an unclosed chord, A>B2.
The header and free metre (M:none) are not constrained; the end of the tune is always allowed.
"""

from __future__ import annotations

import functools
import re
from dataclasses import astuple, dataclass, replace
from fractions import Fraction

PITCHES = frozenset("ABCDEFGabcdefg")
NOTES = PITCHES | frozenset("zx")  # and rests (x: an invisible one)
CHORD = NOTES | frozenset("^_=',/0123456789]")  # what may stand between [ and ]
NOT_NOTES = frozenset("HIJKLMNOPQRSTUVWXYZhijklmnopqrstuvwy")  # fields (M:) at a line's start, else decorations
SUFFIX = re.compile(r"([1-9]\d*)?(/+|/[1-9])?")  # a note's length: 2, 3/2, /, //, /4 (a digit ends it)
TEXT_ENDS = {'"': '"', "!": "!", "{": "}"}  # zero-length text: chord symbols, decorations, grace notes
# (p: p notes in the time of q. (5, (7, (9 take a q that depends on the metre: not offered.
TUPLET_TIME = {"2": 3, "3": 2, "4": 3, "6": 2, "8": 3}


@dataclass(frozen=True)
class Bar:
    """Where a tune stands after the characters read so far (hashable: `step` is memoised)."""

    header: bool = True  # before the K: line
    line: str | None = ""  # the field line being read (M:6/8); "" at a body line's start; None in music
    meter: Fraction | None = None  # a whole bar; None for free metre
    unit: Fraction | None = None  # L:, None for the default
    text: str = ""  # the character that ends the zero-length text being read
    previous: str = ""  # ( [ | : ^ whose meaning the next character decides
    lead: Fraction | None = None  # the pickup's length (0 for none); None in the first bar
    carry: Fraction = Fraction(0)  # the short bar before a repeat, which this one completes
    used: Fraction = Fraction(0)  # the current bar's finished notes
    owed: Fraction = Fraction(0)  # the length of the second note of a broken rhythm, until it is written
    last: Fraction | None = None  # the length of the last finished note, which a broken rhythm changes
    share: Fraction = Fraction(1)  # the next note's share of its length, from a broken rhythm
    tuplet: int = 0  # notes left in the tuplet, each taking `ratio` of its length
    ratio: Fraction = Fraction(1)
    note: Fraction | None = None  # the note (or chord) being written: its length before the suffix
    suffix: str = ""
    chord: str = ""  # "start" before a chord's first note, "first" in it (it sets the length), "rest" after

    def __hash__(self) -> int:  # `step` hashes a state at every character: compute it once
        return self._hash

    @functools.cached_property
    def _hash(self) -> int:
        return hash(astuple(self))

    @property
    def limit(self) -> Fraction | None:
        """The longest the current bar may be; None where nothing is checked."""
        if self.header or self.line or self.meter is None:
            return None
        return self.meter - self.carry

    def fits(self) -> bool:
        """Some way to finish the note being written, and the notes still owed, fits in the bar."""
        if self.limit is None:
            return True
        # A note whose suffix is empty or ends in / can still be made as short as needed, never zero.
        open_ended = self.note is not None and (not self.suffix or self.suffix.endswith("/"))
        if self.owed and self.note is not None:  # the second note of A>B, counted in `owed`
            return (open_ended or self.length() == self.owed) and self.used + self.owed <= self.limit
        fixed = self.used + self.owed + (self.length() if self.note is not None and not open_ended else 0)
        return fixed < self.limit if open_ended or self.tuplet else fixed <= self.limit

    def full(self) -> bool:
        """The bar has its length, with nothing left to write in it."""
        return self.used == self.limit and self.note is None and not (self.owed or self.tuplet or self.chord)

    def length(self) -> Fraction:
        """The note being written, as its suffix so far says."""
        number, slash, divisor = self.suffix.partition("/")
        length = self.note * int(number or 1)
        if not slash:
            return length
        return length / (int(divisor) if divisor.isdigit() else 2 ** self.suffix.count("/"))


def fraction(value: str) -> Fraction | None:
    """The fraction a field value starts with (6/8, 1/8; C is 4/4 and C| 2/2); None for none, 0 or no fraction."""
    found = re.match(r"([1-9]\d*)/([1-9]\d*)", {"C": "4/4", "C|": "2/2"}.get(value.strip(), value.strip()))
    return Fraction(int(found[1]), int(found[2])) if found else None


def read_field(bar: Bar) -> Bar:
    """Apply a finished field line: M: and L: set the bar and the unit; K: ends the header."""
    name, _, value = bar.line.partition(":")
    if name == "M":
        bar = replace(bar, meter=fraction(value))
    elif name == "L":
        bar = replace(bar, unit=fraction(value))
    return replace(bar, header=bar.header and name != "K", line="")


def finish_note(bar: Bar) -> Bar:
    """The note being written is over: it counts in the bar (a chord's first note sets the chord's length)."""
    if bar.note is None or bar.chord in ("start", "rest"):
        return bar
    if bar.chord == "first":  # the chord lasts as its first note, times the chord's own suffix after ]
        return replace(bar, note=bar.length(), suffix="", chord="rest")
    return replace(bar, used=bar.used + bar.length(), last=bar.length(), note=None, suffix="", owed=Fraction(0))


def start_note(bar: Bar, chord: str = "") -> Bar:
    """A note (or chord) begins, taking its share of a tuplet or broken rhythm."""
    unit = bar.unit or (Fraction(1, 16) if bar.meter is not None and bar.meter < Fraction(3, 4) else Fraction(1, 8))
    ratio = bar.ratio if bar.tuplet else 1
    return replace(bar, note=unit * bar.share * ratio, suffix="", chord=chord, share=Fraction(1),
                   tuplet=max(bar.tuplet - 1, 0))


def close_bar(bar: Bar, char: str) -> tuple[Bar, bool]:
    """A bar line starting with `char`; whether the bar it closes has the length abc2midi checks."""
    if bar.limit is None or not (bar.used or bar.owed or bar.tuplet):  # nothing to close: "|:" opening a tune
        return replace(bar, previous=char), True
    closed = replace(bar, used=Fraction(0), last=None, carry=Fraction(0), previous=char)
    ok = not (bar.owed or bar.tuplet)
    if bar.lead is None:  # the tune's first bar: a pickup of any length
        return replace(closed, lead=bar.used % bar.meter), ok
    if char == ":":  # the repeat plays this bar and its part's pickup as one; the next part's pickup completes it
        return replace(closed, carry=bar.used % bar.meter), ok and bar.used == bar.meter - bar.lead
    return closed, ok and bar.used == bar.limit


@functools.lru_cache(maxsize=1 << 18)
def step(bar: Bar, char: str) -> tuple[Bar, bool]:
    """The state after `char`, and whether `char` keeps every bar its length. A longer token (the start or end of
    a tune) is not music: it changes nothing and is always allowed."""
    if len(char) != 1:
        return bar, True
    if bar.header or (bar.line and (len(bar.line) > 1 or char == ":")):  # in a field line
        return (read_field(bar) if char == "\n" else replace(bar, line=bar.line + char)), True
    if bar.line:  # a letter that opened a line, yet no field: a decoration, then music
        bar = replace(bar, line=None)
    elif bar.line == "":
        if char in NOT_NOTES:
            return replace(bar, line=char), True
        bar = replace(bar, line=None)
    if bar.text:
        return replace(bar, text="" if char in (bar.text, "\n") else bar.text, line="" if char == "\n" else None), True
    previous, bar = bar.previous, replace(bar, previous="")
    if previous == "(" and char.isdigit():
        if char not in TUPLET_TIME:
            return bar, False
        bar = replace(bar, tuplet=int(char), ratio=Fraction(TUPLET_TIME[char], int(char)))
        return bar, bar.fits()
    if previous == "^" and char not in PITCHES and char not in "^_=":  # an accidental needs its note
        return bar, False
    if previous == "[":
        if char.isdigit():  # an ending, at a bar's start: [2 follows a repeat yet is a whole bar
            return replace(bar, carry=Fraction(0)), not (bar.used or bar.owed or bar.tuplet)
        if char in NOT_NOTES:  # an inline field, [K:G]
            return replace(bar, text="]"), True
        if char != "|":
            bar = start_note(bar, chord="start")
    if previous in ("|", ":") and char in "|:]":  # the rest of a bar line: ||, |:, :|, ::, |]
        return replace(bar, previous=previous), True
    writing = bar.note is not None and bar.chord in ("", "first")
    if writing and (SUFFIX.fullmatch(bar.suffix + char) or (char in "'," and not bar.suffix)):  # A,2 not A2,
        bar = replace(bar, suffix=bar.suffix if char in "'," else bar.suffix + char)
        return bar, bar.fits()
    if bar.owed and bar.note is not None and bar.chord != "start" and bar.length() != bar.owed:
        return finish_note(bar), False  # abc2midi plays A>B only when B is written as long as A
    bar = finish_note(bar)
    if bar.chord:
        if char not in CHORD:  # a chord left open would swallow the rest of the tune
            return bar, False
        if bar.chord == "rest":  # the notes after a chord's first take no time of their own
            return replace(bar, chord="" if char == "]" else "rest"), bar.fits()
    if bar.full() and char not in " \n|:":  # a note would not fit, and the rest would be junk before a bar line
        return bar, False
    if char in "0123456789/',":  # a length or an octave with no note before it
        return bar, False
    if char in "^_=":
        bar = replace(bar, previous="^")
    elif char in NOTES:
        bar = replace(bar, chord="first") if bar.chord == "start" else start_note(bar)
    elif char == "]" and bar.chord:
        bar = replace(bar, chord="")
    elif char in "><":
        if bar.last is None or bar.share != 1 or bar.chord:  # only A>B, A<B: abc2midi rejects >> after a dot
            return bar, False
        share = Fraction(1, 2) if char == ">" else Fraction(3, 2)
        bar = replace(bar, used=bar.used + bar.last * (1 - share), share=share, owed=bar.last * share)
    elif char in "|:":
        return close_bar(bar, char)
    elif char in "([":
        bar = replace(bar, previous=char)
    elif char in TEXT_ENDS:
        bar = replace(bar, text=TEXT_ENDS[char])
    elif char == "\n":
        bar = replace(bar, line="")
    return bar, bar.fits()


# Letters of one kind read alike, so that one asks `step` for all of them (this keeps decoding fast).
KIND = {**dict.fromkeys(PITCHES, "c"), "x": "z", **dict.fromkeys(NOT_NOTES, "H")}


@functools.lru_cache(maxsize=1 << 14)
def allowed(bar: Bar, tokens: tuple[str, ...]) -> tuple[bool, ...]:
    """Which of `tokens` may come next; all of them where nothing is checked (the header, free metre)."""
    if bar.limit is None:
        return (True,) * len(tokens)
    return tuple(step(bar, KIND.get(token, token))[1] for token in tokens)
