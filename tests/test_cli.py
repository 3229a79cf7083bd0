import json
import os
import subprocess
import sys

import pytest


def _lab(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "lab", *args], capture_output=True, text=True, timeout=timeout)


def test_selftest_command_passes_and_prints_one_line_per_op():
    from lab.engine.opcheck import CASES
    r = _lab("selftest", "--backend", "numpy")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("ok  ") == len(CASES)
    assert f"{len(CASES)} of {len(CASES)} ops passed" in r.stdout


def test_bench_kernels_writes_json_with_ratios(tmp_path):
    out = tmp_path / "k.json"
    r = _lab("bench", "kernels", "--backend", "numpy", "--sizes", "64,96", "--budget", "0.01", "--out", str(out))
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    ops = [row["op"] for row in data["rows"]]
    assert ops[:2] == ["matmul 64x64x64", "matmul 96x96x96"] and any(o.startswith("layernorm") for o in ops)
    for row in data["rows"]:
        assert row["lab"] > 0 and row["numpy"] > 0
        assert abs(row["lab/numpy"] - row["lab"] / row["numpy"]) < 1e-9


def test_train_command_reports_decreasing_loss(tmp_path):
    r = _lab("train", "--steps", "40", "--eval-every", "20", "--backend", "numpy", "--no-progress")
    assert r.returncode == 0, r.stderr
    line = [l for l in r.stdout.splitlines() if l.startswith("done:")][0]
    first, last = (float(v) for v in line.split("train loss ")[1].split(",")[0].split(" -> "))
    assert last < first - 0.3


def test_help_everywhere():
    for args in ([], ["train"], ["selftest"], ["bench"], ["info"]):
        r = _lab(*args, "--help")
        assert r.returncode == 0 and "usage" in r.stdout


def test_unknown_preset_is_a_clear_error():
    r = _lab("train", "--preset", "huge", "--steps", "1", "--backend", "numpy")
    assert r.returncode != 0 and "unknown preset 'huge'" in r.stderr


def test_bench_lora_reports_projection(tmp_path):
    out = tmp_path / "l.json"
    r = _lab("bench", "lora", "--backend", "numpy", "--steps", "2", "--rank", "4", "--out", str(out))
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert data["trainable_parameters"] < data["parameters"] / 5
    assert abs(data["minutes_per_million_tokens"] - 1e6 / data["lora_tokens_per_s"] / 60) < 1e-6
    assert "1 M tokens of adapter training" in r.stdout


@pytest.mark.parametrize("preset, backend", [("tiny", "numpy"), ("llama-tiny", "numpy"), ("llama-tiny", "wgpu")])
def test_bench_generate_times_lab_and_transformers_on_the_same_weights(tmp_path, preset, backend):
    out = tmp_path / "g.json"
    new = "6" if backend == "wgpu" else "20"   # (lavapipe is slow)
    r = _lab("bench", "generate", "--preset", preset, "--backend", backend, "--new-tokens", new, "--repeats", "2",
             "--out", str(out))
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert (data["model"], data["backend"], data["prompt_tokens"], data["new_tokens"]) == (preset, backend, 16, int(new))
    assert ("blas" in data) == (backend == "numpy")   # (which BLAS a numpy record's products ran on)
    assert len(data["lab_runs"]) == 2 and data["lab_decode_tokens_per_s"] > 0 and data["lab_time_to_first_token_ms"] > 0
    best = min(run["decode_ms_per_step"] for run in data["lab_runs"])
    assert data["lab_decode_tokens_per_s"] == pytest.approx(1e3 / best)
    assert data["lab_prefill_tokens_per_s"] == pytest.approx(16e3 / data["lab_time_to_first_token_ms"])
    if "torch_decode_tokens_per_s" in data:   # the same weights, greedy: the same tokens
        assert data["first_tokens_equal"] == int(new), data
        assert data["decode_ratio"] == pytest.approx(data["lab_decode_tokens_per_s"] / data["torch_decode_tokens_per_s"])
        assert "lab/transformers decode" in r.stdout
    if preset != "tiny":
        return
    # the default: 200 new tokens, fewer where block_size ends first (tiny's 64 - 16); more is refused
    bad = _lab("bench", "generate", "--preset", "tiny", "--backend", "numpy", "--new-tokens", "49")
    assert bad.returncode != 0 and "--new-tokens 49 with a 16-token prompt passes tiny's block_size 64: at most 48" \
        in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_bench_lora_on_a_llama_preset_reports_each_base_beside_torch_peft(tmp_path):
    out = tmp_path / "l.json"
    r = _lab("bench", "lora", "--preset", "llama-tiny", "--base-dtype", "all", "--backend", "numpy", "--steps", "2",
             "--out", str(out))
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    bases = data["bases"]
    assert list(bases) == ["float32", "float16", "int8", "q4"] and data["targets"] == "all-linear"
    size = {k: v["base_linear_bytes"] for k, v in bases.items()}
    assert size["float16"] * 2 == size["float32"] and size["int8"] < size["float32"] / 3.5
    assert size["q4"] < size["float32"] / 5                     # 4-bit blocks with a float16 scale and minimum
    assert all(v["tokens_per_s"] > 0 and v["peak_bytes"] > v["base_linear_bytes"] for v in bases.values())
    assert bases["q4"]["peak_bytes"] < bases["float32"]["peak_bytes"]
    for dtype in bases:
        assert f"{dtype} base: " in r.stdout
    if "torch_peft" in data:   # the same architecture, weights and batch: the same first loss as lab's float32 base
        torch_run = data["torch_peft"]
        assert torch_run["first_loss"] == pytest.approx(bases["float32"]["first_loss"], abs=1e-4)
        assert bases["q4"]["ratio_to_torch_peft"] == pytest.approx(bases["q4"]["tokens_per_s"] / torch_run["tokens_per_s"])
        assert "x torch+peft" in r.stdout
    else:
        assert "torch+peft: skipped" in r.stdout
    bad = _lab("bench", "lora", "--preset", "tiny", "--base-dtype", "all", "--backend", "numpy", "--steps", "1")
    assert bad.returncode != 0 and "base_dtype 'all' runs the Llama family's presets" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_train_saves_a_checkpoint_that_generate_reads(tmp_path):
    r = _lab("train", "--steps", "3", "--backend", "numpy", "--no-progress", "--out", str(tmp_path / "ck"))
    assert r.returncode == 0, r.stderr
    g = _lab("generate", "--checkpoint", str(tmp_path / "ck"), "--prompt", "And", "--max-new-tokens", "10",
             "--seed", "1", "--backend", "numpy")
    assert g.returncode == 0, g.stderr
    assert g.stdout.startswith("And") and len(g.stdout.rstrip("\n")) == 13
    bad = _lab("generate", "--checkpoint", str(tmp_path / "nope"), "--backend", "numpy")
    assert bad.returncode != 0 and "no such checkpoint directory" in bad.stderr


def test_plan_answers_the_m1_question_in_one_command():
    r = _lab("plan", "--preset", "tiny", "--tokens", "1e6", "--lora-rank", "8", "--device", "m1", "--minutes", "10")
    assert r.returncode == 0, r.stderr
    assert "Apple M1" in r.stdout and "spec-derived" in r.stdout and "65,536 trainable" in r.stdout
    assert r.stdout.strip().splitlines()[-1].startswith("answer: yes")
    bad = _lab("plan", "--device", "tpu")
    assert bad.returncode != 0 and "unknown device profile 'tpu'" in bad.stderr


def _one_error_line(r, *parts):
    """The run failed with exit 2 and one `lab ...: error:` line holding every part, without a traceback."""
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and all(p in errors[0] for p in parts), r.stderr
    return errors[0]


@pytest.mark.parametrize("flag, value, allowed", [
    ("--lr", "nan", "a finite number > 0"), ("--lr", "inf", "a finite number > 0"), ("--lr", "-1", "a finite number > 0"),
    ("--steps", "-1", "an integer >= 1"), ("--batch-size", "0", "an integer >= 1"),
    ("--time-limit", "-5", "a finite number > 0"), ("--eval-every", "2.5", "an integer >= 1"),
])
def test_cli_train_nan_lr_refused(flag, value, allowed):
    r = _lab("train", flag, value, "--backend", "numpy", "--no-progress")
    _one_error_line(r, f"argument {flag}: must be {allowed}, got {value}")


@pytest.mark.parametrize("args, parts", [
    (["generate", "--checkpoint", "x", "--top-k", "2.5"], ["--top-k", "2.5"]),
    (["generate", "--checkpoint", "x", "--top-p", "1.5"], ["--top-p", "> 0 and <= 1", "1.5"]),
    (["generate", "--checkpoint", "x", "--temperature", "nan"], ["--temperature", "nan"]),
    (["generate", "--checkpoint", "x", "--max-new-tokens", "-3"], ["--max-new-tokens", "-3"]),
    (["generate", "--checkpoint", "x", "--beams", "0"], ["--beams", "0"]),
    (["bench", "kernels", "--sizes", "64,x"], ["--sizes", "'x'"]),
    (["bench", "kernels", "--budget", "-1"], ["--budget", "-1"]),
    (["bench", "nope"], ["unknown benchmark suite 'nope'"]),
    (["bench", "diagnostics", "--preset", "huge", "--backend", "numpy"], ["unknown preset 'huge'"]),
    # a batch whose KV cache cannot fit: the fit check's reason, before 10^8 prompts fill the memory (killed, silent)
    (["bench", "generate", "--batch", "100000000", "--backend", "numpy"],
     ["a KV cache for a batch of 100000000 does not fit", "at most"]),
    (["bench", "generate", "--preset", "tiny", "--model", "smollm2-135m-instruct", "--backend", "numpy"],
     ["--model goes with bench generate, instead of --preset", "'tiny'"]),   # (the preset was dropped silently)
    (["bench", "train", "--model", "smollm2-135m-instruct", "--backend", "numpy"], ["--model", "for train"]),
    (["bench", "lora", "--checkpoint-activations", "--backend", "numpy"],
     ["--checkpoint-activations goes with bench train", "for lora"]),   # (lora's bench ran without it)
    (["plan", "--batch-size", "0"], ["--batch-size", "0"]),
    # each was dropped without a word: the plan was the other model's, or a profile's whatever the backend
    (["plan", "--preset", "tiny", "--config", "smollm2-135m"], ["--config", "--preset", "'tiny'", "give one"]),
    (["plan", "--device", "h100", "--backend", "numpy"], ["--backend goes with --device this", "'h100'"]),
    (["plan", "--tokens", "1e9", "--steps", "10", "--device", "m1"], ["tokens 1000000000.0 and steps 10", "give one"]),
    (["plan", "--minutes", "nan"], ["--minutes", "nan"]),
    (["generate"], ["one of the arguments --checkpoint --model is required"]),
])
def test_cli_bad_values_are_one_line_errors(args, parts):
    _one_error_line(_lab(*args), *parts)


def test_cli_corpus_errors_name_the_file_and_the_problem(tmp_path):
    cases = {"empty.txt": (b"", "the file is empty"),
             "binary.bin": (b"\x7fELF\x02\x01\x01\x00\x00", "a binary file, not UTF-8 text (NUL byte at offset 7)"),
             "latin1.txt": ("In the beginning: café".encode("latin-1"), "byte 0xe9 at offset 21")}
    for name, (data, problem) in cases.items():
        (tmp_path / name).write_bytes(data)
        r = _lab("train", "--corpus", str(tmp_path / name), "--backend", "numpy", "--no-progress")
        _one_error_line(r, str(tmp_path / name), problem)


def test_cli_short_validation_split_refused_before_training(tmp_path):
    (tmp_path / "short.txt").write_text("And God said, Let there be light: and there was light." * 10)  # 540 chars
    r = _lab("train", "--corpus", str(tmp_path / "short.txt"), "--steps", "100", "--backend", "numpy",
             "--no-progress", "--out", str(tmp_path / "ck"))
    _one_error_line(r, "validation split is too short for block_size 64", "train has 486 tokens, validation 54")
    assert "step" not in r.stdout and not (tmp_path / "ck").exists()


def test_cli_config_error_names_the_path_once(tmp_path):
    cfg = {"model_type": "gpt2", "vocab_size": 10, "n_positions": 8, "n_embd": 8, "n_layer": 1, "n_head": 2,
           "activation_function": "relu"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    line = _one_error_line(_lab("plan", "--config", str(tmp_path)), "activation_function 'relu' is not supported")
    assert line.count(str(tmp_path)) == 1


INTERRUPT_AT_STEP_3 = """
import os, signal, sys
from lab.train import trainer as T
step = T.Trainer._train_step
def interrupted(self):  # a real SIGINT, arriving in the middle of step 3 (as a Ctrl-C would)
    if self.step_num == 2:
        os.kill(os.getpid(), signal.SIGINT)
    return step(self)
T.Trainer._train_step = interrupted
from lab.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_cli_train_interrupted_before_first_log_writes_checkpoint(tmp_path, any_backend):
    out = tmp_path / "ck"  # on wgpu, step 3 replays the step captured before it
    r = subprocess.run([sys.executable, "-c", INTERRUPT_AT_STEP_3, "train", "--steps", "50", "--backend", any_backend.name,
                        "--no-progress", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 130, r.stderr
    assert "Traceback" not in r.stderr
    done = [line for line in r.stdout.splitlines() if line.startswith("done:")]
    assert len(done) == 1 and "3 steps" in done[0] and "(no step logged: logged every 10 steps)" in done[0]
    # the loss of step 3 itself, read once when the run ended
    assert float(done[0].split("train loss ")[1].split(" at step 3")[0]) > 0
    assert "interrupted (KeyboardInterrupt) after step 3" in done[0]
    assert json.loads((out / "trainer_state.json").read_text())["step"] == 3
    g = _lab("generate", "--checkpoint", str(out), "--prompt", "And", "--max-new-tokens", "5", "--backend", "numpy")
    assert g.returncode == 0, g.stderr


def test_cli_train_stopped_by_nan_before_first_log_reports_and_saves(tmp_path):
    out = tmp_path / "ck"
    r = _lab("train", "--lr", "1e9", "--steps", "50", "--backend", "numpy", "--no-progress", "--out", str(out))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    done = [line for line in r.stdout.splitlines() if line.startswith("done:")]
    assert len(done) == 1 and "(stopped at step 2: NaN/Inf in" in done[0]
    # the NaN step's update was skipped: the checkpoint holds step 1's finite weights
    assert f"saved checkpoint to {out} (step 2)" in r.stdout and (out / "model.safetensors").is_file()


def test_cli_train_nonfinite_weights_keep_previous_checkpoint(tmp_path, any_backend):
    out = tmp_path / "ck"
    assert _lab("train", "--steps", "2", "--backend", "numpy", "--no-progress", "--out", str(out)).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # weight decay at lr 1e300 overflows the weights in step 1, with a finite loss and gradient norm
    r = _lab("train", "--lr", "1e300", "--steps", "50", "--backend", any_backend.name, "--no-progress", "--out", str(out))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"nothing saved to {out}: the weights hold NaN/Inf (a previous checkpoint there is kept)" in r.stdout
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_cli_train_time_limit_before_first_log_summarizes(tmp_path):
    r = _lab("train", "--time-limit", "0.001", "--steps", "50", "--backend", "numpy", "--no-progress",
             "--out", str(tmp_path / "ck"))
    assert r.returncode == 0, r.stderr
    done = [line for line in r.stdout.splitlines() if line.startswith("done:")]
    assert len(done) == 1 and "1 step in" in done[0] and "(time limit of 0.001 s reached)" in done[0]
    assert (tmp_path / "ck" / "model.safetensors").is_file()


def _tiny_checkpoint(directory):
    import lab
    from lab.checkpoint import save_checkpoint
    from lab.data import CharTokenizer
    lab.set_backend("numpy")
    tok = CharTokenizer("abc .")
    model = lab.TransformerLM(lab.TransformerConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=8,
                                                    block_size=8))
    save_checkpoint(directory, model, tok)
    return directory


def test_cli_user_errors_are_exactly_one_stderr_line(tmp_path):
    """A refused input is one line on stderr and nothing else there: the backend's notice ("lab: using numpy
    (requested)") came first, and a plan that does not fit the device spanned four lines ("about nan h")."""
    (tmp_path / "short.txt").write_text("abc" * 20)
    ck = str(_tiny_checkpoint(tmp_path / "ck"))
    cases = [
        ({}, ["train", "--corpus", str(tmp_path / "short.txt")], ["split", "too short for block_size 64"]),
        ({}, ["train", "--preset", "nope"], ["unknown preset 'nope'"]),
        ({}, ["train", "--batch-size", "100000", "--steps", "1"], ["does not fit", "Suggestions: batch "]),
        ({}, ["generate", "--checkpoint", ck, "--prompt", "ab\u2603"], ["prompt 'ab\u2603'", "not in this tokenizer"]),
        ({}, ["generate", "--checkpoint", ck], ["default prompt (a newline) is not in the vocabulary", ck]),
        ({}, ["plan", "--seq", "100000", "--device", "m1"], ["seq 100,000 is longer than the model's block_size 64"]),
        ({"LAB_BACKEND": "bogus"}, ["train", "--steps", "1"], ["LAB_BACKEND='bogus'", "expected 'wgpu', 'numpy'"]),
        ({}, ["train", "--backend", "cuda"], ["argument --backend: invalid choice: 'cuda'"]),
    ]
    env = {k: v for k, v in os.environ.items() if k != "LAB_BACKEND"}
    for extra_env, args, parts in cases:
        # (a plan on a device profile takes no --backend: it would be refused for that)
        if "--backend" not in args and "LAB_BACKEND" not in extra_env and args[0] != "plan":
            args = [*args, "--backend", "numpy"]
        r = subprocess.run([sys.executable, "-m", "lab", *args], capture_output=True, text=True, timeout=300,
                           env={**env, **extra_env})
        assert r.returncode == 2 and "nan" not in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
        assert all(p in r.stderr for p in parts), (args, r.stderr)
        assert r.stdout == "", (args, r.stdout)


def test_cli_internal_errors_keep_their_traceback(monkeypatch):
    """Only lab's own input errors (InputError, CheckpointError, DoesNotFitError) and file errors are one-line
    messages: a ValueError from a bug (here: one raised where the corpus is read) propagates with its traceback
    instead of being shown as if the user's input were wrong."""
    import lab.data
    from lab.cli import main

    def broken(*args, **kwargs):
        raise ValueError("operands could not be broadcast together with shapes (3,) (4,)")
    monkeypatch.setattr(lab.data, "char_dataset", broken)
    with pytest.raises(ValueError, match="could not be broadcast"):
        main(["train", "--steps", "1", "--backend", "numpy", "--no-progress"])


def test_cli_beam_search_refuses_sampling_flags(tmp_path, capsys):
    """generate --beams 3 --stop x (or --temperature, --top-k, --top-p, --repetition-penalty, --seed, --greedy)
    ignored the flag without a word: beam search takes none of them, so they are refused by name."""
    from lab.cli import main
    ck = str(_tiny_checkpoint(tmp_path / "ck"))
    capsys.readouterr()  # (the backend's notice, printed by set_backend outside the command line)
    for flags, named in ((["--stop", "x"], "--stop sets"), (["--temperature", "0.5", "--top-k", "3"],
                         "--temperature, --top-k set"), (["--greedy"], "--greedy sets"), (["--seed", "1"], "--seed")):
        assert main(["generate", "--checkpoint", ck, "--prompt", "ab", "--beams", "3", *flags]) == 2
        out = capsys.readouterr()
        assert out.out == "" and len(out.err.strip().splitlines()) == 1, out
        assert named in out.err and "--beams 3 searches for the most likely continuation" in out.err, out.err
    assert main(["generate", "--checkpoint", ck, "--prompt", "ab", "--beams", "3", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("ab")


def test_cli_train_sigterm_stops_after_the_step_and_saves(tmp_path):
    """SIGTERM (a job scheduler ending the run, `docker stop`) killed the process: no checkpoint, no summary. It now
    stops like a Ctrl-C after the step in flight, saves, summarizes and exits 143 (128 + 15)."""
    out = tmp_path / "ck"
    script = INTERRUPT_AT_STEP_3.replace("signal.SIGINT", "signal.SIGTERM")
    r = subprocess.run([sys.executable, "-c", script, "train", "--steps", "50", "--backend", "numpy", "--no-progress",
                        "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 143 and "Traceback" not in r.stderr, (r.returncode, r.stderr)
    done = [line for line in r.stdout.splitlines() if line.startswith("done:")]
    assert len(done) == 1 and "(terminated (SIGTERM) after step 3)" in done[0], r.stdout
    assert json.loads((out / "trainer_state.json").read_text())["step"] == 3


def test_cli_generate_prints_the_text_cut_at_the_stop_string(tmp_path, capsys):
    """generate --stop printed the stop string (streamed as it arrived) although generate() returns the text cut
    where it begins: stdout is now prompt + that text, also for a stop string spanning tokens."""
    from lab.checkpoint import load_checkpoint
    from lab.cli import main
    from lab.generate import generate
    ck = str(_tiny_checkpoint(tmp_path / "ck"))
    model, tok, _ = load_checkpoint(ck)
    full = generate(model, "ab", 12, tokenizer=tok, greedy=True)
    capsys.readouterr()
    for stop in (full[2:4], full[5], full[:3], "never there"):   # two tokens, one, from the first token, none
        assert main(["generate", "--checkpoint", ck, "--prompt", "ab", "--max-new-tokens", "12", "--greedy",
                     "--stop", stop, "--backend", "numpy"]) == 0
        cut = full[:full.find(stop)] if stop in full else full
        assert capsys.readouterr().out == "ab" + cut + "\n", (stop, full)


@pytest.mark.parametrize("where", ["under a file", "in /proc"])
def test_cli_train_out_that_cannot_be_made_is_refused_before_training(tmp_path, where):
    """--out under a regular file, or where no directory can be made (/proc, a read-only mount), trained first and
    lost the run at the save ('[Errno 2] No such file or directory'); it is refused before the first step."""
    (tmp_path / "notes.txt").write_text("x")
    out = str(tmp_path / "notes.txt" / "ck") if where == "under a file" else "/proc/lab-no-such/ck"
    r = _lab("train", "--steps", "50", "--backend", "numpy", "--no-progress", "--out", out)
    assert r.returncode == 2 and r.stdout == "" and len(r.stderr.strip().splitlines()) == 1, (r.stdout, r.stderr)
    assert out in r.stderr and ("is a file, not a directory" in r.stderr or "making a directory in /proc failed"
                                in r.stderr), r.stderr
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".lab-probe")]


def test_trainer_checkpoint_dir_that_cannot_be_made_is_refused_before_training(tmp_path, numpy_backend):
    import numpy as np
    import lab
    from lab.checkpoint import CheckpointError
    from lab.train import TrainConfig, Trainer
    (tmp_path / "notes.txt").write_text("x")
    model = lab.TransformerLM(lab.TransformerConfig(vocab_size=5, n_layer=1, n_head=2, n_embd=8, block_size=8))
    ids = np.arange(100) % 5
    t = Trainer(model, ids, ids, TrainConfig(steps=3, checkpoint_dir=str(tmp_path / "notes.txt" / "ck")))
    with pytest.raises(CheckpointError, match="cannot be made: .*notes.txt is a file"):
        t.run(progress=False)
    assert t.step_num == 0


def test_cli_lab_refusals_from_deeper_modules_stay_one_line(tmp_path):
    """Once only InputError is a one-liner, every refusal of user input must be one: bench lora --rank 1000 (lora's
    rank check) printed a traceback after the ValueError narrowing."""
    r = _lab("bench", "lora", "--rank", "1000", "--backend", "numpy", "--steps", "1", "--out", str(tmp_path / "l.json"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "LoRA rank r=1000 exceeds min(in, out) = 128" in r.stderr


def test_user_facing_refusals_are_input_errors():
    """The refusals a user's input reaches (configs, LoRA settings, optimizer and model misuse) are InputErrors,
    the type the command line prints as one line; a plain ValueError is kept for bugs."""
    import numpy as np
    import lab
    from lab import lora
    from lab.checks import InputError
    from lab.train.optim import AdamW
    lab.set_backend("numpy")
    model = lab.TransformerLM(lab.TransformerConfig(vocab_size=5, n_layer=1, n_head=2, n_embd=8, block_size=4))
    for call in (lambda: lab.TransformerConfig(n_embd=10, n_head=3), lambda: lab.TransformerConfig(dropout=1.5),
                 lambda: lora.apply(model, r=100), lambda: lora.apply(model, r=2, targets=["nope"]),
                 lambda: model(np.zeros((1, 9), np.int32)), lambda: AdamW([]),
                 lambda: lab.data.load_tokenizer_json('{"type": "x"}')):
        with pytest.raises(InputError):
            call()


def test_cli_main_trains_from_a_thread_other_than_the_main_one(capsys):
    """main(['train', ...]) in a thread (a notebook's worker, a test runner): the SIGTERM handler only the main
    thread may install is skipped there instead of failing with 'signal only works in main thread'."""
    import threading
    from lab.cli import main
    codes = []
    t = threading.Thread(target=lambda: codes.append(main(["train", "--steps", "2", "--backend", "numpy",
                                                           "--no-progress", "--eval-every", "2"])))
    t.start()
    t.join(timeout=120)
    assert codes == [0], capsys.readouterr()
    assert "done: 2 steps" in capsys.readouterr().out


def test_cli_error_with_a_line_break_is_printed_on_one_line(monkeypatch, capsys):
    import lab.data
    from lab.checks import InputError
    from lab.cli import main

    def refuse(*args, **kwargs):
        raise InputError("corpus x: the first line\nand the second")
    monkeypatch.setattr(lab.data, "char_dataset", refuse)
    assert main(["train", "--backend", "numpy", "--no-progress"]) == 2
    assert capsys.readouterr().err == "lab train: error: corpus x: the first line and the second\n"


def test_a_bench_record_whose_write_fails_midway_keeps_the_previous_record(tmp_path, monkeypatch):
    """Every bench suite writes its --out record through write_result: it wrote the file in place, so a Ctrl-C or
    a full disk mid-write left half a JSON record where the previous one was."""
    from pathlib import Path

    import numpy as np

    from lab.bench.timing import write_result
    out, said = tmp_path / "runs" / "bench.json", []
    write_result(out, {"ratio": np.float32(1.5)}, said.append)   # (numpy scalars are written as numbers)
    assert json.loads(out.read_text()) == {"ratio": 1.5} and said == [f"wrote {out}"]
    real = Path.write_text

    def half(self, text, *args, **kwargs):
        real(self, text[:len(text) // 2], *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", half)
    with pytest.raises(KeyboardInterrupt):
        write_result(out, {"ratio": 2.0, "runs": list(range(100))}, said.append)
    monkeypatch.undo()
    assert json.loads(out.read_text()) == {"ratio": 1.5}
    assert [p.name for p in out.parent.iterdir()] == ["bench.json"]   # no temporary left beside it


@pytest.mark.parametrize("args, parts", [
    (["train", "--base-dtype", "q4"], ["--base-dtype goes with bench lora, got it for train"]),
    (["lora", "--block-size", "8"], ["--block-size goes with bench train, got it for lora"]),
    (["kernels", "--steps", "3"], ["--steps goes with bench train or lora or diagnostics", "for kernels"]),
    (["diagnostics", "--rank", "4"], ["--rank goes with bench lora", "for diagnostics"]),
    (["generate", "--sizes", "64"], ["--sizes goes with bench kernels", "for generate"]),
    (["train", "--model-shapes"], ["--model-shapes goes with bench kernels", "for train"]),
])
def test_bench_refuses_a_flag_its_suite_does_not_read(args, parts, monkeypatch, capsys):
    """A flag the suite does not read ran the suite without it (bench train --base-dtype q4 timed float32)."""
    import lab.bench.diagnostics, lab.bench.generate, lab.bench.kernels, lab.bench.lora, lab.bench.train
    from lab.cli import main
    for module, fn in ((lab.bench.diagnostics, "run_diagnostics_bench"), (lab.bench.generate, "run_generate_bench"),
                       (lab.bench.kernels, "run_kernels"), (lab.bench.lora, "run_lora_bench"),
                       (lab.bench.train, "run_train_bench")):
        monkeypatch.setattr(module, fn, lambda *a, **k: pytest.fail("the suite ran"))
    assert main(["bench", *args, "--backend", "numpy"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(p in err for p in parts), err


def test_bench_runs_the_steps_given_even_the_default_of_another_suite(monkeypatch):
    """bench diagnostics --steps 20 ran 300 steps: 20, the flag's default, was taken for "not given"."""
    import lab.bench.diagnostics
    from lab.cli import main
    asked = []
    monkeypatch.setattr(lab.bench.diagnostics, "run_diagnostics_bench", lambda *a, steps, **k: asked.append(steps))
    assert main(["bench", "diagnostics", "--steps", "20", "--backend", "numpy"]) == 0
    assert main(["bench", "diagnostics", "--backend", "numpy"]) == 0
    assert asked == [20, 300]


def test_bench_out_that_cannot_be_written_is_refused_before_the_run(tmp_path, monkeypatch, capsys):
    """--out naming a directory (or a path under a file) failed with a bare errno only after the whole run."""
    import lab.bench.kernels
    from lab.cli import main
    monkeypatch.setattr(lab.bench.kernels, "run_kernels", lambda *a, **k: pytest.fail("ran before --out was checked"))
    (tmp_path / "notes.txt").write_text("mine")
    for out, part in ((tmp_path, "is a directory; a benchmark writes one JSON file"),
                      (tmp_path / "notes.txt" / "k.json", "is a file, not a directory")):
        assert main(["bench", "kernels", "--backend", "numpy", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert part in err and len(err.strip().splitlines()) == 1, err
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"] and (tmp_path / "notes.txt").read_text() == "mine"
