"""Text: the corpora bundled with the package (corpora/), the character and BPE (bpe.py) tokenizers, and batching."""
import json
from pathlib import Path

import numpy as np

from ..checks import InputError, integer, show

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
        if isinstance(data, dict) and "model" in data:
            return cls._from_word_level(data)
        if not isinstance(data, dict) or data.get("type") != "char" or not isinstance(data.get("chars"), str):
            raise InputError("not a character tokenizer file: expected {\"type\": \"char\", \"chars\": \"...\"}")
        return cls(data["chars"])

    @classmethod
    def _from_word_level(cls, data):
        """From the `tokenizers` WordLevel vocabulary of single characters that export writes (tokenizer.json)."""
        vocab = data["model"].get("vocab") if isinstance(data["model"], dict) else None
        if isinstance(vocab, dict) and all(isinstance(c, str) and len(c) == 1 for c in vocab):
            tok = cls(vocab)
            if tok.stoi == vocab:
                return tok
        raise InputError("not a character tokenizer: tokenizer.json's vocabulary must map single characters, in "
                         "sorted order, to 0, 1, 2, ...")

    def save(self, directory):
        """tokenizer.json (lab's character format) into `directory` in one save; other files there are kept."""
        from ..io import atomic_files
        with atomic_files(directory) as files:
            self.write(files)
        return Path(directory)

    def write(self, files):
        """Stage this tokenizer's file in a save (lab.io.atomic_files): a checkpoint writes it with its model."""
        files.write_text(TOKENIZER_FILE, self.to_json())


TOKENIZER_FILE, TOKENIZER_CONFIG_FILE = "tokenizer.json", "tokenizer_config.json"
LAB_TOKENIZER_FILE = "lab_tokenizer.json"   # lab's tokenizer beside the Hugging Face files of an export
# a pretrained tokenizer's files beside those two, which transformers reads over tokenizer_config.json: a save of
# another tokenizer removes them (lab.io.REMOVABLE)
TOKENIZER_SIDE_FILES = ("special_tokens_map.json", "chat_template.jinja")


def load_tokenizer_json(text):
    """A lab tokenizer from its JSON: lab's {"type": "char" | "bpe"} files, or tokenizer.json (the `tokenizers`
    format) of a byte-level BPE or of export's single-character vocabulary."""
    from .bpe import BPETokenizer, json_object
    data = json_object(text)
    kind = data.get("type")
    if kind == "char":
        return CharTokenizer.from_json(text)
    if kind == "bpe":
        return BPETokenizer.from_json(text)
    model = data.get("model")
    if isinstance(model, dict) and model.get("type") == "WordLevel":
        return CharTokenizer.from_json(text)
    if isinstance(model, dict) and model.get("type", "BPE") == "BPE":
        return BPETokenizer.from_json(text)
    if model is not None:
        raise InputError(f"tokenizer.json with a {show(model.get('type') if isinstance(model, dict) else model)} "
                         f"model: lab's own tokenizers are byte-level BPE and single characters (lab.load_tokenizer "
                         f"loads pretrained ones)")
    raise InputError(f"unknown tokenizer type {kind!r}: expected 'char' or 'bpe', or tokenizer.json with a model")


def write_tokenizer(files, tokenizer):
    """Stage `tokenizer`'s files in a save (lab.io.atomic_files' staging), so that they land with the model: lab's
    tokenizers write them themselves; any other with save(directory) (a pretrained one) saves into a scratch
    directory whose files are copied in."""
    import tempfile
    # an earlier tokenizer's template and special-token map there would dress this one in them (transformers reads
    # both over tokenizer_config.json): they go in the same save unless this tokenizer writes its own
    files.removed.update(TOKENIZER_SIDE_FILES)
    # an export's lab_tokenizer.json, which readers take over tokenizer.json, unless this save writes it too
    files.removed.add(LAB_TOKENIZER_FILE)
    if callable(getattr(tokenizer, "write", None)):
        return tokenizer.write(files)
    if not callable(getattr(tokenizer, "save", None)):
        raise InputError(f"tokenizer must be a lab tokenizer (CharTokenizer, BPETokenizer) or one with "
                         f"save(directory) (lab.load_tokenizer's), got {show(tokenizer)}")
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer.save(scratch)
        for path in sorted(Path(scratch).iterdir()):
            if path.is_file() and not path.name.startswith("."):
                if path.name in files.files:   # the model's config.json or weights, staged before
                    raise InputError(f"tokenizer.save wrote {path.name}, a file of the save it is part of: a "
                                     f"tokenizer's files are its own")
                files.path(path.name).write_bytes(path.read_bytes())


def lab_tokenizer_file(directory):
    """The file of lab's own tokenizer in a model directory, checkpoint or export: lab_tokenizer.json (an export's),
    or tokenizer.json in lab's character or BPE format or marked lab's by tokenizer_config.json's "lab_tokenizer".
    None when the directory holds no such file (a pretrained tokenizer's files, or none)."""
    from ..io import read_json
    d = Path(directory)
    path, config = d / TOKENIZER_FILE, d / TOKENIZER_CONFIG_FILE
    if (d / LAB_TOKENIZER_FILE).is_file():
        return d / LAB_TOKENIZER_FILE
    if path.is_file() and read_json(path, "tokenizer").get("type") in ("char", "bpe"):
        return path
    if config.is_file() and "lab_tokenizer" in read_json(config, "tokenizer config") or path.is_file() and \
            not config.is_file():   # tokenizer.json alone: lab's BPE or export's characters, or an error naming it
        return path
    return None


def tokenizer_from_directory(directory):
    """lab's own tokenizer (CharTokenizer, BPETokenizer) from a model directory, checkpoint or export
    (lab_tokenizer_file). A pretrained tokenizer there, or a missing or damaged file, is a CheckpointError naming
    it: lab.load_tokenizer (lab.data.pretrained) loads every kind, handing lab's own here."""
    from ..io import CheckpointError
    d = Path(directory)
    path = lab_tokenizer_file(d)
    if path is not None:
        return load_tokenizer_file(path)
    if (d / TOKENIZER_CONFIG_FILE).is_file():
        raise CheckpointError(f"{d}: holds a pretrained tokenizer ({TOKENIZER_CONFIG_FILE} without lab's mark), "
                              f"not one of lab's own: load it with lab.load_tokenizer")
    raise CheckpointError(f"{d}: no tokenizer found (looked for {LAB_TOKENIZER_FILE}, {TOKENIZER_FILE}, "
                          f"{TOKENIZER_CONFIG_FILE})")


def load_tokenizer_file(path):
    """lab's tokenizer from its file; a missing or damaged file is a CheckpointError naming it."""
    from ..io import CheckpointError
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: tokenizer file not found")
    try:
        return load_tokenizer_json(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def load_conversations(name):
    """The conversations of a bundled chat set (corpora/NAME.jsonl) or of a JSONL file: one {"messages": [{"role":
    ..., "content": ...}, ...]} a line, the chat format transformers' and TRL's datasets use."""
    path = Path(name)
    path = path if path.is_file() else CORPUS_DIR / f"{name}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no conversations {name!r}: not a file, and not one of the bundled sets "
                                f"{sorted(p.stem for p in CORPUS_DIR.glob('*.jsonl'))}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text: byte 0x{e.object[e.start]:02x} at offset {e.start}; convert the "
                         f"file to UTF-8") from None
    convs = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            messages = json.loads(line)["messages"]
            if not (isinstance(messages, list) and messages and all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in messages)):
                raise ValueError
        except (ValueError, KeyError, TypeError):
            raise InputError(f"{path}: line {n} is no {{\"messages\": [{{\"role\": str, \"content\": str}}, ...]}} "
                             f"object: {line[:80]!r}") from None
        convs.append(messages)
    return convs


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
    """Random contiguous blocks: x = ids[i : i+T], y = ids[i+1 : i+T+1]. Deterministic given rng's state.
    From Examples: random whole rows (their own length)."""
    if isinstance(ids, Examples):
        return ids.batch(batch_size, rng)
    if len(ids) < min_tokens(block_size):
        raise InputError(f"text of {len(ids)} tokens is too short for block_size {block_size} "
                         f"(needs at least {min_tokens(block_size)})")
    starts = rng.integers(0, len(ids) - block_size - 1, size=batch_size)
    x = np.stack([ids[s:s + block_size] for s in starts])
    y = np.stack([ids[s + 1:s + block_size + 1] for s in starts])
    return x, y


IGNORE_INDEX = -100   # cross_entropy's ignore_index: a target the loss skips


class Examples:
    """Whole training examples instead of windows of one token stream: `inputs` (n, T) token ids and `targets`
    (n, T), where a target of -100 adds nothing to the loss (a prompt, the padding). A Trainer given Examples as
    train_ids / val_ids draws batches of whole rows, T tokens each: instruction tuning with the loss masked to the
    answers."""

    def __init__(self, inputs, targets):
        x, y = np.asarray(inputs), np.asarray(targets)
        if not (x.ndim == 2 and x.shape == y.shape and x.shape[0] > 0 and x.shape[1] > 0
                and x.dtype.kind in "iu" and y.dtype.kind in "iu"):
            raise InputError(f"Examples: inputs and targets must be integer arrays of one shape (examples, tokens), "
                             f"at least (1, 1), got {x.dtype} {x.shape} and {y.dtype} {y.shape}")
        if not (y != IGNORE_INDEX).any(axis=1).all():
            rows = np.flatnonzero(~(y != IGNORE_INDEX).any(axis=1))
            raise InputError(f"Examples: example(s) {rows[:8].tolist()} have every target masked ({IGNORE_INDEX}): "
                             f"nothing to learn from (a prompt longer than the length?)")
        self.inputs, self.targets = x.astype(np.int64), y.astype(np.int64)

    def __len__(self):
        return len(self.inputs)

    @property
    def width(self):
        return self.inputs.shape[1]

    def check_vocab(self, name, vocab_size):
        """Raise InputError unless every input id and every unmasked target is in [0, vocab_size)."""
        for what, a in (("inputs", self.inputs), ("targets", self.targets[self.targets != IGNORE_INDEX])):
            if a.min() < 0 or a.max() >= vocab_size:
                raise InputError(f"{name}: {what} hold token ids {a.min()}..{a.max()}, the model's vocabulary is "
                                 f"[0, {vocab_size}) (targets may also be {IGNORE_INDEX}: masked)")
        return self

    def batch(self, batch_size, rng):
        rows = rng.integers(0, len(self), size=batch_size)
        return self.inputs[rows], self.targets[rows]

    @classmethod
    def from_chat(cls, tokenizer, conversations, length=None, pad_id=None):
        """Examples from conversations ([{"role": ..., "content": ...}, ...], each ending in the assistant's answer)
        rendered with the tokenizer's chat template; the loss is on the last answer only (its tokens and the
        template's end-of-turn after it). Rows are padded to `length` (default: the longest) with `pad_id` (default
        the tokenizer's eos); a longer conversation is an error naming it."""
        if not hasattr(tokenizer, "apply_chat_template"):
            raise InputError(f"Examples.from_chat: the tokenizer must have a chat template (lab.load_tokenizer of a "
                             f"chat model), got {show(tokenizer)}")
        if length is not None:
            length = integer("Examples.from_chat: length", length, low=1)
        convs = list(conversations)
        if not convs:
            raise InputError("Examples.from_chat: no conversations given")
        rows = []
        for i, conv in enumerate(convs):
            if not (isinstance(conv, (list, tuple)) and conv and isinstance(conv[-1], dict)
                    and conv[-1].get("role") == "assistant"):
                raise InputError(f"Examples.from_chat: conversation {i} must be a list of messages ending in the "
                                 f"assistant's answer, got {show(conv)}")
            prompt = tokenizer.apply_chat_template(list(conv[:-1]), add_generation_prompt=True)
            ids = tokenizer.apply_chat_template(list(conv))
            if ids[:len(prompt)] != prompt:  # a template that renders history differently once answered
                raise InputError(f"Examples.from_chat: conversation {i}: the chat template does not render the "
                                 f"prompt as the start of the whole conversation; cannot tell where the answer starts")
            # the template may close the turn with a newline after the end-of-turn token; it is no answer token
            end = len(ids)
            while end > len(prompt) + 1 and tokenizer.decode([ids[end - 1]]).isspace():
                end -= 1
            rows.append((ids[:end], len(prompt)))
        longest = max(len(ids) for ids, _ in rows)
        length = longest if length is None else length
        if longest > length:
            i = max(range(len(rows)), key=lambda k: len(rows[k][0]))
            raise InputError(f"Examples.from_chat: conversation {i} is {longest} tokens, longer than length {length}")
        pad = getattr(tokenizer, "eos_token_id", None) if pad_id is None else pad_id
        if not isinstance(pad, (int, np.integer)):
            raise InputError(f"Examples.from_chat: the tokenizer has no eos token to pad with: pass pad_id=")
        x = np.full((len(rows), length), pad, np.int64)
        y = np.full((len(rows), length), IGNORE_INDEX, np.int64)
        for r, (ids, start) in enumerate(rows):
            x[r, :len(ids)] = ids
            # target t is the token after input t: the answer's tokens are predicted from start - 1 on
            y[r, start - 1:len(ids) - 1] = ids[start:]
        return cls(x, y)
