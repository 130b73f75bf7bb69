"""Prompts rendered with the checkpoint's own processor and chat template.

"With image" is the user turn `[image, text]`; "no image" is the same conversation with the image part
removed (no `<image>` placeholder, no image tokens): LLaVA's text-only path, as the I2C score needs.
The answer's tokens are the tokenizer's encoding of the answer text alone (no BOS / EOS), i.e. the
tokens the model emits after the generation prompt.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np


def load_processor(model_dir: str) -> Any:
  """The HF processor saved next to a converted model (local files only, never the hub)."""
  from transformers import AutoProcessor

  if not os.path.exists(os.path.join(model_dir, "tokenizer_config.json")):
    raise FileNotFoundError(f"{model_dir!r} has no tokenizer files: convert from a HF directory that "
                            "includes the processor (tokenizer, preprocessor and chat template)")
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
  """Renders LLaVA-style prompts through `processor.apply_chat_template`.

  Args:
    processor: the checkpoint's HF processor (`load_processor`).
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
