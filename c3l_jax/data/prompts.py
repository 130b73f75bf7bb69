"""Prompts of every model family, in one place: LLaVA-1.5's chat template and MiniGPT-4's templates.

"With image" is the user turn `[image, text]`; "no image" is the same conversation with the image part
removed (no image placeholder, no image tokens), as the I2C score needs:

- LLaVA-1.5: rendered by the checkpoint's own processor and chat template (`USER: <image>\nQ ASSISTANT:`);
  "no image" is LLaVA's text-only path (no `<image>` placeholder).
- MiniGPT-4 (`MiniGPT4Processor`, `MINIGPT4_TEMPLATES`): `###Human: <Img><ImageHere></Img> Q ###Assistant: `
  (Vicuna v0, generation stops at the string "###") or `[INST] <Img><ImageHere></Img> Q [/INST] `
  (Llama-2), the `prompt_template`s of MiniGPT-4's eval configs; "no image" drops `<Img><ImageHere></Img> `.
  The prompt is tokenized as MiniGPT-4's `get_context_emb` does: split at `<ImageHere>`, the first segment
  with BOS, the others without, and the image features in between (here: `image_seq_length` placeholder
  ids, which the model overwrites).

The answer's tokens are the tokenizer's encoding of the answer text alone (no BOS / EOS), i.e. the
tokens the model emits after the generation prompt.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import numpy as np

MODEL_CONFIG_FILE = "c3l_model.json"  # = c3l_jax.checkpoint.MODEL_CONFIG (read here without jax)
IMAGE_HERE = "<ImageHere>"

# The llava-hf LLaVA-1.5 chat template (as shipped in llava-hf/llava-1.5-7b-hf's chat_template.json).
LLAVA15_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] "
    "!= 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


@dataclasses.dataclass(frozen=True)
class MiniGPT4Template:
  """One MiniGPT-4 prompt style: `template.format(user_message)` is the whole generation prompt."""

  template: str  # MiniGPT-4's `prompt_template`
  image: str  # what stands for the image inside the user message
  stop_strings: tuple[str, ...]  # generation stops at these strings (besides EOS)
  end: str  # what closes an assistant turn (MiniGPT-4's `end_sym`)

  def user_message(self, text: str, with_image: bool) -> str:
    return f"{self.image} {text}" if with_image else text

  def render(self, text: str, with_image: bool) -> str:
    return self.template.format(self.user_message(text, with_image))


# MiniGPT-4's eval configs (eval_configs/minigpt4_eval.yaml, eval_configs/minigpt4_llama2_eval.yaml).
MINIGPT4_TEMPLATES: dict[str, MiniGPT4Template] = {
    "vicuna0": MiniGPT4Template("###Human: {} ###Assistant: ", "<Img><ImageHere></Img>", ("###",), "###"),
    "llama2": MiniGPT4Template("[INST] {} [/INST] ", "<Img><ImageHere></Img>", (), "</s>"),
}


def _blip_image_processor(**kwargs: Any) -> Any:
  """transformers' BLIP image processor (the PIL backend when transformers 5 has one: no torchvision)."""
  try:
    from transformers import BlipImageProcessorPil as cls
  except ImportError:
    from transformers import BlipImageProcessor as cls
  return cls(**kwargs)


def blip2_image_processor(image_size: int) -> Any:
  """MiniGPT-4's `blip2_image_eval`: bicubic resize to `image_size`^2, /255, BLIP-2 (CLIP) mean/std."""
  return _blip_image_processor(size={"height": image_size, "width": image_size}, resample=3,
                               do_resize=True, do_rescale=True, do_normalize=True,
                               do_convert_rgb=True)


class MiniGPT4Processor:
  """MiniGPT-4's prompts and image preprocessing behind LLaVA's processor interface.

  `apply_chat_template(conversation)` renders the MiniGPT-4 template; `__call__(images=, text=)` tokenizes
  a prompt holding `<ImageHere>` segment by segment (as MiniGPT-4's `get_context_emb`) with
  `image_seq_length` placeholder ids in place of `<ImageHere>`, and preprocesses the image with the BLIP
  image processor. `tokenizer` and `image_processor` are the usual transformers objects.
  """

  def __init__(self, tokenizer: Any, image_processor: Any, variant: str, image_token_id: int,
               image_seq_length: int):
    if variant not in MINIGPT4_TEMPLATES:
      raise ValueError(f"unknown MiniGPT-4 variant {variant!r} (valid: {', '.join(MINIGPT4_TEMPLATES)})")
    self.tokenizer = tokenizer
    self.image_processor = image_processor
    self.variant = variant
    self.template = MINIGPT4_TEMPLATES[variant]
    self.image_token_id = image_token_id
    self.image_seq_length = image_seq_length

  @classmethod
  def from_pretrained(cls, model_dir: str, model_config: dict) -> "MiniGPT4Processor":
    """From a converted MiniGPT-4 directory (tokenizer files, `preprocessor_config.json`)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    with open(os.path.join(model_dir, "preprocessor_config.json")) as f:
      pp = json.load(f)
    keys = ("do_resize", "size", "resample", "do_rescale", "rescale_factor", "do_normalize",
            "image_mean", "image_std", "do_convert_rgb")
    image_processor = _blip_image_processor(**{k: pp[k] for k in keys if k in pp})
    vision, qformer = model_config["vision"], model_config.get("qformer")
    if qformer is not None:
      seq = qformer["num_query_tokens"]
    else:
      seq = (vision["image_size"] // vision["patch_size"]) ** 2 // model_config.get("merge_patches", 4)
    return cls(tokenizer, image_processor, model_config.get("variant", "vicuna0"),
               model_config["image_token_id"], seq)

  @property
  def stop_strings(self) -> tuple[str, ...]:
    return self.template.stop_strings

  def apply_chat_template(self, conversation: Sequence[dict], add_generation_prompt: bool = True,
                          tokenize: bool = False) -> str:
    """Render `[{"role": "user", "content": [{"type": "image"}?, {"type": "text", "text": q}]}, ...]`.

    A user turn is `template.format(message)` (which ends with the assistant tag, so a generation prompt
    is always added); an assistant turn is its text + `end`.
    """
    del add_generation_prompt
    if tokenize:
      raise NotImplementedError("MiniGPT4Processor.apply_chat_template renders text only")
    out = []
    for message in conversation:
      content = message["content"]
      if isinstance(content, str):
        content = [{"type": "text", "text": content}]
      text = " ".join(c["text"] for c in content if c.get("type") == "text")
      if message["role"] == "assistant":
        out.append(text + self.template.end)
      else:
        out.append(self.template.render(text, any(c.get("type") == "image" for c in content)))
    return "".join(out)

  def encode_text(self, text: str) -> list[int]:
    """Token ids of a prompt, `<ImageHere>` -> `image_seq_length` placeholder ids (`get_context_emb`)."""
    ids: list[int] = []
    for i, segment in enumerate(text.split(IMAGE_HERE)):
      if i:
        ids += [self.image_token_id] * self.image_seq_length
      ids += self.tokenizer(segment, add_special_tokens=i == 0).input_ids
    return ids

  def __call__(self, images: Any = None, text: str | None = None, return_tensors: str = "np",
               **kwargs: Any) -> dict[str, np.ndarray]:
    """`{"input_ids": [1, T], "pixel_values": [N, C, H, W]}` (as LlavaProcessor returns with `np`)."""
    out: dict[str, np.ndarray] = {}
    if text is not None:
      out["input_ids"] = np.asarray([self.encode_text(text)], np.int64)
    if images is not None:
      out["pixel_values"] = np.asarray(
          self.image_processor(images=images, return_tensors="np")["pixel_values"], np.float32)
    return out


def read_model_config(model_dir: str) -> dict | None:
  """The `c3l_model.json` dict of a model directory, or None when it has none."""
  path = os.path.join(model_dir, MODEL_CONFIG_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def load_processor(model_dir: str) -> Any:
  """The processor saved next to a converted model (local files only, never the hub).

  LLaVA: the HF processor (`AutoProcessor`). MiniGPT-4 (`family` in `c3l_model.json`):
  `MiniGPT4Processor` over the saved tokenizer and BLIP image processor.
  """
  from transformers import AutoProcessor

  if not os.path.exists(os.path.join(model_dir, "tokenizer_config.json")):
    raise FileNotFoundError(f"{model_dir!r} has no tokenizer files: convert from a HF directory that "
                            "includes the processor (tokenizer, preprocessor and chat template)")
  model_config = read_model_config(model_dir)
  if model_config is not None and model_config.get("family") == "minigpt4":
    return MiniGPT4Processor.from_pretrained(model_dir, model_config)
  return AutoProcessor.from_pretrained(model_dir, local_files_only=True)


# VIGC-format generation instructions, one per instruction type (the generator's input besides the
# image); the target is "Question: {q} Answer: {a}" followed by EOS.
VIGC_INSTRUCTIONS = {
    "conversation": "Generate a question about this image that can be answered by looking at it, "
                    "then answer it.",
    "detailed_description": "Generate an instruction asking for a detailed description of this image, "
                            "then give the description.",
    "complex_reasoning": "Generate a question about this image that needs reasoning about its content, "
                         "then answer it.",
}
INSTRUCTION_TYPES = tuple(VIGC_INSTRUCTIONS)


def vigc_target(question: str, answer: str) -> str:
  return f"Question: {question} Answer: {answer}"


@dataclasses.dataclass
class EncodedQA:
  """Token ids of one (question, answer) pair, with and without the image."""

  prompt_image: list[int]  # generation prompt with the image tokens expanded
  prompt_text: list[int]  # the same prompt without the image part
  answer: list[int]
  pixel_values: np.ndarray | None  # [C, H, W]


class PromptBuilder:
  """Renders prompts through `processor.apply_chat_template` (LLaVA's chat template or MiniGPT-4's).

  Args:
    processor: the checkpoint's processor (`load_processor`): a HF LLaVA processor or a
      `MiniGPT4Processor`.
    image_token_id / image_seq_length: from the model config. When given, every encoded image prompt
      is checked to hold exactly one run of `image_seq_length` image tokens; a processor saved without
      `patch_size` (older llava-hf uploads) leaves a single `<image>` token, which is expanded here.
  """

  def __init__(self, processor: Any, image_token_id: int | None = None,
               image_seq_length: int | None = None):
    self.processor = processor
    self.tokenizer = processor.tokenizer
    self.image_token_id = image_token_id
    self.image_seq_length = image_seq_length

  def conversation(self, question: str, with_image: bool) -> list[dict]:
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": question}]
    return [{"role": "user", "content": content}]

  def prompt(self, question: str, with_image: bool) -> str:
    return self.processor.apply_chat_template(self.conversation(question, with_image),
                                              add_generation_prompt=True, tokenize=False)

  def encode_prompt(self, question: str, image: Any | None) -> tuple[list[int], np.ndarray | None]:
    """Prompt ids (image tokens expanded by the processor) and pixels `[C, H, W]` (or None)."""
    text = self.prompt(question, image is not None)
    if image is None:
      return self.tokenizer(text, add_special_tokens=True).input_ids, None
    out = self.processor(images=image, text=text, return_tensors="np")
    return self._expand_image(out["input_ids"][0].tolist()), out["pixel_values"][0]

  def _expand_image(self, ids: list[int]) -> list[int]:
    if self.image_token_id is None or self.image_seq_length is None:
      return ids
    count = ids.count(self.image_token_id)
    if count == self.image_seq_length:
      return ids
    if count == 1:
      at = ids.index(self.image_token_id)
      return ids[:at] + [self.image_token_id] * self.image_seq_length + ids[at + 1:]
    raise ValueError(f"the processor produced {count} image tokens; the model expects "
                     f"{self.image_seq_length} (check the processor's patch_size / "
                     "vision_feature_select_strategy)")

  @property
  def stop_strings(self) -> tuple[str, ...]:
    """Strings that end a generation besides EOS (MiniGPT-4 Vicuna: "###"); cut from decoded text."""
    return tuple(getattr(self.processor, "stop_strings", ()))

  @property
  def stop_sequences(self) -> tuple[tuple[int, ...], ...]:
    """Token-id sequences that spell a stop string, for `SamplingConfig.stop_sequences`.

    A stop string tokenizes differently alone and after a word (SentencePiece: "###" is one "▁###"
    token at a word start, "##" + "#" inside a word; MiniGPT-4's `StoppingCriteriaSub` lists both), so
    both are returned. Text is still cut at the string itself (`sampling.decode_texts`).
    """
    seqs: list[tuple[int, ...]] = []
    for stop in self.stop_strings:
      alone = tuple(self.tokenizer(stop, add_special_tokens=False).input_ids)
      word = self.tokenizer("a", add_special_tokens=False).input_ids
      joined = self.tokenizer("a" + stop, add_special_tokens=False).input_ids
      candidates = [alone]
      if joined[:len(word)] == word and len(joined) > len(word):
        candidates.append(tuple(joined[len(word):]))
      for seq in candidates:
        if seq and seq not in seqs and stop in self.tokenizer.decode(list(seq)):
          seqs.append(seq)
    return tuple(seqs)

  def encode_answer(self, answer: str) -> list[int]:
    return self.tokenizer(answer, add_special_tokens=False).input_ids

  def encode_qa(self, question: str, answer: str, image: Any) -> EncodedQA:
    prompt_image, pixels = self.encode_prompt(question, image)
    prompt_text, _ = self.encode_prompt(question, None)
    return EncodedQA(prompt_image, prompt_text, self.encode_answer(answer), pixels)

  def encode_vigc(self, instruction_type: str, question: str, answer: str, image: Any
                  ) -> tuple[list[int], list[int], list[int], np.ndarray | None]:
    """Generator training example: (prompt ids, target ids + EOS, sample ids without EOS, pixels).

    The prompt is the image + the VIGC instruction of `instruction_type`; the target and the sample
    text are "Question: {q} Answer: {a}" (the sample feeds the contrastive loss's embeddings).
    """
    if instruction_type not in VIGC_INSTRUCTIONS:
      raise ValueError(f"unknown instruction_type {instruction_type!r} "
                       f"(valid: {', '.join(INSTRUCTION_TYPES)})")
    prompt, pixels = self.encode_prompt(VIGC_INSTRUCTIONS[instruction_type], image)
    sample = self.encode_answer(vigc_target(question, answer))
    return prompt, sample + list(self.eos_ids), sample, pixels

  @property
  def eos_ids(self) -> tuple[int, ...]:
    eos = self.tokenizer.eos_token_id
    return () if eos is None else (int(eos),)

  @property
  def pad_id(self) -> int:
    pad = self.tokenizer.pad_token_id
    return int(pad if pad is not None else (self.tokenizer.eos_token_id or 0))
