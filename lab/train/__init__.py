"""Training: trainer.py (TrainConfig, Trainer: the loop, evaluation, checkpoints, the step lock other threads wait
on), optim.py (SGD, AdamW, clipping, on the device), replay.py (captured steps replayed on wgpu), faults.py
(finding where NaN/Inf first appear).
"""
from .optim import SGD, AdamW, clip_grad_norm_, grad_norm
from .trainer import TrainConfig, Trainer, cosine_lr
