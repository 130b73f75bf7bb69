"""A tfds builder over the synthetic scenes world (array_record; prepares and reads without TensorFlow).

`ScenesWorld` has one BuilderConfig per (num_images, num_val, seed, image_size), named
`n{num_images}_v{num_val}_s{seed}_px{image_size}`. Splits: `train` = scenes 0..num_images-1 (the
generator's images), `val` = scenes num_images..num_images+num_val-1 (held out for evaluation); scene i
depends only on (seed, i), so both come from one world and never share an image. Elements:

    image_bytes  bytes      PNG of `scenes.render(scene)`
    image_id     int        the scene id (unique across splits)
    file_name    str        "scene_000012.png"
    captions     list[str]  `scenes.captions(scene, rng)` (3 paraphrases)
    objects      list[str]  `scenes.object_names(scene)`: categories present, sorted, once each
    annotation   str        `scene.to_json()`

`load_split(data_dir, split, num_images, seed)` prepares on first use and returns a random-access
sequence of those dicts with python types (tfds' data source returns text as bytes; it is decoded here).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from c3l_jax.scenes import text as text_lib
from c3l_jax.scenes import world as world_lib
from c3l_jax import console
from c3l_jax.data.coco import to_python  # the same element contract as COCO

VERSION = "1.0.0"
CAPTIONS_PER_IMAGE = 3


def default_num_val(num_images: int) -> int:
  """Held-out images when not given: a fifth of train, at least 1, at most 1000."""
  return max(1, min(1000, num_images // 5))


def config_name(num_images: int, seed: int, num_val: int, image_size: int) -> str:
  return f"n{num_images}_v{num_val}_s{seed}_px{image_size}"


@dataclasses.dataclass
class ScenesWorldConfig(tfds.core.BuilderConfig):
  """One world: its size, held-out size, seed and image side."""

  num_images: int = 100
  num_val: int = 20
  seed: int = 0
  image_size: int = world_lib.IMAGE_SIZE


def make_config(num_images: int, seed: int, num_val: int | None = None,
                image_size: int = world_lib.IMAGE_SIZE) -> ScenesWorldConfig:
  if num_images < 1:
    raise ValueError(f"num_images must be >= 1, got {num_images}")
  num_val = default_num_val(num_images) if num_val is None else num_val
  return ScenesWorldConfig(name=config_name(num_images, seed, num_val, image_size),
                           version=VERSION, num_images=num_images, num_val=num_val, seed=seed,
                           image_size=image_size)


def scene_element(scene: world_lib.Scene, seed: int, image_size: int) -> dict[str, Any]:
  """The dataset element of one scene (captions seeded by (seed, image_id))."""
  rng = np.random.default_rng([seed, scene.image_id, 1])
  return {
      "image_bytes": world_lib.render_png(scene, image_size),
      "image_id": scene.image_id,
      "file_name": scene.file_name,
      "captions": text_lib.captions(scene, rng, CAPTIONS_PER_IMAGE),
      "objects": world_lib.object_names(scene),
      "annotation": scene.to_json(),
  }


class ScenesWorld(tfds.core.GeneratorBasedBuilder):
  """The synthetic scenes world as a tfds dataset (pass `config=make_config(...)`)."""

  VERSION = tfds.core.Version(VERSION)
  BUILDER_CONFIGS = [make_config(100, 0)]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Procedural scenes (1-5 shapes) with captions and ground-truth annotations.",
        features=tfds.features.FeaturesDict({
            "image_bytes": tfds.features.Scalar(dtype=np.object_),
            "image_id": tfds.features.Scalar(dtype=np.int64),
            "file_name": tfds.features.Text(),
            "captions": tfds.features.Sequence(tfds.features.Text()),
            "objects": tfds.features.Sequence(tfds.features.Text()),
            "annotation": tfds.features.Text(),
        }),
        disable_shuffling=True,  # elements in image_id order
    )

  def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
    c = self.builder_config
    return {"train": self._generate_examples(0, c.num_images),
            "val": self._generate_examples(c.num_images, c.num_val)}

  def _generate_examples(self, start: int, count: int):
    c = self.builder_config
    for scene in world_lib.generate_world(count, c.seed, start_id=start):
      yield scene.image_id, scene_element(scene, c.seed, c.image_size)


class _PythonSource(Sequence):
  """Random access over a tfds data source, converting each element with `to_python`; `image_ids()` /
  `file_names()` list the elements without reading them (scene ids follow from the world's config)."""

  def __init__(self, source: Any, image_ids: range):
    self._source = source
    self._ids = image_ids

  def image_ids(self) -> list[int]:
    return list(self._ids)

  def file_names(self) -> list[str]:
    return [world_lib.file_name_for(i) for i in self._ids]

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i):  # type: ignore[override]
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(len(self)))]
    if i < 0:
      i += len(self)
    if not 0 <= i < len(self):
      raise IndexError(i)
    return to_python(self._source[i])


def builder(data_dir: str, num_images: int, seed: int, num_val: int | None = None,
            image_size: int = world_lib.IMAGE_SIZE) -> ScenesWorld:
  return ScenesWorld(data_dir=data_dir, config=make_config(num_images, seed, num_val, image_size),
                     file_format="array_record")


def load_split(data_dir: str, split: str, num_images: int, seed: int, *, num_val: int | None = None,
               image_size: int = world_lib.IMAGE_SIZE) -> Sequence[dict[str, Any]]:
  """`split` ("train" or "val") of the world (prepared under `data_dir` on first use) as a random-access
  sequence of python dicts, in image_id order."""
  if split not in ("train", "val"):
    raise ValueError(f"split must be 'train' or 'val', got {split!r}")
  b = builder(data_dir, num_images, seed, num_val, image_size)
  console.prepare_tfds(b, "scenes world")
  c = b.builder_config
  ids = range(c.num_images) if split == "train" else range(c.num_images, c.num_images + c.num_val)
  return _PythonSource(b.as_data_source(split), ids)
