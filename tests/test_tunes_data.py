"""`prepare_tunes`: splitting the ABC file into tunes, the split by tune, the vocabulary, and clear errors."""

import json

import pytest
import torch
from configs import shipped

from deepzoo.data import tunes

JIG = "X:1\nT:Jig\nM:6/8\nL:1/8\nK:G\nGAB c2d|e2f g3|GAB c2d|B2A G3:|"
REEL = "X:2\nT:Reel\nM:C|\nL:1/8\nK:D\ndAFA DFAd|fdcd FAdf|gfge fefd|efdc d2:|"
POLKA = "X:3\nT:Polka\nM:2/4\nL:1/8\nK:A\nAB cA|BA FA|AB cA|B2 A2:|"


def prepare(tmp_path, text: str | bytes, **params):
    raw = tmp_path / "tunes.abc"
    raw.write_bytes(text if isinstance(text, bytes) else text.encode())
    output = tmp_path / "processed"
    params = {"limit": None, "transpositions": (), **params}
    counts = tunes.prepare(shipped("tunes", tunes.Params, **params), seed=0, raw=raw, output=output)
    return counts, output


def test_parse_splits_headers_from_the_body():
    tune = tunes.parse(REEL)
    assert tune.headers == {"X": "2", "T": "Reel", "M": "C|", "L": "1/8", "K": "D"}
    assert tune.body == "dAFA DFAd|fdcd FAdf|gfge fefd|efdc d2:|"
    assert tunes.problems(tune) == []
    assert tunes.problems(tunes.parse("X:1\nT:No key\nM:C\nL:1/8\nabc|")) == ["no K: header"]
    assert tunes.problems(tunes.parse("X:1\nM:C\nL:1/8\nK:D")) == ["no body after the K: line"]


def test_a_body_line_naming_a_new_key_stays_in_the_body():
    tune = tunes.parse(JIG + "\nK:D\nABc def|")
    assert tune.headers["K"] == "G" and tune.body.endswith("K:D\nABc def|")


@pytest.mark.parametrize("separator", ["\n\n", "\n   \n", "\n\t\n\n\n"])
def test_tunes_are_separated_by_blank_or_whitespace_only_lines(separator):
    assert tunes.split_tunes(f"\n{JIG}{separator}{REEL}\n\n") == [JIG, REEL]


def test_crlf_line_ends_and_trailing_whitespace_are_normalised(tmp_path):
    windows_text = (JIG + "  \n\n" + REEL + "\t").replace("\n", "\r\n")
    path = tmp_path / "crlf.abc"
    path.write_bytes(windows_text.encode())
    assert tunes.split_tunes(tunes.read_text(path)) == [JIG, REEL]


def test_incomplete_tunes_are_dropped_and_counted(tmp_path):
    no_meter = JIG.replace("M:6/8\n", "")
    body_only = "GAB c2d|e2f g3|"
    counts, output = prepare(tmp_path, "\n\n".join([JIG, no_meter, REEL, body_only, POLKA]), val_fraction=0.3)
    assert (counts["kept"], counts["dropped"]) == (3, 2)
    assert counts["train_tunes"] + counts["val_tunes"] == 3
    assert tunes.load_tunes("train", output) + tunes.load_tunes("val", output) != []


@pytest.mark.parametrize("content, message", [
    (b"", "empty"),
    (b"  \n\n\t\n", "empty"),
    (b"X:1\nT:caf\xe9\nM:C\nL:1/8\nK:D\nabc|", "not UTF-8"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary"),
    (b"just some words\n\nand more words", "none of its 2"),
    (("X:1\nT:Header only\nM:C\nL:1/8\nK:D\n\nabc|def|").encode(), "no body after the K: line"),
    (JIG.encode(), "only one complete tune"),
])
def test_bad_files_fail_clearly_and_write_nothing(tmp_path, content, message):
    with pytest.raises(tunes.TuneDataError, match=message) as err:
        prepare(tmp_path, content)
    assert "tunes.abc" in str(err.value)
    assert not (tmp_path / "processed").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["tunes.abc"]  # no temporary leftovers either


def test_the_split_is_by_whole_tune_and_seeded(tmp_path):
    many = [JIG.replace("X:1", f"X:{i}").replace("T:Jig", f"T:Jig {i}") for i in range(20)]
    counts, output = prepare(tmp_path, "\n\n".join(many), val_fraction=0.25)
    train, val = tunes.load_tunes("train", output), tunes.load_tunes("val", output)
    assert (len(train), len(val)) == (15, 5) == (counts["train_tunes"], counts["val_tunes"])
    assert sorted(train + val) == sorted(many)  # every tune whole, in exactly one split
    assert tunes.split_by_tune(many, 0.25, seed=0) == (train, val)
    assert tunes.split_by_tune(many, 0.25, seed=1) != (train, val)


def test_transposing_moves_notes_key_and_explicit_accidentals_by_the_same_interval():
    tune = "X:1\nT:Tune in G\nM:C|\nL:1/8\nK:G Major\nGF|D,Gc^c _Bb'=f2|]\nK:E Minor\nEB|]"
    # One sharp more, each note a fourth down: G→D, F(♯)→C(♯) by the new key, D,→A,,, ^c→^G; B→F is the one step
    # that is not a fourth, so _B→=F, and b'→f' (♯ by the key); =f→=c (D major has C♯: the natural must stay).
    assert tunes.transpose(tune, 1) == ("X:1\nT:Tune in G\nM:C|\nL:1/8\nK:D Major\nDC|A,,DG^G =Ff'=c2|]"
                                        "\nK:B Minor\nB,F|]")
    assert tunes.transpose("X:1\nM:C\nL:1/8\nK:F Major\nFAcf|", -1) == "X:1\nM:C\nL:1/8\nK:Bb Major\nBdfb|"


@pytest.mark.parametrize("fifths", [1, -1, 2, -3])
def test_transposing_back_restores_the_tune(fifths):
    for tune in (JIG, REEL, POLKA, "X:4\nM:3/4\nL:1/8\nK:A Dorian\n^GA =c_B B,,|c'2 e'^d'|"):
        moved = tunes.transpose(tune, fifths)
        assert moved != tune and tunes.transpose(moved, -fifths) == tune


def test_tunes_that_cannot_be_transposed_are_left_out(tmp_path):
    chords = REEL.replace("dAFA", '"D"dAFA')
    assert tunes.transpose(chords, 1) is None  # chord symbols would need their own spelling rules
    assert tunes.transpose(JIG.replace("K:G", "K:B#"), 1) is None  # its key would be F double-sharp major
    assert tunes.transpose(JIG.replace("GAB c2d", "GA^^B c2d"), 1) is None  # B double-sharp: F triple-sharp
    counts, output = prepare(tmp_path, "\n\n".join([JIG, chords, REEL, POLKA]), val_fraction=0.25,
                             transpositions=(1, -1))
    train, val = tunes.load_tunes("train", output), tunes.load_tunes("val", output)
    originals = [tune for tune in train if tune in (JIG, chords, REEL, POLKA)]
    assert len(val) == 1 and val[0] in (JIG, chords, REEL, POLKA)  # held-out tunes as written
    assert len(train) == counts["train_tunes"] == 3 + 2 * sum(tune != chords for tune in originals)
    vocab = tunes.load_vocab(output)
    assert all(char in vocab.ids for tune in train for char in tune)  # moved keys and notes included


def test_encoded_ids_decode_back_to_the_tunes(tmp_path):
    _, output = prepare(tmp_path, "\n\n".join([JIG, REEL, POLKA]), val_fraction=0.3)
    vocab = tunes.load_vocab(output)
    saved = json.loads((output / "vocab.json").read_text())
    assert saved["tokens"][:2] == [saved["start"], saved["end"]] == [tunes.START, tunes.END]
    for split in ("train", "val"):
        ids = tunes.load(split, output)
        assert ids.dtype == torch.int64
        assert ids[0] == vocab.start and ids[-1] == vocab.end
        assert vocab.decode_tunes(ids) == tunes.load_tunes(split, output)


def test_vocabulary_round_trip_and_unknown_characters():
    vocab = tunes.Vocabulary.of([JIG, REEL])
    ids = vocab.encode_tunes([REEL, JIG])
    assert vocab.decode_tunes(ids) == [REEL, JIG]
    assert len(vocab) == 2 + len(set(JIG + REEL))
    with pytest.raises(ValueError, match="'§' is not in the vocabulary"):
        vocab.encode("§")


def test_missing_processed_data_names_the_stage(tmp_path):
    with pytest.raises(FileNotFoundError, match="dvc repro prepare_tunes"):
        tunes.load("train", tmp_path)
