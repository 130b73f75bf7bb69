"""The original LLaVA repository's model, prompts and preprocessing, in torch, for parity tests.

Ported from the LLaVA repository (the C3L authors' code is a copy of it), keeping its formulas:
- `conv_vicuna_v1.get_prompt()` (`llava/conversation.py`, `SeparatorStyle.TWO`);
- `tokenizer_image_token` (`llava/mm_utils.py`): each `<image>`-separated chunk tokenized with BOS, the
  BOS dropped from all but the first, `IMAGE_TOKEN_INDEX` (-200) in between;
- `expand2square` + `image_processor.preprocess` (`process_images` with `image_aspect_ratio="pad"`);
- `LlavaLlamaForCausalLM`: CLIP `hidden_states[mm_vision_select_layer][:, 1:]` -> `mm_projector`
  (Linear, GELU, Linear) spliced into the text embeddings where the ids hold -200
  (`prepare_inputs_labels_for_multimodal`), then the Llama decoder.
The checkpoint is written as that repository saves it: a flat Llama `config.json` with `mm_*` keys and
`model_type: llava` (the published one with tiny sizes), `pytorch_model-*.bin` shards with an index, fp16
tensors, the decoder's `rotary_emb.inv_freq` buffers, no CLIP weights; the CLIP tower is a separate
transformers CLIP directory.
"""

from __future__ import annotations

import json
import os

import numpy as np
import PIL.Image

import real_files

IMAGE_TOKEN_INDEX = -200
SYSTEM_VICUNA_V1 = ("A chat between a curious user and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the user's questions.")
TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                 image_size=336, patch_size=14, projection_dim=16)
TINY_LLAMA = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4)
# openai/clip-vit-large-patch14-336's preprocessor_config.json (its old int-size spelling).
CLIP_PREPROCESSOR = {
    "crop_size": 336, "do_center_crop": True, "do_normalize": True, "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 336}


def get_prompt(question: str, with_image: bool) -> str:
  """`conv_vicuna_v1` with one user turn and an empty assistant turn (`llava/eval/model_vqa.py`)."""
  qs = "<image>\n" + question if with_image else question
  messages = [["USER", qs], ["ASSISTANT", None]]
  seps = [" ", "</s>"]
  ret = SYSTEM_VICUNA_V1 + seps[0]
  for i, (role, message) in enumerate(messages):
    if message:
      ret += role + ": " + message + seps[i % 2]
    else:
      ret += role + ":"
  return ret


def tokenizer_image_token(prompt, tokenizer, image_token_index=IMAGE_TOKEN_INDEX):
  prompt_chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]

  def insert_separator(X, sep):
    return [ele for sublist in zip(X, [sep] * len(X)) for ele in sublist][:-1]

  input_ids = []
  offset = 0
  if len(prompt_chunks) > 0 and len(prompt_chunks[0]) > 0 and prompt_chunks[0][0] == tokenizer.bos_token_id:
    offset = 1
    input_ids.append(prompt_chunks[0][0])
  for x in insert_separator(prompt_chunks, [image_token_index] * (offset + 1)):
    input_ids.extend(x[offset:])
  return input_ids


def expand2square(pil_img, background_color):
  width, height = pil_img.size
  if width == height:
    return pil_img
  elif width > height:
    result = PIL.Image.new(pil_img.mode, (width, width), background_color)
    result.paste(pil_img, (0, (width - height) // 2))
    return result
  else:
    result = PIL.Image.new(pil_img.mode, (height, height), background_color)
    result.paste(pil_img, ((height - width) // 2, 0))
    return result


def process_image(image, image_processor) -> np.ndarray:
  image = expand2square(image, tuple(int(x * 255) for x in image_processor.image_mean))
  return np.asarray(image_processor.preprocess(image, return_tensors="np")["pixel_values"][0])


class OriginalLlava:
  """`LlavaLlamaForCausalLM`'s forward from transformers modules."""

  def __init__(self, seed: int = 0, select_layer: int = -2):
    import torch
    from transformers import CLIPConfig, CLIPModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    self.clip = CLIPModel(CLIPConfig(vision_config=TINY_CLIP,
                                     text_config=dict(hidden_size=16, intermediate_size=32,
                                                      num_hidden_layers=1, num_attention_heads=2,
                                                      projection_dim=16))).eval()
    self.llm = LlamaForCausalLM(LlamaConfig(vocab_size=32000, max_position_embeddings=4096,
                                            rms_norm_eps=1e-5, **TINY_LLAMA)).eval()
    d_v, d = TINY_CLIP["hidden_size"], TINY_LLAMA["hidden_size"]
    self.mm_projector = torch.nn.Sequential(torch.nn.Linear(d_v, d), torch.nn.GELU(),
                                            torch.nn.Linear(d, d)).eval()
    self.select_layer = select_layer
    with torch.no_grad():  # perturb (norms at 1, biases at 0), sharpen the head, round through fp16
      for module in (self.clip, self.llm, self.mm_projector):
        for p in module.parameters():
          p.add_(0.02 * torch.randn_like(p))
      self.llm.lm_head.weight.mul_(8.0)
      self.mm_projector[2].weight.mul_(10.0)  # the image moves the next-token distributions
      for module in (self.clip, self.llm, self.mm_projector):
        for p in module.parameters():
          p.copy_(p.half().float())

  def save(self, llava_dir: str, clip_dir: str) -> None:
    """The LLaVA repository's checkpoint layout (2 fp16 .bin shards) and a transformers CLIP directory."""
    import torch

    os.makedirs(llava_dir, exist_ok=True)
    state = {k: v.half() for k, v in self.llm.state_dict().items()}  # model.* and lm_head.weight
    for i in range(TINY_LLAMA["num_hidden_layers"]):  # the buffer old transformers saved
      head_dim = TINY_LLAMA["hidden_size"] // TINY_LLAMA["num_attention_heads"]
      state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = 1.0 / (
          10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    for k, v in self.mm_projector.state_dict().items():
      state[f"model.mm_projector.{k}"] = v.half()
    keys = sorted(state)
    weight_map = {}
    for s, part in enumerate((keys[0::2], keys[1::2])):
      name = f"pytorch_model-{s + 1:05d}-of-00002.bin"
      torch.save({k: state[k].contiguous() for k in part}, os.path.join(llava_dir, name))
      weight_map.update({k: name for k in part})
    with open(os.path.join(llava_dir, "pytorch_model.bin.index.json"), "w") as f:
      json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
    with open(os.path.join(real_files.LLAVA_ORIGINAL_7B, "config.json")) as f:
      config = json.load(f)
    config.update(TINY_LLAMA, mm_hidden_size=TINY_CLIP["hidden_size"], mm_vision_select_layer=self.select_layer)
    with open(os.path.join(llava_dir, "config.json"), "w") as f:
      json.dump(config, f, indent=2)
    real_files.copy_files(real_files.LLAVA_ORIGINAL_7B, llava_dir,
                          ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json"))
    real_files.copy_files(real_files.LLAVA_HF_7B, llava_dir, ("tokenizer.model",))
    self.clip.save_pretrained(clip_dir)
    # A published-style CLIP config: only the vision / text fields that differ from the defaults.
    with open(os.path.join(clip_dir, "config.json"), "w") as f:
      json.dump({"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 16,
                 "vision_config": TINY_CLIP,
                 "text_config": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, projection_dim=16)}, f)
    with open(os.path.join(clip_dir, "preprocessor_config.json"), "w") as f:
      json.dump(CLIP_PREPROCESSOR, f)

  def logits(self, input_ids: list[int], pixel_values: np.ndarray | None) -> np.ndarray:
    """Logits `[T', V]` of one prompt whose -200 is replaced by the projected image features."""
    import torch

    with torch.no_grad():
      embed = self.llm.get_input_embeddings()
      ids = torch.as_tensor(input_ids)
      if pixel_values is None or IMAGE_TOKEN_INDEX not in input_ids:
        embeds = embed(ids)
      else:
        out = self.clip.vision_model(torch.as_tensor(pixel_values[None]), output_hidden_states=True)
        feats = self.mm_projector(out.hidden_states[self.select_layer][:, 1:])[0]
        at = input_ids.index(IMAGE_TOKEN_INDEX)
        embeds = torch.cat([embed(ids[:at]), feats, embed(ids[at + 1:])])
      return self.llm(inputs_embeds=embeds[None]).logits[0].double().numpy()

  def greedy(self, input_ids: list[int], pixel_values: np.ndarray, steps: int) -> list[int]:
    out = []
    for _ in range(steps):
      out.append(int(np.argmax(self.logits(list(input_ids) + out, pixel_values)[-1])))
    return out
