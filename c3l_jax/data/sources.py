"""Where the pipeline's images come from, behind one interface (docs/design.md, "Data flow").

`config.data.source`:
  records  `data.records` JSONL (`id`, `image` relative to `data.image_root`; any other image set)
  coco     COCO 2014 through the tfds builder of `c3l_jax.data.coco` (`data.coco_dir`, `data.split`)
  ''       coco when `data.coco_dir` is set, else records
  other    a source a testbed registered (`c3l_jax.registry`; e.g. `scenes`, the synthetic world of
           `c3l_jax.scenes`, with `config.plugins="c3l_jax.scenes"`)

Records name their image by `image` (a path under `image_root`, or a tfds element's `file_name`);
`ImageSource.load(image)` returns the RGB picture (LLaVA's `pad` aspect mode applied when configured)
or raises `ImageError` with the quarantine reason (also for a path that leaves `data.image_root`,
`images.image_path`, unless `data.allow_outside_root`). Decoded pictures are kept in a bounded LRU cache
(`data.image_cache` pictures), so a process's memory does not grow with the number of images it sees.

Listing reads no image: `count(limit)` and `items(limit, positions)` come from the records file, or for
a tfds-backed source from the index its element sequence stores when the dataset is prepared
(`file_names()`, `image_ids()` and optionally `objects()`, in element order: COCO keeps them in the
dataset's metadata, the scenes world derives ids and names from its config). A stage that shards the
images over processes asks `items` for its own shards' `positions` only. Ground truth (`captions`,
`objects`, `annotation`) is filled only where asked for (`ground_truth`: eval's POPE asks for the
objects, the scenes VQA for the annotation), from the index when it stores the field, else by reading
each listed item's element. A source whose sequence stores no index (a dataset prepared by an older
version) is listed by reading every element once (logged).
"""

from __future__ import annotations

import collections
import dataclasses
import os
from typing import Any, Iterable, Sequence

from absl import logging

import PIL.Image

from c3l_jax import registry
from c3l_jax.data.images import ImageError, image_path, load_image
from c3l_jax.data.records import BadInput, read_records, reject


@dataclasses.dataclass(frozen=True)
class ImageItem:
  """One image to generate for: `image` is the key records use; the rest is ground truth if any."""

  image: str
  image_id: str
  captions: tuple[str, ...] = ()
  objects: tuple[str, ...] = ()
  annotation: str = ""


GROUND_TRUTH = ("captions", "objects", "annotation")  # the `ImageItem` fields a tfds element fills


def source_kind(config: Any) -> str:
  kind = config.data.source
  if not kind:
    kind = "coco" if config.data.coco_dir else "records"
  return kind


def tfds_dir(config: Any) -> str:
  return config.data.tfds_dir or os.path.expanduser("~/tensorflow_datasets")


class ImageSource:
  """Lists images (`items`) and loads them by record key (`load`), caching the decoded pictures."""

  def __init__(self, config: Any, split: str | None = None, background: tuple[int, ...] | None = None):
    self.kind = source_kind(config)
    self.config = config
    self.split = split or config.data.split
    self.max_pixels = int(config.data.max_pixels)
    self.background = background if config.data.image_aspect == "pad" else None
    self._elements: Sequence[dict] | None = None
    self._index: dict[str, int] | None = None
    self._listed: list[tuple[str, str]] | None = None  # tfds: (file_name, image_id) per element
    self._objects: list | None = None  # tfds: the stored `objects` index, if any
    self._records: tuple[list[ImageItem], list[dict]] | None = None  # records: (items, rejected lines)
    # The last `data.image_cache` decoded pictures (LRU); the reasons of bad images (small) all kept.
    self._cache: collections.OrderedDict[str, PIL.Image.Image] = collections.OrderedDict()
    self.cache_size = int(getattr(config.data, "image_cache", 64))
    self._errors: dict[str, ImageError] = {}
    self.repeated = 0  # records source: lines naming an image an earlier line already lists

  # -- tfds-backed sources -------------------------------------------------------------------------
  def elements(self) -> Sequence[dict]:
    """The tfds split as a random-access sequence of dicts (prepared on first use)."""
    if self._elements is None:
      if self.kind == "coco":
        if not self.config.data.coco_dir:
          raise BadInput("config.data.source=coco needs config.data.coco_dir (the COCO 2014 root)")
        from c3l_jax.data import coco
        self._elements = coco.load_split(self.config.data.coco_dir, self.split, tfds_dir(self.config))
      elif self.kind in registry.SOURCES:
        self._elements = registry.SOURCES[self.kind].elements(self.config, self.split)
      else:
        raise ValueError(f"source {self.kind!r} has no tfds elements (registered sources: "
                         f"{', '.join(registry.SOURCES) or 'none'}; see config.plugins)")
    return self._elements

  def _listing(self) -> list[tuple[str, str]]:
    """`(file_name, image_id)` of every element, in order: from the index the element sequence stores
    (`file_names()`, `image_ids()`), else by reading every element once."""
    if self._listed is None:
      elements = self.elements()
      names, ids = _stored(elements, "file_names"), _stored(elements, "image_ids")
      if names is None or ids is None or len(names) != len(elements) or len(ids) != len(elements):
        logging.warning("%s %s: no stored file-name / image-id index; listing reads all %d elements "
                        "(image bytes included) once", self.kind, self.split, len(elements))
        names, ids = [], []
        for i in range(len(elements)):  # one element alive at a time
          element = elements[i]
          names.append(element["file_name"])
          ids.append(element["image_id"])
      self._listed = [(str(n), str(i)) for n, i in zip(names, ids)]
      objects = _stored(elements, "objects")
      self._objects = objects if objects is not None and len(objects) == len(elements) else None
    return self._listed

  def _element_index(self) -> dict[str, int]:
    """`file_name -> element index` (from the stored index: no element read)."""
    if self._index is None:
      names = _stored(self.elements(), "file_names")
      if names is None:
        names = [name for name, _ in self._listing()]
      self._index = {str(name): i for i, name in enumerate(names)}
    return self._index

  def element(self, image: str) -> dict:
    """The tfds element of a record's `image` key (its file name)."""
    try:
      return self.elements()[self._element_index()[image]]
    except KeyError:
      raise ImageError(f"missing image {image!r}: not in the {self.kind} {self.split} split") from None

  # -- the interface ---------------------------------------------------------------------------------
  def _read_records(self) -> tuple[list[ImageItem], list[dict]]:
    """records source: one item per distinct image of `data.records` (read once), the rejected lines."""
    if self._records is None:
      if not self.config.data.records:
        raise BadInput("config.data.records is not set: the records source needs a JSONL file of "
                       "{'id', 'image'} lines (or set data.coco_dir, or a registered data.source)")
      recs, rejected = read_records(self.config.data.records, required=("id", "image"),
                                    strict=self.config.strict)
      items, seen = [], set()
      self.repeated = 0
      for rec in recs:
        if rec["image"] in seen:  # several QA records of one image: generate for the image once
          self.repeated += 1
          continue
        seen.add(rec["image"])
        items.append(ImageItem(image=rec["image"], image_id=rec["id"],
                               captions=tuple(c for c in [rec.get("caption")] if c)))
      self._records = items, rejected
    return self._records

  def count(self, limit: int = 0) -> int:
    """How many images `items(limit)` lists (at most `limit`, 0 = all); reads no image."""
    n = len(self._read_records()[0]) if self.kind == "records" else len(self._listing())
    return min(limit, n) if limit else n

  def items(self, limit: int = 0, positions: Iterable[int] | None = None,
            ground_truth: bool | Sequence[str] = True) -> tuple[list[ImageItem], list[dict]]:
    """The images to generate for (at most `limit`, 0 = all) and the input lines rejected on reading.

    positions: only the items at these positions of the listing (ascending order out; positions past
      `count(limit)` are ignored), e.g. the images of this process's shards; None = all.
    ground_truth: tfds sources, the fields of `GROUND_TRUTH` to fill (True = all, False = none): from
      the stored index where it holds them (`objects`), else from each listed item's element (read
      whole, image bytes included). False reads no element.
    """
    n = self.count(limit)
    keep = range(n) if positions is None else sorted({p for p in positions if 0 <= p < n})
    if self.kind == "records":
      items, rejected = self._read_records()
      return [items[p] for p in keep], rejected
    listed = self._listing()
    fields = set(GROUND_TRUTH if ground_truth is True else ground_truth or ())
    if fields - set(GROUND_TRUTH):
      raise ValueError(f"ground_truth fields must be among {GROUND_TRUTH}, not {sorted(fields)}")
    stored = {"objects": self._objects} if self._objects is not None else {}
    read = fields - set(stored)
    out = []
    for p in keep:
      truth = {f: tuple(stored[f][p]) for f in fields & set(stored)}
      if read:
        el = self.elements()[p]
        truth.update({f: (el.get(f) or "") if f == "annotation" else tuple(el[f]) for f in read})
      out.append(ImageItem(image=listed[p][0], image_id=listed[p][1], **truth))
    return out, []

  def load(self, image: str) -> PIL.Image.Image:
    """The RGB picture of record key `image`, or `ImageError` (the last `data.image_cache` pictures and
    every error are cached)."""
    if image in self._errors:
      raise self._errors[image]
    if image in self._cache:
      self._cache.move_to_end(image)
      return self._cache[image]
    try:
      value = self._load(image)
    except ImageError as e:
      self._errors[image] = e
      raise
    if self.cache_size > 0:
      self._cache[image] = value
      while len(self._cache) > self.cache_size:
        self._cache.popitem(last=False)
    return value

  def _load(self, image: str) -> PIL.Image.Image:
    if self.kind == "records":
      path = image_path(self.config.data.image_root, image, self.config.data.allow_outside_root)
      img = load_image(path, self.max_pixels)
    else:
      from c3l_jax.data.images import load_image_bytes
      data = self.element(image)["image_bytes"]
      if not data:
        raise ImageError(f"missing image file {image}")
      img = load_image_bytes(data, self.max_pixels, name=image)
    if self.background is not None:
      from c3l_jax.data.images import expand_to_square
      img = expand_to_square(img, self.background)
    return img


def _stored(elements: Sequence[dict], name: str) -> list | None:
  """The element sequence's stored index `name` (a method returning a list, or None), if it has one."""
  method = getattr(elements, name, None)
  return method() if callable(method) else None


def open_source(config: Any, builder: Any | None = None, split: str | None = None) -> ImageSource:
  """The configured image source; `builder` (a `PromptBuilder`) gives the `pad` background colour."""
  background = None
  if builder is not None and config.data.image_aspect == "pad":
    from c3l_jax.data.images import pad_background
    background = pad_background(builder.processor.image_processor)
  return ImageSource(config, split, background)


__all__ = ["ImageItem", "ImageSource", "open_source", "reject", "source_kind", "tfds_dir"]
