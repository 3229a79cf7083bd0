"""The command line with the Llama family (issue #20 item 5): export and import of a Llama checkpoint, and
`generate --model NAME_OR_PATH [--chat]` with a pretrained model's own tokenizer and chat template."""
import json
from pathlib import Path

import numpy as np
import pytest

import lab
from lab.checkpoint import save_checkpoint
from lab.cli import main
from lab.data import CharTokenizer, load_corpus
from lab.engine.backend import using_backend
from tests.ggufs import hf_tensors, write_gguf


def _llama_checkpoint(path):
    tok = CharTokenizer.from_text(load_corpus())
    lab.manual_seed(0)
    model = lab.LlamaLM(lab.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=48, intermediate_size=80,
                                        num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                                        tie_word_embeddings=False, max_position_embeddings=32)).eval()
    save_checkpoint(path, model, tok)
    return model, tok


def test_llama_checkpoint_exports_to_transformers_and_imports_back_with_the_same_logits(tmp_path, any_backend,
                                                                                         capsys):
    import torch
    import transformers
    with using_backend(any_backend):
        model, tok = _llama_checkpoint(tmp_path / "ck")
        ids = tok.encode("In the beginning God")
        with lab.no_grad():
            want = model(np.array([ids])).numpy()
        assert main(["export", "--checkpoint", str(tmp_path / "ck"), "--out", str(tmp_path / "hf")]) == 0
        assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
        back, tok2, _ = lab.checkpoint.load_checkpoint(tmp_path / "back")
        with lab.no_grad():
            again = back(np.array([ids])).numpy()
    out = capsys.readouterr().out
    assert "(LlamaForCausalLM layout)" in out and "ddp_train" in out, out
    assert isinstance(back, lab.LlamaLM) and back.config == model.config and tok2.chars == tok.chars
    np.testing.assert_array_equal(again, want)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager")
    with torch.no_grad():
        theirs = hf(torch.tensor(np.array([ids]))).logits.numpy()
    np.testing.assert_allclose(theirs, want, rtol=1e-4, atol=1e-4)   # float32 orders of summation differ
    assert main(["generate", "--checkpoint", str(tmp_path / "back"), "--prompt", "In the", "--greedy",
                 "--max-new-tokens", "5", "--backend", any_backend.name]) == 0
    assert capsys.readouterr().out.startswith("In the")


@pytest.fixture
def gguf_model(tmp_path):
    path = tmp_path / "chat.gguf"
    write_gguf(path, hf_tensors(), context=64)
    return path


def test_generate_model_uses_its_tokenizer_and_with_chat_its_template(gguf_model, any_backend, capsys):
    args = ["--greedy", "--max-new-tokens", "6", "--backend", any_backend.name]
    with using_backend(any_backend):
        model, tok = lab.from_pretrained(gguf_model), lab.load_tokenizer(gguf_model)
        prompt = tok.apply_chat_template([{"role": "user", "content": "hi there"}], add_generation_prompt=True,
                                         tokenize=False)
        reply = lab.generate(model, prompt, 6, tokenizer=tok, greedy=True)
        plain = lab.generate(model, "hi there", 6, tokenizer=tok, greedy=True)
    capsys.readouterr()
    assert main(["generate", "--model", str(gguf_model), "--prompt", "hi there", "--chat", *args]) == 0
    assert capsys.readouterr().out == reply + "\n"   # the reply alone, not the rendered template
    assert main(["generate", "--model", str(gguf_model), "--prompt", "hi there", *args]) == 0
    assert capsys.readouterr().out == "hi there" + plain + "\n"


def test_generate_chat_ends_the_reply_at_the_templates_turn_end_not_the_models_eos(tmp_path, any_backend, capsys):
    # the rendered template continued as text printed '<|im_end|>' and what followed (the config has no EOS here)
    from test_chat import _ids, _scripted, _tokenizer
    tok = _tokenizer(tmp_path / "tok")
    end = tok.encode("<|im_end|>", add_special_tokens=False).tolist()
    hi = [{"role": "user", "content": "hi"}]
    save_checkpoint(tmp_path / "ck", _scripted(tok, hi, _ids(tok, "Ça va 🙂") + end + _ids(tok, "never said")), tok)
    args = ["generate", "--checkpoint", str(tmp_path / "ck"), "--prompt", "hi", "--chat", "--max-new-tokens", "40",
            "--backend", any_backend.name]
    capsys.readouterr()
    assert main(args + ["--greedy"]) == 0
    assert capsys.readouterr().out == "Ça va 🙂\n"
    assert main(args + ["--beams", "2"]) == 0   # beam search too
    assert capsys.readouterr().out == "Ça va 🙂\n"
    assert main(args + ["--stop", "va"]) == 2
    assert capsys.readouterr().err.strip().endswith("--stop goes without --chat: a chat reply ends at its turn's "
                                                    "end token")


def test_generate_command_refusals_are_one_line(tmp_path, gguf_model, capsys):
    _llama_checkpoint(tmp_path / "ck")
    cases = [(["--checkpoint", str(tmp_path / "ck"), "--prompt", "In", "--chat"],
              f"--chat: the tokenizer of {tmp_path / 'ck'} (CharTokenizer) has no chat template"),
             (["--model", str(gguf_model), "--chat"], "--chat needs a --prompt"),
             (["--model", str(tmp_path / "nothing-here.gguf"), "--prompt", "x"], "nothing-here.gguf"),
             (["--model", "not-a-model", "--prompt", "x"], "'not-a-model' is not a local path, a shipped model")]
    for argv, message in cases:
        assert main(["generate", *argv, "--backend", "numpy"]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (argv, err)
    with pytest.raises(SystemExit) as e:   # argparse's own: one of the two, not both
        main(["generate", "--model", str(gguf_model), "--checkpoint", str(tmp_path / "ck")])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_generate_chats_with_the_shipped_model(numpy_backend, capsys):
    try:
        lab.shipped.path("smollm2-135m-instruct")
    except lab.checks.InputError as e:
        pytest.skip(str(e))
    assert main(["generate", "--model", "smollm2-135m-instruct", "--prompt", "What is the capital of France?",
                 "--chat", "--greedy", "--max-new-tokens", "30", "--backend", "numpy"]) == 0
    out = capsys.readouterr().out
    assert "Paris" in out and "<|im_start|>" not in out, out


def test_bench_train_runs_a_llama_preset_beside_transformers_with_the_same_weights(tmp_path, any_backend):
    """`bench train --preset llama-tiny`: lab's LlamaLM and transformers' LlamaForCausalLM (eager, fp32) built
    from lab's initial weights take the same first batch to the same loss, and the run reports their ratio."""
    out = tmp_path / "bench.json"
    assert main(["bench", "train", "--preset", "llama-tiny", "--steps", "2", "--batch-size", "2", "--block-size",
                 "16", "--backend", any_backend.name, "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    import torch   # (PyTorch runs on the GPU beside the wgpu backend where it has CUDA: the H200)
    device = "cuda" if any_backend.name == "wgpu" and torch.cuda.is_available() else "cpu"
    assert (r["preset"], r["block_size"], r["batch_size"], r["torch_device"]) == ("llama-tiny", 16, 2, device)
    assert r["model"] == "transformers LlamaForCausalLM (eager attention, fp32)"
    assert r["lab_first_loss"] == pytest.approx(r["torch_first_loss"], rel=1e-5)
    assert np.isfinite(r["ratio"]) and r["ratio"] > 0
    assert r["ratio"] == pytest.approx(r["lab_tokens_per_s"] / r["torch_tokens_per_s"])
    assert main(["bench", "train", "--preset", "llama-tiny", "--block-size", "65", "--backend", "numpy"]) == 2
