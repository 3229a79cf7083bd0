"""Issue #20 item 5: the training sequence length (TrainConfig.block_size, `train --block-size`) on both model
families, and the plan estimator for the Llama family (parameters, memory against the measured peak,
`plan --config NAME_OR_PATH`)."""
import json

import numpy as np
import pytest

import lab
from lab import plan
from lab.checks import InputError
from lab.io import CheckpointError
from lab.models import LlamaConfig, LlamaLM, TransformerConfig, TransformerLM
from lab.train import TrainConfig, Trainer
from peak_memory import peak_bytes
from step_counts import second_step_dispatches

IDS = np.random.default_rng(0).integers(0, 61, 3000)
FAMILIES = {"gpt2": lambda: TransformerLM(TransformerConfig(vocab_size=61, block_size=24, n_layer=1, n_head=2,
                                                              n_embd=16)),
            "llama": lambda: LlamaLM(LlamaConfig(vocab_size=61, hidden_size=16, intermediate_size=24,
                                                 num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                                 max_position_embeddings=24))}


@pytest.mark.parametrize("family", FAMILIES)
def test_train_config_block_size_sets_the_sequence_length_of_steps_and_evaluation(use_backend, family):
    lab.manual_seed(0)
    t = Trainer(FAMILIES[family](), IDS[:2000], IDS[2000:], TrainConfig(steps=4, batch_size=3, block_size=7,
                                                                      eval_every=2, eval_batches=1))
    assert t.block_size == 7
    history = t.run(progress=False, log_evals=False)
    assert all(x.shape == (3, 7) and y.shape == (3, 7) for x, y in t._last_batches)
    assert np.isfinite(t.evaluate()) and np.isfinite(history[-1]["loss"])
    t.reconfigure(block_size=5)   # between runs: the next step's batches
    t.cfg.steps = 5
    t.run(progress=False, log_evals=False)
    assert t._last_batches[0][0].shape == (3, 5)
    t.reconfigure(block_size=0)   # 0: the model's
    assert t.block_size == 24


@pytest.mark.parametrize("family", FAMILIES)
def test_block_size_longer_than_the_models_or_negative_is_one_clear_error(family):
    model = FAMILIES[family]()
    with pytest.raises(InputError, match=r"block_size 25 is longer than the model's block_size 24: a training "
                                         r"sequence takes 1\.\.24 tokens \(0: the model's\)"):
        Trainer(model, IDS, IDS, TrainConfig(block_size=25))
    with pytest.raises(InputError, match="block_size"):
        TrainConfig(block_size=-1)
    with pytest.raises(InputError, match="block_size"):
        TrainConfig(block_size=2.5)
    t = Trainer(model, IDS, IDS, TrainConfig(block_size=8))
    with pytest.raises(InputError, match="longer than the model's block_size 24"):
        t.reconfigure(block_size=100)
    assert t.cfg.block_size == 8 and t.block_size == 8   # a refused value changes nothing
    with pytest.raises(InputError, match=r"too short for block_size 20"):   # the splits, checked at the new length
        Trainer(model, IDS[:2000], IDS[2000:2015], TrainConfig(block_size=8)).reconfigure(block_size=20)


def test_the_fit_check_plans_the_training_length_not_the_models_longest():
    """A SmolLM2-sized vocabulary and 8192 positions: a batch of the model's length does not fit a small device,
    one of 64 tokens does (the Trainer asked the fit check for max_position_embeddings tokens whatever it trained)."""
    from lab.models.llama import training_bytes
    cfg = LlamaConfig(vocab_size=2000, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192)
    assert training_bytes(cfg, 4, 64) * 50 < training_bytes(cfg, 4)
    assert training_bytes(cfg, 4, 64, fused_attention=True) == plan.estimate(   # (heads of 8: fused on the H200)
        cfg, batch=4, seq=64, steps=1, device="h200").memory["total"]


def test_the_fit_check_counts_llamas_fused_attention_where_the_step_runs_it(wgpu_backend, monkeypatch):
    """On wgpu a Llama step's attention runs fused by default and holds no (B, H, T, T) weights: a batch that fits
    the device only without them is accepted, as the plan counts it, and refused where the composed path runs
    (the fit check counted the weights on every device)."""
    from dataclasses import replace
    from lab.engine.wgpu.nn import NNOps
    from lab.models.llama import check_batch_fits, training_bytes
    from lab.plan import profiles
    from lab.plan.estimator import DoesNotFitError
    cfg = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    fused, composed = (training_bytes(cfg, 4, 512, fused_attention=f) for f in (True, False))
    assert fused < composed
    prof = replace(profiles.limits_profile(wgpu_backend), memory_bytes=(fused + composed) // 2)
    monkeypatch.setattr(profiles, "limits_profile", lambda backend: prof)
    check_batch_fits(cfg, 4, wgpu_backend, seq=512)
    assert plan.estimate(cfg, batch=4, seq=512, steps=1, device=prof).memory["total"] == fused
    monkeypatch.setattr(NNOps, "FLASH_ATTENTION", False)   # (LAB_FLASH_ATTENTION=0: composed where it fits a buffer)
    with pytest.raises(DoesNotFitError, match="a training batch of 4 x 512 tokens"):
        check_batch_fits(cfg, 4, wgpu_backend, seq=512)


@pytest.mark.parametrize("family", FAMILIES)
def test_resume_continues_at_the_saved_block_size_with_the_same_losses(use_backend, family, tmp_path):
    from lab.checkpoint import save_checkpoint
    tok = lab.CharTokenizer([chr(65 + i) for i in range(61)])
    def trainer():
        lab.manual_seed(3)
        return Trainer(FAMILIES[family](), IDS[:2000], IDS[2000:], TrainConfig(steps=6, batch_size=2, block_size=9))
    t = trainer()
    uninterrupted = [t.train_step()[0].item() for _ in range(4)]
    t = trainer()
    first = [t.train_step()[0].item() for _ in range(2)]
    save_checkpoint(tmp_path / "ck", t.model, tok, t)
    assert json.loads((tmp_path / "ck" / "trainer_state.json").read_text())["train_config"]["block_size"] == 9
    lab.manual_seed(999)
    resumed = Trainer.resume(tmp_path / "ck", IDS[:2000], IDS[2000:])
    assert resumed.block_size == 9
    assert first + [resumed.train_step()[0].item() for _ in range(2)] == uninterrupted
    state = json.loads((tmp_path / "ck" / "trainer_state.json").read_text())
    state["train_config"]["block_size"] = 25   # a file edited to a length the model cannot take: named
    (tmp_path / "ck" / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=r"trainer_state.json: invalid train_config \(block_size 25 is longer "
                                              r"than the model's block_size 24\)"):
        Trainer.resume(tmp_path / "ck", IDS[:2000], IDS[2000:])
    del state["train_config"]["block_size"]   # a checkpoint saved before TrainConfig.block_size: the model's
    (tmp_path / "ck" / "trainer_state.json").write_text(json.dumps(state))
    assert Trainer.resume(tmp_path / "ck", IDS[:2000], IDS[2000:]).block_size == 24


def test_cli_train_block_size(tmp_path, capsys):
    from lab.cli import main
    assert main(["train", "--preset", "llama-tiny", "--steps", "2", "--block-size", "12", "--eval-every", "2",
                 "--backend", "numpy", "--no-progress", "--out", str(tmp_path / "ck")]) == 0
    out = capsys.readouterr().out
    assert "block 12;" in out
    state = json.loads((tmp_path / "ck" / "trainer_state.json").read_text())
    assert state["train_config"]["block_size"] == 12
    assert main(["train", "--preset", "llama-tiny", "--block-size", "65", "--backend", "numpy"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["lab train: error: block_size 65 is longer than the model's block_size 64: a training sequence "
                   "takes 1..64 tokens (0: the model's)"]


PLAN_CONFIGS = {   # grouped-query 4/2 tied; 6/3 with head_dim 10 (not hidden/heads) untied and a larger vocabulary;
    # 16 wide under a vocabulary of 1000 (its layers' activations under the loss's freed chunks: the plan was 32% over
    # numpy's peak, 67% over lavapipe's, while it counted them from below zero)
    "gqa-tied": (LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64), 6, 32),
    "odd-untied": (LlamaConfig(vocab_size=1000, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                               num_attention_heads=6, num_key_value_heads=3, head_dim=10, tie_word_embeddings=False,
                               max_position_embeddings=256), 4, 48),
    "narrow-wide-vocab": (LlamaConfig(vocab_size=1000, hidden_size=16, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                      tie_word_embeddings=False, max_position_embeddings=32), 4, 32)}


@pytest.mark.parametrize("name", PLAN_CONFIGS)
def test_llama_plan_memory_within_20_percent_of_the_measured_peak(any_backend, name):
    """The plan's training memory against the backend's peak over two steps from an empty start: wgpu's peak
    bytes in use (lavapipe), numpy's traced allocations (its arrays are the memory a step holds)."""
    from lab.engine.backend import using_backend
    from lab.plan.profiles import limits_profile
    cfg, batch, seq = PLAN_CONFIGS[name]
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, 4000)
    with using_backend(any_backend):
        lab.manual_seed(0)

        def two_steps(_):
            t = Trainer(LlamaLM(cfg), ids[:3000], ids[3000:], TrainConfig(steps=3, batch_size=batch, block_size=seq,
                                                                          replay_steps=False))
            t.train_step()
            t.train_step()
        peak = peak_bytes(any_backend, two_steps)
    predicted = plan.estimate(cfg, batch=batch, seq=seq, steps=1, device=limits_profile(any_backend)).memory["total"]
    assert abs(predicted / peak - 1) < 0.20, (predicted, peak)


def test_llama_plan_counts_parameters_as_transformers():
    """SmolLM2-135M's config (9/3 heads, SwiGLU, tied), an untied one and Qwen2's q/k/v biases: the plan's count
    equals transformers' model built from the same config.json (on the meta device: no memory)."""
    import torch
    import transformers
    from dataclasses import replace
    from lab.models import PRESETS
    smol = PRESETS["smollm2-135m"]
    for cfg in (smol, replace(smol, tie_word_embeddings=False, num_hidden_layers=2),
                replace(smol, architecture="Qwen2ForCausalLM", num_hidden_layers=2),
                replace(smol, attention_bias=True, mlp_bias=True, num_hidden_layers=2)):
        hf = transformers.AutoConfig.for_model(**cfg.to_hf())
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(hf)
        expected = sum(p.numel() for p in model.parameters())   # (tied: the embedding counted once)
        assert plan.estimate(cfg, batch=1, seq=64, device="h200").params == expected, cfg
    assert plan.estimate("smollm2-135m", batch=1, seq=64, device="h200").params == 134_515_008


@pytest.mark.parametrize("flash", [None, False], ids=["default-fused", "composed"])
def test_llama_plan_op_count_matches_the_engine(wgpu_backend, monkeypatch, flash):
    """By default the Llama family's attention runs fused on wgpu (AttentionTuning.FLASH_DEFAULT_ROTARY), and the
    plan counts that path where runs_fused_attention says the device takes it; LAB_FLASH_ATTENTION=0 the composed
    one (dropout: two dispatches a layer more there, none in the fused kernels; the plan counted none)."""
    from lab.plan.estimator import llama_op_count, runs_fused_attention
    from lab.plan.profiles import limits_profile
    monkeypatch.setattr(wgpu_backend, "FLASH_ATTENTION", flash)
    for layers, tied, dropout, batch in ((1, True, 0.0, 2), (3, False, 0.0, 2), (2, True, 0.1, 2)):
        cfg = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                          max_position_embeddings=16, dropout=dropout)
        measured = second_step_dispatches(wgpu_backend, lambda: LlamaLM(cfg), IDS, batch_size=batch)
        fused = wgpu_backend.flash_attention_fits((2, 16, 8 * 8), 4, 2, rotary=True)
        assert fused == (flash is None)
        assert runs_fused_attention(limits_profile(wgpu_backend), 2, 4, 16, 8, rotary=True)   # (unset: the default)
        counted = llama_op_count(cfg, wgpu_backend.optimizer_slots(), rows=batch * 16, fused_attention=fused)
        assert measured == counted, (layers, tied, dropout, batch)


def test_the_plan_counts_the_fused_attentions_dispatches_against_the_composed_ones(wgpu_backend, monkeypatch):
    """What the fused attention saves a step (the engine's dispatches, LAB_FLASH_ATTENTION=0 against the default) is
    what llama_op_count's fused_attention takes off: with at least hidden_size rows (32 here) q|k|v is one product of
    the weights side by side, with fewer (16) their outputs are copied together; full training and LoRA (some of
    q, k, v adapted, none). (The composed counts themselves are pinned above; at 16 rows they differ.)"""
    from lab import lora
    from lab.plan.estimator import llama_lora_layers, llama_op_count
    cfg = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16)
    for targets, batch in ((None, 1), (None, 2), (["q_proj", "v_proj"], 1), (["o_proj"], 1), (["o_proj"], 2)):
        steps = []
        for flash in (False, None):
            monkeypatch.setattr(wgpu_backend, "FLASH_ATTENTION", flash)
            steps.append(second_step_dispatches(
                wgpu_backend, lambda: LlamaLM(cfg) if targets is None else lora.apply(LlamaLM(cfg), r=4,
                                                                                      targets=targets),
                IDS, batch_size=batch))
        adapted = llama_lora_layers(cfg, targets, 4) if targets else ()
        chosen = llama_lora_layers(cfg, targets, 4, by_name=True) if targets else {}
        counted = [llama_op_count(cfg, wgpu_backend.optimizer_slots(), adapted, batch * 16, fused_attention=fused,
                                  adapted_qkv=[chosen.get(f"self_attn.{p}_proj", 0) for p in "qkv"])
                   for fused in (False, True)]
        assert steps[0] - steps[1] == counted[0] - counted[1] > 0, (targets, batch, steps, counted)


def test_the_plan_counts_a_recomputed_blocks_dispatches_on_either_attention(wgpu_backend, monkeypatch):
    """A checkpointed block's forward runs again in the backward: its dispatches (the engine's, every block
    checkpointed against none) are llama_recomputed_ops' on the fused attention (32 and 16 rows) and the composed
    one (with dropout too)."""
    from lab.plan.estimator import llama_recomputed_ops
    for flash, dropout, batch in ((None, 0.0, 2), (None, 0.1, 1), (False, 0.0, 2), (False, 0.1, 2)):
        monkeypatch.setattr(wgpu_backend, "FLASH_ATTENTION", flash)
        cfg = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16, dropout=dropout)
        steps = []
        for checkpoint in (False, True):
            steps.append(second_step_dispatches(wgpu_backend, lambda: LlamaLM(cfg), IDS, batch_size=batch,
                                                checkpoint_activations=checkpoint))
        assert steps[1] - steps[0] == 2 * llama_recomputed_ops(cfg, batch * 16, flash is None), (flash, dropout, batch)


def test_llama_plan_kv_cache_and_largest_buffer_follow_the_family():
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192)
    p = plan.estimate(cfg, batch=4, seq=512, device="h200")
    assert p.memory["KV cache (generation, batch 1)"] == 2 * 30 * 3 * 64 * 512 * 4   # key-value heads only
    assert p.largest_buffer == ("logits of a chunk of rows (rows, vocab)", 640 * 49152 * 4)   # 640 of 2048 rows
    assert p.flops_per_token == 6 * p.params + 12 * 30 * 9 * 64 * 512
    text = repr(p)
    assert "9 heads (3 key-value, head_dim 64), 576 dims, SwiGLU 1536, tied head, vocab 49152" in text
    with pytest.raises(InputError, match="seq 8,193 is longer than the model's block_size 8,192"):
        plan.estimate(cfg, seq=8193, device="h200")
    # (a LoRA plan of the family: tests/test_plan_lora_llama.py)
    assert plan.estimate(cfg, seq=64, lora_rank=8, device="h200").trainable_params < p.params / 50
    big = plan.estimate(cfg, batch=64, seq=8192, device="m1")   # does not fit: says why and what would
    assert not big.fits and any("batch" in s for s in big.suggestions), big.suggestions


def test_plan_config_reads_only_the_config_of_any_model_name(tmp_path, monkeypatch, capsys):
    """`plan --config` takes a preset, a model directory, its config.json, a .gguf, a shipped model's name and a
    Hub id in the cache: each gives the same architecture, and no weights are read (the files beside the configs
    here are not weights)."""
    from lab.cli import main
    from tests.ggufs import hf_tensors, write_gguf
    cfg = LlamaConfig(vocab_size=264, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg.to_hf()))
    (d / "model.safetensors").write_bytes(b"not weights")
    write_gguf(tmp_path / "m.gguf", hf_tensors(), context=128)
    hub = tmp_path / "hub" / "models--org--tiny"
    (hub / "snapshots" / ("a" * 40)).mkdir(parents=True)
    (hub / "refs").mkdir()
    (hub / "refs" / "main").write_text("a" * 40)
    (hub / "snapshots" / ("a" * 40) / "config.json").write_text(json.dumps(cfg.to_hf()))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    expected = plan.estimate(cfg, batch=2, seq=16, device="h200").params
    for name in (d, d / "config.json", tmp_path / "m.gguf", "org/tiny"):
        assert plan.estimate(str(name), batch=2, seq=16, device="h200").params == expected, name
    assert plan.estimate("llama-tiny", device="h200").params == LlamaLM(lab.models.PRESETS["llama-tiny"]).num_parameters()
    assert main(["plan", "--config", str(d), "--batch-size", "2", "--block-size", "16", "--device", "h200"]) == 0
    out = capsys.readouterr().out
    assert "batch 2 x seq 16" in out and f"{expected:,} total" in out
    assert main(["plan", "--config", "org/missing", "--device", "h200"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "org/missing" in err[0] and "HF_HUB_OFFLINE" in err[0], err
    try:
        shipped = lab.shipped.path("smollm2-135m-instruct")
    except InputError:
        return
    p = plan.estimate("smollm2-135m-instruct", batch=1, seq=512, device="h200")
    assert p.params == 134_515_008 and p.config["num_key_value_heads"] == 3, shipped
