"""Model configuration: one frozen dataclass per concern, nested in :class:`ModelConfig`.

Field names follow the reference code (open_clip's ``vision_cfg`` / ``text_cfg`` and PriorCLIP's ``res_layers`` /
``res_width``) so a config can be read next to ``PIR.json`` without a dictionary.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# The two gate formulas of the reference code (spec §2A.4). Which one a released checkpoint was trained with is not
# recorded, so it is a config field rather than a constant.
GATE_BELIEF_PLUS_RANK = "belief+rank"  # g = belief + rank-slot index weight (code after 2024-10-16)
GATE_DOUBLE_BELIEF = "2belief"  # g = 2 * belief (code before 2024-10-16)
GATES = (GATE_BELIEF_PLUS_RANK, GATE_DOUBLE_BELIEF)


@dataclass(frozen=True)
class VisionConfig:
    """CLIP ViT image tower (open_clip ``vision_cfg``)."""

    image_size: int = 224
    patch_size: int = 32
    width: int = 768
    layers: int = 12
    head_width: int = 64
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        _positive(self, "image_size", "patch_size", "width", "layers", "head_width")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.head_width:
            raise ValueError(f"vision width {self.width} is not a multiple of head_width {self.head_width}")

    @property
    def heads(self) -> int:
        return self.width // self.head_width

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Tokens after the stem: CLS plus patches (50 for ViT-B/32 at 224)."""
        return self.grid**2 + 1


@dataclass(frozen=True)
class PriorConfig:
    """CLIP-style ModifiedResNet prior ("instruction encoder"); its output width is the model's ``embed_dim``."""

    layers: tuple[int, int, int, int] = (3, 4, 6, 3)  # res_layers
    width: int = 64  # res_width
    head_width: int = 64

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(n) for n in self.layers))
        if len(self.layers) != 4 or min(self.layers) < 1:
            raise ValueError(f"prior layers must be four positive block counts, got {self.layers}")
        _positive(self, "width", "head_width")
        if (self.width * 32) % self.head_width:
            raise ValueError("prior width*32 must be a multiple of head_width")

    @property
    def heads(self) -> int:
        return self.width * 32 // self.head_width


@dataclass(frozen=True)
class TextConfig:
    """CLIP text transformer (open_clip ``text_cfg``)."""

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        _positive(self, "context_length", "vocab_size", "width", "heads", "layers")
        if self.width % self.heads:
            raise ValueError(f"text width {self.width} is not a multiple of heads {self.heads}")


@dataclass(frozen=True)
class ModelConfig:
    """A whole open-domain model. ``prior=None`` gives a plain CLIP (no prior token, no gate, CLS pooling)."""

    name: str
    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    prior: PriorConfig | None = field(default_factory=PriorConfig)
    text: TextConfig = field(default_factory=TextConfig)
    gate: str = GATE_BELIEF_PLUS_RANK
    init_logit_scale: float = 2.659260036932778  # ln(1/0.07)

    def __post_init__(self) -> None:
        if self.gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {self.gate!r}")
        _positive(self, "embed_dim")
        if self.prior is not None and self.vision.image_size % 32:
            raise ValueError("the ModifiedResNet prior needs an image_size that is a multiple of 32")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["prior"] is not None:
            d["prior"]["layers"] = list(d["prior"]["layers"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config fields: {sorted(unknown)}")
        d = dict(d)
        d["vision"] = VisionConfig(**d.get("vision", {}))
        d["text"] = TextConfig(**d.get("text", {}))
        if d.get("prior", {}) is not None:
            d["prior"] = PriorConfig(**d.get("prior", {}))
        return cls(**d)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def _positive(obj: Any, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{type(obj).__name__}.{n} must be a positive integer, got {v!r}")
