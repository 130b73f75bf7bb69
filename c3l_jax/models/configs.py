"""Model configurations (plain dataclasses) and their construction from transformers configs.

The dataclasses are the single source of truth for architecture hyper-parameters. They are JSON
round-trippable (`to_dict` / `from_dict`) so that a converted checkpoint carries its own architecture in
`c3l_model.json`, and `from_hf_config` reads a transformers `LlavaConfig` (object or `config.json` dict),
accepting both the transformers-4 spelling (`rope_theta`, `rope_scaling`) and the transformers-5 one
(`rope_parameters`).

Two model families share the Llama decoder config (`family` field, dispatched by `config_from_dict`):
- `llava15` (`LlavaConfig`): CLIP ViT + MLP projector + Llama;
- `minigpt4` (`MiniGPT4Config`): EVA ViT-g (`Blip2VisionConfig`) + BLIP-2 Q-Former (`Blip2QFormerConfig`)
  + `llama_proj` + Llama/Vicuna, or, for the Llama-2 variant, EVA ViT-g + 4-patch concatenation +
  `llama_proj` + Llama-2 (`minigpt4_from_hf`).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any

MODEL_CONFIG_FILE = "c3l_model.json"  # a model directory's architecture (c3l_jax.checkpoint)
RUNTIME_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat", "attention")
# How a LLaVA checkpoint's prompts are rendered: its own HF chat template (llava-hf), or the LLaVA
# repository's conversation templates (original-format checkpoints): `conv_vicuna_v1` (LLaVA-1.5's
# training and evaluation template) or `conv_llava_v1`.
LLAVA_PROMPT_FORMATS = ("chat_template", "vicuna_v1", "llava_v1")
LLAVA_IMAGE_ASPECTS = ("resize", "pad")


class JsonConfig:
  """JSON round trip for the config dataclasses: `to_dict` / `to_json`, and `from_dict`, which rebuilds
  nested config fields (also `X | None`) from their dicts and JSON lists as tuples."""

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)  # type: ignore[call-overload]

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict[str, Any]):
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in d.items():
      if isinstance(value, dict):
        kind = next((t for t in _members(hints[key]) if isinstance(t, type) and issubclass(t, JsonConfig)),
                    None)
        if kind is None:
          raise ValueError(f"{cls.__name__}.{key} is not a nested config")
        value = kind.from_dict(value)
      elif isinstance(value, list):
        value = tuple(value)
      kwargs[key] = value
    return cls(**kwargs)


def _members(hint: Any) -> tuple[Any, ...]:
  """The alternatives of a `A | B` / `Optional[A]` hint, or the hint itself."""
  if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
    return typing.get_args(hint)
  return (hint,)


@dataclasses.dataclass(frozen=True)
class RopeConfig(JsonConfig):
  """RoPE frequencies: `rope_type` in default | linear | dynamic | llama3 (the types Llama/Vicuna use)."""

  theta: float = 10000.0
  rope_type: str = "default"
  factor: float = 1.0
  # llama3 only.
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 0
  # Multimodal RoPE (Qwen2-VL / Qwen2.5-VL): positions are `[B, T, 3]` (time, height, width) and the
  # `head_dim / 2` frequencies are split into these consecutive sections, section i rotated by stream
  # i % 3. Empty: ordinary 1-D RoPE over `[B, T]` positions.
  mrope_section: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig(JsonConfig):
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
class LlamaConfig(JsonConfig):
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
  qkv_bias: bool = False  # biases on q/k/v only (Qwen2); `attention_bias` also puts one on o_proj
  mlp_bias: bool = False
  hidden_act: str = "silu"
  tie_word_embeddings: bool = False
  bos_token_id: int | None = 1
  eos_token_id: int | tuple[int, ...] | None = 2
  pad_token_id: int | None = None


@dataclasses.dataclass(frozen=True)
class LlavaConfig(JsonConfig):
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
  # The checkpoint's conventions (original LLaVA format: "vicuna_v1" and "pad"; see `c3l_jax.convert`).
  prompt_format: str = "chat_template"
  image_aspect_ratio: str = "resize"  # pad: squared on the image mean before the processor (expand2square)
  dtype: str = "float32"
  param_dtype: str = "float32"
  scan_layers: bool = True
  remat: bool = False
  attention: str = "xla"  # c3l_jax.models.attention: auto | xla | cudnn | splash

  def __post_init__(self):
    if self.prompt_format not in LLAVA_PROMPT_FORMATS:
      raise ValueError(f"unknown prompt_format {self.prompt_format!r} "
                       f"(valid: {', '.join(LLAVA_PROMPT_FORMATS)})")
    if self.image_aspect_ratio not in LLAVA_IMAGE_ASPECTS:
      raise ValueError(f"unknown image_aspect_ratio {self.image_aspect_ratio!r} "
                       f"(valid: {', '.join(LLAVA_IMAGE_ASPECTS)})")

  @property
  def feature_layers(self) -> tuple[int, ...]:
    layer = self.vision_feature_layer
    return (layer,) if isinstance(layer, int) else tuple(layer)

  @property
  def image_seq_length(self) -> int:
    """Number of `<image>` tokens one image expands to."""
    extra = 1 if self.vision_feature_select_strategy == "full" else 0
    return self.vision.num_patches + extra


@dataclasses.dataclass(frozen=True)
class EVAVisionConfig(JsonConfig):
  """EVA ViT-g as BLIP-2 / MiniGPT-4 use it: transformers' `Blip2VisionConfig` (defaults = ViT-g/14, 39
  layers, the depth LAVIS' `create_eva_vit_g` keeps)."""

  hidden_size: int = 1408
  intermediate_size: int = 6144
  num_hidden_layers: int = 39
  num_attention_heads: int = 16
  image_size: int = 224
  patch_size: int = 14
  num_channels: int = 3
  layer_norm_eps: float = 1e-6
  hidden_act: str = "gelu"
  qkv_bias: bool = True

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class QFormerConfig(JsonConfig):
  """BLIP-2's Q-Former (transformers' `Blip2QFormerConfig`, query path only) + its learned queries."""

  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  layer_norm_eps: float = 1e-12
  hidden_act: str = "gelu"
  cross_attention_frequency: int = 2  # layer i cross-attends to the image iff i % frequency == 0
  encoder_hidden_size: int = 1408
  num_query_tokens: int = 32

  @property
  def cross_attention_layers(self) -> tuple[int, ...]:
    return tuple(i for i in range(self.num_hidden_layers) if i % self.cross_attention_frequency == 0)


MINIGPT4_VARIANTS = ("vicuna0", "llama2")


@dataclasses.dataclass(frozen=True)
class MiniGPT4Config(JsonConfig):
  """MiniGPT-4: EVA ViT-g (+ `ln_vision` = the ViT's post-layernorm) -> connector -> `llama_proj` -> Llama.

  The connector is the Q-Former (`qformer` set: `num_query_tokens` image tokens) or, for the Llama-2
  variant (`qformer=None`), the patch features without CLS with every `merge_patches` adjacent ones
  concatenated (`num_patches / merge_patches` image tokens). `variant` picks the prompt template
  (`c3l_jax.data.prompts`). `image_token_id` is a placeholder id repeated `image_seq_length` times where
  the prompt has `<ImageHere>`; MiniGPT-4 has no image token, so it is `text.vocab_size` (outside the
  vocabulary: it can never collide with a text, pad or unk id).
  """

  vision: EVAVisionConfig = dataclasses.field(default_factory=EVAVisionConfig)
  qformer: QFormerConfig | None = dataclasses.field(default_factory=QFormerConfig)
  text: LlamaConfig = dataclasses.field(default_factory=lambda: LlamaConfig(vocab_size=32000))
  image_token_id: int = 32000
  variant: str = "vicuna0"
  merge_patches: int = 4
  family: str = "minigpt4"
  dtype: str = "float32"
  param_dtype: str = "float32"
  scan_layers: bool = True
  remat: bool = False
  attention: str = "xla"  # c3l_jax.models.attention: auto | xla | cudnn | splash

  def __post_init__(self):
    if self.variant not in MINIGPT4_VARIANTS:
      raise ValueError(f"unknown MiniGPT-4 variant {self.variant!r} (valid: {', '.join(MINIGPT4_VARIANTS)})")
    if self.qformer is None and self.vision.num_patches % self.merge_patches:
      raise ValueError(f"{self.vision.num_patches} patches do not split into groups of "
                       f"{self.merge_patches}")

  @property
  def image_seq_length(self) -> int:
    """Number of placeholder tokens one image expands to."""
    if self.qformer is not None:
      return self.qformer.num_query_tokens
    return self.vision.num_patches // self.merge_patches

  @property
  def projector_input_size(self) -> int:
    """Input width of `llama_proj`."""
    if self.qformer is not None:
      return self.qformer.hidden_size
    return self.vision.hidden_size * self.merge_patches


@dataclasses.dataclass(frozen=True)
class QwenVisionConfig(JsonConfig):
  """Qwen2.5-VL's vision tower (transformers' `Qwen2_5_VLVisionConfig`; defaults = the 3B / 7B one).

  Patches are `temporal_patch_size x patch_size x patch_size` (an image is its own frame twice);
  `spatial_merge_size**2` neighbouring patches become one decoder token. Blocks attend inside windows of
  `window_size` pixels, except those in `fullatt_block_indexes`, which attend over the whole image.
  """

  hidden_size: int = 1280
  intermediate_size: int = 3420
  depth: int = 32
  num_heads: int = 16
  out_hidden_size: int = 2048
  patch_size: int = 14
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  window_size: int = 112
  fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
  in_channels: int = 3
  hidden_act: str = "silu"
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-6

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patch_dim(self) -> int:
    """Length of one flattened patch, `(C, T, p, p)` (what the image processor returns per row)."""
    return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

  @property
  def merge_unit(self) -> int:
    return self.spatial_merge_size ** 2

  @property
  def window_tokens(self) -> int:
    """Side of an attention window in merged tokens (112 px / 14 px / 2 = 4)."""
    return self.window_size // self.spatial_merge_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class Qwen25VLConfig(JsonConfig):
  """Qwen2.5-VL: dynamic-resolution ViT with windowed attention + 2x2 patch merger + Qwen2 decoder
  (q/k/v biases, M-RoPE). `text` is the shared decoder config (`qkv_bias`, `rope.mrope_section`).

  `min_pixels` / `max_pixels` bound the resized picture (and so its number of image tokens); the
  converter takes them from the checkpoint's `preprocessor_config.json`, a run may override them.
  """

  vision: QwenVisionConfig = dataclasses.field(default_factory=QwenVisionConfig)
  text: LlamaConfig = dataclasses.field(default_factory=lambda: LlamaConfig(
      vocab_size=151936, hidden_size=2048, num_hidden_layers=36, num_attention_heads=16,
      num_key_value_heads=2, head_dim=128, qkv_bias=True, rms_norm_eps=1e-6, tie_word_embeddings=True,
      rope=RopeConfig(theta=1e6, mrope_section=(16, 24, 24))))
  image_token_id: int = 151655
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653
  min_pixels: int = 3136
  max_pixels: int = 12845056
  family: str = "qwen25vl"
  dtype: str = "float32"
  param_dtype: str = "float32"
  scan_layers: bool = True
  remat: bool = False
  attention: str = "xla"  # c3l_jax.models.attention: auto | xla | cudnn | splash (the decoder's)

  @property
  def image_seq_length(self) -> int:
    """The most image tokens one picture can become (`max_pixels` / (28 x 28)): the budget the memory
    plan sizes for; each picture's own count depends on its size (`image_grid_thw`)."""
    side = self.vision.patch_size * self.vision.spatial_merge_size
    return self.max_pixels // (side * side)

  def __post_init__(self):
    if 2 * sum(self.text.rope.mrope_section) != self.text.head_dim:
      raise ValueError(f"mrope_section {list(self.text.rope.mrope_section)} does not split head_dim "
                       f"{self.text.head_dim} (its sum must be head_dim / 2)")
    if self.vision.out_hidden_size != self.text.hidden_size:
      raise ValueError(f"vision out_hidden_size {self.vision.out_hidden_size} != text hidden_size "
                       f"{self.text.hidden_size}")
    bad = [i for i in self.vision.fullatt_block_indexes if not 0 <= i < self.vision.depth]
    if bad:
      raise ValueError(f"fullatt_block_indexes {bad} outside the {self.vision.depth} vision blocks")


ModelConfig = LlavaConfig | MiniGPT4Config | Qwen25VLConfig
FAMILIES = ("llava15", "minigpt4", "qwen25vl")


def config_from_dict(d: dict[str, Any]) -> ModelConfig:
  """The model config of a `c3l_model.json` dict, by its `family` (LLaVA-1.5 when absent)."""
  family = d.get("family", "llava15")
  if family == "llava15":
    return LlavaConfig.from_dict(d)
  if family == "minigpt4":
    return MiniGPT4Config.from_dict(d)
  if family == "qwen25vl":
    return Qwen25VLConfig.from_dict(d)
  raise ValueError(f"unknown model family {family!r} (known: {', '.join(FAMILIES)})")


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
  mrope = params.get("mrope_section") or ()
  if rope_type == "mrope":  # the transformers-4 spelling of Qwen2-VL's M-RoPE (default frequencies)
    rope_type = "default"
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
      mrope_section=tuple(int(m) for m in mrope),
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


def _int_size(value: Any, what: str) -> int:
  if isinstance(value, (list, tuple)):
    if len(set(value)) != 1:
      raise ValueError(f"non-square {what} {list(value)} is not supported")
    value = value[0]
  return int(value)


def eva_from_hf(v: Any) -> EVAVisionConfig:
  """`EVAVisionConfig` from a transformers `Blip2VisionConfig` (object or dict)."""
  act = _get(v, "hidden_act", "gelu")
  if act not in ("gelu", "quick_gelu", "gelu_pytorch_tanh"):
    raise ValueError(f"unsupported BLIP-2 vision hidden_act {act!r}")
  return EVAVisionConfig(
      hidden_size=_get(v, "hidden_size", 1408),
      intermediate_size=_get(v, "intermediate_size", 6144),
      num_hidden_layers=_get(v, "num_hidden_layers", 39),
      num_attention_heads=_get(v, "num_attention_heads", 16),
      image_size=_int_size(_get(v, "image_size", 224), "image_size"),
      patch_size=_int_size(_get(v, "patch_size", 14), "patch_size"),
      num_channels=_get(v, "num_channels", 3) or 3,
      layer_norm_eps=float(_get(v, "layer_norm_eps", 1e-6)),
      hidden_act=act,
      qkv_bias=bool(_get(v, "qkv_bias", True)),
  )


def qformer_from_hf(q: Any, num_query_tokens: int, encoder_hidden_size: int) -> QFormerConfig:
  """`QFormerConfig` from a transformers `Blip2QFormerConfig` (object or dict)."""
  act = _get(q, "hidden_act", "gelu")
  if act not in ("gelu", "gelu_pytorch_tanh", "relu"):
    raise ValueError(f"unsupported Q-Former hidden_act {act!r}")
  return QFormerConfig(
      hidden_size=_get(q, "hidden_size", 768),
      intermediate_size=_get(q, "intermediate_size", 3072),
      num_hidden_layers=_get(q, "num_hidden_layers", 12),
      num_attention_heads=_get(q, "num_attention_heads", 12),
      layer_norm_eps=float(_get(q, "layer_norm_eps", 1e-12)),
      hidden_act=act,
      cross_attention_frequency=int(_get(q, "cross_attention_frequency", 2)),
      encoder_hidden_size=encoder_hidden_size,
      num_query_tokens=int(num_query_tokens),
  )


def minigpt4_from_hf(blip2: Any, llm: Any, variant: str = "vicuna0",
                     image_size: int | None = None) -> MiniGPT4Config:
  """A `MiniGPT4Config` from a transformers BLIP-2 config (`model_type='blip-2'`) and a Llama config.

  Args:
    variant: `vicuna0` (Q-Former, `###Human:` prompts) or `llama2` (no Q-Former: 4 adjacent patch
      features concatenated; `[INST]` prompts).
    image_size: input resolution; None keeps the BLIP-2 vision config's (224). Another size needs the
      position embeddings interpolated (the converter does it, as EVA's `interpolate_pos_embed`).
  Raises:
    ValueError: a config that is not BLIP-2 / Llama, or an unsupported feature.
  """
  if _get(blip2, "model_type") != "blip-2":
    raise ValueError(f"not a BLIP-2 config: model_type={_get(blip2, 'model_type')!r} (expected 'blip-2')")
  if _get(llm, "model_type", "llama") != "llama":
    raise ValueError(f"not a Llama config: model_type={_get(llm, 'model_type')!r} (expected 'llama')")
  if variant not in MINIGPT4_VARIANTS:
    raise ValueError(f"unknown MiniGPT-4 variant {variant!r} (valid: {', '.join(MINIGPT4_VARIANTS)})")
  vision = eva_from_hf(_get(blip2, "vision_config") or {})
  if image_size is not None:
    vision = dataclasses.replace(vision, image_size=int(image_size))
  qformer = None
  if variant == "vicuna0":
    qformer = qformer_from_hf(_get(blip2, "qformer_config") or {},
                              _get(blip2, "num_query_tokens", 32), vision.hidden_size)
  text = llama_from_hf(llm)
  return MiniGPT4Config(vision=vision, qformer=qformer, text=text, image_token_id=text.vocab_size,
                        variant=variant)


def qwen25vl_from_hf(hf: Any, preprocessor: dict | None = None) -> Qwen25VLConfig:
  """A `Qwen25VLConfig` from transformers' `Qwen2_5_VLConfig` (object or `config.json` dict: the flat
  4.41-era schema with text fields at the top level, or the nested 5.x one), and the image processor's
  `min_pixels` / `max_pixels` from `preprocessor_config.json` (dict) when given.

  Raises:
    ValueError: not a Qwen2.5-VL config, or a feature this implementation does not have.
  """
  model_type = _get(hf, "model_type")
  if model_type != "qwen2_5_vl":
    raise ValueError(f"not a Qwen2.5-VL config: model_type={model_type!r} (expected 'qwen2_5_vl')")
  text = _get(hf, "text_config") or hf
  if bool(_get(text, "use_sliding_window", False)):
    raise ValueError("use_sliding_window=true is not supported (no published Qwen2.5-VL uses it)")
  text_cfg = llama_from_hf(text)
  tie = bool(_get(hf, "tie_word_embeddings", False)) or text_cfg.tie_word_embeddings
  head_dim = text_cfg.hidden_size // text_cfg.num_attention_heads  # Qwen2 ignores a `head_dim` field
  text_cfg = dataclasses.replace(text_cfg, tie_word_embeddings=tie, qkv_bias=True, attention_bias=False,
                                 head_dim=head_dim)
  if not text_cfg.rope.mrope_section:
    raise ValueError("the config has no rope mrope_section (Qwen2.5-VL's multimodal RoPE)")
  v = _get(hf, "vision_config") or {}
  if _get(v, "hidden_act", "silu") not in ACTIVATIONS_KNOWN:
    raise ValueError(f"unsupported vision hidden_act {_get(v, 'hidden_act')!r}")
  rope = _get(v, "rope_parameters") or {}
  vision = QwenVisionConfig(
      hidden_size=int(_get(v, "hidden_size", 1280)),
      intermediate_size=int(_get(v, "intermediate_size", 3420)),
      depth=int(_get(v, "depth", 32)),
      num_heads=int(_get(v, "num_heads", 16)),
      out_hidden_size=int(_get(v, "out_hidden_size", text_cfg.hidden_size)),
      patch_size=int(_get(v, "patch_size", 14)),
      temporal_patch_size=int(_get(v, "temporal_patch_size", 2)),
      spatial_merge_size=int(_get(v, "spatial_merge_size", 2)),
      window_size=int(_get(v, "window_size", 112)),
      fullatt_block_indexes=tuple(int(i) for i in _get(v, "fullatt_block_indexes", (7, 15, 23, 31))),
      in_channels=int(_get(v, "in_channels", None) or _get(v, "in_chans", 3)),
      hidden_act=_get(v, "hidden_act", "silu"),
      rope_theta=float(_get(rope, "rope_theta", 10000.0)),
  )
  pre = preprocessor or {}
  size = pre.get("size") or {}
  return Qwen25VLConfig(
      vision=vision, text=text_cfg,
      image_token_id=int(_get(hf, "image_token_id", 151655)),
      vision_start_token_id=int(_get(hf, "vision_start_token_id", 151652)),
      vision_end_token_id=int(_get(hf, "vision_end_token_id", 151653)),
      min_pixels=int(pre.get("min_pixels") or size.get("shortest_edge") or 3136),
      max_pixels=int(pre.get("max_pixels") or size.get("longest_edge") or 12845056),
  )


ACTIVATIONS_KNOWN = ("silu", "gelu", "quick_gelu", "gelu_pytorch_tanh", "relu")


def with_runtime(cfg: ModelConfig, **kwargs: Any) -> ModelConfig:
  """`cfg` with runtime fields (dtype, param_dtype, scan_layers, remat) replaced."""
  unknown = set(kwargs) - set(RUNTIME_FIELDS)
  if unknown:
    raise ValueError(f"not runtime fields: {sorted(unknown)}")
  return dataclasses.replace(cfg, **kwargs)
