"""Triton kernels, one module per family. Installed as ``seqkern.kernels``.

Leaves of the package: nothing here imports seqkern. Modules are imported lazily
by seqkern/ops/<family>.py on the first GPU or interpreted call, so that
``import seqkern`` works without triton or a GPU.
"""
