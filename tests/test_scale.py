"""Scale-out path: export to the GPT-2 layout, continue training with PyTorch DDP (torchrun, gloo), import back."""
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import lab
from lab import lora
from lab.checkpoint import save_checkpoint
from lab.data import CharTokenizer, load_corpus
from lab.models import PRESETS, TransformerLM
from lab.scale import export_checkpoint, import_model

ROOT = Path(__file__).resolve().parents[1]


def _checkpoint(path, seed=0):
    tok = CharTokenizer.from_text(load_corpus())
    lab.manual_seed(seed)
    model = TransformerLM(replace(PRESETS["tiny"], vocab_size=tok.vocab_size, block_size=32, n_layer=2, n_head=2,
                                  n_embd=32)).eval()
    save_checkpoint(path, model, tok)
    return model, tok


def _logits(model, idx):
    with lab.no_grad():
        return model(idx).numpy()


def test_export_import_round_trip_keeps_logits_and_tokenizer(tmp_path, numpy_backend):
    model, tok = _checkpoint(tmp_path / "ck")
    out = export_checkpoint(tmp_path / "ck", tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["model_type"] == "gpt2"
    back, tok2 = import_model(out, out=tmp_path / "back")
    idx = tok.encode("In the beginning God created")[None]
    np.testing.assert_allclose(_logits(back, idx), _logits(model, idx), rtol=1e-5, atol=1e-5)
    assert tok2.chars == tok.chars
    # without lab's own tokenizer file, the Hugging Face tokenizer.json is enough for a character vocabulary
    (out / "lab_tokenizer.json").unlink()
    assert import_model(out)[1].chars == tok.chars


def test_exported_tokenizer_loads_in_transformers(tmp_path, numpy_backend):
    transformers = pytest.importorskip("transformers")
    _, tok = _checkpoint(tmp_path / "ck")
    out = export_checkpoint(tmp_path / "ck", tmp_path / "hf")
    hf = transformers.AutoTokenizer.from_pretrained(str(out))
    text = "And God said, Let there be light:\nand there was light."
    assert hf(text)["input_ids"] == tok.encode(text).tolist()
    assert hf.decode(tok.encode(text).tolist()) == text


def test_lora_run_exports_its_adapter_and_imports_with_it(tmp_path, numpy_backend):
    model, tok = _checkpoint(tmp_path / "ck")
    lora.apply(model, r=4, alpha=8)
    rng = np.random.default_rng(1)
    for _, a in lora.adapters(model):  # a trained adapter is not zero
        a.lora_B.data = numpy_backend.from_numpy(rng.normal(0, 0.1, a.lora_B.shape).astype(np.float32))
    lora.save_adapter(model, tmp_path / "ck" / "adapter")
    idx = tok.encode("And Noah")[None]
    want = _logits(model, idx)
    out = export_checkpoint(tmp_path / "ck", tmp_path / "hf")
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(out.resolve())
    back, _ = import_model(out)
    assert lora.adapters(back)
    np.testing.assert_allclose(_logits(back, idx), want, rtol=1e-5, atol=1e-5)
    with lora.adapter_enabled(back, False):
        assert np.abs(_logits(back, idx) - want).max() > 1e-3  # the adapter really is part of the import


@pytest.mark.parametrize("merged", [False, True])
def test_lora_checkpoint_exports_the_adapter_it_holds(tmp_path, numpy_backend, merged):
    """A LoRA run's checkpoint holds its adapter (no adapter/ directory needed); the export writes the base
    without the update (unmerged first) and the adapter beside it, so the import gives the same logits."""
    model, tok = _checkpoint(tmp_path / "ck")
    lora.apply(model, r=4, alpha=8)
    rng = np.random.default_rng(1)
    for _, a in lora.adapters(model):
        a.lora_B.data = numpy_backend.from_numpy(rng.normal(0, 0.1, a.lora_B.shape).astype(np.float32))
    if merged:
        lora.merge(model)
    save_checkpoint(tmp_path / "ck", model, tok)
    idx = tok.encode("And Noah")[None]
    back, _ = import_model(export_checkpoint(tmp_path / "ck", tmp_path / "hf"))
    assert lora.adapters(back) and not any(a.merged for _, a in lora.adapters(back))
    np.testing.assert_allclose(_logits(back, idx), _logits(model, idx), rtol=1e-5, atol=1e-5)


def test_cli_export_and_import_errors_name_the_problem(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), LAB_BACKEND="numpy")
    r = subprocess.run([sys.executable, "-m", "lab", "export", "--checkpoint", str(tmp_path / "nope"),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "nope" in r.stderr and "no such checkpoint directory" in r.stderr
    assert not (tmp_path / "o").exists()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    r = subprocess.run([sys.executable, "-m", "lab", "import", str(tmp_path / "bad")], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 2 and "config.json" in r.stderr and "not valid JSON" in r.stderr


def test_ddp_with_two_gloo_processes_trains_and_imports_back(tmp_path, numpy_backend):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not found")
    _checkpoint(tmp_path / "ck")
    export_checkpoint(tmp_path / "ck", tmp_path / "hf")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "lab.scale.ddp_train",
                        "--model", str(tmp_path / "hf"), "--out", str(tmp_path / "ddp"), "--steps", "25",
                        "--batch-size", "8", "--metrics", str(tmp_path / "metrics.json")],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["world_size"] == 2
    assert m["val_loss_after"] < m["val_loss_before"] - 0.1, m   # the loss goes down
    assert np.mean(m["losses"][-5:]) < np.mean(m["losses"][:5])
    model, tok = import_model(tmp_path / "ddp")
    idx = tok.encode("And the LORD spake unto Moses")[None]
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "ddp")).eval()
    with torch.no_grad():
        want = hf(torch.from_numpy(idx).long()).logits.numpy()
    np.testing.assert_allclose(_logits(model, idx), want, rtol=1e-4, atol=1e-4)
