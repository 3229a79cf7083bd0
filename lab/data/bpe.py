"""Byte-level BPE (as GPT-2), trained and run by the `tokenizers` library: text is split into chunks (words with
their leading space, digit runs, punctuation runs, whitespace), each chunk is a sequence of UTF-8 bytes, and learned
merges join frequent adjacent pairs. Ids 0-255 are the bytes, so any UTF-8 text round-trips exactly.

Saved as tokenizer.json, the `tokenizers` format that transformers loads. Files of lab's earlier format
({"type": "bpe", "merges": [[a, b], ...]}, merge i making token 256 + i) load and encode as they did."""
import itertools
import json
import re
from pathlib import Path

import numpy as np

from ..checks import InputError, integer, show

# Python `re` syntax. Every character is \w, \s or neither, so the chunks cover the text completely.
SPLIT = r" ?\w+| ?[^\s\w]+|\s+(?!\S)|\s+"
TOKENIZER_FILE, CONFIG_FILE = "tokenizer.json", "tokenizer_config.json"

# `tokenizers` runs Oniguruma, whose \w also takes combining marks and whose \s lacks the separators \x1c-\x1f that
# Python counts as space; these classes agree with Python's on every code point (test_bpe_split_classes_match_python)
_CLASSES = {"w": r"\p{L}\p{N}_", "s": r"\s\x1c-\x1f"}


def _onig(pattern):
    """A Python `re` pattern in the Oniguruma syntax `tokenizers` runs, matching the same chunks."""
    # Python's named groups (?P<name>...) and (?P=name) are (?<name>...) and \k<name> there
    pattern = re.sub(r"(?<!\\)\(\?P=(\w+)\)", r"\\k<\1>", re.sub(r"(?<!\\)\(\?P<", "(?<", pattern))
    out, i, in_class = [], 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            e = pattern[i + 1]
            if e.lower() in _CLASSES:
                body = _CLASSES[e.lower()]
                negated = e.isupper()
                # inside a set, a negated class is a nested set (Oniguruma nests them; Python's sets do not)
                out.append(f"[^{body}]" if negated else (body if in_class else f"[{body}]"))
            else:
                out.append(pattern[i:i + 2])
            i += 2
            continue
        if not in_class and c == "[":
            in_class = True
            j = i + 1 + (pattern[i + 1:i + 2] == "^")
            j += pattern[j:j + 1] == "]"   # a ] right after [ or [^ is a literal in both syntaxes
            out.append(pattern[i:j].replace("]", r"\]"))
            i = j
            continue
        if in_class and c == "]":
            in_class = False
        out.append(r"\[" if in_class and c == "[" else c)
        i += 1
    return "".join(out)


def _byte_chars():
    """GPT-2's printable stand-in character for each byte, as the `tokenizers` ByteLevel pre-tokenizer writes it."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


_SPLIT_RE = re.compile(SPLIT)
BYTE_CHARS = _byte_chars()
_CHAR_BYTE = {c: b for b, c in enumerate(BYTE_CHARS)}


def json_object(text):
    """The JSON object a tokenizer file holds, or an InputError saying what it holds instead."""
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:   # RecursionError: arrays nested thousands deep
        raise InputError(f"not a tokenizer file: invalid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise InputError(f"not a tokenizer file: expected a JSON object, got {type(data).__name__}")
    return data


def _refuse_surrogates(text, what):
    """A lone surrogate (from decoding bytes with errors="surrogateescape") has no UTF-8 bytes to be tokens."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"{what}: the text has a lone surrogate {text[e.start]!r} at position {e.start}, which is "
                         f"no character UTF-8 can encode") from None


def _tokenizer(vocab, merges, pattern):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    if not isinstance(pattern, str):
        raise InputError(f"BPE pattern must be a regular expression string, got {show(pattern)}")
    try:
        split = Regex(_onig(pattern))
    except Exception as e:   # the regex engine's own error type
        raise InputError(f"BPE pattern {pattern!r} is not a valid regular expression ({e})") from None
    tok = Tokenizer(models.BPE(vocab, merges) if vocab is not None else models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(split, behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


class BPETokenizer:
    def __init__(self, merges, pattern=SPLIT):
        """From merges of token ids, lab's earlier format: ids 0-255 are the bytes, merge i makes token 256 + i."""
        vocab = {i: bytes([i]) for i in range(256)}
        for i, (a, b) in enumerate(merges):
            vocab[256 + i] = vocab[a] + vocab[b]
        strings = {self._chars(v): i for i, v in vocab.items()}
        if len(strings) < len(vocab):   # `tokenizers` keys its vocabulary by string: one id per byte sequence
            seen = {}
            for i, v in vocab.items():
                if v in seen:
                    raise InputError(f"BPE merge {i - 256} makes token {i} with the bytes {v!r} of token {seen[v]}: "
                                     f"a vocabulary holds each byte sequence once")
                seen[v] = i
        pairs = [(self._chars(vocab[a]), self._chars(vocab[b])) for a, b in merges]
        self._set(_tokenizer(strings, pairs, pattern))

    @staticmethod
    def _chars(data):
        return "".join(BYTE_CHARS[b] for b in data)

    def _set(self, tok):
        """Take a `tokenizers.Tokenizer` whose vocabulary holds all 256 bytes at ids 0-255."""
        self._tok = tok
        vocab = tok.get_vocab(with_added_tokens=False)
        self.vocab = {i: bytes(_CHAR_BYTE[c] for c in s) for s, i in vocab.items()}
        # the merges as id pairs in rank order, and the token each makes, as in the earlier format
        pairs = [m.split(" ") if isinstance(m, str) else m for m in json.loads(tok.to_str())["model"]["merges"]]
        self.merges = [(vocab[a], vocab[b]) for a, b in pairs]
        self.ranks = {(vocab[a], vocab[b]): vocab[a + b] for a, b in pairs}
        pre = json.loads(tok.to_str())["pre_tokenizer"] or {}
        split = next((p for p in pre.get("pretokenizers", [pre]) if p.get("type") == "Split"), {})
        self._split = _SPLIT_RE if split.get("pattern") == {"Regex": _onig(SPLIT)} else None

    @classmethod
    def _wrap(cls, tok):
        self = cls.__new__(cls)
        self._set(tok)
        return self

    @classmethod
    def train(cls, text, vocab_size, pattern=SPLIT):
        """Learn up to vocab_size - 256 merges from `text`, most frequent pair first (`tokenizers`' BpeTrainer:
        ties go to the pair of smaller ids, so the same text always gives the same vocabulary)."""
        from tokenizers import trainers
        try:
            vocab_size = integer("vocab_size", vocab_size, low=256)
        except InputError as e:
            raise InputError(f"{e} (one token per byte, then the merges)") from None
        if not isinstance(text, str):
            raise InputError(f"text must be a str to learn merges from, got {show(text)}")
        _refuse_surrogates(text, "train")
        tok = _tokenizer(None, None, pattern)
        # each merge joins two tokens of the text, so it offers at most one per byte: the trainer reserves room for
        # vocab_size up front (vocab_size=10**9 aborted the process, out of memory)
        tok.train_from_iterator([text], trainers.BpeTrainer(
            vocab_size=min(vocab_size, 256 + len(text.encode("utf-8"))), min_frequency=0, show_progress=False, initial_alphabet=BYTE_CHARS))
        data = json.loads(tok.to_str())["model"]
        # the trainer numbers the bytes in order of their stand-in characters: renumber them as the bytes, so that
        # ids 0-255 are bytes 0-255 whatever the corpus (the merges' tokens keep their order after them)
        learned = sorted((i, s) for s, i in data["vocab"].items() if s not in _CHAR_BYTE)
        vocab = {**{c: b for b, c in enumerate(BYTE_CHARS)}, **{s: 256 + k for k, (_, s) in enumerate(learned)}}
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in data["merges"]]
        return cls._wrap(_tokenizer(vocab, merges, pattern))

    @property
    def vocab_size(self):
        return len(self.vocab)

    def encode(self, text):
        if not isinstance(text, str):
            raise InputError(f"encode: text must be a str, got {show(text)}")
        try:
            if self._split is None:   # a split only the library runs
                return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)
            # the library splits a long text slowly (1.3 s for the 1 MB kjv, 0.2 s here): Python's regex cuts the
            # same chunks (the classes agree, _onig), and each distinct chunk goes through the library once
            chunks = self._split.findall(text)
            distinct = list(dict.fromkeys(chunks))
            ids = {c: e.ids for c, e in zip(distinct, self._tok.encode_batch_fast(distinct, add_special_tokens=False))}
        except TypeError:   # the library takes only text UTF-8 can encode
            _refuse_surrogates(text, "encode")
            raise
        return np.fromiter(itertools.chain.from_iterable(map(ids.__getitem__, chunks)), dtype=np.int32)

    def decode_bytes(self, ids):
        """The UTF-8 bytes of the ids, which may end inside a character (a stream decodes them incrementally)."""
        try:
            return b"".join(self.vocab[int(i)] for i in np.asarray(ids).reshape(-1))
        except KeyError as e:
            raise InputError(f"token id {e.args[0]} is outside this tokenizer's vocabulary of {self.vocab_size}") from None
        except (TypeError, ValueError):
            raise InputError(f"token ids must be integers, got {show(ids)}") from None

    def decode(self, ids):
        """Text of the ids; a sequence cut inside a multi-byte character shows U+FFFD there."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def to_json(self):
        """tokenizer.json: the `tokenizers` library's format (transformers' PreTrainedTokenizerFast loads it)."""
        return self._tok.to_str()

    @classmethod
    def from_json(cls, text):
        """From tokenizer.json (a byte-level BPE) or lab's earlier {"type": "bpe", "merges": ...} file."""
        data = json_object(text)
        if "model" in data:
            return cls._from_tokenizers(data, text)
        merges = data.get("merges")
        if data.get("type") != "bpe" or not isinstance(merges, list):
            raise InputError('not a BPE tokenizer file: expected tokenizer.json (the `tokenizers` format) or lab\'s '
                             '{"type": "bpe", "merges": [[a, b], ...]}')
        for i, m in enumerate(merges):
            if not (isinstance(m, list) and len(m) == 2 and all(type(t) is int and 0 <= t < 256 + i for t in m)):
                raise InputError(f"BPE merge {i} is {m!r}: expected two token ids below {256 + i}")
        return cls(merges, data.get("pattern", SPLIT))

    @classmethod
    def _from_tokenizers(cls, data, text):
        from tokenizers import Tokenizer, models
        model = data["model"]
        if isinstance(model, dict) and model.get("type", "BPE") == "BPE" and not isinstance(model.get("merges"), list):
            raise InputError("BPE tokenizer without merges: model.merges must be a list of token pairs")
        try:
            tok = Tokenizer.from_str(text)
        except BaseException as e:   # its errors, and its Rust panics: pyo3's PanicException is no Exception
            if not isinstance(e, Exception) and type(e).__name__ != "PanicException":
                raise
            raise InputError(f"not a tokenizer the `tokenizers` library reads ({e})") from None
        if not isinstance(tok.model, models.BPE):
            raise InputError(f"not a BPE tokenizer: its model is {type(tok.model).__name__}")
        added = [t.content for t in tok.get_added_tokens_decoder().values()]
        if added:
            raise InputError(f"a BPE tokenizer with added tokens {added[:5]} is a pretrained one, not lab's own: "
                             f"load it with lab.load_tokenizer")
        parsed = json.loads(tok.to_str())
        if parsed["normalizer"] is not None or '"ByteLevel"' not in json.dumps(parsed["pre_tokenizer"]):
            raise InputError("not a lab byte-level BPE tokenizer: it must have no normalizer and a ByteLevel "
                             "pre-tokenizer (every byte of the text a token before the merges)")
        vocab = tok.get_vocab(with_added_tokens=False)
        if not all(s and set(s) <= _CHAR_BYTE.keys() for s in vocab):
            raise InputError("not a byte-level BPE tokenizer: its vocabulary has tokens that are not byte sequences")
        if [vocab.get(c) for c in BYTE_CHARS] != list(range(256)) or sorted(vocab.values()) != list(range(len(vocab))):
            raise InputError(f"not a lab byte-level BPE tokenizer: ids 0-255 must be the 256 bytes, and the ids "
                             f"0 to {len(vocab) - 1} each a token")
        return cls._wrap(tok)

    def save(self, directory):
        """tokenizer.json and tokenizer_config.json into `directory` in one save (other files there are kept):
        `tokenizers`, transformers' AutoTokenizer and lab.load_tokenizer load it."""
        from ..io import atomic_files
        with atomic_files(directory) as files:
            self.write(files)
        return Path(directory)

    def write(self, files):
        """Stage this tokenizer's files in a save (lab.io.atomic_files): a checkpoint writes them with its model."""
        files.write_text(TOKENIZER_FILE, self.to_json())
        files.write_json(CONFIG_FILE, {"tokenizer_class": "PreTrainedTokenizerFast", "lab_tokenizer": "bpe"})

    @classmethod
    def load(cls, path):
        """From a tokenizer file or a directory holding tokenizer.json; a damaged file is a CheckpointError."""
        from ..io import CheckpointError
        path = Path(path)
        path = path / TOKENIZER_FILE if path.is_dir() else path
        if not path.is_file():
            raise CheckpointError(f"{path}: tokenizer file not found")
        try:
            return cls.from_json(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: {e}") from None
