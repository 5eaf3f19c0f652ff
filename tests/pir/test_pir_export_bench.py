"""``priorclip-export`` and ``priorclip-bench`` on the closed-domain PIR model (``pir-tiny``, CPU).

PIR attends to its [PAD] tokens, so every check here feeds ids exactly as its tokenizer pads them (chunks of 128, each
to its longest caption) and checks that no engine cuts or pads them further. The reference is the eager PyTorch
model on the same ids; the image transform is checked against a PIL squash computed here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from priorclip.cliutils import RANDOM_INIT_SEED  # noqa: E402
from priorclip.errors import PriorCLIPError  # noqa: E402
from priorclip.parity import TOLERANCES  # noqa: E402
from priorclip.preprocess import preprocess_for  # noqa: E402
from priorclip.registry import create_model, get_config  # noqa: E402

CAPTIONS = [
    "many planes are parked next to a long building in an airport",
    "a river",
    "several green trees are around a white church with a parking lot",
    "Two baseball fields are surrounded by some green trees and a road.",
    "dense residential area",
]
FP32_COS = TOLERANCES["fp32"].min_cosine


@pytest.fixture(scope="module")
def pir():
    """pir-tiny with the weights every CLI builds without a checkpoint (priorclip.cliutils.build_model)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        return create_model("pir-tiny").eval()


@pytest.fixture(scope="module")
def pir_export(pir, tmp_path_factory):
    from priorclip.export import export_model, open_engine

    out = tmp_path_factory.mktemp("pir-export") / "fp32"
    result = export_model(pir, out, "onnx", "fp32", progress=False, max_batch=64)
    return result, open_engine(out)


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and got.dtype == torch.float32
    assert _cos(got, want).min() >= FP32_COS and (got - want).abs().max() < 1e-4


def test_manifest_and_engine_describe_a_pir_export(pir_export):
    from priorclip.export.tensorrt import profile_shapes

    result, engine = pir_export
    m = json.loads((result.out_dir / "manifest.json").read_text())
    assert m["model"]["config"]["family"] == "pir" and m["model"]["name"] == "pir-tiny"
    text, image = m["io"]["text"], m["io"]["image"]
    assert text["length"] == {"min": 2, "max": 47} and "attended" in text["padding"] and "eot" not in text
    assert image["outputs"][1] == {**image["outputs"][1], "name": "belief_order", "dtype": "int64",
                                   "shape": ["batch", 50]}
    assert engine.config.family == "pir" and engine.has_order and engine.context_length == 47
    # TensorRT's profile for PIR's text: any length from [CLS] + one word piece to the whole context
    assert profile_shapes("text", 56, 47, 64)["tokens"] == ((1, 2), (64, 32), (64, 47))


@pytest.mark.parametrize("batch", [1, 5])
def test_onnx_texts_match_torch_on_ids_padded_per_chunk(pir, pir_export, batch):
    _, engine = pir_export
    pre = preprocess_for(pir.cfg)
    (tokens,) = list(pre.text_batches(CAPTIONS[:batch], 256))  # one chunk: padded to its own longest caption
    assert tokens.shape[1] < 47 and (tokens[:, 0] == 101).all()
    with torch.no_grad():
        want = pir.encode_text(tokens)
    _close(engine.encode_texts(tokens), want)
    # PIR attends to padding: the same captions padded further are other ids, and the engine must run them as given
    # (an engine that cut batches to their "longest caption" like CLIP's would return `want` here)
    padded = torch.nn.functional.pad(tokens, (0, 47 - tokens.shape[1]))
    with torch.no_grad():
        want_padded = pir.encode_text(padded)
    assert (want_padded - want).abs().max() > 1e-3
    _close(engine.encode_texts(padded), want_padded)


@pytest.mark.parametrize("length", [2, 47])
def test_onnx_text_length_axis_is_dynamic_to_both_ends(pir, pir_export, length):
    from priorclip.benchmarks.harness import make_token_batch

    tokens = make_token_batch(3, length, 47, pir.cfg.text.vocab_size, seed=length, family="pir")
    assert tokens.shape == (3, length)
    with torch.no_grad():
        want = pir.encode_text(tokens)
    _close(pir_export[1].encode_texts(tokens), want)


@pytest.mark.parametrize("batch", [1, 5])
def test_onnx_images_and_vir_order_match_torch(pir, pir_export, batch):
    pixels = torch.randn(batch, 3, 56, 56, generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        want, want_order = pir.encode_image_with_order(pixels)
    got, order = pir_export[1].encode_images_with_order(pixels)
    _close(got, want)
    assert order.dtype == torch.int64 and order.shape == (batch, 50) and torch.equal(order, want_order)
    assert torch.equal(order.sort(dim=1).values, torch.arange(50).expand(batch, 50))  # a permutation per image


def test_fp16_graph_keeps_bert_layernorm_in_fp32_and_runs_close(pir, pir_export, tmp_path):
    """BERT's LayerNorm eps 1e-12 is below fp16's smallest subnormal: every LayerNormalization node computes in
    fp32 with its eps intact, and the fp16 text graph stays within the fp16 tolerance of torch."""
    import onnx
    import onnxruntime as ort

    from priorclip.export import fp16 as F
    from priorclip.export.graph import elem_types, load_model, node_scope

    src = pir_export[0].files["text"]
    g, _ = F.convert_fp16(load_model(src), *F.default_keeps(pir.cfg.family))
    types = elem_types(g)
    norms = [n for n in g.graph.node if n.op_type == "LayerNormalization"]
    eps = [next(a.f for a in n.attribute if a.name == "epsilon") for n in norms]
    assert norms and all(types[n.input[0]] == onnx.TensorProto.FLOAT for n in norms)
    assert sum(e == pytest.approx(1e-12, rel=1e-3) for e in eps) == 2 * pir.cfg.text.layers + 1  # embeddings + 2/layer
    (tokens,) = list(preprocess_for(pir.cfg).text_batches(CAPTIONS, 8))
    sess = ort.InferenceSession(g.SerializeToString(), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(None, {"tokens": tokens.numpy()})[0])
    with torch.no_grad():
        want = pir.encode_text(tokens)
    assert _cos(got, want).min() >= TOLERANCES["fp16"].min_cosine
    # VIR's belief V @ c (PIR's own top-level MatMul, module path "") stays fp32 too; Swin's matmuls go fp16
    img, _ = F.convert_fp16(load_model(pir_export[0].files["image"]), *F.default_keeps(pir.cfg.family))
    types = elem_types(img)
    matmuls = {n.name: (node_scope(n), types[n.input[0]]) for n in img.graph.node if n.op_type == "MatMul"}
    top = [t for scope, t in matmuls.values() if scope == ""]
    assert top == [onnx.TensorProto.FLOAT]
    assert any(t == onnx.TensorProto.FLOAT16 for scope, t in matmuls.values() if scope.startswith("vision_encoder"))


def test_prepared_recall_set_uses_pir_chunks_and_squash(pir, tmp_path):
    from priorclip.benchmarks.recall import prepare
    from priorclip.data import RetrievalSet
    from priorclip.transforms import OPENAI_MEAN, OPENAI_STD

    rng = np.random.default_rng(0)
    paths = []
    for i, size in enumerate([(90, 60), (60, 60)]):  # a wide image: squash and centre crop differ there
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(paths[-1])
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(130)]  # two chunks: 128 + 2
    ds = RetrievalSet(paths, captions, np.arange(130) % 2)
    data = prepare(ds, pir.cfg, {"name": "test"}, workers=1)
    want_chunks = list(preprocess_for(pir.cfg).text_batches(captions, 7))
    assert [c.shape[0] for c in data.text_batches] == [128, 2] and data.token_batches(7) is data.text_batches
    assert all(torch.equal(a, b) for a, b in zip(data.text_batches, want_chunks))
    assert data.tokens.shape == (130, 47) and torch.equal(data.tokens[128:, : want_chunks[1].shape[1]], want_chunks[1])
    img = Image.open(paths[0]).convert("RGB").resize((56, 56), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)
    x = (x - torch.tensor(OPENAI_MEAN).view(3, 1, 1)) / torch.tensor(OPENAI_STD).view(3, 1, 1)
    assert torch.allclose(data.pixels[0], x, atol=1e-5)


def test_bench_inputs_are_bert_ids_and_flops_follow_the_length_run():
    from priorclip.benchmarks import harness
    from priorclip.profile import profile_config

    cfg = get_config("pir-tiny")
    t = harness.make_token_batch(6, 20, 47, cfg.text.vocab_size, seed=3, family="pir")
    assert t.shape == (6, 20) and (t[:, 0] == 101).all() and (t[0] != 0).all()  # width = the longest row
    words = t[:, 1:]
    assert ((words == 0) | (words >= 1000)).all()
    pad_before_word = (words[:, 1:] != 0) & (words[:, :-1] == 0)
    assert not pad_before_word.any() and (t == 0).any()  # [PAD] only after a row's last word piece
    # real captions drawn for timing: exactly what the tokenizer makes of them as one batch
    tok = preprocess_for(cfg).tokenizer
    rows = torch.nn.functional.pad(tok(CAPTIONS), (0, 47 - tok(CAPTIONS).shape[1]))
    drawn = harness.caption_batch(rows, 2, seed=0, family="pir")
    picked = torch.randperm(5, generator=torch.Generator().manual_seed(0))[:2]  # the seeded draw
    assert torch.equal(drawn, tok([CAPTIONS[i] for i in picked]))
    assert harness.tokens_run([drawn, t], family="pir") == round((drawn.shape[1] + 20) / 2)
    assert harness.gflop_per_item(cfg, "text", 47) == pytest.approx(profile_config(cfg)["gflop_text"])
    assert harness.gflop_per_item(cfg, "image") == pytest.approx(profile_config(cfg)["gflop_image"])
    assert harness.gflop_per_item(cfg, "text", 10) < harness.gflop_per_item(cfg, "text", 47)


def test_serve_engines_run_pir_ids_as_given(pir):
    from priorclip.serve.engines import create_engine
    from priorclip.serve.fused import FusedEncoder

    for backend in ("torch", "fused"):
        eng = create_engine(backend, pir, "fp32", "cpu")
        assert eng.fixed_text_length is False and eng.config.family == "pir"
        (tokens,) = list(preprocess_for(pir.cfg).text_batches(CAPTIONS, 8))
        with torch.no_grad():
            torch.testing.assert_close(eng.encode_texts(tokens), pir.encode_text(tokens), rtol=0, atol=2e-6)
    with pytest.raises(PriorCLIPError, match="open-domain PriorCLIP only") as e:  # PIR's own engine is fused_pir's
        FusedEncoder(pir, "cpu", torch.float32)
    assert "\n" not in str(e.value)


def test_jpeg_to_embedding_rate_reads_images_through_pirs_squash(pir):
    """A wide JPEG reaches a PIR engine squashed to 56 x 56 (PIR-pytorch's Resize((s, s))), not centre-cropped."""
    import io

    from priorclip.benchmarks import harness
    from priorclip.transforms import OPENAI_MEAN, OPENAI_STD, EvalTransform

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (60, 120, 3), dtype=np.uint8)).save(buf, "JPEG")
    seen = []

    class Recorder:
        config, image_size, device = pir.cfg, 56, torch.device("cpu")

        def encode_images(self, pixels):
            seen.append(pixels)
            return pixels.flatten(1)

    harness.e2e_rate(Recorder(), [buf.getvalue()], batch=1, workers=1)
    decoded = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    x = torch.from_numpy(np.asarray(decoded.resize((56, 56), Image.Resampling.BICUBIC), dtype=np.float32) / 255)
    want = (x.permute(2, 0, 1) - torch.tensor(OPENAI_MEAN).view(3, 1, 1)) / torch.tensor(OPENAI_STD).view(3, 1, 1)
    assert torch.allclose(seen[-1][0], want, atol=1e-5)
    assert not torch.allclose(seen[-1][0], EvalTransform(56)(decoded), atol=1e-2)  # the open-domain centre crop


def test_torch_compile_marks_pir_text_length_dynamic(pir, monkeypatch):
    """torch-compile runs PIR texts at their own length (never padded to 47) with one graph for every length:
    torch.compile is given a counting eager backend here (inductor compiles for minutes on two cores)."""
    import torch._dynamo

    from priorclip.serve.engines import create_engine

    graphs: list[int] = []
    real = torch.compile

    def counting(fn, **kw):
        def backend(gm, example_inputs):
            graphs.append(len(example_inputs))
            return gm.forward
        return real(fn, backend=backend, dynamic=kw.get("dynamic"))

    monkeypatch.setattr(torch, "compile", counting)
    torch._dynamo.reset()
    eng = create_engine("torch-compile", pir, "fp32", "cpu")
    assert eng.fixed_text_length is False and eng.metadata()["dynamic_text_length"] is True
    pre = preprocess_for(pir.cfg)
    widths = []
    for caps in (CAPTIONS[:2], CAPTIONS[1::3]):  # the same batch size, two different padded lengths
        (tokens,) = list(pre.text_batches(caps, 8))
        widths.append(tokens.shape[1])
        with torch.no_grad():
            torch.testing.assert_close(eng.encode_texts(tokens), pir.encode_text(tokens), atol=1e-5, rtol=0)
    assert widths[0] != widths[1] and len(graphs) == 1, (widths, graphs)
    torch._dynamo.reset()


def test_bench_plans_the_fused_engine_for_pir_on_request():
    from priorclip.benchmarks.runner import BenchOptions, plan_engines

    cpu = torch.device("cpu")
    pairs, rows = plan_engines(BenchOptions(), cpu)
    assert pairs == [("torch", "fp32"), ("onnxruntime", "fp32")]
    (fused,) = [r for r in rows if r["backend"] == "fused"]  # off CUDA its kernels are references: not a default
    assert fused["status"] == "skipped" and "plain-torch references off CUDA" in fused["reason"]
    pairs, rows = plan_engines(BenchOptions(engines=[("torch", "fp32"), ("fused", "fp32")]), cpu)
    assert pairs == [("torch", "fp32"), ("fused", "fp32")] and not rows


def test_bench_cli_on_pir_tiny(pir, pir_export, tmp_path, monkeypatch):
    """The whole bench CLI on pir-tiny with its default CPU engines (torch, onnxruntime). The onnxruntime engine's
    fp32 graphs are the fixture's, copied instead of exported again (half a minute on two cores): they are only
    used if the bench's model has the fixture's weights, and the export's own parity check still runs on them."""
    from priorclip.benchmarks import harness
    from priorclip.benchmarks.cli import main
    from priorclip.export import api

    src = pir_export[0].files

    def copied_export(model, out_dir, opset, max_batch):
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), pir.state_dict().values()))
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for p in src.values():
            for f in (p, p.with_name(p.name + ".data")):
                shutil.copy(f, out_dir / f.name)
        return {t: out_dir / p.name for t, p in src.items()}

    monkeypatch.setattr(api, "export_onnx_fp32", copied_export)
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["--model", "pir-tiny", "--device", "cpu", "--batch-sizes", "1,2", "--warmup", "1",
                                    "--iters", "2", "--recall-images", "8", "--e2e-images", "4", "--generated-set",
                                    "--quiet", "--out", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    doc = json.loads(next(out.glob("bench-cpu-*.json")).read_text())
    assert doc["model"]["name"] == "pir-tiny" and doc["reference_points"] == []
    status = {e["backend"]: e for e in doc["engines"]}
    assert status["torch"]["status"] == status["onnxruntime"]["status"] == "ok"
    assert status["fused"]["status"] == "skipped"  # runnable, not a CPU default (references off CUDA)
    rows = {r["engine"]: r for r in doc["recall"]["engines"]}
    assert set(rows["torch/fp32"]["delta"].values()) == {0.0} and rows["torch/fp32"]["within_tolerance"]
    ort = rows["onnxruntime/fp32"]
    assert ort["cosine_image_min"] > 0.99999 and ort["cosine_text_min"] > 0.99999 and ort["within_tolerance"], ort
    assert ort["rank_flips"]["flipped"] == 0 and ort["rank_flips"]["n"] == 8
    text = [t for t in doc["timings"] if t["tower"] == "text"]
    assert text and all(t["tokens"] == 47 for t in text)  # PIR's default: its whole context, run as given
    assert all(t["gflop_per_item"] == pytest.approx(harness.gflop_per_item(pir.cfg, "text", 47)) for t in text)
    assert "reference torch/fp32" in res.output


@pytest.mark.slow
def test_full_pir_config_exports_and_matches_torch(tmp_path):
    """pir-swin-t-bert (Swin-T 224, ResNet-50 prior, BERT-base): both graphs, batch 1 and 3, chunk-padded captions
    and VIR's order (about a minute on two cores)."""
    from priorclip.export import export_model, open_engine

    torch.manual_seed(0)
    m = create_model("pir-swin-t-bert").eval()
    engine = open_engine(export_model(m, tmp_path / "full", progress=False, max_batch=8).out_dir)
    pixels = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, want_order = m.encode_image_with_order(pixels)
    for b in (1, 3):
        got, order = engine.encode_images_with_order(pixels[:b])
        _close(got, want[:b])
        assert torch.equal(order, want_order[:b])
    for caps in (CAPTIONS[:1], CAPTIONS[:3]):
        (tokens,) = list(preprocess_for(m.cfg).text_batches(caps, 8))
        with torch.no_grad():
            _close(engine.encode_texts(tokens), m.encode_text(tokens))
