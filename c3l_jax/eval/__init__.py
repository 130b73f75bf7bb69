"""Evaluation of a (fine-tuned) model on the paper's benchmarks (C3L Table 1 / Table 5).

- `pope`: POPE (Li et al., EMNLP 2023): the random / popular / adversarial splits built from object
  annotations exactly as the POPE reference code, or read from its question files; the reference's yes/no
  parser and metrics.
- `multiple_choice`: SEED-Bench (image tasks) and MMBench dev (CircularEval), answered by option
  log-likelihood or by a generated letter.
- `llava_bench`: LLaVA-Bench (In-the-Wild) answers in LLaVA's answer-file format (for the GPT-4 judge).
- `table`: the Table-1-like summary printed by the `eval` stage.

Everything here is host-side and model-free (no jax import); the `eval` stage
(`c3l_jax.pipeline.eval`) runs the model.
"""
