"""One causal self-attention forward and backward for the attention tests, on either backend."""
import lab
from lab.engine import ops as F


def attention_run(backend, qkv_np, g_np, H, Hkv=None, p=0.0, rope=None, seed=7):
    """((y, qkv's gradient), {dispatched kernel: its label}) of F.causal_self_attention on the packed qkv_np with
    upstream gradient g_np, dropout p (its masks from lab.manual_seed(seed)), rope: rotary tables (cos, sin) or
    None."""
    lab.manual_seed(seed)
    qkv = lab.tensor(qkv_np, requires_grad=True, backend=backend)
    g = lab.tensor(g_np, backend=backend)
    tables = None if rope is None else tuple(lab.tensor(t, backend=backend) for t in rope)
    with lab.profile(backend) as prof:
        y = F.causal_self_attention(qkv, H, p, n_kv_head=Hkv, rope=tables)
        y.backward(g)
    return (y.numpy(), qkv.grad.numpy()), {name: label for name, label, _ in prof.records}
