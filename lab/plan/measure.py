"""What the planner measures: a device's profile (timing lab's own ops and a small training step on it), and a
plan's prediction against the steps it predicts. It builds models and trainers, so it sits above them; the
arithmetic it feeds (estimator.py, profiles.py) imports nothing above the engine.
"""
import time
from pathlib import Path

import numpy as np

from ..bench.timing import best_seconds
from ..checks import InputError, show
from ..engine.backend import backend_instance, get_backend, using_backend
from ..engine.tensor import no_grad, tensor
from ..io import CheckpointError, read_json
from . import estimator
from .estimator import activation_floats, op_count
from .profiles import DeviceProfile, limits_profile, named_profile

_measured = {}


def estimate(config_or_preset, batch=12, seq=None, tokens=None, steps=None, precision="fp32", optimizer="adamw",
             lora_rank=None, lora_targets=None, device=None, vocab_size=None, lora_base_dtype="float32",
             checkpoint_activations=0):
    """estimator.estimate for a TransformerConfig, a preset name or a config.json (lab's or GPT-2's), on `device`
    (None/'this': the measured current backend, measured once the plan's inputs are checked; or a named profile
    such as 'm1', 'rtx4090', 'h200')."""
    device = profile_device if device is None or device == "this" else device
    return estimator.estimate(_config(config_or_preset), batch, seq, tokens, steps, precision, optimizer, lora_rank,
                              lora_targets, device, vocab_size, lora_base_dtype, checkpoint_activations)


def get_profile(device=None):
    """A DeviceProfile: None or "this" measures the current backend; a name picks a spec-derived profile."""
    if device is None or device == "this":
        return profile_device()
    return named_profile(device)


def _config(config_or_preset):
    """A model config from a config, a preset of any family, a config.json (lab's, GPT-2's or the Llama
    family's), a checkpoint or model directory, a .gguf, a shipped model's short name or a Hub id (its config
    alone: no weights are read)."""
    from ..models import PRESETS, LlamaConfig, LlamaLM, TransformerConfig, family
    from ..models.transformer import _config_from_hf
    if isinstance(config_or_preset, (TransformerConfig, LlamaConfig)):
        return config_or_preset
    if isinstance(config_or_preset, str) and config_or_preset in PRESETS:
        return PRESETS[config_or_preset]
    if not isinstance(config_or_preset, (str, Path)):
        raise InputError(f"unknown model {show(config_or_preset)}: a TransformerConfig or LlamaConfig, a preset "
                         f"({sorted(PRESETS)}), a config.json, a model directory or .gguf, a shipped model or a "
                         f"Hub id")
    from .. import shipped
    from ..pretrained import REPO_ID, read_config
    path = Path(config_or_preset)
    if not (path.exists() or str(config_or_preset) in shipped.SHIPPED or REPO_ID.fullmatch(str(config_or_preset))):
        raise InputError(f"unknown model {str(config_or_preset)!r}: a preset ({', '.join(sorted(PRESETS))}), a "
                         f"config.json, a model or checkpoint directory, a .gguf, a shipped model "
                         f"({', '.join(shipped.SHIPPED)}) or a Hub id ('org/name')")
    if path.is_file() and path.suffix == ".json":
        data, source = read_json(path, "model config"), path
    else:
        data, source = read_config(config_or_preset)
    if not isinstance(data, dict):
        raise CheckpointError(f"{source}: expected a JSON object, got {show(data)}")
    if family(data, source) is LlamaLM:
        return LlamaConfig.from_hf(data, source)
    if data.get("model_type") == "gpt2":
        return _config_from_hf(data, source)
    try:
        return TransformerConfig(**{k: v for k, v in data.items() if k in TransformerConfig.__dataclass_fields__})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: invalid model config ({e})") from None


def profile_device(backend=None, refresh=False):
    """Measure the current (or given) backend with short micro-benchmarks of lab's own ops; cached per process."""
    b = backend_instance(backend) if backend is not None else get_backend()
    key = b.name
    if key in _measured and not refresh:
        return _measured[key]
    rng = np.random.default_rng(0)

    def sync_of(out):
        def sync():
            if b.name == "wgpu":
                b.sync()
                b.queue.read_buffer(out["t"].data.buffer, 0, 4)
        return sync

    from ..engine import ops as F
    with no_grad():
        box = {}
        # a training step's matmuls: the forward product and the two transposed ones of its backward
        a = tensor(rng.standard_normal((1024, 256)).astype(np.float32), backend=b)
        w = tensor(rng.standard_normal((256, 768)).astype(np.float32), backend=b)
        g = tensor(rng.standard_normal((1024, 768)).astype(np.float32), backend=b)

        def matmuls():
            box["t"] = a @ w
            box["t"] = F.matmul(g, w, transpose_b=True)
            box["t"] = F.matmul(a, g, transpose_a=True)
        t_mm = best_seconds(matmuls, sync_of(box)) / 3
        # an elementwise op on arrays beyond the caches, allocating its output as training's temporaries do
        x = tensor(rng.standard_normal(1 << 22).astype(np.float32), backend=b)
        t_ew = best_seconds(lambda: box.__setitem__("t", x + x), sync_of(box))
        one = tensor(np.ones(1, dtype=np.float32), backend=b)
        t_op = best_seconds(lambda: box.__setitem__("t", one + one), sync_of(box))
        # dropout on the CPU over an array of a small model's activation size (training's are cache-sized there;
        # over 16 MB arrays the mask's cost per float measured 1.5-2x and with the page faults of fresh outputs
        # in a long-running process up to 3x what a step sees); on a GPU over the large array, as the others
        drop_n = 1 << 18 if b.name == "numpy" else 1 << 22
        xd = tensor(rng.standard_normal(drop_n).astype(np.float32), backend=b)
        t_drop = best_seconds(lambda: box.__setitem__("t", F.dropout(xd, 0.1, seed=1)), sync_of(box))
    lim = limits_profile(b)
    prof = DeviceProfile(lim.name, "measured", 2 * 1024 * 256 * 768 / max(t_mm - t_op, 1e-9),
                         3 * 4 * (1 << 22) / max(t_ew - t_op, 1e-9), t_op, lim.memory_bytes, lim.max_buffer_size,
                         lim.max_binding_size, 0.0, max(t_drop - t_op, 0.0) / drop_n,
                         b.optimizer_slots(), lim.host_temporaries, lim.workgroup_storage)
    prof.elementwise_s_per_float = _probe_elementwise_cost(b, prof)
    _measured[key] = prof
    return prof


def _probe_elementwise_cost(backend, prof):
    """Time a small training step (best of several) and attribute what matmuls and per-op costs do not explain to
    the step's activation floats: the cost of the engine's elementwise work per float, on this device."""
    from ..engine.random import get_state, manual_seed, set_state
    from ..models.transformer import TransformerConfig, TransformerLM
    from ..train import TrainConfig, Trainer
    cfg, batch = TransformerConfig(vocab_size=64, block_size=48, n_layer=2, n_head=4, n_embd=112), 6
    rng_state = get_state()
    try:
        manual_seed(0)
        ids = np.random.default_rng(0).integers(0, 64, 5000).astype(np.int32)
        with using_backend(backend):
            model = TransformerLM(cfg)
            trainer = Trainer(model, ids, ids, TrainConfig(steps=100, batch_size=batch))
            best = best_seconds(lambda: trainer.train_step()[0].item(), lambda: None, budget=60, rounds=9, max_reps=1)
    finally:
        set_state(rng_state)
    matmul = model.flops_per_token() * batch * cfg.block_size / prof.matmul_flops
    rest = best - matmul - op_count(cfg, update_slots=prof.update_slots, rows=batch * cfg.block_size) * prof.op_overhead_s
    acts = activation_floats(cfg, batch, cfg.block_size)[0]
    return max(rest, 0.1 * best) / acts


def predict_and_measure(trainer, steps=15, attempts=2, within=0.35):
    """Check the plan against this machine: profile the trainer's backend now, predict one step of its model and
    batch, then time `steps` real steps (their best, as the profile's timings are best-of-rounds). A busy machine
    can slow a profile for seconds at a time and predict a machine slower than the steps then meet, so a miss by
    more than `within` is profiled and measured again, `attempts` times at most. Returns [(predicted_s,
    measured_s), ...], one pair per attempt; the last is the one to judge (a wrong prediction misses every time)."""
    cfg = trainer.model.config
    batch = trainer.cfg.batch_size * trainer.cfg.grad_accum_steps  # the sequences one step trains on
    out = []
    for _ in range(attempts):
        profile = profile_device(trainer.optimizer.backend, refresh=True)
        predicted = estimate(cfg, batch=batch, seq=cfg.block_size, device=profile,
                             checkpoint_activations=trainer.checkpoint_every()).step_time_s
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            trainer.train_step()[0].item()
            times.append(time.perf_counter() - t0)
        out.append((predicted, min(times)))
        if abs(predicted / min(times) - 1) < within:
            break
    return out
