"""Configs and launch.py's checks: overrides reach WORKDIR/config.json; bad flags, values, stages and
missing checkpoints end with one `error:` line (exit status 2), never a traceback, before any device work.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from c3l_jax import pipeline
from configs import common, llava15, scenes_demo

CONVERT_HINT = "python -m c3l_jax.convert --hf_path=DIR --out=DIR"


def launch(repo_root, *args, cwd=None) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, str(repo_root / "launch.py"), *args], cwd=cwd or repo_root,
                        capture_output=True, text=True, timeout=600,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})


def assert_one_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
  """The process failed with status 2 and exactly one `error:` line containing every needle."""
  assert proc.returncode == 2, (proc.returncode, proc.stderr)
  assert "Traceback" not in proc.stderr, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
  for needle in needles:
    assert needle in lines[0], (needle, lines[0])
  return lines[0]


def test_dry_run_writes_overridden_config(repo_root, tmp_path):
  workdir = tmp_path / "w"
  proc = launch(repo_root, "--config=configs/llava15.py:tiny", "--config.select.top_fraction=0.25",
                "--config.train.trainable=('connector',)", "--config.stages=score,filter",
                f"--workdir={workdir}", "--dry_run")
  assert proc.returncode == 0, proc.stderr
  assert "Traceback" not in proc.stderr
  config = json.loads((workdir / "config.json").read_text())
  assert config["select"]["top_fraction"] == 0.25
  assert config["train"]["trainable"] == ["connector"]
  assert config["stages"] == "score,filter"
  assert config["model"]["family"] == "llava15"
  assert config["train"]["steps"] == llava15.get_config("tiny").train.steps  # tiny's own value kept
  assert "stages filter, score" in proc.stdout  # run in pipeline order, whatever the listed order
  assert not (workdir / "metrics.json").exists()  # no stage ran


def test_default_workdir_is_fresh_under_runs(repo_root, tmp_path):
  for _ in range(2):
    proc = launch(repo_root, f"--config={repo_root}/configs/llava15.py:tiny", "--dry_run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
  runs = sorted(os.listdir(tmp_path / "runs"))
  assert len(runs) == 2 and all(r.startswith("llava15-tiny-") for r in runs), runs
  for r in runs:
    assert json.loads((tmp_path / "runs" / r / "config.json").read_text())["seed"] == 0


@pytest.mark.parametrize("override, needles", [
    ("--config.select.nope=1", ("nope",)),
    ("--config.nope.deeper=1", ("nope",)),
    ("--config.select.top_fraction=abc", ("top_fraction", "abc")),
    ("--config.train.steps=1.5", ("train.steps", "1.5")),
    ("--config.strict=maybe", ("strict",)),
    ("--no_such_flag=1", ("no_such_flag",)),
])
def test_bad_override_rejected_by_flags(repo_root, tmp_path, override, needles):
  workdir = tmp_path / "w"
  proc = launch(repo_root, "--config=configs/llava15.py:tiny", override, f"--workdir={workdir}",
                "--dry_run")
  assert_one_error(proc, *needles)
  assert not workdir.exists()


@pytest.mark.parametrize("config_args, override, needles", [
    # no --config: ml_collections applies the overrides to the default config while the flag is defined
    ((), "--config.train.lr=abc", ("--config.train.lr=abc", "did you mean train.learning_rate?")),
    (("--config=configs/llava15.py:tiny",), "--config.train.lr=abc", ("did you mean train.learning_rate?",)),
    (("--config=configs/llava15.py:tiny",), "--config.train.learning_rat=1", ("train.learning_rate?",)),
    ((), "--config.train.bs=4", ("did you mean train.batch_size?",)),
    ((), "--config.scorng.mode=eq1", ("'scorng'", "did you mean scoring?")),
])
def test_mistyped_field_names_the_closest_fields(repo_root, tmp_path, config_args, override, needles):
  """A new user's typo: one `error:` line (exit 2) suggesting the section's closest fields (difflib's
  close matches, abbreviations), never ml_collections' traceback."""
  workdir = tmp_path / "w"
  proc = launch(repo_root, *config_args, override, f"--workdir={workdir}", "--dry_run")
  assert_one_error(proc, *needles)
  assert not workdir.exists()


@pytest.mark.parametrize("override, needles", [
    ("--config.scoring.mode=foo", ("scoring.mode", "'foo'", "eq1, full_kl")),
    ("--config.model.dtype=float8", ("model.dtype", "float32, bfloat16, float16")),
    ("--config.model.param_dtype=int8", ("model.param_dtype",)),
    ("--config.train.objective=dpo", ("train.objective", "c3l, vlit, align")),
    ("--config.select.top_fraction=0", ("select.top_fraction", "(0.0, 1.0]")),
    ("--config.select.top_fraction=1.5", ("select.top_fraction",)),
    ("--config.inference.mesh.fsdp=0", ("inference.mesh",)),
    # data is already -1: two axes cannot both be "the rest"
    ("--config.train.mesh.fsdp=-1", ("train.mesh", "-1")),
    ("--config.train.mesh.data=4", ("train.batch_size=2", "data x fsdp = 4")),  # tiny: batch 2
    ("--config.mesh.data=2", ("config.mesh was split", "config.inference.mesh", "config.train.mesh")),
    ("--config.stages=score,bogus", ("'bogus'", "initial, filter, score, select, train, final, export, eval")),
    ("--config.stages=", ("stages",)),
    ("--config.train.trainable=('decoder[',)", ("trainable", "decoder[")),
])
def test_bad_value_rejected_before_running(repo_root, tmp_path, override, needles):
  workdir = tmp_path / "w"
  proc = launch(repo_root, "--config=configs/llava15.py:tiny", override, f"--workdir={workdir}",
                "--dry_run")
  assert_one_error(proc, *needles)
  assert not workdir.exists()


def test_edge_values_accepted(repo_root, tmp_path):
  proc = launch(repo_root, "--config=configs/llava15.py:tiny", "--config.select.top_fraction=1.0",
                "--config.inference.mesh.data=2", "--config.inference.mesh.tensor=-1",
                "--config.train.mesh.data=2", "--config.scoring.mode=full_kl",
                "--config.stages=eval,initial", f"--workdir={tmp_path / 'w'}", "--dry_run")
  assert proc.returncode == 0, proc.stderr
  assert "stages initial, eval" in proc.stdout


@pytest.mark.parametrize("config_arg, needles", [
    ("configs/llava15.py:bogus", ("bogus", "7b, 13b, tiny")),
    ("configs/scenes_demo.py:x", ("takes no arg",)),
    ("configs/no_such_config.py", ("no_such_config.py",)),
])
def test_bad_config_file_or_arg(repo_root, tmp_path, config_arg, needles):
  proc = launch(repo_root, f"--config={config_arg}", f"--workdir={tmp_path / 'w'}", "--dry_run")
  assert_one_error(proc, *needles)


def test_missing_checkpoint_fails_before_running(repo_root, tmp_path):
  workdir = tmp_path / "w"
  proc = launch(repo_root, "--config=configs/llava15.py:tiny", "--config.stages=score",
                "--config.model.checkpoint=/nonexistent", f"--workdir={workdir}")
  line = assert_one_error(proc)
  assert line == ("error: model.checkpoint '/nonexistent' does not exist "
                  f"(convert a HF checkpoint with: {CONVERT_HINT})")
  assert not workdir.exists()


def test_unset_checkpoint_names_the_stages_that_need_it(repo_root, tmp_path):
  proc = launch(repo_root, "--config=configs/llava15.py:tiny", "--config.stages=select,train",
                f"--workdir={tmp_path / 'w'}")
  assert_one_error(proc, "model.checkpoint is not set", "train", CONVERT_HINT)


def test_dry_run_reports_environment_problems_as_warnings(repo_root, tmp_path):
  proc = launch(repo_root, "--config=configs/llava15.py:tiny", "--config.stages=score",
                "--config.model.checkpoint=/nonexistent", f"--workdir={tmp_path / 'w'}", "--dry_run")
  assert proc.returncode == 0, proc.stderr
  assert "warning: model.checkpoint '/nonexistent' does not exist" in proc.stderr
  assert (tmp_path / "w" / "config.json").exists()


# In-process: the same checks as functions.

def test_checkpoint_problems(tmp_path):
  config = llava15.get_config("tiny")
  ckpt = tmp_path / "ckpt"
  ckpt.mkdir()
  with config.unlocked():
    config.model.checkpoint = str(ckpt)

  def checkpoint_problems(stages):
    return [p for p in pipeline.environment_problems(config, stages) if "model.checkpoint" in p]

  assert checkpoint_problems(("score",)) == [
      f"model.checkpoint {str(ckpt)!r} has no c3l_model.json: not a c3l-jax model directory "
      f"(convert a HF checkpoint with: {CONVERT_HINT})"]
  assert checkpoint_problems(("filter", "select", "export")) == []  # these never load the model
  (ckpt / "c3l_model.json").write_text("{}")
  assert checkpoint_problems(pipeline.STAGE_ORDER) == []


C3L_STAGES = ("initial", "filter", "score", "select", "train", "final", "export")


def test_parse_stages():
  assert pipeline.parse_stages("export, score,filter,score") == ("filter", "score", "export")
  assert pipeline.parse_stages(common.get_base_config().stages) == C3L_STAGES
  with pytest.raises(pipeline.ConfigError, match="unknown stage 'scoring'"):
    pipeline.parse_stages("scoring")
  with pytest.raises(pipeline.ConfigError, match="empty"):
    pipeline.parse_stages(" , ")


@pytest.mark.parametrize("make, stages", [
    (lambda: llava15.get_config("7b"), C3L_STAGES), (lambda: llava15.get_config("13b"), C3L_STAGES),
    (lambda: llava15.get_config("tiny"), C3L_STAGES), (scenes_demo.get_config, C3L_STAGES + ("eval",))])
def test_shipped_configs_are_valid_and_locked(make, stages):
  config = make()
  assert pipeline.check_config(config) == stages
  assert config.is_locked
  with pytest.raises(AttributeError):
    config.select.nope = 1
  with pytest.raises(TypeError):
    config.train.steps = "many"
  assert scenes_demo.get_config().model.checkpoint == "checkpoints/scenes_tiny"


def test_llava15_unknown_arg():
  with pytest.raises(ValueError, match="7b, 13b, tiny"):
    llava15.get_config("70b")


def test_run_stages_merges_metrics(tmp_path, monkeypatch):
  calls = []

  def fake_stage(name):
    def run(config, workdir):
      calls.append(name)
      return {"n": len(calls)}
    return run

  monkeypatch.setattr(pipeline, "get_stage", fake_stage)
  (tmp_path / "metrics.json").write_text(json.dumps({"initial": {"n": 7}}))
  pipeline.run_stages(llava15.get_config("tiny"), str(tmp_path), ("filter", "score"))
  assert calls == ["filter", "score"]
  assert json.loads((tmp_path / "metrics.json").read_text()) == {
      "initial": {"n": 7}, "filter": {"n": 1}, "score": {"n": 2}}


def test_a_full_disk_at_done_json_marks_nothing_done(tmp_path, monkeypatch):
  """EDQUOT writing `score/DONE.json` (injected at the write site): the error names the path, the stage
  is not marked done, and the rerun (quota freed) runs it again and ends as an uninterrupted run."""
  import errno

  from c3l_jax.data import records

  calls = []
  monkeypatch.setattr(pipeline, "get_stage", lambda name: lambda config, workdir: calls.append(name) or
                      {"n": 3})
  monkeypatch.setenv(records.WRITE_FAULT_ENV, f"EDQUOT:{tmp_path}/score/DONE.json.tmp")
  with pytest.raises(OSError) as error:
    pipeline.run_stages(llava15.get_config("tiny"), str(tmp_path), ("filter", "score"))
  assert error.value.errno == errno.EDQUOT and error.value.filename == f"{tmp_path}/score/DONE.json.tmp"
  assert records.disk_error(error.value) is error.value
  assert (tmp_path / "filter" / "DONE.json").exists() and not (tmp_path / "score" / "DONE.json").exists()
  monkeypatch.delenv(records.WRITE_FAULT_ENV)
  pipeline.run_stages(llava15.get_config("tiny"), str(tmp_path), ("filter", "score"))
  assert calls == ["filter", "score", "score"]  # filter was done; score ran again
  assert json.loads((tmp_path / "metrics.json").read_text()) == {"filter": {"n": 3}, "score": {"n": 3}}
  assert json.loads((tmp_path / "score" / "DONE.json").read_text()) == {"n": 3}


def test_get_stage_is_lazy_and_checked():
  with pytest.raises(ValueError, match="unknown stage"):
    pipeline.get_stage("nope")
  assert set(pipeline.implemented_stages()) <= set(pipeline.STAGE_ORDER)


def test_qwen25vl_refuses_what_it_does_not_train_also_in_ablation_rows():
  """qwen25vl trains with train.inputs=vigc, train.anchor=prompt, objective c3l/vlit, on one host: the
  same limits hold for the ablation's rows, whose variants train with their own overrides."""
  from configs import qwen25vl

  def problem(**fields):
    config = qwen25vl.get_config("tiny")
    with config.unlocked():
      for key, value in fields.items():
        *path, last = key.split("__")
        target = config
        for part in path:
          target = target[part]
        target[last] = value
    try:
      pipeline.check_config(config)
    except pipeline.ConfigError as e:
      return str(e)
    return None

  assert problem(stages="initial,filter,score,ablation") is None  # final_mode, length_norm: fine
  assert "several processes" in problem(distributed__enabled=True)
  assert problem(distributed__enabled=True, stages="score,final") is None  # inference: distributed
  assert "'as_generated' trains with train.inputs=as_generated" in problem(
      stages="initial,filter,score,ablation", ablation__variants="final_mode,as_generated")
  assert "'anchor_generated'" in problem(stages="ablation", ablation__variants="anchor_generated")
  assert "train.objective=align" in problem(stages="ablation", ablation__variants="train.objective=align")
  assert problem(stages="ablation", ablation__variants="anchor_neutral,negatives") is None
