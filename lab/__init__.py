"""lab: train small GPT-style language models on a wgpu (WebGPU) engine, from a notebook or the shell."""
from .engine.backend import backend_reason, get_backend, set_backend
from .engine.random import manual_seed
from .engine.tensor import Tensor, no_grad, ones, tensor, zeros
from .engine import ops as functional
from .engine.ops import concat, split, stack, matmul
from .engine.profile import profile
from .models import LlamaConfig, LlamaLM, PRESETS, ProNeuralConfig, ProNeuralLM, TransformerConfig, TransformerLM
from .data import CharTokenizer, load_corpus
from .data.bpe import BPETokenizer
from .data.pretrained import PretrainedTokenizer, load_tokenizer
from .generate import beam_search, generate
from .chat import chat
from .pretrained import from_pretrained
from . import interp

__version__ = "0.1.0"

_PANELS = ("TrainingPanel", "AttentionHeatmap", "PlanEstimator", "GenerationPanel", "EdgeDiagnosticsPanel",
           "LogitLensPanel", "PatchingPanel")


def __getattr__(name):
    # the panels need anywidget (a notebook's extra), so lab.LogitLensPanel imports lab.widgets on first use only
    if name in _PANELS:
        from . import widgets
        return getattr(widgets, name)
    raise AttributeError(f"module 'lab' has no attribute {name!r}")


def sync():
    """Submit all recorded GPU work and wait until the device has finished it (a no-op on numpy)."""
    get_backend().sync(wait=True)


def stats():
    """Counters of the active backend: dispatches, submits, readbacks, uploads, bytes in use and peak bytes."""
    b = get_backend()
    return dict(backend=b.name, **b.stats())


def device():
    """The wgpu device lab uses: the best adapter (discrete GPU, integrated, then CPU/lavapipe), with its real
    limits and features requested. Returns a dict: device, adapter_type, backend_type, limits, features."""
    from .engine.wgpu import WgpuBackend
    return dict(WgpuBackend.instance().device_info)


def backend_info():
    """The active backend, why it was chosen, and the wgpu device when that is the backend."""
    b = get_backend()
    info = {"backend": b.name, "reason": backend_reason()}
    if b.name == "wgpu":
        info.update(b.device_info)
    elif b.name == "numpy":
        info["blas"] = b.blas   # (what the numpy backend's float32 products run on: lab.engine.blas)
    return info


def selftest(backend=None, verbose=True):
    """Check every op's forward and backward on the active (or given) backend against numpy; raise on failure."""
    from .engine.opcheck import selftest as _selftest
    return _selftest(backend=backend, verbose=verbose)
