"""Saving and loading models and training runs.

A model directory holds model.safetensors (metadata {"format": "pt"}) and config.json, in lab's own layout or in
Hugging Face's GPT-2 layout (loadable by transformers' GPT2LMHeadModel). A training checkpoint adds the
tokenizer, the optimizer state and trainer_state.json (step, RNG states, config, history), so a resumed run
continues with exactly the losses of an uninterrupted one.

A save writes and replaces only its own files inside the directory (atomic_files), as transformers does: other
files there, and the directory itself, stay as they were; an interrupted save leaves either the previous files or
the new ones, all of them from one save.
"""
import contextlib
import errno
import glob
import json
import math
import os
import secrets
import tempfile
import threading
from pathlib import Path

try:
    import fcntl
except ImportError:   # Windows: no advisory locks; saves into one directory must not overlap
    fcntl = None

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from .checks import InputError, integer, real, show

MODEL_FILE, CONFIG_FILE = "model.safetensors", "config.json"
TOKENIZER_FILE, OPTIMIZER_FILE, STATE_FILE = "tokenizer.json", "optimizer.safetensors", "trainer_state.json"
JOURNAL_FILE = ".lab-save.json"   # present only while a save moves its files in (atomic_files)
# the only names a save removes (stale parts of an earlier save: trainer state without a trainer, an adapter
# without adapters, lora.ADAPTER_FILE and ADAPTER_CONFIG): a journal naming any other file is refused, so a
# planted journal cannot delete a user's files beside a checkpoint
REMOVABLE = frozenset({OPTIMIZER_FILE, STATE_FILE, "adapter_model.safetensors", "adapter_config.json"})


class CheckpointError(InputError):
    """A checkpoint file is missing, corrupt, or does not match the model."""


class NonFiniteSaveError(CheckpointError):
    """A save refused because a tensor holds NaN or Inf: no file was changed."""


# ------------------------------------------------------------------------------------------------ atomic writes
#
# Each new file is written under a temporary name inside the target directory and fsynced; then a journal naming
# them is written (atomically: temp + rename), then each file is renamed over its own name, then the journal goes.
# The journal is what makes several per-file renames one step: a kill before it exists leaves the previous files
# (plus temporaries the next save of those names deletes); a kill after it leaves a journal that the next load or
# save finishes, so model.safetensors is never from one save and trainer_state.json from another.

def _fsync(path, directory=False):
    if directory and not hasattr(os, "O_DIRECTORY"):   # Windows: a directory cannot be opened, nor needs to be
        return
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _plain_name(name):
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and os.sep not in name
            and "\0" not in name)


def _save_name(name):
    """A name a save writes or removes: a plain file name, or one in a subdirectory ("adapter/config.json": export
    writes the adapter with the base in one save, so an interrupted export never pairs a base with another's
    adapter). One level, no '..', no absolute path: a journal cannot reach outside its directory."""
    parts = name.split("/") if isinstance(name, str) else [None]
    return len(parts) <= 2 and all(map(_plain_name, parts)) and name != JOURNAL_FILE


def _removable(name):
    return _save_name(name) and name.rpartition("/")[2] in REMOVABLE


def _journal_pair(name, tmp):
    """A journal's replace entry: the temporary sits beside its file and is named after it."""
    if not (_save_name(name) and _save_name(tmp)):
        return False
    (where, _, base), (tmp_where, _, tmp_base) = name.rpartition("/"), tmp.rpartition("/")
    return where == tmp_where and tmp_base.startswith(f".{base}.tmp-")


class _Staging:
    """The new files of one save, under temporary names in the target directory until the save commits."""

    def __init__(self, directory):
        self.directory, self.files, self.committed, self.mode = directory, {}, False, None
        self.created = []   # subdirectories this save made (removed again if it fails)

    def path(self, name):
        """Where the new content of `name` is written (any writer may use it)."""
        if name not in self.files:
            if not _save_name(name):
                raise ValueError(f"atomic_files: {name!r} is not a file name, nor one in a subdirectory")
            sub, _, base = name.rpartition("/")
            where = self.directory / sub if sub else self.directory
            if sub and (where.is_symlink() or (where.exists() and not where.is_dir())):
                raise CheckpointError(f"{where}: is not a directory, where the save needs to write {base}")
            if not where.exists():
                where.mkdir()
                self.created.append(where)
            for stale in where.glob(f".{glob.escape(base)}.tmp-*"):  # left by a save killed earlier
                stale.unlink(missing_ok=True)
            tmp = where / f".{base}.tmp-{secrets.token_hex(6)}"
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            self.mode = self.mode or os.stat(tmp).st_mode & 0o777   # the usual mode, under the umask
            self.files[name] = tmp
        return self.files[name]

    def write_text(self, name, text):
        self.path(name).write_text(text, encoding="utf-8")

    def write_json(self, name, data):
        _write_json(self.path(name), data)

    def write_tensors(self, name, tensors, metadata=None):
        """Tensors as safetensors; a NaN or Inf refuses the whole save (a loader would refuse the file, and a run
        must not replace its last good checkpoint by a broken one)."""
        for key, value in tensors.items():
            if value.dtype.kind == "f" and not np.isfinite(value).all():
                raise NonFiniteSaveError(f"{self.directory / name}: tensor {key!r} contains NaN or Inf: not saved, "
                                         f"the files already in {self.directory} are kept")
        save_file(tensors, str(self.path(name)), metadata=metadata)


def check_save_target(directory, writable=False):
    """Refuse a save target that cannot be a directory (a file, a link to one, a broken link), before any work
    whose result the save would then lose. Returns it as a Path. writable=True (before a training run) also
    makes sure a directory can be made and written there: a parent that is a file, a read-only place or /proc
    failed only at the save after the training."""
    if not isinstance(directory, (str, os.PathLike)) or directory == "":   # "" would save into the cwd, unasked
        raise InputError(f"a save needs a directory path (a str or pathlib.Path), got {show(directory)}")
    d = Path(directory)
    if d.is_symlink() and not d.exists():
        raise CheckpointError(f"{d}: is a broken symlink (to {os.readlink(d)}): a save needs a directory")
    if d.exists() and not d.is_dir():
        raise CheckpointError(f"{d}: is a file, not a directory: a save writes its files into a directory")
    if writable:
        _probe_writable(d)
    return d


def _probe_writable(d):
    """Make and remove a hidden directory in `d`, or in its nearest existing ancestor when `d` is still to be
    made: what the save will do there, tried now (permissions alone miss a read-only mount, /proc, root's view)."""
    place = d.absolute()
    while not place.exists() and place != place.parent:
        place = place.parent
    if not place.is_dir():
        raise CheckpointError(f"{d}: cannot be made: {place} is a file, not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".lab-probe-", dir=place))
    except OSError as e:
        raise CheckpointError(f"{d}: cannot save there: making a directory in {place} failed "
                              f"({e.strerror or type(e).__name__})") from None


@contextlib.contextmanager
def _locked(d, shared=False):
    """Saves into one directory (from two threads or processes) take turns: each would delete the other's
    temporaries and journal. The lock is on the directory itself, so it leaves no file behind. Loads that read
    several files hold it shared (reading): they wait for a save to finish, and a save waits for them."""
    if fcntl is None:
        yield
        return
    try:
        fd = os.open(d, os.O_RDONLY)
    except PermissionError:   # a directory one may read files from but not list (mode 0711): load unlocked
        if not shared:
            raise
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        except OSError as e:   # a file system without locks (some FUSE and NFS mounts): turns are not kept
            if e.errno not in _NO_LOCKS:
                raise
        yield
    finally:
        os.close(fd)   # releases the lock


_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


_reading = threading.local()   # the directories this thread holds shared (reading), as real paths


def _read_held(d):
    return os.path.realpath(d) in getattr(_reading, "dirs", ())


@contextlib.contextmanager
def reading(directory):
    """Hold `directory` against saves for a load that reads several of its files (config and weights, model and
    optimizer state): without it a save landing between two reads (a run checkpointing in another process) gives
    config.json of one save with model.safetensors of the next, or weights of step k with moments of step k+1.
    An interrupted save is finished first. Re-entrant within a thread (load_checkpoint calls load_pretrained)."""
    d = Path(directory)
    if fcntl is None or _read_held(d) or not d.is_dir():   # a missing directory: the reader says so itself
        yield
        return
    held = _reading.__dict__.setdefault("dirs", set())
    while True:
        finish_interrupted_save(d)
        with _locked(d, shared=True):
            if (d / JOURNAL_FILE).is_file():   # a save killed after its journal, between the two calls above
                continue
            key = os.path.realpath(d)
            held.add(key)
            try:
                yield
            finally:
                held.discard(key)
            return


@contextlib.contextmanager
def atomic_files(directory, remove=()):
    """Context manager for one save into `directory`: yields a staging object whose write_text / write_json /
    write_tensors (or path(name) for any other writer) give the new content of each file; on success every staged
    file replaces its own name at once, and the files named in `remove` (stale parts of an earlier save) go. Any
    other file in the directory, and the directory's mode, are left alone. On an error nothing changes."""
    d = check_save_target(directory)
    if not all(map(_removable, remove)):
        raise ValueError(f"atomic_files: remove={sorted(remove)!r}: a save removes only {sorted(REMOVABLE)}")
    if _read_held(d):   # the save would wait for this thread's own read lock: forever
        raise CheckpointError(f"{d}: is being read by this thread (lab.checkpoint.reading): a save there must wait "
                              f"until the load is done")
    created = not d.exists()
    try:
        d.mkdir(parents=True, exist_ok=True)   # the usual mode, under the umask
    except (FileExistsError, NotADirectoryError):
        raise CheckpointError(f"{d}: cannot create the directory: a part of that path is a file") from None
    staging = _Staging(d)
    try:
        with _locked(d):
            _finish_journal(d)
            yield staging
            _commit(staging, [n for n in remove if n not in staging.files])
    except (OSError, SafetensorError) as e:   # a full disk, a read-only directory: say which save, and what is left
        left = ("its journal is written: the next load or save there completes it" if staging.committed else
                "the files already there are as they were")
        error, reason = (type(e), e.strerror or e) if isinstance(e, OSError) else (OSError, e)
        raise error(*((e.errno,) if getattr(e, "errno", None) else ()), f"{d}: save failed ({reason}); {left}") \
            from None
    finally:
        if not staging.committed:   # after the commit the journal owns the temporaries
            for tmp in staging.files.values():
                tmp.unlink(missing_ok=True)
            for sub in staging.created:
                with contextlib.suppress(OSError):
                    sub.rmdir()
            if created:
                with contextlib.suppress(OSError):
                    d.rmdir()


def _commit(staging, remove):
    d, files = staging.directory, staging.files
    for name in [*files, *remove]:
        if (d / name).is_dir() and not (d / name).is_symlink():
            raise CheckpointError(f"{d / name}: is a directory, where the save needs to write a file")
    for tmp in files.values():
        os.chmod(tmp, staging.mode)   # safetensors' writer recreates its file 0600
        _fsync(tmp)
    journal = {"replace": {name: tmp.relative_to(d).as_posix() for name, tmp in files.items()}, "remove": list(remove)}
    for stale in d.glob(f"{JOURNAL_FILE}.tmp-*"):   # a save killed while writing its journal
        stale.unlink(missing_ok=True)
    tmp = d / f"{JOURNAL_FILE}.tmp-{secrets.token_hex(6)}"
    try:
        tmp.write_text(json.dumps(journal), encoding="utf-8")
        _fsync(tmp)
        os.replace(tmp, d / JOURNAL_FILE)
    finally:
        tmp.unlink(missing_ok=True)
    staging.committed = True
    _fsync(d, directory=True)
    _apply_journal(d, journal)


def _apply_journal(d, journal):
    for name, tmp in journal["replace"].items():
        with contextlib.suppress(FileNotFoundError):   # moved in already, before an interruption
            os.replace(d / tmp, d / name)
    for name in journal["remove"]:
        (d / name).unlink(missing_ok=True)
    for where in {(d / name).parent for name in [*journal["replace"], *journal["remove"]]} - {d}:
        with contextlib.suppress(FileNotFoundError):   # a subdirectory whose only files were removed, or none
            _fsync(where, directory=True)
    _fsync(d, directory=True)
    (d / JOURNAL_FILE).unlink(missing_ok=True)
    _fsync(d, directory=True)


def finish_interrupted_save(directory):
    """Complete a save that was interrupted while it moved its files in (its journal is still there), so the
    directory holds that save whole. Loaders call it before reading; a save calls it before writing."""
    d = Path(directory)
    if (d / JOURNAL_FILE).is_file() and not _read_held(d):   # held: no save can be half done (saves wait for it)
        with _locked(d):
            _finish_journal(d)


def _finish_journal(d):
    path = d / JOURNAL_FILE
    if not path.is_file():   # finished by a save that held the lock first
        return
    try:
        journal = json.loads(path.read_text(encoding="utf-8"))
        replace, remove = journal["replace"], journal["remove"]
        ok = (isinstance(replace, dict) and isinstance(remove, list) and all(map(_removable, remove))
              and all(_journal_pair(n, t) for n, t in replace.items())
              # a save's temporaries are files it wrote; a planted link would make config.json a file elsewhere
              and not any((d / t).is_symlink() for t in replace.values()))
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, RecursionError):
        ok = False
    if not ok:
        raise CheckpointError(f"{path}: damaged save journal: the files of {d} may be from two saves (delete the "
                              f"journal to use them anyway)")
    try:
        _apply_journal(d, journal)
    except OSError as e:
        raise CheckpointError(f"{d}: holds an interrupted save that could not be completed ({e})") from None


def _finite_json(data):
    """JSON has no NaN or Inf: write them as null, as JavaScript does (a NaN loss in the history must not make
    the checkpoint unreadable); read_json refuses the NaN literals other writers emit."""
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        return {k: _finite_json(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite_json(v) for v in data]
    return data


def _write_json(path, data):
    Path(path).write_text(json.dumps(_finite_json(data), indent=2, allow_nan=False), encoding="utf-8")


# ------------------------------------------------------------------------------------------------ reading

def _refuse_nonfinite(text):
    raise ValueError(f"{text} is not a number JSON allows")


def _finite_float(text):
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is beyond the range of a float")
    return value


def _expect_file(path, what):
    """The one check every reader starts with: `path` is a file, in a directory whose interrupted save is done."""
    if path.parent.exists() and not path.parent.is_dir():
        raise CheckpointError(f"{path.parent}: is a file, not a directory (looked for {path.name} in it)")
    finish_interrupted_save(path.parent)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, expected a file")
    if path.exists() and not path.is_file():   # a FIFO would block the reader, a device read forever
        raise CheckpointError(f"{path}: is not a regular file, expected the {what}")
    if not path.is_file():
        raise CheckpointError(f"{path}: {what} not found")


def read_json(path, what):
    path = Path(path)
    _expect_file(path, what)
    try:   # json.loads would take NaN, Infinity and 1e999 and hand them on as numbers
        data = json.loads(path.read_text(encoding="utf-8"), parse_constant=_refuse_nonfinite,
                          parse_float=_finite_float)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _widened(path, header_size, info):
    """A bfloat16 or float16 tensor's raw bytes as float32, exactly: a bfloat16 is the top half of a float32."""
    start, end = info["data_offsets"]
    raw = np.fromfile(path, dtype="<u2", count=(end - start) // 2, offset=8 + header_size + start)
    if info["dtype"] == "F16":
        return raw.view("<f2").astype(np.float32).reshape(info["shape"])
    return (raw.astype(np.uint32) << 16).view(np.float32).reshape(info["shape"])


def read_safetensors(path):
    """All tensors of a safetensors file as numpy arrays, floats as float32 (bfloat16 and float16 widened
    exactly). A file is not trusted: every float must be finite in float32 (a NaN loaded into the optimizer's
    moments would turn the next step's weights into NaN). Errors name the file and the tensor."""
    path = Path(path)
    _expect_file(path, "file")
    out = {}
    try:
        with safe_open(str(path), framework="np") as f:   # validates the header and the offsets
            header = None
            for key in f.keys():
                dtype = f.get_slice(key).get_dtype()
                if dtype in ("BF16", "F16"):   # numpy has no bfloat16: read the raw bytes where the header says
                    if header is None:
                        with open(path, "rb") as fh:
                            size = int.from_bytes(fh.read(8), "little")
                            header = json.loads(fh.read(size))
                    out[key] = _widened(path, size, header[key])
                elif dtype in ("F32", "F64") or not dtype.startswith("F"):
                    out[key] = f.get_tensor(key)
                else:
                    raise CheckpointError(f"{path}: tensor {key!r} has dtype {dtype}, lab reads F64, F32, F16, BF16 "
                                          f"and integer tensors")
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    for key, value in out.items():
        if value.dtype.kind != "f":
            continue
        with np.errstate(over="ignore"):
            narrow = value.astype(np.float32)
        if not np.isfinite(narrow).all():
            beyond = np.isfinite(value).all()
            raise CheckpointError(f"{path}: tensor {key!r} " + ("has values beyond float32's range (largest "
                                  f"{np.abs(value).max():g})" if beyond else "contains NaN or Inf"))
        out[key] = narrow
    return out


def _metadata(path):
    """A safetensors file's metadata (read_safetensors has checked the file)."""
    try:
        with safe_open(str(path), framework="np") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def check_floats(tensors, path):
    """Weights and optimizer moments must be floats (read_safetensors passes integer tensors on, and has checked
    that floats are finite); the error names the file and the tensor."""
    for name, value in tensors.items():
        if value.dtype.kind != "f":
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {value.dtype}, expected a float type")


def mismatch(expected, found):
    """"missing [...], unexpected [...]": every name of `expected` absent from `found` and the reverse, all of them
    (a shortened list can hide the one that differs); "" when the two agree."""
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    return ", ".join(f"{what} {names}" for what, names in (("missing", missing), ("unexpected", extra)) if names)


def _load_into(model, tensors, path):
    """Copy a file's tensors (finite, read_safetensors checked) into the model: they must be floats, then names
    and shapes must match (Module.load_state_dict); every error names the file and the tensor."""
    check_floats(tensors, path)
    model.load_state_dict(tensors, source=str(path), error=CheckpointError)


# ------------------------------------------------------------------------------------------------ GPT-2 layout

def hf_config(cfg):
    """config.json of the GPT-2 layout, as transformers' GPT2Config reads it."""
    return {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size, "n_ctx": cfg.block_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer,
        "n_head": cfg.n_head, "n_inner": None, "activation_function": "gelu_new",
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
        "layer_norm_epsilon": 1e-5, "initializer_range": 0.02, "tie_word_embeddings": True,
        "bos_token_id": cfg.vocab_size - 1, "eos_token_id": cfg.vocab_size - 1,
    }


def _config_from_hf(data, path):
    from .models.transformer import TransformerConfig
    try:
        n_embd = data["n_embd"]
        if data.get("n_inner") is not None and data["n_inner"] != 4 * n_embd:
            raise CheckpointError(f"{path}: n_inner={data['n_inner']} is not supported (lab's MLP is 4 x n_embd)")
        act = data.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise CheckpointError(f"{path}: activation_function {act!r} is not supported (lab uses gelu_new)")
        eps = data.get("layer_norm_epsilon", 1e-5)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or abs(eps - 1e-5) > 1e-12:
            raise CheckpointError(f"{path}: layer_norm_epsilon {eps} is not supported (lab uses 1e-5)")
        if data.get("tie_word_embeddings", True) is False:
            raise CheckpointError(f"{path}: untied output heads are not supported (lab ties the head to wte)")
        # lab's attention always scales scores by 1/sqrt(head_dim): other scalings would load with wrong logits
        for flag, lab_value in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False)):
            if data.get(flag, lab_value) is not lab_value:
                raise CheckpointError(f"{path}: {flag}={json.dumps(data[flag])} is not supported (lab's attention "
                                      f"computes {flag}={json.dumps(lab_value)}: scores scaled by 1/sqrt(head_dim))")
        return TransformerConfig(vocab_size=data["vocab_size"], block_size=data["n_positions"], n_layer=data["n_layer"],
                                 n_head=data["n_head"], n_embd=n_embd, dropout=data.get("resid_pdrop") or 0.0,
                                 bias=True, positions="learned")
    except CheckpointError:  # already names the file (it is a ValueError: keep it from being wrapped again)
        raise
    except KeyError as e:
        raise CheckpointError(f"{path}: GPT-2 config is missing the field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid GPT-2 config ({e})") from None


# ------------------------------------------------------------------------------------------------ models

def _check_size(cfg, tensors, d):
    """Refuse a config that describes a bigger model than the weights file holds, before allocating it: a damaged
    or hostile config.json (n_embd = 10^9) must not make lab allocate more than the file justifies."""
    from .plan.estimator import count_params
    params, _ = count_params(cfg)
    if cfg.positions == "sinusoidal":   # a fixed (block_size, n_embd) table, allocated but not stored
        params += cfg.block_size * cfg.n_embd
    stored = sum(int(np.prod(v.shape)) for v in tensors.values())
    if params > 4 * stored + (1 << 20):  # slack for small mismatches, which the per-tensor check names precisely
        raise CheckpointError(f"{d / CONFIG_FILE}: describes a model of {params:,} parameters, but {d / MODEL_FILE} "
                              f"holds {stored:,} values: the config does not belong to these weights")


def save_pretrained(model, directory, format="lab"):
    """Write model.safetensors + config.json. format="hf" writes the GPT-2 layout transformers loads."""
    if format not in ("lab", "hf"):
        raise InputError(f"unknown format {format!r}: expected 'lab' or 'hf'")
    from .nn import step_lock
    with step_lock(model), atomic_files(directory) as files:   # between a training thread's steps
        _write_model(model, files, format)
    return Path(directory)


def _write_model(model, files, format):
    """Lab's layout holds the whole model: LoRA adapters too, their settings and mode in config.json's "lora", so
    a checkpoint resumes a LoRA run. The GPT-2 layout holds the base only (transformers has no adapters; PEFT's
    format, lab.lora.save_adapter, does), with a merged adapter's update inside its weights."""
    from .lora import checkpoint_config
    cfg = model.config
    lora = checkpoint_config(model) if format == "lab" else None
    tensors = {k: v for k, v in model.state_dict().items() if lora or ".lora_" not in k}
    if format == "lab":
        files.write_tensors(MODEL_FILE, tensors, metadata={"format": "pt"})
        files.write_json(CONFIG_FILE, {"model_type": "lab-transformer", **cfg.to_dict(), **({"lora": lora} if lora
                                                                                              else {})})
        return
    out = {f"transformer.{k}": v for k, v in tensors.items()}
    if cfg.positions == "sinusoidal":  # GPT-2 has a learned table: export the fixed one's values
        out["transformer.wpe.weight"] = model._positions.numpy()
    if not cfg.bias:                    # GPT-2 always has biases: zeros are the same function
        for name, p in model.named_parameters():
            if name.endswith(".weight") and name.rsplit(".", 2)[-2] in ("ln_1", "ln_2", "ln_f", "c_attn", "c_proj", "c_fc"):
                out[f"transformer.{name[:-len('weight')]}bias"] = np.zeros(p.shape[-1], dtype=np.float32)
    files.write_tensors(MODEL_FILE, out, metadata={"format": "pt"})
    files.write_json(CONFIG_FILE, hf_config(cfg))


def load_pretrained(directory):
    """A TransformerLM, in eval mode, from a directory in lab's layout or the GPT-2 layout (from config.json)."""
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise CheckpointError(f"{d}: is a file, not a checkpoint directory (one holding {CONFIG_FILE} and "
                              f"{MODEL_FILE})")
    if not d.is_dir():
        raise CheckpointError(f"{d}: no such checkpoint directory")
    with reading(d):   # config.json and model.safetensors of one save
        return _load_pretrained(d)


def _load_pretrained(d):
    from .models.transformer import TransformerConfig, TransformerLM
    data = read_json(d / CONFIG_FILE, "model config")
    kind = data.get("model_type")
    tensors = read_safetensors(d / MODEL_FILE)
    if kind == "gpt2":
        cfg = _config_from_hf(data, d / CONFIG_FILE)
        if "lm_head.weight" in tensors and not np.array_equal(tensors["lm_head.weight"], tensors.get("transformer.wte.weight")):
            raise CheckpointError(f"{d / MODEL_FILE}: lm_head.weight differs from transformer.wte.weight (untied head)")
        tensors = {k[len("transformer."):] if k.startswith("transformer.") else k: v for k, v in tensors.items()
                   if k != "lm_head.weight" and not k.endswith((".attn.bias", ".attn.masked_bias"))}
    elif kind == "lab-transformer":
        fields = {k: v for k, v in data.items() if k in TransformerConfig.__dataclass_fields__}
        try:
            cfg = TransformerConfig(**fields)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{d / CONFIG_FILE}: invalid model config ({e})") from None
    else:
        raise CheckpointError(f"{d / CONFIG_FILE}: unknown model_type {kind!r} (expected 'lab-transformer' or 'gpt2')")
    _check_size(cfg, tensors, d)
    model = TransformerLM(cfg)
    if kind == "lab-transformer" and data.get("lora") is not None:   # a LoRA run: its adapters are in the file
        from .lora import apply_config
        apply_config(model, data["lora"], d / CONFIG_FILE)
    _load_into(model, tensors, d / MODEL_FILE)
    return model.eval()  # as transformers does: dropout stays off until model.train()


# ------------------------------------------------------------------------------------------------ training runs

def save_checkpoint(directory, model, tokenizer, trainer=None):
    """Model, tokenizer and (with a trainer) optimizer state, step, RNG states and history, atomically. Without a
    trainer, the optimizer and trainer state of an earlier save there are removed: they belong to other weights."""
    with checkpoint_files(directory, model, tokenizer, trainer):
        pass
    return Path(directory)


@contextlib.contextmanager
def checkpoint_files(directory, model, tokenizer, trainer=None, remove=()):
    """save_checkpoint as a save the caller adds files to (atomic_files' staging, yielded), all landing at once:
    import_model writes the adapter beside the model in the same save."""
    from .engine.random import get_state
    if not callable(getattr(tokenizer, "to_json", None)):
        raise InputError(f"save_checkpoint: tokenizer must be a lab tokenizer (CharTokenizer, BPETokenizer: a "
                         f"checkpoint holds the tokenizer its model was trained with), got {show(tokenizer)}")
    if trainer is not None and getattr(trainer, "model", None) is not model:
        raise InputError(f"save_checkpoint: trainer must be the Trainer training this model (its optimizer state "
                         f"belongs to the trainer's model), got {show(trainer)}")
    # between the steps of the model's trainers (nn.step_lock): a trainer stepping in another thread (a panel's)
    # would otherwise change the weights or moments while they are read, mixing step k and step k+1
    from .nn import step_lock
    with step_lock(model), atomic_files(directory, remove=(OPTIMIZER_FILE, STATE_FILE, *remove)) as files:
        _write_model(model, files, "lab")
        files.write_text(TOKENIZER_FILE, tokenizer.to_json())
        if trainer is not None:
            opt = trainer.optimizer
            arrays = {k: opt.backend.to_numpy(a) for k, a in opt.state_arrays().items()}
            files.write_tensors(OPTIMIZER_FILE, arrays, metadata={"format": "pt", "step": str(opt.step_count)})
            files.write_json(STATE_FILE, {
                "step": trainer.step_num, "optimizer_step": opt.step_count, "train_config": trainer.config_dict(),
                "batch_rng": trainer.rng.bit_generator.state, "global_rng": get_state(),
                "seed_rng": trainer.seed_rng.bit_generator.state, "history": trainer.history,
                # a resumed run with early stopping stops where the uninterrupted one would (None: no evaluation yet)
                "early_stopping": {"best_val_loss": trainer.best_val_loss,
                                   "evals_without_gain": trainer._evals_without_gain},
            })
        yield files


def load_tokenizer(path):
    from .data import load_tokenizer_json
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: tokenizer file not found")
    try:
        return load_tokenizer_json(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def load_checkpoint(directory):
    """(model, tokenizer, state) of a training checkpoint; state is None when it holds no trainer state. A
    caller reading more of it (the optimizer state: Trainer.resume) holds reading(directory) across both."""
    with reading(directory):   # model, tokenizer and trainer state of one save
        return _load_checkpoint(Path(directory))


def _load_checkpoint(d):
    model = load_pretrained(d)
    tokenizer = load_tokenizer(d / TOKENIZER_FILE)
    if tokenizer.vocab_size != model.config.vocab_size:
        raise CheckpointError(f"{d / TOKENIZER_FILE}: vocabulary of {tokenizer.vocab_size} tokens, but the model "
                              f"has vocab_size {model.config.vocab_size}")
    state = read_json(d / STATE_FILE, "trainer state") if (d / STATE_FILE).exists() else None
    return model, tokenizer, state


def restore_trainer(trainer, directory, state):
    """Put optimizer moments, step counters, RNG states and history from a checkpoint into `trainer`: all of it is
    checked first, so a checkpoint that does not fit leaves the trainer as it was."""
    from .engine.random import set_state
    d = Path(directory)
    opt = trainer.optimizer
    arrays = _named_state(read_safetensors(d / OPTIMIZER_FILE), opt)
    check_floats(arrays, d / OPTIMIZER_FILE)
    own = opt.state_arrays()
    diff = mismatch(own, arrays)
    if diff:
        raise CheckpointError(f"{d / OPTIMIZER_FILE}: the optimizer state does not match this optimizer's "
                              f"parameters: {diff}")
    for name, target in own.items():
        if tuple(arrays[name].shape) != tuple(target.shape):
            raise CheckpointError(f"{d / OPTIMIZER_FILE}: tensor {name!r} has shape {tuple(arrays[name].shape)}, "
                                  f"expected {tuple(target.shape)}")
    try:
        steps = _checked_steps(state)
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise CheckpointError(f"{d / STATE_FILE}: incomplete or invalid trainer state ({e})") from None
    saved_at = _metadata(d / OPTIMIZER_FILE).get("step")   # written by save_checkpoint since the first version
    if saved_at is not None and saved_at != str(steps[0]):
        raise CheckpointError(f"{d / OPTIMIZER_FILE}: optimizer state of optimizer step {saved_at}, but "
                              f"{d / STATE_FILE} is at optimizer step {steps[0]}: the two files are from different "
                              f"saves (copied from another checkpoint?)")
    try:
        batch_rng, global_rng, seed_rng = (np.random.default_rng() for _ in range(3))
        batch_rng.bit_generator.state, global_rng.bit_generator.state = state["batch_rng"], state["global_rng"]
        # the dropout seeds' stream; a checkpoint saved before trainers had one drew them from the global generator
        seed_rng.bit_generator.state = state.get("seed_rng", state["global_rng"])
        history = state.get("history", [])
        if not isinstance(history, list) or not all(isinstance(r, dict) for r in history):
            raise ValueError(f"history must be a list of records, got {show(history)}")
        stopping = state.get("early_stopping", {"best_val_loss": None, "evals_without_gain": 0})   # older: none
        best = stopping["best_val_loss"]   # JSON has no Infinity: None before the first evaluation
        best = math.inf if best is None else real("early_stopping.best_val_loss", best)
        without_gain = integer("early_stopping.evals_without_gain", stopping["evals_without_gain"], low=0)
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise CheckpointError(f"{d / STATE_FILE}: incomplete or invalid trainer state ({e})") from None
    for name in own:
        opt.load_state_array(name, arrays[name])
    (opt.step_count, trainer.step_num), trainer.history = steps, history
    trainer.best_val_loss, trainer._evals_without_gain = best, without_gain
    trainer.rng.bit_generator.state = batch_rng.bit_generator.state
    trainer.seed_rng.bit_generator.state = seed_rng.bit_generator.state
    set_state(global_rng.bit_generator.state)


def _checked_steps(state):
    """(optimizer_step, step): counts of steps taken, so non-negative integers, and the optimizer steps once per
    trainer step at most (a damaged -1 would make Adam's bias correction divide by zero)."""
    step = integer("step", state["step"], low=0)
    optimizer_step = integer("optimizer_step", state["optimizer_step"], low=0)
    if optimizer_step > step:
        raise ValueError(f"optimizer_step must be <= step, got optimizer_step {optimizer_step} and step {step}")
    for name in ("batch_rng", "global_rng", "seed_rng"):
        rng = state.get(name, {"bit_generator": "PCG64", "state": {"state": 0, "inc": 1}})
        words = rng.get("state") if isinstance(rng, dict) else None
        if (not isinstance(words, dict) or rng.get("bit_generator") != "PCG64"
                or not all(isinstance(words.get(k), int) and 0 <= words[k] < 2**128 for k in ("state", "inc"))):
            raise ValueError(f"{name} must be a numpy PCG64 state, got {show(rng)}")
    return optimizer_step, step


def _named_state(arrays, opt):
    """Checkpoints written before the optimizer state was keyed by parameter name hold m.0, v.0, ... in the
    optimizer's order of parameters (unchanged since): that order gives each its name."""
    keys = [k.split(".", 1) for k in arrays]
    if all(len(k) == 2 and k[1].isdecimal() and int(k[1]) < len(opt.names) for k in keys):
        return {f"{kind}.{opt.names[int(i)]}": v for (kind, i), v in zip(keys, arrays.values())}
    return arrays
