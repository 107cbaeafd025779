"""CoCa: Contrastive Captioners (Yu et al. 2022, arXiv:2205.01917). One image-text model, two
losses: a contrastive one between pooled image and text embeddings, as CLIP, and a captioning one,
as SimVLM. The text side is one decoder cut in two: a unimodal half encodes the caption alone (a
CLS appended after it gives the text embedding); a multimodal half cross-attends to the image and
predicts the caption. Attentional poolers (learned queries over the ViT's tokens) pool the image.

The paper, in this file:
    Fig. 2, Sec. 3.2   image encoder, attentional poolers, two text decoders   CoCa
    Sec. 3.2           attentional pooling (one query: the image embedding)    AttentionalPooler
    Fig. 2             unimodal decoder + CLS ("unpad cls_token_id")           CoCa.text_features
    Fig. 2             the CLS's attention mask                                cls_attention_mask
    Sec. 3.2           multimodal decoder: self-, then cross-attention         MultimodalDecoder
    Sec. 3.1-3.2       L_Con, the contrastive loss                             contrastive_loss
    Sec. 3.1-3.2       L_Cap, next-token cross-entropy (teacher forcing)       caption_loss
    Sec. 3.2           L = lambda_Con L_Con + lambda_Cap L_Cap                 compute_losses
    Sec. 4             zero-shot retrieval and classification, captions        evaluate, generate
    FLIP (Li et al. 2023, arXiv:2212.00794), --patch-dropout P --unmasked-steps N   main

Module names follow open_clip's `coca_ViT-B-32`, whose weights load (common/weights/coca.py);
`--pooler paper` gives the paper's two poolers. Differences from open_clip: docs/coca.md.

    python coca_train.py                                    # tiny built-in data, CPU, a few minutes
    torchrun --nproc_per_node 8 coca_train.py --preset coca-vit-b-32 --train-data train.json \\
        --val-data coco_val.json --zeroshot-data imagenet/val --output-dir runs/coca
    python coca_train.py --preset coca-vit-b-32 --task caption --init-from CoCa-ViT-B-32/ \\
        --train-data coco_train.json --val-data coco_val.json      # COCO caption fine-tuning
    python coca_train.py --preset coca-vit-b-32 --init-from open_clip_pytorch_model.bin \\
        --eval-only --val-data coco_test.json                      # zero-shot retrieval + captions
"""
import json
import math
import os
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as grad_checkpoint

from common import dist
from common.config import BaseConfig, resolve_config
from common.data import contrastive_data, load_tokenizer, retrieval_texts, run_text_clean
from common.encoders import Attention, Block, KVCache, MLP, TextTransformer, VisionTransformer
from common.export import export_source
from common.generation import beam_search, greedy_or_sample
from common.metrics import (caption_metrics, embed_images, embed_texts, retrieval_metrics,
                            zeroshot_classifier_sharded, zeroshot_metrics)
from common.run import (end_epoch, epochs, eval_only, finish, log_train, open_log, optimizer_step,
                        start_run, step_done)
from common.utils import (FeatureCache, MicroBatch, Preemption, UserError, adamw, autocast, cli,
                          first_nonfinite_module, param_groups, precision_dtype, resolve_precision,
                          seed_everything, sync_gradients)
from common.weights import coca as coca_weights


# ---- model ----

class AttentionalPooler(nn.Module):
    """Sec. 3.2: n learned queries attend to the encoder's tokens (multi-head attention, Lee et al.
    2019), with a LayerNorm on the queries and one on the keys. q projects (D, D), k and v (Dv, D):
    the keys come in the ViT's width. The queries are the same for every image: projected once."""

    def __init__(self, dim, context_dim, heads, n_queries, eps=1e-5):
        super().__init__()
        assert dim % heads == 0, f"pooler width {dim} is not divisible by {heads} heads"
        self.heads = heads
        self.query = nn.Parameter(torch.randn(n_queries, dim))
        self.ln_q = nn.LayerNorm(dim, eps=eps)
        self.ln_k = nn.LayerNorm(context_dim, eps=eps)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        for lin in (self.q, self.kv):      # nn.MultiheadAttention's init: xavier, zero biases
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x):                                              # (B, S, Dv) -> (B, n, D)
        (B, S, _), (n, D), H = x.shape, self.query.shape, self.heads
        q = self.q(self.ln_q(self.query)).view(n, H, D // H).transpose(0, 1)     # (H, n, D/H), once
        k, v = self.kv(self.ln_k(x)).view(B, S, 2, H, D // H).permute(2, 0, 3, 1, 4)
        q = q.expand(B, -1, -1, -1).to(k.dtype)
        out = F.scaled_dot_product_attention(q, k, v)                            # (B, H, n, D/H)
        return self.proj(out.transpose(1, 2).reshape(B, n, D))


class CrossAttentionBlock(nn.Module):
    """A multimodal decoder layer's second half: pre-LN cross-attention to the image tokens (their
    own LayerNorm `ln_1_kv`), then an MLP: x + attn(ln_1 x, ln_1_kv image), x + mlp(ln_2 x)."""

    def __init__(self, dim, heads, context_dim, mlp_ratio=4.0, act="gelu", eps=1e-5):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=eps)
        self.ln_1_kv = nn.LayerNorm(context_dim, eps=eps)
        self.attn = Attention(dim, heads, kv_dim=context_dim)
        self.ln_2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio), act)

    def forward(self, x, image, cache=None):
        # Generation: the image's keys and values are projected at the first step and kept.
        context = None if cache is not None and "kv" in cache else self.ln_1_kv(image)
        x = x + self.attn(self.ln_1(x), context=context, cache=cache)
        return x + self.mlp(self.ln_2(x))


class MultimodalDecoder(nn.Module):
    """Sec. 3.2, the multimodal text decoder: each layer a causal self-attention block and a
    cross-attention block, each with its MLP (open_clip's layout: docs/coca.md), then a final
    LayerNorm and a projection to the vocabulary, not tied to the token embedding."""

    def __init__(self, width, layers, heads, context_dim, vocab_size, mlp_ratio=4.0, act="gelu",
                 eps=1e-5):
        super().__init__()
        self.resblocks = nn.ModuleList(Block(width, heads, mlp_ratio=mlp_ratio, act=act, eps=eps)
                                       for _ in range(layers))
        self.cross_attn = nn.ModuleList(CrossAttentionBlock(width, heads, context_dim, mlp_ratio,
                                                            act, eps) for _ in range(layers))
        self.ln_final = nn.LayerNorm(width, eps=eps)
        self.text_projection = nn.Parameter(width ** -0.5 * torch.randn(width, vocab_size))  # x @ P
        self.grad_checkpointing = False
        # CLIP's init (std width^-1/2, residual projections scaled by (2 layers)^-1/2)
        attn_std, proj_std = width ** -0.5, width ** -0.5 * (2 * layers) ** -0.5
        fc_std = (2 * width) ** -0.5
        for b in list(self.resblocks) + list(self.cross_attn):
            qkv = [b.attn.qkv] if isinstance(b, Block) else [b.attn.q, b.attn.kv]
            for lin, std in [(lin, attn_std) for lin in qkv] + [
                    (b.attn.proj, proj_std), (b.mlp.fc, fc_std), (b.mlp.proj, proj_std)]:
                nn.init.normal_(lin.weight, std=std)
                nn.init.zeros_(lin.bias)

    def forward(self, x, image, caches=None):                 # (B, L, D), (B, N, E) -> (B, L, D)
        """`caches`: the layers' {"self", "cross"} dicts of a KVCache (generation), or None."""
        for i, (block, cross) in enumerate(zip(self.resblocks, self.cross_attn)):
            if caches is not None:
                x = block(x, causal=True, cache=caches[i]["self"])
                x = cross(x, image, cache=caches[i]["cross"])
            elif self.grad_checkpointing and self.training:
                x = grad_checkpoint(block, x, None, True, use_reentrant=False)
                x = grad_checkpoint(cross, x, image, use_reentrant=False)
            else:
                x = cross(block(x, causal=True), image)
        return self.ln_final(x)


def cls_attention_mask(ids, pad_id, legacy=False):
    """Keys each position of [tokens, CLS] may attend to besides the causal mask, (B, 1, 1, L + 1):
    the paper's "unpad cls_token_id" (Fig. 2): the CLS, last, sees every real token and itself, no
    padding. `legacy`, (B, 1, L + 1, L + 1): the mask of open_clip's weights (docs/coca.md): the
    CLS row's padding mask shifted by one (it sees the first padding token, not itself)."""
    keep = ids != pad_id                                               # (B, L)
    cls = keep.new_ones(keep.shape[0], 1)
    if not legacy:
        return torch.cat([keep, cls], 1)[:, None, None, :]
    rows = keep.new_ones(keep.shape[0], keep.shape[1] + 1, keep.shape[1] + 1)
    rows[:, -1] = torch.cat([cls, keep], 1)                            # the CLS's row only
    return rows[:, None]


class CoCa(nn.Module):
    """Fig. 2: image encoder + attentional pooling, unimodal text decoder with an appended CLS,
    multimodal text decoder, and a learned temperature. Module names are those of open_clip's
    published files (`visual`, `text`, `text_decoder`, `logit_scale`)."""

    def __init__(self, cfg, *, pad_id, eos_id):
        super().__init__()
        self.cfg, self.pad_id = cfg, pad_id
        for name, width, heads in (("vision", cfg.vision_width, cfg.vision_heads),
                                   ("text", cfg.text_width, cfg.text_heads),
                                   ("pooler", cfg.embed_dim, cfg.pooler_heads)):
            if heads < 1 or width % heads:
                raise UserError(f"{name} width {width} is not divisible by {heads} heads")
        # Image encoder (Sec. 3.2): all ViT tokens, without a final norm (the pooler norms its keys)
        eps, E = cfg.layer_norm_eps, cfg.embed_dim
        self.visual = VisionTransformer(image_size=cfg.image_size, patch_size=cfg.patch_size,
                                        width=cfg.vision_width, layers=cfg.vision_layers,
                                        heads=cfg.vision_heads, mlp_ratio=cfg.mlp_ratio,
                                        act=cfg.act, eps=eps, pre_norm=True, post_norm=False,
                                        patch_dropout=cfg.patch_dropout)
        Dv, heads = cfg.vision_width, cfg.pooler_heads
        self.attn_pool = AttentionalPooler(E, Dv, heads, cfg.n_queries, eps)
        self.ln_post = nn.LayerNorm(E, eps=eps)
        if cfg.pooler == "paper":     # a separate single-query pooler for the contrastive embedding
            self.attn_pool_contrastive = AttentionalPooler(E, Dv, heads, 1, eps)
            self.ln_post_contrastive = nn.LayerNorm(E, eps=eps)
        elif cfg.pooler != "open_clip":
            raise UserError(f"--pooler must be open_clip or paper, not {cfg.pooler!r}")
        self.proj = nn.Parameter(Dv ** -0.5 * torch.randn(E, E))                        # x @ P
        # Unimodal text decoder (Sec. 3.2): CLIP's causal text transformer, one more position for
        # the CLS appended after the caption; its final-norm state, projected: the text embedding
        self.text = TextTransformer(vocab_size=cfg.vocab_size, width=cfg.text_width,
                                    context_length=cfg.context_length + 1, layers=cfg.text_layers,
                                    heads=cfg.text_heads, eos_id=eos_id, mlp_ratio=cfg.mlp_ratio,
                                    act=cfg.act, eps=eps)
        self.cls_emb = nn.Parameter(0.01 * torch.randn(cfg.text_width))
        self.text_projection = nn.Parameter(cfg.text_width ** -0.5 * torch.randn(cfg.text_width, E))
        # Multimodal text decoder: reads the unimodal token states, attends to the image tokens
        self.text_decoder = MultimodalDecoder(cfg.text_width, cfg.decoder_layers, cfg.text_heads, E,
                                              cfg.vocab_size, cfg.mlp_ratio, cfg.act, eps)
        # Temperature as a log-scale, initialised to 1/0.07 (CLIP), clamped at 100 after each step
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def set_grad_checkpointing(self, enabled=True):
        self.visual.transformer.grad_checkpointing = enabled
        self.text.transformer.grad_checkpointing = enabled
        self.text_decoder.grad_checkpointing = enabled

    def image_features(self, images):   # (B, 3, H, W) -> (B, E) contrastive, (B, N, E) decoder's
        x = self.visual(images)                                         # (B, 1 + P, Dv)
        if self.cfg.pooler == "paper":
            tokens = self.ln_post(self.attn_pool(x))                                     # (B, n, E)
            image_emb = self.ln_post_contrastive(self.attn_pool_contrastive(x))[:, 0]    # (B, E)
        else:   # one pooler: its first query is the contrastive embedding, the rest the decoder's
            x = self.ln_post(self.attn_pool(x))                                          # (B, n, E)
            image_emb, tokens = x[:, 0], x[:, 1:]
        return image_emb @ self.proj, tokens

    def text_features(self, ids):           # (B, L) -> (B, E) contrastive, (B, L, D) token states
        """Unimodal text decoder with the CLS appended after the caption (Fig. 2). The CLS always
        takes the last position embedding: trailing padding is irrelevant (see trim_padding)."""
        B, L = ids.shape
        if L > self.cfg.context_length:
            raise ValueError(f"text of {L} tokens is longer than the context of "
                             f"{self.cfg.context_length}")
        t = self.text
        x = t.token_embedding(ids) + t.positional_embedding[:L]
        cls = (self.cls_emb + t.positional_embedding[-1]).expand(B, 1, -1)
        x = torch.cat([x, cls], 1)                                                   # (B, L + 1, D)
        mask = cls_attention_mask(ids, self.pad_id, legacy=self.cfg.cls_mask == "legacy")
        x = t.transformer(x, mask=mask, causal=True)
        # The CLS's state is normalised alone; the token states go to the decoder before ln_final.
        return t.ln_final(x[:, -1]) @ self.text_projection, x[:, :-1]

    def encode_image(self, images, normalize=True):
        x = self.image_features(images)[0]
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, ids, normalize=True):
        x = self.text_features(ids)[0]
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, images, ids, positions=None):
        """Normalised contrastive embeddings, the logit scale, and the captioning logits: the
        decoder reads tokens [0, L-1) and predicts [1, L) (teacher forcing), at the flat target
        `positions` (caption_positions) or, None, at all: (B, L-1, V)."""
        image_emb, image_tokens = self.image_features(images)
        text_emb, token_states = self.text_features(ids)
        h = self.text_decoder(token_states[:, :-1], image_tokens)                    # (B, L-1, D)
        if positions is not None:               # project only the positions that have a target
            h = h.flatten(0, 1).index_select(0, positions)                           # (n, D)
        logits = h @ self.text_decoder.text_projection
        image_emb, text_emb = F.normalize(image_emb, dim=-1), F.normalize(text_emb, dim=-1)
        return image_emb, text_emb, self.logit_scale.exp(), logits

    def decode(self, ids, image_tokens, cache=None):
        """Next-token logits (B, L, V) of the caption prefix `ids` (the tokens after the cached ones
        with a KVCache): both decoders, no CLS (a causal token never sees it)."""
        t = self.text
        offset = cache.length if cache is not None else 0
        if offset + ids.shape[1] > self.cfg.context_length:
            raise ValueError(f"caption of {offset + ids.shape[1]} tokens exceeds the context of "
                             f"{self.cfg.context_length}")
        x = t.token_embedding(ids) + t.positional_embedding[offset: offset + ids.shape[1]]
        n = len(t.transformer.resblocks)
        x = t.transformer(x, causal=True,
                          caches=None if cache is None else [c["self"] for c in cache.layers[:n]])
        h = self.text_decoder(x, image_tokens, caches=None if cache is None else cache.layers[n:])
        if cache is not None:
            cache.length += ids.shape[1]
        return h @ self.text_decoder.text_projection

    @torch.no_grad()
    def generate(self, images, *, sot_id, eos_id, sample=False, num_beams=6, max_length=30,
                 min_length=5, top_p=0.9, top_k=0, repetition_penalty=1.0, image_tokens=None,
                 use_cache=True):
        """Captions (B, T) from [SOT], padded after [EOT]: beam search, greedy (num_beams=1) or
        nucleus sampling (common/generation.py); lengths count [SOT]. `use_cache`: a step feeds the
        new token only (the image's keys and values projected once); False recomputes the prefix."""
        image_tokens = self.image_features(images)[1] if image_tokens is None else image_tokens
        B = image_tokens.shape[0]
        prompt = torch.full((B, 1), sot_id, dtype=torch.long, device=image_tokens.device)
        if use_cache:
            def step(tokens, cache):
                return self.decode(tokens, image_tokens, cache)[:, -1].float(), cache
            layers = len(self.text.transformer.resblocks) + len(self.text_decoder.resblocks)
            cache, reorder = KVCache(layers), None
        else:
            def step(tokens, seqs):                                # the cache is the token history
                seqs = tokens if seqs is None else torch.cat([seqs, tokens], 1)
                context = image_tokens.repeat_interleave(seqs.shape[0] // B, 0)  # beams: (B*K, ...)
                return self.decode(seqs, context)[:, -1].float(), seqs
            cache, reorder = None, (lambda seqs, index: seqs[index])
        lengths = dict(max_length=max_length, min_length=min_length, eos_id=eos_id,
                       pad_id=self.pad_id, repetition_penalty=repetition_penalty)
        if sample or num_beams == 1:
            return greedy_or_sample(step, prompt, cache, sample=sample, top_p=top_p, top_k=top_k,
                                    **lengths)
        return beam_search(step, prompt, cache, reorder, num_beams=num_beams, **lengths)

    @classmethod
    def from_open_clip(cls, path, config=None, *, pad_id=0, eos_id=49407, cls_mask="legacy",
                       state=None):
        """Build from open_clip's CoCa weights, every key mapped and shape-checked: `path`, a
        weights file or hub folder; `config`, a preset, an open_clip config JSON or None (the
        folder's); `state`, the file's state dict if read already (common/weights/coca.py)."""
        state = state if state is not None else coca_weights.read_open_clip_state(path)
        arch = coca_weights.open_clip_architecture(state, config, path, PRESETS)
        cfg = Config(preset="open_clip", **arch, pad_id=pad_id, cls_mask=cls_mask)
        model = cls(cfg, pad_id=pad_id, eos_id=eos_id)
        coca_weights.load_open_clip(model, state, path)
        return model


# ---- losses ----

def contrastive_loss(image_emb, text_emb, logit_scale):
    """Sec. 3.2, L_Con: symmetric InfoNCE between the pooled image and CLS text embeddings (as
    clip_train.py): each rank's B images against all N texts and its B texts against all N
    images, labels offset by rank*B; the gather carries gradient (with DDP: the N x N loss's)."""
    all_images = dist.gather_with_grad(image_emb)                   # (N, E)
    all_texts = dist.gather_with_grad(text_emb)                     # (N, E)
    logits_per_image = logit_scale * image_emb @ all_texts.T        # (B, N)
    logits_per_text = logit_scale * text_emb @ all_images.T         # (B, N)
    B = image_emb.shape[0]
    labels = torch.arange(B, device=image_emb.device) + B * dist.rank()
    return (F.cross_entropy(logits_per_image, labels)
            + F.cross_entropy(logits_per_text, labels)) / 2


def caption_positions(ids, pad_id):
    """Flat indices into the (B, L-1) teacher-forcing targets ids[:, 1:] that are not padding, and
    their targets; on the host, before the copy to the GPU: selecting them needs no device sync."""
    targets = ids[:, 1:].reshape(-1)
    positions = (targets != pad_id).nonzero()[:, 0]
    return positions, targets[positions]


def caption_loss(logits, targets, device, count=None):
    """Sec. 3.2, L_Cap: cross-entropy of the next caption token (logits (n, V) at the non-padding
    positions), the token mean over the global batch: each rank divides its sum by the global count
    / world size, so DDP's average is one process's mean whatever the ranks' caption lengths.
    `count`: the global count when it spans more than these logits (a step's micro-batches)."""
    if count is None:
        count = dist.all_reduce_sum(torch.tensor(float(len(targets)), device=device))
    loss_sum = F.cross_entropy(logits.float(), targets, reduction="sum")
    return loss_sum * dist.world_size() / count.clamp(min=1)


def compute_losses(train_model, cfg, batch, micro=None):
    """L = lambda_Con L_Con + lambda_Cap L_Cap (Sec. 3.2) and its parts, for `batch` = (images,
    ids, positions, targets). With --accum-steps K, `micro` (a MicroBatch) is micro-batch j: L_Con
    over all K micro-batches (the others' embeddings cached), j's token sum of L_Cap over the
    step's count, the temperature's gradient in the last pass: K passes sum to one K x B batch."""
    micro = micro or MicroBatch()
    images, ids, positions, targets = batch
    image_emb, text_emb, logit_scale, logits = train_model(images, ids, positions)
    losses = {"loss_caption": caption_loss(logits, targets, targets.device, micro.tokens)}
    if cfg.contrastive_weight:
        emb = micro.features({"image": image_emb.float(), "text": text_emb.float()})  # (K*B, E)
        logit_scale = logit_scale if micro.last else logit_scale.detach()
        losses["loss_contrastive"] = contrastive_loss(emb["image"], emb["text"],
                                                      logit_scale.float())
    loss = cfg.caption_weight * losses["loss_caption"] + \
        cfg.contrastive_weight * losses.get("loss_contrastive", 0.0)
    return loss, losses


# ---- data ----

def trim_padding(ids, pad_id, multiple=8):
    """Drop the padding columns no caption reaches, keeping one (the legacy CLS mask reads it),
    rounded up to `multiple` (fewer shapes to compile). Exact: tokens see only earlier ones, padded
    targets are ignored, the CLS takes the last position at any length. On the host."""
    # the column after each row's last real token (a pad id inside a caption does not end it)
    position = torch.arange(1, ids.shape[1] + 1)
    longest = int(((ids != pad_id) * position).max()) if ids.numel() else 0
    keep = min(ids.shape[1], -(-(longest + 1) // multiple) * multiple)
    return ids[:, :keep]


# ---- evaluation ----

@torch.no_grad()
def evaluate(model, cfg, val, zeroshot, tokenizer, device, precision, output_dir=None):
    """Sec. 4: zero-shot retrieval recall@K on the val split and captions of its images (beam
    search; pycocoevalcap; captions.json) from one ViT pass per image; zero-shot classification
    top-1/top-5. Each rank works on its shard; every rank computes the same metrics."""
    was_training = model.training
    model.eval()
    metrics = {}

    def images(paths, captions=None):        # with `captions`: also caption, from the same ViT pass
        def encode(x):
            image_emb, tokens = model.image_features(x)
            if captions is not None:
                captions["tokens"] += model.generate(
                    None, image_tokens=tokens, sample=cfg.sample, num_beams=cfg.num_beams,
                    max_length=cfg.max_gen_length, min_length=cfg.min_gen_length, top_p=cfg.top_p,
                    **captions["ids"]).tolist()
            return F.normalize(image_emb.float(), dim=-1)
        return embed_images(encode, paths, cfg.image_size, cfg.batch_size, cfg.workers,
                            cfg.embed_dim, device, precision)
    if val is not None:
        texts, txt2img = retrieval_texts(val)
        captions = {"tokens": [], "ids": dict(sot_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)}
        image_emb = images([r["image"] for r in val], captions)
        tokenize = lambda t: trim_padding(tokenizer(t, cfg.context_length), cfg.pad_id)  # noqa
        text_emb = embed_texts(model.encode_text, texts, tokenize, cfg.batch_size, cfg.embed_dim,
                               device, precision)
        metrics.update(retrieval_metrics(image_emb @ text_emb.T, txt2img))
        rows, eos = [s[1:] for s in captions["tokens"]], tokenizer.eos_id   # after [SOT] to [EOT]
        mine = [tokenizer.decode(r[:r.index(eos)] if eos in r else r).strip() for r in rows]
        predictions = dict(enumerate(c for part in dist.gather_objects(mine) for c in part))
        references = {i: r["captions"] for i, r in enumerate(val)}
        scores = caption_metrics(predictions, references) if dist.is_main() else {}
        metrics.update(dist.gather_objects(scores)[0])                        # rank 0's, everywhere
        if output_dir and dist.is_main():
            with open(os.path.join(output_dir, "captions.json"), "w") as f:
                json.dump([{"image": val[i]["image"], "image_id": val[i]["image_id"], "caption": c}
                           for i, c in predictions.items()], f, indent=1)
    if zeroshot is not None:
        paths, labels, classnames, templates = zeroshot
        classifier = zeroshot_classifier_sharded(model.encode_text, tokenizer, classnames,
                                                 templates, cfg.context_length, cfg.embed_dim,
                                                 device, precision)
        image_emb = images(paths)
        metrics.update(zeroshot_metrics(image_emb @ classifier.T, labels))
    model.train(was_training)
    return metrics


# ---- config and presets ----

@dataclass
class Config(BaseConfig):
    task: str = "pretrain"          # pretrain (contrastive + captioning) | caption (fine-tuning)
    # image encoder: CLIP's ViT (pre-norm, GELU), no final norm (the pooler normalises its keys)
    image_size: int = 64            # pixels (224 in open_clip's models)
    patch_size: int = 8             # pixels per patch side
    vision_width: int = 128         # ViT width
    vision_layers: int = 4          # ViT blocks
    vision_heads: int = 2           # ViT attention heads (width / 64)
    # attentional pooling (Sec. 3.2, "Attentional Poolers")
    pooler: str = "open_clip"       # open_clip: one pooler, query 0 the contrastive embedding, the
                                    # rest the decoder's | paper: a 1-query pooler beside this one
    n_queries: int = 32             # queries of the (captioning) pooler; 256 in the paper
    pooler_heads: int = 2           # 8 in open_clip
    # text: the unimodal decoder (CLIP's causal text transformer + an appended CLS), the multimodal
    text_width: int = 96            # width of both text decoders
    text_layers: int = 3            # unimodal decoder blocks (12)
    text_heads: int = 2             # heads of both text decoders (8 for B/32, 12 for L/14)
    decoder_layers: int = 3         # multimodal layers: causal self-, then cross-attention (12)
    context_length: int = 32        # caption tokens with [SOT], [EOT]; the CLS takes one more (76)
    vocab_size: int = 0             # 0: the tokenizer's
    pad_id: int = -1                # -1: the tokenizer's, or 0 where it pads with [EOT] (CLIP BPE)
    embed_dim: int = 96             # contrastive space, and the width of the decoder's image tokens
    cls_mask: str = "correct"       # correct: the CLS sees every caption token and itself, no
                                    # padding | legacy: the mask of open_clip's published weights
    mlp_ratio: float = 4.0          # MLP hidden width / width
    act: str = "gelu"               # open_clip's CoCa models: GELU; quick_gelu for OpenAI towers
    layer_norm_eps: float = 1e-5    # LayerNorm epsilon
    # losses (open_clip: --coca-contrastive-loss-weight 1, --coca-caption-loss-weight 2)
    contrastive_weight: float = 1.0  # lambda_Con (Sec. 3.2); 0 in caption fine-tuning
    caption_weight: float = 2.0     # lambda_Cap
    # captioning (open_clip generate: beam search, 6 beams, 30 tokens at most, 5 at least)
    num_beams: int = 6              # beam search width; 1: greedy
    max_gen_length: int = 30        # tokens including [SOT]
    min_gen_length: int = 5         # tokens including [SOT]
    sample: bool = False            # eval captions: nucleus sampling (--top-p), not beam search
    top_p: float = 0.9              # nucleus sampling mass
    # data
    val_data: str = ""              # retrieval + captioning split; empty with tiny: its val split
    zeroshot_data: str = ""         # image folder root/<class>/*; empty with tiny: tiny's zero-shot
    text_clean: str = "lower"       # open_clip's text clean-up: lower (its CLIP BPE), whitespace
                                    # (its HF tokenizers: ftfy, HTML and whitespace, case kept)
    # optimisation (open_clip params.py, as CLIP)
    epochs: int = 2
    batch_size: int = 64            # per process; contrastive batch: batch_size * accum * world
    lr: float = 5e-4
    weight_decay: float = 0.2       # AdamW decoupled weight decay (0.1 for caption fine-tuning)
    beta1: float = 0.9              # AdamW beta1
    beta2: float = 0.98             # AdamW beta2
    eps: float = 1e-6               # AdamW epsilon
    patch_dropout: float = 0.0      # FLIP: share of each training image's patches dropped, [0, 1)
    unmasked_steps: int = 0         # FLIP: the last N steps keep every patch (unmasked tuning)
    # run
    output_dir: str = "runs/coca"
    init_from: str = ""             # open_clip weights (.bin, .safetensors, hub folder), or ours


# open_clip's model_configs/coca_ViT-B-32.json and coca_ViT-L-14.json, with CLIP's recipe
_OPEN_CLIP = dict(image_size=224, n_queries=256, pooler_heads=8, text_layers=12, decoder_layers=12,
                  context_length=76, vocab_size=49408, tokenizer=coca_weights.OPEN_CLIP_TOKENIZER,
                  epochs=32, warmup_steps=10000, workers=8)
PRESETS = {
    "tiny": {},
    "coca-vit-b-32": dict(_OPEN_CLIP, patch_size=32, vision_width=768, vision_layers=12,
                          vision_heads=12, text_width=512, text_heads=8, embed_dim=512,
                          batch_size=128),
    "coca-vit-l-14": dict(_OPEN_CLIP, patch_size=14, vision_width=1024, vision_layers=24,
                          vision_heads=16, text_width=768, text_heads=12, embed_dim=768,
                          batch_size=64, grad_checkpointing=True),
}
TASKS = ("pretrain", "caption")
CHOICES = {"task": TASKS, "pooler": ("open_clip", "paper"), "cls_mask": ("correct", "legacy"),
           "export_format": coca_weights.TARGETS}
RESUME_MUTABLE = ("num_beams", "max_gen_length", "min_gen_length", "sample", "top_p")  # eval only
# Caption fine-tuning (open_clip README, "Fine-tuning CoCa"): the captioning loss alone. On a
# paper preset also its recipe: lr 1e-5, wd 0.1, batch 128, warm-up 1,000, one epoch.
CAPTION_RECIPE = dict(contrastive_weight=0.0, caption_weight=1.0)
CAPTION_FINETUNE = dict(lr=1e-5, weight_decay=0.1, warmup_steps=1000, batch_size=128, epochs=1)
RECIPES_DOC = ("task recipe (--task caption; the command line overrides it): "
               + ", ".join(f"{k}={v}" for k, v in CAPTION_RECIPE.items()) + "; with an open_clip "
               + "preset also " + ", ".join(f"{k}={v}" for k, v in CAPTION_FINETUNE.items()))
MODEL_FIELDS = ("image_size", "patch_size", "vision_width", "vision_layers", "vision_heads",
                "pooler", "n_queries", "pooler_heads", "text_width", "text_layers", "text_heads",
                "decoder_layers", "context_length", "vocab_size", "pad_id", "embed_dim", "cls_mask",
                "mlp_ratio", "act", "layer_norm_eps")


def task_recipe(cfg):
    """Step 3 of resolve_config: the fields --task caption sets unless the command line does."""
    finetune = CAPTION_FINETUNE if cfg.preset != "tiny" else {}
    return {**CAPTION_RECIPE, **finetune} if cfg.task == "caption" else {}


def settle_config(cfg, init, tokenizer):
    """Every change to cfg after the command line, in one place, then the checks: the tokenizer's
    name, padding id and vocabulary, the --init-from weights' architecture (a given --image-size
    stays: interpolated; a --cls-mask stays over open_clip's weights, not over our checkpoint's)."""
    cfg.tokenizer = tokenizer.name
    # padding must differ from [EOT], which L_Cap trains (transformers' CLIP BPE pads with [EOT])
    if cfg.pad_id < 0:
        cfg.pad_id = 0 if tokenizer.pad_id == tokenizer.eos_id else tokenizer.pad_id
    config = cfg.preset if cfg.preset != "tiny" else None
    arch = coca_weights.init_architecture(init, cfg.init_from, config, MODEL_FIELDS, PRESETS)
    kept = {"image_size", "cls_mask"} if init[0] == "open_clip" else {"image_size"}
    cfg.__dict__.update({k: v for k, v in arch.items() if k not in kept & cfg.explicit_keys})
    cfg.vocab_size = cfg.vocab_size or tokenizer.vocab_size
    tokenizer.pad_id = cfg.pad_id            # the data pipeline pads with the model's padding id
    check_config(cfg, tokenizer)
    return arch


def check_config(cfg, tokenizer):
    """Start-up checks with clear messages (instead of an error deep in the first step)."""
    for bad, message in [
            (cfg.task not in TASKS, f"--task must be {' or '.join(TASKS)}, not {cfg.task!r}"),
            (cfg.vocab_size < tokenizer.vocab_size, f"tokenizer {tokenizer.name} has "
             f"{tokenizer.vocab_size} tokens, the model {cfg.vocab_size}"),
            (cfg.max_gen_length > cfg.context_length, f"--max-gen-length {cfg.max_gen_length} "
             f"exceeds the context of {cfg.context_length} tokens"),
            (cfg.min_gen_length >= cfg.max_gen_length, f"--min-gen-length {cfg.min_gen_length} "
             f"must be below --max-gen-length {cfg.max_gen_length}"),
            (cfg.contrastive_weight == 0 and cfg.caption_weight == 0,
             "--contrastive-weight and --caption-weight are both 0: nothing to train"),
            (cfg.num_beams < 1, f"--num-beams must be at least 1 (1: greedy), not {cfg.num_beams}"),
            (cfg.pooler == "open_clip" and cfg.n_queries < 2, f"--n-queries {cfg.n_queries}: the "
             "open_clip pooler's first query is the contrastive embedding, so the decoder needs at "
             "least 2"),
            (cfg.image_size % cfg.patch_size, f"--image-size {cfg.image_size} is not a multiple of "
             f"--patch-size {cfg.patch_size}"),
            (cfg.pad_id == tokenizer.eos_id, f"--pad-id {cfg.pad_id} is the end-of-text id: the "
             "caption loss would never learn to stop")]:
        if bad:
            raise UserError(message)


def build_model(cfg, tokenizer, init, arch):
    """A fresh CoCa, or one with the --init-from weights (built at their size, then resized).
    Without the contrastive loss (caption fine-tuning) its parameters are frozen: they get no
    gradient, and DDP requires every trainable parameter to receive one."""
    model = CoCa(replace(cfg, image_size=arch.get("image_size", cfg.image_size)), pad_id=cfg.pad_id,
                 eos_id=tokenizer.eos_id)
    coca_weights.load_init(model, init, cfg.init_from)
    if model.cfg.image_size != cfg.image_size:   # serve another size: interpolate the grid
        model.visual.resize(cfg.image_size)
    model.cfg = cfg
    if cfg.contrastive_weight == 0:
        unused = [model.proj, model.cls_emb, model.text_projection, model.logit_scale,
                  *model.text.ln_final.parameters()]
        if cfg.pooler == "paper":
            unused += [*model.attn_pool_contrastive.parameters(),
                       *model.ln_post_contrastive.parameters()]
        for p in unused:
            p.requires_grad_(False)
    return model


# ---- main: the training loop ----

def main(argv=None):
    rank, local_rank, world_size, device = dist.setup()
    cfg, ckpt = resolve_config(Config, PRESETS, argv, description=__doc__, recipe=task_recipe,
                               recipes_doc=RECIPES_DOC, choices=CHOICES,
                               resume_mutable=RESUME_MUTABLE)
    precision = resolve_precision(cfg.precision, device)
    seed_everything(cfg.seed)                     # the same initial weights on every rank
    init = coca_weights.read_init(cfg.init_from)  # open_clip's weights, or one of our checkpoints
    source = cfg.export and export_source(init, ckpt, cfg, "coca", MODEL_FIELDS, PRESETS)
    tokenizer = load_tokenizer(cfg.tokenizer or coca_weights.init_tokenizer(init, cfg.init_from),
                               cfg.init_from,
                               use_tiny=not (cfg.train_data or cfg.val_data or cfg.zeroshot_data),
                               clean=run_text_clean(cfg))   # ftfy, HTML[, lower]
    arch = settle_config(cfg, init, tokenizer)    # from here on cfg is only read
    model = build_model(cfg, tokenizer, init, arch).to(device)
    del init
    if ckpt:
        model.load_state_dict(ckpt["model"])
    if cfg.export:                  # --export DIR: these weights as an open_clip folder, then exit
        return coca_weights.export(model, cfg, tokenizer, source)
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    loader, sampler, val, zeroshot = contrastive_data(cfg, tokenizer, rank, world_size)
    log = open_log(cfg, "coca", resumed=ckpt is not None)

    def evaluate_run():
        return evaluate(model, cfg, val, zeroshot, tokenizer, device, precision, cfg.output_dir)
    if cfg.eval_only:
        return eval_only(log, ckpt, evaluate_run)

    # DDP, or FSDP2 sharding each transformer block and the rest (--fsdp)
    train_model = dist.parallelize(model, cfg.fsdp, device, (Block, CrossAttentionBlock),
                                   precision_dtype(precision))
    train_model = torch.compile(train_model) if cfg.compile else train_model
    # AdamW (beta2 0.98, eps 1e-6), no decay on gains, biases, embeddings, CLS, temperature
    optimizer = adamw(param_groups(model, cfg.weight_decay, ("logit_scale",)), lr=cfg.lr,
                      betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    # the schedule, the scaler, the non-finite guard; a resumed run's state
    run = start_run(cfg, model, optimizer, loader, sampler, log, ckpt, precision)
    del ckpt

    def embed(batch):                   # (images, ids, positions, _) -> {"image", "text"}: (B, E)
        with autocast(precision, device):
            image_emb, text_emb, _, _ = train_model(*batch[:3])
        return {"image": image_emb.float(), "text": text_emb.float()}

    best_key = "cider" if cfg.task == "caption" else "r_mean"
    with Preemption() as preemption:              # SIGTERM / SIGUSR1: save the step and leave
        for batches in epochs(run, loader):
            for group in batches:
                masked = run.step < run.total_steps - cfg.unmasked_steps   # FLIP, unmasked tuning
                model.visual.patch_dropout = cfg.patch_dropout if masked else 0.0
                micro = []
                for images, ids, _ in group:      # padding and targets on the host: no device sync
                    ids = trim_padding(ids, cfg.pad_id)
                    positions, targets = caption_positions(ids, cfg.pad_id)
                    micro.append(tuple(x.to(device, non_blocking=True)
                                       for x in (images, ids, positions, targets)))
                # the step's target tokens over all ranks and micro-batches: L_Cap's denominator
                tokens = torch.tensor(float(sum(len(b[3]) for b in micro)), device=device)
                tokens = dist.all_reduce_sum(tokens)
                # --accum-steps K: the contrastive batch is K x B (x world size), a feature cache:
                # every micro-batch embedded without gradient, then each with, against the others
                cache = FeatureCache(embed if cfg.contrastive_weight else None, micro)
                parts = []
                for j, batch in enumerate(micro):
                    with cache.micro(j, tokens) as m, sync_gradients(train_model, m.last):
                        with autocast(precision, device):
                            loss, losses = compute_losses(train_model, cfg, batch, m)
                        run.scaler.scale(loss).backward()
                    parts.append(losses)
                # for the log: L_Con (the same in every pass), L_Cap summed over the micro-batches
                losses = {**parts[-1], "loss_caption": sum(p["loss_caption"] for p in parts)}
                loss = cfg.caption_weight * losses["loss_caption"] + \
                    cfg.contrastive_weight * losses.get("loss_contrastive", 0.0)
                _, grad_norm = optimizer_step(run, loss, lambda b=micro[-1]: first_nonfinite_module(
                    model, {"images": b[0]}, lambda: model(*b[:3])))
                with torch.no_grad():  # open_clip: keep the scale <= 100 for stability
                    model.logit_scale.clamp_(0, math.log(100))
                log_train(run, {"loss": loss, **losses}, grad_norm,
                          lambda: {"logit_scale": dist.value(model.logit_scale).exp().item()})
                if step_done(run, preemption):
                    break
            end_epoch(run, evaluate_run, best_key, preemption)   # save, evaluate, keep the best
    return finish(run, evaluate_run)


if __name__ == "__main__":
    cli(main)
