"""A small generated remote-sensing-like retrieval set: the embedded default for demos, tests and benchmarks.

Each image is a textured "scene" (one of a few classes, e.g. a lake, a farmland grid, a road crossing) with a
coloured object; its five captions describe the scene, the object's colour and where it is. File names carry the
class prefix (``lake_12.jpg``) as the real RS datasets do, so affiliation labels work on it too. Written as a
Karpathy-style JSON plus an image folder, i.e. exactly what ``priorclip eval --dataset`` reads.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SCENES = ("lake", "farmland", "forest", "road", "residential", "desert")
COLORS = {"red": (200, 40, 40), "white": (235, 235, 235), "blue": (40, 70, 200), "yellow": (220, 200, 40)}
PLACES = ("top left", "top right", "bottom left", "bottom right", "center")
_PLACE_XY = {"top left": (0.25, 0.25), "top right": (0.75, 0.25), "bottom left": (0.25, 0.75), "bottom right": (0.75, 0.75), "center": (0.5, 0.5)}


def _scene(kind: str, size: int, rng: np.random.Generator) -> Image.Image:
    base = {"lake": (60, 110, 90), "farmland": (120, 140, 60), "forest": (30, 80, 40), "road": (120, 120, 110), "residential": (150, 140, 130), "desert": (210, 180, 130)}[kind]
    arr = np.clip(np.array(base, dtype=np.float32) + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr)
    d = ImageDraw.Draw(img)
    s = size
    if kind == "lake":
        d.ellipse([s * 0.2, s * 0.25, s * 0.8, s * 0.75], fill=(30, 60, 140))
    elif kind == "farmland":
        for i in range(0, s, max(4, s // 8)):
            d.rectangle([i, 0, i + s // 16, s], fill=(90 + (i % 3) * 30, 120, 50))
    elif kind == "forest":
        for _ in range(30):
            x, y = rng.integers(0, s, 2)
            d.ellipse([x - s // 20, y - s // 20, x + s // 20, y + s // 20], fill=(20, 60 + int(rng.integers(0, 40)), 25))
    elif kind == "road":
        d.rectangle([s * 0.45, 0, s * 0.55, s], fill=(70, 70, 70))
        d.rectangle([0, s * 0.45, s, s * 0.55], fill=(70, 70, 70))
    elif kind == "residential":
        for i in range(4):
            for j in range(4):
                d.rectangle([s * (0.05 + 0.25 * i), s * (0.05 + 0.25 * j), s * (0.2 + 0.25 * i), s * (0.2 + 0.25 * j)], fill=(170, 90, 70))
    return img


def make_sample(out_dir: str | Path, n_images: int = 64, size: int = 160, seed: int = 0, split: str = "test") -> tuple[Path, Path]:
    """Write ``n_images`` scenes with 5 captions each; returns (dataset JSON path, image folder)."""
    out_dir = Path(out_dir)
    img_dir = out_dir / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    entries = []
    for i in range(n_images):
        kind = SCENES[i % len(SCENES)]
        color = list(COLORS)[int(rng.integers(len(COLORS)))]
        place = PLACES[int(rng.integers(len(PLACES)))]
        img = _scene(kind, size, rng)
        cx, cy = _PLACE_XY[place]
        r = size * 0.08
        ImageDraw.Draw(img).rectangle([cx * size - r, cy * size - r, cx * size + r, cy * size + r], fill=COLORS[color])
        name = f"{kind}_{i}.jpg"
        img.save(img_dir / name, quality=92)
        sentences = [
            f"a {color} building at the {place} of a {kind} area",
            f"there is a {color} roof in the {place} of the {kind}",
            f"an aerial view of {kind} with a {color} object",
            f"{kind} scene, {color} square near the {place}",
            f"satellite image of a {kind} region and a small {color} structure",
        ]
        entries.append({"filename": name, "split": split, "label": kind, "sentences": [{"raw": s} for s in sentences]})
    json_path = out_dir / "dataset.json"
    json_path.write_text(json.dumps({"dataset": "priorclip-synthetic", "images": entries}, indent=1), encoding="utf-8")
    return json_path, img_dir
