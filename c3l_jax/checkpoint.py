"""Project checkpoints: `c3l_model.json` (architecture) + `params/` (orbax) + tokenizer/processor files.

Layout of a model directory (what `python -m c3l_jax.convert` writes and every stage loads):
```
DIR/c3l_model.json      the model config's to_json(): architecture + `family` (llava15 | minigpt4);
                        runtime dtype fields are run config
DIR/params/<a.b.c>/     one orbax PyTree checkpoint per parameter (dotted path; layers stacked on axis 0)
DIR/*.json, *.model ... the HF tokenizer / processor / chat-template files, copied verbatim
```
One orbax item per parameter (rather than one for the whole tree) is what lets the converter stream: orbax
copies everything it is asked to save before writing, so saving a 7B tree at once needs twice its size in
RAM. Parameters are restored straight into their target shardings and dtypes, one at a time, see
`c3l_jax.sharding.load_model`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from c3l_jax.models.configs import MODEL_CONFIG_FILE, ModelConfig, config_from_dict

MODEL_CONFIG = MODEL_CONFIG_FILE
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


def load_model_config(path: str) -> ModelConfig:
  """The architecture of a model directory: `LlavaConfig` or `MiniGPT4Config`, by its `family`."""
  check_model_dir(path)
  with open(os.path.join(path, MODEL_CONFIG)) as f:
    d = json.load(f)
  try:
    return config_from_dict(d)
  except ValueError as e:
    raise CheckpointError(f"{os.path.join(path, MODEL_CONFIG)}: {e}") from None


def save_model_config(path: str, cfg: ModelConfig) -> None:
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, MODEL_CONFIG), "w") as f:
    f.write(cfg.to_json())


def _param_dir(path: str, keys: tuple[str, ...]) -> str:
  return os.path.join(os.path.abspath(path), PARAMS_DIR, ".".join(keys))


def save_param(path: str, keys: tuple[str, ...], value: Any) -> None:
  """Save one parameter (numpy or jax array) as `path/params/<keys joined by '.'>`."""
  with ocp.PyTreeCheckpointer() as ckptr:
    ckptr.save(_param_dir(path, keys), {"value": value}, force=True)


def _flat(tree: Any) -> dict[tuple[str, ...], Any]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {tuple(str(k.key) for k in keys): v for keys, v in flat}


def save_params(path: str, params: Any) -> None:
  """Save a nested dict of arrays, one orbax item per leaf."""
  for keys, value in _flat(params).items():
    save_param(path, keys, value)


def restore_params(path: str, abstract: Any) -> Any:
  """Restore `path/params` into the shapes, dtypes and shardings of `abstract`.

  Args:
    abstract: nested dict of `jax.ShapeDtypeStruct` (with `.sharding`) mirroring the saved tree; dtypes
      may differ from the saved ones (e.g. fp16 on disk, fp32 or bf16 in memory): values are cast.
  Raises:
    CheckpointError: listing the parameters the model expects but the directory lacks, and those the
      directory has but the model does not know.
  """
  flat = _flat(abstract)
  params_dir = os.path.join(os.path.abspath(path), PARAMS_DIR)
  saved = {tuple(n.split(".")) for n in os.listdir(params_dir)}
  missing = sorted(".".join(k) for k in set(flat) - saved)
  extra = sorted(".".join(k) for k in saved - set(flat))
  if missing or extra:
    raise CheckpointError(f"{path}: parameters missing {missing} / not in the model {extra}")
  values = {}
  with ocp.PyTreeCheckpointer() as ckptr:
    for keys, a in flat.items():
      args = {"value": ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape, dtype=a.dtype)}
      values[keys] = ckptr.restore(_param_dir(path, keys), item={"value": a},
                                   restore_args=args)["value"]
  treedef = jax.tree_util.tree_structure(abstract)
  return jax.tree_util.tree_unflatten(treedef, [values[k] for k in flat])
