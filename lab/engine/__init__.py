"""The engine: tensors, autograd, and the numpy and wgpu backends."""
