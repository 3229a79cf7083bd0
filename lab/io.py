"""Files written whole and read with suspicion: the generic I/O under checkpoints, pretrained models and adapters.

atomic_files writes a set of files into a directory as one step (temporaries, a journal, renames; saves into one
directory take turns under a lock, loads that read several files hold it shared with `reading`); read_json and
read_safetensors refuse what a hostile or damaged file could hand on (NaN, Inf, pickles, FIFOs). Every error is a
CheckpointError naming the file.
"""
import contextlib
import errno
import glob
import json
import math
import os
import re
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

from .checks import InputError, integer, show

JOURNAL_FILE = ".lab-save.json"   # present only while a save moves its files in (atomic_files)
# the only names a save removes (stale parts of an earlier save: checkpoint.OPTIMIZER_FILE and STATE_FILE without a
# trainer, lora.ADAPTER_FILE and ADAPTER_CONFIG without adapters): a journal naming any other file is refused, so a
# planted journal cannot delete a user's files beside a checkpoint
TRAINING_STATE_FILES = ("optimizer.safetensors", "trainer_state.json")   # checkpoint.OPTIMIZER_FILE, STATE_FILE
REMOVABLE = frozenset({*TRAINING_STATE_FILES, "adapter_model.safetensors",
                       "adapter_config.json",
                       # a pretrained tokenizer's files that transformers reads over tokenizer_config.json: a save of
                       # a tokenizer without them removes an earlier tokenizer's (lab.data.pretrained)
                       "chat_template.jinja", "special_tokens_map.json",
                       # an export's copy of lab's tokenizer, read first: a checkpoint saved there replaces it
                       "lab_tokenizer.json",
                       # a sharded save's index, superseded by a model.safetensors written beside it (_Staging)
                       "model.safetensors.index.json"})
# transformers' shard names (model-00001-of-00004.safetensors): its save_pretrained removes those of an earlier save
SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


# a model directory in Hugging Face's layout holds its weights in one of these (read_weights)
WEIGHTS_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
GENERATION_FILE = "generation_config.json"


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
    base = name.rpartition("/")[2] if isinstance(name, str) else None
    return _save_name(name) and (base in REMOVABLE or bool(SHARD_NAME.fullmatch(base)))


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
        self.removed = set()   # stale files this save's content supersedes (removed when it commits)
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
        if name == WEIGHTS_FILE:
            # an earlier sharded save there is another model's weights: a reader that falls back to the index (or
            # a user who deletes model.safetensors) must not get them as this model's, and their gigabytes go
            self.removed.update(p.name for p in self.directory.iterdir()
                                if p.name == INDEX_FILE or SHARD_NAME.fullmatch(p.name))
            # so are an earlier checkpoint's optimizer moments and trainer state: Trainer.resume would go on with
            # them on these weights (a save_checkpoint with a trainer writes its own, which then stay)
            self.removed.update(TRAINING_STATE_FILES)


def directory_path(directory, what):
    """`directory` as a Path; anything else is refused (Path() would raise a bare TypeError, and "" is the cwd,
    unasked)."""
    if not isinstance(directory, (str, os.PathLike)) or directory == "":
        raise InputError(f"a {what} needs a directory path (a str or pathlib.Path), got {show(directory)}")
    return Path(directory)


def check_save_target(directory, writable=False):
    """Refuse a save target that cannot be a directory (a file, a link to one, a broken link), before any work
    whose result the save would then lose. Returns it as a Path. writable=True (before a training run) also
    makes sure a directory can be made and written there: a parent that is a file, a read-only place or /proc
    failed only at the save after the training."""
    d = directory_path(directory, "save")
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
    d = directory_path(directory, "load")
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
            _commit(staging, [n for n in {*remove, *staging.removed} if n not in staging.files])
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
        # committed before the rename: a Ctrl-C during it is raised as the call returns, the journal in place and
        # naming the temporaries, and a failed save's cleanup deleting them would leave the journal's removals
        # alone to apply to the old files (a Ctrl-C before the rename leaves hidden temporaries the next save clears)
        staging.committed = True
        try:
            os.replace(tmp, d / JOURNAL_FILE)
        except OSError:   # no journal: the temporaries are the cleanup's again
            staging.committed = False
            raise
    finally:
        tmp.unlink(missing_ok=True)
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


def _unique_keys(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"key {next(k for k in keys if keys.count(k) > 1)!r} appears twice in one object")
    return dict(pairs)


def read_json(path, what, unique_keys=False):
    """A JSON object from `path`; unique_keys refuses an object naming a key twice (json keeps the last silently:
    a weight map naming a tensor twice would hide which shard holds it)."""
    path = Path(path)
    _expect_file(path, what)
    try:   # json.loads would take NaN, Infinity and 1e999 and hand them on as numbers
        data = json.loads(path.read_text(encoding="utf-8"), parse_constant=_refuse_nonfinite,
                          parse_float=_finite_float, object_pairs_hook=_unique_keys if unique_keys else None)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


class LazyTensor:
    """A tensor of a weights file, read when its values are asked for (np.asarray): loaders hand these on so a
    model's weights go from the file into its parameters one at a time, never all held beside the model. shape and
    dtype are as it will be read (floats: float32); .T reads its transpose."""
    __slots__ = ("shape", "dtype", "_read")

    def __init__(self, shape, dtype, read):
        self.shape, self.dtype, self._read = tuple(int(n) for n in shape), np.dtype(dtype), read

    @property
    def ndim(self):
        return len(self.shape)

    @property
    def T(self):
        return LazyTensor(self.shape[::-1], self.dtype, lambda: self._read().T)

    def __array__(self, dtype=None, copy=None):
        a = self._read()   # a new array each time: no copy of anything to avoid
        return a if dtype is None else a.astype(dtype, copy=False)

    def __repr__(self):
        return f"LazyTensor(shape={self.shape}, dtype={self.dtype})"


# safetensors' integer dtypes (floats are read as float32)
_INT_DTYPES = {"BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "U16": np.uint16, "I16": np.int16, "U32": np.uint32,
               "I32": np.int32, "U64": np.uint64, "I64": np.int64}


def _widened(path, header_size, info):
    """A bfloat16 or float16 tensor's raw bytes as float32, exactly: a bfloat16 is the top half of a float32."""
    start, end = info["data_offsets"]
    raw = np.fromfile(path, dtype="<u2", count=(end - start) // 2, offset=8 + header_size + start)
    if info["dtype"] == "F16":
        return raw.view("<f2").astype(np.float32).reshape(info["shape"])
    return (raw.astype(np.uint32) << 16).view(np.float32).reshape(info["shape"])


def read_safetensors(path, lazy=False):
    """All tensors of a safetensors file as numpy arrays, floats as float32 (bfloat16 and float16 widened
    exactly). A file is not trusted: every float must be finite in float32 (a NaN loaded into the optimizer's
    moments would turn the next step's weights into NaN). Errors name the file and the tensor. lazy=True: the
    header is checked now and each tensor read (and checked) when asked for (LazyTensor), by its own opening of
    the file, so only that tensor's pages of the file's memory map are ever resident."""
    path = Path(path)
    _expect_file(path, "file")
    try:
        with safe_open(str(path), framework="np") as f:   # validates the header and the offsets
            kinds = {key: (f.get_slice(key).get_dtype(), f.get_slice(key).get_shape()) for key in f.keys()}
        for key, (dtype, _) in kinds.items():
            if dtype not in ("F64", "F32", "F16", "BF16") and dtype not in _INT_DTYPES:
                raise CheckpointError(f"{path}: tensor {key!r} has dtype {dtype}, lab reads F64, F32, F16, BF16 "
                                      f"and integer tensors")
        header = None
        if any(dtype in ("BF16", "F16") for dtype, _ in kinds.values()):   # numpy has no bfloat16: raw bytes
            with open(path, "rb") as fh:
                size = int.from_bytes(fh.read(8), "little")
                header = (size, json.loads(fh.read(size)))
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if lazy:
        return {key: LazyTensor(shape, _INT_DTYPES.get(dtype, np.float32),
                                lambda key=key: _read_tensors(path, [key], header)[key])
                for key, (dtype, shape) in kinds.items()}
    return _read_tensors(path, list(kinds), header)


def _read_tensors(path, keys, header):
    """Tensors `keys` of a safetensors file read_safetensors has checked, floats as finite float32."""
    out = {}
    try:
        with safe_open(str(path), framework="np") as f:
            for key in keys:
                if f.get_slice(key).get_dtype() in ("BF16", "F16"):
                    out[key] = _widened(path, header[0], header[1][key])
                else:
                    out[key] = f.get_tensor(key)
    except (SafetensorError, OSError, ValueError, TypeError, KeyError) as e:   # (changed since it was checked)
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    for key, value in out.items():
        if value.dtype.kind != "f":
            continue
        with np.errstate(over="ignore"):
            narrow = value.astype(np.float32, copy=False)
        if not np.isfinite(narrow).all():
            beyond = np.isfinite(value).all()
            raise CheckpointError(f"{path}: tensor {key!r} " + ("has values beyond float32's range (largest "
                                  f"{np.abs(value).max():g})" if beyond else "contains NaN or Inf"))
        out[key] = narrow
    return out


def weights_file(directory):
    """The file read_weights reads first in `directory` (model.safetensors, else the sharded index): the one its
    callers name in errors about the weights."""
    d = Path(directory)
    return d / INDEX_FILE if not (d / WEIGHTS_FILE).exists() and (d / INDEX_FILE).exists() else d / WEIGHTS_FILE


def read_weights(directory, lazy=False):
    """The tensors of a model directory in Hugging Face's layout, by HF name: model.safetensors, or else the shards
    that model.safetensors.index.json maps (transformers' precedence). The index is checked against the shards
    before anything is handed on: every shard it names exists (a plain file name beside it), every tensor it maps
    is in that shard, no shard holds a tensor the index does not map to it. Errors name the file. lazy=True:
    LazyTensors (read_safetensors), read when the loader asks, under the same `reading` hold."""
    d = Path(directory)
    if (d / WEIGHTS_FILE).exists() or not (d / INDEX_FILE).exists():
        if not (d / WEIGHTS_FILE).exists() and any((d / name).exists() for name in PICKLE_WEIGHTS):
            found = next(name for name in PICKLE_WEIGHTS if (d / name).exists())
            raise CheckpointError(f"{d / found}: PyTorch pickle weights are not loaded (unpickling a file can run "
                                  f"any code in it); convert them to safetensors where you trust the file, e.g. "
                                  f"transformers' AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out), "
                                  f"which writes {WEIGHTS_FILE}")
        return read_safetensors(d / WEIGHTS_FILE, lazy)
    index = d / INDEX_FILE
    shards = index_shards(index)
    missing = sorted(s for s in shards if not (d / s).exists())
    if missing:
        more = f" and {len(missing) - 20:,} more" if len(missing) > 20 else ""   # a hostile index may name 10^5
        raise CheckpointError(f"{index}: names shards that are not in {d}: {missing[:20]}{more}")
    out = {}
    for shard, names in shards.items():
        tensors = read_safetensors(d / shard, lazy)
        if set(tensors) != names:
            raise CheckpointError(f"{d / shard}: does not hold the tensors {index.name} maps to it: "
                                  f"{mismatch(names, tensors)}")
        out.update(tensors)
    return out


def index_shards(index):
    """{shard file name: the tensor names it holds} of a sharded index, each shard a plain .safetensors name beside
    the index (never a path out of its directory)."""
    weight_map = read_json(index, "sharded weights index", unique_keys=True).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: expected a non-empty object \"weight_map\" (tensor name -> shard file), "
                              f"got {show(weight_map)}")
    shards = {}
    for name, shard in weight_map.items():
        if not (_plain_name(shard) and shard.endswith(".safetensors")):
            raise CheckpointError(f"{index}: tensor {name!r} maps to {show(shard)}, expected the file name of a "
                                  f".safetensors shard in {Path(index).parent}")
        shards.setdefault(shard, set()).add(name)
    return shards


def with_generation_config(data, directory):
    """config.json's fields with generation_config.json's token ids: its eos_token_id (an id or a list) is what
    transformers' generate stops at, so it replaces config.json's; bos and pad fill in what config.json lacks.
    The model keeps them in model.config, where lab.generate reads them."""
    path = Path(directory) / GENERATION_FILE
    if not path.exists():
        return data
    gen = read_json(path, "generation config")
    vocab = data.get("vocab_size")
    bound = vocab - 1 if isinstance(vocab, int) and not isinstance(vocab, bool) and vocab > 0 else None
    out = dict(data)
    for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
        value = gen.get(key)
        if value is None or (key != "eos_token_id" and data.get(key) is not None):
            continue
        try:
            ids = [integer(key, v, 0, bound) for v in (value if isinstance(value, list) and value else [value])]
        except InputError as e:
            raise CheckpointError(f"{path}: {e}") from None
        out[key] = ids if isinstance(value, list) else ids[0]
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
