"""C3L training: loss goes down, CE-only equals a hand-written optax loop, frozen parts stay frozen,
8 devices equal 1, and a SIGKILLed run resumes bit-exactly."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import PIL.Image
import pytest
from flax import nnx

from c3l_jax import sharding
from c3l_jax import train as T
from c3l_jax.data.prompts import PromptBuilder, load_processor
from hf_reference import REPO, convert_cli, make_hf_llava, make_tiny_processor

QAS = [  # image, question, answer, i2c
    ("a.png", "what color is the circle?", "the circle is red", 0.9),
    ("a.png", "how many sides does a triangle have?", "three", 0.1),
    ("a.png", "is there a dog?", "no", 0.4),
    ("b.png", "where is the square?", "on the left", 0.7),
    ("b.png", "what is the sky?", "blue", 0.2),
    ("c.png", "describe the image", "a small green triangle above a car", 0.8),
    ("c.png", "what is a cat?", "an animal", 0.05),
    ("d.png", "what shape is red?", "the circle", 0.6),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp("train")
  make_hf_llava(str(root / "hf"))
  make_tiny_processor(str(root / "hf"))
  assert convert_cli(str(root / "hf"), str(root / "model")).returncode == 0
  (root / "images").mkdir()
  rng = np.random.default_rng(0)
  for name in "abcd":
    PIL.Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
        root / "images" / f"{name}.png")
  records = root / "records.jsonl"
  with open(records, "w") as f:
    for i, (img, q, a, s) in enumerate(QAS):
      f.write(json.dumps(dict(id=f"r{i}", image=img, question=q, answer=a, i2c=s)) + "\n")
  builder = PromptBuilder(load_processor(str(root / "model")), 127, 4)
  examples, groups = [], {}
  for img, q, a, s in QAS:
    prompt, target, sample, pixels = builder.encode_vigc(
        "conversation", q, a, PIL.Image.open(root / "images" / img).convert("RGB"))
    examples.append({"prompt": prompt, "target": target, "pixels": pixels})
    g = groups.setdefault(img, {"prompt": prompt, "pixels": pixels, "samples": [], "scores": []})
    g["samples"].append(sample)
    g["scores"].append(s)
  group_list = [dict(g, positive=int(np.argmax(g["scores"]))) for g in groups.values()]
  return dict(root=root, model=str(root / "model"), records=str(records), builder=builder,
              examples=examples, groups=group_list)


def _mesh(n=1):
  if n == 1:
    return sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  return sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})


def _trainer(world, mesh, checkpoint_dir=None, every=0, **kw):
  cfg = T.TrainConfig(**{"learning_rate": 1e-3, "steps": 4, "warmup_steps": 1, **kw})
  vlm = sharding.load_model(world["model"], mesh)
  return T.Trainer(T.Generator(vlm, rngs=nnx.Rngs(0)), mesh, cfg, checkpoint_dir, every)


def _batches(world, cfg, batch=4):
  return T.batch_fn(world["examples"], world["groups"], cfg, batch, 4, 3, world["builder"].pad_id, 0)


def test_training_lowers_the_combined_loss_and_respects_frozen_parts(world):
  trainer = _trainer(world, _mesh(), learning_rate=3e-3, steps=8, warmup_steps=0)
  before = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(trainer.model(), nnx.Param)))  # copies: the step donates
  total = nnx.jit(T.total_loss, static_argnames="cfg")  # one program, not an eager op at a time
  first = total(trainer.model(), jax.tree.map(jnp.asarray, _batches(world, trainer.cfg)(0)),
                cfg=trainer.cfg)[0]
  history = trainer.run(_batches(world, trainer.cfg))
  assert {"ce", "contrastive", "loss"} <= set(history[0])
  after = nnx.to_pure_dict(nnx.state(trainer.model(), nnx.Param))
  last = total(trainer.model(), jax.tree.map(jnp.asarray, _batches(world, trainer.cfg)(0)),
               cfg=trainer.cfg)[0]
  assert float(last) < float(first) - 0.05
  changed = lambda tree: any(np.abs(np.asarray(a) - np.asarray(b)).max() > 0
                             for a, b in zip(jax.tree.leaves(tree[0]), jax.tree.leaves(tree[1])))
  assert changed((before["vlm"]["language_model"], after["vlm"]["language_model"]))
  assert changed((before["vlm"]["multi_modal_projector"], after["vlm"]["multi_modal_projector"]))
  assert changed((before["head"], after["head"]))
  assert not changed((before["vlm"]["vision_tower"], after["vlm"]["vision_tower"]))


def test_contrastive_gradient_reaches_decoder_and_connector(world):
  trainer = _trainer(world, _mesh(), ce_weight=0.0, trainable=("connector", "decoder", "vision", "head"))
  batch = jax.tree.map(jnp.asarray, _batches(world, trainer.cfg)(0))

  def loss(params):
    return T.total_loss(nnx.merge(trainer.graphdef, params, trainer.frozen), batch, trainer.cfg)[0]

  grads = nnx.to_pure_dict(jax.jit(jax.grad(loss))(trainer.trainable))
  norm = lambda t: float(optax.tree.norm(t))
  assert norm(grads["vlm"]["language_model"]["layers"]) > 0
  assert norm(grads["vlm"]["multi_modal_projector"]) > 0
  assert norm(grads["head"]) > 0
  # The vision tower only feeds the anchor through the connector; with the default trainable set it is
  # frozen, i.e. not part of the differentiated state at all.
  default = _trainer(world, _mesh(), ce_weight=0.0)
  assert "vision_tower" not in nnx.to_pure_dict(default.trainable)["vlm"]


def test_ce_only_equals_hand_written_optax_loop(world):
  cfg_kw = dict(contrastive_weight=0.0, steps=3, warmup_steps=1, learning_rate=1e-3, grad_clip=1.0)
  trainer = _trainer(world, _mesh(), **cfg_kw)
  make = _batches(world, trainer.cfg)
  vlm = sharding.load_model(world["model"], _mesh())
  graphdef, params, frozen = nnx.split(T.Generator(vlm, rngs=nnx.Rngs(0)),
                                       T.trainable_filter(trainer.cfg.trainable), ...)
  schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 1, 3)
  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=1e-5))
  state = opt.init(params)

  def ce(params, batch):  # written from scratch: logits, log-softmax, masked mean over targets
    model = nnx.merge(graphdef, params, frozen)
    logits = model.vlm(batch["tokens"], batch["pixels"], batch["mask"])[:, :-1]
    logp = jax.nn.log_softmax(logits, -1)
    picked = jnp.take_along_axis(logp, batch["tokens"][:, 1:, None], -1)[..., 0]
    w = batch["weights"][:, 1:]
    return -jnp.sum(picked * w) / jnp.sum(w)

  for step in range(3):
    batch = jax.tree.map(jnp.asarray, make(step)["ce"])
    grads = jax.grad(ce)(params, batch)
    updates, state = opt.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  trainer.run(make)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-5),
               nnx.to_pure_dict(trainer.trainable), nnx.to_pure_dict(params))


def test_eight_devices_follow_the_single_device_trajectory(world):
  one = _trainer(world, _mesh(1), steps=3)
  eight = _trainer(world, _mesh(8), steps=3)
  h1, h8 = one.run(_batches(world, one.cfg)), eight.run(_batches(world, eight.cfg))
  for a, b in zip(h1, h8):
    for k in ("loss", "ce", "contrastive"):
      assert abs(a[k] - b[k]) < 1e-4 * max(1.0, abs(a[k]))


def test_non_finite_loss_stops_with_the_step(world):
  trainer = _trainer(world, _mesh(), steps=3)
  good = _batches(world, trainer.cfg)

  def poisoned(step):
    batch = good(step)
    if step == 1:
      batch["ce"]["pixels"] = batch["ce"]["pixels"] * np.nan
    return batch

  with pytest.raises(T.NonFiniteError, match="step 1"):
    trainer.run(poisoned)


def test_damaged_checkpoint_step_is_refused_then_resumed_from_the_step_before(world, tmp_path, monkeypatch):
  """A checkpoint step cut short after it was saved (a copy of the workdir that died): the resume
  refuses it with the file's name instead of restoring zeros or garbage; once the step is deleted, as
  the error says, the resume restores the step before exactly (its weights, step and history; what
  training then does from a restored step is the SIGKILL-resume tests' business). No training step
  runs here: the two steps' states are set by hand, so nothing is compiled. On the way, a save on a
  full disk fails naming the step and leaves no step behind."""
  from c3l_jax.data.records import BadInput

  ckpt = tmp_path / "checkpoints"
  saver = _trainer(world, _mesh(), str(ckpt), 1, steps=2)
  states = []
  for step in (1, 2):
    state = jax.tree.map(lambda x, step=step: np.asarray(x) + step, nnx.to_pure_dict(saver.trainable))
    nnx.replace_by_pure_dict(saver.trainable, state)
    saver.step, saver.history = step, [{"step": s, "loss": 10.0 - s} for s in range(1, step + 1)]
    saver.save()
    states.append(state)
  # A full disk at the next save (ENOSPC injected at the write site): the error names the step, and
  # no step 3 exists to be resumed from.
  monkeypatch.setenv("C3L_WRITE_FAULT", f"ENOSPC:{ckpt}/3")
  saver.step = 3
  with pytest.raises(OSError) as full:
    saver.save()
  assert full.value.errno == errno.ENOSPC and full.value.filename == str(ckpt / "3")
  monkeypatch.delenv("C3L_WRITE_FAULT")
  assert sorted(p for p in os.listdir(ckpt) if p.isdigit()) == ["1", "2"]
  files = json.loads((ckpt / "2" / T.STEP_MANIFEST).read_text())["files"]
  biggest = max(files, key=files.get)
  with open(ckpt / "2" / biggest, "r+b") as f:
    f.truncate(files[biggest] // 2)

  resumed = _trainer(world, _mesh(), str(ckpt), 1, steps=2)
  with pytest.raises(BadInput) as error:
    resumed.restore_latest()
  assert f"{ckpt / '2' / biggest} is {files[biggest] // 2} bytes" in str(error.value)
  assert f"delete {ckpt / '2'}" in str(error.value) and "resume from step 1" in str(error.value)
  shutil.rmtree(ckpt / "2")
  assert resumed.restore_latest() and resumed.step == 1
  assert resumed.history == [{"step": 1, "loss": 9.0}]
  got = nnx.to_pure_dict(resumed.trainable)
  for a, b in zip(jax.tree.leaves(states[0]), jax.tree.leaves(got)):
    np.testing.assert_array_equal(a, np.asarray(b))


def _launch(world, workdir, steps, every):
  """Start a training run; its output goes to a file (an unread pipe would fill up and block it)."""
  cmd = [sys.executable, "launch.py", "--config=configs/llava15.py:tiny", f"--workdir={workdir}",
         "--config.stages=train", f"--config.model.checkpoint={world['model']}",
         f"--config.data.records={world['records']}",
         f"--config.data.image_root={world['root'] / 'images'}", f"--config.train.steps={steps}",
         f"--config.train.checkpoint_every={every}", "--config.train.learning_rate=0.001",
         "--config.train.batch_size=2", "--config.select.top_fraction=0.5"]
  os.makedirs(workdir, exist_ok=True)
  log = open(os.path.join(workdir, "launch.log"), "a")
  return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})


def _wait(proc, workdir):
  proc.wait(timeout=600)
  return proc.returncode, (workdir / "launch.log").read_text()


def test_cgvlm_align_objective_trains_connector_and_temperature_only(world):
  builder = world["builder"]
  examples = [dict(e, caption=builder.encode_answer(a)) for e, (_, _, a, _) in zip(world["examples"], QAS)]
  cfg = T.TrainConfig(learning_rate=3e-3, steps=6, warmup_steps=0, objective="align",
                      trainable=("connector", "temperature"))
  vlm = sharding.load_model(world["model"], _mesh())
  trainer = T.Trainer(T.Generator(vlm, rngs=nnx.Rngs(0)), _mesh(), cfg)
  make = T.batch_fn(examples, [], cfg, 4, 4, 3, builder.pad_id, 0)
  batch0 = make(0)
  assert set(batch0) == {"ce", "align"}
  before = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(trainer.model(), nnx.Param)))
  first = float(T.total_loss(trainer.model(), jax.tree.map(jnp.asarray, batch0), cfg)[1]["alignment"])
  history = trainer.run(make)
  assert "alignment" in history[0] and "contrastive" not in history[0]
  last = float(T.total_loss(trainer.model(), jax.tree.map(jnp.asarray, batch0), cfg)[1]["alignment"])
  assert last < first
  after = nnx.to_pure_dict(nnx.state(trainer.model(), nnx.Param))
  moved = lambda a, b: any(np.abs(np.asarray(x) - np.asarray(y)).max() > 0
                           for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert moved(before["vlm"]["multi_modal_projector"], after["vlm"]["multi_modal_projector"])
  assert moved(before["temperature"], after["temperature"])
  for frozen in ("language_model", "vision_tower"):
    assert not moved(before["vlm"][frozen], after["vlm"][frozen])


def test_two_processes_match_one(world, tmp_path):
  """Two jax.distributed processes (4 CPU devices each, gloo collectives) = one 8-device process."""
  import random

  import ports

  data = {"pad_id": world["builder"].pad_id,
          "examples": [dict(e, pixels=e["pixels"].tolist()) for e in world["examples"]],
          "groups": [dict(g, pixels=g["pixels"].tolist(), scores=list(g["scores"]))
                     for g in world["groups"]]}
  (tmp_path / "data.json").write_text(json.dumps(data))
  reservation = ports.reserve(random.Random(os.urandom(8)).sample(range(20000, 60000), 200))
  port = reservation.port  # held until the workers exit: no other test takes it meanwhile
  worker = os.path.join(REPO, "tests", "dist_train_worker.py")
  procs = [subprocess.Popen([sys.executable, worker, str(i), str(port), world["model"],
                             str(tmp_path / "data.json"), str(tmp_path / "history.json")],
                            cwd=REPO, stdout=open(tmp_path / f"p{i}.log", "w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}) for i in range(2)]
  try:
    for i, p in enumerate(procs):
      assert p.wait(timeout=600) == 0, (tmp_path / f"p{i}.log").read_text()[-3000:]
  finally:
    reservation.release()
  two = json.loads((tmp_path / "history.json").read_text())
  one = _trainer(world, _mesh(8), steps=3).run(_batches(world, T.TrainConfig(steps=3)))
  assert len(two) == len(one) == 3
  for a, b in zip(one, two):
    for k in ("loss", "ce", "contrastive"):
      assert abs(a[k] - b[k]) < 1e-4 * max(1.0, abs(a[k])), (a, b)


def test_sigterm_saves_a_checkpoint_and_exits(world, tmp_path):
  work = tmp_path / "w"
  proc = _launch(world, work, 10_000, 10_000)  # no periodic save: only SIGTERM can write one
  log = work / "launch.log"
  run_log = work / "logs" / "run.log"  # the library's INFO lines ("train step ...") go to the run log
  deadline = time.time() + 600
  while "train step" not in (run_log.read_text() if run_log.exists() else ""):
    assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=600) == 143, log.read_text()[-3000:]
  saved = [int(p) for p in os.listdir(work / "train" / "checkpoints") if p.isdigit()]
  assert len(saved) == 1 and saved[0] >= 1
  assert "SIGTERM" in log.read_text()


def test_each_process_decodes_only_the_pictures_of_its_rows():
  """Every process lists every training record (selection needs every score), but `batch_fn` decodes
  pictures for its own block of the global batch only: over two simulated processes each picture of a
  one-process batch is decoded exactly once, by the process whose rows hold it."""
  cfg = T.TrainConfig(steps=1, warmup_steps=0)
  examples = [{"prompt": np.array([1, 2]), "target": np.array([3, 4]), "sample": np.array([3]),
               "image": f"im{i}", "id": f"r{i}"} for i in range(8)]
  groups = [{"prompt": np.array([1, 2]), "image": f"g{i}", "id": f"g{i}", "positive": 0,
             "samples": [np.array([3]), np.array([4, 5])]} for i in range(8)]

  def decoded(process):
    seen = []

    def pixels(image):
      seen.append(image)
      return np.zeros((3, 2, 2), np.float32)

    T.batch_fn(examples, groups, cfg, 4, 4, 3, 0, 0, process=process, pixels=pixels)(0)
    return seen

  one = decoded((0, 1))
  two = [decoded((0, 2)), decoded((1, 2))]
  assert len(one) == 8 and len(set(one)) == 8  # 4 CE rows + 4 contrastive anchors, each picture once
  assert all(len(seen) == 4 for seen in two)  # half of each batch per process
  assert sorted(two[0] + two[1]) == sorted(one)


class _SpyInference:
  """The initial stage's model, replaced by canned texts: records every prompt the stage generates
  from (token ids, and whether the image was given) and answers captions / QA per row."""

  def __init__(self, world, mode):
    import types
    self.config = types.SimpleNamespace(seed=0, strict=False, generation=types.SimpleNamespace(
        mode=mode, max_new_tokens=16, caption_max_new_tokens=8))
    self.builder, self.max_len = world["builder"], 10_000
    images = {n: PIL.Image.open(world["root"] / "images" / n).convert("RGB") for n in
              ("a.png", "b.png", "c.png")}
    self.source = types.SimpleNamespace(load=images.__getitem__)
    self.calls = []

  def generate(self, prompts, pixels, keys, max_new_tokens, expected=None):
    self.calls.append(([list(p) for p in prompts], pixels is not None))
    if max_new_tokens == self.config.generation.caption_max_new_tokens:
      return [f"the {c} circle is on the left" for c in ("red", "blue", "green")[:len(prompts)]], 0
    return [f"Question: what color is the circle {k}? Answer: the circle is red" for k in
            range(len(prompts))], 0


@pytest.mark.parametrize("mode", ["two_step", "direct"])
def test_as_generated_inputs_are_the_prompts_that_generated_each_sample(world, mode):
  """`train.inputs=as_generated`: every CE example's and contrastive anchor's prompt equals, token for
  token, the prompt the initial stage generated that sample from (a spy on its model records them);
  two-step data adds, once per selected image, the caption prompt -> the caption that QA was written
  from. `vigc` (today's reading) trains two-step samples on other prompts."""
  import types

  from c3l_jax.data.sources import ImageItem
  from c3l_jax.pipeline import initial
  from c3l_jax.pipeline import train as stage
  spy = _SpyInference(world, mode)
  items = [ImageItem(image=n, image_id=n[0]) for n in ("a.png", "b.png", "c.png")]
  jobs = initial.draw_jobs(items, 3, {"conversation": 0.5, "complex_reasoning": 0.5},
                           np.random.default_rng(0))
  rows, _, _ = initial.generate_jobs(spy, jobs, mode, "initial", 0)
  assert len(rows) == 9
  generated = spy.calls[-1]  # the QA step: one prompt per row, in row order
  assert generated[1] == (mode == "direct")
  for k, r in enumerate(rows):  # roles by hand: the first sample of each image is its positive
    r.update(i2c=1.0 - 0.1 * k, top_fraction=k < 5, role="positive" if k % 3 == 0 else "negative")
  builder = world["builder"]
  prompt = stage.prompt_encoder(builder, spy.source.load)

  def examples(inputs, anchor_instruction="positive"):
    config = types.SimpleNamespace(train=types.SimpleNamespace(
        inputs=inputs, anchor_instruction=anchor_instruction, max_negatives=4))
    return stage.c3l_examples(rows, config, builder, prompt)

  ce, groups = examples("as_generated")
  by_id = {e["id"]: e for e in ce}
  eos = list(builder.eos_ids)
  for k, r in enumerate(rows[:5]):
    assert list(by_id[r["id"]]["prompt"]) == generated[0][k], r["id"]
    assert (by_id[r["id"]]["image"] is not None) == (mode == "direct")
    assert list(by_id[r["id"]]["target"]) == builder.encode_answer(
        f"Question: {r['question']} Answer: {r['answer']}") + eos
  assert [g["id"] for g in groups] == [rows[0]["id"], rows[3]["id"], rows[6]["id"]]
  for g, k in zip(groups, (0, 3, 6)):
    assert list(g["prompt"]) == generated[0][k] and len(g["samples"]) == 3
  captions = sorted(i for i in by_id if i.endswith(":caption"))
  if mode == "two_step":
    caption_call = spy.calls[0]  # the caption step: one prompt per image, with the image
    assert caption_call[1] and captions == [rows[0]["id"] + ":caption", rows[3]["id"] + ":caption"]
    for name, k in zip(captions, (0, 1)):
      assert list(by_id[name]["prompt"]) == caption_call[0][k]
      assert list(by_id[name]["target"]) == builder.encode_answer(rows[3 * k]["caption"]) + eos
      assert by_id[name]["image"] == rows[3 * k]["image"]
    vigc, _ = examples("vigc")
    assert all(list(e["prompt"]) != generated[0][k] for k, e in enumerate(vigc))
  else:
    assert not captions and len(ce) == 5
  _, neutral = examples("as_generated", "neutral")  # one anchor prompt whatever the positive's type
  assert len({rows[k]["instruction_type"] for k in (0, 3, 6)}) > 1
  if mode == "direct":
    assert len({tuple(g["prompt"]) for g in neutral}) == 1
  assert all(list(n["prompt"]) != list(g["prompt"]) for n, g in zip(neutral, groups))


def test_a_batch_of_text_only_and_image_prompts_equals_its_rows_alone(world):
  """`arrange_pictures`: in a batch mixing prompts with and without the image (as_generated on
  two-step data), every image row reads its own picture: each row's input embeddings equal those of
  the row batched alone."""
  builder = world["builder"]
  root = world["root"] / "images"
  picture = {n: PIL.Image.open(root / n).convert("RGB") for n in ("a.png", "b.png")}
  answer = builder.encode_answer("the circle is red") + list(builder.eos_ids)
  rows = []
  for text, image in (("what is a cat?", None), ("what color is the circle?", "a.png"),
                      ("describe the image", None), ("where is the square?", "b.png")):
    ids, px = builder.encode_prompt(text, None if image is None else picture[image])
    rows.append({"prompt": ids, "target": answer, "image": image, "pixels": px})
  arranged = T.arrange_pictures(rows)
  assert [p and p["image"] for p in arranged] == ["a.png", "b.png", None, None]
  vlm = sharding.load_model(world["model"], _mesh())
  blank = lambda: np.zeros_like(rows[1]["pixels"])  # noqa: E731
  mixed = T.ce_batch(rows, builder.pad_id, pictures=arranged, blank=blank)
  assert np.array_equal(mixed["pixels"][1], rows[3]["pixels"]) and not mixed["pixels"][2].any()
  alone = [T.ce_batch([r], builder.pad_id, pictures=T.arrange_pictures([r]), blank=blank)
           for r in rows]
  # Each row's input embeddings (image features over its placeholders; the decoder then treats rows
  # independently) are the row's alone, and pictures in row order instead (the blank first) would
  # give row 1 the blank's features.
  embed = nnx.jit(lambda vlm, b: vlm.embed_image_and_text(b["tokens"], b["pixels"]))
  embed = lambda b, embed=embed: np.asarray(embed(vlm, jax.tree.map(jnp.asarray, b)))  # noqa: E731
  for i in range(4):
    width = alone[i]["tokens"].shape[1]
    np.testing.assert_allclose(embed(mixed)[i, :width], embed(alone[i])[0], rtol=1e-6, atol=1e-6)
  in_row_order = T.ce_batch(rows, builder.pad_id, pictures=[None, rows[1], None, rows[3]],
                            blank=blank)
  assert np.abs(embed(in_row_order)[1] - embed(mixed)[1]).max() > 1e-3


def test_generated_anchor_is_the_models_own_continuation_and_its_gradient_reaches_the_decoder(world):
  """`train.anchor=generated` (the paper's anchor data y): y is the greedy continuation of the anchor
  prompt that `sampling.generate` writes with the current parameters, h_y pools the decoder's hidden
  states teacher-forced on prompt + y, and the gradient of L_c reaches the decoder's layers through
  h_y (the samples' side only touches the embedding table), and the connector's through the image."""
  from c3l_jax import sampling
  builder = world["builder"]
  trainer = _trainer(world, _mesh(), ce_weight=0.0, anchor="generated", anchor_max_new_tokens=6,
                     eos_ids=tuple(builder.eos_ids))
  con = jax.tree.map(jnp.asarray, _batches(world, trainer.cfg)(0)["con"])
  assert int(con["anchor_mask"][0, 0]) == 0 or bool(con["anchor_mask"].all())  # left-padded
  model = trainer.model()
  y, lengths = sampling.generate(model.vlm, con["anchor_tokens"], con["anchor_mask"],
                                 con["anchor_pixels"], sampling.SamplingConfig(
                                     max_new_tokens=6, eos_ids=tuple(builder.eos_ids)))
  assert lengths.max() > 0

  host = jax.tree.map(np.asarray, con)

  def h_reference(vlm, head, g):  # one row alone, unpadded: prompt + y, pooled over y in numpy
    prompt = host["anchor_tokens"][g][host["anchor_mask"][g] > 0]
    seq = np.concatenate([prompt, y[g, :lengths[g]]])[None]
    x = vlm.embed_image_and_text(jnp.asarray(seq), con["anchor_pixels"][g:g + 1])
    positions, mask3 = T.positions_and_mask(None, seq.shape)
    hidden = vlm.language_model.decode_hidden(x, positions, mask3)[0][0, len(prompt):]
    return jnp.mean(jax.nn.relu(head(hidden)), axis=0)

  got = nnx.jit(T.anchor_representation, static_argnames="cfg")(model, con, cfg=trainer.cfg)
  assert all(lengths)  # every row has a y (else h_reference would average nothing)
  want = nnx.jit(lambda m: jnp.stack([h_reference(m.vlm, m.head, g) for g in range(len(y))]))(model)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)

  def loss(params):
    return T.contrastive_term(nnx.merge(trainer.graphdef, params, trainer.frozen), con, trainer.cfg)

  # y is generated under stop_gradient (reverse-mode through the decode loop would not even trace),
  # so what reaches the decoder's layers comes through the teacher-forced h_y.
  grads = nnx.to_pure_dict(jax.jit(jax.grad(loss))(trainer.trainable))
  assert float(optax.tree.norm(grads["vlm"]["language_model"]["layers"])) > 0
  assert float(optax.tree.norm(grads["vlm"]["multi_modal_projector"])) > 0


def test_decay_mask_exempts_what_transformers_trainer_exempts(world):
  """`train.decay_norms_and_biases=False`: the parameters left out of weight decay are transformers'
  `Trainer.get_decay_parameter_names` complement (LLaVA's trainer), counted over the whole model."""
  import torch
  import transformers

  hf = transformers.LlavaForConditionalGeneration.from_pretrained(str(world["root"] / "hf"))
  decayed = set(transformers.Trainer.get_decay_parameter_names(None, hf))
  hf_sizes = {n: p.numel() for n, p in hf.named_parameters()}
  hf_exempt = sum(s for n, s in hf_sizes.items() if n not in decayed)
  assert 0 < hf_exempt < sum(hf_sizes.values())
  state = nnx.to_pure_dict(nnx.state(sharding.load_model(world["model"], _mesh()), nnx.Param))
  mask, sizes = jax.tree.leaves(T.decay_mask(state)), [np.size(x) for x in jax.tree.leaves(state)]
  assert sum(sizes) == sum(hf_sizes.values())
  assert sum(s for m, s in zip(mask, sizes) if not m) == hf_exempt
  del torch

  # The optimizer applies it: with zero gradients only the decayed leaves move.
  params = {"norm": {"weight": jnp.ones(3)}, "proj": {"kernel": jnp.ones((3, 3)), "bias": jnp.ones(3)}}
  zeros = jax.tree.map(jnp.zeros_like, params)
  for exempt in (False, True):
    opt = T.make_optimizer(T.TrainConfig(learning_rate=0.1, weight_decay=0.5, warmup_steps=0, steps=10,
                                         decay_norms_and_biases=not exempt))
    updates, _ = opt.update(zeros, opt.init(params), params)
    moved = {k: {n: bool(np.any(np.asarray(u) != 0)) for n, u in v.items()} for k, v in updates.items()}
    assert moved == {"norm": {"weight": not exempt}, "proj": {"kernel": True, "bias": not exempt}}
