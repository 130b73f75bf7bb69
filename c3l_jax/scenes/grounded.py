"""The grounded recipe of the scenes generator (`config.pretrain.recipe = "grounded"`): a model that sees.

    python -m c3l_jax.scenes.pretrain --config=configs/scenes_pretrain.py   # recipe "grounded"

The old recipe (`recipe = "mix"`) trains tower, connector and decoder together from scratch; its
model answers from the language prior (held-out VQA 45 %, POPE at chance, docs/scenes.md). Here:

1. **Stage 0, a supervised vision tower** (`c3l_jax.scenes.vision`): linear probes on the patch
   features the connector reads, trained with CE against each cell's shape / colour / size / position
   and the scene's counts, then discarded (an ImageNet-style backbone stands in for LLaVA's pretrained
   CLIP). Its residual stream is rescaled exactly to RMS 1 (`normalize_feature_scale`).
2. **A frozen random connector.** Training the connector through the pooled CG-VLM alignment or the CE
   destroyed the tower's per-cell information (a linear probe fell from 99 % to 68 %); the random MLP
   keeps it (99 %). Its output layer is only rescaled so image tokens have `image_token_scale` times the
   norm of word embeddings (`modelio.match_feature_scale`).
3. **Cached image tokens.** Tower and connector are frozen, so every scene's 9 image tokens are computed
   once (`vlm.encode_images`, the function the pipeline calls at inference, in the model's dtype) and the
   decoder trains on them: a step runs the decoder only, so the budget buys tens of thousands of steps on
   many more scenes than the old 3000.
4. **The student** (what the Table-4 ablation fine-tunes): the decoder trained on captions only
   (`student_steps`), exported to `student_out` with its own `training_metrics.json`. No VQA or
   instruction data.
5. **The generator**: the student's decoder trained on (`steps`) the instruction mix: grounded VQA
   (short answers and full sentences), balanced existence questions (POPE-style), balanced relation
   questions, background-colour questions, captions, VIGC "generate a question and answer it" samples
   (a share `p_generic` generic: the language prior), detailed descriptions, the two-step
   QA-from-caption prompt (text only; a share `p_generic_caption_qa` generic) and generic chat. Each
   batch is one of four fixed shapes (`ground`, `image`, `detail`, `text`). Beside the CE, linear probes
   on the decoder's attention values (trained with it, thrown away) ask for the grounding the answers
   need: the cell of each object word (`probe`), the referent of each phrase (`referent`), where the
   previous named object lies relative to this one (`offset`) and, where a VQA answer starts, the cell of
   the object asked about (`answer`).

Every `eval_every` steps a quick held-out check (VQA + POPE on `eval_quick_scenes` scenes, through the
pipeline's loading path) goes to the log and to the metrics' `heldout_curve`.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from c3l_jax import console, losses
from c3l_jax import train as trainer_lib
from c3l_jax.data import instructions as ins
from c3l_jax.data.batching import round_up
from c3l_jax.data.prompts import VIGC_INSTRUCTIONS, vigc_target
from c3l_jax.models.llama import positions_and_mask
from c3l_jax.scenes import checker as checker_lib
from c3l_jax.scenes import processor as sm
from c3l_jax.scenes import text as text_lib
from c3l_jax.scenes import vision
from c3l_jax.scenes import world as world_lib

_SALT_BATCH, _SALT_STUDENT = 21, 22
_SHORT_VIGC_TYPES = tuple(t for t in ins.INSTRUCTION_TYPES if t != "detailed_description")
_EXISTENCE_FORMS = ("is there {a} {n} in the image ?", "is there {a} {n} ?", "do you see {a} {n} ?",
                    "does the image contain {a} {n} ?", "are there any {p} ?")


def existence_qa(scene: world_lib.Scene, rng: np.random.Generator, p_short: float) -> tuple[str, str]:
  """A balanced (POPE-style) existence question: a present or an absent shape with probability 1/2 each,
  answered yes / no; with LLaVA's short-answer suffix and a one-word answer with probability `p_short`.
  (`text.grounded_qa`'s existence kind asks about present shapes more often: a yes bias.)"""
  present = world_lib.object_names(scene)
  absent = [s for s in world_lib.SHAPES if s not in present]
  exists = not absent or rng.random() < 0.5
  pool = present if exists else absent
  shape = pool[int(rng.integers(len(pool)))]
  plural = text_lib._PLURAL[shape]  # noqa: SLF001
  article = text_lib._article(shape)  # noqa: SLF001
  q = _EXISTENCE_FORMS[int(rng.integers(len(_EXISTENCE_FORMS)))].format(a=article, n=shape, p=plural)
  q = text_lib.detokenize_words(q.split())
  if rng.random() < p_short:
    return f"{q} {sm.SHORT_ANSWER_SUFFIX}", "Yes" if exists else "No"
  a = f"yes , there is {article} {shape} ." if exists else f"no , there are no {plural} in the image ."
  return q, text_lib.detokenize_words(a.split())


_BACKGROUND_FORMS = ("what colour is the background ?", "what is the colour of the background ?",
                     "which colour does the background have ?")


def background_qa(scene: world_lib.Scene, rng: np.random.Generator, p_short: float) -> tuple[str, str]:
  """A question about the background's colour (captions name it; nothing else asks for it): with LLaVA's
  short-answer suffix and a one-word answer with probability `p_short`."""
  q = text_lib.detokenize_words(_BACKGROUND_FORMS[int(rng.integers(len(_BACKGROUND_FORMS)))].split())
  if rng.random() < p_short:
    return f"{q} {sm.SHORT_ANSWER_SUFFIX}", scene.background.capitalize()
  return q, text_lib.detokenize_words(f"the background is {scene.background} .".split())


def relation_qa(scene: world_lib.Scene, rng: np.random.Generator, p_short: float) -> tuple[str, str] | None:
  """A balanced relation question: two objects with a unique referring expression (as
  `text.grounded_qa`'s relation kind draws them) and a relation that holds or does not, with
  probability 1/2 each, answered yes / no; with LLaVA's short-answer suffix and a one-word answer
  with probability `p_short`. None when the scene has fewer than two such objects. (The relation kind
  draws the relation uniformly, so two thirds of its answers are "no": a model can score 60 % by
  never looking.)"""
  cands = text_lib.referable_objects(scene, use_position=False)
  if len(cands) < 2:
    return None
  i, j = rng.choice(len(cands), size=2, replace=False)
  (a_obj, a_ref), (b_obj, b_ref) = cands[int(i)], cands[int(j)]
  rels = list(text_lib._RELATION_PHRASE)  # noqa: SLF001
  holding = [r for r in rels if text_lib._relation_holds(a_obj, r, b_obj)]  # noqa: SLF001
  failing = [r for r in rels if r not in holding]
  holds = not failing or (bool(holding) and rng.random() < 0.5)
  pool = holding if holds else failing
  rel = pool[int(rng.integers(len(pool)))]
  phrase = text_lib._RELATION_PHRASE[rel]  # noqa: SLF001
  q = text_lib.detokenize_words(f"is the {a_ref} {phrase} the {b_ref} ?".split())
  if rng.random() < p_short:
    return f"{q} {sm.SHORT_ANSWER_SUFFIX}", "Yes" if holds else "No"
  a = (f"yes , the {a_ref} is {phrase} the {b_ref} ." if holds
       else f"no , the {a_ref} is not {phrase} the {b_ref} .")
  return q, text_lib.detokenize_words(a.split())


class Examples:
  """Token-level training examples `{"prompt", "target", "scene"}`: prompt ids (cached per text),
  target ids + EOS, and the index of the scene whose cached image tokens fill the `<image>` run (-1:
  text only)."""

  def __init__(self, builder: Any, world: Sequence[world_lib.Scene], p: Any):
    self.builder, self.world, self.p = builder, world, p
    self.prompt = sm.PromptIds(builder, world[0])
    # The grounding probe's labels, only when it is on (`probe_weight`).
    self.phrase_cells = PhraseCells(builder.tokenizer, p.probe_rule) if p.probe_weight else None
    # ... and the offset and referent probes' (`offset_probe_weight`, `referent_probe_weight`), from the
    # phrase rule whatever `probe_rule` is.
    self.referent_cells = (PhraseCells(builder.tokenizer, "phrase")
                           if p.offset_probe_weight or p.referent_probe_weight else None)

  def make(self, task: str, index: int, rng: np.random.Generator) -> dict:
    scene, p = self.world[index], self.p
    if task == "caption":
      prompt = ins.CAPTION_INSTRUCTIONS[int(rng.integers(len(ins.CAPTION_INSTRUCTIONS)))]
      return self._ex(prompt, text_lib.captions(scene, rng, 1)[0], index)
    if task in ("vigc", "vigc_detail"):
      kind = ("detailed_description" if task == "vigc_detail" else
              _SHORT_VIGC_TYPES[int(rng.integers(len(_SHORT_VIGC_TYPES)))])
      q, a, _ = sm.vigc_qa(scene, kind, rng, p.p_generic)
      return self._ex(VIGC_INSTRUCTIONS[kind], vigc_target(q, a), index)
    if task == "vqa":
      weights = np.asarray(p.vqa_kind_weights, np.float64)
      if np.all(weights == weights[0]):
        q, a = sm.vqa_qa(scene, rng, p.p_short)
      else:
        q, a = sm.vqa_qa(scene, rng, p.p_short,
                            text_lib.QA_KINDS[int(rng.choice(len(weights), p=weights / weights.sum()))])
      return self._ex(q, a, index, answer_referent=True)
    if task == "existence":
      q, a = existence_qa(scene, rng, p.p_short)
      return self._ex(q, a, index)
    if task == "relation":
      qa = relation_qa(scene, rng, p.p_short)
      if qa is None:  # fewer than two nameable objects: a balanced existence question instead
        qa = existence_qa(scene, rng, p.p_short)
      return self._ex(*qa, index)
    if task == "background":
      return self._ex(*background_qa(scene, rng, p.p_short), index)
    if task == "generic_image":
      q, a = sm.generic_chat(rng)
      return self._ex(q, a, index)
    if task == "caption_qa":
      kind = ins.INSTRUCTION_TYPES[int(rng.integers(len(ins.INSTRUCTION_TYPES)))]
      prompt, q, a, _ = sm.caption_qa(scene, kind, rng, p.p_generic_caption_qa)
      return self._ex(prompt, vigc_target(q, a), -1)
    if task == "chat":
      q, a = sm.generic_chat(rng)
      return self._ex(q, a, -1)
    raise ValueError(f"unknown task {task!r}")

  def _ex(self, prompt: str, target: str, index: int, answer_referent: bool = False) -> dict:
    ex = {"prompt": self.prompt(prompt, index >= 0),
          "target": self.builder.encode_answer(target) + list(self.builder.eos_ids), "scene": index}
    ids, scene = ex["prompt"] + ex["target"], self.world[index] if index >= 0 else None
    if self.p.answer_probe_weight:
      ex["answer_labels"] = answer_labels(len(ids), len(ex["prompt"]), scene, prompt, answer_referent)
    if self.phrase_cells is not None:
      ex["probe_labels"] = self.phrase_cells(ids, scene)
    if self.referent_cells is not None:
      referents = self.referent_cells(ids, scene)
      if self.p.referent_probe_weight:
        ex["referent_labels"] = referents
      if self.p.offset_probe_weight:
        ex["offset_labels"] = offset_labels(referents)
    return ex


def token_batch(examples: Sequence[dict], length: int, pad_id: int) -> dict:
  """Fixed-shape CE batch (`trainer_lib.ce_batch` at width and head width `length`) + `scene [B]`."""
  fitted = []
  for e in examples:
    room = length - len(e["prompt"])
    if room < 1:
      raise ValueError(f"a prompt of {len(e['prompt'])} tokens does not fit the batch length {length}")
    fitted.append({"prompt": e["prompt"], "target": e["target"][:room], "pixels": None})
  batch = trainer_lib.ce_batch(fitted, pad_id, width=length,
                               head_width=round_up(length, trainer_lib.HEAD_BUCKET))
  batch["scene"] = np.asarray([max(e["scene"], 0) for e in examples], np.int32)
  for key in ("probe_labels", "offset_labels", "referent_labels", "answer_labels"):  # -1 = no label
    if all(key in e for e in examples):
      batch[key] = np.full((len(examples), length), -1, np.int32)
      for i, e in enumerate(examples):
        row = e[key][:length]
        batch[key][i, :len(row)] = row
  return batch


def batch_kind(p: Any, step: int, seed: int) -> str:
  """The kind of generator batch `step` (a pure function of (seed, step)): every `text_every`-th step
  `text`, else `detail` with probability `p_detail`, `image` (captions, VIGC) with probability `p_image`,
  else `ground` (VQA, existence, generic questions about the image: short sequences)."""
  if p.text_every and step % p.text_every == p.text_every - 1:
    return "text"
  u = np.random.default_rng([seed, _SALT_BATCH, step, 0]).random()
  return "detail" if u < p.p_detail else "image" if u < p.p_detail + p.p_image else "ground"


def mix_batches(maker: Examples, p: Any, seed: int, pad_id: int, num_scenes: int,
                captions_only: bool = False) -> Callable[[int], tuple[str, dict]]:
  """`step -> (kind, batch)`, a pure function of (seed, step), of `p.batch_size` examples padded to the
  kind's fixed length (`seq_<kind>`: four compiled shapes). `ground` batches mix VQA / balanced existence /
  balanced relation / generic questions (`w_vqa`, `w_existence`, `w_relation`, `w_generic_image`),
  `image` batches captions and VIGC
  samples (`w_caption`, `w_vigc`), `text` batches QA-from-caption and chat (`w_caption_qa`, `w_chat`),
  `detail` batches VIGC detailed descriptions. `captions_only`: `image` batches of captions (the
  student). Scenes are drawn uniformly from the first `num_scenes`; `p.curriculum`, pairs
  `(max_objects, until_step)`, restricts the scenes of `ground` batches before `until_step` to those with
  at most `max_objects` objects (the first pair whose step is not yet reached applies)."""
  weights = {"ground": (("vqa", "existence", "relation", "generic_image", "background"),
                        (p.w_vqa, p.w_existence, p.w_relation, p.w_generic_image, p.w_background)),
             "image": (("caption", "vigc"), (p.w_caption, p.w_vigc)),
             "text": (("caption_qa", "chat"), (p.w_caption_qa, p.w_chat)),
             "detail": (("vigc_detail",), (1.0,))}
  salt = _SALT_STUDENT if captions_only else _SALT_BATCH
  counts = np.asarray([len(s.objects) for s in maker.world[:num_scenes]])
  stages = [(int(until), np.flatnonzero(counts <= int(k))) for k, until in (p.get("curriculum") or ())]

  def make(step: int) -> tuple[str, dict]:
    kind = "image" if captions_only else batch_kind(p, step, seed)
    rng = np.random.default_rng([seed, salt, step, 1])
    pool = next((pool for until, pool in stages if step < until), None) if kind == "ground" else None
    idx = rng.integers(num_scenes, size=p.batch_size) if pool is None else \
        pool[rng.integers(len(pool), size=p.batch_size)]
    if captions_only:
      tasks = ["caption"] * p.batch_size
    else:
      names, w = weights[kind]
      w = np.asarray(w, np.float64)
      tasks = [names[i] for i in rng.choice(len(names), p.batch_size, p=w / w.sum())]
    examples = [maker.make(t, int(i), rng) for t, i in zip(tasks, idx)]
    return kind, token_batch(examples, p[f"seq_{kind}"], pad_id)

  return make


def image_tokens(vlm: Any, pixels: np.ndarray, chunk: int = 256) -> np.ndarray:
  """`vlm.encode_images` of `pixels [N, C, H, W]` in chunks: `[N, image_seq_length, D]` (the tokens the
  pipeline's `embed_image_and_text` writes over the `<image>` run)."""
  encode = nnx.jit(lambda m, px: m.encode_images(px))
  out = []
  for s in range(0, len(pixels), chunk):
    part = pixels[s:s + chunk]
    pad = chunk - len(part)
    if pad:
      part = np.concatenate([part, np.repeat(part[:1], pad, 0)])
    out.append(np.asarray(encode(vlm, jnp.asarray(part)))[:chunk - pad])
  return np.concatenate(out)


_CELL_CLASSES = vision.CELLS + 2  # no instance, one of the cells, several (`vision.binding_class`)


class PhraseCells:
  """The grounding probe's labels (`grounding_probe_loss`) for a token sequence about a scene: -1 at
  unlabelled tokens, else the cell class of the objects a word refers to: 0 = nothing in the scene
  matches, cell + 1 for exactly one match, the last class for several.

  `rule="phrase"`: at the head noun of each noun phrase (a shape, singular or plural, or "object(s)",
  with the sizes and colours right before it), what the phrase refers to: "the large blue star" is the
  one large blue star, "stars" every star, "the red object" every red object.
  `rule="word"`: at every shape word (singular or plural) and colour word, the objects of that shape or
  colour, whatever the words around it."""

  def __init__(self, tokenizer: Any, rule: str = "phrase"):
    if rule not in ("phrase", "word"):
      raise ValueError(f"probe label rule must be 'phrase' or 'word', got {rule!r}")
    self.rule = rule
    self.lexicon: dict[int, tuple[str, str]] = {}
    words = ([("shape", w, w) for w in world_lib.SHAPES] +
             [("shape", text_lib._PLURAL[w], w) for w in world_lib.SHAPES] +  # noqa: SLF001
             [("object", w, "") for w in ("object", "objects")] +
             [("colour", w, w) for w in world_lib.COLOURS] + [("size", w, w) for w in world_lib.SIZES])
    for kind, form, value in words:
      tid = tokenizer.convert_tokens_to_ids(form)
      if tid is None or tid == tokenizer.unk_token_id:
        raise ValueError(f"the scenes tokenizer has no token for {form!r}")
      self.lexicon[int(tid)] = (kind, value)

  def __call__(self, ids: Sequence[int], scene: world_lib.Scene | None) -> list[int]:
    labels = [-1] * len(ids)
    if scene is None:
      return labels
    for t, tid in enumerate(ids):
      kind, value = self.lexicon.get(int(tid), ("", ""))
      if self.rule == "word":
        if kind in ("shape", "colour"):
          labels[t] = _cell_class(scene, {kind: value})
        continue
      if kind not in ("shape", "object"):
        continue
      want = {"shape": value} if kind == "shape" else {}
      j = t - 1
      while j >= 0 and self.lexicon.get(int(ids[j]), ("", ""))[0] in ("colour", "size"):
        adj_kind, adj = self.lexicon[int(ids[j])]
        want.setdefault(adj_kind, adj)
        j -= 1
      labels[t] = _cell_class(scene, want)
    return labels


OFFSET_CLASSES = (2 * world_lib.GRID - 1) ** 2  # (row, col) differences of two cells: 5 x 5


def offset_labels(phrase_cells: list[int]) -> list[int]:
  """The offset probe's labels (`grounded.offset_probe_weight`) from a sequence's `PhraseCells` labels
  of rule "phrase": at the head noun of each phrase that names exactly one object, when an earlier phrase
  of the sequence named exactly one object too, the offset of the most recent such object from this one,
  `(row_a - row_b + 2) * 5 + (col_a - col_b + 2)` (25 classes); -1 elsewhere. "is the red star above the
  blue circle ?" is labelled at "circle" with where the red star lies relative to the blue circle, which
  decides every relation the world asks about (left of, right of, above, below, next to)."""
  span = world_lib.GRID - 1
  out, last = [-1] * len(phrase_cells), None
  for t, cls in enumerate(phrase_cells):
    if not 1 <= cls <= vision.CELLS:  # unlabelled, nothing, or several objects
      continue
    row, col = divmod(cls - 1, world_lib.GRID)
    if last is not None:
      out[t] = (last[0] - row + span) * (2 * span + 1) + (last[1] - col + span)
    last = (row, col)
  return out


def answer_labels(length: int, prompt_length: int, scene: world_lib.Scene | None, question: str,
                  labelled: bool = True) -> list[int]:
  """The answer probe's labels (`grounded.answer_probe_weight`): at the prompt's last token, where the
  answer starts, the cell class of the one object a wh-question asks about ("what colour is the small
  cross ?", "which colour does the star in the bottom left have ?": `checker.question_referents`); -1
  elsewhere, and everywhere when `labelled` is False, there is no scene, the question is not a wh-question
  or it does not describe exactly one object."""
  out = [-1] * length
  words = question.lower().split()
  if not labelled or scene is None or not words or words[0] not in ("what", "which", "where"):
    return out
  objects = checker_lib.question_referents(scene, question.replace(sm.SHORT_ANSWER_SUFFIX, ""))
  cls = vision.binding_class([o.row * world_lib.GRID + o.col for o in objects], vision.CELLS)
  if 1 <= cls <= vision.CELLS:  # exactly one object (the cell probes' classes)
    out[prompt_length - 1] = cls
  return out


def _cell_class(scene: world_lib.Scene, want: dict[str, str]) -> int:
  """The cell class of the objects of `scene` whose attributes (shape / colour / size) are `want`: stage
  0's binding classes (`vision.binding_class`)."""
  return vision.binding_class([o.row * world_lib.GRID + o.col for o in scene.objects
                               if all(getattr(o, k) == v for k, v in want.items())], vision.CELLS)


def grounding_probe_loss(kv_v: jax.Array, labels: jax.Array, probe: dict) -> tuple[jax.Array, jax.Array]:
  """The grounding probe (recipe only, not exported): at every token with a label (`PhraseCells`,
  `labels [B, T]`, -1 elsewhere) a linear probe on that token's attention values `kv_v [B, K, T, Dh]`
  (one layer's) predicts the cell class of what the token refers to. Returns (mean CE over the
  labelled tokens, their accuracy)."""
  b, k, t, dh = kv_v.shape
  v = kv_v.transpose(0, 2, 1, 3).reshape(b, t, k * dh).astype(jnp.float32)
  weight = (labels >= 0).astype(jnp.float32)
  safe = jnp.maximum(labels, 0)
  logits = v @ probe["w"] + probe["b"]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, safe)
  n = jnp.maximum(weight.sum(), 1.0)
  return (ce * weight).sum() / n, ((jnp.argmax(logits, -1) == safe) * weight).sum() / n


# The probes `train_decoder` knows: "probe" (cells by `probe_rule`), "offset" (`offset_labels`),
# "referent" (cells by the phrase rule, on a layer of its own) and "answer" (`answer_labels`).
_PROBE_CLASSES = {"probe": _CELL_CLASSES, "offset": OFFSET_CLASSES, "referent": _CELL_CLASSES,
                  "answer": _CELL_CLASSES}


def _decoder_loss(trainable, graphdef, rest, batch, feats, image_id, probes):
  lm = nnx.merge(graphdef, trainable["lm"], rest)
  tokens = batch["tokens"]
  x = lm.embed(tokens)
  is_image = tokens == image_id
  rows = feats[batch["scene"]].astype(x.dtype)  # [B, S, D]
  source = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, rows.shape[1] - 1)
  x = jnp.where(is_image[..., None], jnp.take_along_axis(rows, source[..., None], axis=1), x)
  positions, mask3 = positions_and_mask(batch["mask"], tokens.shape)
  hidden, kv = lm.decode_hidden(x, positions, mask3)
  where = batch["head_positions"]
  logits = lm.logits(jnp.take_along_axis(hidden, where[..., None], axis=1))
  targets = jnp.take_along_axis(tokens, where + 1, axis=1)
  loss, _ = losses.token_cross_entropy(logits, targets, batch["head_weights"])
  total, parts = loss, {"loss": loss}
  for name, layer, weight in probes:  # (name, layer, weight): "probe", "offset", "referent", "answer"
    probe_loss, probe_acc = grounding_probe_loss(kv.v[layer], batch[f"{name}_labels"], trainable[name])
    total = total + weight * probe_loss
    parts.update({f"{name}_loss": probe_loss, f"{name}_accuracy": probe_acc})
  return total, parts


@functools.partial(jax.jit, static_argnames=("graphdef", "optimizer", "image_id", "probes"),
                   donate_argnums=(0, 1))
def _decoder_step(trainable, opt_state, rest, batch, feats, *, graphdef, optimizer, image_id, probes):
  (_, parts), grads = jax.value_and_grad(_decoder_loss, has_aux=True)(
      trainable, graphdef, rest, batch, feats, image_id, probes)
  updates, opt_state = optimizer.update(grads, opt_state, trainable)
  return optax.apply_updates(trainable, updates), opt_state, parts


def train_decoder(vlm: Any, feats: np.ndarray, batches: Callable[[int], tuple[str, dict]], *, steps: int,
                  learning_rate: float, warmup: int, weight_decay: float, label: str,
                  on_eval: Callable[[int], dict] | None = None, eval_every: int = 0,
                  log_every: int = 200, probes: Sequence[tuple[str, int, float]] = ()
                  ) -> tuple[list[dict], list[dict], float]:
  """Train `vlm.language_model` in place on cached image tokens `feats [N, S, D]` (tower and connector
  untouched). `probes`: `(name, layer, weight)` of each probe on (`grounding_probe_loss`): "probe" (the
  referent's cell, `PhraseCells` by `probe_rule`), "offset" (`offset_labels`), "referent" (the phrase
  rule's cells) and "answer" (`answer_labels`); the batches then carry
  `{name}_labels`, and each probe's linear head is trained with the decoder and thrown away. Returns
  (loss history, held-out checks from `on_eval(step)`, seconds)."""
  lm = vlm.language_model
  graphdef, params, rest = nnx.split(lm, nnx.Param, ...)
  schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(1, min(warmup, steps // 10)),
                                                max(steps, 2), end_value=learning_rate * 0.05)
  optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=weight_decay))
  probes = tuple((name, int(layer), float(weight)) for name, layer, weight in probes)  # static: hashable
  trainable: dict[str, Any] = {"lm": params}
  width = vlm.cfg.text.num_key_value_heads * vlm.cfg.text.head_dim
  for name, _, _ in probes:
    classes = _PROBE_CLASSES[name]
    trainable[name] = {"w": jnp.zeros((width, classes)), "b": jnp.zeros(classes)}
  opt_state = optimizer.init(trainable)
  feats_dev = jnp.asarray(feats)
  history, checks = [], []
  start = time.perf_counter()
  window: dict[str, list[float]] = {}
  for step in range(steps):
    kind, batch = batches(step)
    batch = {k: jnp.asarray(v) for k, v in batch.items() if k != "weights"}
    trainable, opt_state, parts = _decoder_step(
        trainable, opt_state, rest, batch, feats_dev, graphdef=graphdef, optimizer=optimizer,
        image_id=int(vlm.cfg.image_token_id), probes=probes)
    parts = {k: float(v) for k, v in parts.items()}
    if not np.isfinite(sum(parts.values())):
      raise trainer_lib.NonFiniteError(f"{label}: losses {parts} at step {step + 1}")
    loss = parts.pop("loss")
    entry = {"step": step + 1, "loss": loss, "kind": kind, **parts}
    for name, _, _ in probes:
      window.setdefault(f"{name} accuracy", []).append(parts[f"{name}_accuracy"])
    history.append(entry)
    window.setdefault(kind, []).append(loss)
    if (step + 1) % log_every == 0 or step + 1 == steps:
      rate = (time.perf_counter() - start) / (step + 1)
      msg = ", ".join(f"{k} {np.mean(v):.3f}" for k, v in sorted(window.items()))
      logging.info("%s step %d/%d (%.3f s/step): loss %s", label, step + 1, steps, rate, msg)
      console.say(f"{label} step {step + 1}/{steps} ({rate:.3f} s/step): loss {msg}")
      window = {}
    if on_eval is not None and eval_every and ((step + 1) % eval_every == 0) and step + 1 < steps:
      nnx.update(lm, trainable["lm"])
      check = {"step": step + 1, "seconds": round(time.perf_counter() - start, 1), **on_eval(step + 1)}
      checks.append(check)
      console.say(f"{label} held-out check at step {step + 1}: {json.dumps(check)}")
  nnx.update(lm, trainable["lm"])
  return history, checks, time.perf_counter() - start


def quick_check(vlm: Any, base: str, workdir: str, world: Sequence[world_lib.Scene], mesh: Any,
                seed: int) -> dict:
  """Export `vlm` and measure VQA + POPE on `world` through the pipeline's loading path (a compact
  summary for the training log)."""
  from c3l_jax.pipeline.train import export_generator
  from c3l_jax.scenes import grounding

  d = os.path.join(workdir, "quick_model")
  export_generator(vlm, base, d)
  r = grounding.measure(d, world, mesh, seed, max_new_tokens=12, parts=("vqa", "pope"))
  return {"vqa": r["vqa"]["accuracy"], "by_kind": r["vqa"]["by_kind"],
          "pope": {k: [v["accuracy"], v["yes_ratio"]] for k, v in r["pope"].items()},
          "eval_seconds": r["seconds"]}


__all__ = ["Examples", "batch_kind", "existence_qa", "image_tokens", "mix_batches", "quick_check", "relation_qa",
           "token_batch", "train_decoder", "PhraseCells", "grounding_probe_loss", "offset_labels",
           "OFFSET_CLASSES"]


def run(config: Any, workdir: str) -> dict:
  """The grounded recipe: build, stage 0, cached image tokens, student, generator, export, measure.
  Writes `pretrain.out` and (when `grounded.student_out`) the student; returns the metrics."""
  from c3l_jax import runtime, sharding
  from c3l_jax.data.prompts import PromptBuilder, load_processor
  from c3l_jax.pipeline.train import export_generator
  from c3l_jax.scenes import grounding, modelio

  p, g = config.pretrain, config.pretrain.grounded
  seed = config.seed
  stage_dir = os.path.join(workdir, "pretrain")
  os.makedirs(stage_dir, exist_ok=True)
  t0 = time.perf_counter()
  base = modelio.build_base(p, stage_dir, seed)
  mesh = sharding.make_mesh(config.train.mesh)
  vlm = sharding.load_model(base, mesh, dtype=config.model.dtype, param_dtype=config.model.param_dtype,
                            scan_layers=config.model.scan_layers, remat=config.model.remat)
  builder = PromptBuilder(load_processor(base), vlm.cfg.image_token_id, vlm.cfg.image_seq_length)
  world = world_lib.generate_world(p.num_scenes, p.world_seed)

  def pixels_of(scenes: Sequence[world_lib.Scene]) -> np.ndarray:
    return np.asarray(builder.processor.image_processor(
        images=[world_lib.render(s) for s in scenes], return_tensors="np")["pixel_values"], np.float32)

  pixels = np.concatenate([pixels_of(world[s:s + 2000]) for s in range(0, len(world), 2000)])
  build_seconds = time.perf_counter() - t0
  console.say(f"pretrain (grounded): {len(world)} training scenes rendered in {build_seconds:.0f}s")

  # Stage 0: the supervised vision tower (probes discarded), its stream rescaled to RMS 1.
  probe_world = world_lib.generate_world(g.vision_eval_scenes, p.world_seed + 1)
  vision_out = vision.train_vision_cached(
      vlm, world, pixels, os.path.join(stage_dir, "stage0"), steps=g.vision_steps,
      batch_size=g.vision_batch_size, learning_rate=g.vision_lr, seed=seed, eval_world=probe_world,
      eval_pixels=pixels_of(probe_world), background=g.vision_background)
  rms = vision.normalize_feature_scale(vlm, pixels[:256], 1.0)
  vision_out["feature_rms_before_after"] = [round(r, 4) for r in rms]
  console.say(f"pretrain stage 0 (vision, supervised): {g.vision_steps} steps in "
              f"{vision_out['seconds']:.0f}s; held-out probe accuracy {vision_out.get('heldout_accuracy')}")

  # The frozen random connector, rescaled; then every scene's image tokens, once.
  scale_before, _ = modelio.match_feature_scale(vlm, pixels[:256])
  if g.image_token_scale != 1.0:
    proj = vlm.multi_modal_projector.linear_2
    proj.kernel[...] = proj.kernel[...] * g.image_token_scale
    if getattr(proj, "bias", None) is not None:
      proj.bias[...] = proj.bias[...] * g.image_token_scale
  t_cache = time.perf_counter()
  feats = image_tokens(vlm, pixels)
  del pixels
  cache_seconds = time.perf_counter() - t_cache
  console.say(f"pretrain: image tokens of {len(feats)} scenes cached in {cache_seconds:.0f}s "
              f"(image token / word embedding norm {modelio.feature_scale(vlm, pixels_of(world[:64])):.3g})")

  maker = Examples(builder, world, g)
  probes = tuple((name, layer, weight) for name, layer, weight in (
      ("probe", g.probe_layer, g.probe_weight), ("offset", g.offset_probe_layer, g.offset_probe_weight),
      ("referent", g.referent_probe_layer, g.referent_probe_weight),
      ("answer", g.answer_probe_layer, g.answer_probe_weight))
      if weight)
  quick_world = world_lib.generate_world(g.eval_quick_scenes, p.world_seed, start_id=g.eval_start_id)
  on_eval = (lambda step: quick_check(vlm, base, stage_dir, quick_world, mesh, seed)) \
      if g.eval_quick_scenes else None

  # The student: captions only.
  hist_s, _, sec_s = train_decoder(
      vlm, feats, mix_batches(maker, g, seed, builder.pad_id, len(world), captions_only=True),
      steps=g.student_steps, learning_rate=g.lr, warmup=g.warmup_steps, weight_decay=g.weight_decay,
      label="student (captions)", probes=probes)
  eval_world = world_lib.generate_world(p.eval_scenes, p.world_seed, start_id=g.eval_start_id)
  out_dirs = {}
  if g.student_out:
    student_dir = os.path.join(stage_dir, "student")
    export_generator(vlm, base, student_dir)
    student_quality = grounding.measure(student_dir, eval_world, mesh, seed,
                                        parts=("vqa", "pope", "caption")) if p.eval_scenes else {}
    _write_metrics(student_dir, {
        "role": "student: stage 0 (supervised vision tower), frozen random connector, decoder trained on "
                "captions only (no VQA or instruction data)",
        "model": _model_summary(p, vlm, builder),
        "data": {"train_scenes": p.num_scenes, "world_seed": p.world_seed, "seed": seed,
                 "heldout": {"world_seed": p.world_seed, "start_id": g.eval_start_id}},
        "stage0_vision": {k: v for k, v in vision_out.items() if k != "history"},
        "student_captions": _summary(hist_s, sec_s),
        "grounding": student_quality})
    out_dirs[student_dir] = g.student_out
    console.say(f"student: {json.dumps(_brief(student_quality))}")

  # The generator: the instruction mix, from the student's decoder.
  hist, checks, sec = train_decoder(
      vlm, feats, mix_batches(maker, g, seed, builder.pad_id, len(world)), steps=g.steps,
      learning_rate=g.lr, warmup=g.warmup_steps, weight_decay=g.weight_decay, label="generator (mix)",
      on_eval=on_eval, eval_every=g.eval_every, probes=probes)
  model_dir = os.path.join(stage_dir, "model")
  export_generator(vlm, base, model_dir)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(vlm, nnx.Param)))
  check_px = pixels_of(world[:8])
  # The cache must be what the pipeline's loading path computes at inference.
  loaded = sharding.load_model(model_dir, mesh)
  cache_error = float(np.abs(np.asarray(loaded.encode_images(jnp.asarray(check_px))) - feats[:8]).max())
  del loaded
  quality: dict[str, Any] = {}
  if p.eval_scenes:
    quality = {"grounding": grounding.measure(model_dir, eval_world, mesh, seed)}
    quality["grounding"]["failures"] = grounding.failures(quality["grounding"])
  by_kind: dict[str, list[float]] = {}
  for h in hist:
    by_kind.setdefault(h["kind"], []).append(h["loss"])
  metrics = {
      "recipe": "grounded",
      "model": {**_model_summary(p, vlm=None, builder=builder), "parameters": n_params},
      "data": {"train_scenes": p.num_scenes, "world_seed": p.world_seed, "p_generic": g.p_generic,
               "p_generic_caption_qa": g.p_generic_caption_qa, "p_short": g.p_short, "seed": seed,
               "heldout": {"world_seed": p.world_seed, "start_id": g.eval_start_id}},
      "stage0_vision": {**{k: v for k, v in vision_out.items() if k != "history"},
                        "curve": modelio.curve(vision_out.get("history", []))},
      "connector": {"frozen": True, "random": True, "feature_scale_before_rescale": round(scale_before, 4),
                    "image_token_scale": g.image_token_scale, "cache_seconds": round(cache_seconds, 1),
                    "cache_vs_loaded_max_abs_diff": cache_error},
      "student_captions": _summary(hist_s, sec_s),
      "generator_mix": {**_summary(hist, sec),
                        "final_loss_by_batch_kind": {k: _tail(v) for k, v in sorted(by_kind.items())},
                        "steps_by_batch_kind": {k: len(v) for k, v in sorted(by_kind.items())},
                        "heldout_curve": checks},
      "quality": quality,
      "seconds": {"build": round(build_seconds, 1), "total": round(time.perf_counter() - t0, 1)},
  }
  _write_metrics(model_dir, metrics)
  out_dirs[model_dir] = p.out
  if runtime.get().is_lead:
    for src, dst in out_dirs.items():
      modelio.publish(src, dst)
  return {**metrics, "out": p.out, "student_out": g.student_out}


def _tail(xs: Sequence[float]) -> float:
  return round(float(np.mean(xs[-max(1, len(xs) // 10):])), 4)


def _summary(history: Sequence[dict], seconds: float) -> dict:
  from c3l_jax.scenes import modelio

  return {"steps": len(history), "seconds": round(seconds, 1),
          "first_loss": history[0]["loss"] if history else None,
          "final_loss": _tail([h["loss"] for h in history]) if history else None,
          "curve": modelio.curve(history)}


def _model_summary(p: Any, vlm: Any, builder: Any) -> dict:
  import dataclasses

  out = {**dataclasses.asdict(sm.ModelSize.from_config(p)), "vocab_size": len(builder.tokenizer)}
  if vlm is not None:
    out["parameters"] = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(vlm, nnx.Param)))
  return out


def _brief(report: dict) -> dict:
  return {k: v for k, v in report.items() if k in ("vqa", "pope", "caption")} and {
      "vqa": (report.get("vqa") or {}).get("accuracy"),
      "pope": {k: [v["accuracy"], v["yes_ratio"]] for k, v in (report.get("pope") or {}).items()},
      "caption": (report.get("caption") or {}).get("correct"),
      "vigc_generic": (report.get("vigc") or {}).get("generic"),
      "caption_qa_generic": (report.get("caption_qa") or {}).get("generic")}


def _write_metrics(model_dir: str, metrics: dict) -> None:
  from c3l_jax.scenes.modelio import METRICS_FILE

  with open(os.path.join(model_dir, METRICS_FILE), "w") as f:
    json.dump(metrics, f, indent=2)
    f.write("\n")
