"""Model configuration: one frozen dataclass per concern, nested in :class:`ModelConfig`.

Field names follow the reference code (open_clip's ``vision_cfg`` / ``text_cfg`` and PriorCLIP's ``res_layers`` /
``res_width``) so a config can be read next to ``PIR.json`` without a dictionary.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

# The two gate formulas of the reference code (spec §2A.4). Which one a released checkpoint was trained with is not
# recorded, so it is a config field rather than a constant.
GATE_BELIEF_PLUS_RANK = "belief+rank"  # g = belief + rank-slot index weight (code after 2024-10-16)
GATE_DOUBLE_BELIEF = "2belief"  # g = 2 * belief (code before 2024-10-16)
GATES = (GATE_BELIEF_PLUS_RANK, GATE_DOUBLE_BELIEF)

# Model families: the open-domain PriorCLIP (open_clip fork) and the closed-domain PIR of the ACM MM 2023 paper
# (PIR-pytorch). Every config exposes ``vision.image_size``, ``text.context_length`` and ``text.vocab_size``, which
# is all that data loading, export and the engines need to know of a model.
FAMILY_PRIORCLIP = "priorclip"
FAMILY_PIR = "pir"


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

    family: ClassVar[str] = FAMILY_PRIORCLIP
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
        return d  # no "family" key: files written before the closed-domain family read back unchanged

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


# ---------------------------------------------------------------------------------------------- closed-domain PIR


@dataclass(frozen=True)
class SwinConfig:
    """Swin Transformer image tower of PIR (spec §1B); its final-norm tokens get their average prepended as "CLS"."""

    image_size: int = 224
    patch_size: int = 4
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    mlp_ratio: float = 4.0
    drop_path: float = 0.1  # stochastic depth at the last block (linear from 0); off in eval

    def __post_init__(self) -> None:
        object.__setattr__(self, "depths", tuple(int(n) for n in self.depths))
        object.__setattr__(self, "heads", tuple(int(n) for n in self.heads))
        _positive(self, "image_size", "patch_size", "embed_dim", "window_size")
        if not self.depths or len(self.depths) != len(self.heads) or min(self.depths + self.heads) < 1:
            raise ValueError(f"swin depths {self.depths} and heads {self.heads} must be equal-length positive lists")
        if self.image_size % (self.patch_size * 2 ** (len(self.depths) - 1)):
            raise ValueError(f"swin image_size {self.image_size} must be a multiple of patch_size * 2^(stages-1)")
        for i, h in enumerate(self.heads):
            if (self.embed_dim * 2**i) % h:
                raise ValueError(f"swin stage {i} width {self.embed_dim * 2**i} is not a multiple of {h} heads")
        if not 0.0 <= self.drop_path < 1.0:
            raise ValueError(f"swin drop_path must be in [0, 1), got {self.drop_path}")

    @property
    def width(self) -> int:
        """Channels of the last stage (768 for Swin-T)."""
        return self.embed_dim * 2 ** (len(self.depths) - 1)

    @property
    def grid(self) -> int:
        """Side of the last stage's token grid (7 for Swin-T at 224)."""
        return self.image_size // self.patch_size // 2 ** (len(self.depths) - 1)

    @property
    def num_tokens(self) -> int:
        """Tokens out of the tower: the averaged "CLS" plus the last grid (50 for Swin-T at 224)."""
        return self.grid**2 + 1


@dataclass(frozen=True)
class ResNetConfig:
    """torchvision-layout bottleneck ResNet (ResNet-50 by default), fc removed: the global-average-pooled feature."""

    layers: tuple[int, int, int, int] = (3, 4, 6, 3)
    width: int = 64

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(n) for n in self.layers))
        if len(self.layers) != 4 or min(self.layers) < 1:
            raise ValueError(f"resnet layers must be four positive block counts, got {self.layers}")
        _positive(self, "width")

    @property
    def out_dim(self) -> int:
        """Pooled feature width: 8 x width x expansion 4 (2048 for ResNet-50)."""
        return self.width * 32


@dataclass(frozen=True)
class BertConfig:
    """BERT text tower of PIR (the X-VLM copy of Google's BERT: no pooler, TF-style LayerNorm, erf GELU)."""

    vocab_size: int = 30522
    width: int = 768
    layers: int = 12
    heads: int = 12
    intermediate: int = 3072
    max_positions: int = 512
    type_vocab_size: int = 2
    context_length: int = 47  # max_tokens: [CLS] + up to 46 word pieces, no [SEP]
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1

    def __post_init__(self) -> None:
        _positive(self, "vocab_size", "width", "layers", "heads", "intermediate", "max_positions", "type_vocab_size",
                  "context_length")
        if self.width % self.heads:
            raise ValueError(f"bert width {self.width} is not a multiple of heads {self.heads}")
        if self.context_length > self.max_positions:
            raise ValueError(f"bert context_length {self.context_length} exceeds max_positions {self.max_positions}")


@dataclass(frozen=True)
class PIRConfig:
    """The closed-domain PIR model (spec §1B, §2B, §3): Swin + frozen ResNet prior + BERT, VIR and LCA."""

    family: ClassVar[str] = FAMILY_PIR
    name: str
    embed_dim: int = 512
    vision: SwinConfig = field(default_factory=SwinConfig)
    prior: ResNetConfig = field(default_factory=ResNetConfig)
    text: BertConfig = field(default_factory=BertConfig)
    filter_size: int = 40  # VIR keeps the 40 most-believed of the 50 image tokens
    instru_num: int = 2  # VIR repeats (MHSA, CroSA)
    cycle_num: int = 3  # LCA repeats (MHSA, CroSA)
    pae_heads: int = 8
    pae_dropout: float = 0.2
    init_temp: float = 0.07  # contrastive temperature (learnable, unclamped)
    init_temp2: float = 0.07  # affiliation temperature (learnable, unclamped)
    mask_padding: bool = False  # PIR attends to [PAD] tokens (checkpoints were trained so); True masks them

    def __post_init__(self) -> None:
        _positive(self, "embed_dim", "filter_size", "instru_num", "cycle_num", "pae_heads")
        if self.filter_size > self.vision.num_tokens:
            raise ValueError(f"filter_size {self.filter_size} exceeds the {self.vision.num_tokens} image tokens")
        if self.embed_dim % self.pae_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not a multiple of pae_heads {self.pae_heads}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for part, keys in (("vision", ("depths", "heads")), ("prior", ("layers",))):
            for k in keys:
                d[part][k] = list(d[part][k])
        d["family"] = FAMILY_PIR
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PIRConfig:
        d = {k: v for k, v in d.items() if k != "family"}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown PIR config fields: {sorted(unknown)}")
        d["vision"] = SwinConfig(**d.get("vision", {}))
        d["prior"] = ResNetConfig(**d.get("prior", {}))
        d["text"] = BertConfig(**d.get("text", {}))
        return cls(**d)

    def replace(self, **changes: Any) -> PIRConfig:
        return dataclasses.replace(self, **changes)


AnyConfig = ModelConfig | PIRConfig


def config_from_dict(d: dict[str, Any]) -> AnyConfig:
    """A config of either family from its ``to_dict()`` (files without "family" are open-domain)."""
    family = d.get("family", FAMILY_PRIORCLIP)
    if family == FAMILY_PIR:
        return PIRConfig.from_dict(d)
    if family != FAMILY_PRIORCLIP:
        raise ValueError(f"unknown model family {family!r} (known: {FAMILY_PRIORCLIP}, {FAMILY_PIR})")
    return ModelConfig.from_dict({k: v for k, v in d.items() if k != "family"})
