"""Pretrained tokenizers: tokenizer.json / tokenizer_config.json (Hugging Face's files), a GGUF file's vocabulary,
the shipped model's, or a Hub id, behind the interface of lab's own tokenizers plus apply_chat_template.

transformers does the loading and the chat templates: it converts a GGUF vocabulary into a `tokenizers` tokenizer
and renders templates with the exact Jinja environment (raise_exception, strftime_now, tojson, ...) the models'
templates are written against, so what lab gives is what transformers gives. It is imported only when a pretrained
tokenizer is loaded.
"""
import contextlib
import logging
from pathlib import Path

import numpy as np

from ..checks import InputError, show
from ..io import CheckpointError, _expect_file, atomic_files, read_json, reading
from .bpe import _refuse_surrogates

TOKENIZER_FILE, CONFIG_FILE = "tokenizer.json", "tokenizer_config.json"
TEMPLATE_FILE, SPECIAL_TOKENS_FILE = "chat_template.jinja", "special_tokens_map.json"


def load_tokenizer(name_or_path, revision=None, local_files_only=None):
    """The tokenizer of a directory (tokenizer.json with tokenizer_config.json, special_tokens_map.json and
    chat_template.jinja where present), of a .gguf file or a directory holding one, of a shipped model
    ("smollm2-135m-instruct") or of a Hub id (its tokenizer files alone, under lab.from_pretrained's cache and
    offline rules; `revision`, `local_files_only` as there). A directory holding one of lab's own tokenizers gives
    that tokenizer back (lab.data.tokenizer_from_directory)."""
    from .. import shipped
    from ..pretrained import _locate   # from_pretrained's rules for a name, a revision and the Hub cache
    path = _locate(name_or_path, revision, local_files_only, fetch="tokenizer", caller="load_tokenizer")
    if path.is_file():
        if path.suffix != ".gguf":
            raise CheckpointError(f"{path}: expected a tokenizer directory (tokenizer.json, tokenizer_config.json) "
                                  f"or a .gguf file")
        return PretrainedTokenizer._from_gguf(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such tokenizer directory or .gguf file, and not a shipped model "
                              f"({', '.join(shipped.SHIPPED)}) nor a Hub id ('org/name')")
    return PretrainedTokenizer._from_directory(path)


def _lab_own(d):
    from . import LAB_TOKENIZER_FILE
    if (d / LAB_TOKENIZER_FILE).is_file():
        return True
    if (d / TOKENIZER_FILE).is_file() and read_json(d / TOKENIZER_FILE, "tokenizer").get("type") in ("char", "bpe"):
        return True
    return (d / CONFIG_FILE).is_file() and "lab_tokenizer" in read_json(d / CONFIG_FILE, "tokenizer config")


@contextlib.contextmanager
def _quiet_transformers():
    """transformers logs its own advice (to install sentencepiece, about GGUF keys it skipped; at its first import
    without torch, as on Binder, that PyTorch was not found): not lab's. The level quiets its modules' loggers; the
    filter, its own, whose level its first import resets."""
    log = logging.getLogger("transformers")
    log.addFilter(_errors_only)
    try:
        import transformers  # noqa: F401  (then the level it configures is the one put back)
        level = log.level
        log.setLevel(logging.ERROR)
        try:
            yield
        finally:
            log.setLevel(level)
    finally:
        log.removeFilter(_errors_only)


def _errors_only(record):
    return record.levelno >= logging.ERROR


class PretrainedTokenizer:
    """A pretrained tokenizer (lab.load_tokenizer): encode, decode, decode_bytes (for streaming), the special ids,
    apply_chat_template, save. `template_source` is the file its chat template came from (named in errors)."""

    def __init__(self, hf, source, template_source=None):
        self._hf = hf
        self.source = Path(source)
        self.template_source = template_source
        self._bytes = None
        if hf.chat_template is not None:
            from jinja2 import TemplateError
            from transformers.utils.chat_template_utils import _compile_jinja_template
            # several named templates ({"default": ..., "tool_use": ...}, from tokenizer_config.json's list of
            # {"name", "template"}) are each compiled: one string was all this took, a TypeError for the rest
            named = hf.chat_template if isinstance(hf.chat_template, dict) else {None: hf.chat_template}
            for name, template in named.items():
                try:   # a template that cannot even compile is a damaged file, said at load, not at the first chat
                    _compile_jinja_template(template)
                except (TemplateError, TypeError) as e:
                    raise CheckpointError(f"{template_source}: the chat template{f' {name!r}' if name else ''} is "
                                          f"not valid Jinja ({type(e).__name__}: {e})") from None

    @classmethod
    def _from_directory(cls, d):
        if _lab_own(d):
            from . import tokenizer_from_directory
            return tokenizer_from_directory(d)
        ggufs = sorted(d.glob("*.gguf"))
        if not (d / TOKENIZER_FILE).exists() and len(ggufs) == 1:
            return cls._from_gguf(ggufs[0])
        with reading(d):   # tokenizer.json and its config of one save
            _expect_file(d / TOKENIZER_FILE, "tokenizer file (tokenizer.json)")
            data = read_json(d / TOKENIZER_FILE, "tokenizer file")
            if not isinstance(data.get("model"), dict) or not isinstance(data["model"].get("type", "BPE"), str):
                raise CheckpointError(f"{d / TOKENIZER_FILE}: not a `tokenizers` file: expected a \"model\" object "
                                      f"with a \"type\", got {show(data.get('model'))}")
            for name in (CONFIG_FILE, SPECIAL_TOKENS_FILE):
                if (d / name).exists():
                    read_json(d / name, name)
            template = TEMPLATE_FILE if (d / TEMPLATE_FILE).exists() else CONFIG_FILE
            if template == TEMPLATE_FILE:
                _expect_file(d / TEMPLATE_FILE, "chat template")
                try:
                    (d / TEMPLATE_FILE).read_text(encoding="utf-8")
                except UnicodeDecodeError as e:
                    raise CheckpointError(f"{d / TEMPLATE_FILE}: not UTF-8 text ({e})") from None
            hf = cls._load(d, d / TOKENIZER_FILE)
        return cls(hf, d, d / template)

    @classmethod
    def _from_gguf(cls, path):
        from ..gguf import _open
        reader = _open(path)
        if "tokenizer.ggml.tokens" not in reader.fields:
            raise CheckpointError(f"{path}: the GGUF file holds no tokenizer (no tokenizer.ggml.tokens)")
        return cls(_gguf_tokenizer(reader, path), path, path)

    @staticmethod
    def _load(d, named, **kwargs):
        with _quiet_transformers():
            from transformers import AutoTokenizer
        try:
            with _quiet_transformers():
                return AutoTokenizer.from_pretrained(str(d), local_files_only=True, **kwargs)
        except Exception as e:   # noqa: BLE001: `tokenizers` raises plain Exception for a malformed file
            raise CheckpointError(f"{named}: not a tokenizer transformers can load ({type(e).__name__}: "
                                  f"{str(e)[:300]})") from None

    def __repr__(self):
        return f"PretrainedTokenizer({self.source}, vocab_size={self.vocab_size})"

    @property
    def vocab_size(self):
        """The number of token ids, added tokens included."""
        return len(self._hf)

    bos_token_id = property(lambda self: self._hf.bos_token_id)
    eos_token_id = property(lambda self: self._hf.eos_token_id)
    pad_token_id = property(lambda self: self._hf.pad_token_id)
    chat_template = property(lambda self: self._hf.chat_template)

    def encode(self, text, add_special_tokens=True):
        if not isinstance(text, str):
            raise InputError(f"encode: text must be a str, got {show(text)}")
        _refuse_surrogates(text, "encode")
        return np.asarray(self._hf.encode(text, add_special_tokens=bool(add_special_tokens)), dtype=np.int32)

    def _ids(self, ids):
        arr = np.asarray(ids)
        if arr.dtype == object or arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise InputError(f"decode: ids must be integers, got {show(ids)}")
        arr = arr.reshape(-1).astype(np.int64)
        bad = arr[(arr < 0) | (arr >= self.vocab_size)]
        if bad.size:
            raise InputError(f"token id {int(bad[0])} is outside this tokenizer's vocabulary of {self.vocab_size}")
        return arr.tolist()

    def decode(self, ids, skip_special_tokens=False):
        return self._hf.decode(self._ids(ids), skip_special_tokens=bool(skip_special_tokens))

    def decode_bytes(self, ids):
        """The bytes of the ids, each token's own: a token may end inside a UTF-8 character (a byte-level BPE
        splits emoji and CJK across tokens), so a stream decodes them incrementally and never shows half of one."""
        if self._bytes is None:
            self._bytes = _token_bytes_table(self._hf)
        return b"".join(self._bytes[i] for i in self._ids(ids))

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=True, tools=None, documents=None,
                            continue_final_message=False, **template_kwargs):
        """`messages` ([{"role": ..., "content": ...}, ...]; content a str, a list of parts such as {"type": "text",
        "text": ...}, or None beside an assistant's "tool_calls") rendered with the tokenizer's chat template: the
        text (tokenize=False) or its token ids as a list, both what transformers' apply_chat_template gives.
        `tools`, `documents`, `continue_final_message` and any other keyword (a template variable) go to the
        template as there."""
        from jinja2 import TemplateError
        if self.chat_template is None:
            raise InputError(f"{self.source}: this tokenizer has no chat template")
        what = ("apply_chat_template: messages must be a non-empty list of {'role': str, 'content': str or a list "
                "of parts} dicts (content None only beside 'tool_calls')")
        if not (isinstance(messages, (list, tuple)) and messages):
            raise InputError(f"{what}, got {show(messages)}")
        for i, m in enumerate(messages):
            content = m.get("content") if isinstance(m, dict) else None
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and (
                    content is None and "tool_calls" in m or isinstance(content, str) or
                    isinstance(content, (list, tuple)) and all(isinstance(p, dict) for p in content))):
                raise InputError(f"{what}, got messages[{i}] = {show(m)}")
            for text in [content] if isinstance(content, str) else [p.get("text") for p in content or ()]:
                if isinstance(text, str):
                    _refuse_surrogates(text, f"apply_chat_template: messages[{i}] content")
        for name, value in (("tools", tools), ("documents", documents)):
            if value is not None and not (isinstance(value, (list, tuple)) and all(
                    isinstance(v, dict) or (name == "tools" and callable(v)) for v in value)):
                raise InputError(f"apply_chat_template: {name} must be None or a list of "
                                 f"{'dicts (JSON schemas) or functions' if name == 'tools' else 'dicts'}, got {show(value)}")
        # what would change the result's type from transformers' return_dict=False (text, or a list of ids): asked
        # for, the call raised "multiple values for 'return_dict'" as a damaged template, or int() of a tensor
        shaped = {k: template_kwargs.pop(k) for k in ("return_dict", "return_tensors", "return_assistant_tokens_mask")
                  if k in template_kwargs}
        if any(v not in (None, False) for v in shaped.values()):
            raise InputError(f"apply_chat_template returns the text (tokenize=False) or a list of token ids, as "
                             f"transformers' return_dict=False; got {', '.join(f'{k}={v!r}' for k, v in shaped.items())}"
                             f": wrap the ids yourself (np.asarray(ids), torch.tensor([ids]))")
        # any other keyword is a template variable or transformers' option, given by the caller like the messages
        plain = tools is None and documents is None and not template_kwargs and all(
            isinstance(m.get("content"), (str, type(None))) for m in messages)
        try:
            out = self._hf.apply_chat_template(
                [dict(m) for m in messages], tools=tools, documents=documents,
                add_generation_prompt=bool(add_generation_prompt), continue_final_message=continue_final_message,
                tokenize=bool(tokenize), return_dict=False, **template_kwargs)
        except (TemplateError, ValueError) as e:
            # the template's raise_exception, or transformers' own checks (continue_final_message with
            # add_generation_prompt, a final message that is not the assistant's): not what these messages allow
            raise InputError(f"{self.template_source}: the chat template refused these messages "
                             f"({type(e).__name__}: {e})") from None
        except Exception as e:   # noqa: BLE001: a template runs code ({{ 1 / 0 }}, a str + int)
            if not plain:   # a template written for text alone, given parts, tools, documents or other arguments
                extra = f", nor the arguments {sorted(template_kwargs)}" if template_kwargs else ""
                raise InputError(f"{self.template_source}: the chat template cannot render these messages (it may "
                                 f"take only text content, and no tools or documents{extra}) ({type(e).__name__}: "
                                 f"{str(e)[:300]})") from None
            raise CheckpointError(f"{self.template_source}: the chat template failed ({type(e).__name__}: "
                                  f"{str(e)[:300]})") from None
        return [int(i) for i in out] if tokenize else out

    def save(self, directory):
        """tokenizer.json, tokenizer_config.json and, with a template, chat_template.jinja into `directory` in one
        save (lab.io.atomic_files); a stale chat_template.jinja or special_tokens_map.json of an earlier tokenizer
        there goes (transformers would read it over the new files); any other file is kept."""
        with atomic_files(directory, remove=(TEMPLATE_FILE, SPECIAL_TOKENS_FILE)) as files:
            self.write(files)
        return Path(directory)

    def write(self, files):
        """Stage the tokenizer's files in a save (lab.io.atomic_files' staging), e.g. beside a model."""
        import tempfile
        with tempfile.TemporaryDirectory() as scratch, _quiet_transformers():
            self._hf.save_pretrained(scratch)   # transformers' own serialisation, loaded back by it and by lab
            # with the named templates beside the default one (additional_chat_templates/tool_use.jinja, ...): a
            # save that left them out lost them
            named = sorted(f.relative_to(scratch).as_posix()
                           for f in Path(scratch).glob("additional_chat_templates/*.jinja"))
            for name in (TOKENIZER_FILE, CONFIG_FILE, TEMPLATE_FILE, *named):
                if (Path(scratch) / name).is_file():
                    files.write_text(name, (Path(scratch) / name).read_text(encoding="utf-8"))


GGUF_TRANSFORMERS = "5.24"   # the first release whose GGUF tokenizer converter lab is tested with


def _gguf_tokenizer(reader, path):
    """transformers' tokenizer of a GGUF vocabulary, as AutoTokenizer.from_pretrained(..., gguf_file=) builds it
    (get_gguf_tokenizer, convert_gguf_tokenizer) but from lab's checked reader: transformers' own GGUF reader
    needs torch, and would read the file a second time."""
    with _quiet_transformers():
        import transformers
        try:   # (transformers' GGUF converter moves between releases: name the one this was written against)
            from transformers import TokenizersBackend
            from transformers.integrations.gguf.gguf_tokenizer_mapping import (GGUF_TOKENIZER_MAPPING,
                                                                               convert_gguf_tokenizer)
        except ImportError:
            raise CheckpointError(f"{path}: reading a GGUF file's tokenizer needs transformers >= {GGUF_TRANSFORMERS} "
                                  f"(installed: {transformers.__version__}); pip install -U "
                                  f"'transformers>={GGUF_TRANSFORMERS}'") from None
    try:
        meta = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
        arch = reader.fields["general.architecture"].contents()
    except (KeyError, ValueError, IndexError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: damaged GGUF tokenizer metadata ({type(e).__name__}: {e})") from None
    tok, config = ({name: meta[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in meta}
                   for renames in (GGUF_TOKENIZER_MAPPING["tokenizer"], GGUF_TOKENIZER_MAPPING["tokenizer_config"]))
    tokens = tok["tokens"]
    if tok.get("tokenizer_type") == "llama":   # llama.cpp adds BOS to a sentencepiece vocabulary that does not say
        config.setdefault("add_bos_token", True)
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("unk_token", "unknown_token_id"),
                      ("pad_token", "padding_token_id")):
        i = meta.get(f"tokenizer.ggml.{key}")
        if i is not None and not (isinstance(i, int) and 0 <= i < len(tokens)):
            raise CheckpointError(f"{path}: tokenizer.ggml.{key} = {i!r} is not an id of its {len(tokens)} tokens")
        config[name] = tokens[i] if i is not None else None
    try:
        with _quiet_transformers():
            backend, extra = convert_gguf_tokenizer(arch, tok)
            return TokenizersBackend(tokenizer_object=backend, **config, **extra)
    except Exception as e:   # noqa: BLE001: `tokenizers` raises plain Exception for a malformed vocabulary
        raise CheckpointError(f"{path}: a GGUF vocabulary transformers cannot convert ({type(e).__name__}: "
                              f"{str(e)[:300]})") from None


def _byte_decoder():
    """GPT-2's byte-level alphabet inverted: the printable character standing for each byte -> the byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in keep]
    table = {chr(b): b for b in keep}
    table.update({chr(256 + i): b for i, b in enumerate(shifted)})
    return table


def _token_bytes_table(hf):
    """Each id's bytes, by the decoder the tokenizer declares: byte-level BPE (GPT-2, Llama 3, SmolLM2, Qwen2)
    maps its alphabet back to bytes; sentencepiece byte fallback (Llama 2, Mistral) has <0xNN> tokens and ▁ for a
    space; any other decoder gives each token's decoded text."""
    import json
    backend = hf.backend_tokenizer
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    kinds = {d.get("type") for d in decoder.get("decoders", [decoder])}
    tokens = [backend.id_to_token(i) or "" for i in range(len(hf))]
    if "ByteLevel" in kinds:
        table = _byte_decoder()
        return [bytes(table[c] for c in t) if all(c in table for c in t) else t.encode("utf-8") for t in tokens]
    if "ByteFallback" in kinds:
        return [bytes([int(t[3:5], 16)]) if len(t) == 6 and t.startswith("<0x") and t.endswith(">")
                else t.replace("\u2581", " ").encode("utf-8") for t in tokens]
    return [hf.decode([i]).encode("utf-8") for i in range(len(hf))]
