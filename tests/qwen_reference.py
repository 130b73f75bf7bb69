"""Tiny Qwen2.5-VL checkpoints made from the real 3B files, and transformers' computations to compare to.

`make_tiny_qwen` copies the published small files of `Qwen/Qwen2.5-VL-3B-Instruct` (tokenizer, chat
template, image processor, generation config; `tests/fixtures/qwen2.5-vl-3b-instruct`), shrinks the
real `config.json` (same flat schema, same token ids and vocabulary, a few narrow layers), builds
transformers' `Qwen2_5_VLForConditionalGeneration` from it with random weights rounded to bfloat16, and
saves them as the hub does: bf16 safetensors in two shards with an index, in the published key layout
(`visual.*`, `model.*`, no `lm_head.weight` when tied) or transformers 5's (`model.visual.*`,
`model.language_model.*`). The torch model stays in float32: the reference.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

from real_files import QWEN25VL_3B

TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
TINY_VISION = dict(depth=4, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=32,
                   fullatt_block_indexes=[1, 3])
MAX_PIXELS = 448 * 56  # the tiny directory's image budget: at most 32 image tokens per picture
QUESTION = "What is in the picture?"
ANSWER = "A small red house next to a tall green tree."


def make_tiny_qwen(path: str, *, tied: bool = True, layout: str = "published", seed: int = 0,
                   vocab_size: int | None = None, reply: str | None = None):
  """Write the tiny checkpoint directory `path`; returns the float32 torch model (eval mode).
  `reply` (untied only): the model answers every prompt with this text (`teach_reply`)."""
  import torch
  from safetensors.torch import save_file
  from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

  shutil.copytree(QWEN25VL_3B, path)
  os.remove(os.path.join(path, "model.safetensors.index.json"))
  with open(os.path.join(path, "config.json")) as f:
    cfg = json.load(f)
  cfg.update(TINY_TEXT, tie_word_embeddings=tied)
  if vocab_size:
    cfg["vocab_size"] = vocab_size
  cfg["vision_config"].update(TINY_VISION)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(cfg, f, indent=2)
  with open(os.path.join(path, "preprocessor_config.json")) as f:
    pre = json.load(f)
  pre["max_pixels"] = MAX_PIXELS
  with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
    json.dump(pre, f, indent=2)

  torch.manual_seed(seed)
  model = Qwen2_5_VLForConditionalGeneration(AutoConfig.from_pretrained(path)).float().eval()
  # Weights large enough that every block moves the logits, and peaked next-token distributions
  # (embedding std 1): a missed bias, a transposed kernel or a wrong position shows.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "embed_tokens" in name or "lm_head" in name:
        p.normal_(0.0, 1.0)
      elif p.ndim >= 2:
        p.normal_(0.0, 1.0 / np.sqrt(p[0].numel()))
      elif name.endswith("bias"):
        p.normal_(0.0, 0.1)
      else:  # norm weights
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      p.copy_(p.to(torch.bfloat16).float())  # what the bf16 shards hold
    if reply is not None:
      teach_reply(model, _chain(path, reply))
      for p in model.parameters():
        p.copy_(p.to(torch.bfloat16).float())
  state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
  if tied:
    state.pop("lm_head.weight")
  names = sorted(state)
  renamed = {published_name(k) if layout == "published" else k: k for k in names}
  keys = sorted(renamed)
  half = len(keys) // 2
  weight_map = {}
  for i, part in enumerate((keys[:half], keys[half:])):
    file = f"model-{i + 1:05d}-of-00002.safetensors"
    save_file({k: state[renamed[k]] for k in part}, os.path.join(path, file), metadata={"format": "pt"})
    weight_map.update({k: file for k in part})
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": 2 * sum(v.numel() for v in state.values())},
               "weight_map": weight_map}, f, indent=2)
  return model


REPLY_DAMPING = 0.15  # how much of each decoder block's output a reply model keeps


def _chain(path: str, reply: str) -> list[int]:
  """The token chain of a reply: the chat template's last prompt token ("\\n" after
  `<|im_start|>assistant`), the reply's tokens, then `<|im_end|>` (the generation config's stop id)."""
  from transformers import AutoTokenizer

  tokenizer = AutoTokenizer.from_pretrained(path)
  ids = [198] + tokenizer(reply, add_special_tokens=False)["input_ids"] + [151645]
  if len(set(ids)) != len(ids):
    raise ValueError(f"{reply!r}: a reply model needs every token of the reply once: {ids}")
  return ids


def teach_reply(model, chain: list[int]) -> None:
  """Set the weights so that greedy decoding (and sampling: the margin is ~40 nats) after `chain[0]`
  writes `chain[1:]`, whatever the prompt and picture: a bigram table in the untied head. Each chain
  token gets its own orthogonal embedding direction, the head row of its successor points along it,
  the other head rows are near 0, and every decoder block's output (attention `o_proj`, MLP
  `down_proj`) is damped by `REPLY_DAMPING`, so the picture and the prompt still move the
  log-likelihoods (scores differ per picture) but never the argmax."""
  import torch

  text = model.model.language_model if hasattr(model.model, "language_model") else model.model
  embed, head = text.embed_tokens.weight, model.lm_head.weight
  d = embed.shape[1]
  if model.config.tie_word_embeddings or len(chain) > d:
    raise ValueError("a reply model needs an untied head and a chain no longer than the width")
  basis = torch.linalg.qr(torch.randn(d, d))[0][:, :len(chain)].T * d ** 0.5  # orthogonal rows, norm sqrt(d)
  norm = text.norm.weight
  head.mul_(0.01)
  for i, token in enumerate(chain):
    embed[token] = basis[i]
    if i + 1 < len(chain):
      direction = norm * basis[i]
      head[chain[i + 1]] = 7.0 * direction / direction.norm()
  for layer in text.layers:
    layer.self_attn.o_proj.weight.mul_(REPLY_DAMPING)
    layer.mlp.down_proj.weight.mul_(REPLY_DAMPING)


def published_name(module_name: str) -> str:
  """transformers 5's module name -> the published hub key (`visual.*`, `model.*`, `lm_head.*`)."""
  if module_name.startswith("model.visual."):
    return module_name[len("model."):]
  if module_name.startswith("model.language_model."):
    return "model." + module_name[len("model.language_model."):]
  return module_name


class Processor:
  """The checkpoint's tokenizer, chat template and image processor (transformers' PIL backend)."""

  def __init__(self, path: str):
    from transformers import AutoImageProcessor, AutoTokenizer

    self.tokenizer = AutoTokenizer.from_pretrained(path)
    self.images = AutoImageProcessor.from_pretrained(path)
    with open(os.path.join(path, "chat_template.json")) as f:
      self.template = json.load(f)["chat_template"]
    self.image_token = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")

  def prompt(self, question: str, with_image: bool) -> list[int]:
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": question}]
    text = self.tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                              chat_template=self.template, tokenize=False,
                                              add_generation_prompt=True)
    return self.tokenizer(text, add_special_tokens=False)["input_ids"]

  def image(self, picture) -> tuple[np.ndarray, np.ndarray]:
    out = self.images(images=[picture], return_tensors="np")
    return out["pixel_values"].astype(np.float32), out["image_grid_thw"][0]

  def expand(self, ids: list[int], n_image_tokens: int) -> list[int]:
    """The processor's expansion of the one `<|image_pad|>` into the image's tokens."""
    i = ids.index(self.image_token)
    return ids[:i] + [self.image_token] * n_image_tokens + ids[i + 1:]


def pictures():
  """Six pictures whose token counts all differ: a panorama spanning four attention windows, a tall
  one spanning three, a tiny one (upscaled to the minimum), a grey one, an RGBA one and a photo-like one."""
  from PIL import Image

  rng = np.random.default_rng(0)

  def noise(w, h, mode="RGB"):
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    a = rng.integers(0, 256, size=(h, w, channels), dtype=np.uint8)
    return Image.fromarray(a[..., 0] if mode == "L" else a, mode)

  return {"panorama": noise(448, 56), "tall": noise(56, 300), "tiny": noise(10, 10),
          "grey": noise(100, 70, "L"), "rgba": noise(140, 84, "RGBA"), "photo": noise(200, 150)}


def torch_forward(model, ids: list[int], pixel_values=None, grid=None, image_token: int = 151655
                  ) -> np.ndarray:
  """transformers' float32 logits `[T, V]` of one unpadded row, with M-RoPE (it builds the 3-D
  positions only when given `mm_token_type_ids`)."""
  import torch

  input_ids = torch.as_tensor([ids])
  kwargs = {}
  if pixel_values is not None:
    kwargs = dict(pixel_values=torch.as_tensor(pixel_values), image_grid_thw=torch.as_tensor(np.asarray([grid])),
                  mm_token_type_ids=(input_ids == image_token).int())
  with torch.no_grad():
    return model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs).logits[0].numpy()


def torch_greedy(model, ids: list[int], pixel_values, grid, new_tokens: int,
                 image_token: int = 151655) -> list[int]:
  """transformers' greedy continuation: `do_sample=False`, `repetition_penalty=1.0` (the checkpoint's
  generation_config asks for sampling with 1.05), no EOS stop, exactly `new_tokens` tokens."""
  import torch
  from transformers import GenerationConfig

  input_ids = torch.as_tensor([ids])
  gen = GenerationConfig(do_sample=False, repetition_penalty=1.0, max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=151643)
  with torch.no_grad():
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                         pixel_values=torch.as_tensor(pixel_values), image_grid_thw=torch.as_tensor(np.asarray([grid])),
                         mm_token_type_ids=(input_ids == image_token).int(), generation_config=gen)
  return out[0, len(ids):].tolist()


def i2c(logp_image: np.ndarray, logp_text: np.ndarray) -> float:
  """Eq. 1 by hand: sum_t p_t^v log(p_t^v / p_t^d) from the answer tokens' log-probs."""
  return float(np.sum(np.exp(logp_image) * (logp_image - logp_text)))


def answer_logprobs(logits: np.ndarray, ids: list[int], n_answer: int) -> np.ndarray:
  """Teacher-forced log-probs of the last `n_answer` tokens of `ids` from logits `[T, V]` (float64)."""
  logits = logits.astype(np.float64)
  t = len(ids)
  pred = logits[t - n_answer - 1:t - 1]
  lse = np.log(np.sum(np.exp(pred - pred.max(-1, keepdims=True)), -1)) + pred.max(-1)
  return pred[np.arange(n_answer), ids[t - n_answer:]] - lse
