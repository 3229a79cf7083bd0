"""A save writes and replaces only its own files inside a directory; loaders refuse what a run must not continue
from (non-finite tensors, a damaged trainer state) and read the float types the Hub uses, naming the file."""
import contextlib
import json
import os
import re
import stat
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import lab
from lab import lora
from lab.checkpoint import (JOURNAL_FILE, CheckpointError, load_checkpoint, load_pretrained, read_safetensors,
                            restore_trainer, save_checkpoint)
from lab.data import CharTokenizer
from lab.models import PRESETS, TransformerLM
from lab.scale import export_checkpoint, import_model
from lab.train import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[1]
TEXT = "And God said, Let there be light: and there was light.\n" * 20


def _model(vocab_size):
    lab.manual_seed(0)
    return TransformerLM(replace(PRESETS["tiny"], vocab_size=vocab_size, block_size=8, n_layer=1, n_head=2, n_embd=8))


def _trainer(**cfg):
    tok = CharTokenizer.from_text(TEXT)
    ids = tok.encode(TEXT)
    t = Trainer(_model(tok.vocab_size), ids, ids,
                TrainConfig(**{"steps": 2, "batch_size": 2, "eval_every": 10**6, "log_every": 10**6, **cfg}))
    t.tokenizer = tok
    return t


def _checkpoint(d):
    t = _trainer()
    t.train_step()
    save_checkpoint(d, t.model, t.tokenizer, t)
    return t


def _export(d, tmp):
    _checkpoint(tmp / "ck")
    export_checkpoint(tmp / "ck", d)


def _import(d, tmp):
    _export(tmp / "hf", tmp)
    import_model(tmp / "hf", out=d)


def _cli_train(d, tmp):
    r = subprocess.run([sys.executable, "-m", "lab", "train", "--steps", "1", "--backend", "numpy", "--no-progress",
                        "--out", str(d)], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if r.returncode:
        raise CheckpointError(r.stderr)


def _adapter(d, tmp):
    t = _trainer()
    lora.apply(t.model, r=2, alpha=4)
    lora.save_adapter(t.model, d)


SAVERS = {  # name: (save into d, the files it writes)
    "save_pretrained": (lambda d, tmp: _trainer().model.save_pretrained(d), {"config.json", "model.safetensors"}),
    "save_pretrained_hf": (lambda d, tmp: _trainer().model.save_pretrained(d, format="hf"),
                           {"config.json", "model.safetensors"}),
    "save_checkpoint": (lambda d, tmp: _checkpoint(d), {"config.json", "model.safetensors", "tokenizer.json",
                                                         "optimizer.safetensors", "trainer_state.json"}),
    "save_adapter": (_adapter, {"adapter_model.safetensors", "adapter_config.json"}),
    "export": (_export, {"config.json", "model.safetensors", "lab_tokenizer.json", "tokenizer.json",
                         "tokenizer_config.json"}),
    "import": (_import, {"config.json", "model.safetensors", "tokenizer.json"}),
    "cli_train_out": (_cli_train, {"config.json", "model.safetensors", "tokenizer.json", "optimizer.safetensors",
                                   "trainer_state.json"}),
}


@pytest.mark.parametrize("saver", sorted(SAVERS))
def test_save_keeps_other_files_in_directory(saver, tmp_path, numpy_backend):
    save, own = SAVERS[saver]
    d = tmp_path / "d"
    (d / "data").mkdir(parents=True)
    (d / "notes.txt").write_text("x")
    (d / "data" / "rows.csv").write_text("1,2\n")
    (d / ".notes.txt.tmp-keep").write_text("not a temporary of any file a save writes")
    save(d, tmp_path)
    assert (d / "notes.txt").read_text() == "x" and (d / "data" / "rows.csv").read_text() == "1,2\n"
    assert {p.name for p in d.iterdir()} == own | {"notes.txt", "data", ".notes.txt.tmp-keep"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "nothing moved aside next to it"


@pytest.mark.parametrize("saver", ["save_pretrained", "save_checkpoint", "save_adapter", "export"])
def test_save_keeps_directory_mode(saver, tmp_path, numpy_backend):
    save, _ = SAVERS[saver]
    d = tmp_path / "d"
    d.mkdir()
    d.chmod(0o751)
    save(d, tmp_path)
    assert stat.S_IMODE(d.stat().st_mode) == 0o751
    umask = os.umask(0o022)
    os.umask(umask)
    save(tmp_path / "new", tmp_path)   # a directory the save creates, and the files, get the usual modes
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o777 & ~umask
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "new").iterdir()} == {0o666 & ~umask}


@pytest.mark.parametrize("saver", sorted(SAVERS))
@pytest.mark.parametrize("kind", ["file", "symlink to a file", "broken symlink"])
def test_save_refuses_regular_file_target(saver, kind, tmp_path, numpy_backend):
    save, _ = SAVERS[saver]
    (tmp_path / "real").write_text("precious")
    target = tmp_path / "target"
    if kind == "file":
        target.write_text("precious")
    else:
        target.symlink_to(tmp_path / ("real" if kind == "symlink to a file" else "missing"))
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(CheckpointError, match=r"target: is a (file, not a directory|broken symlink)"):
        save(target, tmp_path)
    assert (tmp_path / "real").read_text() == "precious"
    assert kind != "file" or target.read_text() == "precious"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert set(before) <= {p.name for p in tmp_path.iterdir()}


def test_save_through_a_symlink_to_a_directory_writes_into_it(tmp_path, numpy_backend):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    _trainer().model.save_pretrained(tmp_path / "link")
    assert (tmp_path / "link").is_symlink() and (tmp_path / "real" / "model.safetensors").is_file()


def test_save_refuses_a_directory_where_its_file_goes_and_changes_nothing(tmp_path, numpy_backend):
    t = _checkpoint(tmp_path / "ck")
    before = (tmp_path / "ck" / "config.json").read_bytes()
    (tmp_path / "ck" / "model.safetensors").unlink()
    (tmp_path / "ck" / "model.safetensors").mkdir()
    with pytest.raises(CheckpointError, match=r"model\.safetensors: is a directory"):
        save_checkpoint(tmp_path / "ck", t.model, t.tokenizer, t)
    assert (tmp_path / "ck" / "config.json").read_bytes() == before
    assert not [p.name for p in (tmp_path / "ck").iterdir() if p.name.startswith(".")]


def test_loading_a_regular_file_says_it_is_a_file(tmp_path, numpy_backend):
    (tmp_path / "ck").write_text("x")
    with pytest.raises(CheckpointError, match=r"ck: is a file, not a checkpoint directory"):
        load_checkpoint(tmp_path / "ck")
    with pytest.raises(CheckpointError, match=r"ck: is a file, not a directory \(looked for adapter_config.json"):
        lora.load_adapter(_trainer().model, tmp_path / "ck")


def test_a_save_removes_the_stale_temporaries_of_its_own_files_only(tmp_path, numpy_backend):
    t = _checkpoint(tmp_path / "ck")
    for name in (".model.safetensors.tmp-0badc0ffee00", ".trainer_state.json.tmp-0badc0ffee00",
                 f"{JOURNAL_FILE}.tmp-0badc0ffee00", ".other.tmp-1"):
        (tmp_path / "ck" / name).write_text("left by a killed save")
    save_checkpoint(tmp_path / "ck", t.model, t.tokenizer, t)
    assert [p.name for p in (tmp_path / "ck").iterdir() if p.name.startswith(".")] == [".other.tmp-1"]


def test_a_checkpoint_saved_without_trainer_drops_the_old_trainer_state(tmp_path, numpy_backend):
    t = _checkpoint(tmp_path / "ck")
    save_checkpoint(tmp_path / "ck", t.model, t.tokenizer)   # the old optimizer state belongs to other weights
    assert load_checkpoint(tmp_path / "ck")[2] is None and not (tmp_path / "ck" / "optimizer.safetensors").exists()


def test_save_checkpoint_without_a_tokenizer_or_with_another_models_trainer_is_refused(tmp_path, numpy_backend):
    t, other = _trainer(), _trainer()
    with pytest.raises(ValueError, match=r"tokenizer must be a lab tokenizer .* got None"):
        save_checkpoint(tmp_path / "ck", t.model, None)
    with pytest.raises(ValueError, match=r"trainer must be the Trainer training this model"):
        save_checkpoint(tmp_path / "ck", t.model, t.tokenizer, other)   # its moments belong to other weights
    assert not (tmp_path / "ck").exists()


@pytest.mark.parametrize("journal", ["{not json", '{"replace": {"../x": ".x.tmp-1"}, "remove": []}',
                                     '{"replace": {}, "remove": ["/etc/passwd"]}'])
def test_a_damaged_save_journal_is_refused_and_touches_nothing_outside(journal, tmp_path, numpy_backend):
    _checkpoint(tmp_path / "ck")
    (tmp_path / "ck" / JOURNAL_FILE).write_text(journal)
    with pytest.raises(CheckpointError, match=r"\.lab-save\.json: damaged save journal"):
        load_checkpoint(tmp_path / "ck")


@pytest.mark.parametrize("journal", ['{"replace": {}, "remove": ["notes.txt"]}', '{"replace": {}, "remove": ["a\\u0000b"]}',
                                     '{"replace": {}, "remove": ["adapter/../notes.txt"]}',
                                     '{"replace": {"adapter/config.json": "../.config.json.tmp-1"}, "remove": []}',
                                     "[" * 100_000])
def test_a_planted_save_journal_cannot_delete_a_users_file(journal, tmp_path, numpy_backend):
    """A journal removes only names a save removes (stale trainer state or adapter files): one planted in a
    downloaded checkpoint must not delete the user's notes beside it, nor crash the loader (NUL, deep nesting)."""
    _checkpoint(tmp_path / "ck")
    (tmp_path / "ck" / "notes.txt").write_text("mine")
    (tmp_path / "ck" / JOURNAL_FILE).write_text(journal)
    with pytest.raises(CheckpointError, match=r"\.lab-save\.json: damaged save journal"):
        load_checkpoint(tmp_path / "ck")
    assert (tmp_path / "ck" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("saver", ["save_pretrained", "save_checkpoint", "save_adapter"])
def test_a_full_disk_names_the_directory_and_keeps_its_files(saver, tmp_path, numpy_backend, monkeypatch):
    """No space left (reported at fsync, as NFS does): one OSError naming the directory and saying its files are
    as they were; they are, and no temporary is left."""
    import errno
    from lab import io
    save, _ = SAVERS[saver]
    d = tmp_path / "d"
    save(d, tmp_path)
    (d / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in d.iterdir()}

    def no_space(path, directory=False):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(io, "_fsync", no_space)
    with pytest.raises(OSError, match=rf"^\[Errno {errno.ENOSPC}\] {d}: save failed \(No space left on device\); "
                                      r"the files already there are as they were$"):
        save(d, tmp_path)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before


def test_nan_in_the_history_keeps_the_checkpoint_readable(tmp_path, numpy_backend):
    t = _trainer()
    t.train_step()
    t.history.append({"step": 1, "loss": float("nan"), "val_loss": float("inf")})
    save_checkpoint(tmp_path / "ck", t.model, t.tokenizer, t)
    assert load_checkpoint(tmp_path / "ck")[2]["history"] == [{"step": 1, "loss": None, "val_loss": None}]


# ------------------------------------------------------------------------------------------------ non-finite values

def test_nonfinite_optimizer_state_refused_at_load(tmp_path, use_backend):
    t = _checkpoint(tmp_path / "ck")
    path = tmp_path / "ck" / "optimizer.safetensors"
    arrays = read_safetensors(path)
    name = sorted(arrays)[1]
    arrays[name].flat[3] = np.nan
    save_file(arrays, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"optimizer\.safetensors: tensor '{name}' contains NaN or Inf"):
        Trainer.resume(tmp_path / "ck", t.train_ids, t.val_ids)
    fresh = _trainer()
    m0 = [a.copy() for a in map(fresh.optimizer.backend.to_numpy, fresh.optimizer.state_arrays().values())]
    with pytest.raises(CheckpointError):
        restore_trainer(fresh, tmp_path / "ck", load_checkpoint(tmp_path / "ck")[2])
    for a, b in zip(m0, map(fresh.optimizer.backend.to_numpy, fresh.optimizer.state_arrays().values())):
        np.testing.assert_array_equal(a, b)   # the trainer is as it was
    assert fresh.step_num == 0


def test_negative_second_moments_refused_at_load_and_the_trainer_unchanged(tmp_path, use_backend):
    """Adam's v averages squared gradients: a negative one (a damaged or edited file) made sqrt(v) NaN, and every
    weight NaN after the first resumed step, with no error."""
    t = _checkpoint(tmp_path / "ck")
    path = tmp_path / "ck" / "optimizer.safetensors"
    arrays = read_safetensors(path)
    name = next(k for k in sorted(arrays) if k.startswith("v."))
    arrays[name].flat[2] = -0.5
    save_file(arrays, str(path), metadata={"format": "pt", "step": "1"})
    with pytest.raises(CheckpointError, match=rf"optimizer\.safetensors: tensor '{re.escape(name)}' holds negative "
                                              rf"values \(lowest -0\.5\)"):
        Trainer.resume(tmp_path / "ck", t.train_ids, t.val_ids)
    fresh = _trainer()
    before = {k: fresh.optimizer.backend.to_numpy(a).copy() for k, a in fresh.optimizer.state_arrays().items()}
    with pytest.raises(CheckpointError, match="negative"):
        restore_trainer(fresh, tmp_path / "ck", load_checkpoint(tmp_path / "ck")[2])
    for k, a in fresh.optimizer.state_arrays().items():
        np.testing.assert_array_equal(fresh.optimizer.backend.to_numpy(a), before[k])
    assert fresh.step_num == 0


@pytest.mark.parametrize("value", [1e300, -1e39])
def test_float64_values_beyond_float32_are_refused(value, tmp_path, numpy_backend):
    t = _trainer()
    t.model.save_pretrained(tmp_path / "m")
    tensors = read_safetensors(tmp_path / "m" / "model.safetensors")
    tensors = {k: v.astype(np.float64) for k, v in tensors.items()}
    tensors["wte.weight"][0, 0] = value
    save_file(tensors, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'wte\.weight' has values beyond float32"):
        load_pretrained(tmp_path / "m")


def test_nonfinite_adapter_tensors_and_alpha_are_refused(tmp_path, use_backend):
    t = _trainer()
    lora.apply(t.model, r=2, alpha=4)
    lora.save_adapter(t.model, tmp_path / "a")
    cfg_path, file = tmp_path / "a" / "adapter_config.json", tmp_path / "a" / "adapter_model.safetensors"
    good_cfg, tensors = cfg_path.read_text(), read_safetensors(file)
    for literal in ("NaN", "Infinity", "-Infinity", "1e999"):
        cfg_path.write_text(good_cfg.replace('"lora_alpha": 4', f'"lora_alpha": {literal}'))
        with pytest.raises(CheckpointError, match=r"adapter_config\.json: not valid JSON"):
            lora.load_adapter(_trainer().model, tmp_path / "a")
    cfg_path.write_text(good_cfg)
    name = sorted(tensors)[0]
    tensors[name][0, 0] = np.inf
    save_file(tensors, str(file), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"adapter_model\.safetensors: tensor '{name}' contains NaN or Inf"):
        lora.load_adapter(_trainer().model, tmp_path / "a")


def test_a_run_never_replaces_its_last_good_checkpoint_with_nonfinite_weights(tmp_path, use_backend, capsys):
    t = _trainer(steps=3, checkpoint_dir=str(tmp_path / "ck"), checkpoint_every=1, check_finite_every=0)
    t.run(progress=False, log_evals=False)
    good = {p.name: p.read_bytes() for p in (tmp_path / "ck").iterdir()}
    name = next(iter(t.optimizer.state_arrays()))
    moment = t.optimizer.backend.to_numpy(t.optimizer.state_arrays()[name]).copy()
    moment.flat[0] = np.nan                                 # the weights turn NaN at the next step
    t.optimizer.load_state_array(name, moment)
    t.cfg = replace(t.cfg, steps=5)
    t.run(progress=False, log_evals=False)
    assert "checkpoint not saved" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in (tmp_path / "ck").iterdir()} == good
    assert Trainer.resume(tmp_path / "ck", t.train_ids, t.val_ids).step_num == 3


# ------------------------------------------------------------------------------------------------ float types

@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_bfloat16_checkpoint_from_transformers_loads(dtype, tmp_path, use_backend):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=21, n_positions=8, n_embd=16, n_layer=1, n_head=2)
    hf = transformers.GPT2LMHeadModel(cfg).to(getattr(torch, dtype))
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    model = load_pretrained(tmp_path / "hf")
    hf = hf.float().eval()     # the same bfloat16 / float16 values, exactly, in float32 arithmetic
    idx = np.random.default_rng(0).integers(0, 21, (2, 8))
    with torch.no_grad():
        want = hf(torch.tensor(idx)).logits.numpy()
    with lab.no_grad():
        got = model(idx).numpy()
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)   # float32 sums in another order
    for name, p in hf.transformer.named_parameters():
        if name in dict(model.named_parameters()):
            np.testing.assert_array_equal(dict(model.named_parameters())[name].numpy(), p.detach().numpy())


def test_float_types_lab_cannot_read_are_named(tmp_path):
    path = tmp_path / "x.safetensors"
    header = json.dumps({"w": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0\0")
    with pytest.raises(CheckpointError, match=r"x\.safetensors: tensor 'w' has dtype F8_E4M3"):
        read_safetensors(path)


# ------------------------------------------------------------------------------------------------ trainer state

DAMAGES = {
    "optimizer_step": (-1, r"optimizer_step must be an integer >= 0, got -1"),
    "step": ("3", r"step must be an integer >= 0, got '3'"),
    "history": ({}, r"history must be a list of records"),
    "batch_rng": ({"bit_generator": "PCG64", "state": {"state": -1, "inc": 1}}, r"batch_rng must be a numpy PCG64"),
    "global_rng": ("seed", r"global_rng must be a numpy PCG64"),
}


@pytest.mark.parametrize("field", sorted(DAMAGES))
def test_trainer_state_negative_step_refused(field, tmp_path, use_backend):
    t = _checkpoint(tmp_path / "ck")
    path = tmp_path / "ck" / "trainer_state.json"
    state = json.loads(path.read_text())
    state[field], message = DAMAGES[field]
    path.write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=rf"trainer_state\.json: .*{message}"):
        Trainer.resume(tmp_path / "ck", t.train_ids, t.val_ids)


def test_trainer_state_with_more_optimizer_steps_than_steps_is_refused(tmp_path, numpy_backend):
    t = _checkpoint(tmp_path / "ck")
    path = tmp_path / "ck" / "trainer_state.json"
    path.write_text(path.read_text().replace('"optimizer_step": 1', '"optimizer_step": 7'))
    with pytest.raises(CheckpointError, match=r"optimizer_step must be <= step, got optimizer_step 7 and step 1"):
        Trainer.resume(tmp_path / "ck", t.train_ids, t.val_ids)


def test_export_or_import_onto_its_own_source_is_refused(tmp_path, numpy_backend):
    _checkpoint(tmp_path / "ck")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ck").iterdir()}
    with pytest.raises(ValueError, match=r"is the directory being converted"):
        export_checkpoint(tmp_path / "ck", tmp_path / "ck" / ".." / "ck")
    export_checkpoint(tmp_path / "ck", tmp_path / "hf")
    with pytest.raises(ValueError, match=r"is the directory being converted"):
        import_model(tmp_path / "hf", out=tmp_path / "hf")
    assert {p.name: p.read_bytes() for p in (tmp_path / "ck").iterdir()} == before


def test_concurrent_saves_into_one_directory_each_land_whole(tmp_path, numpy_backend):
    import threading
    t = _checkpoint(tmp_path / "ck")
    errors = []

    def save():
        try:
            for _ in range(5):
                save_checkpoint(tmp_path / "ck", t.model, t.tokenizer, t)
        except Exception as e:   # a save deleting another's temporaries would surface here
            errors.append(e)
    threads = [threading.Thread(target=save) for _ in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    assert not [p.name for p in (tmp_path / "ck").iterdir() if p.name.startswith(".")]
    load_checkpoint(tmp_path / "ck")


def test_a_failed_save_into_a_new_directory_leaves_no_directory(tmp_path, numpy_backend):
    t = _trainer()
    p = next(iter(t.model.parameters()))
    bad = p.numpy().copy()
    bad.flat[0] = np.nan
    p.data = p.backend.from_numpy(bad)
    with pytest.raises(CheckpointError, match=r"contains NaN or Inf: not saved"):
        t.model.save_pretrained(tmp_path / "new" / "m")
    assert not (tmp_path / "new" / "m").exists()


def test_a_run_whose_checkpoint_dir_is_a_file_is_refused_before_training(tmp_path, numpy_backend):
    (tmp_path / "ck").write_text("precious")
    t = _trainer(checkpoint_dir=str(tmp_path / "ck"))
    with pytest.raises(CheckpointError, match=r"ck: is a file, not a directory"):
        t.run(progress=False, log_evals=False)
    assert t.step_num == 0 and (tmp_path / "ck").read_text() == "precious"


SAVE_STEPS_FOREVER = """
import sys, numpy as np
sys.path.insert(0, {tests!r})
from test_save_safety import _trainer
from lab.checkpoint import save_checkpoint
t = _trainer(); t.train_step(); opt = t.optimizer
k = 1
while True:   # checkpoint k: every weight, every moment and both step counters are k
    t.model.load_state_dict({{n: np.full(p.shape, k, np.float32) for n, p in t.model.named_parameters()}})
    for n, a in opt.state_arrays().items():
        opt.load_state_array(n, np.full(a.shape, k, np.float32))
    t.step_num = opt.step_count = k
    save_checkpoint(sys.argv[1], t.model, t.tokenizer, t)
    print(k, flush=True)
    k += 1
"""


def test_loading_while_another_process_saves_gives_one_save(tmp_path, numpy_backend):
    """A notebook resuming from (or loading) a checkpoint that a run in another process keeps saving: every load
    gets config, weights, trainer state and optimizer moments of one save (reading() against the saves' lock)."""
    import time
    d = tmp_path / "ck"
    saver = subprocess.Popen([sys.executable, "-c", SAVE_STEPS_FOREVER.format(tests=str(ROOT / "tests")), str(d)],
                             stdout=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=str(ROOT), LAB_BACKEND="numpy"))
    try:
        assert saver.stdout.readline()   # the first save is there
        ids = CharTokenizer.from_text(TEXT).encode(TEXT)
        loads, deadline = 0, time.monotonic() + 4
        while time.monotonic() < deadline or loads < 5:
            t = Trainer.resume(d, ids, ids)
            k = t.step_num
            weights = {float(v) for a in t.model.state_dict().values() for v in np.unique(a)}
            moments = {float(v) for a in t.optimizer.state_arrays().values() for v in np.unique(t.optimizer.backend.to_numpy(a))}
            assert weights == moments == {k} and t.optimizer.step_count == k, (loads, k, weights, moments)
            loads += 1
    finally:
        saver.kill()
        saver.wait()


def test_a_save_into_a_directory_this_thread_is_reading_is_refused_not_deadlocked(tmp_path, numpy_backend):
    from lab.checkpoint import reading
    t = _checkpoint(tmp_path / "ck")
    with reading(tmp_path / "ck"), pytest.raises(CheckpointError, match=r"is being read by this thread"):
        save_checkpoint(tmp_path / "ck", t.model, t.tokenizer, t)
    load_checkpoint(tmp_path / "ck")


@pytest.mark.parametrize("convert", ["export", "import"])
def test_a_conversion_without_adapter_removes_the_adapter_an_earlier_one_left(convert, tmp_path, numpy_backend):
    """export/import of a model without adapter into a directory that holds an earlier LoRA conversion's adapter/:
    that adapter belongs to other weights, and loading the directory must not put it on this model."""
    t = _trainer()
    lora.apply(t.model, r=2, alpha=4)
    for _, m in lora.adapters(t.model):   # a trained adapter: B no longer zero, so it changes the logits
        m.lora_B.data = m.lora_B.backend.from_numpy(np.ones(m.lora_B.shape, np.float32))
    save_checkpoint(tmp_path / "lora_ck", t.model, t.tokenizer)
    export_checkpoint(tmp_path / "lora_ck", tmp_path / "lora_hf")
    base = _checkpoint(tmp_path / "base_ck")
    export_checkpoint(tmp_path / "base_ck", tmp_path / "base_hf")
    if convert == "export":
        export_checkpoint(tmp_path / "lora_ck", tmp_path / "out")
        (tmp_path / "out" / "adapter" / "notes.txt").write_text("mine")   # a file of the user's there stays
        export_checkpoint(tmp_path / "base_ck", tmp_path / "out")
        model, _ = import_model(tmp_path / "out")
    else:
        import_model(tmp_path / "lora_hf", out=tmp_path / "out")
        (tmp_path / "out" / "adapter" / "notes.txt").write_text("mine")   # a file of the user's there stays
        import_model(tmp_path / "base_hf", out=tmp_path / "out")
        export_checkpoint(tmp_path / "out", tmp_path / "out_hf")   # export looks for out/adapter
        model, _ = import_model(tmp_path / "out_hf")
    assert [p.name for p in (tmp_path / "out" / "adapter").iterdir()] == ["notes.txt"]
    assert not lora.adapters(model)
    x = np.array([[1, 2, 3]])
    assert np.array_equal(model(x)[0].numpy(), base.model.eval()(x)[0].numpy())


def _lora_checkpoint(d, value):
    """A LoRA checkpoint whose base weights are all `value` and whose adapters' B are all 100 * value."""
    t = _trainer()
    t.model.load_state_dict({n: np.full(p.shape, value, np.float32) for n, p in t.model.named_parameters()})
    lora.apply(t.model, r=2, alpha=4)
    for _, m in lora.adapters(t.model):
        m.lora_B.data = m.lora_B.backend.from_numpy(np.full(m.lora_B.shape, 100 * value, np.float32))
    save_checkpoint(d, t.model, t.tokenizer)


def _base_and_adapter(directory):
    from lab.scale import import_model
    model, _ = import_model(directory)
    values = {n: set(np.unique(v).tolist()) for n, v in model.state_dict().items()}
    return (set().union(*(v for n, v in values.items() if ".lora_" not in n)),
            set().union(*(v for n, v in values.items() if ".lora_B" in n)))


def test_an_interrupted_export_never_pairs_a_base_with_another_exports_adapter(tmp_path, numpy_backend, monkeypatch):
    """export writes the base and adapter/ in one save (one journal): interrupted before its journal, the directory
    keeps the previous export whole; interrupted after any rename, the next load completes the new one."""
    import lab.io as C
    _lora_checkpoint(tmp_path / "a", 0.5)
    _lora_checkpoint(tmp_path / "b", 0.25)
    export_checkpoint(tmp_path / "a", tmp_path / "out")
    assert _base_and_adapter(tmp_path / "out") == ({0.5}, {50.0})
    write_tensors = C._Staging.write_tensors

    def interrupted_at_the_adapter(self, name, tensors, metadata=None):
        if name.endswith("adapter_model.safetensors"):
            raise KeyboardInterrupt   # Ctrl-C (or a kill) while the adapter is written
        return write_tensors(self, name, tensors, metadata)
    monkeypatch.setattr(C._Staging, "write_tensors", interrupted_at_the_adapter)
    with pytest.raises(KeyboardInterrupt):
        export_checkpoint(tmp_path / "b", tmp_path / "out")
    monkeypatch.undo()
    assert _base_and_adapter(tmp_path / "out") == ({0.5}, {50.0})
    real = os.replace
    for renames in range(7):   # seven files: killed before the first rename, ..., before the last
        export_checkpoint(tmp_path / "a", tmp_path / "out")
        calls = []

        def killed_after(src, dst):
            if Path(dst).name != JOURNAL_FILE:
                if len(calls) == renames:
                    raise KeyboardInterrupt   # stands for a SIGKILL: nothing after this point of the save runs
                calls.append(dst)
            real(src, dst)
        monkeypatch.setattr(C.os, "replace", killed_after)
        with contextlib.suppress(KeyboardInterrupt):
            export_checkpoint(tmp_path / "b", tmp_path / "out")
        monkeypatch.undo()
        assert _base_and_adapter(tmp_path / "out") == ({0.25}, {25.0}), renames


def test_optimizer_state_copied_from_another_save_is_refused(tmp_path, numpy_backend):
    """Same parameter names and shapes, another step: the moments would go on with weights they do not belong to."""
    t = _checkpoint(tmp_path / "ck")   # one step
    t.train_step()
    save_checkpoint(tmp_path / "later", t.model, t.tokenizer, t)
    (tmp_path / "ck" / "optimizer.safetensors").write_bytes((tmp_path / "later" / "optimizer.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match=r"optimizer\.safetensors: optimizer state of optimizer step 2, but "
                                              r".*trainer_state\.json is at optimizer step 1: the two files are from "
                                              r"different saves"):
        Trainer.resume(tmp_path / "ck", t.train_ids, t.val_ids)


def test_a_fifo_in_place_of_a_checkpoint_file_is_named_not_read(tmp_path, numpy_backend):
    _checkpoint(tmp_path / "ck")
    (tmp_path / "ck" / "model.safetensors").unlink()
    os.mkfifo(tmp_path / "ck" / "model.safetensors")   # reading it would block forever
    with pytest.raises(CheckpointError, match=r"model\.safetensors: is not a regular file"):
        load_checkpoint(tmp_path / "ck")


@pytest.mark.parametrize("target", ["", None, b"bytes"])
def test_a_save_target_that_is_not_a_path_is_refused(target, tmp_path, numpy_backend, monkeypatch):
    monkeypatch.chdir(tmp_path)   # "" saved into the working directory, unasked
    with pytest.raises(ValueError, match=r"a save needs a directory path \(a str or pathlib\.Path\), got "):
        _trainer().model.save_pretrained(target)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("source", [None, 3, b"ck", "", ["ck"]])
@pytest.mark.parametrize("load", ["load_checkpoint", "resume", "load_adapter", "export", "import"])
def test_a_load_source_that_is_not_a_path_is_refused(load, source, tmp_path, numpy_backend, monkeypatch):
    """Saves refused a target that is no path; loads raised Path()'s bare TypeError ('expected str, bytes or
    os.PathLike object, not NoneType'), and "" read the working directory."""
    monkeypatch.chdir(tmp_path)
    t = _trainer()
    calls = {"load_checkpoint": lambda: load_checkpoint(source),
             "resume": lambda: Trainer.resume(source, t.train_ids, t.val_ids),
             "load_adapter": lambda: lora.load_adapter(t.model, source),
             "export": lambda: export_checkpoint(source, tmp_path / "out"),
             "import": lambda: import_model(source)}
    with pytest.raises(ValueError, match=r"a load needs a directory path \(a str or pathlib\.Path\), got "):
        calls[load]()
    assert not list(tmp_path.iterdir())


def test_loads_and_saves_work_where_the_directory_cannot_be_locked(tmp_path, numpy_backend, monkeypatch):
    """A file system without flock (some FUSE and NFS mounts), or a directory one may read files from but not open
    (mode 0711, for another user): loading works as before the lock existed, unlocked; saving too on the former."""
    import errno
    import lab.io as C
    t = _checkpoint(tmp_path / "ck")

    def no_locks(fd, op):
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
    monkeypatch.setattr(C.fcntl, "flock", no_locks)
    save_checkpoint(tmp_path / "ck", t.model, t.tokenizer, t)
    Trainer.resume(tmp_path / "ck", t.train_ids, t.val_ids)
    monkeypatch.undo()
    real_open = os.open

    def unlistable(path, flags, *args):
        if Path(path) == tmp_path / "ck" and not flags & (os.O_WRONLY | os.O_RDWR):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *args)
    monkeypatch.setattr(C.os, "open", unlistable)
    Trainer.resume(tmp_path / "ck", t.train_ids, t.val_ids)


def test_a_planted_journal_cannot_link_a_checkpoint_file_to_one_outside(tmp_path, numpy_backend):
    _checkpoint(tmp_path / "ck")
    (tmp_path / "secret.json").write_text('{"model_type": "lab-transformer"}')
    (tmp_path / "ck" / ".config.json.tmp-1").symlink_to(tmp_path / "secret.json")
    (tmp_path / "ck" / JOURNAL_FILE).write_text('{"replace": {"config.json": ".config.json.tmp-1"}, "remove": []}')
    with pytest.raises(CheckpointError, match=r"\.lab-save\.json: damaged save journal"):
        load_checkpoint(tmp_path / "ck")
    assert not (tmp_path / "ck" / "config.json").is_symlink()


@pytest.mark.parametrize("where", ["adapter", "."])
def test_export_never_replaces_a_lora_checkpoints_own_adapter_with_one_saved_beside_it(where, tmp_path, numpy_backend):
    """A LoRA run checkpointing into ck after an adapter snapshot was saved there (ck/adapter or ck itself):
    export loaded the snapshot over the checkpoint's own adapters, trained since, and wrote it out with no
    error. An adapter beside that differs is refused unless named; one equal to the checkpoint's is fine."""
    t = _trainer(lr=0.05, warmup_steps=0)
    lora.apply(t.model, r=2, alpha=4)
    t = Trainer(t.model, t.train_ids, t.val_ids, t.cfg)
    t.tokenizer, ck = _trainer().tokenizer, tmp_path / "ck"
    t.train_step()
    lora.save_adapter(t.model, ck / where)   # the snapshot
    snapshot = _logits_of(t.model)
    t.train_step()
    save_checkpoint(ck, t.model, t.tokenizer, t)
    with pytest.raises(CheckpointError, match=r"ck: holds LoRA adapters of its own .* another adapter \(other "
                                              r"values\): pass adapter="):
        export_checkpoint(ck, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    np.testing.assert_allclose(_logits_of(import_model(export_checkpoint(ck, tmp_path / "hf", adapter=ck / where))[0]),
                               snapshot, atol=1e-6)
    (ck / where / "adapter_config.json").write_text("{damaged")
    with pytest.raises(CheckpointError, match=r"another adapter \(.*adapter_config\.json: not valid JSON"):
        export_checkpoint(ck, tmp_path / "hf2")
    lora.save_adapter(t.model, ck / where)   # now the checkpoint's own values
    np.testing.assert_allclose(_logits_of(import_model(export_checkpoint(ck, tmp_path / "hf"))[0]),
                               _logits_of(t.model), atol=1e-6)


def _logits_of(model):
    with lab.no_grad():
        return model.eval()(np.array([[1, 2, 3, 4]]))[0].numpy()


def test_a_checkpoint_saved_where_an_export_was_loads_its_own_tokenizer(tmp_path, numpy_backend):
    """An export writes lab_tokenizer.json, which loaders read before tokenizer.json. A checkpoint saved into
    that directory afterwards left it there, so load_checkpoint and import gave the export's tokenizer with the
    new model (same vocabulary size: no error, wrong text)."""
    _checkpoint(tmp_path / "ck")
    export_checkpoint(tmp_path / "ck", tmp_path / "d")
    tok = CharTokenizer.from_text("".join(chr(ord(c) + 200) for c in set(TEXT)))   # as many characters, others
    assert tok.vocab_size == _trainer().tokenizer.vocab_size and tok.chars != _trainer().tokenizer.chars
    save_checkpoint(tmp_path / "d", _model(tok.vocab_size), tok)
    assert load_checkpoint(tmp_path / "d")[1].chars == tok.chars
    assert import_model(tmp_path / "d")[1].chars == tok.chars
    assert not (tmp_path / "d" / "lab_tokenizer.json").exists()
    export_checkpoint(tmp_path / "d", tmp_path / "d2")   # an export still writes its own
    assert (tmp_path / "d2" / "lab_tokenizer.json").is_file()


@pytest.mark.parametrize("save", ["save_pretrained", "save_pretrained_hf", "export"])
def test_a_model_saved_over_a_checkpoint_drops_its_trainer_state(save, tmp_path, numpy_backend):
    """save_pretrained or an export into a training checkpoint's directory replaced the weights and left
    optimizer.safetensors and trainer_state.json: Trainer.resume went on with the other model under the first
    run's moments, step and RNG states, with no error. Those files go with the weights they belong to (as
    save_checkpoint without a trainer already did); a checkpoint with a trainer keeps its own."""
    _checkpoint(tmp_path / "ck")
    other = _trainer()
    other.train_step()
    if save == "export":
        save_checkpoint(tmp_path / "other", other.model, other.tokenizer)
        export_checkpoint(tmp_path / "other", tmp_path / "ck")
    else:
        other.model.save_pretrained(tmp_path / "ck", format="hf" if save.endswith("hf") else "lab")
    assert not {"optimizer.safetensors", "trainer_state.json"} & {p.name for p in (tmp_path / "ck").iterdir()}
    with pytest.raises(CheckpointError, match=r"ck: holds a model but no trainer state"):
        Trainer.resume(tmp_path / "ck", other.train_ids, other.val_ids)
    save_checkpoint(tmp_path / "ck", other.model, other.tokenizer, other)
    assert Trainer.resume(tmp_path / "ck", other.train_ids, other.val_ids).step_num == 1


@pytest.mark.parametrize("landing", ["as_the_rename_returns", "right_after_the_rename"])
def test_a_ctrl_c_as_the_save_journal_lands_leaves_one_whole_save(landing, tmp_path, numpy_backend, monkeypatch):
    """A KeyboardInterrupt once the journal is renamed into place, before the save marked itself committed (raised
    as os.replace returns, when it arrived during the rename, or at the next call): the failed save's cleanup
    deleted the temporaries the journal names, and the next load applied only its removals: the old weights
    without their trainer state (a checkpoint neither old nor new)."""
    t = _checkpoint(tmp_path / "ck")
    t.train_step()
    new = {n: p.numpy().copy() for n, p in t.model.named_parameters()}
    rename, unlink = os.replace, Path.unlink

    def interrupted_rename(src, dst, *args, **kwargs):
        rename(src, dst, *args, **kwargs)
        if Path(dst).name == JOURNAL_FILE:
            raise KeyboardInterrupt

    def interrupted_unlink(self, *args, **kwargs):
        unlink(self, *args, **kwargs)
        if self.name.startswith(f"{JOURNAL_FILE}.tmp-"):   # the journal's temporary, just renamed into place
            raise KeyboardInterrupt
    with monkeypatch.context() as patch:
        if landing == "as_the_rename_returns":
            patch.setattr(os, "replace", interrupted_rename)
        else:
            patch.setattr(Path, "unlink", interrupted_unlink)
        with pytest.raises(KeyboardInterrupt):
            t.model.save_pretrained(tmp_path / "ck")   # supersedes the checkpoint's trainer state
    model, _, state = load_checkpoint(tmp_path / "ck")   # finishes the journal
    assert state is None
    for n, p in model.named_parameters():
        np.testing.assert_array_equal(p.numpy(), new[n])
