"""COCO 2014 as a tensorflow-datasets builder (array_record), prepared from a manual download, read
without TensorFlow.

The manual directory is the COCO root laid out as the official download:

  COCO_DIR/train2014/COCO_train2014_000000000009.jpg ...      (train2014.zip)
  COCO_DIR/val2014/COCO_val2014_000000000042.jpg ...          (val2014.zip)
  COCO_DIR/annotations/captions_{train,val}2014.json           (annotations_trainval2014.zip)
  COCO_DIR/annotations/instances_{train,val}2014.json

Split "train" comes from train2014/, "val" from val2014/. A split is generated when its image folder and
its captions file exist; otherwise it is left out (and asking for it later is a clear error). The
instances file is optional: without it `objects` is empty (logged at preparation).

One element per image listed in the split's annotation files (captions and instances, by image id),
in ascending image id order:

  image_bytes  bytes      the file as stored, undecoded (a corrupt file is kept, so the pipeline can
                          quarantine it); b"" when the image is listed but absent on disk (the build
                          does not fail: the pipeline quarantines it as a missing image)
  image_id     int
  file_name    str        e.g. "COCO_val2014_000000000042.jpg" (from the annotations)
  captions     list[str]  in annotation id order, whitespace stripped, empty ones dropped
  objects      list[str]  the distinct category names of the image's instances, sorted
  annotation   str        "" for COCO (other builders put JSON there)

`load_split(coco_dir, split, data_dir)` prepares on first use (no network: `download_and_prepare` with
`manual_dir=coco_dir`) into `data_dir/coco2014/1.0.0/` and returns a random-access sequence of plain
python dicts. What the raw `tfds.data_source("coco2014", ...)` returns is bytes for every string
(`file_name`, `annotation`, each caption), a python int for `image_id`, a list of bytes for `captions`
and a numpy object array of bytes for `objects`; `load_split` converts them.
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any, overload

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from c3l_jax import console

SPLITS = ("train", "val")
_FOLDERS = {"train": "train2014", "val": "val2014"}
NAME = "coco2014"
DATASET_VERSION = "1.0.0"


def split_files(coco_dir: str, split: str) -> dict[str, str]:
  """The paths a split is made from: `images` (folder), `captions` and `instances` (json files)."""
  folder = _FOLDERS[split]
  return {
      "images": os.path.join(coco_dir, folder),
      "captions": os.path.join(coco_dir, "annotations", f"captions_{folder}.json"),
      "instances": os.path.join(coco_dir, "annotations", f"instances_{folder}.json"),
  }


def available_splits(coco_dir: str) -> list[str]:
  """The splits whose image folder and captions file exist under `coco_dir`."""
  out = []
  for split in SPLITS:
    files = split_files(coco_dir, split)
    if os.path.isdir(files["images"]) and os.path.isfile(files["captions"]):
      out.append(split)
  return out


def _no_split_message(coco_dir: str) -> str:
  wanted = " and/or ".join(f"{files['images']}/ + {files['captions']}"
                           for files in (split_files(coco_dir, s) for s in SPLITS))
  return f"no COCO 2014 split under {coco_dir!r}: expected {wanted}"


def _read_json(path: str) -> dict:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


class Coco2014(tfds.core.GeneratorBasedBuilder):
  """COCO 2014 images with captions and object categories, from a manual download (see module doc)."""

  VERSION = tfds.core.Version(DATASET_VERSION)
  RELEASE_NOTES = {DATASET_VERSION: "image bytes, image id, file name, captions, object categories"}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download train2014.zip, val2014.zip and annotations_trainval2014.zip from https://cocodataset.org
  and unzip them into one directory (the manual dir), giving train2014/, val2014/ and annotations/
  (captions_*2014.json, instances_*2014.json). Pass it as config.data.coco_dir.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="COCO 2014 (train2014 / val2014) images with captions and object categories.",
        features=tfds.features.FeaturesDict({
            # Scalar object dtype: stored and returned as raw bytes, never decoded (no TF needed).
            "image_bytes": tfds.features.Scalar(dtype=np.object_),
            "image_id": tfds.features.Scalar(dtype=np.int64),
            "file_name": tfds.features.Text(),
            "captions": tfds.features.Sequence(tfds.features.Text()),
            "objects": tfds.features.Tensor(shape=(None,), dtype=np.object_),
            "annotation": tfds.features.Text(),
        }),
        homepage="https://cocodataset.org",
        disable_shuffling=True,  # elements in ascending image id order
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
    coco_dir = os.fspath(dl_manager.manual_dir)
    splits = available_splits(coco_dir)
    if not splits:
      raise FileNotFoundError(_no_split_message(coco_dir))
    self.info.metadata["coco_dir"] = os.path.realpath(coco_dir)
    self.info.metadata["splits"] = splits
    return {split: self._generate_examples(split_files(coco_dir, split), split) for split in splits}

  def _generate_examples(self, files: dict[str, str], split: str = ""
                         ) -> Iterator[tuple[int, dict[str, Any]]]:
    """One (image id, element) per image listed in the captions / instances files.

    The split's file names, image ids and object names in element order (ascending image id) go to
    the dataset's metadata (`file_names_<split>`, `image_ids_<split>`, `objects_<split>`): the index
    `ImageSource` lists the split (and POPE finds its objects) and maps a record's `image` with, read
    without touching the image bytes. Captions stay in the elements only (~25 MB for train2014).
    """
    file_names: dict[int, str] = {}
    captions: dict[int, list[tuple[int, str]]] = collections.defaultdict(list)
    objects: dict[int, set[str]] = collections.defaultdict(set)

    data = _read_json(files["captions"])
    for image in data.get("images", []):
      file_names[int(image["id"])] = image["file_name"]
    for ann in data.get("annotations", []):
      text = str(ann.get("caption", "")).strip()
      if text:
        captions[int(ann["image_id"])].append((int(ann.get("id", 0)), text))
    del data
    if os.path.isfile(files["instances"]):
      data = _read_json(files["instances"])
      names = {int(c["id"]): c["name"] for c in data.get("categories", [])}
      for image in data.get("images", []):
        file_names.setdefault(int(image["id"]), image["file_name"])
      for ann in data.get("annotations", []):
        objects[int(ann["image_id"])].add(names[int(ann["category_id"])])
      del data
    else:
      logging.warning("COCO: %s is absent; `objects` is empty for every image of this split",
                      files["instances"])

    if split:
      self.info.metadata[f"file_names_{split}"] = [file_names[i] for i in sorted(file_names)]
      self.info.metadata[f"image_ids_{split}"] = sorted(file_names)
      self.info.metadata[f"objects_{split}"] = [sorted(objects.get(i, ())) for i in sorted(file_names)]
    missing = 0
    for image_id in sorted(file_names):
      file_name = file_names[image_id]
      path = os.path.join(files["images"], file_name)
      try:
        with open(path, "rb") as f:
          image_bytes = f.read()
      except FileNotFoundError:
        image_bytes = b""
        missing += 1
      yield image_id, {
          "image_bytes": image_bytes,
          "image_id": image_id,
          "file_name": file_name,
          "captions": [text for _, text in sorted(captions.get(image_id, []))],
          "objects": sorted(objects.get(image_id, ())),
          "annotation": "",
      }
    if missing:
      logging.warning("COCO: %d of %d images listed in %s are absent from %s (stored with empty "
                      "image_bytes)", missing, len(file_names), files["captions"], files["images"])


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)


def to_python(element: dict[str, Any]) -> dict[str, Any]:
  """A raw data-source element as plain python: bytes, int, str, list[str]."""
  return {
      "image_bytes": bytes(element["image_bytes"]),
      "image_id": int(element["image_id"]),
      "file_name": _text(element["file_name"]),
      "captions": [_text(c) for c in element["captions"]],
      "objects": [_text(o) for o in element["objects"]],
      "annotation": _text(element["annotation"]),
  }


class CocoSplit(Sequence):
  """A prepared split: `len()`, `split[i]` (negative too) and `split[a:b]` give plain python dicts."""

  def __init__(self, source: Any, split: str, path: str, file_names: Sequence[str] | None = None,
               image_ids: Sequence[int] | None = None,
               objects: Sequence[Sequence[str]] | None = None) -> None:
    self._source = source
    self.split = split
    self.path = path  # the prepared dataset directory
    self._file_names = list(file_names) if file_names is not None else None
    self._image_ids = [int(i) for i in image_ids] if image_ids is not None else None
    self._objects = [list(o) for o in objects] if objects is not None else None

  def file_names(self) -> list[str] | None:
    """Every element's `file_name`, in order, from the index stored when the split was prepared
    (None for a dataset prepared before the index existed)."""
    return self._file_names

  def image_ids(self) -> list[int] | None:
    """Every element's `image_id`, in order, from the index stored when the split was prepared (None
    for a dataset prepared before it was stored)."""
    return self._image_ids

  def objects(self) -> list[list[str]] | None:
    """Every element's `objects`, in order, from the index stored when the split was prepared (None
    for a dataset prepared before it was stored)."""
    return self._objects

  def __len__(self) -> int:
    return len(self._source)

  @overload
  def __getitem__(self, index: int) -> dict[str, Any]: ...

  @overload
  def __getitem__(self, index: slice) -> list[dict[str, Any]]: ...

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.getitems(range(*index.indices(len(self))))
    index = int(index)
    n = len(self)
    if not -n <= index < n:
      raise IndexError(f"index {index} out of range for the {n} elements of COCO {self.split}")
    return to_python(self._source[index % n])

  def getitems(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    """Several elements in one batched read."""
    indices = [int(i) for i in indices]
    if not indices:
      return []
    return [to_python(e) for e in self._source.__getitems__(indices)]

  def __repr__(self) -> str:
    return f"CocoSplit({self.split!r}, {len(self)} images, {self.path!r})"


def load_split(coco_dir: str, split: str, data_dir: str) -> CocoSplit:
  """COCO 2014 `split` ("train" | "val") as a random-access sequence of plain dicts (see module doc).

  The first call prepares the dataset from `coco_dir` into `data_dir/coco2014/1.0.0/` (every split
  present, no network); later calls read it, and refuse a dataset prepared from another `coco_dir`
  ("" = read whatever is prepared). `data_dir` "" = tfds' default (~/tensorflow_datasets).
  Preparation writes to a temporary folder renamed at the end, so an interrupted one starts over; run
  it once (one process) before several processes read the same `data_dir`.

  Raises:
    ValueError: `split` is not train/val; or it was not prepared (its files were absent); or the
      prepared dataset was made from another COCO directory.
    FileNotFoundError: nothing is prepared and `coco_dir` holds no split.
  """
  if split not in SPLITS:
    raise ValueError(f"COCO 2014 split must be one of {SPLITS}, not {split!r}")
  builder = Coco2014(data_dir=data_dir or None, file_format="array_record")
  path = os.fspath(builder.data_dir)
  if not os.path.isfile(os.path.join(path, "dataset_info.json")):  # not prepared (or interrupted)
    if not os.path.isdir(coco_dir):
      raise FileNotFoundError(f"COCO directory {coco_dir!r} does not exist (config.data.coco_dir: the "
                              "COCO 2014 root with train2014/, val2014/, annotations/)")
    if not available_splits(coco_dir):
      raise FileNotFoundError(_no_split_message(coco_dir))
    logging.info("Preparing COCO 2014 from %s into %s (once)", coco_dir, path)
    console.prepare_tfds(builder, "COCO 2014",
                         download_config=tfds.download.DownloadConfig(manual_dir=coco_dir))
    builder = Coco2014(data_dir=data_dir or None, file_format="array_record")
  prepared_from = builder.info.metadata.get("coco_dir", "")
  if coco_dir and prepared_from and prepared_from != os.path.realpath(coco_dir):
    raise ValueError(f"the COCO dataset in {path} was prepared from {prepared_from!r}, not {coco_dir!r}: "
                     f"use that directory, another config.data.tfds_dir, or delete {path} to prepare again")
  if split not in builder.info.splits:
    files = split_files(coco_dir, split)
    raise ValueError(f"COCO split {split!r} was not prepared in {path} (found: "
                     f"{', '.join(sorted(builder.info.splits)) or 'none'}): {files['images']}/ or "
                     f"{files['captions']} was absent then. Add them and delete {path} to prepare again")
  n = builder.info.splits[split].num_examples
  index = {key: builder.info.metadata.get(f"{key}_{split}")
           for key in ("file_names", "image_ids", "objects")}
  index = {key: value if value is not None and len(value) == n else None
           for key, value in index.items()}
  if None in index.values():
    logging.warning("COCO %s in %s has no complete index (prepared by an older version): listing it "
                    "reads every element once; delete %s to prepare it again", split, path, path)
  return CocoSplit(builder.as_data_source(split=split), split, path, **index)


__all__ = ["Coco2014", "CocoSplit", "SPLITS", "available_splits", "load_split", "split_files",
           "to_python"]
