"""The COCO 2014 tfds builder on a tiny fake COCO tree: prepared and read with TensorFlow absent."""

from __future__ import annotations

import base64
import io
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent

CATEGORIES = [{"id": 1, "name": "person"}, {"id": 17, "name": "cat"}, {"id": 18, "name": "dog"}]
CORRUPT = b"\xff\xd8\xff\xe0 definitely not a jpeg"


def jpeg(color: tuple[int, int, int], size: tuple[int, int] = (8, 6)) -> bytes:
  buf = io.BytesIO()
  PIL.Image.new("RGB", size, color).save(buf, "JPEG", quality=95)
  return buf.getvalue()


def write_split(root: pathlib.Path, folder: str, images: dict[int, bytes | None],
                captions: list[tuple[int, int, str]], instances: list[tuple[int, int]] | None,
                extra_listed: tuple[int, ...] = ()) -> None:
  """images: id -> file bytes (None = listed in the annotations but absent on disk)."""
  (root / folder).mkdir(parents=True, exist_ok=True)
  (root / "annotations").mkdir(exist_ok=True)
  name = lambda i: f"COCO_{folder}_{i:012d}.jpg"  # noqa: E731
  for i, data in images.items():
    if data is not None:
      (root / folder / name(i)).write_bytes(data)
  listed = [{"id": i, "file_name": name(i), "width": 8, "height": 6} for i in images]
  (root / "annotations" / f"captions_{folder}.json").write_text(json.dumps({
      "images": [im for im in listed if im["id"] not in extra_listed],
      "annotations": [{"id": a, "image_id": i, "caption": c} for a, i, c in captions]}))
  if instances is not None:
    (root / "annotations" / f"instances_{folder}.json").write_text(json.dumps({
        "images": listed, "categories": CATEGORIES,
        "annotations": [{"id": n, "image_id": i, "category_id": c, "bbox": [0, 0, 1, 1]}
                        for n, (i, c) in enumerate(instances)]}))


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> dict:
  """A fake COCO root: val has a corrupt file and a listed-but-missing image; train an image only
  the instances file lists."""
  root = tmp_path_factory.mktemp("coco")
  val = {73: CORRUPT, 42: jpeg((200, 10, 10)), 99: None}
  write_split(root, "val2014", val,
              captions=[(7, 42, "  A red square.\n"), (3, 42, "a café sign"), (8, 42, "   "),
                        (5, 73, "broken")],
              instances=[(42, 18), (42, 17), (42, 18), (99, 1)])
  train = {9: jpeg((0, 0, 255)), 25: jpeg((0, 255, 0), (5, 5)), 30: jpeg((9, 9, 9))}
  write_split(root, "train2014", train, captions=[(1, 9, "blue"), (2, 25, "green")],
              instances=[(25, 1), (25, 18)], extra_listed=(30,))
  (root / "train2014" / "COCO_train2014_000000000777.jpg").write_bytes(jpeg((1, 1, 1)))  # unlisted
  return {"root": root, "val": val, "train": train, "data_dir": tmp_path_factory.mktemp("tfds")}


BLOCK_TF_AND_READ = r"""
import base64, importlib.machinery, importlib.util, json, sys
class HideTensorFlow(importlib.machinery.PathFinder):  # as if not installed, even where it is
  @classmethod
  def find_spec(cls, name, path=None, target=None):
    if name.split(".")[0] == "tensorflow":
      return None
    return super().find_spec(name, path, target)
sys.meta_path[:] = [HideTensorFlow if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
try:
  import tensorflow  # noqa
  sys.exit("tensorflow importable")
except ImportError:
  pass
assert importlib.util.find_spec("tensorflow") is None
import tensorflow_datasets as tfds
from c3l_jax.data import coco
coco_dir, data_dir = sys.argv[1:3]
out = {}
for split in ("val", "train"):
  elements = coco.load_split(coco_dir, split, data_dir)
  out[split] = [dict(e, image_bytes=base64.b64encode(e["image_bytes"]).decode()) for e in elements]
raw = tfds.data_source("coco2014", split="val", data_dir=data_dir)[0]
out["raw_types"] = {k: type(v).__name__ for k, v in raw.items()}
out["raw_objects"] = [type(v).__name__ for v in raw["objects"]] + [str(raw["objects"].dtype)]
out["raw_captions"] = [type(v).__name__ for v in raw["captions"]]
out["tensorflow_loaded"] = sorted(m for m in sys.modules if m.split(".")[0] == "tensorflow")
print("RESULT" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def prepared(coco) -> dict:
  """Prepare and read the fake tree in a fresh interpreter where `import tensorflow` fails (whether or
  not TensorFlow is installed)."""
  proc = subprocess.run([sys.executable, "-c", BLOCK_TF_AND_READ, str(coco["root"]), str(coco["data_dir"])],
                        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                        env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
  return json.loads(line[len("RESULT"):])


def test_builds_and_reads_without_tensorflow(coco, prepared):
  assert prepared["tensorflow_loaded"] == []
  val = prepared["val"]
  assert [e["image_id"] for e in val] == [42, 73, 99]  # ascending image id
  assert set(val[0]) == {"image_bytes", "image_id", "file_name", "captions", "objects", "annotation"}
  by_id = {e["image_id"]: e for e in val}
  assert base64.b64decode(by_id[42]["image_bytes"]) == coco["val"][42]
  assert base64.b64decode(by_id[73]["image_bytes"]) == CORRUPT  # stored as it is, to quarantine later
  assert by_id[99]["image_bytes"] == ""  # listed, absent on disk: empty, the build went on
  assert by_id[42]["file_name"] == "COCO_val2014_000000000042.jpg"
  assert by_id[42]["captions"] == ["a café sign", "A red square."]  # annotation id order, stripped
  assert by_id[42]["objects"] == ["cat", "dog"]  # distinct, sorted
  assert by_id[73]["objects"] == [] and by_id[73]["captions"] == ["broken"]
  assert by_id[99]["objects"] == ["person"] and by_id[99]["captions"] == []
  assert all(e["annotation"] == "" for e in val)

  train = {e["image_id"]: e for e in prepared["train"]}
  assert sorted(train) == [9, 25, 30]  # 777 is on disk but in no annotation file
  assert base64.b64decode(train[25]["image_bytes"]) == coco["train"][25]
  assert train[25]["objects"] == ["dog", "person"] and train[25]["captions"] == ["green"]
  assert train[30]["captions"] == [] and base64.b64decode(train[30]["image_bytes"]) == coco["train"][30]

  # What tfds itself hands back in data_source mode (load_split converts it).
  assert prepared["raw_types"] == {"image_bytes": "bytes", "image_id": "int", "file_name": "bytes",
                                   "captions": "list", "objects": "ndarray", "annotation": "bytes"}
  assert prepared["raw_captions"] == ["bytes", "bytes"]
  assert prepared["raw_objects"] == ["bytes", "bytes", "object"]


def test_second_use_reads_without_preparing(coco, prepared, monkeypatch):
  from c3l_jax.data import coco as coco_lib
  from c3l_jax.data.images import ImageError, load_image_bytes

  version_dir = coco["data_dir"] / "coco2014" / "1.0.0"
  before = {p.name: p.stat().st_mtime_ns for p in version_dir.iterdir()}

  def fail(*args, **kwargs):
    raise AssertionError("prepared again")

  monkeypatch.setattr(coco_lib.Coco2014, "_generate_examples", fail)
  monkeypatch.setattr(coco_lib.Coco2014, "download_and_prepare", fail)
  val = coco_lib.load_split(str(coco["root"]), "val", str(coco["data_dir"]))
  assert {p.name: p.stat().st_mtime_ns for p in version_dir.iterdir()} == before
  assert len(val) == 3 and val.path == str(version_dir)
  first = val[0]
  assert isinstance(first["image_bytes"], bytes) and isinstance(first["image_id"], int)
  assert isinstance(first["file_name"], str) and isinstance(first["annotation"], str)
  assert all(isinstance(c, str) for c in first["captions"] + first["objects"])
  assert isinstance(first["objects"], list) and isinstance(first["captions"], list)
  assert val[-1]["image_id"] == 99 and [e["image_id"] for e in val[1:]] == [73, 99]
  assert [e["image_id"] for e in val] == [42, 73, 99]
  assert [e["image_id"] for e in val.getitems([2, 0])] == [99, 42]
  with pytest.raises(IndexError):
    val[3]

  # The stored bytes decode to the picture; the corrupt one fails as the pipeline expects.
  pixels = np.asarray(load_image_bytes(first["image_bytes"], name=first["file_name"]), dtype=int)
  assert pixels.shape == (6, 8, 3) and np.abs(pixels - [200, 10, 10]).max() < 10
  with pytest.raises(ImageError, match="corrupt or truncated"):
    load_image_bytes(val[1]["image_bytes"], name=val[1]["file_name"])

  # The same prepared data asked for with another COCO root is refused, not silently reused.
  other = coco["root"].parent / "other_coco"
  other.mkdir(exist_ok=True)
  with pytest.raises(ValueError, match="was prepared from"):
    coco_lib.load_split(str(other), "val", str(coco["data_dir"]))


def test_absent_split_is_not_generated_and_asking_for_it_is_clear(tmp_path):
  from c3l_jax.data import coco as coco_lib

  root = tmp_path / "coco"
  write_split(root, "val2014", {1: jpeg((5, 5, 5))}, captions=[(1, 1, "grey")], instances=None)
  (root / "annotations" / "captions_train2014.json").write_text(json.dumps({"images": []}))  # no folder
  assert coco_lib.available_splits(str(root)) == ["val"]
  val = coco_lib.load_split(str(root), "val", str(tmp_path / "tfds"))
  assert [(e["image_id"], e["captions"], e["objects"]) for e in val] == [(1, ["grey"], [])]
  with pytest.raises(ValueError, match=r"split 'train' was not prepared .*found: val.*train2014"):
    coco_lib.load_split(str(root), "train", str(tmp_path / "tfds"))
  with pytest.raises(ValueError, match="must be one of"):
    coco_lib.load_split(str(root), "test", str(tmp_path / "tfds"))

  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no COCO 2014 split under"):
    coco_lib.load_split(str(tmp_path / "empty"), "val", str(tmp_path / "tfds2"))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    coco_lib.load_split(str(tmp_path / "nope"), "val", str(tmp_path / "tfds3"))
  assert not (tmp_path / "tfds2" / "coco2014" / "1.0.0").exists()


def test_file_name_index_is_stored_and_maps_records_without_reading_elements(coco, prepared,
                                                                             monkeypatch):
  from c3l_jax.data import coco as coco_lib
  from c3l_jax.data.sources import ImageSource
  from configs import llava15

  val = coco_lib.load_split(str(coco["root"]), "val", str(coco["data_dir"]))
  # The index stored at preparation, in element order (the elements themselves are the reference).
  assert val.file_names() == [e["file_name"] for e in prepared["val"]]
  assert val.image_ids() == [e["image_id"] for e in prepared["val"]]
  config = llava15.get_config("tiny")
  config.unlock()
  config.data.coco_dir, config.data.tfds_dir, config.data.split = (str(coco["root"]),
                                                                   str(coco["data_dir"]), "val")
  source = ImageSource(config)
  reads = []
  real_getitem = coco_lib.CocoSplit.__getitem__
  monkeypatch.setattr(coco_lib.CocoSplit, "__getitem__",
                      lambda self, i: reads.append(i) or real_getitem(self, i))
  element = source.element("COCO_val2014_000000000073.jpg")
  assert element["image_id"] == 73 and reads == [1]  # one element read: the one asked for
  # Listing the split (what the generation stages do) reads no element either.
  items, _ = source.items(0, positions=[2, 0], ground_truth=False)
  assert [(i.image, i.image_id) for i in items] == [
      (e["file_name"], str(e["image_id"])) for e in (prepared["val"][0], prepared["val"][2])]
  assert source.count() == len(prepared["val"]) and reads == [1]
  # POPE's objects come from the stored index too; captions only from the elements.
  assert val.objects() == [e["objects"] for e in prepared["val"]]
  items, _ = source.items(0, ground_truth=("objects",))
  assert [i.objects for i in items] == [tuple(e["objects"]) for e in prepared["val"]]
  assert reads == [1] and items[0].objects == ("cat", "dog")  # image 42
  items, _ = source.items(0, positions=[1])
  assert items[0].captions == tuple(prepared["val"][1]["captions"]) and reads == [1, 1]
