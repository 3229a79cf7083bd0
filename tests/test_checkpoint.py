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


def test_resume_of_a_checkpoint_without_a_seed_stream_keeps_its_dropout_masks(use_backend, data, tmp_path):
    """Checkpoints saved before trainers had their own dropout stream kept it as global_rng: resuming one goes on
    with the same masks."""
    t = _trainer(data)
    uninterrupted = [t.train_step()[0].item() for _ in range(6)]
    t = _trainer(data)
    first = [t.train_step()[0].item() for _ in range(3)]
    save_checkpoint(tmp_path / "ck", t.model, data[0], t)
    path = tmp_path / "ck" / "trainer_state.json"
    state = json.loads(path.read_text())
    state["global_rng"] = state.pop("seed_rng")  # the older layout
    path.write_text(json.dumps(state))
    resumed = Trainer.resume(tmp_path / "ck", data[1], data[2])
    assert first + [resumed.train_step()[0].item() for _ in range(3)] == uninterrupted


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
    import lab.io
    monkeypatch.setattr(lab.io, "_write_json", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
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


def _lora_trainer(data, dropout=0.1, **lora_kw):
    from lab import lora
    t = _trainer(data, dropout=dropout)
    lora.apply(t.model, **{"r": 2, "alpha": 4, "dropout": 0.1, "targets": ["c_attn", "c_fc"], **lora_kw})
    return Trainer(t.model, data[1], data[2], t.cfg)


@pytest.mark.parametrize("mode", ["unmerged", "merged", "disabled"])
def test_lora_checkpoint_holds_adapters(use_backend, data, tmp_path, mode):
    from lab import lora
    t = _lora_trainer(data)
    for _ in range(2):
        t.train_step()   # B leaves zero: the adapter changes the logits
    if mode == "merged":
        lora.merge(t.model)
    if mode == "disabled":
        lora.use_adapter(t.model, False)
    idx = np.random.default_rng(0).integers(0, data[0].vocab_size, (2, 16))
    with lab.no_grad():
        ref = t.model.eval()(idx).numpy()
    save_checkpoint(tmp_path / "ck", t.model, data[0], t)
    model, _, _ = load_checkpoint(tmp_path / "ck")
    assert model.lora_config == {"r": 2, "lora_alpha": 4, "lora_dropout": 0.1, "target_modules": ["c_attn", "c_fc"],
                                 "base_dtype": "float32"}
    assert [(p, a.merged, a.enabled) for p, a in lora.adapters(model)] == \
        [(p, a.merged, a.enabled) for p, a in lora.adapters(t.model)]
    saved = dict(t.model.named_parameters())
    for name, p in model.named_parameters():
        np.testing.assert_array_equal(p.numpy(), saved[name].numpy(), err_msg=name)
        assert p.requires_grad == saved[name].requires_grad, name
    with lab.no_grad():
        np.testing.assert_array_equal(model(idx).numpy(), ref)
    if mode == "unmerged":   # and the adapter is what makes these logits: the base alone gives others
        with lora.adapter_enabled(model, False), lab.no_grad():
            assert np.abs(model(idx).numpy() - ref).max() > 1e-4


def test_lora_checkpoint_keeps_a_float16_base(numpy_backend, data, tmp_path):
    t = _lora_trainer(data, base_dtype="float16")
    t.train_step()
    save_checkpoint(tmp_path / "ck", t.model, data[0], t)
    model, _, _ = load_checkpoint(tmp_path / "ck")
    assert model.lora_config["base_dtype"] == "float16" and model.h[0].attn.c_attn.weight.dtype == "float16"
    np.testing.assert_array_equal(model.h[0].attn.c_attn.weight.numpy(), t.model.h[0].attn.c_attn.weight.numpy())


def test_lora_resume_matches_uninterrupted_losses(use_backend, data, tmp_path):
    t = _lora_trainer(data)
    uninterrupted = [t.train_step()[0].item() for _ in range(8)]
    t = _lora_trainer(data)
    first = [t.train_step()[0].item() for _ in range(4)]
    save_checkpoint(tmp_path / "ck", t.model, data[0], t)
    lab.manual_seed(12345)                      # resuming must not depend on the RNG state at load time
    resumed = Trainer.resume(tmp_path / "ck", data[1], data[2])
    assert sorted(resumed.optimizer.names) == sorted(n for n, p in t.model.named_parameters() if p.requires_grad)
    rest = [resumed.train_step()[0].item() for _ in range(4)]
    assert first + rest == uninterrupted        # bitwise, with the base's and the adapters' dropout on


def test_lora_checkpoint_with_a_bad_lora_entry_names_the_field(numpy_backend, data, tmp_path):
    t = _lora_trainer(data)
    save_checkpoint(tmp_path / "ck", t.model, data[0], t)
    path = tmp_path / "ck" / "config.json"
    good = json.loads(path.read_text())
    for field, value, message in (
            ("r", 2.5, r"field 'lora\.r' must be an integer >= 1, got 2\.5"),
            ("merged", "yes", r"field 'lora\.merged' must be true or false, got 'yes'"),
            ("target_modules", ["q_proj"], r"unknown target module\(s\) \['q_proj'\]"),
            ("lora_dropout", 1.0, r"field 'lora\.lora_dropout' must be a number in \[0, 1\), got 1\.0")):
        path.write_text(json.dumps({**good, "lora": {**good["lora"], field: value}}))
        with pytest.raises(CheckpointError, match=rf"config\.json: {message}"):
            load_checkpoint(tmp_path / "ck")
    path.write_text(json.dumps({**good, "lora": {k: v for k, v in good["lora"].items() if k != "r"}}))
    with pytest.raises(CheckpointError, match=r"config\.json: missing field 'lora\.r'"):
        load_checkpoint(tmp_path / "ck")


def test_resume_stops_early_where_the_uninterrupted_run_stops(numpy_backend, data, tmp_path):
    """Early stopping's state (best validation loss, evaluations without gain) is in the checkpoint: a resumed
    run stops at the step the uninterrupted one stops at, not `patience` evaluations later."""
    kw = dict(steps=12, eval_every=1, eval_batches=1, early_stopping_patience=3, early_stopping_min_delta=1.0)
    t = _trainer(data)
    t.cfg = TrainConfig(**{**t.config_dict(), **kw})
    t.run(progress=False, log_evals=False)
    assert t.stop_reason.startswith("early stopping") and t.step_num == 4   # no gain of 1.0 after the first
    t = _trainer(data)
    t.cfg = TrainConfig(**{**t.config_dict(), **kw, "steps": 2})
    t.run(progress=False, log_evals=False)
    save_checkpoint(tmp_path / "ck", t.model, data[0], t)
    resumed = Trainer.resume(tmp_path / "ck", data[1], data[2])
    resumed.cfg.steps = 12
    resumed.run(progress=False, log_evals=False)
    assert resumed.stop_reason.startswith("early stopping") and resumed.step_num == 4
    path = tmp_path / "ck" / "trainer_state.json"
    state = json.loads(path.read_text())
    for bad in ({"best_val_loss": "low", "evals_without_gain": 0}, {"best_val_loss": 1.0, "evals_without_gain": -1}):
        path.write_text(json.dumps({**state, "early_stopping": bad}))
        with pytest.raises(CheckpointError, match=r"trainer_state\.json: incomplete or invalid trainer state "
                                                  r"\(early_stopping\.(best_val_loss|evals_without_gain) must be"):
            Trainer.resume(tmp_path / "ck", data[1], data[2])


def test_a_resumed_run_saves_where_it_resumed_from_not_where_the_file_says(numpy_backend, data, tmp_path):
    """trainer_state.json names the directory the run saved to; a copy resumed elsewhere (or a downloaded one
    naming any path) must not write its checkpoints over that directory's."""
    t = _trainer(data)
    t.cfg.checkpoint_dir, t.tokenizer = str(tmp_path / "original"), data[0]
    t.cfg.steps = 2
    t.run(progress=False, log_evals=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "original").iterdir()}
    import shutil
    shutil.copytree(tmp_path / "original", tmp_path / "copy")
    resumed = Trainer.resume(tmp_path / "copy", data[1], data[2])
    resumed.cfg.steps = 3
    resumed.run(progress=False, log_evals=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "original").iterdir()} == before
    assert load_checkpoint(tmp_path / "copy")[2]["step"] == 3


def test_a_run_interrupted_and_resumed_logs_the_val_losses_of_the_uninterrupted_one(use_backend, data, tmp_path):
    """Each log record carries the latest evaluation's loss until the next one. A resumed run (or a second
    run() of one trainer) started with none: the records between the resume and the next evaluation logged
    val_loss None where the uninterrupted run logged the last one, so the panel's validation curve had a gap."""
    kw = dict(steps=7, eval_every=3, eval_batches=1, log_every=1, checkpoint_every=100)

    def trainer(stop_at=None):
        t = _lora_trainer(data)
        t.cfg = TrainConfig(**{**t.config_dict(), **kw, "checkpoint_dir": str(tmp_path / f"ck{stop_at}")})
        t.tokenizer = data[0]

        def interrupt(record):
            if record["step"] == stop_at:
                raise KeyboardInterrupt   # as Ctrl-C: the run stops after the step and saves
        t.callbacks = [interrupt]
        return t
    whole = trainer()
    whole.run(progress=False, log_evals=False)
    want = [(r["step"], r["loss"], r["val_loss"]) for r in whole.history]
    assert want[4][2] == want[3][2] is not None   # step 5 carries step 3's evaluation
    for stop_at in (4, 5):
        trainer(stop_at).run(progress=False, log_evals=False)
        resumed = Trainer.resume(tmp_path / f"ck{stop_at}", data[1], data[2])
        resumed.run(progress=False, log_evals=False)
        assert [(r["step"], r["loss"], r["val_loss"]) for r in resumed.history] == want
