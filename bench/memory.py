r"""Memory at scale: host RSS of the score and train stages vs the number of records, and device bytes
of the memory plan vs XLA's buffer assignment.

1. Host: a tiny LLaVA (random weights) with LLaVA-1.5's CLIP input, 336 px images (576 image tokens),
   on N records (two QA per image, one JPEG per image). `launch.py --config.stages=score`, then
   `--config.stages=train` (c3l objective, on the score stage's output) run as child processes, each's
   peak RSS read from `os.wait4`. Run for `--small` and `--large` record counts: the pipeline streams
   (pictures decoded when a batch needs them, a bounded picture cache), so the larger run's peak
   should be within 1.2x of the smaller's.
2. Curation stream: a generated LLaVA-format JSON array (mix665k-like: multi-turn, five sources, one
   entry in 17 text-only, ~1.5 KB an entry) of `--curate_small` and `--curate_large` entries, read the
   way the curate stage reads it (`curate.checked_entries`: streamed, every entry checked, ids kept as
   64-bit hashes) and then exported (`curate.write_selected`, one entry in ten) in a child process;
   its peak RSS should not grow with the file.
3. Device: for the tiny model and a 1B-shaped LLaVA (CLIP ViT-L/336 + a TinyLlama-1.1B-shaped decoder),
   the plan's bytes per device (`c3l_jax.memory.plan`) vs `memory_analysis()` of the stage's biggest
   compiled program on 8 simulated CPU devices (data=2 x fsdp=4), abstract inputs: nothing allocated.
   In float32: XLA:CPU has no bf16 matmul and converts bf16 weights to float32 copies, which a GPU or
   TPU does not do, so a bf16 comparison on CPU would measure the CPU.

    python bench/memory.py                      # 500 vs 4000 records, the curation stream, the devices
    python bench/memory.py --small=50 --large=400 --skip_device   # smoke test
    python bench/memory.py --skip_host --skip_device             # the curation stream only (20k vs 200k)

Not a test: it prints numbers and ratios, asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

VISION_336 = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=336, patch_size=14, projection_dim=16)
TEXT = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024)
WORDS = ("the red circle is on the left of a small blue square near green triangle what color how many "
         "objects are there where is it").split()


def build_model(root: str) -> str:
  from hf_reference import convert_cli, make_hf_llava, make_tiny_processor
  hf = os.path.join(root, "hf")
  make_hf_llava(hf, vision=VISION_336, text=TEXT)
  make_tiny_processor(hf, image_size=336)
  out = os.path.join(root, "model")
  proc = convert_cli(hf, out)
  if proc.returncode:
    raise SystemExit(proc.stderr)
  return out


def build_records(root: str, n: int, seed: int = 0) -> tuple[str, str]:
  """`n` records, two per image, each image a 336 x 336 JPEG of noise (incompressible: ~90 KB)."""
  import PIL.Image
  rng = np.random.default_rng(seed)
  images = os.path.join(root, f"images-{n}")
  os.makedirs(images, exist_ok=True)
  path = os.path.join(root, f"records-{n}.jsonl")
  with open(path, "w") as f:
    for i in range(n):
      name = f"{i // 2:06d}.jpg"
      if i % 2 == 0:
        PIL.Image.fromarray(rng.integers(0, 255, (336, 336, 3), dtype=np.uint8)).save(
            os.path.join(images, name), quality=90)
      q = " ".join(rng.choice(WORDS, 8)) + "?"
      a = " ".join(rng.choice(WORDS, 24))
      f.write(json.dumps(dict(id=f"r{i}", image=name, question=q, answer=a)) + "\n")
  return path, images


def peak_rss(args: list[str]) -> tuple[float, float, int]:
  """(peak RSS in MiB, seconds, exit status) of `python launch.py ARGS` as a child process."""
  start = time.perf_counter()
  log = tempfile.TemporaryFile()
  proc = subprocess.Popen([sys.executable, "launch.py", *args], cwd=REPO, stdout=log, stderr=log,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
  _, status, usage = os.wait4(proc.pid, 0)
  if status:
    log.seek(0)
    print(log.read().decode()[-3000:])
  return usage.ru_maxrss / 1024, time.perf_counter() - start, status


def host(root: str, model: str, counts: list[int], steps: int) -> None:
  rows = []
  for n in counts:
    records, images = build_records(root, n)
    workdir = os.path.join(root, f"run-{n}")
    common = ["--config=configs/llava15.py:tiny", f"--workdir={workdir}",
              f"--config.model.checkpoint={model}", f"--config.data.records={records}",
              f"--config.data.image_root={images}", "--config.scoring.batch_size=8",
              "--config.select.top_fraction=0.5", f"--config.train.steps={steps}",
              f"--config.train.checkpoint_every={steps}", "--config.train.batch_size=2"]
    score = peak_rss(common + ["--config.stages=score"])
    train = peak_rss(common + ["--config.stages=train"])
    rows.append((n, score, train))
    print(f"{n:>6} records: score peak RSS {score[0]:7.0f} MiB ({score[1]:.0f} s, exit {score[2]}), "
          f"train peak RSS {train[0]:7.0f} MiB ({train[1]:.0f} s, exit {train[2]})", flush=True)
  (n0, s0, t0), (n1, s1, t1) = rows[0], rows[-1]
  print(f"\nhost peak RSS, {n1} vs {n0} records: score {s1[0] / s0[0]:.2f}x, train {t1[0] / t0[0]:.2f}x "
        "(flat: <= 1.2x; and <= 2048 MiB each)")


SOURCES = ("coco/train2017", "gqa/images", "ocr_vqa/images", "textvqa/train_images", "vg/VG_100K")


def build_llava_json(path: str, n: int, seed: int = 0) -> None:
  """`n` mix665k-like entries written as one JSON array, one entry at a time."""
  rng = np.random.default_rng(seed)
  with open(path, "w") as f:
    f.write("[")
    for i in range(n):
      turns = int(rng.integers(1, 6))
      conv = []
      for k in range(turns):
        q = " ".join(rng.choice(WORDS, int(rng.integers(6, 14)))) + "?"
        conv += [{"from": "human", "value": q}, {"from": "gpt",
                                                 "value": " ".join(rng.choice(WORDS, int(rng.integers(10, 60))))}]
      entry = {"id": f"{i:012d}", "conversations": conv}
      if i % 17:
        conv[0]["value"] = "<image>\n" + conv[0]["value"] if i % 2 else conv[0]["value"] + "\n<image>"
        entry["image"] = f"{SOURCES[i % len(SOURCES)]}/{i:012d}.jpg"
      f.write(("," if i else "") + "\n" + json.dumps(entry))
    f.write("\n]\n")


_STREAM = """
import sys
from etils import epath
import numpy as np
import configs.curate
from c3l_jax.pipeline import curate
config = configs.curate.get_config()
with config.unlocked():
  config.data.records, config.data.image_root = sys.argv[1], sys.argv[2]
n = bad = 0
for raw, reason, conv in curate.checked_entries(config):
  n += 1
  bad += reason is not None
curate.write_selected(config, epath.Path(sys.argv[3]), np.arange(0, n, 10), set())
print(n, bad)
"""


def curate_stream(root: str, counts: list[int]) -> None:
  rows = []
  for n in counts:
    path = os.path.join(root, f"llava-{n}.json")
    build_llava_json(path, n)
    start = time.perf_counter()
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-c", _STREAM, path, root, os.path.join(root, "selected.json")],
                            cwd=REPO, stdout=log, stderr=log, env={**os.environ, "PYTHONPATH": REPO})
    _, status, usage = os.wait4(proc.pid, 0)
    log.seek(0)
    out = log.read().decode()
    rows.append((n, usage.ru_maxrss / 1024))
    print(f"{n:>7} entries ({os.path.getsize(path) / 2 ** 20:.0f} MiB): stream + check + export peak RSS "
          f"{usage.ru_maxrss / 1024:7.0f} MiB ({time.perf_counter() - start:.0f} s, exit {status}; "
          f"read, rejected: {out.strip().splitlines()[-1] if out.strip() else '?'})", flush=True)
    os.remove(path)
  (n0, r0), (n1, r1) = rows[0], rows[-1]
  print(f"curation stream peak RSS, {n1} vs {n0} entries: {r1 / r0:.2f}x (flat: <= 1.2x)")


def device() -> None:
  import jax
  jax.config.update("jax_num_cpu_devices", 8)
  from c3l_jax import memory, sharding
  from c3l_jax.models.configs import CLIPVisionConfig, LlamaConfig, LlavaConfig
  from configs import llava15

  tiny = LlavaConfig(vision=CLIPVisionConfig(**{k: v for k, v in VISION_336.items()
                                                if k != "projection_dim"}),
                     text=LlamaConfig(**TEXT, head_dim=16))
  one_b = LlavaConfig(vision=CLIPVisionConfig(),  # CLIP ViT-L/14 at 336 px
                      text=LlamaConfig(vocab_size=32064, hidden_size=2048, intermediate_size=5632,
                                       num_hidden_layers=22, num_attention_heads=32,
                                       num_key_value_heads=4, head_dim=64,
                                       max_position_embeddings=2048))
  config = llava15.get_config("tiny")
  config.unlock()
  config.inference.mesh.update(data=2, fsdp=4, tensor=1)
  config.train.mesh.update(data=2, fsdp=4, tensor=1)
  config.data.batch_size = 8
  config.scoring.batch_size = 8
  config.train.batch_size = 8
  mesh = sharding.make_mesh(config.train.mesh)
  sizes = {a: mesh.shape[a] for a in sharding.MESH_AXES}
  print(f"\ndevice bytes per device, mesh {sizes}, fp32 (plan vs XLA memory_analysis, MiB)")
  print(f"{'model':<6}{'stage':<9}{'params':>9}{'optim':>9}{'kv':>9}{'activ':>9}{'plan':>9}{'xla':>9}"
        f"{'ratio':>7}")
  # float32: XLA:CPU has no bf16 dot, it converts bf16 weights to f32 copies (GPU / TPU do not).
  for name, arch in (("tiny", tiny), ("1B", one_b)):
    for stage in ("initial", "score", "train"):
      p = memory.plan(arch, config, (stage,), sizes).stages[0]
      start = time.perf_counter()
      x = memory.xla_bytes(stage, arch, config, mesh)
      mib = lambda b: f"{b / 2 ** 20:>9.1f}"  # noqa: E731
      print(f"{name:<6}{stage:<9}{mib(p.params)}{mib(p.optimizer)}{mib(p.kv_cache)}{mib(p.activations)}"
            f"{mib(p.total)}{mib(x)}{p.total / x:>7.2f}   ({time.perf_counter() - start:.0f} s to compile)",
            flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--small", type=int, default=500)
  parser.add_argument("--large", type=int, default=4000)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--curate_small", type=int, default=20_000)
  parser.add_argument("--curate_large", type=int, default=200_000)
  parser.add_argument("--skip_host", action="store_true")
  parser.add_argument("--skip_curate", action="store_true")
  parser.add_argument("--skip_device", action="store_true")
  args = parser.parse_args()
  if not args.skip_host:
    with tempfile.TemporaryDirectory() as root:
      model = build_model(root)
      host(root, model, [args.small, args.large], args.steps)
  if not args.skip_curate:
    with tempfile.TemporaryDirectory() as root:
      curate_stream(root, [args.curate_small, args.curate_large])
  if not args.skip_device:
    device()


if __name__ == "__main__":
  main()
