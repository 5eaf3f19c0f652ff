"""``priorclip-export --format triton-repo``: layout, config validation, the Python-backend models and end-to-end parity.

No Triton server here: the Python models are imported with a stand-in ``triton_python_backend_utils`` (the API
subset they use, as python_backend documents it), and the ensembles are chained by hand with ONNX Runtime on the
repository's own ``model.onnx`` files. One real fp32 export (through the CLI) per module; the other export tests
stand a copy of its graphs in for ``export_model``.
"""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

pytest.importorskip("tritonclient.grpc.model_config_pb2")

from priorclip.export import ExportError, ExportResult  # noqa: E402
from priorclip.export import triton_repo as T  # noqa: E402
from priorclip.export.cli import main  # noqa: E402
from priorclip.preprocess import preprocess_for  # noqa: E402
from priorclip.registry import model_config  # noqa: E402
from priorclip.transforms import open_image  # noqa: E402

MAX_BATCH = 64


# ------------------------------------------------------------------------------------------------- stand-ins


def _pb_utils() -> types.ModuleType:
    """The part of Triton's ``triton_python_backend_utils`` the generated model.py files use."""
    m = types.ModuleType("triton_python_backend_utils")

    class Tensor:
        def __init__(self, name, array):
            self._name, self._array = name, np.asarray(array)

        def name(self):
            return self._name

        def as_numpy(self):
            return self._array

    class TritonError(Exception):
        INVALID_ARG, INTERNAL = "INVALID_ARG", "INTERNAL"

        def __init__(self, message, code="INTERNAL"):
            super().__init__(message)
            self._message, self._code = message, code

        def message(self):
            return self._message

        def code(self):
            return self._code

    class InferenceResponse:
        def __init__(self, output_tensors=None, error=None):
            self._outputs, self._error = list(output_tensors or []), error

        def output_tensors(self):
            return self._outputs

        def has_error(self):
            return self._error is not None

        def error(self):
            return self._error

    def get_input_tensor_by_name(request, name):
        return next((t for t in request.inputs() if t.name() == name), None)

    def get_output_config_by_name(config, name):
        return next((o for o in config.get("output", []) if o["name"] == name), None)

    numpy_types = {"TYPE_FP32": np.float32, "TYPE_FP16": np.float16, "TYPE_INT64": np.int64, "TYPE_STRING": np.object_}
    m.Tensor, m.TritonError, m.InferenceResponse = Tensor, TritonError, InferenceResponse
    m.get_input_tensor_by_name, m.get_output_config_by_name = get_input_tensor_by_name, get_output_config_by_name
    m.triton_string_to_numpy = numpy_types.__getitem__
    return m


class Request:
    def __init__(self, pb, name, rows):
        self._inputs = [pb.Tensor(name, np.array([[r] for r in rows], dtype=np.object_))]  # BYTES [batch, 1]

    def inputs(self):
        return self._inputs


@pytest.fixture
def pb(monkeypatch):
    mod = _pb_utils()
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", mod)
    return mod


def load_python_model(model_dir: Path):
    """Import ``model_dir/1/model.py`` and initialise it with the arguments Triton passes."""
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2 as mc

    spec = importlib.util.spec_from_file_location(f"triton_model_{model_dir.name}_{id(model_dir)}",
                                                  model_dir / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = text_format.Parse((model_dir / "config.pbtxt").read_text(), mc.ModelConfig())
    model = module.TritonPythonModel()
    model.initialize({"model_config": json.dumps(json_format.MessageToDict(config, preserving_proto_field_name=True)),
                      "model_repository": str(model_dir), "model_version": "1", "model_name": model_dir.name,
                      "model_instance_kind": "CPU", "model_instance_device_id": "0"})
    return model


def run(pb, model, name, requests):
    """execute() over requests (lists of rows); per request the output array or the TritonError."""
    responses = model.execute([Request(pb, name, rows) for rows in requests])
    assert len(responses) == len(requests)
    return [r.error() if r.has_error() else r.output_tensors()[0].as_numpy() for r in responses]


# ------------------------------------------------------------------------------------------------- fixtures


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def images() -> dict[str, bytes]:
    """One encoded file per image mode a user meets."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8), "RGB")
    grey16 = np.linspace(0, 65535, 48 * 40).reshape(48, 40).astype(np.uint16)
    return {
        "rgb-jpeg": _encode(rgb, "JPEG", quality=90),
        "rgba-png": _encode(Image.fromarray(rng.integers(0, 256, (50, 80, 4), dtype=np.uint8), "RGBA"), "PNG"),
        "palette-png": _encode(rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "PNG"),
        "grey16-png": _encode(Image.fromarray(grey16), "PNG"),
        "cmyk-jpeg": _encode(rgb.convert("CMYK"), "JPEG"),
        "thin-png": _encode(Image.fromarray(rng.integers(0, 256, (3, 400, 3), dtype=np.uint8), "RGB"), "PNG"),
        "one-pixel-png": _encode(Image.new("RGB", (1, 1), (200, 10, 30)), "PNG"),
    }


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """The one real export of this module, through the CLI."""
    out = tmp_path_factory.mktemp("triton") / "repo"
    r = CliRunner().invoke(main, ["--model", "priorclip-tiny", "--format", "triton-repo", "--precision", "fp32",
                                  "--no-parity", "-q", "--max-batch", str(MAX_BATCH), "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def reference():
    from priorclip.cliutils import build_model

    return build_model("priorclip-tiny", None, None)  # the CLI's model: seeded random weights


# ------------------------------------------------------------------------------------------------- layout


def test_repository_layout_manifest_and_configs(repo):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    for name in T.MODELS:
        assert (repo / name / "config.pbtxt").is_file() and (repo / name / "1").is_dir()
    for name in (T.IMAGE_ENCODER, T.TEXT_ENCODER):
        assert (repo / name / "1" / "model.onnx").is_file()
    m = json.loads((repo / "manifest.json").read_text())
    assert m["format"] == "triton-repo" and m["precision"] == "fp32" and m["model"]["name"] == "priorclip-tiny"
    assert m["files"] == {"image": f"{T.IMAGE_ENCODER}/1/model.onnx", "text": f"{T.TEXT_ENCODER}/1/model.onnx"}
    assert m["triton"]["validation"]["status"] == "passed"
    assert m["triton"]["entry_points"]["image"]["model"] == T.IMAGE_ENSEMBLE
    assert m["triton"]["options"]["preferred_batch"] == [8, 32, 64] and m["triton"]["options"]["max_batch"] == 64
    assert m.get("selftest") is None or (repo / m["selftest"]["file"]).is_file()  # root files keep their names
    cfg = {n: text_format.Parse((repo / n / "config.pbtxt").read_text(), mc.ModelConfig()) for n in T.MODELS}
    enc = cfg[T.IMAGE_ENCODER]
    assert enc.platform == "onnxruntime_onnx" and enc.max_batch_size == MAX_BATCH
    assert [(t.name, mc.DataType.Name(t.data_type), list(t.dims)) for t in enc.input] == \
        [("pixels", "TYPE_FP32", [3, 64, 64])]
    assert [(t.name, list(t.dims)) for t in enc.output] == [("embeddings", [32]), ("belief_order", [17])]
    assert list(enc.dynamic_batching.preferred_batch_size) == [8, 32, 64]
    assert enc.dynamic_batching.max_queue_delay_microseconds == 2000
    assert [(g.count, g.kind) for g in enc.instance_group] == [(1, mc.ModelInstanceGroup.KIND_GPU)]
    txt = cfg[T.TEXT_ENCODER]
    assert [(t.name, mc.DataType.Name(t.data_type), list(t.dims)) for t in txt.input] == \
        [("tokens", "TYPE_INT64", [-1])]
    assert cfg[T.PREPROCESS].backend == "python" and cfg[T.TEXT_ENSEMBLE].platform == "ensemble"
    assert [s.model_name for s in cfg[T.IMAGE_ENSEMBLE].ensemble_scheduling.step] == [T.PREPROCESS, T.IMAGE_ENCODER]
    readme = (repo / "README.md").read_text()
    assert "tritonserver --model-repository" in readme and 'pip install "priorclip==' in readme
    assert T.IMAGE_ENSEMBLE in readme and "InferInput" in readme


def test_generated_model_py_is_clean_python(repo):
    pyflakes = pytest.importorskip("pyflakes.api")
    from pyflakes.reporter import Reporter

    for name in (T.PREPROCESS, T.TOKENIZE):
        src = (repo / name / "1" / "model.py").read_text()
        out = io.StringIO()
        assert pyflakes.check(src, name, Reporter(out, out)) == 0, out.getvalue()


# ------------------------------------------------------------------------------------------------- validation


def test_written_repository_validates(repo):
    assert T.validate_repository(repo) == []


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


BREAKS = {
    # case: (edit(copy), problem substring)
    "unknown-field": (lambda r: _edit(r / T.IMAGE_ENCODER / "config.pbtxt", "max_batch_size", "max_batchsize"),
                      f"{T.IMAGE_ENCODER}/config.pbtxt: ", "max_batchsize"),
    "bad-enum": (lambda r: _edit(r / T.IMAGE_ENCODER / "config.pbtxt", "KIND_GPU", "KIND_TPU"), "KIND_TPU"),
    "step-names-missing-model": (lambda r: _edit(r / T.IMAGE_ENSEMBLE / "config.pbtxt",
                                                 f'"{T.IMAGE_ENCODER}"', '"priorclip_nowhere"'),
                                 "no model 'priorclip_nowhere' in the repository"),
    "mismatched-dims": (lambda r: _edit(r / T.IMAGE_ENCODER / "config.pbtxt", "dims: [ 3, 64, 64 ]",
                                        "dims: [ 3, 65, 65 ]"),
                        "dims [3, 65, 65] but model.onnx has [3, 64, 64]", "ensemble tensor 'pixels': shape"),
    "dtype-across-steps": (lambda r: _edit(r / T.TOKENIZE / "config.pbtxt", "TYPE_INT64", "TYPE_INT32"),
                           "ensemble tensor 'tokens': TYPE_INT32"),
    "name-not-folder": (lambda r: _edit(r / T.TOKENIZE / "config.pbtxt", f'name: "{T.TOKENIZE}"', 'name: "tok"'),
                        "is not the folder name"),
    "preferred-over-max": (lambda r: _edit(r / T.TEXT_ENCODER / "config.pbtxt", "[ 8, 32, 64 ]", "[ 8, 32, 128 ]"),
                           "preferred_batch_size 128 must be in [1, max_batch_size 64]"),
    "no-model-py": (lambda r: (r / T.TOKENIZE / "1" / "model.py").unlink(), "version 1 has no model.py"),
    "no-external-data": (lambda r: (r / T.TEXT_ENCODER / "1" / "text_encoder.onnx.data").unlink(),
                         "external data file text_encoder.onnx.data is missing"),
    "no-version-folder": (lambda r: (r / T.IMAGE_ENSEMBLE / "1").rmdir(), "no numeric version folder"),
    "output-map-typo": (lambda r: _edit(r / T.TEXT_ENSEMBLE / "config.pbtxt", 'output_map { key: "embeddings"',
                                        'output_map { key: "embedding"'),
                        "output_map key 'embedding' is not an output of 'priorclip_text_encoder'"),
    "output-not-written": (lambda r: _edit(r / T.TEXT_ENSEMBLE / "config.pbtxt", 'value: "embeddings"',
                                           'value: "text_embeddings"'),
                           "ensemble output 'embeddings' is never written", "ensemble tensor 'text_embeddings' is unused"),
    "ensemble-batch": (lambda r: _edit(r / T.TEXT_ENSEMBLE / "config.pbtxt", "max_batch_size: 64",
                                       "max_batch_size: 1000"), "max_batch_size 1000 exceeds the 64"),
    "unmapped-input": (lambda r: _edit(r / T.IMAGE_ENSEMBLE / "config.pbtxt",
                                       'input_map { key: "pixels" value: "pixels" }', ""),
                       "input 'pixels' of 'priorclip_image_encoder' is not mapped"),
    "ensemble-instance-group": (lambda r: _edit(r / T.TEXT_ENSEMBLE / "config.pbtxt", "ensemble_scheduling {",
                                                "instance_group [ { kind: KIND_CPU } ]\nensemble_scheduling {"),
                                "instance_group must not be set for an ensemble"),
    "trt-parameter": (lambda r: _edit(r / T.TEXT_ENCODER / "config.pbtxt", "instance_group",
                                      'optimization { execution_accelerators { gpu_execution_accelerator: [ { name: '
                                      '"tensorrt" parameters { key: "precision" value: "FP8" } } ] } }\ninstance_group'),
                      "tensorrt accelerator parameter 'precision' is unknown"),
}


@pytest.mark.parametrize("case", sorted(BREAKS))
def test_broken_repository_is_reported(repo, tmp_path, case):
    broken = tmp_path / "repo"
    shutil.copytree(repo, broken)
    edit, *expected = BREAKS[case]
    edit(broken)
    problems = T.validate_repository(broken)
    text = "\n".join(problems)
    for want in expected:
        assert want in text, text


def test_validation_can_be_limited_and_needs_tritonclient(repo, tmp_path, monkeypatch):
    broken = tmp_path / "repo"
    shutil.copytree(repo, broken)
    shutil.copytree(broken / T.TOKENIZE, broken / "someone_else")  # another model of a shared repository
    assert any(p.startswith("someone_else/") for p in T.validate_repository(broken))
    assert T.validate_repository(broken, models=list(T.MODELS)) == []
    assert T.validate_repository(broken, models=["priorclip_gone"]) == ["priorclip_gone: no such model folder"]
    monkeypatch.setitem(sys.modules, "tritonclient", None)
    monkeypatch.setitem(sys.modules, "tritonclient.grpc", None)
    with pytest.raises(T.ValidationUnavailable, match=r"pip install 'tritonclient\[grpc\]'"):
        T.validate_repository(repo)


# ------------------------------------------------------------------------------------------------- Python models


def test_preprocess_equals_priorclip_for_every_mode(repo, pb, images):
    model = load_python_model(repo / T.PREPROCESS)
    transform = preprocess_for(model_config("priorclip-tiny")).transform
    names = sorted(images)
    outs = run(pb, model, "image", [[images[n]] for n in names] + [[images[names[0]], images[names[1]]]])
    for name, out in zip(names, outs):
        want = transform(open_image(images[name])).numpy()
        assert out.dtype == np.float32 and out.shape == (1, 3, 64, 64), name
        assert np.array_equal(out[0], want), name
    assert np.array_equal(outs[-1], np.stack([outs[0][0], outs[1][0]]))  # a request of two images


def test_bad_image_fails_its_own_request_only(repo, pb, images):
    model = load_python_model(repo / T.PREPROCESS)
    jpeg = images["rgb-jpeg"]
    outs = run(pb, model, "image", [[jpeg], [jpeg[: len(jpeg) // 2]], [images["rgba-png"]], [b"not an image"],
                                    [images["rgba-png"], b"\x89PNG\r\n\x1a\n broken"]])
    assert isinstance(outs[0], np.ndarray) and isinstance(outs[2], np.ndarray)
    for bad in (outs[1], outs[3], outs[4]):
        assert isinstance(bad, pb.TritonError) and bad.code() == "INVALID_ARG"
        assert "cannot decode image" in bad.message()
    transform = preprocess_for(model_config("priorclip-tiny")).transform
    assert np.array_equal(outs[2][0], transform(open_image(images["rgba-png"])).numpy())


def test_preprocess_refuses_another_priorclip_version(repo, pb, tmp_path, monkeypatch):
    import priorclip

    model_dir = tmp_path / T.PREPROCESS
    shutil.copytree(repo / T.PREPROCESS, model_dir)
    monkeypatch.setattr(priorclip, "__version__", "0.0.0-other")
    with pytest.raises(RuntimeError, match="exported by priorclip .* but Triton's Python environment has priorclip "
                                           "0.0.0-other"):
        load_python_model(model_dir)


CAPTIONS = ["many planes are parked near the terminal",
            "a bridge",
            "green trees and several buildings are around a playground with a red track " * 6,  # over 77 tokens
            "Dense résidential area; 5 roads/2 rivers!"]


def _tokenize_model(tmp_path: Path, repo: Path, cfg, bucket: int) -> Path:
    model_dir = tmp_path / f"tok-{cfg.name}-{bucket}-{getattr(cfg, 'mask_padding', False)}"
    model_dir.mkdir()
    shutil.copy(repo / T.TOKENIZE / "config.pbtxt", model_dir / "config.pbtxt")
    T.write_python_model(model_dir, T.TOKENIZE_PY, cfg, bucket)
    return model_dir


def test_tokenize_priorclip_pads_to_its_bucket(repo, pb, tmp_path):
    from priorclip.export.engines import trim_tokens
    from priorclip.tokenizer import clip_tokenizer

    model = load_python_model(repo / T.TOKENIZE)  # the repository's own: bucket 16
    unbucketed = load_python_model(_tokenize_model(tmp_path, repo, model_config("priorclip-tiny"), 0))
    tok = clip_tokenizer(77)
    requests = [[c.encode()] for c in CAPTIONS] + [[c.encode() for c in CAPTIONS[:2]]]
    for rows, out, cut in zip(requests, run(pb, model, "caption", requests), run(pb, unbucketed, "caption", requests)):
        want = tok([r.decode() for r in rows]).numpy()
        longest = int((want != 0).sum(1).max())  # SOT ... EOT
        width = min(77, -(-max(longest, 2) // 16) * 16)
        assert out.dtype == np.int64 and out.shape == (len(rows), width)
        assert np.array_equal(out, want[:, :width])
        assert np.array_equal(cut, trim_tokens(torch.from_numpy(want)).numpy())


@pytest.mark.parametrize("mask_padding", [False, True])
def test_tokenize_pir_keeps_the_reference_padding(repo, pb, tmp_path, mask_padding):
    from priorclip.wordpiece import pir_tokenizer

    cfg = model_config("pir-tiny", mask_padding=mask_padding)
    model = load_python_model(_tokenize_model(tmp_path, repo, cfg, 16))
    tok = pir_tokenizer(cfg.text.context_length)
    requests = [[c.encode() for c in CAPTIONS], [CAPTIONS[1].encode()], [b"!!! ..."], ["bad \xff".encode("latin-1")]]
    outs = run(pb, model, "caption", requests)
    for rows, out in zip(requests[:2], outs):
        want = tok([r.decode() for r in rows]).numpy()
        if mask_padding:  # masked padding never changes an embedding: bucketed like PriorCLIP
            width = min(cfg.text.context_length, -(-want.shape[1] // 16) * 16)
            want = np.pad(want, ((0, 0), (0, width - want.shape[1])))
        assert np.array_equal(out, want)  # attended padding: exactly the tokenizer's, to the request's longest
    assert outs[1].shape[1] == (16 if mask_padding else 3)  # [CLS] "a" "bridge"
    assert isinstance(outs[2], pb.TritonError) and "empty after cleaning" in outs[2].message()
    assert isinstance(outs[3], pb.TritonError) and "not UTF-8" in outs[3].message()


def test_pir_text_requests_are_capped_at_the_reference_chunk():
    pir, masked, clip = (model_config("pir-tiny"), model_config("pir-tiny", mask_padding=True),
                         model_config("priorclip-tiny"))
    assert (T.text_max_batch(pir, 256), T.text_max_batch(masked, 256), T.text_max_batch(clip, 256)) == (128, 256, 256)
    t = T.Tensor
    image_io = ([t("pixels", "TYPE_FP32", (3, 56, 56))], [t("embeddings", "TYPE_FP32", (32,))])
    text_io = ([t("tokens", "TYPE_INT64", (-1,))], [t("embeddings", "TYPE_FP32", (32,))])
    opts = T.resolve_options(T.TritonOptions(), "fp32", 256)
    configs = T.render_configs(pir, image_io, text_io, opts, 256, "fp32")
    assert "max_batch_size: 128" in configs[T.TEXT_ENSEMBLE] and "max_batch_size: 128" in configs[T.TOKENIZE]
    assert "max_batch_size: 256" in configs[T.TEXT_ENCODER] and "Do not enable ragged" in configs[T.TEXT_ENCODER]


# ------------------------------------------------------------------------------------------------- end to end


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_chained_repository_reproduces_the_reference(repo, pb, images, reference):
    import onnxruntime as ort

    from priorclip.tokenizer import clip_tokenizer

    sess = {n: ort.InferenceSession(str(repo / n / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
            for n in (T.IMAGE_ENCODER, T.TEXT_ENCODER)}
    pre, tok = load_python_model(repo / T.PREPROCESS), load_python_model(repo / T.TOKENIZE)
    names = sorted(images)
    pixels = np.concatenate(run(pb, pre, "image", [[images[n]] for n in names]))
    got = sess[T.IMAGE_ENCODER].run(["embeddings"], {"pixels": pixels})[0]
    transform = preprocess_for(reference.cfg).transform
    with torch.no_grad():
        want = reference.encode_image(torch.stack([transform(open_image(images[n])) for n in names])).numpy()
    assert _cosines(got, want).min() >= 0.99999
    # each caption alone (its own padded length) and all in one request: both the reference's embedding
    with torch.no_grad():
        want = reference.encode_text(clip_tokenizer(77)(CAPTIONS)).numpy()
    alone = [sess[T.TEXT_ENCODER].run(["embeddings"], {"tokens": t})[0]
             for t in run(pb, tok, "caption", [[c.encode()] for c in CAPTIONS])]
    together = sess[T.TEXT_ENCODER].run(["embeddings"], {"tokens": run(pb, tok, "caption",
                                                                       [[c.encode() for c in CAPTIONS]])[0]})[0]
    assert _cosines(np.concatenate(alone), want).min() >= 0.99999
    assert _cosines(together, want).min() >= 0.99999


# ------------------------------------------------------------------------------------------------- export options


@pytest.fixture
def fake_export(repo, monkeypatch):
    """``export_model`` stood in by a copy of the module export's graphs (an ONNX export directory, in seconds)."""
    calls = []

    def export_model(model, out_dir, format, precision, **kwargs):
        calls.append({"format": format, "precision": precision, **kwargs})
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True)
        manifest = json.loads((repo / "manifest.json").read_text())
        for tower, name in (("image", T.IMAGE_ENCODER), ("text", T.TEXT_ENCODER)):
            for f in (repo / name / "1").iterdir():
                shutil.copy(f, out_dir / (f"{tower}_encoder.onnx" if f.name == "model.onnx" else f.name))
        manifest.update(format="onnx", precision=precision,
                        files={"image": "image_encoder.onnx", "text": "text_encoder.onnx"})
        manifest.pop("triton")
        (out_dir / "manifest.json").write_text(json.dumps(manifest))
        (out_dir / "parity.json").write_text("{}")
        return ExportResult(out_dir, manifest, None, {})

    monkeypatch.setattr(T, "export_model", export_model)
    return calls


def test_options_reach_the_configs_and_a_rerun_replaces_only_ours(fake_export, reference, tmp_path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    out = tmp_path / "models"
    (out / "someone_else" / "1").mkdir(parents=True)  # a model of a shared repository: left alone
    T.export_triton_repo(reference, out, "fp32", progress=False, max_batch=MAX_BATCH)
    (out / T.IMAGE_ENCODER / "1" / "stale.txt").write_text("from the first export")
    opts = T.TritonOptions(instances=3, kind="gpu", preferred_batch=(16, 4), max_queue_delay_us=500,
                           accelerator="tensorrt", preprocess_instances=6)
    res = T.export_triton_repo(reference, out, "fp16", opts, progress=False, max_batch=MAX_BATCH, command="x")
    assert fake_export[-1]["format"] == "onnx" and fake_export[-1]["precision"] == "fp16"
    assert fake_export[-1]["command"] == "x"
    assert (out / "someone_else" / "1").is_dir() and not (out / T.IMAGE_ENCODER / "1" / "stale.txt").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging left behind
    assert (out / "parity.json").is_file() and res.manifest["triton"]["validation"]["status"] == "passed"
    enc = text_format.Parse((out / T.IMAGE_ENCODER / "config.pbtxt").read_text(), mc.ModelConfig())
    assert list(enc.dynamic_batching.preferred_batch_size) == [4, 16]
    assert enc.dynamic_batching.max_queue_delay_microseconds == 500 and enc.instance_group[0].count == 3
    (acc,) = enc.optimization.execution_accelerators.gpu_execution_accelerator
    assert acc.name == "tensorrt" and acc.parameters["precision_mode"] == "FP16"
    assert acc.parameters["trt_profile_max_shapes"] == "pixels:64x3x64x64"
    txt = text_format.Parse((out / T.TEXT_ENCODER / "config.pbtxt").read_text(), mc.ModelConfig())
    assert txt.optimization.execution_accelerators.gpu_execution_accelerator[0].parameters[
        "trt_profile_min_shapes"] == "tokens:1x2"
    pre = text_format.Parse((out / T.PREPROCESS / "config.pbtxt").read_text(), mc.ModelConfig())
    assert [(g.count, g.kind) for g in pre.instance_group] == [(6, mc.ModelInstanceGroup.KIND_CPU)]
    assert T.validate_repository(out, models=list(T.MODELS)) == []


def test_without_tritonclient_the_repo_is_written_unvalidated(fake_export, reference, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tritonclient", None)
    monkeypatch.setitem(sys.modules, "tritonclient.grpc", None)
    res = T.export_triton_repo(reference, tmp_path / "r", "fp32", T.TritonOptions(kind="cpu"), progress=False,
                               max_batch=MAX_BATCH)
    assert res.manifest["triton"]["validation"]["status"] == "not validated"
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "not validated" in lines[0] and "tritonclient[grpc]" in lines[0]
    assert "KIND_CPU" in (tmp_path / "r" / T.TEXT_ENCODER / "config.pbtxt").read_text()


def test_invalid_result_fails_the_export_and_keeps_the_old_repo(fake_export, reference, tmp_path, monkeypatch):
    out = tmp_path / "r"
    T.export_triton_repo(reference, out, "fp32", progress=False, max_batch=MAX_BATCH)
    before = (out / T.IMAGE_ENCODER / "config.pbtxt").read_text()
    bad = T._encoder_config
    monkeypatch.setattr(T, "_encoder_config", lambda *a: bad(*a).replace("max_batch_size", "max_batch"))
    with pytest.raises(ExportError, match="fails validation .*max_batch"):
        T.export_triton_repo(reference, out, "fp32", T.TritonOptions(instances=2), progress=False,
                             max_batch=MAX_BATCH)
    assert (out / T.IMAGE_ENCODER / "config.pbtxt").read_text() == before
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("args, message", [
    (["--triton-accelerator", "tensorrt", "--triton-kind", "cpu"], "runs on GPU instances"),
    (["--precision", "int8", "--triton-accelerator", "tensorrt"], "int8 with --triton-accelerator tensorrt"),
    (["--precision", "int8", "--triton-kind", "cpu", "--int8-target", "tensorrt"], "not an ONNX Runtime CPU layout"),
    (["--precision", "int8"], "serves on CPU instances"),
    (["--triton-preferred-batch", "8,512", "--max-batch", "64"], "in [1, --max-batch 64] (not 512)"),
    (["--triton-preferred-batch", "8,x"], "expected comma-separated batch sizes"),
    (["--triton-accelerator", "tensorrt-plan"], "pip install tensorrt"),
    (["--format", "onnx", "--triton-instances", "2"], "--triton-instances applies only to --format triton-repo"),
])
def test_cli_bad_combinations_give_one_line(tmp_path, args, message):
    out = tmp_path / "out"
    base = ["--model", "priorclip-tiny", "--no-parity", "--out", str(out)]
    fmt = [] if "--format" in args else ["--format", "triton-repo"]
    r = CliRunner().invoke(main, base + fmt + args)
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert r.exit_code != 0 and len(lines) == 1 and lines[0].startswith("Error:"), r.output
    assert message in lines[0]
    assert not out.exists()


def test_repository_opens_as_an_engine_and_serves(repo, reference):
    """The repository is also a priorclip export: open_engine runs its model.onnx files, and priorclip-serve's
    service starts on it (its self-test reference included) and ranks like the fp32 reference."""
    import numpy as np
    import torch

    from priorclip.export.engines import open_engine
    from priorclip.serve.cli import build_service

    engine = open_engine(repo)
    tokens = torch.tensor([[49406, 320, 1125, 49407] + [0] * 73])
    with torch.inference_mode():
        np.testing.assert_allclose(engine.encode_texts(tokens).numpy(), reference.encode_text(tokens).numpy(),
                                   atol=1e-5)
    service = build_service(engine_dir=repo)
    service.start(block=True)
    try:
        assert service.state == "ready" and service.selftest["passed"] is True, service.selftest
    finally:
        service.stop()
