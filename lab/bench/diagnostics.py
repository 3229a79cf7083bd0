"""Cost of the live diagnostics: train a preset with a DiagnosticsMonitor running every `every` steps and report
the time spent in diagnostics as a share of the training time, measured in the same run."""
import time
from dataclasses import replace

from ..checks import InputError
from ..data import char_dataset
from ..diagnostics.live import DiagnosticsMonitor
from ..engine.backend import backend_instance, using_backend
from ..engine.random import manual_seed
from ..models import PRESETS, TransformerLM
from ..train import TrainConfig, Trainer
from .timing import write_result


def run_diagnostics_bench(preset, backend_name, steps=300, every=100, out_path=None, print_fn=print):
    if preset not in PRESETS:
        raise InputError(f"unknown preset {preset!r}: choose one of {sorted(PRESETS)}")
    backend = backend_instance(backend_name)
    with using_backend(backend):
        tok, tr, va = char_dataset()
        manual_seed(0)
        model = TransformerLM(replace(PRESETS[preset], vocab_size=tok.vocab_size))
        trainer = Trainer(model, tr, va, TrainConfig(steps=steps, eval_every=10**9, log_every=10))
        monitor = DiagnosticsMonitor(trainer, every=every)
        t = time.perf_counter()
        trainer.run(progress=False)
        total = time.perf_counter() - t
    share = monitor.seconds / (total - monitor.seconds)
    last = monitor.reports[-1]
    result = {"suite": "diagnostics", "preset": preset, "backend": backend.name, "steps": steps, "every": every,
              "training_s": total - monitor.seconds, "diagnostics_s": monitor.seconds, "overhead": share,
              "last_report": {k: v for k, v in last.items() if k != "fisher_groups"}}
    print_fn(f"diagnostics every {every} steps on {preset} ({backend.name}): {monitor.seconds:.1f} s of diagnostics "
             f"for {total - monitor.seconds:.1f} s of training = {100 * share:.1f}% overhead")
    print_fn(f"last report (step {last['step']}): sharpness {last['sharpness']:.3g} vs threshold "
             f"{last['threshold']:.3g}, Fisher trace {last['fisher_trace']:.3g}, noise scale {last['noise_scale']:.3g}, "
             f"edge band {last['edge_band_pct']:.0f}%\n  {last['recommendation']}")
    if out_path:
        write_result(out_path, result, print_fn)
    return result
