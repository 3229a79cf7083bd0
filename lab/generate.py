"""Text generation: greedy, temperature, top-k, top-p (nucleus), repetition penalty and beam search, with a KV
cache on the device so each new token costs one small forward pass instead of a full recomputation."""

import codecs
import contextlib
import inspect
import numbers

import numpy as np

from .checks import InputError, integer, real, show

from .engine import ops as F
from .engine.backend import contiguous_strides
from .engine.random import generator
from .engine.sampling import apply_repetition_penalty, sample_distribution  # noqa: F401  (lab.generate's API)
from .engine.tensor import no_grad
from . import decode
from .decode import DecodeRunner
from .nn import evaluating, step_lock
from .sampling import device_sampler, undrawable


def _check_args(model, ids, max_new_tokens, temperature, top_k, top_p, repetition_penalty, greedy):
    block, vocab = model.config.block_size, model.config.vocab_size
    if ids.ndim != 1 or ids.size == 0:
        raise InputError(f"prompt must be a non-empty 1D sequence of token ids, got shape {ids.shape}")
    if ids.dtype.kind not in "iu":  # 2.7 is no token id: truncating it would generate from a different prompt
        raise InputError(f"prompt token ids must be integers, got {ids.dtype} values {show(ids[:4].tolist())}")
    if ids.min() < 0 or ids.max() >= vocab:
        raise InputError(f"prompt token ids must be in [0, {vocab}) for this model, got {ids.min()}..{ids.max()}")
    if ids.size > block:
        raise InputError(f"prompt of {ids.size} tokens is longer than the model's block_size {block}; "
                         f"shorten it (the model only ever sees the last {block} tokens)")
    max_new_tokens = integer("max_new_tokens", max_new_tokens, low=0)   # an int: 1e3 is 1000 steps, not range(1e3)
    if not greedy:  # below 1e-6 the logits overflow float64 once divided: greedy=True is the limit asked for
        try:
            real("temperature", temperature, low=1e-6)
        except ValueError as e:
            small = isinstance(temperature, (int, float)) and temperature < 1e-6
            raise InputError(f"{e}{' (use greedy=True for argmax)' if small else ''}") from None
    if top_p is not None:
        real("top_p", top_p, low=0, low_open=True, high=1)
    if top_k is not None:   # as an int: 2.0 passed the check, then numpy's partition raised TypeError on it
        top_k = integer("top_k", top_k, low=1)
    real("repetition_penalty", repetition_penalty, low=0, low_open=True)
    return max_new_tokens, top_k


def _adapter_switch(model, adapter):
    """adapter=True/False: the model's LoRA adapters on/off for one call; None: as they are."""
    if adapter is None:
        return contextlib.nullcontext()
    from .lora import adapter_enabled
    return adapter_enabled(model, adapter)


def _prompt_ids(prompt, tokenizer, model):
    """(token ids, whether the prompt was text). The model and tokenizer are checked first: a wrong one gave an
    AttributeError, or str.encode's 'unknown encoding' for a tokenizer given as text."""
    if not (callable(model) and hasattr(getattr(model, "config", None), "block_size")):
        raise InputError(f"model must be a lab language model (TransformerLM, LlamaLM, ProNeuralLM), got {show(model)}")
    check_tokenizer(model, tokenizer)
    if prompt is None or isinstance(prompt, (bytes, numbers.Number)):
        raise InputError(f"prompt must be text (with a tokenizer) or a 1-D sequence of token ids, got {show(prompt)}")
    if isinstance(prompt, str):
        if tokenizer is None:
            raise InputError("a text prompt needs a tokenizer (or pass token ids)")
        if not prompt:  # said as text: an empty prompt is no "shape (0,)" to whoever typed it
            raise InputError("prompt is empty: the model needs some text to continue from (e.g. \"\\n\")")
        try:
            return np.asarray(_encode_prompt(tokenizer, prompt), dtype=np.int64), True
        except ValueError as e:  # a character the tokenizer never saw: say it was the prompt's
            raise InputError(f"prompt {show(prompt)}: {e}") from None
    try:
        return np.asarray(prompt), False  # as given: _check_args refuses float ids and 2D prompts, never casts them
    except ValueError:   # ragged rows: numpy's 'inhomogeneous shape'
        raise InputError(f"prompt must be a 1-D sequence of token ids, got {show(prompt)}") from None


def check_tokenizer(model, tokenizer, what=""):
    """Refuse a tokenizer that is no tokenizer, or has more tokens than the model's vocabulary: not the one the
    model was trained with (its ids index past the model's table, or name other tokens). A model's table may be
    larger (padded, as GPT-2's); an id it makes that the tokenizer lacks is _token_bytes' error."""
    if tokenizer is None:
        return
    if not (hasattr(tokenizer, "encode") and hasattr(tokenizer, "decode")):
        raise InputError(f"tokenizer must be a lab tokenizer (CharTokenizer, BPETokenizer), got {show(tokenizer)}")
    size, vocab = getattr(tokenizer, "vocab_size", None), getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(size, int) and isinstance(vocab, int) and size > vocab:
        raise InputError(f"{what}the tokenizer has {size} tokens but the model's vocab_size is {vocab}: give the "
                         f"tokenizer the model was trained with")


def _encode_prompt(tokenizer, prompt):
    """The prompt's ids. A pretrained tokenizer that adds a BOS (Llama's) given text that already begins with it
    (a chat template's {{ bos_token }}) would put it twice, which the model never saw in training: then its special
    tokens are not added again, as transformers' apply_chat_template(tokenize=True) and chat pipeline encode."""
    ids = tokenizer.encode(prompt)
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and len(ids) > 1 and ids[0] == ids[1] == bos:
        plain = tokenizer.encode(prompt, add_special_tokens=False)
        if len(plain) and plain[0] == bos:
            return plain
    return ids


def generate(model, prompt, max_new_tokens=100, *, temperature=1.0, top_k=None, top_p=None,
             repetition_penalty=1.0, greedy=False, tokenizer=None, stop=None, on_token=None, seed=None,
             use_cache=True, adapter=None, should_stop=None, eos_token_id=None, attention_mask=None, lengths=None):
    """Continue `prompt` (token ids, or a string with `tokenizer`). Returns the generated ids (prompt excluded),
    or the generated text when the prompt was a string. Stops after max_new_tokens, or once the text ends with
    `stop` (which is then cut off). on_token(id, text_or_None) is called for every new token as it is made.
    Past block_size tokens the context slides (the model sees the last block_size tokens), as in training.
    adapter=True/False generates with the model's LoRA adapters switched on/off for this call only.
    should_stop() (e.g. an Event's is_set) is asked before each token; once it says True, what was made is
    returned (a panel's Stop button). Generation also ends at an end-of-sequence token, which is not returned:
    eos_token_id (an id or a list of ids; [] for none), by default the model config's (a pretrained model's).
    A batch: a list of prompts (all text, or all id lists), or a 2-D id array with attention_mask (B, T) (left
    padding, as transformers pads decoder-only models) or lengths (each row's last lengths[b] ids are its prompt).
    Its rows are left-padded into one KV cache, each ends at its own EOS / stop / max_new_tokens, and a list comes
    back, each row as it would be generated alone; on_token(row, id, text_or_None)."""
    rows = _batch_rows(prompt, tokenizer, model, attention_mask, lengths, use_cache)
    if rows is not None:
        return _generate_batch(model, rows, max_new_tokens, temperature, top_k, top_p, repetition_penalty, greedy,
                               tokenizer, stop, on_token, seed, use_cache, adapter, should_stop, eos_token_id)
    ids, as_text = _prompt_ids(prompt, tokenizer, model)
    max_new_tokens, top_k = _check_args(model, ids, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                                        greedy)
    check_on_token(on_token, "id, text")   # found before a token is made, not after the first
    seed = _check_options(seed, use_cache, greedy, adapter, stop, tokenizer, should_stop)
    eos = _eos_ids(model, eos_token_id)
    # the tokens' bytes go through one incremental decoder: a character split across tokens is held back until
    # its last byte arrives, so no piece ever shows U+FFFD for it
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    rng = np.random.default_rng(seed) if seed is not None else generator()
    # ProNeuralLM keeps no KV cache (an AttributeError before): each token recomputes over the last block_size
    use_cache = use_cache and hasattr(model, "new_cache")
    length = min(model.config.block_size, ids.size + max_new_tokens)   # the cache's slots: what this run fills
    if use_cache:   # refused, not a MemoryError or an out-of-memory kill, as a batch's and a beam search's are
        check_cache_fits(model, 1, length)
    out, text = [], ""
    # evaluating(), not model.eval(): a training thread may be stepping this model (TrainingPanel.start())
    with no_grad(), evaluating(), _adapter_switch(model, adapter):
        seq = list(ids)
        # on a backend that samples on the device the logits stay there, and each step reads back one id
        sampler = device_sampler(model, [seq], temperature, top_k, top_p, repetition_penalty, greedy, rng)
        with (DecodeRunner(model, 1, sampler=sampler, length=length) if use_cache else contextlib.nullcontext()
              ) as runner:
            steps = _next_ids(model, runner, [seq], sampler, [True], max_new_tokens,
                              lambda b, logits: _choose(b, logits, seq, rng, greedy, temperature, top_k, top_p,
                                                        repetition_penalty))
            for _ in range(max_new_tokens):
                if should_stop is not None and should_stop():
                    text += decoder.decode(b"", final=True)  # bytes held for a split character: as U+FFFD, not lost
                    break
                nxt = int(next(steps)[0])
                if nxt in eos:
                    text += decoder.decode(b"", final=True)
                    break
                seq.append(nxt)
                out.append(nxt)
                piece = None
                if tokenizer is not None:
                    piece = decoder.decode(_token_bytes(tokenizer, nxt), final=len(out) == max_new_tokens)
                    text += piece
                if on_token is not None:
                    on_token(nxt, piece)
                # a piece may hold several characters: look for the stop string across its whole extent
                if stop is not None and text.find(stop, max(0, len(text) - len(piece) - len(stop) + 1)) >= 0:
                    break
    if as_text:  # what was streamed, cut where the stop string begins (bytes held after it are dropped)
        return text[:text.find(stop)] if stop is not None and stop in text else text
    return np.asarray(out, dtype=np.int64)


def _next_ids(model, runner, seqs, sampler, live, max_new_tokens, choose, pad=None):
    """Each step's next token ids (rows,), for at most max_new_tokens steps, as the caller takes them: it appends
    the live rows' ids to `seqs` (the rows' ids so far; row b's first pad[b] cache slots are left padding) and
    sets `live` before taking the next. With a runner (its cache is prefilled here) the steps go through its KV
    cache; past block_size, and without a runner, each live row recomputes over its last block_size tokens. The
    ids are the sampler's draws on the device, or choose(row, logits) on the host. A runner that samples
    (lab.decode) runs up to decode.CHUNK steps, each fed the ids the last one drew on the device, before one
    readback; after an end the caller stops taking ids, and those of the steps already run are dropped."""
    block, rows, made = model.config.block_size, len(seqs), 0
    slots = runner.block if runner is not None else block   # (a cache of what the run fills: fewer than block)
    logits, pos = None, 0
    if runner is not None:
        pos = max(map(len, seqs))
        x = np.zeros((rows, pos), dtype=np.int32)
        for b, s in enumerate(seqs):
            x[b, pos - len(s):] = s
        with _between_steps(model):
            logits = model.forward_cached(x, runner.cache, 0, pad=pad)[:, -1]
    chunk = 1   # (the first tokens show at once; the chunks grow to decode.CHUNK)
    while made < max_new_tokens:
        if logits is None and sampler is not None:
            # rows recompute one by one and the device draws from their logits stacked, as from the cache's steps: a
            # seed gives the same tokens with and without the cache, past block_size too (the host drew there)
            rows_logits = [_full_logits(model, s, block, True) if live[b] else None for b, s in enumerate(seqs)]
            alive = next(r for r in rows_logits if r is not None)   # an ended row's stand-in: its id is dropped
            logits = F.stack([alive if r is None else r for r in rows_logits])
        elif logits is None:
            logits = [_full_logits(model, s, block) if live[b] else None for b, s in enumerate(seqs)]
        if isinstance(logits, list) or sampler is None:
            host = logits if isinstance(logits, list) else logits.numpy()
            ids = np.array([choose(b, host[b]) if live[b] else 0 for b in range(rows)], dtype=np.int64)
        else:
            ids = sampler(logits)
        yield ids
        made += 1
        logits = None
        if runner is not None and runner.sampler is not None:
            first = ids
            while pos < slots and made < max_new_tokens:
                k = min(chunk, decode.CHUNK, runner.ring.shape[0], slots - pos, max_new_tokens - made)
                runner.sample(first, pos, k)
                first = None
                pos += k
                for ids in runner.read(k):
                    yield ids
                    made += 1
                chunk *= 2
        elif runner is not None and pos < slots and made < max_new_tokens:
            step = np.array([[s[-1] if live[b] else 0] for b, s in enumerate(seqs)], dtype=np.int32)
            logits = runner.step(step, pos)[:, -1]
            pos += 1


def check_on_token(on_token, args):
    """on_token: None or a function taking `args`. A batch's on_token(row, id, text) given a lone prompt's
    on_token(id, text) was a TypeError at its first token, after the prefill."""
    if on_token is None:
        return
    takes = callable(on_token)
    if takes:
        try:
            inspect.signature(on_token).bind(*range(args.count(",") + 1))
        except TypeError:
            takes = False
        except ValueError:   # (a builtin without a signature: taken as it is)
            pass
    if not takes:
        raise InputError(f"on_token must be a function on_token({args}), got {show(on_token)}")


def _check_options(seed, use_cache, greedy, adapter, stop, tokenizer, should_stop=None):
    """generate's options that do not depend on the prompt; the seed as an int (or None)."""
    if seed is not None:
        seed = integer("seed", seed, low=0)
    for flag, value in (("use_cache", use_cache), ("greedy", greedy)):
        if not isinstance(value, (bool, np.bool_)):  # ("no" is a true value: it turned the cache on)
            raise InputError(f"{flag} must be True or False, got {show(value)}")
    if adapter is not None and not isinstance(adapter, (bool, np.bool_)):
        raise InputError(f"adapter must be True, False or None, got {show(adapter)}")
    if should_stop is not None and not callable(should_stop):   # (found before a token is made, not at the first)
        raise InputError(f"should_stop must be a function returning True to stop, got {show(should_stop)}")
    if stop is not None and tokenizer is None:
        raise InputError("a stop string needs a tokenizer")
    if stop is not None and not (isinstance(stop, str) and stop):
        raise InputError(f"stop must be a non-empty string, got {show(stop)}")
    return seed


def _choose(row, logits, seq, rng, greedy, temperature, top_k, top_p, repetition_penalty):
    """The next token from one row's logits (host sampling)."""
    scores = apply_repetition_penalty(logits, np.asarray(seq), repetition_penalty)
    if np.isnan(scores).any() or not greedy and not (scores > -np.inf).any():
        raise undrawable(row)
    if greedy:
        return int(np.argmax(scores))
    p = sample_distribution(scores, temperature, top_k, top_p)
    return int(rng.choice(p.size, p=p))


def _is_batch(prompt):
    """A 2-D array, or a list with a prompt in it (a list of ids is one prompt; its odd items are named by row)."""
    return isinstance(prompt, np.ndarray) and prompt.ndim == 2 or isinstance(prompt, (list, tuple)) and any(
        isinstance(p, (str, list, tuple, np.ndarray)) for p in prompt)


def _batch_rows(prompts, tokenizer, model, attention_mask, lengths, use_cache):
    """A batch's prompts as [(ids, as_text)], or None for a single prompt. Each row is checked as a lone prompt
    would be, its error prefixed with its index."""
    if attention_mask is not None and lengths is not None:
        raise InputError("give attention_mask or lengths, not both")
    if not isinstance(prompts, (str, list, tuple, np.ndarray)) and getattr(prompts, "ndim", None) == 2:
        prompts = np.asarray(prompts)   # a torch tensor of ids (a tokenizer's input_ids) is a 2-D id array too
    if not _is_batch(prompts):
        if attention_mask is not None or lengths is not None:
            raise InputError(f"attention_mask / lengths go with a 2-D array of prompts (B, T), got {show(prompts)}")
        return None
    if isinstance(prompts, np.ndarray):
        B, T = prompts.shape
        if B == 0:   # (numpy's min() of no rows said only 'zero-size array')
            raise InputError(f"prompts: a batch of no rows (shape {prompts.shape}): give at least one prompt")
        if attention_mask is not None:
            mask = np.asarray(attention_mask)
            if mask.shape != (B, T):
                raise InputError(f"attention_mask must be 0/1 of the prompts' shape {(B, T)}, got shape {mask.shape}")
            if not np.isin(mask, (0, 1)).all():   # (the shape is right: name the values that are not)
                raise InputError(f"attention_mask must hold only 0 and 1, got "
                                 f"{show(np.unique(mask[~np.isin(mask, (0, 1))])[:4].tolist())}")
            if (np.diff(mask.astype(np.int8), axis=1) < 0).any():  # a 0 after a 1: not left padding
                raise InputError("attention_mask must be left padding (each row's zeros before its ones), as "
                                 "transformers pads decoder-only models")
            lengths = mask.sum(1)
        n = np.full(B, T) if lengths is None else np.asarray(lengths)
        if n.shape != (B,) or n.dtype.kind not in "iu" or n.min() < 0 or n.max() > T:
            raise InputError(f"lengths must be {B} integers in [0, {T}], got {show(lengths)}")
        prompts = [prompts[b, T - n[b]:] for b in range(B)]
    elif attention_mask is not None or lengths is not None:
        raise InputError("attention_mask / lengths go with a 2-D array of prompts (B, T), not a list")
    check_tokenizer(model, tokenizer)   # (once, not as prompts[0]'s)
    if use_cache is True and hasattr(model, "new_cache"):   # before a million rows are checked one by one
        check_cache_fits(model, len(prompts))
    kinds = [isinstance(p, str) for p in prompts]
    if any(kinds) and not all(kinds):
        raise InputError(f"prompts mix text (prompts[{kinds.index(True)}]) and token ids "
                         f"(prompts[{kinds.index(False)}]): give all text with one tokenizer, or all ids")
    rows = []
    for b, p in enumerate(prompts):
        try:
            ids, as_text = _prompt_ids(p, tokenizer, model)
            if ids.ndim == 1 and ids.size == 0:
                raise InputError("prompt is empty: the model needs at least one token to continue from")
            _check_args(model, ids, 0, 1.0, None, None, 1.0, True)
        except ValueError as e:
            raise InputError(f"prompts[{b}]: {e}") from None
        rows.append((ids.astype(np.int64), as_text))
    return rows


def check_cache_fits(model, batch, length=None):
    """Refuse (DoesNotFitError) a KV cache of `batch` rows of `length` slots (by default block_size) that the
    device cannot hold: one layer's keys above its largest buffer, or all layers' beside the weights above its
    memory; says the largest batch that fits."""
    from .plan.estimator import DoesNotFitError
    from .plan.profiles import limits_profile
    c, params = model.config, model.parameters()
    heads, layers = getattr(c, "num_key_value_heads", None) or c.n_head, getattr(c, "num_hidden_layers", None) or c.n_layer
    slots = length or c.block_size
    row = heads * slots * (getattr(c, "head_dim", None) or c.n_embd // c.n_head) * 4   # bytes
    prof = limits_profile(params[0].backend)
    weights = sum(p.size for p in params) * 4
    buffer = min(prof.max_buffer_size, prof.max_binding_size)
    fits = min(buffer // row, max(prof.memory_bytes - weights, 0) // (2 * layers * row))
    if batch > fits:
        reasons = []   # only the limits exceeded
        if batch * row > buffer:
            reasons.append(f"each of its {2 * layers} tensors needs {batch * row / 2 ** 20:,.1f} MiB, above the "
                           f"device's largest buffer binding of {buffer / 2 ** 20:,.0f} MiB")
        if 2 * layers * batch * row > prof.memory_bytes - weights:
            reasons.append(f"it needs {2 * layers * batch * row / 2 ** 30:.2f} GiB beside "
                           f"{weights / 2 ** 30:.2f} GiB of weights, the device has {prof.memory_bytes / 2 ** 30:.2f} GiB")
        # (a lone prompt's or a beam search's cache is sized by its tokens, a batch's by block_size)
        fewer = (f"{'fewer beams, ' if batch > 1 else ''}a shorter prompt or fewer new tokens" if length else
                 "fewer prompts or beams")
        raise DoesNotFitError(f"a KV cache for a batch of {batch} does not fit {prof.name} ({slots} slots a row): "
                              f"{'; '.join(reasons)}; at most {fits} rows fit ({fewer}, or use_cache=False)", None)


def _generate_batch(model, rows, max_new_tokens, temperature, top_k, top_p, repetition_penalty, greedy, tokenizer,
                    stop, on_token, seed, use_cache, adapter, should_stop, eos_token_id):
    """generate() of a batch: the rows left-padded into one KV cache (forward_cached's pad), one step for all rows
    through a DecodeRunner (replayed on wgpu, the ids drawn on the device), or row by row on the host as a lone
    prompt's are."""
    # (each row's ids were checked by _batch_rows; the options here as a lone prompt's)
    max_new_tokens, top_k = _check_args(model, rows[0][0], max_new_tokens, temperature, top_k, top_p,
                                        repetition_penalty, greedy)
    seed = _check_options(seed, use_cache, greedy, adapter, stop, tokenizer, should_stop)
    check_on_token(on_token, "row, id, text")
    eos = _eos_ids(model, eos_token_id)
    rng = np.random.default_rng(seed) if seed is not None else generator()
    use_cache = use_cache and hasattr(model, "new_cache")
    B = len(rows)
    lens = np.array([len(ids) for ids, _ in rows])
    pad = lens.max() - lens
    seqs = [list(ids) for ids, _ in rows]
    outs, texts = [[] for _ in rows], [""] * B
    decoders = [codecs.getincrementaldecoder("utf-8")(errors="replace") for _ in rows]
    live = [max_new_tokens > 0] * B

    def choose(b, logits):
        return _choose(b, logits, seqs[b], rng, greedy, temperature, top_k, top_p, repetition_penalty)

    with no_grad(), evaluating(), _adapter_switch(model, adapter):
        # a backend that samples on the device draws every row's token there, with the cache or without
        sampler = device_sampler(model, seqs, temperature, top_k, top_p, repetition_penalty, greedy, rng)
        with (DecodeRunner(model, B, pad=pad, sampler=sampler) if use_cache else contextlib.nullcontext()) as runner:
            # (rows that ended keep stepping with the others, as transformers' do; their ids are dropped)
            steps = _next_ids(model, runner, seqs, sampler, live, max_new_tokens, choose, pad)
            while any(live):
                if should_stop is not None and should_stop():
                    break
                drawn = next(steps)
                for b in (b for b in range(B) if live[b]):
                    nxt = int(drawn[b])
                    if nxt in eos:
                        live[b] = False
                        continue
                    seqs[b].append(nxt)
                    outs[b].append(nxt)
                    piece = None
                    if tokenizer is not None:
                        piece = decoders[b].decode(_token_bytes(tokenizer, nxt), final=len(outs[b]) == max_new_tokens)
                        texts[b] += piece
                    if on_token is not None:
                        on_token(b, nxt, piece)
                    text = texts[b]
                    if stop is not None and text.find(stop, max(0, len(text) - len(piece) - len(stop) + 1)) >= 0 or \
                            len(outs[b]) == max_new_tokens:
                        live[b] = False
    texts = [t + d.decode(b"", final=True) for t, d in zip(texts, decoders)]   # bytes held for a split character
    if rows[0][1]:
        return [t[:t.find(stop)] if stop is not None and stop in t else t for t in texts]
    return [np.asarray(o, dtype=np.int64) for o in outs]


def _eos_ids(model, eos_token_id):
    """The end-of-sequence ids generation stops at: the caller's, else the model config's (None: no such id)."""
    given = eos_token_id is not None
    ids = eos_token_id if given else getattr(model.config, "eos_token_id", None)
    ids = ids.tolist() if isinstance(ids, np.ndarray) else ids   # (a 0-d array is one id: list() of it raised)
    ids = [] if ids is None else list(ids) if isinstance(ids, (list, tuple)) else [ids]
    vocab = model.config.vocab_size
    for i in ids:
        integer("eos_token_id" if given else "model.config.eos_token_id", i, low=0, high=vocab - 1)
    return {int(i) for i in ids}


def _token_bytes(tokenizer, token_id):
    """A token's bytes: lab's tokenizers give them (a piece may be part of a character); another tokenizer's
    decoded text stands in (a split character then shows as U+FFFD in its piece)."""
    size = getattr(tokenizer, "vocab_size", None)
    if isinstance(size, int) and token_id >= size:   # (CharTokenizer's IndexError after the tokens were made)
        raise InputError(f"the model made token id {token_id}, which the tokenizer of {size} tokens does not have: "
                         f"give the tokenizer the model was trained with")
    if hasattr(tokenizer, "decode_bytes"):
        return tokenizer.decode_bytes([token_id])
    return tokenizer.decode([token_id]).encode("utf-8")


@contextlib.contextmanager
def _between_steps(model):
    """One forward of a model that a training thread may be stepping (TrainingPanel.start()): under the model's
    step lock, so it reads every weight of one step, and holding the backend for the whole forward, so on wgpu the
    token takes one turn at a step boundary instead of one turn per op (both locks are fair)."""
    params = model.parameters()
    with step_lock(model), (params[0].backend.exclusive() if params else contextlib.nullcontext()):
        yield


def _full_logits(model, seq, block, on_device=False):
    x = np.asarray(seq[-block:], dtype=np.int32).reshape(1, -1)
    with _between_steps(model):
        t = model(x)[0, -1]
        return t if on_device else t.numpy()


def beam_search(model, prompt, max_new_tokens=50, num_beams=4, length_penalty=1.0, tokenizer=None, adapter=None,
                should_stop=None, eos_token_id=None, num_return_sequences=1, use_cache=True, early_stopping=True):
    """The continuation with the highest log-probability / length**length_penalty among num_beams beams.
    Returns ids (or text for a text prompt); with num_return_sequences=n > 1 a list of the n best, best first.
    adapter=True/False: LoRA adapters on/off for this call only. should_stop() is asked before each step; once it
    says True, the best beams so far are returned. A beam ends at an end-of-sequence token (eos_token_id, by
    default the model config's; not returned), as transformers' do. early_stopping=True: ended beams compete on
    with the live ones, and the search stops once the num_beams best have all ended; False: ended beams are set
    aside (those among the step's num_beams best), num_beams live beams go on, and the search stops when no live
    beam can beat the num_beams-th ended one by normalized score (transformers' early_stopping=False). With use_cache the beams are the rows of one KV cache, reordered on the device as beams are
    reselected (reorder_cache); without it each step recomputes every beam over its last block_size tokens."""
    if _is_batch(prompt):   # (its beams are the batch)
        raise InputError(f"beam_search takes one prompt (text or a 1-D sequence of ids), got a batch of "
                         f"{len(prompt)}: search each prompt on its own")
    ids, as_text = _prompt_ids(prompt, tokenizer, model)
    max_new_tokens = _check_args(model, ids, max_new_tokens, 1.0, None, None, 1.0, True)[0]
    if should_stop is not None and not callable(should_stop):
        raise InputError(f"should_stop must be a function returning True to stop, got {show(should_stop)}")
    vocab = model.config.vocab_size
    num_beams = integer("num_beams", num_beams, low=1)
    if num_beams > vocab:   # the step's top num_beams tokens per beam would repeat tokens
        raise InputError(f"num_beams {num_beams} is larger than the model's vocabulary of {vocab} tokens: "
                         f"at most {vocab}")
    n_return = integer("num_return_sequences", num_return_sequences, low=1)
    if n_return > num_beams:
        raise InputError(f"num_return_sequences {n_return} is more than num_beams {num_beams}: a search keeps "
                         f"only num_beams beams")
    real("length_penalty", length_penalty)
    for flag, value in (("use_cache", use_cache), ("early_stopping", early_stopping)):
        if not isinstance(value, (bool, np.bool_)):
            raise InputError(f"{flag} must be True or False, got {show(value)}")
    eos = _eos_ids(model, eos_token_id)
    block = model.config.block_size
    cache = None
    use_cache = use_cache and hasattr(model, "new_cache")
    length = min(block, len(ids) + max_new_tokens)   # the cache's slots: what the search fills
    if use_cache:
        check_cache_fits(model, num_beams, length)
    beams = [(0.0, list(ids), False, 0)]   # (log-probability, tokens, ended, the cache row of its parent)
    finished = []   # ended beams set aside (early_stopping=False)
    pos = 0

    def normalized(b):   # a beam's score by its own length (an ended beam is shorter; its EOS counts)
        # in float64: a large |length_penalty| overflowed Python's int ** float (OverflowError); now n ** lp is
        # inf or 0, the score -0.0 or -inf, and a certain beam's 0 stays 0 (not 0 / 0)
        with np.errstate(over="ignore", divide="ignore"):
            return float(b[0] / np.float64(max(len(b[1]) - len(ids), 1)) ** length_penalty) if b[0] else 0.0

    # the beams' decode steps through a DecodeRunner (replayed on wgpu): reorder_cache writes the rows into the
    # buffers its captured step reads
    with no_grad(), evaluating(), _adapter_switch(model, adapter), (
            DecodeRunner(model, num_beams, length=length) if use_cache else contextlib.nullcontext()) as runner:
        for _ in range(max_new_tokens):
            live = [b for b in beams if not b[2]]
            if not live or (should_stop is not None and should_stop()):
                break
            with _between_steps(model):
                if use_cache and pos == 0:   # the prompt once, into every row
                    first = model.new_cache(1, length)
                    logits = model.forward_cached(np.asarray(ids, dtype=np.int32)[None], first, 0)[:, -1]
                    cache = runner.cache
                    reorder_cache(cache, [0] * num_beams, first)
                    pos = len(ids)
                elif cache is not None and pos < runner.block:
                    rows = [b[3] for b in live]
                    rows += rows[:1] * (num_beams - len(rows))   # rows of ended beams: a live one's, unread
                    reorder_cache(cache, rows)
                    step = np.asarray([[s[-1]] for _, s, _, _ in live] + [[0]] * (num_beams - len(live)),
                                      dtype=np.int32)
                    logits = runner.step(step, pos)[:len(live), -1]
                    pos += 1
                else:   # no cache, or its window is full (positions shift): recompute over the last block_size
                    logits = model(np.asarray([s[-block:] for _, s, _, _ in live], dtype=np.int32))[:, -1]
                logits = logits.numpy().astype(np.float64)                          # (beams, V)
            logp = logits - logits.max(1, keepdims=True)
            logp -= np.log(np.exp(logp).sum(1, keepdims=True))
            if np.isnan(logp).any():   # (NaN logits, or only -inf: sorted as they came, the beams went on)
                raise undrawable(int(np.argwhere(np.isnan(logp))[0][0]))
            cand = [b for b in beams if b[2]]   # ended beams compete on as they are
            # (set aside, ended beams leave num_beams live ones only if each beam offers 2 num_beams tokens)
            width = num_beams if early_stopping else min(2 * num_beams, vocab)
            for row, ((score, seq, _, _), lp) in enumerate(zip(live, logp)):
                for tok in np.argsort(-lp)[:width]:
                    cand.append((score + lp[tok], seq + [int(tok)], int(tok) in eos, row))
            cand.sort(key=lambda c: -c[0])
            if early_stopping:
                beams = cand[:num_beams]
                continue
            finished += [c for c in cand[:num_beams] if c[2]]
            beams = [c for c in cand if not c[2]][:num_beams]
            worst = sorted(map(normalized, finished), reverse=True)[num_beams - 1:num_beams]
            if not beams or worst and normalized(beams[0]) <= worst[0]:   # (every candidate an EOS: none live)
                break
    ranked = sorted(finished + beams, key=lambda b: -normalized(b))
    out = [b[1][len(ids):len(b[1]) - b[2]] for b in ranked[:n_return]]   # without the end-of-sequence token
    out = [tokenizer.decode(o) if as_text else np.asarray(o, dtype=np.int64) for o in out]
    return out if num_return_sequences > 1 else out[0]


def reorder_cache(cache, rows, source=None):
    """Rows `rows` of `source`'s KV cache (by default `cache` itself) into rows 0..len(rows)-1 of `cache`, on the
    device: each layer's keys and values gathered along the batch axis (an embedding lookup of whole rows), then
    written into the same buffers, which a captured decode step keeps reading."""
    rows = np.asarray(rows, dtype=np.int64)
    for (k, v), (sk, sv) in zip(cache, source if source is not None else cache):
        for buf, src in ((k, sk), (v, sv)):
            picked = F.embedding(rows, src.reshape(src.shape[0], -1)).reshape((len(rows),) + tuple(src.shape[1:]))
            buf.backend.write_view(buf.data, 0, contiguous_strides(buf.shape), picked.data)
