"""Validation of a Triton Inference Server model repository, as Triton's loader would judge it.

:func:`validate_repository` parses every ``config.pbtxt`` into Triton's ``ModelConfig`` (``tritonclient``'s
``model_config_pb2``: unknown fields and bad enums fail) and adds the checks Triton's loader makes beyond the schema
(triton-inference-server/core ``model_config_utils.cc`` and ``ensemble_utils.cc``; the ONNX Runtime backend's
graph/config and TensorRT-parameter checks), re-implemented here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .api import ExportError

VALIDATE_HINT = "pip install 'tritonclient[grpc]'"
_ONNX_TO_TRITON = {1: "TYPE_FP32", 10: "TYPE_FP16", 16: "TYPE_BF16", 7: "TYPE_INT64", 6: "TYPE_INT32",
                   3: "TYPE_INT8", 2: "TYPE_UINT8", 9: "TYPE_BOOL", 11: "TYPE_FP64"}


@dataclass(frozen=True)
class Tensor:
    """One config input/output: its name, Triton data type and dims without the batch axis (-1: variable)."""

    name: str
    dtype: str
    dims: tuple[int, ...]


def graph_io(path: str | Path) -> tuple[list[Tensor], list[Tensor], bool]:
    """(inputs, outputs, batch axis is dynamic) of an ONNX graph, as Triton config tensors (batch axis dropped)."""
    import onnx

    graph = onnx.load_model(str(path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}

    def tensor(v) -> tuple[Tensor, bool]:
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        return Tensor(v.name, _ONNX_TO_TRITON.get(t.elem_type, f"onnx elem_type {t.elem_type}"), tuple(dims[1:])), \
            bool(dims) and dims[0] == -1

    ins = [tensor(v) for v in graph.input if v.name not in initializers]
    outs = [tensor(v) for v in graph.output]
    return [t for t, _ in ins], [t for t, _ in outs], all(b for _, b in ins + outs)


def external_files(graph: Path) -> list[str]:
    import onnx

    model = onnx.load_model(str(graph), load_external_data=False)
    return sorted({e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"})


class ValidationUnavailable(ExportError):
    """Triton's model-config schema (``tritonclient``) is not installed, so nothing was validated."""




DEFAULT_FILES = {"onnxruntime": "model.onnx", "python": "model.py", "tensorrt": "model.plan",
                 "pytorch": "model.pt"}
PLATFORM_BACKEND = {"onnxruntime_onnx": "onnxruntime", "tensorrt_plan": "tensorrt", "pytorch_libtorch": "pytorch"}
# The TensorRT execution-accelerator parameters Triton's ONNX Runtime backend accepts (src/onnxruntime.cc); any
# other key fails the model load.
ORT_TRT_PARAMETERS = frozenset({
    "precision_mode", "max_workspace_size_bytes", "trt_max_partition_iterations", "trt_min_subgraph_size",
    "int8_calibration_table_name", "int8_use_native_calibration_table", "trt_dla_enable", "trt_dla_core",
    "trt_engine_cache_enable", "trt_engine_cache_path", "trt_engine_cache_prefix", "trt_dump_subgraphs",
    "trt_force_sequential_engine_build", "trt_context_memory_sharing_enable", "trt_layer_norm_fp32_fallback",
    "trt_timing_cache_enable", "trt_timing_cache_path", "trt_force_timing_cache", "trt_detailed_build_log",
    "trt_build_heuristics_enable", "trt_sparsity_enable", "trt_builder_optimization_level", "trt_auxiliary_streams",
    "trt_tactic_sources", "trt_extra_plugin_lib_paths", "trt_profile_min_shapes", "trt_profile_max_shapes",
    "trt_profile_opt_shapes", "trt_cuda_graph_enable", "trt_dump_ep_context_model", "trt_ep_context_file_path",
    "trt_ep_context_embed_mode"})
TRT_PRECISION_MODES = ("FP32", "FP16", "BF16", "INT8")


def validate_repository(path: str | Path, models: list[str] | None = None) -> list[str]:
    """Problems Triton would refuse ``path``'s models for (empty: valid); ``models`` limits the report to those.

    Raises :class:`ValidationUnavailable` when ``tritonclient`` (the schema) is not installed.
    """
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2 as mc
    except ImportError as e:
        raise ValidationUnavailable(f"the Triton repository was not validated: tritonclient is not installed ({e}); "
                                    f"{VALIDATE_HINT}") from None
    root = Path(path)
    if not root.is_dir():
        return [f"{root}: not a folder"]
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    configs, problems = {}, []
    for name in folders:
        file = root / name / "config.pbtxt"
        if not file.is_file():
            problems.append(f"{name}: no config.pbtxt")
            continue
        try:
            configs[name] = text_format.Parse(file.read_text(encoding="utf-8"), mc.ModelConfig())
        except text_format.ParseError as e:
            problems.append(f"{name}/config.pbtxt: {e}")
    for name, config in configs.items():
        found = _check_model(config, root / name, mc)
        if config.platform == "ensemble" and not found:
            found = _check_ensemble(config, configs, root, mc)
        problems += [f"{name}/config.pbtxt: {p}" for p in found]
    wanted = folders if models is None else models
    missing = [m for m in wanted if m not in folders]
    return [f"{m}: no such model folder" for m in missing] + \
        [p for p in problems if p.split("/", 1)[0].split(":", 1)[0] in wanted]


def _versions(folder: Path) -> list[int]:
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def _check_io(config, mc) -> list[str]:
    out = []
    for kind, tensors in (("input", config.input), ("output", config.output)):
        names = [t.name for t in tensors]
        out += [f"{kind} '{n}' is declared twice" for n in sorted({n for n in names if names.count(n) > 1})]
        for t in tensors:
            if not t.name:
                out.append(f"an {kind} has no name")
            if t.data_type == mc.TYPE_INVALID:
                out.append(f"{kind} '{t.name}' must specify data_type")
            if not t.dims:
                out.append(f"{kind} '{t.name}' must specify dims")
            if any(d < 1 and d != -1 for d in t.dims):
                out.append(f"{kind} '{t.name}' dims {list(t.dims)}: each must be >= 1, or -1 (variable)")
    return out


def _check_model(config, folder: Path, mc) -> list[str]:
    """Triton's ValidateModelConfig / instance-group / file checks for one model (ensemble data flow apart)."""
    out = []
    if config.name != folder.name:
        out.append(f"name '{config.name}' is not the folder name '{folder.name}'")
    ensemble = config.platform == "ensemble"
    backend = config.backend or PLATFORM_BACKEND.get(config.platform, "")
    if ensemble and config.backend:
        out.append("an ensemble must have platform 'ensemble' and no backend")
    elif not ensemble and not backend:
        out.append(f"unknown platform '{config.platform}'" if config.platform else "must specify platform or backend")
    elif config.platform in PLATFORM_BACKEND and config.backend and config.backend != PLATFORM_BACKEND[config.platform]:
        out.append(f"platform '{config.platform}' does not go with backend '{config.backend}'")
    if config.HasField("ensemble_scheduling") != ensemble:
        out.append("ensemble_scheduling belongs to platform 'ensemble' models only" if not ensemble else
                   "an ensemble must set ensemble_scheduling")
    if ensemble:
        out += [f"{f} must not be set for an ensemble" for f, bad in
                (("instance_group", len(config.instance_group)), ("optimization", config.HasField("optimization")),
                 ("model_warmup", len(config.model_warmup))) if bad]
    if config.max_batch_size < 0:
        out.append(f"max_batch_size {config.max_batch_size} must be >= 0")
    for size in config.dynamic_batching.preferred_batch_size:
        if size <= 0 or size > config.max_batch_size:
            out.append(f"preferred_batch_size {size} must be in [1, max_batch_size {config.max_batch_size}]")
    for group in config.instance_group:
        if group.kind == mc.ModelInstanceGroup.KIND_CPU and group.gpus:
            out.append("an instance group of kind KIND_CPU lists GPUs")
    out += _check_io(config, mc)
    versions = _versions(folder)
    if not versions:
        return out + ["no numeric version folder (e.g. 1/)"]
    filename = config.default_model_filename or DEFAULT_FILES.get(backend)
    if not ensemble and filename:
        path = folder / str(versions[-1]) / filename
        if path.is_dir() and backend == "onnxruntime":
            path = path / "model.onnx"  # a large ONNX model may be a folder holding model.onnx
        if not path.is_file():
            out.append(f"version {versions[-1]} has no {filename} (the {backend} backend's model file)")
        elif backend == "onnxruntime":
            out += _check_onnx(config, path, mc)
    if backend == "onnxruntime":
        out += _check_ort_accelerators(config)
    return out


def _check_onnx(config, path: Path, mc) -> list[str]:
    """What the ONNX Runtime backend checks at load: the graph's inputs all configured, configured outputs in the
    graph, matching types and dims, a dynamic batch axis where the model batches, and its external data present."""
    try:
        ins, outs, dynamic = graph_io(path)
        data = external_files(path)
    except ImportError:
        return []  # onnx not installed: the schema checks still ran
    except Exception as e:  # a damaged graph
        return [f"{path.name}: not a readable ONNX graph ({type(e).__name__}: {e})"]
    out = [f"{path.name}: external data file {d} is missing" for d in data if not (path.parent / d).is_file()]
    if config.max_batch_size > 0 and not dynamic:
        out.append(f"max_batch_size {config.max_batch_size} but {path.name} has a fixed batch axis")
    graph = {"input": {t.name: t for t in ins}, "output": {t.name: t for t in outs}}
    declared = {t.name for t in config.input}
    out += [f"graph input '{n}' is not declared in the config" for n in graph["input"] if n not in declared]
    for kind, tensors in (("input", config.input), ("output", config.output)):
        for t in tensors:
            g = graph[kind].get(t.name)
            if g is None:
                out.append(f"{kind} '{t.name}' is not an {kind} of {path.name}")
                continue
            dtype = mc.DataType.Name(t.data_type)
            if dtype != g.dtype:
                out.append(f"{kind} '{t.name}' is {dtype} but {path.name} has {g.dtype}")
            if not _dims_match(tuple(t.dims), g.dims):
                out.append(f"{kind} '{t.name}' dims {list(t.dims)} but {path.name} has {list(g.dims)}")
    return out


def _check_ort_accelerators(config) -> list[str]:
    out = []
    for acc in config.optimization.execution_accelerators.gpu_execution_accelerator:
        if acc.name != "tensorrt":
            continue
        out += [f"tensorrt accelerator parameter '{k}' is unknown to the ONNX Runtime backend"
                for k in acc.parameters if k not in ORT_TRT_PARAMETERS]
        mode = acc.parameters.get("precision_mode")
        if mode is not None and mode not in TRT_PRECISION_MODES:
            out.append(f"tensorrt precision_mode '{mode}' is not one of {', '.join(TRT_PRECISION_MODES)}")
    return out


def _dims_match(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return len(a) == len(b) and all(x == y or x == -1 or y == -1 for x, y in zip(a, b))


def _check_ensemble(config, configs: dict, root: Path, mc) -> list[str]:
    """Triton's ensemble checks: steps name models of the repository, every step input mapped once and every map
    naming a real tensor with consistent type and shape, batch sizes that fit, and a data flow from the ensemble's
    inputs to each of its outputs with no unused tensor."""
    out = []
    batching = config.max_batch_size > 0
    # tensor -> (where it was inferred, dtype, dims, dims with the batch axis)
    tensors: dict[str, tuple[str, int, tuple, tuple]] = {}

    def node(where, t, batch):
        return where, t.data_type, tuple(t.dims), ((-1,) if batch else ()) + tuple(t.dims)

    def consistent(name, a, b):
        if a[1] != b[1]:
            out.append(f"ensemble tensor '{name}': {mc.DataType.Name(a[1])} from {a[0]} but "
                       f"{mc.DataType.Name(b[1])} from {b[0]}")
        elif not (_dims_match(a[2], b[2]) or _dims_match(a[3], b[3])):
            out.append(f"ensemble tensor '{name}': shape {list(a[3])} from {a[0]} but {list(b[3])} from {b[0]}")

    for t in config.input:
        tensors[t.name] = node("the ensemble input", t, batching)
    produced: dict[str, int] = {}
    edges: list[tuple[list[str], list[str]]] = []
    if not config.ensemble_scheduling.step:
        return ["an ensemble needs at least one step"]
    for i, step in enumerate(config.ensemble_scheduling.step):
        where = f"step {i} ({step.model_name or '?'})"
        if not step.model_name:
            out.append(f"step {i} has no model_name")
            continue
        model = configs.get(step.model_name)
        if model is None:
            out.append(f"{where}: model '{step.model_name}' has no valid config" if (root / step.model_name).is_dir()
                       else f"{where}: no model '{step.model_name}' in the repository")
            continue
        if step.model_version != -1 and step.model_version not in _versions(root / step.model_name):
            out.append(f"{where}: model '{step.model_name}' has no version {step.model_version}")
        if not step.input_map or not step.output_map:
            out.append(f"{where}: must set input_map and output_map")
        if model.max_batch_size and model.max_batch_size < config.max_batch_size:
            out.append(f"{where}: max_batch_size {config.max_batch_size} exceeds the {model.max_batch_size} of "
                       f"'{model.name}'")
        step_batch = model.max_batch_size > 0
        inputs = {t.name: t for t in model.input}
        outputs = {t.name: t for t in model.output}
        for key, tensor in step.input_map.items():
            if key not in inputs:
                out.append(f"{where}: input_map key '{key}' is not an input of '{model.name}'")
            elif tensor in tensors:
                consistent(tensor, tensors[tensor], node(f"'{model.name}' input '{key}'", inputs[key], step_batch))
            else:
                tensors[tensor] = node(f"'{model.name}' input '{key}'", inputs[key], step_batch)
        out += [f"{where}: input '{n}' of '{model.name}' is not mapped" for n, t in inputs.items()
                if n not in step.input_map and not t.optional]
        for key, tensor in step.output_map.items():
            if key not in outputs:
                out.append(f"{where}: output_map key '{key}' is not an output of '{model.name}'")
                continue
            produced[tensor] = produced.get(tensor, 0) + 1
            if produced[tensor] > 1:
                out.append(f"{where}: ensemble tensor '{tensor}' is written by more than one output")
            here = node(f"'{model.name}' output '{key}'", outputs[key], step_batch)
            if tensor in tensors:
                consistent(tensor, tensors[tensor], here)
            else:
                tensors[tensor] = here
        edges.append((list(step.input_map.values()), list(step.output_map.values())))
    for t in config.output:
        if t.name in tensors:
            consistent(t.name, node("the ensemble output", t, batching), tensors[t.name])
    out += _check_flow(config, edges)
    return out


def _check_flow(config, edges: list[tuple[list[str], list[str]]]) -> list[str]:
    ready = {t.name for t in config.input}
    changed = True
    while changed:  # a step runs once all its inputs are ready
        changed = False
        for ins, outs in edges:
            if all(i in ready for i in ins) and not set(outs) <= ready:
                ready |= set(outs)
                changed = True
    consumed = {i for ins, _ in edges for i in ins}
    outputs = {t.name for t in config.output}
    out = [f"ensemble input '{t.name}' is not used by any step" for t in config.input if t.name not in consumed]
    out += [f"ensemble output '{n}' is never written" for n in sorted(outputs - ready)]
    made = {o for _, outs in edges for o in outs}
    out += [f"ensemble tensor '{n}' is unused" for n in sorted(made - consumed - outputs)]
    return out
