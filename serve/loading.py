"""One way to get the engine a service or an index runs: an export directory, or a model (registered name and/or
checkpoint) on one of :data:`priorclip.serve.engines.BACKENDS`.

:class:`LoadedEngine` carries what the tools around the engine need: the model config (its preprocessing), an
``identity`` that says which weights made an embedding (:func:`priorclip.provenance.engine_identity`), and the
fp32 torch model when it was built here (the service's self-test reference).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from priorclip.errors import PriorCLIPError
from priorclip.provenance import checkpoint_sha256, engine_identity


@dataclass
class LoadedEngine:
    engine: Any  # encode_images / encode_texts / image_size / context_length / precision / device
    config: Any  # the model config (priorclip.config)
    identity: dict  # model, config digest, checkpoint digest: equal identities embed into the same space
    source: dict  # how it was loaded, for /v1/models and the logs
    model: Any = None  # the fp32 torch model (on CPU), when built here
    manifest: dict | None = None  # the export manifest, when loaded from an export directory
    name: str = field(default="")

    @property
    def embed_dim(self) -> int:
        return int(self.config.embed_dim)


def load_engine(*, engine_dir: str | Path | None = None, model_name: str | None = None,
                checkpoint: str | Path | None = None, gate: str | None = None, mask_padding: bool = False,
                backend: str = "torch", precision: str = "fp32", device: str = "cpu", **options: Any) -> LoadedEngine:
    """The engine of an export directory (``engine_dir``; ONNX Runtime, AOTInductor or TensorRT as its manifest says)
    or of a model built from ``model_name`` / ``checkpoint`` (random weights, seed 0, without a checkpoint) on
    ``backend`` at ``precision`` (``gate`` / ``mask_padding``: config overrides, as the CLIs' options). ``options``
    go to the backend (:func:`~priorclip.serve.engines.create_engine`).

    Raises :class:`PriorCLIPError` in one line for a bad directory, an unknown model or backend, or a precision the
    backend does not run there.
    """
    if engine_dir is not None:
        if model_name or checkpoint or gate or mask_padding:
            raise PriorCLIPError("give either an export directory (--engine) or a model (--model/--checkpoint), "
                                 "not both: an export carries its own model")
        from priorclip.export.engines import open_engine, read_manifest

        manifest = read_manifest(engine_dir)
        engine = open_engine(engine_dir, device=device, **options)
        cfg = engine.config
        identity = engine_identity(cfg, manifest.get("checkpoint", {}).get("sha256") or "unknown")
        source = {"engine_dir": str(engine_dir), "format": manifest.get("format"),
                  "precision": manifest.get("precision")}
        name = f"{cfg.name}:{manifest.get('format')}-{manifest.get('precision')}"
        return LoadedEngine(engine, cfg, identity, source, None, manifest, name)

    import torch

    from priorclip.checkpoint import read_checkpoint
    from priorclip.cliutils import RANDOM_INIT_SEED
    from priorclip.registry import create_model

    from .engines import create_engine

    ckpt = read_checkpoint(checkpoint) if checkpoint is not None else None  # read once: the check and the load
    overrides = _overrides(model_name, ckpt, gate, mask_padding)
    if ckpt is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = create_model(model_name, **overrides)
    else:
        model = create_model(model_name, checkpoint=ckpt, **overrides)
    model.eval()
    cfg = model.cfg
    reference = model
    if torch.device(device).type != "cpu" or precision != "fp32" or backend != "torch":
        import copy

        reference = copy.deepcopy(model)  # the engine may move or cast its model; the reference stays CPU fp32
    engine = create_engine(backend, model, precision, device, **options)
    identity = engine_identity(cfg, checkpoint_sha256(checkpoint))
    source = {"model": cfg.name, "checkpoint": str(checkpoint) if checkpoint else None, "backend": backend,
              "precision": precision, "device": str(device)}
    return LoadedEngine(engine, cfg, identity, source, reference, None, f"{cfg.name}:{backend}-{precision}")


def _overrides(model_name: str | None, ckpt, gate: str | None, mask_padding: bool) -> dict[str, Any]:
    """Config overrides; each belongs to one model family and is refused for the other in one line."""
    overrides: dict[str, Any] = {}
    if not (gate or mask_padding):
        return overrides
    from priorclip.config import FAMILY_PIR
    from priorclip.registry import model_config

    cfg = model_config(model_name, ckpt)
    pir = cfg.family == FAMILY_PIR
    if gate:
        if pir:
            raise PriorCLIPError(f"--gate does not apply to model {cfg.name!r} (PIR)")
        overrides["gate"] = gate
    if mask_padding:
        if not pir:
            raise PriorCLIPError(f"--mask-padding does not apply to model {cfg.name!r} (open-domain PriorCLIP)")
        overrides["mask_padding"] = True
    return overrides
