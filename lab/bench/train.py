"""Training throughput: lab and the same model in PyTorch eager, same config, batch and device class, in one run.

`python -m lab bench train --preset tiny` on a CPU machine compares lab's numpy backend with PyTorch on the CPU;
with --backend wgpu on a GPU machine, lab's wgpu backend with PyTorch CUDA (fp32, TF32 off). A Llama preset
(llama-tiny, smollm2-135m) runs beside transformers' LlamaForCausalLM (eager attention) holding lab's initial
weights, on the batches lab drew, with the same AdamW settings."""
import copy
import time
from dataclasses import replace

import numpy as np

from ..checks import InputError
from ..data import CharTokenizer, get_batch, load_corpus
from ..engine.backend import backend_instance, using_backend
from ..engine.random import manual_seed
from ..models import MODELS, PRESETS, LlamaConfig
from ..train import TrainConfig, Trainer
from .timing import peak_of_steps, write_result


def measure_steps(trainer, steps):
    """Seconds per optimizer step after three warm-up steps; one readback at the end waits for the device."""
    for _ in range(3):
        trainer.train_step()
    trainer.train_step()[0].item()
    t = time.perf_counter()
    for _ in range(steps):
        loss, _ = trainer.train_step()
    loss.item()
    return (time.perf_counter() - t) / steps


# a benchmark's sequence for a Llama preset, whose block_size is its longest context (8192 for SmolLM2)
BENCH_BLOCK_SIZE = {"smollm2-135m": 512}
BENCH_BATCH_SIZE = {"shakespeare-char": 64, "gpt2-small": 8, "smollm2-135m": 8}


def _bench_setup(preset, batch_size, block_size, dropout):
    """The model config, token ids, batch size and sequence length (0: the model's) a preset's benchmark trains
    with."""
    if preset not in PRESETS:
        raise InputError(f"unknown preset {preset!r}: choose one of {sorted(PRESETS)}")
    text = load_corpus()
    tok = CharTokenizer.from_text(text)
    ids = tok.encode(text)
    # GPT-2 and Llama presets keep their vocabulary (the corpus's character ids are valid tokens of it), so
    # the output layer has its real size (49152 for SmolLM2: a large part of a step); the others take the
    # corpus's
    keep = preset.startswith("gpt2") or isinstance(PRESETS[preset], LlamaConfig)
    vocab = max(tok.vocab_size, PRESETS[preset].vocab_size) if keep else tok.vocab_size
    cfg = replace(PRESETS[preset], vocab_size=vocab)
    if dropout is not None:
        cfg = replace(cfg, dropout=dropout)
    return cfg, ids, batch_size or BENCH_BATCH_SIZE.get(preset, 12), block_size or BENCH_BLOCK_SIZE.get(preset, 0)


def run_train_bench(preset, backend_name, batch_size=None, steps=20, out_path=None, dropout=None, print_fn=print,
                    block_size=None):
    cfg, ids, batch_size, block = _bench_setup(preset, batch_size, block_size, dropout)
    llama = isinstance(cfg, LlamaConfig)
    backend = backend_instance(backend_name)
    with using_backend(backend):
        manual_seed(0)
        model = MODELS[type(cfg)](cfg)
        tcfg = TrainConfig(steps=10**9, batch_size=batch_size, block_size=block)   # (checks block against the model)
        trainer = Trainer(model, ids, ids[:10_000], tcfg)
        block = trainer.block_size
        if llama:   # what PyTorch starts from: lab's initial weights, and the batches lab's steps draw
            weights, batch_rng = model.hf_weights(), copy.deepcopy(trainer.rng)
            lab_first_loss = trainer.train_step()[0].item()
        lab_s = measure_steps(trainer, steps)
        replayed = trainer.replay is not None and trainer.replay.replayed > 0
        if replayed:  # the same steps run eagerly (every op through Python), for the replay's share
            eager = Trainer(model, ids, ids[:10_000], replace(tcfg, replay_steps=False))
            eager_s = measure_steps(eager, steps)
    tokens = batch_size * block
    result = {"suite": "train", "preset": preset, "backend": backend.name, "batch_size": batch_size,
              "block_size": block, "parameters": model.num_parameters(), "steps": steps,
              "lab_tokens_per_s": tokens / lab_s, "lab_ms_per_step": lab_s * 1e3, "replayed_steps": replayed}
    if backend.name == "wgpu":
        result["device"] = backend.device_info["device"]
    else:   # what its products ran on (OpenBLAS through numpy, or MKL: lab.engine.blas)
        result["blas"] = backend.blas
    line = (f"train {preset} ({model.num_parameters() / 1e6:.2f}M params, batch {batch_size} x {block}): "
            f"lab {backend.name}{' (' + result['blas'] + ')' if 'blas' in result else ''} "
            f"{tokens / lab_s:,.0f} tokens/s ({lab_s * 1e3:.1f} ms/step)")
    if replayed:
        result.update(lab_eager_tokens_per_s=tokens / eager_s, lab_eager_ms_per_step=eager_s * 1e3)
        line += f" with step replay, {tokens / eager_s:,.0f} eager"
    try:
        import torch
        from .torch_gpt import seconds_per_step
        if llama:   # the same architecture is transformers'
            import transformers  # noqa: F401
    except ImportError:
        torch = None
    if torch is not None:
        device = "cuda" if backend.name == "wgpu" and torch.cuda.is_available() else "cpu"
        if llama:   # transformers' LlamaForCausalLM (eager attention) with lab's weights, on lab's batches
            from .torch_llama import seconds_per_step as llama_seconds_per_step
            batches = [get_batch(ids, batch_size, block, batch_rng) for _ in range(4 + steps + 1)]
            torch_s, torch_first_loss = llama_seconds_per_step(cfg, weights, steps, device, batches, tcfg.lr,
                                                               tcfg.weight_decay, tcfg.betas)
            result.update(model=f"transformers {cfg.architecture} (eager attention, fp32)",
                          lab_first_loss=lab_first_loss, torch_first_loss=torch_first_loss)
        else:
            rng = np.random.default_rng(0)
            batches = [get_batch(ids, batch_size, block, rng) for _ in range(8)]
            torch_s, _ = seconds_per_step(cfg, batch_size, steps, device, batches)
        result.update(torch_device=device, torch_tokens_per_s=tokens / torch_s, torch_threads=torch.get_num_threads(),
                      ratio=(tokens / lab_s) / (tokens / torch_s))
        line += f"; torch eager {device} {tokens / torch_s:,.0f} tokens/s; lab/torch {result['ratio']:.2f}x"
        if llama:   # the same model: the same loss on the same first batch
            line += f"; first loss lab {lab_first_loss:.5f}, torch {torch_first_loss:.5f}"
    print_fn(line)
    if out_path:
        write_result(out_path, result, print_fn)
    return result


def run_checkpointing_bench(preset, backend_name, every=1, batch_size=None, steps=10, rounds=5, out_path=None,
                            print_fn=print, block_size=None, dropout=None):
    """Peak memory and time of a training step without and with TrainConfig(checkpoint_activations=every): the
    medians of `rounds` interleaved runs (each round measures both, in alternating order, so a machine's drift
    reaches both alike). Peak: the backend's peak bytes in use over a fresh model's first three steps (wgpu), or
    tracemalloc's peak of numpy's arrays (the model's included); time: measure_steps on the same model."""
    cfg, ids, batch_size, block = _bench_setup(preset, batch_size, block_size, dropout)
    backend = backend_instance(backend_name)
    peaks, times = {0: [], every: []}, {0: [], every: []}
    with using_backend(backend):
        def build(k):
            manual_seed(0)
            return Trainer(MODELS[type(cfg)](cfg), ids, ids[:10_000],
                           TrainConfig(steps=10**9, batch_size=batch_size, block_size=block, checkpoint_activations=k))

        def three_steps(trainer):
            for _ in range(3):
                trainer.train_step()
            backend.sync(wait=True)
        for r in range(rounds):
            for k in ((0, every) if r % 2 == 0 else (every, 0)):
                trainer, peak = peak_of_steps(backend, lambda: build(k), three_steps)
                peaks[k].append(peak)
                times[k].append(measure_steps(trainer, steps))
                block = trainer.block_size
                del trainer
    peak = {k: float(np.median(v)) for k, v in peaks.items()}
    step = {k: float(np.median(v)) for k, v in times.items()}
    result = {"suite": "train-checkpointing", "preset": preset, "backend": backend.name, "batch_size": batch_size,
              "block_size": block, "checkpoint_activations": every, "rounds": rounds, "steps": steps,
              "peak_measured_by": "backend" if backend.name != "numpy" else "tracemalloc (numpy arrays)",
              "peak_bytes_plain": peak[0], "peak_bytes_checkpointed": peak[every],
              "peak_ratio": peak[every] / peak[0], "ms_per_step_plain": step[0] * 1e3,
              "ms_per_step_checkpointed": step[every] * 1e3, "time_ratio": step[every] / step[0],
              # the least disturbed run of each (a shared machine's medians can carry other work's noise)
              "best_ms_per_step_plain": min(times[0]) * 1e3, "best_ms_per_step_checkpointed": min(times[every]) * 1e3,
              "best_time_ratio": min(times[every]) / min(times[0]),
              "peak_bytes_runs": {"plain": peaks[0], "checkpointed": peaks[every]},
              "ms_per_step_runs": {"plain": [t * 1e3 for t in times[0]], "checkpointed": [t * 1e3 for t in times[every]]}}
    if backend.name == "wgpu":
        result["device"] = backend.device_info["device"]
    print_fn(f"train {preset} (batch {batch_size} x {block}, {backend.name}), checkpoint_activations={every}: peak "
             f"{peak[0] / 2 ** 20:,.1f} -> {peak[every] / 2 ** 20:,.1f} MiB ({result['peak_ratio']:.2f}x), step "
             f"{step[0] * 1e3:.1f} -> {step[every] * 1e3:.1f} ms ({result['time_ratio']:.2f}x; the best runs "
             f"{result['best_time_ratio']:.2f}x); medians of {rounds} interleaved rounds")
    if out_path:
        write_result(out_path, result, print_fn)
    return result
