"""lab against independent PyTorch code: the GPT-2 layout loads in transformers (both ways) with the same
logits, and a 50-step training run gives the same losses as a plain PyTorch GPT written here, step by step."""
import math
from dataclasses import replace

import numpy as np
import pytest

import lab
from lab.data import CharTokenizer, load_corpus, train_val_split
from lab.models import PRESETS, TransformerLM
from lab.train import TrainConfig, Trainer, cosine_lr

torch = pytest.importorskip("torch", reason="torch is a test extra (scripts/test.sh installs it)")


def _perturbed_model(cfg):
    """A model whose LayerNorm gains and biases are not at their init values, so a mix-up would show."""
    m = TransformerLM(cfg)
    rng = np.random.default_rng(1)
    m.load_state_dict({n: p.numpy() + rng.normal(0, 0.1, p.shape).astype(np.float32) for n, p in m.named_parameters()})
    return m.eval()


def test_exported_model_loads_in_transformers_with_the_same_logits(use_backend, tmp_path):
    transformers = pytest.importorskip("transformers")
    lab.manual_seed(0)
    cfg = replace(PRESETS["tiny"], vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32)
    m = _perturbed_model(cfg)
    m.save_pretrained(tmp_path, format="hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = np.random.default_rng(2).integers(0, 50, (3, 16))
    with torch.no_grad():
        ref = hf(torch.from_numpy(idx)).logits.numpy()
    with lab.no_grad():
        np.testing.assert_allclose(m(idx).numpy(), ref, atol=1e-4)


def test_gpt2_saved_by_transformers_loads_in_lab_with_the_same_logits(use_backend, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)).eval()
    hf.save_pretrained(tmp_path)
    m = TransformerLM.from_pretrained(tmp_path)
    idx = np.random.default_rng(3).integers(0, 50, (2, 16))
    with torch.no_grad():
        ref = hf(torch.from_numpy(idx)).logits.numpy()
    with lab.no_grad():
        np.testing.assert_allclose(m(idx).numpy(), ref, atol=1e-4)


@pytest.mark.parametrize("flags, refused", [
    ({"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False}, None),
    ({"reorder_and_upcast_attn": True}, None),                  # only the order of float32 operations changes
    ({"scale_attn_weights": False}, "scale_attn_weights=false"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=true"),
])
def test_gpt2_scale_attn_flags_match_transformers_or_refused(use_backend, tmp_path, flags, refused):
    from lab.checkpoint import CheckpointError
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0,
        attn_implementation="eager", **flags)).eval()
    hf.save_pretrained(tmp_path)
    if refused:
        with pytest.raises(CheckpointError, match=f"config.json: {refused} is not supported"):
            TransformerLM.from_pretrained(tmp_path)
        return
    m = TransformerLM.from_pretrained(tmp_path)
    idx = np.random.default_rng(3).integers(0, 50, (2, 16))
    with torch.no_grad():
        ref = hf(torch.from_numpy(idx)).logits.numpy()
    with lab.no_grad():
        np.testing.assert_allclose(m(idx).numpy(), ref, atol=1e-4)


class TorchGPT(torch.nn.Module):
    """GPT-2 in plain PyTorch, written from the paper's description, independent of lab's code."""

    def __init__(self, sd, cfg):
        super().__init__()
        self.cfg = cfg
        self.p = torch.nn.ParameterDict({k.replace(".", "_"): torch.nn.Parameter(torch.tensor(v)) for k, v in sd.items()})

    def forward(self, idx, targets):
        c, P = self.cfg, lambda name: self.p[name.replace(".", "_")]
        B, T = idx.shape
        x = P("wte.weight")[idx] + P("wpe.weight")[:T]
        mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
        for i in range(c.n_layer):
            h = f"h.{i}."
            a = torch.nn.functional.layer_norm(x, (c.n_embd,), P(h + "ln_1.weight"), P(h + "ln_1.bias"), 1e-5)
            q, k, v = (a @ P(h + "attn.c_attn.weight") + P(h + "attn.c_attn.bias")).split(c.n_embd, dim=2)
            q, k, v = (t.view(B, T, c.n_head, -1).transpose(1, 2) for t in (q, k, v))
            att = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
            att = att.masked_fill(~mask, float("-inf")).softmax(-1)
            y = (att @ v).transpose(1, 2).reshape(B, T, c.n_embd)
            x = x + y @ P(h + "attn.c_proj.weight") + P(h + "attn.c_proj.bias")
            a = torch.nn.functional.layer_norm(x, (c.n_embd,), P(h + "ln_2.weight"), P(h + "ln_2.bias"), 1e-5)
            a = torch.nn.functional.gelu(a @ P(h + "mlp.c_fc.weight") + P(h + "mlp.c_fc.bias"), approximate="tanh")
            x = x + a @ P(h + "mlp.c_proj.weight") + P(h + "mlp.c_proj.bias")
        x = torch.nn.functional.layer_norm(x, (c.n_embd,), P("ln_f.weight"), P("ln_f.bias"), 1e-5)
        logits = x @ P("wte.weight").T
        return torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))


def test_training_losses_match_plain_pytorch_for_50_steps(use_backend):
    text = load_corpus()[:100_000]
    tok = CharTokenizer.from_text(text)
    train_ids, val_ids = train_val_split(tok.encode(text))
    cfg = replace(PRESETS["tiny"], vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32, block_size=16, dropout=0.0)
    tcfg = TrainConfig(steps=50, batch_size=4, lr=3e-3, warmup_steps=5, grad_clip=1.0, weight_decay=0.1)
    lab.manual_seed(7)
    trainer = Trainer(TransformerLM(cfg), train_ids, val_ids, tcfg)
    batch_rng = np.random.default_rng()
    batch_rng.bit_generator.state = trainer.rng.bit_generator.state  # torch sees the same batches
    tm = TorchGPT(trainer.model.state_dict(), cfg)
    decay = [p for k, p in tm.p.items() if p.ndim >= 2]
    no_decay = [p for k, p in tm.p.items() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=tcfg.lr, betas=tcfg.betas, eps=1e-8)
    from lab.data import get_batch
    ours, theirs = [], []
    for step in range(50):
        ours.append(trainer.train_step()[0].item())
        x, y = get_batch(train_ids, tcfg.batch_size, cfg.block_size, batch_rng)
        loss = tm(torch.from_numpy(x.astype(np.int64)), torch.from_numpy(y.astype(np.int64)))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tm.parameters(), tcfg.grad_clip)
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, tcfg)
        opt.step()
        theirs.append(loss.item())
    np.testing.assert_allclose(ours, theirs, rtol=1e-3)
    assert theirs[-1] < theirs[0] - 0.5, "the run must actually learn for the comparison to mean something"
