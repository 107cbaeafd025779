"""BLIP (Li et al. 2022, arXiv:2201.12086): a ViT and a multimodal mixture of encoder-decoder
(MED) pretrained with three objectives at once (Sec. 3.2): image-text contrastive (ITC) on the
unimodal encoders, image-text matching (ITM) on the image-grounded text encoder with hard
negatives, and language modelling (LM) on the image-grounded text decoder, which shares every
weight with the encoder except self-attention. CapFilt (Sec. 3.3) then uses the fine-tuned
decoder to caption web images and the ITM head to filter noisy captions.

The paper, in this file:
    Sec. 3.1, Fig. 2   ViT + MED, one module set in three roles    BLIP, tie_decoder_to_encoder
    Sec. 3.2           momentum encoders, feature queues (ALBEF)  BLIP.finish_step
    Sec. 3.2           ITC with momentum distillation             BLIP.loss_itc, alpha_at
    Sec. 3.2           ITM with hard negatives                    BLIP.loss_itm, hard_negatives
    Sec. 3.2           LM on the decoder, label smoothing 0.1     BLIP.loss_lm
    Sec. 3.3, Fig. 3   CapFilt: captioner + ITM filter            capfilt, BLIP.generate
    Sec. 5.1           retrieval: ITC top-k re-ranked by ITM      evaluate_retrieval
    Sec. 5.2           captioning: beam search after a prompt     evaluate_captions
    configs/*.yaml     pretraining and fine-tuning recipes        PRESETS, FINETUNE
transformers' BLIP folders: loaded (--init-from) and written (--export) by common/weights/blip.py.

    python blip_train.py                                 # tiny built-in data, pretraining, CPU
    python blip_train.py --task caption                  # captioning fine-tuning (LM only)
    torchrun --nproc_per_node 8 blip_train.py --preset vit-b --task retrieval --image-size 384 \\
        --init-from blip-itm-base-coco/ --train-data coco_karpathy_train.json \\
        --val-data coco_karpathy_test.json
    python blip_train.py --task capfilt --init-from run/checkpoint_best.pt --train-data web.json
"""
import copy
import json
import os
import time
from dataclasses import dataclass, replace
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import dist
from common.config import BaseConfig, resolve_config
from common.data import (Example, eval_image_loader, load_tokenizer, pre_caption_blip,
                         read_annotations, retrieval_texts, tiny_data, train_loader,
                         train_transform, training_records)
from common.encoders import BertEncoder, BertLayer, BertLMHead, Block, KVCache, VisionTransformer
from common.generation import beam_search, greedy_or_sample
from common.metrics import (embed_sharded, image_tokens, rerank_topk, retrieval_metrics,
                            score_captions)
from common.run import (end_epoch, epochs, eval_only, finish, log_train, open_log, optimizer_step,
                        start_run, step_done)
from common.utils import (Preemption, UserError, adamw, autocast, cli, concat_json_lines,
                          first_nonfinite_module, param_groups, precision_dtype, resolve_precision,
                          sample_negatives, seed_everything, sync_gradients)
from common.weights import blip as blip_weights


# ---- model ----

class BLIP(nn.Module):
    """ViT + MED (Fig. 2), one module set in three roles: unimodal text encoder (text_encoder,
    [CLS]), image-grounded text encoder (text_encoder with cross-attention, [ENC]), image-grounded
    text decoder (text_decoder: causal, [DEC]; shares all but self-attention)."""

    def __init__(self, cfg, *, cls_id, enc_id, dec_id, sep_id, pad_id):
        super().__init__()
        self.cfg, self.cls_id, self.enc_id, self.dec_id = cfg, cls_id, enc_id, dec_id
        self.sep_id, self.pad_id = sep_id, pad_id
        self.visual_encoder = VisionTransformer(
            image_size=cfg.image_size, patch_size=cfg.patch_size, width=cfg.vision_width,
            layers=cfg.vision_layers, heads=cfg.vision_heads, mlp_dim=cfg.vision_mlp_dim,
            act="gelu", eps=cfg.vision_eps, pre_norm=False, patch_bias=True)
        bert = dict(vocab_size=cfg.vocab_size, width=cfg.text_width, layers=cfg.text_layers,
                    heads=cfg.text_heads, mlp_dim=cfg.text_mlp_dim, max_positions=cfg.max_positions,
                    cross_dim=cfg.vision_width, cross_layers=range(cfg.text_layers),
                    eps=cfg.text_eps, dropout=cfg.dropout)
        self.text_encoder = BertEncoder(**bert)
        self.text_decoder = BertEncoder(**bert)
        tie_decoder_to_encoder(self.text_decoder, self.text_encoder)
        self.lm_head = BertLMHead(cfg.text_width, cfg.vocab_size, eps=cfg.text_eps)
        self.lm_head.decoder.weight = self.text_decoder.word_embeddings.weight  # tied: docs/blip.md
        self.vision_proj = nn.Linear(cfg.vision_width, cfg.embed_dim)
        self.text_proj = nn.Linear(cfg.text_width, cfg.embed_dim)
        self.itm_head = nn.Linear(cfg.text_width, 2)
        self.temp = nn.Parameter(torch.tensor(cfg.temp))
        # Momentum encoders (Sec. 3.2, from ALBEF): EMA copies giving ITC keys and soft targets
        self.visual_encoder_m, self.text_encoder_m, self.vision_proj_m, self.text_proj_m = (
            copy.deepcopy(m) for m in (self.visual_encoder, self.text_encoder, self.vision_proj,
                                       self.text_proj))
        for p in self.momentum_params():
            p.requires_grad_(False)
        # Queues of momentum features (E, K) from past batches of all ranks, and their image ids.
        E, K = cfg.embed_dim, cfg.queue_size
        self.register_buffer("image_queue", F.normalize(torch.randn(E, K), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(E, K), dim=0))
        self.register_buffer("idx_queue", torch.full((1, K), -100, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self._ptr, self.pending_keys, self._ema_params = None, None, None
        self.register_load_state_dict_post_hook(lambda module, keys: setattr(module, "_ptr", None))

    def model_pairs(self):              # (online, momentum)
        return [(self.visual_encoder, self.visual_encoder_m),
                (self.text_encoder, self.text_encoder_m), (self.vision_proj, self.vision_proj_m),
                (self.text_proj, self.text_proj_m)]

    def momentum_params(self):
        return [p for _, m in self.model_pairs() for p in m.parameters()]

    def copy_to_momentum(self):
        for online, m in self.model_pairs():
            m.load_state_dict(online.state_dict())

    @torch.no_grad()
    def finish_step(self, ok=None, keys=None):
        """After the optimizer step, only if it was finite (`ok`: a 0-d bool tensor; None: finite):
        the momentum EMA, and the enqueue of `keys` (each micro-batch's pending_keys, in order)."""
        self.momentum_update(ok)
        self.temp.clamp_(0.001, 0.5)         # as forward does; under FSDP the sharded parameter
        for k in [self.pending_keys] if keys is None else keys:
            if k is not None:                # None: no ITC ran (captioning)
                self.dequeue_and_enqueue(*k, ok=ok)
        self.pending_keys = None

    @torch.no_grad()
    def momentum_update(self, ok=None):
        """theta_m <- m theta_m + (1 - m) theta: a lerp by 1 - m (by 0 for a non-finite step)."""
        weight = (1 - self.cfg.momentum) * (1 if ok is None else ok.float())
        if self._ema_params is None:     # walked once, not every step
            online = [p for m, _ in self.model_pairs() for p in m.parameters()]
            self._ema_params = (online, self.momentum_params())
        online, momentum = self._ema_params
        torch._foreach_lerp_(momentum, online, weight)

    @torch.no_grad()
    def dequeue_and_enqueue(self, image_feat, text_feat, idx, ok=None):
        """Replace the oldest entries with this step's momentum features from every rank, in rank
        order; a non-finite step (`ok` False) writes the old ones back, the pointer moves on."""
        image_feat, text_feat, idx = (dist.gather_no_grad(x) for x in (image_feat, text_feat, idx))
        if self._ptr is None:           # a host copy of queue_ptr: no GPU sync per step
            self._ptr = int(self.queue_ptr)
        n, ptr = image_feat.shape[0], self._ptr
        if ptr + n > self.cfg.queue_size:
            raise UserError(f"queue pointer {ptr} + global batch {n} overruns the queue of "
                            f"{self.cfg.queue_size}: it must be a multiple of the global batch")
        for queue, new in ((self.image_queue, image_feat.T), (self.text_queue, text_feat.T),
                           (self.idx_queue, idx[None])):
            old = queue[:, ptr:ptr + n]
            queue[:, ptr:ptr + n] = new if ok is None else torch.where(ok, new.to(queue.dtype), old)
        self._ptr = (ptr + n) % self.cfg.queue_size
        self.queue_ptr.fill_(self._ptr)

    def set_grad_checkpointing(self, enabled=True):
        for m in (self.visual_encoder.transformer, self.text_encoder, self.text_decoder):
            m.grad_checkpointing = enabled

    # -- the ViT and the three uses of the MED --

    def image_embed(self, images):                                  # ViT tokens (B, 1 + P, Dv)
        return self.visual_encoder(images)

    def image_feat(self, image_embeds):                             # ITC space (B, E)
        return F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)

    def text_feat(self, ids, mask):                                 # unimodal, [CLS] -> (B, E)
        return F.normalize(self.text_proj(self.text_encoder(ids, mask)[:, 0]), dim=-1)

    def itm_logits(self, ids, mask, image_embeds):                  # (B, 2)
        """Image-grounded text encoder: [ENC] replaces [CLS], cross-attention to the image."""
        ids = torch.cat([torch.full_like(ids[:, :1], self.enc_id), ids[:, 1:]], 1)
        return self.itm_head(self.text_encoder(ids, mask, context=image_embeds)[:, 0])

    def lm_logits(self, ids, mask, image_embeds):                   # (B, L, V)
        """Image-grounded text decoder: [DEC] replaces [CLS], causal self-attention."""
        ids = torch.cat([torch.full_like(ids[:, :1], self.dec_id), ids[:, 1:]], 1)
        return self.lm_head(self.text_decoder(ids, mask, causal=True, context=image_embeds))

    def encode_image(self, images):
        return self.image_feat(self.image_embed(images))

    encode_text = text_feat

    def forward(self, images, ids, mask, idx, alpha, task="pretrain", prompt_length=0):
        """The losses of one (micro-)batch; idx: (B,) image ids; alpha: alpha_at's weight."""
        image_embeds = self.image_embed(images)
        losses = {}
        if task == "caption":
            losses["loss_lm"] = self.loss_lm(ids, mask, image_embeds, prompt_length)
            return losses
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        image_feat, text_feat = self.image_feat(image_embeds), self.text_feat(ids, mask)
        # --- ITC with momentum distillation (Sec. 3.2; ALBEF Sec. 3.3) ---
        losses["loss_itc"] = self.loss_itc(images, ids, mask, idx, image_feat, text_feat, alpha,
                                           task)
        # --- ITM with hard negatives (Sec. 3.2) ---
        negatives = self.cfg.itm_negatives
        all_ranks = negatives == "global" or (negatives == "auto" and task == "retrieval")
        losses["loss_itm"] = self.loss_itm(ids, mask, idx, image_embeds, image_feat, text_feat,
                                           all_ranks)
        # --- LM: image-grounded decoder, the caption after [DEC] (Sec. 3.2) ---
        if task == "pretrain":
            losses["loss_lm"] = self.loss_lm(ids, mask, image_embeds, 0)
        return losses

    # ---- losses ----

    def loss_itc(self, images, ids, mask, idx, image_feat, text_feat, alpha, task):
        """The batch's momentum keys wait in `pending_keys` for finish_step() to enqueue them."""
        with torch.no_grad():
            image_cls_m = self.visual_encoder_m(images)[:, 0]
            image_feat_m = F.normalize(self.vision_proj_m(image_cls_m), dim=-1)
            text_cls_m = self.text_encoder_m(ids, mask)[:, 0]
            text_feat_m = F.normalize(self.text_proj_m(text_cls_m), dim=-1)
            image_keys = torch.cat([image_feat_m.T, self.image_queue.clone()], 1)  # (E, B + K)
            text_keys = torch.cat([text_feat_m.T, self.text_queue.clone()], 1)
            if task == "retrieval":  # positives: every key with the same image id
                idx_all = torch.cat([idx[None], self.idx_queue.clone()], 1)       # (1, B + K)
                pos = (idx[:, None] == idx_all).float()
                targets = pos / pos.sum(1, keepdim=True)
            else:                    # pretraining: the diagonal of the current batch
                B = ids.shape[0]
                targets = F.pad(torch.eye(B, device=ids.device), (0, image_keys.shape[1] - B))
        # Similarities in fp32 even under autocast: at temperature 0.07 (down to 0.001) bf16's
        # spacing near the largest logits would be coarser than the differences that matter.
        with torch.autocast(ids.device.type, enabled=False):
            image_feat_m, text_feat_m = image_feat_m.float(), text_feat_m.float()
            image_keys, text_keys = image_keys.float(), text_keys.float()
            with torch.no_grad():
                sim_i2t_m = image_feat_m @ text_keys / self.temp
                sim_t2i_m = text_feat_m @ image_keys / self.temp
                i2t_targets = alpha * F.softmax(sim_i2t_m, 1) + (1 - alpha) * targets
                t2i_targets = alpha * F.softmax(sim_t2i_m, 1) + (1 - alpha) * targets
            sim_i2t = image_feat.float() @ text_keys / self.temp                      # (B, B + K)
            sim_t2i = text_feat.float() @ image_keys / self.temp
            loss_i2t = -(F.log_softmax(sim_i2t, 1) * i2t_targets).sum(1).mean()
            loss_t2i = -(F.log_softmax(sim_t2i, 1) * t2i_targets).sum(1).mean()
        self.pending_keys = (image_feat_m, text_feat_m, idx)
        return (loss_i2t + loss_t2i) / 2

    def loss_itm(self, ids, mask, idx, image_embeds, image_feat, text_feat, all_ranks):
        """The positive pairs, and per text a hard negative image, per image a hard negative text
        (hard_negatives) from this rank's batch or, `all_ranks`, every rank's (image tokens
        gathered with gradient, text ids re-encoded here)."""
        B = ids.shape[0]
        neg_image, neg_text, idx_all = hard_negatives(image_feat, text_feat, idx, self.temp,
                                                      all_ranks)            # (B,) into N
        ids_all, mask_all, image_embeds_all = ids, mask, image_embeds
        if all_ranks:
            ids_all, mask_all = dist.gather_no_grad(ids), dist.gather_no_grad(mask)
            # Gathered in the autocast dtype: the cross-attention's key/value projection casts to
            # it anyway, so the forward is unchanged and the (N, 1 + P, Dv) copy is half the size.
            dev, half = image_embeds.device.type, image_embeds.dtype
            half = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else half
            image_embeds_all = dist.gather_with_grad(image_embeds.to(half))       # (N, 1 + P, Dv)
        # rows: the positives, (text, negative image), (negative text, image)
        text_ids = torch.cat([ids, ids, ids_all[neg_text]])
        text_mask = torch.cat([mask, mask, mask_all[neg_text]])
        images = torch.cat([image_embeds, image_embeds_all[neg_image], image_embeds])
        logits = self.itm_logits(text_ids, text_mask, images)                         # (3B, 2)
        # A sampled "negative" that shares the image id (only possible when a row had no valid
        # negative: a batch of one, all ids equal) is labelled a match, so labels never lie.
        labels = torch.cat([torch.ones(B, dtype=torch.long, device=ids.device),
                            (idx_all[neg_image] == idx).long(), (idx_all[neg_text] == idx).long()])
        return F.cross_entropy(logits.float(), labels)

    def loss_lm(self, ids, mask, image_embeds, prompt_length):
        """Shifted cross-entropy, label smoothing 0.1 (med.py); not on padding or the prompt."""
        targets = ids.masked_fill(mask == 0, -100)
        targets[:, : max(prompt_length, 1)] = -100               # [DEC] (+ prompt): inputs only
        logits = self.lm_logits(ids, mask, image_embeds)
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                               targets[:, 1:].reshape(-1), ignore_index=-100,
                               label_smoothing=self.cfg.label_smoothing)

    @torch.no_grad()
    def generate(self, images, prompt_ids, *, sample=False, num_beams=3, max_length=20,
                 min_length=5, top_p=0.9, repetition_penalty=1.0, image_embeds=None,
                 use_cache=True):
        """Captions (B, T) after [DEC] + prompt (Lp,), [PAD] after [SEP] (common/generation.py);
        lengths count [DEC] and the prompt; use_cache=False recomputes the prefix (for tests)."""
        image_embeds = self.image_embed(images) if image_embeds is None else image_embeds
        B = image_embeds.shape[0]
        start = torch.cat([torch.tensor([self.dec_id]), prompt_ids.cpu()]).to(image_embeds.device)
        prompt = start[None].expand(B, -1)
        if use_cache:
            def step(tokens, cache):                                # tokens: the new ones only
                h = self.text_decoder(tokens, causal=True, context=image_embeds, cache=cache)
                return self.lm_head(h[:, -1]).float(), cache
            cache, reorder = KVCache(len(self.text_decoder.layer)), None
        else:
            def step(tokens, seqs):                                 # the cache: the token history
                seqs = tokens if seqs is None else torch.cat([seqs, tokens], 1)
                context = image_embeds.repeat_interleave(seqs.shape[0] // B, 0)   # beams: B*K
                h = self.text_decoder(seqs, torch.ones_like(seqs), causal=True, context=context)
                return self.lm_head(h[:, -1]).float(), seqs
            cache, reorder = None, (lambda seqs, index: seqs[index])
        lengths = dict(max_length=max_length, min_length=min_length, eos_id=self.sep_id,
                       pad_id=self.pad_id, repetition_penalty=repetition_penalty)
        if sample or num_beams == 1:
            return greedy_or_sample(step, prompt, cache, sample=sample, top_p=top_p, **lengths)
        return beam_search(step, prompt, cache, reorder, num_beams=num_beams, **lengths)

    @classmethod
    def from_hf(cls, path, tokenizer, cfg=None):
        """A transformers BLIP retrieval or captioning folder, every weight mapped and checked."""
        return blip_weights.from_hf(partial(build_blip, tokenizer=tokenizer), cfg or Config(), path)


def tie_decoder_to_encoder(decoder, encoder):
    """The decoder uses the encoder's embeddings, cross-attention and feed-forward modules; only
    self-attention is its own (Sec. 3.1; BLIP's tie_encoder_decoder_weights)."""
    for name in ("word_embeddings", "position_embeddings", "embed_norm"):
        setattr(decoder, name, getattr(encoder, name))
    for d, e in zip(decoder.layer, encoder.layer):
        d.crossattention, d.intermediate = e.crossattention, e.intermediate
        d.output, d.output_norm = e.output, e.output_norm


def build_blip(cfg, tokenizer):
    """A BLIP for `tokenizer`, which gets [DEC] and [ENC]: they replace a row's [CLS] per role."""
    cls_id = tokenizer.tok.cls_token_id
    tokenizer.bos_id = cls_id = tokenizer.bos_id if cls_id is None else cls_id
    dec_id, enc_id = tokenizer.add_special_tokens(["[DEC]", "[ENC]"])
    if cfg.vocab_size < tokenizer.vocab_size:
        raise UserError(f"model vocabulary {cfg.vocab_size} is smaller than the tokenizer's "
                        f"{tokenizer.vocab_size}")
    return BLIP(cfg, cls_id=cls_id, enc_id=enc_id, dec_id=dec_id, sep_id=tokenizer.eos_id,
                pad_id=tokenizer.pad_id)


@torch.no_grad()
def hard_negatives(image_feat, text_feat, idx, temp, all_ranks=True):
    """Per local text a negative image, per local image a negative text, drawn from softmax(sim /
    temp) over all ranks' batch or this one's, never of the same image id; indices into it."""
    gather = dist.gather_no_grad if all_ranks else (lambda x: x)
    idx_all = gather(idx)                                                              # (N,)
    sim_i2t = image_feat @ gather(text_feat).T / temp                                  # (B, N)
    sim_t2i = text_feat @ gather(image_feat).T / temp
    same = idx[:, None] == idx_all[None, :]                       # the positive and its duplicates
    neg_image = sample_negatives(F.softmax(sim_t2i.float(), 1).masked_fill(same, 0))
    neg_text = sample_negatives(F.softmax(sim_i2t.float(), 1).masked_fill(same, 0))
    return neg_image, neg_text, idx_all


# ---- data ----

def caption_text(cfg):
    """BLIP's pre_caption (data/utils.py) of every caption, training and evaluation alike."""
    return partial(pre_caption_blip, max_words=cfg.max_words)


def build_data(cfg, tokenizer, rank, world_size):
    """Loader, sampler (None with --eval-only), val and training records; no data flag: tiny."""
    tiny = None if (cfg.train_data or cfg.val_data) else tiny_data()
    val_file = cfg.val_data or (os.path.join(tiny, "val.json") if tiny else "")
    root = cfg.image_root or None
    val = read_annotations(val_file, root) if val_file else None
    if cfg.eval_only:
        return None, None, val, None
    train_file = cfg.train_data or os.path.join(tiny_data(), "train.json")
    records = training_records(train_file, root, cfg.skip_bad)
    if cfg.task == "capfilt":
        if isinstance(records, str):
            raise UserError("--task capfilt captions and filters an annotation file; --train-data "
                            "names shards")
        return None, None, val, records
    prefix = cfg.prompt if cfg.task == "caption" else ""   # captions after the prompt, as BLIP's
    transform = train_transform(cfg.image_size, cfg.min_scale, cfg.hflip, cfg.randaugment)
    example = Example(transform, tokenizer, cfg.max_length, prefix=prefix, text=caption_text(cfg))
    loader, sampler = train_loader(records, example, cfg, rank, world_size, train_file)
    return loader, sampler, val, records


def prompt_token_ids(tokenizer, prompt, max_length):
    """The prompt's tokens without [CLS] and [SEP] (what follows [DEC] when generating)."""
    ids = tokenizer(prompt, max_length)[0]
    return ids[1: int((ids != tokenizer.pad_id).sum()) - 1]


def decode_captions(tokenizer, seqs, prompt_ids):
    """The text of each generated row (B, T) after [DEC] + prompt, padding dropped."""
    pad, n = tokenizer.pad_id, 1 + len(prompt_ids)
    return [tokenizer.decode([t for t in s[n:].tolist() if t != pad]).strip() for s in seqs]


# ---- evaluation ----

@torch.no_grad()
def evaluate_retrieval(model, cfg, val, tokenizer, device, precision):
    """Sec. 5.1: ITC similarity for all pairs; the ITM head re-ranks each row's top k: ITM match
    logit + ITC similarity (-100 outside). Each rank keeps only its images' ViT tokens (COCO 5k
    at 384 px: ~9 GB fp32) and scores their pairs. Returns the metrics, the ITM forward count."""
    texts, txt2img = retrieval_texts(val, caption_text(cfg))
    ids = tokenizer(texts, cfg.max_length).to(device)
    mask = (ids != tokenizer.pad_id).long()
    text_feat = embed_sharded(lambda i, j: model.text_feat(ids[i:j], mask[i:j]),
                              *dist.shard_range(len(texts)), cfg.batch_size, cfg.embed_dim, device,
                              precision)                                              # (n_txt, E)
    i0, i1 = dist.shard_range(len(val))
    tokens = image_tokens(model.image_embed, [r["image"] for r in val[i0:i1]], cfg.image_size,
                          cfg.batch_size, cfg.workers, device, precision)        # (mine, 1 + P, Dv)
    image_feat = embed_sharded(lambda i, j: model.image_feat(tokens[i:j]), 0, len(tokens),
                               cfg.batch_size, cfg.embed_dim, device, precision)      # (n_img, E)
    sim = image_feat @ text_feat.T                                              # (n_img, n_txt)
    k = min(cfg.k_test, len(texts), len(val))

    def itm(t, i):              # ITM match logits of texts t with this rank's images i
        with autocast(precision, device):
            return model.itm_logits(ids[t], mask[t], tokens[i])[:, 1].float()
    rows_i2t, rows_t2i = rerank_topk(sim, (i0, i1), k, itm, cfg.itm_batch, add_similarity=True)
    metrics = retrieval_metrics(rows_i2t, txt2img, rows_t2i)
    metrics["itc_r_mean"] = retrieval_metrics(sim, txt2img)["r_mean"]     # before re-ranking
    return metrics, k * (len(texts) + len(val))


@torch.no_grad()
def evaluate_captions(model, cfg, val, tokenizer, device, precision, output_dir=None):
    """Sec. 5.2: beam-search captions of this rank's images, scored all together (captions.json)."""
    start, end = dist.shard_range(len(val))
    # The prompt conditions captioning fine-tuning; the pretraining LM never saw it.
    prompt_ids = prompt_token_ids(tokenizer, cfg.prompt if cfg.task == "caption" else "",
                                  cfg.max_length)
    mine = []
    for images, _ in eval_image_loader([r["image"] for r in val[start:end]], cfg.image_size,
                                       cfg.batch_size, cfg.workers):
        with autocast(precision, device):
            seqs = model.generate(images.to(device), prompt_ids, num_beams=cfg.num_beams,
                                  max_length=cfg.max_gen_length, min_length=cfg.min_gen_length)
        mine += decode_captions(tokenizer, seqs, prompt_ids)
    return score_captions(mine, val, output_dir)


@torch.no_grad()
def evaluate(model, cfg, val, tokenizer, device, precision, output_dir=None):
    was_training, metrics = model.training, {}
    model.eval()
    if val is not None and cfg.task in ("pretrain", "retrieval"):
        tick = time.time()
        ret, n_itm = evaluate_retrieval(model, cfg, val, tokenizer, device, precision)
        metrics.update(ret, itm_pairs=n_itm, retrieval_eval_s=time.time() - tick)
    if val is not None and cfg.task in ("pretrain", "caption"):
        metrics.update(evaluate_captions(model, cfg, val, tokenizer, device, precision, output_dir))
    model.train(was_training)
    return metrics


# ---- CapFilt (Sec. 3.3) ----

@torch.no_grad()
def capfilt(model, cfg, records, tokenizer, device, precision, log):
    """--task capfilt. Captioner: nucleus sampling; filter (--capfilt-filter or the model): keep a
    web or synthetic caption if ITM p(match) >= threshold. Rank 0 joins the ranks' part files."""
    path = cfg.capfilt_output or os.path.join(cfg.output_dir, "capfilt.json")
    source = cfg.train_data or os.path.join(tiny_data(), "train.json")     # "": the built-in set
    if os.path.exists(path) and os.path.samefile(path, source):
        raise UserError(f"--capfilt-output {path} is the input annotation file; CapFilt never "
                        f"overwrites it")
    filter_model = model
    if cfg.capfilt_filter:          # its own architecture, all of it (no run fields kept)
        init = blip_weights.read_init(cfg.capfilt_filter)
        arch = blip_weights.init_architecture(init, cfg.capfilt_filter)
        filter_cfg = replace(cfg, init_from=cfg.capfilt_filter, **arch)
        filter_model = build_model(filter_cfg, tokenizer, init).to(device).eval()
    model.eval()
    mine = records[slice(*dist.shard_range(len(records)))]
    prompt_ids = prompt_token_ids(tokenizer, cfg.prompt, cfg.max_length)
    kept, scored, images_kept, highest = 0, 0, 0, 0.0          # highest p(match): for the error
    loader = eval_image_loader([r["image"] for r in mine], cfg.image_size, cfg.batch_size,
                               cfg.workers)
    with open(f"{path}.part{dist.rank()}.jsonl", "w") as part:
        for images, index in loader:
            images = images.to(device)
            with autocast(precision, device):
                cap_embeds = model.image_embed(images)                   # the ViT once per batch
                embeds = cap_embeds if filter_model is model else filter_model.image_embed(images)
                sample = partial(model.generate, images, prompt_ids, sample=True, top_p=cfg.top_p,
                                 max_length=cfg.max_gen_length, min_length=cfg.min_gen_length,
                                 repetition_penalty=1.1, image_embeds=cap_embeds)
                synthetic = [decode_captions(tokenizer, sample(), prompt_ids)
                             for _ in range(cfg.capfilt_samples)]                # (samples, b)
                candidates = [[c for c in mine[i]["captions"] + [s[j] for s in synthetic] if c]
                              for j, i in enumerate(index.tolist())]
                p_match = itm_match(filter_model, [c for cs in candidates for c in cs],
                                    [j for j, cs in enumerate(candidates) for _ in cs], embeds, cfg,
                                    tokenizer)
                highest, p_match = max([highest, *p_match]), iter(p_match)
            for i, cs in zip(index.tolist(), candidates):    # zip: takes len(cs) of p_match
                keep = [c for c, p in zip(cs, p_match) if p >= cfg.capfilt_threshold]
                scored, kept = scored + len(cs), kept + len(keep)
                if keep:
                    images_kept += 1
                    part.write(json.dumps({"image": mine[i]["image"], "caption": keep,
                                           "image_id": mine[i]["image_id"]}) + "\n")
    # a collective: every rank's part file is complete once it returns
    gathered = list(zip(*dist.gather_objects((kept, scored, images_kept, highest))))
    counts = [sum(x) for x in gathered[:3]]
    if counts[0] == 0:
        os.remove(f"{path}.part{dist.rank()}.jsonl")
        raise UserError(f"CapFilt kept none of the {counts[1]} captions: no ITM p(match) reached "
                        f"--capfilt-threshold {cfg.capfilt_threshold} (the highest was "
                        f"{max(gathered[3]):.3g}); nothing written")
    if dist.is_main():
        concat_json_lines([f"{path}.part{r}.jsonl" for r in range(dist.world_size())], path)
    counts = {"captions_kept": counts[0], "captions_scored": counts[1], "images_kept": counts[2],
              "images": len(records)}
    if dist.is_main():
        log.write({"step": 0, "epoch": 0, "split": "capfilt", **counts})
        print(json.dumps({**counts, "output": path}))
    dist.cleanup()
    return counts


def itm_match(model, texts, image_of, embeds, cfg, tokenizer):
    """ITM p(match) of every (texts[n], embeds[image_of[n]]) pair, --itm-batch pairs per forward."""
    if not texts:
        return []
    ids = tokenizer([caption_text(cfg)(t) for t in texts], cfg.max_length).to(embeds.device)
    image_of = torch.tensor(image_of, device=embeds.device)
    p = []
    for a in range(0, len(texts), cfg.itm_batch):
        b = slice(a, a + cfg.itm_batch)
        logits = model.itm_logits(ids[b], (ids[b] != tokenizer.pad_id).long(), embeds[image_of[b]])
        p.append(F.softmax(logits.float(), 1)[:, 1])
    return torch.cat(p).tolist()


# ---- config and presets ----

@dataclass
class Config(BaseConfig):
    task: str = "pretrain"          # pretrain (ITC+ITM+LM) | retrieval (ITC+ITM) | caption (LM) | capfilt
    # vision (ViT-B/16 from DeiT in the paper: timm blocks, no pre-norm, LayerNorm eps 1e-6)
    image_size: int = 64            # pixels (224 pretraining, 384 fine-tuning in the paper)
    patch_size: int = 8             # pixels per patch side
    vision_width: int = 128         # ViT width
    vision_layers: int = 4          # ViT blocks
    vision_heads: int = 2           # ViT attention heads
    vision_eps: float = 1e-6        # ViT LayerNorm epsilon
    vision_mlp_dim: int = 512       # ViT MLP hidden width (3072 in ViT-B, 4096 in ViT-L)
    # text: the MED, a bert-base with cross-attention in every layer
    text_width: int = 128           # text transformer width
    text_layers: int = 4            # text transformer blocks
    text_heads: int = 2             # text attention heads
    text_mlp_dim: int = 512         # BERT feed-forward width
    max_positions: int = 64         # BERT's 512
    text_eps: float = 1e-12         # BERT LayerNorm epsilon
    dropout: float = 0.0            # MED hidden/attention dropout (0.1 in med_config.json)
    vocab_size: int = 0             # 0: the tokenizer's (with [DEC] and [ENC] added)
    max_length: int = 32            # tokens per caption, [CLS] and [SEP] included (BLIP: 30-35)
    max_words: int = 30             # words kept by pre_caption (data/utils.py; 30 in BLIP's datasets)
    embed_dim: int = 64             # ITC space (256 in the paper)
    # method (configs/pretrain.yaml, retrieval_coco.yaml, caption_coco.yaml)
    # 57,600 in the paper; from scratch, long queues of near-equal keys dilute ITC (r 7 vs 26)
    queue_size: int = 64            # a multiple of the global batch
    momentum: float = 0.995         # EMA of the momentum encoders, applied after every finite step
    alpha: float = 0.4              # momentum-distillation weight, ramped up at the start
    temp: float = 0.07              # learnable, clamped to [0.001, 0.5]
    label_smoothing: float = 0.1    # LM loss (med.py)
    prompt: str = "a picture of "   # caption task: prefix the decoder is conditioned on, not trained on
    itm_negatives: str = "auto"     # ITM hard negatives from: local (this rank's batch, as BLIP
                                    # pretrains) | global (all ranks', as its retrieval) | auto
    k_test: int = 16                # ITM re-ranking candidates (256 COCO, 128 Flickr)
    itm_batch: int = 256            # (image, text) pairs per ITM forward when re-ranking
    num_beams: int = 3              # beam search width for captioning evaluation
    max_gen_length: int = 20        # tokens including [DEC] and the prompt, as BLIP passes to generate
    min_gen_length: int = 5         # minimum generated length (tokens, [DEC] and prompt included)
    top_p: float = 0.9              # nucleus sampling mass (CapFilt captioner)
    capfilt_samples: int = 1        # synthetic captions per image (nucleus sampling)
    capfilt_threshold: float = 0.5  # keep a caption when ITM p(match) >= this
    capfilt_output: str = ""        # default: output_dir/capfilt.json
    capfilt_filter: str = ""        # the filter's weights (ours or HF retrieval); default: the
                                    # --init-from model (the paper fine-tunes the two separately)
    # data
    min_scale: float = 0.9          # RandomResizedCrop's least area (0.2 pretraining, 0.5 fine-tuning)
    hflip: bool = False             # random flips (paper presets; tiny's captions say left/right)
    randaugment: int = 0            # RandomAugment(2, M)'s M of 10 (5: data/__init__.py); 0: off
    accum_steps: int = 1            # micro-batches per optimizer step, each against its queue
    # run
    output_dir: str = "runs/blip"
    init_from: str = ""             # HF BlipForImageTextRetrieval / -ConditionalGeneration, or ours


_BERT_BASE = dict(text_width=768, text_layers=12, text_heads=12, text_mlp_dim=3072,
                  max_positions=512, tokenizer="bert-base-uncased", embed_dim=256, dropout=0.1,
                  max_length=35, queue_size=57600, workers=8, epochs=20, warmup_steps=3000,
                  min_scale=0.2, hflip=True, randaugment=5)
PRESETS = {
    "tiny": {},
    # ViT-B/16, 224 px pretraining (384 px for fine-tuning: pass --image-size 384), batch 75/GPU
    "vit-b": dict(_BERT_BASE, image_size=224, patch_size=16, vision_width=768, vision_layers=12,
                  vision_heads=12, vision_mlp_dim=3072, batch_size=75),
    # ViT-L/16 (IN-21k), gradient checkpointing as the paper's 32-GPU runs
    "vit-l": dict(_BERT_BASE, image_size=224, patch_size=16, vision_width=1024, vision_layers=24,
                  vision_heads=16, vision_mlp_dim=4096, batch_size=50, grad_checkpointing=True),
}
# Fine-tuning recipes of vit-b / vit-l (configs/retrieval_coco.yaml, caption_coco.yaml)
FINETUNE = {
    "retrieval": dict(image_size=384, lr=1e-5, warmup_steps=0, epochs=6, batch_size=32, k_test=256,
                      queue_size=57600, grad_checkpointing=True, min_scale=0.5),
    "caption": dict(image_size=384, lr=1e-5, warmup_steps=0, epochs=5, batch_size=32,
                    min_scale=0.5),
}
TASKS = ("pretrain", "retrieval", "caption", "capfilt")
CHOICES = {"task": TASKS, "itm_negatives": ("auto", "local", "global"),
           "export_format": blip_weights.FORMATS}   # --export: the trained folders, or one
# What a resumed run may change: how it evaluates and filters, not what it trains.
RESUME_MUTABLE = ("k_test", "itm_batch", "num_beams", "max_gen_length", "min_gen_length", "top_p",
                  "capfilt_samples", "capfilt_threshold", "capfilt_output", "capfilt_filter")


def task_recipe(cfg):
    """Step 3 of resolve_config: a paper preset's fine-tuning recipe (tiny has none)."""
    return FINETUNE.get(cfg.task, {}) if cfg.preset != "tiny" else {}


RECIPES_DOC = ("task recipes (--task retrieval / caption with a paper preset; the command line "
               "overrides them):\n" + "\n".join(f"  {task}: " + ", ".join(
                   f"{k}={v}" for k, v in values.items()) for task, values in FINETUNE.items()))
# Set by the run, not by the weights: an --init-from keeps the command line's values for these
# (fine-tuning at 384 px from 224 px pretraining interpolates the position embeddings).
RUN_FIELDS = {"image_size", "queue_size"}


def settle_config(cfg, init, tokenizer):
    """Every change to cfg after the command line: tokenizer, --init-from architecture, vocab."""
    cfg.tokenizer = tokenizer.name
    arch = blip_weights.init_architecture(init, cfg.init_from)        # ours, or HF's config.json
    kept = RUN_FIELDS & cfg.explicit_keys
    cfg.__dict__.update({k: v for k, v in arch.items() if k not in kept})
    added = sum(t not in tokenizer.tok.get_vocab() for t in ("[DEC]", "[ENC]"))
    cfg.vocab_size = cfg.vocab_size or tokenizer.vocab_size + added


def check_config(cfg, tokenizer, world_size):
    """Start-up checks with clear messages; returns the prompt's length in tokens with [DEC]."""
    if cfg.task in ("pretrain", "retrieval") and cfg.queue_size % (cfg.batch_size * world_size):
        raise UserError(f"--queue-size {cfg.queue_size} is not a multiple of the global batch "
                        f"{cfg.batch_size} x {world_size} = {cfg.batch_size * world_size}")
    prompt_length = 1 + len(prompt_token_ids(tokenizer, cfg.prompt, cfg.max_positions))
    if cfg.task == "caption" and prompt_length >= min(cfg.max_length, cfg.max_gen_length) - 1:
        raise UserError(f"--prompt {cfg.prompt!r} takes {prompt_length} tokens with [DEC]; it "
                        f"leaves no room for a caption within --max-length {cfg.max_length} / "
                        f"--max-gen-length {cfg.max_gen_length}")
    if cfg.max_length > cfg.max_positions:
        raise UserError(f"--max-length {cfg.max_length} exceeds the {cfg.max_positions} position "
                        f"embeddings")
    if cfg.task == "capfilt" and not cfg.init_from:    # Sec. 3.3: both are fine-tuned first
        raise UserError("--task capfilt needs a trained captioner and filter: pass --init-from a "
                        "checkpoint of ours (run/checkpoint_best.pt) or a Hugging Face BLIP folder")
    return prompt_length


def build_model(cfg, tokenizer, init):
    """A fresh BLIP, or one with the --init-from weights at this run's image size, queues empty."""
    return blip_weights.load_init(partial(build_blip, tokenizer=tokenizer), cfg, init)


def freeze_unused(model, task):
    """Parameters a task never uses get no gradient (DDP requires one for every trainable one):
    captioning trains the ViT and the decoder; retrieval, all but its self-attention and LM head."""
    unused = []
    if task == "caption":
        unused = [model.vision_proj, model.text_proj, model.itm_head, model.temp]
        unused += [layer.attention for layer in model.text_encoder.layer]
    elif task == "retrieval":
        unused = [model.lm_head.dense, model.lm_head.LayerNorm, model.lm_head.decoder.bias]
        unused += [layer.attention for layer in model.text_decoder.layer]
    for m in unused:
        m.requires_grad_(False)


def alpha_at(cfg, step, steps_per_epoch, device):
    """Distillation weight, ramped over 2 epochs (pretrain.py) or 1 (train_retrieval.py); 0-d."""
    ramp = (2 if cfg.task == "pretrain" else 1) * steps_per_epoch
    return torch.tensor(cfg.alpha * min(1.0, step / ramp), device=device)


# ---- main: the training loop ----

def main(argv=None):
    rank, local_rank, world_size, device = dist.setup()
    cfg, ckpt = resolve_config(Config, PRESETS, argv, description=__doc__, recipe=task_recipe,
                               recipes_doc=RECIPES_DOC, choices=CHOICES, resume_mutable=RESUME_MUTABLE)
    precision = resolve_precision(cfg.precision, device)
    seed_everything(cfg.seed)                     # the same initial weights on every rank
    init = blip_weights.read_init(cfg.init_from)  # a transformers folder, or one of our checkpoints
    source = cfg.export and blip_weights.export_source(init, ckpt, cfg, PRESETS)  # ours, checked
    saved_tokenizer = init[1]["config"]["tokenizer"] if init[1] else ""   # one of our checkpoints'
    tokenizer = load_tokenizer(cfg.tokenizer or saved_tokenizer, blip_weights.hf_folders(
        cfg.init_from)[0], use_tiny=not (cfg.train_data or cfg.val_data))   # an --export's: its own
    settle_config(cfg, init, tokenizer)           # from here on cfg is only read
    model = build_model(cfg, tokenizer, init).to(device)
    del init
    if ckpt:
        model.load_state_dict(ckpt["model"])
    if cfg.export:      # --export DIR: transformers' retrieval and captioning folders, then exit
        return blip_weights.export(model, cfg, tokenizer, source)
    prompt_length = check_config(cfg, tokenizer, world_size)
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    loader, sampler, val, records = build_data(cfg, tokenizer, rank, world_size)
    log = open_log(cfg, "blip", resumed=ckpt is not None)

    evaluate_run = partial(evaluate, model, cfg, val, tokenizer, device, precision, cfg.output_dir)
    if cfg.task == "capfilt":
        return capfilt(model, cfg, records, tokenizer, device, precision, log)
    if cfg.eval_only:
        return eval_only(log, ckpt, evaluate_run)

    freeze_unused(model, cfg.task)
    # DDP, or FSDP2 sharding each transformer block and the rest (--fsdp). The queues are the same
    # on every rank (enqueued from gathered keys): DDP re-sending them would cost queue_size x E.
    train_model = dist.parallelize(model, cfg.fsdp, device, (Block, BertLayer),
                                   precision_dtype(precision), broadcast_buffers=False)
    train_model = torch.compile(train_model) if cfg.compile else train_model
    # AdamW, weight decay 0.05, not on biases, norms, embeddings, the temperature (docs/blip.md)
    optimizer = adamw(param_groups(model, cfg.weight_decay, ("temp",)), lr=cfg.lr)
    run = start_run(cfg, model, optimizer, loader, sampler, log, ckpt, precision)
    del ckpt

    with Preemption() as preemption:              # SIGTERM / SIGUSR1: save the step and leave
        for batches in epochs(run, loader):
            for group in batches:
                alpha = alpha_at(cfg, run.step, run.steps_per_epoch, device)
                # --accum-steps K: each micro-batch against the step's momentum model and queue, the
                # mean of their losses; the EMA and the K micro-batches' enqueue follow the update
                parts, keys = [], []
                for j, (images, ids, idx) in enumerate(group):    # idx: image ids (positives')
                    images, ids, idx = (x.to(device, non_blocking=True) for x in (images, ids, idx))
                    mask = (ids != tokenizer.pad_id).long()
                    with sync_gradients(train_model, j == len(group) - 1):
                        with autocast(precision, device):
                            losses = train_model(images, ids, mask, idx, alpha, cfg.task,
                                                 prompt_length)
                        run.scaler.scale(sum(losses.values()) / len(group)).backward()
                    parts.append(losses)
                    keys.append(model.pending_keys)
                losses = {k: sum(p[k] for p in parts) / len(parts) for k in parts[0]}
                loss = sum(losses.values())                 # unweighted sum, as the paper
                # a non-finite loss or gradient skips the update, the EMA and the enqueue (no sync)
                ok, grad_norm = optimizer_step(run, loss, lambda b=(images, ids, mask, idx, alpha):
                                               first_nonfinite_module(model, {"images": b[0]},
                                               lambda: model(*b, cfg.task, prompt_length)))
                model.finish_step(ok, keys)
                log_train(run, {"loss": loss, **losses}, grad_norm,
                          lambda: {"temp": dist.value(model.temp).item()})
                if step_done(run, preemption):
                    break
            end_epoch(run, evaluate_run, "cider" if cfg.task == "caption" else "r_mean", preemption)
    return finish(run, evaluate_run)


if __name__ == "__main__":
    cli(main)
