"""Triton kernels for the sparse SAE matmuls, installed as `distributed_sae.kernels`.

Each kernel will ship with a launcher, a torch.autograd.Function, a pure-torch reference and a
test against it (see the kernels issue); until then the SAE kinds use their dense torch paths.
"""
