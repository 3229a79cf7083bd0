"""The Llama family (LlamaLM) against transformers' LlamaForCausalLM / Qwen2ForCausalLM, on both backends.

Configs are small and odd on purpose: query/key-value head ratios 1, 2 and 3 with odd head counts, head_dim not
hidden / heads, tied and untied heads, llama3 and linear rope scaling, Qwen2's q/k/v biases, Llama's biases.
Tolerance 1e-4 on logits: float32 through two layers, summed in another order than PyTorch's."""
import json

import numpy as np
import pytest
import torch
import transformers

import lab
from lab.checks import InputError
from lab.io import CheckpointError

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8}   # a short original context: every frequency band occurs at T < 16
CONFIGS = {
    "mha-tied": ("llama", dict(hidden_size=12, num_attention_heads=3, num_key_value_heads=3)),
    "gqa2-untied-headdim": ("llama", dict(hidden_size=8, num_attention_heads=4, num_key_value_heads=2, head_dim=6,
                                          tie_word_embeddings=False)),
    "gqa3-llama3-headdim": ("llama", dict(hidden_size=12, num_attention_heads=6, num_key_value_heads=2, head_dim=10,
                                          rope_scaling=LLAMA3)),
    "mqa3-linear-biases": ("llama", dict(hidden_size=12, num_attention_heads=3, num_key_value_heads=1,
                                         attention_bias=True, mlp_bias=True,
                                         rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "qwen2-gqa3": ("qwen2", dict(hidden_size=12, num_attention_heads=3, num_key_value_heads=1,
                                 tie_word_embeddings=False)),
}
VOCAB = 37


def hf_model(name, seed=0):
    """A transformers model of CONFIGS[name] with every weight random (norm gains and biases too: HF's init leaves
    them 1 and 0, where a mix-up between them would not show)."""
    family, kw = CONFIGS[name]
    base = dict(vocab_size=VOCAB, intermediate_size=20, num_hidden_layers=2, max_position_embeddings=16,
                rms_norm_eps=1e-5, rope_theta=500.0, tie_word_embeddings=True, bos_token_id=None,
                eos_token_id=None, pad_token_id=None)
    base.update(kw, architectures=[f"{'Llama' if family == 'llama' else 'Qwen2'}ForCausalLM"])
    if family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**base))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**base))
    torch.manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in pname else 0.3 * torch.randn_like(p))
    return model.float().eval()


def lab_model(hf):
    cfg = lab.LlamaConfig.from_hf(json.loads(hf.config.to_json_string()))
    return lab.LlamaLM(cfg).load_hf_weights({k: v.detach().numpy() for k, v in hf.state_dict().items()})


def tokens(shape, seed=1):
    return np.random.default_rng(seed).integers(0, VOCAB, shape)


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(name, use_backend):
    hf = hf_model(name)
    model = lab_model(hf)
    ids = tokens((2, 7))
    want = hf(torch.tensor(ids)).logits.detach().numpy()
    np.testing.assert_allclose(model(ids).numpy(), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["gqa3-llama3-headdim", "mqa3-linear-biases", "qwen2-gqa3", "gqa2-untied-headdim"])
def test_gradients_match_pytorch(name, use_backend):
    hf = hf_model(name).train()
    model = lab_model(hf)
    ids, targets = tokens((2, 5)), tokens((2, 5), seed=2)
    logits = hf(torch.tensor(ids)).logits
    torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), torch.tensor(targets).reshape(-1)).backward()
    _, loss = model(ids, targets)
    loss.backward()
    want = {k: p.grad.numpy() for k, p in hf.named_parameters()}
    got = {k: (g.T if k.endswith("_proj.weight") or k == "lm_head.weight" else g)
           for k, g in ((k, p.grad.numpy()) for k, p in model.named_parameters())}
    assert sorted(got) == sorted(k for k in want if not (k == "lm_head.weight" and model.config.tie_word_embeddings))
    for k, g in got.items():   # absolute slack scaled to each gradient: float32 sums in another order
        np.testing.assert_allclose(g, want[k], rtol=1e-4, atol=1e-5 * np.abs(want[k]).max() + 1e-7, err_msg=k)


@pytest.mark.parametrize("name", ["gqa3-llama3-headdim", "qwen2-gqa3"])
def test_kv_cache_matches_full_recompute(name, use_backend):
    model = lab_model(hf_model(name))
    ids = tokens((2, 9))
    full = model(ids).numpy()
    cache = model.new_cache(2)
    assert cache[0][0].shape == (2, model.config.num_key_value_heads, 16, model.config.head_dim)   # kv heads once
    # a prefill, a chunk of several tokens after cached ones (the offset mask), then one token at a time
    parts = [model.forward_cached(ids[:, :4], cache, 0), model.forward_cached(ids[:, 4:7], cache, 4),
             model.forward_cached(ids[:, 7:8], cache, 7), model.forward_cached(ids[:, 8:], cache, 8)]
    np.testing.assert_allclose(np.concatenate([p.numpy() for p in parts], axis=1), full, atol=1e-5, rtol=0)
    cached = lab.generate(model, ids[0, :3], 8, greedy=True)
    assert np.array_equal(cached, lab.generate(model, ids[0, :3], 8, greedy=True, use_cache=False))


@pytest.mark.parametrize("name", ["gqa3-llama3-headdim", "qwen2-gqa3"])
def test_greedy_generation_matches_transformers(name, use_backend):
    hf = hf_model(name)
    model = lab_model(hf)
    prompt = tokens((1, 4))
    want = hf.generate(torch.tensor(prompt), max_new_tokens=10, do_sample=False, attention_mask=torch.ones_like(
        torch.tensor(prompt)), pad_token_id=0)[0, 4:].numpy()
    assert np.array_equal(lab.generate(model, prompt[0], 10, greedy=True), want)


def test_generation_stops_at_the_configs_eos_token(use_backend):
    model = lab_model(hf_model("mha-tied"))
    prompt = tokens(4)
    free = lab.generate(model, prompt, 10, greedy=True)
    eos = int(free[3])
    first = int(np.flatnonzero(free == eos)[0])   # generation stops at the first time it is made
    model.config.eos_token_id = [VOCAB - 1, eos]   # any id of a list
    assert np.array_equal(lab.generate(model, prompt, 10, greedy=True), free[:first])
    assert np.array_equal(lab.generate(model, prompt, 10, greedy=True, eos_token_id=[]), free)   # the caller's wins
    assert np.array_equal(lab.generate(model, prompt, 10, greedy=True, use_cache=False), free[:first])
    assert np.array_equal(lab.generate(model, prompt, 10, greedy=True, eos_token_id=np.array([eos])), free[:first])
    beam = lab.beam_search(model, prompt, 10, num_beams=1)
    assert np.array_equal(beam, free[:first])   # one beam is greedy search; it ends at the eos too
    with pytest.raises(InputError, match=r"eos_token_id must be an integer >= 0 and <= 36, got 99"):
        lab.generate(model, prompt, 3, eos_token_id=99)


def test_hf_weights_round_trip(use_backend):
    hf = hf_model("gqa2-untied-headdim")
    model = lab_model(hf)
    weights = model.hf_weights()
    want = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    assert sorted(weights) == sorted(want)
    for k, v in weights.items():
        assert v.dtype == np.float32 and np.array_equal(v, want[k]), k
    other = lab.LlamaLM(model.config).load_hf_weights(weights)
    np.testing.assert_array_equal(other(tokens((1, 5))).numpy(), model(tokens((1, 5))).numpy())
    tied = lab_model(hf_model("mha-tied"))
    assert "lm_head.weight" not in tied.hf_weights()   # the head is the embedding, as transformers saves it


@pytest.mark.parametrize("name", ["gqa3-llama3-headdim", "mqa3-linear-biases", "qwen2-gqa3"])
def test_save_pretrained_loads_in_transformers_with_equal_logits(name, tmp_path):
    model = lab_model(hf_model(name))
    (tmp_path / "other.txt").write_text("kept")
    model.save_pretrained(tmp_path)
    ids = tokens((1, 6))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()
    assert type(loaded).__name__ == model.config.architecture
    np.testing.assert_allclose(loaded(torch.tensor(ids)).logits.detach().numpy(), model(ids).numpy(), atol=1e-5)
    again = lab.LlamaLM.from_pretrained(tmp_path)
    assert again.config == model.config and not again.training
    np.testing.assert_array_equal(again(ids).numpy(), model(ids).numpy())
    assert (tmp_path / "other.txt").read_text() == "kept"


def test_init_is_transformers_init():
    model = lab.LlamaLM(lab.LlamaConfig(vocab_size=300, hidden_size=64, num_attention_heads=4, attention_bias=True))
    params = dict(model.named_parameters())
    assert np.all(params["model.norm.weight"].numpy() == 1)
    assert np.all(params["model.layers.0.self_attn.q_proj.bias"].numpy() == 0)
    for name in ("model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight"):
        assert abs(params[name].numpy().std() - 0.02) < 0.002, name


@pytest.mark.parametrize("fields, message", [
    (dict(num_attention_heads=6, num_key_value_heads=4, hidden_size=12),
     r"num_key_value_heads \(4\) must divide num_attention_heads \(6\)"),
    (dict(hidden_size=10, num_attention_heads=3), r"hidden_size \(10\) must be divisible by num_attention_heads \(3\)"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), r"unknown rope_type 'yarn' \(supported: default, "
                                                              r"linear, llama3\)"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), r"needs 'low_freq_factor'"),
    (dict(head_dim=5), r"head_dim must be even"),
    (dict(num_key_value_heads=0), r"num_key_value_heads must be an integer >= 1, got 0"),
    (dict(eos_token_id=[2, 300]), r"eos_token_id must be an integer >= 0 and <= 255, got 300"),
    (dict(architecture="GPT2LMHeadModel"), r"architecture must be one of"),
])
def test_config_refuses_bad_fields_naming_them(fields, message):
    with pytest.raises(InputError, match=message):
        lab.LlamaConfig(**fields)


def test_from_hf_names_the_file_in_each_error(tmp_path):
    source = tmp_path / "config.json"
    good = lab.LlamaConfig().to_hf()
    assert lab.LlamaConfig.from_hf(good, source) == lab.LlamaConfig()
    with pytest.raises(CheckpointError, match=r"config.json: architectures \['BertModel'\] is not supported by LlamaLM "
                                              r"\(supported: LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM\)"):
        lab.LlamaConfig.from_hf({**good, "architectures": ["BertModel"]}, source)
    mistral = {**good, "architectures": ["MistralForCausalLM"], "sliding_window": 32}
    with pytest.raises(CheckpointError, match=r"config.json: sliding_window=32 is smaller than max_position_embeddings"):
        lab.LlamaConfig.from_hf(mistral, source)
    no_window = {k: v for k, v in mistral.items() if k != "sliding_window"}   # transformers' default: 4096 of 131072
    with pytest.raises(CheckpointError, match=r"sliding_window=4096 is smaller than max_position_embeddings=131072"):
        lab.LlamaConfig.from_hf({k: v for k, v in no_window.items() if k != "max_position_embeddings"}, source)
    assert lab.LlamaConfig.from_hf({**mistral, "sliding_window": None}, source).architecture == "MistralForCausalLM"
    untied = {k: v for k, v in good.items() if k != "tie_word_embeddings"}
    assert lab.LlamaConfig.from_hf(untied, source).tie_word_embeddings is False   # transformers' default
    with pytest.raises(CheckpointError, match=rf"{tmp_path}.*num_key_value_heads \(3\) must divide"):
        lab.LlamaConfig.from_hf({**good, "num_key_value_heads": 3}, source)
    with pytest.raises(CheckpointError, match=r"config.json: the config is missing the field 'hidden_size'"):
        lab.LlamaConfig.from_hf({k: v for k, v in good.items() if k != "hidden_size"}, source)


def test_load_hf_weights_refuses_wrong_names_and_shapes_naming_the_tensor():
    model = lab.LlamaLM(lab.LlamaConfig(tie_word_embeddings=False))
    weights = model.hf_weights()
    before = model.hf_weights()
    bad = {**weights, "model.layers.1.self_attn.k_proj.weight": np.zeros((64, 63), np.float32)}
    with pytest.raises(CheckpointError, match=r"w.safetensors: tensor 'model.layers.1.self_attn.k_proj.weight' has "
                                              r"shape \(64, 63\), the model expects \(64, 64\)"):
        model.load_hf_weights(bad, "w.safetensors")
    del bad["model.norm.weight"]
    bad["model.extra"] = np.zeros(3, np.float32)
    with pytest.raises(CheckpointError, match=r"missing tensors \['model.norm.weight'\], unexpected tensors "
                                              r"\['model.extra'\]"):
        model.load_hf_weights(bad, "w.safetensors")
    with pytest.raises(CheckpointError, match=r"tensor 'lm_head.weight' has dtype int32"):
        model.load_hf_weights({**weights, "lm_head.weight": weights["lm_head.weight"].astype(np.int32)})
    for k, v in model.hf_weights().items():   # nothing was copied by a refused load
        assert np.array_equal(v, before[k])
    tied = lab.LlamaLM(lab.LlamaConfig())
    tw = tied.hf_weights()
    tied.load_hf_weights({**tw, "lm_head.weight": tw["model.embed_tokens.weight"]})   # a tied head, saved: fine
    with pytest.raises(CheckpointError, match=r"lm_head.weight differs from model.embed_tokens.weight"):
        tied.load_hf_weights({**tw, "lm_head.weight": tw["model.embed_tokens.weight"] + 1})


def test_presets_build_the_architectures():
    smol = lab.PRESETS["smollm2-135m"]
    assert (smol.num_attention_heads, smol.num_key_value_heads, smol.head_dim, smol.tie_word_embeddings) == (9, 3, 64,
                                                                                                                True)
    from lab.models.llama import num_params
    assert num_params(smol) == 134_515_008   # SmolLM2-135M's parameter count
    tiny = lab.LlamaLM(lab.PRESETS["llama-tiny"])
    assert tiny.num_parameters() == num_params(lab.PRESETS["llama-tiny"])


def _llama_trainer(text, seed=0, **cfg):
    from lab.train import TrainConfig, Trainer
    tok = lab.CharTokenizer.from_text(text)
    ids = np.asarray(tok.encode(text))
    lab.manual_seed(seed)
    config = lab.LlamaConfig(**{**lab.PRESETS["llama-tiny"].to_dict(), "vocab_size": tok.vocab_size,
                                "max_position_embeddings": 16, "dropout": 0.1})
    train = TrainConfig(**{"steps": 30, "batch_size": 4, "lr": 3e-3, "warmup_steps": 0, "eval_every": 1000,
                           "log_every": 1000, **cfg})
    return tok, Trainer(lab.LlamaLM(config), ids[:1500], ids[1500:], train)


def test_trainer_trains_a_llama_model_with_falling_loss(use_backend):
    text = lab.load_corpus("kjv")[:2000]
    _, trainer = _llama_trainer(text, steps=25)
    losses = [trainer.train_step()[0].item() for _ in range(25)]
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3, losses
    assert trainer.model.flops_per_token() > 6 * trainer.model.num_parameters()


def test_llama_checkpoint_resumes_with_exactly_the_same_losses(use_backend, tmp_path):
    from lab.checkpoint import load_checkpoint, save_checkpoint
    from lab.train import Trainer
    text = lab.load_corpus("kjv")[:2000]
    tok, t = _llama_trainer(text)
    uninterrupted = [t.train_step()[0].item() for _ in range(6)]
    tok, t = _llama_trainer(text)
    first = [t.train_step()[0].item() for _ in range(3)]
    save_checkpoint(tmp_path / "ck", t.model, tok, t)
    model, _, _ = load_checkpoint(tmp_path / "ck")
    assert isinstance(model, lab.LlamaLM) and model.config == t.model.config
    lab.manual_seed(999)
    resumed = Trainer.resume(tmp_path / "ck", t.train_ids, t.val_ids)
    assert first + [resumed.train_step()[0].item() for _ in range(3)] == uninterrupted   # bitwise


def test_silu_matches_torch_and_saturates_without_overflow(use_backend):
    from lab.engine import ops as F
    values = np.array([3e38, -3e38, 100.0, -100.0, -20.0, 0.0, 0.5, -1.5], np.float32)
    x = lab.tensor(values, requires_grad=True)
    y = F.silu(x)
    y.sum().backward()
    t = torch.tensor(values, dtype=torch.float64, requires_grad=True)
    torch.nn.functional.silu(t).sum().backward()
    assert np.all(np.isfinite(y.numpy())) and np.all(np.isfinite(x.grad.numpy()))   # x * (1 + tanh) overflowed
    np.testing.assert_allclose(y.numpy(), torch.nn.functional.silu(t).detach().numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(x.grad.numpy(), t.grad.numpy(), rtol=1e-5, atol=1e-6)


def test_composed_ops_refuse_bad_shapes_naming_them(use_backend):
    from lab.engine import ops as F
    ones = lambda *s: lab.tensor(np.ones(s, np.float32))
    with pytest.raises(ValueError, match=r"rms_norm: weight/bias must have shape \(4,\) for input \(2, 4\), got \(3,\)"):
        F.rms_norm(ones(2, 4), ones(3))
    with pytest.raises(ValueError, match=r"rotary: x must be \(..., T, D\) with D even and cos, sin \(T, D\), got x "
                                         r"\(2, 4\), cos \(3, 4\)"):
        F.rotary(ones(2, 4), ones(3, 4), ones(3, 4))


def test_cache_misuse_and_bad_weights_are_one_clear_error():
    model = lab.LlamaLM(lab.LlamaConfig(max_position_embeddings=8))
    cache = model.new_cache(1)
    with pytest.raises(InputError, match=r"pos must be an integer >= 0, got -2"):
        model.forward_cached(np.zeros((1, 2), np.int64), cache, -2)
    with pytest.raises(InputError, match=r"cache must be model.new_cache\(batch_size\) for tokens \(2, 3\)"):
        model.forward_cached(np.zeros((2, 3), np.int64), cache, 0)
    with pytest.raises(InputError, match=r"sequence length 9 exceeds max_position_embeddings 8"):
        model.forward_cached(np.zeros((1, 3), np.int64), cache, 6)
    weights = model.hf_weights()
    with pytest.raises(CheckpointError, match=r"f.safetensors: tensor 'model.norm.weight' holds NaN or Inf"):
        model.load_hf_weights({**weights, "model.norm.weight": np.full(64, np.nan, np.float32)}, "f.safetensors")
    assert lab.LlamaConfig(hidden_size=64.0).hidden_size == 64 and isinstance(lab.LlamaConfig(hidden_size=64.0)
                                                                              .hidden_size, int)


def test_training_memory_estimate_is_close_to_the_measured_peak(wgpu_backend):
    """The Trainer's fit check for the family (llama.training_bytes) against the device's measured peak: above
    it (a refusal errs on the safe side) by at most 25%."""
    from lab.engine import backend as B
    from lab.models.llama import training_bytes
    from lab.train import TrainConfig, Trainer
    prev = dict(B._state)
    B._state["backend"] = wgpu_backend
    try:
        cfg = lab.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
        ids = np.random.default_rng(0).integers(0, 300, 4000)
        wgpu_backend.sync(wait=True)
        base = wgpu_backend.stats()["bytes_in_use"]
        wgpu_backend.reset_peak()
        trainer = Trainer(lab.LlamaLM(cfg), ids[:3000], ids[3000:], TrainConfig(steps=2, batch_size=6,
                                                                                  replay_steps=False))
        trainer.train_step()
        wgpu_backend.sync(wait=True)
        peak = wgpu_backend.stats()["peak_bytes_in_use"] - base
    finally:
        B._state.update(prev)
    assert peak <= training_bytes(cfg, 6) <= 1.25 * peak, (peak, training_bytes(cfg, 6))


def test_trainer_refuses_a_llama_batch_that_cannot_fit():
    from lab.plan.estimator import DoesNotFitError
    from lab.train import TrainConfig, Trainer
    model = lab.LlamaLM(lab.LlamaConfig(vocab_size=5000, max_position_embeddings=64))
    ids = np.arange(4000) % 5000
    with pytest.raises(DoesNotFitError, match=r"a training batch of 1000000 x 64 tokens needs about .* GiB .*: a "
                                              r"batch_size of at most \d+ fits"):
        Trainer(model, ids[:3000], ids[3000:], TrainConfig(batch_size=1_000_000))


def test_a_mistral_model_saved_loads_in_transformers_with_equal_logits(tmp_path):
    cfg = lab.LlamaConfig(vocab_size=VOCAB, hidden_size=12, intermediate_size=20, num_attention_heads=3,
                          num_key_value_heads=1, max_position_embeddings=16, architecture="MistralForCausalLM",
                          tie_word_embeddings=False, rope_theta=1e6)
    model = lab.LlamaLM(cfg)
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded).__name__ == "MistralForCausalLM"
    ids = tokens((2, 9))
    np.testing.assert_allclose(loaded(torch.tensor(ids)).logits.detach().numpy(), model(ids).numpy(), atol=1e-5)
    assert lab.LlamaLM.from_pretrained(tmp_path).config == cfg


def test_lora_on_llama_resumes_and_loads_in_peft(use_backend, tmp_path):
    import peft
    from lab import lora
    from lab.checkpoint import save_checkpoint
    from lab.train import Trainer
    text = lab.load_corpus("kjv")[:2000]

    def run():
        tok, t = _llama_trainer(text)
        lora.apply(t.model, r=2, alpha=4, targets=["q_proj", "v_proj", "down_proj"])
        return tok, Trainer(t.model, t.train_ids, t.val_ids, t.cfg)
    tok, t = run()
    uninterrupted = [t.train_step()[0].item() for _ in range(4)]
    tok, t = run()
    first = [t.train_step()[0].item() for _ in range(2)]
    save_checkpoint(tmp_path / "ck", t.model, tok, t)
    resumed = Trainer.resume(tmp_path / "ck", t.train_ids, t.val_ids)
    assert sorted(resumed.optimizer.names) == sorted(n for n, p in t.model.named_parameters() if p.requires_grad)
    assert first + [resumed.train_step()[0].item() for _ in range(2)] == uninterrupted
    # the base in transformers' layout plus the adapter in PEFT's: PEFT gives the same logits
    model = t.model.eval()
    model.save_pretrained(tmp_path / "base", format="hf")
    model.save_adapter(tmp_path / "ad", base_model_name_or_path=str(tmp_path / "base"))
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    pm = peft.PeftModel.from_pretrained(base, tmp_path / "ad").eval()
    ids = np.asarray(tok.encode(text[:12]))[None]
    with torch.no_grad():
        np.testing.assert_allclose(pm(torch.tensor(ids)).logits.numpy(), model(ids).numpy(), atol=1e-4)


def test_attention_weights_and_hidden_states_match_transformers(use_backend):
    """return_attention gives every query head in transformers' order (a GQA model's heads that share a key-value
    head side by side), as AttentionHeatmap shows them; return_hidden the residual stream."""
    hf = hf_model("gqa3-llama3-headdim")
    hf.config._attn_implementation = "eager"   # (the implementation that returns the weights)
    model = lab_model(hf)
    ids = tokens((2, 6))
    want = hf(torch.tensor(ids), output_attentions=True, output_hidden_states=True)
    logits, attentions, hidden = model(ids, return_attention=True, return_hidden=True)
    assert len(attentions) == 2 and attentions[0].shape == (2, 6, 6, 6)
    for ours, theirs in zip(attentions, want.attentions):
        np.testing.assert_allclose(ours.numpy(), theirs.detach().numpy(), atol=1e-5, rtol=0)
    assert len(hidden) == 3
    for ours, theirs in zip(hidden[:-1], want.hidden_states[:-1]):   # (transformers' last is after the norm)
        np.testing.assert_allclose(ours.numpy(), theirs.detach().numpy(), atol=1e-4, rtol=0)


def test_rotary_tables_grow_with_the_positions_used_and_match_the_full_tables():
    from lab.models.llama import rope_tables
    cfg = lab.LlamaConfig(max_position_embeddings=4096, rope_scaling=LLAMA3)
    model = lab.LlamaLM(cfg)
    cache = model.new_cache(1)
    model.forward_cached(np.zeros((1, 3), np.int64), cache, 0)
    assert model._rope_tables[0].shape == (256, cfg.head_dim)   # not 4096 rows for three tokens
    model.forward_cached(np.zeros((1, 1), np.int64), cache, 300)
    cos, sin = rope_tables(cfg)
    assert model._rope_tables[0].shape == (512, cfg.head_dim)
    np.testing.assert_array_equal(model._rope_tables[0].numpy(), cos[:512])   # a prefix of the full tables, exactly
    np.testing.assert_array_equal(model._rope_tables[1].numpy(), sin[:512])
