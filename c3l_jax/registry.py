"""Where the pipeline finds what a testbed adds: image sources and eval benchmarks, by name.

The core knows two sources (`records`, `coco`, in `c3l_jax.data.sources`) and four benchmarks (`pope`,
`seed`, `mmbench`, `llava_bench`, in `c3l_jax.pipeline.eval`). A testbed (`c3l_jax.scenes`) adds its
own when it is imported, with `register_source` / `register_benchmark`; a config names the modules to
import in `config.plugins` (a comma list, e.g. `configs/scenes_demo.py` sets `"c3l_jax.scenes"`), and
`load_plugins(config)` imports them before the config is checked. The core never imports a testbed.

This module is jax-free: `launch.py` checks configs against it before any device work.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Sequence

BUILTIN_SOURCES: tuple[str, ...] = ("records", "coco")
BUILTIN_BENCHMARKS: tuple[str, ...] = ("pope", "seed", "mmbench", "llava_bench")


@dataclasses.dataclass(frozen=True)
class Source:
  """An image source that serves tfds-like elements (dicts with `image_bytes`, `image_id`, `file_name`,
  `captions`, `objects`, `annotation`).

  elements(config, split) -> Sequence[dict]   random access over the split (prepared on first use);
                                               with `file_names()` and `image_ids()` methods (lists
                                               in element order, read without any element) the
                                               split is listed without reading image bytes, else
                                               listing reads every element once
  quality(config, source, rows) -> dict        ground-truth quality of generated QA rows (optional;
                                               `source` is the open `ImageSource`); the export stage
                                               measures the initial and the final data with it
  quality_title                                the line printed above the initial-vs-final table
  verdicts(config, source, rows) -> list[dict] one judgement per QA row against ground truth
                                               (optional): `image_dependent` (bool), `correct` (bool
                                               or None), `hallucinated` (bool); the export stage's
                                               selection composition and report.html show them
  check(config) -> str | None                  a config problem (one line), checked with the config
  instruction_data(config) -> list[dict]       instruction data built from the source's ground truth
                                               on its training split (optional): QA records `id`,
                                               `image`, `question`, `answer` (+ `kind`), a function
                                               of the config's world and `seed`; the ablation's
                                               `ablation.student_data=<source name>` mixes them in
  """

  name: str
  elements: Callable[[Any, str], Sequence[dict]]
  quality: Callable[[Any, Any, Sequence[dict]], dict] | None = None
  quality_title: str = ""
  verdicts: Callable[[Any, Any, Sequence[dict]], list[dict]] | None = None
  check: Callable[[Any], str | None] | None = None
  instruction_data: Callable[[Any], list[dict]] | None = None


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """An eval benchmark: `run(evaluator, eval_config) -> metrics` (`c3l_jax.pipeline.eval.Evaluator`).

  sources   the data sources it can run on (empty: any)
  summary   metrics -> the ablation table's columns (e.g. {"vqa_acc": ...}); optional
  """

  name: str
  run: Callable[[Any, Any], dict]
  sources: tuple[str, ...] = ()
  summary: Callable[[dict], dict] | None = None


SOURCES: dict[str, Source] = {}
BENCHMARKS: dict[str, Benchmark] = {}


def register_source(source: Source) -> None:
  if source.name in BUILTIN_SOURCES or not source.name:
    raise ValueError(f"source name {source.name!r} is taken")
  SOURCES[source.name] = source


def register_benchmark(benchmark: Benchmark) -> None:
  if benchmark.name in BUILTIN_BENCHMARKS or not benchmark.name:
    raise ValueError(f"benchmark name {benchmark.name!r} is taken")
  BENCHMARKS[benchmark.name] = benchmark


def source_names() -> tuple[str, ...]:
  return BUILTIN_SOURCES + tuple(SOURCES)


def benchmark_names() -> tuple[str, ...]:
  return BUILTIN_BENCHMARKS + tuple(BENCHMARKS)


def plugin_names(config: Any) -> list[str]:
  return [p.strip() for p in str(getattr(config, "plugins", "") or "").split(",") if p.strip()]


def load_plugins(config: Any) -> None:
  """Import the modules of `config.plugins` (each registers its sources / benchmarks on import).

  Raises ImportError (with the module's name) when one cannot be imported."""
  for name in plugin_names(config):
    try:
      importlib.import_module(name)
    except ImportError as e:
      raise ImportError(f"config.plugins: cannot import {name!r} ({e})") from e


__all__ = ["BENCHMARKS", "BUILTIN_BENCHMARKS", "BUILTIN_SOURCES", "Benchmark", "SOURCES", "Source",
           "benchmark_names", "load_plugins", "plugin_names", "register_benchmark", "register_source",
           "source_names"]
