"""lab.BPETokenizer on the `tokenizers` library: lab's earlier files, round trips, determinism, tokenizer.json that
transformers loads, and tokenizers travelling with checkpoints and exports."""
import json
import os
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lab
from lab.checks import InputError
from lab.checkpoint import CheckpointError, load_checkpoint, load_tokenizer, save_checkpoint
from lab.data import CharTokenizer, load_corpus, tokenizer_from_directory
from lab.data.bpe import BPETokenizer, _onig

DATA = Path(__file__).parent / "data"
TEXTS = ["", " ", "\n\n\t  \r\n", "héllo wörld", "😀👩‍👩‍👧 emoji", "日本語のテキスト。", "x\u0301 x² Ⅻ", "\x00\x1c\x7f\uffff",
         "  leading and trailing  ", "a" * 300]


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer.train(load_corpus("sonnets"), 400)


def test_bpe_file_of_the_earlier_lab_format_encodes_as_before():
    """tests/data/bpe_lab_format.json and the ids of its samples were written by the hand-written BPE (bf3eda0)."""
    expected = json.loads((DATA / "bpe_lab_format_ids.json").read_text(encoding="utf-8"))
    tok = load_tokenizer(DATA / expected["tokenizer"])
    assert isinstance(tok, BPETokenizer) and tok.vocab_size == 300
    for sample in expected["samples"]:
        assert tok.encode(sample["text"]).tolist() == sample["ids"], sample["text"]
        assert tok.decode(sample["ids"]) == sample["text"]


def test_bpe_split_classes_match_python_on_every_code_point():
    """The old files' pattern is Python `re` syntax; `tokenizers` runs Oniguruma: the translated classes must pick
    the same characters as Python's \\w and \\s wherever Python's Unicode database knows the character."""
    from tokenizers import Regex, pre_tokenizers
    text = "".join(chr(c) for c in range(0x110000)
                   if not 0xD800 <= c < 0xE000 and unicodedata.category(chr(c)) != "Cn")
    for cls in (r"\w", r"\s", r"\W", r"\S", r"[^\s\w]"):
        split = pre_tokenizers.Split(Regex(_onig(cls)), behavior="removed", invert=True)
        onig = "".join(piece for i in range(0, len(text), 65536)
                       for piece, _ in split.pre_tokenize_str(text[i:i + 65536]))
        assert onig == "".join(re.findall(cls, text)), cls


@pytest.mark.parametrize("text", TEXTS)
def test_bpe_round_trip_of_unicode_emoji_whitespace_and_empty_text(bpe, text):
    ids = bpe.encode(text)
    assert ids.dtype == np.int32 and bpe.decode(ids) == text
    assert bpe.decode_bytes(ids) == text.encode("utf-8")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(st.characters(codec="utf-8"), max_size=200) | st.text(alphabet=" \n\t\x1cab'é😀²_", max_size=60))
def test_bpe_encode_gives_the_ids_the_tokenizers_library_gives(bpe, text):
    """lab's encode cuts chunks with Python's regex and encodes each distinct one once; transformers runs the saved
    tokenizer.json through the library whole: the ids must be the same."""
    assert bpe.encode(text).tolist() == bpe._tok.encode(text).ids


def test_bpe_ids_0_to_255_are_the_bytes_whatever_the_corpus():
    tok = BPETokenizer.train("ÿÿÿ zzz ääää " * 20, 270)
    assert [tok.vocab[i] for i in range(256)] == [bytes([i]) for i in range(256)]
    assert tok.encode("\x00A").tolist() == [0, 65]
    assert sorted(tok.vocab) == list(range(tok.vocab_size))


def test_bpe_training_gives_the_same_vocabulary_in_every_process():
    code = ("from lab.data.bpe import BPETokenizer; from lab.data import load_corpus; "
            "print(BPETokenizer.train(load_corpus('sonnets'), 500).to_json())")
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")]
    assert runs[0] == runs[1] == BPETokenizer.train(load_corpus("sonnets"), 500).to_json() + "\n"


def test_bpe_save_touches_only_its_own_files(tmp_path, bpe):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "config.json").write_text("{}")
    bpe.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "notes.txt", "tokenizer.json",
                                                          "tokenizer_config.json"]
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "config.json").read_text() == "{}"
    again = BPETokenizer.load(tmp_path)
    assert again.merges == bpe.merges and again.encode(TEXTS[4]).tolist() == bpe.encode(TEXTS[4]).tolist()


def test_saved_bpe_loads_in_tokenizers_and_transformers_with_the_same_ids(tmp_path, bpe):
    from tokenizers import Tokenizer
    transformers = pytest.importorskip("transformers")
    bpe.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    raw = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in TEXTS:
        ids = bpe.encode(text).tolist()
        assert hf(text)["input_ids"] == raw.encode(text).ids == ids
        assert hf.decode(ids) == text


def _model(vocab_size):
    return lab.TransformerLM(lab.TransformerConfig(vocab_size=vocab_size, block_size=8, n_layer=1, n_head=2, n_embd=8))


def test_checkpoint_and_export_restore_a_bpe_tokenizer(tmp_path, use_backend, bpe):
    from lab.scale import export_checkpoint, import_model
    transformers = pytest.importorskip("transformers")
    save_checkpoint(tmp_path / "ck", _model(bpe.vocab_size), bpe)
    tok = load_checkpoint(tmp_path / "ck")[1]
    assert isinstance(tok, BPETokenizer) and tok.to_json() == bpe.to_json()
    out = export_checkpoint(tmp_path / "ck", tmp_path / "hf")
    for name in ("lab_tokenizer.json", "tokenizer.json"):   # lab's file, and transformers' alone
        assert import_model(out)[1].to_json() == bpe.to_json()
        (out / name).unlink(missing_ok=name == "tokenizer.json")
    out = export_checkpoint(tmp_path / "ck", tmp_path / "hf")
    hf = transformers.AutoTokenizer.from_pretrained(str(out))
    assert hf(TEXTS[3])["input_ids"] == bpe.encode(TEXTS[3]).tolist()


def test_checkpoint_switching_tokenizer_kind_loads_the_new_one(tmp_path, numpy_backend, bpe):
    char = CharTokenizer("ab")
    save_checkpoint(tmp_path, _model(bpe.vocab_size), bpe)
    save_checkpoint(tmp_path, _model(2), char)   # tokenizer_config.json of the BPE save stays behind
    assert load_checkpoint(tmp_path)[1].chars == ["a", "b"]
    save_checkpoint(tmp_path, _model(bpe.vocab_size), bpe)
    assert load_checkpoint(tmp_path)[1].to_json() == bpe.to_json()


def test_checkpoint_carries_a_pretrained_tokenizer(tmp_path, numpy_backend, bpe):
    transformers = pytest.importorskip("transformers")
    from lab.data.pretrained import load_tokenizer as load_pretrained_tokenizer
    bpe.save(tmp_path / "tok")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tok" / "tokenizer.json"),
                                              eos_token="<|end|>")   # an added token: a pretrained tokenizer
    hf.save_pretrained(tmp_path / "hf")
    pretrained = load_pretrained_tokenizer(tmp_path / "hf")
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "chat_template.jinja").write_text("{{ messages }}")   # an earlier tokenizer's
    save_checkpoint(tmp_path / "ck", _model(len(hf) + 3), pretrained)   # fewer tokens than embeddings: fine
    assert not (tmp_path / "ck" / "chat_template.jinja").exists()
    tok = load_checkpoint(tmp_path / "ck")[1]
    assert type(tok) is type(pretrained) and tok.eos_token_id == len(hf) - 1
    assert tok.encode("héllo <|end|>").tolist() == hf("héllo <|end|>")["input_ids"]
    with pytest.raises(CheckpointError, match="holds a pretrained tokenizer .*load it with lab.load_tokenizer"):
        tokenizer_from_directory(tmp_path / "ck")   # lab's own loader does not take it for one of lab's
    save_checkpoint(tmp_path / "small", _model(8), pretrained)
    with pytest.raises(CheckpointError, match=r"vocabulary of \d+ tokens, but the model has vocab_size 8"):
        load_checkpoint(tmp_path / "small")


BAD = {
    "invalid JSON": ('{"model": {"type": "BPE", "vocab": ', r"valid JSON"),
    "missing merges": (json.dumps({"model": {"type": "BPE", "vocab": {}}}), r"without merges"),
    "old format, merge of a later token": ('{"type": "bpe", "merges": [[300, 1]]}', r"merge 0 is \[300, 1\]"),
    "old format, invalid pattern": ('{"type": "bpe", "merges": [], "pattern": "(("}', r"not a valid regular"),
    "not bytes": (json.dumps({"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                                 "use_regex": True}, "model": {"type": "BPE", "vocab": {"\u4e00": 0},
                                                                         "merges": []}}), r"not byte sequences"),
    "no byte-level split": (json.dumps({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}}),
                            r"a ByteLevel pre-tokenizer"),
    "added tokens": (json.dumps({"added_tokens": [{"id": 0, "content": "<s>", "special": True, "single_word": False,
                                                   "lstrip": False, "rstrip": False, "normalized": False}],
                                 "model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}}), r"added tokens \['<s>'\]"),
    "structure": ('{"added_tokens": "x", "model": {"type": "BPE", "vocab": {}, "merges": []}}', r"library reads"),
    "a list": ("[1, 2]", r"expected a JSON object"),
    "unknown model": (json.dumps({"model": {"type": "Unigram", "vocab": []}}), r"Unigram"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_damaged_tokenizer_file_is_one_error_naming_the_file(tmp_path, case, bpe):
    text, message = BAD[case]
    (tmp_path / "tokenizer.json").write_text(text)
    for load in (load_tokenizer, BPETokenizer.load, lambda p: tokenizer_from_directory(p.parent)):
        with pytest.raises(CheckpointError, match=message) as e:
            load(tmp_path / "tokenizer.json")
        assert str(tmp_path / "tokenizer.json") in str(e.value)


def test_damaged_tokenizer_json_of_a_lab_bpe_is_an_error_naming_the_file(tmp_path, bpe):
    data = json.loads(bpe.to_json())
    data["model"]["merges"][5] = ["Ġt", "zzzz"]   # a merge of a token the vocabulary lacks
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=f"{re.escape(str(tmp_path / 'tokenizer.json'))}: .*"):
        load_tokenizer(tmp_path / "tokenizer.json")


def test_earlier_format_with_two_merges_making_the_same_bytes_is_refused_by_name():
    # 256 = ab, 257 = (ab)c, 258 = bc, 259 = a(bc): 257 and 259 are both b"abc"
    with pytest.raises(InputError, match=r"merge 3 makes token 259 with the bytes b'abc' of token 257"):
        BPETokenizer.from_json('{"type": "bpe", "merges": [[97, 98], [256, 99], [98, 99], [97, 258]]}')


def test_bpe_refuses_bad_arguments_clearly(bpe):
    with pytest.raises(InputError, match="encode: text must be a str, got b.abc."):
        bpe.encode(b"abc")
    with pytest.raises(InputError, match=f"token id {bpe.vocab_size} is outside"):
        bpe.decode([bpe.vocab_size])
    with pytest.raises(InputError, match="token id -1 is outside"):
        bpe.decode([-1])
    with pytest.raises(InputError, match="not a valid regular expression"):
        BPETokenizer.train("abc", 300, pattern="((")
    with pytest.raises(InputError, match=r"token ids must be integers, got \['a'\]"):
        bpe.decode(["a"])
    for call in (bpe.encode, lambda t: BPETokenizer.train(t, 300)):
        with pytest.raises(InputError, match=r"lone surrogate '\\ud800' at position 1"):
            call("a\ud800b")


def test_model_directory_carries_its_tokenizer_in_the_same_save(tmp_path, use_backend, bpe):
    transformers = pytest.importorskip("transformers")
    llama = lab.LlamaLM(lab.LlamaConfig(vocab_size=bpe.vocab_size, hidden_size=8, intermediate_size=16,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                        max_position_embeddings=8))
    for name, model, fmt in (("gpt", _model(bpe.vocab_size), "lab"), ("gpt-hf", _model(bpe.vocab_size), "hf"),
                             ("llama", llama, "lab")):
        d = model.save_pretrained(tmp_path / name, format=fmt, tokenizer=bpe)
        assert tokenizer_from_directory(d).to_json() == bpe.to_json()
        assert transformers.AutoTokenizer.from_pretrained(str(d))(TEXTS[4])["input_ids"] == bpe.encode(TEXTS[4]).tolist()
    char = CharTokenizer("abc")
    _model(3).save_pretrained(tmp_path / "char", tokenizer=char)
    assert tokenizer_from_directory(tmp_path / "char").chars == ["a", "b", "c"]
    with pytest.raises(InputError, match="tokenizer must be a lab tokenizer .* got 'abc'"):
        _model(3).save_pretrained(tmp_path / "bad", tokenizer="abc")
    assert not (tmp_path / "bad").exists()   # nothing half-written


def test_a_tokenizer_writing_the_models_files_is_refused_and_nothing_changes(tmp_path, numpy_backend, bpe):
    class Rogue:
        def save(self, directory):
            (Path(directory) / "config.json").write_text("{}")

    save_checkpoint(tmp_path, _model(bpe.vocab_size), bpe)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(InputError, match="tokenizer.save wrote config.json, a file of the save it is part of"):
        save_checkpoint(tmp_path, _model(bpe.vocab_size), Rogue())
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_bpe_training_with_a_vocab_size_far_beyond_the_text_learns_what_the_text_offers():
    """The trainer reserved room for vocab_size at once: 10**9 aborted the whole process (Rust out of memory, no
    exception to catch). A text offers at most one merge per byte, so the result is the same as with that bound."""
    text = "hello world héllo 😀 " * 20
    code = ("from lab.data.bpe import BPETokenizer; import sys; "
            f"t = BPETokenizer.train({text!r}, vocab_size=10**9); print(t.vocab_size, t.encode('héllo 😀').tolist())")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]   # in a child: a regression must not take pytest down with it
    bound = BPETokenizer.train(text, vocab_size=256 + len(text.encode()))
    assert run.stdout.split(" ", 1) == [str(bound.vocab_size), f"{bound.encode('héllo 😀').tolist()}\n"]
    assert bound.vocab_size < 256 + len(text.encode())   # (the bound is not what limited it)
