"""Train the shipped scenes generator and student from scratch: `python -m c3l_jax.scenes.pretrain`.

The scenes testbed's own command (`c3l_jax/scenes/pretrain.py`; this file is its default `--config`),
not a pipeline stage. The defaults are the grounded recipe (`c3l_jax/scenes/grounded.py`) with the
shipped generator's settings (docs/scenes.md: the word-rule grounding probe on layer 1, the offset and
referent probes on layer 2, the answer probe on layer 3, background questions, the background head, 11000
steps): build the world's processor and a random tiny LLaVA-1.5 (transformers, then
`c3l_jax.convert`), a supervised vision tower (stage 0), a frozen random connector, the student (decoder
on captions only, exported to `grounded.student_out`, default `checkpoints/scenes_student`) and the
generator (the instruction mix; `pretrain.out`, default `checkpoints/scenes_tiny`), each with its
`training_metrics.json`. 47 minutes on the 2-core machine (docs/scenes.md). `recipe="mix"` is the old recipe
(CG-VLM alignment, captioning, instruction tuning: the shipped model before 2026-12-03, with
`num_scenes=3000 vision_hidden=96 vision_layers=3 eval_scenes=96`).
`--config.pretrain.grounded.steps=...` etc. override any field below.
"""

from __future__ import annotations

import ml_collections

from configs import common


def get_pretrain_section() -> ml_collections.ConfigDict:
  """The `config.pretrain` defaults (the recipe of the shipped checkpoint)."""
  p = ml_collections.ConfigDict()
  p.out = "checkpoints/scenes_tiny"  # the final model directory (replaced)
  # The world trained on: scenes 0..num_scenes-1 of `world_seed` (the scenes demo uses seed 0: disjoint);
  # held-out evaluation scenes are the next `eval_scenes` of the same seed.
  p.num_scenes = 10000
  p.world_seed = 1000
  p.eval_scenes = 48
  p.eval_max_new_tokens = 128
  p.eval_sampled = False  # also measure temperature-1 sampling (the pipeline decodes greedily)
  # Architecture (LLaVA-1.5 layout: CLIP ViT, feature layer -2, 2-layer MLP projector, Llama).
  # 72 px / patch 24: the processor resizes the 64 px scenes to 72 px, so each of the 3 x 3 patches is
  # one cell of the world's grid (9 image tokens).
  p.image_size = 72
  p.patch_size = 24
  p.vision_hidden = 128
  p.vision_layers = 4
  p.vision_heads = 4
  p.text_hidden = 128
  p.text_layers = 4
  p.text_heads = 4
  p.text_intermediate = 352
  p.max_position_embeddings = 512
  # Stage 1: CG-VLM alignment: align_ce_weight x captioning CE + align_weight x the contrastive
  # alignment of pooled projected patches with caption token embeddings. CG-VLM trains the connector
  # of a pretrained CLIP; this vision tower is random, so it is aligned too. With align_ce_weight=0 the
  # decoder (random, frozen here) is not run: a step costs the vision tower only.
  p.align_steps = 600
  p.align_batch_size = 64
  p.align_lr = 2e-3
  p.align_weight = 1.0
  p.align_ce_weight = 0.0
  p.align_trainable = ("connector", "vision")
  p.caption_examples_per_scene = 3
  # Stage 1b: captioning CE (+ caption_align_weight x alignment) with connector, vision tower and
  # decoder trained: the from-scratch decoder learns to read the image on data where every content
  # word depends on it, before the instruction mix (where most tokens do not) can teach it to ignore it.
  p.caption_steps = 300
  p.caption_lr = 2e-3
  p.caption_align_weight = 0.1
  # Stage 2: instruction tuning (CE).
  p.tune_steps = 600
  p.batch_size = 32
  p.tune_lr = 2e-3
  p.weight_decay = 0.01
  p.warmup_steps = 30
  p.tune_trainable = ("connector", "decoder", "vision")
  # The mix. Every text_every-th step is a text-only batch (0 = never): QA-from-caption and generic chat
  # examples, weighted w_caption_qa / w_chat. Other steps are, with probability p_detail, a batch of VIGC
  # detailed_description samples, else a short image batch mixing captions, VIGC conversation /
  # complex_reasoning samples, VQA and generic questions about an image (w_caption / w_vigc / w_vqa /
  # w_generic_image). Batches are padded to a fixed length per kind (three compiled shapes).
  p.w_caption = 1.0
  p.w_vigc = 2.0
  p.w_vqa = 2.0
  p.w_generic_image = 0.3
  p.p_detail = 0.1
  p.text_every = 4
  p.w_caption_qa = 3.0
  p.w_chat = 1.0
  p.seq_image = 64
  p.seq_detail = 160
  p.seq_text = 112
  p.p_generic = 0.45  # share of generic QA in the VIGC and QA-from-caption data (the language prior)
  p.p_short = 0.5  # share of VQA asked with LLaVA's short-answer suffix
  p.checkpoint_every = 200
  # The recipe: "mix" (the stages above) or "grounded" (`c3l_jax.scenes.grounded`: supervised vision
  # tower, frozen random connector, decoder trained on cached image tokens; the section below).
  p.recipe = "grounded"
  p.grounded = get_grounded_section()
  return p


def get_grounded_section() -> ml_collections.ConfigDict:
  """`config.pretrain.grounded`: the grounded recipe's settings (used when `pretrain.recipe="grounded"`;
  the architecture and the world are the fields above)."""
  g = ml_collections.ConfigDict()
  g.student_out = "checkpoints/scenes_student"  # "" = not exported
  g.eval_start_id = 100_000  # held-out scenes: world_seed, ids from here (the training ids are below)
  # Stage 0: the supervised vision tower (c3l_jax.scenes.vision).
  g.vision_steps = 2000
  g.vision_batch_size = 128
  g.vision_lr = 3e-3
  g.vision_eval_scenes = 200  # held-out probe accuracy (scenes of world_seed + 1)
  g.vision_background = True  # also a head for the scene's background colour (captions name it)
  g.image_token_scale = 1.0  # image-token norm / word-embedding norm after the connector's rescale
  # The decoder (tower and connector frozen, image tokens cached).
  g.student_steps = 800  # captions only: the student
  g.steps = 11000  # the instruction mix: the generator
  g.batch_size = 32
  g.lr = 2e-3
  g.warmup_steps = 200
  g.weight_decay = 0.01
  # Batch kinds (each padded to its seq_<kind>): every text_every-th step `text` (QA-from-caption /
  # chat), else `detail` (VIGC detailed descriptions) with probability p_detail, `image` (captions /
  # VIGC conversation + complex_reasoning) with probability p_image, else `ground` (VQA / balanced
  # existence / generic questions about the image). Within a kind, tasks are drawn with the w_* weights.
  g.text_every = 6
  g.p_detail = 0.05
  g.p_image = 0.25
  # With uniform VQA kinds, count / existence were learnt and position / relation stayed at the prior,
  # so the VQA draws favour position, and relations also come balanced (yes / no 1/2 each: w_relation).
  # Colour questions (binding a colour to the named shape) and shape questions are drawn more often
  # because they were the kinds that missed their thresholds next (docs/scenes.md).
  g.w_vqa = 4.0
  g.vqa_kind_weights = (2.5, 2.0, 0.7, 3.0, 1.0, 0.5)  # colour, shape, count, position, relation, existence
  g.w_existence = 1.0
  g.w_relation = 1.5
  g.w_generic_image = 0.2
  g.w_background = 0.5  # "what colour is the background ?" (`grounded.background_qa`; captions name it)
  # `ground` batches (VQA, existence, relations) before step `until` draw only scenes with at most
  # `max_objects` objects: pairs (max_objects, until), e.g. ((1, 300), (2, 800)). () = off. (On one-object
  # scenes the decoder learns to read a referent's cell in ~200 steps, on all scenes hardly at all; but a
  # curriculum over the first 2500 steps of the mix did not carry that over: docs/scenes.md.)
  g.curriculum = ()
  g.w_caption = 5.5
  g.w_vigc = 1.0
  g.w_caption_qa = 3.0
  g.w_chat = 1.0
  g.seq_ground = 40
  g.seq_image = 56
  g.seq_detail = 144
  g.seq_text = 112
  g.p_generic = 0.45  # generic share of the VIGC samples
  # ... and of the QA-from-caption (two-step) samples: greedy decoding picks one mode per prompt type,
  # and at 0.45 the two-step outputs were 0 % generic while VIGC's were 85 %.
  g.p_generic_caption_qa = 0.65
  g.p_short = 0.7
  # The grounding probe (`grounded.grounding_probe_loss`, recipe only, not exported): at the words that
  # refer to objects in a sequence with an image (`probe_rule`), a linear probe on layer `probe_layer`'s
  # attention values predicts the referent's cell, weighted `probe_weight` beside the CE (0 = off).
  g.probe_weight = 2.0
  g.probe_layer = 1
  g.probe_rule = "word"  # the labels (`grounded.PhraseCells`): "phrase" (the referent) or "word"
  # The offset probe (`grounded.offset_labels`, recipe only, not exported): at the head noun of a phrase
  # naming one object after another such phrase, a linear probe on layer `offset_probe_layer`'s attention
  # values predicts where the earlier object lies relative to this one (row and column differences: the
  # relations), weighted `offset_probe_weight` (0 = off).
  g.offset_probe_weight = 1.0
  g.offset_probe_layer = 2
  # The referent probe: cells by the phrase rule ("the large star" is the one large star) on layer
  # `referent_probe_layer`, weighted `referent_probe_weight` (0 = off), beside the word-rule probe above.
  g.referent_probe_weight = 1.0
  g.referent_probe_layer = 2
  # The answer probe (`grounded.answer_labels`): at the prompt's last token of a VQA question about one
  # object, a linear probe on layer `answer_probe_layer`'s attention values predicts that object's cell,
  # weighted `answer_probe_weight` (0 = off).
  g.answer_probe_weight = 1.0
  g.answer_probe_layer = 3
  g.eval_every = 1000  # quick held-out VQA + POPE check (0 = none)
  g.eval_quick_scenes = 24
  return g


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  if arg:
    raise ValueError(f"takes no arg, got {arg!r}")
  config = common.get_base_config()
  config.command = "python -m c3l_jax.scenes.pretrain [--config=configs/scenes_pretrain.py]"
  config.model.family = "llava15"
  config.model.checkpoint = ""  # the stage builds its own model
  config.pretrain = get_pretrain_section()
  config.lock()
  return config
