"""The HTTP routes of ``priorclip-serve`` (FastAPI; OpenAPI docs at ``/docs``).

Native routes: ``POST /embed/images`` (multipart files or JSON base64), ``POST /embed/texts``, ``POST /search`` (a
caption, an image or an indexed item's id -> top-k with scores and stored metadata), ``GET /items`` and
``GET /items/image`` (an indexed item's metadata and thumbnail). OpenAI-compatible: ``POST /v1/embeddings`` (``input``
a string or a list of captions and ``data:image/...;base64,`` URIs; ``encoding_format`` float or base64) and
``GET /v1/models``. Operations: ``/healthz`` (the process answers), ``/readyz`` (loaded, warmed, self-tested),
``/metrics`` (Prometheus). ``/`` is the search page.

Every error has one shape, OpenAI's: ``{"error": {"message", "type", "code"}}`` with the status of
:mod:`priorclip.serve.inputs`; 429 and 503 carry ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from importlib import resources
from typing import Literal, Union

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from .inputs import RequestError, bad_request, check_media_type, image_bytes, is_data_uri, too_large, unsupported_media
from .service import EmbeddingService

ROUTES = ("/", "/healthz", "/readyz", "/metrics", "/embed/images", "/embed/texts", "/search", "/items",
          "/items/image", "/v1/embeddings", "/v1/models", "/docs", "/openapi.json")
TIMEOUT_HEADER = "x-request-timeout"


def route_label(path: str) -> str:
    """The metrics' route label: a known route, else "other" (unknown paths must not grow the label set)."""
    return path if path in ROUTES else "other"
  # seconds; the request's own deadline, at most the service's


# ------------------------------------------------------------------------------------------------------ schemas
class EmbeddingsRequest(BaseModel):
    input: Union[str, list[str]] = Field(description="A caption, or a list of captions and data:image/...;base64, "
                                                     "URIs (token arrays are not accepted)")
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, description="Must equal the model's width if given (no truncation)")
    user: str | None = None


class EmbeddingItem(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: Union[list[float], str]


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingItem]
    model: str
    usage: Usage


class ImagesRequest(BaseModel):
    images: list[str] = Field(description="base64 image files or data:image/...;base64, URIs")
    encoding_format: Literal["float", "base64"] = "float"


class TextsRequest(BaseModel):
    texts: list[str]
    encoding_format: Literal["float", "base64"] = "float"


class NativeEmbeddings(BaseModel):
    model: str
    dim: int
    embeddings: Union[list[list[float]], list[str]]
    tokens: int | None = None


class SearchRequest(BaseModel):
    text: str | None = None
    image: str | None = Field(None, description="base64 image file or data URI")
    id: str | None = Field(None, description="an indexed item's id: its own vector is the query")
    k: int = 10


class SearchHit(BaseModel):
    rank: int
    id: str
    score: float
    meta: dict
    image_url: str | None = None


class SearchResponse(BaseModel):
    model: str
    query: dict
    results: list[SearchHit]


# ----------------------------------------------------------------------------------------------------- helpers
def error_response(status: int, kind: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status, headers=headers)


def _encode(rows: np.ndarray, encoding: str) -> list:
    rows = np.ascontiguousarray(rows, dtype="<f4")
    if encoding == "base64":  # OpenAI's: the little-endian float32 bytes of each vector
        return [base64.b64encode(r.tobytes()).decode("ascii") for r in rows]
    return rows.tolist()


def _json_type(request: Request) -> bool:
    ct = request.headers.get("content-type", "").split(";")[0].strip().lower()
    return ct == "application/json" or ct.endswith("+json")


def _multipart(request: Request) -> bool:
    return request.headers.get("content-type", "").lower().startswith("multipart/form-data")


async def read_json(request: Request, model: type[BaseModel]):
    if not _json_type(request):
        raise unsupported_media(f"expected application/json, got {request.headers.get('content-type')!r}")
    try:
        obj = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        raise bad_request("the body is not valid JSON") from None
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "body"
        raise bad_request(f"{where}: {err['msg']}") from None


async def read_uploads(request: Request, max_items: int, field: str | None = None) -> tuple[list, dict]:
    """Multipart image parts (every file part, or those named ``field``) as ``[(where, bytes)]``, and other fields."""
    try:
        form = await request.form(max_files=max_items, max_fields=64)
    except (MultiPartException, StarletteHTTPException) as e:  # starlette wraps its parser's errors in a 400
        if "Too many files" in str(getattr(e, "detail", e)):
            raise too_large(f"more than {max_items} files in one request") from None
        raise bad_request(f"malformed multipart body: {getattr(e, 'detail', e)}") from None
    files, fields = [], {}
    for name, value in form.multi_items():
        if isinstance(value, str):
            fields[name] = value
        elif field is None or name == field:
            files.append((name, value))
    if len(files) > max_items:
        raise too_large(f"{len(files)} images in one request, over the limit of {max_items}")
    out = []
    for i, (name, f) in enumerate(files):
        where = f"{name}[{i}] ({f.filename or 'no name'})"
        check_media_type(f.content_type, where)
        out.append((where, await f.read()))
    await form.close()
    return out, fields


def _timeout(request: Request, service: EmbeddingService) -> float:
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return service.batching.request_timeout_s
    try:
        t = float(raw)
    except ValueError:
        raise bad_request(f"{TIMEOUT_HEADER}: not a number of seconds: {raw!r}") from None
    if not t > 0:
        raise bad_request(f"{TIMEOUT_HEADER}: must be > 0 seconds")
    return min(t, service.batching.request_timeout_s)


class _BodyTooLarge(Exception):
    pass


class LimitsAndMetrics:
    """Pure ASGI middleware: refuses bodies over the byte limit (Content-Length first, then while streaming, before any
    parsing) and records each request's route, status and latency."""

    def __init__(self, app, service: EmbeddingService) -> None:
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = route_label(scope["path"])
        limit = self.service.limits.max_body_bytes
        status = {"code": 500, "started": False}
        t0 = time.perf_counter()
        metrics = self.service.metrics

        async def send_wrapped(message):
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
            await send(message)

        async def reply(code: int, kind: str, message: str) -> None:
            metrics.errors.labels(route, kind).inc()
            await error_response(code, kind, message)(scope, receive, send_wrapped)

        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        try:
            if declared is not None and int(declared) > limit:
                await reply(413, "too_large", f"body of {int(declared):,} bytes, over the limit of {limit:,}")
                return
        except ValueError:
            await reply(400, "bad_request", "invalid Content-Length")
            return
        seen = 0

        async def receive_limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _BodyTooLarge
            return message

        try:
            await self.app(scope, receive_limited, send_wrapped)
        except _BodyTooLarge:
            if not status["started"]:
                await reply(413, "too_large", f"body over the limit of {limit:,} bytes")
        finally:
            metrics.requests.labels(route, str(status["code"])).inc()
            metrics.latency.labels(route).observe(time.perf_counter() - t0)


# -------------------------------------------------------------------------------------------------------- app
def create_app(service: EmbeddingService) -> FastAPI:
    app = FastAPI(title="priorclip-serve", version="1",
                  description="PriorCLIP / PIR remote-sensing image-text embeddings and search. Errors: "
                              '{"error": {"message", "type", "code"}}.')
    app.state.service = service
    app.add_middleware(LimitsAndMetrics, service=service)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, e: RequestError):
        service.metrics.errors.labels(route_label(request.url.path), e.kind).inc()
        return error_response(e.status, e.kind, str(e), e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):  # unknown routes, wrong methods
        kind = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http")
        service.metrics.errors.labels(route_label(request.url.path), kind).inc()
        return error_response(e.status_code, kind, str(e.detail), getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in err["loc"]) or "request"
        service.metrics.errors.labels(route_label(request.url.path), "bad_request").inc()
        return error_response(422, "bad_request", f"{where}: {err['msg']}")

    # ------------------------------------------------------------------------------------------- operations
    @app.get("/healthz", tags=["operations"])
    async def healthz():
        """The process answers (whatever its readiness)."""
        return {"status": "ok", "state": service.state}

    @app.get("/readyz", tags=["operations"])
    async def readyz():
        """200 once loaded, warmed and self-tested; 503 before, or when the self-test failed (with its line)."""
        body = {"ready": service.ready, "state": service.state, "selftest": service.selftest, **service.describe()}
        return JSONResponse(body, 200 if service.ready else 503, headers=None if service.ready else
                            {"Retry-After": "5"})

    @app.get("/metrics", tags=["operations"])
    async def metrics():
        return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    # -------------------------------------------------------------------------------------------- native
    images_body = {"requestBody": {"content": {"application/json": {"schema": ImagesRequest.model_json_schema()},
                                             "multipart/form-data": {"schema": {
                                                 "type": "object", "properties": {"images": {
                                                     "type": "array", "items": {"type": "string",
                                                                                "format": "binary"}}}}}},
                                 "required": True}}

    @app.post("/embed/images", response_model=NativeEmbeddings, tags=["embeddings"], openapi_extra=images_body)
    async def embed_images(request: Request):
        """Embed images: multipart files (any field name; image/* or octet-stream parts) or JSON base64."""
        encoding = request.query_params.get("encoding_format", "float")
        if _multipart(request):
            items, _ = await read_uploads(request, service.limits.max_items)
        else:
            body = await read_json(request, ImagesRequest)
            encoding = body.encoding_format
            items = [(f"images[{i}]", image_bytes(s, f"images[{i}]")) for i, s in enumerate(body.images)]
        if encoding not in ("float", "base64"):
            raise bad_request(f"encoding_format must be float or base64, got {encoding!r}")
        rows = await service.embed_images(items, _timeout(request, service))
        return {"model": service.model_id, "dim": rows.shape[1], "embeddings": _encode(rows, encoding)}

    @app.post("/embed/texts", response_model=NativeEmbeddings, tags=["embeddings"],
              openapi_extra={"requestBody": {"content": {"application/json": {
                  "schema": TextsRequest.model_json_schema()}}, "required": True}})
    async def embed_texts(request: Request):
        """Embed captions (truncated to the model's context by its own tokenizer, as the reference does)."""
        body = await read_json(request, TextsRequest)
        rows, tokens = await service.embed_texts(body.texts, _timeout(request, service), "texts")
        return {"model": service.model_id, "dim": rows.shape[1], "embeddings": _encode(rows, body.encoding_format),
                "tokens": tokens}

    @app.post("/search", response_model=SearchResponse, tags=["search"],
              openapi_extra={"requestBody": {"content": {
                  "application/json": {"schema": SearchRequest.model_json_schema()},
                  "multipart/form-data": {"schema": {"type": "object", "properties": {
                      "image": {"type": "string", "format": "binary"}, "k": {"type": "integer"}}}}},
                  "required": True}})
    async def search(request: Request):
        """Top-k indexed items for a caption, an image or an indexed item's id (its own vector; it ranks itself
        first)."""
        service.require_index()
        timeout = _timeout(request, service)
        if _multipart(request):
            items, fields = await read_uploads(request, 1, "image")
            if not items:
                raise bad_request("multipart search: send the query image in a part named 'image'")
            try:
                k = int(fields.get("k", 10))
            except ValueError:
                raise bad_request(f"k: not an integer: {fields.get('k')!r}") from None
            q = (await service.embed_images(items, timeout))[0]
            query = {"type": "image", "bytes": len(items[0][1])}
        else:
            body = await read_json(request, SearchRequest)
            given = [n for n in ("text", "image", "id") if getattr(body, n) is not None]
            if len(given) != 1:
                raise bad_request("give exactly one of text, image or id")
            k = body.k
            if body.text is not None:
                q = (await service.embed_texts([body.text], timeout, "text"))[0][0]
                query = {"type": "text", "text": body.text}
            elif body.image is not None:
                q = (await service.embed_images([("image", image_bytes(body.image, "image"))], timeout))[0]
                query = {"type": "image"}
            else:
                q = service.item_vector(body.id)
                query = {"type": "id", "id": body.id}
        hits = service.search(q, k)
        return {"model": service.model_id, "query": query,
                "results": [_hit(rank, h) for rank, h in enumerate(hits, 1)]}

    @app.get("/items", tags=["search"])
    async def item(id: str):
        """An indexed item's stored metadata (404 for an unknown id)."""
        meta = service.item_meta(id)
        return {"id": id, "meta": _public_meta(meta), "image_url": _image_url(id, meta)}

    @app.get("/items/image", tags=["search"], response_class=Response,
             responses={200: {"content": {"image/jpeg": {}}}})
    async def item_image(id: str, size: int = 256):
        """An indexed item's image as a JPEG thumbnail (longest side ``size``)."""
        meta = service.item_meta(id)
        path = meta.get("path")
        if not path:
            raise RequestError(404, "no_image", f"item {id!r} has no image file recorded in the index")
        if not 16 <= size <= 1024:
            raise bad_request(f"size must be between 16 and 1024, got {size}")
        data = await asyncio.get_running_loop().run_in_executor(service.pool, _thumbnail, path, size,
                                                                service.limits.max_pixels)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    # ---------------------------------------------------------------------------------------------- OpenAI
    @app.post("/v1/embeddings", response_model=EmbeddingsResponse, tags=["openai"],
              openapi_extra={"requestBody": {"content": {"application/json": {
                  "schema": EmbeddingsRequest.model_json_schema()}}, "required": True}})
    async def openai_embeddings(request: Request):
        """OpenAI's embeddings call: captions and data:image URIs, in one list if wanted, rows in input order."""
        body = await read_json(request, EmbeddingsRequest)
        if body.model is not None and body.model not in model_names(service):
            raise RequestError(404, "model_not_found", f"the model {body.model!r} does not exist here; this service "
                               f"serves {service.model_id!r}")
        if body.dimensions is not None and body.dimensions != service.loaded.embed_dim:
            raise bad_request(f"dimensions: this model's embeddings have {service.loaded.embed_dim} dimensions "
                              f"(no truncation), got {body.dimensions}")
        inputs = [body.input] if isinstance(body.input, str) else body.input
        if not inputs:
            raise bad_request("input: empty list")
        images = [(i, s) for i, s in enumerate(inputs) if is_data_uri(s)]
        texts = [(i, s) for i, s in enumerate(inputs) if not is_data_uri(s)]
        timeout = _timeout(request, service)
        rows = [None] * len(inputs)
        tokens = 0
        jobs = []
        if images:
            blobs = [(f"input[{i}]", image_bytes(s, f"input[{i}]")) for i, s in images]
            jobs.append(service.embed_images(blobs, timeout))
        if texts:
            jobs.append(service.embed_texts([s for _, s in texts], timeout))
        results = await asyncio.gather(*jobs)
        if images:
            for (i, _), r in zip(images, results[0]):
                rows[i] = r
        if texts:
            text_rows, tokens = results[-1]
            for (i, _), r in zip(texts, text_rows):
                rows[i] = r
        enc = _encode(np.stack(rows), body.encoding_format)
        return {"object": "list", "model": service.model_id,
                "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(enc)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    @app.get("/v1/models", tags=["openai"])
    async def openai_models():
        return {"object": "list", "data": [{"id": service.model_id, "object": "model",
                                            "created": int(service.started), "owned_by": "priorclip"}]}

    @app.get("/v1/models/{model_id:path}", tags=["openai"])
    async def openai_model(model_id: str):
        if model_id not in model_names(service):
            raise RequestError(404, "model_not_found", f"the model {model_id!r} does not exist here")
        return {"id": service.model_id, "object": "model", "created": int(service.started), "owned_by": "priorclip"}

    # ------------------------------------------------------------------------------------------------ page
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(search_page())

    return app


def model_names(service: EmbeddingService) -> set[str]:
    """Names a client may use for the served model: its full id and its config name."""
    return {service.model_id, service.loaded.config.name}


def _public_meta(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if k != "path"}  # the server's file layout is not the client's business


def _image_url(item_id: str, meta: dict) -> str | None:
    from urllib.parse import quote

    return f"/items/image?id={quote(item_id, safe='')}" if meta.get("path") else None


def _hit(rank: int, h) -> dict:
    return {"rank": rank, "id": h.id, "score": float(h.score), "meta": _public_meta(h.meta),
            "image_url": _image_url(h.id, h.meta)}


def _thumbnail(path: str, size: int, max_pixels: int) -> bytes:
    from priorclip.errors import DataError
    from priorclip.transforms import open_image

    try:
        img = open_image(path, draft_size=size, max_pixels=max_pixels)
    except DataError as e:
        raise RequestError(404, "no_image", f"cannot read the item's image: {e}") from None
    img = img.convert("RGB")
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def search_page() -> str:
    return resources.files("priorclip.serve").joinpath("page.html").read_text(encoding="utf-8")
