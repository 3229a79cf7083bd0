"""Sampling on the device (issue #22 item 2): Backend.sample_tokens (kernels/sample.wgsl on wgpu, lab.sampling's
host equivalent on numpy) draws from lab.generate's distribution, greedy is the host's argmax, and a seed repeats."""
import numpy as np
import pytest

from lab.generate import apply_repetition_penalty, sample_distribution
from lab.sampling import TokenSampler, pack_seen, sample_rows

SETTINGS = [dict(), dict(temperature=0.6), dict(top_k=4), dict(top_k=1), dict(top_p=0.8), dict(top_p=1e-6),
            dict(top_k=20, top_p=0.5, temperature=1.7, repetition_penalty=1.4), dict(repetition_penalty=0.5)]


def _host_probs(row, seen, temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0):
    return sample_distribution(apply_repetition_penalty(row, np.asarray(seen), repetition_penalty), temperature,
                               top_k, top_p)


def _logits(rows, vocab, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(rows, vocab)) * 3).astype(np.float32)
    x[1, :vocab // 2] = 1.25                      # ties across the top-k and top-p boundaries
    x[2, 5] = -np.inf                             # a token ruled out
    x[3] = 0.0                                    # all equal: top-p takes the lowest ids first, as a stable sort
    return x


@pytest.mark.parametrize("kw", SETTINGS, ids=[str(k) for k in SETTINGS])
def test_the_filtered_probabilities_are_sample_distributions(any_backend, kw):
    vocab, seen = 67, [[0, 1, 2], [3, 40], [5, 6, 6], [], [66]]
    x = _logits(len(seen), vocab)
    ids, logp, probs = TokenSampler(any_backend, seen, vocab, seed=3, **kw)(any_backend.from_numpy(x), True, True)
    for r in range(len(seen)):
        want = _host_probs(x[r], seen[r], **kw)
        np.testing.assert_allclose(probs[r], want, rtol=1e-5, atol=1e-7, err_msg=f"row {r}")
        assert want[ids[r]] > 0, f"row {r} drew {ids[r]}, which has no probability"
        np.testing.assert_allclose(logp[r], np.log(want[ids[r]]), rtol=1e-5, atol=1e-6)


def test_a_152k_vocabulary_row_has_the_hosts_filtered_probabilities(any_backend):
    vocab = 151936   # Qwen2's
    x = _logits(4, vocab, seed=1)
    kw = dict(top_k=50, top_p=0.9, temperature=0.8, repetition_penalty=1.2)
    seen = [[151935, 7, 100000], [1], [2], [3]]
    ids, probs = TokenSampler(any_backend, seen, vocab, seed=9, **kw)(any_backend.from_numpy(x), probs=True)
    for r in range(4):
        want = _host_probs(x[r], seen[r], **kw)
        np.testing.assert_allclose(probs[r], want, rtol=1e-5, atol=1e-7)
        assert want[ids[r]] > 0


def test_greedy_is_the_hosts_argmax_with_the_lowest_id_on_ties(any_backend):
    vocab, seen = 300, [[], [7], [3, 299], [], [1]]
    x = _logits(len(seen), vocab, seed=2)
    x[0, [17, 250]] = 50.0                        # a tie for the maximum: the lower id, as np.argmax
    x[4] = -np.inf                                # nothing possible: id 0, as np.argmax
    for penalty in (1.0, 1.3, 0.7):
        ids, logp = TokenSampler(any_backend, seen, vocab, repetition_penalty=penalty, greedy=True)(
            any_backend.from_numpy(x), logprobs=True)
        want = [int(np.argmax(apply_repetition_penalty(x[r], np.asarray(seen[r]), penalty))) for r in range(5)]
        assert ids.tolist() == want
        assert ids[0] == 17
        z = apply_repetition_penalty(x[1], np.asarray(seen[1]), penalty).astype(np.float64)
        np.testing.assert_allclose(logp[1], z[ids[1]] - z.max() - np.log(np.exp(z - z.max()).sum()), rtol=1e-5)


@pytest.mark.parametrize("kw", [dict(), dict(top_k=5, temperature=0.7), dict(top_p=0.75, repetition_penalty=2.0)])
def test_many_draws_follow_the_hosts_distribution(any_backend, kw):
    """Chi-square of 4000 draws (rows of one logit vector, each its own uniform) against the host's probabilities;
    and the draws are the host fallback's, uniform for uniform."""
    vocab, rows = 12, 4000
    x = np.tile(np.linspace(-2.0, 1.5, vocab, dtype=np.float32), (rows, 1))
    seen = [[11, 3]] * rows
    ids = TokenSampler(any_backend, seen, vocab, seed=1234, **kw)(any_backend.from_numpy(x))
    p = _host_probs(x[0], seen[0], **kw)
    counts = np.bincount(ids, minlength=vocab)
    assert counts[p == 0].sum() == 0
    keep = p > 0
    expected = p[keep] * rows
    stat, df = ((counts[keep] - expected) ** 2 / expected).sum(), keep.sum() - 1
    if df:   # below the 0.999 quantile of chi-square with df degrees (Wilson-Hilferty): failing 1 time in 1000
        assert stat < df * (1 - 2 / (9 * df) + 3.09 * np.sqrt(2 / (9 * df))) ** 3, (counts, expected)
    host = sample_rows(x, pack_seen(seen, vocab), kw.get("temperature", 1.0), kw.get("top_k"), kw.get("top_p"),
                       kw.get("repetition_penalty", 1.0), False, 1234, 0)[0][:, 0]
    assert (host != ids).sum() <= rows // 1000   # (float32 against float64 sums may move a draw on a boundary)


def test_a_seed_repeats_its_tokens_and_chosen_tokens_are_penalized_next(any_backend):
    vocab = 40
    x = any_backend.from_numpy(np.tile(np.linspace(0.0, 1.0, vocab, dtype=np.float32), (3, 1)))

    def run(seed, **kw):
        s = TokenSampler(any_backend, [[], [], [39]], vocab, seed=seed, **kw)
        return np.stack([s(x) for _ in range(6)])
    a, b, c = run(5), run(5), run(6)
    assert (a == b).all() and (a != c).any()
    assert len(set(a[:, 0].tolist())) > 1              # each step its own uniform
    assert len({tuple(r) for r in a.T.tolist()}) > 1   # each row its own
    # a strong penalty on the ids chosen so far: greedy walks down the ranking, never repeating itself
    g = run(0, greedy=True, repetition_penalty=1e6)
    assert g[:, 0].tolist() == [39, 38, 37, 36, 35, 34]
    assert g[:, 2].tolist() == [38, 37, 36, 35, 34, 33]


def test_logits_of_another_shape_are_one_error_naming_both(any_backend):
    s = TokenSampler(any_backend, [[1], [2]], 10)
    with pytest.raises(ValueError, match=r"logits of shape \(1, 10\) for 2 rows of a 10-token vocabulary"):
        s(any_backend.from_numpy(np.zeros((1, 10), np.float32)))


@pytest.fixture
def tiny(use_backend):
    import lab
    from dataclasses import replace
    from lab.models import PRESETS, TransformerLM
    lab.manual_seed(0)
    return TransformerLM(replace(PRESETS["tiny"], vocab_size=30, n_layer=1, n_embd=16, n_head=2, block_size=12)).eval()


def test_generate_samples_on_the_device_reading_back_ids_only(tiny, monkeypatch):
    """On wgpu each new token reads back its id, not the logits; greedy is the host path's tokens, a seed repeats
    (past block_size too), and the numpy backend keeps numpy's generator."""
    from lab.generate import generate
    backend = tiny.parameters()[0].backend
    prompt, kw = [1, 2, 3], dict(top_k=8, top_p=0.9, temperature=0.8, repetition_penalty=1.3)
    a, b = generate(tiny, prompt, 14, seed=7, **kw), generate(tiny, prompt, 14, seed=7, **kw)
    assert (a == b).all() and len(a) == 14    # 17 tokens: the window slides past block_size 12
    assert (generate(tiny, prompt, 14, seed=8, **kw) != a).any()
    greedy = generate(tiny, prompt, 14, greedy=True, repetition_penalty=1.3)
    batch = [generate(tiny, [prompt, [4, 5]], 6, seed=3, **kw) for _ in range(2)]
    assert all((x == y).all() for x, y in zip(*batch))
    greedy_batch = generate(tiny, [prompt, [4, 5]], 6, greedy=True, repetition_penalty=1.3)
    if backend.device_sampling:
        reads = []
        monkeypatch.setattr(type(backend), "to_numpy", lambda self, x, f=type(backend).to_numpy: reads.append(
            x.shape) or f(self, x))
        generate(tiny, prompt, 5, seed=7, **kw)
        generate(tiny, [prompt, [4, 5]], 4, seed=7, **kw)   # a batch: each step one (2, 2) readback
        assert reads and all(s[-1] != 30 for s in reads), reads    # ids read back, never a vocabulary's logits
        monkeypatch.undo()
        monkeypatch.setattr(type(backend), "device_sampling", False)
    host = generate(tiny, prompt, 14, greedy=True, repetition_penalty=1.3)
    np.testing.assert_array_equal(greedy, host)
    for x, y in zip(greedy_batch, generate(tiny, [prompt, [4, 5]], 6, greedy=True, repetition_penalty=1.3)):
        np.testing.assert_array_equal(x, y)
    if not backend.device_sampling:   # numpy (or wgpu turned host): numpy's generator, as before
        rng = np.random.default_rng(7)
        first = generate(tiny, prompt, 1, seed=7, **kw)[0]
        import lab
        with lab.no_grad():
            logits = tiny(np.array([prompt], dtype=np.int32))[0, -1].numpy()
        p = sample_distribution(apply_repetition_penalty(logits, np.array(prompt), 1.3), 0.8, 8, 0.9)
        assert first == rng.choice(p.size, p=p)


def test_a_top_p_near_zero_keeps_the_top_token_and_infinite_logits_share_it(any_backend):
    """top_p - 1e-9 <= 0 once meant 'no top-p' to the kernel (its target's bits 0): it keeps the top token, as
    the host; +inf logits share the probability, as sample_distribution's."""
    x = np.random.default_rng(0).normal(size=(3, 37)).astype(np.float32)
    x[2, [4, 9]] = np.inf
    for top_p in (1e-10, 1e-9):
        ids, probs = TokenSampler(any_backend, [[], [], []], 37, top_p=top_p)(any_backend.from_numpy(x), probs=True)
        assert ids[:2].tolist() == np.argmax(x[:2], 1).tolist()
        for r in range(3):
            np.testing.assert_allclose(probs[r], _host_probs(x[r], [], top_p=top_p), atol=1e-7)


@pytest.mark.parametrize("greedy", [False, True])
def test_a_row_of_nan_or_only_minus_inf_is_one_error_naming_it(any_backend, greedy):
    x = np.zeros((3, 40), np.float32)
    x[1, 7] = np.nan
    if not greedy:
        x[2] = -np.inf
    with pytest.raises(ValueError, match=r"the logits of row 1 hold NaN \(or, sampling, only -inf\)"):
        TokenSampler(any_backend, [[], [], []], 40, greedy=greedy)(any_backend.from_numpy(x))
    x[1, 7] = 0.0
    if not greedy:
        with pytest.raises(ValueError, match="the logits of row 2"):
            TokenSampler(any_backend, [[], [], []], 40)(any_backend.from_numpy(x))
