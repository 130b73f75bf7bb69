"""One process of the two-process training test: `python dist_train_worker.py PID PORT MODEL OUT`.

Each process has 4 CPU devices; together they form the (data=2, fsdp=2, tensor=2) mesh and train
3 steps on the same data as the single-process test, each process feeding its half of every batch.
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

from c3l_jax import sharding  # noqa: E402
from c3l_jax import train as T  # noqa: E402

with open(records_json) as f:
  data = json.load(f)
examples = [dict(e, pixels=np.asarray(e["pixels"], np.float32)) for e in data["examples"]]
groups = [dict(g, pixels=np.asarray(g["pixels"], np.float32)) for g in data["groups"]]
mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
cfg = T.TrainConfig(learning_rate=1e-3, steps=3, warmup_steps=1)
trainer = T.Trainer(T.Generator(sharding.load_model(model_dir, mesh), rngs=nnx.Rngs(0)), mesh, cfg)
history = trainer.run(T.batch_fn(examples, groups, cfg, 4, 4, 3, data["pad_id"], 0))
if jax.process_index() == 0:
  with open(out, "w") as f:
    json.dump(history, f)
