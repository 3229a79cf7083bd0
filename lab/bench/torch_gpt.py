"""The same GPT in PyTorch eager (nanoGPT's structure), for side-by-side training throughput."""
import math

import torch
from torch import nn
from torch.nn import functional as F


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.n_head = c.n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(c.n_embd), nn.LayerNorm(c.n_embd)
        self.c_attn, self.c_proj = nn.Linear(c.n_embd, 3 * c.n_embd), nn.Linear(c.n_embd, c.n_embd)
        self.c_fc, self.mlp_proj = nn.Linear(c.n_embd, 4 * c.n_embd), nn.Linear(4 * c.n_embd, c.n_embd)
        self.dropout = c.dropout

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0)
        x = x + F.dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C)), self.dropout, self.training)
        h = F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh")
        return x + F.dropout(self.mlp_proj(h), self.dropout, self.training)


class TorchGPT(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(c.vocab_size, c.n_embd), nn.Embedding(c.block_size, c.n_embd)
        self.h = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.n_embd)
        self.dropout = c.dropout
        for p in self.parameters():
            if p.ndim >= 2:
                nn.init.normal_(p, 0.0, 0.02)

    def forward(self, idx, targets):
        T = idx.shape[1]
        x = F.dropout(self.wte(idx) + self.wpe(torch.arange(T, device=idx.device)), self.dropout, self.training)
        for block in self.h:
            x = block(x)
        logits = self.ln_f(x) @ self.wte.weight.T
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))


def make_optimizer(model, lr, weight_decay, betas):
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas)


def seconds_per_step(cfg, batch_size, steps, device, batches):
    """Mean seconds per training step (forward, backward, clipping, AdamW) after warm-up steps."""
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 against fp32
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    model = TorchGPT(cfg).to(device)
    return timed_steps(model, lambda x, y: model(x, y), steps, device, batches)


def train_step(model, opt, loss_of, x, y):
    """One step as bench train times it: loss_of(x, y), its gradients, their norm clipped to 1, opt's update."""
    loss = loss_of(x, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss


def timed_steps(model, loss_of, steps, device, batches, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.99)):
    """Mean seconds per step of AdamW training with loss_of(x, y) over `batches` (cycled) after three warm-up
    steps, and the last loss."""
    opt = make_optimizer(model, lr, weight_decay, betas)
    data = [(torch.from_numpy(x.astype("int64")).to(device), torch.from_numpy(y.astype("int64")).to(device))
            for x, y in batches]

    def step(i):
        return train_step(model, opt, loss_of, *data[i % len(data)])

    for i in range(3):
        step(i).item()
    import time
    t = time.perf_counter()
    for i in range(steps):
        loss = step(i)
    loss.item()
    return (time.perf_counter() - t) / steps, math.nan if loss is None else loss.item()
