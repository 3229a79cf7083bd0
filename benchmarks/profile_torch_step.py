"""Where PyTorch eager's training step spends its GPU time, by kernel class (torch.profiler), for `bench train`'s
presets and batches: the reference's own matmul time bounds how far ahead of it an engine whose matmuls run at
cuBLAS's fp32 rate can get. Usage (a CUDA GPU): python benchmarks/profile_torch_step.py PRESET [PRESET ...]"""
import collections
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from lab.bench.torch_gpt import TorchGPT, make_optimizer, train_step
from lab.bench.torch_llama import targets_loss, torch_llama
from lab.bench.train import _bench_setup
from lab.models.llama import LlamaConfig

torch.backends.cuda.matmul.allow_tf32 = False   # fp32 against fp32, as bench train
torch.backends.cudnn.allow_tf32 = False


def kernel_class(name):
    n = name.lower()
    for cls, keys in (("attention", ("fmha", "attention", "flash")),     # (before gemm: fmha kernels are cutlass's)
                      ("matmul", ("gemm", "cutlass", "splitk", "gemv")), ("softmax", ("softmax",)),
                      ("optimizer", ("adam", "multi_tensor")), ("norm", ("norm",)),
                      ("elementwise", ("elementwise", "vectorized")), ("reduce", ("reduce",))):
        if any(k in n for k in keys):
            return cls
    return "other"


def model_and_loss(cfg):
    if isinstance(cfg, LlamaConfig):   # as bench train: transformers' model, eager attention
        model = torch_llama(cfg, None, "cuda")
        return model, targets_loss(model)
    model = TorchGPT(cfg).cuda()
    return model, model


for preset in sys.argv[1:]:
    cfg, _, batch, block = _bench_setup(preset, None, None, None)
    block = block or cfg.block_size
    torch.manual_seed(0)
    model, loss_of = model_and_loss(cfg)
    opt = make_optimizer(model, 1e-3, 0.1, (0.9, 0.99))
    x, y = (torch.randint(0, 60, (batch, block), device="cuda") for _ in range(2))

    def step():
        return train_step(model, opt, loss_of, x, y)

    for _ in range(4):
        step().item()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        step()
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t) / 10 * 1e3
    torch.cuda.reset_peak_memory_stats()
    step().item()
    peak = torch.cuda.max_memory_allocated()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step().item()
        torch.cuda.synchronize()
    by_class, calls, by_name = collections.Counter(), collections.Counter(), collections.Counter()
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            us = getattr(e, "device_time", None) or e.cuda_time
            by_class[kernel_class(e.name)] += us
            calls[kernel_class(e.name)] += 1
            by_name[e.name[:90]] += us
    total = sum(by_class.values())
    print(f"torch {preset} batch {batch} x {block}: {wall_ms:.2f} ms/step, GPU kernels {total / 1e3:.2f} ms, "
          f"peak {peak / 1e9:.2f} GB")
    for cls, us in by_class.most_common():
        print(f"   {cls:12s} {us / 1e3:8.2f} ms {calls[cls]:5d} calls {100 * us / total:5.1f}%")
    for name, us in by_name.most_common(8):
        print(f"      {us / 1e3:8.2f} ms  {name}")
    del model, opt
    torch.cuda.empty_cache()
