"""The full priorclip-vit-b32 image encoder (ResNet-50 prior + gated ViT-B/32) exports and ONNX Runtime matches
torch at batch 1 and 7.

Only the image tower is exported here (about 15 s on two cores): the text tower is open_clip's unchanged CLIP text
transformer, covered at full width by the tiny config's tests and by the slow end-to-end test in test_slow.py.
"""

from __future__ import annotations

import onnxruntime as ort
import torch

from priorclip.export.onnx_export import export_onnx_fp32


def test_full_config_image_encoder_matches_reference_at_batch_1_and_7(tmp_path):
    from priorclip import create_model

    torch.manual_seed(0)
    m = create_model("priorclip-vit-b32")
    paths = export_onnx_fp32(m, tmp_path, towers=("image",))  # includes onnx.checker full_check
    sess = ort.InferenceSession(str(paths["image"]), providers=["CPUExecutionProvider"])
    x = torch.randn(7, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = m.encode_image(x)
    for b in (1, 7):
        out = torch.from_numpy(sess.run(None, {"pixels": x[:b].numpy()})[0])
        assert (out - ref[:b]).abs().max() < 1e-4
