import json
import re
from dataclasses import replace

import numpy as np
import pytest

import lab
from lab import lora
from lab.checkpoint import CheckpointError
from lab.data import CharTokenizer, load_corpus, train_val_split
from lab.generate import generate
from lab.models import PRESETS, TransformerLM
from lab.train import TrainConfig, Trainer

IDX = np.random.default_rng(2).integers(0, 40, (2, 12))


def _model(seed=0):
    lab.manual_seed(seed)
    return TransformerLM(replace(PRESETS["tiny"], vocab_size=40, block_size=12, n_layer=2, n_head=2, n_embd=24)).eval()


def _logits(m, idx=IDX):
    with lab.no_grad():
        return m(idx).numpy()


def _randomize_B(m, seed=5):
    rng = np.random.default_rng(seed)
    for _, a in lora.adapters(m):
        a.lora_B.data = a.lora_B.backend.from_numpy(rng.normal(0, 0.1, a.lora_B.shape).astype(np.float32))


def test_untrained_adapter_changes_nothing_and_freezes_the_base(use_backend):
    m = _model()
    before = _logits(m)
    lora.apply(m, r=4, alpha=8)
    np.testing.assert_array_equal(_logits(m), before)  # B = 0
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A" in n or ".lora_B" in n for n in trainable)
    assert len(trainable) == 2 * 4 * 2  # 2 layers x (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj) x (A, B)
    A = dict(m.named_parameters())["h.0.attn.c_attn.lora_A"].numpy()
    assert A.shape == (4, 24) and np.abs(A).max() <= 1 / np.sqrt(24) and A.std() > 0.05  # Kaiming-uniform bound


def test_training_updates_only_the_adapters(use_backend):
    m = _model()
    lora.apply(m, r=2, alpha=4, targets=["c_attn", "c_fc"])
    base = {n: p.numpy().copy() for n, p in m.named_parameters() if not p.requires_grad}
    ids = np.random.default_rng(0).integers(0, 40, 2000).astype(np.int32)
    t = Trainer(m.train(), ids, ids, TrainConfig(steps=5, batch_size=2, lr=1e-2, warmup_steps=1))
    adapter_floats = sum(p.size for p in m.trainable_parameters())
    assert t.optimizer.state_bytes() == 2 * 4 * adapter_floats  # AdamW's m and v for A and B alone
    for _ in range(5):
        t.train_step()
    for n, p in m.named_parameters():
        if n in base:
            np.testing.assert_array_equal(p.numpy(), base[n], err_msg=f"frozen {n} changed")
    assert np.abs(_logits(m.eval()) - _logits(_model())).max() > 1e-4, "the adapter must have learned something"


def test_merge_unmerge_and_switching(use_backend):
    m = _model()
    base = _logits(m)
    lora.apply(m, r=3, alpha=6)
    _randomize_B(m)
    adapted = _logits(m)
    assert np.abs(adapted - base).max() > 1e-3
    m.use_adapter(False)
    np.testing.assert_array_equal(_logits(m), base)
    m.use_adapter(True)
    m.merge_adapter()
    np.testing.assert_allclose(_logits(m), adapted, atol=1e-5)
    with pytest.raises(ValueError, match="unmerge first"):
        m.use_adapter(False)
    m.unmerge_adapter()
    np.testing.assert_allclose(_logits(m), adapted, atol=1e-5)
    a = generate(m, [1, 2], 8, greedy=True, adapter=False)
    m.use_adapter(False)
    np.testing.assert_array_equal(a, generate(m, [1, 2], 8, greedy=True))
    from lab.generate import beam_search
    b = beam_search(m, [1, 2], 6, num_beams=3)
    m.use_adapter(True)
    assert lora.adapters(m)[0][1].enabled, "a per-call switch leaves the adapter as it was"
    np.testing.assert_array_equal(beam_search(m, [1, 2], 6, num_beams=3, adapter=False), b)
    assert lora.adapters(m)[0][1].enabled


@pytest.mark.parametrize("n_embd,block", [(24, 12), (64, 64)], ids=["ragged", "whole-tiles"])
def test_float16_base_trains_the_adapters_as_a_float32_base_of_the_same_values(use_backend, n_embd, block):
    """base_dtype="float16" stores every frozen linear weight as float16 (embeddings, LayerNorms, biases and the
    adapters stay float32); the products widen those weights to float32 arithmetic, so the loss and the
    adapters' gradients are those of a float32 base holding the same (rounded) values, on the whole-tile
    kernels (read as they are) and the others (a widened copy) alike. Merge and unmerge keep the base float16."""
    if not getattr(lab.get_backend(), "half_storage", True):
        pytest.skip("this device has no shader-f16")
    cfg = replace(PRESETS["tiny"], vocab_size=40, block_size=block, n_layer=2, n_head=2, n_embd=n_embd)
    lab.manual_seed(0)
    half = lora.apply(TransformerLM(cfg), r=4, alpha=8, base_dtype="float16")
    lab.manual_seed(0)
    ref = TransformerLM(cfg)
    for m in ref.modules():
        if isinstance(m, lab.nn.Linear):
            m.weight.data = m.weight.backend.from_numpy(m.weight.numpy().astype(np.float16).astype(np.float32))
    lora.apply(ref, r=4, alpha=8)
    linear = {f"{p}.weight" for p, m in half.named_modules() if isinstance(m, lab.nn.Linear)}
    dtypes = {n: p.dtype for n, p in half.named_parameters()}
    assert {n for n, d in dtypes.items() if d == "float16"} == linear and len(linear) == 2 * 4
    for m in (half, ref):
        _randomize_B(m)
    idx = np.random.default_rng(3).integers(0, 40, (2, block))
    grads = []
    for m in (half, ref):
        _, loss = m.train()(idx, idx)
        loss.backward()
        grads.append({n: p.grad.numpy() for n, p in m.named_parameters() if p.requires_grad})
        grads[-1]["loss"] = loss.numpy()
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 8 + 1
    for n in grads[0]:
        np.testing.assert_allclose(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6, err_msg=n)
    half.merge_adapter()
    merged = half.h[0].mlp.c_fc.weight
    assert merged.dtype == "float16"
    half.unmerge_adapter()
    np.testing.assert_allclose(half.h[0].mlp.c_fc.weight.numpy().astype(np.float32),
                               ref.h[0].mlp.c_fc.weight.numpy(), atol=5e-4)
    state = half.state_dict()
    half.load_state_dict(state)   # a checkpoint's values go back in each parameter's own dtype
    assert {n: p.dtype for n, p in half.named_parameters()} == dtypes
    assert half.lora_config["base_dtype"] == "float16"
    with pytest.raises(ValueError, match="base_dtype must be"):
        lora.apply(_model(), base_dtype="bfloat16")


def test_save_and_load_adapter_round_trip(use_backend, tmp_path):
    m = _model()
    lora.apply(m, r=4, alpha=16, targets=["c_attn"])
    _randomize_B(m)
    m.save_adapter(tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["fan_in_fan_out"] is True
    assert (cfg["r"], cfg["lora_alpha"], cfg["target_modules"], cfg["bias"]) == (4, 16, ["c_attn"], "none")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "ad" / "adapter_model.safetensors"), "np") as f:
        assert f.metadata() == {"format": "pt"}
        assert f.get_tensor("base_model.model.transformer.h.1.attn.c_attn.lora_A.weight").shape == (4, 24)
        assert f.get_tensor("base_model.model.transformer.h.1.attn.c_attn.lora_B.weight").shape == (72, 4)
    fresh = _model()
    lora.load_adapter(fresh, tmp_path / "ad")
    np.testing.assert_allclose(_logits(fresh), _logits(m), atol=1e-6)


def test_bad_input_gives_clear_errors(use_backend, tmp_path):
    with pytest.raises(ValueError, match=r"unknown target module\(s\) \['q_proj'\]: this model's linear layers are \['c_proj', 'c_fc', 'c_attn'\] \(nearest first\)"):
        lora.apply(_model(), targets=["q_proj"])
    with pytest.raises(ValueError, match=r"LoRA rank r must be an integer >= 1, got 0"):
        lora.apply(_model(), r=0)
    with pytest.raises(ValueError, match=r"r=25 exceeds min\(in, out\) = 24"):
        lora.apply(_model(), r=25)
    m = _model()
    lora.apply(m, r=2, alpha=4)
    m.save_adapter(tmp_path / "ad")
    other = TransformerLM(replace(m.config, n_embd=32, n_head=2)).eval()
    with pytest.raises(CheckpointError, match=r"tensor 'base_model.model.transformer.h.0.attn.c_attn.lora_A.weight' has shape \(2, 24\), this model needs \(2, 32\)"):
        lora.load_adapter(other, tmp_path / "ad")
    (tmp_path / "ad" / "adapter_model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match="adapter_model.safetensors: not a readable safetensors file"):
        lora.load_adapter(_model(), tmp_path / "ad")
    with pytest.raises(CheckpointError, match="adapter config not found"):
        lora.load_adapter(_model(), tmp_path / "missing")


def test_peft_loads_lab_adapter_and_lab_loads_peft_adapter(use_backend, tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from transformers import GPT2LMHeadModel
    m = _model()
    lora.apply(m, r=4, alpha=8)
    _randomize_B(m)
    m.save_pretrained(tmp_path / "base", format="hf")
    m.save_adapter(tmp_path / "ad", base_model_name_or_path=str(tmp_path / "base"))
    pm = peft.PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tmp_path / "base"), tmp_path / "ad").eval()
    with torch.no_grad():
        np.testing.assert_allclose(_logits(m), pm(torch.from_numpy(IDX)).logits.numpy(), atol=1e-4)

    made = peft.get_peft_model(GPT2LMHeadModel.from_pretrained(tmp_path / "base"), peft.LoraConfig(
        r=2, lora_alpha=6, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, task_type="CAUSAL_LM"))
    for n, p in made.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, 0.0, 0.1)
    made.save_pretrained(tmp_path / "peft_ad")
    ours = TransformerLM.from_pretrained(tmp_path / "base")
    lora.load_adapter(ours, tmp_path / "peft_ad")
    with torch.no_grad():
        np.testing.assert_allclose(_logits(ours), made.eval()(torch.from_numpy(IDX)).logits.numpy(), atol=1e-4)


def _bigram_logprob(text, corpus, vocab):
    """Mean log-probability of text's character bigrams under an add-one bigram model of corpus."""
    idx = {c: i for i, c in enumerate(vocab)}
    counts = np.ones((len(vocab), len(vocab)))
    for a, b in zip(corpus, corpus[1:]):
        counts[idx[a], idx[b]] += 1
    logp = np.log(counts / counts.sum(1, keepdims=True))
    return float(np.mean([logp[idx[a], idx[b]] for a, b in zip(text, text[1:])]))


def test_fine_tuning_workflow_shifts_the_model_toward_the_second_corpus(numpy_backend, monkeypatch):
    """The tutorial's workflow: a base trained on corpus A (KJV), an adapter fine-tuned on corpus B (sonnets)."""
    from lab.engine import backend as B
    monkeypatch.setitem(B._state, "backend", numpy_backend)
    a_text, b_text = load_corpus("kjv")[:300_000], load_corpus("sonnets")
    tok = CharTokenizer.from_text(a_text + b_text)
    a_tr, a_va = train_val_split(tok.encode(a_text))
    b_tr, b_va = train_val_split(tok.encode(b_text))
    lab.manual_seed(0)
    m = TransformerLM(replace(PRESETS["tiny"], vocab_size=tok.vocab_size, n_layer=2, n_embd=64, n_head=4, block_size=32))
    Trainer(m, a_tr, a_va, TrainConfig(steps=250, batch_size=16, lr=3e-3, warmup_steps=20)).run(progress=False)
    lora.apply(m, r=8, alpha=16)
    base_weights = {n: p.numpy().copy() for n, p in m.named_parameters() if not p.requires_grad}
    ft = Trainer(m, b_tr, b_va, TrainConfig(steps=150, batch_size=16, lr=3e-3, warmup_steps=10))
    with lora.adapter_enabled(m, False):
        base_loss = ft.evaluate(4)
    ft.run(progress=False)
    adapted_loss = ft.evaluate(4)
    assert adapted_loss < base_loss - 0.2, (base_loss, adapted_loss)
    for n, p in m.named_parameters():
        if n in base_weights:
            np.testing.assert_array_equal(p.numpy(), base_weights[n])
    prompt = "When"
    samples = {flag: "".join(generate(m, prompt, 300, tokenizer=tok, adapter=flag, seed=s, temperature=0.8)
                             for s in range(3)) for flag in (False, True)}

    def toward_b(text):  # how much more B-like than A-like the text's bigrams are
        return _bigram_logprob(text, b_text, tok.chars) - _bigram_logprob(text, a_text, tok.chars)
    assert toward_b(samples[True]) > toward_b(samples[False]) + 0.05, samples


def _state(m):
    """Everything load_adapter could change: every parameter's values and trainability, the adapters' modes."""
    return ({n: (p.numpy().copy(), p.requires_grad) for n, p in m.named_parameters()},
            [(path, a.merged, a.enabled, a.scale, a.dropout) for path, a in lora.adapters(m)],
            dict(getattr(m, "lora_config", {})))


def _assert_same_state(m, before):
    params, modes, config = _state(m)
    assert params.keys() == before[0].keys() and (modes, config) == before[1:]
    for n, (value, trainable) in params.items():
        np.testing.assert_array_equal(value, before[0][n][0], err_msg=n)
        assert trainable == before[0][n][1], n


def _rewrite_adapter(directory, change):
    """The adapter file with `change(tensors)` applied (tensors: name -> array, changed in place)."""
    from safetensors.numpy import load_file, save_file
    path = str(directory / "adapter_model.safetensors")
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_failed_load_adapter_leaves_model_unchanged(use_backend, tmp_path):
    m = _model()
    lora.apply(m, r=2, alpha=4)
    _randomize_B(m)
    m.save_adapter(tmp_path / "ad")
    wider = TransformerLM(replace(m.config, n_embd=32, n_head=2)).eval()   # no adapters yet: none may be attached
    before = _state(wider)
    with pytest.raises(CheckpointError, match=r"has shape \(2, 24\), this model needs \(2, 32\)"):
        lora.load_adapter(wider, tmp_path / "ad")
    _assert_same_state(wider, before)
    assert not lora.adapters(wider)

    target = _model()
    lora.apply(target, r=2, alpha=4)
    _randomize_B(target, seed=9)
    before = _state(target)
    last = "base_model.model.transformer.h.1.mlp.c_proj.lora_B.weight"   # the last one loaded: all others pass
    bad_files = {
        "shape": lambda t: t.__setitem__(last, np.zeros((24, 3), np.float32)),
        "dtype": lambda t: t.__setitem__(last, t[last].astype(np.int32)),
        "nan": lambda t: t[last].__setitem__((0, 0), np.nan),
        "missing": lambda t: t.pop(last),
        "extra": lambda t: t.__setitem__("base_model.model.transformer.h.1.mlp.c_fc.lora_C.weight", t[last]),
    }
    for what, change in bad_files.items():
        m.save_adapter(tmp_path / what)
        _rewrite_adapter(tmp_path / what, change)
        with pytest.raises(CheckpointError, match="adapter_model.safetensors"):
            lora.load_adapter(target, tmp_path / what)
        _assert_same_state(target, before)
    lora.load_adapter(target, tmp_path / "ad")   # the good file still loads after all of that
    np.testing.assert_allclose(_logits(target), _logits(m), atol=1e-6)


def test_load_adapter_names_every_missing_and_unexpected_tensor(numpy_backend, tmp_path):
    m = _model()
    lora.apply(m, r=2, alpha=4, targets=["c_attn", "c_fc"])
    m.save_adapter(tmp_path / "ad")
    other = _model()
    lora.apply(other, r=2, alpha=4, targets=["c_attn", "c_proj"])
    expected = sorted(f"base_model.model.transformer.h.{i}.{site}.lora_{ab}.weight" for i in (0, 1)
                      for site in ("attn.c_proj", "mlp.c_proj") for ab in "AB")
    unexpected = sorted(f"base_model.model.transformer.h.{i}.mlp.c_fc.lora_{ab}.weight" for i in (0, 1) for ab in "AB")
    with pytest.raises(CheckpointError) as e:
        lora.load_adapter(other, tmp_path / "ad")
    assert f"missing {expected}, unexpected {unexpected}" in str(e.value)


def test_load_adapter_on_merged_model_replaces_the_merged_update(use_backend, tmp_path):
    """A merged model keeps its mode: the old update is taken out of the base weights and the loaded one folded
    in, never both (the old one used to stay in the base)."""
    source = _model()
    lora.apply(source, r=2, alpha=4)
    _randomize_B(source, seed=7)
    source.save_adapter(tmp_path / "new")
    m = _model()
    base = _logits(m)
    lora.apply(m, r=2, alpha=4)
    _randomize_B(m, seed=3)
    m.merge_adapter()
    lora.load_adapter(m, tmp_path / "new")
    assert all(a.merged for _, a in lora.adapters(m))
    np.testing.assert_allclose(_logits(m), _logits(source), atol=1e-5)   # float32 rounding of the two shifts
    m.unmerge_adapter()
    np.testing.assert_allclose(_logits(m), _logits(source), atol=1e-5)
    with lora.adapter_enabled(m, False):
        np.testing.assert_allclose(_logits(m), base, atol=1e-5)


def test_apply_refuses_empty_targets(numpy_backend):
    m = _model()
    before = _state(m)
    with pytest.raises(ValueError, match=r"no target modules given: this model's linear layers are "
                                         r"\['c_attn', 'c_fc', 'c_proj'\]"):
        lora.apply(m, targets=[])
    _assert_same_state(m, before)   # nothing frozen


@pytest.mark.parametrize("r", [4.9, True, "4", 0, -1, None, [4]], ids=repr)
def test_adapter_config_fractional_rank_refused(numpy_backend, tmp_path, r):
    m = _model()
    lora.apply(m, r=4, alpha=8)
    m.save_adapter(tmp_path / "ad")
    path = tmp_path / "ad" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "r": r}))
    fresh = _model()
    before = _state(fresh)
    with pytest.raises(CheckpointError, match=rf"adapter_config\.json: field 'r' must be an integer >= 1, got "
                                              rf"{re.escape(repr(r))}"):
        lora.load_adapter(fresh, tmp_path / "ad")
    _assert_same_state(fresh, before)
    with pytest.raises(ValueError, match=rf"LoRA rank r must be an integer >= 1, got {re.escape(repr(r))}"):
        lora.apply(_model(), r=r)


@pytest.mark.parametrize("model_on,active", [("wgpu", "numpy"), ("numpy", "wgpu")])
def test_adapters_live_on_the_models_backend_not_the_active_one(request, model_on, active):
    """lora.apply after lab.set_backend(<the other one>) (a notebook that switched backends after building its
    model) made the adapters on the active backend: the model mixed backends and its first training step failed
    inside the optimizer with "'numpy.ndarray' object has no attribute 'storage'"."""
    from lab.engine import backend as B
    model_backend, active_backend = (request.getfixturevalue(f"{n}_backend") for n in (model_on, active))
    with B.using_backend(model_backend):
        m = _model()
    with B.using_backend(active_backend):
        lora.apply(m, r=2, alpha=4, targets=["c_attn"])
        assert {p.backend for p in m.parameters()} == {model_backend}
        cfg = TrainConfig(steps=1, batch_size=2, warmup_steps=1)
        ids = np.arange(200) % 40
        loss, _ = Trainer(m.train(), ids, ids, cfg).train_step()
    assert np.isfinite(loss.item())
