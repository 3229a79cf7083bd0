"""Checkpoints: model.safetensors + config.json + tokenizer.json in one directory, each written atomically
(a temporary file in the same directory, then os.replace) so an interrupted save never leaves a torn file."""
import json
import os
import tempfile
from pathlib import Path

from safetensors.numpy import save_file


def _atomic_write(path, write):
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_text(path, text):
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    _atomic_write(path, write)


def save_checkpoint(directory, model, tokenizer, trainer=None):
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = model.state_dict()
    _atomic_write(d / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    config = {"model_type": "lab-transformer", **model.config.to_dict()}
    if trainer is not None:
        config["step"] = trainer.step_num
    _write_text(d / "config.json", json.dumps(config, indent=2))
    _write_text(d / "tokenizer.json", tokenizer.to_json())
