"""ALBEF (Li et al. 2021, "Align before Fuse", arXiv:2107.07651): a ViT image encoder, a BERT
whose first layers are a text encoder and whose last layers a multimodal fusion encoder, trained
with three objectives at once (Sec. 3.2): image-text contrastive learning (ITC) on the unimodal
features, to *align* them before *fusing* them; image-text matching (ITM) with hard negatives
mined from the ITC similarities; and masked language modelling (MLM) conditioned on the image.
Momentum distillation (Sec. 3.4) softens the ITC and MLM targets with the predictions of an
exponential-moving-average copy of the model, which makes noisy web captions less harmful.

    python albef_train.py                                         # tiny built-in data, pretraining, CPU
    torchrun --nproc_per_node 8 albef_train.py --preset vit-b --init-from deit_base_patch16_224.pth \\
        --init-text bert-base-uncased/ --train-data cc3m.json --val-data coco_karpathy_val.json
    torchrun --nproc_per_node 8 albef_train.py --preset vit-b --task retrieval --init-from ALBEF.pth \\
        --tokenizer bert-base-uncased --train-data coco_karpathy_train.json --val-data coco_karpathy_test.json
    python albef_train.py --preset vit-b --task retrieval --eval-only --init-from mscoco.pth \\
        --tokenizer bert-base-uncased --val-data flickr30k_test.json --k-test 128     # the paper's zero-shot Flickr
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
from common.data import (Example, load_tokenizer, pre_caption_albef, read_annotations, retrieval_texts,
                         tiny_data, train_loader, train_transform, training_records)
from common.encoders import (BertEncoder, BertLMHead, BertLayer, Block, VisionTransformer, hf_bert_lm_head_map,
                             hf_bert_map, hf_vit_map, load_mapped, read_hf_checkpoint, read_weights_file,
                             resize_pos_embed, timm_vit_map)
from common.metrics import image_tokens, rerank_topk, retrieval_metrics
from common.utils import (MetricLog, NonFiniteGuard, Preemption, UserError, adamw, autocast,
                          check_finite, check_resume_position, cli, cosine_schedule,
                          evaluation_pending, first_nonfinite_module, grad_norm_, load_scaler_state,
                          micro_batches, precision_dtype, resolve_config, resolve_precision,
                          rng_state, save_checkpoint, save_config, seed_everything, set_rng_state,
                          sync_gradients)


# ---- config ----

@dataclass
class Config:
    preset: str = "tiny"            # tiny (the built-in data, CPU) or a paper configuration; see the list below
    task: str = "pretrain"          # pretrain (ITC + ITM + MLM) | retrieval (fine-tuning: ITC + ITM, positives by image id)
    # vision: ViT-B/16 initialised from DeiT (timm blocks, no pre-norm, final norm, LayerNorm eps 1e-6)
    image_size: int = 64            # pixels (256 pretraining, 384 retrieval fine-tuning in the paper)
    patch_size: int = 8             # pixels per patch side
    vision_width: int = 128         # ViT width
    vision_layers: int = 4          # ViT blocks
    vision_heads: int = 2           # ViT attention heads
    vision_eps: float = 1e-6        # ViT LayerNorm epsilon
    vision_mlp_dim: int = 512       # ViT MLP hidden width (3072 in ViT-B)
    # text: a bert-base; layers [0, fusion_layer) are the text encoder, [fusion_layer, text_layers) the fusion encoder
    text_width: int = 128           # BERT width
    text_layers: int = 4            # BERT layers, text and fusion together (12 in the paper)
    fusion_layer: int = 2           # first layer with cross-attention to the image (6 in the paper)
    text_heads: int = 2             # BERT attention heads
    text_mlp_dim: int = 512         # BERT feed-forward width
    max_positions: int = 64         # BERT's 512
    type_vocab_size: int = 2        # BERT's token types: row 0 is added to every token, as the official code
                                    # (LAVIS's BERT has none, which changes the numbers of ALBEF.pth there)
    text_eps: float = 1e-12         # BERT LayerNorm epsilon
    dropout: float = 0.0            # BERT hidden/attention dropout (0.1 in config_bert.json; 0 for the tiny runs)
    vocab_size: int = 0             # 0: the tokenizer's
    max_length: int = 32            # tokens per caption, [CLS] and [SEP] included (25 pretraining, 30 fine-tuning)
    max_words: int = 30             # words kept by pre_caption (dataset/utils.py; 30 everywhere)
    embed_dim: int = 64             # ITC space (256 in the paper)
    # method (configs/Pretrain.yaml, Retrieval_coco.yaml)
    # Queue: 65,536 in the paper. The tiny preset trains from scratch, where every feature starts
    # nearly the same; a long queue of such stale keys dilutes the ITC gradient ~queue/batch-fold
    # (measured with BLIP's tiny runs: recall after 200 steps 7 with 1,024 vs 26 with 64).
    # ALBEF starts from DeiT + BERT weights, whose features differ from the first step.
    queue_size: int = 64            # a multiple of the global batch
    momentum: float = 0.995         # EMA of the momentum model, applied after every finite step
    alpha: float = 0.4              # momentum-distillation weight, ramped up over the first epoch
    temp: float = 0.07              # ITC temperature: learnable, clamped to [0.001, 0.5]
    mlm_probability: float = 0.15   # share of tokens masked for MLM (Sec. 3.2)
    itm_negatives: str = "local"    # where ITM hard negatives come from: local (this rank's batch, the official
                                    # code) | global (every rank's batch: harder negatives, one more all-gather)
    k_test: int = 16                # ITM re-ranking candidates per query (256 COCO, 128 Flickr)
    rerank_score: str = "itm"       # itm: the ITM match logit alone (the official code, the paper's numbers) |
                                    # itm+itc: plus the cosine similarity (LAVIS's compute_sim_matrix)
    itm_batch: int = 256            # (image, text) pairs per ITM forward when re-ranking
    # data
    train_data: str = ""            # annotation file (JSON or CSV), or webdataset shards such as
                                    # "shards/{00000..00999}.tar" (sources joined with ::); empty: tiny
    val_data: str = ""              # retrieval evaluation split; empty with tiny: its val split
    image_root: str = ""            # folder relative image paths start from (default: the annotation file's)
    tokenizer: str = ""             # transformers folder or name (bert-base-uncased); empty: tiny's
    skip_bad: bool = False          # skip (and count) unreadable images and empty captions in training data
    min_scale: float = 0.9          # RandomResizedCrop's least area (0.2 pretraining, 0.5 fine-tuning)
    hflip: bool = False             # random flips (paper presets; tiny's captions say left/right)
    randaugment: int = 0            # RandomAugment(2, M)'s M of 10 (7: dataset/__init__.py); 0: off
    train_num_samples: int = 0      # shards: samples per epoch; 0: the sizes.json beside the shards
    dataset_resampled: bool = False  # shards: draw them with replacement (open_clip's flag)
    workers: int = 2                # data-loading processes per rank
    # optimisation
    epochs: int = 1                 # passes over the training data
    max_steps: int = 0              # >0: train exactly this many steps (overrides epochs)
    batch_size: int = 32            # per process; the queue grows by batch_size * accum_steps * world_size per step
    accum_steps: int = 1            # micro-batches per optimizer step, each against the step's queue (README)
    lr: float = 3e-4                # peak learning rate (1e-4 pretraining, 1e-5 fine-tuning in the paper)
    warmup_lr: float = 0.0          # warm-up starts here (1e-5 in the paper); 0: lr / warmup_steps
    min_lr: float = 0.0             # the cosine ends here (1e-5 pretraining, 1e-6 fine-tuning)
    weight_decay: float = 0.02      # AdamW decoupled weight decay (not on biases and 1-D tensors)
    warmup_steps: int = 50          # linear warm-up steps, then cosine to min_lr
    grad_clip_norm: float = 0.0     # clip the global gradient norm to this (0: off, as the paper)
    seed: int = 0                   # weights start from `seed` on every rank; rank r trains with seed + r
    precision: str = "auto"         # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16 (GradScaler)
    max_bad_steps: int = 10         # abort after this many non-finite steps in a row (each one is skipped)
    grad_checkpointing: bool = False  # recompute activations in backward (less memory, ~1/3 more compute)
    fsdp: bool = False              # shard weights, gradients and AdamW state over the ranks (FSDP2), not DDP
    compile: bool = False           # torch.compile the model
    # run
    output_dir: str = "runs/albef"  # metrics.jsonl, config.json and checkpoints go here
    resume: str = ""                # checkpoint path, or "auto": output_dir/checkpoint_last.pt if present.
                                    # A resumed run keeps its checkpoint's config (see resolve_config)
    init_from: str = ""             # official ALBEF file (ALBEF.pth, mscoco.pth, ...), one of ours, or for
                                    # pretraining from scratch a DeiT/ViT (timm state dict or transformers ViTModel folder)
    init_text: str = ""             # BERT to start the text and fusion encoder from (bert-base-uncased folder)
    eval_only: bool = False         # evaluate the --init-from / --resume weights and exit
    save_every: int = 1000          # steps between checkpoint_last.pt saves (and at every epoch end)
    log_every: int = 10             # steps between train records in metrics.jsonl
    report_to: str = ""             # also send those records to "tensorboard", "wandb" or "tensorboard,wandb"


PRESETS = {
    "tiny": {},
    # ViT-B/16 + bert-base, 256 px, 30 epochs, batch 64/GPU on 8 GPUs (configs/Pretrain.yaml)
    "vit-b": dict(image_size=256, patch_size=16, vision_width=768, vision_layers=12, vision_heads=12,
                  vision_mlp_dim=3072,
                  text_width=768, text_layers=12, fusion_layer=6, text_heads=12, text_mlp_dim=3072, max_positions=512,
                  dropout=0.1, tokenizer="bert-base-uncased", max_length=25, embed_dim=256, queue_size=65536,
                  lr=1e-4, warmup_lr=1e-5, min_lr=1e-5, weight_decay=0.02, warmup_steps=2000, epochs=30, batch_size=64,
                  workers=8, min_scale=0.2, hflip=True, randaugment=7),
}
# The retrieval fine-tuning recipe of the paper preset (configs/Retrieval_coco.yaml; Flickr30K:
# --epochs 10 --k-test 128): applied to --preset vit-b with --task retrieval unless the command
# line sets the field.
FINETUNE = {
    "retrieval": dict(image_size=384, lr=1e-5, warmup_lr=1e-5, min_lr=1e-6, warmup_steps=0, epochs=5, batch_size=32,
                      max_length=30, k_test=256, min_scale=0.5),
}
TASKS = ("pretrain", "retrieval")


def task_recipe(cfg):
    """The fine-tuning recipe of the paper preset for --task retrieval (under the command line,
    over the preset). The tiny preset has none."""
    return FINETUNE.get(cfg.task, {}) if cfg.preset != "tiny" else {}


RECIPES_DOC = ("task recipes (--task retrieval with a paper preset; the command line overrides them):\n"
               + "\n".join(f"  {task}: " + ", ".join(f"{k}={v}" for k, v in values.items())
                           for task, values in FINETUNE.items()))

MODEL_FIELDS = ("image_size", "patch_size", "vision_width", "vision_layers", "vision_heads", "vision_eps",
                "vision_mlp_dim", "text_width", "text_layers", "fusion_layer", "text_heads", "text_mlp_dim",
                "max_positions", "type_vocab_size", "text_eps", "vocab_size", "embed_dim", "queue_size")


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
            image_size=cfg.image_size, patch_size=cfg.patch_size, width=cfg.vision_width, layers=cfg.vision_layers,
            heads=cfg.vision_heads, mlp_dim=cfg.vision_mlp_dim, act="gelu", eps=cfg.vision_eps, pre_norm=False,
            patch_bias=True)
        # One BERT: no cross-attention below fusion_layer (config_bert.json: "fusion_layer": 6).
        self.text_encoder = BertEncoder(
            vocab_size=cfg.vocab_size, width=cfg.text_width, layers=cfg.text_layers, heads=cfg.text_heads,
            mlp_dim=cfg.text_mlp_dim, max_positions=cfg.max_positions, type_vocab_size=cfg.type_vocab_size,
            cross_dim=cfg.vision_width, cross_layers=range(cfg.fusion_layer, cfg.text_layers), eps=cfg.text_eps,
            dropout=cfg.dropout)
        # MLM head of BertForMaskedLM, its decoder tied to the word embeddings (as bert-base).
        self.mlm_head = BertLMHead(cfg.text_width, cfg.vocab_size, eps=cfg.text_eps)
        self.mlm_head.decoder.weight = self.text_encoder.word_embeddings.weight
        self.vision_proj = nn.Linear(cfg.vision_width, cfg.embed_dim)            # 768 -> 256, with bias
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
        # They start empty: a slot takes part in ITC once `queue_filled` says it holds a key (the
        # official code starts from random unit vectors, in every softmax until overwritten).
        self.register_buffer("image_queue", torch.zeros(cfg.embed_dim, cfg.queue_size))
        self.register_buffer("text_queue", torch.zeros(cfg.embed_dim, cfg.queue_size))
        self.register_buffer("idx_queue", torch.full((1, cfg.queue_size), -100, dtype=torch.long))
        self.register_buffer("queue_filled", torch.zeros(1, cfg.queue_size, dtype=torch.bool))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self._ptr, self.pending_keys, self._ema_params = None, None, None
        self.register_load_state_dict_post_hook(lambda module, keys: setattr(module, "_ptr", None))

    # -- the momentum model and the queues --

    def online_and_momentum(self):
        """(online, momentum) ModuleLists in the same order; their .parameters() list each tied
        tensor once (the MLM decoder is the word-embedding matrix), so the EMA updates it once."""
        names = ("visual_encoder", "text_encoder", "mlm_head", "vision_proj", "text_proj")
        return (nn.ModuleList(getattr(self, n) for n in names), nn.ModuleList(getattr(self, n + "_m") for n in names))

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
        both only if the step was finite (`ok`, a 0-d bool tensor; None = finite). ALBEF updates
        the momentum model at the start of the next forward; doing it right after the update is
        the same sequence, and lets a skipped step leave the momentum model untouched."""
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
            online, momentum = self.online_and_momentum()
            self._ema_params = (list(online.parameters()), list(momentum.parameters()))
        torch._foreach_lerp_(self._ema_params[1], self._ema_params[0], weight)

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
        filled = torch.ones_like(idx[None], dtype=torch.bool)
        for queue, new in ((self.image_queue, image_feat.T), (self.text_queue, text_feat.T), (self.idx_queue, idx[None]),
                           (self.queue_filled, filled)):
            queue[:, ptr:ptr + n] = new if ok is None else torch.where(ok, new.to(queue.dtype), queue[:, ptr:ptr + n])
        self._ptr = (ptr + n) % self.cfg.queue_size
        self.queue_ptr.fill_(self._ptr)

    def set_grad_checkpointing(self, enabled=True):
        self.visual_encoder.transformer.grad_checkpointing = enabled
        self.text_encoder.grad_checkpointing = enabled

    # -- encoders (Fig. 1) --

    def image_features(self, images):                                   # ViT tokens (B, 1 + P, Dv)
        return self.visual_encoder(images)

    def image_embed(self, image_embeds):                                # ITC space, [CLS] -> (B, E)
        return F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)

    def text_features(self, ids, mask):
        """Text encoder: BERT layers [0, fusion_layer), no image. (B, L, Dt)."""
        return self.text_encoder(ids, mask, end=self.fusion_layer)

    def text_embed(self, text_embeds):                                  # ITC space, [CLS] -> (B, E)
        return F.normalize(self.text_proj(text_embeds[:, 0]), dim=-1)

    def fuse(self, text_embeds, mask, image_embeds):
        """Multimodal encoder: layers [fusion_layer, L) on the text encoder's output, each with
        cross-attention to all image tokens. (B, L, Dt)."""
        return self.text_encoder(None, mask, context=image_embeds, start=self.fusion_layer, hidden=text_embeds)

    def itm_logits(self, text_embeds, mask, image_embeds):             # (B, 2): [no match, match]
        return self.itm_head(self.fuse(text_embeds, mask, image_embeds)[:, 0])

    def encode_image(self, images):
        return self.image_embed(self.image_features(images))

    def encode_text(self, ids, mask):
        return self.text_embed(self.text_features(ids, mask))

    def forward(self, images, ids, mask, idx, alpha, task="pretrain"):
        """Losses of one step. idx: (B,) image ids (positives share one in retrieval fine-tuning);
        alpha: the distillation weight, a 0-d tensor (a Python float would recompile a compiled
        step at every new value)."""
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        image_embeds = self.image_features(images)                      # (B, 1 + P, Dv)
        image_feat = self.image_embed(image_embeds)                     # (B, E)
        text_embeds = self.text_features(ids, mask)                     # (B, L, Dt)
        text_feat = self.text_embed(text_embeds)                        # (B, E)
        with torch.no_grad():                                           # the momentum model's view
            image_embeds_m = self.visual_encoder_m(images)
            image_feat_m = F.normalize(self.vision_proj_m(image_embeds_m[:, 0]), dim=-1)
            text_feat_m = F.normalize(self.text_proj_m(self.text_encoder_m(ids, mask, end=self.fusion_layer)[:, 0]),
                                      dim=-1)
        losses = {}
        # --- ITC with momentum distillation (Sec. 3.2, 3.4) ---
        losses["loss_itc"] = self.loss_itc(image_feat, text_feat, image_feat_m, text_feat_m, idx, alpha, task)
        # --- ITM with hard negatives mined from the contrastive similarities (Sec. 3.2) ---
        losses["loss_itm"] = self.loss_itm(text_embeds, mask, image_embeds, idx, image_feat, text_feat,
                                           image_feat_m, text_feat_m)
        # --- MLM with the image, and momentum distillation (Sec. 3.2, 3.4); pretraining only ---
        if task == "pretrain":
            losses["loss_mlm"] = self.loss_mlm(ids, mask, image_embeds, image_embeds_m, alpha)
        return losses

    # ---- losses ----

    def loss_itc(self, image_feat, text_feat, image_feat_m, text_feat_m, idx, alpha, task):
        """s(I, T) = g_v(v_cls) . g'_w(w'_cls) / tau against the momentum keys of this batch and
        the queue (Eq. 1-2); targets alpha * q (the momentum model's softmax) + (1 - alpha) * y
        (Eq. 6), y the ground truth: the diagonal in pretraining, every key with the same image id
        in retrieval fine-tuning (model_retrieval.py). Queue slots not yet filled are left out of
        every softmax. This batch's keys wait in `pending_keys` for finish_step() to enqueue them."""
        B = idx.shape[0]
        with torch.no_grad():
            image_keys = torch.cat([image_feat_m.T, self.image_queue.clone()], 1)       # (E, B + M)
            text_keys = torch.cat([text_feat_m.T, self.text_queue.clone()], 1)
            filled = F.pad(self.queue_filled, (B, 0), value=True)                       # (1, B + M)
            if task == "retrieval":
                idx_all = torch.cat([idx[None], self.idx_queue.clone()], 1)             # (1, B + M)
                pos = ((idx[:, None] == idx_all) & filled).float()
                targets = pos / pos.sum(1, keepdim=True)
            else:
                targets = F.pad(torch.eye(B, device=idx.device), (0, image_keys.shape[1] - B))   # (B, B + M)

        def only_filled(sim):       # empty slots: -inf, so that they get no share of a softmax
            return sim.masked_fill(~filled, float("-inf"))

        def cross_entropy(sim, target):     # 0 * -inf at the empty slots would be NaN: take 0 there
            return -(F.log_softmax(only_filled(sim), 1).masked_fill(~filled, 0) * target).sum(1).mean()
        # Similarities in fp32 even under autocast: at temperature 0.07 (down to 0.001) bf16's
        # spacing near the largest logits would be coarser than the differences that matter.
        with torch.autocast(image_feat.device.type, enabled=False):
            image_keys, text_keys = image_keys.float(), text_keys.float()
            with torch.no_grad():
                i2t_targets = (alpha * pseudo_targets(only_filled(image_feat_m.float() @ text_keys / self.temp))
                               + (1 - alpha) * targets)
                t2i_targets = (alpha * pseudo_targets(only_filled(text_feat_m.float() @ image_keys / self.temp))
                               + (1 - alpha) * targets)
            sim_i2t = image_feat.float() @ text_keys / self.temp                          # (B, B + M)
            sim_t2i = text_feat.float() @ image_keys / self.temp
            loss_i2t = cross_entropy(sim_i2t, i2t_targets)
            loss_t2i = cross_entropy(sim_t2i, t2i_targets)
        self.pending_keys = (image_feat_m.float(), text_feat_m.float(), idx)
        return (loss_i2t + loss_t2i) / 2

    def loss_itm(self, text_embeds, mask, image_embeds, idx, image_feat, text_feat, image_feat_m, text_feat_m):
        """Every positive pair, plus per text a hard negative image and per image a hard negative
        text, drawn from softmax(s) over the batch (Sec. 3.2: "negatives that have higher
        contrastive similarity ... have a higher chance to be sampled"). s is the ITC similarity of
        the online features to the momentum keys (sim[:, :bs] in the official code). Local batch
        by default (the official pretraining and fine-tuning); --itm-negatives global draws from
        every rank's batch, with the image tokens and text-encoder outputs gathered with gradient."""
        B = idx.shape[0]
        all_ranks = self.cfg.itm_negatives == "global"
        neg_image, neg_text, idx_all = hard_negatives(image_feat, text_feat, image_feat_m, text_feat_m, idx, self.temp,
                                                      all_ranks)                            # (B,) into the batch
        text_all, mask_all, image_all = text_embeds, mask, image_embeds
        if all_ranks:
            text_all, mask_all = dist.gather_with_grad(text_embeds), dist.gather_no_grad(mask)
            image_all = dist.gather_with_grad(image_embeds)
        texts = torch.cat([text_embeds, text_embeds, text_all[neg_text]])            # positive, neg image, neg text
        masks = torch.cat([mask, mask, mask_all[neg_text]])
        images = torch.cat([image_embeds, image_all[neg_image], image_embeds])
        logits = self.itm_logits(texts, masks, images)                                # (3B, 2)
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
        masked_ids, labels = mask_tokens(ids, self.cfg.mlm_probability, self.mask_id, self.cfg.vocab_size,
                                         never=(self.pad_id, self.cls_id))
        logits = self.mlm_head(self.text_encoder(masked_ids, mask, context=image_embeds)).float()   # (B, L, V)
        with torch.no_grad():
            soft = pseudo_targets(self.mlm_head_m(self.text_encoder_m(masked_ids, mask, context=image_embeds_m)))
        predicted = labels != -100
        # one cross-entropy against (1 - alpha) * one-hot + alpha * q = (1 - alpha) CE(y) + alpha CE(q)
        target = soft.mul_(alpha).scatter_add_(-1, labels.clamp(min=0)[..., None],
                                               (1 - alpha).expand(labels.shape)[..., None].to(soft.dtype))
        per_token = F.cross_entropy(logits.flatten(0, 1), target.flatten(0, 1), reduction="none").view(labels.shape)
        # Mean over the masked tokens. A batch where nothing was masked (very short captions) gives 0,
        # not 0/0: the official code's CrossEntropyLoss would return NaN there.
        return (per_token * predicted).sum() / predicted.sum().clamp(min=1)

    # ---- weights ----

    @classmethod
    def from_official(cls, path, cfg=None, tokenizer=None, state=None):
        """Build from a released ALBEF checkpoint: the pretraining files (ALBEF.pth, ALBEF_4M.pth:
        {'model': state_dict} with text_encoder.bert.*, text_encoder.cls.*, the momentum copies,
        the queues and temp) or the retrieval files (mscoco.pth, flickr30k.pth: text_encoder.* with
        no 'bert.', no MLM head, no momentum model, no queues). The architecture is read off the
        weights (heads = width / 64, as every ALBEF model); the image size is `cfg`'s (positions
        interpolated, as Retrieval.py). Every key is mapped and shape-checked; the parts a file may
        lack are named in the log and start as the official code would: the MLM head at BERT's
        initialisation, the momentum model as a copy, the queues empty (a pretraining file's are
        loaded, as Retrieval.py does). `state`: the file's state dict when the caller has it."""
        state = dict(state) if state is not None else read_official(path)
        arch = official_architecture(state, path)
        if cfg is not None:
            arch.pop("image_size")      # the run's: positions are interpolated to it
        cfg = dataclasses.replace(cfg or Config(), **arch)
        # without a tokenizer: bert-base-uncased's [MASK], [PAD], [CLS], which every release uses
        model = build_albef(cfg, tokenizer) if tokenizer is not None else ALBEF(cfg, mask_id=103, pad_id=0, cls_id=101)
        L, f = cfg.text_layers, cfg.fusion_layer
        bert = "text_encoder.bert" if any(k.startswith("text_encoder.bert.") for k in state) else "text_encoder"
        grid = cfg.image_size // cfg.patch_size
        mapping, lacking = {}, []
        for suffix in ("", "_m"):
            if suffix and not any(k.startswith("visual_encoder_m.") for k in state):
                lacking.append("momentum model")
                break
            vit = f"visual_encoder{suffix}"
            state[f"{vit}.pos_embed"] = resize_pos_embed(state[f"{vit}.pos_embed"][0], grid)
            mapping.update(timm_vit_map(vit, vit, cfg.vision_layers))
            mapping.update(hf_bert_map(f"text_encoder{suffix}", bert.replace("text_encoder", f"text_encoder{suffix}"),
                                       L, cross_layers=range(f, L), token_types=True))
            words = bert.replace("text_encoder", f"text_encoder{suffix}") + ".embeddings.word_embeddings.weight"
            if f"text_encoder{suffix}.cls.predictions.bias" in state:
                mapping.update(hf_bert_lm_head_map(f"mlm_head{suffix}", f"text_encoder{suffix}.cls.predictions",
                                                   tied_to=words))
            else:
                mapping[f"mlm_head{suffix}.decoder.weight"] = words      # tied: the word embeddings
                if not suffix:
                    lacking.append("MLM head")
            for name in ("vision_proj", "text_proj"):
                mapping.update({f"{name}{suffix}.{p}": f"{name}{suffix}.{p}" for p in ("weight", "bias")})
        mapping.update({f"itm_head.{p}": f"itm_head.{p}" for p in ("weight", "bias")})
        mapping["temp"] = "temp"
        keep = ["image_queue", "text_queue", "idx_queue", "queue_filled", "queue_ptr"]
        if "momentum model" in lacking:
            keep += ["visual_encoder_m.", "text_encoder_m.", "mlm_head_m.", "vision_proj_m.", "text_proj_m."]
        if "MLM head" in lacking:
            keep += [f"mlm_head{s}.{n}" for s in ("", "_m") for n in ("dense.", "LayerNorm.", "decoder.bias")]
        ignore = ("position_ids", "cls.predictions.decoder.", "image_queue", "text_queue", "idx_queue", "queue_ptr")
        load_mapped(model, state, mapping, source=path, ignore=ignore, keep_init=keep)
        if "momentum model" in lacking:
            model.copy_to_momentum()
        lacking += load_official_queues(model, state)
        if dist.is_main():
            print(f"{path}: loaded every weight of the file" + (f"; not in it: {', '.join(lacking)}" if lacking else ""))
        return model


def load_official_queues(model, state):
    """A pretraining file's queues (the momentum features of its last steps) into the model, as
    Retrieval.py's load_state_dict does; only idx_queue is not in the files (ALBEF issue #79), so
    those keys keep id -100, never a positive. Rolled so that the oldest key is in slot 0 and the
    pointer 0 (the same keys, overwritten in the same order, whatever the global batch). Returns
    what could not be loaded, for the log; the queues then start empty."""
    if "image_queue" not in state:
        return ["queues"]
    if state["image_queue"].shape != model.image_queue.shape:
        return [f"queues of this run's length (the file's {state['image_queue'].shape[1]}, --queue-size "
                f"{model.cfg.queue_size})"]
    ptr = int(state.get("queue_ptr", torch.zeros(1))[0])
    with torch.no_grad():
        model.queue_filled.fill_(True)              # official files: full; ours say which slots are
        for name in ("image_queue", "text_queue", "idx_queue", "queue_filled"):
            if name in state:
                getattr(model, name).copy_(state[name].roll(-ptr, 1))
        model.queue_ptr.zero_()
    return []


def read_official(path):
    """The state dict of an official ALBEF checkpoint ({'model': state_dict}, or a bare state dict)."""
    _, state = read_weights_file(path)
    if "visual_encoder.pos_embed" not in state:
        raise UserError(f"{path}: not an ALBEF checkpoint (no 'model' state dict with 'visual_encoder.pos_embed')")
    return dict(state)


def official_architecture(state, path):
    """Config fields of an official checkpoint, read off its shapes."""
    bert = "text_encoder.bert." if "text_encoder.bert.embeddings.word_embeddings.weight" in state else "text_encoder."
    try:
        width, _, patch, _ = state["visual_encoder.patch_embed.proj.weight"].shape
        grid = int((state["visual_encoder.pos_embed"].shape[1] - 1) ** 0.5)
        vocab, text_width = state[bert + "embeddings.word_embeddings.weight"].shape
        layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("visual_encoder.blocks."))
        text_layers = 1 + max(int(k[len(bert):].split(".")[2]) for k in state if k.startswith(bert + "encoder.layer."))
        fusion = min(int(k[len(bert):].split(".")[2]) for k in state
                     if k.startswith(bert + "encoder.layer.") and ".crossattention." in k)
        return dict(patch_size=patch, vision_width=width, vision_layers=layers, vision_heads=width // 64,
                    vision_mlp_dim=state["visual_encoder.blocks.0.mlp.fc1.weight"].shape[0],
                    text_width=text_width, text_layers=text_layers, fusion_layer=fusion, text_heads=text_width // 64,
                    text_mlp_dim=state[bert + "encoder.layer.0.intermediate.dense.weight"].shape[0],
                    max_positions=state[bert + "embeddings.position_embeddings.weight"].shape[0],
                    type_vocab_size=state[bert + "embeddings.token_type_embeddings.weight"].shape[0],
                    vocab_size=vocab, embed_dim=state["vision_proj.weight"].shape[0], image_size=grid * patch)
    except (KeyError, ValueError) as e:
        raise UserError(f"{path}: not in the official ALBEF key layout ({type(e).__name__}: {e})") from None


def special_ids(tokenizer):
    tok = tokenizer.tok
    if tok.mask_token_id is None:
        raise UserError(f"tokenizer {tokenizer.name} has no [MASK] token, which MLM needs")
    return dict(mask_id=tok.mask_token_id, pad_id=tokenizer.pad_id, cls_id=tokenizer.bos_id)


def check_vocab(cfg, tokenizer):
    if cfg.vocab_size < tokenizer.vocab_size:
        raise UserError(f"model vocabulary {cfg.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}")


def build_albef(cfg, tokenizer):
    check_vocab(cfg, tokenizer)
    return ALBEF(cfg, **special_ids(tokenizer))


def pseudo_targets(logits_m):
    """Momentum distillation's pseudo-targets q (Sec. 3.4): the momentum model's softmax over the
    last dimension (ITC: the keys; MLM: the vocabulary), in fp32."""
    return F.softmax(logits_m.float(), -1)


def mask_tokens(ids, probability, mask_id, vocab_size, never, generator=None):
    """BERT's masking (Devlin et al. 2019, as ALBEF's mask()): each token is chosen with
    `probability`, except the `never` ids ([PAD], [CLS]); a chosen token becomes [MASK] with
    probability 0.8, a random token of the vocabulary with 0.1, and stays with 0.1. Returns the
    masked ids and the labels (the original id where chosen, -100 elsewhere)."""
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
    image id. Queries are the online features, keys the momentum ones (ALBEF's sim[:, :bs]).
    Returns (neg_image, neg_text, idx_all), indices into that batch."""
    gather = dist.gather_no_grad if all_ranks else (lambda x: x)
    idx_all = gather(idx)                                                              # (N,)
    sim_i2t = image_feat.float() @ gather(text_keys).float().T / temp                  # (B, N)
    sim_t2i = text_feat.float() @ gather(image_keys).float().T / temp
    same = idx[:, None] == idx_all[None, :]                       # the positive and its duplicates
    neg_image = sample_negatives(F.softmax(sim_t2i, 1).masked_fill(same, 0))
    neg_text = sample_negatives(F.softmax(sim_i2t, 1).masked_fill(same, 0))
    return neg_image, neg_text, idx_all


def sample_negatives(weights):
    """One index per row, drawn with probability proportional to `weights` (B, N), by the
    exponential trick: argmax_j w_j / E_j with E_j ~ Exp(1) picks j with probability
    w_j / sum(w), the distribution torch.multinomial draws from, without its host syncs. Rows
    with no mass left (a batch of one, every candidate sharing the image id, NaN similarities)
    draw uniformly instead of failing ('invalid multinomial distribution')."""
    weights = torch.nan_to_num(weights.float(), nan=0.0, posinf=0.0, neginf=0.0).clamp_(min=0)
    weights = torch.where(weights.sum(1, keepdim=True) > 0, weights, 1.0)      # no boolean indexing: no sync
    noise = torch.empty_like(weights).exponential_().clamp_(min=1e-30)      # E = 0 would make 0/0 a NaN
    return (weights / noise).argmax(1)


# ---- starting weights ----

def load_vision_init(model, path, state=None):
    """--init-from a DeiT / ViT for pretraining from scratch (ALBEF starts its ViT from DeiT-B/16):
    a timm-format state dict file (cls_token, pos_embed, blocks.i..., norm; a classifier head is
    dropped) or a transformers ViTModel / ViTForImageClassification folder. Positions are
    interpolated to the run's image size; every ViT weight must be there with our shape."""
    ours = model.visual_encoder
    grid = ours.grid
    if os.path.isdir(path):
        config, state = read_hf_checkpoint(path)
        pre = "vit." if any(k.startswith("vit.") for k in state) else ""
        key = f"{pre}embeddings.position_embeddings"
        c = model.cfg
        check_hf_config(path, config, num_attention_heads=(c.vision_heads, "--vision-heads"),
                        layer_norm_eps=(c.vision_eps, "--vision-eps"), hidden_act=("gelu", None),
                        qkv_bias=(True, None))
        mapping = hf_vit_map("visual_encoder", pre.rstrip("."), model.cfg.vision_layers)
        ignore = ("pooler.", "classifier.")
    else:
        state = state if state is not None else read_weights_file(path)[1]
        if "dist_token" in state:
            raise UserError(f"{path}: a distilled DeiT (dist_token); ALBEF starts from the plain DeiT-B/16 "
                            f"(deit_base_patch16_224)")
        key = "pos_embed"
        mapping = timm_vit_map("visual_encoder", "", model.cfg.vision_layers)
        ignore = ("head.", "fc_norm.", "pre_logits.")
    if key not in state:
        raise UserError(f"{path}: no '{key}'; expected a timm/DeiT ViT state dict or a transformers ViTModel folder")
    state = dict(state)
    state[key] = resize_pos_embed(state[key].reshape(-1, state[key].shape[-1]), grid)
    holder = nn.Module()                           # our keys 'visual_encoder.*' and nothing else
    holder.visual_encoder = ours
    load_mapped(holder, state, mapping, source=path, ignore=ignore)


def check_hf_config(path, config, **fields):
    """Refuse a transformers config.json field that would change what our modules compute, naming
    it: `fields` maps each to (our value, the flag that sets it, or None where ours is fixed).
    (Sizes need no check: the weights' shapes are compared key by key.)"""
    for key, (ours, flag) in fields.items():
        if config.get(key, ours) != ours:
            raise UserError(f"{path}: config.json has {key} {config[key]!r}, this run's model {ours!r}"
                            + (f" (set {flag})" if flag else " (the only one supported)"))


def load_text_init(model, path):
    """--init-text: a transformers BERT folder (bert-base-uncased: BertForPreTraining /
    BertForMaskedLM / BertModel) into the text and fusion encoder and the MLM head. The fusion
    layers' cross-attention is not in BERT and keeps its initialisation, as in ALBEF; the MLM head
    too when the folder is a bare BertModel."""
    config, state = read_hf_checkpoint(path)
    cfg = model.cfg
    check_hf_config(path, config, num_attention_heads=(cfg.text_heads, "--text-heads"),
                    layer_norm_eps=(cfg.text_eps, "--text-eps"), num_hidden_layers=(cfg.text_layers, "--text-layers"),
                    hidden_act=("gelu", None), position_embedding_type=("absolute", None))
    pre = "bert" if any(k.startswith("bert.") for k in state) else ""
    holder = nn.Module()
    holder.text_encoder, holder.mlm_head = model.text_encoder, model.mlm_head
    mapping = hf_bert_map("text_encoder", pre, cfg.text_layers, token_types=cfg.type_vocab_size > 0)
    keep = ["text_encoder.layer." + f"{i}.crossattention." for i in range(cfg.fusion_layer, cfg.text_layers)]
    words = f"{pre + '.' if pre else ''}embeddings.word_embeddings.weight"
    if "cls.predictions.bias" in state:
        mapping.update(hf_bert_lm_head_map("mlm_head", "cls.predictions", tied_to=words))
    else:
        mapping["mlm_head.decoder.weight"] = words                             # tied: the word embeddings
        keep += ["mlm_head.dense.", "mlm_head.LayerNorm.", "mlm_head.decoder.bias"]
    load_mapped(holder, state, mapping, source=path, keep_init=keep,
                ignore=("position_ids", "pooler.", "cls.seq_relationship.", "cls.predictions.decoder."))


def read_init(path):
    """What an --init-from is, and its contents, read once: ('ours', our checkpoint), ('official',
    its state dict: ALBEF's layout), ('vit', a timm/DeiT state dict, or None for a transformers folder)."""
    if os.path.isdir(path):
        return "vit", None
    saved, state = read_weights_file(path)
    if "visual_encoder.pos_embed" in state:
        return "official", state
    if "visual_encoder.positional_embedding" in state:
        return "ours", saved
    if "pos_embed" in state or "cls_token" in state:
        return "vit", state
    raise UserError(f"--init-from {path}: neither an ALBEF checkpoint (official or ours) nor a timm/DeiT ViT "
                    f"(its keys start {sorted(state)[:3]})")


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
    # dataset/__init__.py's crop, flip and RandomAugment at the paper preset; the tiny preset's light
    # crop has no flip (its captions say left and right)
    example = Example(train_transform(cfg.image_size, cfg.min_scale, cfg.hflip, cfg.randaugment), tokenizer,
                      cfg.max_length, text=caption_text(cfg))
    records = training_records(train_file, root, cfg.skip_bad)          # an annotation file's, or shards
    loader, sampler = train_loader(records, example, cfg, rank, world_size, train_file)
    return loader, sampler, val


def check_config(cfg, world_size):
    """Start-up checks with clear messages (instead of an assert deep in the first step)."""
    if cfg.queue_size % (cfg.batch_size * world_size):
        raise UserError(f"--queue-size {cfg.queue_size} is not a multiple of the global batch "
                         f"{cfg.batch_size} x {world_size} = {cfg.batch_size * world_size}")
    if not 0 < cfg.fusion_layer < cfg.text_layers:
        raise UserError(f"--fusion-layer {cfg.fusion_layer} must leave text layers below it and fusion layers "
                         f"from it up to --text-layers {cfg.text_layers}")
    if cfg.max_length > cfg.max_positions:
        raise UserError(f"--max-length {cfg.max_length} exceeds the {cfg.max_positions} position embeddings")
    if not 0 < cfg.mlm_probability < 1:
        raise UserError(f"--mlm-probability {cfg.mlm_probability} must be in (0, 1)")


# ---- evaluation (Sec. 4; Retrieval.py) ----

def shard_image_tokens(model, cfg, records, device, precision):
    return image_tokens(model.image_features, [r["image"] for r in records], cfg.image_size, cfg.batch_size,
                        cfg.workers, device, precision)


@torch.no_grad()
def evaluate_retrieval(model, cfg, val, tokenizer, device, precision, tokens=None):
    """ITC similarity for all pairs, then the ITM head re-ranks each row's top-k candidates
    (Sec. 4: "we first compute the feature similarity score s_itc for all image-text pairs. Then
    we take the top-k candidates and calculate their ITM score s_itm for ranking"). Score: the ITM
    match logit (Retrieval.py), or plus the cosine with --rerank-score itm+itc (LAVIS); -100
    outside the top k.

    Every rank embeds its shard of the texts (keeping the text encoder's outputs, which the fusion
    encoder reads, gathered in the autocast dtype) and of the images (keeping only its images' ViT
    tokens). Image->text rows are this rank's images; each text->image pair is scored by the rank
    that holds the image (`tokens`: this rank's ViT tokens, when the caller has them). Returns the
    metrics and the number of ITM forward passes."""
    texts, txt2img = retrieval_texts(val, caption_text(cfg))
    ids = tokenizer(texts, cfg.max_length).to(device)
    mask = (ids != tokenizer.pad_id).long()
    half = precision_dtype(precision)
    t0, t1 = dist.shard_range(len(texts))
    text_feat, text_embeds = [torch.zeros(0, cfg.embed_dim, device=device)], [
        torch.zeros(0, cfg.max_length, cfg.text_width, device=device, dtype=half)]
    for i in range(t0, t1, cfg.batch_size):
        j = min(i + cfg.batch_size, t1)
        with autocast(precision, device):
            h = model.text_features(ids[i:j], mask[i:j])
            text_feat.append(model.text_embed(h).float())
        text_embeds.append(h.to(half))
    text_feat = dist.gather_varlen(torch.cat(text_feat))                              # (n_txt, E)
    text_embeds = dist.gather_varlen(torch.cat(text_embeds))                          # (n_txt, L, Dt)
    i0, i1 = dist.shard_range(len(val))
    if tokens is None:
        tokens = shard_image_tokens(model, cfg, val[i0:i1], device, precision)         # (mine, 1 + P, Dv)
    image_feat = [torch.zeros(0, cfg.embed_dim, device=device)]
    for i in range(0, len(tokens), cfg.batch_size):
        with autocast(precision, device):
            image_feat.append(model.image_embed(tokens[i:i + cfg.batch_size]).float())
    image_feat = dist.gather_varlen(torch.cat(image_feat))                            # (n_img, E)
    sim = image_feat @ text_feat.T                                                      # (n_img, n_txt)
    k = min(cfg.k_test, len(texts), len(val))

    def itm(t, i):              # ITM match logits of texts t (their text-encoder outputs) with this rank's images i
        with autocast(precision, device):
            return model.itm_logits(text_embeds[t], mask[t], tokens[i])[:, 1].float()
    rows_i2t, rows_t2i = rerank_topk(sim, (i0, i1), k, itm, cfg.itm_batch, add_similarity=cfg.rerank_score == "itm+itc")
    metrics = retrieval_metrics(rows_i2t, txt2img, rows_t2i)
    metrics["itc_r_mean"] = retrieval_metrics(sim, txt2img)["r_mean"]             # before re-ranking
    return metrics, k * (len(texts) + len(val))


@torch.no_grad()
def evaluate_mlm(model, cfg, val, tokenizer, device, precision, tokens=None):
    """MLM accuracy on the val captions with their images: the same masking as training, drawn
    from a fixed seed, top-1 prediction at the masked positions. `mlm_acc_majority` is the
    accuracy of always predicting the most frequent masked token: the baseline a model that
    ignores its input reaches. Images are split across ranks (`tokens`: this rank's ViT tokens,
    when the caller has them); the counts are summed."""
    recs = val[slice(*dist.shard_range(len(val)))]
    if tokens is None:
        tokens = shard_image_tokens(model, cfg, recs, device, precision)
    ids = tokenizer(retrieval_texts(recs, caption_text(cfg))[0], cfg.max_length).to(device)
    image_of = torch.tensor([i for i, r in enumerate(recs) for _ in r["captions"]], dtype=torch.long, device=device)
    masked, labels = mask_tokens(ids, cfg.mlm_probability, model.mask_id, cfg.vocab_size,
                                 never=(model.pad_id, model.cls_id),
                                 generator=torch.Generator(device=device).manual_seed(cfg.seed))
    correct = torch.zeros((), device=device)
    for a in range(0, len(ids), cfg.batch_size):
        b = slice(a, a + cfg.batch_size)
        with autocast(precision, device):
            h = model.text_encoder(masked[b], (ids[b] != tokenizer.pad_id).long(), context=tokens[image_of[b]])
            predicted = model.mlm_head(h).argmax(-1)
        chosen = labels[b] != -100
        correct += (predicted[chosen] == labels[b][chosen]).sum()
    counts = torch.bincount(labels[labels != -100], minlength=cfg.vocab_size).float()
    correct, counts = dist.all_reduce_sum(correct), dist.all_reduce_sum(counts)
    total = counts.sum().clamp(min=1)
    return {"mlm_acc": float(100 * correct / total), "mlm_acc_majority": float(100 * counts.max() / total),
            "mlm_tokens": int(counts.sum())}


@torch.no_grad()
def evaluate(model, cfg, val, tokenizer, device, precision):
    if val is None:
        return {}
    was_training = model.training
    model.eval()
    tick = time.time()
    tokens = shard_image_tokens(model, cfg, val[slice(*dist.shard_range(len(val)))], device, precision)  # ViT once
    metrics, n_itm = evaluate_retrieval(model, cfg, val, tokenizer, device, precision, tokens)
    metrics.update(itm_pairs=n_itm, retrieval_eval_s=time.time() - tick)
    if cfg.task == "pretrain":
        metrics.update(evaluate_mlm(model, cfg, val, tokenizer, device, precision, tokens))
    model.train(was_training)
    return metrics


# ---- training ----

# Set by the run, not by the weights: an --init-from of our checkpoint keeps the values the command
# line or the task recipe gives these (fine-tuning at 384 px from 256 px pretraining interpolates the
# position embeddings), and the checkpoint's otherwise.
RUN_FIELDS = ("image_size", "queue_size")


def build_model(cfg, tokenizer, init=(None, None)):
    """Fresh model; or --init-from an official ALBEF file, one of our checkpoints (architecture
    from the weights, image size and queue length from this run, its queues kept when the length
    is the same, as Retrieval.py keeps a pretraining file's), or a DeiT/ViT;
    then --init-text a BERT. `init`: read_init(cfg.init_from), read once by the caller."""
    kind, saved = init
    if kind == "official":
        model = ALBEF.from_official(cfg.init_from, cfg, tokenizer, state=saved)
        for k in MODEL_FIELDS:
            setattr(cfg, k, getattr(model.cfg, k))
    elif kind == "ours":
        run = {k: getattr(cfg, k) for k in RUN_FIELDS if k in getattr(cfg, "cli_keys", ()) or k in task_recipe(cfg)}
        for k in MODEL_FIELDS:
            setattr(cfg, k, saved["config"][k])
        cfg.__dict__.update(run)
        state = dict(saved["model"])
        grid = cfg.image_size // cfg.patch_size
        for key in ("visual_encoder.positional_embedding", "visual_encoder_m.positional_embedding"):
            state[key] = resize_pos_embed(state[key], grid)
        queues = ("idx_queue", "image_queue", "queue_filled", "queue_ptr", "text_queue")
        model = build_albef(cfg, tokenizer)
        missing, unexpected = model.load_state_dict({k: v for k, v in state.items() if k not in queues},
                                                    strict=False)
        assert not unexpected and sorted(missing) == list(queues), missing
        # the run's queues too, as from an official file (ids of its own data: never positives here)
        lacking = load_official_queues(model, {k: state[k] for k in queues if k in state and k != "idx_queue"})
        if lacking and dist.is_main():
            print(f"{cfg.init_from}: the queues start empty; not loaded: {', '.join(lacking)}")
    else:
        cfg.vocab_size = cfg.vocab_size or tokenizer.vocab_size
        model = build_albef(cfg, tokenizer)
        if kind == "vit":
            load_vision_init(model, cfg.init_from, saved)
    if cfg.init_text:
        if kind in ("official", "ours"):
            raise UserError("--init-text starts a BERT for pretraining from scratch; --init-from "
                            f"{cfg.init_from} already holds the text encoder")
        load_text_init(model, cfg.init_text)
    if cfg.init_text or kind == "vit":
        model.copy_to_momentum()
    return model, cfg


def param_groups(model, weight_decay):
    """AdamW groups as ALBEF's add_weight_decay: no decay on biases and 1-D tensors (LayerNorms,
    the class token; here also the 0-d temperature, which the official code decays)."""
    decay, no_decay = [], []
    for name, p in dist.named_parameters(model):       # the unwrapped order (FSDP re-registers)
        if p.requires_grad:
            (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def freeze_unused(model, task):
    """Retrieval fine-tuning has no MLM: the MLM head's own weights get no gradient (DDP requires
    every trainable parameter to receive one); the official retrieval model has no MLM head."""
    if task == "retrieval":
        model.mlm_head.dense.requires_grad_(False)
        model.mlm_head.LayerNorm.requires_grad_(False)
        model.mlm_head.decoder.bias.requires_grad_(False)


def alpha_at(cfg, step, steps_per_epoch, device):
    """Distillation weight: ramped linearly over the first epoch (Pretrain.py, Retrieval.py:
    alpha * min(1, i / len(loader)) in epoch 0; LAVIS ramps over two epochs). A 0-d tensor, so
    that a compiled step does not recompile for every new value."""
    return torch.tensor(cfg.alpha * min(1.0, step / steps_per_epoch), device=device)


def main(argv=None):
    rank, local_rank, world_size, device = dist.setup()
    cfg, ckpt = resolve_config(Config, PRESETS, argv, description=__doc__, recipe=task_recipe,
                               recipes_doc=RECIPES_DOC,
                               choices={"task": TASKS, "itm_negatives": ("local", "global"),
                                        "rerank_score": ("itm", "itm+itc")},
                               resume_mutable=("k_test", "itm_batch", "rerank_score"))
    precision = resolve_precision(cfg.precision, device)
    seed_everything(cfg.seed)                     # the same initial weights on every rank
    os.makedirs(cfg.output_dir, exist_ok=True)
    init = read_init(cfg.init_from) if cfg.init_from else (None, None)
    if init[0] == "ours":
        cfg.tokenizer = cfg.tokenizer or init[1]["config"]["tokenizer"]    # one of our checkpoints: its tokenizer
    tokenizer = load_tokenizer(cfg.tokenizer, cfg.init_text, use_tiny=not (cfg.train_data or cfg.val_data))
    cfg.tokenizer = tokenizer.name
    model, cfg = build_model(cfg, tokenizer, init)
    del init
    check_config(cfg, world_size)
    model.to(device)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing()
    loader, sampler, val = build_data(cfg, tokenizer, rank, world_size)
    save_config(cfg, cfg.output_dir)
    log = MetricLog(cfg.output_dir, cfg.report_to, dataclasses.asdict(cfg), project="albef",
                    resumed=ckpt is not None)
    if ckpt:
        model.load_state_dict(ckpt["model"])
    if cfg.eval_only:
        metrics = evaluate(model, cfg, val, tokenizer, device, precision)
        log.write({"step": ckpt["step"] if ckpt else 0, "epoch": 0, "split": "val", **metrics})
        if dist.is_main():
            print(json.dumps(metrics))
        dist.cleanup()
        return metrics

    freeze_unused(model, cfg.task)
    # DDP, or FSDP2 sharding each transformer block and the rest (--fsdp)
    ddp_model = dist.parallelize(model, cfg.fsdp, device, (Block, BertLayer), precision_dtype(precision),
                                 # the queues are identical on every rank (enqueued from gathered keys):
                                 broadcast_buffers=False)  # DDP re-sending them costs queue_size x E per step
    if cfg.compile:
        ddp_model = torch.compile(ddp_model)
    optimizer = adamw(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    steps_per_epoch = len(loader) // cfg.accum_steps
    check_resume_position(ckpt, steps_per_epoch)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    # Warm-up from warmup_lr, then cosine to min_lr, per step (ALBEF: timm's per-epoch cosine, with
    # the warm-up stepped every 100 iterations of epoch 0).
    scheduler = cosine_schedule(optimizer, cfg.warmup_steps, total_steps,
                                warmup_from=cfg.warmup_lr / cfg.lr if cfg.warmup_lr else None, final=cfg.min_lr / cfg.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    guard = NonFiniteGuard(cfg.max_bad_steps)
    seed_everything(cfg.seed + rank)              # each rank its own stream from here (masks, negatives, dropout)
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
                            losses = ddp_model(images, ids, mask, idx, alpha, cfg.task)
                        scaler.scale(sum(losses.values()) / len(group)).backward()
                    parts.append(losses)
                    keys.append(model.pending_keys)
                losses = {k: sum(p[k] for p in parts) / len(parts) for k in parts[0]}
                loss = sum(losses.values())                 # L = L_mlm + L_itc + L_itm, unweighted (Sec. 3.2)
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
                    model, {"images": b[0]}, lambda: model(*b, cfg.task)))
                if step % cfg.log_every == 0 or step == total_steps:
                    values = {k: dist.all_reduce_mean(v).item() for k, v in {"loss": loss, **losses}.items()}
                    speed = (step - tick_step) * cfg.accum_steps * cfg.batch_size * world_size / (time.time() - tick)
                    tick, tick_step = time.time(), step
                    lr = optimizer.param_groups[0]["lr"]
                    pbar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.2e}", samples_s=f"{speed:.0f}")
                    log.write({"step": step, "epoch": epoch, "split": "train", **values, "lr": lr,
                               "temp": dist.value(model.temp).item(), "alpha": float(alpha), "samples_per_s": speed,
                               "grad_norm": grad_norm.item(), "bad_steps": guard.total,
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
                metrics = evaluate(model, cfg, val, tokenizer, device, precision)
            log.write({"step": step, "epoch": epoch, "split": "val", **metrics})
            if metrics and dist.is_main():
                tqdm.write(f"epoch {epoch} step {step}: " + " ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
            if dist.gather_objects(metrics.get("r_mean", -1.0) > best)[0]:   # rank 0 decides for all
                best = metrics["r_mean"]
                checkpoint("checkpoint_best.pt")
            evaluated = step
            checkpoint("checkpoint_last.pt")
            stopped = preemption.stop(step, cfg.output_dir)   # a signal during the evaluation
            tick, tick_step = time.time(), step
    pbar.close()
    if not metrics and not stopped:   # resumed a finished run: evaluate its weights again
        with dist.full_parameters(model):     # FSDP: every unit gathered while evaluating
            metrics = evaluate(model, cfg, val, tokenizer, device, precision)
    if dist.is_main():
        print(json.dumps(metrics or {"step": step}))
    dist.cleanup()
    return metrics


if __name__ == "__main__":
    cli(main)
