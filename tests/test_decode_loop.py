"""The decode loop (issue #22): steps that draw their next ids inside themselves (DecodeRunner.sample), several
submitted before one readback, batched prompts through the runner; all equal to step-by-step generation."""
import numpy as np
import pytest

import lab
from lab import decode
from lab.checks import InputError
from lab.decode import DecodeRunner
from lab.engine.tensor import no_grad
from lab.sampling import TokenSampler

from test_batched_generation import _model

PROMPTS = [[3, 1, 4, 1, 5, 9, 2], [6], [5, 3, 5, 8]]
SAMPLED = dict(seed=11, temperature=0.9, top_k=12, top_p=0.95, repetition_penalty=1.3)


def _runners(monkeypatch):
    made = []
    init = DecodeRunner.__init__
    monkeypatch.setattr(DecodeRunner, "__init__", lambda self, *a, **k: (init(self, *a, **k), made.append(self))[0])
    return made


@pytest.mark.parametrize("family", ["gpt", "llama"])
@pytest.mark.parametrize("kw", [dict(greedy=True, repetition_penalty=1.3), dict(seed=5, top_k=9, temperature=0.8)])
def test_steps_that_sample_inside_themselves_draw_what_eager_steps_draw(use_backend, family, kw):
    """sample() steps, fed on the device and read back four at a time, against eager steps whose logits a sampler
    of the same seed draws from one by one (on wgpu the same kernel: bitwise the same ids)."""
    model, rows, pad = _model(family), len(PROMPTS), np.array([0, 6, 3])
    x = np.zeros((rows, 7), np.int32)
    for b, p in enumerate(PROMPTS):
        x[b, pad[b]:] = p
    args = dict(kw, greedy=kw.get("greedy", False))
    args.pop("seed", None)
    seed = kw.get("seed", 0)
    with no_grad():
        ref_sampler = TokenSampler(use_backend, PROMPTS, 30, seed=seed, **args)
        with DecodeRunner(model, rows, pad=pad) as reference:   # today's device path: logits, then a draw
            ids = ref_sampler(model.forward_cached(x, reference.cache, 0, pad=pad)[:, -1])
            want = [ids]
            for pos in range(7, 20):
                want.append(ref_sampler(reference.step(ids, pos)[:, -1]))
                ids = want[-1]
        sampler = TokenSampler(use_backend, PROMPTS, 30, seed=seed, **args)
        with DecodeRunner(model, rows, pad=pad, sampler=sampler, ring=6) as runner:
            got = [sampler(model.forward_cached(x, runner.cache, 0, pad=pad)[:, -1])]
            first = got[0]
            for pos in range(7, 20, 4):   # 13 steps: chunks of 4, 4, 4 and 1 (one call, or one call a step)
                k = min(4, 20 - pos)
                if pos % 8 == 7:
                    runner.sample(first, pos, k)
                else:
                    for i in range(k):
                        runner.sample(first if i == 0 else None, pos + i)
                first = None
                got += list(runner.read(k))
            replayed = runner.replayed
    np.testing.assert_array_equal(np.array(got), np.array(want))
    assert replayed == (0 if use_backend.name == "numpy" else (9 - 3) + (4 - 3))   # windows 16 and 24


@pytest.mark.parametrize("family", ["gpt", "llama"])
@pytest.mark.parametrize("kw", [dict(greedy=True), SAMPLED])
def test_chunked_generation_makes_the_tokens_of_step_by_step_generation(use_backend, family, kw, monkeypatch):
    """Batch 1 and a padded batch of 3, 13 new tokens (no multiple of any chunk), past block_size (24) too."""
    model = _model(family)
    runs = {}
    for chunk in (1, 3, 8):
        monkeypatch.setattr(decode, "CHUNK", chunk)
        runs[chunk] = (lab.generate(model, PROMPTS[0], 13, eos_token_id=[], **kw),
                       lab.generate(model, PROMPTS, 13, eos_token_id=[], **kw),
                       lab.generate(model, PROMPTS[2], 22, eos_token_id=[], **kw))   # 4 + 22 > 24 slots
    for chunk in (3, 8):
        for a, b in zip(runs[1], runs[chunk]):
            for x, y in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b]):
                np.testing.assert_array_equal(x, y)
    assert [len(r) for r in runs[8][1]] == [13] * 3 and len(runs[8][2]) == 22


def test_chunked_generation_stops_mid_chunk_at_eos_stop_string_and_should_stop(use_backend, monkeypatch):
    """Every end falls inside an 8-step chunk: what comes back, what is streamed and how often should_stop is
    asked are those of step-by-step generation."""
    monkeypatch.setattr(decode, "CHUNK", 8)
    model = _model("gpt")
    tok = lab.CharTokenizer("abcdefghijklmnopqrstuvwxyz .,")
    free = lab.generate(model, [3, 1, 4], 20, greedy=True, eos_token_id=[])
    eos = int(free[9])
    cut = list(free).index(eos)
    streamed = []
    got = lab.generate(model, [3, 1, 4], 20, greedy=True, eos_token_id=eos, on_token=lambda i, s: streamed.append(i))
    np.testing.assert_array_equal(got, free[:cut])
    assert streamed == list(free[:cut])
    text = lab.generate(model, "the ", 20, greedy=True, tokenizer=tok, eos_token_id=[])
    stop = text[9:11]
    pieces = []
    stopped = lab.generate(model, "the ", 20, greedy=True, tokenizer=tok, stop=stop, eos_token_id=[],
                           on_token=lambda i, s: pieces.append(s))
    assert stopped == text[:text.find(stop)] and "".join(pieces) == text[:text.find(stop) + len(stop)]
    asked = []
    halted = lab.generate(model, [3, 1, 4], 20, greedy=True, eos_token_id=[],
                          should_stop=lambda: asked.append(1) or len(asked) > 11)
    np.testing.assert_array_equal(halted, free[:11])
    assert len(asked) == 12
    rows = lab.generate(model, [[3, 1, 4], [7, 7]], 20, greedy=True, eos_token_id=eos)   # each row its own end
    for row, prompt in zip(rows, ([3, 1, 4], [7, 7])):
        alone = lab.generate(model, prompt, 20, greedy=True, eos_token_id=eos)
        np.testing.assert_array_equal(row, alone)


def test_pipelined_decode_reads_back_once_per_chunk(wgpu_backend, monkeypatch):
    from lab.engine import backend as B
    monkeypatch.setitem(B._state, "backend", wgpu_backend)
    monkeypatch.setattr(decode, "CHUNK", 8)
    model = _model("gpt", block_size=64)
    made = _runners(monkeypatch)
    reads = []
    to_numpy = type(wgpu_backend).to_numpy
    monkeypatch.setattr(type(wgpu_backend), "to_numpy", lambda self, a: reads.append(a.shape) or to_numpy(self, a))
    for prompt in (PROMPTS[0], PROMPTS):
        reads.clear()
        lab.generate(model, prompt, 40, greedy=True, eos_token_id=[])
        rows = 1 if prompt is PROMPTS[0] else 3
        # the prompt's token, then steps in chunks of 1, 2, 4, 8, 8, 8, 8 (39 steps): eight readbacks of ids
        assert reads == [(rows, 2)] + [(decode.RING, rows, 2)] * 7, reads
        assert made[-1].replayed == 39 - 3 * 3   # windows 16, 32 and 64, three steps of each captured


def test_decode_runner_refuses_what_it_cannot_sample(any_backend, monkeypatch):
    from lab.engine import backend as B
    monkeypatch.setitem(B._state, "backend", any_backend)
    model = _model("gpt")
    with pytest.raises(InputError, match=r"a sampler of 2 rows of a 30-token vocabulary for a batch of 3 of "
                                         r"TransformerLM's 30"):
        DecodeRunner(model, 3, sampler=TokenSampler(any_backend, [[1], [2]], 30))
    with pytest.raises(InputError, match=r"a sampler of 1 rows of a 10-token vocabulary for a batch of 1 of "
                                         r"TransformerLM's 30"):
        DecodeRunner(model, 1, sampler=TokenSampler(any_backend, [[1]], 10))
    for pad in ([1], [0, 24]):   # (24: the whole cache, no slot left for the row's own token)
        with pytest.raises(InputError, match=r"pad must be one non-negative integer per row of the batch \(2\), "
                                             r"each below block_size 24, got"):
            DecodeRunner(model, 2, pad=pad)
    with no_grad(), DecodeRunner(model, 1) as runner:
        model.forward_cached(np.array([[1, 2]], np.int32), runner.cache, 0)
        with pytest.raises(InputError, match=r"DecodeRunner.sample: this runner has no sampler"):
            runner.sample([1], 2)
        with pytest.raises(InputError, match=r"DecodeRunner.read: this runner has no sampler"):
            runner.read(1)   # (was an AttributeError on its ring, None)
    sampler = TokenSampler(any_backend, [[1]], 30, greedy=True)
    with no_grad(), DecodeRunner(model, 1, sampler=sampler, ring=4) as runner:
        model.forward_cached(np.array([[1, 2]], np.int32), runner.cache, 0)
        with pytest.raises(InputError, match=r"count 1, but 0 steps have drawn ids"):
            runner.read(1)     # nothing drawn yet
        with pytest.raises(InputError, match=r"DecodeRunner.sample: token ids must be in \[0, 29\], got \[30\]"):
            runner.sample([30], 2)
        with pytest.raises(InputError, match=r"count must be an integer >= 1 and <= 4, got 5"):
            runner.sample([1], 20, 5)   # slots 20..24 of a 24-slot cache
        for pos in range(2, 7):
            runner.sample([1] if pos == 2 else None, pos)
        with pytest.raises(InputError, match=r"count 5, but 5 steps have drawn ids and the ring keeps the last 4: "
                                             r"at most 4"):
            runner.read(5)
        assert runner.read(4).shape == (4, 1)


def test_chunked_generation_from_nan_logits_is_one_clear_error(use_backend, monkeypatch):
    """NaN first met inside a chunk (slot 10's position embedding): the draw that cannot be made is the error, not
    an id past the vocabulary fed to the next steps."""
    monkeypatch.setattr(decode, "CHUNK", 8)
    model = _model("gpt")
    w = model.wpe.weight
    table = w.numpy()
    table[10] = np.nan
    w.backend.write(w.data, table)
    with pytest.raises(ValueError, match=r"NaN"):
        lab.generate(model, [1, 2, 3], 12, seed=1)


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_beam_search_on_the_cache_replays_its_steps_and_finds_the_beams_of_full_recompute(use_backend, family,
                                                                                         monkeypatch):
    """The beams' rows reordered between steps (reorder_cache into the buffers the captured step reads)."""
    model = _model(family)
    made = _runners(monkeypatch)
    for early in (True, False):
        kw = dict(num_beams=3, num_return_sequences=3, eos_token_id=[], early_stopping=early)
        cached = lab.beam_search(model, [3, 1, 4, 1], 14, **kw)
        full = lab.beam_search(model, [3, 1, 4, 1], 14, use_cache=False, **kw)
        for a, b in zip(cached, full):
            np.testing.assert_array_equal(a, b)
        # 13 steps at slots 4..16: windows 16 (12 steps) and 24 (1), three of the first captured
        assert made[-1].replayed == (0 if use_backend.name == "numpy" else 12 - 3)


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_a_generated_token_costs_its_forward_and_one_draw_dispatch(wgpu_backend, family, monkeypatch):
    """Per token the loop adds the draw to the step's forward and nothing else (no logits copy, no id upload):
    the dispatches of 8 more tokens are 8 times a one-token forward's plus one."""
    from lab.decode import FixedCache
    from lab.engine import backend as B
    monkeypatch.setitem(B._state, "backend", wgpu_backend)
    monkeypatch.setattr(decode, "CHUNK", 8)
    model = _model(family)
    with no_grad():
        cache = [FixedCache(layer) for layer in model.new_cache(1)]
        for layer in cache:
            layer.window = 16
        model.forward_cached(np.array([[1, 2, 3]], np.int32), cache, 0)
        before = wgpu_backend.stats()["dispatches"]
        model.forward_cached(np.array([[4]], np.int32), cache, 3)
        forward = wgpu_backend.stats()["dispatches"] - before
    counts = []
    for n in (4, 12):   # slots 3..5 and 3..13: one window
        before = wgpu_backend.stats()["dispatches"]
        lab.generate(model, [1, 2, 3], n, greedy=True, eos_token_id=[])
        counts.append(wgpu_backend.stats()["dispatches"] - before)
    assert counts[1] - counts[0] == 8 * (forward + 1), (counts, forward)


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_padded_batch_decode_steps_replay_with_their_row_positions(use_backend, family):
    """A left-padded batch's steps upload each row's positions (slot - pad): the replays write them as the
    position patches say, and their logits are those of eager steps on the same windows, bit for bit."""
    from lab.decode import FixedCache
    model, rows, pad = _model(family), len(PROMPTS), np.array([0, 6, 3])
    x = np.zeros((rows, 7), np.int32)
    for b, p in enumerate(PROMPTS):
        x[b, pad[b]:] = p
    tokens = np.random.default_rng(3).integers(0, 30, (12, rows, 1)).astype(np.int32)
    with no_grad():
        cache = [FixedCache(layer) if use_backend.name == "wgpu" else layer for layer in model.new_cache(rows)]
        model.forward_cached(x, cache, 0, pad=pad)
        want = []
        for i, t in enumerate(tokens):
            for layer in cache:
                if isinstance(layer, FixedCache):
                    layer.window = 16 if 7 + i < 16 else 24
            if family == "llama":
                model._rope(24)
            want.append(model.forward_cached(t, cache, 7 + i, pad=pad)[:, -1].numpy())
        with DecodeRunner(model, rows, pad=pad) as runner:
            model.forward_cached(x, runner.cache, 0, pad=pad)
            got = [runner.step(t, 7 + i)[:, -1].numpy() for i, t in enumerate(tokens)]
    assert runner.replayed == (0 if use_backend.name == "numpy" else (9 - 3) + (3 - 3))
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
