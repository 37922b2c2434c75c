"""The bar-length reader behind metre-aware sampling: note lengths, what keeps a bar its length, the mask."""

from fractions import Fraction

import pytest

from deepzoo.metrics import metre

REEL = "X:1\nM:C\nL:1/8\nK:D\n"  # a bar of 8 units (eighth notes)
JIG = "X:1\nM:6/8\nL:1/8\nK:G\n"  # a bar of 6 units


def read(text: str) -> tuple[metre.Bar, list[int]]:
    """The state after `text`, and where a character broke the metre."""
    bar, broken = metre.Bar(), []
    for i, char in enumerate(text):
        bar, keeps = metre.step(bar, char)
        if not keeps:
            broken.append(i)
    return bar, broken


def used(body: str, header: str = REEL) -> Fraction:
    """The length of the bar so far, in whole notes (a space ends the last note)."""
    bar, broken = read(header + body + " ")
    assert not broken, body
    return bar.used


@pytest.mark.parametrize("body, units", [
    ("dAFA DFA", 7),
    ("d2 A3/2 F/ A// z", 2 + 3 / 2 + 1 / 2 + 1 / 4 + 1),
    ("^A,, _b' =c x2", 5),  # accidentals and octave marks take no time, an invisible rest does
    ("d>A F<A", 4),  # d3/2 A/2 F/2 A3/2
    ("d2>A2", 4),
    ("[dfa]2 [d2f]A", 5),  # a chord lasts as its first note, times its own suffix
    ("(3ABc d2", 4),  # three in the time of two
    ("(2AB (4cdef", 6),  # two in the time of three, four in the time of three
    ("{ag}A2 !trill!B \"Am\"c-c (de)", 7),  # grace notes, decorations, chord symbols, ties and slurs: no time
])
def test_note_lengths(body, units):
    assert used(body) == Fraction(units) / 8


@pytest.mark.parametrize("meter, unit", [
    ("4/4", Fraction(1, 8)), ("3/4", Fraction(1, 8)), ("6/8", Fraction(1, 8)), ("2/4", Fraction(1, 16)),
    ("C", Fraction(1, 8)), ("C|", Fraction(1, 8)),
])
def test_unit_length_defaults_as_abc_says_when_there_is_no_l_field(meter, unit):
    assert used("dA", f"X:1\nM:{meter}\nK:D\n") == 2 * unit
    assert used("dA", f"X:1\nM:{meter}\nL:1/4\nK:D\n") == Fraction(1, 2)  # an L: field wins


@pytest.mark.parametrize("meter, bar", [("C", 1), ("C|", 1), ("6/8", Fraction(3, 4)), ("2/4", Fraction(1, 2))])
def test_the_meter_sets_the_bar(meter, bar):
    assert read(f"X:1\nM:{meter}\nK:D\n")[0].meter == bar


def keeps(text: str, char: str) -> bool:
    return metre.step(read(text)[0], char)[1]


def test_a_note_that_would_overflow_the_bar_is_refused():
    assert keeps(JIG + "GAB c2", "d")  # the sixth unit
    assert not keeps(JIG + "GAB c2d", "2")  # d2 would make seven
    assert not keeps(JIG + "GAB c", "4")
    assert keeps(JIG + "GAB c2d", "/")  # d/ still fits
    assert read(JIG + "GAB cd>e|")[1] == []  # d3/2 e/2: as long as de
    assert not keeps(JIG + "GAB c2d", ">")  # d3/2 would not fit
    assert not keeps(JIG + "GAB cd>e/", " ")  # e shorter than d: abc2midi rejects it


def test_a_full_bar_takes_only_a_bar_line():
    full = JIG + "|GAB c2d"
    assert [char for char in "|: \ndG^(\"!>[" if keeps(full, char)] == ["|", ":", " ", "\n"]
    assert keeps(full + "|", "G")  # the next bar


def test_a_short_note_is_still_possible_when_less_than_a_unit_is_left():
    text = JIG + "GAB c2d/"  # half a unit left
    assert keeps(text, "e") and not keeps(text + "e", " ") and keeps(text + "e", "/")
    assert read(text + "e/|")[1] == []


def test_a_bar_closes_only_at_its_length_but_the_pickup():
    assert keeps(JIG + "D", "|")  # a pickup may be short
    assert not keeps(JIG + "D|GAB c2", "|")
    assert not keeps(JIG + "GAB c2d|GAB c2", "|")
    assert not keeps(JIG + "GAB c2d|B2A G2", ":")  # no pickup: a short bar before a repeat is wrong


def test_repeats_are_checked_with_the_pickup_as_abc2midi_plays_them():
    pickup = JIG + "D|GAB c2d|B2A G2"  # the last bar lacks the pickup's unit
    assert keeps(pickup, ":")
    assert not keeps(pickup + "G", ":")  # whole, it would be one unit too long with the pickup
    assert read(pickup + ":|D|GAB c2d|")[1] == []  # the next part starts with the same pickup
    assert not keeps(pickup + ":|D", "E")
    assert read(JIG + "D|GAB c2d|[1B2A G2:|[2B2A G3|]")[1] == []  # a second ending is a whole bar


@pytest.mark.parametrize("text, char", [
    (REEL + "A>", ">"),  # abc2midi rejects doubled broken rhythm after a dotted note
    (REEL + "A>B", "2"),  # and A>B2: both notes must be written alike
    (REEL + "A ", "2"),  # a length with no note
    (REEL + "A ", ","),
    (REEL + "A ^", "|"),  # an accidental needs its note
    (REEL + "A [c", " "),  # a chord cannot stay open
    (REEL + "AB[", "2"),  # [2 is an ending only at a bar's start: here [ starts a chord
    (REEL + "(", "5"),  # (5 takes a time that depends on the metre: not offered
])
def test_what_abc2midi_would_reject_is_refused(text, char):
    assert not keeps(text, char)


@pytest.mark.parametrize("tune, in_metre", [
    ("X:1\nT:Good\nM:C|\nL:1/8\nK:D Major\ndAFA DFAd|fdcd FAdf|gfge fefd|(3efe dc d4:|!\n", True),
    ("X:1\nT:Good\nM:C|\nL:1/8\nK:D Major\ndAFA DFAd|fdcd FAdf|gfge fefd|(3efe dc d2:|!\n", False),
    ("X:2\nT:Pickup\nM:6/8\nL:1/8\nK:G\nD|GAB c2d|e2f g3|GAB c2d|B2A G2:|", True),
    ("X:2\nT:Pickup\nM:6/8\nL:1/8\nK:G\nD|GAB c2d|e2f g3|GAB c2d|B2A G3:|", False),
    ("X:3\nT:Waltz\nM:3/4\nK:G\nG2 B2 d2|g4 f2|e2 c2 A2|G6|]", True),
    ("X:3\nT:Polka\nM:2/4\nK:D\nA>B AF|ED E2|A>B AF|D4|]", False),  # L: 1/16 by default: these bars are half long
])
def test_the_reader_agrees_with_abc2midi_on_whole_tunes(tune, in_metre):
    """The verdicts of tests/test_sequences.py's abc2midi checks, and two tunes without L:."""
    assert (read(tune)[1] == []) == in_metre


def test_header_and_end_of_tune_are_free():
    tokens = ("<tune>", "</tune>", "X", ":", "1", "\n", "|", "2")
    assert all(metre.allowed(read("X:1\nT:Some ti")[0], tokens))
    assert metre.allowed(read(JIG + "GAB c2d ")[0], tokens) == (True, True, False, True, False, True, True, False)
    assert all(metre.allowed(read("X:1\nM:none\nL:1/8\nK:G\nGABcdefgab")[0], tokens))
