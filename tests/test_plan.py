"""The plan estimator against the engine: predicted memory vs lab.stats() peak bytes, predicted step time vs the
measured one (with the measured profile of this machine), and the planning answers."""
import math
import re
from dataclasses import replace

import numpy as np
import pytest

import lab
from lab import plan
from lab.models import TransformerConfig, TransformerLM
from lab.train import TrainConfig, Trainer
from step_counts import second_step_dispatches

CONFIGS = [(TransformerConfig(vocab_size=73, block_size=32, n_layer=2, n_head=2, n_embd=64), 8),
           (TransformerConfig(vocab_size=73, block_size=64, n_layer=4, n_head=4, n_embd=128), 12),
           (TransformerConfig(vocab_size=73, block_size=128, n_layer=3, n_head=4, n_embd=96, dropout=0.1), 6)]
IDS = np.random.default_rng(0).integers(0, 73, 20_000).astype(np.int32)


def _trainer(cfg, batch):
    lab.manual_seed(0)
    t = Trainer(TransformerLM(cfg), IDS, IDS, TrainConfig(steps=100, batch_size=batch))
    t.train_step()
    t.train_step()
    return t


@pytest.mark.parametrize("cfg,batch", CONFIGS, ids=["2x64", "4x128", "3x96-dropout"])
def test_predicted_memory_within_20_percent_of_measured_peak(cfg, batch, wgpu_backend, monkeypatch):
    from lab.engine import backend as B
    monkeypatch.setitem(B._state, "backend", wgpu_backend)
    t = _trainer(cfg, batch)
    wgpu_backend.sync()
    wgpu_backend.reset_peak()
    t.train_step()
    wgpu_backend.sync(wait=True)  # lavapipe runs on these CPUs: let it finish before anything is timed
    measured = wgpu_backend.stats()["peak_bytes_in_use"]
    predicted = plan.estimate(cfg, batch=batch, seq=cfg.block_size, device="h200").memory["total"]
    assert abs(predicted / measured - 1) < 0.20, (predicted, measured)


def test_gpt2_lora_plan_memory_within_20_percent_of_the_measured_peak(wgpu_backend, monkeypatch):
    """LoRA on every linear layer of 4 blocks, measured as the plain plans are: the plan counted none of the
    adapters' activations (each keeps its (N, r) down projection and its (N, out) sum), 22% under the peak."""
    from lab import lora
    from lab.engine import backend as B
    monkeypatch.setitem(B._state, "backend", wgpu_backend)
    cfg = TransformerConfig(vocab_size=97, block_size=64, n_layer=4, n_head=4, n_embd=64)
    lab.manual_seed(0)
    t = Trainer(lora.apply(TransformerLM(cfg), r=4), IDS % 97, IDS % 97, TrainConfig(steps=100, batch_size=8))
    t.train_step()
    t.train_step()
    wgpu_backend.sync()
    wgpu_backend.reset_peak()
    t.train_step()
    wgpu_backend.sync(wait=True)
    measured = wgpu_backend.stats()["peak_bytes_in_use"]
    predicted = plan.estimate(cfg, batch=8, seq=64, lora_rank=4, device="h200").memory["total"]
    assert abs(predicted / measured - 1) < 0.20, (predicted, measured)


def _settle_wgpu():
    """Wait for work earlier tests left on the wgpu device: on lavapipe it runs on these same CPU cores."""
    from lab.engine.wgpu import WgpuBackend
    if WgpuBackend.__dict__.get("_instance") is not None:
        WgpuBackend._instance.sync(wait=True)


@pytest.mark.parametrize("cfg,batch", CONFIGS, ids=["2x64", "4x128", "3x96-dropout"])
def test_predicted_step_time_within_35_percent_on_this_machine(cfg, batch, numpy_backend, monkeypatch):
    from lab.engine import backend as B
    monkeypatch.setitem(B._state, "backend", numpy_backend)
    _settle_wgpu()
    # the machine is profiled next to the steps it predicts (a profile taken while, say, lavapipe was still busy
    # with earlier tests' work would predict a slower machine than the one measured), twice at most: this 2-core
    # VM's timings drift by 20-30% for seconds at a time (seen in a full run: 62 ms predicted, 45 measured, where
    # the same test alone gives 46 against 38)
    attempts = plan.predict_and_measure(_trainer(cfg, batch), steps=15, attempts=2, within=0.35)
    predicted, measured = attempts[-1]
    assert abs(predicted / measured - 1) < 0.35, attempts


def test_counts_and_flops_match_the_model():
    cfg = TransformerConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128)
    p = plan.estimate(cfg, batch=12, device="m1")
    m = TransformerLM(cfg)
    assert p.params == p.trainable_params == m.num_parameters()
    assert p.flops_per_token == m.flops_per_token()
    assert p.memory["weights"] == 4 * m.num_parameters() and p.memory["optimizer state"] == 8 * m.num_parameters()
    lora = plan.estimate(cfg, batch=12, lora_rank=8, device="m1")
    from lab import lora as L
    L.apply(m, r=8)
    assert (lora.params, lora.trainable_params) == (m.num_parameters(), m.num_parameters(trainable_only=True))
    assert lora.memory["optimizer state"] == 8 * lora.trainable_params
    # a float16 base: the weights' bytes are the model's own after lora.apply(..., base_dtype="float16")
    half = plan.estimate(cfg, batch=12, lora_rank=8, device="m1", lora_base_dtype="float16")
    m16 = L.apply(TransformerLM(cfg), r=8, base_dtype="float16")
    assert half.memory["weights"] == sum(p.numpy().nbytes for p in m16.parameters())
    assert half.memory["weights"] < lora.memory["weights"]
    with pytest.raises(ValueError, match="lora_base_dtype"):
        plan.estimate(cfg, batch=12, device="m1", lora_base_dtype="float16")   # no LoRA: nothing frozen


def test_plan_that_does_not_fit_names_the_tensor_and_suggests_fixes():
    p = plan.estimate("shakespeare-char", batch=512, seq=256, device="m1", vocab_size=50_000)
    assert not p.fits
    text = "\n".join(p.reasons)
    assert "GiB, the device has" in text
    assert "logits" not in text   # the loss takes them a chunk of rows at a time (F.linear_cross_entropy)
    joined = " ".join(p.suggestions)
    assert "gradient accumulation" in joined and "LoRA" in joined and "shorter context" in joined
    assert "PyTorch DDP" in p.multi_device
    tuned = plan.estimate("gpt2-small", batch=64, lora_rank=8, device="m1")   # LoRA that does not fit either
    assert not tuned.fits and any("base_dtype='float16'" in s and "162 MiB less" in s for s in tuned.suggestions)
    half = plan.estimate("gpt2-small", batch=64, lora_rank=8, device="m1", lora_base_dtype="float16")
    assert not any("base_dtype='float16'" in s for s in half.suggestions)   # already float16
    assert any("base_dtype='q4'" in s for s in half.suggestions)            # a packed base is smaller still
    small = plan.estimate("tiny", batch=12, device="h200")
    assert small.fits and not small.reasons


@pytest.mark.parametrize("batch", [524_288, 524_289, 100_000, 30_011])
def test_suggested_gradient_accumulation_fits_and_keeps_the_batch(batch):
    """The micro-batch suggested for a plan too large for the H200 (in memory and in its largest buffer) is a plan
    that fits, and it keeps the effective batch where a near count of micro-batches divides it (it once said 'batch
    524287 with gradient accumulation over 2 micro-batches keeps the effective batch of 524288')."""
    cfg = TransformerConfig(vocab_size=65, block_size=256, n_layer=2, n_head=2, n_embd=32)
    p = plan.estimate(cfg, batch=batch, seq=256, device="h200")
    assert not p.fits
    [said] = [s for s in p.suggestions if "gradient accumulation" in s]
    b, acc = (int(w) for w in re.fullmatch(r"batch (\d+) with gradient accumulation over (\d+) micro-batches.*",
                                           said).groups())
    assert plan.estimate(cfg, batch=b, seq=256, device="h200").fits
    assert b * acc >= batch and (b - 1) * acc < batch
    assert (b * acc == batch) == ("keeps the effective batch of" in said), said


def test_a_buffer_just_above_the_limit_is_said_in_bytes():
    """2 GiB against a binding limit of 2 GiB - 4 bytes: in MiB both print as 2,048, which reads as no reason."""
    prof = plan.PROFILES["h200"]
    cfg = TransformerConfig(vocab_size=65, block_size=256, n_layer=2, n_head=2, n_embd=32)
    for batch in range(1, 1 << 20):
        p = plan.estimate(cfg, batch=batch, seq=256, device=prof)
        if p.largest_buffer[1] > prof.max_binding_size:
            break
    exact = plan.estimate(cfg, batch=batch, seq=256, device=plan.DeviceProfile(
        **{**prof.to_dict(), "max_binding_size": p.largest_buffer[1] - 4}))
    assert any(f"needs {p.largest_buffer[1]:,} bytes" in r and f"of {p.largest_buffer[1] - 4:,} bytes" in r
               for r in exact.reasons), exact.reasons


def test_attention_weights_above_the_binding_limit_are_planned_on_the_fused_kernels():
    """Where one layer's (B, H, T, T) weights exceed the device's binding limit and the heads a multiple of 4, the
    engine runs attention on its fused kernels (WgpuBackend.flash_attention_fits): the plan then counts a
    log-sum-exp per row instead of the weights, and they are not the buffer that stops it."""
    cfg = TransformerConfig(vocab_size=65, block_size=1024, n_layer=2, n_head=2, n_embd=128)
    prof = plan.PROFILES["rtx4090"]
    att_bytes = 8 * 2 * 1024 * 1024 * 4                                  # 64 MiB a layer
    roomy = plan.estimate(cfg, batch=8, device=prof)
    tight = plan.estimate(cfg, batch=8, device=plan.DeviceProfile(**{**prof.to_dict(), "max_binding_size": 32 << 20}))
    assert roomy.largest_buffer == ("attention weights (B, H, T, T)", att_bytes)
    assert tight.fits and tight.largest_buffer[0] != roomy.largest_buffer[0]
    assert roomy.memory["activations per layer"] - tight.memory["activations per layer"] == att_bytes - 8 * 2 * 1024 * 4
    narrow = replace(cfg, n_embd=108, n_head=2)                          # heads of 54 (no vec4s): no fused kernels
    assert not plan.estimate(narrow, batch=8, device=plan.DeviceProfile(
        **{**prof.to_dict(), "max_binding_size": 32 << 20})).fits


def test_largest_buffer_above_binding_limit_is_named():
    prof = plan.PROFILES["rtx4090"]
    tight = plan.DeviceProfile(**{**prof.to_dict(), "max_binding_size": 64 << 20})
    p = plan.estimate("tiny", batch=512, seq=64, device=tight, vocab_size=50_257)
    assert not p.fits
    assert any("logits of a chunk of rows (rows, vocab) tensor needs 123 MiB" in r   # (below WebGPU's 128 MiB)
               and "max-storage-buffer-binding-size of 64 MiB" in r
               for r in p.reasons)


def test_readable_table_and_errors():
    p = plan.estimate("tiny", batch=12, tokens=1e6, lora_rank=8, device="m1")
    text = repr(p)
    for key in ("parameters", "memory: activations", "step time", "total time", "fits", "Apple M1"):
        assert key in text
    assert p.steps == int(np.ceil(1e6 / (12 * 64)))
    with pytest.raises(ValueError, match="unknown device profile 'tpu'"):
        plan.estimate("tiny", device="tpu")
    with pytest.raises(ValueError, match="unknown model 'giant'"):
        plan.estimate("giant")
    with pytest.raises(ValueError, match="precision 'fp16' is not supported yet"):
        plan.estimate("tiny", precision="fp16")


def test_gpt2_config_json_is_accepted(tmp_path):
    m = TransformerLM(TransformerConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16))
    m.save_pretrained(tmp_path, format="hf")
    p = plan.estimate(tmp_path / "config.json", batch=2, device="m1")
    assert p.params == m.num_parameters()


def test_multi_device_answer_gives_device_count_and_time():
    # a token budget that takes days on one device: the answer is N devices and the time on them
    p = plan.estimate("shakespeare-char", batch=64, tokens=2e12, device="h200")
    assert p.fits and p.total_time_s > 2 * plan.estimator.DAY_S
    assert p.devices_needed == math.ceil(p.total_time_s / plan.estimator.DAY_S)
    assert p.multi_device_time_s == pytest.approx(p.total_time_s / (p.devices_needed * plan.estimator.DDP_SCALING))
    assert f"torchrun --nproc_per_node {p.devices_needed}" in p.multi_device and "lab import" in p.multi_device
    # a batch too large for one device: enough devices that each one's share of the activations fits
    big = plan.estimate("shakespeare-char", batch=2048, seq=256, device="rtx4090")
    assert not big.fits and big.devices_needed > 1
    share = plan.estimate("shakespeare-char", batch=math.ceil(2048 / big.devices_needed), seq=256, device="rtx4090")
    assert share.memory["total"] + share.memory["gradients"] <= plan.PROFILES["rtx4090"].memory_bytes
    assert "more devices" in repr(big)
    # a short run on a device it fits: no multi-device advice
    assert plan.estimate("tiny", batch=12, device="h200").devices_needed == 1


@pytest.mark.parametrize("dropout,lora_rank", [(0.0, None), (0.1, None), (0.0, 4)], ids=["plain", "dropout", "lora"])
def test_op_count_matches_the_engine(wgpu_backend, dropout, lora_rank):
    """The estimator's per-step op count (its fixed cost per op times this) against lab.stats()' dispatches."""
    from lab import lora
    for n_layer in (1, 3):
        cfg = TransformerConfig(vocab_size=73, block_size=16, n_layer=n_layer, n_head=2, n_embd=32, dropout=dropout)
        measured = second_step_dispatches(
            wgpu_backend, lambda: lora.apply(TransformerLM(cfg), r=lora_rank) if lora_rank else TransformerLM(cfg),
            IDS, batch_size=2, replay_steps=True)
        counted = plan.estimator.op_count(cfg, lora_rank, update_slots=wgpu_backend.optimizer_slots(), rows=2 * 16)
        assert measured == counted, (n_layer, dropout)


def test_heads_in_place_save_the_op_count_says(wgpu_backend, monkeypatch):
    """Heads of 64 over sequences of 64: attention's products read and write the heads in place, 8 copies a layer
    fewer than when they are copied out and back (forced here), as op_count counts them."""
    cfg = TransformerConfig(vocab_size=73, block_size=64, n_layer=2, n_head=2, n_embd=128)
    in_place = _step_dispatches(wgpu_backend, cfg, replay_steps=True)
    monkeypatch.setattr(wgpu_backend, "heads_in_place", lambda seq, dim: False)
    copied = _step_dispatches(wgpu_backend, cfg, replay_steps=True)
    slots = wgpu_backend.optimizer_slots()
    counted = [plan.estimator.op_count(cfg, heads_in_place=h, update_slots=slots, rows=2 * 64) for h in (True, False)]
    assert copied - in_place == counted[1] - counted[0] == 8 * cfg.n_layer, (in_place, copied, counted)
    assert plan.estimator.op_count(cfg, update_slots=slots, rows=2 * 64) == counted[0]


def _step_dispatches(backend, cfg, batch=2, **config):
    """The dispatches of a TransformerLM's second training step on `backend` (eager unless config says)."""
    return second_step_dispatches(backend, lambda: TransformerLM(cfg), IDS, batch_size=batch, **config)


def test_bias_sums_folded_into_the_weight_products_save_what_op_count_says(wgpu_backend, monkeypatch):
    """64 wide over 2 x 32 rows: every linear layer's weight gradient is a whole-tile product that sums its bias
    gradient as it stages g, 8 reduction passes a layer fewer than the bias sums of their own (forced here by the
    composed Backend.matmul_column_sums), as op_count counts them from the engine's plan (it counted none)."""
    from functools import partial
    from lab.engine.backend import Backend
    cfg = TransformerConfig(vocab_size=73, block_size=32, n_layer=2, n_head=2, n_embd=64)
    slots = wgpu_backend.optimizer_slots()
    folded, counted_folded = _step_dispatches(wgpu_backend, cfg), plan.estimator.op_count(cfg, update_slots=slots,
                                                                                          rows=64)
    monkeypatch.setattr(wgpu_backend, "matmul_column_sums", partial(Backend.matmul_column_sums, wgpu_backend))
    monkeypatch.setattr(plan.estimator, "bias_sums_folded", lambda rows, n_in, n_out: False)
    own = _step_dispatches(wgpu_backend, cfg)
    counted_own = plan.estimator.op_count(cfg, update_slots=slots, rows=64)
    assert own - folded == counted_own - counted_folded == 8 * cfg.n_layer, (folded, own, counted_folded, counted_own)
    # ragged widths take no whole tiles: their bias sums stay passes of their own
    assert not plan.estimator.bias_sums_folded(64, 72, 216) and not plan.estimator.bias_sums_folded(30, 64, 192)


def test_a_model_too_wide_for_a_products_grid_is_a_plan_that_does_not_fit():
    """op_count asks the matmul plan whether a layer's bias sums come with its weight-gradient product: a layer
    whose product's grid exceeds the device's (4M wide) is a plan that does not fit, not the matmul's error."""
    cfg = TransformerConfig(vocab_size=73, block_size=64, n_layer=2, n_head=2, n_embd=2 ** 22)
    p = plan.estimate(cfg, batch=2, device="h200")
    assert not p.fits and p.step_time_s > 0


@pytest.mark.parametrize("preset", ["tiny", "shakespeare-char", "gpt2-small"])
def test_h200_profile_predicts_the_recorded_h200_steps(preset):
    """The spec-derived H200 profile against the training steps measured on an H200 (benchmarks/, recorded with
    `python -m lab bench train`): within 35%, as the measured profiles are tested on this machine."""
    import json
    from pathlib import Path
    record = json.loads((Path(__file__).parent.parent / "benchmarks" / f"train-{preset}-wgpu-h200.json").read_text())
    vocab = 50257 if preset == "gpt2-small" else 73
    predicted = plan.estimate(preset, batch=record["batch_size"], device="h200", vocab_size=vocab).step_time_s
    assert abs(predicted / (record["lab_ms_per_step"] / 1e3) - 1) < 0.35, (predicted, record["lab_ms_per_step"])


def test_plan_refuses_a_sequence_longer_than_the_block_size():
    """plan --seq 100000 for tiny (block_size 64) planned a different model (a 100,000-row position table: 13.6M
    parameters instead of 0.8M) without a word: a step never trains on more than block_size tokens."""
    from lab.checks import InputError
    with pytest.raises(InputError, match=r"^seq 100,000 is longer than the model's block_size 64: .*block_size=100000"):
        plan.estimate("tiny", seq=100_000, device="m1")
    assert plan.estimate("tiny", seq=64, device="m1").params == plan.estimate("tiny", device="m1").params


def test_a_refused_training_plan_is_one_line_without_nan(numpy_backend):
    """The check before a run (a limits profile, without timings) said 'about nan h on 15 of them' over four lines;
    the command line prints it as its one error line."""
    from lab.models import PRESETS
    from lab.plan.estimator import DoesNotFitError, check_fits
    with pytest.raises(DoesNotFitError) as info:
        check_fits(PRESETS["tiny"], 10 ** 8, numpy_backend)
    message = str(info.value)
    assert "\n" not in message and "nan" not in message.lower(), message
    assert message.startswith("this training plan does not fit this CPU (numpy backend): needs ")
    assert "Suggestions: batch " in message and "More devices: this needs more than one device (to fit the batch): " in message


def test_the_fit_check_counts_only_the_memory_this_process_can_have(numpy_backend, monkeypatch):
    """The host's memory was its physical total: memory other programs held, and a container's limit, counted as
    free. A batch planned at 99.6% of the total with a quarter in use passed the check, and the out-of-memory
    killer ended the process (a notebook's kernel). Now: what the process holds plus what the system has available,
    within a cgroup's limit."""
    from dataclasses import replace
    from lab.models import PRESETS, LlamaLM
    from lab.plan import profiles
    from lab.plan.estimator import DoesNotFitError
    gib = 2 ** 30
    total = profiles.os.sysconf("SC_PAGE_SIZE") * profiles.os.sysconf("SC_PHYS_PAGES")
    if total < 8 * gib:
        pytest.skip("the batch below must fit the physical memory")
    system = {"VmRSS": gib, "MemAvailable": 2 * gib}

    def read(path, key=None):   # this process holds 1 GiB, 2 GiB more are available; a cgroup limit where given
        return system.get(key or path)
    monkeypatch.setattr(profiles, "_read_int", read)
    assert profiles.limits_profile(numpy_backend).memory_bytes == 3 * gib
    system.update({"/sys/fs/cgroup/memory.max": 5 * gib // 2, "/sys/fs/cgroup/memory.current": 2 * gib})
    assert profiles.limits_profile(numpy_backend).memory_bytes == gib + gib // 2
    # a batch planned at about 4.7 GiB: within the physical memory, beyond what the process can have
    lab.manual_seed(0)
    model = LlamaLM(replace(PRESETS["llama-tiny"], vocab_size=73))
    need = plan.estimate(model.config, batch=20_000, seq=16, steps=1, device="cpu-2core").memory["total"]
    assert 3 * gib < need < total
    with pytest.raises(DoesNotFitError, match="has 1.50 GiB"):
        Trainer(model, IDS, IDS, TrainConfig(batch_size=20_000, block_size=16))


@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
def test_plan_refuses_tokens_and_steps_together(preset):
    """Both given, the steps were planned and the tokens dropped without a word."""
    from lab.checks import InputError
    with pytest.raises(InputError, match=r"^tokens 1000000.0 and steps 10 both set how long the plan trains"):
        plan.estimate(preset, tokens=1e6, steps=10, device="m1")
    assert plan.estimate(preset, steps=10, device="m1").steps == 10


def test_plan_refuses_a_lora_rank_above_the_layers():
    """plan --lora-rank 100000 planned adapters wider than tiny's 128-wide layers (lora.apply refuses them)."""
    from lab.checks import InputError
    with pytest.raises(InputError, match=r"^lora_rank must be an integer >= 0 and <= 128, got 129"):
        plan.estimate("tiny", lora_rank=129, device="m1")
    assert plan.estimate("tiny", lora_rank=128, device="m1").lora_rank == 128


def test_plan_estimate_resolves_presets_and_checks_inputs_before_measuring(monkeypatch):
    """lab.plan.estimate (measure.py) resolves a preset and a device, then hands the pure estimator the config; the
    device is measured only once the plan's inputs have passed their checks (a bad batch must not cost a profile)."""
    import re
    from lab.checks import show
    from lab.plan import estimator, measure

    def measured():
        raise AssertionError("measured the device before checking the plan's inputs")
    monkeypatch.setattr(measure, "profile_device", measured)
    with pytest.raises(lab.checks.InputError, match="batch"):
        plan.estimate("tiny", batch=0)
    ours = plan.estimate("tiny", batch=3, device="h200")
    assert ours.to_dict() == estimator.estimate(lab.PRESETS["tiny"], batch=3, device="h200").to_dict()
    for wrong in ("tiny", {"n_layer": 2}, None):
        with pytest.raises(lab.checks.InputError, match=rf"estimator.estimate takes a model config \(a "
                                                       rf"TransformerConfig or LlamaConfig\), got {re.escape(show(wrong))}"):
            estimator.estimate(wrong, device="h200")
