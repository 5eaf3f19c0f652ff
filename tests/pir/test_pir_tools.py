"""PIR through the tools every model uses: the evaluation protocols (spec §6A vs §6B), its preprocessing (squash
transform, WordPiece in the reference's chunks of 128), `eval`, `embed`, `info`, the open_clip-style factory, and the
one-line answers to options of the other family."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from priorclip.data import load_retrieval_set
from priorclip.encoder import TorchEncoder
from priorclip.errors import DataError
from priorclip.preprocess import PIR_TEXT_CHUNK, preprocess_for
from priorclip.registry import create_model, get_config
from priorclip.retrieval import embed_texts
from priorclip.synthetic import make_sample
from priorclip.transforms import OPENAI_MEAN, OPENAI_STD, EvalTransform
from tests.priorclip.test_cli import run, user_error  # the CLI driver and its one-line-error check

TINY = "pir-tiny"


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return make_sample(tmp_path_factory.mktemp("sample"), n_images=10, size=64)


def _pir_records(sample, tmp_path, order):
    """PIR-pytorch's split file: a JSON list of {"image", "caption": [...]} records, here in ``order``."""
    json_path, img_dir = sample
    doc = json.loads(json_path.read_text())["images"]
    records = [{"image": doc[i]["filename"], "caption": [s["raw"] for s in doc[i]["sentences"]]} for i in order]
    path = tmp_path / "test.json"
    path.write_text(json.dumps(records))
    return path, img_dir, records


def test_pir_split_file_keeps_file_order(sample, tmp_path):
    order = [3, 0, 7, 1]
    path, img_dir, records = _pir_records(sample, tmp_path, order)
    ds = load_retrieval_set(path, img_dir)
    assert [p.name for p in ds.images] == [r["image"] for r in records]
    assert ds.captions == [c for r in records for c in r["caption"]]
    assert ds.caption_image.tolist() == [i for i, r in enumerate(records) for _ in r["caption"]]
    records[1]["caption"] = records[1]["caption"][0]  # a single string is one caption
    path.write_text(json.dumps(records))
    assert len(load_retrieval_set(path, img_dir).captions) == 16
    for bad in ([{"image": "x.png"}], [{"image": 3, "caption": ["a"]}], [{"image": "a.png", "caption": []}], []):
        path.write_text(json.dumps(bad))
        with pytest.raises(DataError):
            load_retrieval_set(path, img_dir)
    path.write_text(json.dumps([{"image": "missing.png", "caption": ["a"]}]))
    with pytest.raises(DataError, match="missing under"):
        load_retrieval_set(path, img_dir)


def test_protocols_order_a_karpathy_split(sample, tmp_path):
    json_path, img_dir = sample
    doc = json.loads(json_path.read_text())
    doc["images"].reverse()  # file order differs from name order
    shuffled = tmp_path / "rev.json"
    shuffled.write_text(json.dumps(doc))
    names_sorted = [p.name for p in load_retrieval_set(shuffled, img_dir, protocol="priorclip").images]
    names_file = [p.name for p in load_retrieval_set(shuffled, img_dir, protocol="pir").images]
    assert names_sorted == sorted(names_sorted) and names_file == [e["filename"] for e in doc["images"]]
    assert names_sorted != names_file
    with pytest.raises(DataError, match="unknown evaluation protocol"):
        load_retrieval_set(shuffled, img_dir, protocol="x")


def test_squash_transform_by_hand():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (40, 90, 3), dtype=np.uint8))
    out = EvalTransform(56, resize="squash")(img)
    resized = np.asarray(img.resize((56, 56), Image.Resampling.BICUBIC), dtype=np.float64) / 255.0
    expected = (resized - np.array(OPENAI_MEAN)) / np.array(OPENAI_STD)
    assert out.shape == (3, 56, 56)
    assert np.abs(out.permute(1, 2, 0).numpy() - expected).max() < 1e-6
    assert not torch.allclose(out, EvalTransform(56)(img))  # the crop transform cuts the sides instead
    assert preprocess_for(get_config(TINY)).transform.resize == "squash"
    with pytest.raises(ValueError, match="resize must be one of"):
        EvalTransform(56, resize="stretch")


class _Recorder:
    """An encoder that records the token batches it is given."""

    def __init__(self, cfg):
        self.config, self.image_size, self.context_length = cfg, cfg.vision.image_size, cfg.text.context_length
        self.seen = []

    def encode_texts(self, tokens):
        self.seen.append(tokens)
        return torch.zeros(len(tokens), 4)


def test_captions_are_embedded_in_the_reference_chunks():
    """PIR attends to padding: captions go through in chunks of 128 in order, each padded to its own longest caption,
    whatever batch size the caller asks for."""
    caps = [("a wide river " * (1 + i % 7)).strip() for i in range(300)]
    rec = _Recorder(get_config(TINY))
    embed_texts(rec, caps, batch_size=1000, progress=False)
    assert [len(t) for t in rec.seen] == [PIR_TEXT_CHUNK, PIR_TEXT_CHUNK, 300 - 2 * PIR_TEXT_CHUNK]
    tok = preprocess_for(get_config(TINY)).tokenizer
    for i, t in enumerate(rec.seen):
        assert torch.equal(t, tok(caps[i * PIR_TEXT_CHUNK:(i + 1) * PIR_TEXT_CHUNK]))
    # with masked padding the batch no longer matters, so the caller's batch size is used
    rec = _Recorder(get_config(TINY, mask_padding=True))
    embed_texts(rec, caps, batch_size=1000, progress=False)
    assert [len(t) for t in rec.seen] == [300]


def test_eval_cli_pir_protocol_and_records(sample, tmp_path):
    path, img_dir, _ = _pir_records(sample, tmp_path, [4, 2, 9, 0, 5, 1])
    out = tmp_path / "m.json"
    r = run("eval", "--model", TINY, "--dataset", path, "--images", img_dir, "--out", out, "--device", "cpu")
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    assert report["protocol"] == "pir" and report["n_images"] == 6 and report["model"]["family"] == "pir"
    # the reported recall is the recall of the model's own embeddings (recomputed here from a fresh encoder)
    ds = load_retrieval_set(path, img_dir)
    enc = TorchEncoder(_seeded_model())
    from priorclip.retrieval import evaluate

    assert evaluate(enc, ds, progress=False, workers=1).metrics == pytest.approx(report["metrics"])


def _seeded_model():
    from priorclip.cliutils import RANDOM_INIT_SEED

    torch.manual_seed(RANDOM_INIT_SEED)
    return create_model(TINY)


def test_embed_captions_cli_equals_chunked_model(tmp_path):
    caps = [f"{n} planes are parked beside the terminal" for n in ("two", "many", "several large white")]
    (tmp_path / "c.txt").write_text("\n".join(caps))
    r = run("embed", "--model", TINY, "--captions", tmp_path / "c.txt", "--out", tmp_path / "c.npy", "--device", "cpu")
    assert r.exit_code == 0, r.output
    model = _seeded_model()
    with torch.no_grad():
        want = model.encode_text(preprocess_for(model.cfg).tokenizer(caps)).numpy()
    assert np.abs(np.load(tmp_path / "c.npy") - want).max() < 1e-6


def test_embed_names_a_caption_left_empty_by_cleaning(tmp_path):
    (tmp_path / "c.txt").write_text("a river\nsome farmland\n?!...\n")
    r = run("embed", "--model", TINY, "--captions", tmp_path / "c.txt", "--out", tmp_path / "c.npy", "--device", "cpu")
    user_error(r, "caption 3 of 3: caption '?!...' is empty after cleaning")
    assert not (tmp_path / "c.npy").exists()


def test_family_options_are_refused_for_the_other_family(sample, tmp_path):
    json_path, img_dir = sample
    user_error(run("eval", "--model", TINY, "--gate", "2belief", "--dataset", json_path, "--images", img_dir),
               "--gate does not apply to model 'pir-tiny'")
    user_error(run("eval", "--model", "priorclip-tiny", "--mask-padding", "--dataset", json_path, "--images", img_dir),
               "--mask-padding does not apply to model 'priorclip-tiny'")
    out = tmp_path / "m.json"
    r = run("eval", "--model", TINY, "--mask-padding", "--dataset", json_path, "--images", img_dir, "--out", out,
            "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["model"]["mask_padding"] is True


def test_info_shows_pir():
    r = run("info", "--model", TINY, "--json")
    assert r.exit_code == 0, r.output
    row = json.loads(r.output)[TINY]
    model = create_model(TINY)
    assert row["params_total"] == sum(p.numel() for p in model.parameters())
    assert row["params_vir"] + row["params_lca"] + row["params_vision"] + row["params_prior"] + row["params_text"] \
        == row["params_total"] - 2  # + temp, temp2
    assert row["text_tokens"] == 47 and row["gflop_image"] > row["gflop_image_prior"] > 0
    table = run("info", "--model", TINY)
    assert "VIR top-40" in table.output
    # spec §8A's analytic budget for the full model: Swin-T 9.0 + ResNet-50 8.2 + VIR 0.73 + heads 0.04 ~ 18 GFLOP per
    # image; BERT-base 8.07 + LCA 1.28 = 9.35 GFLOP per 47-token caption
    full = json.loads(run("info", "--model", "pir-swin-t-bert", "--json").output)["pir-swin-t-bert"]
    assert full["params_total"] == 184_642_492
    assert abs(full["gflop_image"] - 18.0) < 0.15 and abs(full["gflop_image_prior"] - 8.2) < 0.05
    assert abs(full["gflop_text"] - 9.35) < 0.1


def test_factory_gives_the_family_preprocessing():
    import priorclip
    from priorclip.wordpiece import PIRTokenizer

    tok = priorclip.get_tokenizer("pir-swin-t-bert")
    assert isinstance(tok, PIRTokenizer) and tok(["a river"]).tolist() == [[101, 1037, 2314]]
    model, train_preprocess, preprocess = priorclip.create_model_and_transforms(TINY)
    assert preprocess.resize == "squash" and preprocess.image_size == 56
    assert "RandAugment" in repr(train_preprocess)
    assert "RandAugment" not in repr(priorclip.create_model_and_transforms("priorclip-tiny")[1])
