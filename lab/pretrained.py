"""lab.from_pretrained: a model from one name, whatever holds it.

A local directory in Hugging Face's layout (config.json with model.safetensors or a sharded index; GPT-2 and lab's
own layout through TransformerLM's loader), a .gguf file or a directory holding one, the shipped model's short
name, or a Hub id ("org/name") fetched through huggingface_hub's cache (only the files a model needs; offline with
HF_HUB_OFFLINE=1 or local_files_only=True). The family comes from config.json's "architectures"
(lab.models.ARCHITECTURES). Every loader checks the whole file set before it builds the model.
"""
import glob
import os
import re
from pathlib import Path

from . import gguf, nn, shipped
from .checks import InputError, choice, show
from .engine import quant
from .engine.tensor import QuantizedWeight
from .io import INDEX_FILE, PICKLE_WEIGHTS, WEIGHTS_FILE, CheckpointError, index_shards, read_json
from .lora import PACKED
from .models import family, load_pretrained

# what a Hub snapshot needs: config, weights (then the shards an index names), tokenizer, chat template, generation
# settings; never pickles, nor a GGUF repo's dozen quantizations (a GGUF is loaded from its file's path)
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "additional_chat_templates/*.jinja"]   # (named templates: "tool_use", ...)
HUB_FILES = ["config.json", "generation_config.json", WEIGHTS_FILE, INDEX_FILE, *TOKENIZER_FILES]
# HF's rule for a repo id, one namespace required: a bare word is far likelier a mistyped short name
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[\w][\w.-]{0,95}")


def from_pretrained(name_or_path, revision=None, local_files_only=None, base_dtype="float32"):
    """The model `name_or_path` names, in eval mode: a directory in Hugging Face's layout, a .gguf file or a
    directory holding one, a shipped model's short name (lab.shipped), or a Hub id "org/name" (`revision`: a
    branch, tag or commit; `local_files_only=True`, or HF_HUB_OFFLINE set, reads only the local Hub cache).
    The model's `name_or_path` records the source as transformers' does: the Hub id (also for the shipped model's
    GGUF, by name or by its path), else the local path; save_adapter names it as the adapter's base.
    base_dtype "q4" or "int8": every linear layer's weight held packed (nn.QuantizedLinear's weight), a GGUF's
    Q4_0/Q4_1 blocks as they are (no dequantize-requantize), any other weight quantized (q4: as Q4_1)."""
    choice("from_pretrained: base_dtype", base_dtype, ("float32",) + tuple(PACKED))
    path = _locate(name_or_path, revision, local_files_only)
    with nn.packed_weights(PACKED.get(base_dtype)):   # packed as each tensor is read, where the loader builds so
        model = load_local(path, base_dtype)
    # a LoRA checkpoint names the base its adapters were trained on (lora.apply_config), which stays their base
    model.name_or_path = getattr(model, "name_or_path", None) or source_name(name_or_path, path)
    return model


def source_name(name_or_path, path):
    """The Hub id of a shipped model (by its short name or its file) or of a Hub id; else the local path."""
    name = str(name_or_path)
    if name in shipped.SHIPPED:
        return shipped.SHIPPED[name].hub_id
    if not Path(name).expanduser().exists() and REPO_ID.fullmatch(name):
        return name
    for model in shipped.SHIPPED.values():
        try:   # its file, or the package folder that holds it (load_local takes a folder's one .gguf)
            if Path(path).resolve() in (model.path().resolve(), model.path().parent.resolve()):
                return model.hub_id
        except InputError:   # that package is not installed
            pass
    return name


def read_config(name_or_path, revision=None, local_files_only=None):
    """The config.json dict of the model `name_or_path` names (as from_pretrained takes it) and the file it came
    from, reading no weights: a Hub id fetches its config alone, a .gguf its metadata."""
    path = _locate(name_or_path, revision, local_files_only, fetch="config")
    if path.is_dir() and not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) != 1:
            raise CheckpointError(f"{path}: holds no config.json" + (
                f" and several .gguf files, {[g.name for g in ggufs]}: pass the path of one" if ggufs else
                " nor a .gguf file"))
        path = ggufs[0]
    if path.is_file() and path.suffix == ".gguf":
        return gguf.read_config(path), path
    source = path / "config.json" if path.is_dir() else path
    return read_json(source, "model config"), source


def _locate(name_or_path, revision=None, local_files_only=None, fetch="model", caller="from_pretrained"):
    """The local directory or file of a model name (checked by from_pretrained); a Hub id is fetched into the
    cache: the model's files, or ("config", "tokenizer") those alone. `caller` begins each error."""
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path):
        raise InputError(f"{caller}: name_or_path must be a path, a shipped model's name or a Hub id "
                         f"('org/name'), got {show(name_or_path)}")
    if revision is not None and not (isinstance(revision, str) and revision):
        raise InputError(f"{caller}: revision must be a branch, tag or commit name, got {show(revision)}")
    if local_files_only not in (None, True, False):
        raise InputError(f"{caller}: local_files_only must be True, False or None, got "
                         f"{show(local_files_only)}")
    path, name = Path(name_or_path).expanduser(), str(name_or_path)
    local = path.exists() or isinstance(name_or_path, os.PathLike)
    if revision is not None and (local or name in shipped.SHIPPED):
        raise InputError(f"{caller}: revision={revision!r} names a Hub revision, but {name!r} is a "
                         f"{'local path' if local else 'shipped model'} (its files are what loads)")
    if local:
        return path
    if name in shipped.SHIPPED:
        return shipped.path(name)
    if not REPO_ID.fullmatch(name) or ".." in name:
        raise InputError(f"{caller}: {name!r} is not a local path, a shipped model ({', '.join(shipped.SHIPPED)}) "
                         f"nor a Hub id ('org/name')")
    return _hub_snapshot(name, revision, local_files_only, weights=fetch == "model", config=fetch == "config")


def load_local(path, base_dtype="float32"):
    """A model from a local directory or .gguf file, its linear weights packed as `base_dtype` (from_pretrained)."""
    path = Path(path)
    if path.is_file():
        if path.suffix != ".gguf":
            raise CheckpointError(f"{path}: expected a model directory or a .gguf file")
        return _packed_base(_load_gguf(path), base_dtype, path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such model directory or .gguf file")
    if not any((path / name).exists() for name in (WEIGHTS_FILE, INDEX_FILE, *PICKLE_WEIGHTS)):
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _packed_base(_load_gguf(path / ggufs[0]), base_dtype, path / ggufs[0])
        if ggufs:
            raise CheckpointError(f"{path}: holds several .gguf files, {ggufs}: pass the path of the one to load")
        raise CheckpointError(f"{path}: holds no model: expected config.json with {WEIGHTS_FILE} or {INDEX_FILE} "
                              f"(Hugging Face's layout), or a .gguf file")
    return _packed_base(load_pretrained(path), base_dtype)


def _packed_base(model, base_dtype, gguf_path=None):
    """model with each linear layer's weight packed as base_dtype (lora.PACKED), in place; "float32" leaves it.
    A loader that builds with nn.built_and_loaded packed them as it read them (nn.packed_weights); any other's are
    packed here. For q4, a GGUF's Q4_0/Q4_1 tensors then take the file's own blocks: the values they were read as
    (gguf.read_gguf dequantizes those same blocks), never rounded twice."""
    if base_dtype == "float32":
        return model
    blocks = gguf.read_packed(gguf_path) if gguf_path is not None and base_dtype == "q4" else {}
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        raw = blocks.get(f"{name}.weight")
        if raw is not None and raw[1] in ("Q4_0", "Q4_1"):
            qa = quant.from_gguf(*raw)
        elif isinstance(m.weight, QuantizedWeight):
            continue
        else:
            try:
                qa = quant.quantize(m.weight.numpy().T, PACKED[base_dtype])
            except InputError as e:
                raise InputError(f"from_pretrained(..., base_dtype={base_dtype!r}): {name}.weight: {e}") from None
        if isinstance(m.weight, QuantizedWeight):
            m.weight.assign(qa)
        else:
            m.weight = QuantizedWeight(qa, m.weight.backend)
    return model


def _load_gguf(path):
    data, weights = gguf.read_tensors(path)   # each read as it is loaded
    return family(data, path).from_hf(data, weights, config_source=path, weights_source=path)


# ------------------------------------------------------------------------------------------------ the Hub

def _hub_cache():
    """The cache huggingface_hub would use, read now (its constants are read once, at import): HF_HUB_CACHE, else
    HF_HOME/hub."""
    from huggingface_hub import constants
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return constants.HF_HUB_CACHE


def _offline():
    from huggingface_hub import constants
    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return constants.HF_HUB_OFFLINE or any((v or "").upper() in ("1", "ON", "YES", "TRUE") for v in flags)


def _hub_snapshot(repo_id, revision=None, local_files_only=None, weights=True, config=False):
    """The local directory of `repo_id` at `revision` in the Hub cache, downloading the model's files (HUB_FILES;
    weights=False: the tokenizer's alone) unless offline. One CheckpointError naming the id and the revision when
    it cannot be had."""
    try:
        from huggingface_hub import errors, snapshot_download
    except ImportError:
        raise InputError(f"from_pretrained: {repo_id!r} is a Hub id, and loading from the Hub needs the package "
                         f"huggingface_hub (pip install huggingface_hub)") from None
    # HF_HUB_OFFLINE wins over local_files_only=False, as in transformers (is_offline_mode): a machine set offline
    # must not reach the network because one call site passed False
    offline = bool(local_files_only) or _offline()
    rev = revision or "main"
    get = (f"run once online (without HF_HUB_OFFLINE=1 or local_files_only=True), or `huggingface-cli download "
           f"{repo_id}" + (f" --revision {revision}" if revision else "") + "`, or pass a local directory")

    def download(patterns):
        try:
            d = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                       local_files_only=offline, cache_dir=_hub_cache()))
            if d.name == "snapshots":   # an empty refs/<rev> gives the cache's snapshots/ itself
                raise CheckpointError(f"{repo_id} (revision {rev!r}): {Path(_hub_cache()) / ('models--' + repo_id.replace('/', '--'))}"
                                      f"/refs/{rev} names no snapshot (the file is empty or damaged); {get}")
            return d
        except errors.RevisionNotFoundError:
            raise CheckpointError(f"{repo_id}: the Hub has no revision {rev!r} of this model") from None
        except (errors.RepositoryNotFoundError, errors.GatedRepoError) as e:
            raise CheckpointError(f"{repo_id}: no local path of that name, and not found on the Hub, or it needs "
                                  f"access you have not been granted (huggingface-cli login) ({type(e).__name__})") from None
        except getattr(errors, "IncompleteSnapshotError", ()) as e:   # newer huggingface_hub only (pyproject: >=0.30)
            raise CheckpointError(f"{repo_id} (revision {rev!r}): the cached copy is incomplete and the Hub cannot "
                                  f"be reached ({e}); {get}") from None
        except errors.LocalEntryNotFoundError:
            where = ("offline (HF_HUB_OFFLINE=1 or local_files_only=True)" if offline or _offline()
                     else "the Hub cannot be reached")
            raise CheckpointError(f"{repo_id} (revision {rev!r}): no local path of that name, not in the Hub cache "
                                  f"{_hub_cache()} and {where}; {get}") from None
        except (errors.HFValidationError, errors.HfHubHTTPError, OSError) as e:
            raise CheckpointError(f"{repo_id} (revision {rev!r}): could not be fetched from the Hub "
                                  f"({type(e).__name__}: {e}); {get}") from None

    if not weights:   # a tokenizer or a config: never a model's gigabytes
        return download(["config.json"] if config else TOKENIZER_FILES)
    d = download(HUB_FILES)
    if (d / INDEX_FILE).is_file() and not (d / WEIGHTS_FILE).exists():
        # then the shards the index names, and no other .safetensors (a repo may also hold a consolidated copy)
        shards = sorted(index_shards(d / INDEX_FILE))
        d = download([glob.escape(name) for name in shards])
        missing = [name for name in shards if not (d / name).exists()]
        if missing:   # offline, with a download interrupted before the tree listing was cached
            raise CheckpointError(f"{repo_id} (revision {rev!r}): the cached copy lacks {len(missing)} of the "
                                  f"{len(shards)} shards its index names ({missing[0]}, ...); {get}")
    if not any((d / name).exists() for name in (WEIGHTS_FILE, INDEX_FILE)) and not any(d.glob("*.gguf")):
        hint = (f"for a repo of GGUF files pass the path of one: lab.from_pretrained(huggingface_hub."
                f"hf_hub_download({repo_id!r}, 'NAME.gguf'))")
        if offline:   # only the cache was read, which says nothing of what the Hub repo holds: a config-only
            # fetch (read_config), a download cut short, a blob deleted under its link
            gone = [name for name in (WEIGHTS_FILE, INDEX_FILE) if (d / name).is_symlink()]
            raise CheckpointError(f"{repo_id} (revision {rev!r}): the cached copy {d} holds no {WEIGHTS_FILE} or "
                                  f"{INDEX_FILE}" + (f" ({gone[0]} links to a blob that is gone)" if gone else "") +
                                  f"; {get}; {hint}")
        raise CheckpointError(f"{repo_id} (revision {rev!r}): the Hub repo holds no {WEIGHTS_FILE} or {INDEX_FILE}; "
                              f"{hint}")
    return d
