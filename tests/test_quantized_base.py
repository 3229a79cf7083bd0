"""A quantized frozen base (issue #21 item 3): lab.engine.quant's packed layouts, F.quantized_linear and the
backends' quantized_matmul, LoRA on an int8 / q4 base, from_pretrained(..., base_dtype=)."""
import string
import tracemalloc
from dataclasses import replace

import numpy as np
import pytest

import lab
from lab import lora, nn
from lab.checks import InputError
from lab.engine import ops as F
from lab.engine import quant
from lab.engine.tensor import QuantizedWeight, tensor
from lab.models.transformer import PRESETS, TransformerLM
from lab.train.optim import AdamW
from tests.ggufs import hf_tensors, write_gguf

ODD_IN = (1, 5, 31, 33, 70)   # not multiples of the block (32) nor of int8's word (4)


def _shipped_path():
    try:
        return lab.shipped.path("smollm2-135m-instruct")
    except InputError as e:
        pytest.skip(str(e))


def test_from_gguf_of_the_shipped_file_dequantizes_bit_for_bit_as_read_gguf():
    path = _shipped_path()
    packed = lab.gguf.read_packed(path)
    _, floats = lab.gguf.read_tensors(path)
    # every linear weight is Q4_1 (the embedding, Q8_0, stays a float32 table)
    assert {kind for name, (_, kind, _) in packed.items() if name.endswith("_proj.weight")} == {"Q4_1"}
    assert len([name for name in packed if name.endswith("_proj.weight")]) == 30 * 7
    for name, (raw, kind, shape) in packed.items():
        if kind == "Q8_0":
            continue
        qa = quant.from_gguf(raw, kind, shape)
        assert qa.shape == shape and qa.kind == kind.lower()
        assert np.array_equal(quant.dequantize(qa).view(np.uint32), np.asarray(floats[name]).view(np.uint32)), name


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_from_gguf_repacks_a_files_blocks_bit_for_bit(tmp_path, qtype):
    path = write_gguf(tmp_path / "m.gguf", hf_tensors(hidden=64, inter=96), qtype=qtype)
    _, floats = lab.gguf.read_gguf(path)
    for name, (raw, kind, shape) in lab.gguf.read_packed(path).items():
        assert kind == qtype
        assert np.array_equal(quant.dequantize(quant.from_gguf(raw, kind, shape)), floats[name]), name


def _blocks(a, n):
    """a (out, in) as (out, nblocks, 32) with the tail block padded by NaN."""
    return np.pad(a, ((0, 0), (0, -n % 32)), constant_values=np.nan).reshape(a.shape[0], -1, 32)


@pytest.mark.parametrize("n", ODD_IN)
def test_quantize_rounds_each_value_to_within_half_a_step(n):
    rng = np.random.default_rng(n)
    w = (rng.standard_normal((9, n)) * rng.uniform(0.01, 30, (9, 1))).astype(np.float32)
    w[0] = 0.0   # a constant row: d = 0, scale = 0
    for kind in ("q4_1", "q4_0"):
        qa = quant.quantize(w, kind)
        assert qa.qs.dtype == qa.dm.dtype == np.uint32 and qa.qs.shape == (9, -(-n // 32) * 4)
        err = np.abs(_blocks(w - quant.dequantize(qa), n))
        d = (qa.dm & 0xFFFF).astype(np.uint16).view(np.float16).astype(np.float32)
        if kind == "q4_1":
            # d/2, plus what storing d and m as float16 moved the grid (ggml rounds with the float32 d)
            lo, hi = np.nanmin(_blocks(w, n), axis=2), np.nanmax(_blocks(w, n), axis=2)
            m = (qa.dm >> 16).astype(np.uint16).view(np.float16).astype(np.float32)
            bound = d / 2 + np.abs(lo - m) + 15 * np.abs((hi - lo) / 15 - d) + 1e-6 * np.abs(hi)
        else:   # q4_0's largest value lands on -8 d; ggml clips q at 15, so the opposite end may be off by |d|
            bound = np.abs(d) + 1e-6
        assert (np.nan_to_num(err) <= bound[..., None]).all(), kind
    qa = quant.quantize(w, "int8")
    assert qa.q.dtype == np.uint32 and qa.q.shape == (9, -(-n // 4)) and qa.scale.shape == (9,)
    assert (np.abs(w - quant.dequantize(qa)) <= qa.scale[:, None] / 2 * (1 + 1e-6)).all()
    assert np.array_equal(quant.dequantize(qa)[0], np.zeros(n, np.float32))


def test_int8_packs_four_values_a_word_little_endian():
    w = np.array([[1, -2, 3, -4, 127]], np.float32)
    qa = quant.quantize(w, "int8")
    assert qa.scale[0] == 1 and qa.q.shape == (1, 2)
    assert qa.q[0, 0] == int.from_bytes(bytes([1, 0xFE, 3, 0xFC]), "little") and qa.q[0, 1] == 127


def _layer(kind, n_in, n_out, bias=True, seed=0):
    """A QuantizedLinear and a float32 Linear holding its dequantized values (same bias)."""
    lab.manual_seed(seed)
    base = nn.Linear(n_in, n_out, bias=bias)
    if bias:
        base.bias.data = base.bias.backend.from_numpy(np.linspace(-1, 1, n_out, dtype=np.float32))
    q = nn.QuantizedLinear.from_linear(base, kind)
    f = nn.Linear(n_in, n_out, bias=bias)
    f.load_state_dict({"weight": q.weight.numpy(), **({"bias": base.bias.numpy()} if bias else {})})
    return q, f


def _close(a, b, rtol=1e-5):
    """Equal within rtol of the larger's scale: the two products sum the same terms in another order."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape
    assert np.abs(a - b).max(initial=0) <= rtol * max(np.abs(b).max(initial=0), 1e-30), np.abs(a - b).max()


@pytest.mark.parametrize("kind", ["int8", "q4_1", "q4_0"])
@pytest.mark.parametrize("chunk", [None, 4])   # 4 rows a chunk: several chunks and a short last one
def test_quantized_linear_gives_the_outputs_and_gradients_of_its_dequantized_float32_weight(use_backend, kind,
                                                                                           chunk, monkeypatch):
    if chunk:
        monkeypatch.setattr(quant, "chunk_rows", lambda qa, floats=None: chunk)
    q, f = _layer(kind, 37, 11)
    q.bias.requires_grad = f.bias.requires_grad = True
    x = np.random.default_rng(1).standard_normal((2, 3, 37)).astype(np.float32)
    outs = []
    for layer in (q, f):
        xt = tensor(x, requires_grad=True)
        y = layer(xt, activation="gelu")
        (y * y).sum().backward()
        outs.append((y.numpy(), xt.grad.numpy(), layer.bias.grad.numpy()))
    for got, want in zip(*outs):
        _close(got, want)
    assert q.weight.grad is None


@pytest.mark.parametrize("kind", ["int8", "q4"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lora_on_a_quantized_base_trains_as_on_a_float32_base_of_its_dequantized_values(use_backend, kind, family):
    def build():
        lab.manual_seed(0)
        if family == "llama":   # in sizes 42, 45: not multiples of 4 or 32
            return lab.LlamaLM(lab.LlamaConfig(vocab_size=50, hidden_size=42, intermediate_size=45,
                                               num_attention_heads=3, num_key_value_heads=1,
                                               max_position_embeddings=16))
        return TransformerLM(replace(PRESETS["tiny"], vocab_size=50, block_size=8, n_layer=1, n_head=3, n_embd=30))
    qm = lora.apply(build(), r=3, alpha=6, targets="all-linear", base_dtype=kind)
    packed = [p for p in qm.parameters() if isinstance(p, QuantizedWeight)]
    assert packed and all(p.dtype == ("int8" if kind == "int8" else "q4_1") for p in packed)
    rng = np.random.default_rng(3)
    for _, m in lora.adapters(qm):   # B nonzero, so A's gradient is too
        m.lora_B.data = m.lora_B.backend.from_numpy(rng.standard_normal(m.lora_B.shape).astype(np.float32) * 0.1)
    fm = lora.apply(build(), r=3, alpha=6, targets="all-linear")
    fm.load_state_dict(qm.state_dict())   # the quantized model's dequantized weights, its adapters
    idx = rng.integers(0, 50, (2, 7))
    grads = []
    for m in (qm, fm):
        _, loss = m(idx, idx)
        loss.backward()
        grads.append({n: p.grad.numpy() for n, p in m.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * len(lora.adapters(qm))
    for name in grads[0]:
        _close(grads[0][name], grads[1][name])


def test_numpy_quantized_matmul_holds_a_chunk_of_rows_not_the_float32_weight():
    b = lab.engine.backend.backend_instance("numpy")
    rng = np.random.default_rng(0)
    n_out, n_in = 4096, 2048   # float32: 32 MiB; q4_1: 5 MiB
    qa = quant.quantize(rng.standard_normal((n_out, n_in)).astype(np.float32), "q4_1")
    qw = QuantizedWeight(qa, b)
    x = tensor(rng.standard_normal((4, n_in)).astype(np.float32), requires_grad=True, backend=b)
    tracemalloc.start()
    try:
        y = F.quantized_linear(x, qw)
        y.sum().backward()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # the packed weight is already held; a chunk's floats (2 MiB), its product and x's sizes come and go
    assert peak < n_out * n_in * 4 / 8, peak


def _tiny_gguf(tmp_path, qtype="Q4_1"):
    return write_gguf(tmp_path / "m.gguf", hf_tensors(hidden=64, inter=96, vocab=264), qtype=qtype)


def test_from_pretrained_q4_keeps_the_ggufs_blocks_and_its_logits(tmp_path):
    path = _tiny_gguf(tmp_path)
    ref, q4 = lab.from_pretrained(path), lab.from_pretrained(path, base_dtype="q4")
    blocks = lab.gguf.read_packed(path)
    linears = [(n, m) for n, m in q4.named_modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 14
    for name, m in linears:
        want = quant.from_gguf(*blocks[f"{name}.weight"])
        assert all(np.array_equal(a, b) for a, b in zip(m.weight.packed.arrays, want.arrays)), name
    idx = np.arange(12).reshape(2, 6)
    with lab.no_grad():
        _close(q4(idx).numpy(), ref(idx).numpy(), rtol=1e-5)
    i8 = lab.from_pretrained(path, base_dtype="int8")
    assert {m.weight.dtype for _, m in i8.named_modules() if isinstance(m, nn.Linear)} == {"int8"}


def test_from_pretrained_int8_packs_a_gpt2_directorys_linear_weights(tmp_path):
    lab.manual_seed(0)
    m = TransformerLM(replace(PRESETS["tiny"], vocab_size=40, block_size=8, n_layer=1, n_head=2, n_embd=20))
    m.save_pretrained(tmp_path / "gpt2", format="hf")
    q = lab.from_pretrained(tmp_path / "gpt2", base_dtype="int8")
    for (name, p), (_, want) in zip(q.named_parameters(), m.named_parameters()):
        if name.endswith(("c_attn.weight", "c_fc.weight", "c_proj.weight")):   # per output column: (in, out)
            assert isinstance(p, QuantizedWeight) and p.dtype == "int8" and p.packed.shape == want.shape[::-1]
            assert np.array_equal(p.numpy(), quant.dequantize(quant.quantize(want.numpy().T, "int8")).T), name
        else:
            assert np.array_equal(p.numpy(), want.numpy()), name


_LOAD_PEAK = """
import sys
def status(key):
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ':'))
import lab, numpy, gguf, gguf.quants
lab.engine.backend.get_backend()
base = status('VmRSS')
model = lab.from_pretrained('smollm2-135m-instruct', base_dtype=sys.argv[1])
print(status('VmHWM') - base, sum(p.size * 4 for p in model.parameters()))
"""


@pytest.mark.parametrize("base_dtype", ["q4", "int8"])
def test_loading_a_packed_base_never_holds_the_float32_linear_weights(base_dtype):
    import os
    import subprocess
    import sys
    _shipped_path()
    out = subprocess.run([sys.executable, "-c", _LOAD_PEAK, base_dtype], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "LAB_BACKEND": "numpy"})
    assert out.returncode == 0, out.stderr
    peak, float32 = (int(v) for v in out.stdout.split())
    # packed as each tensor is read: the float32 embedding (113 MiB), the packed linear weights (63 or 102 MiB)
    # and one tensor in flight; loading the float32 model first peaked above its 522 MiB
    assert peak < 0.85 * float32, (peak, float32)


def test_a_quantized_lora_model_saves_and_loads_its_base_values_unchanged(tmp_path):
    lab.manual_seed(0)
    m = lora.apply(TransformerLM(replace(PRESETS["tiny"], vocab_size=40, block_size=8, n_layer=1, n_head=2,
                                         n_embd=24)), r=2, alpha=4, base_dtype="q4")
    state = m.state_dict()
    lab.manual_seed(1)
    other = lora.apply(TransformerLM(m.config), r=2, alpha=4, base_dtype="q4")
    other.load_state_dict(state)
    for (name, p), (_, o) in zip(m.named_parameters(), other.named_parameters()):
        assert np.array_equal(p.numpy(), o.numpy()), name
        if isinstance(p, QuantizedWeight):
            assert isinstance(o, QuantizedWeight) and all(np.array_equal(a, b) for a, b in
                                                          zip(p.packed.arrays, o.packed.arrays)), name


# ------------------------------------------------------------------------------------------------ bad input

def test_a_gguf_type_without_a_packed_layout_is_named():
    with pytest.raises(InputError, match=r"GGUF quantization type Q8_0 .*reads? Q4_0, Q4_1"):
        quant.from_gguf(np.zeros((2, 34), np.uint8), "Q8_0", (2, 32))
    with pytest.raises(InputError, match=r"do not hold a \(2, 64\) tensor"):
        quant.from_gguf(np.zeros((2, 20), np.uint8), "Q4_1", (2, 64))


def test_an_unknown_base_dtype_is_refused_naming_the_allowed_ones(tmp_path):
    lab.manual_seed(0)
    m = TransformerLM(replace(PRESETS["tiny"], vocab_size=40, block_size=8, n_layer=1, n_head=2, n_embd=24))
    before = m.state_dict()
    with pytest.raises(InputError, match=r"base_dtype must be one of \['float16', 'float32', 'int8', 'q4'\], "
                                         r"got 'q8'"):
        lora.apply(m, base_dtype="q8")
    assert not lora.adapters(m) and all(p.requires_grad and p.dtype == "float32" for p in m.parameters())
    assert all(np.array_equal(v, m.state_dict()[k]) for k, v in before.items())
    with pytest.raises(InputError, match=r"from_pretrained: base_dtype must be one of \['float32', 'int8', 'q4'\], "
                                         r"got 'nf4'"):
        lab.from_pretrained(tmp_path / "nothing-here", base_dtype="nf4")
    with pytest.raises(InputError, match="quantize: kind must be one of"):
        quant.quantize(np.ones((2, 2)), "q4")
    with pytest.raises(InputError, match="quantize: the weight must hold real numbers, got dtype complex128"):
        quant.quantize(np.ones((2, 2)) * 1j, "int8")


class _TwoLayers(nn.Module):
    def __init__(self):
        self.empty, self.proj = nn.Linear(0, 3), nn.Linear(4, 3)


@pytest.mark.parametrize("kind", ["int8", "q4"])
def test_quantizing_a_layer_with_no_inputs_is_refused_and_the_model_unchanged(kind):
    m = _TwoLayers()
    weights = {n: p for n, p in m.named_parameters()}
    with pytest.raises(InputError, match=r"layer empty has no inputs \(0 -> 3\)"):
        lora.apply(m, r=1, alpha=2, targets=["proj"], base_dtype=kind)
    assert not lora.adapters(m) and not hasattr(m, "lora_config")
    assert dict(m.named_parameters()) == weights and all(p.requires_grad and p.dtype == "float32"
                                                         for p in weights.values())
    with pytest.raises(InputError, match=r"quantize: the weight must be 2-D \(out, in\) with in >= 1, got shape"):
        quant.quantize(np.zeros((3, 0), np.float32), kind.replace("q4", "q4_1"))


def test_merge_into_a_quantized_base_is_refused_and_changes_nothing():
    lab.manual_seed(0)
    m = lora.apply(TransformerLM(replace(PRESETS["tiny"], vocab_size=40, block_size=8, n_layer=1, n_head=2,
                                         n_embd=24)), r=2, alpha=4, base_dtype="int8")
    before = {n: p.numpy() for n, p in m.named_parameters()}
    with pytest.raises(InputError, match="merge_adapter: refused: the base weights of .* are quantized"):
        lora.merge(m)
    assert all(not a.merged for _, a in lora.adapters(m))
    assert all(np.array_equal(before[n], p.numpy()) for n, p in m.named_parameters())


def test_quantized_linear_refuses_shapes_that_do_not_fit():
    q, _ = _layer("q4_1", 37, 11)
    with pytest.raises(ValueError, match=r"quantized_linear: input \(2, 36\), weight \(37, 11\) and bias \(11,\) "
                                         r"do not fit"):
        q(tensor(np.zeros((2, 36), np.float32)))
    with pytest.raises(ValueError, match="a q4_1 weight is frozen"):
        q.weight.requires_grad_(True)


@pytest.mark.parametrize("base_dtype", ["int8", "q4"])
def test_a_lora_plan_counts_the_packed_bytes_of_the_base(base_dtype):
    from lab import plan
    cfg = replace(PRESETS["tiny"], vocab_size=65, block_size=64, n_layer=2, n_head=4, n_embd=36)
    p = plan.estimate(cfg, batch=4, lora_rank=4, device="m1", lora_base_dtype=base_dtype)
    m = lora.apply(TransformerLM(cfg), r=4, base_dtype=base_dtype)
    held = sum(p.nbytes if isinstance(p, QuantizedWeight) else p.numpy().nbytes for p in m.parameters())
    assert p.memory["weights"] == held
    assert p.memory["weights"] < plan.estimate(cfg, batch=4, lora_rank=4, device="m1").memory["weights"]


def test_a_lora_plan_that_does_not_fit_suggests_a_packed_base():
    from lab import plan
    tuned = plan.estimate("gpt2-small", batch=64, lora_rank=8, device="m1")
    assert not tuned.fits
    assert any("base_dtype='q4'" in s and "MiB less" in s for s in tuned.suggestions)
    assert any("base_dtype='int8'" in s for s in tuned.suggestions)
    q4 = plan.estimate("gpt2-small", batch=64, lora_rank=8, device="m1", lora_base_dtype="q4")
    assert not any("base_dtype=" in s for s in q4.suggestions)   # the smallest already
    with pytest.raises(InputError, match=r"lora_base_dtype must be one of \['float32', 'float16', 'int8', 'q4'\]"):
        plan.estimate("gpt2-small", batch=4, device="m1", lora_base_dtype="q4")   # no LoRA: nothing frozen


def test_q4_of_values_beyond_float16s_range_is_refused_naming_the_layer():
    with pytest.raises(InputError, match=r"q4_1 keeps each block's scale and minimum as float16 \(at most 65504\), "
                                         r"and this weight's values reach -3e\+38 .. 3e\+38; use int8"):
        quant.quantize(np.array([[-3e38, 3e38, 0]], np.float32), "q4_1")
    with pytest.raises(InputError, match=r"q4_0 keeps each block's scale as float16"):
        quant.quantize(np.array([[1e6, 0]], np.float32), "q4_0")   # d = 1e6 / -8
    m = _TwoLayers()
    m.empty = nn.Linear(2, 3)
    m.proj.weight.data = m.proj.weight.backend.from_numpy((np.full((4, 3), 1e5) * [[1], [-1], [1], [1]]).astype(np.float32))
    before = {n: p.numpy() for n, p in m.named_parameters()}
    with pytest.raises(InputError, match=r"LoRA base_dtype: layer proj: quantize: q4_1 keeps"):
        lora.apply(m, r=1, alpha=2, targets=["proj"], base_dtype="q4")
    assert not lora.adapters(m) and all(p.requires_grad and p.dtype == "float32" for p in m.parameters())
    assert all(np.array_equal(before[n], p.numpy()) for n, p in m.named_parameters())
    assert np.array_equal(quant.dequantize(quant.quantize(before["proj.weight"].T, "int8")), before["proj.weight"].T)


def test_a_packed_model_takes_adapters_on_its_own_base_dtype_only(tmp_path):
    path = _tiny_gguf(tmp_path)
    m = lab.from_pretrained(path, base_dtype="q4")
    packed = {n: p for n, p in m.named_parameters()}
    for other in ("float16", "int8"):
        with pytest.raises(InputError, match=rf"LoRA base_dtype '{other}': this model's linear weights are packed "
                                             rf"already \(q4_1: .*pass 'q4'"):
            lora.apply(m, r=2, alpha=4, targets="all-linear", base_dtype=other)
        assert not lora.adapters(m) and dict(m.named_parameters()) == packed
    lora.apply(m, r=2, alpha=4, targets="all-linear")   # base_dtype left out: the base as it is
    assert m.lora_config["base_dtype"] == "q4"
    assert all(p is packed[n] for n, p in m.named_parameters() if isinstance(p, QuantizedWeight))


@pytest.mark.parametrize("kind", ["q4_1", "q4_0"])
def test_q4_of_values_too_small_for_float16_scales_is_refused_and_small_blocks_in_a_real_weight_are_not(kind):
    rng = np.random.default_rng(0)
    for tiny in (1e-40, 1e-30, 1e-8):   # subnormal float32; far below, and just below, float16's 6e-8 step
        w = (rng.standard_normal((2, 40)) * tiny).astype(np.float32)
        with pytest.raises(InputError, match=rf"{kind} keeps each block's scale.* as float16, whose smallest step is "
                                             rf"6e-08, and this weight's values \(.*\) are too small for it: \d+ of "
                                             rf"4 blocks would come back off by up to .*; use int8"):
            quant.quantize(w, kind)
    w = (rng.standard_normal((4, 64)) * 0.02).astype(np.float32)
    w[0, :32], w[1, 32:], w[2, :] = 1e-12, w[1, 32:] * 1e-9, w[2, :] * 1e-4   # a real weight's near-empty blocks
    back = quant.dequantize(quant.quantize(w, kind))
    assert np.abs(back - w).max() < 0.02 * 2 ** -10 + np.abs(w).max() / 15
    assert np.abs(back[2] - w[2]).max() <= np.abs(w[2]).max() / 8   # 2e-6 values: subnormal float16 scales, kept
    assert quant.dequantize(quant.quantize(np.zeros((0, 40), np.float32), kind)).shape == (0, 40)   # no rows


def test_int8_of_subnormal_values_keeps_each_within_half_a_step():
    rng = np.random.default_rng(0)
    for tiny in (1e-40, 1e-39, 1e-30):   # 1 / scale is Inf for a subnormal scale: every value became +-127 or 0
        w = (rng.standard_normal((3, 9)) * tiny).astype(np.float32)
        qa = quant.quantize(w, "int8")
        step = np.abs(w).max(axis=1, keepdims=True) / np.float32(127)
        assert np.all(np.abs(quant.dequantize(qa) - w) <= step / 2 + 2e-45), tiny


def test_a_quantized_weight_refuses_to_train_or_be_viewed_with_one_clear_error(use_backend):
    q, _ = _layer("q4_1", 33, 5)
    w = q.weight
    for make_trainable in (lambda: setattr(w, "requires_grad", True), lambda: w.requires_grad_()):
        with pytest.raises(ValueError, match=r"a q4_1 weight is frozen: gradients reach its layer's input and "
                                             r"adapters only"):
            make_trainable()
        assert w.requires_grad is False
    w.requires_grad = False   # freezing what is frozen: no error
    # `for p in model.parameters(): p.requires_grad = True` held the packed weight in the optimizer, never stepped
    with pytest.raises(ValueError, match="is frozen"):
        for p in q.parameters():
            p.requires_grad = True
    with pytest.raises(InputError, match="no parameters that require gradients"):
        AdamW([w])
    for op, view in (("permute", lambda: w.T), ("getitem", lambda: w[0]), ("reshape", lambda: w.reshape(-1)),
                     ("concat", lambda: F.concat([w, w])), ("reshape", lambda: F.stack([w, w]))):
        with pytest.raises(ValueError, match=rf"{op}: a q4_1 weight of shape \(33, 5\) is packed .*only its linear "
                                             rf"layer \(F.linear\) multiplies by it; \.numpy\(\) gives"):
            view()
    with pytest.raises(ValueError, match="matmul: expected a floating-point tensor, got dtype q4_1"):
        F.matmul(tensor(np.ones((2, 33), np.float32)), w)
    assert w.numpy().shape == (33, 5)


def _lora_llama(base_dtype, seed=0):
    lab.manual_seed(seed)
    m = lab.LlamaLM(lab.LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=45, num_attention_heads=4,
                                    num_key_value_heads=2, max_position_embeddings=16))
    lora.apply(m, r=3, alpha=6, targets="all-linear", base_dtype=base_dtype)
    rng = np.random.default_rng(3)
    for _, a in lora.adapters(m):
        a.lora_B.data = a.lora_B.backend.from_numpy(rng.standard_normal(a.lora_B.shape).astype(np.float32) * 0.1)
    return m


def test_a_lora_checkpoint_loads_on_the_base_dtype_asked_for_and_a_merged_one_on_float32_only(use_backend, tmp_path):
    from lab.checkpoint import save_checkpoint
    from lab.io import CheckpointError
    tok = lab.CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWX")
    idx = np.random.default_rng(0).integers(0, 50, (2, 7))

    def logits(m):
        with lab.no_grad():
            return m.eval()(idx).numpy()
    q4 = _lora_llama("q4")
    save_checkpoint(tmp_path / "q4", q4, tok)
    again = lab.from_pretrained(tmp_path / "q4")   # the run's own base
    assert again.lora_config["base_dtype"] == "q4" and np.array_equal(logits(again), logits(q4))
    # adapters trained on q4 go on the base asked for (an int8 one raised "LoRA base_dtype 'q4': ... packed already")
    int8 = lab.from_pretrained(tmp_path / "q4", base_dtype="int8")
    assert int8.lora_config["base_dtype"] == "int8"
    assert {p.dtype for p in int8.parameters() if isinstance(p, QuantizedWeight)} == {"int8"}
    for (_, a), (_, b) in zip(lora.adapters(int8), lora.adapters(q4)):
        assert np.array_equal(a.lora_A.numpy(), b.lora_A.numpy()) and np.array_equal(a.lora_B.numpy(),
                                                                                    b.lora_B.numpy())
    assert np.abs(logits(int8) - logits(q4)).max() < 0.05 * np.abs(logits(q4)).max()
    floats = _lora_llama("float32", seed=1)   # a float32 model takes the q4 run's state: the dequantized base
    floats.load_state_dict(q4.state_dict())
    _close(logits(floats), logits(q4))
    # a merged run's base holds the update: a packed base could not take it out (unmerge wrote floats into the
    # packed weight, and the next forward died with "'numpy.ndarray' object has no attribute 'rows'")
    lora.merge(floats)
    save_checkpoint(tmp_path / "merged", floats, tok)
    for base_dtype in ("q4", "int8"):
        with pytest.raises(CheckpointError, match=r"config\.json: the adapters are merged into this checkpoint's base "
                                                  r"weights \(field 'lora.merged'\), which a packed base \((q4_1|int8)"
                                                  r"\) cannot take out again: load it with base_dtype 'float32'"):
            lab.from_pretrained(tmp_path / "merged", base_dtype=base_dtype)
    merged = lab.from_pretrained(tmp_path / "merged")
    lora.unmerge(merged)
    _close(logits(merged), logits(q4))


@pytest.mark.parametrize("kind", ["q4_1", "q4_0", "int8"])
def test_quantized_linear_gradients_to_input_and_bias_equal_finite_differences(use_backend, kind):
    """Central differences of sum(c * gelu(x W + b)): in float64 on numpy (a float64 input's product was rounded to
    float32 there, 0.4 off), in float32 on wgpu."""
    dtype, eps, tol = ("float64", 1e-6, 1e-7) if use_backend.name == "numpy" else ("float32", 1e-2, 5e-3)
    rng = np.random.default_rng(4)
    for n_in, n_out in ((1, 2), (5, 3), (33, 7)):
        w = QuantizedWeight(quant.quantize(rng.standard_normal((n_out, n_in)).astype(np.float32), kind), use_backend)
        x0, b0, c = rng.standard_normal((2, n_in)), rng.standard_normal(n_out), rng.standard_normal((2, n_out))

        def f(x, b, grad=False):
            xt, bt = tensor(x, dtype=dtype, requires_grad=grad), tensor(b, dtype=dtype, requires_grad=grad)
            y = (F.quantized_linear(xt, w, bt, activation="gelu") * tensor(c, dtype=dtype)).sum()
            assert y.dtype == dtype
            return (y, xt, bt) if grad else y.item()
        y, xt, bt = f(x0, b0, grad=True)
        y.backward()
        for which, value, got in (("x", x0, xt.grad.numpy()), ("bias", b0, bt.grad.numpy())):
            want = np.zeros_like(value)
            for i in np.ndindex(value.shape):
                up, down = value.copy(), value.copy()
                up[i] += eps
                down[i] -= eps
                want[i] = ((f(up, b0) - f(down, b0)) if which == "x" else (f(x0, up) - f(x0, down))) / (2 * eps)
            assert np.abs(got - want).max() <= tol * max(1.0, np.abs(want).max()), (which, n_in, n_out)


def test_a_packed_model_refuses_a_state_it_cannot_pack_naming_the_tensor_and_changes_nothing(use_backend, tmp_path):
    m = _lora_llama("q4")
    before = {n: p.numpy() for n, p in m.named_parameters()}
    state = {n: v * 1.5 for n, v in before.items()}   # every tensor new; a late one too small for q4
    state["model.layers.1.mlp.down_proj.weight"] = state["model.layers.1.mlp.down_proj.weight"] * 1e-32
    # quantize ran as each weight was written: the first ones were already replaced when a later one failed
    with pytest.raises(ValueError, match=r"state dict: tensor 'model\.layers\.1\.mlp\.down_proj\.weight': quantize: "
                                         r"q4_1 keeps .* too small for it"):
        m.load_state_dict(state)
    assert all(np.array_equal(p.numpy(), before[n]) for n, p in m.named_parameters())
    floats = _lora_llama("float32")
    floats.load_state_dict(state)
    floats.save_pretrained(tmp_path / "tiny")
    with pytest.raises(ValueError, match=r"model\.safetensors.*tensor 'model\.layers\.1\.mlp\.down_proj\.weight': "
                                         r"quantize: q4_1 keeps"):
        lab.from_pretrained(tmp_path / "tiny", base_dtype="q4")


def test_from_pretrained_names_the_weight_it_cannot_pack(tmp_path):
    lab.manual_seed(0)
    m = TransformerLM(replace(PRESETS["tiny"], vocab_size=40, block_size=8, n_layer=1, n_head=2, n_embd=32))
    state = m.state_dict()
    state["h.0.mlp.c_fc.weight"] = state["h.0.mlp.c_fc.weight"] * 1e-33
    m.load_state_dict(state)
    m.save_pretrained(tmp_path / "gpt2", format="hf")
    with pytest.raises(InputError, match=r"from_pretrained\(\.\.\., base_dtype='q4'\): h\.0\.mlp\.c_fc\.weight: "
                                         r"quantize: q4_1 keeps .* too small"):
        lab.from_pretrained(tmp_path / "gpt2", base_dtype="q4")
    assert lab.from_pretrained(tmp_path / "gpt2", base_dtype="int8")   # a float32 scale per row holds them


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_a_checkpoint_of_a_lora_run_on_a_gguf_q4_base_reloads_the_same_blocks(use_backend, qtype, tmp_path):
    """A checkpoint holds the base's dequantized values; a Q4_0 file's were packed again as q4_1 on reload (0.2
    off), so a resumed run trained on another base."""
    from lab.checkpoint import load_checkpoint, save_checkpoint
    m = lora.apply(lab.from_pretrained(_tiny_gguf(tmp_path, qtype), base_dtype="q4"), r=2, alpha=4,
                   targets="all-linear")
    save_checkpoint(tmp_path / "ck", m, lab.load_tokenizer(_tiny_gguf(tmp_path, qtype)))
    again, _, _ = load_checkpoint(tmp_path / "ck")
    packed = {n: p for n, p in m.named_parameters() if isinstance(p, QuantizedWeight)}
    reloaded = {n: p for n, p in again.named_parameters() if isinstance(p, QuantizedWeight)}
    assert packed.keys() == reloaded.keys() and {p.dtype for p in packed.values()} == {qtype.lower()}
    for name, p in packed.items():
        assert reloaded[name].dtype == p.dtype and all(np.array_equal(a, b) for a, b in
                                                       zip(p.packed.arrays, reloaded[name].packed.arrays)), name


def test_a_q4_lora_run_with_accumulation_resumes_with_the_losses_of_an_uninterrupted_one(use_backend, tmp_path):
    """Replayed steps (wgpu) of two micro-batches each; the checkpoint holds the base once (its
    dequantized values, no packed copy beside them) and the resumed base is the same blocks."""
    from lab.checkpoint import save_checkpoint
    from lab.io import read_safetensors
    from lab.train import TrainConfig, Trainer
    ids = np.random.default_rng(0).integers(0, 50, 400)
    cfg = TrainConfig(steps=5, batch_size=2, block_size=8, grad_accum_steps=2, eval_every=100, log_every=100)

    def trainer():
        return Trainer(_lora_llama("q4"), ids[:300], ids[300:], cfg)
    t = trainer()
    whole = [t.train_step()[0].item() for _ in range(4)]
    t = trainer()
    first = [t.train_step()[0].item() for _ in range(2)]
    save_checkpoint(tmp_path / "ck", t.model, lab.CharTokenizer.from_text(string.ascii_letters[:50]), t)
    names = list(read_safetensors(tmp_path / "ck" / "model.safetensors"))
    assert sorted(names) == sorted(n for n, _ in t.model.named_parameters())
    resumed = Trainer.resume(tmp_path / "ck", ids[:300], ids[300:])
    assert first + [resumed.train_step()[0].item() for _ in range(2)] == whole
    for (name, p), (_, o) in zip(t.model.named_parameters(), resumed.model.named_parameters()):
        if isinstance(p, QuantizedWeight):
            assert o.dtype == "q4_1" and all(np.array_equal(a, b) for a, b in zip(p.packed.arrays, o.packed.arrays))
