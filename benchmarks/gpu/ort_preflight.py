"""Before spending minutes on exports: does ONNX Runtime really run on the CUDA execution provider here?

    python benchmarks/gpu/ort_preflight.py --device cuda --out DIR

Imports torch first (it loads the CUDA, cuBLAS and cuDNN libraries the provider links against), then onnxruntime,
and runs a one-node graph with only the CUDA provider asked for. A session whose providers fell back to the CPU is a
failure, not a slower "CUDA" result. Writes ``preflight.json`` (version, where onnxruntime was imported from, the
available and the session's providers, and for a failure the provider library's unresolved dependencies).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda: the CUDA provider must run; cpu: the dry run's check")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    rec: dict = {"device": a.device}

    def done(ok: bool, msg: str) -> int:
        rec["ok"], rec["message"] = ok, msg
        (a.out / "preflight.json").write_text(json.dumps(rec, indent=1) + "\n", encoding="utf-8")
        print(("" if ok else "Error: ") + msg, file=sys.stdout if ok else sys.stderr)
        return 0 if ok else 3

    import numpy as np
    import torch

    rec["torch"] = torch.__version__
    rec["cuda_available"] = torch.cuda.is_available()
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper
    except Exception as e:  # noqa: BLE001
        return done(False, f"onnxruntime/onnx do not import: {type(e).__name__}: {e}")
    rec["onnxruntime"] = ort.__version__
    rec["onnxruntime_path"] = str(Path(ort.__file__).parent)
    rec["available_providers"] = ort.get_available_providers()
    want = "CUDAExecutionProvider" if a.device.startswith("cuda") else "CPUExecutionProvider"
    if want not in rec["available_providers"]:
        return done(False, f"onnxruntime {ort.__version__} ({rec['onnxruntime_path']}) has no {want}; for CUDA carry "
                           "onnxruntime-gpu's parts (../shared/tools/wheel-chunks onnxruntime-gpu==1.31.1)")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])
    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "preflight", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    try:
        sess = ort.InferenceSession(model.SerializeToString(), providers=[want])
        out = sess.run(None, {"x": np.ones((2, 4), np.float32)})[0]
    except Exception as e:  # noqa: BLE001
        return done(False, f"an onnxruntime session on {want} failed: {type(e).__name__}: {str(e)[:300]}")
    rec["session_providers"] = sess.get_providers()
    rec["result_ok"] = bool(np.allclose(out, 2.0))
    if rec["session_providers"][0] != want:
        lib = Path(ort.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"
        if lib.is_file():
            ldd = subprocess.run(["ldd", str(lib)], capture_output=True, text=True)
            rec["unresolved"] = [ln.strip() for ln in ldd.stdout.splitlines() if "not found" in ln]
        return done(False, f"the session fell back to {rec['session_providers']} instead of {want}"
                           + (f"; unresolved libraries: {rec.get('unresolved')}" if rec.get("unresolved") else ""))
    if not rec["result_ok"]:
        return done(False, f"{want} computed a wrong result")
    return done(True, f"onnxruntime {ort.__version__} runs on {want} (from {rec['onnxruntime_path']})")


if __name__ == "__main__":
    sys.exit(main())
