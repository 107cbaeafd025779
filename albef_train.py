"""ALBEF (Li et al. 2021, "Align before Fuse", arXiv:2107.07651): a ViT image encoder, a BERT
whose first layers are a text encoder and whose last layers a multimodal fusion encoder, trained
with three objectives at once (Sec. 3.2): image-text contrastive learning (ITC) on the unimodal
features, to *align* them before *fusing* them; image-text matching (ITM) with hard negatives
mined from the ITC similarities; and masked language modelling (MLM) conditioned on the image.
Momentum distillation (Sec. 3.4) softens the ITC and MLM targets with the predictions of an
exponential-moving-average copy of the model, which makes noisy web captions less harmful.

The paper, in this file:
    Fig. 1             ViT, text encoder, fusion encoder (cross-attn) ALBEF, ALBEF.fuse
    Sec. 3.2, Eq. 1-2  ITC against momentum keys and their queues    ALBEF.loss_itc
    Sec. 3.2           ITM, hard negatives drawn by ITC similarity   ALBEF.loss_itm, hard_negatives
    Sec. 3.2, Eq. 3    MLM conditioned on the image                  ALBEF.loss_mlm, mask_tokens
    Sec. 3.4, Eq. 6-7  momentum distillation: pseudo-targets q       pseudo_targets, alpha_at
    Sec. 3.4           the momentum model (EMA) and the queues       ALBEF.finish_step
    Sec. 4             retrieval: ITC top-k re-ranked by ITM         evaluate_retrieval
    the configs        pretraining and fine-tuning recipes           PRESETS, FINETUNE
Published weights: common/weights/albef.py; differences from the official code: docs/albef.md.

    python albef_train.py                                  # tiny built-in data, pretraining, CPU
    torchrun --nproc_per_node 8 albef_train.py --preset vit-b \\
        --init-from deit_base_patch16_224.pth --init-text bert-base-uncased/ \\
        --train-data cc3m.json --val-data coco_karpathy_val.json
    torchrun --nproc_per_node 8 albef_train.py --preset vit-b --task retrieval \\
        --init-from ALBEF.pth --tokenizer bert-base-uncased \\
        --train-data coco_karpathy_train.json --val-data coco_karpathy_test.json
    python albef_train.py --preset vit-b --task retrieval --eval-only --init-from mscoco.pth \\
        --tokenizer bert-base-uncased --val-data flickr30k_test.json --k-test 128  # zero-shot
"""
import copy
import dataclasses
import functools
import os
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import dist
from common.config import BaseConfig, resolve_config
from common.data import (Example, load_tokenizer, pre_caption_albef, read_annotations,
                         retrieval_texts, tiny_data, train_loader, train_transform,
                         training_records)
from common.encoders import BertEncoder, BertLayer, BertLMHead, Block, VisionTransformer
from common.metrics import image_tokens, rerank_topk, retrieval_metrics
from common.run import (end_epoch, epochs, eval_only, finish, log_train, open_log, optimizer_step,
                        start_run, step_done)
from common.utils import (Preemption, UserError, adamw, autocast, cli, first_nonfinite_module,
                          precision_dtype, resolve_precision, seed_everything, sync_gradients)
from common.weights import albef as albef_weights


# ---- model ----

class ALBEF(nn.Module):
    """Fig. 1: image encoder (ViT), text encoder (BERT layers [0, fusion)), multimodal encoder
    (BERT layers [fusion, L) with cross-attention to the image tokens), ITC projections, ITM
    head and MLM head, and the momentum model with its feature queues."""

    def __init__(self, cfg, *, mask_id, pad_id, cls_id):
        super().__init__()
        self.cfg = cfg
        self.mask_id, self.pad_id, self.cls_id = mask_id, pad_id, cls_id
        self.fusion_layer = cfg.fusion_layer
        self.visual_encoder = VisionTransformer(
            image_size=cfg.image_size, patch_size=cfg.patch_size, width=cfg.vision_width,
            layers=cfg.vision_layers, heads=cfg.vision_heads, mlp_dim=cfg.vision_mlp_dim,
            act="gelu", eps=cfg.vision_eps, pre_norm=False, patch_bias=True)
        # One BERT: no cross-attention below fusion_layer (config_bert.json: "fusion_layer": 6).
        self.text_encoder = BertEncoder(
            vocab_size=cfg.vocab_size, width=cfg.text_width, layers=cfg.text_layers,
            heads=cfg.text_heads, mlp_dim=cfg.text_mlp_dim, max_positions=cfg.max_positions,
            type_vocab_size=cfg.type_vocab_size, cross_dim=cfg.vision_width,
            cross_layers=range(cfg.fusion_layer, cfg.text_layers), eps=cfg.text_eps,
            dropout=cfg.dropout)
        # MLM head of BertForMaskedLM, its decoder tied to the word embeddings (as bert-base).
        self.mlm_head = BertLMHead(cfg.text_width, cfg.vocab_size, eps=cfg.text_eps)
        self.mlm_head.decoder.weight = self.text_encoder.word_embeddings.weight
        self.vision_proj = nn.Linear(cfg.vision_width, cfg.embed_dim)     # 768 -> 256, with bias
        self.text_proj = nn.Linear(cfg.text_width, cfg.embed_dim)
        self.itm_head = nn.Linear(cfg.text_width, 2)
        self.temp = nn.Parameter(torch.tensor(cfg.temp))
        # Momentum model (Sec. 3.4): EMA copies of the ViT, the BERT with its MLM head, and the
        # projections. It gives the ITC keys, the pseudo-targets of ITC and MLM, and the queues.
        self.visual_encoder_m = copy.deepcopy(self.visual_encoder)
        self.text_encoder_m = copy.deepcopy(self.text_encoder)
        self.mlm_head_m = copy.deepcopy(self.mlm_head)
        self.mlm_head_m.decoder.weight = self.text_encoder_m.word_embeddings.weight
        self.vision_proj_m = copy.deepcopy(self.vision_proj)
        self.text_proj_m = copy.deepcopy(self.text_proj)
        for p in self.momentum_params():
            p.requires_grad_(False)
        # Queues of momentum features of past batches of all ranks, and their image ids (Sec. 3.2:
        # "the most recent M image-text representations from the momentum unimodal encoders").
        # They start empty: a slot takes part in ITC once `queue_filled` says it holds a key.
        self.register_buffer("image_queue", torch.zeros(cfg.embed_dim, cfg.queue_size))
        self.register_buffer("text_queue", torch.zeros(cfg.embed_dim, cfg.queue_size))
        self.register_buffer("idx_queue", torch.full((1, cfg.queue_size), -100, dtype=torch.long))
        self.register_buffer("queue_filled", torch.zeros(1, cfg.queue_size, dtype=torch.bool))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self._ptr, self.pending_keys, self._ema_params = None, None, None
        self.register_load_state_dict_post_hook(lambda module, keys: setattr(module, "_ptr", None))

    # -- the momentum model and the queues (Sec. 3.4) --

    def online_and_momentum(self):
        """(online, momentum) ModuleLists in the same order; their .parameters() list each tied
        tensor once (the MLM decoder is the word-embedding matrix), so the EMA updates it once."""
        names = ("visual_encoder", "text_encoder", "mlm_head", "vision_proj", "text_proj")
        return (nn.ModuleList(getattr(self, n) for n in names),
                nn.ModuleList(getattr(self, n + "_m") for n in names))

    def momentum_params(self):
        return list(self.online_and_momentum()[1].parameters())

    def copy_to_momentum(self):
        online, momentum = self.online_and_momentum()
        with torch.no_grad():
            for p, p_m in zip(online.parameters(), momentum.parameters()):
                p_m.copy_(p)

    @torch.no_grad()
    def finish_step(self, ok=None, keys=None):
        """After the optimizer step: the momentum EMA and the enqueue of this step's momentum keys,
        both only if the step was finite (`ok`, a 0-d bool tensor; None = finite)."""
        self.momentum_update(ok)
        self.temp.clamp_(0.001, 0.5)     # as forward does; under FSDP this is the sharded parameter
        # `keys`: each micro-batch's pending_keys (--accum-steps), in order
        for k in [self.pending_keys] if keys is None else keys:
            if k is not None:
                self.dequeue_and_enqueue(*k, ok=ok)
        self.pending_keys = None

    @torch.no_grad()
    def momentum_update(self, ok=None):
        """theta_m <- m * theta_m + (1 - m) * theta: a lerp by 1 - m (by 0 after a bad step)."""
        weight = 1 - self.cfg.momentum
        if ok is not None:
            weight = ok.float() * weight
        if self._ema_params is None:     # walked once, not every step
            online, momentum = self.online_and_momentum()
            self._ema_params = (list(online.parameters()), list(momentum.parameters()))
        torch._foreach_lerp_(self._ema_params[1], self._ema_params[0], weight)

    @torch.no_grad()
    def dequeue_and_enqueue(self, image_feat, text_feat, idx, ok=None):
        """Replace the oldest entries with this step's momentum features from every rank, in rank
        order. A non-finite step (`ok` False) writes the old entries back: the contents stay, the
        pointer moves on, so it stays aligned with the global batch."""
        image_feat, text_feat, idx = (dist.gather_no_grad(x) for x in (image_feat, text_feat, idx))
        if self._ptr is None:           # a host copy of queue_ptr: no GPU sync per step
            self._ptr = int(self.queue_ptr)
        n, ptr = image_feat.shape[0], self._ptr
        if ptr + n > self.cfg.queue_size:
            raise UserError(f"queue pointer {ptr} + global batch {n} overruns the queue of "
                            f"{self.cfg.queue_size}: the queue length must stay a multiple of the "
                            f"global batch")
        filled = torch.ones_like(idx[None], dtype=torch.bool)
        for queue, new in ((self.image_queue, image_feat.T), (self.text_queue, text_feat.T),
                           (self.idx_queue, idx[None]), (self.queue_filled, filled)):
            old = queue[:, ptr:ptr + n]
            queue[:, ptr:ptr + n] = new if ok is None else torch.where(ok, new.to(queue.dtype), old)
        self._ptr = (ptr + n) % self.cfg.queue_size
        self.queue_ptr.fill_(self._ptr)

    def set_grad_checkpointing(self, enabled=True):
        self.visual_encoder.transformer.grad_checkpointing = enabled
        self.text_encoder.grad_checkpointing = enabled

    # -- encoders (Fig. 1) --

    def image_embed(self, images):                                # ViT tokens (B, 1 + P, Dv)
        return self.visual_encoder(images)

    def image_feat(self, image_embeds):                           # ITC space, [CLS] -> (B, E)
        return F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)

    def text_embed(self, ids, mask):
        """Text encoder: BERT layers [0, fusion_layer), no image. (B, L, Dt)."""
        return self.text_encoder(ids, mask, end=self.fusion_layer)

    def text_feat(self, text_embeds):                             # ITC space, [CLS] -> (B, E)
        return F.normalize(self.text_proj(text_embeds[:, 0]), dim=-1)

    def fuse(self, text_embeds, mask, image_embeds):
        """Multimodal encoder: layers [fusion_layer, L), cross-attending to all image tokens."""
        return self.text_encoder(None, mask, context=image_embeds, start=self.fusion_layer,
                                 hidden=text_embeds)

    def itm_logits(self, text_embeds, mask, image_embeds):        # (B, 2): [no match, match]
        return self.itm_head(self.fuse(text_embeds, mask, image_embeds)[:, 0])

    def encode_image(self, images):
        return self.image_feat(self.image_embed(images))

    def encode_text(self, ids, mask):
        return self.text_feat(self.text_embed(ids, mask))

    def forward(self, images, ids, mask, idx, alpha, task="pretrain"):
        """Losses of one (micro-)batch. idx: (B,) image ids (positives share one in retrieval);
        alpha: the distillation weight, a 0-d tensor (a float would recompile a compiled step)."""
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        image_embeds = self.image_embed(images)                   # (B, 1 + P, Dv)
        image_feat = self.image_feat(image_embeds)                # (B, E)
        text_embeds = self.text_embed(ids, mask)                  # (B, L, Dt)
        text_feat = self.text_feat(text_embeds)                   # (B, E)
        with torch.no_grad():                                     # the momentum model's view
            image_embeds_m = self.visual_encoder_m(images)
            image_feat_m = F.normalize(self.vision_proj_m(image_embeds_m[:, 0]), dim=-1)
            text_embeds_m = self.text_encoder_m(ids, mask, end=self.fusion_layer)
            text_feat_m = F.normalize(self.text_proj_m(text_embeds_m[:, 0]), dim=-1)
        losses = {}
        # --- ITC with momentum distillation (Sec. 3.2, 3.4) ---
        losses["loss_itc"] = self.loss_itc(image_feat, text_feat, image_feat_m, text_feat_m, idx,
                                           alpha, task)
        # --- ITM with hard negatives mined from the contrastive similarities (Sec. 3.2) ---
        losses["loss_itm"] = self.loss_itm(text_embeds, mask, image_embeds, idx, image_feat,
                                           text_feat, image_feat_m, text_feat_m)
        # --- MLM with the image, and momentum distillation (Sec. 3.2, 3.4); pretraining only ---
        if task == "pretrain":
            losses["loss_mlm"] = self.loss_mlm(ids, mask, image_embeds, image_embeds_m, alpha)
        return losses

    @classmethod
    def from_official(cls, path, cfg=None, tokenizer=None, state=None):
        """Build from a released ALBEF checkpoint (ALBEF.pth, mscoco.pth, ...; `state`: its state
        dict if read), every key mapped (common/weights/albef.py), at `cfg`'s image size. Without
        a tokenizer: bert-base-uncased's [MASK], [PAD], [CLS], which every release uses."""
        state = albef_weights.read_official(path) if state is None else state
        arch = albef_weights.official_architecture(state, path)
        if cfg is not None:
            arch.pop("image_size")      # the run's: positions are interpolated to it
        cfg = dataclasses.replace(cfg or Config(), **arch)
        model = (build_albef(cfg, tokenizer) if tokenizer is not None
                 else cls(cfg, mask_id=103, pad_id=0, cls_id=101))
        albef_weights.load_official(model, state, path)
        return model

    # ---- losses ----

    def loss_itc(self, image_feat, text_feat, image_feat_m, text_feat_m, idx, alpha, task):
        """s(I, T) = g_v(v_cls) . g'_w(w'_cls) / tau against the momentum keys of this batch and
        the queue (Eq. 1-2); targets alpha * q (the momentum model's softmax) + (1 - alpha) * y
        (Eq. 6), y the diagonal in pretraining, every key of the same image id in retrieval. Empty
        queue slots are in no softmax. The batch's keys wait in `pending_keys` for finish_step()."""
        B = idx.shape[0]
        with torch.no_grad():
            image_keys = torch.cat([image_feat_m.T, self.image_queue.clone()], 1)   # (E, B + M)
            text_keys = torch.cat([text_feat_m.T, self.text_queue.clone()], 1)
            filled = F.pad(self.queue_filled, (B, 0), value=True)                   # (1, B + M)
            if task == "retrieval":
                idx_all = torch.cat([idx[None], self.idx_queue.clone()], 1)         # (1, B + M)
                pos = ((idx[:, None] == idx_all) & filled).float()
                targets = pos / pos.sum(1, keepdim=True)
            else:                                                                   # (B, B + M)
                targets = F.pad(torch.eye(B, device=idx.device), (0, image_keys.shape[1] - B))

        def only_filled(sim):       # empty slots: -inf, so that they get no share of a softmax
            return sim.masked_fill(~filled, float("-inf"))

        def cross_entropy(sim, target):     # 0 * -inf at the empty slots would be NaN: take 0
            log_p = F.log_softmax(only_filled(sim), 1).masked_fill(~filled, 0)
            return -(log_p * target).sum(1).mean()
        # Similarities in fp32 even under autocast: at temperature 0.07 (down to 0.001) bf16's
        # spacing near the largest logits would be coarser than the differences that matter.
        with torch.autocast(image_feat.device.type, enabled=False):
            image_keys, text_keys = image_keys.float(), text_keys.float()
            with torch.no_grad():
                q_i2t = pseudo_targets(only_filled(image_feat_m.float() @ text_keys / self.temp))
                q_t2i = pseudo_targets(only_filled(text_feat_m.float() @ image_keys / self.temp))
                i2t_targets = alpha * q_i2t + (1 - alpha) * targets
                t2i_targets = alpha * q_t2i + (1 - alpha) * targets
            sim_i2t = image_feat.float() @ text_keys / self.temp                     # (B, B + M)
            sim_t2i = text_feat.float() @ image_keys / self.temp
            loss_i2t = cross_entropy(sim_i2t, i2t_targets)
            loss_t2i = cross_entropy(sim_t2i, t2i_targets)
        self.pending_keys = (image_feat_m.float(), text_feat_m.float(), idx)
        return (loss_i2t + loss_t2i) / 2

    def loss_itm(self, text_embeds, mask, image_embeds, idx, image_feat, text_feat, image_feat_m,
                 text_feat_m):
        """Every positive pair, plus per text a hard negative image and per image a hard negative
        text, drawn from softmax(s) over the batch (Sec. 3.2: "negatives that have higher
        contrastive similarity ... have a higher chance to be sampled"), s of the online features
        to the momentum keys. This rank's batch, or every rank's with --itm-negatives global (the
        image tokens and text-encoder outputs gathered with gradient)."""
        B = idx.shape[0]
        all_ranks = self.cfg.itm_negatives == "global"
        neg_image, neg_text, idx_all = hard_negatives(image_feat, text_feat, image_feat_m,
                                                      text_feat_m, idx, self.temp, all_ranks)
        text_all, mask_all, image_all = text_embeds, mask, image_embeds          # (B,) into these
        if all_ranks:
            text_all, mask_all = dist.gather_with_grad(text_embeds), dist.gather_no_grad(mask)
            image_all = dist.gather_with_grad(image_embeds)
        # positive, negative image, negative text
        texts = torch.cat([text_embeds, text_embeds, text_all[neg_text]])
        masks = torch.cat([mask, mask, mask_all[neg_text]])
        images = torch.cat([image_embeds, image_all[neg_image], image_embeds])
        logits = self.itm_logits(texts, masks, images)                            # (3B, 2)
        # A sampled "negative" that shares the image id (only possible when a row had no valid
        # negative: a batch of one, all ids equal) is labelled a match, so labels never lie.
        labels = torch.cat([torch.ones(B, dtype=torch.long, device=idx.device),
                            (idx_all[neg_image] == idx).long(), (idx_all[neg_text] == idx).long()])
        return F.cross_entropy(logits.float(), labels)

    def loss_mlm(self, ids, mask, image_embeds, image_embeds_m, alpha):
        """Predict masked words from the other words and the image, through all BERT layers
        (Sec. 3.2, Eq. 3): 15% of the tokens, 80% of them replaced by [MASK], 10% by a random
        token, 10% kept. Distillation (Eq. 7): (1 - alpha) * CE(y) + alpha * CE(q), q the momentum
        model's softmax for the same masked input, both averaged over the masked positions."""
        masked_ids, labels = mask_tokens(ids, self.cfg.mlm_probability, self.mask_id,
                                         self.cfg.vocab_size, never=(self.pad_id, self.cls_id))
        h = self.text_encoder(masked_ids, mask, context=image_embeds)
        logits = self.mlm_head(h).float()                                         # (B, L, V)
        with torch.no_grad():
            h_m = self.text_encoder_m(masked_ids, mask, context=image_embeds_m)
            soft = pseudo_targets(self.mlm_head_m(h_m))
        predicted = labels != -100
        # one cross-entropy against (1 - alpha) one-hot + alpha q = (1 - alpha) CE(y) + alpha CE(q)
        hard = (1 - alpha).expand(labels.shape)[..., None].to(soft.dtype)
        target = soft.mul_(alpha).scatter_add_(-1, labels.clamp(min=0)[..., None], hard)
        per_token = F.cross_entropy(logits.flatten(0, 1), target.flatten(0, 1),
                                    reduction="none").view(labels.shape)
        # Mean over the masked tokens; a batch where nothing was masked (very short captions)
        # gives 0, not 0/0.
        return (per_token * predicted).sum() / predicted.sum().clamp(min=1)


def pseudo_targets(logits_m):
    """Momentum distillation's pseudo-targets q (Sec. 3.4): the momentum model's softmax over the
    last dimension (ITC: the keys; MLM: the vocabulary), in fp32."""
    return F.softmax(logits_m.float(), -1)


def mask_tokens(ids, probability, mask_id, vocab_size, never, generator=None):
    """BERT's masking (Devlin et al. 2019): each token but the `never` ids ([PAD], [CLS]) is
    chosen with `probability`; a chosen one becomes [MASK] with probability 0.8, a random token
    with 0.1, stays with 0.1. Returns the masked ids and the labels (-100 where not chosen)."""
    g = dict(device=ids.device, generator=generator)
    chosen = torch.rand(ids.shape, **g) < probability
    for t in never:
        chosen &= ids != t
    labels = ids.masked_fill(~chosen, -100)
    u = torch.rand(ids.shape, **g)
    masked = torch.where(chosen & (u < 0.8), torch.full_like(ids, mask_id), ids)
    random_words = torch.randint(vocab_size, ids.shape, **g)
    masked = torch.where(chosen & (u >= 0.9), random_words, masked)
    return masked, labels


@torch.no_grad()
def hard_negatives(image_feat, text_feat, image_keys, text_keys, idx, temp, all_ranks=False):
    """For each text a negative image and for each image a negative text, drawn from
    softmax(query . key / temp) over this rank's batch (or every rank's), never one with the same
    image id; queries online, keys momentum. Returns (neg_image, neg_text, idx_all)."""
    gather = dist.gather_no_grad if all_ranks else (lambda x: x)
    idx_all = gather(idx)                                                          # (N,)
    sim_i2t = image_feat.float() @ gather(text_keys).float().T / temp              # (B, N)
    sim_t2i = text_feat.float() @ gather(image_keys).float().T / temp
    same = idx[:, None] == idx_all[None, :]                   # the positive and its duplicates
    neg_image = sample_negatives(F.softmax(sim_t2i, 1).masked_fill(same, 0))
    neg_text = sample_negatives(F.softmax(sim_i2t, 1).masked_fill(same, 0))
    return neg_image, neg_text, idx_all


def sample_negatives(weights):
    """One index per row, drawn with probability proportional to `weights` (B, N): argmax_j
    w_j / E_j, E_j ~ Exp(1), as torch.multinomial but with no host sync. Rows with no mass left
    (a batch of one, all the same image id, NaN) draw uniformly."""
    weights = torch.nan_to_num(weights.float(), nan=0.0, posinf=0.0, neginf=0.0).clamp_(min=0)
    weights = torch.where(weights.sum(1, keepdim=True) > 0, weights, 1.0)   # no boolean indexing
    noise = torch.empty_like(weights).exponential_().clamp_(min=1e-30)   # E = 0: 0/0 a NaN
    return (weights / noise).argmax(1)


# ---- data ----

def caption_text(cfg):
    """ALBEF's text processing of every caption, in training and evaluation (dataset/utils.py)."""
    return functools.partial(pre_caption_albef, max_words=cfg.max_words)


def build_data(cfg, tokenizer, rank, world_size):
    """Training loader and sampler (none with --eval-only), val records. With neither
    --train-data nor --val-data, the built-in tiny set."""
    tiny = None if (cfg.train_data or cfg.val_data) else tiny_data()
    val_file = cfg.val_data or (os.path.join(tiny, "val.json") if tiny else "")
    root = cfg.image_root or None
    val = read_annotations(val_file, root) if val_file else None
    if cfg.eval_only:
        return None, None, val
    train_file = cfg.train_data or os.path.join(tiny_data(), "train.json")
    # the paper preset's crop, flip, RandomAugment; tiny's light crop has no flip (left/right)
    transform = train_transform(cfg.image_size, cfg.min_scale, cfg.hflip, cfg.randaugment)
    example = Example(transform, tokenizer, cfg.max_length, text=caption_text(cfg))
    records = training_records(train_file, root, cfg.skip_bad)     # an annotation file's, or shards
    loader, sampler = train_loader(records, example, cfg, rank, world_size, train_file)
    return loader, sampler, val


# ---- evaluation (Sec. 4; Retrieval.py) ----

def shard_image_tokens(model, cfg, records, device, precision):
    return image_tokens(model.image_embed, [r["image"] for r in records], cfg.image_size,
                        cfg.batch_size, cfg.workers, device, precision)


@torch.no_grad()
def evaluate_retrieval(model, cfg, val, tokenizer, device, precision, tokens=None):
    """ITC similarity s_itc for all pairs, then the ITM head re-ranks each row's top-k candidates
    by s_itm (Sec. 4), or s_itm + s_itc with --rerank-score itm+itc; -100 outside the top k.
    Every rank embeds its shard of the texts (their text-encoder outputs gathered, in the autocast
    dtype) and of the images (its ViT `tokens`, kept); each pair is scored by the rank that holds
    the image. Returns the metrics and the number of ITM forward passes."""
    texts, txt2img = retrieval_texts(val, caption_text(cfg))
    ids = tokenizer(texts, cfg.max_length).to(device)
    mask = (ids != tokenizer.pad_id).long()
    half = precision_dtype(precision)
    t0, t1 = dist.shard_range(len(texts))
    text_feat = [torch.zeros(0, cfg.embed_dim, device=device)]
    text_embeds = [torch.zeros(0, cfg.max_length, cfg.text_width, device=device, dtype=half)]
    for i in range(t0, t1, cfg.batch_size):
        j = min(i + cfg.batch_size, t1)
        with autocast(precision, device):
            h = model.text_embed(ids[i:j], mask[i:j])
            text_feat.append(model.text_feat(h).float())
        text_embeds.append(h.to(half))
    text_feat = dist.gather_varlen(torch.cat(text_feat))                          # (n_txt, E)
    text_embeds = dist.gather_varlen(torch.cat(text_embeds))                      # (n_txt, L, Dt)
    i0, i1 = dist.shard_range(len(val))
    if tokens is None:                                                       # (mine, 1 + P, Dv)
        tokens = shard_image_tokens(model, cfg, val[i0:i1], device, precision)
    image_feat = [torch.zeros(0, cfg.embed_dim, device=device)]
    for i in range(0, len(tokens), cfg.batch_size):
        with autocast(precision, device):
            image_feat.append(model.image_feat(tokens[i:i + cfg.batch_size]).float())
    image_feat = dist.gather_varlen(torch.cat(image_feat))                        # (n_img, E)
    sim = image_feat @ text_feat.T                                                # (n_img, n_txt)
    k = min(cfg.k_test, len(texts), len(val))

    def itm(t, i):        # ITM match logits of texts t (text-encoder outputs), this rank's images i
        with autocast(precision, device):
            return model.itm_logits(text_embeds[t], mask[t], tokens[i])[:, 1].float()
    rows_i2t, rows_t2i = rerank_topk(sim, (i0, i1), k, itm, cfg.itm_batch,
                                     add_similarity=cfg.rerank_score == "itm+itc")
    metrics = retrieval_metrics(rows_i2t, txt2img, rows_t2i)
    metrics["itc_r_mean"] = retrieval_metrics(sim, txt2img)["r_mean"]         # before re-ranking
    return metrics, k * (len(texts) + len(val))


@torch.no_grad()
def evaluate_mlm(model, cfg, val, tokenizer, device, precision, tokens=None):
    """MLM accuracy on the val captions with their images: training's masking from a fixed seed,
    top-1 at the masked positions; `mlm_acc_majority`: always the most frequent masked token (what
    a model ignoring its input reaches). Images split over ranks (`tokens`: this rank's ViT's)."""
    recs = val[slice(*dist.shard_range(len(val)))]
    if tokens is None:
        tokens = shard_image_tokens(model, cfg, recs, device, precision)
    ids = tokenizer(retrieval_texts(recs, caption_text(cfg))[0], cfg.max_length).to(device)
    image_of = torch.tensor([i for i, r in enumerate(recs) for _ in r["captions"]],
                            dtype=torch.long, device=device)
    masked, labels = mask_tokens(ids, cfg.mlm_probability, model.mask_id, cfg.vocab_size,
                                 never=(model.pad_id, model.cls_id),
                                 generator=torch.Generator(device=device).manual_seed(cfg.seed))
    correct = torch.zeros((), device=device)
    for a in range(0, len(ids), cfg.batch_size):
        b = slice(a, a + cfg.batch_size)
        with autocast(precision, device):
            h = model.text_encoder(masked[b], (ids[b] != tokenizer.pad_id).long(),
                                   context=tokens[image_of[b]])
            predicted = model.mlm_head(h).argmax(-1)
        chosen = labels[b] != -100
        correct += (predicted[chosen] == labels[b][chosen]).sum()
    counts = torch.bincount(labels[labels != -100], minlength=cfg.vocab_size).float()
    correct, counts = dist.all_reduce_sum(correct), dist.all_reduce_sum(counts)
    total = counts.sum().clamp(min=1)
    return {"mlm_acc": float(100 * correct / total),
            "mlm_acc_majority": float(100 * counts.max() / total), "mlm_tokens": int(counts.sum())}


@torch.no_grad()
def evaluate(model, cfg, val, tokenizer, device, precision):
    if val is None:
        return {}
    was_training = model.training
    model.eval()
    tick = time.time()
    mine = val[slice(*dist.shard_range(len(val)))]
    tokens = shard_image_tokens(model, cfg, mine, device, precision)             # the ViT once
    metrics, n_itm = evaluate_retrieval(model, cfg, val, tokenizer, device, precision, tokens)
    metrics.update(itm_pairs=n_itm, retrieval_eval_s=time.time() - tick)
    if cfg.task == "pretrain":
        metrics.update(evaluate_mlm(model, cfg, val, tokenizer, device, precision, tokens))
    model.train(was_training)
    return metrics


# ---- config and presets ----

@dataclass
class Config(BaseConfig):
    task: str = "pretrain"          # pretrain (ITC+ITM+MLM) | retrieval (ITC+ITM, by image id)
    # vision: ViT-B/16 initialised from DeiT (timm blocks, no pre-norm, final norm, LN eps 1e-6)
    image_size: int = 64            # pixels (256 pretraining, 384 retrieval fine-tuning)
    patch_size: int = 8             # pixels per patch side
    vision_width: int = 128         # ViT width
    vision_layers: int = 4          # ViT blocks
    vision_heads: int = 2           # ViT attention heads
    vision_eps: float = 1e-6        # ViT LayerNorm epsilon
    vision_mlp_dim: int = 512       # ViT MLP hidden width (3072 in ViT-B)
    # text: a bert-base; layers [0, fusion_layer) the text encoder, the rest the fusion encoder
    text_width: int = 128           # BERT width
    text_layers: int = 4            # BERT layers, text and fusion together (12 in the paper)
    fusion_layer: int = 2           # first layer with cross-attention to the image (6 in the paper)
    text_heads: int = 2             # BERT attention heads
    text_mlp_dim: int = 512         # BERT feed-forward width
    max_positions: int = 64         # BERT's 512
    type_vocab_size: int = 2        # BERT's token types: row 0 is added to every token
    text_eps: float = 1e-12         # BERT LayerNorm epsilon
    dropout: float = 0.0            # BERT hidden/attention dropout (0.1 in config_bert.json)
    vocab_size: int = 0             # 0: the tokenizer's
    max_length: int = 32            # tokens with [CLS] and [SEP] (25 pretraining, 30 fine-tuning)
    max_words: int = 30             # words kept by pre_caption (dataset/utils.py; 30 everywhere)
    embed_dim: int = 64             # ITC space (256 in the paper)
    # method (configs/Pretrain.yaml, Retrieval_coco.yaml)
    # Queue: 65,536 in the paper; tiny trains from scratch, where every feature starts nearly the
    # same and a long queue of such keys dilutes the ITC gradient ~queue/batch-fold (docs/albef.md)
    queue_size: int = 64            # a multiple of the global batch
    momentum: float = 0.995         # EMA of the momentum model, applied after every finite step
    alpha: float = 0.4              # momentum-distillation weight, ramped up over the first epoch
    temp: float = 0.07              # ITC temperature: learnable, clamped to [0.001, 0.5]
    mlm_probability: float = 0.15   # share of tokens masked for MLM (Sec. 3.2)
    itm_negatives: str = "local"    # ITM hard negatives from: local (this rank's batch) | global
                                    # (every rank's: harder negatives, one more all-gather)
    k_test: int = 16                # ITM re-ranking candidates per query (256 COCO, 128 Flickr)
    rerank_score: str = "itm"       # itm: the ITM match logit (the paper) | itm+itc: + cosine
    itm_batch: int = 256            # (image, text) pairs per ITM forward when re-ranking
    # data
    val_data: str = ""              # retrieval evaluation split; empty with tiny: its val split
    tokenizer: str = ""             # transformers folder or name (bert-base-uncased); empty: tiny's
    min_scale: float = 0.9          # RandomResizedCrop's least area (0.2 pretrain, 0.5 fine-tune)
    hflip: bool = False             # random flips (paper presets; tiny's captions say left/right)
    randaugment: int = 0            # RandomAugment(2, M)'s M of 10 (7: dataset/__init__.py); 0: off
    # optimisation
    batch_size: int = 32            # per process; the queue grows by it x accum x world per step
    accum_steps: int = 1            # micro-batches per step, each against the step's queue
    lr: float = 3e-4                # peak learning rate (1e-4 pretraining, 1e-5 fine-tuning)
    warmup_lr: float = 0.0          # warm-up starts here (1e-5 in the paper); 0: lr / warmup_steps
    min_lr: float = 0.0             # the cosine ends here (1e-5 pretraining, 1e-6 fine-tuning)
    weight_decay: float = 0.02      # AdamW decoupled weight decay (not on biases and 1-D tensors)
    # run
    output_dir: str = "runs/albef"
    init_from: str = ""             # official ALBEF file (ALBEF.pth, mscoco.pth, ...), ours, or a
                                    # DeiT/ViT to pretrain from (timm file, transformers folder)
    init_text: str = ""             # BERT folder (bert-base-uncased): text and fusion encoders


PRESETS = {
    "tiny": {},
    # ViT-B/16 + bert-base, 256 px, 30 epochs, batch 64/GPU on 8 GPUs (configs/Pretrain.yaml)
    "vit-b": dict(image_size=256, patch_size=16, vision_width=768, vision_layers=12,
                  vision_heads=12, vision_mlp_dim=3072, text_width=768, text_layers=12,
                  fusion_layer=6, text_heads=12, text_mlp_dim=3072, max_positions=512, dropout=0.1,
                  tokenizer="bert-base-uncased", max_length=25, embed_dim=256, queue_size=65536,
                  lr=1e-4, warmup_lr=1e-5, min_lr=1e-5, weight_decay=0.02, warmup_steps=2000,
                  epochs=30, batch_size=64, workers=8, min_scale=0.2, hflip=True, randaugment=7),
}
# Retrieval fine-tuning with --preset vit-b --task retrieval, under the command line
# (configs/Retrieval_coco.yaml; Flickr30K: --epochs 10 --k-test 128)
FINETUNE = {
    "retrieval": dict(image_size=384, lr=1e-5, warmup_lr=1e-5, min_lr=1e-6, warmup_steps=0,
                      epochs=5, batch_size=32, max_length=30, k_test=256, min_scale=0.5),
}
TASKS = ("pretrain", "retrieval")
CHOICES = {"task": TASKS, "itm_negatives": ("local", "global"), "rerank_score": ("itm", "itm+itc"),
           "export_format": ("official",)}
RESUME_MUTABLE = ("k_test", "itm_batch", "rerank_score")


def task_recipe(cfg):
    """--task retrieval's recipe with a paper preset (over the preset, under the command line)."""
    return FINETUNE.get(cfg.task, {}) if cfg.preset != "tiny" else {}


RECIPES_DOC = ("task recipes (--task retrieval with a paper preset; the command line overrides "
               "them):\n" + "\n".join(f"  {t}: " + ", ".join(f"{k}={v}" for k, v in r.items())
                                      for t, r in FINETUNE.items()))
MODEL_FIELDS = ("image_size", "patch_size", "vision_width", "vision_layers", "vision_heads",
                "vision_eps", "vision_mlp_dim", "text_width", "text_layers", "fusion_layer",
                "text_heads", "text_mlp_dim", "max_positions", "type_vocab_size", "text_eps",
                "vocab_size", "embed_dim", "queue_size")
# Set by the run, not the weights, when the command line or the task recipe gives them: fine-tuning
# at 384 px from our 256 px pretraining checkpoint interpolates the position embeddings.
RUN_FIELDS = ("image_size", "queue_size")


def settle_config(cfg, init, tokenizer):
    """Every change to cfg after the command line, in one place: the tokenizer's name, the
    architecture of the --init-from weights (an official file's at the run's image size; ours but
    the RUN_FIELDS set on purpose), a fresh model's vocabulary size (the tokenizer's)."""
    kind = init[0]
    if cfg.init_text and kind in ("official", "ours"):
        raise UserError("--init-text starts a BERT for pretraining from scratch; --init-from "
                        f"{cfg.init_from} already holds the text encoder")
    cfg.tokenizer = tokenizer.name
    arch = albef_weights.init_architecture(init, cfg.init_from, MODEL_FIELDS)
    kept = set(RUN_FIELDS) & (set(getattr(cfg, "explicit_keys", ())) | set(task_recipe(cfg)))
    cfg.__dict__.update({k: v for k, v in arch.items() if k not in kept})
    cfg.vocab_size = cfg.vocab_size or tokenizer.vocab_size


def check_config(cfg, world_size):
    """Start-up checks with clear messages (instead of an assert deep in the first step)."""
    if cfg.queue_size % (cfg.batch_size * world_size):
        raise UserError(f"--queue-size {cfg.queue_size} is not a multiple of the global batch "
                        f"{cfg.batch_size} x {world_size} = {cfg.batch_size * world_size}")
    if not 0 < cfg.fusion_layer < cfg.text_layers:
        raise UserError(f"--fusion-layer {cfg.fusion_layer} must leave text layers below it and "
                        f"fusion layers from it up to --text-layers {cfg.text_layers}")
    if cfg.max_length > cfg.max_positions:
        raise UserError(f"--max-length {cfg.max_length} exceeds the {cfg.max_positions} position "
                        f"embeddings")
    if not 0 < cfg.mlm_probability < 1:
        raise UserError(f"--mlm-probability {cfg.mlm_probability} must be in (0, 1)")


def build_albef(cfg, tokenizer):
    """An ALBEF at cfg's architecture with the tokenizer's [MASK], [PAD] and [CLS] ids."""
    if cfg.vocab_size < tokenizer.vocab_size:
        raise UserError(f"model vocabulary {cfg.vocab_size} is smaller than the tokenizer's "
                        f"{tokenizer.vocab_size}")
    if tokenizer.tok.mask_token_id is None:
        raise UserError(f"tokenizer {tokenizer.name} has no [MASK] token, which MLM needs")
    return ALBEF(cfg, mask_id=tokenizer.tok.mask_token_id, pad_id=tokenizer.pad_id,
                 cls_id=tokenizer.bos_id)


def build_model(cfg, tokenizer, init):
    """A fresh ALBEF, the --init-from weights (`init`: read_init's) and the --init-text BERT."""
    model = build_albef(cfg, tokenizer)
    albef_weights.load_init(model, init, cfg.init_from, cfg.init_text)
    return model


def param_groups(model, weight_decay):
    """AdamW groups as ALBEF's add_weight_decay: no decay on biases and 1-D tensors (LayerNorms,
    the class token; here also the 0-d temperature)."""
    decay, no_decay = [], []
    for name, p in dist.named_parameters(model):       # the unwrapped order (FSDP re-registers)
        if p.requires_grad:
            (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


def freeze_unused(model, task):
    """Retrieval fine-tuning has no MLM: the MLM head's own weights get no gradient (DDP requires
    every trainable parameter to receive one); the official retrieval model has no MLM head."""
    if task == "retrieval":
        for unused in (model.mlm_head.dense, model.mlm_head.LayerNorm, model.mlm_head.decoder.bias):
            unused.requires_grad_(False)


def alpha_at(cfg, step, steps_per_epoch, device):
    """Distillation weight, ramped over epoch 0 (Pretrain.py, Retrieval.py); 0-d: no recompiles."""
    return torch.tensor(cfg.alpha * min(1.0, step / steps_per_epoch), device=device)


# ---- main: the training loop ----

def main(argv=None):
    rank, local_rank, world_size, device = dist.setup()
    cfg, ckpt = resolve_config(Config, PRESETS, argv, description=__doc__, recipe=task_recipe,
                               recipes_doc=RECIPES_DOC, choices=CHOICES,
                               resume_mutable=RESUME_MUTABLE)
    precision = resolve_precision(cfg.precision, device)
    seed_everything(cfg.seed)                     # the same initial weights on every rank
    init = albef_weights.read_init(cfg.init_from)    # an official file, ours, a DeiT/ViT, or none
    source = cfg.export and albef_weights.export_source(init, ckpt, cfg, MODEL_FIELDS, PRESETS)
    saved_tokenizer = init[1]["config"]["tokenizer"] if init[0] == "ours" else ""
    tokenizer = load_tokenizer(cfg.tokenizer or saved_tokenizer, cfg.init_text,
                               use_tiny=not (cfg.train_data or cfg.val_data))
    settle_config(cfg, init, tokenizer)           # from here on cfg is only read
    model = build_model(cfg, tokenizer, init)
    del init
    if ckpt:
        model.load_state_dict(ckpt["model"])
    if cfg.export:                 # --export DIR: the official .pth layout (docs/albef.md); exit
        return albef_weights.export(model, cfg, tokenizer, source)
    check_config(cfg, world_size)
    model.to(device)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing()
    loader, sampler, val = build_data(cfg, tokenizer, rank, world_size)
    log = open_log(cfg, "albef", resumed=ckpt is not None)

    def evaluate_run():
        return evaluate(model, cfg, val, tokenizer, device, precision)
    if cfg.eval_only:
        return eval_only(log, ckpt, evaluate_run)

    freeze_unused(model, cfg.task)
    # DDP, or FSDP2 sharding each transformer block and the rest (--fsdp). The queues are the same
    # on every rank (enqueued from gathered keys): DDP re-sending them would cost queue_size x E.
    train_model = dist.parallelize(model, cfg.fsdp, device, (Block, BertLayer),
                                   precision_dtype(precision), broadcast_buffers=False)
    if cfg.compile:
        train_model = torch.compile(train_model)
    optimizer = adamw(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    # the per-step schedule (warm-up, cosine to min_lr), the scaler, the non-finite guard, resume
    run = start_run(cfg, model, optimizer, loader, sampler, log, ckpt, precision)
    del ckpt

    with Preemption() as preemption:              # SIGTERM / SIGUSR1: save the step and leave
        for batches in epochs(run, loader):
            for group in batches:
                alpha = alpha_at(cfg, run.step, run.steps_per_epoch, device)
                # --accum-steps K: every micro-batch against the momentum model and queue as they
                # are at the start of the step (its ITC targets, its own ITM negatives), the mean
                # of their losses; the EMA and the K micro-batches' enqueue follow the one update
                parts, keys = [], []
                for j, (images, ids, idx) in enumerate(group):
                    # idx: image ids (positives share one)
                    images, ids, idx = (x.to(device, non_blocking=True) for x in (images, ids, idx))
                    mask = (ids != tokenizer.pad_id).long()
                    with sync_gradients(train_model, j == len(group) - 1):
                        with autocast(precision, device):
                            losses = train_model(images, ids, mask, idx, alpha, cfg.task)
                        run.scaler.scale(sum(losses.values()) / len(group)).backward()
                    parts.append(losses)
                    keys.append(model.pending_keys)
                losses = {k: sum(p[k] for p in parts) / len(parts) for k in parts[0]}
                loss = sum(losses.values())       # L = L_mlm + L_itc + L_itm, unweighted (Sec. 3.2)
                # a non-finite loss or gradient skips the update, the EMA and the enqueue (no sync)
                ok, grad_norm = optimizer_step(run, loss, lambda b=(images, ids, mask, idx, alpha):
                                               first_nonfinite_module(model, {"images": b[0]},
                                               lambda: model(*b, cfg.task)))
                model.finish_step(ok, keys)
                log_train(run, {"loss": loss, **losses}, grad_norm,
                          lambda: {"temp": dist.value(model.temp).item(), "alpha": float(alpha)})
                if step_done(run, preemption):
                    break
            end_epoch(run, evaluate_run, "r_mean", preemption)   # save, evaluate, keep the best
    return finish(run, evaluate_run)


if __name__ == "__main__":
    cli(main)
