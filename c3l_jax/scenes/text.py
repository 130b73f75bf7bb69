"""The scenes world's text: captions, grounded and generic QA, descriptions, and their vocabulary.

`captions`, `grounded_qa` (kinds colour, shape, count, position, relation, existence), `generic_qa`
(facts true for any image: the language prior), `detailed_description`. Every word they emit is in
`vocabulary()` (lower case; `. , ?` are separate tokens; `Question:` and `Answer:` are tokens);
`tokenize_words` / `detokenize_words` convert between text and those tokens, `parse_qa_text` splits
`Question: ... Answer: ...`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from c3l_jax.scenes.world import (BACKGROUNDS, COLOURS, SHAPES, SIZES, THEMES, Scene, SceneObject,
                                  object_names)

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


def referable_objects(scene: Scene, use_colour: bool = True, use_position: bool = True
                      ) -> list[tuple[SceneObject, str]]:
  """`(object, referring expression)` for each object of `scene` that has one, in scene order."""
  return [(o, r) for o in scene.objects if (r := referring_expression(scene, o, use_colour, use_position))]


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
  cands = referable_objects(scene, use_colour=False)
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
  cands = referable_objects(scene, use_position=False)
  if not cands:
    return None
  o, ref = _choice(rng, cands)
  where = _choice(rng, [_CELL_PRECISE, _CELL_LOOSE])[o.cell]
  q = _choice(rng, ["where is the {r} ?", "where is the {r} located ?", "where can you see the {r} ?"])
  a = _choice(rng, ["{w}", "the {r} is {w} .", "it is {w} ."])
  return q.format(r=ref), a.format(r=ref, w=where)


def _qa_relation(scene, rng):
  cands = referable_objects(scene, use_position=False)
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
  refs = referable_objects(scene, use_position=False)
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


__all__ = ["NUMBER_WORDS", "PUNCTUATION", "QA_KINDS", "SPECIAL_TOKENS", "WORLD_COLOURS", "captions",
           "detailed_description", "detokenize_words", "generic_qa", "grounded_qa", "parse_qa_text",
           "referable_objects", "referring_expression", "tokenize_words", "vocabulary"]
