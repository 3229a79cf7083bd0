"""Byte-level BPE (as GPT-2): text is split into chunks (words with their leading space, digit runs, punctuation
runs, whitespace), each chunk is a sequence of UTF-8 bytes, and learned merges join frequent adjacent pairs.
Every byte is a token, so any UTF-8 text round-trips exactly."""
import json
import re
from collections import Counter

import numpy as np

from ..checks import InputError, integer, show

# Every character is \w, \s or neither, so the chunks cover the text completely.
SPLIT = r" ?\w+| ?[^\s\w]+|\s+(?!\S)|\s+"


def _merge(seq, pair, new):
    out, i = [], 0
    while i < len(seq):
        if i + 1 < len(seq) and seq[i] == pair[0] and seq[i + 1] == pair[1]:
            out.append(new)
            i += 2
        else:
            out.append(seq[i])
            i += 1
    return tuple(out)


class BPETokenizer:
    def __init__(self, merges, pattern=SPLIT):
        self.merges = [tuple(m) for m in merges]
        self.pattern = pattern
        self._re = re.compile(pattern)
        self.ranks = {pair: 256 + i for i, pair in enumerate(self.merges)}
        self.vocab = {i: bytes([i]) for i in range(256)}
        for (a, b), new in self.ranks.items():
            self.vocab[new] = self.vocab[a] + self.vocab[b]
        self._cache = {}

    @classmethod
    def train(cls, text, vocab_size, pattern=SPLIT):
        """Learn vocab_size - 256 merges from `text`, most frequent pair first (ties: the smaller pair)."""
        try:
            vocab_size = integer("vocab_size", vocab_size, low=256)
        except InputError as e:
            raise InputError(f"{e} (one token per byte, then the merges)") from None
        if not isinstance(text, str):  # bytes or a list would fail inside re.findall with a message about patterns
            raise InputError(f"text must be a str to learn merges from, got {show(text)}")
        words = Counter(tuple(m.encode("utf-8")) for m in re.findall(pattern, text))
        merges = []
        for new in range(256, vocab_size):
            pairs = Counter()
            for w, n in words.items():
                for pair in zip(w, w[1:]):
                    pairs[pair] += n
            if not pairs:
                break
            best = min(pairs, key=lambda p: (-pairs[p], p))
            merges.append(best)
            words = Counter({_merge(w, best, new) if best[0] in w else w: n for w, n in words.items()})
        return cls(merges, pattern)

    @property
    def vocab_size(self):
        return 256 + len(self.merges)

    def _encode_chunk(self, chunk):
        ids = self._cache.get(chunk)
        if ids is None:
            ids = tuple(chunk.encode("utf-8"))
            while len(ids) > 1:
                pair = min(zip(ids, ids[1:]), key=lambda p: self.ranks.get(p, 1 << 30))
                if pair not in self.ranks:
                    break
                ids = _merge(ids, pair, self.ranks[pair])
            if len(self._cache) < 100_000:
                self._cache[chunk] = ids
        return ids

    def encode(self, text):
        out = []
        for chunk in self._re.findall(text):
            out.extend(self._encode_chunk(chunk))
        return np.asarray(out, dtype=np.int32)

    def decode_bytes(self, ids):
        """The UTF-8 bytes of the ids, which may end inside a character (a stream decodes them incrementally)."""
        try:
            return b"".join(self.vocab[int(i)] for i in np.asarray(ids).reshape(-1))
        except KeyError as e:
            raise InputError(f"token id {e.args[0]} is outside this tokenizer's vocabulary of {self.vocab_size}") from None

    def decode(self, ids):
        """Text of the ids; a sequence cut inside a multi-byte character shows U+FFFD there."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def to_json(self):
        return json.dumps({"type": "bpe", "pattern": self.pattern, "merges": [list(m) for m in self.merges]})

    @classmethod
    def from_json(cls, text):
        data = json.loads(text)
        merges = data.get("merges")
        if data.get("type") != "bpe" or not isinstance(merges, list):
            raise InputError('not a BPE tokenizer file: expected {"type": "bpe", "merges": [[a, b], ...]}')
        for i, m in enumerate(merges):
            if not (isinstance(m, list) and len(m) == 2 and all(isinstance(t, int) and 0 <= t < 256 + i for t in m)):
                raise InputError(f"BPE merge {i} is {m!r}: expected two token ids below {256 + i}")
        pattern = data.get("pattern", SPLIT)
        if not isinstance(pattern, str):
            raise InputError(f"BPE pattern must be a regular expression string, got {pattern!r}")
        try:
            re.compile(pattern)
        except re.error as e:
            raise InputError(f"BPE pattern {pattern!r} is not a valid regular expression ({e})") from None
        return cls(merges, pattern)
