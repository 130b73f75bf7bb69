"""`bench/gpu.py --size=small` on CPU: the check agrees with transformers (fp32) and catches a broken
implementation; the timed figures run to the end with both sides' measurements (timings: not checked)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import numpy as np

from bench import gpu_check

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FIELDS = {"score": ("tokens_per_s", "mfu"), "generate": ("tokens_per_s", "hbm_gbs"),
          "train": ("mfu", "seconds")}


def test_gpu_suite_small_runs_on_cpu(tmp_path):
  # One device per side, as on one GPU; unoptimised CPU code generation, as conftest sets for the suite.
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0")
  proc = subprocess.run([sys.executable, "bench/gpu.py", "--size=small", "--repeats=1",
                         f"--check_dir={tmp_path}"], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
  lines = [json.loads(line) for line in proc.stdout.splitlines()]
  assert [(line["figure"], line.get("attention")) for line in lines] == [
      ("check", "xla"), ("check", "cudnn"), ("check", "splash"), ("score", None), ("generate", None),
      ("train", None), ("device", None)]

  # The check: fp32 on CPU, xla only; the fused kernels are reported skipped.
  check = lines[0]
  assert check["pass"] is True and check["dtype"] == {"ours": "float32", "torch": "float32"}, check
  assert "NVIDIA GPU" in lines[1]["skipped"] and "TPU" in lines[2]["skipped"]
  ref = json.loads((tmp_path / gpu_check.TORCH_FILE).read_text())
  results = json.loads((tmp_path / gpu_check.OURS_FILE).read_text())
  ours = results["results"]["xla"]
  # S(I2C) by eq. 1, by hand, from transformers' per-token log-probs; the sharpened model makes it
  # far from 0 (a near-uniform random model gives ~0 whatever is computed).
  want = [sum(np.exp(v) * (v - d) for v, d in zip(lv, ld))
          for lv, ld in zip(ref["logp_image_tokens"], ref["logp_text_tokens"])]
  assert len(want) == 4 and min(want) > 0.1, want
  np.testing.assert_allclose(ours["i2c"], want, atol=1e-4, rtol=0)
  np.testing.assert_allclose(ours["logp_image"], [sum(v) for v in ref["logp_image_tokens"]], atol=1e-4)
  np.testing.assert_allclose(ours["logp_text"], [sum(d) for d in ref["logp_text_tokens"]], atol=1e-4)
  assert np.asarray(ours["gen_tokens"]).shape == (4, 8)
  assert ours["gen_tokens"] == ref["gen_tokens"]  # greedy, token for token
  assert check["tokens_agree_overall"] == check["tokens_agree_to_first_divergence"] == 1.0

  # A broken implementation is caught: ours' results perturbed as a wrong kernel would perturb them.
  vocab, layers = 1000, 2
  assert gpu_check.compare(ref, results, "xla", layers, vocab)["arithmetic"] == "float32"
  assert gpu_check.compare(ref, results, "xla", layers, vocab)["pass"] is True
  bad = copy.deepcopy(results)
  bad["results"]["xla"]["i2c"][2] += 1e-2
  line = gpu_check.compare(ref, bad, "xla", layers, vocab)
  assert line["pass"] is False and line["failures"][0].startswith("qa 2: i2c"), line
  bad = copy.deepcopy(results)
  bad["results"]["xla"]["logp_text"][1] -= 1e-2
  assert gpu_check.compare(ref, bad, "xla", layers, vocab)["failures"][0].startswith("qa 1: logp_text")
  bad = copy.deepcopy(results)
  outside = next(t for t in range(vocab) if t not in ref["top_ids"][1][3])
  bad["results"]["xla"]["gen_tokens"][1][3] = outside  # not among the reference's top candidates
  line = gpu_check.compare(ref, bad, "xla", layers, vocab)
  assert line["pass"] is False and line["failures"] == [line["failures"][0]], line
  assert line["failures"][0].startswith("row 1 step 3") and line["divergences"] == 1
  assert line["tokens_agree_to_first_divergence"] == (8 + 3 + 8 + 8) / 32
  # A divergence onto the reference's runner-up is a near-tie only within the tolerance.
  tokens = copy.deepcopy(ours["gen_tokens"])
  tokens[0][0] = ref["top_ids"][0][0][1]
  margin = ref["top_logits"][0][0][0] - ref["top_logits"][0][0][1]
  assert margin > 1e-3  # fp32: far above its tolerance
  assert gpu_check.compare_generation(ref, tokens, 1e-4)["generation_failures"]
  assert not gpu_check.compare_generation(ref, tokens, margin)["generation_failures"]

  # A side that failed is a failing line with its exception.
  (line,) = gpu_check.lines(str(tmp_path / "absent"), layers, vocab, {"torch": "RuntimeError: boom"})
  assert line["pass"] is False and line["error"] == "torch side: RuntimeError: boom"

  # The timed figures.
  figures = {line["figure"]: line for line in lines}
  for name, fields in FIELDS.items():
    for side in ("ours", "torch"):
      got = figures[name][side]
      assert "error" not in got, (name, side, got)
      assert all(isinstance(got[f], float) and got[f] > 0 for f in fields), (name, side, got)
    assert figures[name]["ratio"] > 0
  assert figures["train"]["ours"]["layers"] == figures["train"]["torch"]["layers"] == 2
  assert figures["generate"]["ours"]["batch"] == figures["generate"]["torch"]["batch"] == 4
  assert {"ours", "torch"} <= set(figures["device"]) and figures["device"]["size"] == "small"


def test_check_implementations_by_platform():
  """What the check runs where: xla always, cudnn on a GPU in bf16 / fp16, splash on a TPU."""
  run, skipped = gpu_check.implementations("gpu", "bfloat16")
  assert run == ["xla", "cudnn"] and list(skipped) == ["splash"]
  run, skipped = gpu_check.implementations("gpu", "float32")
  assert run == ["xla"] and "bf16 / fp16" in skipped["cudnn"]
  run, skipped = gpu_check.implementations("tpu", "bfloat16")
  assert run == ["xla", "splash"] and list(skipped) == ["cudnn"]
  assert gpu_check.implementations("cpu", "float32")[0] == ["xla"]
  # The tolerance's arithmetic is the coarser side's: fp32 is fp32 on a CPU only.
  side = lambda dtype, where: {"dtype": dtype, "device": where, "platform": where}
  assert gpu_check.arithmetic(side("float32", "cpu"), side("float32", "cpu")) == "float32"
  assert gpu_check.arithmetic(side("float32", "NVIDIA H100"), side("float32", "gpu")) == "tf32"
  assert gpu_check.arithmetic(side("float32", "cpu"), side("float32", "tpu")) == "bfloat16"
  assert gpu_check.arithmetic(side("bfloat16", "NVIDIA H100"), side("bfloat16", "gpu")) == "bfloat16"
  # The bounds docs/performance.md states (LLaVA-1.5-7B's 32 layers and 32,064 tokens; the small model).
  assert round(gpu_check.logprob_tolerance("bfloat16", 32, 32064), 2) == 1.08
  assert round(gpu_check.logprob_tolerance("bfloat16", 2, 1000), 2) == 0.42
