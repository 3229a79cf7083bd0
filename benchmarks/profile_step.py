"""Profile one training step of a preset: host recording time, device time, and lab.profile()'s kernel table.
Usage: python benchmarks/profile_step.py PRESET BATCH [LORA_RANK]  (LAB_BACKEND picks the backend; with a rank,
LoRA adapters on c_attn, c_proj and c_fc are trained instead of the whole model)."""
import sys
import time
from dataclasses import replace

import lab
from lab.data import char_dataset
from lab.models import PRESETS, TransformerLM
from lab.train import TrainConfig, Trainer

preset, batch = sys.argv[1], int(sys.argv[2])
tok, train_ids, val_ids = char_dataset()
# as `python -m lab bench train` does: GPT-2 presets keep GPT-2's vocabulary (and its output layer's size)
vocab = max(tok.vocab_size, PRESETS[preset].vocab_size) if preset.startswith("gpt2") else tok.vocab_size
cfg = replace(PRESETS[preset], vocab_size=vocab)
lab.manual_seed(0)
model = TransformerLM(cfg)
if len(sys.argv) > 3:
    from lab import lora
    lora.apply(model, r=int(sys.argv[3]))
trainer = Trainer(model, train_ids, val_ids, TrainConfig(steps=10**9, batch_size=batch))
for _ in range(3):
    trainer.train_step()
lab.sync()
t0 = time.perf_counter()
trainer.train_step()
t1 = time.perf_counter()
lab.sync()
t2 = time.perf_counter()
print(f"{preset} batch {batch}: recording {1e3 * (t1 - t0):.1f} ms, then waiting for the device {1e3 * (t2 - t1):.1f} ms")
with lab.profile() as prof:
    trainer.train_step()
print(prof.table(30))
print(prof.table(30, detail=True))
