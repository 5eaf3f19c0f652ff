"""Fused kernels, each beside its plain-torch reference (``priorclip.kernels``).

``belief_gate``: the ViT stem epilogue and PriorCLIP's soft belief gate (spec §8B.1): :func:`stem_gate_reference`,
the Triton kernel (``belief_gate_triton``, imported only where it runs) and the :func:`stem_gate` dispatcher the
model calls. Depends on torch, and on triton only for the fused path.
"""
