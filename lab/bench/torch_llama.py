"""The same Llama-family model in PyTorch eager: transformers' LlamaForCausalLM (Qwen2, Mistral) built from a lab
LlamaConfig with lab's weights, for side-by-side training throughput."""
import torch
from torch.nn import functional as F

from .torch_gpt import timed_steps


def torch_llama(cfg, weights, device):
    """transformers' model of cfg's architecture, eager attention, float32, holding `weights` (lab's hf_weights():
    the same initial weights as the lab model; None keeps transformers' own initialization)."""
    import transformers
    hf = transformers.AutoConfig.for_model(**cfg.to_hf())
    model = transformers.AutoModelForCausalLM.from_config(hf, attn_implementation="eager").float()
    if weights is None:
        return model.to(device).train()
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=False)
    tied = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:   # every weight lab has, under transformers' names
        raise ValueError(f"lab's weights do not match transformers' {hf.architectures[0]}: missing {missing}, "
                         f"unexpected {unexpected}")
    return model.to(device).train()


def targets_loss(model):
    """loss_of(x, y) for timed_steps: the cross-entropy of the model's logits and lab's targets."""
    def loss_of(x, y):   # lab's targets are the next tokens already: no shift (transformers' labels= would)
        logits = model(input_ids=x, use_cache=False).logits
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1))
    return loss_of


def seconds_per_step(cfg, weights, steps, device, batches, lr, weight_decay, betas):
    """Mean seconds per training step (forward, the cross-entropy of lab's targets, backward, clipping, AdamW) and
    the first step's loss, before any update (the same weights and batch as lab's first step)."""
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 against fp32
    torch.backends.cudnn.allow_tf32 = False
    model = torch_llama(cfg, weights, device)
    loss_of = targets_loss(model)
    x, y = (torch.from_numpy(a.astype("int64")).to(device) for a in batches[0])
    with torch.no_grad():
        first = loss_of(x, y).item()
    seconds, _ = timed_steps(model, loss_of, steps, device, batches, lr, weight_decay, betas)
    return seconds, first
