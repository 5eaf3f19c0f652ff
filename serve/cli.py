"""``priorclip-serve``: the embedding and search service over one engine (and optionally one index).

Examples::

    priorclip-serve --engine out/onnx-fp16 --device cuda --index tiles.index --port 8000
    priorclip-serve --model priorclip-vit-b32 --checkpoint PriorCLIP_RET-3.pt --backend fused --precision fp16
    curl -s localhost:8000/v1/embeddings -H 'Content-Type: application/json' \\
        -d '{"input": ["many planes are parked near the terminal"]}'
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import click

from priorclip.cliutils import MASK_PADDING_KEY, model_options, resolve_device, user_errors
from priorclip.errors import PriorCLIPError

from .batcher import BatchingOptions
from .inputs import Limits

DEFAULT_LIMITS = Limits()
DEFAULT_BATCHING = BatchingOptions()

SERVE_PACKAGES = ("fastapi", "uvicorn", "multipart", "prometheus_client")  # import names of the serve extra


def require_serve_dependencies() -> None:
    """One line naming what to install when the service's packages are missing (they are an optional extra)."""
    import importlib.util

    missing = [m for m in SERVE_PACKAGES if importlib.util.find_spec(m) is None]
    if missing:
        raise PriorCLIPError(f"priorclip-serve needs {', '.join(missing)}: pip install 'priorclip[serve]'")

BACKEND_NAMES = ("torch", "torch-compile", "onnxruntime", "aoti", "tensorrt", "fused")  # serve.engines.BACKENDS


def build_service(*, engine_dir=None, model_name=None, checkpoint=None, gate=None, mask_padding=False,
                  backend="torch", precision="fp32", device="cpu", index=None, limits: Limits = Limits(),
                  batching=None, selftest: bool = True):
    """The :class:`~priorclip.serve.service.EmbeddingService` of the CLI's options (not started): engine, optional
    index (identity checked), limits; ``batching``: :class:`~priorclip.serve.batcher.BatchingOptions`."""
    from .loading import load_engine
    from .service import EmbeddingService

    loaded = load_engine(engine_dir=engine_dir, model_name=model_name, checkpoint=checkpoint, gate=gate,
                         mask_padding=mask_padding, backend=backend, precision=precision, device=device)
    vindex = None
    if index is not None:
        from .index import VectorIndex

        vindex = VectorIndex.open(index)
    return EmbeddingService(loaded, index=vindex, limits=limits, batching=batching or BatchingOptions(),
                            selftest=selftest)


class ServerThread:
    """A uvicorn server on a thread (tests, notebooks): ``with ServerThread(app) as url: ...`` on a free loopback
    port."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                    lifespan="off", timeout_graceful_shutdown=2))
        self.server.install_signal_handlers = lambda: None  # signals belong to the main thread's owner
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        import time

        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server thread ended before it started (port in use?)")
            time.sleep(0.01)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--engine", "engine_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="A priorclip-export directory (ONNX, AOTInductor or TensorRT; its manifest says which).")
@model_options
@click.option("--backend", type=click.Choice(BACKEND_NAMES), default=None,
              help="With --model/--checkpoint: the engine backend (as priorclip-bench measures them). [default: torch]")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16", "int8", "fp8"]), default=None,
              help="With --model/--checkpoint: the backend's precision (an export carries its own). [default: fp32]")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--index", "index_path", type=click.Path(path_type=Path), default=None,
              help="A 'priorclip index' directory to search (made by the same weights).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: all).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--max-batch", default=DEFAULT_BATCHING.max_batch, show_default=True, type=click.IntRange(min=1),
              help="Most items per engine call (dynamic batching across requests).")
@click.option("--max-wait-ms", default=DEFAULT_BATCHING.max_wait_ms, show_default=True, type=click.FloatRange(min=0),
              help="How long the oldest queued item waits for others before its batch runs.")
@click.option("--max-queue", default=DEFAULT_BATCHING.max_queue, show_default=True, type=click.IntRange(min=1),
              help="Most items waiting; a request beyond it gets 429 with Retry-After.")
@click.option("--request-timeout", default=DEFAULT_BATCHING.request_timeout_s, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Seconds a request may wait in all (504 past it); a client's X-Request-Timeout may shorten it.")
@click.option("--decode-workers", default=DEFAULT_BATCHING.decode_workers, show_default=True, type=click.IntRange(min=1),
              help="Threads decoding and preprocessing images off the event loop.")
@click.option("--cache-size", default=DEFAULT_BATCHING.cache_size, show_default=True, type=click.IntRange(min=0),
              help="Embeddings kept in the LRU cache (keyed by engine and input bytes); 0: off.")
@click.option("--max-body-mb", default=DEFAULT_LIMITS.max_body_bytes / (1 << 20), show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Largest request body (413 beyond).")
@click.option("--max-pixels", default=DEFAULT_LIMITS.max_pixels, show_default=True, type=click.IntRange(min=1),
              help="Largest image, in pixels declared by its header (413 beyond, before decoding).")
@click.option("--max-items", default=DEFAULT_LIMITS.max_items, show_default=True, type=click.IntRange(min=1),
              help="Most images or captions per request.")
@click.option("--max-text-chars", default=DEFAULT_LIMITS.max_text_chars, show_default=True,
              type=click.IntRange(min=1),
              help="Longest caption in characters (422 beyond); within it the model's tokenizer truncates.")
@click.option("--no-selftest", is_flag=True,
              help="Skip the start-up self-test against the export's fp32 reference embeddings (not advised).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True)
@user_errors
def main(engine_dir, model_name, checkpoint, gate, backend, precision, device, index_path, host, port, max_batch,
         max_wait_ms, max_queue, request_timeout, decode_workers, cache_size, max_body_mb, max_pixels, max_items,
         max_text_chars, no_selftest, log_level) -> None:
    """Serve embeddings and search over HTTP: native routes, OpenAI-compatible /v1/embeddings, /healthz, /readyz,
    /metrics and a search page at /. OpenAPI docs at /docs.

    The service is ready (/readyz 200) once the engine is loaded, warmed and has reproduced the fp32 reference
    embeddings of the export's self-test probes within its precision's tolerance; if it does not, it stays
    not-ready and logs one line with the cosine.
    """
    require_serve_dependencies()
    import uvicorn

    if engine_dir is None and not (model_name or checkpoint):
        raise PriorCLIPError("give an engine: --engine EXPORT_DIR, or --model NAME and/or --checkpoint FILE")
    if max_items > max_queue:
        raise PriorCLIPError(f"--max-items {max_items} is over --max-queue {max_queue}: such a request could never "
                             "be admitted")
    if engine_dir is not None and (backend or precision):
        raise PriorCLIPError(f"--{'backend' if backend else 'precision'} does not apply to --engine: an export runs "
                             "on its own runtime at its own precision (re-export to change them)")
    mask_padding = bool(click.get_current_context().meta.get(MASK_PADDING_KEY))
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    dev = resolve_device(device)
    service = build_service(
        engine_dir=engine_dir, model_name=model_name, checkpoint=checkpoint, gate=gate, mask_padding=mask_padding,
        backend=backend or "torch", precision=precision or "fp32", device=dev, index=index_path,
        limits=Limits(max_body_bytes=int(max_body_mb * (1 << 20)), max_pixels=max_pixels, max_items=max_items,
                      max_text_chars=max_text_chars),
        batching=BatchingOptions(max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue,
                                 request_timeout_s=request_timeout, decode_workers=decode_workers,
                                 cache_size=cache_size),
        selftest=not no_selftest)
    from .app import create_app

    service.start()
    try:
        uvicorn.run(create_app(service), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    finally:
        service.stop()
