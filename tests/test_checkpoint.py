import json
from dataclasses import replace

import numpy as np
import pytest

import lab
from lab.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from lab.data import CharTokenizer, load_corpus, train_val_split
from lab.models import PRESETS, TransformerLM
from lab.train import TrainConfig, Trainer


@pytest.fixture(scope="module")
def data():
    text = load_corpus()[:200_000]
    tok = CharTokenizer.from_text(text)
    return tok, *train_val_split(tok.encode(text))


def _trainer(data, dropout=0.1):
    tok, tr, va = data
    cfg = replace(PRESETS["tiny"], vocab_size=tok.vocab_size, n_layer=1, n_embd=32, n_head=2, block_size=16,
                  dropout=dropout)
    lab.manual_seed(1)
    return Trainer(TransformerLM(cfg), tr, va, TrainConfig(steps=8, batch_size=4, warmup_steps=2))


def test_resume_continues_with_exactly_the_same_losses(use_backend, data, tmp_path):
    t = _trainer(data)
    uninterrupted = [t.train_step()[0].item() for _ in range(8)]
    t = _trainer(data)
    first = [t.train_step()[0].item() for _ in range(4)]
    save_checkpoint(tmp_path / "ck", t.model, data[0], t)
    lab.manual_seed(12345)                      # resuming must not depend on the RNG state at load time
    resumed = Trainer.resume(tmp_path / "ck", data[1], data[2])
    rest = [resumed.train_step()[0].item() for _ in range(4)]
    assert first + rest == uninterrupted        # bitwise: same kernels, same batches, same dropout masks


def test_checkpoint_files_and_metadata(data, tmp_path, use_backend):
    from safetensors import safe_open
    t = _trainer(data)
    t.train_step()
    save_checkpoint(tmp_path / "ck", t.model, data[0], t)
    names = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert names == ["config.json", "model.safetensors", "optimizer.safetensors", "tokenizer.json", "trainer_state.json"]
    with safe_open(str(tmp_path / "ck" / "model.safetensors"), "np") as f:
        assert f.metadata() == {"format": "pt"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary directory left behind"
    model, tok, state = load_checkpoint(tmp_path / "ck")
    assert state["step"] == 1 and tok.chars == data[0].chars
    for (n, a), (_, b) in zip(t.model.named_parameters(), model.named_parameters()):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=n)


def test_failed_save_leaves_previous_checkpoint_intact(data, tmp_path, monkeypatch, use_backend):
    t = _trainer(data)
    save_checkpoint(tmp_path / "ck", t.model, data[0], t)
    before = (tmp_path / "ck" / "model.safetensors").read_bytes()
    t.train_step()
    import lab.checkpoint as C
    monkeypatch.setattr(C, "_write_json", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "ck", t.model, data[0], t)
    assert (tmp_path / "ck" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_corrupt_and_mismatched_checkpoints_name_the_file_and_tensor(data, tmp_path, use_backend):
    t = _trainer(data)
    save_checkpoint(tmp_path / "ck", t.model, data[0], t)
    d = tmp_path / "ck"
    good = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        load_checkpoint(d)
    (d / "model.safetensors").write_bytes(good)
    cfg = json.loads((d / "config.json").read_text())
    cfg["n_embd"] = 64
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"tensor 'wte.weight' has shape \(\d+, 32\), the model expects \(\d+, 64\)"):
        load_checkpoint(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        load_checkpoint(d)
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        load_checkpoint(tmp_path / "missing")


def test_save_pretrained_round_trip_both_formats(use_backend, tmp_path):
    lab.manual_seed(3)
    for positions, bias in (("learned", True), ("sinusoidal", False)):
        cfg = replace(PRESETS["tiny"], vocab_size=20, n_layer=1, n_embd=16, n_head=2, block_size=8,
                      positions=positions, bias=bias)
        m = TransformerLM(cfg).eval()
        idx = np.random.default_rng(0).integers(0, 20, (2, 8))
        with lab.no_grad():
            ref = m(idx).numpy()
        for fmt in ("lab", "hf"):
            m2 = TransformerLM.from_pretrained(m.save_pretrained(tmp_path / f"{positions}-{fmt}", format=fmt))
            with lab.no_grad():
                np.testing.assert_allclose(m2(idx).numpy(), ref, atol=1e-6, err_msg=f"{positions} {fmt}")
