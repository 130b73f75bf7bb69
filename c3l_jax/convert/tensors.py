"""Reading checkpoint files tensor by tensor: safetensors headers (bfloat16 included) and torch pickles.

Nothing here reads tensor data until `Ref.read()` is called, so a converter can check every name and
shape of a 7B checkpoint (and `--dry_run` can describe it) from the headers alone.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Callable, Iterator, NamedTuple

import ml_dtypes
import numpy as np

from c3l_jax.convert.common import ConversionError, Plan, check_complete

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class TensorRef(NamedTuple):
  """Where one tensor lives in a safetensors file."""

  file: str
  offset: int  # absolute byte offset of the data
  dtype: np.dtype
  shape: tuple[int, ...]

  def read(self) -> np.ndarray:
    """Read just this tensor (`np.fromfile`, no memory map: converted tensors leave no resident pages)."""
    with open(self.file, "rb") as f:
      f.seek(self.offset)
      data = np.fromfile(f, dtype=self.dtype, count=int(np.prod(self.shape, dtype=np.int64)))
    return data.reshape(self.shape)


class ArrayRef(NamedTuple):
  """A tensor already in memory; same interface as `TensorRef`."""

  array: np.ndarray

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.array.shape)

  @property
  def dtype(self) -> np.dtype:
    return self.array.dtype

  def read(self) -> np.ndarray:
    return self.array


class TorchRef:
  """A tensor of a torch pickle loaded with `mmap=True`: its shape is known, its bytes are paged in only
  when read."""

  def __init__(self, tensor):
    self.tensor = tensor

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.tensor.shape)

  @property
  def dtype(self) -> np.dtype:
    import torch

    if self.tensor.dtype == torch.bfloat16:
      return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(str(self.tensor.dtype).removeprefix("torch."))

  def read(self) -> np.ndarray:
    import torch

    t = self.tensor.detach().contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits
      return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
    return t.numpy().copy()


def read_safetensors_index(path: str) -> dict[str, TensorRef]:
  """Tensor name -> `TensorRef` from one safetensors file's header.

  `safetensors`' numpy backend cannot represent bfloat16, so the (tiny, documented) format is read
  directly: an 8-byte little-endian header size, a JSON header, then raw little-endian tensor bytes.
  A file shorter than its header says (an interrupted download) is an error here, before any data is
  read.
  """
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise ConversionError(f"{path}: not a safetensors file ({size} bytes)")
    (header_size,) = struct.unpack("<Q", head)
    if header_size > size - 8:
      raise ConversionError(f"{path}: not a safetensors file (header of {header_size} bytes in a "
                            f"{size}-byte file)")
    try:
      header = json.loads(f.read(header_size))
    except ValueError as e:
      raise ConversionError(f"{path}: unreadable safetensors header ({e})") from None
  header.pop("__metadata__", None)
  refs = {}
  end = 0
  for name, info in header.items():
    if info["dtype"] not in _SAFETENSORS_DTYPES:
      raise ConversionError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
    refs[name] = TensorRef(path, 8 + header_size + info["data_offsets"][0],
                           np.dtype(_SAFETENSORS_DTYPES[info["dtype"]]), tuple(info["shape"]))
    end = max(end, info["data_offsets"][1])
  if 8 + header_size + end > size:
    raise ConversionError(f"{path}: truncated: the header describes {8 + header_size + end:,} bytes, "
                          f"the file has {size:,} (download it again)")
  return refs


def iter_safetensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
  """Yield `(name, array)` for every tensor of one safetensors file, one at a time."""
  for name, ref in sorted(read_safetensors_index(path).items(), key=lambda kv: kv[1].offset):
    yield name, ref.read()


def read_torch_index(path: str) -> dict[str, TorchRef]:
  """Tensor name -> `TorchRef` of a torch pickle (`pytorch_model-*.bin`, `.pth`), loaded with
  `weights_only=True` (no code runs) and memory-mapped (no tensor data read until `read()`)."""
  try:
    import torch
  except ImportError:
    raise ConversionError(f"reading {path!r} needs torch (pip install torch), or re-save the "
                          "checkpoint as safetensors") from None
  try:
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
  except RuntimeError:  # the pre-1.6 (non-zip) format cannot be memory-mapped
    try:
      state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pylint: disable=broad-except
      raise ConversionError(f"cannot read {path!r} as a torch checkpoint: {e}") from None
  except Exception as e:  # pylint: disable=broad-except
    raise ConversionError(f"cannot read {path!r} as a torch checkpoint: {e}") from None
  if isinstance(state, dict) and isinstance(state.get("model"), dict):
    state = state["model"]  # MiniGPT-4 / LAVIS save {"model": state_dict, ...}
  if not isinstance(state, dict):
    raise ConversionError(f"{path!r} holds a {type(state).__name__}, not a state dict")
  return {k: TorchRef(v) for k, v in state.items() if isinstance(v, torch.Tensor)}


def weight_files(path: str, flag: str = "--hf_path") -> list[str]:
  """The weight files of a checkpoint directory: those its index lists (every one must exist), else
  every `*.safetensors`, else every `pytorch_model*.bin`."""
  if not os.path.isdir(path):
    raise ConversionError(f"{flag} {path!r} is not a directory")
  for index in INDEX_FILES:
    index_path = os.path.join(path, index)
    if os.path.exists(index_path):
      with open(index_path) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
      missing = [n for n in files if not os.path.exists(os.path.join(path, n))]
      if missing:
        raise ConversionError(f"{index_path}: weight files listed in the index are missing: {missing}")
      return [os.path.join(path, n) for n in files]
  names = sorted(os.listdir(path))
  files = [n for n in names if n.endswith(".safetensors")]
  if not files:
    files = [n for n in names if n.startswith("pytorch_model") and n.endswith(".bin")]
  if not files:
    other = [n for n in names if n.endswith(WEIGHT_SUFFIXES)]
    hint = (f" (found {other}: re-save them as safetensors with transformers' "
            "save_pretrained(safe_serialization=True))" if other else "")
    raise ConversionError(f"no *.safetensors or pytorch_model*.bin weights in {path!r}{hint}")
  return [os.path.join(path, n) for n in files]


def read_index(file: str) -> dict:
  """Tensor name -> ref of one weight file, by its format."""
  if file.endswith(".safetensors"):
    return read_safetensors_index(file)
  return read_torch_index(file)


def read_all(path: str, flag: str = "--hf_path") -> Iterator[tuple[str, object]]:
  """`(name, ref)` for every tensor of every weight file of a directory."""
  for file in weight_files(path, flag):
    yield from read_index(file).items()


def plan_refs(path: str, plan: Plan, canonical_name: Callable[[str], str | None],
              ignored: Callable[[str | None], bool]) -> dict[str, object]:
  """canonical name -> ref of every tensor of `path` the conversion `plan` takes; a tensor whose
  canonical name is neither in `plan` nor `ignored` is unexpected. One `ConversionError` lists every
  missing and every unexpected tensor (`check_complete`)."""
  refs, unexpected = {}, []
  for key, ref in read_all(path):
    name = canonical_name(key)
    if name in plan:
      refs[name] = ref
    elif not ignored(name):
      unexpected.append(key)
  check_complete(path, plan, refs, unexpected)
  return refs
