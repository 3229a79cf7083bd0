"""LoRA fine-tuning throughput: adapter training tokens/s on this device, the projected time for 1 M tokens, and
full fine-tuning of the same model in the same run for comparison. With base_dtype="float16" the adapters are
also trained on a float32 base in the same run: tokens/s and peak device memory of both."""
import json
from dataclasses import replace
from pathlib import Path

from .. import lora, nn
from ..checks import InputError
from ..data import CharTokenizer, load_corpus
from ..engine.backend import backend_instance, using_backend
from ..engine.random import manual_seed
from ..models import PRESETS, TransformerLM
from ..train import TrainConfig, Trainer
from .train import measure_steps


def _adapter_run(cfg, ids, tcfg, r, steps, base_dtype, backend):
    """(seconds per step, peak bytes in use during the steps, the model) of adapter training on a fresh model."""
    manual_seed(0)
    model = lora.apply(TransformerLM(cfg), r=r, alpha=2 * r, base_dtype=base_dtype)
    trainer = Trainer(model, ids, ids, tcfg)
    backend.reset_peak()
    seconds = measure_steps(trainer, steps)
    return seconds, backend.stats().get("peak_bytes_in_use"), model


def run_lora_bench(preset, backend_name, r=8, batch_size=None, steps=20, out_path=None, print_fn=print,
                   base_dtype="float32"):
    if preset not in PRESETS:
        raise InputError(f"unknown preset {preset!r}: choose one of {sorted(PRESETS)}")
    backend = backend_instance(backend_name)
    with using_backend(backend):
        base_text, tune_text = load_corpus("kjv"), load_corpus("sonnets")
        tok = CharTokenizer.from_text(base_text + tune_text)
        ids = tok.encode(tune_text)
        cfg = replace(PRESETS[preset], vocab_size=tok.vocab_size)
        batch_size = batch_size or (64 if preset == "shakespeare-char" else 12)
        tcfg = TrainConfig(steps=10**9, batch_size=batch_size)
        manual_seed(0)
        full_s = measure_steps(Trainer(TransformerLM(cfg), ids, ids, tcfg), steps)
        lora_s, peak, model = _adapter_run(cfg, ids, tcfg, r, steps, base_dtype, backend)
        if base_dtype != "float32":
            f32_s, f32_peak, _ = _adapter_run(cfg, ids, tcfg, r, steps, "float32", backend)
    tokens = batch_size * cfg.block_size
    tps = tokens / lora_s
    result = {"suite": "lora", "preset": preset, "backend": backend.name, "r": r, "batch_size": batch_size,
              "block_size": cfg.block_size, "parameters": model.num_parameters(),
              "trainable_parameters": model.num_parameters(trainable_only=True),
              "lora_tokens_per_s": tps, "full_tokens_per_s": tokens / full_s,
              "minutes_per_million_tokens": 1e6 / tps / 60, "base_dtype": base_dtype,
              "base_linear_bytes": sum(m.weight.numpy().nbytes for m in model.modules() if isinstance(m, nn.Linear)),
              "peak_bytes_in_use": peak}
    if base_dtype != "float32":
        result.update(float32_base_tokens_per_s=tokens / f32_s, float32_base_peak_bytes_in_use=f32_peak)
    if backend.name == "wgpu":
        result["device"] = backend.device_info["device"]
    print_fn(f"lora {preset} r={r} ({result['trainable_parameters']:,} of {result['parameters']:,} parameters "
             f"trainable, batch {batch_size} x {cfg.block_size}) on {result.get('device', backend.name)}: "
             f"{tps:,.0f} tokens/s adapter training, {tokens / full_s:,.0f} tokens/s full fine-tuning; "
             f"1 M tokens of adapter training: {result['minutes_per_million_tokens']:.1f} min")
    if base_dtype != "float32":
        print_fn(f"  {base_dtype} base: {tps:,.0f} tokens/s, peak {_mib(peak)} in use; float32 base: "
                 f"{result['float32_base_tokens_per_s']:,.0f} tokens/s, peak {_mib(f32_peak)} "
                 f"(ratio {tps / result['float32_base_tokens_per_s']:.2f}x)")
    if out_path:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        Path(out_path).write_text(json.dumps(result, indent=2))
        print_fn(f"wrote {out_path}")
    return result


def _mib(n):
    return "n/a" if n is None else f"{n / 2**20:,.1f} MiB"
