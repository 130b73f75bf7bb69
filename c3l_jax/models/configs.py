"""Model configurations (plain dataclasses) and their construction from transformers configs.

The dataclasses are the single source of truth for architecture hyper-parameters. They are JSON
round-trippable (`to_dict` / `from_dict`) so that a converted checkpoint carries its own architecture in
`c3l_model.json`, and `from_hf_config` reads a transformers `LlavaConfig` (object or `config.json` dict),
accepting both the transformers-4 spelling (`rope_theta`, `rope_scaling`) and the transformers-5 one
(`rope_parameters`).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

RUNTIME_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
  """RoPE frequencies: `rope_type` in default | linear | dynamic | llama3 (the types Llama/Vicuna use)."""

  theta: float = 10000.0
  rope_type: str = "default"
  factor: float = 1.0
  # llama3 only.
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 0


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  hidden_size: int = 1024
  intermediate_size: int = 4096
  num_hidden_layers: int = 24
  num_attention_heads: int = 16
  image_size: int = 336
  patch_size: int = 14
  num_channels: int = 3
  layer_norm_eps: float = 1e-5
  hidden_act: str = "quick_gelu"

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab_size: int = 32064
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int = 32
  head_dim: int = 128
  rms_norm_eps: float = 1e-5
  max_position_embeddings: int = 4096
  rope: RopeConfig = dataclasses.field(default_factory=RopeConfig)
  attention_bias: bool = False
  mlp_bias: bool = False
  hidden_act: str = "silu"
  tie_word_embeddings: bool = False
  bos_token_id: int | None = 1
  eos_token_id: int | tuple[int, ...] | None = 2
  pad_token_id: int | None = None


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
  """LLaVA-1.5: CLIP ViT + 2-layer MLP projector + Llama decoder.

  Runtime fields (`dtype`, `param_dtype`, `scan_layers`, `remat`) are not architecture: they are set from
  the run's config (`config.model.*`) with `dataclasses.replace`.
  """

  vision: CLIPVisionConfig = dataclasses.field(default_factory=CLIPVisionConfig)
  text: LlamaConfig = dataclasses.field(default_factory=LlamaConfig)
  image_token_id: int = 32000
  vision_feature_layer: int | tuple[int, ...] = -2
  vision_feature_select_strategy: str = "default"
  projector_hidden_act: str = "gelu"
  multimodal_projector_bias: bool = True
  family: str = "llava15"
  dtype: str = "float32"
  param_dtype: str = "float32"
  scan_layers: bool = True
  remat: bool = False

  @property
  def feature_layers(self) -> tuple[int, ...]:
    layer = self.vision_feature_layer
    return (layer,) if isinstance(layer, int) else tuple(layer)

  @property
  def image_seq_length(self) -> int:
    """Number of `<image>` tokens one image expands to."""
    extra = 1 if self.vision_feature_select_strategy == "full" else 0
    return self.vision.num_patches + extra

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "LlavaConfig":
    d = dict(d)
    vision = CLIPVisionConfig(**d.pop("vision"))
    text = dict(d.pop("text"))
    rope = RopeConfig(**text.pop("rope"))
    if isinstance(text.get("eos_token_id"), list):
      text["eos_token_id"] = tuple(text["eos_token_id"])
    if isinstance(d.get("vision_feature_layer"), list):
      d["vision_feature_layer"] = tuple(d["vision_feature_layer"])
    return cls(vision=vision, text=LlamaConfig(rope=rope, **text), **d)


def _get(cfg: Any, name: str, default: Any = None) -> Any:
  if isinstance(cfg, dict):
    return cfg.get(name, default)
  return getattr(cfg, name, default)


def rope_from_hf(text_cfg: Any) -> RopeConfig:
  """RoPE settings from a Llama config: transformers 5 `rope_parameters` or 4 `rope_theta`/`rope_scaling`."""
  params = _get(text_cfg, "rope_parameters")
  if params is None:
    params = dict(_get(text_cfg, "rope_scaling") or {})
    params.setdefault("rope_theta", _get(text_cfg, "rope_theta", 10000.0))
  params = dict(params)
  rope_type = params.get("rope_type", params.get("type", "default"))
  if rope_type not in ("default", "linear", "dynamic", "llama3"):
    raise ValueError(
        f"unsupported RoPE type {rope_type!r}: supported are default, linear, dynamic, llama3")
  return RopeConfig(
      theta=float(params.get("rope_theta", 10000.0)),
      rope_type=rope_type,
      factor=float(params.get("factor", 1.0) or 1.0),
      low_freq_factor=float(params.get("low_freq_factor", 1.0)),
      high_freq_factor=float(params.get("high_freq_factor", 4.0)),
      original_max_position_embeddings=int(params.get("original_max_position_embeddings") or 0),
  )


def llama_from_hf(t: Any) -> LlamaConfig:
  heads = _get(t, "num_attention_heads")
  hidden = _get(t, "hidden_size")
  act = _get(t, "hidden_act", "silu")
  if act != "silu":
    raise ValueError(f"unsupported Llama hidden_act {act!r} (expected 'silu')")
  eos = _get(t, "eos_token_id", 2)
  return LlamaConfig(
      vocab_size=_get(t, "vocab_size"),
      hidden_size=hidden,
      intermediate_size=_get(t, "intermediate_size"),
      num_hidden_layers=_get(t, "num_hidden_layers"),
      num_attention_heads=heads,
      num_key_value_heads=_get(t, "num_key_value_heads") or heads,
      head_dim=_get(t, "head_dim") or hidden // heads,
      rms_norm_eps=float(_get(t, "rms_norm_eps", 1e-6)),
      max_position_embeddings=_get(t, "max_position_embeddings", 4096),
      rope=rope_from_hf(t),
      attention_bias=bool(_get(t, "attention_bias", False)),
      mlp_bias=bool(_get(t, "mlp_bias", False)),
      tie_word_embeddings=bool(_get(t, "tie_word_embeddings", False)),
      bos_token_id=_get(t, "bos_token_id", 1),
      eos_token_id=tuple(eos) if isinstance(eos, (list, tuple)) else eos,
      pad_token_id=_get(t, "pad_token_id"),
  )


def clip_from_hf(v: Any) -> CLIPVisionConfig:
  act = _get(v, "hidden_act", "quick_gelu")
  if act not in ("quick_gelu", "gelu"):
    raise ValueError(f"unsupported CLIP hidden_act {act!r}")
  return CLIPVisionConfig(
      hidden_size=_get(v, "hidden_size"),
      intermediate_size=_get(v, "intermediate_size"),
      num_hidden_layers=_get(v, "num_hidden_layers"),
      num_attention_heads=_get(v, "num_attention_heads"),
      image_size=_get(v, "image_size"),
      patch_size=_get(v, "patch_size"),
      num_channels=_get(v, "num_channels", 3),
      layer_norm_eps=float(_get(v, "layer_norm_eps", 1e-5)),
      hidden_act=act,
  )


def from_hf_config(hf: Any) -> LlavaConfig:
  """A `LlavaConfig` from a transformers `LlavaConfig` object or its `config.json` dict.

  Raises:
    ValueError: for a config that is not LLaVA (model_type != 'llava') or uses an unsupported feature.
  """
  model_type = _get(hf, "model_type")
  if model_type != "llava":
    raise ValueError(f"not a LLaVA config: model_type={model_type!r} (expected 'llava')")
  vision, text = _get(hf, "vision_config"), _get(hf, "text_config")
  if _get(vision, "model_type", "clip_vision_model") != "clip_vision_model":
    raise ValueError(f"unsupported vision tower {_get(vision, 'model_type')!r} (expected CLIP)")
  if _get(text, "model_type", "llama") != "llama":
    raise ValueError(f"unsupported text model {_get(text, 'model_type')!r} (expected llama)")
  strategy = _get(hf, "vision_feature_select_strategy", "default")
  if strategy not in ("default", "full"):
    raise ValueError(f"unsupported vision_feature_select_strategy {strategy!r}")
  layer = _get(hf, "vision_feature_layer", -2)
  text_cfg = llama_from_hf(text)
  tie = bool(_get(hf, "tie_word_embeddings", False)) or text_cfg.tie_word_embeddings
  text_cfg = dataclasses.replace(text_cfg, tie_word_embeddings=tie)
  image_token = _get(hf, "image_token_id", None)
  if image_token is None:
    image_token = _get(hf, "image_token_index", 32000)
  return LlavaConfig(
      vision=clip_from_hf(vision),
      text=text_cfg,
      image_token_id=int(image_token),
      vision_feature_layer=tuple(layer) if isinstance(layer, (list, tuple)) else int(layer),
      vision_feature_select_strategy=strategy,
      projector_hidden_act=_get(hf, "projector_hidden_act", "gelu"),
      multimodal_projector_bias=bool(_get(hf, "multimodal_projector_bias", True)),
  )


def with_runtime(cfg: LlavaConfig, **kwargs: Any) -> LlavaConfig:
  """`cfg` with runtime fields (dtype, param_dtype, scan_layers, remat) replaced."""
  unknown = set(kwargs) - set(RUNTIME_FIELDS)
  if unknown:
    raise ValueError(f"not runtime fields: {sorted(unknown)}")
  return dataclasses.replace(cfg, **kwargs)
