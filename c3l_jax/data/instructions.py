"""The instructions the generator is prompted with, and the parser for what it writes back.

C3L's initial data (paper, Sec. 3.1) comes from a two-step prompt: the VLM captions the image, then the
language model alone writes question-answer pairs from the caption, for three instruction types
(conversation, detailed description, complex reasoning) with several paraphrased instructions each.
The enhanced generator (and `generation.mode = direct`) answers the VIGC-format instruction of
`c3l_jax.data.prompts.VIGC_INSTRUCTIONS` with the image, writing "Question: ... Answer: ...".

Pure Python (no jax): `check_config` imports it to validate `generation.instruction_mix`.
"""

from __future__ import annotations

import re

INSTRUCTION_TYPES = ("conversation", "detailed_description", "complex_reasoning")
# A hint of each type's output length in tokens (LLaVA-Instruct-158K: detailed descriptions run to
# hundreds of tokens, conversation and reasoning answers to tens): generation admits the long ones
# first, so none starts late and decodes alone at the end. Only the order of work depends on it.
EXPECTED_LENGTH = {"conversation": 40, "detailed_description": 300, "complex_reasoning": 60}

# Step 1 of two_step: caption the image (paraphrases; one is drawn per image).
CAPTION_INSTRUCTIONS = (
    "Describe the image briefly.",
    "Give a short description of the image.",
    "What does the image show? Answer in one sentence.",
)

# Step 2 of two_step: the decoder alone turns the caption into a QA pair, per instruction type.
QA_FROM_CAPTION = {
    "conversation": (
        "Write a question that someone looking at this image might ask, and answer it.",
        "Ask one question about what can be seen in the image, then answer it.",
        "Write a question about the objects in the image and give its answer.",
    ),
    "detailed_description": (
        "Write an instruction asking for a detailed description of the image, then give the "
        "description.",
        "Ask for a careful description of everything in the image, then write that description.",
    ),
    "complex_reasoning": (
        "Write a question that needs reasoning about the image content, and answer it.",
        "Ask a question whose answer needs thinking about what is in the image, then answer it.",
    ),
}
QA_FORMAT = 'Use the format "Question: ... Answer: ...".'
# A QA-from-caption instruction that names no instruction type: the contrastive anchor's prompt under
# `train.anchor_instruction=neutral`, so that matching the positive's type cannot lower the loss.
QA_FROM_CAPTION_NEUTRAL = "Write an instruction about the image, then respond to it."


def ask_for_pairs(instruction: str, n: int) -> str:
  """`instruction` asking for `n` QA pairs in one answer (`generation.qa_per_prompt`; the paper's
  instructions ask for several, "Generate five in-depth reasoning questions and then answer them");
  `n = 1` leaves it as it is."""
  if n <= 1:
    return instruction
  return f'{instruction} Write {n} different question-answer pairs, each as "Question: ... Answer: ...".'


def qa_from_caption_prompt(caption: str, instruction: str) -> str:
  """The text-only prompt of step 2 (the caption stands in for the image)."""
  return f"Image description: {caption.strip()}\n{instruction} {QA_FORMAT}"


def parse_mix(spec: str) -> dict[str, float]:
  """`"conversation=0.5,detailed_description=0.25,..."` -> normalised `{type: proportion}`.

  Raises `ValueError` (one line) for unknown types, bad numbers, or proportions summing to 0.
  """
  mix: dict[str, float] = {}
  for part in str(spec).split(","):
    if not part.strip():
      continue
    name, sep, value = part.partition("=")
    name = name.strip()
    if not sep or name not in INSTRUCTION_TYPES:
      raise ValueError(f"{part.strip()!r} is not TYPE=PROPORTION with TYPE one of "
                       f"{', '.join(INSTRUCTION_TYPES)}")
    try:
      weight = float(value)
    except ValueError:
      raise ValueError(f"{part.strip()!r}: {value.strip()!r} is not a number") from None
    if not weight >= 0:
      raise ValueError(f"{part.strip()!r}: proportions must be >= 0")
    mix[name] = mix.get(name, 0.0) + weight
  total = sum(mix.values())
  if total <= 0:
    raise ValueError(f"{spec!r} gives no instruction type a positive proportion")
  return {k: v / total for k, v in mix.items() if v > 0}


def draw_types(mix: dict[str, float], n: int, rng) -> list[str]:
  """`n` instruction types drawn i.i.d. from `mix` with the numpy Generator `rng`."""
  names = sorted(mix)
  return [names[i] for i in rng.choice(len(names), size=n, p=[mix[k] for k in names])]


_MARK = r"(?:^|(?<=[\s\"'*(\[?.!,;]))"  # a marker starts the text or follows a space / punctuation
_Q = re.compile(_MARK + r"(?:question|q)\s*\d*\s*[:：]", re.IGNORECASE)
_A = re.compile(_MARK + r"(?:answer|a)\s*\d*\s*[:：]", re.IGNORECASE)


def parse_qa(text: str) -> tuple[str, str] | None:
  """The first "Question: ... Answer: ..." pair in generated text, or None when there is none.

  Robust to case, "Q:" / "A:", numbered markers ("Question 1:"), markdown emphasis and line breaks;
  the answer ends at the next question marker. Both parts are whitespace-normalised and stripped of
  wrapping quotes / asterisks.
  """
  q = _Q.search(text)
  if q is None:
    return None
  a = _A.search(text, q.end())
  if a is None:
    return None
  question = _clean(text[q.end():a.start()])
  rest = text[a.end():]
  nxt = _Q.search(rest)
  answer = _clean(rest[:nxt.start()] if nxt else rest)
  if not question or not answer:
    return None
  return question, answer


def parse_qa_pairs(text: str) -> list[tuple[str, str]]:
  """Every "Question: ... Answer: ..." pair in generated text, in order (a multi-QA answer).

  Each pair is parsed as `parse_qa` parses the first: the answer ends at the next question marker,
  where the next pair starts. A question without an answer, or an empty part, is skipped.
  """
  pairs = []
  starts = [m.start() for m in _Q.finditer(text)]
  for begin, end in zip(starts, starts[1:] + [len(text)]):
    pair = parse_qa(text[begin:end])
    if pair is not None:
      pairs.append(pair)
  return pairs


def _clean(s: str) -> str:
  s = " ".join(s.split())
  return s.strip(" *\"'`").strip()


def words(text: str) -> list[str]:
  """Lower-cased word tokens (letters/digits), the unit of the filter's lengths and overlaps."""
  return re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower())


def normalise(text: str) -> str:
  return " ".join(words(text))


__all__ = ["CAPTION_INSTRUCTIONS", "INSTRUCTION_TYPES", "QA_FROM_CAPTION", "QA_FROM_CAPTION_NEUTRAL",
           "ask_for_pairs", "draw_types", "normalise", "parse_mix", "parse_qa", "parse_qa_pairs",
           "qa_from_caption_prompt", "words"]
