"""Nothing lab loads executes code, and nothing it writes lands outside the directory it was given."""
import ast
import pickle
from dataclasses import replace
from pathlib import Path

import pytest

import lab
from lab import lora
from lab.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from lab.data import CharTokenizer
from lab.models import PRESETS, TransformerLM
from lab.scale import export_checkpoint, import_model

PACKAGE = Path(lab.__file__).resolve().parent
# modules and calls that can execute code from data
FORBIDDEN_MODULES = {"pickle", "cPickle", "dill", "marshal", "shelve", "joblib"}
FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__"}


def test_no_code_executing_loaders_in_the_package():
    found = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                found += [f"{path.name}: import {n}" for n in names if n.split(".")[0] in FORBIDDEN_MODULES]
            elif isinstance(node, ast.Call):
                fn = node.func
                name = fn.id if isinstance(fn, ast.Name) else fn.attr if isinstance(fn, ast.Attribute) else ""
                if isinstance(fn, ast.Name) and name in FORBIDDEN_CALLS:  # the builtins (model.eval() is fine)
                    found.append(f"{path.name}:{node.lineno}: {name}()")
                if name in ("load", "torch_load") and any(k.arg == "allow_pickle" for k in node.keywords):
                    found.append(f"{path.name}:{node.lineno}: load(allow_pickle=...)")
                if name == "from_pretrained" and not any(k.arg == "use_safetensors" for k in node.keywords) \
                        and isinstance(fn, ast.Attribute) and getattr(fn.value, "id", "") == "GPT2LMHeadModel":
                    found.append(f"{path.name}:{node.lineno}: transformers from_pretrained without use_safetensors")
    assert not found, found


class _Payload:
    """Unpickling this writes a marker file: proof that a loader executed code from a file."""
    marker = None

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def _checkpoint(d):
    tok = CharTokenizer("abcdef")
    lab.manual_seed(0)
    model = TransformerLM(replace(PRESETS["tiny"], vocab_size=6, block_size=8, n_layer=1, n_head=2, n_embd=8))
    save_checkpoint(d, model, tok)
    return model


def test_pickled_weights_are_never_loaded(tmp_path, numpy_backend):
    marker = tmp_path / "marker"
    _Payload.marker = str(marker)
    with lab.engine.backend.using_backend(numpy_backend):
        _checkpoint(tmp_path / "ck")
        (tmp_path / "ck" / "model.safetensors").unlink()
        for name in ("pytorch_model.bin", "model.pt", "model.pkl"):
            (tmp_path / "ck" / name).write_bytes(pickle.dumps(_Payload()))
        # (refused by name, with how to convert: never unpickled)
        with pytest.raises(CheckpointError, match="pytorch_model.bin: PyTorch pickle weights are not loaded"):
            load_checkpoint(tmp_path / "ck")
        # a pickle under the expected name is not a safetensors file, and is refused as one
        (tmp_path / "ck" / "model.safetensors").write_bytes(pickle.dumps(_Payload()))
        with pytest.raises(CheckpointError, match="not a readable safetensors file"):
            load_checkpoint(tmp_path / "ck")
        export_dir = tmp_path / "hf"
        export_dir.mkdir()
        (export_dir / "config.json").write_text((tmp_path / "ck" / "config.json").read_text())
        (export_dir / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload()))
        with pytest.raises(CheckpointError):
            import_model(export_dir)
    assert not marker.exists()


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_saves_write_only_inside_the_directory_given(tmp_path, numpy_backend):
    """Every writer leaves exactly its target behind in the parent directory (the temporary sibling it writes
    first is renamed into place or removed)."""
    with lab.engine.backend.using_backend(numpy_backend):
        parent = tmp_path / "runs"
        parent.mkdir()
        model = _checkpoint(parent / "ck")
        assert _tree(parent) == ["ck"] + [f"ck/{n}" for n in sorted(p.name for p in (parent / "ck").iterdir())]
        before = set(_tree(parent))
        model.save_pretrained(parent / "hf-model", format="hf")
        export_checkpoint(parent / "ck", parent / "export")
        lora.apply(model, r=2, alpha=4)
        lora.save_adapter(model, parent / "adapter")
        tops = {p.split("/")[0] for p in set(_tree(parent)) - before}
        assert tops == {"hf-model", "export", "adapter"}
        # a save over an existing checkpoint replaces it, leaving nothing else behind
        save_checkpoint(parent / "ck", model, CharTokenizer("abcdef"))
        assert sorted(p.name for p in parent.iterdir()) == ["adapter", "ck", "export", "hf-model"]
