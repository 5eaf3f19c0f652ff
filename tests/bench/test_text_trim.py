"""The text-trim measurement: full-length FLOPs agree with the model profile, and short captions cost less."""

from __future__ import annotations

import json

from click.testing import CliRunner

from priorclip.benchmarks.text_trim import main
from priorclip.profile import profile_config
from priorclip.registry import get_config
from priorclip.synthetic import make_sample


def test_text_trim_on_generated_captions(tmp_path):
    json_path, img_dir = make_sample(tmp_path / "s", n_images=6, size=40)
    out = tmp_path / "t.json"
    r = CliRunner().invoke(main, ["--dataset", str(json_path), "--images", str(img_dir), "--model", "priorclip-tiny",
                                  "--batch", "8", "--out", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert abs(res["gflop_per_caption_full"] - profile_config(get_config("priorclip-tiny"))["gflop_text"]) < 1e-9
    assert len(res["batch_lengths"]) == 4 and max(res["batch_lengths"]) < 77  # 30 captions in batches of 8
    assert res["saving_factor"] > 2  # generated captions are ~15 tokens of 77


def test_missing_dataset_is_one_line(tmp_path):
    r = CliRunner().invoke(main, ["--dataset", str(tmp_path / "no.json"), "--images", str(tmp_path)])
    assert r.exit_code != 0 and "dataset JSON not found" in r.output and "Traceback" not in r.output
