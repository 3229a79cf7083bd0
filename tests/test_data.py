import numpy as np
import pytest

from lab.data import CharTokenizer, get_batch, list_corpora, load_corpus, load_tokenizer_json, train_val_split
from lab.data.bpe import BPETokenizer

TRICKY = ["héllo wörld 日本語 🎉\n\n  tabs\tand_under_scores", "", " ", "a\r\nb  ", "x" * 300, "\u200b\u00a0 ünïcödé's 123,456.7"]


def test_bundled_corpora_are_there_and_differ():
    assert {"kjv", "sonnets"} <= set(list_corpora())
    kjv, sonnets = load_corpus("kjv"), load_corpus("sonnets")
    assert len(kjv) > 1_000_000 and 10_000 < len(sonnets) < 100_000
    assert "In the beginning God created" in kjv and "Shall I compare thee" in sonnets
    with pytest.raises(FileNotFoundError, match="not one of the bundled corpora"):
        load_corpus("nope")


def test_char_tokenizer_round_trip_and_unknown_characters():
    text = load_corpus("sonnets")
    tok = CharTokenizer.from_text(text)
    assert tok.decode(tok.encode(text)) == text
    with pytest.raises(ValueError, match="character '日' is not in this tokenizer's vocabulary"):
        tok.encode("日")
    assert load_tokenizer_json(tok.to_json()).chars == tok.chars


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer.train(load_corpus("sonnets"), 300)


@pytest.mark.parametrize("text", TRICKY)
def test_bpe_round_trip_is_exact_for_any_utf8(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


def test_bpe_random_text_round_trip(bpe):
    rng = np.random.default_rng(0)
    alphabet = [chr(c) for c in list(range(32, 127)) + [10, 9, 233, 252, 20320, 128512, 1103]]
    for _ in range(50):
        s = "".join(rng.choice(alphabet, size=rng.integers(0, 60)))
        assert bpe.decode(bpe.encode(s)) == s


def test_bpe_learns_merges_that_compress_and_reloads_identically(bpe):
    text = load_corpus("sonnets")
    ids = bpe.encode(text)
    assert bpe.vocab_size == 300 and len(ids) < 0.7 * len(text.encode("utf-8"))
    assert bpe.decode([bpe.ranks[bpe.merges[0]]]) == "".join(map(chr, bpe.merges[0]))  # first merge: two bytes
    again = load_tokenizer_json(bpe.to_json())
    np.testing.assert_array_equal(again.encode(text), ids)
    with pytest.raises(ValueError, match="BPE merge 0"):
        BPETokenizer.from_json('{"type": "bpe", "merges": [[300, 1]]}')


def test_batches_are_deterministic_contiguous_and_shifted():
    ids = np.arange(1000, dtype=np.int32)
    train, val = train_val_split(ids, 0.1)
    assert len(train) == 900 and val[0] == 900
    x1, y1 = get_batch(train, 4, 16, np.random.default_rng(3))
    x2, y2 = get_batch(train, 4, 16, np.random.default_rng(3))
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1[:, :-1], x1[:, 1:])
    assert (np.diff(x1, axis=1) == 1).all()
    with pytest.raises(ValueError, match="too short for block_size 16"):
        get_batch(np.arange(10), 1, 16, np.random.default_rng(0))


def test_char_dataset_is_the_split_encoded_corpus():
    from lab.data import char_dataset
    tok, train, val = char_dataset("sonnets")
    text = load_corpus("sonnets")
    assert tok.decode(np.concatenate([train, val])) == text and len(val) == len(text) - int(len(text) * 0.9)


def test_utf8_byte_order_mark_is_not_a_character(tmp_path):
    """A corpus saved with a UTF-8 byte-order mark (Notepad) trained a vocabulary holding U+FEFF; it is dropped,
    and offsets in errors still count from the file's first byte."""
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfIn the beginning")
    assert load_corpus(str(tmp_path / "bom.txt")) == "In the beginning"
    (tmp_path / "bad.txt").write_bytes(b"\xef\xbb\xbfcaf\xe9")
    with pytest.raises(ValueError, match="byte 0xe9 at offset 6"):
        load_corpus(str(tmp_path / "bad.txt"))


def test_corpus_that_is_a_directory_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="a directory, not a text file, and not one of the bundled corpora"):
        load_corpus(str(tmp_path))


def test_bpe_train_refuses_a_fractional_vocab_size_and_non_text():
    """vocab_size=300.5 raised TypeError from range(), bytes a regular-expression TypeError: both are InputErrors."""
    from lab.checks import InputError
    with pytest.raises(InputError, match=r"^vocab_size must be an integer >= 256, got 300.5 \(one token per byte"):
        BPETokenizer.train("ab " * 50, 300.5)
    with pytest.raises(InputError, match="^text must be a str"):
        BPETokenizer.train(b"ab " * 50, 300)
    assert BPETokenizer.train("ab " * 50, 300.0).vocab_size <= 300
