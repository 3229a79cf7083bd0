"""LoRA plans for the Llama family (issue #21 item 3): the adapters lora.apply adds as PEFT counts them, the frozen
base's bytes as lora.apply stores it (float16, int8 and q4 packed as lab.engine.quant packs them), the training
memory against the measured peak on both backends, the same targets' forms as lora.apply, the command line and
the trainer's fit check."""
import json
from dataclasses import replace

import numpy as np
import pytest

import lab
from lab import lora, plan
from lab.checks import InputError
from lab.engine.tensor import QuantizedWeight
from lab.models import PRESETS, LlamaConfig, LlamaLM
from lab.plan.estimator import DoesNotFitError
from lab.train import TrainConfig, Trainer
from peak_memory import peak_bytes
from step_counts import second_step_dispatches

# grouped-query 4/2 tied; 6/3 with head_dim 10 (not hidden / heads) untied, sizes no multiple of q4's 32
GQA_TIED = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
ODD_UNTIED = LlamaConfig(vocab_size=1000, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                         num_attention_heads=6, num_key_value_heads=3, head_dim=10, tie_word_embeddings=False,
                         max_position_embeddings=256)
# widths no multiple of 4 (int8's words) or 32 (q4's blocks): o_proj 54 -> 42, k/v 42 -> 18, down_proj 22 -> 42
ODD_WIDTHS = LlamaConfig(vocab_size=50, hidden_size=42, intermediate_size=22, num_hidden_layers=2,
                         num_attention_heads=3, num_key_value_heads=1, head_dim=18, tie_word_embeddings=False,
                         max_position_embeddings=32)
TARGETS = ["all-linear", ["q_proj", "v_proj"], ["k_proj", "down_proj", "gate_proj"], "q_proj",
           ["model.layers.1.self_attn.k_proj", "mlp.up_proj"], r".*\.layers\.[02]\.self_attn\.(q|o)_proj"]


def _peft_trainable(cfg, r, targets):
    """(trainable, total) parameters of PEFT's LoRA on transformers' LlamaForCausalLM of the same config."""
    import peft
    import torch
    import transformers
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg.to_hf()))
    model = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=16, target_modules=targets))
    return model.get_nb_trainable_parameters()


@pytest.mark.parametrize("targets", TARGETS[:3] + [["q_proj", "lm_head"], TARGETS[5]],
                         ids=["all-linear", "q-v", "k-down-gate", "q-head", "pattern"])
@pytest.mark.parametrize("cfg", [GQA_TIED, ODD_UNTIED], ids=["gqa-tied", "odd-untied"])
def test_llama_lora_plan_counts_the_trainable_parameters_peft_counts(cfg, targets):
    if "lm_head" in targets and cfg.tie_word_embeddings:
        pytest.skip("a tied head takes no adapter (test_targets_lora_apply_refuses_are_refused_by_the_plan)")
    p = plan.estimate(cfg, batch=2, seq=16, lora_rank=4, lora_targets=targets, device="h200")
    assert (p.trainable_params, p.params) == _peft_trainable(cfg, 4, targets)


@pytest.mark.parametrize("base_dtype", ["float32", "float16", "int8", "q4"])
@pytest.mark.parametrize("cfg", [GQA_TIED, ODD_UNTIED, ODD_WIDTHS, replace(GQA_TIED, architecture="Qwen2ForCausalLM"),
                                 replace(ODD_UNTIED, attention_bias=True, mlp_bias=True)],
                         ids=["gqa-tied", "odd-untied", "odd-widths", "qwen2-qkv-bias", "all-biases"])
def test_llama_lora_plan_weights_are_the_bytes_lora_apply_stores(cfg, base_dtype, numpy_backend):
    """Every target form lora.apply takes adapts the layers the plan counts, and the plan's weight bytes are the
    model's own after apply: packed (padded blocks of 32, int8's per-row scales) or float16 linear weights, the
    rest (biases too) float32."""
    from lab.engine.backend import using_backend
    for targets in TARGETS:
        with using_backend(numpy_backend):
            lab.manual_seed(0)
            model = lora.apply(LlamaLM(cfg), r=4, targets=targets, base_dtype=base_dtype)
        p = plan.estimate(cfg, batch=2, seq=16, lora_rank=4, lora_targets=targets, lora_base_dtype=base_dtype,
                          device="h200")
        assert p.trainable_params == model.num_parameters(trainable_only=True), targets
        assert p.params == model.num_parameters(), targets
        stored = sum(w.nbytes if isinstance(w, QuantizedWeight) else w.data.nbytes for w in model.parameters())
        assert p.memory["weights"] == stored, targets


def _peak(backend, cfg, batch, seq, targets, base_dtype, r=4, k=0):
    """Peak memory of two LoRA steps with the adapted model resident: wgpu's peak bytes in use (lavapipe), numpy's
    traced allocations (apply's float32 weights, packed and dropped, are no step's: the peak is reset after it)."""
    from lab.engine.backend import using_backend
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, 4000)
    with using_backend(backend):
        lab.manual_seed(0)

        def two_steps(model):
            t = Trainer(model, ids[:3000], ids[3000:], TrainConfig(steps=3, batch_size=batch, block_size=seq,
                                                                   replay_steps=False, checkpoint_activations=k))
            t.train_step()
            t.train_step()
        return peak_bytes(backend, two_steps, lambda: lora.apply(LlamaLM(cfg), r=r, targets=targets,
                                                                 base_dtype=base_dtype))


def _planned(backend, cfg, batch, seq, targets, base_dtype, r=4, k=0):
    from lab.plan.profiles import limits_profile
    return plan.estimate(cfg, batch=batch, seq=seq, steps=1, lora_rank=r, lora_targets=targets,
                         lora_base_dtype=base_dtype, device=limits_profile(backend),
                         checkpoint_activations=k).memory["total"]


@pytest.mark.parametrize("base_dtype", ["float32", "q4"])
@pytest.mark.parametrize("cfg,batch,seq", [(GQA_TIED, 6, 32), (ODD_UNTIED, 4, 48)], ids=["gqa-tied", "odd-untied"])
def test_llama_lora_plan_memory_within_20_percent_of_the_measured_peak(any_backend, cfg, batch, seq, base_dtype):
    """All-linear adapters: the plan's training memory against the peak of two steps."""
    predicted = _planned(any_backend, cfg, batch, seq, "all-linear", base_dtype)
    peak = _peak(any_backend, cfg, batch, seq, "all-linear", base_dtype)
    assert abs(predicted / peak - 1) < 0.20, (predicted, peak)


@pytest.mark.parametrize("base_dtype", ["float32", "int8"])
def test_llama_lora_checkpointed_plan_memory_within_20_percent_of_the_measured_peak(any_backend, base_dtype):
    """Every block checkpointed: its adapters keep their activations only while it runs again. The plan counted
    them whole for every block, 1.6x numpy's peak and 1.5x lavapipe's at 4 layers."""
    cfg = replace(GQA_TIED, vocab_size=97, num_hidden_layers=4)
    predicted = _planned(any_backend, cfg, 8, 64, "all-linear", base_dtype, k=1)
    peak = _peak(any_backend, cfg, 8, 64, "all-linear", base_dtype, k=1)
    assert abs(predicted / peak - 1) < 0.20, (predicted, peak)


WEIGHT_HEAVY = LlamaConfig(vocab_size=2000, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                           num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False,
                           max_position_embeddings=64)


@pytest.mark.parametrize("base_dtype", ["int8", "q4"])
def test_llama_lora_plan_saving_of_a_packed_base_within_10_percent_of_the_measured_one(any_backend, base_dtype):
    """Where the weights outweigh a step's activations (batch 1 x 16): what a packed base saves over float32, as
    planned and as measured. numpy's products dequantize a chunk of a packed weight's rows (the 2,000-row head
    whole), which the plan counted nowhere: it planned 18% more saving than numpy's peaks showed."""
    args = (any_backend, WEIGHT_HEAVY, 1, 16, ["q_proj", "v_proj"])
    planned = _planned(*args, "float32", r=8) - _planned(*args, base_dtype, r=8)
    measured = _peak(*args, "float32", r=8) - _peak(*args, base_dtype, r=8)
    assert abs(planned / measured - 1) < 0.10, (planned, measured)


def _linear_weight_floats(cfg):
    """Floats of the linear layers' weights of transformers' model of cfg (on the meta device: no memory)."""
    import torch
    import transformers
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg.to_hf()))
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)
               and not (cfg.tie_word_embeddings and m is model.lm_head))


def test_smollm2_q4_plan_counts_its_linear_weights_at_a_sixth_point_four_of_float32(capsys):
    """SmolLM2-135M (576 and 1536 wide: whole blocks of 32): q4_1's 20 bytes a block of 32 weights, 1/6.4 of
    float32's 128; the tied head is the embedding and stays float32. The command line plans the same."""
    from lab.cli import main
    cfg = PRESETS["smollm2-135m"]
    linear = _linear_weight_floats(cfg)
    plans = {d: plan.estimate("smollm2-135m", batch=1, seq=512, lora_rank=8, lora_targets="all-linear",
                              lora_base_dtype=d, device="h200") for d in ("float32", "float16", "int8", "q4")}
    weights = {d: p.memory["weights"] for d, p in plans.items()}
    assert weights["float32"] - weights["q4"] == linear * 4 - linear * 4 / 6.4
    assert weights["float32"] - weights["float16"] == linear * 2
    assert plans["q4"].trainable_params == _peft_trainable(replace(cfg, num_hidden_layers=2), 8,
                                                           "all-linear")[0] * 15
    assert main(["plan", "--config", "smollm2-135m", "--lora-rank", "8", "--lora-targets", "q_proj,v_proj",
                 "--lora-base-dtype", "q4", "--device", "h200", "--seq", "512", "--batch-size", "1"]) == 0
    out = capsys.readouterr().out
    named = plan.estimate("smollm2-135m", batch=1, seq=512, lora_rank=8, lora_targets=["q_proj", "v_proj"],
                          lora_base_dtype="q4", device="h200")
    assert "LoRA r=8 on q_proj, v_proj, q4 base" in out
    assert f"{named.trainable_params:,} trainable" in out and f"{named.params:,} total" in out
    # a set of targets is recorded as lora.apply records it, and the plan stays JSON (to_dict: the widget's)
    as_set = plan.estimate("smollm2-135m", batch=1, seq=512, lora_rank=8, lora_targets={"v_proj", "k_proj"},
                           device="h200")
    assert json.loads(json.dumps(as_set.to_dict()))["lora_targets"] == ["k_proj", "v_proj"]


def test_a_llama_lora_plan_that_does_not_fit_suggests_smaller_bases():
    """SmolLM2-135M with an untied head on a device of 450 MiB: float32 weights alone do not fit; the plan
    suggests float16, int8 and q4 bases with what each saves (the head packed too), a q4 plan suggests none."""
    cfg = replace(PRESETS["smollm2-135m"], tie_word_embeddings=False)
    from lab.plan.profiles import named_profile
    small = replace(named_profile("h200"), memory_bytes=450 * 2 ** 20)
    p = plan.estimate(cfg, batch=1, seq=64, lora_rank=8, device=small)
    assert not p.fits
    linear = _linear_weight_floats(cfg)
    saved = {"float16": linear * 2, "int8": linear * 4 - sum(  # int8: a byte a weight and a float32 scale a row
        n * out * (in_ + 4) for (in_, out), n in _rows(cfg)), "q4": linear * 4 - linear * 4 / 6.4}
    for dtype, less in saved.items():
        assert any(f"base_dtype='{dtype}')): {less / 2 ** 20:,.0f} MiB less" in s for s in p.suggestions), dtype
    q4 = plan.estimate(cfg, batch=1, seq=64, lora_rank=8, device=small, lora_base_dtype="q4")
    assert q4.fits and not q4.suggestions


def _rows(cfg):
    """[((in, out), layers)] of the linear layers of cfg (all widths multiples of 4)."""
    C, I, D = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    H, K, L = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers
    rows = [((C, H * D), L), ((C, K * D), 2 * L), ((H * D, C), L), ((C, I), 2 * L), ((I, C), L)]
    return rows + ([] if cfg.tie_word_embeddings else [((C, cfg.vocab_size), 1)])


def test_targets_lora_apply_refuses_are_refused_by_the_plan():
    """The plan refuses, with lora.apply's reasons, what apply refuses: the tied head, names no layer has, a
    rank above a layer's size, all-linear among other names, no targets; one error each, naming the values."""
    cases = [(GQA_TIED, 4, ["q_proj", "lm_head"], r"target 'lm_head': this model's output head is its embedding"),
             (GQA_TIED, 4, ["q_proj", "c_attn"], r"unknown target module\(s\) \['c_attn'\]: this model's linear "
                                                 r"layers are \['down_proj', 'gate_proj', 'k_proj'"),
             (GQA_TIED, 4, ["model.layers.2.self_attn.q_proj"], r"unknown target module\(s\) \['model.layers.2"),
             (GQA_TIED, 4, "nothing(", r"unknown target module\(s\) \['nothing\('\]"),
             (GQA_TIED, 4, [], r"lora_targets must be a layer name, a list of them or 'all-linear'"),
             (GQA_TIED, 4, [3], r"lora_targets must be a layer name.*got \[3\]"),
             (GQA_TIED, 4, ["all-linear", "q_proj"], r"'all-linear' stands alone"),
             (ODD_UNTIED, 31, ["k_proj"], r"LoRA rank r=31 exceeds min\(in, out\) = 30 of self_attn.k_proj "
                                          r"\(48 -> 30\)")]
    for cfg, r, targets, message in cases:
        with pytest.raises(InputError, match=message):
            plan.estimate(cfg, batch=2, seq=16, lora_rank=r, lora_targets=targets, device="h200")
    assert plan.estimate(ODD_UNTIED, batch=2, seq=16, lora_rank=30, lora_targets=["k_proj"],
                         device="h200").trainable_params == 3 * 30 * (48 + 30)
    with pytest.raises(InputError, match=r"lora_base_dtype must be one of .* got 'q8'"):
        plan.estimate(GQA_TIED, lora_rank=4, lora_base_dtype="q8", device="h200")
    with pytest.raises(InputError, match=r"without a lora_rank"):
        plan.estimate(GQA_TIED, lora_base_dtype="q4", device="h200")
    for rank in (None, 0):
        with pytest.raises(InputError, match=r"^lora_targets \['q_proj'\] without a lora_rank: targets are for a LoRA"):
            plan.estimate(GQA_TIED, lora_rank=rank, lora_targets=["q_proj"], device="h200")


ODD_FORMS = ["", "Q_PROJ", "proj", ".*_proj", "lm_head", "model.lm_head", ["lm_head"], "lm_head|.*q_proj", "self_attn",
             "0.mlp.up_proj", "00.mlp.up_proj", "layers.3.mlp.up_proj", "s.0.mlp.up_proj", ["mlp.up_proj", "mlp.up_proj"],
             {"k_proj", "v_proj"}, [".*q_proj"], r"model\.layers\.1\..*", "[", ["q_proj", ""], "all-linear ",
             "base_model.model.model.layers.0.self_attn.q_proj", "model.layers.-1.mlp.up_proj", ["q_proj", 3], 5]


@pytest.mark.parametrize("cfg", [GQA_TIED, ODD_UNTIED], ids=["gqa-tied", "odd-untied"])
def test_the_plan_adapts_what_lora_apply_adapts_for_odd_target_forms(cfg, numpy_backend):
    """Patterns, case, partial names, repeated names, sets, the head by other names, leading zeros, a block past
    the last, a rank above k/v's width: the plan counts what lora.apply adds, or refuses what it refuses."""
    from lab.engine.backend import using_backend
    for r in (4, 31):
        for targets in ODD_FORMS:
            try:
                with using_backend(numpy_backend):
                    lab.manual_seed(0)
                    applied = lora.apply(LlamaLM(cfg), r=r, targets=targets).num_parameters(trainable_only=True)
            except InputError:
                applied = InputError
            try:
                planned = plan.estimate(cfg, batch=1, seq=8, lora_rank=r, lora_targets=targets,
                                        device="h200").trainable_params
            except InputError:
                planned = InputError
            assert planned == applied, (r, targets)


def test_targets_of_a_config_of_many_layers_are_counted_without_listing_the_layers():
    """Names and layer paths are counted per block kind (a config of 2**40 layers plans at once, it hung listing
    them); a pattern, matched path by path, is refused above 10,000 layers with the count and what to use."""
    import time
    big = replace(GQA_TIED, num_hidden_layers=2 ** 40)
    start = time.perf_counter()
    p = plan.estimate(big, batch=1, seq=8, lora_rank=4, device="h200",
                      lora_targets=["mlp.up_proj", "layers.5.mlp.up_proj", f"model.layers.{2 ** 40 - 1}.self_attn.q_proj"])
    assert time.perf_counter() - start < 5
    assert p.trainable_params == 2 ** 40 * 4 * (64 + 176) + 4 * (64 + 64)
    with pytest.raises(InputError, match=r"lora_targets '\.\*q_proj' is a pattern, matched path by path: at most "
                                         r"10,000 layers, this config has 1,099,511,627,776; name the layers"):
        plan.estimate(big, batch=1, seq=8, lora_rank=4, lora_targets=".*q_proj", device="h200")


@pytest.mark.parametrize("flash", [None, False], ids=["default-fused", "composed"])
def test_llama_lora_plan_op_count_matches_the_engine(wgpu_backend, monkeypatch, flash):
    """Dispatches of a LoRA step on wgpu (frozen base: no weight gradients; each adapter's products; the adapters'
    updates), tied and untied, all-linear and named layers, a q4 base; on the fused attention (the Llama default
    on wgpu: 4 dispatches a layer fewer, the projections' outputs copied together) and the composed one."""
    from lab.plan.estimator import llama_lora_layers, llama_op_count
    monkeypatch.setattr(wgpu_backend, "FLASH_ATTENTION", flash)
    fused = wgpu_backend.flash_attention_fits((2, 16, 8 * 8), 4, 2, rotary=True)
    assert fused == (flash is None)
    ids = np.random.default_rng(0).integers(0, 61, 2000).astype(np.int32)
    for layers, tied, targets, base_dtype, batch in (
            (1, True, "all-linear", "float32", 2), (3, False, "all-linear", "float32", 2),
            (2, True, ["q_proj", "v_proj"], "float32", 2), (2, False, ["q_proj", "lm_head"], "q4", 2),
            (1, True, ["q_proj"], "float32", 2)):
        cfg = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                          max_position_embeddings=16)
        measured = second_step_dispatches(
            wgpu_backend, lambda: lora.apply(LlamaLM(cfg), r=4, targets=targets, base_dtype=base_dtype), ids,
            batch_size=batch)
        chosen = llama_lora_layers(cfg, targets, 4, by_name=True)
        counted = llama_op_count(cfg, wgpu_backend.optimizer_slots(), llama_lora_layers(cfg, targets, 4),
                                 rows=batch * 16, fused_attention=fused,
                                 adapted_qkv=[chosen.get(f"self_attn.{p}_proj", 0) for p in "qkv"])
        assert measured == counted, (layers, tied, targets, batch)


def test_the_trainer_checks_a_llama_lora_run_against_the_lora_plan(numpy_backend, monkeypatch):
    """A LoRA run on a Llama model was checked as full training (gradients and AdamW moments of every base
    weight): a device holding the LoRA step but not full training refused it. Now the trainer asks the LoRA plan,
    which refuses only what it does not fit, with the plan's suggestions."""
    from lab.engine.backend import using_backend
    from lab.plan import estimator, profiles
    cfg, batch, seq = GQA_TIED, 6, 32
    lora_need = plan.estimate(cfg, batch=batch, seq=seq, steps=1, lora_rank=4, device=profiles.limits_profile(
        numpy_backend)).memory["total"]
    full_need = plan.estimate(cfg, batch=batch, seq=seq, steps=1, device=profiles.limits_profile(
        numpy_backend)).memory["total"]
    assert lora_need < full_need
    limits = profiles.limits_profile(numpy_backend)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, 4000)
    with using_backend(numpy_backend):
        lab.manual_seed(0)
        model = lora.apply(LlamaLM(cfg), r=4, targets="all-linear")
        def device_of(memory):   # every fit check (the LoRA plan's, full training's) reads this device
            device = replace(limits, memory_bytes=memory)
            for module in (estimator, profiles):
                monkeypatch.setattr(module, "limits_profile", lambda backend: device)
        device_of((lora_need + full_need) // 2)
        Trainer(model, ids[:3000], ids[3000:], TrainConfig(steps=1, batch_size=batch, block_size=seq)).train_step()
        device_of(lora_need // 2)
        with pytest.raises(DoesNotFitError, match=r"does not fit .*Suggestions: batch \d+ with gradient accumulation"):
            Trainer(model, ids[:3000], ids[3000:], TrainConfig(steps=1, batch_size=batch, block_size=seq))


def test_gpt2_lora_plan_takes_targets_by_name_and_all_linear():
    """--lora-targets reaches GPT-2 plans too: its layers by name or all-linear count what lora.apply adds; a name
    it has no layer of is one error naming GPT-2's layers (it was a KeyError)."""
    from lab.models import TransformerConfig, TransformerLM
    cfg = TransformerConfig(vocab_size=61, block_size=16, n_layer=2, n_head=2, n_embd=32)
    for targets in (["c_attn"], "all-linear", ["c_fc", "c_proj"]):
        lab.manual_seed(0)
        model = lora.apply(TransformerLM(cfg), r=4, targets=targets)
        p = plan.estimate(cfg, batch=2, lora_rank=4, lora_targets=targets, device="h200")
        assert p.trainable_params == model.num_parameters(trainable_only=True), targets
    for targets in ("q_proj", ["c_attn", "lm_head"], 5):
        with pytest.raises(InputError, match=r"(unknown target module\(s\) \['(q_proj|lm_head)'\]|lora_targets must "
                                             r"be).*\['c_attn', 'c_proj', 'c_fc'\]"):
            plan.estimate(cfg, batch=2, lora_rank=4, lora_targets=targets, device="h200")
