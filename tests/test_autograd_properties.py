"""Property test of the autograd engine: random small op graphs against PyTorch in float64.

Each example builds a random expression over a few leaves: elementwise ops (pow and division by a constant too),
broadcasting binaries, reductions over axes (max over exactly tied values: the gradient split as amax splits it),
matmul (batched, transposed), linear (with its fused gelu), reshape/transpose/permute/indexing (strided too)/concat/
stack/split, softmax (causal, scaled), log_softmax, layer_norm and add_layer_norm (the absorbing backward),
embedding, cross_entropy (with ignored targets), dropout (its mask rebuilt for PyTorch from the seed), lora_add and
causal_self_attention. A node of a shape already built is
often reused, so nodes feed several consumers (shared subgraphs). Then, on both lab and PyTorch:
  1. root.backward(g, retain_graph=True) with a random gradient: forward values and every leaf's gradient match;
  2. a second backward from another node of the same graph (shared nodes): the accumulated gradients match;
  3. root.backward(g) again: if the second backward freed a node of root's graph, lab must refuse (and change no
     gradient); otherwise the gradients accumulate as PyTorch's.
Tolerances: float64 lab (numpy backend) within 1e-9: the same arithmetic in another order. float32 lab (eps 1.2e-7)
through graphs of up to ~40 ops whose sums cancel: rtol 2e-4 plus an absolute 2e-4 of the largest reference gradient
of the example (cancellation loses relative precision in the small entries, not in the large ones); wgpu's exp/tanh
are the GPU's (a few ulp worse), covered by the same bound. Inputs of max get a ramp along the reduced axis
(Graph.apart): which of two copies of a value is larger is decided by rounding, not by the engine.
"""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from hypothesis import HealthCheck, given, settings, strategies as st

import lab
from lab.engine import ops

TOL = {"float32": 2e-4, "float64": 1e-9}
# examples of the float32 numpy test (1000 in CI); the float64 one runs 2/3 of it, wgpu 1/5 (lavapipe is slow)
EXAMPLES = int(os.environ.get("LAB_AUTOGRAD_EXAMPLES", 1000))

UNARY = {
    "neg": (lambda a: -a, lambda t: -t),
    "relu": (lambda a: a.relu(), lambda t: torch.relu(t)),
    "tanh": (lambda a: a.tanh(), lambda t: t.tanh()),
    "exp": (lambda a: a.tanh().exp(), lambda t: t.tanh().exp()),          # tanh first: exp stays bounded
    "gelu": (lambda a: a.gelu(), lambda t: TF.gelu(t, approximate="tanh")),
    "log": (lambda a: (a * a + 0.5).log(), lambda t: (t * t + 0.5).log()),  # of a positive value
    "sqrt": (lambda a: (a * a + 0.5).sqrt(), lambda t: (t * t + 0.5).sqrt()),
    "pow": (lambda a: a ** 3, lambda t: t ** 3),
    "affine": (lambda a: a * 1.7 + 0.3, lambda t: t * 1.7 + 0.3),
    "rsub": (lambda a: 0.5 - a, lambda t: 0.5 - t),
    "rdiv": (lambda a: 1.0 / (a * a + 0.5), lambda t: 1.0 / (t * t + 0.5)),
    "div": (lambda a: a / -2.5, lambda t: t / -2.5),
    "pow-1.5": (lambda a: (a * a + 0.5) ** -1.5, lambda t: (t * t + 0.5) ** -1.5),
    "pow0": (lambda a: a ** 0, lambda t: t ** 0),
    "softmax": (lambda a: a.softmax(), lambda t: torch.softmax(t, -1)),
    "log_softmax": (lambda a: a.log_softmax(), lambda t: torch.log_softmax(t, -1)),
}
BINARY = {
    "add": (lambda a, b: a + b, lambda s, t: s + t),
    "sub": (lambda a, b: a - b, lambda s, t: s - t),
    "mul": (lambda a, b: a * b, lambda s, t: s * t),
    "div": (lambda a, b: a / (b * b + 0.5), lambda s, t: s / (t * t + 0.5)),
    # b shifted: two nodes of equal values (constants) tie only to an ulp in PyTorch (see Graph.apart)
    "maximum": (lambda a, b: a.maximum(b + 0.0371), lambda s, t: torch.maximum(s, t + 0.0371)),
}
NEEDS_AXIS = {"softmax", "log_softmax"}  # and a last axis longer than 1: over one element they are constants
_TORCH = {"max": "amax"}


class Graph:
    """Builds a random graph twice, in lab (float32) and in PyTorch (float64, the same starting values)."""

    def __init__(self, rng, dtype="float32"):
        self.rng, self.dtype = rng, dtype
        self.leaves, self.pool = [], {}

    def pick(self, options):
        return options[self.rng.integers(len(options))]

    def int(self, lo, hi):
        return int(self.rng.integers(lo, hi + 1))

    def flip(self):
        return bool(self.rng.integers(2))

    def node(self, shape, depth):
        shape = tuple(shape)
        if self.pool.get(shape) and self.int(0, 2) == 0:  # reuse: a node with several consumers
            return self.pick(self.pool[shape])
        kinds = ["leaf"] if depth <= 0 else ["unary", "binary", "reduce", "reshape", "index", "join", "fused"]
        if depth > 0 and len(shape) >= 2:
            kinds += ["matmul", "transpose"]
        if depth > 0 and shape and shape[-1] >= 2:
            kinds += ["linear", "layer_norm", "concat"]
        out = getattr(self, self.pick(kinds))(shape, depth - 1)
        self.pool.setdefault(shape, []).append(out)
        return out

    def leaf(self, shape, depth=0):
        v = self.rng.uniform(-1.5, 1.5, size=shape).astype(np.float32)
        pair = (lab.tensor(v, requires_grad=True, dtype=self.dtype),
                torch.tensor(v.astype(np.float64), requires_grad=True))
        self.leaves.append(pair)
        return pair

    def unary(self, shape, depth):
        names = [n for n in UNARY if (shape and shape[-1] > 1) or n not in NEEDS_AXIS]
        f, g = UNARY[self.pick(names)]
        a, t = self.node(shape, depth)
        return f(a), g(t)

    def binary(self, shape, depth):
        x = self.node(shape, depth)
        # the other operand broadcasts: leading dims dropped, some dims 1
        cut = self.int(0, len(shape))
        sub = tuple(1 if self.flip() else s for s in shape[cut:])
        y = self.node(sub, depth)
        name = self.pick(list(BINARY))
        if name in ("sub", "maximum") and y is x:
            name = "add"  # x - x is all zeros and max(x, x) all ties: both fine, but they make later max() ties
        if self.flip():
            x, y = y, x
        f, g = BINARY[name]
        return f(x[0], y[0]), g(x[1], y[1])

    def tied_max(self, shape):
        """max of a leaf whose values repeat exactly (drawn from three): both sides see the same ties, and each
        tie gets an even share of the gradient."""
        ax = self.int(0, len(shape)) if shape and self.flip() else None
        src = shape[:ax] + (self.int(2, 4),) + shape[ax:] if ax is not None else (self.int(2, 3),) * (len(shape) or 1)
        v = self.rng.choice(np.array([-1.0, 0.5, 1.0], dtype=np.float32), size=src)
        pair = (lab.tensor(v, requires_grad=True, dtype=self.dtype), torch.tensor(v.astype(np.float64), requires_grad=True))
        self.leaves.append(pair)
        if ax is None:
            if shape:
                return self.leaf(shape)
            return pair[0].max(axis=None), pair[1].amax()
        return pair[0].max(axis=ax), pair[1].amax(dim=ax)

    def reduce(self, shape, depth):
        if self.int(0, 4) == 0:
            return self.tied_max(shape)
        op = self.pick(["sum", "mean", "max"])
        k = self.int(2, 3)
        ones = [i for i, s in enumerate(shape) if s == 1]
        if ones and self.flip():  # keepdims: the 1 was the reduced axis
            ax = self.pick(ones)
            src = shape[:ax] + (k,) + shape[ax + 1:]
            a, t = self.apart(self.node(src, depth), ax) if op == "max" else self.node(src, depth)
            return getattr(a, op)(axis=ax, keepdims=True), getattr(t, _TORCH.get(op, op))(dim=ax, keepdim=True)
        if len(shape) >= 3:
            return self.leaf(shape)
        ax = self.int(0, len(shape))
        a, t = self.node(shape[:ax] + (k,) + shape[ax:], depth)
        if op == "max":
            a, t = self.apart((a, t), ax)
            if not shape and self.flip():
                return a.max(axis=None), t.amax()
        return getattr(a, op)(axis=ax), getattr(t, _TORCH.get(op, op))(dim=ax)

    @staticmethod
    def apart(pair, axis):
        """pair plus a ramp along `axis`: copies of one value (concat(x, x), broadcasting) would tie exactly in
        lab but only to an ulp in PyTorch, whose vectorized loops round equal inputs differently by position."""
        a, t = pair
        k = a.shape[axis]
        ramp = np.linspace(0.0, 0.25, k).reshape((k,) + (1,) * (a.ndim - axis - 1)).astype(np.float32)
        return a + ramp, t + torch.tensor(ramp, dtype=torch.float64)

    def reshape(self, shape, depth):
        size = int(np.prod(shape))
        options = [s for s in [(size,), tuple(reversed(shape)), shape + (1,)] if s != shape and len(s) <= 3]
        if not options:
            return self.leaf(shape)
        a, t = self.node(self.pick(options), depth)
        return a.reshape(shape), t.reshape(shape)

    def transpose(self, shape, depth):
        if len(shape) == 3 and self.flip():
            perm = self.pick([(1, 2, 0), (2, 0, 1), (1, 0, 2)])
            inv = tuple(int(i) for i in np.argsort(perm))
            a, t = self.node(tuple(shape[i] for i in inv), depth)
            return a.permute(perm), t.permute(perm)
        a, t = self.node(shape[:-2] + (shape[-1], shape[-2]), depth)
        return a.transpose(-2, -1), t.transpose(-2, -1)

    def index(self, shape, depth):
        if shape and self.flip():
            a, t = self.node((shape[0] + 1,) + shape[1:], depth)
            return a[1:], t[1:]
        if len(shape) >= 3:
            return self.leaf(shape)
        a, t = self.node((2,) + shape, depth)
        return a[1], t[1]

    def join(self, shape, depth):
        """stack, split, or a strided slice."""
        if not shape:
            return self.leaf(shape)
        ax = self.int(0, len(shape) - 1)
        how = self.pick(["stack", "split", "stride"])
        if how == "stack":
            sub = shape[:ax] + shape[ax + 1:]
            parts = [self.node(sub, depth) for _ in range(shape[ax])]
            return lab.stack([p[0] for p in parts], axis=ax), torch.stack([p[1] for p in parts], dim=ax)
        if how == "split":
            extra = self.int(1, 2)
            a, t = self.node(shape[:ax] + (shape[ax] + extra,) + shape[ax + 1:], depth)
            sizes, k = ([shape[ax], extra], 0) if self.flip() else ([extra, shape[ax]], 1)
            return lab.split(a, sizes, axis=ax)[k], torch.split(t, sizes, dim=ax)[k]
        a, t = self.node((2 * shape[0],) + shape[1:], depth)
        return a[1::2], t[1::2]

    def fused(self, shape, depth):
        """The model's ops: embedding, cross_entropy, causal softmax, dropout, lora_add, causal_self_attention."""
        options = ["dropout"]
        if shape:
            options += ["embedding", "lora"]
        else:
            options += ["cross_entropy"]
        if len(shape) >= 2 and shape[-1] == shape[-2]:
            options.append("causal")
        if len(shape) == 3:
            options.append("attention")
        how = self.pick(options)
        if how == "dropout":
            from lab.engine.numpy_backend import dropout_keep_mask
            a, t = self.node(shape, depth)
            p, seed = 0.3, self.int(0, 2 ** 31)
            keep = dropout_keep_mask(int(np.prod(shape)), p, seed).reshape(shape).astype(np.float64)
            return ops.dropout(a, p, seed=seed), t * torch.tensor(keep) / (1 - p)
        if how == "embedding":
            V = self.int(2, 4)
            idx = self.rng.integers(0, V, size=shape[:-1])
            w, tw = self.node((V, shape[-1]), depth)
            return ops.embedding(idx, w), TF.embedding(torch.tensor(idx, dtype=torch.long), tw)
        if how == "cross_entropy":
            lead, V = self.pick([(), (3,), (2, 2)]), self.int(2, 4)
            x, t = self.node(lead + (V,), depth)
            target = self.rng.integers(0, V, size=lead)
            if lead and self.flip():  # some targets ignored (never all: PyTorch's mean over none is NaN)
                target.reshape(-1)[: target.size - 1] = np.where(self.rng.random(target.size - 1) < 0.5, -100,
                                                                 target.reshape(-1)[: target.size - 1])
            want = TF.cross_entropy(t.reshape(-1, V), torch.tensor(target.reshape(-1), dtype=torch.long),
                                    ignore_index=-100)
            return ops.cross_entropy(x, target), want
        if how == "causal":
            T, scale = shape[-1], self.pick([1.0, 0.5])
            a, t = self.node(shape, depth)
            mask = torch.triu(torch.full((T, T), float("-inf"), dtype=torch.float64), 1)
            return ops.softmax(a, scale=scale, causal=True), torch.softmax(t * scale + mask, -1)
        if how == "lora":
            N, K, r, scale = shape[-1], self.int(1, 3), self.int(1, 2), self.pick([0.5, 2.0])
            base, x = self.node(shape, depth), self.node(shape[:-1] + (K,), depth)
            A, Bm = self.node((r, K), depth), self.node((N, r), depth)
            want = base[1] + scale * (x[1] @ A[1].T) @ Bm[1].T
            return ops.lora_add(base[0], x[0], A[0], Bm[0], scale), want
        Bsz, T, C = shape  # attention: heads of C // H from the packed (B, T, 3C) projection
        H = self.pick([h for h in (1, 2, 3) if C % h == 0])
        qkv, tq = self.node((Bsz, T, 3 * C), depth)
        q, k, v = (x.reshape(Bsz, T, H, C // H).transpose(1, 2) for x in tq.split(C, -1))
        want = TF.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(Bsz, T, C)
        return ops.causal_self_attention(qkv, H), want

    def concat(self, shape, depth):
        ax = len(shape) - 1
        first = self.int(1, shape[ax] - 1)
        x = self.node(shape[:ax] + (first,), depth)
        y = self.node(shape[:ax] + (shape[ax] - first,), depth)
        return ops.concat([x[0], y[0]], axis=ax), torch.cat([x[1], y[1]], dim=ax)

    def matmul(self, shape, depth):
        *lead, m, n = shape
        lead, k = tuple(lead), self.int(1, 3)
        a_lead, b_lead = self.pick([(lead, ()), (lead, lead), ((), lead)] if lead else [((), ())])
        a = self.node(a_lead + (m, k), depth)
        if self.flip():
            b = self.node(b_lead + (n, k), depth)
            return ops.matmul(a[0], b[0], transpose_b=True), a[1] @ b[1].transpose(-2, -1)
        b = self.node(b_lead + (k, n), depth)
        return a[0] @ b[0], a[1] @ b[1]

    def linear(self, shape, depth):
        n, k = shape[-1], self.int(1, 3)
        x, w = self.node(shape[:-1] + (k,), depth), self.node((k, n), depth)
        bias = self.node((n,), depth) if self.flip() else None
        act = self.pick([None, "gelu"])
        out = ops.linear(x[0], w[0], None if bias is None else bias[0], activation=act)
        want = x[1] @ w[1] + (0 if bias is None else bias[1])
        return out, TF.gelu(want, approximate="tanh") if act else want

    def layer_norm(self, shape, depth):
        c = shape[-1]
        x, w, b = self.node(shape, depth), self.node((c,), depth), self.node((c,), depth)
        # a near-constant row (concat(x, x)) makes layer_norm ill-conditioned: float32 rounding grows by 1/spread.
        # A ramp (a numpy array: lifted to a tensor) steeper than x's own spread keeps rows apart
        spread = max(1.0, 2 * float(x[1].detach().abs().max())) if x[1].numel() else 1.0
        ramp = (np.linspace(-1.0, 1.0, c) * spread).astype(np.float32)
        x = (x[0] + ramp, x[1] + torch.tensor(ramp, dtype=torch.float64))
        if self.flip():
            return ops.layer_norm(x[0], w[0], b[0]), TF.layer_norm(x[1], (c,), w[1], b[1], eps=1e-5)
        y = self.node(shape, depth)
        s, h = ops.add_layer_norm(x[0], y[0], w[0], b[0])
        ts = x[1] + y[1]
        self.pool.setdefault(shape, []).append((s, ts))  # the sum feeds later nodes too: its gradient is absorbed
        return h, TF.layer_norm(ts, (c,), w[1], b[1], eps=1e-5)


def _close(got, want, what, tol, scale=0.0):
    want = want.detach().numpy() if isinstance(want, torch.Tensor) else want
    scale = max(1.0, scale, float(np.abs(want).max()) if want.size else 0.0)
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * scale, err_msg=what)


def _graph_nodes(t):
    """ids of the non-leaf nodes of t's graph (walked before a backward frees it)."""
    seen, stack = set(), [t]
    while stack:
        n = stack.pop()
        if n._backward is not None and id(n) not in seen:
            seen.add(id(n))
            stack.extend(n._parents)
    return seen


def _torch_backward(g, t, grad=None, retain_graph=False):
    t.backward(grad, retain_graph=retain_graph)
    for _, leaf in g.leaves:  # PyTorch may leave two leaves' .grad in one storage, and its next backward adds in
        if leaf.grad is not None:  # place: both would then count each other's share (seen as 2x gradients)
            leaf.grad = leaf.grad.clone()


def _check_grads(g, what, tol):
    # a gradient that cancels to ~0 (a shift into a layer_norm) is a sum of the others' size: their scale applies
    scale = max([float(t.grad.abs().max()) for _, t in g.leaves if t.grad is not None and t.grad.numel()] + [0.0])
    for i, (a, t) in enumerate(g.leaves):
        if t.grad is None:
            assert a.grad is None, f"{what}: leaf {i} got a gradient PyTorch does not give it"
        else:
            assert a.grad is not None, f"{what}: leaf {i} got no gradient"
            assert a.grad.dtype == a.dtype, f"{what}: leaf {i} is {a.dtype}, its gradient {a.grad.dtype}"
            _close(a.grad.numpy(), t.grad, f"{what}: leaf {i} {tuple(t.shape)}", tol, scale)
    # no two leaves share gradient memory: clipping and the optimizers scale each .grad in place, once
    storages = [id(a.backend.storage(a.grad.data)) for a, _ in g.leaves if a.grad is not None]
    assert len(storages) == len(set(storages)), f"{what}: two leaves' gradients share one array"


def _run(seed, dtype="float32"):
    rng = np.random.default_rng(seed)
    g = Graph(rng, dtype)
    tol = TOL[dtype]
    shape = g.pick([(2, 3), (3,), (2, 2, 3), (1, 3), (3, 1), ()])
    root, troot = g.node(shape, g.int(1, 6))
    _close(root.numpy(), troot, "forward", tol)
    if not troot.requires_grad:
        return
    gv = rng.standard_normal(shape).astype(np.float32)
    root_nodes = _graph_nodes(root)
    root.backward(gv, retain_graph=True)                         # 1. a given gradient, graph kept
    _torch_backward(g, troot, torch.tensor(gv, dtype=torch.float64), retain_graph=True)
    _check_grads(g, "first backward", tol)

    other, tother = g.pick([p for ps in g.pool.values() for p in ps])  # 2. another loss through shared nodes
    other_nodes = _graph_nodes(other)
    (other * other).sum().backward()
    _torch_backward(g, (tother * tother).sum())
    _check_grads(g, "second backward (shared nodes)", tol)

    before = [None if a.grad is None else a.grad.numpy() for a, _ in g.leaves]
    if root_nodes & other_nodes:                                 # 3. the second call freed part of root's graph
        with pytest.raises(RuntimeError, match="already freed"):
            root.backward(gv)
        for (a, _), b in zip(g.leaves, before):
            assert (a.grad is None) == (b is None) and (b is None or np.array_equal(a.grad.numpy(), b))
    else:
        root.backward(gv)
        _torch_backward(g, troot, torch.tensor(gv, dtype=torch.float64))
        _check_grads(g, "third backward (graph retained)", tol)


COMMON = dict(derandomize=True, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                       HealthCheck.too_slow])


@settings(max_examples=EXAMPLES, **COMMON)
@given(seed=st.integers(0, 2 ** 32 - 1))  # the seed decides the whole graph and its values
def test_random_graphs_match_pytorch_numpy(numpy_backend, seed):
    with _active(numpy_backend):
        _run(seed)


@settings(max_examples=max(1, EXAMPLES * 2 // 3), **COMMON)
@given(seed=st.integers(0, 2 ** 32 - 1))
def test_random_graphs_match_pytorch_numpy_float64(numpy_backend, seed):
    """float64 on both sides: any gradient that loses precision on the way (a float32 buffer) shows at 1e-9."""
    with _active(numpy_backend):
        _run(seed, "float64")


@settings(max_examples=max(1, EXAMPLES // 5), **COMMON)
@given(seed=st.integers(0, 2 ** 32 - 1))
def test_random_graphs_match_pytorch_wgpu(wgpu_backend, seed):
    with _active(wgpu_backend):
        _run(seed)


class _active:
    """Make a backend the active one for a block (the fixtures are session-scoped; hypothesis runs many examples)."""

    def __init__(self, backend):
        self.backend = backend

    def __enter__(self):
        from lab.engine import backend as B
        self.prev = dict(B._state)
        B._state["backend"], B._state["reason"] = self.backend, "test"

    def __exit__(self, *exc):
        from lab.engine import backend as B
        B._state.update(self.prev)
