"""Triton kernels, each beside its plain-torch reference (``priorclip.kernels``). Not yet built: see the kernels issue."""
