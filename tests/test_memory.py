"""The memory plan (`c3l_jax.memory`) against XLA's buffer assignment, hand counts and launch.py."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from c3l_jax import memory, scoring, sharding
from c3l_jax.models import attention
from c3l_jax.models.configs import CLIPVisionConfig, LlamaConfig, LlavaConfig
from configs import llava15
from test_param_count import llava15_hf_config, transformers_param_count

# Scaled down so that activations, not parameters, are most of the bytes (what the formulas must get).
SMALL = LlavaConfig(
    vision=CLIPVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=3,
                            num_attention_heads=4, image_size=112, patch_size=14),
    text=LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                     num_attention_heads=8, num_key_value_heads=8, head_dim=32,
                     max_position_embeddings=1024))


# bench/memory.py's tiny model: 64 wide, LLaVA-1.5's 336 px input (577 vision tokens), so the vision
# tower's attention is most of the bytes; its activations must stay split over the batch axes.
NARROW = LlavaConfig(
    vision=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, image_size=336, patch_size=14),
    text=LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                     max_position_embeddings=1024))


def _config(**mesh):
  config = llava15.get_config("tiny")
  config.unlock()
  config.inference.mesh.update(mesh)  # the same sizes for every stage here
  config.train.mesh.update(mesh)
  config.data.batch_size = 16
  config.scoring.batch_size = 24
  config.train.batch_size = 8
  return config


def test_kv_block_matches_attention():
  assert memory.KV_BLOCK == attention.KV_BLOCK
  assert memory.SUFFIX_BUCKET == scoring.ScoringConfig.suffix_bucket


@pytest.mark.parametrize("arch, stage", [("small", "initial"), ("small", "score"), ("small", "train"),
                                         ("narrow", "initial")])
def test_plan_within_25_percent_of_xla(arch, stage):
  """Per device, fsdp over the 8 simulated devices: plan total vs `memory_analysis()` of the stage's
  biggest compiled program (arguments + outputs - donated + temporaries). The narrow model's
  generation was 3x the plan when the vision tower's activations were laid out like its fsdp-sharded
  weights (every image of a data shard on every fsdp device)."""
  model = {"small": SMALL, "narrow": NARROW}[arch]
  config = _config(data=2, fsdp=4)
  if arch == "narrow":
    config.data.batch_size = 8
  mesh = sharding.make_mesh(config.train.mesh if stage == "train" else config.inference.mesh)
  sizes = {a: mesh.shape[a] for a in sharding.MESH_AXES}
  planned = memory.plan(model, config, (stage,), sizes).stages[0]
  assert planned.activations + planned.kv_cache > planned.params  # not a parameter count in disguise
  measured = memory.xla_bytes(stage, model, config, mesh)
  assert 0.75 <= planned.total / measured <= 1.25, (planned, measured)


@pytest.mark.parametrize("size", ["7b", "13b"])
def test_parameter_bytes_are_transformers_count(size):
  """One device, fp32: 4 bytes per transformers parameter; fsdp=8 in bf16: an eighth of 2 bytes each
  (the norms and biases that do not split are a rounding error)."""
  arch = memory.known_arch(f"llava15-{size}")
  count = transformers_param_count(llava15_hf_config(size))
  config = llava15.get_config(size)
  config.unlock()
  config.model.param_dtype = "float32"
  one = memory.plan(arch, config, ("score",), dict(data=1, fsdp=1, tensor=1)).stages[0]
  assert one.params == 4 * count
  config.model.param_dtype = "bfloat16"
  eight = memory.plan(arch, config, ("score",), dict(data=1, fsdp=8, tensor=1)).stages[0]
  assert 2 * count / 8 <= eight.params <= 1.01 * 2 * count / 8


def test_train_optimizer_bytes_are_adamw_of_trainable_set():
  """connector + decoder of 7B in fp32: mu, nu and gradients, 12 bytes per trainable parameter
  (transformers' count minus the CLIP tower's), plus the C3L projection head."""
  arch = memory.known_arch("llava15-7b")
  total = transformers_param_count(llava15_hf_config("7b"))
  vision = sum(int(np.prod(s)) for p, s, _ in memory.param_leaves(arch) if "/vision_tower/" in p)
  config = llava15.get_config("7b")
  train = memory.plan(arch, config, ("train",), dict(data=1, fsdp=1, tensor=1)).stages[0]
  d = arch.text.hidden_size
  head = [int(np.prod(s)) for p, s, _ in memory.param_leaves(arch, with_head=True) if p.startswith("head/")]
  assert sum(head) >= d  # the projection head exists and is counted
  assert train.optimizer == 12 * (total - vision + sum(head))


def _model_dir(tmp_path, cfg):
  from c3l_jax.checkpoint import save_model_config
  path = tmp_path / "model"
  save_model_config(str(path), cfg)
  (path / "params").mkdir()
  return str(path)


def _launch(repo_root, *args, devices=1):
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
  return subprocess.run([sys.executable, str(repo_root / "launch.py"), *args], cwd=repo_root,
                        capture_output=True, text=True, timeout=600,
                        env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags.strip()})


def test_launch_prints_plan_and_refuses_what_does_not_fit(repo_root, tmp_path):
  model = _model_dir(tmp_path, SMALL)
  common = ["--config=configs/llava15.py:tiny", f"--config.model.checkpoint={model}",
            "--config.stages=score,train"]
  dry = _launch(repo_root, *common, f"--workdir={tmp_path / 'dry'}", "--dry_run")
  assert dry.returncode == 0, dry.stderr
  assert "memory plan" in dry.stdout
  rows = [line.split()[0] for line in dry.stdout.splitlines()]
  assert "score" in rows and "train" in rows
  # 8 MiB per device: the parameters alone are more; the run stops before any stage.
  run = _launch(repo_root, *common, f"--workdir={tmp_path / 'run'}",
                "--config.device_memory_gb=0.0078125")
  assert run.returncode == 2, run.stderr
  errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "stage score needs" in errors[0], run.stderr
  assert "MiB per device" in errors[0] and "--config.model.param_dtype=bfloat16" in errors[0]
  assert not (tmp_path / "run" / "score").exists()


# Parameters are most of the bytes here (24 wide-MLP decoder layers, short sequences): which mesh the
# automatic inference mesh picks follows from the parameter count, which transformers gives.
HEAVY_HF = dict(model_type="llava", image_token_index=511, vision_feature_layer=-2,
                vision_feature_select_strategy="default", projector_hidden_act="gelu",
                vision_config=dict(model_type="clip_vision_model", hidden_size=128,
                                   intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                                   image_size=112, patch_size=14, hidden_act="quick_gelu"),
                text_config=dict(model_type="llama", vocab_size=512, hidden_size=256,
                                 intermediate_size=4096, num_hidden_layers=24, num_attention_heads=8,
                                 num_key_value_heads=8, max_position_embeddings=1024, pad_token_id=0))


def test_auto_inference_mesh_keeps_replicas_until_they_do_not_fit():
  """8 devices on one host, float32, the tiny config's batches (one row per device). A replica is
  P = 4 bytes x transformers' parameter count; the rest of a device's bytes in initial / final is at
  most 0.1 P by hand: a 256-token KV cache of 24 layers x 8 heads x 32 (12.6 MB), one decoder layer's
  transient on 192 prompt tokens (MLP 192 x 4096 x 4 B x 3 = 9.4 MB, scores 3.1 MB, q/k/v 1.2 MB), the
  gathered embedding and LM head (1 MB): ~28 MB of P ~ 330 MB. So with X in [0, 0.1 P] the choice at
  90 % of a device is the smallest fsdp f with P / f + 0.1 P <= 0.9 D, and no smaller one can fit."""
  from c3l_jax.models.configs import from_hf_config

  arch = from_hf_config(HEAVY_HF)
  p = 4 * transformers_param_count(HEAVY_HF)
  assert memory.AUTO_HEADROOM == 0.9
  config = llava15.get_config("tiny")
  config.unlock()
  stages = ("initial", "final")
  one = memory.plan(arch, config, stages, dict(data=8, fsdp=1, tensor=1)).stages
  assert all(s.params == p and s.total - s.params <= 0.1 * p for s in one)  # the premise above

  def chosen(device_fraction):
    config.device_memory_gb = device_fraction * p / memory.GiB
    planned = memory.run_plan(config, stages, model_cfg=arch, devices=8)
    assert all(s.mesh == planned.inference_mesh for s in planned.stages)
    return planned

  for fraction, (data, fsdp) in ((1.5, (8, 1)), (0.8, (4, 2)), (0.5, (2, 4)), (0.3, (1, 8))):
    planned = chosen(fraction)
    assert planned.inference_mesh == dict(data=data, fsdp=fsdp, tensor=1), fraction
    assert planned.mesh_choice.startswith(f"inference mesh data={data} fsdp={fsdp} tensor=1 (chosen")
    assert memory.misfit(planned, config) is None
  assert "one replica per device fits" in chosen(1.5).mesh_choice
  assert "one replica per device does not fit" in chosen(0.5).mesh_choice
  # At 0.26 P fsdp=8 misses by the gathered embedding and LM head; a tensor split halves those.
  assert chosen(0.26).inference_mesh == dict(data=1, fsdp=4, tensor=2)
  # Nothing fits: the most sharded mesh, and the check's one line says so.
  planned = chosen(0.1)
  assert planned.inference_mesh == dict(data=1, fsdp=8, tensor=1)
  assert "no mesh fits" in planned.mesh_choice
  assert memory.misfit(planned, config).startswith("stage initial needs")
  # An explicit mesh (auto_mesh off) is kept, and refused when it does not fit.
  config.inference.auto_mesh = False
  config.device_memory_gb = 0.5 * p / memory.GiB
  planned = memory.run_plan(config, stages, model_cfg=arch, devices=8)
  assert planned.inference_mesh == {} and planned.mesh_choice == ""
  assert planned.stages[0].mesh == dict(data=8, fsdp=1, tensor=1)
  assert "more than the" in memory.misfit(planned, config)
  # Device memory unknown (CPU): the configured mesh.
  config.inference.auto_mesh, config.device_memory_gb = True, 0.0
  planned = memory.run_plan(config, stages, model_cfg=arch, devices=8)
  assert planned.inference_mesh == {} and planned.stages[0].mesh == dict(data=8, fsdp=1, tensor=1)


def test_auto_inference_mesh_splits_heads_when_no_fsdp_replica_fits():
  """Qwen2.5-VL-72B on sixteen 16 GB chips (a v5e-16): fsdp alone gathers the 152,064 x 8192 embedding
  and LM head whole on every device (2 x 2.49 GB in bf16), so no fsdp-only replica fits 90 % of a chip;
  a `tensor` split divides the gathered tables, the KV cache and each layer's activations, and the
  chooser takes the smallest such replica that fits (tensor dividing the 64 heads and 8 KV heads)."""
  from configs import qwen25vl

  arch = memory.known_arch("qwen25vl-72b")
  assert (arch.text.vocab_size, arch.text.hidden_size) == (152064, 8192)
  config = qwen25vl.get_config("7b")
  config.unlock()
  config.model.max_pixels = 1003520
  config.device_memory_gb = 16.0
  stages = ("initial", "score", "final")
  budget = 0.9 * 16 * memory.GiB

  def worst(mesh):
    return max(s.total for s in memory.plan(arch, config, stages, mesh).stages)

  assert all(worst(dict(data=16 // f, fsdp=f, tensor=1)) > budget for f in (1, 2, 4, 8, 16))
  planned = memory.run_plan(config, stages, model_cfg=arch, devices=16)
  mesh = planned.inference_mesh
  assert mesh["tensor"] > 1 and mesh["data"] * mesh["fsdp"] * mesh["tensor"] == 16, mesh
  assert worst(mesh) <= budget and memory.misfit(planned, config) is None
  # It is the smallest fitting split: every mesh with a smaller replica or tensor does not fit.
  for size in (2, 4, 8, 16):
    for tensor in (2, 4, 8):
      if size % tensor == 0 and (size, tensor) < (mesh["fsdp"] * mesh["tensor"], mesh["tensor"]):
        assert worst(dict(data=16 // size, fsdp=size // tensor, tensor=tensor)) > budget
  assert f"tensor={mesh['tensor']} (chosen from the memory plan)" in planned.mesh_choice


def test_launch_says_which_mesh_it_chose_and_keeps_a_mesh_given_on_the_command_line(repo_root,
                                                                                     tmp_path):
  """launch.py --dry_run on 8 CPU devices: the chosen mesh's line and table; a mesh given with
  --config.inference.mesh.* is kept (and warned about, as a run would refuse it)."""
  from c3l_jax.models.configs import from_hf_config

  model = _model_dir(tmp_path, from_hf_config(HEAVY_HF))
  gb = 0.5 * 4 * transformers_param_count(HEAVY_HF) / memory.GiB  # fsdp=4 (the test above)
  common = ["--config=configs/llava15.py:tiny", f"--config.model.checkpoint={model}",
            "--config.stages=initial", f"--config.device_memory_gb={gb}", "--dry_run"]
  auto = _launch(repo_root, *common, f"--workdir={tmp_path / 'auto'}", devices=8)
  assert auto.returncode == 0, auto.stderr
  lines = auto.stdout.splitlines()
  assert [line for line in lines if line.startswith("inference mesh")] == [
      line for line in lines if "data=2 fsdp=4 tensor=1 (chosen from the memory plan)" in line]
  assert any(line.split()[:2] == ["initial", "2/4/1"] for line in lines), auto.stdout
  given = _launch(repo_root, *common, f"--workdir={tmp_path / 'given'}",
                  "--config.inference.mesh.data=-1", devices=8)
  assert given.returncode == 0, given.stderr
  assert not any(line.startswith("inference mesh") for line in given.stdout.splitlines())
  assert any(line.split()[:2] == ["initial", "8/1/1"] for line in given.stdout.splitlines())
  assert "warning: stage initial needs" in given.stderr  # a dry run warns; a run stops there
