"""Training: optimizers, learning-rate schedule, the training loop."""
from .optim import SGD, AdamW, clip_grad_norm_, grad_norm
from .trainer import TrainConfig, Trainer, cosine_lr
