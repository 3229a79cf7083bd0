"""F.decode_attention: a one-token step's attention (cache write, rotary, GQA, left padding, heads merged) in one
pass, equal to the composed step it replaces on both backends, one dispatch per layer on wgpu."""
from dataclasses import replace

import numpy as np
import pytest

import lab
from lab.decode import FixedCache
from lab.engine import ops as F
from lab.engine.tensor import no_grad, tensor
from lab.models import PRESETS, TransformerLM


def _model(family, block=64):
    lab.manual_seed(0)
    if family == "gpt":
        m = TransformerLM(replace(PRESETS["tiny"], vocab_size=30, n_layer=2, n_embd=32, n_head=4, block_size=block))
    else:
        m = lab.LlamaLM(lab.LlamaConfig(vocab_size=30, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=block))
    return m.eval()


def _window(pos):
    """lab.decode.DecodeRunner's window of a step at pos: a power of two >= pos + 1, at least 16."""
    return max(16, 1 << int(pos).bit_length())


def _steps(model, backend, fused, monkeypatch, pad, windowed):
    """Logits and caches of a 14-token prefill and one-token steps at slots 14..33 (crossing the 16- and 32-slot
    window edges), through decode_attention or (fused=False) the composed ops."""
    with monkeypatch.context() as mp:
        if not fused:
            mp.setattr(backend, "decode_attention_fits", lambda head_dim: False)
        rng = np.random.default_rng(3)
        cache = model.new_cache(2)
        if windowed:   # (the layers DecodeRunner gives a capturing backend: each step reads its window)
            cache = [FixedCache(layer) for layer in cache]
        out = [model.forward_cached(rng.integers(0, 30, (2, 14)).astype(np.int32), cache, 0, pad=pad).numpy()]
        for pos in range(14, 34):
            for layer in cache if windowed else ():
                layer.window = _window(pos)
            out.append(model.forward_cached(rng.integers(0, 30, (2, 1)).astype(np.int32), cache, pos,
                                            pad=pad).numpy())
        return out, [t.numpy() for layer in cache for t in layer]


@pytest.mark.parametrize("family", ["gpt", "llama"])
@pytest.mark.parametrize("pad", [None, (0, 3)])
def test_decode_attention_steps_equal_the_composed_steps(use_backend, family, pad, monkeypatch):
    model = _model(family)
    pad = None if pad is None else np.array(pad)
    windowed = use_backend.supports_capture
    with no_grad():
        fused, fused_cache = _steps(model, use_backend, True, monkeypatch, pad, windowed)
        composed, composed_cache = _steps(model, use_backend, False, monkeypatch, pad, windowed)
    for a, b in zip(fused, composed):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(fused_cache, composed_cache):   # the same keys and values written, the same slots
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("heads,kv_heads,dim", [(4, 4, 8), (4, 1, 8), (6, 2, 80)])
@pytest.mark.parametrize("packed", [True, False])
def test_decode_attention_kernel_equals_the_numpy_reference(wgpu_backend, numpy_backend, heads, kv_heads, dim,
                                                            packed):
    """Long windows (several 64-slot chunks of the kernel's online softmax, padding past the first chunk), heads
    wider than its 64 threads, GQA, rotary, the packed projection and three separate ones."""
    B, block = 3, 160
    rng = np.random.default_rng(heads * 100 + kv_heads + dim)
    cache = [rng.normal(0, 1, (B, kv_heads, block, dim)).astype(np.float32) for _ in range(2)]
    widths = (heads * dim, kv_heads * dim, kv_heads * dim)
    proj = [rng.normal(0, 1, (B, 1, w)).astype(np.float32) for w in widths]
    if packed:
        proj = [np.concatenate(proj, axis=2)]
    cos, sin = (f(rng.normal(0, 1, (150, dim))).astype(np.float32) for f in (np.cos, np.sin))
    for pos, pad, rope in [(0, None, False), (63, (0, 5, 63), True), (64, (0, 64, 2), False),
                           (129, (0, 70, 129), True), (140, None, True)]:
        out = {}
        for backend in (numpy_backend, wgpu_backend):
            c = [tensor(x, backend=backend) for x in cache]
            p = tuple(tensor(x, backend=backend) for x in proj)
            tables = (tensor(cos, backend=backend), tensor(sin, backend=backend)) if rope else None
            y = F.decode_attention(p[0] if packed else p, c, pos, heads, None if pad is None else np.array(pad),
                                   tables)
            out[backend.name] = [y.numpy()] + [t.numpy() for t in c]
        for a, b in zip(out["numpy"], out["wgpu"]):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5, err_msg=f"pos {pos}, pad {pad}")
        assert np.array_equal(out["numpy"][1][:, :, pos + 1:], cache[0][:, :, pos + 1:])   # slots past pos kept


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_greedy_generation_is_unchanged_by_decode_attention(use_backend, family, monkeypatch):
    model = _model(family)
    prompts = [[3, 5, 7, 1, 2], [4, 9]]
    runs = []
    for fused in (True, False):
        with monkeypatch.context() as mp:
            if not fused:
                mp.setattr(use_backend, "decode_attention_fits", lambda head_dim: False)
            alone = [lab.generate(model, p, 12, greedy=True, eos_token_id=[]) for p in prompts]
            batch = lab.generate(model, prompts, 12, greedy=True, eos_token_id=[])
            runs.append([np.asarray(ids).tolist() for ids in alone + list(batch)])
    assert runs[0] == runs[1]
    assert runs[0][:2] == runs[0][2:]   # (each row of the padded batch as it is generated alone)


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_a_decode_steps_attention_is_one_dispatch_per_layer(wgpu_backend, family):
    """On wgpu a layer's attention in a decode step is the one decode_attention dispatch between its input
    projection(s) and its output projection: no head split, permute, cache write, softmax, rotary or merge."""
    from lab.engine.backend import using_backend
    with using_backend(wgpu_backend), no_grad():
        model = _model(family)
        cache = [FixedCache(layer) for layer in model.new_cache(1)]
        model.forward_cached(np.ones((1, 4), np.int32), cache, 0)
        for layer in cache:
            layer.window = 16
        with lab.profile() as prof:
            model.forward_cached(np.ones((1, 1), np.int32), cache, 4)
    names = [name for name, _, _ in prof.records]
    layers = 2
    assert names.count("decode_attention:main") == layers, names
    assert not [n for n in names if n.split(":")[0] in ("softmax", "rotary")], names
    assert sum(n.startswith("copy:") for n in names) <= 1, names   # (GPT-2's position row, before the layers)
    # each layer's attention half: the norm, its products and their elementwise epilogues, decode_attention
    norms = [i for i, n in enumerate(names) if n.split(":")[0] in ("layernorm", "rmsnorm")]
    for start, end in zip(norms[0:2 * layers:2], norms[1:2 * layers:2]):
        other = [n for n in names[start + 1:end] if not n.startswith(("matmul", "elementwise:", "reduce:columns"))]
        assert other == ["decode_attention:main"], names[start:end]


def test_decode_attention_refuses_bad_input_with_one_clear_error(numpy_backend):
    from lab.engine.backend import using_backend
    with using_backend(numpy_backend):
        cache = [tensor(np.zeros((2, 2, 8, 4), np.float32)) for _ in range(2)]
        qkv = tensor(np.zeros((2, 1, 32), np.float32))   # (4 + 2 * 2) heads of 4
        tables = (tensor(np.ones((8, 4), np.float32)), tensor(np.zeros((8, 4), np.float32)))
        cases = [
            (dict(qkv=tensor(np.zeros((2, 1, 30), np.float32))), r"projections must be \(2, 1, 32\).*got \(2, 1, 30\)"),
            (dict(qkv=tensor(np.zeros((2, 2, 32), np.float32))), r"one token per row.*got \(2, 2, 32\)"),
            (dict(n_head=3), r"n_head must be a positive multiple of the cache's 2 key-value heads, got 3"),
            (dict(pos=8), r"pos must be a cache slot in \[0, 7\], got 8"),
            (dict(pos=-1), r"pos must be a cache slot in \[0, 7\], got -1"),
            (dict(pad=np.array([0, 4])), r"each in \[0, pos=3\].*got \[0, 4\]"),
            (dict(pad=np.array([1])), r"one count of left-padding slots per row \(2\).*got \[1\]"),
            (dict(pad=np.array([0.5, 0])), r"pad must be"),
            (dict(rope=(tables[0][:3], tables[1][:3])), r"P > pos=3.*cos \(3, 4\)"),
            (dict(cache=(cache[0], tensor(np.zeros((2, 2, 8, 2), np.float32)))), r"two \(B, Hkv, block, D\)"),
            (dict(qkv=tensor(np.zeros((2, 1, 32), np.int32))), r"expected a floating-point tensor"),
        ]
        for change, message in cases:
            args = dict(qkv=qkv, cache=cache, pos=3, n_head=4, pad=None, rope=None) | change
            with pytest.raises(ValueError, match=message):
                F.decode_attention(args.pop("qkv"), **args)
        w = tensor(np.zeros((2, 1, 32), np.float32), requires_grad=True)
        with pytest.raises(ValueError, match="no gradient: a decode step's attention is inference only"):
            F.decode_attention(w * 1.0, cache, 3, 4)
        assert not F.decode_attention_applies(w * 1.0, 4)   # (so the models take the composed ops there)
        with no_grad():
            assert F.decode_attention_applies(w * 1.0, 4)
            numpy_backend.decode_attention_fits = lambda head_dim: False   # (a backend without the kernel)
            try:
                with pytest.raises(ValueError, match="numpy backend has no decode attention kernel for heads of 4"):
                    F.decode_attention(qkv, cache, 3, 4)
                assert not F.decode_attention_applies(qkv, 4)
            finally:
                del numpy_backend.decode_attention_fits
