"""Project checkpoints: `c3l_model.json` (architecture) + `params/` (orbax) + tokenizer/processor files.

Layout of a model directory (what `python -m c3l_jax.convert` writes and every stage loads):
```
DIR/c3l_model.json      LlavaConfig.to_json(): the architecture (runtime dtype fields are run config)
DIR/params/             orbax PyTree checkpoint of the parameter tree (layers stacked on axis 0)
DIR/*.json, *.model ... the HF tokenizer / processor / chat-template files, copied verbatim
```
Parameters are restored straight into their target shardings and dtypes (no host copy of the whole
model), see `c3l_jax.sharding.load_model`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from c3l_jax.models.configs import LlavaConfig

MODEL_CONFIG = "c3l_model.json"
PARAMS_DIR = "params"


class CheckpointError(ValueError):
  """A model directory that is missing or incomplete."""


def check_model_dir(path: str) -> None:
  """Raise `CheckpointError` with a one-line message when `path` is not a project model directory."""
  if not os.path.isdir(path):
    raise CheckpointError(f"model checkpoint {path!r} does not exist (convert a HF checkpoint with: "
                          "python -m c3l_jax.convert --hf_path=DIR --out=DIR)")
  for name in (MODEL_CONFIG, PARAMS_DIR):
    if not os.path.exists(os.path.join(path, name)):
      raise CheckpointError(f"model checkpoint {path!r} has no {name!r}: not a c3l-jax model "
                            "directory (convert a HF checkpoint with python -m c3l_jax.convert)")


def load_model_config(path: str) -> LlavaConfig:
  check_model_dir(path)
  with open(os.path.join(path, MODEL_CONFIG)) as f:
    return LlavaConfig.from_dict(json.load(f))


def save_model_config(path: str, cfg: LlavaConfig) -> None:
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, MODEL_CONFIG), "w") as f:
    f.write(cfg.to_json())


def save_params(path: str, params: Any) -> None:
  """Save a nested dict of arrays (numpy or jax) as `path/params` (overwrites)."""
  target = os.path.join(os.path.abspath(path), PARAMS_DIR)
  with ocp.PyTreeCheckpointer() as ckptr:
    ckptr.save(target, params, force=True)


def restore_params(path: str, abstract: Any) -> Any:
  """Restore `path/params` into the shapes, dtypes and shardings of `abstract`.

  Args:
    abstract: nested dict of `jax.ShapeDtypeStruct` (with `.sharding`) mirroring the saved tree; dtypes
      may differ from the saved ones (e.g. fp16 on disk, fp32 or bf16 in memory): values are cast.
  """
  target = os.path.join(os.path.abspath(path), PARAMS_DIR)
  restore_args = jax.tree.map(
      lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape, dtype=a.dtype),
      abstract)
  with ocp.PyTreeCheckpointer() as ckptr:
    return ckptr.restore(target, item=abstract, restore_args=restore_args)
