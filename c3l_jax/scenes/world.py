"""The synthetic scenes world: procedural images whose every QA pair can be checked.

A scene is a small RGB image (default 64 px) with 1-5 objects on a plain background. Each object has a
**shape** (`circle`, `square`, `triangle`, `star`, `cross`), a **colour** (`red`, `green`, `blue`,
`yellow`, `purple`, `orange`), a **size** (`small`, `large`) and a position: the image is a 3 x 3 grid
and every object sits (with jitter) in its own cell, so objects never overlap and "left of", "above",
"in the top left" have exact definitions (below). The background is `black`, `gray` or `white`.

**Category = shape.** `object_names(scene)` lists the shapes present; colour and size are attributes, not
part of the category (so POPE-style existence / hallucination is about shapes; "a green circle" when the
circle is red is a wrong attribute, not a hallucinated object).

**Co-occurrence.** Each scene draws a hidden *theme* that makes some shapes frequent together (star with
circle, square with triangle, cross with circle and square) and each shape has a typical colour (star
yellow, ...), so a model can learn a language prior and hallucinate the usual companion of what it sees.
`cooccurrence(scenes)` returns the statistics; `negative_objects` picks POPE random / popular /
adversarial negatives from them.

**Text.** `captions`, `grounded_qa` (kinds colour, shape, count, position, relation, existence),
`generic_qa` (facts true for any image: the language prior), `detailed_description`. Every word they emit
is in `vocabulary()` (lower case; `. , ?` are separate tokens; `Question:` and `Answer:` are tokens);
`tokenize_words` / `detokenize_words` convert between text and those tokens.

**Checker.** `check(scene, question, answer) -> Verdict`:

- `image_dependent`: the answer can only be known by looking at this image (colours, shapes, counts,
  positions, relations, existence of the scene's objects, a description of it). Facts that hold for any
  image ("How many sides does a triangle have?", "What colour is the sky?", "What is two plus three?")
  are not, even when they name a shape.
- `correct`: for image-dependent QA, whether the answer is right for this scene; `None` when it cannot be
  decided (no answer content found). For generic QA, whether the fact is right where the checker knows
  the fact, else `None`. References that match several objects are judged leniently: an answer is right
  if it is right for one of them ("What colour is the circle?" with a red and a blue circle: "red" and
  "blue" are both accepted).
- `hallucinated`: shape categories the answer asserts present, or the question presupposes with a
  definite reference ("What colour is the star?") unless the answer denies it ("There is no star."), that
  are not in the scene. Negated mentions ("There is no star") assert nothing.

Geometry: cell (row, col), row 0 = top, col 0 = left. `A left of B` iff col(A) < col(B); `A above B`
iff row(A) < row(B); `next to` iff the cells touch (Chebyshev distance 1). "on the left" means col 0,
"at the top" row 0, "in the center" the middle cell, "in the top middle" row 0 and col 1.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
from collections.abc import Iterable, Sequence
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


# ------------------------------------------------------------------------------------------ text

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_CELL_PRECISE = {
    (0, 0): "in the top left", (0, 1): "in the top middle", (0, 2): "in the top right",
    (1, 0): "in the middle left", (1, 1): "in the center", (1, 2): "in the middle right",
    (2, 0): "in the bottom left", (2, 1): "in the bottom middle", (2, 2): "in the bottom right",
}
_CELL_LOOSE = {
    (0, 0): "in the top left corner", (0, 1): "at the top", (0, 2): "in the top right corner",
    (1, 0): "on the left", (1, 1): "in the middle", (1, 2): "on the right",
    (2, 0): "in the bottom left corner", (2, 1): "at the bottom", (2, 2): "in the bottom right corner",
}
_PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars",
           "cross": "crosses", "object": "objects", "shape": "shapes"}
_RELATION_PHRASE = {"left": "to the left of", "right": "to the right of", "above": "above",
                    "below": "below"}


def _choice(rng: np.random.Generator, options: Sequence[Any]) -> Any:
  return options[int(rng.integers(len(options)))]


def _number_text(n: int, rng: np.random.Generator | None = None) -> str:
  if rng is not None and n <= 9 and rng.random() < 0.3:
    return str(n)
  return NUMBER_WORDS[n]


def _article(word: str) -> str:
  return "an" if word[0] in "aeiou" else "a"


def _np(count: int, shape: str, colour: str | None = None, size: str | None = None) -> str:
  words = [w for w in (size, colour) if w]
  noun = shape if count == 1 else _PLURAL[shape]
  head = " ".join(words + [noun])
  return f"{_article(head)} {head}" if count == 1 else f"{NUMBER_WORDS[count]} {head}"


def _join(parts: list[str]) -> str:
  return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _groups(scene: Scene, with_size: bool = False) -> list[str]:
  """Noun phrases for the objects grouped by (size?, colour, shape), in object order."""
  keys: dict[tuple, int] = {}
  for o in scene.objects:
    key = (o.size if with_size else None, o.colour, o.shape)
    keys[key] = keys.get(key, 0) + 1
  return [_np(n, shape, colour, size) for (size, colour, shape), n in keys.items()]


def captions(scene: Scene, rng: np.random.Generator, n: int = 3) -> list[str]:
  """`n` templated paraphrases describing the objects (and sometimes the background)."""
  out = []
  for _ in range(n):
    items = _join(_groups(scene, with_size=bool(rng.random() < 0.3)))
    many = len(scene.objects) > 1
    template = _choice(rng, [
        "{items} on {bg} background .",
        "there {be} {items} in the image .",
        "a picture of {items} .",
        "an image with {items} on {bg} background .",
        "{items} .",
    ])
    text = template.format(items=items, bg=_article(scene.background) + " " + scene.background,
                           be="are" if many else "is")
    out.append(detokenize_words(text.split()))
  return out


def _describe(obj: SceneObject, parts: Sequence[str]) -> str:
  words = []
  if "size" in parts:
    words.append(obj.size)
  if "colour" in parts:
    words.append(obj.colour)
  words.append(obj.shape)
  text = " ".join(words)
  if "cell" in parts:
    text += " " + _CELL_PRECISE[obj.cell]
  return text


def referring_expression(scene: Scene, obj: SceneObject, use_colour: bool = True,
                         use_position: bool = True) -> str | None:
  """The shortest unique description of `obj` (without "the"), or None."""
  options = [("shape",), ("colour",), ("size",), ("size", "colour"), ("cell",), ("colour", "cell")]
  for parts in options:
    if not use_colour and "colour" in parts or not use_position and "cell" in parts:
      continue
    matches = [o for o in scene.objects if o.shape == obj.shape
               and ("colour" not in parts or o.colour == obj.colour)
               and ("size" not in parts or o.size == obj.size)
               and ("cell" not in parts or o.cell == obj.cell)]
    if matches == [obj]:
      return _describe(obj, parts)
  return None


def _relation_holds(a: SceneObject, rel: str, b: SceneObject) -> bool:
  if rel == "left":
    return a.col < b.col
  if rel == "right":
    return a.col > b.col
  if rel == "above":
    return a.row < b.row
  if rel == "below":
    return a.row > b.row
  if rel == "next":
    return a is not b and max(abs(a.row - b.row), abs(a.col - b.col)) == 1
  raise ValueError(rel)


def _qa_colour(scene, rng):
  cands = [(o, r) for o in scene.objects if (r := referring_expression(scene, o, use_colour=False))]
  if not cands:
    return None
  o, ref = _choice(rng, cands)
  q = _choice(rng, ["what colour is the {r} ?", "what is the colour of the {r} ?",
                    "which colour does the {r} have ?"]).format(r=ref)
  a = _choice(rng, ["{c}", "the {r} is {c} .", "it is {c} ."]).format(r=ref, c=o.colour)
  return q, a


def _qa_shape(scene, rng):
  o = _choice(rng, scene.objects)
  colour_unique = sum(p.colour == o.colour for p in scene.objects) == 1
  forms = ["what shape is {cell} ?", "what is {cell} ?", "what kind of object is {cell} ?"]
  if colour_unique:
    forms += ["what shape is the {c} object ?", "what is the {c} object ?", "which shape is {c} ?"]
  q = _choice(rng, forms).format(cell=_CELL_PRECISE[o.cell], c=o.colour)
  a = _choice(rng, ["{s}", "a {s} .", "it is a {s} .", "there is a {c} {s} ."]).format(
      s=o.shape, c=o.colour)
  return q, a


def _qa_count(scene, rng):
  r = rng.random()
  if r < 0.2:
    n, noun, q = len(scene.objects), "object", _choice(rng, [
        "how many objects are there ?", "how many objects are in the image ?",
        "how many shapes can you see ?"])
  elif r < 0.4:
    colour = _choice(rng, [o.colour for o in scene.objects] + list(COLOURS))
    n, noun = sum(o.colour == colour for o in scene.objects), "object"
    q = f"how many {colour} objects are there ?"
    noun = f"{colour} object"
  else:
    shape = _choice(rng, [o.shape for o in scene.objects] + list(SHAPES))
    n, noun = sum(o.shape == shape for o in scene.objects), shape
    q = _choice(rng, ["how many {p} are there ?", "how many {p} are in the picture ?",
                      "how many {p} do you see ?"]).format(p=_PLURAL[shape])
  words = noun.split()
  plural = " ".join(words[:-1] + [_PLURAL[words[-1]]])
  if n == 0:
    a = _choice(rng, ["zero", "none", "there are no {p} .", "0"]).format(p=plural)
  else:
    a = _choice(rng, ["{k}", "there {be} {k} {nn} ."]).format(
        k=_number_text(n, rng), be="is" if n == 1 else "are", nn=noun if n == 1 else plural)
  return q, a


def _qa_position(scene, rng):
  cands = [(o, r) for o in scene.objects if (r := referring_expression(scene, o, use_position=False))]
  if not cands:
    return None
  o, ref = _choice(rng, cands)
  where = _choice(rng, [_CELL_PRECISE, _CELL_LOOSE])[o.cell]
  q = _choice(rng, ["where is the {r} ?", "where is the {r} located ?", "where can you see the {r} ?"])
  a = _choice(rng, ["{w}", "the {r} is {w} .", "it is {w} ."])
  return q.format(r=ref), a.format(r=ref, w=where)


def _qa_relation(scene, rng):
  cands = [(o, r) for o in scene.objects if (r := referring_expression(scene, o, use_position=False))]
  if len(cands) < 2:
    return None
  i, j = rng.choice(len(cands), size=2, replace=False)
  (a_obj, a_ref), (b_obj, b_ref) = cands[int(i)], cands[int(j)]
  rel = _choice(rng, list(_RELATION_PHRASE))
  holds = _relation_holds(a_obj, rel, b_obj)
  q = f"is the {a_ref} {_RELATION_PHRASE[rel]} the {b_ref} ?"
  if holds:
    a = _choice(rng, ["yes", "yes , it is .", f"yes , the {a_ref} is {_RELATION_PHRASE[rel]} the {b_ref} ."])
  else:
    a = _choice(rng, ["no", "no , it is not .", f"no , the {a_ref} is not {_RELATION_PHRASE[rel]} the {b_ref} ."])
  return q, a


def _qa_existence(scene, rng):
  present = object_names(scene)
  r = rng.random()
  if r < 0.45:
    shape, colour = _choice(rng, present), None
  elif r < 0.6:
    o = _choice(rng, scene.objects)
    shape, colour = o.shape, _choice(rng, [o.colour, _choice(rng, COLOURS)])
  else:
    absent = [s for s in SHAPES if s not in present]
    if not absent:
      return None
    # Adversarial by construction: the absent shape that the theme prior pairs most with the present.
    weight = lambda s: sum(THEMES[t].get(s, 0) * THEMES[t].get(p, 0) for t in THEMES for p in present)
    shape = _choice(rng, sorted(absent, key=lambda s: (-weight(s), s))[:2])
    colour = None
  exists = any(o.shape == shape and (colour is None or o.colour == colour) for o in scene.objects)
  noun = f"{colour} {shape}" if colour else shape
  q = _choice(rng, ["is there {a} {n} in the image ?", "is there {a} {n} ?", "are there any {p} ?",
                    "do you see {a} {n} ?", "does the image contain {a} {n} ?"]).format(
      a=_article(noun), n=noun, p=f"{colour} {_PLURAL[shape]}" if colour else _PLURAL[shape])
  if exists:
    a = _choice(rng, ["yes", "yes , there is {a} {n} .", "yes , there is ."])
  else:
    a = _choice(rng, ["no", "no , there is no {n} .", "no , there are no {p} in the image ."])
  return q, a.format(a=_article(noun), n=noun, p=f"{colour} {_PLURAL[shape]}" if colour else _PLURAL[shape])


_QA_KINDS = {"colour": _qa_colour, "shape": _qa_shape, "count": _qa_count, "position": _qa_position,
             "relation": _qa_relation, "existence": _qa_existence}
QA_KINDS = tuple(_QA_KINDS)


def grounded_qa(scene: Scene, rng: np.random.Generator, kind: str | None = None) -> tuple[str, str]:
  """One image-dependent (question, answer) of `kind` (random if None).

  A kind that does not fit the scene (no unique referent, fewer than two objects for a relation, no
  absent shape) falls back to another kind; `count`, `shape` and `existence` always fit.
  """
  if kind is not None and kind not in _QA_KINDS:
    raise ValueError(f"unknown kind {kind!r} (one of {QA_KINDS})")
  order = [kind] if kind else []
  order += [QA_KINDS[int(i)] for i in rng.permutation(len(QA_KINDS))]
  for k in order:
    qa = _QA_KINDS[k](scene, rng)
    if qa is not None:
      return detokenize_words(qa[0].split()), detokenize_words(qa[1].split())
  raise AssertionError("unreachable: count always fits")


_SIDES = {"triangle": 3, "square": 4}
_CORNERS = {"triangle": 3, "square": 4, "circle": 0}
_POINTS = {"star": 5}
_ARMS = {"cross": 4}
_MIX = {frozenset(("red", "yellow")): "orange", frozenset(("blue", "yellow")): "green",
        frozenset(("red", "blue")): "purple"}
_OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top", "small": "large",
             "large": "small", "above": "below", "below": "above", "yes": "no", "no": "yes"}
WORLD_COLOURS = {"sky": "blue", "grass": "green", "sun": "yellow", "snow": "white", "night": "black",
                 "banana": "yellow", "tomato": "red", "leaf": "green", "sea": "blue"}


def generic_qa(rng: np.random.Generator) -> tuple[str, str]:
  """One (question, answer) that holds for any image: geometry, colour and arithmetic facts."""
  k = int(rng.integers(9))
  if k == 0:
    shape = _choice(rng, list(_SIDES))
    n = NUMBER_WORDS[_SIDES[shape]]
    q, a = f"how many sides does a {shape} have ?", _choice(rng, [n, f"a {shape} has {n} sides ."])
  elif k == 1:
    shape = _choice(rng, ["triangle", "square"])
    n = NUMBER_WORDS[_CORNERS[shape]]
    q, a = f"how many corners does a {shape} have ?", _choice(rng, [n, f"a {shape} has {n} corners ."])
  elif k == 2:
    q, a = _choice(rng, [("how many points does a star have ?", "five"),
                         ("how many arms does a cross have ?", "four"),
                         ("does a circle have corners ?", "no , a circle has no corners ."),
                         ("does a triangle have corners ?", "yes , a triangle has three corners .")])
  elif k == 3:
    shape = _choice(rng, list(_SIDES))
    q = f"what shape has {NUMBER_WORDS[_SIDES[shape]]} sides ?"
    a = _choice(rng, [f"a {shape}", f"a {shape} has {NUMBER_WORDS[_SIDES[shape]]} sides ."])
  elif k == 4:
    pair = _choice(rng, list(_MIX))
    c1, c2 = sorted(pair)
    q = f"what colour do you get when you mix {c1} and {c2} ?"
    a = _choice(rng, [_MIX[pair], f"you get {_MIX[pair]} ."])
  elif k == 5:
    w = _choice(rng, list(_OPPOSITE)[:-2])
    q, a = f"what is the opposite of {w} ?", _choice(rng, [_OPPOSITE[w], f"the opposite of {w} is {_OPPOSITE[w]} ."])
  elif k == 6:
    thing = _choice(rng, list(WORLD_COLOURS))
    q = _choice(rng, ["what colour is the {t} ?", "what colour is {a} {t} ?"]).format(
        t=thing, a=_article(thing))
    a = _choice(rng, [WORLD_COLOURS[thing], f"it is {WORLD_COLOURS[thing]} ."])
  elif k == 7:
    x, y = int(rng.integers(1, 6)), int(rng.integers(1, 6))
    q, a = f"what is {NUMBER_WORDS[x]} plus {NUMBER_WORDS[y]} ?", NUMBER_WORDS[x + y]
  else:
    if rng.random() < 0.5:
      c = _choice(rng, COLOURS)
      q, a = f"is {c} a colour ?", _choice(rng, ["yes", f"yes , {c} is a colour ."])
    else:
      s = _choice(rng, SHAPES)
      q, a = _choice(rng, [(f"is {_article(s)} {s} a shape ?", "yes"),
                           (f"is {_article(s)} {s} a colour ?", "no")])
  return detokenize_words(q.split()), detokenize_words(a.split())


def detailed_description(scene: Scene) -> str:
  """A multi-sentence description: the count, each object with size, colour and cell, a relation."""
  n = len(scene.objects)
  sents = [f"the image shows {NUMBER_WORDS[n]} {'object' if n == 1 else 'objects'} on "
           f"{_article(scene.background)} {scene.background} background ."]
  for o in scene.objects:
    sents.append(f"there is {_article(o.size)} {o.size} {o.colour} {o.shape} {_CELL_PRECISE[o.cell]} .")
  refs = [(o, r) for o in scene.objects if (r := referring_expression(scene, o, use_position=False))]
  for (a, ra), (b, rb) in zip(refs, refs[1:]):
    for rel in ("left", "right", "above", "below"):
      if _relation_holds(a, rel, b):
        sents.append(f"the {ra} is {_RELATION_PHRASE[rel]} the {rb} .")
        break
  return " ".join(detokenize_words(s.split()) for s in sents)


# ------------------------------------------------------------------------------------ vocabulary

SPECIAL_TOKENS = ("Question:", "Answer:")
PUNCTUATION = (".", ",", "?")
_TEMPLATE_WORDS = """
a an the is are there in on at of to with and image picture shows object objects shape shapes
background what which where how many colour kind does do you see can contain have has it yes no not describe
any none zero located get when mix plus opposite sides corners points arms
top bottom left right middle center corner above below
"""


def vocabulary() -> list[str]:
  """Every token the text generators can emit (sorted): lower-case words, digits, `. , ?`, and
  `Question:` / `Answer:`."""
  words = set(_TEMPLATE_WORDS.split())
  words |= set(SHAPES) | set(_PLURAL.values()) | set(COLOURS) | set(SIZES) | set(BACKGROUNDS)
  words |= set(NUMBER_WORDS) | {str(i) for i in range(10)} | set(WORLD_COLOURS)
  words |= set(_OPPOSITE) | {"colour"}
  return sorted(words | set(PUNCTUATION) | set(SPECIAL_TOKENS))


_TOKEN_RE = re.compile(r"Question:|Answer:|[A-Za-z]+|\d+|[^\sA-Za-z\d]")


def tokenize_words(text: str) -> list[str]:
  """Lower-cased words and single punctuation marks; `Question:` / `Answer:` kept as one token each."""
  return [t if t in SPECIAL_TOKENS else t.lower() for t in _TOKEN_RE.findall(text)]


def parse_qa_text(text: str) -> tuple[str, str] | None:
  """Splits generator output in VIGC format, `Question: {q} Answer: {a}`, into (q, a); None when the
  text has no "Question:" followed by an "Answer:" (case-insensitive)."""
  m = re.search(r"question:(.*?)answer:(.*)", text, flags=re.IGNORECASE | re.DOTALL)
  if m is None:
    return None
  return m.group(1).strip(), m.group(2).strip()


def detokenize_words(tokens: Sequence[str]) -> str:
  """Joins tokens into text: no space before punctuation, sentences capitalised."""
  out = ""
  cap = True
  for t in tokens:
    if t in PUNCTUATION:
      out += t
      cap = t in ".?"
      continue
    word = t[:1].upper() + t[1:] if cap and t not in SPECIAL_TOKENS else t
    out += (" " if out else "") + word
    cap = t in SPECIAL_TOKENS
  return out


# --------------------------------------------------------------------------------------- checker

FOREIGN_SHAPES = ("heart", "hexagon", "diamond", "oval", "pentagon", "rectangle", "moon", "arrow",
                  "ring", "ball", "box")
"""Shapes that never occur in the world: an answer that asserts one hallucinates it."""
_ALL_COLOURS = COLOURS + BACKGROUNDS
_GENERIC_NOUNS = ("object", "shape", "thing", "item", "figure", "one")
_NOUN_FORMS: dict[str, str] = {}
for _n in SHAPES + FOREIGN_SHAPES + _GENERIC_NOUNS + ("background",):
  _NOUN_FORMS[_n] = _n
  _NOUN_FORMS[_n + ("es" if _n.endswith(("s", "x")) else "s")] = _n
del _n
_SYNONYMS = {
    "color": "colour", "colors": "colour", "colours": "colour", "colored": "colour", "coloured": "colour",
    "grey": "gray", "centre": "center", "central": "center", "big": "large", "little": "small",
    "tiny": "small", "huge": "large", "violet": "purple", "upper": "top", "lower": "bottom",
    "beneath": "below", "under": "below", "underneath": "below", "over": "above", "picture": "image",
    "photo": "image", "scene": "image", "photograph": "image", "canvas": "image", "beside": "next",
    "near": "next", "adjacent": "next", "pic": "image", "circular": "circle", "squares": "squares",
}
_CONTRACTIONS = [
    (r"\bcan't\b", "can not"), (r"\bcannot\b", "can not"), (r"\bwon't\b", "will not"),
    (r"n't\b", " not"), (r"\bthere's\b", "there is"), (r"\bit's\b", "it is"), (r"\bwhat's\b", "what is"),
    (r"\bwhere's\b", "where is"), (r"\bthat's\b", "that is"), (r"'s\b", ""), (r"'re\b", " are"),
]
_NUMBERS = {w: i for i, w in enumerate(NUMBER_WORDS)}
_NEG_WORDS = {"not", "never", "none", "nothing", "neither", "nor", "nobody"}
_YES = {"yes", "yeah", "yep", "yup", "correct", "true", "sure", "indeed"}
_NO = {"no", "nope", "false", "incorrect", "wrong"}
_ABS_WORDS = {"left": ("col", 0), "right": ("col", 2), "top": ("row", 0), "bottom": ("row", 2),
              "center": ("c", 1), "middle": ("c", 1)}
_ABS_FILLERS = {"corner", "side", "part", "half", "area", "edge", "hand", "region", "portion"}
_COPULAS = {"is", "are", "appears", "looks", "seems", "sits", "lies", "stands"}
_IMAGE_CUES = {"image", "here", "shown", "visible", "see", "this", "these"}
_PROPERTY_FACTS = {"sides": _SIDES | {"circle": 0}, "edges": _SIDES | {"circle": 0},
                   "corners": _CORNERS, "vertices": _CORNERS, "points": _POINTS, "arms": _ARMS}
_DETS = {"the", "a", "an", "any", "some", "another", "this", "that", "these", "those", "each",
         "every", "all", "single"}


@dataclasses.dataclass
class Verdict:
  """What `check` found. `kind`: colour, shape, count, position, relation, existence, size, property,
  description, generic or unknown; `mentioned`: shape categories named in question or answer."""

  image_dependent: bool
  correct: bool | None
  hallucinated: list[str]
  kind: str = "unknown"
  mentioned: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _NP:
  noun: str
  colour: str | None = None
  size: str | None = None
  number: int | None = None
  det: str | None = None
  start: int = 0
  end: int = 0
  landmark: bool = False

  @property
  def shape(self) -> str | None:
    return self.noun if self.noun in SHAPES or self.noun in FOREIGN_SHAPES else None


@dataclasses.dataclass
class _Abs:
  row: int | None
  col: int | None
  start: int = 0
  end: int = 0


@dataclasses.dataclass
class _Rel:
  rel: str
  start: int = 0
  end: int = 0
  landmark: _NP | None = None


@dataclasses.dataclass
class _Tok:
  kind: str  # colour, size, num, neg, word
  value: Any
  start: int = 0


@dataclasses.dataclass
class _Desc:
  """A description of objects: attributes and location constraints."""

  shape: str | None = None
  colour: str | None = None
  size: str | None = None
  abs: list[_Abs] = dataclasses.field(default_factory=list)
  rels: list[tuple[str, "_Desc"]] = dataclasses.field(default_factory=list)

  def merged(self, other: "_Desc") -> "_Desc":
    return _Desc(self.shape or other.shape, self.colour or other.colour, self.size or other.size,
                 self.abs + other.abs, self.rels + other.rels)


def _normalize(text: str) -> list[str]:
  text = text.lower().replace("’", "'").replace("question:", " ").replace("answer:", " ")
  for pat, rep in _CONTRACTIONS:
    text = re.sub(pat, rep, text)
  tokens = re.findall(r"[a-z]+|\d+|[.!?;,]", text)
  return [_SYNONYMS.get(t, t) for t in tokens]


def _sentences(tokens: list[str]) -> list[list[str]]:
  out, cur = [], []
  for t in tokens + ["."]:
    if t in {".", "!", "?", ";"} or t == "but":
      if cur:
        out.append(cur)
      cur = []
    elif t != ",":
      cur.append(t)
  return out


def _image_follows(tokens: list[str], j: int) -> bool:
  while j < len(tokens) and tokens[j] in {"the", "this", "that", "an", "a"}:
    j += 1
  return j < len(tokens) and tokens[j] in {"image", "frame", "grid"}


def _number(tok: str) -> int | None:
  if tok.isdigit():
    return int(tok)
  return _NUMBERS.get(tok)


def _parse_np(tokens: list[str], i: int) -> _NP | None:
  n, j = len(tokens), i
  np_ = _NP(noun="", start=i)
  had_mod = False
  if j < n and tokens[j] in _DETS:
    np_.det = tokens[j]
    j += 1
    had_mod = True
  elif j < n and tokens[j] == "no":
    np_.det, np_.number = "no", 0
    j += 1
  if j < n and tokens[j] == "single":
    j += 1
  one_at = None
  if j < n and _number(tokens[j]) is not None:
    if tokens[j] == "one":
      one_at = j
    np_.number = 0 if np_.det == "no" else _number(tokens[j])
    j += 1
    had_mod = True
  while j < n and (tokens[j] in _ALL_COLOURS or tokens[j] in SIZES or tokens[j] == "colour"
                   and j > i and tokens[j - 1] in _ALL_COLOURS):
    if tokens[j] in _ALL_COLOURS:
      np_.colour = np_.colour or tokens[j]
    elif tokens[j] in SIZES:
      np_.size = np_.size or tokens[j]
    j += 1
    had_mod = True
  if j < n and tokens[j] in _NOUN_FORMS and (tokens[j] not in {"one", "ones"} or had_mod):
    np_.noun = _NOUN_FORMS[tokens[j]]
    np_.end = j + 1
  elif one_at is not None and one_at == j - 1:
    np_.noun, np_.number, np_.end = "one", None, j
  elif j == i and j < n and tokens[j] in {"it", "they", "them"}:
    np_.noun, np_.end = "it", j + 1
  else:
    return None
  return np_


def _chunks(tokens: list[str]) -> list[Any]:
  """Noun phrases, absolute positions, relations and single tokens, in order."""
  out: list[Any] = []
  n, i = len(tokens), 0
  rel_of = {"left": "left", "right": "right", "top": "above", "bottom": "below"}
  while i < n:
    t = tokens[i]
    if t in ("above", "below"):
      out.append(_Rel(t, i, i + 1))
      i += 1
      continue
    if t == "next":
      out.append(_Rel("next", i, i + 2 if i + 1 < n and tokens[i + 1] == "to" else i + 1))
      i = out[-1].end
      continue
    if t in _ABS_WORDS:
      words, j, last = [], i, i
      while j < n:
        u = tokens[j]
        if u in _ABS_WORDS:
          words.append(u)
          last = j
        elif u in _ABS_FILLERS:
          last = j
        elif u not in {"the", "in", "at", "on"}:
          break
        j += 1
      if last + 1 < n and tokens[last + 1] == "of" and not _image_follows(tokens, last + 2):
        rels = [rel_of[w] for w in words if w in rel_of]
        if rels:
          for r in rels:
            out.append(_Rel(r, i, last + 2))
          i = last + 2
          continue
      end = last + 1
      if end < n and tokens[end] == "of" and _image_follows(tokens, end + 1):
        end += 1
      rows = {_ABS_WORDS[w][1] for w in words if _ABS_WORDS[w][0] == "row"}
      cols = {_ABS_WORDS[w][1] for w in words if _ABS_WORDS[w][0] == "col"}
      center = any(_ABS_WORDS[w][0] == "c" for w in words)
      row = rows.pop() if len(rows) == 1 else None
      col = cols.pop() if len(cols) == 1 else None
      if center:
        if col is not None and row is None:
          row = 1
        elif row is not None and col is None:
          col = 1
        elif row is None and col is None:
          row = col = 1
      out.append(_Abs(row, col, i, end))
      i = end
      continue
    np_ = _parse_np(tokens, i)
    if np_ is not None:
      out.append(np_)
      i = np_.end
      continue
    if t in _ALL_COLOURS:
      out.append(_Tok("colour", t, i))
    elif t in SIZES:
      out.append(_Tok("size", t, i))
    elif _number(t) is not None:
      out.append(_Tok("num", _number(t), i))
    elif t in _NEG_WORDS or t == "no":
      out.append(_Tok("neg", t, i))
    else:
      out.append(_Tok("word", t, i))
    i += 1
  # A relation's landmark is the next noun phrase (only glue words in between).
  for k, c in enumerate(out):
    if isinstance(c, _Rel):
      for d in out[k + 1:]:
        if isinstance(d, _NP):
          c.landmark, d.landmark = d, True
          break
        if isinstance(d, _Rel) or isinstance(d, _Tok) and d.value in {"the", "to", "and", "of", "on", "in"}:
          continue
        break
  return out


def _np_desc(np_: _NP) -> _Desc:
  return _Desc(np_.shape if np_.noun not in _GENERIC_NOUNS else None, np_.colour, np_.size)


def _loc_desc(chunks: Sequence[Any]) -> _Desc:
  d = _Desc()
  for c in chunks:
    if isinstance(c, _Abs):
      d.abs.append(c)
    elif isinstance(c, _Rel) and c.landmark is not None:
      d.rels.append((c.rel, _np_desc(c.landmark)))
  return d


def _match(scene: Scene, d: _Desc) -> list[SceneObject]:
  out = []
  for o in scene.objects:
    if d.shape is not None and o.shape != d.shape or d.colour is not None and o.colour != d.colour:
      continue
    if d.size is not None and o.size != d.size:
      continue
    if any(a.row is not None and o.row != a.row or a.col is not None and o.col != a.col for a in d.abs):
      continue
    if all(any(_relation_holds(o, rel, l) for l in _match(scene, ld) if l is not o) for rel, ld in d.rels):
      out.append(o)
  return out


@dataclasses.dataclass
class _Claim:
  desc: _Desc | None  # None: a background claim
  positive: bool
  count: int | None = None
  background: str | None = None

  def holds(self, scene: Scene) -> bool:
    if self.desc is None:
      truth = scene.background == self.background
    else:
      m = _match(scene, self.desc)
      truth = len(m) == self.count if self.count is not None else bool(m)
    return truth == self.positive


def _is_negated(chunks: Sequence[Any]) -> bool:
  return any(isinstance(c, _Tok) and c.kind == "neg" for c in chunks)


def _top_nps(chunks: Sequence[Any]) -> list[_NP]:
  return [c for c in chunks if isinstance(c, _NP) and not c.landmark and c.noun != "background"]


def _clause(tokens: list[str], referent: _Desc | None) -> tuple[list[_Claim], list[tuple[_NP, bool]]]:
  """Claims a statement makes, and its noun phrases with whether each is asserted present."""
  chunks = _chunks(tokens)
  neg = _is_negated(chunks)
  claims: list[_Claim] = []
  mentions: list[tuple[_NP, bool]] = []
  for c in chunks:
    if isinstance(c, _NP) and c.noun == "background" and c.colour:
      claims.append(_Claim(None, not neg, background=c.colour))
  tops = _top_nps(chunks)

  def asserted(np_: _NP) -> bool:
    return np_.det != "no" and np_.number != 0 and (not neg or np_.det == "the")

  for c in chunks:
    if isinstance(c, _NP) and c.landmark:
      mentions.append((c, asserted(c)))
  subj_idx = None
  for k, c in enumerate(chunks):
    if isinstance(c, _NP) and c in tops:
      before_there = k > 0 and isinstance(chunks[k - 1], _Tok) and chunks[k - 1].value == "there"
      rest = chunks[k + 1:]
      for d in rest:
        if isinstance(d, (_Abs, _Rel)) or isinstance(d, _NP) and d.landmark:
          continue
        if isinstance(d, _Tok) and d.value in _COPULAS and not before_there:
          subj_idx = k
        break
      break
  if subj_idx is not None:  # "the X is <predicates>"
    subj = chunks[subj_idx]
    desc = referent if subj.noun == "it" and referent is not None else _np_desc(subj)
    desc = desc.merged(_loc_desc(chunks[subj_idx + 1:]))
    pred_np = None
    for c in chunks[subj_idx + 1:]:
      if isinstance(c, _Tok) and c.kind == "colour":
        desc = dataclasses.replace(desc, colour=c.value) if desc.colour in (None, c.value) else \
            dataclasses.replace(desc, shape="__contradiction__")
      elif isinstance(c, _Tok) and c.kind == "size":
        desc = dataclasses.replace(desc, size=c.value) if desc.size in (None, c.value) else \
            dataclasses.replace(desc, shape="__contradiction__")
      elif isinstance(c, _NP) and not c.landmark and c.noun != "background":
        pred_np = c
        nd = _np_desc(c)
        if nd.shape is not None:
          desc = dataclasses.replace(desc, shape=nd.shape if desc.shape in (None, nd.shape) else "__x__")
        desc = dataclasses.replace(desc, colour=desc.colour or nd.colour, size=desc.size or nd.size)
    has_pred = desc != (referent if subj.noun == "it" and referent is not None else _np_desc(subj))
    if subj.noun != "it":
      mentions.append((subj, asserted(subj) or subj.det == "the"))
    if pred_np is not None:
      mentions.append((pred_np, not neg and pred_np.det != "no"))
    if has_pred or subj.noun != "it":
      count = subj.number if subj.det not in {"a", "an"} and subj.noun != "it" else None
      if subj.det == "no":
        claims.append(_Claim(desc, not neg, 0))
      else:
        claims.append(_Claim(desc, not neg, count if not has_pred else None))
    return claims, mentions
  # Existential / list: each noun phrase with the locations that follow it.
  for k, c in enumerate(chunks):
    if not (isinstance(c, _NP) and c in tops):
      continue
    locs = []
    for d in chunks[k + 1:]:
      if isinstance(d, _NP) and not d.landmark:
        break
      locs.append(d)
    if c.noun == "it":
      if referent is None:
        continue
      desc = referent.merged(_loc_desc(locs))
    else:
      desc = _np_desc(c).merged(_loc_desc(locs))
      mentions.append((c, asserted(c)))
    claims.append(_Claim(desc, not neg or c.det == "no", c.number))
  return claims, mentions


def _statements(tokens: list[str], referent: _Desc | None = None
                ) -> tuple[list[_Claim], list[tuple[_NP, bool]]]:
  claims, mentions = [], []
  for sent in _sentences(tokens):
    c, m = _clause(sent, referent)
    claims += c
    mentions += m
  return claims, mentions


def _polarity(tokens: list[str]) -> bool | None:
  """yes/no of an answer: an explicit first word, else whether it negates."""
  words = [t for t in tokens if t not in {".", ",", "!", "?", ";"}]
  if not words:
    return None
  if words[0] in _YES:
    return True
  if words[0] in _NO and not (len(words) > 1 and _parse_np(words, 0) is not None):
    return False
  chunks = _chunks(words)
  if _is_negated(chunks) or any(isinstance(c, _NP) and c.det == "no" for c in chunks):
    return False
  return True if any(isinstance(c, (_NP, _Abs, _Rel)) for c in chunks) else None


def _answer_number(tokens: list[str]) -> int | None:
  for c in _chunks(tokens):
    if isinstance(c, _NP) and not c.landmark:
      if c.number is not None:
        return c.number
      if c.det in {"a", "an"} or c.noun == "one":
        return 1
    if isinstance(c, _Tok) and c.kind == "num":
      return c.value
    if isinstance(c, _Tok) and c.value in {"none", "nothing", "no"}:
      return 0
  return None


def _answer_colours(tokens: list[str]) -> set[str]:
  chunks = _chunks(tokens)
  cols = {c.value for c in chunks if isinstance(c, _Tok) and c.kind == "colour"}
  if not cols:
    cols = {c.colour for c in chunks if isinstance(c, _NP) and not c.landmark and c.colour}
  return cols


def _denies(tokens: list[str]) -> bool:
  chunks = _chunks(tokens)
  return _is_negated(chunks) or any(isinstance(c, _NP) and c.det == "no" for c in chunks) or \
      bool(tokens) and tokens[0] in _NO


def _question_desc(chunks: Sequence[Any], with_colour_toks: bool = True) -> _Desc:
  """Merges what the question says about its referent: noun phrases, colour / size words, locations."""
  d = _Desc()
  for c in chunks:
    if isinstance(c, _NP) and not c.landmark and c.noun not in {"background", "it"}:
      d = d.merged(_np_desc(c))
    elif isinstance(c, _Tok) and c.kind == "colour" and with_colour_toks:
      d.colour = d.colour or c.value
    elif isinstance(c, _Tok) and c.kind == "size":
      d.size = d.size or c.value
  return d.merged(_loc_desc(chunks))


def _generic(q: list[str], a: list[str]) -> tuple[bool, bool | None] | None:
  """(True, correct) when the question is a fact that holds for any image, else None."""
  qs = set(q)
  a_nums = next((c.value for c in _chunks(a) if isinstance(c, _Tok) and c.kind == "num"), None)
  if a_nums is None:
    a_nums = _answer_number(a)
  if qs & {"plus", "minus", "times"}:
    nums = [_number(t) for t in q if _number(t) is not None]
    if len(nums) == 2 and a_nums is not None:
      x, y = nums
      val = x + y if "plus" in qs else x - y if "minus" in qs else x * y
      return True, a_nums == val
    return True, None
  if qs & {"mix", "mixed", "mixing", "combine"}:
    cols = [t for t in q if t in _ALL_COLOURS]
    res = _MIX.get(frozenset(cols))
    ans = [t for t in a if t in _ALL_COLOURS and t not in cols]
    return True, (res in ans) if res and ans else None
  if "opposite" in qs:
    k = q.index("opposite")
    w = next((t for t in q[k + 1:] if t in _OPPOSITE), None)
    ans = [t for t in a if t in _OPPOSITE and t != w]
    return True, (_OPPOSITE[w] in ans) if w and ans else None
  if "rainbow" in qs:
    return True, a_nums == 7 if a_nums is not None else None
  if qs & set(WORLD_COLOURS) and "colour" in qs:
    thing = next(t for t in q if t in WORLD_COLOURS)
    cols = _answer_colours(a)
    return True, (WORLD_COLOURS[thing] in cols) if cols else None
  if len(q) >= 4 and q[0] == "is" and q[-2:] in (["a", "colour"], ["a", "shape"]):
    subj = [t for t in q[1:-2] if t not in {"a", "an", "the"}]
    truth = bool(subj) and (subj[0] in _ALL_COLOURS if q[-1] == "colour" else _NOUN_FORMS.get(subj[0]) in SHAPES + FOREIGN_SHAPES)
    pol = _polarity(a)
    return True, None if pol is None else pol == truth
  prop = next((t for t in q if t in _PROPERTY_FACTS), None)
  if prop is not None:
    facts = _PROPERTY_FACTS[prop]
    chunks = _chunks(q)
    nps = [c for c in chunks if isinstance(c, _NP)]
    shaped = [c for c in nps if c.shape in SHAPES]
    if shaped and not qs & _IMAGE_CUES and not any(isinstance(c, (_Abs, _Rel)) for c in chunks) \
        and not (shaped[0].colour or shaped[0].size):
      fact = facts.get(shaped[0].shape)
      if fact is None:
        return True, None
      if q[0] in {"does", "do", "is", "are", "has", "have"}:
        pol = _polarity(a)
        return True, None if pol is None else pol == (fact > 0)
      return True, None if a_nums is None else a_nums == fact
    num = next((c.value for c in chunks if isinstance(c, _Tok) and c.kind == "num"), None)
    if not shaped and num is not None and (q[0] in {"what", "which"}) and not qs & _IMAGE_CUES \
        and not any(isinstance(c, (_Abs, _Rel)) for c in chunks):
      ans = {c.shape for c in _chunks(a) if isinstance(c, _NP) and c.shape}
      return True, (bool(ans) and all(facts.get(s) == num for s in ans)) if ans else None
  return None


def check(scene: Scene, question: str, answer: str) -> Verdict:
  """Judges one QA pair against the scene (definitions in the module docstring)."""
  q = [t for t in _normalize(question) if t not in {".", "!", ";", ","}]
  a = _normalize(answer)
  while q and q[-1] == "?":
    q.pop()
  q = [t for t in q if t != "?"]
  q_chunks = _chunks(q)
  mentioned = sorted({c.shape for c in q_chunks + _chunks(a) if isinstance(c, _NP) and c.shape})
  present = set(object_names(scene))

  def absent(nps: Iterable[_NP]) -> set[str]:
    return {n.shape for n in nps if n.shape and n.shape not in present}

  g = _generic(q, a)
  if g is not None:
    hall = set()
    if set(q) & _IMAGE_CUES:
      hall = absent(c for c in q_chunks if isinstance(c, _NP) and c.det == "the")
    return Verdict(False, g[1], sorted(hall), "generic", mentioned)

  qs = set(q)
  a_claims, a_mentions = _statements(a, None)
  hall = absent(n for n, asserted in a_mentions if asserted)
  presupposed = absent(c for c in q_chunks if isinstance(c, _NP) and c.det == "the")
  a_words = [t for t in a if t not in {".", ",", "!", "?", ";"}]
  wh = next((t for t in q if t in {"what", "which", "where", "how", "describe", "is", "are", "does",
                                    "do", "can", "could", "name", "list", "count", "tell"}), None)
  kind = "unknown"
  correct: bool | None = None

  def finish() -> Verdict:
    return Verdict(True, correct, sorted(hall), kind, mentioned)

  # How many sides does the red shape have? (a property of a scene object)
  prop = next((t for t in q if t in _PROPERTY_FACTS), None)
  if prop is not None:
    kind = "property"
    desc = _question_desc(q_chunks)
    m = _match(scene, desc)
    n = _answer_number(a)
    hall |= presupposed
    if n is not None and m:
      correct = any(_PROPERTY_FACTS[prop].get(o.shape, -1) == n for o in m)
    elif not m:
      correct = _denies(a_words)
    return finish()

  if "how" in qs and "many" in qs:
    kind = "count"
    k = q.index("many")
    desc = _question_desc(_chunks(q[k + 1:]))
    if desc == _Desc():  # odd word order: "circles, how many?"
      desc = _question_desc(q_chunks)
    m = _match(scene, desc)
    n = _answer_number(a_words)
    if n is not None:
      correct = n == len(m)
      if n > 0 and desc.shape is not None and desc.shape not in present:
        hall.add(desc.shape)
    elif not m and _denies(a_words):
      correct = True
    return finish()

  if wh == "where":
    kind = "relation" if qs & {"relative", "relation", "compared"} else "position"
    tops = _top_nps(q_chunks)
    if not tops:
      return finish()
    subj = tops[0]
    k = q_chunks.index(subj)
    locs = []
    for c in q_chunks[k + 1:]:
      if isinstance(c, _NP) and not c.landmark:
        break
      locs.append(c)
    desc = _np_desc(subj).merged(_loc_desc(locs))
    m = _match(scene, desc)
    ans_chunks = _chunks(a_words)
    ans_loc = _loc_desc(ans_chunks)
    if not m:
      correct = _denies(a_words) and not ans_loc.abs and not ans_loc.rels
      if not correct:
        hall |= presupposed
    elif ans_loc.abs or ans_loc.rels:
      loc = dataclasses.replace(ans_loc, shape=None)
      correct = any(o in _match(scene, loc) for o in m)
      hall |= absent(c.landmark for c in ans_chunks if isinstance(c, _Rel) and c.landmark)
    return finish()

  if qs & {"bigger", "smaller", "larger", "biggest", "smallest", "largest", "more", "fewer", "less"}:
    kind = "comparison"  # not judged
    return finish()

  if "colour" in qs and wh in {"what", "which", "tell", "name"}:
    kind = "colour"
    if "background" in qs:
      cols = _answer_colours(a_words)
      correct = scene.background in cols if cols else None
      return finish()
    desc = _question_desc(q_chunks, with_colour_toks=False)
    m = _match(scene, desc)
    cols = _answer_colours(a_words)
    if not m:
      correct = not cols and _denies(a_words)
      if cols:
        hall |= presupposed | ({desc.shape} if desc.shape and desc.shape not in present else set())
    elif cols:
      correct = cols <= {o.colour for o in m}
    return finish()

  describe = bool(qs & {"describe"}) or (
      wh in {"what", "which", "name", "list", "tell"} and (
          qs & {"see", "objects", "shapes", "things"} and not any(isinstance(c, (_Abs, _Rel)) for c in q_chunks)
          or ("in" in qs and "image" in qs and not any(isinstance(c, (_Abs, _Rel)) for c in q_chunks)
              and not any(isinstance(c, _Tok) and c.kind == "colour" for c in q_chunks)
              and not any(isinstance(c, _NP) and (c.colour or c.shape) for c in q_chunks))))
  if describe:
    kind = "description"
    correct = all(c.holds(scene) for c in a_claims) if a_claims else None
    return finish()

  if wh in {"what", "which", "name", "tell"}:
    kind = "shape"
    desc = _question_desc(q_chunks)
    m = _match(scene, desc)
    ans = [c for c in _chunks(a_words) if isinstance(c, _NP) and not c.landmark and c.shape
           and c.det != "no"]
    if not m:
      correct = not ans and _denies(a_words)
      if not correct:
        hall |= presupposed
    elif ans:  # each named shape (with its colour / size, if given) is one of the referents
      correct = all(_match(scene, _np_desc(c).merged(_Desc(abs=desc.abs, rels=desc.rels))) and
                    any(o.shape == c.shape for o in m) for c in ans)
    return finish()

  if wh in {"is", "are", "does", "do", "can", "could"}:
    k = q.index(wh)
    rest = q[k + 1:]
    existential = bool(rest) and rest[0] == "there" or bool(
        set(rest[:4]) & {"see", "contain", "contains", "show", "shows", "include", "have", "has", "any"})
    if existential:
      kind = "existence"
      body = rest[1:] if rest[0] == "there" else rest
      chunks = _chunks(body)
      q_claims = []
      for c in _top_nps(chunks):
        kk = chunks.index(c)
        locs = []
        for d in chunks[kk + 1:]:
          if isinstance(d, _NP) and not d.landmark:
            break
          locs.append(d)
        count = c.number if c.det not in {"a", "an", "any", "some"} else None
        q_claims.append(_Claim(_np_desc(c).merged(_loc_desc(locs)), True, count))
      subject = q_claims[0].desc if q_claims else None
    else:
      q_claims, subject = _yesno_claims(rest)
      preds = _chunks(rest)
      kind = ("relation" if any(isinstance(c, _Rel) for c in preds) else
              "position" if any(isinstance(c, _Abs) for c in preds) else
              "colour" if any(isinstance(c, _Tok) and c.kind == "colour" for c in preds) else
              "size" if any(isinstance(c, _Tok) and c.kind == "size" for c in preds) else "shape")
    pol = _polarity(a_words)
    if not q_claims or pol is None:
      return finish()
    truth = all(c.holds(scene) for c in q_claims)
    correct = truth == pol
    if a_words and (a_words[0] in _YES or a_words[0] in _NO and _parse_np(a_words, 0) is None):
      extra, _ = _statements(a_words[1:], subject)
    else:
      extra = a_claims
    if extra and not all(c.holds(scene) for c in extra):
      correct = False
    if pol:
      hall |= absent(c for c in q_chunks if isinstance(c, _NP))
    return finish()

  # Anything else: judge the answer's own statements.
  if a_claims or presupposed or qs & _IMAGE_CUES:
    correct = all(c.holds(scene) for c in a_claims) if a_claims else None
    return finish()
  return Verdict(False, None, sorted(hall), "unknown", mentioned)


def _yesno_claims(rest: list[str]) -> tuple[list[_Claim], _Desc | None]:
  """Claims of "is the X <predicate>" (tokens after the auxiliary) read as the statement "the X is ...",
  and the subject's description (what "it" refers to in the answer)."""
  tops = _top_nps(_chunks(rest))
  if not tops:
    return [], None
  subj = tops[0]
  claims, _ = _clause(rest[:subj.end] + ["is"] + rest[subj.end:], None)
  return claims, _np_desc(subj)


def load_split(data_dir: str, split: str, num_images: int, seed: int, *, num_val: int | None = None,
               image_size: int = IMAGE_SIZE) -> Sequence[dict[str, Any]]:
  """The world's `train` (scenes 0..num_images-1) or `val` (held out) split through its tfds builder,
  prepared under `data_dir` on first use: a random-access sequence of dicts with keys image_bytes
  (PNG bytes), image_id (int), file_name (str), captions (list[str]), objects (list[str]), annotation
  (the scene's JSON). See `c3l_jax.data.scenes_tfds` (imported here lazily: tfds is only needed here)."""
  from c3l_jax.data import scenes_tfds  # noqa: PLC0415  (keeps tfds out of the world's import)

  return scenes_tfds.load_split(data_dir, split, num_images, seed, num_val=num_val, image_size=image_size)
