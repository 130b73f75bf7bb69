"""Shared defaults for every c3l-jax config (see docs/design.md, "Configuration").

Every field has a typed default (no `None`), so `--config.a.b=v` overrides are parsed and
type-checked by ml_collections/absl: an unknown key or a value of the wrong type (`abc` for a float)
is rejected. Fields with a closed set of choices or a range are checked by
`c3l_jax.pipeline.check_config` before any device work; the choices are noted next to each field.
"""

from __future__ import annotations

import ml_collections


def get_model_config(family: str, arg: str, valid_args: tuple[str, ...]) -> ml_collections.ConfigDict:
  """The locked config of a model family's `configs/<family>.py:ARG`: `valid_args[0]` when ARG is empty.

  A full-size ARG (7b, 13b) computes in bfloat16 and loads the parameters in bfloat16 (the train stage
  keeps its trainable ones in `train.param_dtype`, fp32 master weights); inference shards a replica
  over `fsdp` when one does not fit a device (`inference.auto_mesh`), training shards the parameters
  (`train.mesh`: data=1, fsdp=2, tensor=-1): one 24 GB GPU runs 7B inference, four 16 GB chips 13B,
  eight 40 GB GPUs train 7B at batch 2; `python -m c3l_jax.memory` / `launch.py --dry_run` print the
  plan (docs/memory.md). `tiny` (a small random / test checkpoint on CPU) gets small batches and short
  runs."""
  arg = (arg or valid_args[0]).strip().lower()
  if arg not in valid_args:
    raise ValueError(f"unknown arg {arg!r} (valid: {', '.join(valid_args)})")
  config = get_base_config()
  config.model.family = family
  if arg != "tiny":
    config.model.dtype = "bfloat16"
    config.model.param_dtype = "bfloat16"
    config.train.mesh.data = 1  # batch 2 splits over 2 fsdp shards; the rest of the devices: tensor
    config.train.mesh.fsdp = 2
    config.train.mesh.tensor = -1
  else:
    config.data.batch_size = 2
    config.data.eval_batch_size = 2
    config.scoring.batch_size = 2
    config.generation.max_new_tokens = 16
    config.generation.num_final = 8
    config.train.batch_size = 2
    config.train.steps = 4
    config.train.checkpoint_every = 2
  config.lock()
  return config


def get_base_config() -> ml_collections.ConfigDict:
  """The unlocked base config; `configs/<name>.py:get_config()` specialise and lock it."""
  config = ml_collections.ConfigDict()

  # Comma-separated subset of: initial, filter, score, select, train, final, export, eval.
  # Stages always run in that pipeline order, whatever order they are listed in.
  config.stages = "initial,filter,score,select,train,final,export"
  config.seed = 0
  config.strict = False  # True: fail on the first bad input instead of quarantining it.
  # SIGTERM (a preemption notice: GCE gives 30 s, SLURM --signal) outside training: every process stops
  # at its next shard boundary, or abandons the shard in hand after this many seconds; exit 143.
  config.preemption_grace_s = 20.0
  # Several processes (docs/multihost.md). `--config.distributed=True` is short for
  # `--config.distributed.enabled=True`: jax.distributed.initialize() finds the cluster (TPU pod slice,
  # SLURM, Open MPI); the fields below override what it finds.
  config.distributed = ml_collections.ConfigDict()
  config.distributed.enabled = False
  config.distributed.coordinator_address = ""  # host:port of process 0; '' = from the cluster
  config.distributed.num_processes = 0  # 0 = from the cluster
  config.distributed.process_id = -1  # -1 = from the cluster
  config.distributed.initialization_timeout_s = 300  # how long processes wait for each other to start
  config.distributed.heartbeat_timeout_s = 100  # a process silent this long is dead: the job aborts
  config.distributed.shutdown_timeout_s = 300  # how long a leaving process waits for the others
  # Comma-separated modules imported before the config is checked: testbeds that register their own
  # data sources and eval benchmarks (c3l_jax.registry), e.g. "c3l_jax.scenes" (data.source=scenes).
  config.plugins = ""

  config.model = ml_collections.ConfigDict()
  config.model.family = "llava15"  # llava15 | minigpt4 | qwen25vl
  config.model.checkpoint = ""  # project model directory (c3l_model.json + params/); '' = none
  config.model.dtype = "float32"  # compute dtype: float32 | bfloat16 | float16
  config.model.param_dtype = "float32"  # float32 | bfloat16 | float16
  config.model.scan_layers = True
  config.model.remat = False
  config.model.attention = "xla"  # auto | xla | cudnn | splash (c3l_jax/models/attention.py)
  # Variable-resolution families (qwen25vl): each picture is resized to an area between these (in
  # pixels; 28 x 28 pixels make one image token), which bounds its image tokens; 0 = the checkpoint's
  # preprocessor_config.json values (3,136 and 12,845,056 for Qwen2.5-VL). Not `data.max_pixels`, the
  # quarantine limit on decoded pictures.
  config.model.min_pixels = 0
  config.model.max_pixels = 0

  # Device meshes: axis sizes, -1 = the rest of the devices (at most one axis per mesh).
  # Inference stages (initial, score, final, eval, ...) load one model replica per process on a mesh of
  # that process's *local* devices; replicas on different hosts take different shards of the data.
  config.inference = ml_collections.ConfigDict()
  config.inference.mesh = ml_collections.ConfigDict()
  config.inference.mesh.data = -1
  config.inference.mesh.fsdp = 1
  config.inference.mesh.tensor = 1
  # When the device memory is known (device_memory_gb, or the backend's): replace the mesh above by the
  # one the memory plan picks (one replica per device when it fits, else the smallest fsdp that does;
  # c3l_jax.memory.choose_inference_mesh). launch.py turns it off when --config.inference.mesh.* is
  # given; a config file that fixes its mesh sets it False.
  config.inference.auto_mesh = True
  # Memory of one device in GiB for the memory plan (c3l_jax.memory): a run that does not fit stops
  # before any device work; 0 = what the backend reports (GPU / TPU), no check where it reports none.
  config.device_memory_gb = 0.0

  config.data = ml_collections.ConfigDict()
  config.data.records = ""  # JSONL records (see docs/design.md, "Records")
  config.data.image_root = ""  # record `image` paths are relative to this directory
  # A dataset file's image path that leaves image_root (`../`, absolute, a symlink out of it) is
  # quarantined with a reason, so a dataset cannot make the tool read arbitrary files; True reads it.
  config.data.allow_outside_root = False
  config.data.coco_dir = ""  # COCO 2014 root laid out as the official download (tfds manual dir)
  # Where images come from: records (data.records + data.image_root) | coco (data.coco_dir) | a source
  # registered by a plugin (scenes: the synthetic world, data.scenes_*, with plugins="c3l_jax.scenes");
  # '' = coco if coco_dir is set, else records.
  config.data.source = ""
  config.data.split = "train"  # tfds split of coco / scenes: train | val
  config.data.tfds_dir = ""  # where tfds prepares coco / scenes; '' = ~/tensorflow_datasets
  config.data.max_images = 0  # images the initial / final stages draw from; 0 = all
  # Read by the scenes testbed's source (c3l_jax.scenes), when data.source=scenes:
  config.data.scenes_images = 300  # size of the synthetic scenes world (train split), >= 1
  config.data.scenes_seed = 0
  config.data.image_aspect = "resize"  # resize | pad (LLaVA-1.5's expand2square, image-mean border)
  config.data.max_pixels = 64_000_000  # larger images are quarantined before decoding
  config.data.image_cache = 64  # decoded pictures each process keeps (LRU); 0 = none
  config.data.batch_size = 8  # prompts per generation batch
  config.data.eval_batch_size = 8

  config.generation = ml_collections.ConfigDict()
  # initial stage: two_step (caption the image, then the decoder alone writes QA from the caption) |
  # direct (image + VIGC instruction -> "Question: ... Answer: ...").
  config.generation.mode = "two_step"
  config.generation.final_mode = "two_step"  # the final stage's mode (same choices; the paper's, Sec. 4)
  config.generation.per_image = 3  # QA samples generated per image in the initial stage
  # QA pairs each initial prompt asks for; every pair parsed from the answer becomes a sample (the
  # paper's instructions ask for several: "Generate five in-depth reasoning questions ..."). 1 = one
  # pair, the first parsed.
  config.generation.qa_per_prompt = 1
  # The initial stage's sampling (captions and QA); -1 = generation.temperature / generation.top_p.
  config.generation.initial_temperature = -1.0
  config.generation.initial_top_p = -1.0
  # Instruction types and their proportions (normalised).
  config.generation.instruction_mix = "conversation=0.5,detailed_description=0.25,complex_reasoning=0.25"
  config.generation.caption_max_new_tokens = 64  # step 1 of two_step
  config.generation.shard_size = 64  # images (initial) / samples (final) per output shard
  config.generation.score_final = True  # the final stage scores its data's S(I2C) with the base model
  config.generation.max_new_tokens = 256
  config.generation.temperature = 0.0  # 0 = greedy
  config.generation.top_p = 1.0
  config.generation.top_k = 0  # 0 = off
  config.generation.num_final = 5000
  config.generation.prompt_bucket = 64  # prompts are padded to a multiple of this many tokens
  # continuous: a finished row's slot takes the next prompt at once (sampling.generate_many) | static:
  # batches of data.batch_size prompts, each decoding until its longest row ends. Same outputs.
  config.generation.batching = "continuous"

  config.scoring = ml_collections.ConfigDict()
  config.scoring.mode = "eq1"  # eq1 | full_kl
  config.scoring.length_norm = False
  config.scoring.batch_size = 8  # QA rows per device batch
  config.scoring.prefix_sharing = True  # one KV cache per image's shared prefix (equal to naive)
  config.scoring.shard_size = 512  # records per output shard (the unit of resumption)

  config.filter = ml_collections.ConfigDict()
  config.filter.min_question_words = 3
  config.filter.max_question_words = 60
  config.filter.min_answer_words = 1
  config.filter.max_answer_words = 300
  config.filter.near_duplicate = 0.8  # word-set Jaccard of two questions of one image at/over this = dup
  config.filter.caption_overlap = 0.9  # answer/caption similarity at/over this = repeats the caption

  config.select = ml_collections.ConfigDict()
  config.select.method = "i2c"  # i2c (the paper's CRM selection)
  config.select.top_fraction = 0.1  # in (0, 1]

  # The curate stage (configs/curate.py): S(I2C) of an existing LLaVA-format dataset (data.records),
  # its top entries exported verbatim (c3l_jax/pipeline/curate.py). The fraction is select.top_fraction.
  config.curate = ml_collections.ConfigDict()
  config.curate.format = "auto"  # auto (from the file's first character) | json (one array) | jsonl
  config.curate.top_count = 0  # > 0: keep this many entries instead of select.top_fraction of them
  config.curate.rank_by = "sum"  # sum (eq. 1 over all a conversation's answer tokens) | per_token
  config.curate.balance_sources = False  # rank within each source (first directory of the image path)
  config.curate.keep_text_only = True  # text-only entries (no image, no score) go to selected.json
  config.curate.shard_size = 256  # entries per output shard (the unit of resumption)

  config.train = ml_collections.ConfigDict()
  config.train.objective = "c3l"  # c3l | vlit | align
  config.train.optimizer = "adamw"  # adamw
  config.train.learning_rate = 2e-5
  config.train.weight_decay = 1e-5
  # Decay biases and norm weights too (True) or exempt them, as LLaVA's trainer does (False).
  config.train.decay_norms_and_biases = True
  config.train.batch_size = 2  # global: split over the processes (and the mesh's data x fsdp devices)
  config.train.steps = 1000
  config.train.warmup_steps = 0
  config.train.grad_clip = 1.0  # global-norm clip
  config.train.grad_accum = 1
  config.train.ce_weight = 1.0
  config.train.contrastive_weight = 1.0
  config.train.tau = 0.1
  # Eq. 3's denominator: "all" (positive + negatives, InfoNCE) or "negatives" (eq. 3 as printed).
  config.train.contrastive_denominator = "all"
  # What each example is trained with (docs/pipeline.md, "Readings of the paper"): vigc (image + the
  # VIGC instruction of the sample's type -> "Question: q Answer: a") | as_generated (the prompt that
  # produced the sample, as the initial stage recorded it; two-step data also trains the caption step
  # on the captions its selected samples were written from).
  config.train.inputs = "vigc"
  # The anchor h_y of eq. 3: prompt (hidden states over image + instruction) | generated (the paper's:
  # y generated by the current model without gradient, h_y over the decoder teacher-forced on y).
  config.train.anchor = "prompt"
  # The anchor's instruction: positive (the positive sample's own prompt) | neutral (one that names no
  # instruction type, so the loss cannot fall by matching the type).
  config.train.anchor_instruction = "positive"
  config.train.anchor_max_new_tokens = 32  # the longest generated anchor y (anchor=generated)
  config.train.max_negatives = 4
  config.train.checkpoint_every = 500
  config.train.trainable = ("connector", "decoder")  # regexes over parameter paths
  # The training mesh spans every device of every process.
  config.train.mesh = ml_collections.ConfigDict()
  config.train.mesh.data = -1
  config.train.mesh.fsdp = 1
  config.train.mesh.tensor = 1
  # dtype of the trainable parameters in the train stage (the master weights AdamW updates); the frozen
  # ones stay in model.param_dtype.
  config.train.param_dtype = "float32"

  # The eval stage (README, "Evaluation"): the model on the paper's benchmarks (Table 1).
  config.eval = ml_collections.ConfigDict()
  # '' = WORKDIR/train/generator when the train stage exported one, else model.checkpoint.
  config.eval.checkpoint = ""
  config.eval.benchmarks = "pope"  # comma list of: pope, seed, mmbench, llava_bench
  # POPE questions: official files (*pope_{random,popular,adversarial}.json) if set; else built from
  # POPE-format annotations ({"image", "objects"} per line) if set; else from the data source's val split.
  config.eval.pope_questions_dir = ""
  config.eval.pope_annotations = ""
  config.eval.pope_images = ""  # folder of the POPE images ('' = the data source, e.g. COCO val2014)
  config.eval.pope_num_images = 500  # images drawn (0 = every eligible image)
  config.eval.pope_objects = 3  # present (= absent) objects asked per image
  config.eval.seed_bench_json = ""  # SEED-Bench.json (v1)
  config.eval.seed_bench_images = ""  # its image folder (SEED-Bench-image/)
  config.eval.mmbench_tsv = ""  # MMBench dev TSV (mmbench_dev_20230712.tsv / MMBench_DEV_EN.tsv)
  config.eval.llava_bench_dir = ""  # llava-bench-in-the-wild folder (questions.jsonl, images/)
  config.eval.mc_mode = "loglik"  # loglik (option likelihood, SEED's protocol) | generate (a letter)
  config.eval.max_items = 0  # questions per benchmark (per POPE split); 0 = all
  config.eval.max_new_tokens = 128  # POPE answers and generated letters
  config.eval.long_max_new_tokens = 1024  # LLaVA-Bench answers

  # The `ablation` stage (the paper's Table 4): each row's data fine-tunes a fresh copy of the
  # student (VLIT) for `vlit_steps`, then `benchmarks` evaluate it.
  config.ablation = ml_collections.ConfigDict()
  config.ablation.vlit_steps = 100
  config.ablation.vlit_learning_rate = 1e-4
  config.ablation.benchmarks = "pope"
  config.ablation.seeds = 1  # every row per seed; the table shows mean±95 % interval over them
  config.ablation.seed_keys = "seed"  # config fields that seed k moves by k (comma list)
  config.ablation.variants = "final_mode,length_norm"  # extra C3L rows (c3l_jax/pipeline/ablation.py)
  # The model each row's data fine-tunes (the paper fine-tunes LLaVA-7B on the generated data): a
  # model directory, e.g. a student that has not seen instruction data; "" = `model.checkpoint`.
  config.ablation.student = ""
  # The student's own instruction data, mixed into every fine-tune as LLaVA's fine-tunes keep their
  # own instruction mix (the paper's student, LLaVA-7B, already follows instructions): "" = none (each
  # row fine-tunes on its generated data alone; the reference row is the student as it is); a records
  # file (JSON lines `id`, `image`, `question`, `answer`; images from the data source, as
  # `data.records`); or the name of a data source that builds it from its ground truth (`scenes`:
  # `c3l_jax/scenes/student.py`, written per seed to WORKDIR/ablation/seed<k>/student_data.jsonl).
  # With it the reference row is the student fine-tuned on its own data alone for the same steps.
  config.ablation.student_data = ""
  # The fraction of every fine-tune's records drawn from `student_data` (in [0, 1); 0 < share when
  # student_data is set): a row with N generated records trains on them plus round(N * share /
  # (1 - share)) records of a seeded order of the student's data (c3l_jax/pipeline/ablation.py: mix).
  config.ablation.student_data_share = 0.5
  # Steps of instruction tuning the student gets on all of `student_data` (VLIT, at
  # `student_learning_rate`) before the seed's fine-tunes start from it (once per seed, in
  # WORKDIR/ablation/seed<k>/student/): a student that has never answered a question does not learn to
  # within a short fine-tune, however its records are mixed. 0 = none (the fine-tunes start from
  # `ablation.student` itself).
  config.ablation.student_steps = 0
  config.ablation.student_learning_rate = 1e-3

  return config
