"""Benchmarks behind `python -m lab bench {kernels, train, lora, diagnostics}`: each measures lab beside its
reference (numpy, PyTorch eager) in the same run and reports ratios.

kernels.py: matmul, elementwise and layernorm rates; train.py and torch_gpt.py: training tokens/s against the same
model in PyTorch; lora.py: adapter training against full fine-tuning; diagnostics.py: the monitor's cost; timing.py:
the one way operations are timed (shared with the plan's device profile).
"""
