"""lab.from_pretrained: HF directories (single and sharded, float32/16 and bfloat16), the Hub cache offline, the
shipped model, generation_config.json, and one clear error per bad input naming the file. No test uses the network:
each Hub test lays out a cache on disk and sets HF_HUB_OFFLINE=1."""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import lab
from lab.checks import InputError
from lab.io import CheckpointError, read_weights, with_generation_config
from lab.pretrained import from_pretrained

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=1000, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=3,
            num_key_value_heads=1, head_dim=10, max_position_embeddings=32, rms_norm_eps=1e-5, rope_theta=10000.0)


def _hf_model(kind="llama", tie=False, **over):
    torch.manual_seed(0)
    if kind == "qwen2":
        cfg = transformers.Qwen2Config(**{**TINY, **over}, tie_word_embeddings=tie)
        return transformers.Qwen2ForCausalLM(cfg).eval()
    cfg = transformers.LlamaConfig(**{**TINY, **over}, tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg).eval()


def _state(model):
    return {k: v.float().numpy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """Directories transformers itself wrote: a single float32 file, and sharded ones (200KB shards) in float32,
    float16 (Llama) and bfloat16 (Qwen2, untied); with the model that wrote each."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name, dtype, shard, kind in (("single", torch.float32, None, "llama"), ("sharded", torch.float32, "200KB", "llama"),
                                     ("f16", torch.float16, "200KB", "llama"), ("bf16", torch.bfloat16, "200KB", "qwen2")):
        model = _hf_model(kind).to(dtype)
        kw = {"max_shard_size": shard} if shard else {}
        model.save_pretrained(root / name, **kw)
        out[name] = (root / name, model)
    return out


def _copy(src, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------------------------------ weights

@pytest.mark.parametrize("name", ["single", "sharded", "f16", "bf16"])
def test_read_weights_gives_every_tensor_of_single_and_sharded_directories_exactly(hf_dirs, name):
    d, model = hf_dirs[name]
    if name in ("sharded", "f16", "bf16"):
        assert (d / "model.safetensors.index.json").exists() and len(list(d.glob("*.safetensors"))) >= 2
    got, want = read_weights(d), _state(model)
    want.pop("lm_head.weight", None) if "lm_head.weight" not in got else None
    assert sorted(got) == sorted(want)
    for k, v in want.items():   # f16 and bf16 widen exactly: equal bit for bit to torch's own widening
        assert got[k].dtype == np.float32 and np.array_equal(got[k], v), k


def _index(d):
    return json.loads((d / "model.safetensors.index.json").read_text())


def _write_index(d, index):
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


def test_sharded_index_naming_a_missing_shard_is_refused_naming_it(hf_dirs, tmp_path):
    d = _copy(hf_dirs["sharded"][0], tmp_path)
    shard = sorted(set(_index(d)["weight_map"].values()))[1]
    (d / shard).unlink()
    with pytest.raises(CheckpointError, match=f"model.safetensors.index.json: names shards that are not in .*{shard}"):
        read_weights(d)


def test_sharded_index_naming_many_missing_shards_lists_twenty_and_counts_the_rest(hf_dirs, tmp_path):
    d = _copy(hf_dirs["sharded"][0], tmp_path)
    _write_index(d, {"weight_map": {f"t{i}": f"s{i:05}.safetensors" for i in range(10 ** 4)}})
    with pytest.raises(CheckpointError, match=r"names shards that are not in .*'s00019.safetensors'\] and 9,980 more$"):
        read_weights(d)


def test_sharded_index_mapping_a_tensor_its_shard_lacks_is_refused(hf_dirs, tmp_path):
    d = _copy(hf_dirs["sharded"][0], tmp_path)
    index = _index(d)
    shards = sorted(set(index["weight_map"].values()))
    name = next(k for k, v in index["weight_map"].items() if v == shards[0])
    index["weight_map"][name] = shards[1]   # moved in the index only: shard 1 lacks it, shard 0 holds it unmapped
    _write_index(d, index)
    # whichever shard is read first is named: shard 0 holds it unmapped, shard 1 lacks it
    with pytest.raises(CheckpointError, match=rf"({shards[0]}|{shards[1]}): does not hold the tensors .*'{name}'"):
        read_weights(d)


def test_sharded_index_with_a_shard_holding_an_unmapped_tensor_is_refused(hf_dirs, tmp_path):
    d = _copy(hf_dirs["sharded"][0], tmp_path)
    index = _index(d)
    name = sorted(index["weight_map"])[3]
    shard = index["weight_map"].pop(name)
    _write_index(d, index)
    with pytest.raises(CheckpointError, match=rf"{shard}: does not hold the tensors .*unexpected \['{name}'\]"):
        read_weights(d)


def test_sharded_index_naming_a_tensor_twice_is_refused(hf_dirs, tmp_path):
    d = _copy(hf_dirs["sharded"][0], tmp_path)
    text = (d / "model.safetensors.index.json").read_text()
    name, shard = next(iter(_index(d)["weight_map"].items()))
    other = sorted(set(_index(d)["weight_map"].values()) - {shard})[0]
    text = text.replace('"weight_map": {', f'"weight_map": {{"{name}": "{other}", ', 1)
    (d / "model.safetensors.index.json").write_text(text)
    with pytest.raises(CheckpointError, match=f"index.json: not valid JSON .*{name}.* appears twice"):
        read_weights(d)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/x.safetensors", "x.bin", 3, None])
def test_sharded_index_naming_a_file_outside_its_directory_or_not_a_shard_is_refused(hf_dirs, tmp_path, shard):
    d = _copy(hf_dirs["sharded"][0], tmp_path)
    index = _index(d)
    index["weight_map"][next(iter(index["weight_map"]))] = shard
    _write_index(d, index)
    with pytest.raises(CheckpointError, match="index.json: tensor .* expected the file name of a .safetensors shard"):
        read_weights(d)


@pytest.mark.parametrize("weight_map", [None, {}, [], "model.safetensors"])
def test_sharded_index_without_a_weight_map_is_refused(hf_dirs, tmp_path, weight_map):
    d = _copy(hf_dirs["sharded"][0], tmp_path)
    _write_index(d, {"metadata": {}, **({} if weight_map is None else {"weight_map": weight_map})})
    with pytest.raises(CheckpointError, match='index.json: expected a non-empty object "weight_map"'):
        read_weights(d)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "pytorch_model.bin.index.json"])
def test_pickle_only_directory_is_refused_saying_to_convert_to_safetensors(hf_dirs, tmp_path, name):
    d = _copy(hf_dirs["single"][0], tmp_path)
    (d / "model.safetensors").unlink()
    (d / name).write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError, match=f"{name}: PyTorch pickle weights are not loaded .*safetensors"):
        from_pretrained(d)


# ------------------------------------------------------------------------------------------------ bad configs

def test_config_that_is_not_json_is_refused_naming_the_file(hf_dirs, tmp_path):
    d = _copy(hf_dirs["single"][0], tmp_path)
    (d / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], ')
    with pytest.raises(CheckpointError, match=r"config.json: not valid JSON"):
        from_pretrained(d)


def test_directory_without_a_model_is_refused_naming_what_it_looked_for(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=f"{tmp_path}: holds no model: expected config.json with "
                                              f"model.safetensors or model.safetensors.index.json"):
        from_pretrained(tmp_path)


def test_directory_with_several_gguf_files_asks_which(tmp_path):
    for name in ("a.Q4_0.gguf", "a.Q8_0.gguf"):
        (tmp_path / name).write_bytes(b"GGUF")
    with pytest.raises(CheckpointError, match=r"several .gguf files, \['a.Q4_0.gguf', 'a.Q8_0.gguf'\]"):
        from_pretrained(tmp_path)


@pytest.mark.parametrize("bad", [3, None, "", b"org/name", ["org/name"]])
def test_name_that_is_not_a_string_or_path_is_refused(bad):
    with pytest.raises(InputError, match="name_or_path must be a path, a shipped model's name or a Hub id"):
        from_pretrained(bad)


def test_revision_given_with_a_local_path_or_a_shipped_model_is_refused(hf_dirs):
    with pytest.raises(InputError, match="revision='v2' names a Hub revision, but .* is a local path"):
        from_pretrained(hf_dirs["single"][0], revision="v2")
    with pytest.raises(InputError, match="revision='v2' names a Hub revision, but 'smollm2-135m-instruct' is a "
                                         "shipped model"):
        from_pretrained("smollm2-135m-instruct", revision="v2")


# ------------------------------------------------------------------------------------------------ the Hub cache

def _hub_cache(root, repo_id, snapshots, refs):
    """A Hub cache as huggingface_hub lays it out: blobs, snapshots/<commit>/ of links to them, refs/<name>."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    for commit, files in snapshots.items():
        snap = repo / "snapshots" / commit
        snap.mkdir(parents=True)
        for src in files:
            blob = repo / "blobs" / f"{commit[:8]}-{src.name}"
            blob.parent.mkdir(exist_ok=True)
            shutil.copyfile(src, blob)
            (snap / src.name).symlink_to(Path("../..") / "blobs" / blob.name)
    for ref, commit in refs.items():
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return repo


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


A, B = "a" * 40, "b" * 40


def test_hub_id_resolves_to_its_cached_snapshot_offline_and_a_revision_to_another(hf_dirs, offline_cache):
    from lab.pretrained import _hub_snapshot
    single, sharded = hf_dirs["single"][0], hf_dirs["sharded"][0]
    _hub_cache(offline_cache, "org/tiny", {A: sorted(single.iterdir()), B: sorted(sharded.iterdir())},
               {"main": A, "v2": B})
    assert _hub_snapshot("org/tiny") == offline_cache / "models--org--tiny" / "snapshots" / A
    assert _hub_snapshot("org/tiny", revision="v2") == offline_cache / "models--org--tiny" / "snapshots" / B
    assert _hub_snapshot("org/tiny", revision=B) == offline_cache / "models--org--tiny" / "snapshots" / B
    got = read_weights(_hub_snapshot("org/tiny", revision="v2"))
    assert np.array_equal(got["model.norm.weight"], _state(hf_dirs["sharded"][1])["model.norm.weight"])


@pytest.mark.parametrize("revision", [None, "v9"])
def test_hub_id_not_in_the_cache_offline_is_one_error_naming_the_id_and_how_to_get_it(offline_cache, revision):
    with pytest.raises(CheckpointError) as e:
        from_pretrained("org/absent", revision=revision)
    msg = str(e.value)
    for part in ("org/absent", f"revision {revision or 'main'!r}", "not in the Hub cache", str(offline_cache),
                 "HF_HUB_OFFLINE=1", f"huggingface-cli download org/absent", "or pass a local directory"):
        assert part in msg, (part, msg)


def test_local_files_only_reads_the_cache_without_hf_hub_offline(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError, match="org/absent .*not in the Hub cache .*local_files_only=True"):
        from_pretrained("org/absent", local_files_only=True)


@pytest.mark.parametrize("name", ["smolm2", "not/a/repo", "org/..", "-org/x", "org/name with space"])
def test_name_neither_path_nor_hub_id_is_refused_listing_the_shipped_models(name, offline_cache):
    from lab import shipped
    with pytest.raises(InputError, match="is not a local path, a shipped model") as e:
        from_pretrained(name)
    assert all(short in str(e.value) for short in shipped.SHIPPED)


# ------------------------------------------------------------------------------------------------ generation config

def test_generation_config_eos_replaces_config_eos_and_fills_bos_and_pad(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7], "bos_token_id": 1,
                                                                  "pad_token_id": 5, "temperature": 0.7}))
    data = {"vocab_size": 61, "bos_token_id": 0, "eos_token_id": 2}
    assert with_generation_config(data, tmp_path) == {"vocab_size": 61, "bos_token_id": 0, "eos_token_id": [2, 7],
                                                       "pad_token_id": 5}
    assert with_generation_config(data, tmp_path / "none") is data


@pytest.mark.parametrize("bad", [61, -1, "2", [2, None], 1.5, True])
def test_generation_config_with_a_bad_token_id_is_refused_naming_the_file(tmp_path, bad):
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": bad}))
    with pytest.raises(CheckpointError, match="generation_config.json: eos_token_id must be an integer >= 0 and <= 60"):
        with_generation_config({"vocab_size": 61}, tmp_path)


# ------------------------------------------------------------------------------------------------ end to end

def _logits_equal(model, hf, ids, atol=1e-4):
    logits = model(lab.tensor(ids))   # without targets: the logits alone
    with torch.no_grad():
        want = hf.float()(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(logits.numpy(), want, atol=atol, rtol=0)   # float32 sums in another order


IDS = np.array([[3, 17, 999, 0, 42, 5, 7]])


@pytest.mark.parametrize("name", ["single", "sharded", "f16", "bf16"])
def test_from_pretrained_loads_what_transformers_wrote_with_equal_logits(hf_dirs, name, numpy_backend):
    d, hf = hf_dirs[name]
    with lab.engine.backend.using_backend(numpy_backend):
        model = from_pretrained(d)
        assert type(model) is lab.LlamaLM and model.config.architecture == type(hf).__name__
        _logits_equal(model, hf, IDS)


@pytest.mark.parametrize("name", ["single", "bf16"])
def test_config_naming_no_architectures_loads_as_its_model_type_as_transformers_does(hf_dirs, tmp_path, name,
                                                                                   numpy_backend):
    # a hand-written config.json with model_type alone: transformers' AutoModelForCausalLM loads it; lab said
    # "unknown model_type 'llama' (expected 'lab-transformer' or 'gpt2')"
    d, hf = hf_dirs[name]
    d = _copy(d, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["architectures"]
    (d / "config.json").write_text(json.dumps(cfg))
    with lab.engine.backend.using_backend(numpy_backend):
        model = from_pretrained(d)
        assert type(model) is lab.LlamaLM and model.config.architecture == type(hf).__name__
        _logits_equal(model, hf, IDS)


@pytest.mark.parametrize("window", [{"max_window_layers": 3}, {"max_window_layers": 0, "layer_types": ["full_attention"] * 3}])
def test_qwen2_sliding_window_switched_on_for_no_layer_loads_as_full_attention(hf_dirs, tmp_path, window, numpy_backend):
    # Qwen2 slides only the layers from max_window_layers on (or those layer_types names): with none, transformers
    # attends in full, and lab refused the file as sliding-window attention; one layer that slides is still refused
    d = _copy(hf_dirs["bf16"][0], tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("layer_types", None)
    (d / "config.json").write_text(json.dumps({**cfg, "use_sliding_window": True, "sliding_window": 4, **window}))
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    assert set(hf.config.layer_types) == {"full_attention"}
    with lab.engine.backend.using_backend(numpy_backend):
        _logits_equal(from_pretrained(d), hf, IDS)   # 7 tokens: a window of 4 would change them
    (d / "config.json").write_text(json.dumps({**cfg, "use_sliding_window": True, "sliding_window": 4,
                                               "max_window_layers": 2}))
    with pytest.raises(CheckpointError, match="sliding_window=4 is smaller than max_position_embeddings=32"):
        from_pretrained(d)


def test_from_pretrained_of_a_sharded_directory_on_both_backends(hf_dirs, use_backend):
    d, hf = hf_dirs["sharded"]
    _logits_equal(from_pretrained(d), hf, IDS[:, :4])


@pytest.mark.parametrize("name", ["f16", "bf16"])   # Llama and Qwen2, both sharded by transformers
def test_save_pretrained_round_trips_through_transformers_with_equal_logits(hf_dirs, tmp_path, numpy_backend, name):
    with lab.engine.backend.using_backend(numpy_backend):
        model = from_pretrained(hf_dirs[name][0])
        model.save_pretrained(tmp_path / "out")
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
        _logits_equal(model, back, IDS)
        _logits_equal(from_pretrained(tmp_path / "out"), back, IDS)


def test_hub_id_loads_from_the_cache_offline_with_a_revision(hf_dirs, offline_cache, numpy_backend):
    single, sharded = hf_dirs["single"], hf_dirs["bf16"]
    _hub_cache(offline_cache, "org/tiny", {A: sorted(single[0].iterdir()), B: sorted(sharded[0].iterdir())},
               {"main": A, "v2": B})
    with lab.engine.backend.using_backend(numpy_backend):
        _logits_equal(from_pretrained("org/tiny"), single[1], IDS)
        _logits_equal(from_pretrained("org/tiny", revision="v2"), sharded[1], IDS)


def test_generation_config_eos_reaches_the_loaded_models_config_and_survives_a_save(hf_dirs, tmp_path, numpy_backend):
    d = _copy(hf_dirs["single"][0], tmp_path)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7], "bos_token_id": 1}))
    with lab.engine.backend.using_backend(numpy_backend):
        model = from_pretrained(d)
        assert model.config.eos_token_id == [2, 7]
        model.save_pretrained(tmp_path / "out")
        assert from_pretrained(tmp_path / "out").config.eos_token_id == [2, 7]
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert back.generation_config.eos_token_id == [2, 7]   # transformers' generate stops there too


@pytest.mark.parametrize("edit,message", [
    ({"architectures": ["BertForMaskedLM"]}, "architecture BertForMaskedLM is not supported: lab loads LlamaForCausalLM"),
    ({"architectures": "LlamaForCausalLM"}, '"architectures" must be a list of model class names'),
    ({"architectures": ["Foo", "LlamaForCausalLM"]}, "architecture Foo is not supported"),   # the first counts
    ({"num_attention_heads": 5}, "num_attention_heads"),
    ({"num_key_value_heads": 2}, "num_key_value_heads"),
    ({"hidden_size": 3 * 10 ** 6}, "describes a model of .* parameters, but .*model.safetensors holds"),
])
def test_bad_config_is_one_error_naming_the_file(hf_dirs, tmp_path, edit, message):
    d = _copy(hf_dirs["single"][0], tmp_path)
    data = {**json.loads((d / "config.json").read_text()), **edit}
    data.pop("head_dim") if "num_attention_heads" in edit else None   # head_dim would hide the division
    (d / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=message) as e:
        from_pretrained(d)
    assert str(d / "config.json") in str(e.value)


def test_generate_stops_at_the_eos_of_generation_config(hf_dirs, tmp_path, numpy_backend):
    d = _copy(hf_dirs["single"][0], tmp_path)
    with lab.engine.backend.using_backend(numpy_backend):
        free = list(lab.generate(from_pretrained(d), [3, 17], 8, greedy=True, eos_token_id=[]))
        eos = next(t for i, t in enumerate(free) if t not in free[:i] and i >= 2)
        (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [int(eos)]}))
        assert list(lab.generate(from_pretrained(d), [3, 17], 8, greedy=True)) == free[:free.index(eos)]


def test_gpt2_directories_load_as_transformer_lm(tmp_path, numpy_backend):
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2,
                                                              n_head=2)).eval()
    hf.save_pretrained(tmp_path / "gpt2", max_shard_size="20KB")   # sharded: the GPT-2 loader reads the index too
    assert (tmp_path / "gpt2" / "model.safetensors.index.json").exists()
    with lab.engine.backend.using_backend(numpy_backend):
        model = from_pretrained(tmp_path / "gpt2")
        assert type(model) is lab.TransformerLM
        _logits_equal(model, hf, IDS[:, :5] % 50)


def test_hub_snapshot_fetches_the_model_files_then_only_the_shards_its_index_names(hf_dirs, tmp_path, monkeypatch):
    import fnmatch
    import huggingface_hub
    from lab.pretrained import HUB_FILES, _hub_snapshot
    remote = _copy(hf_dirs["sharded"][0], tmp_path)
    for extra in ("consolidated.safetensors", "pytorch_model.bin", "model.Q4_0.gguf", "README.md"):
        (remote / extra).write_bytes(b"not fetched")
    asked = []

    def snapshot_download(repo_id, revision, allow_patterns, local_files_only, cache_dir):   # the Hub, as files
        asked.append(allow_patterns)
        snap = tmp_path / "snap"
        snap.mkdir(exist_ok=True)
        for f in remote.iterdir():
            if any(fnmatch.fnmatch(f.name, p) for p in allow_patterns):
                shutil.copyfile(f, snap / f.name)
        return str(snap)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    d = _hub_snapshot("org/tiny", local_files_only=False)
    assert asked == [HUB_FILES, sorted(set(_index(remote)["weight_map"].values()))]
    assert sorted(f.name for f in d.iterdir()) == sorted(f.name for f in hf_dirs["sharded"][0].iterdir())


def test_hub_snapshot_for_a_tokenizer_fetches_the_tokenizer_files_alone(hf_dirs, tmp_path, monkeypatch):
    import huggingface_hub
    from lab.pretrained import TOKENIZER_FILES, _hub_snapshot
    asked = []

    def snapshot_download(repo_id, revision, allow_patterns, local_files_only, cache_dir):
        asked.append(allow_patterns)
        return str(tmp_path)   # holds no weights: a tokenizer needs none
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert _hub_snapshot("org/tiny", local_files_only=False, weights=False) == tmp_path
    assert asked == [TOKENIZER_FILES]


def test_hub_repo_without_safetensors_weights_says_how_to_load_its_gguf(hf_dirs, tmp_path, monkeypatch):
    # online: the snapshot holds what the Hub repo has
    import huggingface_hub
    d = tmp_path / "snapshot"
    d.mkdir()
    shutil.copyfile(hf_dirs["single"][0] / "config.json", d / "config.json")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: str(d))
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(CheckpointError, match=r"org/gguf-only \(revision 'main'\): the Hub repo holds no "
                                              r"model.safetensors .*hf_hub_download\('org/gguf-only', 'NAME.gguf'\)"):
        from_pretrained("org/gguf-only")


@pytest.mark.parametrize("damage", ["config only", "blob gone"])
def test_cached_copy_without_weights_offline_says_the_cache_lacks_them_not_the_hub(hf_dirs, offline_cache, damage):
    # offline only the cache is read: it said "the Hub repo holds no model.safetensors" of a config-only fetch
    # (read_config's) or of a snapshot whose weights' blob was deleted
    files = [hf_dirs["single"][0] / "config.json"] + [hf_dirs["single"][0] / "model.safetensors"] * (damage == "blob gone")
    repo = _hub_cache(offline_cache, "org/cut", {A: files}, {"main": A})
    for blob in repo.glob("blobs/*model.safetensors"):
        blob.unlink()
    gone = r" \(model.safetensors links to a blob that is gone\)" if damage == "blob gone" else ""
    with pytest.raises(CheckpointError, match=r"org/cut \(revision 'main'\): the cached copy .*snapshots/a{40} holds "
                                              rf"no model.safetensors or model.safetensors.index.json{gone}; run once online"):
        from_pretrained("org/cut")


@pytest.fixture(scope="module")
def shipped_model():
    from lab import shipped
    try:
        path = shipped.path("smollm2-135m-instruct")
    except InputError as e:
        pytest.skip(str(e))
    with lab.engine.backend.using_backend(lab.engine.backend.backend_instance("numpy")):
        return path, from_pretrained("smollm2-135m-instruct")


def test_shipped_short_name_and_a_directory_holding_its_gguf_load_the_same_model(shipped_model, tmp_path,
                                                                                  numpy_backend):
    path, model = shipped_model
    assert type(model) is lab.LlamaLM and model.config.num_key_value_heads == 3 and model.config.vocab_size == 49152
    (tmp_path / path.name).symlink_to(path)
    with lab.engine.backend.using_backend(numpy_backend):
        again = from_pretrained(tmp_path)
    assert again.config == model.config
    for name in ("model.embed_tokens.weight", "model.layers.29.mlp.down_proj.weight"):
        assert np.array_equal(again.hf_weights()[name], model.hf_weights()[name])


def test_hub_snapshot_missing_a_shard_offline_says_how_to_get_it(hf_dirs, offline_cache):
    files = sorted(hf_dirs["sharded"][0].iterdir())
    shard = next(f for f in files if f.name.startswith("model-00002"))
    _hub_cache(offline_cache, "org/partial", {A: [f for f in files if f != shard]}, {"main": A})
    with pytest.raises(CheckpointError, match=r"org/partial \(revision 'main'\): the cached copy lacks 1 of the \d "
                                              r"shards its index names \(model-00002-of-\d+.safetensors, ...\); run once "
                                              r"online .*huggingface-cli download org/partial"):
        from_pretrained("org/partial")


def test_hub_snapshot_that_its_cached_file_list_shows_incomplete_is_one_error_saying_how_to_get_it(hf_dirs,
                                                                                                  offline_cache):
    tree = pytest.importorskip("huggingface_hub._tree_cache")
    repo = _hub_cache(offline_cache, "org/cut", {A: sorted(hf_dirs["single"][0].iterdir())}, {"main": A})
    names = [f.name for f in hf_dirs["single"][0].iterdir()] + ["tokenizer.json"]   # listed, never downloaded
    tree.write_tree_cache(str(repo), A, {n: tree.TreeCacheEntry(size=1, blob_id="0" * 40, lfs_sha256=None,
                                                                lfs_size=None, xet_hash=None) for n in names})
    with pytest.raises(CheckpointError, match=r"org/cut \(revision 'main'\): the cached copy is incomplete .*"
                                              r"tokenizer.json.*huggingface-cli download org/cut"):
        from_pretrained("org/cut")


def test_errors_about_sharded_weights_name_the_index(hf_dirs, tmp_path):
    d = _copy(hf_dirs["sharded"][0], tmp_path)
    data = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**data, "num_hidden_layers": 4}))
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json: missing tensors \['model.layers.3."):
        from_pretrained(d)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2,
                                                         n_head=2)).save_pretrained(tmp_path / "g", max_shard_size="20KB")
    data = json.loads((tmp_path / "g" / "config.json").read_text())
    (tmp_path / "g" / "config.json").write_text(json.dumps({**data, "n_layer": 3}))
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json: .*missing .*'h.2."):
        from_pretrained(tmp_path / "g")


# ------------------------------------------------------------------------------------------------ saving over a model

def _small_lab_model(eos=None):
    return lab.LlamaLM(lab.LlamaConfig(vocab_size=1000, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
                                       eos_token_id=eos))


def test_save_over_a_sharded_model_removes_its_index_and_shards(hf_dirs, tmp_path, use_backend):
    """model.safetensors written where another model's index and shards lie: those are removed in the same save
    (transformers' save removes an earlier save's shards too), so nothing falls back to them; other files stay."""
    import lab.io as C
    d = _copy(hf_dirs["sharded"][0], tmp_path)
    (d / "notes.txt").write_text("mine")
    (d / "model-extra.safetensors").write_bytes(b"not a shard name")
    model = _small_lab_model()
    real = os.replace

    def killed_after_the_weights(src, dst):   # a kill after the new weights are in, before the shards go
        real(src, dst)
        if Path(dst).name == "model.safetensors":
            raise KeyboardInterrupt
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(C.os, "replace", killed_after_the_weights)
        with pytest.raises(KeyboardInterrupt):
            model.save_pretrained(d)
    loaded = from_pretrained(d)   # completes the save's journal first
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "generation_config.json", "model-extra.safetensors",
                                                   "model.safetensors", "notes.txt"]
    assert loaded.config.num_hidden_layers == 1
    np.testing.assert_array_equal(loaded.model.norm.weight.numpy(), model.model.norm.weight.numpy())
    model.save_pretrained(d)   # again, with nothing stale: the same files
    assert len(list(d.iterdir())) == 5


def test_save_replaces_an_earlier_models_generation_config(hf_dirs, tmp_path, numpy_backend):
    """transformers wrote eos_token_id 2 into generation_config.json; a lab model without an eos saved there must
    not load back stopping at 2 (nor one with eos 7 at 2), here or in transformers."""
    for eos, expected in ((None, None), (7, 7), ([3, 5], [3, 5])):
        d = _copy(hf_dirs["single"][0], tmp_path / str(eos))
        assert json.loads((d / "generation_config.json").read_text())["eos_token_id"] == 2
        _small_lab_model(eos).save_pretrained(d)
        assert from_pretrained(d).config.eos_token_id == expected
        assert transformers.GenerationConfig.from_pretrained(d).eos_token_id == expected


@pytest.mark.parametrize("ref", [""])
def test_hub_cache_ref_naming_no_snapshot_is_one_error_naming_the_ref_file(hf_dirs, offline_cache, ref):
    """An empty refs/main made huggingface_hub hand back snapshots/ itself, which lab read as a repo without
    weights ('the Hub repo holds no model.safetensors'): the damaged ref file is named instead."""
    repo = _hub_cache(offline_cache, "org/empty", {A: sorted(hf_dirs["single"][0].iterdir())}, {"main": A})
    (repo / "refs" / "main").write_text(ref)
    for load in (from_pretrained, lab.load_tokenizer):
        with pytest.raises(CheckpointError, match=rf"org/empty \(revision 'main'\): {repo}/refs/main names no "
                                                  rf"snapshot \(the file is empty or damaged\); run once online"):
            load("org/empty")


@pytest.mark.parametrize("value", ["1", "true", "YES", "on"])
def test_hf_hub_offline_wins_over_local_files_only_false(value, tmp_path, monkeypatch):
    """transformers reads HF_HUB_OFFLINE over local_files_only=False (is_offline_mode): lab asked the Hub anyway,
    because the explicit False replaced the environment's answer."""
    import huggingface_hub
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    asked = []
    real = huggingface_hub.snapshot_download
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda *a, **kw: (asked.append(kw["local_files_only"]), real(*a, **kw))[1])
    for load in (from_pretrained, lab.load_tokenizer):
        with pytest.raises(CheckpointError, match=r"org/absent .*not in the Hub cache .*offline \(HF_HUB_OFFLINE=1"):
            load("org/absent", local_files_only=False)
    assert asked == [True, True]


# ------------------------------------------------------------------------------------------------ memory of a load

def test_loading_a_transformers_directory_peaks_near_its_parameter_bytes(tmp_path):
    # the load held every tensor read, a float64 random init, the transposed copies and load_state_dict's copies
    # at once; now each tensor goes from its shard into its parameter. Many layers, so that no one tensor (the
    # peak's remainder) is a large part of the model
    from peak_memory import load_memory
    cfg = dict(TINY, vocab_size=4000, hidden_size=256, intermediate_size=1024, num_hidden_layers=8,
               num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    _hf_model(**cfg).save_pretrained(tmp_path, max_shard_size="10MB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    params, peak, resident = load_memory(tmp_path)
    assert params == sum(p.numel() for p in _hf_model(**cfg).parameters()) * 4
    assert peak < 1.4 * params and resident < 1.25 * params, (peak / params, resident / params)


def test_a_load_failing_at_a_later_tensor_leaves_a_loaded_model_unchanged(hf_dirs, tmp_path, use_backend):
    # a built model's load reads each tensor when it writes it; a model that already holds weights reads them all
    # first, so a bad tensor found late changes none of its parameters
    d = _copy(hf_dirs["single"][0], tmp_path)
    model = from_pretrained(d)
    before = model.state_dict()
    tensors = read_weights(d, lazy=True)
    name = "model.layers.2.mlp.down_proj.weight"   # read after most others
    good = tensors[name]
    tensors[name] = lab.io.LazyTensor(good.shape, good.dtype, lambda: np.full(good.shape, np.nan, np.float32))
    with pytest.raises(CheckpointError, match="down_proj"):
        model.load_hf_weights(tensors, source=d)
    after = model.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_a_model_whose_load_fails_is_never_handed_out_half_loaded(hf_dirs, tmp_path, use_backend):
    # built without a random init (zeros): a load that fails mid-way raises, and nothing keeps the model
    from safetensors.numpy import load_file, save_file
    d = _copy(hf_dirs["single"][0], tmp_path)
    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.2.mlp.down_proj.weight"][3, 4] = np.inf
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'model.layers.2.mlp.down_proj.weight' "
                                              r"contains NaN or Inf"):
        from_pretrained(d)


def test_built_and_loaded_refuses_a_load_that_leaves_a_parameter_unwritten(use_backend):
    with pytest.raises(RuntimeError, match=r"the load left 1 parameters unwritten \(\['weight'\]\)"):
        lab.nn.built_and_loaded(lambda: lab.nn.Linear(3, 2), lambda m: None)
    w = np.arange(6, dtype=np.float32).reshape(3, 2)
    model = lab.nn.built_and_loaded(lambda: lab.nn.Linear(3, 2), lambda m: m.load_state_dict({"weight": w, "bias": w[0]}))
    w[0, 0] = 99   # the caller's array is copied, never shared
    assert np.array_equal(model.weight.numpy(), np.arange(6).reshape(3, 2)) and model.weight.requires_grad
