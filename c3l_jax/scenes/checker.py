"""The scenes world's checker: is a QA pair image-dependent, correct, hallucinating?

`check(scene, question, answer) -> Verdict`:

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
import re
from collections.abc import Iterable, Sequence
from typing import Any

from c3l_jax.scenes.text import (NUMBER_WORDS, WORLD_COLOURS, _ARMS, _CORNERS, _MIX, _OPPOSITE, _POINTS,
                                 _SIDES, _relation_holds)
from c3l_jax.scenes.world import BACKGROUNDS, COLOURS, SHAPES, SIZES, Scene, SceneObject, object_names

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


def _question_tokens(question: str) -> list[str]:
  """A question's normalised words, without punctuation."""
  return [t for t in _normalize(question) if t not in {".", "!", ";", ",", "?"}]


def question_referents(scene: Scene, question: str) -> list[SceneObject]:
  """The objects of `scene` a question about one referent describes, resolved as `check` resolves the
  referent of a colour / shape / position question: "what colour is the small cross ?", "where is the
  star in the bottom left ?". A colour word counts as a description unless the question asks for a
  colour. (For the scenes recipe's answer probe; `check` is unchanged.)"""
  q = _question_tokens(question)
  return _match(scene, _question_desc(_chunks(q), with_colour_toks="colour" not in q))


def check(scene: Scene, question: str, answer: str) -> Verdict:
  """Judges one QA pair against the scene (definitions in the module docstring)."""
  q = _question_tokens(question)
  a = _normalize(answer)
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


__all__ = ["FOREIGN_SHAPES", "Verdict", "check"]
