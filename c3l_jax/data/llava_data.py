"""LLaVA-format instruction data, read as a stream, checked entry by entry (no jax).

The format of `llava_v1_5_mix665k.json`, LLaVA-Instruct-150K and ShareGPT4V: one JSON array of

    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                       {"from": "gpt", "value": "The bus is white and red."}, ...]}

(`image` absent for a text-only entry), or the same entries one per line (JSONL). `iter_entries` reads
either without loading the file: the array through `ijson` (a C parser, one entry in memory at a time),
JSONL line by line; `detect_format` tells them apart from the first character.

`check_entry` turns an entry into a `Conversation` (its questions and answers, the image, the source) or
a quarantine reason: no conversations, `conversations` not a list, turns that do not alternate
human / gpt (or end on a question), an empty value, `<image>` missing, repeated or outside the first
human turn (or present in an entry with no image), an image path that leaves the image root
(`images.image_path`), a missing id, a duplicate id. Images themselves (missing, unreadable) and the
context length are checked where they are loaded and tokenized (`c3l_jax.pipeline.curate`).

The image goes where LLaVA's training puts it: `preprocess_multimodal` removes `<image>` from the first
human turn, strips it and puts the image in front (`"<image>\\nQ"` and `"Q\\n<image>"` both become the
question `Q` with the image before it); later turns are used as they are.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Iterator

import numpy as np

from c3l_jax.data.images import ImageError, image_path
from c3l_jax.data.records import BadInput

IMAGE_TAG = "<image>"
FORMATS = ("auto", "json", "jsonl")
ROLES = ("human", "gpt")


def detect_format(path: str) -> str:
  """`json` (the file starts with `[`) or `jsonl` (with `{`); anything else is a `BadInput`."""
  try:
    with open(path, "rb") as f:
      head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
  except OSError as e:
    raise BadInput(f"{path}: cannot read the dataset file ({e.strerror or e})") from None
  if head.startswith(b"["):
    return "json"
  if head.startswith(b"{"):
    return "jsonl"
  raise BadInput(f"{path}: not a LLaVA-format dataset (a JSON array of entries, or one JSON entry per "
                 f"line); it starts with {head[:20]!r}")


@dataclasses.dataclass
class Raw:
  """One entry as read: `value` the parsed JSON (None when `problem`), `index` its position among the
  file's entries (0-based), `line` its line in a JSONL file (0 for a JSON array)."""

  index: int
  value: Any
  problem: str | None = None
  line: int = 0
  text: str = ""  # the raw line of an unparsable JSONL line


def iter_entries(path: str, fmt: str = "auto") -> Iterator[Raw]:
  """Every entry of the file in order, one in memory at a time.

  JSONL: an unparsable line comes back with `problem` (to quarantine); blank lines are skipped. JSON:
  the array is parsed incrementally; a syntax error in it ends the stream with a `BadInput` naming the
  entry after which it was found (the rest of an array cannot be read past a syntax error).
  """
  fmt = detect_format(path) if fmt == "auto" else fmt
  if fmt == "jsonl":
    from c3l_jax.data.records import _lines, _parse_line  # the records reader's line handling
    index = 0
    for lineno, raw in _lines(path):
      problem, value = _parse_line(raw)
      if problem and problem.startswith("a record must be"):
        problem, value = None, json.loads(raw)  # a non-object entry: check_entry says why
      text = raw if isinstance(raw, str) else raw.decode("utf-8", "replace")
      yield Raw(index, None if problem else value, problem, lineno, text if problem else "")
      index += 1
    return
  if fmt != "json":
    raise ValueError(f"format must be one of {FORMATS}, not {fmt!r}")
  import ijson

  index = 0
  with open(path, "rb") as f:
    try:
      for value in ijson.items(f, "item", use_float=True):
        yield Raw(index, value)
        index += 1
    except ijson.JSONError as e:
      raise BadInput(f"{path}: not a valid JSON array after entry {index} ({e})") from None
  if index == 0:
    with open(path, "rb") as f:
      if not f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
        raise BadInput(f"{path}: not a JSON array")


@dataclasses.dataclass
class Conversation:
  """A checked entry: `turns[k] = (question k, answer k)`, the first question without `<image>`."""

  id: Any
  image: str | None  # the path under the image root; None = text-only
  source: str  # the first directory of the image path ("." for an image at the top level; "" text-only)
  turns: list[tuple[str, str]]


def entry_id(entry: Any) -> Any:
  """The entry's id when it has a usable one (a string or an integer), else None."""
  if isinstance(entry, dict):
    value = entry.get("id")
    if isinstance(value, (str, int)) and not isinstance(value, bool):
      return value
  return None


def source_of(image: str) -> str:
  """An entry's source: the first directory of its image path (`coco`, `gqa`, `ocr_vqa`, ...)."""
  parts = [p for p in image.replace("\\", "/").split("/") if p not in ("", ".")]
  return parts[0] if len(parts) > 1 else "."


class IdSet:
  """The ids seen so far, as 64-bit hashes (blake2b) in an open-addressing table (a numpy array, doubled
  when half full): 8-16 bytes an id, allocated in a few large steps, so 665k ids take 16 MB where a set
  of Python strings would take ~50 MB and fragment the heap. A false duplicate needs two ids to share
  63 bits (for 665k ids, a chance of about 1 in 10^7)."""

  def __init__(self, capacity: int = 1 << 16):
    self._table = np.zeros(capacity, np.uint64)  # 0 = empty; hashes have their lowest bit set
    self._n = 0

  @staticmethod
  def _hash(value: Any) -> int:
    key = json.dumps(value).encode()  # "1" and 1 are different ids
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") | 1

  def _slot(self, table: np.ndarray, h: int) -> tuple[int, bool]:
    """(the slot of `h` in `table`, whether it is there already); linear probing."""
    mask = len(table) - 1
    i = h & mask
    while True:
      t = int(table[i])
      if t == 0 or t == h:
        return i, t == h
      i = (i + 1) & mask

  def add(self, value: Any) -> bool:
    """Add `value`; False when it was already there."""
    h = self._hash(value)
    i, found = self._slot(self._table, h)
    if found:
      return False
    self._table[i] = h
    self._n += 1
    if 2 * self._n > len(self._table):
      old, self._table = self._table, np.zeros(2 * len(self._table), np.uint64)
      for h in old[old != 0]:  # one numpy scalar at a time: no list of every id
        h = int(h)
        self._table[self._slot(self._table, h)[0]] = h
    return True

  def __len__(self) -> int:
    return self._n


def check_entry(entry: Any, image_root: str, allow_outside_root: bool = False
                ) -> tuple[str | None, Conversation | None]:
  """`(reason, None)` for an entry to quarantine, else `(None, Conversation)` (ids are checked apart,
  `IdSet`)."""
  if not isinstance(entry, dict):
    return f"an entry must be a JSON object, got {type(entry).__name__}", None
  if entry_id(entry) is None:
    got = "missing" if "id" not in entry else f"a {type(entry['id']).__name__}"
    return f"no usable 'id' (a string or an integer; got {got})", None
  if "conversations" not in entry:
    return "no conversations (the entry has no 'conversations' field)", None
  conv = entry["conversations"]
  if not isinstance(conv, list):
    return f"'conversations' is not a list (got {type(conv).__name__})", None
  if not conv:
    return "no conversations ('conversations' is empty)", None
  for k, turn in enumerate(conv):
    want = ROLES[k % 2]
    if not isinstance(turn, dict) or turn.get("from") != want:
      got = turn.get("from") if isinstance(turn, dict) else type(turn).__name__
      return (f"turns do not alternate human/gpt: turn {k} is {got!r}, expected {want!r}"), None
    value = turn.get("value")
    if not isinstance(value, str):
      return f"turn {k} ({want}) has no string 'value' (got {type(value).__name__})", None
    if not value.strip():
      return f"empty value in turn {k} ({want})", None
  if len(conv) % 2:
    return f"turns do not alternate human/gpt: the last turn ({len(conv) - 1}) is a question with no " \
           "answer", None
  image = entry.get("image")
  tags = [turn["value"].count(IMAGE_TAG) for turn in conv]
  if image is None:
    if any(tags):
      return f"{IMAGE_TAG} in turn {next(k for k, n in enumerate(tags) if n)} of an entry without an " \
             "image", None
  else:
    if not isinstance(image, str) or not image.strip():
      return f"field 'image' must be a non-empty string (got {image!r})", None
    outside = next((k for k, n in enumerate(tags) if n and k > 0), None)
    if outside is not None:
      return f"{IMAGE_TAG} outside the first human turn (turn {outside}, {ROLES[outside % 2]})", None
    if tags[0] == 0:
      return f"{IMAGE_TAG} missing: the entry has an image but its first human turn has no " \
             f"{IMAGE_TAG}", None
    if tags[0] > 1:
      return f"{IMAGE_TAG} repeated: {tags[0]} in the first human turn", None
    try:
      image_path(image_root, image, allow_outside_root)
    except ImageError as e:
      return str(e), None
  values = [turn["value"] for turn in conv]
  if image is not None:
    values[0] = values[0].replace(IMAGE_TAG, "").strip()  # LLaVA's preprocess_multimodal
  turns = list(zip(values[0::2], values[1::2]))
  return None, Conversation(entry["id"], image, source_of(image) if image is not None else "", turns)


__all__ = ["Conversation", "FORMATS", "IdSet", "Raw", "check_entry", "detect_format", "entry_id",
           "iter_entries", "source_of"]
