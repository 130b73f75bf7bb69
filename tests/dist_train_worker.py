"""One process of the two-process training test: `python dist_train_worker.py PID PORT MODEL OUT`.

Each process has 4 CPU devices; together they form the (data=2, fsdp=2, tensor=2) mesh and train
3 steps on the same data as the single-process test, each process building and feeding its half of every batch.
"""

import json
import sys

import jax

pid, port, model_dir, records_json, out = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                           process_id=int(pid))

import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax._src import distributed  # noqa: E402

from c3l_jax import sharding  # noqa: E402
from c3l_jax import train as T  # noqa: E402


def barrier(name: str) -> None:
  """Wait for the other process through the coordination service (10 min at most). gloo's own
  rendezvous, when a collective first runs, waits 30 s at most: on a busy machine one process can be
  further behind than that (still importing or compiling), so the processes meet here first."""
  distributed.global_state.client.wait_at_barrier(name, 600_000)


barrier("imported")

with open(records_json) as f:
  data = json.load(f)
examples = [dict(e, pixels=np.asarray(e["pixels"], np.float32)) for e in data["examples"]]
groups = [dict(g, pixels=np.asarray(g["pixels"], np.float32)) for g in data["groups"]]
mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
cfg = T.TrainConfig(learning_rate=1e-3, steps=3, warmup_steps=1)
trainer = T.Trainer(T.Generator(sharding.load_model(model_dir, mesh), rngs=nnx.Rngs(0)), mesh, cfg)
batches = T.batch_fn(examples, groups, cfg, 4, 4, 3, data["pad_id"], 0)
# Compile the step (into the persistent compilation cache the tests share) before its collectives run.
T.train_step.lower(trainer.graphdef, trainer.trainable, trainer.opt_state, trainer.frozen,
                   sharding.shard_batch(batches(0), mesh),
                   optimizer=trainer.optimizer, cfg=trainer.cfg).compile()
barrier("compiled")
history = trainer.run(batches)
if jax.process_index() == 0:
  with open(out, "w") as f:
    json.dump(history, f)
