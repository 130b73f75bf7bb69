"""Tiny random transformers LLaVA checkpoints and the torch reference computations the tests compare to."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                   image_size=28, patch_size=14, projection_dim=16)
TINY_TEXT = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                 rms_norm_eps=1e-6)
IMAGE_TOKEN = 127


def hf_llava_config(vision: dict | None = None, text: dict | None = None, **top):
  from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

  v = CLIPVisionConfig(**{**TINY_VISION, **(vision or {})})
  t = LlamaConfig(**{**TINY_TEXT, **(text or {})})
  top.setdefault("image_token_index", IMAGE_TOKEN)
  return LlavaConfig(vision_config=v, text_config=t, **top)


def make_hf_llava(path: str, seed: int = 0, vision: dict | None = None, text: dict | None = None,
                  logit_scale: float = 1.0, **top):
  """A random `LlavaForConditionalGeneration` saved (safetensors) under `path`; returns the model.

  `logit_scale` multiplies the (untied) LM head so next-token distributions are far from uniform, which
  makes probability-weighted quantities such as S(I2C) large enough to compare meaningfully.
  """
  import torch
  from transformers import LlavaForConditionalGeneration

  torch.manual_seed(seed)
  model = LlavaForConditionalGeneration(hf_llava_config(vision, text, **top)).eval()
  # Random init leaves norms at exactly 1 / 0 and biases at 0: perturb everything so a missed or
  # transposed weight shows up in the logits.
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.02 * torch.randn_like(p))
    if logit_scale != 1.0 and not model.config.tie_word_embeddings:
      model.lm_head.weight.mul_(logit_scale)
  model.save_pretrained(path)
  return model


def image_seq_length(model) -> int:
  cfg = model.config
  n = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
  return n + (1 if cfg.vision_feature_select_strategy == "full" else 0)


def llava_inputs(model, batch: int = 2, text_len: int = 6, seed: int = 0, left_pad: int = 0):
  """Token ids with one expanded `<image>` run per row, pixels `[B, 3, S, S]` and a padding mask.

  Row 0 is unpadded; the other rows are left-padded with `left_pad` pad tokens (id 0).
  """
  rng = np.random.default_rng(seed)
  n_img = image_seq_length(model)
  vocab = model.config.text_config.vocab_size
  rows, masks = [], []
  for b in range(batch):
    pre = rng.integers(3, IMAGE_TOKEN - 1, size=2)
    post = rng.integers(3, IMAGE_TOKEN - 1, size=text_len)
    ids = np.concatenate([[1], pre, np.full(n_img, IMAGE_TOKEN), post])
    pad = left_pad if b > 0 else 0
    rows.append(np.concatenate([np.zeros(pad, int), ids]))
    masks.append(np.concatenate([np.zeros(pad, int), np.ones(len(ids), int)]))
  width = max(len(r) for r in rows)
  tokens = np.stack([np.pad(r, (width - len(r), 0)) for r in rows])
  mask = np.stack([np.pad(m, (width - len(m), 0)) for m in masks])
  size = model.config.vision_config.image_size
  pixels = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
  assert tokens.max() < vocab
  return tokens.astype(np.int32), pixels, mask.astype(np.int32)


def torch_logits(model, tokens, pixels, mask) -> np.ndarray:
  """transformers' logits with positions counting real tokens only (as generate() does)."""
  import torch

  positions = np.maximum(np.cumsum(mask, axis=-1) - 1, 0)
  with torch.no_grad():
    out = model(input_ids=torch.as_tensor(tokens, dtype=torch.long),
                pixel_values=torch.as_tensor(pixels),
                attention_mask=torch.as_tensor(mask, dtype=torch.long),
                position_ids=torch.as_tensor(positions, dtype=torch.long))
  return out.logits.float().numpy()


def convert_cli(hf_path: str, out: str, *extra: str) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, "-m", "c3l_jax.convert", f"--hf_path={hf_path}", f"--out={out}", *extra],
      cwd=REPO, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def rewrite_layout(src: str, dst: str, rename, shards: int = 1) -> None:
  """Copy the checkpoint at `src` to `dst` with keys renamed by `rename` and split into `shards` files."""
  from safetensors.numpy import save_file

  from c3l_jax.convert import iter_safetensors

  os.makedirs(dst, exist_ok=True)
  tensors = {}
  for name in sorted(os.listdir(src)):
    if name.endswith(".safetensors"):
      tensors.update({rename(k): np.array(v) for k, v in iter_safetensors(os.path.join(src, name))})
    else:
      with open(os.path.join(src, name), "rb") as f, open(os.path.join(dst, name), "wb") as g:
        g.write(f.read())
  keys = sorted(tensors)
  weight_map = {}
  for i in range(shards):
    part = keys[i::shards]
    fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors" if shards > 1 else "model.safetensors"
    save_file({k: tensors[k] for k in part}, os.path.join(dst, fname))
    weight_map.update({k: fname for k in part})
  if shards > 1:
    with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {}, "weight_map": weight_map}, f)


# llava-hf's LLaVA-1.5 chat template (llava-hf/llava-1.5-7b-hf's chat_template.json): one copy, the
# library's (the shipped scenes model's processor uses it too).
from c3l_jax.data.prompts import LLAVA15_CHAT_TEMPLATE  # noqa: E402

_CORPUS = """USER: ASSISTANT: ? . , : a the red blue green yellow circle square triangle is are there in on of left right
above below what color shape how many objects image picture question answer describe small large
one two three four five sides next to and with a an it this that which where why because yes no
USER ASSISTANT Question Answer the object at top bottom middle of image sky ground tree car dog cat
""".split()


def make_tiny_processor(path: str, image_size: int = 28, patch_size: int = 14,
                        strategy: str = "default", vocab_size: int = 128):
  """A LLaVA processor whose tokenizer has exactly `vocab_size` ids, `<image>` being the last one.

  The tokenizer is a small SentencePiece-style (Metaspace) BPE trained on a fixed word list, with a
  `<s>` prefix like Llama's; the image processor is CLIP's at `image_size`; the chat template is
  llava-hf's LLaVA-1.5 template. Saved under `path` (next to a model made by `make_hf_llava`).
  """
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

  specials = ["<unk>", "<s>", "</s>", "<pad>"]
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Metaspace()
  tok.decoder = decoders.Metaspace()
  sentences = [" ".join(_CORPUS[i:i + 7]) for i in range(0, len(_CORPUS), 3)] * 4
  tok.train_from_iterator(sentences, trainers.BpeTrainer(vocab_size=vocab_size - 1,
                                                         special_tokens=specials))
  filler = [f"<extra_{i}>" for i in range(vocab_size - 1 - tok.get_vocab_size())]
  tok.add_tokens(filler)
  tok.add_special_tokens(["<image>"])
  assert tok.get_vocab_size() == vocab_size and tok.token_to_id("<image>") == vocab_size - 1
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                     special_tokens=[("<s>", 1)])
  tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                      unk_token="<unk>", pad_token="<pad>")
  image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                       crop_size={"height": image_size, "width": image_size})
  processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                             patch_size=patch_size, vision_feature_select_strategy=strategy,
                             chat_template=LLAVA15_CHAT_TEMPLATE, num_additional_image_tokens=1)
  processor.save_pretrained(path)
  return processor


def torch_answer_logprobs(model, prompt_ids, answer_ids, pixel_values=None):
  """Per-token log p(answer_t | prompt, answer_<t) `[n]` and full log-softmax rows `[n, V]`."""
  import torch

  ids = torch.as_tensor([list(prompt_ids) + list(answer_ids)], dtype=torch.long)
  kwargs = {} if pixel_values is None else {"pixel_values": torch.as_tensor(pixel_values[None])}
  n = len(answer_ids)
  with torch.no_grad():  # the LM head on the rows that predict the answer only (the last n + 1 but one)
    logits = model(input_ids=ids, logits_to_keep=n + 1, **kwargs).logits[0, :n].double()
  rows = torch.log_softmax(logits, dim=-1)
  token = rows[torch.arange(len(answer_ids)), torch.as_tensor(answer_ids)]
  return token.numpy(), rows.numpy()


def torch_i2c(model, prompt_image, prompt_text, answer, pixel_values, mode="eq1"):
  """S(I2C) (eq. 1 or full KL), logp_image, logp_text from transformers' PyTorch LLaVA."""
  lv, fv = torch_answer_logprobs(model, prompt_image, answer, pixel_values)
  ld, fd = torch_answer_logprobs(model, prompt_text, answer)
  if mode == "eq1":
    i2c = float(np.sum(np.exp(lv) * (lv - ld)))
  else:
    i2c = float(np.sum(np.exp(fv) * (fv - fd)))
  return dict(i2c=i2c, logp_image=float(lv.sum()), logp_text=float(ld.sum()), n_tokens=len(answer))
