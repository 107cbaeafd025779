"""BLIP (Li et al. 2022, arXiv:2201.12086): a ViT and a multimodal mixture of encoder-decoder
(MED) pretrained with three objectives at once (Sec. 3.2): image-text contrastive (ITC) on the
unimodal encoders, image-text matching (ITM) on the image-grounded text encoder with hard
negatives, and language modelling (LM) on the image-grounded text decoder, which shares every
weight with the encoder except self-attention. CapFilt (Sec. 3.3) then uses the fine-tuned
decoder to caption web images and the ITM head to filter noisy captions.

    python blip_train.py                                         # tiny built-in data, pretraining, CPU
    python blip_train.py --task caption                          # captioning fine-tuning (LM only)
    torchrun --nproc_per_node 8 blip_train.py --preset vit-b --task retrieval --image-size 384 \\
        --init-from blip-itm-base-coco/ --train-data coco_karpathy_train.json --val-data coco_karpathy_test.json
    python blip_train.py --task capfilt --init-from run/checkpoint_best.pt --train-data web.json
"""
import copy
import dataclasses
import functools
import json
import os
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from common import dist
from common.data import (Example, ImageDataset, eval_transform, load_tokenizer, pre_caption_blip,
                         read_annotations, retrieval_texts, tiny_data, train_loader, train_transform,
                         training_records)
from common.encoders import (BertEncoder, BertLMHead, BertLayer, Block, KVCache, VisionTransformer, hf_bert_lm_head_map,
                             hf_bert_map, hf_blip_vision_map, load_mapped, read_hf_checkpoint, resize_pos_embed)
from common.generation import beam_search, greedy_or_sample
from common.metrics import caption_metrics, image_tokens, rerank_topk, retrieval_metrics
from common.utils import (MetricLog, NonFiniteGuard, Preemption, UserError, adamw, autocast,
                          check_finite, check_resume_position, cli, cosine_schedule,
                          evaluation_pending, first_nonfinite_module, grad_norm_,
                          ignore_preemption_signals, load_checkpoint, load_scaler_state,
                          micro_batches, param_groups, precision_dtype, resolve_config,
                          resolve_precision, rng_state, save_checkpoint, save_config,
                          seed_everything, set_rng_state, sync_gradients)


# ---- config ----

@dataclass
class Config:
    preset: str = "tiny"            # tiny (the built-in data, CPU) or a paper configuration; see the list below
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
    dropout: float = 0.0            # MED hidden/attention dropout (0.1 in med_config.json; 0 for the tiny runs)
    vocab_size: int = 0             # 0: the tokenizer's (with [DEC] and [ENC] added)
    max_length: int = 32            # tokens per caption, [CLS] and [SEP] included (BLIP: 30-35)
    max_words: int = 30             # words kept by pre_caption (data/utils.py; 30 in BLIP's datasets)
    embed_dim: int = 64             # ITC space (256 in the paper)
    # method (configs/pretrain.yaml, retrieval_coco.yaml, caption_coco.yaml)
    # Queue: 57,600 in the paper. The tiny preset trains from scratch, where every feature starts
    # nearly the same; a long queue of such stale keys dilutes the ITC gradient ~queue/batch-fold
    # (measured: recall after 200 steps 7 with 1,024 vs 26 with 64). BLIP starts from DeiT + BERT.
    queue_size: int = 64            # a multiple of the global batch
    momentum: float = 0.995         # EMA of the momentum encoders, applied after every finite step
    alpha: float = 0.4              # momentum-distillation weight, ramped up at the start
    temp: float = 0.07              # learnable, clamped to [0.001, 0.5]
    label_smoothing: float = 0.1    # LM loss (med.py)
    prompt: str = "a picture of "   # caption task: prefix the decoder is conditioned on, not trained on
    itm_negatives: str = "auto"     # where ITM hard negatives come from: local (this rank's batch, BLIP's
                                    # pretraining) | global (every rank's, BLIP's retrieval negative_all_rank) |
                                    # auto (local for pretrain, global for retrieval)
    k_test: int = 16                # ITM re-ranking candidates (256 COCO, 128 Flickr)
    itm_batch: int = 256            # (image, text) pairs per ITM forward when re-ranking
    num_beams: int = 3              # beam search width for captioning evaluation
    max_gen_length: int = 20        # tokens including [DEC] and the prompt, as BLIP passes to generate
    min_gen_length: int = 5         # minimum generated length (tokens, [DEC] and prompt included)
    top_p: float = 0.9              # nucleus sampling mass (CapFilt captioner)
    capfilt_samples: int = 1        # synthetic captions per image (nucleus sampling)
    capfilt_threshold: float = 0.5  # keep a caption when ITM p(match) >= this
    capfilt_output: str = ""        # default: output_dir/capfilt.json
    capfilt_filter: str = ""        # the filter's weights (ours or HF retrieval); default: the --init-from model.
                                    # The paper fine-tunes captioner (LM) and filter (ITC+ITM) separately.
    # data
    train_data: str = ""            # annotation file (JSON or CSV), or webdataset shards such as
                                    # "shards/{00000..00999}.tar" (sources joined with ::); empty: tiny
    val_data: str = ""              # evaluation split (retrieval and/or captions); empty with tiny: its val split
    image_root: str = ""            # folder relative image paths start from (default: the annotation file's)
    tokenizer: str = ""             # transformers folder or name (bert-base-uncased); empty: tiny's
    skip_bad: bool = False          # skip (and count) unreadable images and empty captions in training data
    min_scale: float = 0.9          # RandomResizedCrop's least area (0.2 pretraining, 0.5 fine-tuning)
    hflip: bool = False             # random flips (paper presets; tiny's captions say left/right)
    randaugment: int = 0            # RandomAugment(2, M)'s M of 10 (5: data/__init__.py); 0: off
    train_num_samples: int = 0      # shards: samples per epoch; 0: the sizes.json beside the shards
    dataset_resampled: bool = False  # shards: draw them with replacement (open_clip's flag)
    workers: int = 2                # data-loading processes per rank
    # optimisation
    epochs: int = 1                 # passes over the training data
    max_steps: int = 0              # >0: train exactly this many steps (overrides epochs)
    batch_size: int = 32            # per process; ITC negatives and the queue see batch_size * world_size
    accum_steps: int = 1            # micro-batches per optimizer step, each against the step's queue (README)
    lr: float = 3e-4                # pretraining; 1e-5 for fine-tuning
    weight_decay: float = 0.05      # AdamW decoupled weight decay
    warmup_steps: int = 50          # linear warm-up steps, then cosine to 0
    grad_clip_norm: float = 0.0     # clip the global gradient norm to this (0: off)
    seed: int = 0                   # weights start from `seed` on every rank; rank r trains with seed + r
    precision: str = "auto"         # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16 (GradScaler)
    max_bad_steps: int = 10         # abort after this many non-finite steps in a row (each one is skipped)
    grad_checkpointing: bool = False  # recompute activations in backward (less memory, ~1/3 more compute)
    fsdp: bool = False              # shard weights, gradients and AdamW state over the ranks (FSDP2), not DDP
    compile: bool = False           # torch.compile the model
    # run
    output_dir: str = "runs/blip"   # metrics.jsonl, config.json, checkpoints (and captions.json) go here
    resume: str = ""                # checkpoint path, or "auto": output_dir/checkpoint_last.pt if present.
                                    # A resumed run keeps its checkpoint's config (see resolve_config)
    init_from: str = ""             # HF BlipForImageTextRetrieval / BlipForConditionalGeneration folder, or ours
    eval_only: bool = False         # evaluate the --init-from / --resume weights and exit
    save_every: int = 1000          # steps between checkpoint_last.pt saves (and at every epoch end)
    log_every: int = 10             # steps between train records in metrics.jsonl
    report_to: str = ""             # also send those records to "tensorboard", "wandb" or "tensorboard,wandb"


_BERT_BASE = dict(text_width=768, text_layers=12, text_heads=12, text_mlp_dim=3072, max_positions=512,
                  tokenizer="bert-base-uncased", embed_dim=256, dropout=0.1, max_length=35, queue_size=57600, workers=8,
                  epochs=20, warmup_steps=3000, min_scale=0.2, hflip=True, randaugment=5)
PRESETS = {
    "tiny": {},
    # ViT-B/16, 224 px pretraining (384 px for fine-tuning: pass --image-size 384), batch 75/GPU
    "vit-b": dict(_BERT_BASE, image_size=224, patch_size=16, vision_width=768, vision_layers=12, vision_heads=12,
                  vision_mlp_dim=3072, batch_size=75),
    # ViT-L/16 (IN-21k), gradient checkpointing as the paper's 32-GPU runs
    "vit-l": dict(_BERT_BASE, image_size=224, patch_size=16, vision_width=1024, vision_layers=24, vision_heads=16,
                  vision_mlp_dim=4096, batch_size=50, grad_checkpointing=True),
}
# Fine-tuning recipes of the paper's presets (configs/retrieval_coco.yaml, caption_coco.yaml):
# applied to --preset vit-b / vit-l for these tasks unless the command line sets the field.
FINETUNE = {
    "retrieval": dict(image_size=384, lr=1e-5, warmup_steps=0, epochs=6, batch_size=32, k_test=256, queue_size=57600,
                      grad_checkpointing=True, min_scale=0.5),
    "caption": dict(image_size=384, lr=1e-5, warmup_steps=0, epochs=5, batch_size=32, min_scale=0.5),
}


TASKS = ("pretrain", "retrieval", "caption", "capfilt")


def task_recipe(cfg):
    """The fine-tuning recipe of a paper preset for --task retrieval / caption (step 3 of
    resolve_config: under the command line, over the preset). The tiny preset has none."""
    return FINETUNE.get(cfg.task, {}) if cfg.preset != "tiny" else {}


RECIPES_DOC = ("task recipes (--task retrieval / caption with a paper preset; the command line overrides them):\n"
               + "\n".join(f"  {task}: " + ", ".join(f"{k}={v}" for k, v in values.items())
                           for task, values in FINETUNE.items()))


MODEL_FIELDS = ("image_size", "patch_size", "vision_width", "vision_layers", "vision_heads", "vision_eps", "vision_mlp_dim",
                "text_width", "text_layers", "text_heads", "text_mlp_dim", "max_positions", "text_eps", "vocab_size",
                "embed_dim", "queue_size")


# ---- model ----

class BLIP(nn.Module):
    """ViT + MED (Fig. 2). One module set serves three roles:
    unimodal text encoder (text_encoder without cross-attention, [CLS]),
    image-grounded text encoder (text_encoder with cross-attention, [ENC]),
    image-grounded text decoder (text_decoder: causal, [DEC]; shares all but self-attention)."""

    def __init__(self, cfg, *, cls_id, enc_id, dec_id, sep_id, pad_id):
        super().__init__()
        self.cfg = cfg
        self.cls_id, self.enc_id, self.dec_id, self.sep_id, self.pad_id = cls_id, enc_id, dec_id, sep_id, pad_id
        self.visual_encoder = VisionTransformer(
            image_size=cfg.image_size, patch_size=cfg.patch_size, width=cfg.vision_width, layers=cfg.vision_layers,
            heads=cfg.vision_heads, mlp_dim=cfg.vision_mlp_dim, act="gelu", eps=cfg.vision_eps, pre_norm=False,
            patch_bias=True)
        bert = dict(vocab_size=cfg.vocab_size, width=cfg.text_width, layers=cfg.text_layers, heads=cfg.text_heads,
                    mlp_dim=cfg.text_mlp_dim, max_positions=cfg.max_positions, cross_dim=cfg.vision_width,
                    cross_layers=range(cfg.text_layers), eps=cfg.text_eps, dropout=cfg.dropout)
        self.text_encoder = BertEncoder(**bert)
        self.text_decoder = BertEncoder(**bert)
        tie_decoder_to_encoder(self.text_decoder, self.text_encoder)
        self.lm_head = BertLMHead(cfg.text_width, cfg.vocab_size, eps=cfg.text_eps)
        # Tied to the (shared) word embeddings, as LAVIS and transformers' BlipForConditionalGeneration;
        # salesforce/BLIP's tie_encoder_decoder_weights leaves its LM-head matrix a separate parameter.
        self.lm_head.decoder.weight = self.text_decoder.word_embeddings.weight
        self.vision_proj = nn.Linear(cfg.vision_width, cfg.embed_dim)
        self.text_proj = nn.Linear(cfg.text_width, cfg.embed_dim)
        self.itm_head = nn.Linear(cfg.text_width, 2)
        self.temp = nn.Parameter(torch.tensor(cfg.temp))
        # Momentum encoders (Sec. 3.2, from ALBEF): EMA copies of the ViT, the text encoder and
        # the projections; they produce the ITC keys and the distillation targets.
        self.visual_encoder_m = copy.deepcopy(self.visual_encoder)
        self.text_encoder_m = copy.deepcopy(self.text_encoder)
        self.vision_proj_m = copy.deepcopy(self.vision_proj)
        self.text_proj_m = copy.deepcopy(self.text_proj)
        for p in self.momentum_params():
            p.requires_grad_(False)
        # Feature queues of momentum features from past batches of all ranks, and their image ids.
        self.register_buffer("image_queue", F.normalize(torch.randn(cfg.embed_dim, cfg.queue_size), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(cfg.embed_dim, cfg.queue_size), dim=0))
        self.register_buffer("idx_queue", torch.full((1, cfg.queue_size), -100, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self._ptr, self.pending_keys, self._ema_params = None, None, None
        self.register_load_state_dict_post_hook(lambda module, keys: setattr(module, "_ptr", None))

    def model_pairs(self):
        return [(self.visual_encoder, self.visual_encoder_m), (self.text_encoder, self.text_encoder_m),
                (self.vision_proj, self.vision_proj_m), (self.text_proj, self.text_proj_m)]

    def momentum_params(self):
        return [p for _, m in self.model_pairs() for p in m.parameters()]

    def copy_to_momentum(self):
        for online, m in self.model_pairs():
            m.load_state_dict(online.state_dict())

    @torch.no_grad()
    def finish_step(self, ok=None, keys=None):
        """After the optimizer step: the momentum EMA and the enqueue of this step's momentum keys,
        both only if the step was finite (`ok`, a 0-d bool tensor; None = finite). BLIP updates the
        momentum encoders at the start of the next forward; doing it here, right after the update,
        is the same sequence, and lets a skipped step leave them untouched."""
        self.momentum_update(ok)
        self.temp.clamp_(0.001, 0.5)         # as forward does; under FSDP this is the sharded parameter
        # `keys`: each micro-batch's pending_keys (--accum-steps), in order; None where no ITC ran (captioning)
        for k in [self.pending_keys] if keys is None else keys:
            if k is not None:
                self.dequeue_and_enqueue(*k, ok=ok)
        self.pending_keys = None

    @torch.no_grad()
    def momentum_update(self, ok=None):
        """theta_m <- m * theta_m + (1 - m) * theta (a lerp by 1 - m; by 0 when the step was not finite)."""
        weight = 1 - self.cfg.momentum
        if ok is not None:
            weight = ok.float() * weight
        if self._ema_params is None:     # walked once, not every step
            self._ema_params = ([p for m, _ in self.model_pairs() for p in m.parameters()], self.momentum_params())
        online, momentum = self._ema_params
        torch._foreach_lerp_(momentum, online, weight)

    @torch.no_grad()
    def dequeue_and_enqueue(self, image_feat, text_feat, idx, ok=None):
        """Replace the oldest entries with this step's momentum features from every rank, in rank
        order. A non-finite step (`ok` False) writes the old entries back: the contents stay, the
        pointer moves on, so it stays aligned with the global batch."""
        image_feat, text_feat, idx = dist.gather_no_grad(image_feat), dist.gather_no_grad(text_feat), dist.gather_no_grad(idx)
        if self._ptr is None:           # a host copy of queue_ptr: no GPU sync per step
            self._ptr = int(self.queue_ptr)
        n, ptr = image_feat.shape[0], self._ptr
        if ptr + n > self.cfg.queue_size:
            raise UserError(f"queue pointer {ptr} + global batch {n} overruns the queue of {self.cfg.queue_size}: "
                             f"the queue length must stay a multiple of the global batch")
        for queue, new in ((self.image_queue, image_feat.T), (self.text_queue, text_feat.T), (self.idx_queue, idx[None])):
            queue[:, ptr:ptr + n] = new if ok is None else torch.where(ok, new.to(queue.dtype), queue[:, ptr:ptr + n])
        self._ptr = (ptr + n) % self.cfg.queue_size
        self.queue_ptr.fill_(self._ptr)

    def set_grad_checkpointing(self, enabled=True):
        self.visual_encoder.transformer.grad_checkpointing = enabled
        self.text_encoder.grad_checkpointing = enabled
        self.text_decoder.grad_checkpointing = enabled

    # -- the three uses of the MED --

    def image_features(self, images):                                  # (B, 1 + P, Dv)
        return self.visual_encoder(images)

    def image_embed(self, image_embeds):                               # ITC space (B, E)
        return F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)

    def text_embed(self, ids, mask):                                   # unimodal encoder, [CLS] -> (B, E)
        return F.normalize(self.text_proj(self.text_encoder(ids, mask)[:, 0]), dim=-1)

    def itm_logits(self, ids, mask, image_embeds):
        """Image-grounded text encoder: [ENC] replaces [CLS], cross-attention to all image tokens."""
        ids = ids.clone()
        ids[:, 0] = self.enc_id
        return self.itm_head(self.text_encoder(ids, mask, context=image_embeds)[:, 0])        # (B, 2)

    def lm_logits(self, ids, mask, image_embeds):
        """Image-grounded text decoder: [DEC] replaces [CLS], causal self-attention."""
        ids = ids.clone()
        ids[:, 0] = self.dec_id
        return self.lm_head(self.text_decoder(ids, mask, causal=True, context=image_embeds))  # (B, L, V)

    def encode_image(self, images):
        return self.image_embed(self.image_features(images))

    def encode_text(self, ids, mask):
        return self.text_embed(ids, mask)

    def forward(self, images, ids, mask, idx, alpha, task="pretrain", prompt_length=0):
        """Losses of one step. idx: (B,) image ids (positives share one in retrieval fine-tuning)."""
        image_embeds = self.image_features(images)
        losses = {}
        if task == "caption":
            losses["loss_lm"] = self.loss_lm(ids, mask, image_embeds, prompt_length)
            return losses
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        image_feat = self.image_embed(image_embeds)
        text_feat = self.text_embed(ids, mask)
        # --- ITC with momentum distillation (Sec. 3.2; ALBEF Sec. 3.3) ---
        losses["loss_itc"] = self.loss_itc(images, ids, mask, idx, image_feat, text_feat, alpha, task)
        # --- ITM with hard negatives (Sec. 3.2) ---
        all_ranks = self.cfg.itm_negatives == "global" or (self.cfg.itm_negatives == "auto" and task == "retrieval")
        losses["loss_itm"] = self.loss_itm(ids, mask, idx, image_embeds, image_feat, text_feat, all_ranks)
        # --- LM: image-grounded decoder, the caption after [DEC] (Sec. 3.2) ---
        if task == "pretrain":
            losses["loss_lm"] = self.loss_lm(ids, mask, image_embeds, 0)
        return losses

    # ---- losses ----

    def loss_itc(self, images, ids, mask, idx, image_feat, text_feat, alpha, task):
        """alpha: a 0-d tensor (a Python float would recompile a compiled step at every new value).
        The momentum keys of this batch wait in `pending_keys` for finish_step() to enqueue them."""
        with torch.no_grad():
            image_feat_m = F.normalize(self.vision_proj_m(self.visual_encoder_m(images)[:, 0]), dim=-1)
            text_feat_m = F.normalize(self.text_proj_m(self.text_encoder_m(ids, mask)[:, 0]), dim=-1)
            image_keys = torch.cat([image_feat_m.T, self.image_queue.clone()], 1)      # (E, B + K)
            text_keys = torch.cat([text_feat_m.T, self.text_queue.clone()], 1)
            if task == "retrieval":  # positives: every key with the same image id (blip_retrieval.py)
                idx_all = torch.cat([idx[None], self.idx_queue.clone()], 1)           # (1, B + K)
                pos = (idx[:, None] == idx_all).float()
                targets = pos / pos.sum(1, keepdim=True)
            else:                    # pretraining: the diagonal of the current batch (blip_pretrain.py)
                B = ids.shape[0]
                targets = F.pad(torch.eye(B, device=ids.device), (0, image_keys.shape[1] - B))   # (B, B + K)
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
            sim_i2t = image_feat.float() @ text_keys / self.temp                          # (B, B + K)
            sim_t2i = text_feat.float() @ image_keys / self.temp
            loss_i2t = -(F.log_softmax(sim_i2t, 1) * i2t_targets).sum(1).mean()
            loss_t2i = -(F.log_softmax(sim_t2i, 1) * t2i_targets).sum(1).mean()
        self.pending_keys = (image_feat_m, text_feat_m, idx)
        return (loss_i2t + loss_t2i) / 2

    def loss_itm(self, ids, mask, idx, image_embeds, image_feat, text_feat, all_ranks):
        """Positive pairs plus, per text, a hard negative image and, per image, a hard negative
        text, sampled from the softmax of the contrastive similarities over this rank's batch
        (BLIP's pretraining) or every rank's (`all_ranks`: BLIP's retrieval negative_all_rank, where
        the image tokens are gathered with gradient and the text ids re-encoded locally)."""
        B = ids.shape[0]
        neg_image, neg_text, idx_all = hard_negatives(image_feat, text_feat, idx, self.temp, all_ranks)  # (B,) into N
        ids_all, mask_all, image_embeds_all = ids, mask, image_embeds
        if all_ranks:
            ids_all, mask_all = dist.gather_no_grad(ids), dist.gather_no_grad(mask)
            # Gathered in the autocast dtype: the cross-attention's key/value projection casts to it
            # anyway, so the forward is unchanged and the (N, 1 + P, Dv) copy takes half the memory.
            dev = image_embeds.device.type
            half = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else image_embeds.dtype
            image_embeds_all = dist.gather_with_grad(image_embeds.to(half))                # (N, 1 + P, Dv)
        text_ids = torch.cat([ids, ids, ids_all[neg_text]])                           # pos, neg image, neg text
        text_mask = torch.cat([mask, mask, mask_all[neg_text]])
        images = torch.cat([image_embeds, image_embeds_all[neg_image], image_embeds])
        logits = self.itm_logits(text_ids, text_mask, images)                         # (3B, 2)
        # A sampled "negative" that shares the image id (only possible when a row had no valid
        # negative: a batch of one, all ids equal) is labelled a match, so labels never lie.
        labels = torch.cat([torch.ones(B, dtype=torch.long, device=ids.device),
                            (idx_all[neg_image] == idx).long(), (idx_all[neg_text] == idx).long()])
        return F.cross_entropy(logits.float(), labels)

    def loss_lm(self, ids, mask, image_embeds, prompt_length):
        """Shifted cross-entropy with label smoothing 0.1 (med.py); padding and the prompt tokens
        (caption fine-tuning: "a picture of ") are not predicted."""
        targets = ids.masked_fill(mask == 0, -100)
        targets[:, : max(prompt_length, 1)] = -100                     # [DEC] (+ prompt) are inputs only
        logits = self.lm_logits(ids, mask, image_embeds)
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets[:, 1:].reshape(-1),
                               ignore_index=-100, label_smoothing=self.cfg.label_smoothing)

    # ---- generation ----

    @torch.no_grad()
    def generate(self, images, prompt_ids, *, sample=False, num_beams=3, max_length=20, min_length=5, top_p=0.9,
                 repetition_penalty=1.0, image_embeds=None, use_cache=True):
        """Captions for a batch: the ViT runs once per batch; the decoder is conditioned on
        [DEC] + prompt (prompt_ids: (Lp,) without [CLS]/[SEP]). Beam search (deterministic) or
        nucleus sampling (common/generation.py). Lengths count [DEC] and the prompt, as BLIP's call
        of HF generate. Returns (B, T) token ids including the prompt, padded with [PAD] after [SEP].
        Pass `image_embeds` when the caller already has the ViT tokens of `images`.

        With `use_cache` (the default) each step feeds the decoder only the new token: earlier
        tokens' self-attention keys and values are kept, and the image's cross-attention keys and
        values are projected once per batch and shared by its beams. `use_cache=False` recomputes
        the whole prefix every step (the reference the cache is tested against)."""
        if image_embeds is None:
            image_embeds = self.image_features(images)
        B = image_embeds.shape[0]
        start = torch.cat([torch.tensor([self.dec_id]), prompt_ids.cpu()]).to(image_embeds.device)
        prompt = start[None].expand(B, -1)

        if use_cache:
            def step(tokens, cache):                                    # tokens: the new ones only
                h = self.text_decoder(tokens, causal=True, context=image_embeds, cache=cache)
                return self.lm_head(h[:, -1]).float(), cache
            cache, reorder = KVCache(len(self.text_decoder.layer)), None
        else:
            def step(tokens, seqs):                                     # the cache is the token history
                seqs = tokens if seqs is None else torch.cat([seqs, tokens], 1)
                context = image_embeds.repeat_interleave(seqs.shape[0] // B, 0)          # beams: (B*K, ...)
                h = self.text_decoder(seqs, torch.ones_like(seqs), causal=True, context=context)
                return self.lm_head(h[:, -1]).float(), seqs
            cache, reorder = None, (lambda seqs, index: seqs[index])
        lengths = dict(max_length=max_length, min_length=min_length, eos_id=self.sep_id, pad_id=self.pad_id,
                       repetition_penalty=repetition_penalty)
        if sample or num_beams == 1:
            return greedy_or_sample(step, prompt, cache, sample=sample, top_p=top_p, **lengths)
        return beam_search(step, prompt, cache, reorder, num_beams=num_beams, **lengths)

    # ---- weights ----

    @classmethod
    def from_hf(cls, path, tokenizer, cfg=None):
        """Build from a Hugging Face `BlipForImageTextRetrieval` folder (ViT, text encoder,
        projections, ITM head) or `BlipForConditionalGeneration` folder (ViT, text decoder, LM
        head). Every key of the checkpoint is mapped and shape-checked. The half the checkpoint
        lacks keeps its initialisation and is named in the log: the decoder's self-attention and
        LM head for a retrieval checkpoint; the encoder's self-attention, projections and ITM head
        for a captioning one (the other MED weights are shared). Momentum encoders are copies."""
        from transformers import BlipConfig
        hf = BlipConfig.from_pretrained(path)
        v, t = hf.vision_config, hf.text_config
        for name, sub in (("vision_config", v), ("text_config", t)):    # our blocks use exact GELU
            if sub.hidden_act != "gelu":
                raise UserError(f"{path}: {name}.hidden_act {sub.hidden_act!r} is not supported (gelu only)")
        cfg = dataclasses.replace(cfg or Config(), image_size=v.image_size, patch_size=v.patch_size,
                                  vision_width=v.hidden_size, vision_layers=v.num_hidden_layers,
                                  vision_heads=v.num_attention_heads, vision_eps=v.layer_norm_eps,
                                  vision_mlp_dim=v.intermediate_size,
                                  text_width=t.hidden_size, text_layers=t.num_hidden_layers,
                                  text_heads=t.num_attention_heads, text_mlp_dim=t.intermediate_size,
                                  max_positions=t.max_position_embeddings, text_eps=t.layer_norm_eps,
                                  vocab_size=t.vocab_size, embed_dim=hf.image_text_hidden_size)
        _, state = read_hf_checkpoint(path)
        model = build_blip(cfg, tokenizer)
        L = cfg.text_layers
        mapping = hf_blip_vision_map("visual_encoder", "vision_model", cfg.vision_layers)
        if any(k.startswith("text_encoder.") for k in state):            # BlipForImageTextRetrieval
            enc = hf_bert_map("text_encoder", "text_encoder", L, cross_layers=range(L), token_types=False)
            mapping.update(enc)
            mapping.update({k.replace("text_encoder", "text_decoder", 1): src for k, src in enc.items()
                            if ".attention." not in k})                  # shared modules, same tensors
            for name in ("vision_proj", "text_proj", "itm_head"):
                mapping.update({f"{name}.{p}": f"{name}.{p}" for p in ("weight", "bias")})
            keep = ["text_decoder.layer.", "lm_head.", "temp"]
        else:                                                             # BlipForConditionalGeneration
            dec = hf_bert_map("text_decoder", "text_decoder.bert", L, cross_layers=range(L), token_types=False)
            mapping.update(dec)
            mapping.update({k.replace("text_decoder", "text_encoder", 1): src for k, src in dec.items()
                            if ".attention." not in k})
            mapping.update(hf_bert_lm_head_map("lm_head", "text_decoder.cls.predictions",
                                               tied_to=None if "text_decoder.cls.predictions.decoder.weight" in state
                                               else "text_decoder.bert.embeddings.word_embeddings.weight"))
            keep = ["text_encoder.layer.", "vision_proj.", "text_proj.", "itm_head.", "temp"]
        keep += ["visual_encoder_m.", "text_encoder_m.", "vision_proj_m.", "text_proj_m.", "image_queue",
                 "text_queue", "idx_queue", "queue_ptr"]
        if "text_decoder.cls.predictions.decoder.weight" in state and "text_decoder.cls.predictions.bias" in state:
            ignore = ("position_ids", "text_decoder.cls.predictions.decoder.bias")   # the same tensor as .bias
        else:
            ignore = ("position_ids",)
        load_mapped(model, state, mapping, source=path, ignore=ignore, keep_init=keep)
        model.copy_to_momentum()
        if dist.is_main():
            print(f"{path}: loaded every checkpoint weight; left at initialisation: "
                  + ", ".join(k.rstrip(".") for k in keep[:-8]) + " (not in this checkpoint)")
        return model


def tie_decoder_to_encoder(decoder, encoder):
    """BLIP's tie_encoder_decoder_weights(skip_key='/attention'): the decoder uses the encoder's
    embeddings, cross-attention and feed-forward modules; only self-attention is its own (Sec. 3.1)."""
    decoder.word_embeddings = encoder.word_embeddings
    decoder.position_embeddings = encoder.position_embeddings
    decoder.embed_norm = encoder.embed_norm
    for d, e in zip(decoder.layer, encoder.layer):
        d.crossattention, d.intermediate, d.output, d.output_norm = (e.crossattention, e.intermediate, e.output,
                                                                     e.output_norm)


def build_blip(cfg, tokenizer):
    cls_id = tokenizer.tok.cls_token_id if tokenizer.tok.cls_token_id is not None else tokenizer.bos_id
    dec_id, enc_id = tokenizer.add_special_tokens(["[DEC]", "[ENC]"])
    tokenizer.bos_id = cls_id   # text rows start with [CLS]; [ENC] / [DEC] replace it per task
    if cfg.vocab_size < tokenizer.vocab_size:
        raise UserError(f"model vocabulary {cfg.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}")
    return BLIP(cfg, cls_id=cls_id, enc_id=enc_id, dec_id=dec_id, sep_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)


@torch.no_grad()
def hard_negatives(image_feat, text_feat, idx, temp, all_ranks=True):
    """For each local text a negative image and for each local image a negative text, drawn from
    softmax(similarity / temp) over the global batch (all ranks) or the local one, never one with
    the same image id. Returns (neg_image, neg_text, idx_all) with indices into that batch."""
    gather = dist.gather_no_grad if all_ranks else (lambda x: x)
    idx_all = gather(idx)                                                              # (N,)
    sim_i2t = image_feat @ gather(text_feat).T / temp                                  # (B, N)
    sim_t2i = text_feat @ gather(image_feat).T / temp
    same = idx[:, None] == idx_all[None, :]                       # the positive and its duplicates
    neg_image = sample_negatives(F.softmax(sim_t2i.float(), 1).masked_fill(same, 0))
    neg_text = sample_negatives(F.softmax(sim_i2t.float(), 1).masked_fill(same, 0))
    return neg_image, neg_text, idx_all


def sample_negatives(weights):
    """One index per row, drawn with probability proportional to `weights` (B, N), by the
    exponential trick: argmax_j w_j / E_j with E_j ~ Exp(1) picks j with probability
    w_j / sum(w) (the smallest of independent Exp(w_j) variables), the distribution
    torch.multinomial draws from, without its host syncs. Rows with no mass left (a batch of
    one, every candidate sharing the image id, NaN similarities) draw uniformly instead of
    failing ('invalid multinomial distribution', the error users of the official code hit)."""
    weights = torch.nan_to_num(weights.float(), nan=0.0, posinf=0.0, neginf=0.0).clamp_(min=0)
    weights = torch.where(weights.sum(1, keepdim=True) > 0, weights, 1.0)      # no boolean indexing: no sync
    noise = torch.empty_like(weights).exponential_().clamp_(min=1e-30)      # E = 0 would make 0/0 a NaN
    return (weights / noise).argmax(1)


# ---- data ----

def caption_text(cfg):
    """BLIP's text processing of every caption, in training and evaluation (data/utils.py
    pre_caption; the caption task's prompt goes before it, as coco_karpathy_train)."""
    return functools.partial(pre_caption_blip, max_words=cfg.max_words)


def build_data(cfg, tokenizer, rank, world_size):
    """Training loader and sampler (none with --eval-only), val records, training records (an
    annotation file's, or the shard spec).
    With neither --train-data nor --val-data, the built-in tiny set."""
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
            raise UserError("--task capfilt captions and filters an annotation file; --train-data names shards")
        return None, None, val, records
    prefix = cfg.prompt if cfg.task == "caption" else ""
    # data/__init__.py's crop, flip and RandomAugment at the paper presets; the tiny preset's light
    # crop has no flip (its captions say left and right)
    example = Example(train_transform(cfg.image_size, cfg.min_scale, cfg.hflip, cfg.randaugment), tokenizer,
                      cfg.max_length, prefix=prefix, text=caption_text(cfg))
    loader, sampler = train_loader(records, example, cfg, rank, world_size, train_file)
    return loader, sampler, val, records


def prompt_token_ids(tokenizer, prompt, max_length):
    """The prompt's tokens without [CLS] and [SEP] (what follows [DEC] when generating)."""
    ids = tokenizer(prompt, max_length)[0]
    return ids[1: int((ids != tokenizer.pad_id).sum()) - 1]


def check_config(cfg, tokenizer, world_size):
    """Start-up checks with clear messages (instead of an assert deep in the first step)."""
    if cfg.task not in ("pretrain", "retrieval", "caption", "capfilt"):
        raise UserError(f"--task must be pretrain, retrieval, caption or capfilt, not {cfg.task!r}")
    if cfg.task in ("pretrain", "retrieval") and cfg.queue_size % (cfg.batch_size * world_size):
        raise UserError(f"--queue-size {cfg.queue_size} is not a multiple of the global batch "
                         f"{cfg.batch_size} x {world_size} = {cfg.batch_size * world_size}")
    prompt_length = 1 + len(prompt_token_ids(tokenizer, cfg.prompt, cfg.max_positions))   # [CLS]/[DEC] + prompt
    if cfg.task == "caption" and prompt_length >= min(cfg.max_length, cfg.max_gen_length) - 1:
        raise UserError(f"--prompt {cfg.prompt!r} takes {prompt_length} tokens with [DEC]; it leaves no room for "
                         f"a caption within --max-length {cfg.max_length} / --max-gen-length {cfg.max_gen_length}")
    if cfg.max_length > cfg.max_positions:
        raise UserError(f"--max-length {cfg.max_length} exceeds the {cfg.max_positions} position embeddings")
    if cfg.task == "capfilt" and not cfg.init_from:    # Sec. 3.3: both are fine-tuned first
        raise UserError("--task capfilt needs a trained captioner and filter: pass --init-from a "
                        "blip_train.py checkpoint (run/checkpoint_best.pt) or a Hugging Face BLIP "
                        "folder")
    return prompt_length


# ---- evaluation ----

@torch.no_grad()
def evaluate_retrieval(model, cfg, val, tokenizer, device, precision):
    """Sec. 5.1 / train_retrieval.py: ITC similarity for all pairs, then the ITM head re-ranks each
    row's top-k candidates; score = ITM match logit + ITC similarity (-100 outside the top k).

    Every rank embeds only its shard of the images and texts and keeps only its images' ViT
    tokens (COCO's 5k test images at 384 px would be ~9 GB fp32 on every GPU); the ITC features
    are gathered. Image->text rows are this rank's images; each text->image pair (a text, one of
    its top-k images) is scored by the rank that holds the image, and the scores are gathered.
    Returns the metrics and the number of ITM forward passes, k x (n_images + n_texts)."""
    texts, txt2img = retrieval_texts(val, caption_text(cfg))
    ids = tokenizer(texts, cfg.max_length).to(device)
    mask = (ids != tokenizer.pad_id).long()
    t0, t1 = dist.shard_range(len(texts))
    text_feat = [torch.zeros(0, cfg.embed_dim, device=device)]
    for i in range(t0, t1, cfg.batch_size):
        j = min(i + cfg.batch_size, t1)
        with autocast(precision, device):
            text_feat.append(model.text_embed(ids[i:j], mask[i:j]).float())
    text_feat = dist.gather_varlen(torch.cat(text_feat))                              # (n_txt, E)
    i0, i1 = dist.shard_range(len(val))
    tokens = image_tokens(model.image_features, [r["image"] for r in val[i0:i1]], cfg.image_size, cfg.batch_size,
                          cfg.workers, device, precision)                                 # (mine, 1 + P, Dv)
    image_feat = [torch.zeros(0, cfg.embed_dim, device=device)]
    for i in range(0, len(tokens), cfg.batch_size):
        with autocast(precision, device):
            image_feat.append(model.image_embed(tokens[i:i + cfg.batch_size]).float())
    image_feat = dist.gather_varlen(torch.cat(image_feat))                            # (n_img, E)
    sim = image_feat @ text_feat.T                                                      # (n_img, n_txt)
    k = min(cfg.k_test, len(texts), len(val))

    def itm(t, i):              # ITM match logits of texts t with this rank's images i
        with autocast(precision, device):
            return model.itm_logits(ids[t], mask[t], tokens[i])[:, 1].float()
    rows_i2t, rows_t2i = rerank_topk(sim, (i0, i1), k, itm, cfg.itm_batch, add_similarity=True)
    metrics = retrieval_metrics(rows_i2t, txt2img, rows_t2i)
    metrics["itc_r_mean"] = retrieval_metrics(sim, txt2img)["r_mean"]             # before re-ranking
    return metrics, k * (len(texts) + len(val))


@torch.no_grad()
def evaluate_captions(model, cfg, val, tokenizer, device, precision, output_dir=None):
    """Beam-search captions for this rank's images, gathered; pycocoevalcap scores on rank 0's
    gathered set (every rank computes the same). Writes captions.json."""
    paths = [r["image"] for r in val]
    start, end = dist.shard_range(len(paths))
    loader = torch.utils.data.DataLoader(ImageDataset(paths[start:end], eval_transform(cfg.image_size, crop=False)),
                                         batch_size=cfg.batch_size, num_workers=cfg.workers,
                                         worker_init_fn=ignore_preemption_signals)
    # The prompt conditions captioning fine-tuning; the pretraining LM never saw it.
    prompt_ids = prompt_token_ids(tokenizer, cfg.prompt if cfg.task == "caption" else "", cfg.max_length)
    tokens = []
    for images, _ in loader:
        with autocast(precision, device):
            seqs = model.generate(images.to(device), prompt_ids, num_beams=cfg.num_beams,
                                  max_length=cfg.max_gen_length, min_length=cfg.min_gen_length)
        tokens += [s[1 + len(prompt_ids):].tolist() for s in seqs]
    mine = [tokenizer.decode([t for t in s if t != tokenizer.pad_id]).strip() for s in tokens]
    captions = [c for part in dist.gather_objects(mine) for c in part]
    predictions = {i: c for i, c in enumerate(captions)}
    references = {i: r["captions"] for i, r in enumerate(val)}
    metrics = caption_metrics(predictions, references) if dist.is_main() else {}
    metrics = dist.gather_objects(metrics)[0]                                           # rank 0's, everywhere
    if output_dir and dist.is_main():
        with open(os.path.join(output_dir, "captions.json"), "w") as f:
            json.dump([{"image": val[i]["image"], "image_id": val[i]["image_id"], "caption": c}
                       for i, c in predictions.items()], f, indent=1)
    return metrics


@torch.no_grad()
def evaluate(model, cfg, val, tokenizer, device, precision, output_dir=None):
    was_training = model.training
    model.eval()
    metrics = {}
    if val is not None:
        if cfg.task in ("pretrain", "retrieval"):
            tick = time.time()
            ret, n_itm = evaluate_retrieval(model, cfg, val, tokenizer, device, precision)
            metrics.update(ret, itm_pairs=n_itm, retrieval_eval_s=time.time() - tick)
        if cfg.task in ("pretrain", "caption"):
            metrics.update(evaluate_captions(model, cfg, val, tokenizer, device, precision, output_dir))
    model.train(was_training)
    return metrics


# ---- CapFilt (Sec. 3.3) ----

@torch.no_grad()
def capfilt(model, cfg, records, tokenizer, device, precision, path, filter_model=None):
    """Captioner: nucleus-sample synthetic captions for every image. Filter: keep a web or
    synthetic caption when the ITM head's p(match) >= threshold. Images are split across ranks;
    each rank streams the records it keeps to a part file beside `path`, and rank 0 concatenates
    the parts into the new annotation file, atomically (the input is never modified). The output
    folder must be one every rank can reach (a shared filesystem across nodes). Returns the counts;
    a result with no caption is an error naming the threshold, never an empty training file."""
    model.eval()
    filter_model = (filter_model or model).eval()
    start, end = dist.shard_range(len(records))
    mine = records[start:end]
    loader = torch.utils.data.DataLoader(ImageDataset([r["image"] for r in mine], eval_transform(cfg.image_size, crop=False)),
                                         batch_size=cfg.batch_size, num_workers=cfg.workers,
                                         worker_init_fn=ignore_preemption_signals)
    prompt_ids = prompt_token_ids(tokenizer, cfg.prompt, cfg.max_length)
    kept = scored = images_kept = 0
    highest = 0.0                                               # p(match), for the error
    with open(f"{path}.part{dist.rank()}.jsonl", "w") as part:
        for images, index in loader:
            images = images.to(device)
            with autocast(precision, device):
                cap_embeds = model.image_features(images)                    # the ViT once per batch
                embeds = cap_embeds if filter_model is model else filter_model.image_features(images)
                synthetic = [[] for _ in index]
                for _ in range(cfg.capfilt_samples):
                    seqs = model.generate(images, prompt_ids, sample=True, max_length=cfg.max_gen_length,
                                          min_length=cfg.min_gen_length, top_p=cfg.top_p, repetition_penalty=1.1,
                                          image_embeds=cap_embeds)
                    for j, s in enumerate(seqs):                             # the caption after [DEC] + prompt
                        caption = [t for t in s[1 + len(prompt_ids):].tolist() if t != tokenizer.pad_id]
                        synthetic[j].append(tokenizer.decode(caption).strip())
                candidates = [[c for c in mine[i]["captions"] + synthetic[j] if c]
                              for j, i in enumerate(index.tolist())]
                p_match = itm_match(filter_model, [c for cs in candidates for c in cs],
                                    [j for j, cs in enumerate(candidates) for _ in cs], embeds, cfg,
                                    tokenizer)
                highest, p_match = max([highest, *p_match]), iter(p_match)
            for i, cs in zip(index.tolist(), candidates):
                keep = [c for c, p in zip(cs, p_match) if p >= cfg.capfilt_threshold]   # zip: len(cs) of p_match
                scored += len(cs)
                kept += len(keep)
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
    return {"captions_kept": counts[0], "captions_scored": counts[1], "images_kept": counts[2],
            "images": len(records)}


def itm_match(model, texts, image_of, embeds, cfg, tokenizer):
    """ITM p(match) of every (texts[n], embeds[image_of[n]]) pair, --itm-batch pairs per forward."""
    if not texts:
        return []
    ids = tokenizer([caption_text(cfg)(t) for t in texts], cfg.max_length).to(embeds.device)
    image_of = torch.tensor(image_of, device=embeds.device)
    p = [F.softmax(model.itm_logits(ids[a:a + cfg.itm_batch], (ids[a:a + cfg.itm_batch] != tokenizer.pad_id).long(),
                                    embeds[image_of[a:a + cfg.itm_batch]]).float(), 1)[:, 1]
         for a in range(0, len(texts), cfg.itm_batch)]
    return torch.cat(p).tolist()


def concat_json_lines(parts, path):
    """One JSON array in `path`, laid out as json.dump(records, f, indent=1), from JSON-lines files
    read in order and deleted; one record in memory at a time; written to a temporary file, then
    renamed over `path`."""
    first = True
    with open(path + ".tmp", "w") as out:
        out.write("[")
        for name in parts:
            with open(name) as f:
                for line in f:
                    record = json.dumps(json.loads(line), indent=1).replace("\n", "\n ")
                    out.write(("\n " if first else ",\n ") + record)
                    first = False
        out.write("]" if first else "\n]")
    os.replace(path + ".tmp", path)
    for name in parts:
        os.remove(name)


# ---- training ----

# Set by the run, not by the weights: an --init-from keeps the command line's values for these
# (fine-tuning at 384 px from 224 px pretraining interpolates the position embeddings).
RUN_FIELDS = ("image_size", "queue_size")


def build_model(cfg, tokenizer, saved=None):
    """Fresh model, or --init-from a Hugging Face BLIP folder / one of our checkpoints. The
    architecture comes from the weights; image size and queue length from this run, and the
    queues start empty (a previous run's queued features and image ids would be stale). `saved`:
    the --init-from checkpoint when the caller has loaded it already (one load per rank)."""
    wanted = {k: getattr(cfg, k) for k in RUN_FIELDS if k in getattr(cfg, "cli_keys", ())}
    if cfg.init_from and os.path.isdir(cfg.init_from):
        model = BLIP.from_hf(cfg.init_from, tokenizer, cfg)
        state = model.state_dict()
        for k in MODEL_FIELDS:
            setattr(cfg, k, getattr(model.cfg, k))
    else:
        saved = saved or (load_checkpoint(cfg.init_from) if cfg.init_from else None)
        if saved:
            for k in MODEL_FIELDS:
                setattr(cfg, k, saved["config"][k])
        cfg.vocab_size = cfg.vocab_size or tokenizer.vocab_size + sum(
            t not in tokenizer.tok.get_vocab() for t in ("[DEC]", "[ENC]"))
        if not saved:
            return build_blip(cfg, tokenizer), cfg
        state = saved["model"]
    for k, v in wanted.items():
        setattr(cfg, k, v)
    grid = cfg.image_size // cfg.patch_size
    for key in ("visual_encoder.positional_embedding", "visual_encoder_m.positional_embedding"):
        state[key] = resize_pos_embed(state[key], grid)
    state = {k: v for k, v in state.items() if not k.endswith("_queue") and k != "queue_ptr"}
    model = build_blip(cfg, tokenizer)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and sorted(missing) == ["idx_queue", "image_queue", "queue_ptr", "text_queue"], missing
    return model, cfg


def freeze_unused(model, task):
    """Parameters a task never uses get no gradient (DDP requires every trainable parameter to
    receive one): captioning trains the ViT and the decoder only; retrieval leaves the decoder's
    self-attention and the LM head aside."""
    if task == "caption":
        unused = [model.vision_proj, model.text_proj, model.itm_head] + [l.attention for l in model.text_encoder.layer]
        model.temp.requires_grad_(False)
    elif task == "retrieval":
        unused = [model.lm_head.dense, model.lm_head.LayerNorm] + [l.attention for l in model.text_decoder.layer]
        model.lm_head.decoder.bias.requires_grad_(False)
    else:
        unused = []
    for m in unused:
        m.requires_grad_(False)


def alpha_at(cfg, step, steps_per_epoch, device):
    """Distillation weight ramp: over two epochs in pretraining (BLIP pretrain.py), over the first
    epoch in retrieval fine-tuning (train_retrieval.py). A 0-d tensor, so that a compiled step
    does not recompile for every new value."""
    ramp = (2 if cfg.task == "pretrain" else 1) * steps_per_epoch
    return torch.tensor(cfg.alpha * min(1.0, step / ramp), device=device)


def main(argv=None):
    rank, local_rank, world_size, device = dist.setup()
    cfg, ckpt = resolve_config(Config, PRESETS, argv, description=__doc__, recipe=task_recipe,
                               recipes_doc=RECIPES_DOC, choices={"task": TASKS, "itm_negatives": ("auto", "local", "global")},
                               resume_mutable=("k_test", "itm_batch", "num_beams", "max_gen_length", "min_gen_length",
                                               "top_p", "capfilt_samples", "capfilt_threshold", "capfilt_output",
                                               "capfilt_filter"))
    precision = resolve_precision(cfg.precision, device)
    seed_everything(cfg.seed)                     # the same initial weights on every rank
    os.makedirs(cfg.output_dir, exist_ok=True)
    init = load_checkpoint(cfg.init_from) if cfg.init_from and not os.path.isdir(cfg.init_from) else None
    if init and not cfg.tokenizer:                # one of our checkpoints: its tokenizer
        cfg.tokenizer = init["config"]["tokenizer"]
    tokenizer = load_tokenizer(cfg.tokenizer, cfg.init_from, use_tiny=not (cfg.train_data or cfg.val_data))
    cfg.tokenizer = tokenizer.name
    model, cfg = build_model(cfg, tokenizer, init)
    del init
    prompt_length = check_config(cfg, tokenizer, world_size)
    model.to(device)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing()
    loader, sampler, val, records = build_data(cfg, tokenizer, rank, world_size)
    save_config(cfg, cfg.output_dir)
    log = MetricLog(cfg.output_dir, cfg.report_to, dataclasses.asdict(cfg), project="blip",
                    resumed=ckpt is not None)
    if ckpt:
        model.load_state_dict(ckpt["model"])

    if cfg.task == "capfilt":
        path = cfg.capfilt_output or os.path.join(cfg.output_dir, "capfilt.json")
        source = cfg.train_data or os.path.join(tiny_data(), "train.json")          # "": the built-in data
        if os.path.exists(path) and os.path.samefile(path, source):
            raise UserError(f"--capfilt-output {path} is the input annotation file; CapFilt never overwrites it")
        filter_model = None
        if cfg.capfilt_filter:
            filter_model, _ = build_model(dataclasses.replace(cfg, init_from=cfg.capfilt_filter), tokenizer)
            filter_model.to(device)
        counts = capfilt(model, cfg, records, tokenizer, device, precision, path, filter_model)
        if dist.is_main():
            log.write({"step": 0, "epoch": 0, "split": "capfilt", **counts})
            print(json.dumps({**counts, "output": path}))
        dist.cleanup()
        return counts
    if cfg.eval_only:
        metrics = evaluate(model, cfg, val, tokenizer, device, precision, cfg.output_dir)
        log.write({"step": ckpt["step"] if ckpt else 0, "epoch": 0, "split": "val", **metrics})
        if dist.is_main():
            print(json.dumps(metrics))
        dist.cleanup()
        return metrics

    freeze_unused(model, cfg.task)
    # AdamW, weight decay 0.05 (BLIP applies it to every parameter; here biases, norms,
    # embeddings and the temperature are exempt, as in BLIP-2/LAVIS's recipe).
    # DDP, or FSDP2 sharding each transformer block and the rest (--fsdp)
    ddp_model = dist.parallelize(model, cfg.fsdp, device, (Block, BertLayer), precision_dtype(precision),
                                 # the queues are identical on every rank (enqueued from gathered keys):
                                 broadcast_buffers=False)  # DDP re-sending them costs queue_size x E per step
    if cfg.compile:
        ddp_model = torch.compile(ddp_model)
    optimizer = adamw(param_groups(model, cfg.weight_decay, ("temp",)), lr=cfg.lr)
    steps_per_epoch = len(loader) // cfg.accum_steps
    check_resume_position(ckpt, steps_per_epoch)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    # Warm-up then cosine (BLIP: warm-up then x0.9 per epoch in pretraining, cosine per epoch
    # in fine-tuning; one per-step schedule for every task here).
    scheduler = cosine_schedule(optimizer, cfg.warmup_steps, total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    guard = NonFiniteGuard(cfg.max_bad_steps)
    seed_everything(cfg.seed + rank)              # each rank its own stream from here (dropout, negatives)
    step, best = 0, -1.0
    if ckpt:
        dist.load_optimizer_state_dict(model, optimizer, ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        load_scaler_state(scaler, ckpt["scaler"])     # {} from a bf16/fp32 run: a fresh scale
        step, best = ckpt["step"], ckpt["best"]
        guard.load_state_dict(ckpt)                   # bad steps in all and in a row
        set_rng_state(ckpt["rng"][rank])
        sampler.load_state_dict(ckpt.get("data", [{}] * world_size)[rank])   # shards: the stream position
        if dist.is_main():
            print(f"resumed from {cfg.resume} at step {step}")
    # a run stopped at the end of an epoch before its evaluation (a signal) evaluates it first
    evaluated = step - evaluation_pending(ckpt, steps_per_epoch, total_steps)
    del ckpt

    def checkpoint(name):
        check_finite(model)
        # under FSDP both are gathered to rank 0, in the layout of a non-FSDP run
        state = {"model": dist.full_state_dict(model), "optimizer": dist.optimizer_state_dict(model, optimizer),
                 "scheduler": scheduler.state_dict(),
                 "scaler": scaler.state_dict(), "step": step, "epoch": step // steps_per_epoch, "best": best,
                 **guard.state_dict(), "evaluated": evaluated, "steps_per_epoch": steps_per_epoch,
                 "world_size": world_size,
                 "config": dataclasses.asdict(cfg), "rng": dist.gather_objects(rng_state()),
                 "data": dist.gather_objects(sampler.state_dict())}
        if dist.is_main():
            save_checkpoint(os.path.join(cfg.output_dir, name), state)

    best_key = "cider" if cfg.task == "caption" else "r_mean"
    pbar = tqdm(total=total_steps, initial=step, disable=not dist.is_main(), dynamic_ncols=True)
    metrics, tick, tick_step, stopped = {}, time.time(), step, False
    with Preemption() as preemption:
        while (step < total_steps or evaluated < step) and not stopped:
            unevaluated = evaluated < step    # resumed at an epoch's end, not yet evaluated
            epoch = (step - unevaluated) // steps_per_epoch
            sampler.set_epoch(epoch, skip=(step - epoch * steps_per_epoch) * cfg.accum_steps * cfg.batch_size)
            for group in () if unevaluated else micro_batches(loader, cfg.accum_steps):
                alpha = alpha_at(cfg, step, steps_per_epoch, device)
                # --accum-steps K: every micro-batch against the momentum model and queue as they
                # are at the start of the step (its ITC targets, its own ITM negatives), the mean
                # of their losses; the EMA and the K micro-batches' enqueue follow the one update
                parts, keys = [], []
                for j, (images, ids, idx) in enumerate(group):
                    images, ids = images.to(device, non_blocking=True), ids.to(device, non_blocking=True)
                    idx = idx.to(device, non_blocking=True)                  # image ids: positives share one
                    mask = (ids != tokenizer.pad_id).long()
                    with sync_gradients(ddp_model, j == len(group) - 1):
                        with autocast(precision, device):
                            losses = ddp_model(images, ids, mask, idx, alpha, cfg.task, prompt_length)
                        scaler.scale(sum(losses.values()) / len(group)).backward()
                    parts.append(losses)
                    keys.append(model.pending_keys)
                losses = {k: sum(p[k] for p in parts) / len(parts) for k in parts[0]}
                loss = sum(losses.values())                 # unweighted sum, as the paper
                scaler.unscale_(optimizer)
                grad_norm = grad_norm_(model, cfg.grad_clip_norm)
                # A non-finite loss or gradient skips the update, the momentum EMA and the enqueue,
                # all on the device (no host sync)
                ok = guard.check(loss, grad_norm, scaler)
                guard.step(optimizer, scaler, ok)
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                model.finish_step(ok, keys)
                step += 1
                pbar.update(1)
                guard.account(step, ok, lambda b=(images, ids, mask, idx, alpha): first_nonfinite_module(
                    model, {"images": b[0]}, lambda: model(*b, cfg.task, prompt_length)))
                if step % cfg.log_every == 0 or step == total_steps:
                    values = {k: dist.all_reduce_mean(v).item() for k, v in {"loss": loss, **losses}.items()}
                    speed = (step - tick_step) * cfg.accum_steps * cfg.batch_size * world_size / (time.time() - tick)
                    tick, tick_step = time.time(), step
                    lr = optimizer.param_groups[0]["lr"]
                    pbar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.2e}", samples_s=f"{speed:.0f}")
                    log.write({"step": step, "epoch": epoch, "split": "train", **values, "lr": lr,
                               "temp": dist.value(model.temp).item(), "samples_per_s": speed, "grad_norm": grad_norm.item(),
                               "bad_steps": guard.total,
                               **sampler.stats()})
                # SIGTERM / SIGUSR1 on any rank: save this step and leave
                if preemption.stop(step, cfg.output_dir, lambda: checkpoint("checkpoint_last.pt")):
                    stopped = True
                    break
                if step % cfg.save_every == 0 and step % steps_per_epoch:
                    checkpoint("checkpoint_last.pt")
                if step >= total_steps:
                    break
            if stopped:
                break
            # end of an epoch (or of training): save first, so that a signal during the evaluation
            # loses no step (resumed, the run evaluates this epoch first); evaluate, keep the best
            checkpoint("checkpoint_last.pt")
            with dist.full_parameters(model):     # FSDP: every unit gathered while evaluating
                metrics = evaluate(model, cfg, val, tokenizer, device, precision, cfg.output_dir)
            log.write({"step": step, "epoch": epoch, "split": "val", **metrics})
            if metrics and dist.is_main():
                tqdm.write(f"epoch {epoch} step {step}: " + " ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
            if dist.gather_objects(metrics.get(best_key, -1.0) > best)[0]:   # rank 0 decides for all
                best = metrics[best_key]
                checkpoint("checkpoint_best.pt")
            evaluated = step
            checkpoint("checkpoint_last.pt")
            stopped = preemption.stop(step, cfg.output_dir)   # a signal during the evaluation
            tick, tick_step = time.time(), step
    pbar.close()
    if not metrics and not stopped:   # resumed a finished run: evaluate its weights again
        with dist.full_parameters(model):     # FSDP: every unit gathered while evaluating
            metrics = evaluate(model, cfg, val, tokenizer, device, precision, cfg.output_dir)
    if dist.is_main():
        print(json.dumps(metrics or {"step": step}))
    dist.cleanup()
    return metrics


if __name__ == "__main__":
    cli(main)
