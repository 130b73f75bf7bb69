"""A LLaVA-1.5-architecture model for the synthetic scenes world, built from the world alone (no downloads).

Three parts, all deterministic:

- **Processor** (`build_processor`): a word-level tokenizer (HF `tokenizers` `WordLevel`, lower-cased,
  punctuation split off, `question:` / `answer:` / `user:` / `assistant:` / `description:` kept as one
  token each) whose vocabulary is every token of the world's text (`scenes.vocabulary()`) and of every
  prompt the pipeline renders (`CAPTION_INSTRUCTIONS`, `QA_FROM_CAPTION`, `VIGC_INSTRUCTIONS`, the
  chat template, LLaVA's short-answer suffix, ...), wrapped as a `PreTrainedTokenizerFast`; CLIP's image
  processor at the world's 64 px (square images: resize and crop are the identity); the llava-hf
  LLaVA-1.5 chat template; all in a `LlavaProcessor` saved with `save_pretrained`. Decoding joins
  words with spaces and removes the space before `. , ? !` (WordPiece decoder with cleanup), so
  `instructions.parse_qa` and `scenes.check` read generated text as they read the world's own text
  (which is lower-cased on the way: the checker is case-insensitive).
- **Model** (`hf_config`, `build_hf_checkpoint`): a random `transformers.LlavaForConditionalGeneration`
  of a tiny size (`ModelSize`), saved next to the processor as a transformers checkpoint (safetensors),
  to be converted with `c3l_jax.convert` like any LLaVA-1.5 checkpoint.
- **Training text** (`vigc_example`, `caption_qa_example`, `vqa_example`, ...): the instruction-tuning
  mix of `c3l_jax.scenes.pretrain` in the formats the pipeline prompts with; generic QA
  (`scenes.generic_qa`, true for any image) is mixed into the "generate a question" data on purpose, so
  that a generator trained on it shows the language-prior problem C3L addresses.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Sequence

import numpy as np

from c3l_jax.data import instructions as ins
from c3l_jax.data.prompts import LLAVA15_CHAT_TEMPLATE, VIGC_INSTRUCTIONS, vigc_target
from c3l_jax.scenes import text as text_lib
from c3l_jax.scenes import world as world_lib

UNK, BOS, EOS, PAD, IMAGE = "<unk>", "<s>", "</s>", "<pad>", "<image>"
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD)  # ids 0..3; <image> is the last id
# LLaVA-1.5's short-answer VQA suffix (its VQAv2 / GQA / POPE prompts).
SHORT_ANSWER_SUFFIX = "Answer the question using a single word or phrase."
# Words followed by ":" that are one token (the VIGC markers, the chat roles, "Image description:").
_COLON_WORDS = ("question", "answer", "user", "assistant", "description")
PRE_TOKEN_PATTERN = r"(?:" + "|".join(_COLON_WORDS) + r"):|[a-z]+|[0-9]|[^\sa-z0-9]"

# Requests for a detailed description (the question of a detailed_description VIGC sample).
DESCRIPTION_REQUESTS = (
    "Describe the image in detail.",
    "Describe everything in the image.",
    "Give a detailed description of the image.",
    "What is in the image? Describe it in detail.",
)


def pre_tokenize(text: str) -> list[str]:
  """The tokenizer's word pieces of `text` (lower-cased), as the HF pre-tokenizer splits it."""
  return re.findall(PRE_TOKEN_PATTERN, text.lower())


def prompt_texts() -> list[str]:
  """Every fixed text the pipeline and the training mix put in a prompt."""
  texts = list(ins.CAPTION_INSTRUCTIONS) + list(VIGC_INSTRUCTIONS.values())
  for options in ins.QA_FROM_CAPTION.values():
    texts += [ins.qa_from_caption_prompt("", o) for o in options]
  texts += [ins.QA_FORMAT, SHORT_ANSWER_SUFFIX, "USER: ASSISTANT: Image description:"]
  texts += list(DESCRIPTION_REQUESTS)
  return texts


def vocabulary() -> list[str]:
  """The tokenizer's words (sorted): the world's tokens plus every word of `prompt_texts()`."""
  words = {t.lower() for t in text_lib.vocabulary()}
  for text in prompt_texts():
    words.update(pre_tokenize(text))
  return sorted(words)


def build_tokenizer() -> Any:
  """The word-level `PreTrainedTokenizerFast`: `<unk> <s> </s> <pad>` = 0..3, words, `<image>` last.

  Encoding adds `<s>` (as Llama's tokenizer); decoding skips special tokens when asked and removes the
  space before punctuation.
  """
  from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
  from transformers import PreTrainedTokenizerFast

  vocab = {tok: i for i, tok in enumerate(list(SPECIAL_TOKENS) + vocabulary())}
  tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
  tok.normalizer = normalizers.Lowercase()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.WhitespaceSplit(),
      pre_tokenizers.Split(Regex(PRE_TOKEN_PATTERN), behavior="isolated")])
  tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
  tok.add_special_tokens(list(SPECIAL_TOKENS) + [IMAGE])
  tok.post_processor = processors.TemplateProcessing(
      single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])])
  return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK,
                                 pad_token=PAD, extra_special_tokens={"image_token": IMAGE},
                                 clean_up_tokenization_spaces=False, padding_side="left")


def build_processor(image_size: int = world_lib.IMAGE_SIZE, patch_size: int = 8) -> Any:
  """The `LlavaProcessor`: word-level tokenizer, CLIP image processor at `image_size`, LLaVA-1.5 chat
  template; `<image>` expands to (image_size / patch_size)^2 tokens (strategy `default`: no CLS)."""
  from transformers import LlavaProcessor

  try:  # transformers 5: the PIL backend (no torchvision); 4.x: the one CLIP image processor
    from transformers import CLIPImageProcessorPil as image_processor_cls
  except ImportError:
    from transformers import CLIPImageProcessor as image_processor_cls
  image_processor = image_processor_cls(size={"shortest_edge": image_size},
                                       crop_size={"height": image_size, "width": image_size})
  return LlavaProcessor(image_processor=image_processor, tokenizer=build_tokenizer(),
                        patch_size=patch_size, vision_feature_select_strategy="default",
                        chat_template=LLAVA15_CHAT_TEMPLATE, num_additional_image_tokens=1)


@dataclasses.dataclass(frozen=True)
class ModelSize:
  """The tiny architecture (CLIP ViT + 2-layer MLP projector + Llama, LLaVA-1.5's layout)."""

  image_size: int = world_lib.IMAGE_SIZE
  patch_size: int = 8
  vision_hidden: int = 96
  vision_layers: int = 3
  vision_heads: int = 4
  text_hidden: int = 160
  text_layers: int = 4
  text_heads: int = 4
  text_intermediate: int = 448
  max_position_embeddings: int = 512

  @classmethod
  def from_config(cls, section: Any) -> "ModelSize":
    """From the `config.pretrain` section (fields of the same names)."""
    return cls(**{f.name: int(section[f.name]) for f in dataclasses.fields(cls)})


def hf_config(size: ModelSize, tokenizer: Any) -> Any:
  """The transformers `LlavaConfig` of `size` over `tokenizer`'s vocabulary (`<image>` = its last id)."""
  from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

  vocab = len(tokenizer)
  image_id = tokenizer.convert_tokens_to_ids(IMAGE)
  if image_id != vocab - 1:
    raise ValueError(f"{IMAGE} must be the last id ({vocab - 1}), got {image_id}")
  vision = CLIPVisionConfig(
      hidden_size=size.vision_hidden, intermediate_size=4 * size.vision_hidden,
      num_hidden_layers=size.vision_layers, num_attention_heads=size.vision_heads,
      image_size=size.image_size, patch_size=size.patch_size, projection_dim=size.vision_hidden)
  text = LlamaConfig(
      vocab_size=vocab, hidden_size=size.text_hidden, intermediate_size=size.text_intermediate,
      num_hidden_layers=size.text_layers, num_attention_heads=size.text_heads,
      num_key_value_heads=size.text_heads, max_position_embeddings=size.max_position_embeddings,
      rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
  return LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_id,
                     vision_feature_layer=-2, vision_feature_select_strategy="default",
                     projector_hidden_act="gelu", tie_word_embeddings=False)


def build_hf_checkpoint(out: str, size: ModelSize, seed: int) -> None:
  """A random `LlavaForConditionalGeneration` of `size` + the processor, saved under `out` (safetensors).

  Needs torch (the `[test]` extra); weights are transformers' own initialisation under
  `torch.manual_seed(seed)`.
  """
  import torch
  from transformers import LlavaForConditionalGeneration

  processor = build_processor(size.image_size, size.patch_size)
  torch.manual_seed(seed)
  model = LlavaForConditionalGeneration(hf_config(size, processor.tokenizer)).eval()
  os.makedirs(out, exist_ok=True)
  model.save_pretrained(out, safe_serialization=True)
  processor.save_pretrained(out)


# ------------------------------------------------------------------------------------- training text

QA_TYPES = ins.INSTRUCTION_TYPES  # conversation, detailed_description, complex_reasoning
# Grounded QA kinds per instruction type (VIGC, with the image).
_VIGC_KINDS = {
    "conversation": ("colour", "shape", "count", "existence", "position"),
    "complex_reasoning": ("relation", "count", "position", "existence"),
}
# Kinds a caption alone answers (the caption names every object's colour and shape, and the count).
_CAPTION_KINDS = ("colour", "count", "existence")


def description_from_objects(scene: world_lib.Scene) -> str:
  """A description using only what every caption says (count, colours, shapes; no positions)."""
  n = len(scene.objects)
  sents = [f"the image shows {text_lib.NUMBER_WORDS[n]} {'object' if n == 1 else 'objects'} ."]
  for o in scene.objects:
    sents.append(f"there is {text_lib._article(o.colour)} {o.colour} {o.shape} .")  # noqa: SLF001
  return " ".join(text_lib.detokenize_words(s.split()) for s in sents)


def grounded(scene: world_lib.Scene, rng: np.random.Generator, kinds: Sequence[str]) -> tuple[str, str]:
  return text_lib.grounded_qa(scene, rng, kinds[int(rng.integers(len(kinds)))])


def vigc_qa(scene: world_lib.Scene, kind: str, rng: np.random.Generator, p_generic: float
            ) -> tuple[str, str, bool]:
  """The (question, answer) of a VIGC sample of instruction type `kind`, and whether it is generic.

  With probability `p_generic` a generic QA (`scenes.generic_qa`: the language prior); otherwise a
  grounded one: a detailed description for `detailed_description`, grounded QA of the type's kinds.
  """
  if rng.random() < p_generic:
    q, a = text_lib.generic_qa(rng)
    return q, a, True
  if kind == "detailed_description":
    return DESCRIPTION_REQUESTS[int(rng.integers(len(DESCRIPTION_REQUESTS)))], \
        text_lib.detailed_description(scene), False
  q, a = grounded(scene, rng, _VIGC_KINDS[kind])
  return q, a, False


def caption_qa(scene: world_lib.Scene, kind: str, rng: np.random.Generator, p_generic: float
               ) -> tuple[str, str, str, bool]:
  """A text-only QA-from-caption sample: (prompt text, question, answer, generic?).

  The prompt is `instructions.qa_from_caption_prompt(caption, instruction)` with a random caption of
  the scene and a random instruction of type `kind`; the QA is generic with probability `p_generic`,
  else answerable from the caption (colour / count / existence questions, or a description that uses
  only the caption's content).
  """
  caption = text_lib.captions(scene, rng, 1)[0]
  options = ins.QA_FROM_CAPTION[kind]
  prompt = ins.qa_from_caption_prompt(caption, options[int(rng.integers(len(options)))])
  if rng.random() < p_generic:
    q, a = text_lib.generic_qa(rng)
    return prompt, q, a, True
  if kind == "detailed_description":
    q = DESCRIPTION_REQUESTS[int(rng.integers(len(DESCRIPTION_REQUESTS)))]
    return prompt, q, description_from_objects(scene), False
  q, a = grounded(scene, rng, _CAPTION_KINDS)
  return prompt, q, a, False


def short_answer(question: str, answer: str) -> str | None:
  """The one-word-or-phrase form of a grounded answer, or None when it has none.

  Yes/no answers keep their first word; answers that are already short (no sentence mark) are kept.
  """
  words = text_lib.tokenize_words(answer)
  if words and words[0] in ("yes", "no"):
    return words[0].capitalize()
  if "." in words or len(words) > 4:
    return None
  return answer


def vqa_qa(scene: world_lib.Scene, rng: np.random.Generator, p_short: float,
           kind: str | None = None) -> tuple[str, str]:
  """A grounded VQA turn of `kind` (default: drawn uniformly): the question (with LLaVA's short-answer
  suffix with probability `p_short`, then answered in a word or phrase) and its answer."""
  if kind is None:
    kind = text_lib.QA_KINDS[int(rng.integers(len(text_lib.QA_KINDS)))]
  if rng.random() >= p_short:
    return text_lib.grounded_qa(scene, rng, kind)
  for _ in range(16):
    q, a = text_lib.grounded_qa(scene, rng, kind)
    short = short_answer(q, a)
    if short is not None:
      return f"{q} {SHORT_ANSWER_SUFFIX}", short
  return text_lib.grounded_qa(scene, rng, kind)


def caption_qa_prompts(world: Sequence[world_lib.Scene], rng: np.random.Generator) -> list[str]:
  """Step 2 of two-step generation, one prompt per scene: a ground-truth caption and a
  QA-from-caption instruction of a random instruction type."""
  prompts = []
  for scene in world:
    kind = ins.INSTRUCTION_TYPES[int(rng.integers(len(ins.INSTRUCTION_TYPES)))]
    caption = text_lib.captions(scene, rng, 1)[0]
    options = ins.QA_FROM_CAPTION[kind]
    prompts.append(ins.qa_from_caption_prompt(caption, options[int(rng.integers(len(options)))]))
  return prompts


class PromptIds:
  """Prompt token ids through a `PromptBuilder`, cached per (text, with image): every scene has the
  same size, so an image prompt's ids do not depend on which scene it shows."""

  def __init__(self, builder: Any, scene: world_lib.Scene):
    self.builder, self._image = builder, world_lib.render(scene)
    self._cache: dict[tuple[str, bool], list[int]] = {}

  def __call__(self, text: str, with_image: bool) -> list[int]:
    key = (text, with_image)
    if key not in self._cache:
      self._cache[key] = self.builder.encode_prompt(text, self._image if with_image else None)[0]
    return self._cache[key]


def generic_chat(rng: np.random.Generator) -> tuple[str, str]:
  """A generic question and its answer (text-only chat, or asked about an image)."""
  return text_lib.generic_qa(rng)


__all__ = ["DESCRIPTION_REQUESTS", "ModelSize", "SHORT_ANSWER_SUFFIX",
           "build_hf_checkpoint", "build_processor", "build_tokenizer", "caption_qa",
           "description_from_objects", "generic_chat", "hf_config", "pre_tokenize", "prompt_texts",
           "short_answer", "vigc_qa", "vigc_target", "vocabulary", "vqa_qa", "PromptIds", "caption_qa_prompts"]
