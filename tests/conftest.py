"""Shared fixtures: the independent open_clip reference, the real-data folder, and test markers."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run under the interpreter (tests/kernels). The variable must be set before
# anything imports triton.language (torch.compile's inductor does, from any test), so it is set here, first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
AID_RSICD = REPO.parent / "shared" / "data" / "aid-rsicd"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_data = pytest.mark.skip(reason=f"real data not found at {AID_RSICD}")
    # Compiles (torch.compile, AOTInductor) and full-config exports take one to several minutes each on two cores
    # with a cold compiler cache, as CI has: they run with PRIORCLIP_SLOW=1 (and on the GPU queue), not in plain pytest.
    skip_slow = pytest.mark.skip(reason="slow test: set PRIORCLIP_SLOW=1 to run it")
    run_slow = os.environ.get("PRIORCLIP_SLOW") == "1"
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "data" in item.keywords and not (AID_RSICD / "dataset_rsicd_aid.json").is_file():
            item.add_marker(skip_data)


def load_open_clip():
    """Import open_clip's model, ModifiedResNet and tokenizer modules without its package __init__.

    The package __init__ imports torchvision, which has no CPU build here; these modules do not need it except for a
    class used only for freezing, which gets a stand-in (shared/FACTS.md). Returns None when open_clip is absent.
    """
    if "open_clip.model" in sys.modules:
        return sys.modules["open_clip"]
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    pkg = types.ModuleType("open_clip")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["open_clip"] = pkg
    # open_clip.model imports transformers, which asks importlib whether torchvision exists: let it ask before the
    # stand-in below is registered (a module without a spec makes that question raise), whatever ran first
    if importlib.util.find_spec("transformers") is not None:
        import transformers  # noqa: F401
    try:
        import torchvision.ops.misc  # noqa: F401  (present on GPU machines)
    except Exception:
        for name in ("torchvision", "torchvision.ops", "torchvision.ops.misc"):
            mod = types.ModuleType(name)
            mod.__path__ = []
            sys.modules[name] = mod
        sys.modules["torchvision.ops.misc"].FrozenBatchNorm2d = type("FrozenBatchNorm2d", (), {})
    import open_clip.model  # noqa: F401
    import open_clip.modified_resnet  # noqa: F401
    import open_clip.tokenizer  # noqa: F401

    pkg.config_dir = Path(spec.submodule_search_locations[0]) / "model_configs"
    return pkg


@pytest.fixture(scope="session")
def open_clip():
    oc = load_open_clip()
    if oc is None:
        pytest.skip("open-clip-torch is not installed (pip install --no-deps open-clip-torch==3.3.0)")
    return oc


@pytest.fixture(scope="session")
def open_clip_vit_b32_cfg(open_clip):
    return json.loads((open_clip.config_dir / "ViT-B-32.json").read_text())


@pytest.fixture(scope="session")
def aid_rsicd():
    if not (AID_RSICD / "dataset_rsicd_aid.json").is_file():
        pytest.skip(f"real data not found at {AID_RSICD}")
    return AID_RSICD


@pytest.fixture
def seed():
    torch.manual_seed(0)
    return 0


@pytest.fixture
def fake_cuda_graphs(monkeypatch) -> dict:
    """torch.cuda's graph API replaced by recording stand-ins, so a fused engine's capture/replay path
    (serve/cuda_graphs.py) runs without a GPU. A replay does not re-run the captured work: outputs stay the capture's.
    Returns the counts {"captures", "replays"}; captures record the pool they were given under "pools"."""
    from contextlib import contextmanager, nullcontext

    log = {"captures": 0, "replays": 0, "pools": []}

    class Graph:
        def replay(self):
            log["replays"] += 1

    @contextmanager
    def graph(g, pool=None):
        assert isinstance(g, Graph)
        log["captures"] += 1
        log["pools"].append(pool)
        yield

    class Stream:
        def __init__(self, device=None):
            pass

        def wait_stream(self, other):
            pass

    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: nullcontext())
    return log
