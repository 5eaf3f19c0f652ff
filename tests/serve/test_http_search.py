"""Search over HTTP against a real FAISS index: text, image (JSON and multipart) and id queries equal a numpy
brute-force ranking of the engine's own embeddings; item metadata and thumbnails; unknown ids 404; the index is
served the same after a restart; an index of other weights is refused at start."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from priorclip.errors import PriorCLIPError
from priorclip.provenance import engine_identity
from priorclip.serve.app import create_app
from priorclip.serve.cli import ServerThread, build_service
from priorclip.serve.index import write_index
from priorclip.serve.service import BatchingOptions

COLOURS = {"red": (200, 40, 30), "green": (40, 170, 60), "blue": (30, 60, 200), "grey": (120, 120, 120)}


def tile(colour: tuple[int, int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    a = np.clip(np.array(colour) + rng.normal(0, 25, (64, 64, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(a, "RGB")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiles")
    paths = []
    for name, rgb in COLOURS.items():
        for i in range(3):
            p = root / f"{name}_{i}.png"
            tile(rgb, 10 * len(paths) + i).save(p)
            paths.append(p)
    return root, paths


@pytest.fixture(scope="module")
def indexed(corpus, tmp_path_factory):
    root, paths = corpus
    service = build_service(model_name="priorclip-tiny", selftest=False,
                            batching=BatchingOptions(max_batch=8, max_wait_ms=2, cache_size=0))
    with torch.inference_mode():
        vecs = np.concatenate([service.engine.encode_images(service.pre.transform.load(p)[None]).numpy()
                               for p in paths])
    ids = [p.name for p in paths]
    metas = [{"path": str(p), "captions": [f"a {p.stem.split('_')[0]} tile"]} for p in paths]
    index_dir = tmp_path_factory.mktemp("index") / "tiles.index"
    write_index(index_dir, vecs, ids, metas, identity=service.loaded.identity)
    service.stop()
    return index_dir, vecs, ids


def start(index_dir):
    service = build_service(model_name="priorclip-tiny", index=index_dir, selftest=False,
                            batching=BatchingOptions(max_batch=8, max_wait_ms=2, cache_size=0))
    service.start(block=True)
    return service


@pytest.fixture(scope="module")
def served(indexed):
    service = start(indexed[0])
    with ServerThread(create_app(service)) as url:
        with httpx.Client(base_url=url, timeout=60) as client:
            yield service, client
    service.stop()


def brute_force(vecs: np.ndarray, ids: list[str], q: np.ndarray, k: int) -> tuple[list[str], np.ndarray]:
    scores = vecs.astype(np.float64) @ q.astype(np.float64)
    order = np.argsort(-scores, kind="stable")[:k]
    return [ids[i] for i in order], scores[order]


def check(results: list[dict], want_ids: list[str], want_scores: np.ndarray) -> None:
    assert [r["rank"] for r in results] == list(range(1, len(want_ids) + 1))
    assert [r["id"] for r in results] == want_ids
    np.testing.assert_allclose([r["score"] for r in results], want_scores, atol=1e-5)


def test_text_image_and_id_queries_rank_like_brute_force(served, indexed, corpus):
    service, client = served
    _, vecs, ids = indexed
    with torch.inference_mode():
        q_text = service.engine.encode_texts(service.pre.tokenizer(["a red tile"])).numpy()[0]
    r = client.post("/search", json={"text": "a red tile", "k": 5})
    assert r.status_code == 200, r.text
    check(r.json()["results"], *brute_force(vecs, ids, q_text, 5))
    assert r.json()["query"] == {"type": "text", "text": "a red tile"}

    query_png = corpus[1][4].read_bytes()  # an indexed tile as the query: it ranks itself first
    r = client.post("/search", json={"image": base64.b64encode(query_png).decode(), "k": 3})
    check(r.json()["results"], *brute_force(vecs, ids, vecs[4], 3))
    assert r.json()["results"][0]["id"] == ids[4] and r.json()["results"][0]["score"] > 0.9999
    r = client.post("/search", files={"image": ("q.png", query_png, "image/png")}, data={"k": "4"})
    check(r.json()["results"], *brute_force(vecs, ids, vecs[4], 4))

    r = client.post("/search", json={"id": ids[7], "k": 12})
    check(r.json()["results"], *brute_force(vecs, ids, vecs[7], 12))


def test_hits_carry_metadata_and_thumbnails(served, indexed):
    _, client = served
    _, _, ids = indexed
    hit = client.post("/search", json={"id": ids[0], "k": 1}).json()["results"][0]
    assert hit["meta"] == {"captions": ["a red tile"]}  # the server's file path is not exposed
    item = client.get("/items", params={"id": ids[0]}).json()
    assert item["meta"] == hit["meta"] and item["image_url"] == hit["image_url"]
    thumb = client.get(hit["image_url"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    img = Image.open(io.BytesIO(thumb.content))
    assert img.format == "JPEG" and max(img.size) <= 256
    small = client.get("/items/image", params={"id": ids[0], "size": 32})
    assert max(Image.open(io.BytesIO(small.content)).size) == 32


def test_search_bad_requests(served):
    _, client = served

    def err(r, status, kind):
        assert r.status_code == status, r.text
        assert r.json()["error"]["type"] == kind

    err(client.post("/search", json={"id": "no-such-tile.png"}), 404, "unknown_id")
    err(client.get("/items", params={"id": "no-such-tile.png"}), 404, "unknown_id")
    err(client.get("/items/image", params={"id": "no-such-tile.png"}), 404, "unknown_id")
    err(client.post("/search", json={"text": "x", "id": "red_0.png"}), 422, "bad_request")
    err(client.post("/search", json={}), 422, "bad_request")
    err(client.post("/search", json={"text": "x", "k": 0}), 422, "bad_request")
    err(client.post("/search", json={"text": "x", "k": 5000}), 422, "bad_request")
    err(client.post("/search", files={"image": ("q.png", b"garbage", "image/png")}), 422, "bad_image")
    err(client.post("/search", files={"other": ("q.png", b"garbage", "image/png")}), 422, "bad_request")
    err(client.post("/search", files={"image": ("q.png", b"x", "image/png")}, data={"k": "many"}), 422,
        "bad_request")


def test_index_survives_a_restart(indexed):
    index_dir = indexed[0]
    answers = []
    for _ in range(2):  # two services, one after the other, on the same index folder
        service = start(index_dir)
        with ServerThread(create_app(service)) as url:
            answers.append(httpx.post(f"{url}/search", json={"text": "a blue tile", "k": 12}, timeout=60).json())
        service.stop()
    assert answers[0]["results"] == answers[1]["results"]


def test_index_of_other_weights_is_refused(indexed, tmp_path):
    _, vecs, ids = indexed
    from priorclip.registry import model_config

    other = engine_identity(model_config("priorclip-tiny"), "0" * 64)  # same config, other checkpoint
    write_index(tmp_path / "other", vecs, ids, identity=other)
    with pytest.raises(PriorCLIPError, match="checkpoint_sha256"):
        build_service(model_name="priorclip-tiny", index=tmp_path / "other", selftest=False)
