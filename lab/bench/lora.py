"""LoRA fine-tuning throughput: adapter training tokens/s on this device, the projected time for 1 M tokens, and
full fine-tuning of the same model in the same run for comparison. With base_dtype="float16" the adapters are
also trained on a float32 base in the same run: tokens/s and peak device memory of both."""
import copy
from dataclasses import replace

import numpy as np

from .. import lora, nn
from ..checks import InputError
from ..data import CharTokenizer, get_batch, load_corpus
from ..engine.backend import backend_instance, using_backend
from ..engine.random import manual_seed
from ..engine.tensor import QuantizedWeight
from ..models import PRESETS, LlamaConfig, LlamaLM, TransformerLM
from ..train import TrainConfig, Trainer
from .timing import peak_of_steps, write_result
from .train import BENCH_BATCH_SIZE, BENCH_BLOCK_SIZE, measure_steps


def _adapter_run(cfg, ids, tcfg, r, steps, base_dtype, backend):
    """(seconds per step, peak bytes in use during the steps, the model) of adapter training on a fresh model."""
    manual_seed(0)
    model = lora.apply(TransformerLM(cfg), r=r, alpha=2 * r, base_dtype=base_dtype)
    trainer = Trainer(model, ids, ids, tcfg)
    backend.reset_peak()
    seconds = measure_steps(trainer, steps)
    return seconds, backend.stats().get("peak_bytes_in_use"), model


BASE_DTYPES = ("float32", "float16", "int8", "q4")


def run_lora_bench(preset, backend_name, r=8, batch_size=None, steps=20, out_path=None, print_fn=print,
                   base_dtype="float32"):
    if preset not in PRESETS:
        raise InputError(f"unknown preset {preset!r}: choose one of {sorted(PRESETS)}")
    if base_dtype != "all" and base_dtype not in BASE_DTYPES:
        raise InputError(f"unknown base_dtype {base_dtype!r}: choose one of {', '.join(BASE_DTYPES)} or all")
    if isinstance(PRESETS[preset], LlamaConfig):
        return _llama_lora_bench(preset, backend_name, r, batch_size, steps, out_path, print_fn,
                                 BASE_DTYPES if base_dtype == "all" else (base_dtype,))
    if base_dtype == "all":
        raise InputError(f"base_dtype 'all' runs the Llama family's presets (llama-tiny, smollm2-135m); a GPT-2 "
                         f"preset such as {preset!r} takes one of {', '.join(BASE_DTYPES)}, beside float32")
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
              "base_linear_bytes": sum(_weight_bytes(m.weight) for m in model.modules() if isinstance(m, nn.Linear)),
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
        write_result(out_path, result, print_fn)
    return result


def _mib(n):
    return "n/a" if n is None else f"{n / 2**20:,.1f} MiB"


def _weight_bytes(w):
    return w.nbytes if isinstance(w, QuantizedWeight) else w.size * np.dtype(w.dtype).itemsize


def _llama_lora_bench(preset, backend_name, r, batch_size, steps, out_path, print_fn, dtypes):
    """Adapters on every linear layer of a Llama preset (random init, its real vocabulary) for each base dtype:
    tokens/s and peak memory, and beside them PyTorch + PEFT (transformers' LlamaForCausalLM, float32 base, the
    same initial weights, all-linear adapters of the same rank) where torch, transformers and peft are installed."""
    backend = backend_instance(backend_name)
    cfg = PRESETS[preset]
    batch_size = batch_size or BENCH_BATCH_SIZE.get(preset, 12)
    block = BENCH_BLOCK_SIZE.get(preset, cfg.block_size)
    text = load_corpus("sonnets")
    tok = CharTokenizer.from_text(text)
    ids = tok.encode(text)   # character ids: valid tokens of any preset's vocabulary (256 and up)
    tcfg = TrainConfig(steps=10**9, batch_size=batch_size, block_size=block)
    tokens, runs = batch_size * block, {}
    with using_backend(backend):
        for dtype in dtypes:
            def build():
                manual_seed(0)
                model = lora.apply(LlamaLM(cfg), r=r, alpha=2 * r, targets="all-linear", base_dtype=dtype)
                trainer = Trainer(model, ids, ids, tcfg)
                batch_rng = copy.deepcopy(trainer.rng)   # PyTorch trains on the batches lab's steps draw
                return model, trainer, batch_rng
            first = []   # the first step's loss (before any update: the base's, as B starts at zero)
            (model, trainer, batch_rng), peak = peak_of_steps(backend, build, lambda built: first.extend(
                built[1].train_step()[0].item() for _ in range(2)))
            seconds = measure_steps(trainer, steps)
            runs[dtype] = {"tokens_per_s": tokens / seconds, "ms_per_step": seconds * 1e3, "peak_bytes": peak,
                           "base_linear_bytes": sum(_weight_bytes(m.weight) for m in model.modules()
                                                    if isinstance(m, nn.Linear)),
                           "first_loss": first[0], "trainable_parameters": model.num_parameters(trainable_only=True)}
            del model, trainer
        manual_seed(0)   # PyTorch's model starts from the same initial weights
        weights = LlamaLM(cfg).hf_weights()
    result = {"suite": "lora", "preset": preset, "backend": backend.name, "r": r, "targets": "all-linear",
              "batch_size": batch_size, "block_size": block, "steps": steps, "bases": runs,
              "peak_measured_by": "backend" if backend.name != "numpy" else "tracemalloc (numpy arrays)"}
    if backend.name == "wgpu":
        result["device"] = backend.device_info["device"]
    torch_run = _torch_peft(cfg, weights, r, steps, backend, tcfg,
                            [get_batch(ids, batch_size, block, batch_rng) for _ in range(4 + steps)])
    if torch_run:
        result["torch_peft"] = torch_run
    print_fn(f"lora {preset} all-linear r={r} (batch {batch_size} x {block}) on {result.get('device', backend.name)}")
    for dtype, run in runs.items():
        line = (f"  {dtype:>7} base: {run['tokens_per_s']:,.0f} tokens/s ({run['ms_per_step']:,.1f} ms/step), "
                f"linear weights {_mib(run['base_linear_bytes'])}, peak {_mib(run['peak_bytes'])}, "
                f"first loss {run['first_loss']:.5f}")
        if torch_run:
            run["ratio_to_torch_peft"] = run["tokens_per_s"] / torch_run["tokens_per_s"]
            line += f"; {run['ratio_to_torch_peft']:.2f}x torch+peft"
        print_fn(line)
    if torch_run:
        print_fn(f"  torch+peft float32 base on {torch_run['device']}: {torch_run['tokens_per_s']:,.0f} tokens/s, "
                 f"peak {_mib(torch_run['peak_bytes'])}, first loss {torch_run['first_loss']:.5f}")
    else:
        print_fn("  torch+peft: skipped (torch, transformers and peft are not all installed)")
    if out_path:
        write_result(out_path, result, print_fn)
    return result


def _torch_peft(cfg, weights, r, steps, backend, tcfg, batches):
    """PyTorch + PEFT on the same architecture: seconds per step, peak memory (CUDA's count; None on a CPU) and the
    first loss, or None without torch, transformers or peft."""
    try:
        import peft
        import torch
        import transformers  # noqa: F401
    except ImportError:
        return None
    from .torch_gpt import timed_steps
    from .torch_llama import targets_loss, torch_llama
    device = "cuda" if backend.name == "wgpu" and torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 against fp32
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model = peft.get_peft_model(torch_llama(cfg, weights, device),
                                peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", lora_dropout=0.0))
    loss_of = targets_loss(model)
    x, y = (torch.from_numpy(a.astype("int64")).to(device) for a in batches[0])
    with torch.no_grad():
        first = loss_of(x, y).item()
    seconds, _ = timed_steps(model, loss_of, steps, device, batches, tcfg.lr, tcfg.weight_decay, tcfg.betas)
    tokens = batches[0][0].size
    return {"device": device, "tokens_per_s": tokens / seconds, "ms_per_step": seconds * 1e3, "first_loss": first,
            "peak_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None,
            "model": f"transformers {cfg.architecture} (eager attention, fp32) + peft all-linear r={r}"}
