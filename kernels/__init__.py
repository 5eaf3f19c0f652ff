"""Fused kernels, each beside its plain-torch reference with the same signature (``priorclip.kernels``).

- ``belief_gate``: the ViT stem epilogue and PriorCLIP's soft belief gate (spec §8B.1), op ``priorclip::stem_gate``;
- ``fp8_quant``: static-scale e4m3 activation quantisation for the fused FP8 GEMMs, ``priorclip::quantize_fp8``;
- ``add_layernorm``: a residual add with the LayerNorm after it, ``priorclip::add_layernorm`` (a candidate);
- ``vir_filter``: PIR's VIR hard belief filter (top 40 of 50 by softmax belief, gathered in order),
  ``priorclip::vir_filter``; ``pae_linear``: a GEMM with bias / residual / LayerNorm / GELU epilogue,
  ``priorclip::pae_linear``; ``pae_attention``: short-sequence multi-head attention, ``priorclip::pae_attention``;
  ``pae`` composes the three into PIR's MHSA / CroSA blocks and VIR / LCA chains (spec §8B.5-6).

Each has a dispatcher (fused on CUDA at inference, the reference elsewhere); the Triton kernels live in the
``*_triton`` modules, imported only where they run. Depends on torch, and on triton for the fused paths.
"""
