#!/usr/bin/env bash
# DDP scaling of the exported shakespeare-char model: tokens/s on 1 and on all GPUs of this host, same batch per GPU.
# Usage (on a GPU host with torch and transformers): bash benchmarks/ddp_scaling.sh [steps] [batch per GPU]
set -euo pipefail
steps="${1:-60}"; batch="${2:-64}"
work="$(mktemp -d)"
export NCCL_NVLS_ENABLE=0   # NVLink multicast off (not available on every host)
LAB_BACKEND=numpy python3 - "$work" <<'PY'
import sys
from dataclasses import replace
import lab
from lab.checkpoint import save_checkpoint
from lab.data import CharTokenizer, load_corpus
from lab.models import PRESETS, TransformerLM
tok = CharTokenizer.from_text(load_corpus())
lab.manual_seed(0)
save_checkpoint(f"{sys.argv[1]}/ck", TransformerLM(replace(PRESETS["shakespeare-char"], vocab_size=tok.vocab_size)), tok)
PY
python3 -m lab export --checkpoint "$work/ck" --out "$work/hf" >/dev/null
gpus="$(python3 -c 'import torch; print(torch.cuda.device_count())')"
for n in 1 "$gpus"; do
    torchrun --standalone --nproc_per_node "$n" -m lab.scale.ddp_train --model "$work/hf" --out "$work/ddp-$n" \
        --steps "$steps" --batch-size "$batch" --metrics "$work/ddp-$n.json" 2>&1 | grep -E "process|error|Error" || true
done
python3 - "$work" "$gpus" <<'PY'
import json, sys
one = json.load(open(f"{sys.argv[1]}/ddp-1.json"))
n = int(sys.argv[2])
many = json.load(open(f"{sys.argv[1]}/ddp-{n}.json"))
eff = many["tokens_per_s"] / (n * one["tokens_per_s"])
print(f"DDP shakespeare-char, batch {one['batch_size_per_process']} x {one['block_size']} per GPU: "
      f"1 GPU {one['tokens_per_s']:,.0f} tokens/s; {n} GPUs {many['tokens_per_s']:,.0f} tokens/s; "
      f"scaling efficiency {eff:.2f}")
PY
