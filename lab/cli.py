"""The command line: python -m lab {train, selftest, bench, info} ... (--help on each)."""
import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from .checks import InputError, integer, parse_number, real


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """A bad flag is one line on stderr (argparse adds the usage block): the message says what was wrong."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _number(kind, **limits):
    """An argparse type: the flag's text as a number checked by lab.checks (kind: integer or real), refused in
    one line that argparse prefixes with the flag's name."""
    def parse(text):
        try:
            return kind("value", parse_number("value", text), **limits)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix("value ")) from None
    return parse


def _ints(text):
    """--sizes: comma-separated positive integers."""
    return [_number(integer, low=1)(t) for t in text.split(",")]


def _train(args):
    import numpy as np
    import lab
    from lab.data import char_dataset
    from lab.models import MODELS, PRESETS, TransformerConfig
    from lab.train import TrainConfig, Trainer
    from dataclasses import replace

    if args.out:   # before training, whose result a refused save would lose
        from lab.checkpoint import check_save_target
        check_save_target(args.out, writable=True)
    if args.backend:
        lab.set_backend(args.backend)
    lab.manual_seed(args.seed)
    tok, train_ids, val_ids = char_dataset(args.corpus)
    if args.preset not in PRESETS:
        raise InputError(f"unknown preset {args.preset!r}: choose one of {sorted(PRESETS)}")
    mcfg = replace(PRESETS[args.preset], vocab_size=tok.vocab_size)
    model = MODELS[type(mcfg)](mcfg)   # the preset's family
    tcfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, block_size=args.block_size or 0, lr=args.lr, eval_every=args.eval_every,
                       warmup_steps=min(100, args.steps // 10 + 1), max_seconds=args.time_limit or 0.0,
                       replay_steps=not args.no_replay, checkpoint_activations=args.checkpoint_activations)
    trainer = Trainer(model, train_ids, val_ids, tcfg)  # refuses a batch or split that cannot train, in one line
    _print_notices(args)  # every check passed: the backend's notice now, not at the end of the run
    shape = (f"{mcfg.n_layer} layers, {mcfg.n_head} heads, {mcfg.n_embd} dims" if isinstance(mcfg, TransformerConfig)
             else f"{mcfg.num_hidden_layers} layers, {mcfg.num_attention_heads} heads ({mcfg.num_key_value_heads} "
                  f"key-value), {mcfg.hidden_size} dims")
    print(f"model {args.preset}: {model.num_parameters() / 1e6:.2f}M parameters, {shape}, "
          f"block {trainer.block_size}; corpus {args.corpus}: "
          f"{len(train_ids) + len(val_ids)} characters, vocab {tok.vocab_size}; backend {lab.get_backend().name}")
    t0 = time.perf_counter()
    # SIGTERM (a job scheduler's or `docker stop`'s way of ending a run) stops like a Ctrl-C: after the step in
    # flight, with the checkpoint saved, instead of killing the process and losing the run
    terminated = []

    def on_sigterm(signum, frame):
        terminated.append(signum)
        trainer.request_stop()
    main_thread = threading.current_thread() is threading.main_thread()  # (only it may set a signal handler)
    previous = signal.signal(signal.SIGTERM, on_sigterm) if main_thread else None
    try:
        history = trainer.run(progress=not args.no_progress)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    if terminated and not (trainer.stop_reason or "").startswith("interrupted"):
        trainer.stop_reason = f"terminated (SIGTERM) after step {trainer.step_num}"
    seconds = time.perf_counter() - t0
    # a run may stop before its first log (Ctrl-C, NaN/Inf, --time-limit): report and save what there is. The step
    # that hit NaN/Inf was skipped on the device, so it changed no weights
    fault, interrupted = trainer.fault, (trainer.stop_reason or "").startswith(("interrupted", "terminated"))
    updated = trainer.step_num - (fault is not None)
    finite = all(np.isfinite(v).all() for v in model.state_dict().values())
    if args.out:  # before the evaluation: a second Ctrl-C there must not cost the checkpoint
        from lab.checkpoint import save_checkpoint
        if not updated:
            print(f"nothing saved to {args.out}: no step changed the weights")
        elif not finite:
            print(f"nothing saved to {args.out}: the weights hold NaN/Inf (a previous checkpoint there is kept)")
        else:
            save_checkpoint(args.out, model, tok, trainer)
            print(f"saved checkpoint to {args.out} (step {trainer.step_num})")
    parts = [f"{trainer.step_num} step{'' if trainer.step_num == 1 else 's'} in {seconds:.0f} s"]
    def loss(v):  # a diverging run's 1.06e+18, not 1056755812459872256.000
        return f"{v:.3f}" if abs(v) < 1e4 else f"{v:.3g}"
    if history:
        parts.append(f"train loss {loss(history[0]['loss'])} -> {loss(history[-1]['loss'])}")
    elif trainer.last_loss is not None:  # stopped before the first log (every log_every steps): the last step's
        parts.append(f"train loss {loss(trainer.last_loss)} at step {trainer.step_num} "
                     f"(no step logged: logged every {tcfg.log_every} steps)")
    else:
        parts.append("no train loss: no step taken")
    if updated and finite and not interrupted:
        parts.append(f"val loss {loss(trainer.evaluate())}")
    if updated:
        parts.append(f"{updated * args.batch_size * trainer.block_size / max(seconds, 1e-9):.0f} tokens/s")
    reason = f"stopped at step {fault.step}: NaN/Inf in {fault.tensor}" if fault else trainer.stop_reason
    print("done: " + ", ".join(parts) + (f" ({reason})" if reason else ""))
    if fault is not None or not finite:
        return 1
    return (143 if terminated else 130) if interrupted else 0   # 128 + the signal's number, as a shell reports it


def _chat_turn(lab, model, tok, args):
    """generate --chat: one reply of lab.chat to --prompt, streamed. (The template rendered and continued as text
    ran past the turn's end token, printing it and what followed, where that token is not the model's EOS.)"""
    if args.stop is not None:
        raise InputError("--stop goes without --chat: a chat reply ends at its turn's end token")
    shown = []

    def emit(piece):
        print(piece, end="", flush=True)
        shown.append(piece)
    try:
        lab.chat(model, tok, [{"role": "user", "content": args.prompt}], args.max_new_tokens, greedy=args.greedy,
                 temperature=args.temperature or 0.8, top_k=args.top_k, top_p=args.top_p,
                 repetition_penalty=args.repetition_penalty or 1.0, seed=args.seed, on_token=emit)
    except KeyboardInterrupt:   # the shell's prompt on a line of its own after the reply cut short
        if shown:
            print(flush=True)
        raise
    print(flush=True)
    return 0


def _generate(args):
    import lab
    from lab.checkpoint import load_checkpoint
    from lab.chat import turn_end
    from lab.generate import beam_search, generate
    sampling = [flag for flag, value in (("--temperature", args.temperature), ("--top-k", args.top_k),
                                         ("--top-p", args.top_p), ("--repetition-penalty", args.repetition_penalty),
                                         ("--stop", args.stop), ("--seed", args.seed), ("--greedy", args.greedy or None))
                if value is not None]
    if args.beams > 1 and sampling:  # beam search takes none of them: refused, not silently ignored
        raise InputError(f"{', '.join(sampling)} set{'s' if len(sampling) == 1 else ''} how tokens are sampled, but "
                         f"--beams {args.beams} searches for the most likely continuation instead: drop "
                         f"{'it' if len(sampling) == 1 else 'them'} or --beams")
    if args.chat and not args.prompt:
        raise InputError("--chat needs a --prompt: the user's message the model answers")
    if args.backend:
        lab.set_backend(args.backend)
    if args.model:   # a pretrained model by name or path, with its own tokenizer
        model, tok = lab.from_pretrained(args.model), lab.load_tokenizer(args.model)
    else:
        model, tok, _ = load_checkpoint(args.checkpoint)
    source = args.model or args.checkpoint
    if args.chat:   # the message in the model's chat template; the reply alone is printed
        if not callable(getattr(tok, "apply_chat_template", None)):
            raise InputError(f"--chat: the tokenizer of {source} ({type(tok).__name__}) has no chat template")
        if args.beams == 1:   # lab.chat: the reply ends at the template's turn end, which need not be the config's EOS
            return _chat_turn(lab, model, tok, args)
        prompt = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                         tokenize=False)
    else:
        prompt = args.prompt if args.prompt else "\n"
    shown_prompt = "" if args.chat else prompt
    if not args.prompt:  # the default prompt: a vocabulary without a newline needs one given
        try:
            tok.encode(prompt)
        except ValueError:
            raise InputError(f"no --prompt given, and the default prompt (a newline) is not in the vocabulary of "
                             f"{source}: give a --prompt in the text it was trained on") from None
    if args.beams > 1:
        end_ids, end_text = turn_end(tok, model) if args.chat else (None, None)   # (a reply's end, as lab.chat's)
        text = beam_search(model, prompt, args.max_new_tokens, num_beams=args.beams, tokenizer=tok,
                           eos_token_id=end_ids or None)
        print(shown_prompt + (text[:text.find(end_text)] if end_text and end_text in text else text))
        return 0
    shown, stop = {"text": "", "out": 0, "prompt": False}, args.stop

    def emit(text):  # the prompt goes out with the first token: a refused argument leaves stdout empty
        print(text if shown["prompt"] else shown_prompt + text, end="", flush=True)
        shown["prompt"] = True

    def show(_, piece):
        # the stop string is cut from the text, as generate() returns it: text that may be its beginning is held
        # until the next pieces show it is not (the stop string can span tokens)
        shown["text"] += piece
        text = shown["text"]
        end = text.find(stop) if stop and stop in text else len(text) - (len(stop) - 1 if stop else 0)
        if end > shown["out"] or not shown["prompt"]:
            emit(text[shown["out"]:max(end, shown["out"])])
            shown["out"] = max(end, shown["out"])
    try:
        text = generate(model, prompt, args.max_new_tokens, tokenizer=tok, temperature=args.temperature or 0.8,
                        top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty or 1.0,
                        greedy=args.greedy, stop=args.stop, seed=args.seed, on_token=show)
    except KeyboardInterrupt:  # the shell's prompt goes on a line of its own after the text cut short
        if shown["prompt"]:
            print(flush=True)
        raise
    emit(text[shown["out"]:] + "\n")   # what was held back and is not the stop string
    return 0


def _selftest(args):
    import lab
    if args.backend:
        lab.set_backend(args.backend)
    lab.selftest()
    return 0


# the flags each bench suite reads, by argparse dest (--backend and --out go with every suite); a flag given to a
# suite that does not read it is refused: it was dropped without a word (bench train --base-dtype q4 timed float32)
_BENCH_FLAGS = {"kernels": ("sizes", "budget", "model_shapes"),
                "train": ("preset", "batch_size", "steps", "block_size", "checkpoint_activations"),
                "lora": ("preset", "batch_size", "steps", "rank", "base_dtype"),
                "diagnostics": ("preset", "steps"),
                "generate": ("preset", "model", "batch_size", "new_tokens", "prompt_tokens", "repeats")}


def _bench(args):
    if args.suite not in _BENCH_FLAGS:
        raise InputError(f"unknown benchmark suite {args.suite!r}: available: {', '.join(_BENCH_FLAGS)}")
    # (every one of these flags defaults to None: not given; their defaults are applied below)
    given = {k for flags in _BENCH_FLAGS.values() for k in flags if getattr(args, k) is not None}
    for key in sorted(given - set(_BENCH_FLAGS[args.suite])):
        flag = "--" + key.replace("_", "-")
        readers = [suite for suite, flags in _BENCH_FLAGS.items() if key in flags]
        raise InputError(f"{flag} goes with bench {' or '.join(readers)}, got it for {args.suite}")
    if args.model is not None and args.preset is not None:   # (--preset was dropped for --model without a word)
        raise InputError(f"--model goes with bench generate, instead of --preset: got --model {args.model!r} and "
                         f"--preset {args.preset!r}")
    preset = args.preset or "tiny"
    from lab.engine.backend import get_backend, set_backend
    name = set_backend(args.backend).name if args.backend else get_backend().name
    batch = args.batch_size
    if args.suite == "generate":
        batch = batch or 1
        record = f"generate-{(args.model or preset).replace('/', '-')}-{name}-batch{batch}"
    elif args.suite == "train" and args.checkpoint_activations:
        record = f"checkpointing-{preset}-{name}"
    else:
        record = f"{args.suite}-{name}" if args.suite == "kernels" else f"{args.suite}-{preset}-{name}"
    out = args.out or f"bench-results/{record}.json"
    # before the run, whose record a refused write would lose (it failed at the end: a directory given as --out)
    from lab.io import check_save_target
    if Path(out).is_dir():
        raise InputError(f"--out {out}: is a directory; a benchmark writes one JSON file: give a file path such as "
                         f"{Path(out) / record}.json")
    check_save_target(Path(out).parent, writable=True)
    if args.suite == "diagnostics":
        from lab.bench.diagnostics import run_diagnostics_bench
        run_diagnostics_bench(preset, name, steps=args.steps or 300, out_path=out)
    elif args.suite == "lora":
        from lab.bench.lora import run_lora_bench
        run_lora_bench(preset, name, r=args.rank or 8, batch_size=batch, steps=args.steps or 20, out_path=out,
                       base_dtype=args.base_dtype or "float32")
    elif args.suite == "generate":
        from lab.bench.generate import run_generate_bench
        run_generate_bench(preset, name, batch_size=batch, new_tokens=args.new_tokens,
                           prompt_tokens=args.prompt_tokens or 16, model_name=args.model, repeats=args.repeats or 3,
                           out_path=out)
    elif args.suite == "train" and args.checkpoint_activations:
        from lab.bench.train import run_checkpointing_bench
        run_checkpointing_bench(preset, name, every=args.checkpoint_activations, batch_size=batch,
                                steps=args.steps or 20, out_path=out, block_size=args.block_size)
    elif args.suite == "train":
        from lab.bench.train import run_train_bench
        run_train_bench(preset, name, batch_size=batch, steps=args.steps or 20, out_path=out, block_size=args.block_size)
    else:
        from lab.bench.kernels import MATMUL_SIZES, run_kernels
        run_kernels(name, sizes=args.sizes or MATMUL_SIZES, out_path=out, budget_s=args.budget or 0.5,
                    model_shapes=bool(args.model_shapes))
    return 0


def _lora_targets(text):
    """--lora-targets: "all-linear", one layer name or pattern, or names separated by commas (None: the family's
    default)."""
    if text is None:
        return None
    names = [t.strip() for t in text.split(",")]
    return names[0] if len(names) == 1 else names


def _plan(args):
    from lab import plan
    if args.config is not None and args.preset is not None:   # (--preset was dropped for --config without a word)
        raise InputError(f"--config and --preset both name the model: got --config {args.config!r} and --preset "
                         f"{args.preset!r}; give one")
    if args.backend and args.device != "this":   # (a profile's figures are the profile's, whatever the backend)
        raise InputError(f"--backend goes with --device this (the measured backend), got it with --device "
                         f"{args.device!r}, a profile's own figures")
    model = args.config or args.preset or "tiny"
    if args.backend:   # (with --device this only, checked above)
        import lab
        lab.set_backend(args.backend)
    p = plan.estimate(model, batch=args.batch_size, seq=args.seq, tokens=args.tokens, steps=args.steps,
                      lora_rank=args.lora_rank, device=args.device, optimizer=args.optimizer,
                      vocab_size=args.vocab_size, lora_base_dtype=args.lora_base_dtype,
                      lora_targets=_lora_targets(args.lora_targets),
                      checkpoint_activations=args.checkpoint_activations)
    print(p)
    if args.minutes is not None:
        ok = p.fits and p.total_time_s <= args.minutes * 60
        print(f"answer: {'yes' if ok else 'no'}: " + (f"predicted {p.total_time_s / 60:.1f} min "
              f"{'within' if p.total_time_s <= args.minutes * 60 else 'over'} {args.minutes:g} min"
              if p.fits else "the plan does not fit the device"))
    return 0


def _export(args):
    from lab.scale import export_checkpoint
    from lab.scale import LAB_TOKENIZER_FILE
    out = export_checkpoint(args.checkpoint, args.out, format=args.format, adapter=args.adapter)
    architecture = json.loads((out / "config.json").read_text())["architectures"][0]
    print(f"exported {args.checkpoint} to {out} ({architecture} layout"
          + (", with the LoRA adapter in adapter/" if (out / "adapter").is_dir() else "") + ")")
    if (out / LAB_TOKENIZER_FILE).is_file():   # ddp_train encodes a bundled corpus with lab's tokenizer
        print(f"continue training with PyTorch DDP: torchrun --nproc_per_node N -m lab.scale.ddp_train --model "
              f"{out} --out {out}-ddp")
    return 0


def _import(args):
    from lab.scale import import_model
    out = args.out or f"{args.directory.rstrip('/')}-lab"
    model, tok = import_model(args.directory, out=out)
    print(f"imported {args.directory}: {model.num_parameters() / 1e6:.2f}M parameters, vocabulary {tok.vocab_size}"
          f"; saved as a lab checkpoint in {out}")
    print(f"try: python -m lab generate --checkpoint {out} --prompt ...")
    return 0


def _info(args):
    import lab
    if args.backend:
        lab.set_backend(args.backend)
    print(json.dumps(lab.backend_info(), indent=2, default=str))
    return 0


def _print_notices(args):
    """The backend's notices held back so far (backend.held_notices), on stderr."""
    for line in args.notices:
        print(line, file=sys.stderr)
    args.notices.clear()


def main(argv=None):
    p = _Parser(prog="python -m lab", description="Train small GPT-style models on wgpu or numpy.")
    count, positive = _number(integer, low=1), _number(real, low=0, low_open=True)
    seed = _number(integer, low=0, high=2**32 - 1)
    sub = p.add_subparsers(dest="command", required=True)
    backend_help = "wgpu, numpy or auto (default: $LAB_BACKEND, else auto)"
    BACKENDS = ("wgpu", "numpy", "auto")

    t = sub.add_parser("train", help="train a model on a bundled corpus, with a progress bar")
    t.add_argument("--preset", default="tiny", help="model preset: tiny, shakespeare-char, llama-tiny, ...")
    t.add_argument("--corpus", default="kjv", help="bundled corpus name or a text file path")
    t.add_argument("--steps", type=count, default=600)
    t.add_argument("--batch-size", type=count, default=12)
    t.add_argument("--block-size", type=count, help="tokens per training sequence (default: the preset's block "
                                                    "size; for a Llama preset its max_position_embeddings)")
    t.add_argument("--lr", type=positive, default=1e-3)
    t.add_argument("--eval-every", type=count, default=100)
    t.add_argument("--seed", type=seed, default=1337)
    t.add_argument("--time-limit", type=positive, help="stop after this many seconds of training")
    t.add_argument("--no-replay", action="store_true",
                   help="wgpu: run every step through Python instead of replaying a captured step")
    t.add_argument("--checkpoint-activations", nargs="?", type=count, const=1, default=0, metavar="K",
                   help="keep only each block's input and recompute the block in the backward (K: every K-th block)")
    t.add_argument("--backend", choices=BACKENDS, help=backend_help)
    t.add_argument("--out", help="directory to save the trained checkpoint in")
    t.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    t.set_defaults(fn=_train)

    g = sub.add_parser("generate", help="generate text from a checkpoint saved by `train --out` or a pretrained model")
    which = g.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="checkpoint directory")
    which.add_argument("--model", help="a pretrained model: a shipped model's name (smollm2-135m-instruct), a "
                                       "directory in Hugging Face's layout, a .gguf or a Hub id")
    g.add_argument("--prompt", default="", help="text to continue (default: a newline); with --chat, the message")
    g.add_argument("--chat", action="store_true",
                   help="send --prompt as a user's message in the model's chat template and print the reply")
    g.add_argument("--max-new-tokens", type=_number(integer, low=0), default=200)
    g.add_argument("--temperature", type=_number(real, low=1e-6), help="sampling temperature (default 0.8)")
    g.add_argument("--top-k", type=count)
    g.add_argument("--top-p", type=_number(real, low=0, low_open=True, high=1))
    g.add_argument("--repetition-penalty", type=positive, help="divides the logits of tokens seen (default 1: none)")
    g.add_argument("--greedy", action="store_true", help="always take the most likely token")
    g.add_argument("--beams", type=count, default=1, help="beam search with this many beams")
    g.add_argument("--stop", help="stop once the text ends with this string")
    g.add_argument("--seed", type=seed)
    g.add_argument("--backend", choices=BACKENDS, help=backend_help)
    g.set_defaults(fn=_generate)

    s = sub.add_parser("selftest", help="check every op's forward and backward against numpy")
    s.add_argument("--backend", choices=BACKENDS, help=backend_help)
    s.set_defaults(fn=_selftest)

    b = sub.add_parser("bench", help="benchmarks, side by side with numpy (and torch when installed)")
    b.add_argument("suite", help="kernels, train, lora, diagnostics or generate")
    b.add_argument("--rank", type=count, help="lora: adapter rank (default 8)")
    b.add_argument("--base-dtype", choices=("float32", "float16", "int8", "q4", "all"),
                   help="lora: storage of the frozen linear weights (default float32; a GPT-2 preset also runs a float32 base to "
                        "compare; a Llama preset (llama-tiny, smollm2-135m) adapts all-linear beside PyTorch+PEFT; "
                        "all: the four, Llama presets)")
    b.add_argument("--preset", help="train, lora, generate: model preset (default tiny)")
    b.add_argument("--batch-size", "--batch", type=count,
                   help="train, lora, generate: batch size (default 12, 64 for shakespeare-char, 8 for gpt2-small and "
                        "smollm2-135m; generate: 1 prompt)")
    b.add_argument("--model", help="generate: a pretrained model by name or path instead of --preset "
                                   "(e.g. smollm2-135m-instruct)")
    b.add_argument("--new-tokens", type=count, help="generate: tokens to make (default 200, fewer where the "
                                                    "model's block_size ends first)")
    b.add_argument("--prompt-tokens", type=count, help="generate: prompt length in tokens (default 16)")
    b.add_argument("--repeats", type=count, help="generate: timed runs of each side (the best is reported; "
                                                  "default 3)")
    b.add_argument("--block-size", type=count, help="train: tokens per sequence (default: the preset's block size; "
                                                    "512 for smollm2-135m)")
    b.add_argument("--checkpoint-activations", nargs="?", type=count, const=1, metavar="K",
                   help="train: peak memory and step time without and with activation checkpointing (every block, "
                        "or every K-th), medians of 5 interleaved runs")
    b.add_argument("--steps", type=count, help="train, lora: timed steps (default 20); diagnostics: steps "
                                                "(default 300)")
    b.add_argument("--backend", choices=BACKENDS, help=backend_help)
    b.add_argument("--sizes", type=_ints, help="comma-separated matmul sizes (default 256,512,1024,2048,4096)")
    b.add_argument("--budget", type=positive, help="kernels: seconds of timed repetitions per measurement "
                                                  "(default 0.5)")
    b.add_argument("--model-shapes", action="store_true", default=None,
                   help="kernels: also time the matmul shapes of a shakespeare-char training step, and SmolLM2-135M's "
                        "linear layers with the weight float32, q4_1 and int8 (forward and q4_1's input gradient)")
    b.add_argument("--out", help="JSON output path (default bench-results/<suite>-...-<backend>.json)")
    b.set_defaults(fn=_bench)

    pl = sub.add_parser("plan", help="will a training plan fit a device, and how long will it take?")
    pl.add_argument("--preset", help="model preset (default tiny; or --config)")
    pl.add_argument("--config", help="a preset, a config.json (lab's, GPT-2's, Llama/Qwen2/Mistral's), a model or "
                                     "checkpoint directory, a .gguf, a shipped model's name or a Hub id (its config "
                                     "only: no weights are read)")
    pl.add_argument("--batch-size", type=count, default=12)
    pl.add_argument("--seq", "--block-size", dest="seq", type=count,
                    help="training sequence length (default: the model's block_size)")
    pl.add_argument("--tokens", type=positive, help="training tokens (default 1e6)")
    pl.add_argument("--steps", type=count, help="training steps (instead of --tokens)")
    pl.add_argument("--lora-rank", type=count, help="plan LoRA fine-tuning with this rank (default: full training)")
    pl.add_argument("--lora-base-dtype", default="float32", choices=("float32", "float16", "int8", "q4"),
                    help="with --lora-rank: storage of the frozen linear weights (int8, q4: packed)")
    pl.add_argument("--lora-targets", help="with --lora-rank: the adapted layers as lora.apply takes them: "
                                           "'all-linear', a name (q_proj), names separated by commas, or a pattern "
                                           "(default: GPT-2's c_attn,c_proj,c_fc; the Llama family's all-linear)")
    pl.add_argument("--checkpoint-activations", nargs="?", type=count, const=1, default=0, metavar="K",
                    help="plan activation checkpointing: every block keeps only its input and runs again in the "
                         "backward (K: every K-th block)")
    pl.add_argument("--optimizer", default="adamw", help="adamw or sgd")
    pl.add_argument("--vocab-size", type=count, help="vocabulary size (default: the preset's)")
    pl.add_argument("--device", default="this", help="'this' (measured) or a profile: m1, rtx4090, h100, h200, cpu-2core")
    pl.add_argument("--minutes", type=positive, help="also answer: does it fit and finish within this many minutes?")
    pl.add_argument("--backend", choices=BACKENDS, help=backend_help + " (for --device this)")
    pl.set_defaults(fn=_plan)

    ex = sub.add_parser("export", help="write a checkpoint in Hugging Face's layout of its family (GPT-2, Llama, "
                                       "Qwen2, Mistral), e.g. for PyTorch DDP")
    ex.add_argument("--checkpoint", required=True, help="a lab checkpoint directory (from train --out)")
    ex.add_argument("--format", default="hf", choices=["hf"], help="output layout (default hf: transformers')")
    ex.add_argument("--out", required=True, help="output directory")
    ex.add_argument("--adapter", help="a LoRA adapter directory to export too (default: the checkpoint's own)")
    ex.set_defaults(fn=_export)

    im = sub.add_parser("import", help="bring a model in Hugging Face's layout (e.g. trained with DDP) back into lab")
    im.add_argument("directory", help="a directory in the layout of GPT-2, Llama, Qwen2 or Mistral, with tokenizer "
                                      "files")
    im.add_argument("--out", help="where to save the lab checkpoint (default DIRECTORY-lab)")
    im.set_defaults(fn=_import)

    i = sub.add_parser("info", help="print the backend, the device, its limits and features")
    i.add_argument("--backend", choices=BACKENDS, help=backend_help)
    i.set_defaults(fn=_info)

    args = p.parse_args(argv)
    from .engine.backend import held_notices
    try:
        # the backend's notice waits until the command is under way: a refused input stays one line on stderr
        with held_notices() as args.notices:
            code = args.fn(args)
    # lab's messages for bad input (an argument, a file, a corpus, a config: InputError, CheckpointError) and the
    # system's for files (OSError) name the value and what is allowed; a traceback would bury them. Any other
    # exception, a ValueError from inside an op included, is a bug: it keeps its traceback
    except BrokenPipeError:  # stdout closed early (`| head`): not an error of the command; nothing more to say
        sys.stdout = open(os.devnull, "w")
        return 1
    except (InputError, OSError) as e:  # one line even where a message quotes text with line breaks
        print(f"lab {args.command}: error: " + " ".join(str(e).split("\n")), file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside a training step (those finish, then stop): nothing half-written
        _print_notices(args)
        print(f"lab {args.command}: interrupted", file=sys.stderr)
        return 130
    except BaseException:
        _print_notices(args)
        raise
    _print_notices(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
