"""Tiny random MiniGPT-4 sources (BLIP-2, Llama + tokenizer, llama_proj) and a torch reference.

The reference (`TorchMiniGPT4`) composes transformers' modules the way MiniGPT-4's `encode_img` and
`get_context_emb` do (minigpt4/models/minigpt4.py, minigpt_base.py): `Blip2VisionModel` (its output is
`ln_vision(visual_encoder(image))`), `Blip2QFormerModel` over the learned `query_tokens`, `nn.Linear`
`llama_proj` and `LlamaForCausalLM` fed `inputs_embeds`; prompts are split at `<ImageHere>` and tokenized
segment by segment (BOS on the first only) from the *strings*, independently of `c3l_jax.data.prompts`.
"""

from __future__ import annotations

import os

import numpy as np

from hf_reference import TINY_TEXT

TINY_EVA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                image_size=28, patch_size=14)
# 3 layers: cross-attention in layers 0 and 2 (frequency 2), none in layer 1.
TINY_QFORMER = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                    vocab_size=32, max_position_embeddings=8, cross_attention_frequency=2)
NUM_QUERY = 4
VOCAB = TINY_TEXT["vocab_size"]
STOP = "###"
VICUNA_TEMPLATE = "###Human: {} ###Assistant: "
LLAMA2_TEMPLATE = "[INST] {} [/INST] "
IMAGE = "<Img><ImageHere></Img>"

_CORPUS = """###Human: ###Assistant: <Img> </Img> [INST] [/INST] Human Assistant what color is the circle
square triangle red blue green yellow how many objects are there in on of left right describe image small
large one two three four next to and a the it this where dog cat car tree sky is there yes no Question
Answer picture above below which why because""".split()


def _perturb(module, seed: int) -> None:
  """Random init leaves norms at 1, biases and query tokens at 0: perturb every parameter."""
  import torch

  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.add_(0.02 * torch.randn(p.shape, generator=g))


def make_hf_blip2(path: str, seed: int = 0):
  """A random `Blip2ForConditionalGeneration` (tiny OPT language model) saved under `path`."""
  import torch
  from transformers import Blip2Config, Blip2ForConditionalGeneration, OPTConfig

  torch.manual_seed(seed)
  opt = OPTConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                  word_embed_proj_dim=16, max_position_embeddings=32)
  cfg = Blip2Config(vision_config=dict(TINY_EVA), qformer_config=dict(TINY_QFORMER),
                    text_config=opt.to_dict(), num_query_tokens=NUM_QUERY)
  model = Blip2ForConditionalGeneration(cfg).eval()
  _perturb(model, seed)
  model.save_pretrained(path)
  return model


def make_tiny_tokenizer(path: str, vocab_size: int = VOCAB):
  """A Llama-like (Metaspace BPE, `<s>` prefix) tokenizer of exactly `vocab_size` ids whose corpus holds
  MiniGPT-4's template words; "###" is one token (like SentencePiece's "▁###"). Saved under `path`."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  from transformers import PreTrainedTokenizerFast

  specials = ["<unk>", "<s>", "</s>", "<pad>"]
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Metaspace()
  tok.decoder = decoders.Metaspace()
  sentences = [" ".join(_CORPUS[i:i + 7]) for i in range(0, len(_CORPUS), 3)] * 4
  tok.train_from_iterator(sentences, trainers.BpeTrainer(vocab_size=vocab_size - 1,
                                                         special_tokens=specials))
  tok.add_tokens([STOP])
  tok.add_tokens([f"<extra_{i}>" for i in range(vocab_size - tok.get_vocab_size())])
  assert tok.get_vocab_size() == vocab_size
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                     special_tokens=[("<s>", 1)])
  tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                      unk_token="<unk>", pad_token="<pad>")
  tokenizer.save_pretrained(path)
  return tokenizer


def make_hf_llama(path: str, seed: int = 1, logit_scale: float = 1.0):
  """A random `LlamaForCausalLM` (tiny, untied head scaled by `logit_scale`), not yet saved."""
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM

  torch.manual_seed(seed)
  model = LlamaForCausalLM(LlamaConfig(**TINY_TEXT)).eval()
  _perturb(model, seed)
  with torch.no_grad():
    model.lm_head.weight.mul_(logit_scale)
  os.makedirs(path, exist_ok=True)
  return model


def make_llama_proj(in_features: int, seed: int = 2):
  import torch

  torch.manual_seed(seed)
  return torch.nn.Linear(in_features, TINY_TEXT["hidden_size"]).eval()


def save_llama_proj(linear, path: str) -> None:
  """As MiniGPT-4 releases it: a `.pth` `{"model": {"llama_proj.weight", "llama_proj.bias"}}` (plus
  unrelated entries), or `.safetensors` with the two tensors."""
  import torch

  state = {"llama_proj.weight": linear.weight.detach().clone(),
           "llama_proj.bias": linear.bias.detach().clone()}
  if path.endswith(".safetensors"):
    from safetensors.torch import save_file
    save_file(state, path)
  else:
    torch.save({"model": state, "epoch": 4, "config": {"arch": "mini_gpt4"}}, path)


class TorchMiniGPT4:
  """MiniGPT-4's forward from transformers modules (see the module docstring)."""

  def __init__(self, blip2, llama, proj, tokenizer, qformer: bool = True, merge: int = 4):
    self.blip2, self.llama, self.proj, self.tokenizer = blip2, llama, proj, tokenizer
    self.qformer, self.merge = qformer, merge

  def encode_img(self, pixels: np.ndarray, interpolate: bool = False):
    """`[N, C, H, W]` -> `llama_proj` outputs `[N, n, D]` (torch), as `MiniGPT4.encode_img`."""
    import torch

    with torch.no_grad():
      return self.proj(self.visual_features(pixels, interpolate))

  def visual_features(self, pixels: np.ndarray, interpolate: bool = False):
    """`[N, C, H, W]` -> what `llama_proj` takes `[N, n, F]`: the frozen part of `encode_img`."""
    import torch

    with torch.no_grad():
      px = torch.as_tensor(np.asarray(pixels, np.float32))
      emb = self.blip2.vision_model(pixel_values=px, interpolate_pos_encoding=interpolate).last_hidden_state
      if self.qformer:
        queries = self.blip2.query_tokens.expand(emb.shape[0], -1, -1)
        out = self.blip2.qformer(query_embeds=queries, encoder_hidden_states=emb,
                                 encoder_attention_mask=torch.ones(emb.shape[:-1], dtype=torch.long))
        feats = out.last_hidden_state
      else:
        feats = emb[:, 1:, :]
        b, n, d = feats.shape
        feats = feats.reshape(b, n // self.merge, d * self.merge)
      return feats

  def context_emb(self, prompt: str, pixels: np.ndarray | None = None, interpolate: bool = False):
    """MiniGPT-4's `get_context_emb`: `[1, T, D]` from the prompt string and one image."""
    import torch

    segments = prompt.split("<ImageHere>")
    assert len(segments) == (1 if pixels is None else 2)
    embed = self.llama.get_input_embeddings()
    with torch.no_grad():
      parts = []
      for i, seg in enumerate(segments):
        ids = self.tokenizer(seg, add_special_tokens=i == 0).input_ids
        parts.append(embed(torch.as_tensor([ids])))
        if i == 0 and pixels is not None:
          parts.append(self.encode_img(pixels[None], interpolate))
      return torch.cat(parts, dim=1)

  def teach(self, examples: list[tuple[str, np.ndarray | None, list[int]]], steps: int = 60,
            lr: float = 3e-3) -> float:
    """Fine-tune `llama` and `llama_proj` in place (the ViT and Q-Former stay frozen, as MiniGPT-4
    trains), full-batch Adam on the CE of each example's target ids after its prompt string (with one
    image `[C, H, W]` at `<ImageHere>`, or none), the prompt embedded as `context_emb` does. Returns the
    last loss."""
    import torch

    embed = self.llama.get_input_embeddings()
    rows = []
    for prompt, pixels, target in examples:
      segments = prompt.split("<ImageHere>")
      ids = [torch.as_tensor(self.tokenizer(seg, add_special_tokens=i == 0).input_ids, dtype=torch.long)
             for i, seg in enumerate(segments)]
      feats = None if pixels is None else self.visual_features(pixels[None])[0]
      rows.append((ids, feats, torch.as_tensor(target, dtype=torch.long)))
    params = list(self.llama.parameters()) + list(self.proj.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
      seqs, labels = [], []
      for ids, feats, target in rows:
        parts = [embed(ids[0])] + ([self.proj(feats)] if feats is not None else [])
        parts += [embed(seg) for seg in ids[1:]]
        n_ctx = sum(p.shape[0] for p in parts)
        seqs.append(torch.cat(parts + [embed(target)]))
        labels.append(torch.cat([torch.full((n_ctx,), -100), target]))
      width = max(len(s) for s in seqs)
      emb = torch.stack([torch.nn.functional.pad(s, (0, 0, 0, width - len(s))) for s in seqs])
      lab = torch.stack([torch.nn.functional.pad(y, (0, width - len(y)), value=-100) for y in labels])
      mask = torch.stack([torch.arange(width) < len(s) for s in seqs]).long()
      loss = self.llama(inputs_embeds=emb, attention_mask=mask, labels=lab).loss
      opt.zero_grad()
      loss.backward()
      opt.step()
    return float(loss.detach())

  def answer_logprobs(self, prompt: str, answer: list[int], pixels: np.ndarray | None):
    import torch

    ctx = self.context_emb(prompt, pixels)
    with torch.no_grad():
      ans = self.llama.get_input_embeddings()(torch.as_tensor([answer]))
      logits = self.llama(inputs_embeds=torch.cat([ctx, ans], dim=1)).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    start = ctx.shape[1]
    rows = logp[start - 1:start - 1 + len(answer)]
    return rows[torch.arange(len(answer)), torch.as_tensor(answer)].numpy()

  def i2c(self, question: str, answer: str, pixels: np.ndarray, template: str = VICUNA_TEMPLATE) -> dict:
    """S(I2C) (eq. 1), logp_image, logp_text with and without `<Img><ImageHere></Img> `."""
    ids = self.tokenizer(answer, add_special_tokens=False).input_ids
    lv = self.answer_logprobs(template.format(f"{IMAGE} {question}"), ids, pixels)
    ld = self.answer_logprobs(template.format(question), ids, None)
    return dict(i2c=float(np.sum(np.exp(lv) * (lv - ld))), logp_image=float(lv.sum()),
                logp_text=float(ld.sum()), n_tokens=len(ids))

  def greedy(self, prompt: str, pixels: np.ndarray, max_new: int, stops: list[list[int]],
             eos: int) -> tuple[list[int], np.ndarray]:
    """Greedy decoding with full recomputation, stopping on EOS or a stop id sequence (MiniGPT-4's
    `StoppingCriteriaSub`); returns the tokens (the stop included) and each step's logits `[n, V]`."""
    import torch

    ctx = self.context_emb(prompt, pixels)
    out: list[int] = []
    steps = []
    with torch.no_grad():
      for _ in range(max_new):
        ans = self.llama.get_input_embeddings()(torch.as_tensor([out], dtype=torch.long))
        logits = self.llama(inputs_embeds=torch.cat([ctx, ans], dim=1)).logits[0, -1]
        steps.append(logits.numpy())
        out.append(int(logits.argmax()))
        if out[-1] == eos or any(out[-len(s):] == list(s) for s in stops):
          break
    return out, np.stack(steps)

  def logits_from_ids(self, tokens: np.ndarray, mask: np.ndarray, pixels: np.ndarray,
                      image_id: int, interpolate: bool = False) -> np.ndarray:
    """Logits `[B, T, V]` of left-padded token rows whose `image_id` runs take the image features
    (row b's run <- image b), positions counting real tokens only."""
    import torch

    with torch.no_grad():
      ids = torch.as_tensor(np.where(tokens == image_id, 0, tokens), dtype=torch.long)
      emb = self.llama.get_input_embeddings()(ids)
      feats = self.encode_img(pixels, interpolate)
      for b in range(tokens.shape[0]):
        where = np.flatnonzero(tokens[b] == image_id)
        emb[b, torch.as_tensor(where)] = feats[b]
      positions = np.maximum(np.cumsum(mask, axis=-1) - 1, 0)
      out = self.llama(inputs_embeds=emb, attention_mask=torch.as_tensor(mask, dtype=torch.long),
                       position_ids=torch.as_tensor(positions, dtype=torch.long))
    return out.logits.float().numpy()


def make_sentencepiece_llama_tokenizer(path: str) -> dict[str, int]:
  """A Llama-style SentencePiece BPE `tokenizer.model` (byte fallback, ids 0-2 = unk/s/</s>, identity
  normaliser with a dummy prefix) + a `LlamaTokenizer` config saved under `path`, as Vicuna ships it.

  Like Llama's vocabulary it holds "▁###" (835), "##" (2277) and "#" (29937) but no word-internal "###",
  so "###" alone is one token and after a word two: MiniGPT-4's stop list `[[835], [2277, 29937]]`.
  Returns the ids of those three pieces.
  """
  import io
  import json
  import random

  import sentencepiece as spm
  from sentencepiece import sentencepiece_model_pb2

  words = "what color is the circle square red blue dog cat how many objects there are in image".split()
  rng = random.Random(0)
  lines = []
  for _ in range(300):
    q = " ".join(rng.choice(words) for _ in range(5))
    lines += [f"###Human: {q} ###Assistant: {q}###", f"## {q} # {q}"]
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, model_type="bpe",
                                 vocab_size=340, byte_fallback=True, character_coverage=1.0, unk_id=0,
                                 bos_id=1, eos_id=2, pad_id=-1, minloglevel=2, hard_vocab_limit=False)
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(buf.getvalue())
  pieces = [p.piece for p in proto.pieces]
  assert {"##", "#", "▁###"} <= set(pieces), pieces
  if "###" in pieces:  # Llama's merges never form a word-internal "###"
    del proto.pieces[pieces.index("###")]
  score = min(p.score for p in proto.pieces)
  for piece in ("▁#", "▁##"):  # the merges that lead to "▁###" once "###" is gone
    if piece not in pieces:
      score -= 1
      proto.pieces.add(piece=piece, score=score, type=sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL)
  proto.normalizer_spec.name = "identity"
  proto.normalizer_spec.precompiled_charsmap = b""
  proto.normalizer_spec.remove_extra_whitespaces = False
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "tokenizer.model"), "wb") as f:
    f.write(proto.SerializeToString())
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump(dict(tokenizer_class="LlamaTokenizer", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                   add_bos_token=True, add_eos_token=False, model_max_length=2048), f)
  ids = {p.piece: i for i, p in enumerate(proto.pieces)}
  return {k: ids[k] for k in ("▁###", "##", "#")}
