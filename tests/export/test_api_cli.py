"""export_model's manifest and parity report, tolerance enforcement, and the CLI's one-line errors."""

from __future__ import annotations

import json
import sys

import pytest
from click.testing import CliRunner

from priorclip.export import TOLERANCES, ExportError, Tolerance, export_model, open_engine
from priorclip.export.cli import main


def test_manifest_describes_the_export(tiny_exports):
    m = json.loads((tiny_exports["int8"].out_dir / "manifest.json").read_text())
    assert m["format"] == "onnx" and m["precision"] == "int8" and m["opset"] == 18
    assert m["model"]["name"] == "priorclip-tiny" and m["model"]["config"]["embed_dim"] == 32
    assert m["checkpoint"]["sha256"] == "random-init"
    assert m["io"]["image"]["inputs"][0] == {"name": "pixels", "dtype": "float32", "shape": ["batch", 3, 64, 64]}
    assert m["io"]["text"]["inputs"][0]["dtype"] == "int64" and "ArgMax" in m["io"]["text"]["eot"]
    assert m["calibration"]["method"] == "minmax"
    for tool in ("torch", "onnx", "onnxruntime"):
        assert m["tools"][tool]
    assert m["created"] and m["command"]
    assert open_engine(tiny_exports["int8"].out_dir).metadata["precision"] == "int8"


def test_parity_report_written_and_within_tolerance(tiny_exports):
    res = tiny_exports["fp32"]
    tmp_path = res.out_dir
    p = json.loads((tmp_path / "parity.json").read_text())
    assert res.parity["passed"] and p["passed"] and p["n_images"] == 16 and p["n_captions"] == 80
    assert p["image"]["cosine_min"] > 0.99999 and p["text"]["cosine_min"] > 0.99999
    assert p["top10_agreement"]["i2t"] > 0.99 and p["recall_delta"]["mR"] == 0.0
    for key in ("recall_reference", "recall_engine", "recall_delta"):
        assert set(p[key]) >= {"i2t_R@1", "t2i_R@10", "mR"}
    assert "| onnx-fp32" in (tmp_path / "parity.md").read_text()
    assert res.manifest["parity"]["passed"]


def test_export_outside_tolerance_fails_unless_forced(tiny_model, synthetic_set, tmp_path, monkeypatch):
    small = synthetic_set.subset(4)
    monkeypatch.setitem(TOLERANCES, "fp32", Tolerance(min_cosine=1.01, max_abs_delta_mR=0.0))
    with pytest.raises(ExportError, match="parity outside the fp32 tolerance"):
        export_model(tiny_model, tmp_path / "a", "onnx", "fp32", parity_set=small, progress=False)
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["parity"]["passed"] is False
    res = export_model(tiny_model, tmp_path / "b", "onnx", "fp32", parity_set=small, progress=False, force=True)
    assert res.parity["passed"] is False and res.parity["failures"]


def _cli(args):
    r = CliRunner().invoke(main, args)
    if r.exception and not isinstance(r.exception, SystemExit):
        raise r.exception
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    return r.exit_code, lines


@pytest.mark.parametrize("case", ["format", "checkpoint", "empty-calib", "unwritable", "int8-no-calib", "method",
                                  "keep-fp-typo"])
def test_cli_bad_inputs_give_one_line(case, tmp_path):
    out = str(tmp_path / "out")
    calib_json = ""
    if case == "keep-fp-typo":
        from priorclip.synthetic import make_sample

        calib_json = str(make_sample(tmp_path / "calib", n_images=4, size=32)[0])
    args = {
        "format": ["--model", "priorclip-tiny", "--format", "tflite", "--out", out],
        "checkpoint": ["--checkpoint", str(tmp_path / "missing.pt"), "--out", out],
        "empty-calib": ["--model", "priorclip-tiny", "--precision", "int8", "--calib-data", str(tmp_path),
                        "--out", out],
        "unwritable": ["--model", "priorclip-tiny", "--no-parity", "--out", str(tmp_path / "afile" / "out")],
        "int8-no-calib": ["--model", "priorclip-tiny", "--precision", "int8", "--out", out],
        "method": ["--model", "priorclip-tiny", "--precision", "int8", "--calib-method", "mse", "--out", out],
        "keep-fp-typo": ["--model", "priorclip-tiny", "--precision", "int8", "--calib-data", calib_json, "--calib-split", "test",
                         "--keep-fp", "visual.conv1", "--keep-fp", "res_visual.atnpool*", "--no-parity", "--out", out],
    }[case]
    if case == "unwritable":
        (tmp_path / "afile").write_text("x")
    code, lines = _cli(args)
    assert code != 0
    assert len(lines) == 1 and lines[0].startswith("Error: "), lines
    expect = {"format": "--format", "checkpoint": "checkpoint not found", "empty-calib": "no image files",
              "unwritable": "not writable", "int8-no-calib": "--calib-data", "method": "--calib-method",
              "keep-fp-typo": "--keep-fp 'res_visual.atnpool*' matches no layer"}[case]
    assert expect in lines[0]
    if case == "keep-fp-typo":
        assert not (tmp_path / "out" / "image_encoder.onnx").exists()  # refused before any export work


def test_cli_parity_set_defaults_to_real_data_else_labelled_generated(tmp_path, monkeypatch):
    from priorclip.synthetic import make_sample

    monkeypatch.chdir(tmp_path)  # none of the default dataset folders is reachable from here
    monkeypatch.delenv("PRIORCLIP_DATASET", raising=False)
    code, lines = _cli(["--model", "priorclip-tiny", "--out", str(tmp_path / "gen"), "-q"])
    assert code == 0, lines
    p = json.loads((tmp_path / "gen" / "parity.json").read_text())
    assert "GENERATED" in p["dataset"]["selection"]["source"] and p["n_images"] == 64
    assert any(ln.startswith("| onnx-fp32") for ln in lines)
    assert "GENERATED" in (tmp_path / "gen" / "parity.md").read_text()

    # a reachable dataset (here via $PRIORCLIP_DATASET) is the default; --parity-images draws class-spread
    j, _ = make_sample(tmp_path / "ds", n_images=24, seed=3)
    monkeypatch.setenv("PRIORCLIP_DATASET", str(j))
    code, lines = _cli(["--model", "priorclip-tiny", "--out", str(tmp_path / "real"), "--parity-images", "12", "-q"])
    assert code == 0, lines
    p = json.loads((tmp_path / "real" / "parity.json").read_text())
    d = p["dataset"]
    assert str(j) in d["selection"]["source"] and d["selection"]["method"] == "class-spread"
    assert d["n_images"] == 12 and d["n_classes"] == 6 and d["per_class_min"] == d["per_class_max"] == 2
    assert p["tolerance"]["dmr_judged"] is False and any("too few items for a ΔmR verdict" in n for n in p["notes"])
    m = json.loads((tmp_path / "real" / "manifest.json").read_text())
    assert m["parity"]["dataset"].startswith("12 images over 6 of 6 classes")

    # without --parity-images, a CPU export takes the judged-set size (334 on AID/RSICD; 18 of 24 here)
    import priorclip.export.cli as export_cli

    monkeypatch.setattr(export_cli, "JUDGED_SET_IMAGES", 18)
    code, lines = _cli(["--model", "priorclip-tiny", "--out", str(tmp_path / "dflt"), "-q"])
    assert code == 0, lines
    d = json.loads((tmp_path / "dflt" / "parity.json").read_text())["dataset"]
    assert d["n_images"] == 18 and d["n_classes"] == 6 and d["per_class_max"] - d["per_class_min"] <= 1


def test_cli_trt_without_tensorrt_writes_onnx_then_fails(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_trt(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "tensorrt" and level == 0:
            raise ImportError("No module named 'tensorrt'")
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.setattr(builtins, "__import__", no_trt)
    code, lines = _cli(["--model", "priorclip-tiny", "--format", "trt", "--precision", "fp16", "--max-batch", "16",
                        "--out", str(tmp_path), "-q"])
    assert code == 1 and len(lines) == 1
    assert "TensorRT is not installed" in lines[0] and "pip install tensorrt" in lines[0]
    assert (tmp_path / "image_encoder.onnx").is_file() and (tmp_path / "text_encoder.onnx").is_file()
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert m["format"] == "trt" and m["tensorrt"]["engines"] is None
    assert m["tensorrt"]["profiles"]["image"]["pixels"] == {"min": [1, 3, 64, 64], "opt": [16, 3, 64, 64],
                                                            "max": [16, 3, 64, 64]}
    assert m["tensorrt"]["profiles"]["text"]["tokens"]["max"] == [16, 77]


def test_open_engine_errors_are_clear(tmp_path, tiny_exports):
    from priorclip.errors import PriorCLIPError

    with pytest.raises(PriorCLIPError, match="no manifest.json"):
        open_engine(tmp_path)
    with pytest.raises(PriorCLIPError, match="provider"):
        open_engine(tiny_exports["fp32"].out_dir, provider="NoSuchExecutionProvider")


def test_export_model_rejects_bad_options(tiny_model, tmp_path):
    with pytest.raises(ExportError, match="needs calibration data"):
        export_model(tiny_model, tmp_path, "onnx", "int8", progress=False)
    with pytest.raises(ExportError, match="aoti supports"):
        export_model(tiny_model, tmp_path, "aoti", "int8", progress=False)
    with pytest.raises(ExportError, match="unknown format"):
        export_model(tiny_model, tmp_path, "tflite", progress=False)


def test_missing_export_extra_is_one_line(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from priorclip.export.cli import main

    monkeypatch.setitem(sys.modules, "onnx", None)  # as if the [export] extra were not installed
    r = CliRunner().invoke(main, ["--model", "priorclip-tiny", "--out", str(tmp_path / "x"), "--no-parity"])
    assert r.exit_code != 0 and "Traceback" not in r.output
    last = r.output.strip().splitlines()[-1]
    assert last.startswith("Error: exporting needs onnx") and last.endswith("pip install 'priorclip[export]'")


def _failing_fp32_export(monkeypatch, error=None):
    """The INT8 path's first step fails after writing part of a graph into its scratch folder inside the output."""
    from priorclip.errors import DataError
    from priorclip.export import api

    def fail(model, out_dir, *a, **k):
        (out_dir / "image_encoder.onnx").write_bytes(b"half a graph")
        raise error or DataError("calibration image broken.jpg: cannot identify image file")

    monkeypatch.setattr(api, "export_onnx_fp32", fail)


@pytest.mark.parametrize("interrupt", [False, True])
def test_failed_int8_export_leaves_no_new_empty_folder(tiny_model, tmp_path, monkeypatch, interrupt):
    from priorclip.errors import DataError
    from priorclip.export import CalibrationSet

    _failing_fp32_export(monkeypatch, KeyboardInterrupt() if interrupt else None)  # Ctrl-C mid-export, or an error
    expected = KeyboardInterrupt if interrupt else DataError
    calib = CalibrationSet([tmp_path / "x.jpg"], ["a caption"])
    with pytest.raises(expected):
        export_model(tiny_model, tmp_path / "runs" / "int8", "onnx", "int8", calib=calib, progress=False)
    assert list(tmp_path.iterdir()) == []  # runs/ and runs/int8 were made by the export and are gone again
    kept = tmp_path / "existing"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    (kept / "manifest.json").write_text("{}")  # an earlier export's: it must not describe a half-rewritten folder
    with pytest.raises(expected):
        export_model(tiny_model, kept, "onnx", "int8", calib=calib, progress=False)
    assert sorted(p.name for p in kept.iterdir()) == ["notes.txt"]  # the folder that was there stays, manifest gone


def test_failed_int8_export_cli_is_one_line_and_leaves_no_folder(tmp_path, monkeypatch):
    from priorclip.synthetic import make_sample

    calib_json = make_sample(tmp_path / "calib", n_images=4, size=32)[0]
    _failing_fp32_export(monkeypatch)
    out = tmp_path / "new" / "int8"
    code, lines = _cli(["--model", "priorclip-tiny", "--precision", "int8", "--calib-data", str(calib_json),
                        "--calib-split", "test", "--no-parity", "-q", "--out", str(out)])
    assert code == 1
    assert lines == ["Error: calibration image broken.jpg: cannot identify image file"]
    assert not (tmp_path / "new").exists()


def test_unwritable_out_is_refused_before_any_work(tmp_path, monkeypatch):
    """priorclip-export and the parity-table report check --out before calibration data, parity set and model."""
    from priorclip.export import cli as export_cli
    from priorclip.export import report as export_report

    def never(*a, **k):
        raise AssertionError("work started before --out was checked")

    monkeypatch.setattr(export_cli, "load_calibration", never)
    monkeypatch.setattr(export_cli, "load_parity_set", never)
    monkeypatch.setattr(export_cli, "build_model", never)
    monkeypatch.setattr(export_report, "build_model", never)
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "out"
    code, lines = _cli(["--model", "priorclip-tiny", "--precision", "int8", "--calib-data", str(tmp_path),
                        "--out", str(out)])
    assert code == 1 and lines == [f"Error: --out: output folder {out} is not writable: {tmp_path / 'afile'} is a "
                                   "file, not a folder"]
    r = CliRunner().invoke(export_report.main, ["--data", "synthetic", "--out", str(out)])
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), r.output
    assert r.output.strip() == lines[0]


def test_failed_onnx_export_leaves_no_new_folder(tiny_model, tmp_path, monkeypatch):
    from priorclip.export import onnx_export

    def fail(*a, **k):
        raise RuntimeError("torch.onnx.export failed")

    monkeypatch.setattr(onnx_export, "_quiet_export", fail)
    with pytest.raises(RuntimeError):
        onnx_export.export_onnx_fp32(tiny_model, tmp_path / "a" / "onnx")
    assert list(tmp_path.iterdir()) == []
