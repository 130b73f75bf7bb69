"""Does a scenes model see? The held-out grounding numbers of a model directory, and the thresholds a
generator for the scenes testbed must meet.

`measure(model_dir, world, mesh)` generates greedily through the pipeline's loading path
(`modelio.Evaluator`: `sharding.load_model` + `PromptBuilder(load_processor(...))`) on scenes the
model was not trained on, and judges every output with the world's checker (`scenes.check`):

- `vqa`: one grounded question of each kind per scene (`scenes.grounded_qa`; a kind that does not fit
  the scene falls back to another, and is counted as the kind asked), with LLaVA's short-answer suffix;
  accuracy overall and per kind.
- `pope`: per split (random / popular / adversarial, negatives from `scenes.negative_objects` with the
  co-occurrence statistics of `world`), one present and one absent shape per scene, "Is there a {shape}
  in the image?" + the short-answer suffix; accuracy and the share of "yes".
- `caption`: the first captioning instruction; the share of captions judged correct / hallucinating.
- `vigc`: VIGC "generate a question and answer it" prompts of types conversation and
  complex_reasoning (with the image); the share of parsed QA that is generic (not image-dependent).
- `caption_qa`: the two-step prompt (QA from a ground-truth caption, text only); the generic share.

`THRESHOLDS` / `failures(report)` state the testbed's requirements: a generator that sees well (VQA,
POPE, captions) and still shows the language prior C3L targets (generic "generate a question" outputs).
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import jax
import numpy as np

from c3l_jax.data import instructions as ins
from c3l_jax import scenes
from c3l_jax.scenes import processor as sm
from c3l_jax.data.prompts import VIGC_INSTRUCTIONS

_SALT = 17
POPE_SPLITS = ("random", "popular", "adversarial")
THRESHOLDS = {
    "vqa_accuracy": 0.85,  # >=
    "vqa_kind_accuracy": 0.70,  # >= for each kind
    "pope_accuracy": 0.85,  # >= for each split
    "pope_yes_ratio": (0.40, 0.60),  # within, for each split
    "caption_correct": 0.80,  # >=
    "vigc_generic": 0.30,  # >= (conversation + complex_reasoning, greedy)
    "caption_qa_generic": 0.30,  # >= (two-step QA, greedy)
}


def _rate(flags: Sequence[bool]) -> float | None:
  return round(float(np.mean(flags)), 4) if len(flags) else None


def pope_questions(world: Sequence[scenes.Scene], seed: int) -> dict[str, list[tuple[int, str, bool]]]:
  """Per split, `(scene index, shape, present?)`: one present and one absent shape per scene."""
  stats = scenes.cooccurrence(world)
  out: dict[str, list[tuple[int, str, bool]]] = {}
  for split in POPE_SPLITS:
    rows = []
    for i, scene in enumerate(world):
      rng = np.random.default_rng([seed, _SALT, i, POPE_SPLITS.index(split)])
      present = scenes.object_names(scene)
      rows.append((i, present[int(rng.integers(len(present)))], True))
      negatives = scenes.negative_objects(scene, stats, split, k=1, rng=rng)
      if negatives:
        rows.append((i, negatives[0], False))
    out[split] = rows
  return out


def vqa_questions(world: Sequence[scenes.Scene], seed: int) -> list[tuple[int, str, str]]:
  """`(scene index, question, kind)`: one grounded question of each kind per scene. A kind that does
  not fit a scene falls back to another (`scenes.grounded_qa`); `kind` is the kind the checker gives
  the question with its reference answer, so it is the kind actually asked."""
  out = []
  for i, scene in enumerate(world):
    rng = np.random.default_rng([seed, _SALT, i, 99])
    for kind in scenes.QA_KINDS:
      q, a = scenes.grounded_qa(scene, rng, kind)
      out.append((i, q, scenes.check(scene, q, a).kind or kind))
  return out


def measure(model_dir: str, world: Sequence[scenes.Scene], mesh: jax.sharding.Mesh | None = None,
            seed: int = 0, max_new_tokens: int = 48, batch_size: int = 32,
            parts: Sequence[str] = ("vqa", "pope", "caption", "vigc", "caption_qa")) -> dict[str, Any]:
  """The grounding report of `model_dir` on `world` (held-out scenes); see the module docstring."""
  from c3l_jax import sharding
  from c3l_jax.scenes import modelio

  if mesh is None:
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  start = time.perf_counter()
  ev = modelio.Evaluator(model_dir, mesh, batch_size)
  images = [scenes.render(s) for s in world]
  out: dict[str, Any] = {"scenes": len(world)}

  if "vqa" in parts:
    vqa = vqa_questions(world, seed)
    answers = ev.generate([f"{q} {sm.SHORT_ANSWER_SUFFIX}" for _, q, _ in vqa],
                          [images[i] for i, _, _ in vqa], max_new_tokens)
    right = [scenes.check(world[i], q, a).correct is True for (i, q, _), a in zip(vqa, answers)]
    out["vqa"] = {"n": len(vqa), "accuracy": _rate(right),
                  "by_kind": {k: _rate([r for (_, _, kk), r in zip(vqa, right) if kk == k])
                              for k in scenes.QA_KINDS},
                  "wrong_examples": [{"question": q, "answer": a, "kind": k}
                                     for (_, q, k), a, r in zip(vqa, answers, right) if not r][:6]}

  if "pope" in parts:
    out["pope"] = {}
    for split, rows in pope_questions(world, seed).items():
      answers = ev.generate([f"Is there a {s} in the image? {sm.SHORT_ANSWER_SUFFIX}" for _, s, _ in rows],
                            [images[i] for i, _, _ in rows], max_new_tokens)
      yes = [a.strip().lower().startswith("yes") for a in answers]
      out["pope"][split] = {"n": len(rows), "accuracy": _rate([y == e for y, (_, _, e) in zip(yes, rows)]),
                            "yes_ratio": _rate(yes)}

  if "caption" in parts:
    caps = ev.generate([ins.CAPTION_INSTRUCTIONS[0]] * len(world), images, max_new_tokens)
    verdicts = [scenes.check(s, "Describe the image.", c) for s, c in zip(world, caps)]
    out["caption"] = {"n": len(world), "correct": _rate([v.correct is True for v in verdicts]),
                      "hallucinated": _rate([bool(v.hallucinated) for v in verdicts]),
                      "examples": caps[:3]}

  if "vigc" in parts:
    texts, owners = [], []
    for kind in ("conversation", "complex_reasoning"):
      texts += ev.generate([VIGC_INSTRUCTIONS[kind]] * len(world), images, max_new_tokens)
      owners += list(world)
    out["vigc"] = {**modelio.qa_quality(owners, texts), "examples": texts[:2]}

  if "caption_qa" in parts:
    prompts = sm.caption_qa_prompts(world, np.random.default_rng([seed, _SALT, 1 << 20]))
    texts = ev.generate(prompts, None, max_new_tokens)
    out["caption_qa"] = {**modelio.qa_quality(world, texts), "examples": texts[:2]}
  out["seconds"] = round(time.perf_counter() - start, 1)
  return out


def failures(report: dict[str, Any], thresholds: dict[str, Any] | None = None) -> list[str]:
  """The thresholds `report` misses (empty: it meets them all); parts not measured are not judged.

  `thresholds` has `THRESHOLDS`' keys (default: `THRESHOLDS`, the testbed's requirements)."""
  t, bad = thresholds or THRESHOLDS, []
  if "vqa" in report:
    if report["vqa"]["accuracy"] < t["vqa_accuracy"]:
      bad.append(f"vqa accuracy {report['vqa']['accuracy']} < {t['vqa_accuracy']}")
    for kind, acc in report["vqa"]["by_kind"].items():
      if acc is None or acc < t["vqa_kind_accuracy"]:
        bad.append(f"vqa {kind} {acc} < {t['vqa_kind_accuracy']}")
  for split, r in report.get("pope", {}).items():
    if r["accuracy"] < t["pope_accuracy"]:
      bad.append(f"pope {split} accuracy {r['accuracy']} < {t['pope_accuracy']}")
    lo, hi = t["pope_yes_ratio"]
    if not lo <= r["yes_ratio"] <= hi:
      bad.append(f"pope {split} yes ratio {r['yes_ratio']} outside [{lo}, {hi}]")
  if "caption" in report and report["caption"]["correct"] < t["caption_correct"]:
    bad.append(f"captions correct {report['caption']['correct']} < {t['caption_correct']}")
  for name in ("vigc", "caption_qa"):
    if name in report and (report[name]["generic"] or 0.0) < t[f"{name}_generic"]:
      bad.append(f"{name} generic {report[name]['generic']} < {t[f'{name}_generic']}")
  return bad


__all__ = ["POPE_SPLITS", "THRESHOLDS", "failures", "measure", "pope_questions", "vqa_questions"]
