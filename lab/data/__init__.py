"""Text: the corpora bundled with the package (corpora/), the character and BPE (bpe.py) tokenizers, and batching."""
import json
from pathlib import Path

import numpy as np

from ..checks import InputError

CORPUS_DIR = Path(__file__).resolve().parent / "corpora"


def list_corpora():
    return sorted(p.stem for p in CORPUS_DIR.glob("*.txt"))


def load_corpus(name="kjv"):
    """The text of a bundled corpus (no network), or of a file when `name` is a path."""
    path = Path(name)
    if not path.is_file():
        path = CORPUS_DIR / f"{name}.txt"
    if not path.is_file():
        what = "a directory, not a text file" if Path(name).is_dir() else "not a file"
        raise FileNotFoundError(f"no corpus {name!r}: {what}, and not one of the bundled corpora {list_corpora()}")
    data = path.read_bytes()
    # the UTF-8 byte-order mark some editors write is no text: kept, it became a character of the vocabulary
    bom = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    data = data[bom:]
    if not data:
        raise InputError(f"corpus {path}: the file is empty (a corpus needs text to learn from)")
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise InputError(f"corpus {path}: UTF-16 text (byte-order mark at offset 0), not UTF-8: convert it to UTF-8, "
                         f"e.g. iconv -f utf-16 -t utf-8")
    nul = data.find(b"\0")
    if nul >= 0:  # NUL is valid UTF-8, so a binary file (or UTF-16 text) could otherwise pass as text
        raise InputError(f"corpus {path}: a binary file, not UTF-8 text (NUL byte at offset {bom + nul})")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"corpus {path}: not UTF-8 text: byte 0x{data[e.start]:02x} at offset {bom + e.start} ({e.reason}); "
                         f"lab reads corpora as UTF-8: convert the file (Latin-1 text: iconv -f latin1 -t utf-8)") from None


class CharTokenizer:
    """One token per character of the training text. Characters never seen in training are an error."""

    def __init__(self, chars):
        self.chars = sorted(set(chars))
        self.stoi = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text):
        return cls(text)

    @property
    def vocab_size(self):
        return len(self.chars)

    def encode(self, text):
        try:
            return np.fromiter((self.stoi[c] for c in text), dtype=np.int32, count=len(text))
        except KeyError as e:
            raise InputError(f"character {e.args[0]!r} is not in this tokenizer's vocabulary of "
                             f"{self.vocab_size} characters") from None

    def decode(self, ids):
        return "".join(self.chars[int(i)] for i in np.asarray(ids).reshape(-1))

    def decode_bytes(self, ids):
        """UTF-8 bytes of decode(ids) (the interface streaming decodes through: BPETokenizer.decode_bytes)."""
        return self.decode(ids).encode("utf-8")

    def to_json(self):
        return json.dumps({"type": "char", "chars": "".join(self.chars)})

    @classmethod
    def from_json(cls, text):
        data = json.loads(text)
        if data.get("type") != "char" or not isinstance(data.get("chars"), str):
            raise InputError("not a character tokenizer file: expected {\"type\": \"char\", \"chars\": \"...\"}")
        return cls(data["chars"])


def load_tokenizer_json(text):
    """A tokenizer from the JSON its to_json() wrote (the "type" field says which kind)."""
    try:
        kind = json.loads(text).get("type")
    except (json.JSONDecodeError, AttributeError) as e:
        raise InputError(f"not a tokenizer file: {e}") from None
    if kind == "char":
        return CharTokenizer.from_json(text)
    if kind == "bpe":
        from .bpe import BPETokenizer
        return BPETokenizer.from_json(text)
    raise InputError(f"unknown tokenizer type {kind!r}: expected 'char' or 'bpe'")


def train_val_split(ids, val_fraction=0.1):
    n = int(len(ids) * (1 - val_fraction))
    return ids[:n], ids[n:]


def char_dataset(corpus="kjv", val_fraction=0.1):
    """(CharTokenizer, train ids, val ids) for a bundled corpus or a text file: the usual start of a run."""
    text = load_corpus(corpus)
    tok = CharTokenizer.from_text(text)
    train_ids, val_ids = train_val_split(tok.encode(text), val_fraction)
    return tok, train_ids, val_ids


def min_tokens(block_size):
    """The shortest id sequence get_batch draws blocks from (a start is drawn from [0, len - block_size - 1))."""
    return block_size + 2


def get_batch(ids, batch_size, block_size, rng):
    """Random contiguous blocks: x = ids[i : i+T], y = ids[i+1 : i+T+1]. Deterministic given rng's state."""
    if len(ids) < min_tokens(block_size):
        raise InputError(f"text of {len(ids)} tokens is too short for block_size {block_size} "
                         f"(needs at least {min_tokens(block_size)})")
    starts = rng.integers(0, len(ids) - block_size - 1, size=batch_size)
    x = np.stack([ids[s:s + block_size] for s in starts])
    y = np.stack([ids[s + 1:s + block_size + 1] for s in starts])
    return x, y
