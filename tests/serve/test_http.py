"""priorclip-serve over real HTTP on loopback: every embedding route, the OpenAI client, bad inputs, image modes,
concurrency, the cache and the metrics.

The reference for every embedding is the engine itself, called directly on the same bytes through the same reading
rules as ``priorclip embed`` (``EvalTransform.load``), one input at a time.
"""

from __future__ import annotations

import base64
import io
import struct
import threading
import zlib

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from priorclip.serve.app import create_app
from priorclip.serve.cli import ServerThread, build_service
from priorclip.serve.inputs import Limits
from priorclip.serve.service import BatchingOptions

MAX_PIXELS = 4_000_000


def encoded(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def scene(seed: int, size=(96, 72), mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(a, "RGB").convert(mode) if mode != "RGB" else Image.fromarray(a, "RGB")


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height but whose data is tiny: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def served():
    service = build_service(model_name="priorclip-tiny", selftest=True,
                            limits=Limits(max_body_bytes=2 << 20, max_pixels=MAX_PIXELS, max_items=16,
                                          max_text_chars=300),
                            batching=BatchingOptions(max_batch=8, max_wait_ms=20, max_queue=64, cache_size=64))
    service.start(block=True)
    assert service.state == "ready", service.selftest
    with ServerThread(create_app(service)) as url:
        with httpx.Client(base_url=url, timeout=60) as client:
            yield service, client, url
    service.stop()


def direct_images(service, blobs: list[bytes]) -> np.ndarray:
    with torch.inference_mode():
        return np.concatenate([service.engine.encode_images(service.pre.transform.load(b)[None]).numpy()
                               for b in blobs])


def direct_texts(service, texts: list[str]) -> np.ndarray:
    with torch.inference_mode():
        return np.concatenate([service.engine.encode_texts(service.pre.tokenizer([t])).numpy() for t in texts])


def error(r: httpx.Response, status: int, kind: str) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()["error"]
    assert body["type"] == kind and body["code"] == status, body
    return body["message"]


# --------------------------------------------------------------------------------------------------- routes
def test_health_ready_models(served):
    service, client, _ = served
    assert client.get("/healthz").json()["status"] == "ok"
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    st = ready.json()["selftest"]
    assert st["passed"] is True and st["image_min_cosine"] > 0.99999
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == service.model_id
    assert client.get(f"/v1/models/{service.loaded.config.name}").status_code == 200
    error(client.get("/v1/models/gpt-4"), 404, "model_not_found")
    assert "/v1/embeddings" in client.get("/openapi.json").json()["paths"]


def test_embed_images_multipart_and_json(served):
    service, client, _ = served
    blobs = [encoded(scene(i)) for i in range(3)]
    want = direct_images(service, blobs)
    r = client.post("/embed/images", files=[("images", (f"{i}.png", b, "image/png")) for i, b in enumerate(blobs)])
    assert r.status_code == 200, r.text
    got = np.array(r.json()["embeddings"], np.float32)
    np.testing.assert_allclose(got, want, atol=2e-6)
    assert r.json()["dim"] == want.shape[1]
    r = client.post("/embed/images", json={"images": [base64.b64encode(blobs[0]).decode(),
                                                      "data:image/png;base64," + base64.b64encode(blobs[1]).decode()]})
    np.testing.assert_allclose(np.array(r.json()["embeddings"], np.float32), want[:2], atol=2e-6)


def test_embed_texts_and_tokens(served):
    service, client, _ = served
    texts = ["many planes are parked near the terminal", "a river runs through green farmland"]
    r = client.post("/embed/texts", json={"texts": texts})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(np.array(r.json()["embeddings"], np.float32), direct_texts(service, texts), atol=2e-6)
    # CLIP BPE: start + words + end token each; counted independently from the tokenizer
    assert r.json()["tokens"] == sum(int((service.pre.tokenizer([t]) != 0).sum()) for t in texts)
    hits = service.cache.hits
    again = client.post("/embed/texts", json={"texts": texts[::-1]}).json()  # both cached now: same rows, tokens
    assert service.cache.hits == hits + 2 and again["tokens"] == r.json()["tokens"]
    assert again["embeddings"] == r.json()["embeddings"][::-1]
    long = "a very long caption about fields " * 8  # within the character limit, over 77 tokens: truncated
    r = client.post("/embed/texts", json={"texts": [long]})
    assert r.status_code == 200
    np.testing.assert_allclose(np.array(r.json()["embeddings"], np.float32), direct_texts(service, [long]),
                               atol=2e-6)


def test_openai_route_raw_and_mixed(served):
    service, client, _ = served
    img = encoded(scene(7))
    uri = "data:image/png;base64," + base64.b64encode(img).decode()
    r = client.post("/v1/embeddings", json={"input": ["a harbour with boats", uri, "a stadium"],
                                            "model": service.loaded.config.name})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and [d["index"] for d in body["data"]] == [0, 1, 2]
    got = np.array([d["embedding"] for d in body["data"]], np.float32)
    np.testing.assert_allclose(got[[0, 2]], direct_texts(service, ["a harbour with boats", "a stadium"]), atol=2e-6)
    np.testing.assert_allclose(got[1], direct_images(service, [img])[0], atol=2e-6)
    tokens = sum(int((service.pre.tokenizer([t]) != 0).sum()) for t in ["a harbour with boats", "a stadium"])
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    b64 = client.post("/v1/embeddings", json={"input": "a stadium", "encoding_format": "base64"}).json()
    vec = np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), "<f4")
    np.testing.assert_array_equal(vec, got[2])


def test_openai_python_client(served):
    openai = pytest.importorskip("openai")
    service, _, url = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    texts = ["dense residential area", "bare land beside a road"]
    res = client.embeddings.create(model=service.model_id, input=texts)  # the client asks for base64 and decodes it
    got = np.array([d.embedding for d in res.data], np.float32)
    np.testing.assert_allclose(got, direct_texts(service, texts), atol=2e-6)
    assert res.model == service.model_id and res.usage.prompt_tokens > 0
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="text-embedding-3-small", input="x")
    with pytest.raises(openai.UnprocessableEntityError):
        client.embeddings.create(model=service.model_id, input=[""])


# ---------------------------------------------------------------------------------------------- image modes
def image_modes() -> dict[str, bytes]:
    base = scene(3, (80, 60))
    grey16 = Image.fromarray((np.asarray(base.convert("L"), np.uint16) * 257).astype(np.uint16))
    pages = [scene(10 + i, (40, 40)) for i in range(3)]
    tiff = io.BytesIO()
    pages[0].save(tiff, "TIFF", save_all=True, append_images=pages[1:])
    return {
        "cmyk_jpeg": encoded(base.convert("CMYK"), "JPEG", quality=95),
        "grey16_png": encoded(grey16, "PNG"),
        "palette_png": encoded(base.convert("P"), "PNG"),
        "rgba_png": encoded(base.convert("RGBA"), "PNG"),
        "one_pixel": encoded(Image.new("RGB", (1, 1), (200, 30, 40)), "PNG"),
        "thin": encoded(scene(4, (400, 3)), "PNG"),
        "multipage_tiff": tiff.getvalue(),
        "grey_webp": encoded(base.convert("L"), "WEBP", lossless=True),
    }


def test_every_image_mode_embeds_like_priorclip_embed(served, tmp_path):
    from priorclip.retrieval import embed_images

    service, client, _ = served
    modes = image_modes()
    paths = []
    for name, data in modes.items():
        p = tmp_path / f"{name}.{ {'cmyk_jpeg': 'jpg', 'multipage_tiff': 'tif', 'grey_webp': 'webp'}.get(name, 'png')}"
        p.write_bytes(data)
        paths.append(p)
    # the offline tool's reading of the files is the reference (one image per call)
    want = torch.cat([embed_images(service.engine, [p], batch_size=1, progress=False) for p in paths]).numpy()
    r = client.post("/embed/images", files=[("images", (p.name, p.read_bytes(), "application/octet-stream"))
                                            for p in paths])
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(np.array(r.json()["embeddings"], np.float32), want, atol=2e-6)


# ----------------------------------------------------------------------------------------------- bad input
def test_bad_inputs_get_precise_statuses(served):
    service, client, _ = served
    good = encoded(scene(1))
    # corrupt or non-image bytes: 422
    assert "cannot" in error(client.post("/embed/images", files=[("images", ("x.png", b"not an image", "image/png"))]),
                             422, "bad_image")
    truncated = encoded(scene(2), "JPEG")[:200]
    error(client.post("/embed/images", files=[("images", ("t.jpg", truncated, "image/jpeg"))]), 422, "bad_image")
    error(client.post("/embed/images", json={"images": ["%%% not base64"]}), 422, "bad_image")
    error(client.post("/embed/images", json={"images": ["data:image/png,rawdata"]}), 422, "bad_image")
    # unsupported media types: 415
    error(client.post("/embed/images", files=[("images", ("a.txt", good, "text/plain"))]), 415, "unsupported_media")
    error(client.post("/v1/embeddings", json={"input": ["data:text/plain;base64,aGVsbG8="]}), 415,
          "unsupported_media")
    error(client.post("/embed/texts", content=b"texts", headers={"content-type": "text/plain"}), 415,
          "unsupported_media")
    # empty batches, empty and over-long captions, malformed bodies: 422
    error(client.post("/embed/images", json={"images": []}), 422, "bad_request")
    error(client.post("/embed/texts", json={"texts": []}), 422, "bad_request")
    error(client.post("/v1/embeddings", json={"input": []}), 422, "bad_request")
    error(client.post("/embed/texts", json={"texts": ["ok", "  "]}), 422, "bad_text")
    assert "301 characters" in error(client.post("/embed/texts", json={"texts": ["x" * 301]}), 422, "bad_text")
    error(client.post("/v1/embeddings", json={"input": [[1, 2, 3]]}), 422, "bad_request")
    error(client.post("/v1/embeddings", json={"input": "x", "dimensions": 3}), 422, "bad_request")
    error(client.post("/embed/texts", content=b"{not json", headers={"content-type": "application/json"}), 422,
          "bad_request")
    error(client.post("/embed/texts", json={"texts": ["x"]}, headers={"x-request-timeout": "soon"}), 422,
          "bad_request")
    # too many items, oversized bodies (declared and streamed), decompression bombs: 413
    error(client.post("/embed/texts", json={"texts": ["a"] * 17}), 413, "too_large")
    error(client.post("/embed/images", files=[("images", (f"{i}.png", good, "image/png")) for i in range(17)]), 413,
          "too_large")
    big = b"x" * (3 << 20)
    error(client.post("/embed/images", content=big, headers={"content-type": "application/json"}), 413, "too_large")
    error(client.post("/embed/images", content=iter([big[:1 << 20]] * 3),  # chunked: no Content-Length
                      headers={"content-type": "application/json"}), 413, "too_large")
    bomb = png_declaring(30000, 30000)
    msg = error(client.post("/embed/images", files=[("images", ("bomb.png", bomb, "image/png"))]), 413, "too_large")
    assert "900,000,000 pixels" in msg and "--max-pixels" in msg
    # unknown model: 404; no index: 404
    error(client.post("/v1/embeddings", json={"input": "x", "model": "nope"}), 404, "model_not_found")
    error(client.post("/search", json={"text": "x"}), 404, "no_index")
    # the service is still up and right after all of that
    r = client.post("/embed/images", files=[("images", ("ok.png", good, "image/png"))])
    np.testing.assert_allclose(np.array(r.json()["embeddings"], np.float32), direct_images(service, [good]),
                               atol=2e-6)


def test_metrics_count_routes_errors_stages_and_cache(served):
    service, client, _ = served
    img = encoded(scene(42))
    before = service.cache.hits
    for _ in range(2):
        assert client.post("/embed/images", files=[("images", ("c.png", img, "image/png"))]).status_code == 200
    assert service.cache.hits == before + 1  # the second identical image is a cache hit
    client.post("/embed/texts", json={"texts": [""]})
    text = client.get("/metrics").text

    from prometheus_client.parser import text_string_to_metric_families

    samples = {(smp.name, tuple(sorted(smp.labels.items()))): smp.value
               for fam in text_string_to_metric_families(text) for smp in fam.samples}

    def value(name: str, **labels) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("priorclip_requests_total", route="/embed/images", status="200") >= 2
    assert value("priorclip_errors_total", route="/embed/texts", kind="bad_text") >= 1
    assert value("priorclip_cache_total", kind="image", result="hit") >= 1
    for stage in ("decode", "preprocess", "queue_wait", "encode"):
        assert value("priorclip_stage_seconds_count", kind="image", stage=stage) >= 1
    assert value("priorclip_stage_seconds_count", kind="text", stage="preprocess") >= 1  # tokenising
    assert value("priorclip_batch_size_count", kind="image") >= 1
    assert value("priorclip_request_seconds_count", route="/embed/images") >= 2
    assert value("priorclip_ready") == 1
    assert value("priorclip_queue_depth", kind="text") == 0


# ---------------------------------------------------------------------------------------------- concurrency
def test_concurrent_clients_get_their_own_answers(served):
    service, client, url = served
    n_clients, per_client = 12, 3
    images = {(c, j): encoded(scene(1000 + 10 * c + j, (64 + c, 48 + j))) for c in range(n_clients)
              for j in range(per_client)}
    texts = {(c, j): f"scene {c} with {j} storage tanks near a {['road', 'river', 'port'][j]}"
             for c in range(n_clients) for j in range(per_client)}
    want_img = dict(zip(images, direct_images(service, list(images.values()))))
    want_txt = dict(zip(texts, direct_texts(service, list(texts.values()))))
    calls_before, items_before = engine_calls(service)
    failures: list[str] = []
    barrier = threading.Barrier(n_clients)

    def run(c: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as cl:
            barrier.wait()
            for j in range(per_client):
                r = cl.post("/embed/images", files=[("images", ("i.png", images[c, j], "image/png"))])
                t = cl.post("/v1/embeddings", json={"input": [texts[c, j]]})
                if r.status_code != 200 or t.status_code != 200:
                    failures.append(f"{c},{j}: {r.status_code} {t.status_code}")
                    continue
                gi = np.array(r.json()["embeddings"][0], np.float32)
                gt = np.array(t.json()["data"][0]["embedding"], np.float32)
                if not (np.abs(gi - want_img[c, j]).max() < 1e-5 and np.abs(gt - want_txt[c, j]).max() < 1e-5):
                    failures.append(f"{c},{j}: wrong rows")

    threads = [threading.Thread(target=run, args=(c,)) for c in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
    # the engine saw fewer calls than items: requests of different clients were batched together
    calls, items = engine_calls(service)
    assert items - items_before == n_clients * per_client
    assert calls - calls_before < items - items_before


def engine_calls(service) -> tuple[float, float]:
    """(engine calls, items embedded) for images, from the batch-size histogram's count and sum."""
    get = service.metrics.registry.get_sample_value
    return (get("priorclip_batch_size_count", {"kind": "image"}) or 0.0,
            get("priorclip_batch_size_sum", {"kind": "image"}) or 0.0)
