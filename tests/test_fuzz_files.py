"""Fuzzing every file lab reads: truncated, bit-flipped, wrong-dtype, wrong-shape, huge-header and missing-key
variants of checkpoint, optimizer, tokenizer, BPE, PEFT adapter, GPT-2 and sharded (index and shard) files, GGUF
files (wrong magic, tensors past the end, huge dims, unknown quantization types and architectures) and pretrained
tokenizer files (tokenizer.json, tokenizer_config.json, chat templates). Every case must either load or
end in a lab CheckpointError that names the file; none may raise anything else, hang, or allocate more memory than
the file could justify. Fixed seed (derandomized) and LAB_FUZZ_EXAMPLES cases per file in CI (default 25); set
it higher to fuzz longer."""
import json
import os
import resource
import shutil
import signal
import struct
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

import lab  # noqa: E402
from lab import lora  # noqa: E402
from ggufs import hf_tensors, write_gguf  # noqa: E402
from lab.checkpoint import CheckpointError, load_checkpoint, load_tokenizer, save_checkpoint  # noqa: E402
from lab.checks import InputError  # noqa: E402
from lab.data import CharTokenizer  # noqa: E402
from lab.data.bpe import BPETokenizer  # noqa: E402
from lab.models import PRESETS, TransformerLM  # noqa: E402
from lab.scale import export_checkpoint, import_model  # noqa: E402
from lab.train import TrainConfig, Trainer  # noqa: E402

EXAMPLES = int(os.environ.get("LAB_FUZZ_EXAMPLES", "25"))
TEXT = "In the beginning God created the heaven and the earth. And the earth was without form, and void.\n" * 20
CFG = replace(PRESETS["tiny"], block_size=16, n_layer=1, n_head=2, n_embd=16)


def _model(vocab):
    lab.manual_seed(0)
    return TransformerLM(replace(CFG, vocab_size=vocab))


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    """Good files of every kind, written once; each fuzz case copies one and damages the copy."""
    root = tmp_path_factory.mktemp("fuzz-originals")
    with lab.engine.backend.using_backend(lab.engine.backend.backend_instance("numpy")):
        tok = CharTokenizer.from_text(TEXT)
        ids = tok.encode(TEXT)
        trainer = Trainer(_model(tok.vocab_size), ids, ids, TrainConfig(steps=2, batch_size=2))
        trainer.train_step()
        save_checkpoint(root / "ck", trainer.model, tok, trainer)
        export_checkpoint(root / "ck", root / "hf")
        (root / "bpe.json").write_text(BPETokenizer.train(TEXT, vocab_size=270).to_json())
        model = _model(tok.vocab_size)
        lora.apply(model, r=2, alpha=4)
        lora.save_adapter(model, root / "adapter")
        _sharded(root / "sharded")
        (root / "gguf").mkdir()
        write_gguf(root / "gguf" / "model.gguf", hf_tensors(layers=1, hidden=32, heads=4, kv_heads=2, inter=64),
                   qtype="Q8_0")
        lab.load_tokenizer(root / "gguf" / "model.gguf").save(root / "ptok")
    return root, ids, tok.vocab_size


def _sharded(d):
    """A small Llama in transformers' sharded layout: two shards and the index mapping each tensor to one."""
    lab.manual_seed(0)
    model = lab.LlamaLM(lab.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16))
    model.save_pretrained(d)
    (d / "model.safetensors").unlink()
    tensors, weight_map = model.hf_weights(), {}
    for i, half in enumerate((sorted(tensors)[::2], sorted(tensors)[1::2])):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: tensors[k] for k in half}, str(d / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(half, name))
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": [1, 2]}))


def _loaders(ids, vocab):
    def adapter(d):
        lora.load_adapter(_model(vocab), d)

    def chat(d):
        tok = lab.load_tokenizer(d)
        try:
            tok.apply_chat_template([{"role": "user", "content": "hi é"}], add_generation_prompt=True)
        except InputError as e:   # a template's raise_exception refuses the messages, naming its file: as clear
            raise CheckpointError(str(e)) from None
    return {
        "ck": lambda d: load_checkpoint(d),
        "ck-resume": lambda d: Trainer.resume(d, ids, ids),
        "hf": lambda d: import_model(d),
        "bpe": lambda d: load_tokenizer(d / "bpe.json"),
        "adapter": adapter,
        "sharded": lambda d: lab.from_pretrained(d),
        "gguf": lambda d: lab.from_pretrained(d / "model.gguf"),
        "gguf-tok": lambda d: lab.load_tokenizer(d / "model.gguf"),
        "ptok": chat,
    }


# (file, directory it lives in, how it is loaded)
TARGETS = [
    ("model.safetensors", "ck", "ck"), ("config.json", "ck", "ck"), ("tokenizer.json", "ck", "ck"),
    ("optimizer.safetensors", "ck", "ck-resume"), ("trainer_state.json", "ck", "ck-resume"),
    ("model.safetensors", "hf", "hf"), ("config.json", "hf", "hf"), ("lab_tokenizer.json", "hf", "hf"),
    ("bpe.json", ".", "bpe"),
    ("adapter_model.safetensors", "adapter", "adapter"), ("adapter_config.json", "adapter", "adapter"),
    ("model.safetensors.index.json", "sharded", "sharded"), ("model-00001-of-00002.safetensors", "sharded", "sharded"),
    ("generation_config.json", "sharded", "sharded"),
    ("model.gguf", "gguf", "gguf"), ("model.gguf", "gguf", "gguf-tok"),
    ("tokenizer.json", "ptok", "ptok"), ("tokenizer_config.json", "ptok", "ptok"), ("chat_template.jinja", "ptok", "ptok"),
]


def _safetensors_parts(data):
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def _pack(header, body):
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def _gguf_layout(path):
    """Where a GGUF's fields lie: (architecture value's offset and length, [(tensor, dims offset, number of dims,
    type offset, data offset's offset)]), from gguf's reader, whose parts are views of the mapped file."""
    from gguf import GGUFReader
    r = GGUFReader(path)
    at = lambda part: part.ctypes.data - r.data.ctypes.data  # noqa: E731
    arch = r.fields["general.architecture"].parts[-1]
    return (at(arch), len(arch)), [(t.name, at(t.field.parts[3]), len(t.field.parts[3]), at(t.field.parts[4]),
                                    at(t.field.parts[5])) for t in r.tensors]


def _gguf_mutation(draw, data, layout):
    (arch_at, arch_len), tensors = layout
    out = bytearray(data)
    kind = draw(st.sampled_from(["magic", "offset", "dims", "type", "architecture"]))
    if kind == "magic":
        out[:4] = draw(st.sampled_from([b"GGML", b"\0\0\0\0", b"FUGG", b"GGUf"]))
        return bytes(out), f"magic -> {bytes(out[:4])!r}"
    if kind == "architecture":
        arch = draw(st.sampled_from(["gemma", "bloom", "gpt2x", "\0\0\0\0\0", "LLAMA"]))[:arch_len].ljust(arch_len)
        out[arch_at:arch_at + arch_len] = arch.encode()
        return bytes(out), f"architecture -> {arch!r}"
    name, dims_at, n_dims, type_at, offset_at = draw(st.sampled_from(tensors))
    if kind == "offset":
        value = draw(st.sampled_from([len(data), 2 ** 40, 2 ** 64 - 32, 32]))
        out[offset_at:offset_at + 8] = struct.pack("<Q", value)
        return bytes(out), f"{name} data offset -> {value}"
    if kind == "dims":
        i = draw(st.integers(0, n_dims - 1))
        value = draw(st.sampled_from([0, 2 ** 31, 2 ** 40, 2 ** 63, 2 ** 64 - 1, 3]))
        out[dims_at + 8 * i:dims_at + 8 * i + 8] = struct.pack("<Q", value)
        return bytes(out), f"{name} dim {i} -> {value}"
    value = draw(st.sampled_from([2, 3, 6, 10, 12, 39, 99, 2 ** 31]))   # Q4_1..., Q5_0, Q2_K, Q4_K, MXFP4, unknown
    out[type_at:type_at + 4] = struct.pack("<I", value)
    return bytes(out), f"{name} type -> {value}"


@st.composite
def mutations(draw, data, is_safetensors, gguf_layout=None):
    """A damaged copy of `data` and a description of the damage."""
    kinds = ["truncate", "bitflip", "garbage"]
    if gguf_layout is not None:
        kinds += ["gguf"] * 5   # the damage only a GGUF can have, as often as the rest together
    elif is_safetensors:
        kinds += ["dtype", "shape", "huge_header", "missing_key", "offsets"]
    else:
        kinds += ["json_drop", "json_type", "json_huge", "json_nested"]
    kind = draw(st.sampled_from(kinds))
    if kind == "truncate":
        n = draw(st.integers(0, max(len(data) - 1, 0)))
        return data[:n], f"truncated to {n} bytes"
    if kind == "bitflip":
        out = bytearray(data)
        flips = draw(st.lists(st.integers(0, len(data) * 8 - 1), min_size=1, max_size=8))
        for bit in flips:
            out[bit // 8] ^= 1 << (bit % 8)
        return bytes(out), f"bits {flips} flipped"
    if kind == "garbage":
        return draw(st.binary(min_size=0, max_size=64)), "replaced by random bytes"
    if kind == "gguf":
        return _gguf_mutation(draw, data, gguf_layout)
    if not data.lstrip().startswith((b"{\"", b"[")):   # a chat template: broken Jinja, or code that fails as it runs
        snippet = draw(st.sampled_from([b"{% for %}", b"{{ 1 / 0 }}", b"{{ messages[9] }}", b"{% endif %}",
                                        b"{{ raise_exception('no') }}", b"{{ messages[0].content + 1 }}", b"\xff"]))
        at = draw(st.integers(0, len(data)))
        return data[:at] + snippet + data[at:], f"{snippet!r} inserted at {at}"
    if is_safetensors:
        header, body = _safetensors_parts(data)
        names = sorted(k for k in header if k != "__metadata__")
        name = draw(st.sampled_from(names))
        if kind == "dtype":
            dtype = draw(st.sampled_from(["F16", "F64", "I32", "I64", "U8", "BOOL", "BF16", "XX"]))
            header[name]["dtype"] = dtype
            return _pack(header, body), f"{name} dtype -> {dtype}"
        if kind == "shape":
            shape = draw(st.lists(st.integers(0, 70), min_size=0, max_size=3))
            header[name]["shape"] = shape
            return _pack(header, body), f"{name} shape -> {shape}"
        if kind == "huge_header":
            size = draw(st.sampled_from([2 ** 31, 2 ** 40, 2 ** 63, len(data) + 1]))
            return struct.pack("<Q", size) + data[8:], f"header length field {size}"
        if kind == "missing_key":
            del header[name]
            return _pack(header, body), f"{name} removed"
        begin, end = header[name]["data_offsets"]
        end2 = draw(st.sampled_from([end + 4, 2 ** 40, begin]))
        header[name]["data_offsets"] = [begin, end2]
        return _pack(header, body), f"{name} data_offsets end -> {end2}"
    doc = json.loads(data)
    keys = sorted(doc) if isinstance(doc, dict) else []
    if not keys:
        return data[: len(data) // 2], "truncated to half"
    key = draw(st.sampled_from(keys))
    if kind == "json_nested" and isinstance(doc[key], dict) and doc[key]:
        # inside an object (an index's weight_map, rope_scaling): drop an entry, or point it elsewhere
        inner = draw(st.sampled_from(sorted(doc[key])))
        values = sorted({json.dumps(v) for v in doc[key].values()})
        value = draw(st.sampled_from([None, "", "../x.safetensors", "/etc/passwd", 7] + [json.loads(v) for v in values]))
        if draw(st.booleans()):
            del doc[key][inner]
            return json.dumps(doc).encode(), f"{key}.{inner!r} removed"
        doc[key][inner] = value
        return json.dumps(doc).encode(), f"{key}.{inner!r} -> {value!r}"
    if kind in ("json_drop", "json_nested"):
        del doc[key]
        return json.dumps(doc).encode(), f"key {key!r} removed"
    if kind == "json_type":
        value = draw(st.sampled_from([None, "x", -1, 0, 1.5, [], {}, [1, 2], True]))
        doc[key] = value
        return json.dumps(doc).encode(), f"{key!r} -> {value!r}"
    value = draw(st.sampled_from([10 ** 9, 2 ** 40, -(10 ** 9), 10 ** 30]))
    doc[key] = value
    return json.dumps(doc).encode(), f"{key!r} -> {value}"


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang()


@pytest.mark.parametrize("filename,where,loader", TARGETS, ids=[f"{w}/{f}" for f, w, _ in TARGETS])
def test_damaged_files_give_clear_errors(originals, tmp_path_factory, numpy_backend, filename, where, loader):
    root, ids, vocab = originals
    load = _loaders(ids, vocab)[loader]
    original = (root / where / filename).read_bytes()
    is_st = filename.endswith(".safetensors")
    layout = _gguf_layout(root / where / filename) if filename.endswith(".gguf") else None
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    outcomes = {"loaded": 0, "clear error": 0}

    @settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def case(data):
        damaged, what = data.draw(mutations(original, is_st, layout))
        work = tmp_path_factory.mktemp("case")
        shutil.copytree(root / where, work / "d") if where != "." else (work / "d").mkdir()
        if where == ".":
            (work / "d" / filename).write_bytes(damaged)
        else:
            (work / "d" / filename).write_bytes(damaged)
        old = signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(30)
        try:
            with lab.engine.backend.using_backend(numpy_backend):
                load(work / "d")
            outcomes["loaded"] += 1
        except CheckpointError as e:
            msg = str(e)
            assert filename in msg or str(work / "d") in msg, f"{filename} {what}: error does not name the file: {msg}"
            outcomes["clear error"] += 1
        except _Hang:
            pytest.fail(f"{filename} {what}: loading hung for 30 s")
        except Exception as e:  # anything but a CheckpointError is a bug in a loader
            pytest.fail(f"{filename} {what}: {type(e).__name__}: {e}")
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
            shutil.rmtree(work, ignore_errors=True)

    case()
    if os.environ.get("LAB_FUZZ_REPORT"):  # one JSON line per file, for RELIABILITY.md
        with open(os.environ["LAB_FUZZ_REPORT"], "a") as f:
            f.write(json.dumps({"file": f"{where}/{filename}", **outcomes}) + "\n")
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert grown_mb < 300, f"fuzzing {filename} raised peak memory by {grown_mb:.0f} MB"
    assert outcomes["clear error"] > 0, outcomes  # the damage was noticed at least sometimes
