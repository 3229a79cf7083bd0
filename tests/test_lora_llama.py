"""LoRA on the Llama family (issue #21): targets by PEFT's names and "all-linear", dropout on the adapter input,
tied heads through merge and export, and adapters PEFT reads and writes for transformers' LlamaForCausalLM.

Models are tiny and odd (GQA 4:2 heads, head_dim 6 beside hidden 8, rank 3). Logits tolerance 1e-4 against
transformers/PEFT: float32 through two layers summed in another order; 1e-5 between lab's own merged and unmerged
forms (one float32 rounding of W + scale A^T B^T)."""
import json
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
import transformers

import lab
from lab import lora
from lab.checks import InputError
from lab.engine import ops as F
from lab.io import CheckpointError
from lab.models import PRESETS, TransformerLM
from test_llama import hf_model, lab_model, tokens
from test_lora import _assert_same_state, _randomize_B, _state

GQA = "gqa2-untied-headdim"   # hidden 8, 4 query heads on 2 key-value heads, head_dim 6, a head of its own
TIED = "mha-tied"             # hidden 12, 3 heads, the head is the embedding
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _logits(m, ids):
    with lab.no_grad():
        return m.eval()(ids).numpy()


def _gpt2(seed=0):
    lab.manual_seed(seed)
    return TransformerLM(replace(PRESETS["tiny"], vocab_size=40, block_size=12, n_layer=2, n_head=2, n_embd=24)).eval()


def _wrapped(m):
    return sorted(path for path, _ in lora.adapters(m))


def test_all_linear_wraps_every_linear_layer_but_the_output_head():
    untied = lab_model(hf_model(GQA))
    lora.apply(untied, r=2, alpha=4, targets="all-linear")
    assert _wrapped(untied) == sorted(f"model.layers.{i}.{'mlp' if n.endswith(('gate_proj', 'up_proj', 'down_proj')) else 'self_attn'}.{n}"
                                      for i in (0, 1) for n in LLAMA_LINEAR)
    assert not untied.lm_head.weight.requires_grad and "lm_head" not in dict(lora.adapters(untied))
    gpt2 = lora.apply(_gpt2(), r=2, alpha=4, targets=["all-linear"])
    assert _wrapped(gpt2) == sorted(f"h.{i}.{p}" for i in (0, 1) for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                             "mlp.c_proj"))
    assert gpt2.lora_config["target_modules"] == "all-linear"
    with pytest.raises(InputError, match=r"'all-linear' stands alone"):
        lora.apply(_gpt2(), targets=["all-linear", "c_fc"])


@pytest.mark.parametrize("targets,expected", [
    ("q_proj", ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]),
    (["self_attn.v_proj", "model.layers.1.mlp.down_proj"],
     ["model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.v_proj"]),
    (r"model\.layers\.0\.self_attn\.(k|o)_proj", ["model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.o_proj"]),
    ({"lm_head", "up_proj"}, ["lm_head", "model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"]),
], ids=["one-name", "dotted-paths", "pattern", "untied-head"])
def test_targets_take_peft_forms_and_peft_wraps_the_same_layers(targets, expected, tmp_path):
    """A name, a dotted path ending a layer's path, a string PEFT reads as a pattern of whole paths; the adapter
    written for them wraps in PEFT exactly these layers."""
    peft = pytest.importorskip("peft")
    hf = hf_model(GQA)
    m = lora.apply(lab_model(hf), r=2, alpha=4, targets=targets)
    assert _wrapped(m) == expected
    m.save_adapter(tmp_path / "ad")
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "ad")
    assert sorted(n[len("base_model.model."):] for n, mod in pm.named_modules()
                  if isinstance(mod, peft.tuners.lora.LoraLayer)) == expected


def test_apply_without_targets_adapts_every_linear_layer_but_the_head_in_either_family():
    """The default targets were GPT-2's layer names: lora.apply(llama_model) failed with 'unknown target
    module(s) ['c_attn', 'c_proj', 'c_fc']'. Each family's default is its linear layers but the head (what `lab
    plan` counts without --lora-targets); GPT-2's keeps the names it has always saved."""
    llama, gpt2 = lab_model(hf_model(GQA)), _gpt2()
    assert _wrapped(lora.apply(llama, r=2)) == _wrapped(lora.apply(lab_model(hf_model(GQA)), r=2, targets="all-linear"))
    assert llama.lora_config["target_modules"] == "all-linear"
    assert _wrapped(lora.apply(gpt2, r=2)) == _wrapped(lora.apply(_gpt2(), r=2, targets="all-linear"))
    assert gpt2.lora_config["target_modules"] == ["c_attn", "c_proj", "c_fc"]


def test_unknown_target_lists_the_models_names_nearest_first_and_changes_nothing():
    m = lab_model(hf_model(GQA))
    before = _state(m)
    with pytest.raises(InputError) as e:
        lora.apply(m, targets=["q_proj", "gate_prj"])
    msg = str(e.value)
    assert msg.startswith("unknown target module(s) ['gate_prj']: this model's linear layers are ['gate_proj', ")
    assert "(nearest first)" in msg and "'all-linear'" in msg and all(n in msg for n in [*LLAMA_LINEAR, "lm_head"])
    with pytest.raises(InputError, match=r"unknown target module\(s\) \['model\.layers\.9\.self_attn\.q_proj'\]: "
                                         r"this model's linear layers are \['q_proj', "):
        lora.apply(m, targets="model.layers.9.self_attn.q_proj")   # no layer 9: nearest by the layer's name
    _assert_same_state(m, before)
    assert not hasattr(m, "lora_config")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_targeting_the_head_of_a_tied_model_is_refused_and_changes_nothing(family):
    m = lab_model(hf_model(TIED)) if family == "llama" else _gpt2()
    before = _state(m)
    tied = "model.embed_tokens" if family == "llama" else "wte"
    with pytest.raises(InputError, match=rf"target 'lm_head': this model's output head is its embedding '{tied}'"):
        lora.apply(m, targets=["lm_head"])
    _assert_same_state(m, before)


def test_rank_above_a_targets_smaller_side_is_refused_and_changes_nothing():
    m = lab_model(hf_model(GQA))   # q_proj 8 -> 24, k_proj 8 -> 12: every layer's smaller side is 8
    before = _state(m)
    with pytest.raises(InputError, match=r"LoRA rank r=9 exceeds min\(in, out\) = 8 of model\.layers\.0\.self_attn\."
                                         r"q_proj \(8 -> 24\): r must be at most 8"):
        lora.apply(m, r=9, targets="all-linear")
    _assert_same_state(m, before)
    with pytest.raises(InputError, match="modules_to_save=\\['lm_head'\\] is not supported"):
        lora.apply(m, modules_to_save=["lm_head"], targets="all-linear")
    _assert_same_state(m, before)


def test_apply_failing_half_way_leaves_the_model_as_it_was(monkeypatch):
    """An adapter that cannot be made (a device out of memory on the fifth upload) leaves no layer wrapped and
    no parameter frozen: apply is all or nothing."""
    m = lab_model(hf_model(GQA))
    before = _state(m)
    made, init = [], lora.LoRALinear.__init__

    def failing(self, *args):
        made.append(1)
        if len(made) == 5:
            raise MemoryError("device out of memory")
        init(self, *args)
    monkeypatch.setattr(lora.LoRALinear, "__init__", failing)
    with pytest.raises(MemoryError):
        lora.apply(m, r=2, targets="all-linear")
    _assert_same_state(m, before)
    assert not hasattr(m, "lora_config") and len(made) == 5


def test_lora_dropout_drops_the_adapter_input_in_training_only(use_backend):
    """PEFT's lora_dropout: y = x W + scale * dropout(x) A^T B^T, the base fed the whole input; the mask drawn
    from lab.manual_seed's stream (the same seed, the same mask); eval mode drops nothing."""
    lab.manual_seed(0)
    layer = lora.LoRALinear(lab.nn.Linear(8, 5), r=3, alpha=6, dropout=0.5)
    layer.lora_B.data = layer.lora_B.backend.from_numpy(np.random.default_rng(1).normal(0, 0.5, (5, 3)).astype(np.float32))
    x = lab.tensor(np.random.default_rng(2).normal(size=(4, 8)).astype(np.float32))
    W, b = layer.weight.numpy(), layer.bias.numpy()
    A, B = layer.lora_A.numpy(), layer.lora_B.numpy()
    with lab.no_grad():
        lab.manual_seed(7)
        train = layer.train()(x).numpy()
        lab.manual_seed(7)
        again = layer(x).numpy()
        lab.manual_seed(7)
        dropped = F.dropout(x, 0.5, True).numpy()
        evaluated = layer.eval()(x).numpy()
    xs = x.numpy()
    assert 0 < (dropped == 0).mean() < 1
    np.testing.assert_array_equal(train, again)
    np.testing.assert_allclose(train, xs @ W + b + 2.0 * dropped @ A.T @ B.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(evaluated, xs @ W + b + 2.0 * xs @ A.T @ B.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_merging_a_tied_model_keeps_one_embedding_and_its_logits(use_backend, family, tmp_path):
    """all-linear on a model whose head is its embedding: merge, unmerge and export leave the embedding (the
    head) as it was, one tensor, and give the adapted logits; transformers reads the export tied."""
    hf = hf_model(TIED) if family == "llama" else None
    m = lab_model(hf) if family == "llama" else _gpt2()
    ids = tokens((2, 7)) if family == "llama" else np.random.default_rng(2).integers(0, 40, (2, 7))
    emb_name = "model.embed_tokens.weight" if family == "llama" else "wte.weight"
    base = _logits(m, ids)
    embedding = dict(m.named_parameters())[emb_name].numpy().copy()
    lora.apply(m, r=3, alpha=6, targets="all-linear")
    _randomize_B(m)
    adapted = _logits(m, ids)
    assert np.abs(adapted - base).max() > 1e-3
    m.merge_adapter()
    names = [n for n, _ in m.named_parameters()]
    assert not any(n.startswith("lm_head") for n in names)   # no second copy of the head appeared
    np.testing.assert_array_equal(dict(m.named_parameters())[emb_name].numpy(), embedding)
    np.testing.assert_allclose(_logits(m, ids), adapted, atol=1e-5)
    m.save_pretrained(tmp_path / "merged", format="hf")
    m.unmerge_adapter()
    np.testing.assert_array_equal(dict(m.named_parameters())[emb_name].numpy(), embedding)
    np.testing.assert_allclose(_logits(m, ids), adapted, atol=1e-5)
    with lora.adapter_enabled(m, False):
        np.testing.assert_allclose(_logits(m, ids), base, atol=1e-5)
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert exported.get_output_embeddings().weight.data_ptr() == exported.get_input_embeddings().weight.data_ptr()
    with torch.no_grad():
        np.testing.assert_allclose(exported(torch.tensor(ids)).logits.numpy(), adapted, atol=1e-4)


def test_merging_switched_off_adapters_is_refused_and_the_outputs_stay_the_bases(use_backend):
    """use_adapter(False) then merge_adapter(): the update went into the base weights while the adapters still
    read as off, so the model computed the adapted logits 'with the adapters off' (PEFT unmerges a disabled
    adapter in its forward). Refused, in either switch's form, nothing changed."""
    m = lab_model(hf_model(GQA))
    ids = tokens((2, 7))
    base = _logits(m, ids)
    lora.apply(m, r=3, alpha=7, targets="all-linear")
    _randomize_B(m)
    m.use_adapter(False)
    with pytest.raises(InputError, match=r"merge_adapter: refused: the adapters are switched off .* use_adapter\(True\)"):
        m.merge_adapter()
    with lora.adapter_enabled(m, True), pytest.raises(InputError, match="switched off"):   # on in this thread only
        m.merge_adapter()
    np.testing.assert_array_equal(_logits(m, ids), base)
    m.use_adapter(True)
    with lora.adapter_enabled(m, False), pytest.raises(InputError, match="switched off"):
        lora.merge(m)
    assert not any(a.merged for _, a in lora.adapters(m))
    with lora.adapter_enabled(m, False):
        np.testing.assert_array_equal(_logits(m, ids), base)


@pytest.mark.parametrize("family,base_dtype", [("llama", "float32"), ("gpt2", "float32"), ("llama", "float16")])
def test_merge_then_unmerge_gives_back_the_base_bit_for_bit(use_backend, family, base_dtype, tmp_path):
    """(w + u) - u is w only to within a rounding: unmerge subtracted the update, and the base came back off by
    one float32 unit in about a third of its entries, drifting further with each merge/unmerge. It also holds
    through load_adapter on the merged model (unmerge, swap, merge); a merged checkpoint unmerges to within a
    rounding (its file holds only the merged values)."""
    m = lab_model(hf_model(GQA)) if family == "llama" else _gpt2()
    ids = tokens((2, 7)) if family == "llama" else np.random.default_rng(2).integers(0, 40, (2, 7))
    lora.apply(m, r=3, alpha=7, targets="all-linear", base_dtype=base_dtype)
    _randomize_B(m)
    frozen = {n: p.numpy().copy() for n, p in m.named_parameters() if not p.requires_grad}
    adapted = _logits(m, ids)
    m.save_adapter(tmp_path / "ad")
    _randomize_B(m, seed=9)
    for _ in range(3):
        m.merge_adapter()
        m.unmerge_adapter()
    m.merge_adapter()
    lora.load_adapter(m, tmp_path / "ad")   # on the merged model
    np.testing.assert_allclose(_logits(m, ids), adapted, atol=1e-5 if base_dtype == "float32" else 5e-3)   # (float16: the sum rounded to it)
    m.unmerge_adapter()
    for n, p in m.named_parameters():
        if n in frozen:
            np.testing.assert_array_equal(p.numpy(), frozen[n], err_msg=n)
    np.testing.assert_array_equal(_logits(m, ids), adapted)


def test_peft_loads_an_all_linear_odd_rank_adapter_onto_transformers_llama(use_backend, tmp_path):
    peft = pytest.importorskip("peft")
    hf = hf_model(GQA)
    m = lora.apply(lab_model(hf), r=3, alpha=5, dropout=0.1, targets="all-linear")
    _randomize_B(m)
    m.save_adapter(tmp_path / "ad", base_model_name_or_path="org/tiny-llama")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["target_modules"], cfg["fan_in_fan_out"],
            cfg["base_model_name_or_path"]) == (3, 5, 0.1, "all-linear", False, "org/tiny-llama")
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "ad").eval()
    ids = tokens((2, 9))
    with torch.no_grad():
        np.testing.assert_allclose(pm(torch.tensor(ids)).logits.numpy(), _logits(m, ids), atol=1e-4)


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "k_proj", "down_proj"]], ids=["all-linear", "named"])
def test_lab_loads_an_adapter_peft_saved_for_a_llama_model(use_backend, targets, tmp_path):
    peft = pytest.importorskip("peft")
    made = peft.get_peft_model(hf_model(GQA), peft.LoraConfig(r=3, lora_alpha=7, target_modules=targets,
                                                              lora_dropout=0.05, bias="none", task_type="CAUSAL_LM"))
    torch.manual_seed(3)
    for n, p in made.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, 0.0, 0.2)
    made.save_pretrained(tmp_path / "peft_ad")
    ours = lab_model(hf_model(GQA))
    lora.load_adapter(ours, tmp_path / "peft_ad")
    assert len(lora.adapters(ours)) == (14 if targets == "all-linear" else 6)
    assert ours.lora_config["lora_dropout"] == 0.05 and ours.lora_config["r"] == 3
    ids = tokens((2, 9))
    with torch.no_grad():
        np.testing.assert_allclose(_logits(ours, ids), made.eval()(torch.tensor(ids)).logits.numpy(), atol=1e-4)


def test_adapter_for_another_base_is_refused_and_changes_nothing(use_backend, tmp_path):
    m = lora.apply(lab_model(hf_model(TIED)), r=2, alpha=4, targets="all-linear")   # hidden 12
    m.save_adapter(tmp_path / "ad")
    other = lab_model(hf_model(GQA))   # hidden 8
    before = _state(other)
    with pytest.raises(CheckpointError, match=r"adapter_model\.safetensors: tensor 'base_model\.model\.model\.layers"
                                              r"\.0\.self_attn\.q_proj\.lora_A\.weight' has shape \(2, 12\), this model "
                                              r"needs \(2, 8\) \(an adapter for a different base\?\)"):
        lora.load_adapter(other, tmp_path / "ad")
    _assert_same_state(other, before)
    assert not lora.adapters(other)


def test_an_adapter_of_another_rank_or_targets_is_refused_naming_them_and_changes_nothing(tmp_path):
    lora.apply(lab_model(hf_model(GQA)), r=3, alpha=6, targets=["q_proj"]).save_adapter(tmp_path / "ad")
    for r, targets, message in ((2, ["q_proj"], r"the adapter has rank r=3, this model's adapters r=2: load_adapter "
                                                r"replaces the values of adapters of the same rank"),
                                (3, ["v_proj"], r"adapter tensors do not match the model: missing \['base_model\.model"
                                                r"\.model\.layers\.0\.self_attn\.v_proj\.lora_A\.weight'.*unexpected")):
        other = lora.apply(lab_model(hf_model(GQA)), r=r, alpha=1, targets=targets)
        _randomize_B(other)
        before, config = _state(other), dict(other.lora_config)
        with pytest.raises(CheckpointError, match=message):
            lora.load_adapter(other, tmp_path / "ad")
        _assert_same_state(other, before)
        assert other.lora_config == config
    fresh = lora.load_adapter(lab_model(hf_model(GQA)), tmp_path / "ad")   # without adapters: the file's r, targets
    assert fresh.lora_config["r"] == 3 and _wrapped(fresh) == ["model.layers.0.self_attn.q_proj",
                                                               "model.layers.1.self_attn.q_proj"]


def test_peft_options_lab_does_not_implement_are_refused_by_name(tmp_path):
    """modules_to_save (a trained copy of the head), rank_pattern, DoRA...: loaded without them the logits would
    differ from PEFT's, so the load is refused naming the option, the model unchanged."""
    peft = pytest.importorskip("peft")
    made = peft.get_peft_model(hf_model(GQA), peft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"],
                                                              task_type="CAUSAL_LM"))
    made.save_pretrained(tmp_path / "ad")
    m = lab_model(hf_model(GQA))
    before = _state(m)
    with pytest.raises(CheckpointError, match=r"adapter_config\.json: unsupported PEFT options \{'modules_to_save': "
                                              r"\['lm_head'\]"):
        lora.load_adapter(m, tmp_path / "ad")
    path = tmp_path / "ad" / "adapter_config.json"
    saved = json.loads(path.read_text())
    for option, value in [("rank_pattern", {"q_proj": 4}), ("use_dora", True), ("layers_to_transform", [0]),
                          ("layer_replication", [[0, 1]]), ("alora_invocation_tokens", [5])]:
        path.write_text(json.dumps({**saved, "modules_to_save": None, option: value}))
        with pytest.raises(CheckpointError, match=rf"unsupported PEFT options \{{'{option}'"):
            lora.load_adapter(m, tmp_path / "ad")
    _assert_same_state(m, before)


def test_save_adapter_names_the_hub_model_the_base_came_from(tmp_path, monkeypatch):
    """from_pretrained records its source (model.name_or_path) as transformers does; a shipped GGUF, by its short
    name or its file's path, is the Hub model it was converted from; save_adapter writes it as the base."""
    import ggufs
    from lab import shipped
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    ggufs.write_gguf(tmp_path / "pkg" / "tiny.gguf", ggufs.hf_tensors(layers=1, hidden=8, heads=2, kv_heads=1,
                                                                       inter=12))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(shipped.SHIPPED, "tiny-shipped", shipped.Shipped("pkg", "tiny.gguf", "org/tiny-original", "-"))
    for name in ("tiny-shipped", tmp_path / "pkg" / "tiny.gguf", str(tmp_path / "pkg" / "tiny.gguf"), tmp_path / "pkg"):
        m = lab.from_pretrained(name)
        assert m.name_or_path == "org/tiny-original", name
    lora.apply(m, r=2, targets="all-linear").save_adapter(tmp_path / "ad")
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "org/tiny-original"
    hf_model(GQA).save_pretrained(tmp_path / "local")
    assert lab.from_pretrained(tmp_path / "local").name_or_path == str(tmp_path / "local")


def test_a_resumed_lora_run_saves_its_adapter_naming_the_base_model_it_came_from(tmp_path):
    """A LoRA run's checkpoint forgot model.name_or_path: after Trainer.resume (or load_checkpoint,
    from_pretrained of the checkpoint) save_adapter wrote base_model_name_or_path null, where PEFT's
    AutoPeftModel looks for the base. The checkpoint's "lora" entry records it; a damaged one is named."""
    from lab.checkpoint import load_checkpoint, save_checkpoint
    from lab.train import TrainConfig, Trainer
    m = lab_model(hf_model(GQA))
    m.name_or_path = "org/the-base"
    lora.apply(m, r=2, targets="all-linear")
    ids = tokens(200)
    t = Trainer(m, ids, ids, TrainConfig(steps=3, batch_size=2, block_size=8))
    t.train_step()
    save_checkpoint(tmp_path / "ck", m, lab.CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJK"), t)
    for model in (Trainer.resume(tmp_path / "ck", ids, ids).model, load_checkpoint(tmp_path / "ck")[0],
                  lab.from_pretrained(tmp_path / "ck")):
        assert model.name_or_path == "org/the-base"
        model.save_adapter(tmp_path / "ad")
        assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
            "org/the-base"
    path = tmp_path / "ck" / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "lora": {**config["lora"], "base_model_name_or_path": 7}}))
    with pytest.raises(CheckpointError, match=r"config\.json: field 'lora\.base_model_name_or_path' must be a Hub "
                                              r"id or a path, got 7"):
        load_checkpoint(tmp_path / "ck")


def test_peft_reads_a_gpt2_all_linear_adapter_as_lab_wraps_it(tmp_path):
    """GPT-2's all-linear: PEFT takes transformers' Conv1D layers and leaves the tied lm_head out, as lab does."""
    peft = pytest.importorskip("peft")
    m = lora.apply(_gpt2(), r=3, alpha=6, targets="all-linear")
    _randomize_B(m)
    m.save_pretrained(tmp_path / "base", format="hf")
    m.save_adapter(tmp_path / "ad")
    pm = peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base"),
                                        tmp_path / "ad").eval()
    assert sorted(n[len("base_model.model.transformer."):] for n, mod in pm.named_modules()
                  if isinstance(mod, peft.tuners.lora.LoraLayer)) == _wrapped(m)
    ids = np.random.default_rng(2).integers(0, 40, (2, 7))
    with torch.no_grad():
        np.testing.assert_allclose(pm(torch.tensor(ids)).logits.numpy(), _logits(m, ids), atol=1e-4)


def test_gpt2_targets_match_transformers_paths_as_peft_does():
    """PEFT matches GPT-2's targets on transformers' paths (transformer.h.1.mlp.c_fc), which lab's layers sit under."""
    for targets in (["transformer.h.1.mlp.c_fc"], ["h.1.mlp.c_fc"], r"transformer\.h\.1\.mlp\.c_f."):
        assert _wrapped(lora.apply(_gpt2(), r=2, targets=targets)) == ["h.1.mlp.c_fc"], targets


def test_merge_into_a_quantized_base_is_refused_and_changes_nothing(use_backend):
    """Folding the update into 4-bit blocks would requantize it away: merge_adapter refuses, saying so."""
    m = lora.apply(lab_model(hf_model(GQA)).eval(), r=2, targets="all-linear", base_dtype="q4")
    _randomize_B(m)
    ids = tokens((1, 5))
    before, logits = _state(m), _logits(m, ids)
    with pytest.raises(InputError, match=r"merge_adapter: refused: the base weights of 14 adapted layers are "
                                         r"quantized .*Nothing was changed"):
        m.merge_adapter()
    layer = lora.adapters(m)[0][1]   # a layer's own merge (unmerge on a layer marked merged) wrote floats in
    for shift in (layer.merge, lambda: layer._shift_weight(-1.0)):
        with pytest.raises(InputError, match=r"LoRA merge/unmerge: this layer's base is packed \(q4_1\)"):
            shift()
    _assert_same_state(m, before)
    np.testing.assert_array_equal(_logits(m, ids), logits)


@pytest.mark.parametrize("base", [5, "", ["org/x"]], ids=repr)
def test_save_adapter_refuses_a_base_name_that_is_no_id_or_path_and_writes_nothing(base, tmp_path):
    m = lora.apply(_gpt2(), r=2)
    with pytest.raises(InputError, match=rf"save_adapter: base_model_name_or_path must be a Hub id, a path or None, "
                                         rf"got {re.escape(repr(base))}"):
        m.save_adapter(tmp_path / "ad", base_model_name_or_path=base)
    assert not (tmp_path / "ad").exists()
    m.save_adapter(tmp_path / "ad", base_model_name_or_path=tmp_path / "base")   # a Path is written as its text
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(tmp_path / "base")


def test_lora_dropout_training_repeats_and_resumes_with_the_same_losses(use_backend, tmp_path):
    """The adapter's dropout masks come from the trainer's seed stream: a run repeats, and a checkpoint resumes,
    with the same losses; the losses differ from a run without the dropout (the masks are there)."""
    from lab.checkpoint import save_checkpoint
    from lab.train import Trainer
    from test_llama import _llama_trainer
    text = lab.load_corpus("kjv")[:2000]

    def run(dropout=0.3):
        tok, t = _llama_trainer(text)
        lora.apply(t.model, r=2, alpha=4, dropout=dropout, targets="all-linear")
        return tok, Trainer(t.model, t.train_ids, t.val_ids, t.cfg)
    losses = [[t.train_step()[0].item() for _ in range(3)] for _, t in (run(), run(), run(0.0))]
    assert losses[0] == losses[1] != losses[2]
    tok, t = run()
    first = [t.train_step()[0].item() for _ in range(2)]
    save_checkpoint(tmp_path / "ck", t.model, tok, t)
    resumed = Trainer.resume(tmp_path / "ck", t.train_ids, t.val_ids)
    assert resumed.model.lora_config["lora_dropout"] == 0.3
    assert first + [resumed.train_step()[0].item()] == losses[0]


def test_training_with_the_adapters_off_or_merged_says_so_and_steps_nothing(use_backend):
    """Adapters switched off (or merged) leave nothing trainable in the loss: the step said only "backward() on a
    tensor that does not require grad"; now it names the adapters' mode, and a step after switching them on trains."""
    from lab.train import Trainer
    from test_llama import _llama_trainer

    def trainer(**kwargs):
        _, t = _llama_trainer(lab.load_corpus("kjv")[:2000], grad_accum_steps=2)
        lora.apply(t.model, r=2, alpha=4, **kwargs)
        return Trainer(t.model, t.train_ids, t.val_ids, t.cfg)
    q4, floats = trainer(targets="all-linear", base_dtype="q4"), trainer(targets=["q_proj"])   # merge: float only
    for t, off, on in ((q4, lora.use_adapter, lora.use_adapter), (floats, lora.merge, lora.unmerge)):
        off(t.model, False) if off is lora.use_adapter else off(t.model)
        before = _state(t.model)
        with pytest.raises(InputError, match=r"Trainer: no trainable parameter takes part in the loss: the model's "
                                             r"LoRA adapters are switched off or merged.*use_adapter\(model, True\)"):
            t.train_step()
        _assert_same_state(t.model, before)
        on(t.model)
        with lab.no_grad(), pytest.raises(InputError, match=r"loss: gradients are off in this thread \(the step "
                                                            r"runs inside lab.no_grad\(\)\)"):
            t.train_step()
        assert np.isfinite(t.train_step()[0].item())
        assert any(not np.array_equal(p.numpy(), before[0][n][0]) for n, p in t.model.named_parameters()
                   if p.requires_grad)
