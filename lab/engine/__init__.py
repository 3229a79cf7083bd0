"""The engine, the lowest layer: tensors and autograd, their ops, and the backends that run them.

tensor.py: Tensor and reverse-mode autograd; ops/: every op's forward and backward, written once against the
backend interface, a module per kind of op; backend.py: that interface and the backend factory (the one import
circle allowed); numpy_backend.py (the reference, the CPU path) and wgpu/ (WGSL kernels from kernels/ through
wgpu); kernels.py: loading and specializing the WGSL sources; random.py: random streams; locks.py: the fair lock
threads take turns with; profile.py: lab.profile(); opcheck.py: every op against numpy (`python -m lab selftest`).
Imports nothing above it but lab.checks.
"""
