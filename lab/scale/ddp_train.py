"""Continue training an exported lab model with PyTorch DistributedDataParallel.

    torchrun --nproc_per_node 2 -m lab.scale.ddp_train --model runs/hf --out runs/hf-ddp        # CPU: gloo
    torchrun --nproc_per_node 8 -m lab.scale.ddp_train --model runs/hf --out runs/hf-ddp        # GPUs: nccl

The model is transformers' GPT2LMHeadModel (or LlamaForCausalLM & co.) loaded from the directory `python -m lab export` wrote; the data is the
same bundled corpus, encoded by the same tokenizer (lab_tokenizer.json), split as lab splits it. Every process
draws its own random batches (seeded by rank); DDP averages the gradients. The result is saved in the same layout,
with the tokenizer files, so `python -m lab import` brings it back. No communication code here: DDP does it all.
"""
import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from transformers import AutoModelForCausalLM

from lab.checkpoint import load_tokenizer
from lab.data import get_batch, load_corpus, train_val_split
from lab.io import atomic_files

TOKENIZER_FILES = ("lab_tokenizer.json", "tokenizer.json", "tokenizer_config.json")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="directory written by `python -m lab export`")
    p.add_argument("--out", required=True, help="where rank 0 saves the trained model")
    p.add_argument("--corpus", default="kjv", help="bundled corpus name or a text file (default kjv)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=12, help="sequences per process per step")
    p.add_argument("--block-size", type=int, default=0, help="tokens per sequence (default: GPT-2's n_positions, "
                                                             "a Llama model's max_position_embeddings)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--metrics", help="JSON file for the loss curve and throughput (rank 0)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32, as lab trains

    tokenizer = load_tokenizer(Path(args.model) / "lab_tokenizer.json")
    train_ids, val_ids = train_val_split(tokenizer.encode(load_corpus(args.corpus)), 0.1)
    model = AutoModelForCausalLM.from_pretrained(args.model, use_safetensors=True).to(device)  # never a pickle
    # a Llama model's max_position_embeddings is its longest context, not a training length
    block = args.block_size or getattr(model.config, "n_positions", None) or model.config.max_position_embeddings
    ddp = DDP(model, device_ids=[local_rank] if cuda else None)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    rng = np.random.default_rng(args.seed + 1000 * rank)  # every process its own batches

    def batch(ids, generator):
        x, y = get_batch(ids, args.batch_size, block, generator)
        return torch.from_numpy(x).long().to(device), torch.from_numpy(y).long().to(device)

    @torch.no_grad()
    def val_loss():
        model.eval()
        eval_rng = np.random.default_rng(12345)  # the same batches on every rank and every call
        total = 0.0
        for _ in range(args.eval_batches):
            x, y = batch(val_ids, eval_rng)
            logits = model(x).logits
            total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()).item()
        model.train()
        return total / args.eval_batches

    model.train()
    history = {"world_size": world, "device": str(device), "batch_size_per_process": args.batch_size,
               "block_size": block, "val_loss_before": val_loss(), "losses": []}
    if cuda:
        torch.cuda.synchronize()
    t0, timed_from = time.perf_counter(), min(5, args.steps - 1)
    for step in range(args.steps):
        if step == timed_from:  # the first steps include DDP's bucket setup and kernel warm-up
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        x, y = batch(train_ids, rng)
        logits = ddp(x).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()  # DDP all-reduces (averages) the gradients here
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        history["losses"].append(loss.item())
        if rank == 0 and (step % 20 == 0 or step == args.steps - 1):
            print(f"step {step}: loss {loss.item():.4f}", flush=True)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    timed_steps = args.steps - timed_from
    history["tokens_per_s"] = timed_steps * world * args.batch_size * block / seconds
    history["val_loss_after"] = val_loss()
    if rank == 0:
        out = Path(args.out)
        model.save_pretrained(out)
        with atomic_files(out) as files:   # whole or not at all, like the model files transformers just wrote
            for name in TOKENIZER_FILES:
                if (Path(args.model) / name).is_file():
                    shutil.copyfile(Path(args.model) / name, files.path(name))
        print(f"{world} process(es) on {device.type}: {history['tokens_per_s']:,.0f} tokens/s; val loss "
              f"{history['val_loss_before']:.4f} -> {history['val_loss_after']:.4f}; saved {out}", flush=True)
        if args.metrics:
            Path(args.metrics).write_text(json.dumps(history, indent=2))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
