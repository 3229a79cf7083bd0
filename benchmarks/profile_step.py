"""Profile one training step of a preset: host recording time, device time, and lab.profile()'s kernel table.
Usage: python benchmarks/profile_step.py PRESET BATCH [LORA_RANK]  (LAB_BACKEND picks the backend; with a rank,
LoRA adapters (lora.apply's default targets) are trained instead of the whole model)."""
import sys
import time

import lab
from lab.bench.train import _bench_setup
from lab.models import MODELS
from lab.train import TrainConfig, Trainer

preset, batch = sys.argv[1], int(sys.argv[2])
# as `python -m lab bench train` sets the preset up (GPT-2 and Llama presets keep their vocabularies)
cfg, ids, batch, block = _bench_setup(preset, batch, None, None)
lab.manual_seed(0)
model = MODELS[type(cfg)](cfg)
if len(sys.argv) > 3:
    from lab import lora
    lora.apply(model, r=int(sys.argv[3]))
trainer = Trainer(model, ids, ids[:10_000], TrainConfig(steps=10**9, batch_size=batch, block_size=block,
                                                      replay_steps=False))   # (a replayed step is one capture)
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
