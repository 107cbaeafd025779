"""BLIP-2 (Li et al. 2023, arXiv:2301.12597): a Q-Former's 32 learned queries read a frozen
image encoder; stage 1 trains them with ITC + ITM + ITG (Sec. 3.2), each through its own
self-attention mask over [queries; text], so that the queries learn to extract the visual
features most relevant to the text; stage 2 (`--stage 2`) feeds them to a frozen language model
as a soft prompt (Sec. 3.3).

    python blip2_train.py                                        # tiny built-in data, stage 1, CPU
    python blip2_train.py --stage 2                              # tiny: stage 2, a tiny random LM
    torchrun --nproc_per_node 8 blip2_train.py --preset vit-g --vision-weights eva_vit_g.pth \\
        --init-text bert-base-uncased/ --train-data laion_129m.json --val-data coco_karpathy_test.json
    torchrun --nproc_per_node 8 blip2_train.py --preset vit-g --task retrieval --init-from blip2_pretrained.pth \\
        --vision-weights eva_vit_g.pth --tokenizer bert-base-uncased --train-data coco_karpathy_train.json \\
        --val-data coco_karpathy_test.json
    torchrun --nproc_per_node 8 blip2_train.py --preset vit-g-opt2.7b --init-from \\
        blip2_pretrained.pth --vision-weights eva_vit_g.pth --llm opt-2.7b/ \\
        --train-data laion_129m.json --val-data coco_karpathy_val.json    # stage 2 from stage 1
    python blip2_train.py --preset vit-g --eval-only --init-from Salesforce/blip2-itm-vit-g/ \\
        --val-data coco_karpathy_test.json --k-test 128                   # transformers' published weights
"""
import dataclasses
import functools
import json
import os
import random
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as recompute
from tqdm import tqdm

from common import dist
from common.data import (Example, ImageDataset, eval_transform, load_tokenizer, read_annotations, read_json,
                         pre_caption_blip, pre_question_blip, retrieval_texts, tiny_data, train_loader,
                         train_transform, training_records)
from common.encoders import (BertAttention, BertLMHead, Block, VisionTransformer, _bert_init, hf_bert_lm_head_map, hf_bert_map,
                             hf_blip_vision_map, hf_clip_vision_map, load_mapped, open_clip_vision_map,
                             read_hf_checkpoint, read_weights_file, resize_pos_embed, timm_vit_map)
from common.metrics import caption_metrics, image_tokens, rerank_topk, retrieval_metrics, vqa_accuracy
from common.utils import (FeatureCache, MetricLog, MissingFileError, NonFiniteGuard, Preemption,
                          UserError, adamw, autocast, check_finite, check_resume_position, cli,
                          cosine_schedule, evaluation_pending, first_nonfinite_module, grad_norm_,
                          ignore_preemption_signals, load_scaler_state, micro_batches,
                          precision_dtype, resolve_config, resolve_precision, rng_state,
                          save_checkpoint, save_config, seed_everything, set_rng_state,
                          sync_gradients)


# ---- config ----

@dataclass
class Config:
    preset: str = "tiny"            # tiny (the built-in data, CPU) or a paper configuration; see the list below
    stage: int = 1                  # 1: the Q-Former with ITC + ITM + ITG (Sec. 3.2); 2: its queries as a soft prompt
                                    # to a frozen language model (Sec. 3.3)
    task: str = "pretrain"          # stage 1: pretrain (ITC + ITM + ITG) | retrieval (fine-tuning, positives by image
                                    # id); stage 2: pretrain (captions, no prompt) | caption (COCO fine-tuning, with
                                    # --prompt) | vqa (zero-shot VQA, with --eval-only)
    # frozen image encoder (Sec. 3.1)
    vision: str = "eva"             # eva: EVA's ViT layout (no pre-norm, q/v biases with a zero k bias, exact GELU,
                                    # LayerNorm eps 1e-6), sized by the fields below (ViT-g/14 in vit-g, the last of
                                    # its 40 layers dropped) | clip-l: CLIP ViT-L/14 up to its penultimate layer
                                    # (LAVIS's clip_L: 23 of 24 layers, sets the vision fields itself)
    vision_weights: str = ""        # the frozen encoder's weights: eva: LAVIS's eva_vit_g.pth or a transformers BLIP-2
                                    # folder; clip-l: a transformers CLIP folder or OpenAI's/LAVIS's clip_vit_L.pth.
                                    # Empty: random, built from vision_seed (the tiny preset; see the README)
    vision_seed: int = 0            # seed of a random frozen encoder: its source, rebuilt on resume
    freeze_vision: bool = True      # stage 1 keeps the image encoder frozen (Sec. 3.1); retrieval fine-tuning trains it
    image_size: int = 64            # pixels (224 in stage 1, 364 in fine-tuning)
    patch_size: int = 8             # pixels per patch side (14)
    vision_width: int = 128         # 1408 for ViT-g
    vision_layers: int = 4          # 39 for ViT-g (its 40th is dropped, Sec. 3.1)
    vision_heads: int = 2           # 16
    vision_mlp_dim: int = 558       # MLP width: 6144 for ViT-g (EVA's mlp_ratio 4.3637 x 1408; the
                                    # tiny preset's is 128 x 4.3637 rounded down)
    vision_eps: float = 1e-6        # the encoder's LayerNorm epsilon (EVA: 1e-6; CLIP ViT-L: 1e-5)
    ln_vision_eps: float = 1e-5     # the trainable LayerNorm after the encoder: LAVIS's nn.LayerNorm default
                                    # (transformers' post_layernorm uses the ViT's 1e-6; from_hf takes that)
    # Q-Former (Sec. 3.1): a bert-base, cross-attention every cross_attention_freq layers, queries with own FFNs
    num_query_tokens: int = 8       # learned queries (32 in the paper)
    qformer_width: int = 128        # 768
    qformer_layers: int = 4         # 12
    qformer_heads: int = 2          # 12
    qformer_mlp_dim: int = 512      # 3072
    cross_attention_freq: int = 2   # cross-attention in layers with layer % freq == 0 (6 of 12)
    max_positions: int = 64         # BERT's 512
    qformer_eps: float = 1e-12      # BERT LayerNorm epsilon
    dropout: float = 0.0            # BERT hidden/attention dropout (0.1 in bert-base; 0 for the tiny runs)
    vocab_size: int = 0             # 0: the tokenizer's (bert-base-uncased + [DEC]: 30523)
    max_length: int = 32            # text tokens, [CLS] and [SEP] included (max_txt_len 32)
    max_words: int = 50             # words kept by LAVIS's blip_caption / blip_question (50)
    embed_dim: int = 64             # ITC space (256)
    # stage 2 (Sec. 3.3): the language model
    llm: str = ""                   # transformers folder of the frozen LM: OPT (AutoModelForCausalLM) or FlanT5
                                    # (AutoModelForSeq2SeqLM), or a Blip2ForConditionalGeneration folder (its LM).
                                    # Empty: a random tiny OPT from the llm_* fields, trained along (the tiny preset)
    freeze_llm: bool = True         # Sec. 3.3: the LM is frozen (no gradient, eval mode, bf16/fp16 on GPU); the tiny
                                    # random LM (no --llm) knows no language and always trains
    llm_width: int = 128            # the tiny random OPT (--llm empty): its width
    llm_layers: int = 2             # the tiny random OPT: its decoder layers
    llm_heads: int = 2              # the tiny random OPT: its attention heads
    llm_mlp_dim: int = 512          # the tiny random OPT: its feed-forward width
    prompt: str = ""                # text before every caption, kept out of the loss ("a photo of " in COCO fine-tuning)
    text_end: str = "\n"            # decoder-only LMs: ends every target and every generation (LAVIS's "\n" for OPT)
    vqa_prompt: str = "Question: {} Short answer:"   # zero-shot VQA (Sec. 4.1)
    num_beams: int = 5              # captions: beam search width (5), or --nucleus
    nucleus: bool = False           # captions: nucleus sampling (top-p 0.9) instead of beam search
    max_gen_length: int = 30        # captions: at most this many new tokens (30)
    min_gen_length: int = 1         # captions: at least this many new tokens (8 in COCO fine-tuning)
    # method
    temp: float = 0.07              # ITC temperature, learnable and not clamped (as LAVIS)
    label_smoothing: float = 0.1    # ITC and ITG targets (blip2_qformer.py, Qformer.py)
    k_test: int = 16                # ITM re-ranking candidates per query (128 in LAVIS's COCO evaluation)
    itm_batch: int = 256            # (image, text) pairs per ITM forward when re-ranking
    # data
    train_data: str = ""            # annotation file (JSON or CSV), or webdataset shards such as
                                    # "shards/{00000..00999}.tar" (sources joined with ::); empty: tiny
    val_data: str = ""              # evaluation split: retrieval (stage 1) and captions (stage 2) read an annotation
                                    # file, --task vqa VQAv2's question file; empty with tiny: its val split
    val_answers: str = ""           # --task vqa: VQAv2's annotation file (the 10 human answers of each question)
    image_root: str = ""            # folder relative image paths start from (default: the annotation file's)
    tokenizer: str = ""             # transformers folder or name (bert-base-uncased); [DEC] is added. Empty: tiny's
    llm_tokenizer: str = ""         # stage 2: the LM's tokenizer; empty: --llm's (or --init-from's), else tiny's
    skip_bad: bool = False          # skip (and count) unreadable images and empty captions in training data
    min_scale: float = 0.9          # RandomResizedCrop's least area (0.5: blip2_image_train)
    hflip: bool = False             # random flips (paper presets; tiny's captions say left/right)
    train_num_samples: int = 0      # shards: samples per epoch; 0: the sizes.json beside the shards
    dataset_resampled: bool = False  # shards: draw them with replacement (open_clip's flag)
    workers: int = 2                # data-loading processes per rank
    # optimisation
    epochs: int = 1                 # passes over the training data
    max_steps: int = 0              # >0: train exactly this many steps (overrides epochs)
    batch_size: int = 32            # per process (100 in stage 1)
    accum_steps: int = 1            # micro-batches per optimizer step; stage 1's ITC spans them all (README)
    lr: float = 3e-4                # peak learning rate (1e-4 in stage 1)
    warmup_lr: float = 0.0          # warm-up starts here (1e-6); 0: lr / warmup_steps
    min_lr: float = 0.0             # the cosine ends here (1e-5)
    weight_decay: float = 0.05      # AdamW decoupled weight decay (not on biases and 1-D tensors)
    layer_decay: float = 1.0        # image encoder layer-wise lr decay when it trains (0.95 in fine-tuning)
    warmup_steps: int = 30          # linear warm-up steps, then cosine to min_lr (5,000 in stage 1)
    grad_clip_norm: float = 0.0     # clip the global gradient norm to this (0: off, as LAVIS)
    seed: int = 0                   # weights start from `seed` on every rank; rank r trains with seed + r
    precision: str = "auto"         # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16 (GradScaler)
    max_bad_steps: int = 10         # abort after this many non-finite steps in a row (each one is skipped)
    grad_checkpointing: bool = False  # recompute the Q-Former's (and a trained encoder's) activations in backward
    fsdp: bool = False              # shard weights, gradients and AdamW state over the ranks (FSDP2), not DDP
    compile: bool = False           # torch.compile the model
    # run
    output_dir: str = "runs/blip2"  # metrics.jsonl, config.json and checkpoints go here
    resume: str = ""                # checkpoint path, or "auto": output_dir/checkpoint_last.pt if present
    init_from: str = ""             # transformers BLIP-2 folder (Blip2ForImageTextRetrieval, Blip2ForConditionalGeneration),
                                    # LAVIS's blip2_pretrained.pth (the encoder then from --vision-weights), or ours
                                    # (stage 2 starts from a stage-1 checkpoint: its text-only parts are dropped)
    init_text: str = ""             # BERT to start the Q-Former from (bert-base-uncased folder); cross-attention stays new
    eval_only: bool = False         # evaluate the --init-from / --resume weights and exit
    save_every: int = 1000          # steps between checkpoint_last.pt saves (and at every epoch end)
    log_every: int = 10             # steps between train records in metrics.jsonl
    report_to: str = ""             # also send those records to "tensorboard", "wandb" or "tensorboard,wandb"


VIT_G = dict(vision="eva", image_size=224, patch_size=14, vision_width=1408, vision_layers=39, vision_heads=16,
             vision_mlp_dim=6144, vision_eps=1e-6)
QFORMER_BASE = dict(num_query_tokens=32, qformer_width=768, qformer_layers=12, qformer_heads=12, qformer_mlp_dim=3072,
                    max_positions=512, dropout=0.1, embed_dim=256, tokenizer="bert-base-uncased")
# LAVIS projects/blip2/train/pretrain_stage1.yaml: batch 100/GPU, AdamW lr 1e-4, wd 0.05, warm-up 5,000
# steps from 1e-6, cosine to 1e-5, 10 epochs, 224 px, the ViT frozen.
STAGE1 = dict(batch_size=100, lr=1e-4, warmup_lr=1e-6, min_lr=1e-5, weight_decay=0.05, warmup_steps=5000, epochs=10,
              workers=8, k_test=128, min_scale=0.5, hflip=True)     # blip2_image_train: every stage
# LAVIS projects/blip2/train/pretrain_stage2.yaml: the same with batch 64 and 2,000 warm-up steps; the
# language model from --llm (facebook/opt-2.7b, facebook/opt-6.7b, google/flan-t5-xl folders).
STAGE2 = dict(STAGE1, stage=2, batch_size=64, warmup_steps=2000, max_length=32)
PRESETS = {
    "tiny": {},
    "vit-g": {**VIT_G, **QFORMER_BASE, **STAGE1},
    "vit-l": {**VIT_G, **QFORMER_BASE, **STAGE1, "vision": "clip-l"},   # LAVIS's pretrain_vitL
    "vit-g-opt2.7b": {**VIT_G, **QFORMER_BASE, **STAGE2},
    "vit-g-opt6.7b": {**VIT_G, **QFORMER_BASE, **STAGE2},
    "vit-g-flant5xl": {**VIT_G, **QFORMER_BASE, **STAGE2},
}
# CLIP ViT-L/14 (LAVIS clip_vit.py create_clip_vit_L): OpenAI's layout up to the penultimate layer.
CLIP_L = dict(patch_size=14, vision_width=1024, vision_layers=23, vision_heads=16,
              vision_mlp_dim=4096, vision_eps=1e-5)
# Fine-tuning recipes of a paper preset, applied unless the command line sets the field.
# Retrieval (Sec. 4.4: "we finetune the image encoder together with Q-Former on COCO using the
# same objectives"): LAVIS projects/blip2/train/retrieval_coco_ft.yaml with its model config
# blip2_coco.yaml (the encoder trains in fp32, gradient checkpointing).
FINETUNE = {
    "retrieval": dict(image_size=364, freeze_vision=False, layer_decay=0.95, lr=1e-5,
                      warmup_lr=1e-8, min_lr=0.0,
                      warmup_steps=1000, epochs=5, batch_size=14, k_test=128, grad_checkpointing=True),
    # LAVIS projects/blip2/train/caption_coco_ft.yaml (Sec. 4.2): the encoder trains, in fp32
    "caption": dict(image_size=364, freeze_vision=False, lr=1e-5, warmup_lr=1e-8, min_lr=0.0, warmup_steps=1000,
                    epochs=5, batch_size=16, prompt="a photo of ", num_beams=5, max_gen_length=30, min_gen_length=8,
                    grad_checkpointing=True),
}
TASKS = ("pretrain", "retrieval", "caption", "vqa")
STAGE_TASKS = {1: ("pretrain", "retrieval"), 2: ("pretrain", "caption", "vqa")}
# Zero-shot VQA (LAVIS blip2_t5/opt predict_answers, the paper's Sec. 4.1): beam 5, at most 10 new
# tokens, length penalty -1 ("encourages shorter answers that align better with human annotation").
VQA_GENERATION = dict(num_beams=5, max_new_tokens=10, min_new_tokens=1, length_penalty=-1.0)


# The tiny preset's stage 2 (a Q-Former and an LM both new) learns faster at a higher rate.
TINY_STAGE2 = dict(lr=1e-3)


def task_recipe(cfg):
    """The fine-tuning recipe of a paper preset for --task retrieval / caption (under the command
    line, over the preset); the tiny preset's stage 2 has its own learning rate."""
    if cfg.preset == "tiny":
        return TINY_STAGE2 if cfg.stage == 2 else {}
    return FINETUNE.get(cfg.task, {})


RECIPES_DOC = ("task recipes (--task retrieval / caption with a paper preset; the command line overrides them):\n"
               + "\n".join(f"  {task}: " + ", ".join(f"{k}={v}" for k, v in values.items())
                           for task, values in FINETUNE.items())
               + "\n  tiny, --stage 2: " + ", ".join(f"{k}={v}" for k, v in TINY_STAGE2.items()))

MODEL_FIELDS = ("vision", "image_size", "patch_size", "vision_width", "vision_layers", "vision_heads",
                "vision_mlp_dim", "vision_eps", "ln_vision_eps", "num_query_tokens",
                "qformer_width", "qformer_layers",
                "qformer_heads", "qformer_mlp_dim", "cross_attention_freq", "max_positions", "qformer_eps",
                "vocab_size", "embed_dim")


# ---- model: the frozen image encoder (Sec. 3.1) ----

def image_encoder(cfg):
    """EVA ViT-g's layout (LAVIS eva_vit.py, transformers' Blip2VisionModel): patch embedding with
    a bias, no pre-norm, exact GELU, LayerNorm eps 1e-6, no final norm (BLIP-2's ln_vision follows);
    or CLIP ViT-L/14's (pre-norm, QuickGELU, eps 1e-5), its last layer dropped. Both return every
    token (B, 1 + P, Dv)."""
    clip = cfg.vision == "clip-l"
    vit = VisionTransformer(image_size=cfg.image_size, patch_size=cfg.patch_size, width=cfg.vision_width,
                            layers=cfg.vision_layers, heads=cfg.vision_heads,
                            mlp_dim=cfg.vision_mlp_dim,
                            act="quick_gelu" if clip else "gelu", eps=cfg.vision_eps, pre_norm=clip,
                            patch_bias=not clip, post_norm=False)
    if not clip:
        # EVA has separate q and v biases and no k bias: the k third of our fused bias is 0 and
        # stays 0 when the encoder trains (its gradient is zeroed).
        for block in vit.transformer.resblocks:
            bias = block.attn.qkv.bias
            with torch.no_grad():
                bias[cfg.vision_width: 2 * cfg.vision_width] = 0
            keep = torch.ones_like(bias)
            keep[cfg.vision_width: 2 * cfg.vision_width] = 0
            bias.register_hook(lambda grad, keep=keep: grad * keep.to(grad.device, grad.dtype))
    return vit


def fingerprint(module):
    """A number that changes when any weight does: the frozen encoder is not saved in our
    checkpoints but rebuilt from its source, and this checks the rebuilt one is the same. The
    position table is left out: a run at another image size interpolates it."""
    with torch.no_grad():
        return float(sum(p.double().square().sum() + p.double().sum() for n, p in module.named_parameters()
                         if n != "positional_embedding"))


# ---- model: the Q-Former (Sec. 3.1, Fig. 2) ----

class QFormerLayer(nn.Module):
    """One BERT layer of the Q-Former: self-attention over [queries; text] (the mask decides who
    sees whom), cross-attention to the image features for the query positions only (in every
    other layer), and separate feed-forward layers for the queries and for the text. Each sub-layer
    is post-LN, as BERT. Names follow LAVIS's Qformer.py (intermediate_query, output_query). Stage 2
    reads no text: its layers have no text FFN (`text=False`, as LAVIS's stage 2 and transformers'
    Blip2QFormerModel)."""

    def __init__(self, cfg, cross, text=True):
        super().__init__()
        D, eps, p = cfg.qformer_width, cfg.qformer_eps, cfg.dropout
        self.attention = BertAttention(D, cfg.qformer_heads, eps=eps, dropout=p)
        self.crossattention = (BertAttention(D, cfg.qformer_heads, kv_dim=cfg.vision_width, eps=eps, dropout=p)
                               if cross else None)
        if text:
            self.intermediate, self.output = nn.Linear(D, cfg.qformer_mlp_dim), nn.Linear(cfg.qformer_mlp_dim, D)
            self.output_norm = nn.LayerNorm(D, eps=eps)
        self.intermediate_query, self.output_query = nn.Linear(D, cfg.qformer_mlp_dim), nn.Linear(cfg.qformer_mlp_dim, D)
        self.output_query_norm = nn.LayerNorm(D, eps=eps)
        self.dropout = nn.Dropout(p)

    def forward(self, x, n_query, mask=None, image=None, past=None):
        """x (B, S, D) with the queries in its first n_query rows; mask (B, 1, S, S') bool, True =
        attend; past: the (k, v) of this layer's self-attention over queries computed earlier (ITG
        reuses the ITC pass's: the queries' outputs do not depend on the text there). Returns the
        new x and the (k, v) of x's own rows."""
        cache = {} if past is None else {"kv": past}
        x = self.attention(x, mask=mask, cache=cache)
        kv = cache["kv"]
        queries, text = x[:, :n_query], x[:, n_query:]
        if n_query and self.crossattention is not None and image is not None:
            queries = self.crossattention(queries, context=image)          # queries only read the image
        out = []
        if n_query:
            out.append(self.output_query_norm(queries + self.dropout(
                self.output_query(F.gelu(self.intermediate_query(queries))))))
        if text.shape[1]:
            out.append(self.output_norm(text + self.dropout(self.output(F.gelu(self.intermediate(text))))))
        return torch.cat(out, 1) if len(out) > 1 else out[0], kv


class QFormer(nn.Module):
    """BERT embeddings (words + absolute positions, no token types) and QFormerLayers. The
    embedding LayerNorm normalises [queries; text embeddings] together (LAVIS BertEmbeddings);
    text positions start at 0 whether or not queries precede them. `text=False` (stage 2): the
    queries only, no word or position embeddings and no text FFNs."""

    def __init__(self, cfg, text=True):
        super().__init__()
        if text:
            self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.qformer_width)
            self.position_embeddings = nn.Embedding(cfg.max_positions, cfg.qformer_width)
        self.embed_norm = nn.LayerNorm(cfg.qformer_width, eps=cfg.qformer_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layer = nn.ModuleList(QFormerLayer(cfg, cross=i % cfg.cross_attention_freq == 0, text=text)
                                   for i in range(cfg.qformer_layers))
        self.grad_checkpointing = False
        self.apply(_bert_init)

    def forward(self, queries=None, ids=None, mask=None, image=None, past=None):
        """queries (B, Q, D) or None; ids (B, L) or None; mask (B, 1, S, S') bool or None (all
        attend); image (B, 1 + P, Dv): cross-attention context of the queries; past: per layer the
        queries' (k, v) of an earlier pass, which the new rows also attend to. Returns the hidden
        states (B, S, D) and per layer the (k, v) of the rows run here."""
        parts = [] if queries is None else [queries]
        if ids is not None:
            parts.append(self.word_embeddings(ids) + self.position_embeddings.weight[:ids.shape[1]])
        x = self.dropout(self.embed_norm(torch.cat(parts, 1) if len(parts) > 1 else parts[0]))
        n_query = 0 if queries is None else queries.shape[1]
        kvs = []
        for i, layer in enumerate(self.layer):
            p = None if past is None else past[i]
            if self.grad_checkpointing and self.training:
                x, kv = recompute(layer, x, n_query, mask, image, p, use_reentrant=False)
            else:
                x, kv = layer(x, n_query, mask, image, p)
            kvs.append(kv)
        return x, kvs


def attention_masks(text_mask, n_query):
    """The three self-attention masks of Fig. 2 (right) over [Q queries; L text tokens],
    (B, Q + L, Q + L) bool, True = row may attend to column. A padding token is never attended to.

      uni-modal (ITC):            Q sees Q, T sees T          (two encoders that share weights)
      bi-directional (ITM):       Q and T see everything      (queries capture the pair)
      multi-modal causal (ITG):   Q sees Q, T sees Q and the T up to itself (text is generated
                                  from what the queries extracted, never the other way)
    """
    B, L = text_mask.shape
    S = n_query + L
    is_query = torch.arange(S, device=text_mask.device) < n_query
    key = torch.cat([torch.ones(B, n_query, dtype=torch.bool, device=text_mask.device), text_mask.bool()], 1)
    key = key[:, None, :]                                                        # (B, 1, S): not padding
    same_side = is_query[:, None] == is_query[None, :]
    earlier = torch.ones(S, S, dtype=torch.bool, device=text_mask.device).tril()
    causal = is_query[None, :] | (~is_query[:, None] & earlier)                 # column a query, or earlier text
    return {"unimodal": same_side & key, "bidirectional": key.expand(B, S, S), "multimodal_causal": causal & key}


# ---- model: BLIP-2 ----

class BLIP2(nn.Module):
    """Stage 1 (Fig. 2): frozen image encoder -> ln_vision -> Q-Former (queries + text) with the
    ITC projections, the ITM head and the ITG language-model head (BertLMHead tied to the word
    embeddings, as LAVIS's BertLMHeadModel).
    Stage 2 (Fig. 3): the same encoder, ln_vision and Q-Former (queries only: its text parts are
    dropped, as LAVIS's blip2_opt / blip2_t5), `language_projection` (LAVIS's opt_proj / t5_proj)
    and `language_model`, a transformers causal or seq2seq LM (keys as Blip2ForConditionalGeneration)."""

    def __init__(self, cfg, *, dec_id, pad_id, llm=None):
        super().__init__()
        self.cfg = cfg
        self.dec_id, self.pad_id = dec_id, pad_id
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.vision_seed)                 # a random encoder is a function of its seed
            self.visual_encoder = image_encoder(cfg)
        self.ln_vision = nn.LayerNorm(cfg.vision_width, eps=cfg.ln_vision_eps)
        self.query_tokens = nn.Parameter(torch.randn(1, cfg.num_query_tokens, cfg.qformer_width) * 0.02)
        self.qformer = QFormer(cfg, text=cfg.stage == 1)
        if cfg.stage == 1:
            self.lm_head = BertLMHead(cfg.qformer_width, cfg.vocab_size, eps=cfg.qformer_eps)
            self.lm_head.decoder.weight = self.qformer.word_embeddings.weight
            self.vision_proj = nn.Linear(cfg.qformer_width, cfg.embed_dim)           # 768 -> 256
            self.text_proj = nn.Linear(cfg.qformer_width, cfg.embed_dim)
            self.itm_head = nn.Linear(cfg.qformer_width, 2)
            self.temp = nn.Parameter(torch.tensor(cfg.temp))
        else:
            # Sec. 3.3: "a fully-connected (FC) layer to linearly project the output query embeddings
            # Z into the same dimension as the text embedding of the LLM" (768 -> 2560 for OPT-2.7b)
            self.language_projection = nn.Linear(cfg.qformer_width, llm.get_input_embeddings().embedding_dim)
            self.language_model = llm
            self.llm_from_checkpoint = False
            self.set_llm_frozen(cfg.freeze_llm)
        self.vision_from_checkpoint = False
        self.set_frozen(cfg.freeze_vision)

    def set_frozen(self, frozen):
        """Sec. 3.1: the image encoder is frozen: no gradient, no optimizer state, eval mode
        (train() keeps it there), run under no_grad."""
        self.vision_frozen = frozen
        self.visual_encoder.requires_grad_(not frozen)
        self.visual_encoder.train(self.training and not frozen)

    def set_llm_frozen(self, frozen):
        """Sec. 3.3: the language model is frozen like the encoder (no gradient, no optimizer
        state, eval mode: no dropout; LAVIS leaves OPT's 0.1 dropout on). Gradients still pass
        through it to the soft prompt, i.e. to the projection and the Q-Former."""
        self.llm_frozen = frozen
        self.language_model.requires_grad_(not frozen)
        self.language_model.train(self.training and not frozen)

    def train(self, mode=True):
        super().train(mode)
        self.visual_encoder.train(mode and not self.vision_frozen)
        if self.cfg.stage == 2:
            self.language_model.train(mode and not self.llm_frozen)
        return self

    def set_grad_checkpointing(self, enabled=True):
        self.qformer.grad_checkpointing = enabled
        self.visual_encoder.transformer.grad_checkpointing = enabled and not self.vision_frozen
        if self.cfg.stage == 2 and enabled:
            checkpoint_llm_layers(self.language_model)

    def trainable_state_dict(self):
        """What our checkpoints keep: everything but a frozen encoder or language model, which are
        rebuilt from their sources; one that came from one of our checkpoints (trained in a
        fine-tuning run) or has no file (the tiny random LM) is kept."""
        skip = []
        if self.vision_frozen and not self.vision_from_checkpoint:
            skip.append("visual_encoder.")
        if self.cfg.stage == 2 and self.llm_frozen and not self.llm_from_checkpoint and self.cfg.llm:
            skip.append("language_model.")
        return {k: v for k, v in self.state_dict().items() if not k.startswith(tuple(skip))}

    # -- encoders --

    def image_features(self, images):
        """ln_vision(frozen ViT(images)): (B, 1 + P, Dv) in fp32. Computed once per step and read by
        all three losses; the frozen encoder runs without a graph in its own (half on GPU) dtype."""
        vit = self.visual_encoder
        dtype = vit.conv1.weight.dtype
        if self.vision_frozen:
            with torch.no_grad():
                feats = vit(images.to(dtype))
        else:
            feats = vit(images)
        return self.ln_vision(feats.float())

    def query_pass(self, image_embeds):
        """The queries alone, reading the image (ITC's image side, Fig. 2 uni-modal): (B, Q, D)
        outputs and every layer's self-attention (k, v), which ITG reuses."""
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        return self.qformer(queries, image=image_embeds)

    def text_pass(self, ids, mask):
        """The text alone (ITC's text side, Fig. 2 uni-modal): (B, L, D); padding is never a key."""
        return self.qformer(ids=ids, mask=attention_masks(mask, 0)["unimodal"][:, None])[0]

    def image_embed(self, query_output):                             # (B, Q, E): one embedding per query
        return F.normalize(self.vision_proj(query_output), dim=-1)

    def text_embed(self, text_output):                               # (B, E): the [CLS] token's
        return F.normalize(self.text_proj(text_output[:, 0]), dim=-1)

    def itm_logits(self, ids, mask, image_embeds):
        """ITM (Fig. 2 bi-directional): [queries; text] attend to each other, the queries read the
        image; the head scores every query output and the Q logits are averaged. (n, 2)."""
        Q = self.cfg.num_query_tokens
        queries = self.query_tokens.expand(ids.shape[0], -1, -1)
        h, _ = self.qformer(queries, ids, attention_masks(mask, Q)["bidirectional"][:, None], image_embeds)
        return self.itm_head(h[:, :Q]).mean(1)

    def encode_image(self, images):
        return self.image_embed(self.query_pass(self.image_features(images))[0])

    def encode_text(self, ids, mask):
        return self.text_embed(self.text_pass(ids, mask))

    def forward(self, images, ids, mask, idx=None, task="pretrain", labels=None, cache=None, j=0, count=None):
        """Stage 1: the three losses of one step (Sec. 3.2), sharing one image-encoder pass and one
        query pass; idx: (B,) image ids (positives share one in retrieval fine-tuning). Stage 2: the
        language modeling loss of the text given the image (Sec. 3.3); see llm_logits.

        With --accum-steps K, for micro-batch j of a step: ITC over all K micro-batches, the others'
        features from `cache` (a FeatureCache of itc_features), and the text losses as this
        micro-batch's part of the step's token mean (`count`: the step's global token count), so
        that the K backward passes sum to one K x B step; ITM stays this micro-batch's (its hard
        negatives among its own B x world size pairs)."""
        if self.cfg.stage == 2:
            return {"loss_lm": self.loss_llm(images, ids, mask, labels, count)}
        image_embeds = self.image_features(images)                    # (B, 1 + P, Dv)
        query_output, query_kv = self.query_pass(image_embeds)        # (B, Q, D)
        image_feats = self.image_embed(query_output)                  # (B, Q, E)
        text_feat = self.text_embed(self.text_pass(ids, mask))        # (B, E)
        losses = {}
        # --- ITC: image-text contrastive learning (uni-modal mask) ---
        if cache is None or not cache.active:
            losses["loss_itc"], sim_i2t, sim_t2i, idx_all = self.loss_itc(image_feats, text_feat, idx, task)
        else:
            with torch.no_grad():            # this micro-batch's similarities: its ITM negatives
                _, sim_i2t, sim_t2i, idx_all = self.loss_itc(image_feats, text_feat, idx, task)
            step = cache.features(j, {"image": image_feats, "text": text_feat, "idx": idx})
            # the temperature's gradient is taken in the last pass only (it is in all K)
            losses["loss_itc"] = self.loss_itc(step["image"], step["text"], step["idx"], task,
                                               temp_grad=j == len(cache.cache) - 1)[0]
        # --- ITM: image-text matching with hard negatives (bi-directional mask) ---
        losses["loss_itm"] = self.loss_itm(image_embeds, ids, mask, idx, idx_all, sim_i2t, sim_t2i)
        # --- ITG: image-grounded text generation (multi-modal causal mask) ---
        losses["loss_lm"] = self.loss_lm(ids, mask, query_kv, count)
        return losses

    def itc_features(self, images, ids, mask):
        """{"image": (B, Q, E), "text": (B, E)}: what ITC compares, in forward's order (the feature
        cache of --accum-steps runs this, then forward replays the same dropout draws)."""
        image_feats = self.image_embed(self.query_pass(self.image_features(images))[0])
        return {"image": image_feats, "text": self.text_embed(self.text_pass(ids, mask))}

    # ---- losses ----

    def loss_itc(self, image_feats, text_feat, idx, task, temp_grad=True):
        """Sec. 3.2 ITC: the similarity of an image and a text is the highest of the Q query-text
        similarities, over temperature; negatives are every other pair of the global batch. Targets:
        the diagonal (pretraining) or every pair with the same image id (retrieval fine-tuning),
        smoothed by 0.1 (F.cross_entropy's label_smoothing for one positive).

        Both sides are gathered *with* gradient (dist.gather_with_grad): with each rank's loss
        the mean of its own rows, DDP's average is the gradient of the global loss. LAVIS gathers
        without gradient (concat_all_gather), so there the i2t term updates only the image side
        and t2i only the text side, on one GPU too (tests/check_lavis_blip2.py shows the
        difference). Returns the loss, the similarities (B, N) without gradient and the gathered ids."""
        image_all, text_all = dist.gather_with_grad(image_feats), dist.gather_with_grad(text_feat)  # (N, Q, E), (N, E)
        idx_all = dist.gather_no_grad(idx)
        temp = self.temp if temp_grad else self.temp.detach()
        B, N = idx.shape[0], idx_all.shape[0]
        # fp32 similarities: at temperature 0.07 bf16's spacing would blur the logits that matter
        with torch.autocast(image_feats.device.type, enabled=False):
            sim_i2t = torch.einsum("bqe,ne->bnq", image_feats.float(), text_all.float()).amax(-1) / temp
            sim_t2i = torch.einsum("be,nqe->bnq", text_feat.float(), image_all.float()).amax(-1) / temp
            if task == "retrieval":
                positive = (idx[:, None] == idx_all[None, :]).float()
            else:
                positive = F.one_hot(torch.arange(B, device=idx.device) + dist.rank() * B, N).float()
            s = self.cfg.label_smoothing
            targets = (1 - s) * positive / positive.sum(1, keepdim=True) + s / N
            loss = (-(F.log_softmax(sim_i2t, 1) * targets).sum(1).mean()
                    - (F.log_softmax(sim_t2i, 1) * targets).sum(1).mean()) / 2
        return loss, sim_i2t.detach(), sim_t2i.detach(), idx_all

    def loss_itm(self, image_embeds, ids, mask, idx, idx_all, sim_i2t, sim_t2i):
        """Sec. 3.2 ITM, with the hard-negative mining of ALBEF: every positive pair, plus for each
        text a negative image and for each image a negative text, drawn from the softmax of the ITC
        similarities over the *global* batch, never one with the same image id.

        The image features never leave their rank (the frozen encoder's output is the largest
        tensor of the step: LAVIS gathers it, with gradient): a pair with another rank's image is
        scored *there*, with the text's token ids sent instead. Every rank divides its sum by its
        3B pairs, so DDP's average is the mean over all 3N pairs: the same loss and gradient."""
        B, rank = ids.shape[0], dist.rank()
        with torch.no_grad():
            # the softmax over the candidates only (LAVIS 1.0.2 zeroes the positive after the softmax
            # and adds 1e-4 to every weight, a floor that picks ~1 % of negatives at random at a
            # global batch of 100, ~14 % at 1,600)
            same = idx[:, None] == idx_all[None, :]
            neg_image = sample_negatives(F.softmax(sim_t2i.masked_fill(same, float("-inf")), 1))  # (B,) of N images
            neg_text = sample_negatives(F.softmax(sim_i2t.masked_fill(same, float("-inf")), 1))   # (B,) of N texts
        ids_all, mask_all = dist.gather_no_grad(ids), dist.gather_no_grad(mask)
        mine = torch.arange(B, device=ids.device)
        # pairs of this rank's images: (text, image, is a match)
        texts = [mine + rank * B, neg_text]
        images = [mine, mine]
        # each text of the global batch with its negative image, where that image lives here
        neg_image_all = dist.gather_no_grad(neg_image)                                     # (N,)
        if dist.world_size() > 1:
            text_of = (neg_image_all // B == rank).nonzero()[:, 0]                         # (n,) one host sync
            texts.append(text_of)
            images.append(neg_image_all[text_of] - rank * B)
        else:
            texts.append(mine)
            images.append(neg_image_all)
        texts, images = torch.cat(texts), torch.cat(images)
        labels = (idx_all[texts] == idx[images]).long()   # a "negative" sharing the image id (no valid one) matches
        logits = self.itm_logits(ids_all[texts], mask_all[texts], image_embeds[images])
        return F.cross_entropy(logits.float(), labels, reduction="sum") / (3 * B)

    def itg_logits(self, ids, mask, query_kv):
        """ITG's next-token logits (B, L - 1, V) and labels (B, L - 1), -100 at padding: [DEC]
        replaces [CLS] as the first token and each token predicts the next (Fig. 2 multi-modal
        causal mask). Only the text rows are run: the query rows of this mask are those of the ITC
        query pass (queries see only queries), whose keys and values `query_kv` are reused."""
        Q = self.cfg.num_query_tokens
        dec = ids.clone()
        dec[:, 0] = self.dec_id
        text_rows = attention_masks(mask, Q)["multimodal_causal"][:, None, Q:]            # (B, 1, L, Q + L)
        h, _ = self.qformer(ids=dec, mask=text_rows, past=query_kv)
        return self.lm_head(h[:, :-1]).float(), dec[:, 1:].masked_fill(mask[:, 1:] == 0, -100)

    def loss_lm(self, ids, mask, query_kv, count=None):
        """Sec. 3.2 ITG: generate the text from the queries, cross-entropy of the next token with
        label smoothing 0.1. Averaged over the text tokens of the global batch (each rank's sum
        over the global count / world size, so that DDP's average is one process's mean); LAVIS
        averages per rank."""
        logits, labels = self.itg_logits(ids, mask, query_kv)
        if count is None:
            count = dist.all_reduce_sum((labels != -100).sum().float())
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum",
                               label_smoothing=self.cfg.label_smoothing)
        return loss * dist.world_size() / count.clamp(min=1)

    # ---- stage 2 (Sec. 3.3, Fig. 3): the queries as a soft prompt to a frozen language model ----

    @property
    def decoder_only(self):
        return not self.language_model.config.is_encoder_decoder

    def soft_prompt(self, images=None, image_embeds=None):
        """Fig. 3: the Q output query embeddings of the image, projected to the LM's input width,
        (B, Q, H): "soft visual prompts that condition the LLM on visual representation"."""
        if image_embeds is None:
            image_embeds = self.image_features(images)
        return self.language_projection(self.query_pass(image_embeds)[0])

    def llm_inputs(self, prompt, ids, mask):
        """[soft prompt; the text's embeddings] and its attention mask: the input of a decoder-only
        LM, or of an encoder-decoder's encoder."""
        embeds = self.language_model.get_input_embeddings()(ids)
        return torch.cat([prompt.to(embeds.dtype), embeds], 1), torch.cat([mask.new_ones(prompt.shape[:2]), mask], 1)

    def llm_logits(self, images, ids, mask, labels):
        """The LM's next-token logits (B, T, V) for the targets and the labels (B, T), -100 where
        nothing is predicted (see llm_example for what ids and labels hold).
          decoder-only (LAVIS blip2_opt): the LM reads [Q queries; ids], right-padded; the last
          query predicts ids[0] ([BOS]: labels say whether it counts) and each text position t the
          token t + 1 (the LM's head is not run at the other query positions).
          encoder-decoder (blip2_t5): the encoder reads [queries; ids] (the prompt, or the prefix
          text), the decoder predicts `labels` teacher-forced (shifted right behind its start token)."""
        x, m = self.llm_inputs(self.soft_prompt(images), ids, mask)
        lm = self.language_model
        if self.decoder_only:
            logits = lm(inputs_embeds=x, attention_mask=m, use_cache=False,
                        logits_to_keep=ids.shape[1] + 1).logits                  # the last query on
            return logits[:, :-1], labels
        decoder_ids = lm.prepare_decoder_input_ids_from_labels(labels=labels)
        return lm(inputs_embeds=x, attention_mask=m, decoder_input_ids=decoder_ids, use_cache=False).logits, labels

    def loss_llm(self, images, ids, mask, labels, count=None):
        """Sec. 3.3: the language modeling loss (decoder-only) or the prefix language modeling loss
        (encoder-decoder), cross-entropy without smoothing (as LAVIS), averaged over the target
        tokens of the global batch (each rank's sum over the global count / world size, so that
        DDP's average is one process's mean; LAVIS and transformers average per rank)."""
        logits, labels = self.llm_logits(images, ids, mask, labels)
        if count is None:
            count = dist.all_reduce_sum((labels != -100).sum().float())
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")
        return loss * dist.world_size() / count.clamp(min=1)

    @torch.no_grad()
    def generate(self, images, ids, mask, image_embeds=None, **kwargs):
        """Text for a batch of images: the LM's own `generate` (beam search, nucleus sampling:
        kwargs as transformers' generate) on [soft prompt; prompt]. ids / mask: the prompt per
        sample, left-padded for a decoder-only LM ([BOS] prompt), right-padded for an encoder-decoder
        (prompt </s>). Returns the new tokens only, (B x num_return_sequences, T)."""
        x, m = self.llm_inputs(self.soft_prompt(images, image_embeds), ids, mask)
        out = self.language_model.generate(inputs_embeds=x, attention_mask=m, **kwargs)
        return out if self.decoder_only else out[:, 1:]          # an encoder-decoder's: after its start token

    # ---- weights ----

    @classmethod
    def from_hf(cls, path, cfg=None, tokenizer=None):
        """Build from a transformers BLIP-2 folder: Blip2ForImageTextRetrieval (vision, Q-Former
        with its text FFNs, text embeddings, both projections and the ITM head) or
        Blip2ForConditionalGeneration / Blip2Model (vision and Q-Former; the language side is
        stage 2's). The architecture comes from its config.json. Every key is mapped and
        shape-checked; what the folder lacks (ITG's LM head, which transformers does not have, and
        for ConditionalGeneration the text side) keeps its initialisation and is named."""
        config, state = read_hf_checkpoint(path)
        arch = hf_architecture(config, state, path)
        if cfg is not None and "image_size" in getattr(cfg, "cli_keys", ()):
            arch.pop("image_size")                       # the run's: positions are interpolated to it
        has_llm = any(k.startswith("language_model.") for k in state)
        cfg = dataclasses.replace(cfg or Config(stage=2 if has_llm else 1), **arch)
        cfg.vision = "eva"
        if cfg.stage == 2 and not has_llm:
            raise UserError(f"{path}: no language model (text_config) in this folder; stage 2 loads a "
                            f"Blip2ForConditionalGeneration folder (or starts from stage 1 with --llm)")
        llm = llm_from_config(config["text_config"], path) if cfg.stage == 2 else None
        model = build_blip2(cfg, tokenizer, llm)
        state = check_eva_k_bias(dict(state), "vision_model.encoder.layers.{}.self_attn.qkv.bias", cfg, path)
        state["vision_model.embeddings.position_embedding"] = resize_pos_embed(
            state["vision_model.embeddings.position_embedding"][0], cfg.image_size // cfg.patch_size)
        mapping = eva_hf_map(cfg)
        text = "embeddings.word_embeddings.weight" in state and cfg.stage == 1
        mapping.update(qformer_map(cfg, "qformer", text_ffn=text, hf=True))
        mapping["query_tokens"] = "query_tokens"
        if cfg.stage == 2:   # Blip2ForConditionalGeneration: vision, Q-Former, projection and LM; nothing new
            cfg.llm = path
            mapping.update(llm_map(model, state))
            load_mapped(model, state, mapping, source=path, ignore=("position_ids",))
            if dist.is_main():
                print(f"{path}: loaded every weight (vision, Q-Former, language_projection, "
                      f"{type(llm).__name__})")
            return model
        keep = ["lm_head.", "temp"]
        if text:
            mapping.update({"qformer.word_embeddings.weight": "embeddings.word_embeddings.weight",
                            "qformer.position_embeddings.weight": "embeddings.position_embeddings.weight"})
            mapping.update({f"{a}.{p}": f"{b}.{p}" for p in ("weight", "bias") for a, b in
                            (("vision_proj", "vision_projection"), ("text_proj", "text_projection"),
                             ("itm_head", "itm_head"))})
        else:
            keep += ["qformer.word_embeddings.", "qformer.position_embeddings.", "vision_proj.", "text_proj.",
                     "itm_head."] + [f"qformer.layer.{i}.{m}" for i in range(cfg.qformer_layers)
                                     for m in ("intermediate.", "output.", "output_norm.")]
        load_mapped(model, state, mapping, source=path, keep_init=keep,
                    ignore=("position_ids", "language_projection.", "language_model."))
        if dist.is_main():
            lacking = "ITG's LM head" + ("" if text else ", the text side (embeddings, text FFNs, projections, ITM)")
            print(f"{path}: loaded every image-side and Q-Former weight; not in a transformers folder: {lacking}")
        return model

    @classmethod
    def from_lavis(cls, path, cfg=None, tokenizer=None, state=None):
        """Build from LAVIS's stage-1 checkpoint (blip2_pretrained.pth, blip2_pretrained_vitL.pth:
        {'model': ...} with Qformer.bert.*, Qformer.cls.*, query_tokens, ln_vision, vision_proj,
        text_proj, itm_head, temp; no image encoder: LAVIS saves only what trains). The encoder comes
        from cfg.vision_weights. Every key is mapped and shape-checked."""
        state = dict(state) if state is not None else read_weights_file(path)[1]
        arch = lavis_architecture(state, path)
        if cfg is not None and "qformer_heads" in getattr(cfg, "cli_keys", ()):
            arch.pop("qformer_heads")                    # the file cannot say; the command line did
        cfg = dataclasses.replace(cfg or Config(), **arch)
        model = build_blip2(cfg, tokenizer)
        # LAVIS's BertLMPredictionHead shares its decoder's weight with the word embeddings and its
        # bias with `bias` (self.decoder.bias = self.bias): the file holds each twice
        p = "Qformer.cls.predictions."
        for a, b in ((p + "decoder.weight", "Qformer.bert.embeddings.word_embeddings.weight"),
                     (p + "decoder.bias", p + "bias")):
            if a in state and not torch.equal(state[a], state[b]):
                raise UserError(f"{path}: '{a}' differs from '{b}', which LAVIS ties it to")
        mapping = qformer_map(cfg, "Qformer.bert", text_ffn=True, hf=False)
        mapping.update(hf_bert_lm_head_map("lm_head", "Qformer.cls.predictions",
                                           tied_to="Qformer.bert.embeddings.word_embeddings.weight"))
        mapping.update({f"{n}.{p}": f"{n}.{p}" for n in ("ln_vision", "vision_proj", "text_proj", "itm_head")
                        for p in ("weight", "bias")})
        mapping.update(query_tokens="query_tokens", temp="temp")
        load_mapped(model, state, mapping, source=path, keep_init=("visual_encoder.",),
                    ignore=("position_ids", "Qformer.cls.predictions.decoder."))
        load_vision(model, cfg)
        if dist.is_main():
            print(f"{path}: loaded every Q-Former weight; the image encoder from {cfg.vision_weights or 'its seed'}")
        return model


def build_blip2(cfg, tokenizer, llm=None):
    """The model for a tokenizer: [DEC] is added (the ITG BOS, LAVIS's Blip2Base.init_tokenizer).
    Without one (weights read on their own; stage 2, whose Q-Former reads no text): [DEC] is the
    last id and [PAD] 0, where BERT + [DEC] has them in LAVIS's and transformers' files."""
    if tokenizer is None:
        return BLIP2(cfg, dec_id=cfg.vocab_size - 1, pad_id=0, llm=llm)
    (dec_id,) = tokenizer.add_special_tokens(["[DEC]"])
    cfg.vocab_size = cfg.vocab_size or tokenizer.vocab_size
    if cfg.vocab_size < tokenizer.vocab_size:
        raise UserError(f"model vocabulary {cfg.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} "
                        f"(with [DEC])")
    return BLIP2(cfg, dec_id=dec_id, pad_id=tokenizer.pad_id)


def sample_negatives(weights):
    """One index per row, drawn with probability proportional to `weights` (B, N), by the
    exponential trick: argmax_j w_j / E_j with E_j ~ Exp(1) picks j with probability w_j / sum(w),
    torch.multinomial's distribution without its host syncs. A row with no mass left (every
    candidate sharing the image id, NaN similarities: LAVIS's "invalid multinomial distribution")
    draws uniformly instead."""
    weights = torch.nan_to_num(weights.float(), nan=0.0, posinf=0.0, neginf=0.0).clamp_(min=0)
    weights = torch.where(weights.sum(1, keepdim=True) > 0, weights, 1.0)      # no boolean indexing: no sync
    noise = torch.empty_like(weights).exponential_().clamp_(min=1e-30)
    return (weights / noise).argmax(1)


# ---- stage 2: the language model (transformers provides it) ----

def is_generation_folder(config):
    """A Blip2ForConditionalGeneration folder's config.json (a retrieval folder's has a default
    text_config too, and no language model)."""
    return "Blip2ForConditionalGeneration" in (config.get("architectures") or [])


def llm_from_config(text_config, source):
    """An LM with random weights from a Blip2ForConditionalGeneration config's text_config (OPT:
    AutoModelForCausalLM; T5: AutoModelForSeq2SeqLM); its weights are loaded by the caller."""
    from transformers import AutoConfig
    if "model_type" not in text_config:
        raise UserError(f"{source}: text_config has no model_type")
    config = AutoConfig.for_model(**text_config)
    return llm_class(config).from_config(config)


def llm_class(config):
    """transformers' auto class of a language model config: FlanT5 is an encoder-decoder."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM
    return AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM


def llm_map(model, state):
    """language_projection and language_model.* <- the same names in a Blip2ForConditionalGeneration
    file; a tied weight the file holds once (OPT's lm_head = embed_tokens, T5's encoder / decoder
    embed_tokens = shared) is read from the key it is tied to."""
    m = {f"language_projection.{p}": f"language_projection.{p}" for p in ("weight", "bias")}
    tied = {}
    for k, v in model.language_model.state_dict(keep_vars=True).items():
        tied.setdefault(id(v), []).append(f"language_model.{k}")
    for group in tied.values():
        present = [k for k in group if k in state]
        for k in group:
            m[k] = k if k in state else (present[0] if present else k)
    return m


def load_llm(path):
    """--llm: a transformers LM folder (OPT, FlanT5, any AutoModelForCausalLM / Seq2SeqLM), or a
    Blip2ForConditionalGeneration folder, whose language_model.* weights are read."""
    from transformers import AutoConfig
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise MissingFileError(f"--llm {path}: no config.json; expected a transformers language model folder")
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    if is_generation_folder(config):
        _, state = read_hf_checkpoint(path)
        holder = nn.Module()
        holder.language_model = llm_from_config(config["text_config"], path)
        mapping = {k: v for k, v in llm_map(holder, state).items() if k.startswith("language_model.")}
        load_mapped(holder, state, mapping, source=path,
                    ignore=("vision_model.", "qformer.", "query_tokens", "language_projection.", "embeddings."))
        return holder.language_model
    return llm_class(AutoConfig.from_pretrained(path)).from_pretrained(path)


def tiny_llm(cfg, tokenizer):
    """The tiny preset's language model: a random OPT (pre-LN decoder, learned positions) of the
    llm_* sizes over the tokenizer's vocabulary, without dropout."""
    from transformers import AutoModelForCausalLM, OPTConfig
    config = OPTConfig(vocab_size=len(tokenizer), hidden_size=cfg.llm_width, num_hidden_layers=cfg.llm_layers,
                       ffn_dim=cfg.llm_mlp_dim, num_attention_heads=cfg.llm_heads, word_embed_proj_dim=cfg.llm_width,
                       max_position_embeddings=max(128, cfg.num_query_tokens + 2 * cfg.max_length), dropout=0.0,
                       attention_dropout=0.0, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    return AutoModelForCausalLM.from_config(config)


def make_llm(cfg, tokenizer):
    return load_llm(cfg.llm) if cfg.llm else tiny_llm(cfg, tokenizer)


def load_llm_tokenizer(cfg, hf_folder=""):
    """The LM's tokenizer: --llm-tokenizer, else --llm's folder (or a Blip2ForConditionalGeneration
    --init-from's), else the tiny data's (tokenizer_llm/)."""
    from transformers import AutoTokenizer
    name = cfg.llm_tokenizer or cfg.llm or hf_folder
    if not name:
        name = os.path.join(tiny_data(), "tokenizer_llm")
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise UserError(f"no tokenizer in {name} ({type(e).__name__}); pass --llm-tokenizer") from None


def checkpoint_llm_layers(lm):
    """Gradient checkpointing for the LM: a frozen one runs in eval mode, where transformers' own
    (model.gradient_checkpointing_enable) is off; so each of its layers is wrapped here."""
    from transformers.modeling_layers import GradientCheckpointingLayer
    for layer in lm.modules():
        if isinstance(layer, GradientCheckpointingLayer) and not getattr(layer, "_blip2_recompute", False):
            forward = layer.forward
            layer.forward = lambda *a, _f=forward, **k: recompute(_f, *a, use_reentrant=False, **k)
            layer._blip2_recompute = True


def to_stage2(stage1, cfg, llm):
    """Stage 2 starts from stage 1 (LAVIS pretrain_stage2.yaml loads blip2_pretrained.pth with
    strict=False): the image encoder, ln_vision, the queries and the Q-Former's query path are
    kept; its text-only parts (word and position embeddings, text FFNs, ITG's head, the ITC
    projections, the ITM head, temp) are dropped, and the projection to the LM starts new."""
    model = BLIP2(cfg, dec_id=stage1.dec_id, pad_id=stage1.pad_id, llm=llm)
    model.visual_encoder = stage1.visual_encoder
    ours = model.state_dict()
    state = {k: v for k, v in stage1.state_dict().items() if k in ours}
    missing = [k for k in ours if k not in state and not k.startswith(("language_model.", "language_projection."))]
    if missing:
        raise UserError(f"{cfg.init_from}: stage 1 has no {missing[:4]}")
    model.load_state_dict(state, strict=False)
    model.vision_from_checkpoint = stage1.vision_from_checkpoint
    if dist.is_main():
        dropped = sorted({k.split(".")[0] if not k.startswith("qformer.") else "the Q-Former's text parts"
                          for k in stage1.state_dict() if k not in ours})
        print(f"{cfg.init_from}: stage 1 -> stage 2: kept the encoder, ln_vision, queries and Q-Former; "
              f"dropped {', '.join(dropped)}")
    return model


# ---- weights: key maps and files ----

def qformer_map(cfg, prefix, *, text_ffn, hf):
    """Our QFormer <- LAVIS's Qformer.bert (BERT names: attention.self.*, embeddings.LayerNorm) or
    transformers' qformer (attention.attention.*, the embedding norm as qformer.layernorm, the word
    and position embeddings outside it: the caller maps those). Query FFNs: intermediate_query,
    output_query. Without `text_ffn` the text FFNs are left out (a stage-2 Q-Former has none)."""
    L = cfg.qformer_layers
    m = hf_bert_map("qformer", prefix, L, cross_layers=range(0, L, cfg.cross_attention_freq), token_types=False)
    for p in ("weight", "bias"):
        for i in range(L):
            o, t = f"qformer.layer.{i}", f"{prefix}.encoder.layer.{i}"
            m[f"{o}.intermediate_query.{p}"] = f"{t}.intermediate_query.dense.{p}"
            m[f"{o}.output_query.{p}"] = f"{t}.output_query.dense.{p}"
            m[f"{o}.output_query_norm.{p}"] = f"{t}.output_query.LayerNorm.{p}"
            if not text_ffn:
                for name in ("intermediate", "output", "output_norm"):
                    del m[f"{o}.{name}.{p}"]
    if hf:   # transformers' renames (convert_blip_2_original_to_pytorch.py)
        m = {k: tuple(x.replace(".self.", ".attention.") for x in v) if isinstance(v, tuple)
             else v.replace(".self.", ".attention.") for k, v in m.items()}
        for p in ("weight", "bias"):
            m[f"qformer.embed_norm.{p}"] = f"{prefix}.layernorm.{p}"
        del m["qformer.word_embeddings.weight"], m["qformer.position_embeddings.weight"]
    return m


def eva_hf_map(cfg):
    """visual_encoder + ln_vision <- transformers' Blip2VisionModel ('vision_model': BLIP's vision
    names; its post_layernorm is LAVIS's ln_vision)."""
    m = hf_blip_vision_map("visual_encoder", "vision_model", cfg.vision_layers)
    for p in ("weight", "bias"):
        m[f"ln_vision.{p}"] = m.pop(f"visual_encoder.ln_post.{p}")
    return m


def check_eva_k_bias(state, key, cfg, source):
    """EVA has no k bias: transformers folds q, 0, v into one qkv bias; its k third must be zero."""
    D = cfg.vision_width
    for i in range(cfg.vision_layers):
        k_bias = state[key.format(i)][D:2 * D]
        if k_bias.abs().max() > 0:
            raise UserError(f"{source}: '{key.format(i)}' has a non-zero k bias (max |b| {float(k_bias.abs().max()):.3g}); "
                            f"EVA's attention has none, so this is not an EVA encoder")
    return state


# transformers config fields our modules have one value of (EVA's and the Q-Former's): another value
# would change the numbers, so it is refused (dropout is the run's: --dropout; the encoder has none)
HF_FIXED = {"vision_config": dict(hidden_act="gelu", qkv_bias=True),
            "qformer_config": dict(hidden_act="gelu", position_embedding_type="absolute")}


def hf_architecture(config, state, path):
    """Config fields of a transformers BLIP-2 folder (config.json: vision_config, qformer_config):
    every field that changes the numbers is taken (sizes as sizes) or, where our modules have one
    value only (HF_FIXED), refused naming it."""
    try:
        v, q = config["vision_config"], config["qformer_config"]
        for part, fixed in HF_FIXED.items():
            for k, want in fixed.items():
                if config[part].get(k, want) != want:
                    raise UserError(f"{path}: {part}.{k} is {config[part][k]!r}; this BLIP-2 has "
                                    f"{want!r} only")
        words = state.get("embeddings.word_embeddings.weight")
        eps = v.get("layer_norm_eps", 1e-6)     # the encoder's norms and post_layernorm (ln_vision)
        return dict(image_size=v.get("image_size", 224), patch_size=v.get("patch_size", 14),
                    vision_width=v["hidden_size"], vision_layers=v.get("num_hidden_layers", 39),
                    vision_heads=v.get("num_attention_heads", 16),
                    vision_mlp_dim=v.get("intermediate_size", 6144), vision_eps=eps,
                    ln_vision_eps=eps,
                    num_query_tokens=config.get("num_query_tokens", 32), qformer_width=q.get("hidden_size", 768),
                    qformer_layers=q.get("num_hidden_layers", 12), qformer_heads=q.get("num_attention_heads", 12),
                    qformer_mlp_dim=q.get("intermediate_size", 3072),
                    cross_attention_freq=q.get("cross_attention_frequency", 2),
                    max_positions=q.get("max_position_embeddings", 512), qformer_eps=q.get("layer_norm_eps", 1e-12),
                    embed_dim=config.get("image_text_hidden_size", 256),
                    # without text embeddings (ConditionalGeneration) the text side starts new: the tokenizer's
                    **({"vocab_size": words.shape[0]} if words is not None else {}))
    except (KeyError, TypeError) as e:
        raise UserError(f"{path}: not a transformers BLIP-2 config ({type(e).__name__}: {e})") from None


def lavis_architecture(state, path):
    """Q-Former fields of a LAVIS checkpoint, read off its shapes. No tensor shows the head count:
    width / 64, bert-base's (every released checkpoint), unless --qformer-heads is given."""
    b = "Qformer.bert."
    try:
        vocab, D = state[b + "embeddings.word_embeddings.weight"].shape
        layers = 1 + max(int(k[len(b):].split(".")[2]) for k in state if k.startswith(b + "encoder.layer."))
        cross = sorted({int(k[len(b):].split(".")[2]) for k in state if ".crossattention." in k})
        return dict(num_query_tokens=state["query_tokens"].shape[1], qformer_width=D, qformer_layers=layers,
                    qformer_heads=max(1, D // 64), qformer_mlp_dim=state[b + "encoder.layer.0.intermediate.dense.weight"].shape[0],
                    cross_attention_freq=cross[1] - cross[0] if len(cross) > 1 else layers,
                    max_positions=state[b + "embeddings.position_embeddings.weight"].shape[0], vocab_size=vocab,
                    embed_dim=state["vision_proj.weight"].shape[0],
                    vision_width=state[b + "encoder.layer.0.crossattention.self.key.weight"].shape[1])
    except (KeyError, ValueError, IndexError) as e:
        raise UserError(f"{path}: not in LAVIS's Blip2Qformer key layout ({type(e).__name__}: {e})") from None


def load_vision(model, cfg):
    """The frozen encoder from cfg.vision_weights (nothing: it stays the random one of its seed).
    eva: LAVIS's eva_vit_g.pth (timm names, separate q_bias / v_bias, 40 blocks of which the last
    is dropped) or a transformers BLIP-2 folder; clip-l: a transformers CLIP folder or an OpenAI-
    format state dict (clip_vit_L.pth, bare or under 'visual.'), without its last layer and ln_post.
    Positions are interpolated to the run's image size; every weight of ours must be in the file;
    what is left over (the dropped layer, heads) is named."""
    path, L, grid = cfg.vision_weights, cfg.vision_layers, cfg.image_size // cfg.patch_size
    if not path:
        return
    holder = nn.Module()                           # our keys 'visual_encoder.*' and nothing else
    holder.visual_encoder = model.visual_encoder
    if os.path.isdir(path):
        config, state = read_hf_checkpoint(path)
        v = config.get("vision_config") or config           # a whole model's, or a vision model's
        act = "quick_gelu" if cfg.vision == "clip-l" else "gelu"
        for k, ours, flag in (("layer_norm_eps", cfg.vision_eps, "--vision-eps"),
                              ("hidden_act", act, "--vision")):
            if v.get(k, ours) != ours:
                raise UserError(f"--vision-weights {path}: its {k} is {v[k]!r}, this encoder's "
                                f"{ours!r} ({flag})")
        # a whole model's folder (Blip2*, CLIPModel) keeps the tower under vision_model.; a bare
        # Blip2VisionModel / CLIPVisionModel folder (transformers 5) at the top level
        if not any(k.startswith("vision_model.") for k in state):
            state = {"vision_model." + k: v for k, v in state.items()}
        if cfg.vision == "eva":
            pos = "vision_model.embeddings.position_embedding"
            state = check_eva_k_bias(state, "vision_model.encoder.layers.{}.self_attn.qkv.bias", cfg, path)
            mapping = eva_hf_map(cfg)
            del mapping["ln_vision.weight"], mapping["ln_vision.bias"]
        else:
            pos = "vision_model.embeddings.position_embedding.weight"
            mapping = hf_clip_vision_map("visual_encoder", "vision_model", L)
            del mapping["visual_encoder.ln_post.weight"], mapping["visual_encoder.ln_post.bias"]
    else:
        state = dict(read_weights_file(path)[1])
        if cfg.vision == "eva":
            pos = "pos_embed"
            blocks = {int(k.split(".")[1]) for k in state if k.startswith("blocks.")}
            if blocks and len(blocks) < L:
                raise UserError(f"--vision-weights {path}: {len(blocks)} blocks, the encoder needs {L} (--vision-layers)")
            for i in range(L):
                q, v = state.get(f"blocks.{i}.attn.q_bias"), state.get(f"blocks.{i}.attn.v_bias")
                if q is None or v is None:
                    raise UserError(f"{path}: no 'blocks.{i}.attn.q_bias' / 'v_bias': not an EVA ViT (eva_vit_g.pth)")
                state[f"blocks.{i}.attn.qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])
            mapping = timm_vit_map("visual_encoder", "", L)
            del mapping["visual_encoder.ln_post.weight"], mapping["visual_encoder.ln_post.bias"]
        else:
            prefix = "visual" if "visual.conv1.weight" in state else ""
            pos = f"{prefix}.positional_embedding" if prefix else "positional_embedding"
            mapping = open_clip_vision_map("visual_encoder", prefix, L)
            if not prefix:
                mapping = {k: v.lstrip(".") if isinstance(v, str) else tuple(x.lstrip(".") for x in v)
                           for k, v in mapping.items()}
    if pos not in state:
        raise UserError(f"--vision-weights {path}: no '{pos}'; not a {cfg.vision} encoder in a format we read")
    state[pos] = resize_pos_embed(state[pos].reshape(-1, state[pos].shape[-1]), grid)
    used = {x for v in mapping.values() for x in (v if isinstance(v, tuple) else (v,))}
    merged = {k for k in state if k.endswith((".attn.q_bias", ".attn.v_bias")) and int(k.split(".")[1]) < L}
    left = sorted(k for k in state if k not in used and k not in merged)
    load_mapped(holder, state, mapping, source=path, ignore=tuple(left) + tuple(merged))
    if left and dist.is_main():
        print(f"--vision-weights {path}: {len(left)} key(s) not used (the dropped last layer, norms, heads, "
              f"the text side): {', '.join(left[:4])}{', ...' if len(left) > 4 else ''}")


def load_text_init(model, path):
    """--init-text: a transformers BERT folder (bert-base-uncased) into the Q-Former's embeddings,
    self-attention and text FFNs, and the query FFNs too ("initialised from the text ones", as
    LAVIS's init_Qformer); cross-attention keeps its initialisation, and the LM head comes from
    cls.predictions when there is one. [DEC]'s row (one past BERT's vocabulary) stays new."""
    _, state = read_hf_checkpoint(path)
    cfg = model.cfg
    pre = "bert" if any(k.startswith("bert.") for k in state) else ""
    dot = f"{pre}." if pre else ""
    L = cfg.qformer_layers
    mapping = hf_bert_map("qformer", pre, L, token_types=False)
    for i in range(L):
        for p in ("weight", "bias"):
            o = f"qformer.layer.{i}"
            mapping.update({f"{o}.intermediate_query.{p}": mapping[f"{o}.intermediate.{p}"],
                            f"{o}.output_query.{p}": mapping[f"{o}.output.{p}"],
                            f"{o}.output_query_norm.{p}": mapping[f"{o}.output_norm.{p}"]})
    state = dict(state)
    words = f"{dot}embeddings.word_embeddings.weight"
    ours_words = model.qformer.word_embeddings.weight.detach()
    n = state[words].shape[0]
    if n < ours_words.shape[0]:                     # BERT's 30522 + our [DEC]: the new rows stay ours
        state[words] = torch.cat([state[words], ours_words[n:]])
    keep = [f"qformer.layer.{i}.crossattention." for i in range(0, L, cfg.cross_attention_freq)]
    holder = nn.Module()
    holder.qformer, holder.lm_head = model.qformer, model.lm_head
    if "cls.predictions.bias" in state:
        bias = state["cls.predictions.bias"]
        state["cls.predictions.bias"] = torch.cat([bias, torch.zeros(ours_words.shape[0] - bias.shape[0])])
        mapping.update(hf_bert_lm_head_map("lm_head", "cls.predictions", tied_to=words))
    else:
        mapping["lm_head.decoder.weight"] = words
        keep += ["lm_head.dense.", "lm_head.LayerNorm.", "lm_head.decoder.bias"]
    load_mapped(holder, state, mapping, source=path, keep_init=keep,
                ignore=("position_ids", "pooler.", "token_type_embeddings", "cls.seq_relationship.",
                        "cls.predictions.decoder."))


def read_init(path):
    """What an --init-from is, read once: ('hf', its config.json) for a transformers folder,
    ('lavis', its state dict) for LAVIS's stage-1 file, ('ours', our checkpoint)."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise MissingFileError(f"--init-from {path}: no config.json; expected a transformers BLIP-2 folder")
        with open(os.path.join(path, "config.json")) as f:
            return "hf", json.load(f)
    saved, state = read_weights_file(path)
    if "Qformer.bert.embeddings.LayerNorm.weight" in state:
        return "lavis", state
    if isinstance(saved, dict) and "config" in saved and "qformer.embed_norm.weight" in state:
        return "ours", saved
    raise UserError(f"--init-from {path}: neither a transformers BLIP-2 folder, LAVIS's blip2_pretrained.pth nor one "
                    f"of our BLIP-2 checkpoints (its keys start {sorted(state)[:3]})")


# ---- data ----

def caption_text(cfg):
    """LAVIS's blip_caption processor: every caption, in training and evaluation (after the prompt)."""
    return functools.partial(pre_caption_blip, max_words=cfg.max_words)


def question_text(cfg):
    """LAVIS's blip_question processor: every VQA question, before --vqa-prompt's formatting."""
    return functools.partial(pre_question_blip, max_words=cfg.max_words)


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
    # LAVIS's blip2_image_train (crop 0.5-1, flip) at the paper presets; the tiny preset's light crop
    # has no flip (its captions say left and right)
    example = Example(train_transform(cfg.image_size, cfg.min_scale, cfg.hflip), tokenizer, cfg.max_length,
                      text=caption_text(cfg))
    records = training_records(train_file, root, cfg.skip_bad)          # an annotation file's, or shards
    loader, sampler = train_loader(records, example, cfg, rank, world_size, train_file)
    return loader, sampler, val


# ---- data (stage 2): texts for the language model ----

def llm_example(tok, prompt, target, max_length, decoder_only, end_ids):
    """One sample's token ids for the LM, unpadded: (ids, labels).
      decoder-only (LAVIS blip2_opt): ids = [BOS] prompt target end, labels = the ids of target and
      end, -100 on the prompt and its [BOS] (no loss on the prompt); without a prompt [BOS] is a
      target too, which the last query predicts (LAVIS masks [BOS] only with the prompt). The
      prompt's trailing space goes with the target: "a photo of " + "dog" is "a photo of dog".
      encoder-decoder (blip2_t5): ids = prompt </s> (after the queries in the encoder), labels =
      target </s> (the decoder's).
    A target longer than max_length (the whole sequence, prompt included, for decoder-only) is cut,
    its end kept: the end token ("\n" / </s>) is what teaches the LM to stop."""
    if decoder_only:
        head = prompt.rstrip(" ")
        p = tok(head)["input_ids"]                                        # [BOS] prompt
        t = tok(prompt[len(head):] + target, add_special_tokens=False)["input_ids"]
        t = t[:max(0, max_length - len(p) - len(end_ids))] + end_ids
        return p + t, (p if not head else [-100] * len(p)) + t
    p = tok(prompt)["input_ids"]
    t = tok(target)["input_ids"]                                          # target </s>
    if len(t) > max_length:
        t = t[:max_length - 1] + t[-1:]
    return p, t


def collate_llm(pad_id):
    """Batches of (image, (ids, labels), image id) padded on the right to the batch's longest: images,
    ids, mask, labels (-100 at padding), image ids."""
    def collate(batch):
        images, texts, r = zip(*batch)
        n, m = max(len(t[0]) for t in texts), max(len(t[1]) for t in texts)
        ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        labels = torch.full((len(batch), m), -100, dtype=torch.long)
        for i, (x, y) in enumerate(texts):
            ids[i, :len(x)], mask[i, :len(x)], labels[i, :len(y)] = torch.tensor(x), 1, torch.tensor(y)
        return torch.stack(images), ids, mask, labels, torch.tensor(r)
    return collate


def prompt_batch(tok, prompts, decoder_only):
    """Generation prompts per sample: decoder-only: [BOS] prompt, left-padded (the new tokens follow
    every row's last prompt token); encoder-decoder: prompt </s>, right-padded."""
    rows = [tok(p.rstrip(" ") if decoder_only else p)["input_ids"] for p in prompts]
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(n - len(r), n) if decoder_only else slice(0, len(r))
        ids[i, span], mask[i, span] = torch.tensor(r), 1
    return ids, mask


def end_ids(cfg, tok, decoder_only):
    """The ids that end a decoder-only target (LAVIS: "\n" for OPT): cfg.text_end, else </s>."""
    if not decoder_only:
        return []
    ids = tok(cfg.text_end, add_special_tokens=False)["input_ids"] if cfg.text_end else []
    return ids or [tok.eos_token_id]


def read_vqa(questions_path, answers_path, image_root=None):
    """VQAv2's two files -> [{"image", "question", "question_id", "answers": [str] * 10}]. The
    image is the entry's "image" path (the tiny split's) or COCO's file name for its image_id and
    the file's data_subtype (val2014/COCO_val2014_000000000042.jpg) under --image-root."""
    def load(path, field):
        data = read_json(path, "VQA file")
        if not isinstance(data, dict) or not isinstance(data.get(field), list):
            raise UserError(f"{path}: expected VQAv2's layout, an object with a '{field}' list")
        return data
    if not answers_path:
        raise UserError("--task vqa: pass --val-answers (VQAv2's annotation file) with --val-data (its questions)")
    questions, annotations = load(questions_path, "questions"), load(answers_path, "annotations")
    root = image_root or os.path.dirname(os.path.abspath(questions_path))
    answers = {}
    for i, a in enumerate(annotations["annotations"]):
        try:
            answers[a["question_id"]] = [x["answer"] for x in a["answers"]]
        except (KeyError, TypeError):
            raise UserError(f"{answers_path}, annotation {i}: needs 'question_id' and 'answers' [{{'answer'}}]") from None
    out = []
    for i, q in enumerate(questions["questions"]):
        if not isinstance(q, dict) or not all(k in q for k in ("question_id", "image_id", "question")):
            raise UserError(f"{questions_path}, question {i}: needs 'question_id', 'image_id' and 'question'")
        if q["question_id"] not in answers:
            raise UserError(f"{questions_path}: question {q['question_id']} has no annotation in {answers_path}")
        image = q.get("image") or os.path.join(
            questions.get("data_subtype", ""), f"COCO_{questions.get('data_subtype', '')}_{q['image_id']:012d}.jpg")
        image = image if os.path.isabs(image) else os.path.join(root, image)
        if not os.path.isfile(image):
            raise MissingFileError(f"{questions_path}, question {q['question_id']}: image file {image} does not exist")
        out.append({"image": image, "question": q["question"], "question_id": q["question_id"],
                    "answers": answers[q["question_id"]]})
    if not out:
        raise UserError(f"{questions_path}: no questions")
    return out


def build_data_stage2(cfg, tok, decoder_only, rank, world_size):
    """Stage 2: training loader (none with --eval-only), caption val records, VQA questions. With
    neither --train-data nor --val-data, the built-in tiny set, whose training mixes the train split's
    VQA questions in (the tiny LM knows no language: it learns the answer format here; the paper's
    LMs bring it from their own pretraining)."""
    tiny = None if (cfg.train_data or cfg.val_data) else tiny_data()
    root = cfg.image_root or None
    val = vqa = None
    if cfg.task == "vqa":
        vqa = read_vqa(cfg.val_data or os.path.join(tiny, "vqa_val_questions.json"),
                       cfg.val_answers or (os.path.join(tiny, "vqa_val_annotations.json") if tiny else ""), root)
    else:
        val_file = cfg.val_data or (os.path.join(tiny, "val.json") if tiny else "")
        val = read_annotations(val_file, root) if val_file else None
        if tiny:
            vqa = read_vqa(os.path.join(tiny, "vqa_val_questions.json"), os.path.join(tiny, "vqa_val_annotations.json"))
    if cfg.eval_only:
        return None, None, val, vqa
    train_file = cfg.train_data or os.path.join(tiny_data(), "train.json")
    records = training_records(train_file, root, cfg.skip_bad)
    caption, question = caption_text(cfg), question_text(cfg)             # LAVIS's text processors
    if tiny:
        records += [{"image": q["image"], "captions": [q["answers"][0]],
                     "prompt": cfg.vqa_prompt.format(question(q["question"])), "image_id": q["question_id"]}
                    for q in read_vqa(os.path.join(tiny, "vqa_train_questions.json"),
                                      os.path.join(tiny, "vqa_train_annotations.json"))]
    end = end_ids(cfg, tok, decoder_only)
    split_prefix = not decoder_only and cfg.task == "pretrain"

    def encode(record, c, seed):
        prompt = record.get("prompt", cfg.prompt)
        target = record["captions"][c]
        target = target if "prompt" in record else caption(target)      # a caption (not a VQA answer)
        if split_prefix and "prompt" not in record:
            # Sec. 3.3 prefix language modeling: the caption is cut at a random word boundary, the
            # prefix goes to the encoder after the queries, the suffix is generated (see the README)
            words = target.split()
            k = random.Random(seed).randrange(len(words)) if seed is not None and words else 0
            prompt, target = " ".join(words[:k]), " ".join(words[k:])
        return llm_example(tok, prompt, target, cfg.max_length, decoder_only, end)

    example = Example(train_transform(cfg.image_size, cfg.min_scale, cfg.hflip), encode=encode)
    loader, sampler = train_loader(records, example, cfg, rank, world_size, train_file,
                                   collate_fn=collate_llm(tok.pad_token_id))
    return loader, sampler, val, vqa


def trim_padding(ids, pad_id):
    """Drop the padding columns no caption of the global batch reaches (LAVIS pads every caption
    to 32 tokens). Exact: padding is never attended to and never a target, and text positions
    start at 0 either way. On the host, before the copy to the GPU; the ranks agree on the length
    (ITM sends token ids between them)."""
    position = torch.arange(1, ids.shape[1] + 1)
    longest = dist.host_max(int(((ids != pad_id) * position).max()) if ids.numel() else 0)
    return ids[:, :max(longest, 2)]


def check_config(cfg):
    """Start-up checks with clear messages (instead of an assert deep in the first step)."""
    if cfg.task not in STAGE_TASKS[cfg.stage]:
        raise UserError(f"--task {cfg.task} is not a stage-{cfg.stage} task ({', '.join(STAGE_TASKS[cfg.stage])})")
    if cfg.task == "vqa" and not cfg.eval_only:
        raise UserError("--task vqa evaluates zero-shot VQA: add --eval-only")
    if cfg.stage == 2 and cfg.preset not in ("tiny",) and not (cfg.llm or cfg.init_from or cfg.resume):
        raise UserError(f"--preset {cfg.preset}: pass --llm, the language model's transformers folder "
                        f"(or --init-from a Blip2ForConditionalGeneration folder)")
    if cfg.stage == 2 and cfg.llm and not os.path.isfile(os.path.join(cfg.llm, "config.json")):
        raise MissingFileError(f"--llm {cfg.llm}: no config.json; expected a transformers language model folder")
    if "{}" not in cfg.vqa_prompt:
        raise UserError(f"--vqa-prompt {cfg.vqa_prompt!r} has no {{}} for the question")
    if cfg.max_length > cfg.max_positions:
        raise UserError(f"--max-length {cfg.max_length} exceeds the {cfg.max_positions} position embeddings")
    if cfg.max_length < 2:
        raise UserError(f"--max-length {cfg.max_length}: ITG needs at least [DEC] and one token")
    if cfg.cross_attention_freq < 1:
        raise UserError(f"--cross-attention-freq {cfg.cross_attention_freq} must be at least 1")
    if cfg.num_query_tokens < 1:
        raise UserError(f"--num-query-tokens {cfg.num_query_tokens} must be at least 1")
    if cfg.image_size % cfg.patch_size:
        raise UserError(f"--image-size {cfg.image_size} is not a multiple of --patch-size {cfg.patch_size}")
    if not 0 <= cfg.label_smoothing < 1:
        raise UserError(f"--label-smoothing {cfg.label_smoothing} must be in [0, 1)")


# ---- evaluation (Sec. 4.4; LAVIS blip2.py compute_sim_matrix) ----

def shard_image_tokens(model, cfg, records, device, precision):
    return image_tokens(model.image_features, [r["image"] for r in records], cfg.image_size, cfg.batch_size,
                        cfg.workers, device, precision)


@torch.no_grad()
def evaluate(model, cfg, val, tokenizer, device, precision):
    """ITC for all pairs (the highest query-text cosine), then the ITM head re-ranks each row's top
    k; score = the ITM match logit averaged over the queries + the ITC cosine (LAVIS#645), -100
    outside the top k. Each rank embeds its shard of the texts and of the images and keeps its
    images' encoder features for the ITM passes."""
    if val is None:
        return {}
    was_training = model.training
    model.eval()
    tick = time.time()
    texts, txt2img = retrieval_texts(val, caption_text(cfg))
    ids = tokenizer(texts, cfg.max_length).to(device)
    mask = (ids != tokenizer.pad_id).long()
    t0, t1 = dist.shard_range(len(texts))
    text_feat = [torch.zeros(0, cfg.embed_dim, device=device)]
    for i in range(t0, t1, cfg.batch_size):
        j = min(i + cfg.batch_size, t1)
        with autocast(precision, device):
            text_feat.append(model.encode_text(ids[i:j], mask[i:j]).float())
    text_feat = dist.gather_varlen(torch.cat(text_feat))                              # (n_txt, E)
    i0, i1 = dist.shard_range(len(val))
    tokens = shard_image_tokens(model, cfg, val[i0:i1], device, precision)             # (mine, 1 + P, Dv)
    Q = cfg.num_query_tokens
    image_feats = [torch.zeros(0, Q, cfg.embed_dim, device=device)]
    for i in range(0, len(tokens), cfg.batch_size):
        with autocast(precision, device):
            image_feats.append(model.image_embed(model.query_pass(tokens[i:i + cfg.batch_size])[0]).float())
    image_feats = dist.gather_varlen(torch.cat(image_feats))                         # (n_img, Q, E)
    # the highest of the Q cosines, a block of images at a time (n_img x Q x n_txt would not fit)
    sim = torch.cat([torch.einsum("iqe,te->itq", image_feats[a:a + 64], text_feat).amax(-1)
                     for a in range(0, len(image_feats), 64)]) if len(image_feats) else image_feats.new_zeros(0, len(texts))
    k = min(cfg.k_test, len(texts), len(val))

    def itm(t, i):              # ITM match logits of texts t with this rank's images i
        with autocast(precision, device):
            return model.itm_logits(ids[t], mask[t], tokens[i])[:, 1].float()
    rows_i2t, rows_t2i = rerank_topk(sim, (i0, i1), k, itm, cfg.itm_batch, add_similarity=True)
    metrics = retrieval_metrics(rows_i2t, txt2img, rows_t2i)
    metrics["itc_r_mean"] = retrieval_metrics(sim, txt2img)["r_mean"]             # before re-ranking
    metrics.update(itm_pairs=k * (len(texts) + len(val)), retrieval_eval_s=time.time() - tick)
    metrics.update(evaluate_itg(model, cfg, val[i0:i1], tokenizer, device, precision, tokens))
    model.train(was_training)
    return metrics


@torch.no_grad()
def evaluate_itg(model, cfg, recs, tokenizer, device, precision, tokens):
    """ITG on this rank's val images and their captions (teacher forcing): top-1 accuracy of the
    next token, and `itg_acc_majority`, the accuracy of always predicting the most frequent next
    token: what a model that ignores the image and the earlier words reaches. Counts are summed
    over ranks."""
    ids = tokenizer(retrieval_texts(recs, caption_text(cfg))[0], cfg.max_length).to(device)
    image_of = torch.tensor([i for i, r in enumerate(recs) for _ in r["captions"]], dtype=torch.long, device=device)
    correct = torch.zeros((), device=device)
    counts = torch.zeros(cfg.vocab_size, device=device)
    for a in range(0, len(ids), cfg.batch_size):
        b = slice(a, a + cfg.batch_size)
        with autocast(precision, device):
            query_kv = model.query_pass(tokens[image_of[b]])[1]
            logits, labels = model.itg_logits(ids[b], (ids[b] != tokenizer.pad_id).long(), query_kv)
        target = labels != -100
        correct += (logits.argmax(-1)[target] == labels[target]).sum()
        counts += torch.bincount(labels[target], minlength=cfg.vocab_size).float()
    correct, counts = dist.all_reduce_sum(correct), dist.all_reduce_sum(counts)
    total = counts.sum().clamp(min=1)
    return {"itg_acc": float(100 * correct / total), "itg_acc_majority": float(100 * counts.max() / total)}


# ---- evaluation, stage 2: captions (Sec. 4.2) and zero-shot VQA (Sec. 4.1) ----

@torch.no_grad()
def generate_texts(model, cfg, paths, prompts, tok, device, precision, generation):
    """The LM's text for each (image, prompt): every rank generates for its shard of the pairs,
    in batches, and the texts are gathered in order."""
    start, end = dist.shard_range(len(paths))
    loader = torch.utils.data.DataLoader(ImageDataset(paths[start:end], eval_transform(cfg.image_size, crop=False)),
                                         batch_size=cfg.batch_size, num_workers=cfg.workers,
                                         worker_init_fn=ignore_preemption_signals)
    decoder_only = model.decoder_only
    stop = dict(eos_token_id=end_ids(cfg, tok, decoder_only)[0] if decoder_only else tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
    texts = []
    for images, index in loader:
        ids, mask = prompt_batch(tok, [prompts[start + i] for i in index.tolist()], decoder_only)
        with autocast(precision, device):
            new = model.generate(images.to(device), ids.to(device), mask.to(device), **generation, **stop)
        texts += [tok.decode(t, skip_special_tokens=True).strip() for t in new.tolist()]
    return [t for part in dist.gather_objects(texts) for t in part]


def caption_generation(cfg):
    """Beam search (5 beams, 30 / 8 new tokens in COCO fine-tuning) or nucleus sampling (top-p 0.9)."""
    lengths = dict(max_new_tokens=cfg.max_gen_length, min_new_tokens=cfg.min_gen_length)
    if cfg.nucleus:
        return dict(do_sample=True, top_p=0.9, top_k=0, num_beams=1, **lengths)
    return dict(do_sample=False, num_beams=cfg.num_beams, **lengths)


def evaluate_captions(model, cfg, val, tok, device, precision):
    """One caption per val image (prompted with --prompt in caption fine-tuning), pycocoevalcap's
    scores against its references; captions.json in the output folder."""
    prompt = cfg.prompt if cfg.task == "caption" else ""
    captions = generate_texts(model, cfg, [r["image"] for r in val], [prompt] * len(val), tok, device, precision,
                              caption_generation(cfg))
    metrics = caption_metrics(dict(enumerate(captions)), {i: r["captions"] for i, r in enumerate(val)}) \
        if dist.is_main() else {}
    if dist.is_main():
        with open(os.path.join(cfg.output_dir, "captions.json"), "w") as f:
            json.dump([{"image": r["image"], "image_id": r["image_id"], "caption": c} for r, c in zip(val, captions)],
                      f, indent=1)
    return dist.gather_objects(metrics)[0]


def evaluate_vqa(model, cfg, questions, tok, device, precision):
    """Zero-shot VQA (Sec. 4.1): "Question: {} Short answer:" (the question through LAVIS's
    blip_question) after the soft prompt, beam search
    with length penalty -1; vqa_acc is VQAv2's accuracy with its answer normalisation (percent).
    vqa_answers.json holds the answers in VQAv2's result format."""
    answers = generate_texts(model, cfg, [q["image"] for q in questions],
                             [cfg.vqa_prompt.format(question_text(cfg)(q["question"])) for q in questions], tok,
                             device, precision, VQA_GENERATION)
    if dist.is_main():
        with open(os.path.join(cfg.output_dir, "vqa_answers.json"), "w") as f:
            json.dump([{"question_id": q["question_id"], "answer": a} for q, a in zip(questions, answers)], f, indent=1)
    return {"vqa_acc": 100 * sum(vqa_accuracy(a, q["answers"]) for q, a in zip(questions, answers)) / len(questions)}


@torch.no_grad()
def evaluate_stage2(model, cfg, val, vqa, tok, device, precision):
    was_training = model.training
    model.eval()
    tick, metrics = time.time(), {}
    if val is not None:
        metrics.update(evaluate_captions(model, cfg, val, tok, device, precision))
    if vqa is not None:
        metrics.update(evaluate_vqa(model, cfg, vqa, tok, device, precision))
    if metrics:
        metrics["generation_eval_s"] = time.time() - tick
    model.train(was_training)
    return metrics


# ---- training ----

# Set by the run, not by the weights: an --init-from of our checkpoint keeps these from the command
# line or the task recipe (fine-tuning at 364 px from 224 px interpolates the encoder's positions).
RUN_FIELDS = ("image_size",)
# Where a stage-2 checkpoint's language model comes from (rebuilt on resume, unless it was saved).
LLM_FIELDS = ("llm", "llm_width", "llm_layers", "llm_heads", "llm_mlp_dim")


def init_stage(kind, saved):
    """The stage an --init-from holds: 2 for a Blip2ForConditionalGeneration folder or one of our
    stage-2 checkpoints, 1 for the rest (a retrieval folder, LAVIS's file, our stage-1 checkpoint)."""
    return 2 if (kind == "hf" and is_generation_folder(saved)
                 or kind == "ours" and saved["config"].get("stage", 1) == 2) else 1


def build_model(cfg, tokenizer, init=(None, None), llm_tokenizer=None):
    """Fresh model (its encoder from --vision-weights; in stage 2 its LM from --llm); or --init-from
    a transformers folder, LAVIS's stage-1 file, or one of our checkpoints (its frozen parts rebuilt
    from the sources it records, unless the command line names others); then --init-text a BERT.
    Stage 2 from a stage-1 start builds that and drops its text parts (to_stage2)."""
    kind, saved = init
    cli = set(getattr(cfg, "cli_keys", ()))
    llm = (lambda: make_llm(cfg, llm_tokenizer)) if cfg.stage == 2 else (lambda: None)
    if cfg.stage == 2 and kind and init_stage(kind, saved) == 1:
        cfg1 = dataclasses.replace(cfg, stage=1, init_text="")
        cfg1.cli_keys = cli                       # what the command line (or recipe) set still wins
        stage1, cfg1 = build_model(cfg1, None, init)
        for k in MODEL_FIELDS + ("vision_weights", "vision_seed"):
            setattr(cfg, k, getattr(cfg1, k))
        model = to_stage2(stage1, cfg, llm())
    elif kind in ("hf", "lavis"):
        if cfg.stage == 2 and cfg.llm and "llm" in cli:
            raise UserError(f"--llm {cfg.llm}: --init-from {cfg.init_from} holds its own language model")
        model = (BLIP2.from_hf(cfg.init_from, cfg, tokenizer) if kind == "hf" else
                 BLIP2.from_lavis(cfg.init_from, cfg, tokenizer, state=saved))
        for k in MODEL_FIELDS + ("llm",):
            setattr(cfg, k, getattr(model.cfg, k))
        if kind == "hf":
            cfg.vision_weights = cfg.vision_weights or cfg.init_from
            if cfg.vision_weights != cfg.init_from:
                load_vision(model, model.cfg)
    elif kind == "ours":
        run = {k: getattr(cfg, k) for k in RUN_FIELDS if k in cli or k in task_recipe(cfg)}
        for k in MODEL_FIELDS + (LLM_FIELDS if cfg.stage == 2 else ()):
            if k not in cli or k not in LLM_FIELDS:      # a moved LM folder may be named again
                setattr(cfg, k, saved["config"][k])
        cfg.__dict__.update(run)
        source = {"vision_weights", "vision_seed"} & cli        # another encoder asked for
        for k in {"vision_weights", "vision_seed"} - source:
            setattr(cfg, k, saved["config"][k])
        model = build_blip2(cfg, tokenizer, llm())
        load_vision(model, cfg)
        load_trainable(model, saved, cfg.init_from, check_vision=not source)
    else:
        model = build_blip2(cfg, tokenizer, llm())
        load_vision(model, cfg)
    if cfg.init_text:
        if cfg.stage == 2:
            raise UserError("--init-text starts stage 1's Q-Former from a BERT; stage 2's starts from stage 1 (--init-from)")
        if kind:
            raise UserError(f"--init-text starts the Q-Former from a BERT; --init-from {cfg.init_from} already holds one")
        load_text_init(model, cfg.init_text)
    model.cfg = cfg
    model.set_frozen(cfg.freeze_vision)
    if cfg.stage == 2:
        if not cfg.llm:      # the tiny random LM knows no language: it trains with the Q-Former (README)
            cfg.freeze_llm = False
        model.set_llm_frozen(cfg.freeze_llm)
    return model, cfg


def load_trainable(model, saved, source, check_vision=True):
    """Our checkpoint's weights (all but a frozen encoder) into `model`; its encoder must be the
    one the checkpoint was trained with (same fingerprint), unless another was asked for."""
    state = dict(saved["model"])
    key = "visual_encoder.positional_embedding"
    if key in state:
        state[key] = resize_pos_embed(state[key], model.cfg.image_size // model.cfg.patch_size)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(("visual_encoder.", "language_model."))]
    if missing or unexpected:
        raise UserError(f"{source}: keys {(missing or unexpected)[:4]} do not match this model")
    model.vision_from_checkpoint = any(k.startswith("visual_encoder.") for k in state)
    if model.cfg.stage == 2:
        model.llm_from_checkpoint = any(k.startswith("language_model.") for k in state)
        if not model.llm_from_checkpoint and saved.get("llm_fingerprint"):
            now = fingerprint(model.language_model)
            if abs(now - saved["llm_fingerprint"]) > 1e-6 * abs(saved["llm_fingerprint"]):
                raise UserError(f"{source}: the language model rebuilt from {model.cfg.llm} is not the one this "
                                f"checkpoint was trained with (fingerprint {now:.6g} vs {saved['llm_fingerprint']:.6g})")
    if check_vision and not any(k.startswith("visual_encoder.") for k in state) and saved.get("vision_fingerprint"):
        now = fingerprint(model.visual_encoder)
        if abs(now - saved["vision_fingerprint"]) > 1e-6 * abs(saved["vision_fingerprint"]):
            hint = ("" if model.cfg.vision_weights else
                    f"; a random encoder is its seed at one image size ({saved['config']['image_size']} px here)")
            raise UserError(f"{source}: the frozen image encoder rebuilt from {model.cfg.vision_weights or 'its seed'} "
                            f"is not the one this checkpoint was trained with (fingerprint {now:.6g} vs "
                            f"{saved['vision_fingerprint']:.6g}){hint}")


def param_groups(model, cfg):
    """AdamW groups: no decay on biases and tensors of fewer than 2 dimensions (LayerNorms, the 0-d
    temp; as LAVIS 1.0.2's runner); a trained encoder's layer i gets lr x layer_decay^(L + 1 - i)
    (LAVIS's get_optimizer_params: embeddings as layer 0)."""
    L, groups = cfg.vision_layers, {}
    for name, p in dist.named_parameters(model):       # the unwrapped order (FSDP re-registers)
        if not p.requires_grad:
            continue
        decay = p.ndim >= 2 and not name.endswith(".bias")
        scale = 1.0
        if name.startswith("visual_encoder."):
            layer = int(name.split(".")[3]) + 1 if ".resblocks." in name else 0
            scale = cfg.layer_decay ** (L + 1 - layer)
        group = groups.setdefault((decay, scale), {"params": [], "weight_decay": cfg.weight_decay if decay else 0.0,
                                                   "lr": cfg.lr * scale})
        group["params"].append(p)
    return list(groups.values())


def main(argv=None):
    rank, local_rank, world_size, device = dist.setup()
    cfg, ckpt = resolve_config(Config, PRESETS, argv, description=__doc__, recipe=task_recipe, recipes_doc=RECIPES_DOC,
                               choices={"task": TASKS, "vision": ("eva", "clip-l"), "stage": (1, 2)},
                               resume_mutable=("k_test", "itm_batch", "vision_weights"))
    if cfg.vision == "clip-l":
        cfg.__dict__.update(CLIP_L)
    check_config(cfg)
    precision = resolve_precision(cfg.precision, device)
    seed_everything(cfg.seed)                     # the same initial weights on every rank
    os.makedirs(cfg.output_dir, exist_ok=True)
    init = read_init(cfg.init_from) if cfg.init_from else (None, None)
    tokenizer = llm_tokenizer = None
    if cfg.stage == 1:
        if init[0] == "ours":
            cfg.tokenizer = cfg.tokenizer or init[1]["config"]["tokenizer"]
        # a retrieval folder's tokenizer is the Q-Former's (BERT + [DEC]); a ConditionalGeneration
        # folder's is its language model's, which the Q-Former cannot read: --tokenizer then
        qformer_folder = init[0] == "hf" and (init[1].get("qformer_config") or {}).get("use_qformer_text_input")
        tokenizer = load_tokenizer(cfg.tokenizer, cfg.init_text or (cfg.init_from if qformer_folder else ""),
                                   use_tiny=not (cfg.train_data or cfg.val_data))
        cfg.tokenizer = tokenizer.name
    else:   # stage 2's Q-Former reads no text; the LM's tokenizer
        if init[0] == "ours" and init_stage(*init) == 2:
            for k in ("llm", "llm_tokenizer"):
                if k not in getattr(cfg, "cli_keys", ()):
                    setattr(cfg, k, init[1]["config"][k])
        llm_tokenizer = load_llm_tokenizer(cfg, cfg.init_from if init[0] == "hf" and init_stage(*init) == 2 else "")
        cfg.llm_tokenizer = llm_tokenizer.name_or_path
    model, cfg = build_model(cfg, tokenizer, init, llm_tokenizer)   # a resumed run: its encoder source (resolve_config
                                                                    # cleared --init-from), then its weights below
    del init
    if not cfg.vision_weights and cfg.preset != "tiny" and dist.is_main():
        print(f"warning: no --vision-weights: the frozen {cfg.vision} encoder is random (seed {cfg.vision_seed})")
    vision_fingerprint = None if cfg.eval_only else fingerprint(model.visual_encoder)   # for our checkpoints
    llm_fingerprint = (fingerprint(model.language_model) if cfg.stage == 2 and cfg.llm and not cfg.eval_only
                       else None)
    if ckpt:
        load_trainable(model, ckpt, cfg.resume)
    model.to(device)
    half = torch.bfloat16 if precision == "bf16" else torch.float16
    if model.vision_frozen and device.type == "cuda" and precision != "fp32":
        # Sec. 3.1: the frozen encoder in half precision on GPU (LAVIS: fp16); ln_vision stays fp32
        model.visual_encoder.to(half)
    if cfg.stage == 2 and model.llm_frozen and device.type == "cuda" and precision != "fp32":
        # Sec. 3.3: the frozen LM in bf16 (fp16 on GPUs without it: --precision auto picks)
        model.language_model.to(half)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing()
    if cfg.stage == 1:
        loader, sampler, val = build_data(cfg, tokenizer, rank, world_size)
        vqa = None

        def evaluate_run():
            return evaluate(model, cfg, val, tokenizer, device, precision)
    else:
        loader, sampler, val, vqa = build_data_stage2(cfg, llm_tokenizer, model.decoder_only, rank, world_size)

        def evaluate_run():
            return evaluate_stage2(model, cfg, val, vqa, llm_tokenizer, device, precision)
    save_config(cfg, cfg.output_dir)
    log = MetricLog(cfg.output_dir, cfg.report_to, dataclasses.asdict(cfg), project="blip2",
                    resumed=ckpt is not None)
    if cfg.eval_only:
        metrics = evaluate_run()
        log.write({"step": ckpt["step"] if ckpt else 0, "epoch": 0, "split": "val", **metrics})
        if dist.is_main():
            print(json.dumps(metrics))
        dist.cleanup()
        return metrics

    # DDP, or FSDP2 (--fsdp) sharding each block of the encoder (frozen: without gradients), of the
    # Q-Former and of a trained LM, then the rest; a frozen LM is not sharded
    keep = set(model.trainable_state_dict())       # what the checkpoints hold
    lm_trains = cfg.stage == 2 and not model.llm_frozen
    if lm_trains:
        from transformers.modeling_layers import GradientCheckpointingLayer
    ddp_model = dist.parallelize(model, cfg.fsdp, device,
                                 (Block, QFormerLayer) + ((GradientCheckpointingLayer,) if lm_trains else ()),
                                 precision_dtype(precision),
                                 unsharded=[model.language_model] if cfg.stage == 2 and not lm_trains else [],
                                 methods=("itc_features",))            # --accum-steps' feature cache calls it
    if cfg.compile:
        ddp_model = torch.compile(ddp_model)
    groups = param_groups(model, cfg)
    optimizer = adamw(groups, lr=cfg.lr)
    steps_per_epoch = len(loader) // cfg.accum_steps
    check_resume_position(ckpt, steps_per_epoch)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    # Warm-up from warmup_lr, then cosine to min_lr, per step (LAVIS: warm-up over the first
    # steps of epoch 0, then a per-epoch cosine), each group from its own (layer-decayed) lr.
    scheduler = cosine_schedule(optimizer, cfg.warmup_steps, total_steps,
                                warmup_from=cfg.warmup_lr / cfg.lr if cfg.warmup_lr else None, final=cfg.min_lr / cfg.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    guard = NonFiniteGuard(cfg.max_bad_steps)
    seed_everything(cfg.seed + rank)              # each rank its own stream from here (negatives, dropout)
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
        state = {"model": dist.full_state_dict(model, keep), "optimizer": dist.optimizer_state_dict(model, optimizer),
                 "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "step": step,
                 "epoch": step // steps_per_epoch, "best": best,
                 **guard.state_dict(), "evaluated": evaluated,
                 "steps_per_epoch": steps_per_epoch, "world_size": world_size, "config": dataclasses.asdict(cfg),
                 "vision_fingerprint": vision_fingerprint, "llm_fingerprint": llm_fingerprint,
                 "rng": dist.gather_objects(rng_state()),
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
                micro, tokens = [], 0
                for batch in group:
                    if cfg.stage == 1:
                        images, ids, idx = batch
                        ids = trim_padding(ids, tokenizer.pad_id) if not cfg.compile else ids
                        tokens += int((ids[:, 1:] != tokenizer.pad_id).sum())      # ITG's targets
                        images, ids = images.to(device, non_blocking=True), ids.to(device, non_blocking=True)
                        idx = idx.to(device, non_blocking=True)                  # image ids: positives share one
                        mask = (ids != tokenizer.pad_id).long()
                        micro.append(dict(images=images, ids=ids, mask=mask, idx=idx, task=cfg.task))
                    else:   # padded to the batch's longest text by collate_llm
                        tokens += int((batch[3] != -100).sum())          # the LM's targets
                        images, ids, mask, labels = (x.to(device, non_blocking=True) for x in batch[:4])
                        micro.append(dict(images=images, ids=ids, mask=mask, labels=labels))
                # --accum-steps K (see forward): ITC over the K micro-batches through the feature
                # cache, the text losses over the step's tokens, ITM the micro-batches' mean
                count = dist.all_reduce_sum(torch.tensor(float(tokens), device=device))

                def features(b):     # under the live pass's autocast: the cache holds its features
                    with autocast(precision, device):
                        feats = model.itc_features(b["images"], b["ids"], b["mask"])
                    return {**feats, "idx": b["idx"]}
                cache = FeatureCache(features if cfg.stage == 1 else None, micro)
                parts = []
                for j, inputs in enumerate(micro):
                    with cache.replay(j), sync_gradients(ddp_model, j == len(micro) - 1):
                        with autocast(precision, device):
                            losses = ddp_model(**inputs, cache=cache, j=j, count=count)
                        # stage 1: L_itc + L_itm + L_itg (LAVIS: unweighted); ITM the micro-batches' mean
                        loss = sum(v / len(micro) if k == "loss_itm" else v for k, v in losses.items())
                        scaler.scale(loss).backward()
                    parts.append(losses)
                losses = {"loss_lm": sum(p["loss_lm"] for p in parts)}                 # parts of the step's mean
                if cfg.stage == 1:
                    losses = {"loss_itc": parts[-1]["loss_itc"],                        # the step's, in every pass
                              "loss_itm": sum(p["loss_itm"] for p in parts) / len(parts), **losses}
                loss = sum(losses.values())
                inputs = micro[-1]
                scaler.unscale_(optimizer)
                grad_norm = grad_norm_(model, cfg.grad_clip_norm)
                ok = guard.check(loss, grad_norm, scaler)        # a non-finite step is skipped on the device
                guard.step(optimizer, scaler, ok)
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                step += 1
                pbar.update(1)
                guard.account(step, ok, lambda b=inputs: first_nonfinite_module(
                    model, {"images": b["images"]}, lambda: model(**b)))
                if step % cfg.log_every == 0 or step == total_steps:
                    values = {k: dist.all_reduce_mean(v).item() for k, v in {"loss": loss, **losses}.items()}
                    speed = (step - tick_step) * cfg.accum_steps * cfg.batch_size * world_size / (time.time() - tick)
                    tick, tick_step = time.time(), step
                    lr = max(g["lr"] for g in optimizer.param_groups)       # the Q-Former's
                    pbar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.2e}", samples_s=f"{speed:.0f}")
                    extra = {"temp": dist.value(model.temp).item()} if cfg.stage == 1 else {}
                    log.write({"step": step, "epoch": epoch, "split": "train", **values, "lr": lr, **extra,
                               "samples_per_s": speed, "grad_norm": grad_norm.item(), "bad_steps": guard.total,
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
                metrics = evaluate_run()
            log.write({"step": step, "epoch": epoch, "split": "val", **metrics})
            if metrics and dist.is_main():
                tqdm.write(f"epoch {epoch} step {step}: " + " ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
            key = "r_mean" if cfg.stage == 1 else "cider" if "cider" in metrics else "vqa_acc"
            if dist.gather_objects(metrics.get(key, -1.0) > best)[0]:   # rank 0 decides for all
                best = metrics[key]
                checkpoint("checkpoint_best.pt")
            evaluated = step
            checkpoint("checkpoint_last.pt")
            stopped = preemption.stop(step, cfg.output_dir)   # a signal during the evaluation
            tick, tick_step = time.time(), step
    pbar.close()
    if not metrics and not stopped:   # resumed a finished run: evaluate its weights again
        with dist.full_parameters(model):
            metrics = evaluate_run()
    if dist.is_main():
        print(json.dumps(metrics or {"step": step}))
    dist.cleanup()
    return metrics


if __name__ == "__main__":
    cli(main)
