"""One CUDA graph per input shape, captured on first use and replayed after: what the fused engines run under.

Small batches of PIR's and PriorCLIP's towers are launch bound (hundreds of short kernels); a replayed graph pays
one launch. Inputs are copied into the graph's static tensors, and outputs are cloned because the next replay
overwrites them.
"""

from __future__ import annotations

from typing import Callable

import torch


class GraphCache:
    """``run(key, fn, *inputs)``: ``fn(*inputs)`` (a tuple of tensors or None), through a CUDA graph per ``key``
    when ``enabled`` (on CUDA), directly otherwise and for empty batches."""

    def __init__(self, device: torch.device, enabled: bool) -> None:
        self.device = device
        self.enabled = bool(enabled and device.type == "cuda")
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, tuple, tuple]] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.enabled else None

    def run(self, key: tuple, fn: Callable[..., tuple], *inputs: torch.Tensor) -> tuple:
        if not self.enabled or inputs[0].shape[0] == 0:
            return fn(*inputs)
        entry = self._graphs.get(key)
        if entry is None:
            static_in = tuple(x.clone() for x in inputs)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # warm-up outside capture: Triton compiles, cuBLAS workspaces
                for _ in range(3):
                    fn(*static_in)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                static_out = fn(*static_in)
            entry = self._graphs[key] = (graph, static_in, static_out)
        graph, static_in, static_out = entry
        for dst, src in zip(static_in, inputs):
            dst.copy_(src)
        graph.replay()
        return tuple(None if o is None else o.clone() for o in static_out)  # the next replay overwrites them


class GraphedImageEncoder:
    """The image half of a fused engine's Encoder API: pixels checked, moved to the engine's device and dtype, and
    run through ``self._image_forward`` (returning (embeddings, order | None)) under ``self._graphs``."""

    image_size: int
    device: torch.device
    dtype: torch.dtype
    _graphs: GraphCache

    def _image_forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    @torch.inference_mode()
    def encode_images_with_order(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[B, 3, S, S] pixels -> (embeddings [B, E] float32, belief order [B, T] int64 | None)."""
        s = self.image_size
        if pixels.dim() != 4 or pixels.shape[1] != 3 or pixels.shape[2] != s or pixels.shape[3] != s:
            raise ValueError(f"encode_images expects pixels [B,3,{s},{s}], got {tuple(pixels.shape)}")
        pixels = pixels.to(self.device, self.dtype)
        return self._graphs.run(("image", pixels.shape[0]), self._image_forward, pixels)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encode_images_with_order(pixels)[0]
