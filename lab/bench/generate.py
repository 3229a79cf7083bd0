"""Generation speed: lab.generate and transformers' generate on the same weights, greedy with the KV cache, in one
run. `python -m lab bench generate --preset P` times a prompt of 16 tokens and 200 new ones (fewer where the
preset's block_size ends first): the time to the first token, prefill tokens/s (the prompt's tokens over that time)
and decode tokens/s (the tokens after the first over the time they took). On a CPU machine lab's numpy backend runs
beside transformers on the CPU; with --backend wgpu on a GPU machine, beside transformers on CUDA (fp32, TF32 off).
The torch side is transformers' GPT2LMHeadModel / LlamaForCausalLM loaded from lab's save_pretrained of the model."""
import os
import tempfile
import time
from dataclasses import replace

import numpy as np

from ..checks import InputError, integer
from ..engine.backend import backend_instance, using_backend
from ..engine.random import manual_seed
from ..models import MODELS, PRESETS, LlamaConfig
from .timing import write_result


def _lab_model(preset, model_name):
    if model_name is not None:
        from ..pretrained import from_pretrained
        return from_pretrained(model_name), model_name
    if preset not in PRESETS:
        raise InputError(f"unknown preset {preset!r}: choose one of {sorted(PRESETS)} (or --model NAME)")
    cfg = PRESETS[preset]
    if not isinstance(cfg, LlamaConfig):   # transformers' GPT-2 has no dropout switch at generation; none either way
        cfg = replace(cfg, dropout=0.0)
    manual_seed(0)
    return MODELS[type(cfg)](cfg), preset


def _timed(run, n, batch):
    """(seconds to the first new token, seconds per decode step after it, the tokens) of run(on_token), which calls
    on_token() as each step's new token is made (or each row's: n * batch calls)."""
    stamps = []
    t = time.perf_counter()
    out = run(lambda *_: stamps.append(time.perf_counter()))
    first, last = stamps[0], stamps[-1]
    if len(stamps) not in (n, n * batch):
        raise RuntimeError(f"expected {n} new tokens, got {len(stamps)}")   # the figures would be of another run
    return first - t, (last - first) / max(n - 1, 1), out


def _lab_generate(model, prompts, n):
    from ..generate import generate

    def run(on_token):
        # eos_token_id=[]: every run makes n tokens, as transformers' with min_new_tokens
        return generate(model, prompts[0] if len(prompts) == 1 else prompts, n, greedy=True, eos_token_id=[],
                        on_token=on_token)
    return run


class _Stamps:
    """A transformers streamer that calls on_token() per new token step (its first put() is the prompt)."""

    def __init__(self, on_token):
        self.on_token, self.prompt_seen = on_token, False

    def put(self, value):
        if self.prompt_seen:
            self.on_token()
        self.prompt_seen = True

    def end(self):
        pass


def _torch_model(model, device):
    import torch
    import transformers
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d, format="hf")
        theirs = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32,
                                                                   attn_implementation="eager")
    return theirs.to(device).eval()


def _torch_generate(theirs, prompts, n, device):
    import torch
    x = torch.tensor(np.asarray(prompts, dtype=np.int64), device=device)

    def run(on_token):
        with torch.no_grad():
            out = theirs.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, num_beams=1, use_cache=True, streamer=_Stamps(on_token),
                                  pad_token_id=0)
        if device == "cuda":
            torch.cuda.synchronize()
        return out[:, x.shape[1]:].cpu().numpy()
    return run


def run_generate_bench(preset, backend_name, batch_size=1, new_tokens=None, prompt_tokens=16, model_name=None,
                       repeats=3, out_path=None, print_fn=print):
    """Each side runs `repeats` times, the two alternating so that both meet the same load on a shared machine; the
    best time to first token and the best decode rate of each are reported (every run's are in "runs")."""
    batch_size = integer("--batch", batch_size, low=1)
    prompt_tokens = integer("--prompt-tokens", prompt_tokens, low=1)
    repeats = integer("--repeats", repeats, low=1)
    backend = backend_instance(backend_name)
    with using_backend(backend):
        model, name = _lab_model(preset, model_name)
    cfg = model.config
    room = cfg.block_size - prompt_tokens
    if room < 2:
        raise InputError(f"--prompt-tokens {prompt_tokens} leaves {room} of {name}'s block_size {cfg.block_size} "
                         f"for new tokens: at least 2 are needed")
    new_tokens = min(200, room) if new_tokens is None else integer("--new-tokens", new_tokens, low=2)
    if new_tokens > room:   # past block_size lab slides its window and GPT-2 in transformers has no positions
        raise InputError(f"--new-tokens {new_tokens} with a {prompt_tokens}-token prompt passes {name}'s block_size "
                         f"{cfg.block_size}: at most {room}")
    # (before the prompts: a batch of 10^8 filled the host's memory building them and was killed, no message)
    from ..generate import check_cache_fits
    check_cache_fits(model, batch_size)
    prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch_size, prompt_tokens)).tolist()
    sides = {"lab": lambda n: _lab_generate(model, prompts, n)}
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError:
        torch = None
    if torch is not None:
        device = "cuda" if backend.name == "wgpu" and torch.cuda.is_available() else "cpu"
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 against fp32
        torch.backends.cudnn.allow_tf32 = False
        theirs = _torch_model(model, device)
        sides["torch"] = lambda n: _torch_generate(theirs, prompts, n, device)
    runs = {side: [] for side in sides}
    outs = {}
    load = os.getloadavg()[0]
    with using_backend(backend):
        for side, make in sides.items():   # warm-up: kernels compiled, buffers made
            _timed(make(2), 2, batch_size)
        for _ in range(repeats):
            for side, make in sides.items():
                ttft, per_step, out = _timed(make(new_tokens), new_tokens, batch_size)
                runs[side].append({"time_to_first_token_ms": ttft * 1e3, "decode_ms_per_step": per_step * 1e3})
                outs[side] = np.asarray(out).reshape(batch_size, -1)
    result = {"suite": "generate", "model": name, "backend": backend.name, "batch_size": batch_size,
              "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "parameters": model.num_parameters(),
              "repeats": repeats, "load_average_before": load, "load_average_after": os.getloadavg()[0]}
    if backend.name == "wgpu":
        result["device"] = backend.device_info["device"]
    else:   # (a prompt's products go through MKL where it is installed: lab.engine.blas)
        result["blas"] = backend.blas
    best = {}
    for side, rs in runs.items():
        ttft = min(r["time_to_first_token_ms"] for r in rs) / 1e3
        per_step = min(r["decode_ms_per_step"] for r in rs) / 1e3
        best[side] = ttft, per_step
        result.update({f"{side}_time_to_first_token_ms": ttft * 1e3,
                       f"{side}_prefill_tokens_per_s": batch_size * prompt_tokens / ttft,
                       f"{side}_decode_tokens_per_s": batch_size / per_step, f"{side}_runs": rs})
    line = (f"generate {name} ({model.num_parameters() / 1e6:.2f}M params, batch {batch_size}, {prompt_tokens} + "
            f"{new_tokens} tokens, greedy): lab {backend.name} decode {result['lab_decode_tokens_per_s']:,.1f} "
            f"tokens/s, first token {best['lab'][0] * 1e3:.1f} ms")
    if "torch" in sides:
        # the same weights, greedy: the same tokens until two logits are closer than the implementations differ
        # (the fewest of any row)
        same = np.concatenate([outs["lab"] == outs["torch"], np.zeros((batch_size, 1), bool)], axis=1)
        agree = int(np.argmin(same, axis=1).min())
        (ttft, per_step), (t_ttft, t_per_step) = best["lab"], best["torch"]
        result.update(torch_model=f"transformers {type(theirs).__name__} (eager attention, fp32)",
                      torch_device=device, torch_threads=torch.get_num_threads(),
                      thread_env={k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                                  "MKL_NUM_THREADS")},
                      decode_ratio=t_per_step / per_step, prefill_ratio=t_ttft / ttft,
                      time_to_first_token_ratio=ttft / t_ttft, first_tokens_equal=agree)
        line += (f"; transformers {device} decode {result['torch_decode_tokens_per_s']:,.1f} tokens/s, first token "
                 f"{t_ttft * 1e3:.1f} ms; lab/transformers decode {result['decode_ratio']:.2f}x, prefill "
                 f"{result['prefill_ratio']:.2f}x; first {agree} of {new_tokens} tokens equal")
    print_fn(line)
    if out_path:
        write_result(out_path, result, print_fn)
    return result
