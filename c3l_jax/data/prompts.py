"""Prompts of every model family, in one place: LLaVA-1.5's and Qwen2.5-VL's chat templates and
MiniGPT-4's templates.

"With image" is the user turn `[image, text]`; "no image" is the same conversation with the image part
removed (no image placeholder, no image tokens), as the I2C score needs:

- LLaVA-1.5 (llava-hf): rendered by the checkpoint's own processor and chat template
  (`USER: <image>\nQ ASSISTANT:`); "no image" is LLaVA's text-only path (no `<image>` placeholder).
- LLaVA-1.5 converted from the LLaVA repository's format (`LlavaV1Processor`): `conv_vicuna_v1`
  (`SYSTEM USER: <image>\nQ ASSISTANT:`), tokenized as its `tokenizer_image_token`, images squared on the
  mean colour first (`image_aspect_ratio: pad`); "no image" drops `<image>\n`.
- MiniGPT-4 (`MiniGPT4Processor`, `MINIGPT4_TEMPLATES`): `###Human: <Img><ImageHere></Img> Q ###Assistant: `
  (Vicuna v0, generation stops at the string "###") or `[INST] <Img><ImageHere></Img> Q [/INST] `
  (Llama-2), the `prompt_template`s of MiniGPT-4's eval configs; "no image" drops `<Img><ImageHere></Img> `.
  The prompt is tokenized as MiniGPT-4's `get_context_emb` does: split at `<ImageHere>`, the first segment
  with BOS, the others without, and the image features in between (here: `image_seq_length` placeholder
  ids, which the model overwrites).
- Qwen2.5-VL (`QwenVLProcessor`): the checkpoint's own chat template, which adds Qwen's default system
  line (`<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>
  <|image_pad|><|vision_end|>Q<|im_end|>\n<|im_start|>assistant\n`); the image processor sets each
  picture's size (between `min_pixels` and `max_pixels`) and so its number of image tokens, to which the
  `<|image_pad|>` is expanded; "no image" drops `<|vision_start|><|image_pad|><|vision_end|>`. Generation
  stops at the ids of the checkpoint's `generation_config.json` (its sampling settings are not used).

The answer's tokens are the tokenizer's encoding of the answer text alone (no BOS / EOS), i.e. the
tokens the model emits after the generation prompt.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator, Sequence

import numpy as np
from absl import logging

from c3l_jax.data.images import expand_to_square, pad_background
from c3l_jax.models.configs import MODEL_CONFIG_FILE
from c3l_jax.models.pictures import QwenPicture

IMAGE_HERE = "<ImageHere>"

# The llava-hf LLaVA-1.5 chat template (byte for byte llava-hf/llava-1.5-7b-hf's chat_template.json).
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


class SplicedPromptProcessor:
  """A processor for models whose prompts mark the image with a string that is not a token (MiniGPT-4's
  `<ImageHere>`, the original LLaVA's `<image>`), behind LLaVA's processor interface.

  The prompt is tokenized segment by segment around the marker, the first segment with BOS and the
  others without (MiniGPT-4's `get_context_emb`; LLaVA's `tokenizer_image_token`, which tokenizes each
  chunk with BOS and drops it), with `image_seq_length` placeholder ids in place of the marker (the
  model writes the image features over them). Subclasses render the conversation
  (`apply_chat_template`) and may prepare the image (`prepare_image`).
  """

  image_marker: str = IMAGE_HERE
  stop_strings: tuple[str, ...] = ()

  def __init__(self, tokenizer: Any, image_processor: Any, image_token_id: int, image_seq_length: int):
    self.tokenizer = tokenizer
    self.image_processor = image_processor
    self.image_token_id = image_token_id
    self.image_seq_length = image_seq_length

  def apply_chat_template(self, conversation: Sequence[dict], add_generation_prompt: bool = True,
                          tokenize: bool = False) -> str:
    raise NotImplementedError

  def prepare_image(self, image: Any) -> Any:
    return image

  def encode_text(self, text: str) -> list[int]:
    """Token ids of a prompt, the image marker -> `image_seq_length` placeholder ids."""
    ids: list[int] = []
    for i, segment in enumerate(text.split(self.image_marker)):
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
      if not isinstance(images, (list, tuple)):
        images = [images]
      images = [self.prepare_image(im) for im in images]
      out["pixel_values"] = np.asarray(
          self.image_processor(images=images, return_tensors="np")["pixel_values"], np.float32)
    return out


def _messages(conversation: Sequence[dict]) -> Iterator[tuple[str, str, bool]]:
  """`(role, text, has_image)` of each message of a chat-template conversation."""
  for message in conversation:
    content = message["content"]
    if isinstance(content, str):
      content = [{"type": "text", "text": content}]
    text = " ".join(c["text"] for c in content if c.get("type") == "text")
    yield message["role"], text, any(c.get("type") == "image" for c in content)


class MiniGPT4Processor(SplicedPromptProcessor):
  """MiniGPT-4's prompts (`MINIGPT4_TEMPLATES[variant]`) and BLIP image preprocessing."""

  def __init__(self, tokenizer: Any, image_processor: Any, variant: str, image_token_id: int,
               image_seq_length: int):
    if variant not in MINIGPT4_TEMPLATES:
      raise ValueError(f"unknown MiniGPT-4 variant {variant!r} (valid: {', '.join(MINIGPT4_TEMPLATES)})")
    super().__init__(tokenizer, image_processor, image_token_id, image_seq_length)
    self.variant = variant
    self.template = MINIGPT4_TEMPLATES[variant]
    self.stop_strings = self.template.stop_strings

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
    for role, text, has_image in _messages(conversation):
      out.append(text + self.template.end if role == "assistant"
                 else self.template.render(text, has_image))
    return "".join(out)


# The LLaVA repository's conversation templates (llava/conversation.py, `SeparatorStyle.TWO`).
LLAVA_SYSTEM_PROMPTS = {
    "vicuna_v1": "A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "llava_v1": "A chat between a curious human and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the human's questions.",
}


class LlavaV1Processor(SplicedPromptProcessor):
  """An original-format LLaVA checkpoint's prompts and preprocessing, as the LLaVA repository does them.

  Prompts: `conv_vicuna_v1` (or `conv_llava_v1`) `get_prompt()`: `SYSTEM USER: <image>\nQ ASSISTANT:`,
  an assistant turn ending with `</s>`; tokenized as `tokenizer_image_token`. Images: with
  `image_aspect_ratio="pad"`, `expand2square` on the image processor's mean colour, then CLIP's
  preprocessing (`process_images`).
  """

  image_marker = "<image>"
  roles = ("USER", "ASSISTANT")
  seps = (" ", "</s>")

  def __init__(self, tokenizer: Any, image_processor: Any, conv_mode: str, image_aspect_ratio: str,
               image_token_id: int, image_seq_length: int):
    if conv_mode not in LLAVA_SYSTEM_PROMPTS:
      raise ValueError(f"unknown LLaVA conversation mode {conv_mode!r} "
                       f"(valid: {', '.join(LLAVA_SYSTEM_PROMPTS)})")
    super().__init__(tokenizer, image_processor, image_token_id, image_seq_length)
    self.system = LLAVA_SYSTEM_PROMPTS[conv_mode]
    self.image_aspect_ratio = image_aspect_ratio

  @classmethod
  def from_pretrained(cls, model_dir: str, model_config: dict) -> "LlavaV1Processor":
    """From a directory converted from the original format (tokenizer + CLIP `preprocessor_config.json`)."""
    from transformers import AutoImageProcessor, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    image_processor = AutoImageProcessor.from_pretrained(model_dir, local_files_only=True)
    vision = model_config["vision"]
    seq = ((vision["image_size"] // vision["patch_size"]) ** 2
           + (model_config.get("vision_feature_select_strategy") == "full"))
    return cls(tokenizer, image_processor, model_config["prompt_format"],
               model_config.get("image_aspect_ratio", "resize"), model_config["image_token_id"], seq)

  def apply_chat_template(self, conversation: Sequence[dict], add_generation_prompt: bool = True,
                          tokenize: bool = False) -> str:
    """`Conversation.get_prompt()` of the user / assistant turns (+ `ASSISTANT:` to generate)."""
    if tokenize:
      raise NotImplementedError("LlavaV1Processor.apply_chat_template renders text only")
    out = self.system + self.seps[0]
    turns = [(text if role == "assistant" or not has_image else f"{self.image_marker}\n{text}")
             for role, text, has_image in _messages(conversation)]
    for i, text in enumerate(turns):
      out += f"{self.roles[i % 2]}: {text}{self.seps[i % 2]}"
    if add_generation_prompt and len(turns) % 2 == 1:
      out += f"{self.roles[1]}:"
    return out

  def prepare_image(self, image: Any) -> Any:
    if self.image_aspect_ratio == "pad":
      return expand_to_square(image, pad_background(self.image_processor))
    return image


class QwenVLProcessor:
  """Qwen2.5-VL's prompts and images behind the processor interface `PromptBuilder` uses, without
  transformers' `AutoProcessor` (which needs torchvision for the video processor): the tokenizer
  (`vocab.json` + `merges.txt` + `tokenizer_config.json` are enough), the chat template, and the image
  processor's PIL backend (`Qwen2VLImageProcessorPil`, what `AutoImageProcessor` gives without
  torchvision). `__call__` returns `pixel_values [patches, C*T*p*p]` and `image_grid_thw [N, 3]`, and
  the ids with each `<|image_pad|>` expanded to its picture's tokens."""

  stop_strings: tuple[str, ...] = ()

  def __init__(self, tokenizer: Any, image_processor: Any, chat_template: str, image_token_id: int,
               merge_size: int, eos_ids: tuple[int, ...]):
    self.tokenizer, self.image_processor = tokenizer, image_processor
    self.chat_template, self.image_token_id, self.merge_size = chat_template, image_token_id, merge_size
    self.eos_ids = eos_ids

  @classmethod
  def from_pretrained(cls, model_dir: str, model_config: dict, min_pixels: int = 0, max_pixels: int = 0
                      ) -> "QwenVLProcessor":
    """From a converted Qwen2.5-VL directory; `min_pixels` / `max_pixels` (0 = the model config's,
    which the converter took from `preprocessor_config.json`) bound each picture's resized area."""
    from transformers import AutoImageProcessor, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    pixels = dict(min_pixels=min_pixels or model_config.get("min_pixels", 3136),
                  max_pixels=max_pixels or model_config.get("max_pixels", 12845056))
    image_processor = AutoImageProcessor.from_pretrained(model_dir, local_files_only=True, **pixels)
    template = _chat_template(model_dir, tokenizer)
    eos: list[int] = []
    gen_file = os.path.join(model_dir, "generation_config.json")
    if os.path.exists(gen_file):
      with open(gen_file) as f:
        value = json.load(f).get("eos_token_id")
      eos = list(value) if isinstance(value, list) else ([value] if value is not None else [])
    if not eos and tokenizer.eos_token_id is not None:
      eos = [tokenizer.eos_token_id]
    return cls(tokenizer, image_processor, template, model_config["image_token_id"],
               model_config["vision"]["spatial_merge_size"], tuple(int(e) for e in eos))

  def apply_chat_template(self, conversation: Sequence[dict], add_generation_prompt: bool = True,
                          tokenize: bool = False) -> str:
    if tokenize:
      raise NotImplementedError("QwenVLProcessor.apply_chat_template renders text only")
    return self.tokenizer.apply_chat_template(list(conversation), chat_template=self.chat_template,
                                              tokenize=False, add_generation_prompt=add_generation_prompt)

  def __call__(self, images: Any = None, text: str | None = None, return_tensors: str = "np",
               **kwargs: Any) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    grids = np.zeros((0, 3), np.int64)
    if images is not None:
      if not isinstance(images, (list, tuple)):
        images = [images]
      processed = self.image_processor(images=list(images), return_tensors="np")
      out["pixel_values"] = np.asarray(processed["pixel_values"], np.float32)
      grids = out["image_grid_thw"] = np.asarray(processed["image_grid_thw"], np.int64)
    if text is not None:
      ids = self.tokenizer(text, add_special_tokens=False).input_ids
      expanded: list[int] = []
      k = 0
      for tok in ids:
        if tok != self.image_token_id:
          expanded.append(tok)
          continue
        if k >= len(grids):
          raise ValueError("the prompt has more <|image_pad|> than pictures")
        expanded += [tok] * (int(np.prod(grids[k])) // self.merge_size ** 2)
        k += 1
      out["input_ids"] = np.asarray([expanded], np.int64)
    return out


def _chat_template(model_dir: str, tokenizer: Any) -> str:
  for name in ("chat_template.jinja", "chat_template.json"):
    path = os.path.join(model_dir, name)
    if os.path.exists(path):
      with open(path) as f:
        return f.read() if name.endswith(".jinja") else json.load(f)["chat_template"]
  if getattr(tokenizer, "chat_template", None):
    return tokenizer.chat_template
  raise FileNotFoundError(f"{model_dir!r} has no chat template (chat_template.jinja, chat_template.json "
                          "or tokenizer_config.json)")


def read_model_config(model_dir: str) -> dict | None:
  """The `c3l_model.json` dict of a model directory, or None when it has none."""
  path = os.path.join(model_dir, MODEL_CONFIG_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _local_files(model_dir: str) -> str:
  """`model_dir` itself when local; for a remote one (gs://...: a generator trained in a GCS workdir) a
  local copy of its top-level files (tokenizer, processor, configs; not the parameters), since
  transformers reads local files only."""
  if "://" not in model_dir:
    return model_dir
  import hashlib
  import tempfile

  from etils import epath

  local = os.path.join(tempfile.gettempdir(), "c3l_jax_processors",
                       hashlib.sha1(model_dir.encode()).hexdigest()[:16])
  os.makedirs(local, exist_ok=True)
  for src in epath.Path(model_dir).iterdir():
    if src.is_file():
      src.copy(epath.Path(local) / src.name, overwrite=True)
  return local


def load_processor(model_dir: str, min_pixels: int = 0, max_pixels: int = 0) -> Any:
  """The processor saved next to a converted model (local files only, never the hub).

  By `c3l_model.json`: MiniGPT-4 -> `MiniGPT4Processor`; Qwen2.5-VL -> `QwenVLProcessor` (its
  `min_pixels` / `max_pixels`: these when non-zero, else the model config's); LLaVA converted from the original format
  (`prompt_format` vicuna_v1 / llava_v1) -> `LlavaV1Processor`; llava-hf -> transformers' processor
  (`AutoProcessor`), made to match the model where published snapshots differ:
  - the chat template may sit in `chat_template.jinja`, `chat_template.json` or only in
    `tokenizer_config.json` (transformers' processor reads the first two only);
  - without `processor_config.json` the processor has no `patch_size` (transformers 5 then fails);
  - without `num_additional_image_tokens` (snapshots before transformers#36002) it counts one image
    token too few (575 for 576 features).
  The last two are set from the model config, which is what the model computes.
  """
  from transformers import AutoProcessor

  model_dir = _local_files(model_dir)
  if not os.path.exists(os.path.join(model_dir, "tokenizer_config.json")):
    raise FileNotFoundError(f"{model_dir!r} has no tokenizer files: convert from a HF directory that "
                            "includes the processor (tokenizer, preprocessor and chat template)")
  model_config = read_model_config(model_dir)
  family = (model_config or {}).get("family", "llava15")
  if family == "minigpt4":
    return MiniGPT4Processor.from_pretrained(model_dir, model_config)
  if family == "qwen25vl":
    return QwenVLProcessor.from_pretrained(model_dir, model_config, min_pixels, max_pixels)
  if (model_config or {}).get("prompt_format", "chat_template") != "chat_template":
    return LlavaV1Processor.from_pretrained(model_dir, model_config)
  processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
  if getattr(processor, "chat_template", None) is None:
    template = getattr(processor.tokenizer, "chat_template", None)
    if template is None:
      raise FileNotFoundError(f"{model_dir!r} has no chat template (chat_template.jinja, "
                              "chat_template.json or tokenizer_config.json): convert it again, the "
                              "converter writes LLaVA-1.5's")
    processor.chat_template = template
  if model_config is not None:
    _match_image_tokens(processor, model_config, model_dir)
  return processor


def _match_image_tokens(processor: Any, model_config: dict, model_dir: str) -> None:
  """Make a transformers LLaVA processor expand `<image>` to the model's `image_seq_length`."""
  if not hasattr(processor, "num_additional_image_tokens"):
    return  # a processor that does not expand `<image>` (PromptBuilder expands a single token)
  vision = model_config["vision"]
  strategy = model_config.get("vision_feature_select_strategy", "default")
  grid = (vision["image_size"] // vision["patch_size"]) ** 2
  if processor.patch_size is None or processor.vision_feature_select_strategy is None:
    logging.warning("%s has no processor_config.json (an older llava-hf snapshot): patch size %d and "
                    "strategy %r taken from the model", model_dir, vision["patch_size"], strategy)
    processor.patch_size = vision["patch_size"]
    processor.vision_feature_select_strategy = strategy
  want = grid + (strategy == "full")
  got = ((vision["image_size"] // processor.patch_size) ** 2 + processor.num_additional_image_tokens
         - (processor.vision_feature_select_strategy == "default"))
  if got != want:
    logging.warning("%s: the processor would expand <image> to %d tokens, the model has %d image "
                    "features (processor_config.json without num_additional_image_tokens, "
                    "transformers#36002): using %d", model_dir, got, want, want)
    processor.num_additional_image_tokens += want - got


# -- evaluation prompts ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class EvalPrompts:
  """How one family is asked the benchmarks' questions: the text of the user turn (the processor's chat
  template wraps it, as for every prompt). One entry of `EVAL_PROMPTS` per family; a new family adds one.

  - `yes_no`: POPE (`{question}` is "Is there a dog in the image?");
  - `open_ended`: LLaVA-Bench (`{question}` as the benchmark file has it);
  - `short_answer`: a question wanting a word or a phrase (the scenes testbed's grounded VQA);
  - multiple choice (SEED-Bench, MMBench with `eval.mc_mode=generate`): `choice_hint` (only when the
    question has a hint) + `choice_question` + `choice_header` + one `"A. option\n"` line per option +
    `choice_suffix` (`choice_suffix_cjk` instead when the text holds CJK characters and it is set),
    trailing whitespace stripped.
  The option log-likelihood mode (`eval.mc_mode=loglik`) asks the bare question, SEED-Bench's own
  protocol, whatever the family.
  """

  source: str  # where the prompts come from
  yes_no: str
  open_ended: str
  short_answer: str
  choice_hint: str
  choice_question: str
  choice_header: str
  choice_suffix: str
  choice_suffix_cjk: str = ""

  def ask_yes_no(self, question: str) -> str:
    return self.yes_no.format(question=question)

  def ask_open(self, question: str) -> str:
    return self.open_ended.format(question=question)

  def ask_short(self, question: str) -> str:
    return self.short_answer.format(question=question)

  def ask_choice(self, question: str, options: Sequence[str], hint: str = "") -> str:
    import re
    import string

    text = (self.choice_hint.format(hint=hint) if hint else "") + self.choice_question.format(
        question=question) + self.choice_header
    text += "".join(f"{string.ascii_uppercase[i]}. {o}\n" for i, o in enumerate(options))
    cjk = self.choice_suffix_cjk and re.search("[\u4e00-\u9fff]", text)
    return (text + (self.choice_suffix_cjk if cjk else self.choice_suffix)).rstrip()


# LLaVA-1.5's evaluation prompts (its training formats): the LLaVA repository's eval question files and
# `llava/eval/model_vqa_mmbench.py` (hint, question, option lines, then the letter instruction).
LLAVA15_EVAL_PROMPTS = EvalPrompts(
    source="LLaVA-1.5 (llava/eval: POPE / SEED / MMBench question files, model_vqa_mmbench.py)",
    yes_no="{question}\nAnswer the question using a single word or phrase.",
    open_ended="{question}",
    short_answer="{question}\nAnswer the question using a single word or phrase.",
    choice_hint="{hint}\n", choice_question="{question}\n", choice_header="",
    choice_suffix="Answer with the option's letter from the given choices directly.")

# Qwen2-VL / Qwen2.5-VL's evaluation prompts as VLMEvalKit builds them for these models
# (github.com/open-compass/VLMEvalKit, vlmeval/vlm/qwen2_vl/prompt.py, `Qwen2VLPromptMixin`): POPE is a
# "Y/N" dataset (`_build_yorn_prompt`), SEED-Bench and MMBench "MCQ" (`_build_mcq_prompt`), LLaVA-Bench
# "VQA" (`_build_vqa_prompt`: VLMEvalKit's LLaVABench dataset has TYPE 'VQA' and is not excluded from
# the custom prompt, so its questions get the short-answer instruction too).
QWEN25VL_EVAL_PROMPTS = EvalPrompts(
    source="Qwen2-VL / Qwen2.5-VL (VLMEvalKit vlmeval/vlm/qwen2_vl/prompt.py)",
    yes_no="{question} Please answer yes or no.",
    open_ended="{question}\nPlease try to answer the question with short words or phrases if possible.",
    short_answer="{question}\nPlease try to answer the question with short words or phrases if possible.",
    choice_hint="Hint: {hint}\n", choice_question="Question: {question}\n", choice_header="Options:\n",
    choice_suffix="Please select the correct answer from the options above.",
    choice_suffix_cjk="请直接回答选项字母。")

# Per family (`c3l_model.json`'s `family`). MiniGPT-4 is asked as LLaVA-1.5 (the C3L paper evaluates
# both families on the same benchmarks and names no MiniGPT-4-specific prompt).
EVAL_PROMPTS: dict[str, EvalPrompts] = {
    "llava15": LLAVA15_EVAL_PROMPTS,
    "minigpt4": LLAVA15_EVAL_PROMPTS,
    "qwen25vl": QWEN25VL_EVAL_PROMPTS,
}


def eval_prompts(family: str) -> EvalPrompts:
  """The evaluation prompts of `family` (a family without an entry is an error, not LLaVA's prompts)."""
  if family not in EVAL_PROMPTS:
    raise ValueError(f"no evaluation prompts for model family {family!r} (known: "
                     f"{', '.join(EVAL_PROMPTS)}): add its entry to c3l_jax.data.prompts.EVAL_PROMPTS")
  return EVAL_PROMPTS[family]


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
# A VIGC instruction that names no instruction type (the contrastive anchor's prompt under
# `train.anchor_instruction=neutral`).
VIGC_NEUTRAL_INSTRUCTION = "Generate an instruction about this image, then respond to it."


def vigc_target(question: str, answer: str) -> str:
  return f"Question: {question} Answer: {answer}"


@dataclasses.dataclass
class EncodedQA:
  """Token ids of one (question, answer) pair, with and without the image."""

  prompt_image: list[int]  # generation prompt with the image tokens expanded
  prompt_text: list[int]  # the same prompt without the image part
  answer: list[int]
  pixel_values: Any  # the picture: [C, H, W], or a `QwenPicture` (patches + grid) for Qwen2.5-VL


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
    return self.encode_rendered(self.prompt(question, image is not None), image)

  def encode_rendered(self, text: str, image: Any | None) -> tuple[list[int], np.ndarray | None]:
    """Ids of a rendered prompt `text` (image tokens expanded by the processor) and pixels (or None)."""
    if image is None:
      return self.tokenizer(text, add_special_tokens=True).input_ids, None
    out = self.processor(images=image, text=text, return_tensors="np")
    if "image_grid_thw" in out:  # variable resolution: the picture is its patches and their grid
      grid = tuple(int(g) for g in out["image_grid_thw"][0])
      return out["input_ids"][0].tolist(), QwenPicture(out["pixel_values"], grid)
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

  def turn_conversation(self, turns: Sequence[tuple[str, str]], k: int, with_image: bool) -> list[dict]:
    """The chat-template messages before answer k of a multi-turn conversation: questions 0..k and
    answers 0..k-1 (as text), the image (when `with_image`) in front of the first question."""
    messages = []
    for j, (question, answer) in enumerate(turns[:k + 1]):
      messages += self.conversation(question, with_image and j == 0)
      if j < k:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages

  def encode_conversation(self, turns: Sequence[tuple[str, str]], image: Any
                          ) -> list[EncodedQA]:
    """Each answer of a multi-turn conversation, teacher-forced after everything before it.

    Turn k's prompt is the checkpoint's chat template applied to `turn_conversation(turns, k)` (with
    the image in the first user message, and without it for `prompt_text`) and tokenized as a whole;
    its answer is tokenized alone (`encode_answer`). The image is processed once (turn 0's prompt goes
    through the processor with it, as `encode_qa` does); later prompts are tokenized as the processor
    tokenizes them (`_image_prompt_ids`). All turns share `pixel_values`.
    """
    out: list[EncodedQA] = []
    pixels = None
    for k, (_, answer) in enumerate(turns):
      render = lambda with_image: self.processor.apply_chat_template(
          self.turn_conversation(turns, k, with_image), add_generation_prompt=True, tokenize=False)
      if k == 0:
        prompt_image, pixels = self.encode_rendered(render(True), image)
      elif isinstance(pixels, QwenPicture):  # the picture's token count is its own: the processor expands it
        prompt_image = self.encode_rendered(render(True), image)[0]
      else:
        prompt_image = self._image_prompt_ids(render(True), image)
      prompt_text, _ = self.encode_rendered(render(False), None)
      out.append(EncodedQA(prompt_image, prompt_text, self.encode_answer(answer), pixels))
    return out

  def _image_prompt_ids(self, text: str, image: Any) -> list[int]:
    """A rendered prompt holding the image placeholder, tokenized as the processor does, without
    processing the image again where the image's token count is fixed: a spliced processor's own
    `encode_text`, else the tokenizer with the single `<image>` token expanded to `image_seq_length`
    (what LLaVA's processor does). Otherwise (a processor whose image tokens depend on the image) the
    processor itself, with the image."""
    if hasattr(self.processor, "encode_text"):
      return self._expand_image(self.processor.encode_text(text))
    if self.image_token_id is not None and self.image_seq_length is not None:
      ids = self.tokenizer(text, add_special_tokens=True).input_ids
      if ids.count(self.image_token_id) == 1:
        return self._expand_image(ids)
    return self.encode_rendered(text, image)[0]

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
    if getattr(self.processor, "eos_ids", None):
      return tuple(self.processor.eos_ids)
    eos = self.tokenizer.eos_token_id
    return () if eos is None else (int(eos),)

  @property
  def pad_id(self) -> int:
    pad = self.tokenizer.pad_token_id
    return int(pad if pad is not None else (self.tokenizer.eos_token_id or 0))
