"""Compile PIR's PAE Triton kernels for sm_90 (H100) on a machine without a GPU: does ptxas accept each default tile,
and what shared memory does it take (H100: at most 227 KiB per block)? Triton's bundled ptxas; no device needed."""
import inspect
import os
import subprocess
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from priorclip.kernels import pae_attention_triton as pa, pae_linear_triton as pl, vir_filter_triton as vf  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
OBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
TY = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def build(fn, sig, consts, warps, stages=3):
    full = {p: sig.get(p, "constexpr") for p in inspect.signature(fn.fn).parameters}
    k = triton.compile(ASTSource(fn, full, consts), target=TARGET, options={"num_warps": warps, "num_stages": stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        out = subprocess.run([OBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    regs = next((l.split("REG:")[1].split()[0] for l in out.splitlines() if "REG:" in l), "?")
    stack = next((l.split("STACK:")[1].split()[0] for l in out.splitlines() if "STACK:" in l), "?")
    return k.metadata.shared, regs, stack


def row(name, dtype, cfg, fn, sig, consts, warps, stages=3):
    try:
        smem, regs, stack = build(fn, sig, consts, warps, stages)
        print(f"| {name} | {TY[dtype]} | {cfg} | {smem / 1024:.1f} | {regs} | {stack} | ok |")
    except Exception as e:  # noqa: BLE001
        print(f"| {name} | {TY[dtype]} | {cfg} | — | — | — | FAILED: {type(e).__name__}: {str(e)[:120]} |")


print("| kernel | dtype | tile | shared KiB | regs | stack B | ptxas |")
print("| --- | --- | --- | ---: | ---: | ---: | --- |")
GEMMS = [("pae_linear QKV 512->1536", 1536, 512, False, False, False),
         ("pae_linear merge+res+LN1 512", 512, 512, True, False, True),
         ("pae_linear FFN1+LN(1024)+GELU", 1024, 512, True, True, False),
         ("pae_linear FFN2+res+LN2 1024->512", 512, 1024, True, False, True)]
for dtype in (torch.bfloat16, torch.float16, torch.float32):
    t = "*" + TY[dtype]
    sig = {"x_ptr": t, "w_ptr": t, "b_ptr": t, "r_ptr": t, "lnw_ptr": t, "lnb_ptr": t, "out_ptr": t,
           "M": "i32", "N": "i32", "K": "i32", "rep": "i32", "eps": "fp32"}
    for name, n, k, ln, gelu, res in GEMMS:
        for cfg in [pl.default_config(256 * 47, n, k, dtype, ln)] + (pl.candidate_configs(n, ln) if "LN(1024)" in name
                                                                    else []):
            consts = dict(HAS_BIAS=True, HAS_RES=res, HAS_LN=ln, GELU=gelu, UPCAST=False,
                          DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
                          BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], BLOCK_K=cfg["block_k"])
            tile = f"{cfg['block_m']}x{cfg['block_n']}x{cfg['block_k']} w{cfg['num_warps']} s{cfg['num_stages']}"
            row(name, dtype, tile, pl._pae_linear_kernel, sig, consts, cfg["num_warps"], cfg["num_stages"])
    sig = {"q_ptr": t, "s_qb": "i32", "s_ql": "i32", "k_ptr": t, "s_kb": "i32", "s_kl": "i32", "v_ptr": t,
           "s_vb": "i32", "s_vl": "i32", "pad_ptr": "*u8", "s_pb": "i32", "s_pl": "i32", "out_ptr": t,
           "LQ": "i32", "LK": "i32", "E": "i32", "scale": "fp32"}
    for name, bq, bk, pad in (("pae_attention N=40 / L=47", 64, 64, False), ("pae_attention L=47 masked", 64, 64, True),
                              ("pae_attention 1 query x 40", 16, 64, False)):
        warps = 4 if bq * bk <= 64 * 64 else 8
        row(name, dtype, f"{bq}x{bk} dh64 w{warps}", pa._pae_attention_kernel, sig,
            dict(HAS_PAD=pad, F32_DOT=dtype == torch.float32, BLOCK_Q=bq, BLOCK_K=bk, DH=64), warps)
    sig = {"tok_ptr": t, "s_tb": "i32", "s_tt": "i32", "s_te": "i32", "ins_ptr": t, "s_ib": "i32", "s_ie": "i32",
           "kept_ptr": t, "order_ptr": "*i64", "T": "i32", "E": "i32", "KEEP": "i32"}
    row("vir_filter T=50 E=512", dtype, "64x128 w4", vf._vir_filter_kernel, sig,
        dict(ROUND=vf._ROUND[dtype], BLOCK_T=64, BLOCK_E=128), 4)
