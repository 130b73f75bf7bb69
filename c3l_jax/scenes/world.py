"""The synthetic scenes world: scenes, their rendering and the objects' co-occurrence statistics.

A scene is a small RGB image (default 64 px) with 1-5 objects on a plain background. Each object has a
**shape** (`circle`, `square`, `triangle`, `star`, `cross`), a **colour** (`red`, `green`, `blue`,
`yellow`, `purple`, `orange`), a **size** (`small`, `large`) and a position: the image is a 3 x 3 grid
and every object sits (with jitter) in its own cell, so objects never overlap and "left of", "above",
"in the top left" have exact definitions (`c3l_jax.scenes.checker`). The background is `black`, `gray`
or `white`.

**Category = shape.** `object_names(scene)` lists the shapes present; colour and size are attributes, not
part of the category (so POPE-style existence / hallucination is about shapes; "a green circle" when the
circle is red is a wrong attribute, not a hallucinated object).

**Co-occurrence.** Each scene draws a hidden *theme* that makes some shapes frequent together (star with
circle, square with triangle, cross with circle and square) and each shape has a typical colour (star
yellow, ...), so a model can learn a language prior and hallucinate the usual companion of what it sees.
`cooccurrence(scenes)` returns the statistics; `negative_objects` picks POPE random / popular /
adversarial negatives from them.

The text generators are in `c3l_jax.scenes.text`, the checker in `c3l_jax.scenes.checker`, the tfds
builder in `c3l_jax.scenes.dataset`.
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Iterable
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageDraw

IMAGE_SIZE = 64
SHAPES = ("circle", "square", "triangle", "star", "cross")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES = ("small", "large")
BACKGROUNDS = ("black", "gray", "white")
GRID = 3

RGB = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 90, 235),
    "yellow": (245, 215, 30),
    "purple": (150, 60, 200),
    "orange": (250, 140, 20),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "white": (240, 240, 240),
}
SIZE_FRACTION = {"small": 0.19, "large": 0.30}
"""Object extent as a fraction of the image side (a cell is 1/3)."""

THEMES: dict[str, dict[str, float]] = {
    "night": {"star": 6.0, "circle": 4.0},
    "blocks": {"square": 6.0, "triangle": 4.0},
    "signs": {"cross": 6.0, "circle": 3.0, "square": 1.5},
    "mixed": {},
}
"""Shape weights per theme; shapes not listed weigh `_THEME_BASE`."""
_THEME_BASE = 0.5
TYPICAL_COLOUR = {"star": "yellow", "circle": "red", "square": "blue", "triangle": "green", "cross": "purple"}
_P_TYPICAL_COLOUR = 0.5
_NUM_OBJECTS_P = (0.15, 0.3, 0.3, 0.15, 0.1)  # 1..5 objects


# ----------------------------------------------------------------------------------------- scenes


@dataclasses.dataclass(frozen=True)
class SceneObject:
  """One object. `x`, `y`: centre as a fraction of the image side (0 = left / top)."""

  shape: str
  colour: str
  size: str
  x: float
  y: float

  @property
  def row(self) -> int:
    return min(GRID - 1, int(self.y * GRID))

  @property
  def col(self) -> int:
    return min(GRID - 1, int(self.x * GRID))

  @property
  def cell(self) -> tuple[int, int]:
    return self.row, self.col


@dataclasses.dataclass(frozen=True)
class Scene:
  """A scene: the ground-truth annotation of one image."""

  image_id: int
  file_name: str
  background: str
  objects: list[SceneObject]
  theme: str = "mixed"

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), sort_keys=True)

  @classmethod
  def from_json(cls, text: str) -> "Scene":
    d = json.loads(text)
    return cls(
        image_id=int(d["image_id"]), file_name=d["file_name"], background=d["background"],
        objects=[SceneObject(**o) for o in d["objects"]], theme=d.get("theme", "mixed"))


def file_name_for(image_id: int) -> str:
  return f"scene_{image_id:06d}.png"


def make_scene(rng: np.random.Generator, image_id: int = 0) -> Scene:
  """Samples one scene: a theme, 1-5 objects in distinct grid cells, correlated shapes and colours."""
  theme = str(rng.choice(list(THEMES)))
  weights = np.array([THEMES[theme].get(s, _THEME_BASE) if THEMES[theme] else 1.0 for s in SHAPES])
  n = int(rng.choice(np.arange(1, 6), p=_NUM_OBJECTS_P))
  cells = rng.choice(GRID * GRID, size=n, replace=False)
  objects = []
  for cell in sorted(int(c) for c in cells):
    shape = SHAPES[int(rng.choice(len(SHAPES), p=weights / weights.sum()))]
    if rng.random() < _P_TYPICAL_COLOUR:
      colour = TYPICAL_COLOUR[shape]
    else:
      colour = COLOURS[int(rng.integers(len(COLOURS)))]
    size = SIZES[int(rng.integers(len(SIZES)))]
    row, col = divmod(cell, GRID)
    slack = (1.0 / GRID - SIZE_FRACTION[size]) / 2 - 0.01
    x = (col + 0.5) / GRID + float(rng.uniform(-slack, slack))
    y = (row + 0.5) / GRID + float(rng.uniform(-slack, slack))
    objects.append(SceneObject(shape, colour, size, round(x, 4), round(y, 4)))
  background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
  return Scene(image_id, file_name_for(image_id), background, objects, theme)


def generate_world(num_images: int, seed: int, start_id: int = 0) -> list[Scene]:
  """Scenes `start_id .. start_id+num_images-1`; scene i depends only on (seed, i)."""
  return [make_scene(np.random.default_rng([seed, i]), image_id=i)
          for i in range(start_id, start_id + num_images)]


def object_names(scene: Scene) -> list[str]:
  """The categories (shapes) present, sorted, each once."""
  return sorted({o.shape for o in scene.objects})


# -------------------------------------------------------------------------------------- rendering


def _polygon_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
  if shape == "triangle":
    return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)]
  if shape == "star":
    pts = []
    for k in range(10):
      rad = r if k % 2 == 0 else r * 0.45
      a = -np.pi / 2 + k * np.pi / 5
      pts.append((cx + rad * float(np.cos(a)), cy + rad * float(np.sin(a))))
    return pts
  raise ValueError(shape)


def render(scene: Scene, image_size: int = IMAGE_SIZE) -> PIL.Image.Image:
  """Draws the scene (RGB, `image_size` px square; drawn at 4x and box-downsampled)."""
  ss = 4
  side = image_size * ss
  img = PIL.Image.new("RGB", (side, side), RGB[scene.background])
  draw = PIL.ImageDraw.Draw(img)
  for o in scene.objects:
    cx, cy, r = o.x * side, o.y * side, SIZE_FRACTION[o.size] * side / 2
    fill = RGB[o.colour]
    if o.shape == "circle":
      draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif o.shape == "square":
      q = r * 0.85
      draw.rectangle([cx - q, cy - q, cx + q, cy + q], fill=fill)
    elif o.shape == "cross":
      w = r / 3
      draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
      draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    else:
      draw.polygon(_polygon_points(o.shape, cx, cy, r), fill=fill)
  return img.resize((image_size, image_size), PIL.Image.Resampling.BOX)


def render_png(scene: Scene, image_size: int = IMAGE_SIZE) -> bytes:
  """PNG bytes of `render(scene)` (deterministic)."""
  buf = io.BytesIO()
  render(scene, image_size).save(buf, format="PNG")
  return buf.getvalue()


# --------------------------------------------------------------------------------- co-occurrence


def cooccurrence(scenes: Iterable[Scene]) -> dict[str, Any]:
  """Image-level statistics of the categories.

  Returns `{"num_images": N, "frequency": {a: images containing a}, "pairs": {a: {b: images containing
  a and b}}, "conditional": {a: {b: P(b present | a present)}}}` over `SHAPES` (a != b).
  """
  n = 0
  freq = {s: 0 for s in SHAPES}
  pairs = {a: {b: 0 for b in SHAPES if b != a} for a in SHAPES}
  for scene in scenes:
    n += 1
    present = object_names(scene)
    for a in present:
      freq[a] += 1
      for b in present:
        if b != a:
          pairs[a][b] += 1
  cond = {a: {b: (pairs[a][b] / freq[a] if freq[a] else 0.0) for b in pairs[a]} for a in SHAPES}
  return {"num_images": n, "frequency": freq, "pairs": pairs, "conditional": cond}


def negative_objects(scene: Scene, stats: dict[str, Any], strategy: str = "adversarial",
                     k: int = 3, rng: np.random.Generator | None = None) -> list[str]:
  """Up to `k` absent categories, POPE-style.

  `random`: uniform among the absent; `popular`: most frequent overall first; `adversarial`: highest
  total co-occurrence count with the present categories first (ties by frequency, then name).
  """
  present = set(object_names(scene))
  absent = [s for s in SHAPES if s not in present]
  if strategy == "random":
    rng = rng if rng is not None else np.random.default_rng(scene.image_id)
    return [absent[i] for i in rng.permutation(len(absent))[:k]]
  if strategy == "popular":
    key = lambda s: (-stats["frequency"][s], s)
  elif strategy == "adversarial":
    key = lambda s: (-sum(stats["pairs"][p][s] for p in present), -stats["frequency"][s], s)
  else:
    raise ValueError(f"unknown strategy {strategy!r} (random, popular, adversarial)")
  return sorted(absent, key=key)[:k]


__all__ = ["BACKGROUNDS", "COLOURS", "GRID", "IMAGE_SIZE", "RGB", "SHAPES", "SIZES", "SIZE_FRACTION", "Scene",
           "SceneObject", "THEMES", "TYPICAL_COLOUR", "cooccurrence", "file_name_for", "generate_world",
           "make_scene", "negative_objects", "object_names", "render", "render_png"]
