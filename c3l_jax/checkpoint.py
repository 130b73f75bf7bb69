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
from etils import epath

from c3l_jax.data.records import write_fault
from c3l_jax.models.configs import MODEL_CONFIG_FILE, ModelConfig, config_from_dict

MODEL_CONFIG = MODEL_CONFIG_FILE
PARAMS_DIR = "params"


class CheckpointError(ValueError):
  """A model directory that is missing or incomplete."""


def _path(path: str | os.PathLike) -> epath.Path:
  """A model directory as an absolute path (orbax needs one) or a gs:// URI."""
  return epath.Path(path if "://" in os.fspath(path) else os.path.abspath(path))


def check_model_dir(path: str) -> None:
  """Raise `CheckpointError` with a one-line message when `path` is not a project model directory."""
  if not _path(path).is_dir():
    raise CheckpointError(f"model checkpoint {path!r} does not exist (convert a HF checkpoint with: "
                          "python -m c3l_jax.convert --hf_path=DIR --out=DIR)")
  for name in (MODEL_CONFIG, PARAMS_DIR):
    if not (_path(path) / name).exists():
      raise CheckpointError(f"model checkpoint {path!r} has no {name!r}: not a c3l-jax model "
                            "directory (convert a HF checkpoint with python -m c3l_jax.convert)")


def load_model_config(path: str) -> ModelConfig:
  """The architecture of a model directory: `LlavaConfig` or `MiniGPT4Config`, by its `family`."""
  check_model_dir(path)
  d = json.loads((_path(path) / MODEL_CONFIG).read_text())
  try:
    return config_from_dict(d)
  except ValueError as e:
    raise CheckpointError(f"{os.path.join(path, MODEL_CONFIG)}: {e}") from None


def save_model_config(path: str, cfg: ModelConfig) -> None:
  _path(path).mkdir(parents=True, exist_ok=True)
  (_path(path) / MODEL_CONFIG).write_text(cfg.to_json())


def _param_dir(path: str, keys: tuple[str, ...]) -> epath.Path:
  return _path(path) / PARAMS_DIR / ".".join(keys)


def save_param(path: str, keys: tuple[str, ...], value: Any) -> None:
  """Save one parameter (numpy or jax array) as `path/params/<keys joined by '.'>`."""
  write_fault(_param_dir(path, keys))  # the disk-full test hook (`records.write_fault`)
  with ocp.PyTreeCheckpointer() as ckptr:
    ckptr.save(_param_dir(path, keys), {"value": value}, force=True)


def _flat(tree: Any) -> dict[tuple[str, ...], Any]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {tuple(str(k.key) for k in keys): v for keys, v in flat}


def save_params(path: str, params: Any) -> None:
  """Save a nested dict of arrays, one orbax item per leaf."""
  for keys, value in _flat(params).items():
    save_param(path, keys, value)


def _checkpointer(targets: Any) -> ocp.Checkpointer:
  """orbax's checkpointer; when every target lives on this process's devices (an inference replica of
  a multi-process job) one that coordinates with no other process: orbax otherwise meets every process
  at each restore, and a process with no work left in a stage would never come."""
  me = jax.process_index()
  if jax.process_count() == 1 or any(d.process_index != me for t in targets
                                     for d in t.sharding.device_set):
    return ocp.PyTreeCheckpointer()
  alone = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me},
                                             barrier_sync_key_prefix=f"c3l_process_{me}")
  return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(multiprocessing_options=alone),
                          multiprocessing_options=alone)


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
  saved = {tuple(p.name.split(".")) for p in (_path(path) / PARAMS_DIR).iterdir()}
  missing = sorted(".".join(k) for k in set(flat) - saved)
  extra = sorted(".".join(k) for k in saved - set(flat))
  if missing or extra:
    raise CheckpointError(f"{path}: parameters missing {missing} / not in the model {extra}")
  values = {}
  with _checkpointer(flat.values()) as ckptr:
    for keys, a in flat.items():
      args = {"value": ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape, dtype=a.dtype)}
      values[keys] = ckptr.restore(_param_dir(path, keys), item={"value": a},
                                   restore_args=args)["value"]
  treedef = jax.tree_util.tree_structure(abstract)
  return jax.tree_util.tree_unflatten(treedef, [values[k] for k in flat])
