"""CoCa: Contrastive Captioners (Yu et al. 2022, arXiv:2205.01917). One image-text model trained
with two losses at once (Sec. 3.1-3.2, Fig. 1-2): a contrastive loss between a pooled image
embedding and a text embedding, as CLIP, and a captioning loss, as SimVLM. The text side is one
decoder cut in two: a unimodal half without cross-attention encodes the caption alone and
yields the text embedding (a CLS token appended after the caption), and a multimodal half
cross-attends to the image and predicts the caption token by token. Attentional poolers (learned
queries cross-attending to the ViT's tokens) turn the image into one contrastive embedding and a
set of tokens for the decoder.

The layout is open_clip's `coca_ViT-B-32` / `coca_ViT-L-14`, so its published weights load
unchanged (`CoCa.from_open_clip`); where open_clip differs from the paper (one pooler, two
decoder stacks) the comments say so, and `--pooler paper` gives the paper's two poolers.

    python coca_train.py                                               # tiny built-in data, CPU, a few minutes
    torchrun --nproc_per_node 8 coca_train.py --preset coca-vit-b-32 \\
        --train-data train.json --val-data coco_val.json --zeroshot-data imagenet/val --output-dir runs/coca
    python coca_train.py --preset coca-vit-b-32 --task caption --init-from CoCa-ViT-B-32-laion2B-s13B-b90k/ \\
        --train-data coco_train.json --val-data coco_val.json             # open_clip's COCO caption fine-tuning
    python coca_train.py --preset coca-vit-b-32 --init-from open_clip_pytorch_model.bin --eval-only \\
        --val-data coco_test.json                                         # zero-shot retrieval + captions
"""
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as grad_checkpoint
from tqdm import tqdm

from common import dist
from common.data import (Example, ImageDataset, eval_transform, image_folder, open_clip_cleaner,
                         load_tokenizer, read_annotations, retrieval_texts, tiny_data, train_loader,
                         train_transform, training_records)
from common.encoders import (Attention, Block, KVCache, MLP, TextTransformer, VisionTransformer, blocks_map,
                             load_mapped, open_clip_blocks_map, open_clip_cross_attention_map, open_clip_vision_map,
                             read_weights_file, split_mha_in_proj)
from common.generation import beam_search, greedy_or_sample
from common.metrics import (caption_metrics, embed_texts, retrieval_metrics, zeroshot_classifier_sharded,
                            zeroshot_metrics)
from common.utils import (FeatureCache, MetricLog, MissingFileError, NonFiniteGuard, Preemption,
                          UserError, adamw, autocast, check_finite, check_resume_position, cli,
                          cosine_schedule, evaluation_pending, first_nonfinite_module, grad_norm_,
                          ignore_preemption_signals, load_checkpoint, load_scaler_state,
                          micro_batches, param_groups, precision_dtype, resolve_config,
                          resolve_precision, rng_state, save_checkpoint, save_config,
                          seed_everything, set_rng_state, sync_gradients)


# ---- config ----

@dataclass
class Config:
    preset: str = "tiny"            # tiny (the built-in data, CPU) or an open_clip configuration; see the list below
    task: str = "pretrain"          # pretrain (contrastive + captioning) | caption (captioning only: fine-tuning)
    # image encoder: CLIP's ViT (pre-norm, GELU), no final norm (the pooler normalises its keys)
    image_size: int = 64            # pixels (224 in open_clip's models)
    patch_size: int = 8             # pixels per patch side
    vision_width: int = 128         # ViT width
    vision_layers: int = 4          # ViT blocks
    vision_heads: int = 2           # ViT attention heads (width / 64)
    # attentional pooling (Sec. 3.2, "Attentional Poolers")
    pooler: str = "open_clip"       # open_clip: one pooler, query 0 is the contrastive embedding, the other
                                    # n_queries - 1 go to the decoder (the published weights) | paper: a 1-query
                                    # contrastive pooler beside an n_queries captioning pooler
    n_queries: int = 32             # learned queries of the (captioning) pooler; 256 in the paper and open_clip
    pooler_heads: int = 2           # 8 in open_clip
    # text: the unimodal decoder (CLIP's causal text transformer + an appended CLS) and the multimodal one
    text_width: int = 96            # width of both text decoders
    text_layers: int = 3            # unimodal decoder blocks (12)
    text_heads: int = 2             # attention heads of both text decoders (8 for B/32, 12 for L/14)
    decoder_layers: int = 3         # multimodal decoder layers, each causal self-attention then cross-attention (12)
    context_length: int = 32        # caption tokens, [SOT] and [EOT] included; the CLS takes one more position (76)
    vocab_size: int = 0             # 0: the tokenizer's
    pad_id: int = -1                # -1: the tokenizer's, or 0 where it pads with [EOT] (open_clip pads CLIP BPE with 0)
    embed_dim: int = 96             # contrastive space, and the width of the pooled image tokens the decoder reads
    cls_mask: str = "correct"       # correct: the CLS sees every caption token and itself, no padding | legacy:
                                    # the mask open_clip's published weights were trained with
    mlp_ratio: float = 4.0          # MLP hidden width / width
    act: str = "gelu"               # open_clip's CoCa models use GELU; quick_gelu for OpenAI-style towers
    layer_norm_eps: float = 1e-5    # LayerNorm epsilon
    # losses (open_clip: --coca-contrastive-loss-weight 1, --coca-caption-loss-weight 2)
    contrastive_weight: float = 1.0  # lambda_Con (Sec. 3.2); 0 in caption fine-tuning
    caption_weight: float = 2.0     # lambda_Cap
    # captioning (open_clip generate: beam search, 6 beams, 30 tokens at most, 5 at least, [SOT] counted)
    num_beams: int = 6              # beam search width; 1: greedy
    max_gen_length: int = 30        # tokens including [SOT]
    min_gen_length: int = 5         # tokens including [SOT]
    sample: bool = False            # nucleus sampling (--top-p) instead of beam search for the evaluation captions
    top_p: float = 0.9              # nucleus sampling mass
    # data
    train_data: str = ""            # annotation file (JSON or CSV), or webdataset shards such as
                                    # "shards/{00000..00999}.tar" (sources joined with ::); empty: tiny
    val_data: str = ""              # retrieval + captioning split; empty with tiny: its val split
    image_root: str = ""            # folder relative image paths start from (default: the file's)
    zeroshot_data: str = ""         # image folder root/<class>/*; empty with tiny: its zero-shot set
    tokenizer: str = ""             # transformers tokenizer folder or name; empty: tiny's / the preset's
    text_clean: str = "lower"       # open_clip's text clean-up: lower (its CLIP BPE), whitespace (its HF
                                    # tokenizers: ftfy, HTML and whitespace, case kept)
    skip_bad: bool = False          # skip (and count) unreadable images and empty captions
    train_num_samples: int = 0      # shards: samples per epoch; 0: the sizes.json beside the shards
    dataset_resampled: bool = False  # shards: draw them with replacement (open_clip's flag)
    workers: int = 2                # data-loading processes per rank
    # optimisation (open_clip params.py, as CLIP)
    epochs: int = 2                 # passes over the training data
    max_steps: int = 0              # >0: train exactly this many steps (overrides epochs)
    batch_size: int = 64            # per process; the contrastive batch is batch_size * accum_steps * world_size
    accum_steps: int = 1            # micro-batches per optimizer step (open_clip's accum_freq feature cache)
    lr: float = 5e-4                # peak learning rate (after warm-up)
    weight_decay: float = 0.2       # AdamW decoupled weight decay (0.1 for caption fine-tuning)
    beta1: float = 0.9              # AdamW beta1
    beta2: float = 0.98             # AdamW beta2
    eps: float = 1e-6               # AdamW epsilon
    warmup_steps: int = 50          # linear warm-up steps, then cosine to 0
    grad_clip_norm: float = 0.0     # 0: off
    seed: int = 0                   # weights start from `seed` on every rank; rank r trains with seed + r
    precision: str = "auto"         # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16 (GradScaler)
    max_bad_steps: int = 10         # abort after this many non-finite steps in a row (each one is skipped)
    grad_checkpointing: bool = False  # recompute activations in backward (less memory, ~1/3 more compute)
    fsdp: bool = False              # shard weights, gradients and AdamW state over the ranks (FSDP2), not DDP
    compile: bool = False           # torch.compile the model
    # run
    output_dir: str = "runs/coca"   # metrics.jsonl, config.json, checkpoints and captions.json go here
    resume: str = ""                # checkpoint path, or "auto": output_dir/checkpoint_last.pt if present.
                                    # A resumed run keeps its checkpoint's config (see resolve_config)
    init_from: str = ""             # open_clip weights (open_clip_pytorch_model.bin / open_clip_model.safetensors,
                                    # or the hub folder holding one), or one of our checkpoints
    eval_only: bool = False         # evaluate the --init-from / --resume weights and exit
    save_every: int = 1000          # steps between checkpoint_last.pt saves (and at every epoch end)
    log_every: int = 10             # steps between train records in metrics.jsonl
    report_to: str = ""             # also send those records to "tensorboard", "wandb" or "tensorboard,wandb"


# open_clip's model_configs/coca_ViT-B-32.json and coca_ViT-L-14.json, with CLIP's recipe
_OPEN_CLIP = dict(image_size=224, n_queries=256, pooler_heads=8, text_layers=12, decoder_layers=12, context_length=76,
                  vocab_size=49408, tokenizer="openai/clip-vit-base-patch32", epochs=32, warmup_steps=10000, workers=8)
PRESETS = {
    "tiny": {},
    "coca-vit-b-32": dict(_OPEN_CLIP, patch_size=32, vision_width=768, vision_layers=12, vision_heads=12,
                          text_width=512, text_heads=8, embed_dim=512, batch_size=128),
    "coca-vit-l-14": dict(_OPEN_CLIP, patch_size=14, vision_width=1024, vision_layers=24, vision_heads=16,
                          text_width=768, text_heads=12, embed_dim=768, batch_size=64, grad_checkpointing=True),
}
TASKS = ("pretrain", "caption")
# Caption fine-tuning (open_clip README, "Fine-tuning CoCa"): the captioning loss alone. On a
# paper preset also its recipe: lr 1e-5, wd 0.1, batch 128, warm-up 1,000, one epoch.
CAPTION_RECIPE = dict(contrastive_weight=0.0, caption_weight=1.0)
CAPTION_FINETUNE = dict(lr=1e-5, weight_decay=0.1, warmup_steps=1000, batch_size=128, epochs=1)


def task_recipe(cfg):
    """Step 3 of resolve_config: the fields --task caption sets unless the command line does."""
    if cfg.task != "caption":
        return {}
    return CAPTION_RECIPE if cfg.preset == "tiny" else {**CAPTION_RECIPE, **CAPTION_FINETUNE}


RECIPES_DOC = ("task recipe (--task caption; the command line overrides it): "
               + ", ".join(f"{k}={v}" for k, v in CAPTION_RECIPE.items()) + "; with an open_clip preset also "
               + ", ".join(f"{k}={v}" for k, v in CAPTION_FINETUNE.items()))
MODEL_FIELDS = ("image_size", "patch_size", "vision_width", "vision_layers", "vision_heads", "pooler", "n_queries",
                "pooler_heads", "text_width", "text_layers", "text_heads", "decoder_layers", "context_length",
                "vocab_size", "pad_id", "embed_dim", "cls_mask", "mlp_ratio", "act", "layer_norm_eps")


# ---- model ----

class AttentionalPooler(nn.Module):
    """Sec. 3.2: n learned queries attend to the encoder's tokens (multi-head attention, Lee et al.
    2019), a LayerNorm on the queries and one on the keys (open_clip's `ln_q`, `ln_k`). The keys
    and values come from the ViT's width, the queries live in the output width; so q projects
    (D, D) and k, v project (Dv, D) (separate q/k/v weights in open_clip's file when D != Dv).

    The queries are the same for every image: their projection is computed once per batch, not
    once per image as nn.MultiheadAttention does on expanded queries."""

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
        for lin in (self.q, self.kv):          # nn.MultiheadAttention's init: xavier in-projections, zero biases
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x):                                              # (B, S, Dv) -> (B, n, D)
        B, S, _ = x.shape
        n, D = self.query.shape
        H = self.heads
        q = self.q(self.ln_q(self.query)).view(n, H, D // H).transpose(0, 1)      # (H, n, D/H), once
        k, v = self.kv(self.ln_k(x)).view(B, S, 2, H, D // H).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q.expand(B, -1, -1, -1).to(k.dtype), k, v)  # (B, H, n, D/H)
        return self.proj(out.transpose(1, 2).reshape(B, n, D))


class CrossAttentionBlock(nn.Module):
    """A multimodal decoder layer's second half (open_clip's cross-attention block): pre-LN
    cross-attention to the image tokens, which get their own LayerNorm (`ln_1_kv`), then an MLP:
    x + attn(ln_1 x, ln_1_kv image), then x + mlp(ln_2 x)."""

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
    """Sec. 3.2, the multimodal text decoder: every layer is a causal self-attention block and a
    cross-attention block, each with its MLP (open_clip's `MultimodalTransformer`: 12 + 12 blocks
    after the 12-block unimodal decoder; the paper splits one 12-layer decoder 6 + 6 and puts
    cross-attention only in the upper half). A final LayerNorm and a projection to the vocabulary,
    not tied to the token embedding."""

    def __init__(self, width, layers, heads, context_dim, vocab_size, mlp_ratio=4.0, act="gelu", eps=1e-5):
        super().__init__()
        self.resblocks = nn.ModuleList(Block(width, heads, mlp_ratio=mlp_ratio, act=act, eps=eps)
                                       for _ in range(layers))
        self.cross_attn = nn.ModuleList(CrossAttentionBlock(width, heads, context_dim, mlp_ratio, act, eps)
                                        for _ in range(layers))
        self.ln_final = nn.LayerNorm(width, eps=eps)
        self.text_projection = nn.Parameter(width ** -0.5 * torch.randn(width, vocab_size))   # x @ P, as open_clip
        self.grad_checkpointing = False
        # CLIP's init, which open_clip meant for this module (its init_parameters is never called)
        attn_std, proj_std, fc_std = width ** -0.5, width ** -0.5 * (2 * layers) ** -0.5, (2 * width) ** -0.5
        for b in list(self.resblocks) + list(self.cross_attn):
            qkv = [b.attn.qkv] if isinstance(b, Block) else [b.attn.q, b.attn.kv]
            for lin, std in [(lin, attn_std) for lin in qkv] + [(b.attn.proj, proj_std), (b.mlp.fc, fc_std),
                                                                  (b.mlp.proj, proj_std)]:
                nn.init.normal_(lin.weight, std=std)
                nn.init.zeros_(lin.bias)

    def forward(self, x, image, caches=None):                        # (B, L, D), (B, N, E) -> (B, L, D)
        """`caches`: the layers' {"self": {}, "cross": {}} dicts of a KVCache (generation), or None."""
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
    """Keys each position of [tokens, CLS] may attend to, on top of the causal mask: the paper's
    "unpad cls_token_id" (Fig. 2). (B, 1, 1, L + 1): with the causal mask, caption tokens only
    ever see earlier caption tokens; the CLS, last, sees every real token and itself but no padding.

    `legacy`, (B, 1, L + 1, L + 1): the mask open_clip's published CoCa weights were trained with
    (`build_cls_mask`, open_clip 76c8f85 to 2025-06; open_clip#549, #1113): the caption rows are
    causal only (a pad id inside a caption, CLIP BPE's "!", stays visible), and the CLS row's
    padding mask has the CLS's entry at the front, so it is shifted by one: the CLS sees the first
    padding token and not itself (when the caption is padded). open_clip >= 3.0 applies that
    shifted row to every row instead."""
    keep = ids != pad_id                                               # (B, L)
    cls = keep.new_ones(keep.shape[0], 1)
    if not legacy:
        return torch.cat([keep, cls], 1)[:, None, None, :]
    rows = keep.new_ones(keep.shape[0], keep.shape[1] + 1, keep.shape[1] + 1)
    rows[:, -1] = torch.cat([cls, keep], 1)                            # the CLS's row only
    return rows[:, None]


def trim_padding(ids, pad_id, multiple=8):
    """Drop the padding columns that no caption reaches, keeping one (the legacy CLS mask reads
    the first padding token) and rounding up to `multiple` (fewer shapes for torch.compile).

    Exact: caption tokens see only earlier tokens, padded targets are ignored, and the CLS takes
    the last position embedding whatever the length, so no output changes; the text towers and
    the vocabulary projection then run on the captions' length instead of the context's (COCO's
    captions are ~15 of open_clip's 76 tokens). On the host, before the copy to the GPU."""
    # the column after each row's last real token (a pad id inside a caption, e.g. CLIP BPE's "!"
    # = 0 in open_clip, does not end it)
    position = torch.arange(1, ids.shape[1] + 1)
    longest = int(((ids != pad_id) * position).max()) if ids.numel() else 0
    keep = min(ids.shape[1], -(-(longest + 1) // multiple) * multiple)
    return ids[:, :keep]


class CoCa(nn.Module):
    """Fig. 2: image encoder + attentional pooling, unimodal text decoder with an appended CLS,
    multimodal text decoder, and a learned temperature. Module names are open_clip's where its
    published file names them (`visual`, `text`, `text_decoder`, `logit_scale`)."""

    def __init__(self, cfg, *, pad_id, eos_id):
        super().__init__()
        self.cfg, self.pad_id = cfg, pad_id
        for name, width, heads in (("vision", cfg.vision_width, cfg.vision_heads), ("text", cfg.text_width, cfg.text_heads),
                                   ("pooler", cfg.embed_dim, cfg.pooler_heads)):
            if heads < 1 or width % heads:
                raise UserError(f"{name} width {width} is not divisible by {heads} heads")
        # Image encoder (Sec. 3.2): all ViT tokens, without a final norm
        self.visual = VisionTransformer(image_size=cfg.image_size, patch_size=cfg.patch_size, width=cfg.vision_width,
                                        layers=cfg.vision_layers, heads=cfg.vision_heads, mlp_ratio=cfg.mlp_ratio,
                                        act=cfg.act, eps=cfg.layer_norm_eps, pre_norm=True, post_norm=False)
        eps = cfg.layer_norm_eps
        self.attn_pool = AttentionalPooler(cfg.embed_dim, cfg.vision_width, cfg.pooler_heads, cfg.n_queries, eps)
        self.ln_post = nn.LayerNorm(cfg.embed_dim, eps=eps)
        if cfg.pooler == "paper":     # a separate single-query pooler for the contrastive embedding
            self.attn_pool_contrastive = AttentionalPooler(cfg.embed_dim, cfg.vision_width, cfg.pooler_heads, 1, eps)
            self.ln_post_contrastive = nn.LayerNorm(cfg.embed_dim, eps=eps)
        elif cfg.pooler != "open_clip":
            raise UserError(f"--pooler must be open_clip or paper, not {cfg.pooler!r}")
        self.proj = nn.Parameter(cfg.vision_width ** -0.5 * torch.randn(cfg.embed_dim, cfg.embed_dim))  # x @ P
        # Unimodal text decoder (Sec. 3.2): CLIP's causal text transformer, one more position for
        # the CLS appended after the caption; its final-norm state, projected, is the text embedding.
        self.text = TextTransformer(vocab_size=cfg.vocab_size, context_length=cfg.context_length + 1,
                                    width=cfg.text_width, layers=cfg.text_layers, heads=cfg.text_heads, eos_id=eos_id,
                                    mlp_ratio=cfg.mlp_ratio, act=cfg.act, eps=cfg.layer_norm_eps)
        self.cls_emb = nn.Parameter(0.01 * torch.randn(cfg.text_width))
        self.text_projection = nn.Parameter(cfg.text_width ** -0.5 * torch.randn(cfg.text_width, cfg.embed_dim))
        # Multimodal text decoder: reads the unimodal token states, cross-attends to the pooled image tokens
        self.text_decoder = MultimodalDecoder(cfg.text_width, cfg.decoder_layers, cfg.text_heads, cfg.embed_dim,
                                              cfg.vocab_size, cfg.mlp_ratio, cfg.act, eps)
        # Temperature as a log-scale, initialised to 1/0.07 (CLIP), clamped at 100 after each step
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def set_grad_checkpointing(self, enabled=True):
        self.visual.transformer.grad_checkpointing = enabled
        self.text.transformer.grad_checkpointing = enabled
        self.text_decoder.grad_checkpointing = enabled

    def image_features(self, images):                  # (B, 3, H, W) -> (B, E) contrastive, (B, N, E) decoder's
        x = self.visual(images)                                         # (B, 1 + P, Dv)
        if self.cfg.pooler == "paper":
            tokens = self.ln_post(self.attn_pool(x))                                          # (B, n, E)
            latent = self.ln_post_contrastive(self.attn_pool_contrastive(x))[:, 0]           # (B, E)
        else:   # open_clip: one pooler; its first query is the contrastive embedding ("does not match paper")
            x = self.ln_post(self.attn_pool(x))                                               # (B, n, E)
            latent, tokens = x[:, 0], x[:, 1:]
        return latent @ self.proj, tokens

    def text_features(self, ids):                      # (B, L) -> (B, E) contrastive, (B, L, D) token states
        """Unimodal text decoder with the CLS appended after the caption (Fig. 2). The CLS always
        takes the last position embedding (open_clip pads every caption to the context, so that is
        where it sits there), which makes trailing padding irrelevant (see trim_padding)."""
        B, L = ids.shape
        if L > self.cfg.context_length:
            raise ValueError(f"text of {L} tokens is longer than the context of {self.cfg.context_length}")
        t = self.text
        x = t.token_embedding(ids) + t.positional_embedding[:L]
        cls = (self.cls_emb + t.positional_embedding[-1]).expand(B, 1, -1)
        x = torch.cat([x, cls], 1)                                                            # (B, L + 1, D)
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
        """Contrastive embeddings (normalised), the logit scale, and the captioning logits: the
        decoder reads tokens [0, L-1) and predicts tokens [1, L) (teacher forcing). `positions`:
        flat indices into the (B, L-1) targets whose logits are wanted (the non-padding ones:
        `caption_positions`); None: all, (B, L-1, V)."""
        image_emb, image_tokens = self.image_features(images)
        text_emb, token_states = self.text_features(ids)
        h = self.text_decoder(token_states[:, :-1], image_tokens)                           # (B, L-1, D)
        if positions is not None:               # project only the positions that have a target
            h = h.flatten(0, 1).index_select(0, positions)                                  # (n, D)
        logits = h @ self.text_decoder.text_projection
        return F.normalize(image_emb, dim=-1), F.normalize(text_emb, dim=-1), self.logit_scale.exp(), logits

    # ---- captioning ----

    def decode(self, ids, image_tokens, cache=None):
        """Next-token logits (B, L, V) of the caption prefix `ids`: the unimodal decoder (no CLS:
        it comes after the caption and a causal token never sees it) and the multimodal decoder.
        With a KVCache, `ids` are the tokens after the cached ones."""
        t = self.text
        offset = cache.length if cache is not None else 0
        if offset + ids.shape[1] > self.cfg.context_length:
            raise ValueError(f"caption of {offset + ids.shape[1]} tokens exceeds the context of "
                             f"{self.cfg.context_length}")
        x = t.token_embedding(ids) + t.positional_embedding[offset: offset + ids.shape[1]]
        n = len(t.transformer.resblocks)
        x = t.transformer(x, causal=True, caches=None if cache is None else [c["self"] for c in cache.layers[:n]])
        h = self.text_decoder(x, image_tokens, caches=None if cache is None else cache.layers[n:])
        if cache is not None:
            cache.length += ids.shape[1]
        return h @ self.text_decoder.text_projection

    @torch.no_grad()
    def generate(self, images, *, sot_id, eos_id, sample=False, num_beams=6, max_length=30, min_length=5,
                 top_p=0.9, top_k=0, repetition_penalty=1.0, image_tokens=None, use_cache=True):
        """Captions (B, T) from [SOT], padded with pad_id after [EOT]: beam search, greedy
        (num_beams=1) or nucleus sampling, with common/generation.py. Lengths count [SOT], as
        open_clip's `seq_len` and `min_seq_len`.

        With `use_cache` each step feeds only the new token: both decoders keep their earlier
        tokens' self-attention keys and values, and the image's cross-attention keys and values are
        projected once per image and shared by its beams. `use_cache=False` recomputes the prefix."""
        if image_tokens is None:
            image_tokens = self.image_features(images)[1]
        B = image_tokens.shape[0]
        prompt = torch.full((B, 1), sot_id, dtype=torch.long, device=image_tokens.device)
        if use_cache:
            def step(tokens, cache):
                return self.decode(tokens, image_tokens, cache)[:, -1].float(), cache
            cache, reorder = KVCache(len(self.text.transformer.resblocks) + len(self.text_decoder.resblocks)), None
        else:
            def step(tokens, seqs):                                       # the cache is the token history
                seqs = tokens if seqs is None else torch.cat([seqs, tokens], 1)
                context = image_tokens.repeat_interleave(seqs.shape[0] // B, 0)           # beams: (B*K, ...)
                return self.decode(seqs, context)[:, -1].float(), seqs
            cache, reorder = None, (lambda seqs, index: seqs[index])
        lengths = dict(max_length=max_length, min_length=min_length, eos_id=eos_id, pad_id=self.pad_id,
                       repetition_penalty=repetition_penalty)
        if sample or num_beams == 1:
            return greedy_or_sample(step, prompt, cache, sample=sample, top_p=top_p, top_k=top_k, **lengths)
        return beam_search(step, prompt, cache, reorder, num_beams=num_beams, **lengths)

    # ---- open_clip's weights ----

    @classmethod
    def from_open_clip(cls, path, config=None, *, pad_id=0, eos_id=49407, cls_mask="legacy", state=None):
        """Build from open_clip's published CoCa weights: `path` is `open_clip_pytorch_model.bin`,
        `open_clip_model.safetensors`, or the hub folder holding one (a flat state dict; a
        {'state_dict': ...} wrapper and `module.` prefixes are removed). `config`: a preset name
        (coca-vit-b-32, coca-vit-l-14), an open_clip model config JSON (or a hub
        `open_clip_config.json`), or None: the folder's `open_clip_config.json`, else the widths,
        depths and lengths read off the weights with open_clip's default heads (width / 64, 8 in
        the pooler). Every key is mapped and shape-checked; a missing or unused key is an error
        naming it. `cls_mask`: "legacy" by default, the mask these weights were trained with.
        `state`: the file's state dict when the caller has read it already."""
        state = state if state is not None else read_open_clip_state(path)
        cfg = open_clip_architecture(state, config, path)
        cfg.pad_id, cfg.cls_mask = pad_id, cls_mask
        model = cls(cfg, pad_id=pad_id, eos_id=eos_id)
        E, Lv, Lt, Ld = cfg.embed_dim, cfg.vision_layers, cfg.text_layers, cfg.decoder_layers
        state = split_mha_in_proj(state, "visual.attn_pool.attn", E)
        for i in range(Ld):
            state = split_mha_in_proj(state, f"text_decoder.cross_attn.{i}.attn", cfg.text_width)
        m = {"logit_scale": "logit_scale", "proj": "visual.proj", "attn_pool.query": "visual.attn_pool.query",
             "cls_emb": "text.cls_emb", "text_projection": "text.text_projection",
             "text.token_embedding.weight": "text.token_embedding.weight",
             "text.positional_embedding": "text.positional_embedding",
             "text_decoder.text_projection": "text_decoder.text_projection",
             **open_clip_vision_map("visual", "visual", Lv),
             **open_clip_cross_attention_map("attn_pool", "visual.attn_pool.attn"),
             **open_clip_blocks_map("text.transformer", "text.transformer", Lt),
             **open_clip_blocks_map("text_decoder", "text_decoder", Ld)}
        for p in ("weight", "bias"):
            m.update({f"attn_pool.ln_q.{p}": f"visual.attn_pool.ln_q.{p}", f"attn_pool.ln_k.{p}": f"visual.attn_pool.ln_k.{p}",
                      f"ln_post.{p}": f"visual.ln_post.{p}", f"text.ln_final.{p}": f"text.ln_final.{p}",
                      f"text_decoder.ln_final.{p}": f"text_decoder.ln_final.{p}"})
        # the decoder's cross-attention blocks (their q / kv split by split_mha_in_proj above)
        m.update(blocks_map("text_decoder.cross_attn", "text_decoder.cross_attn.{}", Ld, {
            "ln_1": "ln_1", "ln_1_kv": "ln_1_kv", "attn.q": "attn.in_proj[q]", "attn.kv": "attn.in_proj[kv]",
            "attn.proj": "attn.out_proj", "ln_2": "ln_2", "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"}))
        load_mapped(model, state, m, source=path)
        return model


OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def read_open_clip_state(path, saved=None):
    """open_clip's state dict from a file or a hub folder (safetensors first, as open_clip), its
    {'state_dict': ...} wrapper and `module.` prefixes (DDP-saved files) removed. `saved`: the
    file's contents when already loaded."""
    if os.path.isdir(path):
        files = [os.path.join(path, f) for f in OPEN_CLIP_FILES if os.path.isfile(os.path.join(path, f))]
        if not files:
            raise MissingFileError(f"{path}: no {' or '.join(OPEN_CLIP_FILES)}")
        path = files[0]
    if saved is None:
        saved = read_weights_file(path)[0]
    if isinstance(saved, dict) and isinstance(saved.get("state_dict"), dict):
        saved = saved["state_dict"]
    if not isinstance(saved, dict) or not all(torch.is_tensor(v) for v in saved.values()):
        raise UserError(f"{path}: not a flat state dict of tensors (open_clip's weights file)")
    return {k.removeprefix("module."): v for k, v in saved.items()}


def open_clip_architecture(state, config, path):
    """A Config for open_clip weights: widths, depths, lengths and sizes from the tensors' shapes,
    heads (and the activation) from `config` (see CoCa.from_open_clip); a config that disagrees
    with the weights is an error naming the field."""
    if any(k.startswith("visual.attn_pool_contrastive.") for k in state):
        raise UserError(f"{path}: open_clip's 'parallel'/'cascade' poolers (unfinished upstream) are not supported; "
                        f"only the default single pooler")
    for key in ("visual.conv1.weight", "visual.attn_pool.query", "text.token_embedding.weight", "text.cls_emb",
                "text_decoder.text_projection"):
        if key not in state:
            raise UserError(f"{path}: no '{key}': not open_clip CoCa weights (keys start {sorted(state)[:3]})")

    def depth(prefix):
        return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})

    conv = state["visual.conv1.weight"]
    grid = math.isqrt(state["visual.positional_embedding"].shape[0] - 1)
    cfg = Config(preset="open_clip", image_size=grid * conv.shape[-1], patch_size=conv.shape[-1],
                 vision_width=conv.shape[0], vision_layers=depth("visual.transformer.resblocks."),
                 n_queries=state["visual.attn_pool.query"].shape[0], text_width=state["text.cls_emb"].shape[0],
                 text_layers=depth("text.transformer.resblocks."), decoder_layers=depth("text_decoder.resblocks."),
                 context_length=state["text.positional_embedding"].shape[0] - 1,
                 vocab_size=state["text.token_embedding.weight"].shape[0], embed_dim=state["visual.proj"].shape[1],
                 mlp_ratio=state["text.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / state["text.cls_emb"].shape[0])
    # open_clip's defaults where no config names the heads: width / 64 (head_width), 8 in the pooler
    cfg.vision_heads, cfg.text_heads, cfg.pooler_heads = max(1, cfg.vision_width // 64), max(1, cfg.text_width // 64), 8
    model_cfg = None
    if config in PRESETS and config != "tiny":
        model_cfg = PRESETS[config]
        heads = {k: model_cfg[k] for k in ("vision_heads", "text_heads", "pooler_heads")}
        read = {k: model_cfg[k] for k in ("vision_width", "text_width", "embed_dim", "patch_size") if k in model_cfg}
    else:
        file = config or (os.path.join(path, "open_clip_config.json") if os.path.isdir(path) else None)
        if config and not os.path.isfile(config):
            raise UserError(f"open_clip config {config!r} is neither a preset ({', '.join(PRESETS)}) nor a file")
        if file and os.path.isfile(file):
            with open(file) as f:
                model_cfg = json.load(f)
            model_cfg = model_cfg.get("model_cfg", model_cfg)          # hub open_clip_config.json wraps it
            v, t, mm = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {}), model_cfg.get("multimodal_cfg", {})
            heads = {"vision_heads": v.get("width", cfg.vision_width) // v.get("head_width", 64),
                     "text_heads": t.get("heads", 8), "pooler_heads": v.get("attn_pooler_heads", 8)}
            if mm and mm.get("heads", 8) != heads["text_heads"]:
                raise UserError(f"{file}: multimodal heads {mm.get('heads', 8)} differ from text heads "
                                f"{heads['text_heads']}: not supported")
            read = {"vision_width": v.get("width"), "text_width": t.get("width"), "embed_dim": model_cfg.get("embed_dim"),
                    "patch_size": v.get("patch_size")}
            read = {k: x for k, x in read.items() if x is not None}
            if model_cfg.get("quick_gelu"):
                cfg.act = "quick_gelu"
        else:
            heads, read = {}, {}
    for k, x in read.items():
        if getattr(cfg, k) != x:
            raise UserError(f"{path}: the weights have {k} {getattr(cfg, k)}, the config {config or file} says {x}")
    for k, x in heads.items():
        setattr(cfg, k, x)
    return cfg


# ---- losses ----

def contrastive_loss(image_emb, text_emb, logit_scale):
    """Sec. 3.2, L_Con: symmetric InfoNCE between the pooled image embedding and the CLS text
    embedding, with negatives from every rank (as clip_train.py): each rank scores its B images
    against all N gathered texts and its B texts against all N images, labels offset by rank*B.
    The gather carries gradient, so with DDP's average the gradient is that of the loss over the
    whole N x N matrix (open_clip's local_loss + gather_with_grad). CoCa-pytorch#20: labels must
    be offset by the rank, not arange(B) against the gathered matrix."""
    all_images = dist.gather_with_grad(image_emb)                   # (N, E)
    all_texts = dist.gather_with_grad(text_emb)                     # (N, E)
    logits_per_image = logit_scale * image_emb @ all_texts.T        # (B, N)
    logits_per_text = logit_scale * text_emb @ all_images.T         # (B, N)
    B = image_emb.shape[0]
    labels = torch.arange(B, device=image_emb.device) + B * dist.rank()
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def caption_positions(ids, pad_id):
    """Flat indices into the (B, L-1) teacher-forcing targets ids[:, 1:] that are not padding, and
    their targets (open_clip#316: CLIP BPE pads with 0, so padding is 0, not -100). Host tensors:
    computed before the copy to the GPU, so that selecting them needs no device sync."""
    targets = ids[:, 1:].reshape(-1)
    positions = (targets != pad_id).nonzero()[:, 0]
    return positions, targets[positions]


def caption_loss(logits, targets, device, count=None):
    """Sec. 3.2, L_Cap: token cross-entropy of the next caption token (logits (n, V) at the
    non-padding positions). Averaged over the caption tokens of the whole global batch: each rank
    divides its sum by the global count / world size, so that DDP's gradient average gives one
    process's token mean over the whole batch, whatever the ranks' caption lengths (open_clip
    takes each rank's own token mean, which weighs the ranks' tokens unequally). `count`: the global
    token count when it spans more than these logits (the micro-batches of a step)."""
    if count is None:
        count = dist.all_reduce_sum(torch.tensor(float(len(targets)), device=device))
    return F.cross_entropy(logits.float(), targets, reduction="sum") * dist.world_size() / count.clamp(min=1)


# ---- data ----

def build_data(cfg, tokenizer, rank, world_size):
    """Training loader (None with --eval-only) and evaluation sets. With no data flag at all, the
    built-in tiny set (train, val and zero-shot splits)."""
    tiny = None if (cfg.train_data or cfg.val_data or cfg.zeroshot_data) else tiny_data()
    val_file = cfg.val_data or (os.path.join(tiny, "val.json") if tiny else "")
    zs_root = cfg.zeroshot_data or (os.path.join(tiny, "zeroshot") if tiny else "")
    root = cfg.image_root or None
    val = read_annotations(val_file, root) if val_file else None
    zeroshot = image_folder(zs_root) if zs_root else None
    if cfg.eval_only:
        return None, None, val, zeroshot
    train_file = cfg.train_data or os.path.join(tiny_data(), "train.json")
    # open_clip's training crop (scale 0.9-1, bicubic, no flip) at every preset
    example = Example(train_transform(cfg.image_size), tokenizer, cfg.context_length)
    records = training_records(train_file, root, cfg.skip_bad)          # an annotation file's, or shards
    loader, sampler = train_loader(records, example, cfg, rank, world_size, train_file)
    return loader, sampler, val, zeroshot


# ---- evaluation ----

@torch.no_grad()
def embed_images(model, paths, cfg, device, precision, captions=None):
    """Contrastive embeddings of this rank's contiguous shard of `paths`, gathered in order from
    all ranks. `captions` (a dict): also caption this rank's images, from the same ViT pass."""
    start, end = dist.shard_range(len(paths))
    loader = torch.utils.data.DataLoader(ImageDataset(paths[start:end], eval_transform(cfg.image_size)),
                                         batch_size=cfg.batch_size, num_workers=cfg.workers,
                                         worker_init_fn=ignore_preemption_signals)
    feats = [torch.zeros(0, cfg.embed_dim, device=device)]
    for images, _ in loader:
        with autocast(precision, device):
            latent, tokens = model.image_features(images.to(device))
            if captions is not None:
                seqs = model.generate(None, image_tokens=tokens, sample=cfg.sample, num_beams=cfg.num_beams,
                                      max_length=cfg.max_gen_length, min_length=cfg.min_gen_length, top_p=cfg.top_p,
                                      **captions["ids"])
                captions["tokens"] += seqs.tolist()
        feats.append(F.normalize(latent.float(), dim=-1))
    return dist.gather_varlen(torch.cat(feats))


def decode_caption(tokenizer, seq, eos_id):
    """Text of a generated row: the tokens after [SOT] up to [EOT] (what follows is padding)."""
    seq = seq[1:]
    return tokenizer.decode(seq[:seq.index(eos_id)] if eos_id in seq else seq).strip()


@torch.no_grad()
def evaluate(model, cfg, val, zeroshot, tokenizer, device, precision, output_dir=None):
    """One pass over the evaluation data (Sec. 4): zero-shot retrieval recall@K on the val split
    and captions of its images (beam search; pycocoevalcap; captions.json), both from one ViT pass
    per image, and zero-shot classification top-1/top-5. Every rank works on its shard; features
    and captions are gathered and every rank computes the same metrics."""
    was_training = model.training
    model.eval()
    metrics = {}
    if val is not None:
        texts, txt2img = retrieval_texts(val)
        captions = {"tokens": [], "ids": dict(sot_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)}
        image_emb = embed_images(model, [r["image"] for r in val], cfg, device, precision, captions)
        tokenize = lambda t: trim_padding(tokenizer(t, cfg.context_length), cfg.pad_id)  # noqa: E731  (on the host)
        text_emb = embed_texts(model.encode_text, texts, tokenize, cfg.batch_size, cfg.embed_dim, device, precision)
        metrics.update(retrieval_metrics(image_emb @ text_emb.T, txt2img))
        mine = [decode_caption(tokenizer, s, tokenizer.eos_id) for s in captions["tokens"]]
        predictions = dict(enumerate(c for part in dist.gather_objects(mine) for c in part))
        scores = caption_metrics(predictions, {i: r["captions"] for i, r in enumerate(val)}) if dist.is_main() else {}
        metrics.update(dist.gather_objects(scores)[0])                                   # rank 0's, everywhere
        if output_dir and dist.is_main():
            with open(os.path.join(output_dir, "captions.json"), "w") as f:
                json.dump([{"image": val[i]["image"], "image_id": val[i]["image_id"], "caption": c}
                           for i, c in predictions.items()], f, indent=1)
    if zeroshot is not None:
        paths, labels, classnames, templates = zeroshot
        classifier = zeroshot_classifier_sharded(model.encode_text, tokenizer, classnames, templates,
                                                 cfg.context_length, cfg.embed_dim, device, precision)
        image_emb = embed_images(model, paths, cfg, device, precision)
        metrics.update(zeroshot_metrics(image_emb @ classifier.T, labels))
    model.train(was_training)
    return metrics


# ---- training ----

def read_init(path):
    """What an --init-from is, read once: ('ours', our checkpoint) or ('open_clip', its state dict)."""
    if os.path.isdir(path) or path.endswith(".safetensors"):
        return "open_clip", read_open_clip_state(path)
    saved = load_checkpoint(path)
    if isinstance(saved, dict) and "model" in saved and "config" in saved:
        return "ours", saved
    return "open_clip", read_open_clip_state(path, saved)


def check_config(cfg, tokenizer):
    """Start-up checks with clear messages (instead of an error deep in the first step)."""
    if cfg.task not in TASKS:
        raise UserError(f"--task must be {' or '.join(TASKS)}, not {cfg.task!r}")
    if cfg.vocab_size < tokenizer.vocab_size:
        raise UserError(f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} tokens, the model {cfg.vocab_size}")
    if cfg.max_gen_length > cfg.context_length:
        raise UserError(f"--max-gen-length {cfg.max_gen_length} exceeds the context of {cfg.context_length} tokens")
    if cfg.min_gen_length >= cfg.max_gen_length:
        raise UserError(f"--min-gen-length {cfg.min_gen_length} must be below --max-gen-length {cfg.max_gen_length}")
    if cfg.contrastive_weight == 0 and cfg.caption_weight == 0:
        raise UserError("--contrastive-weight and --caption-weight are both 0: nothing to train")
    if cfg.num_beams < 1:
        raise UserError(f"--num-beams must be at least 1 (1: greedy), not {cfg.num_beams}")
    if cfg.pooler == "open_clip" and cfg.n_queries < 2:
        raise UserError(f"--n-queries {cfg.n_queries}: the open_clip pooler's first query is the contrastive "
                        f"embedding, so the decoder needs at least 2")
    if cfg.image_size % cfg.patch_size:
        raise UserError(f"--image-size {cfg.image_size} is not a multiple of --patch-size {cfg.patch_size}")
    if cfg.pad_id == tokenizer.eos_id:
        raise UserError(f"--pad-id {cfg.pad_id} is the end-of-text id: the caption loss would never learn to stop")


def build_model(cfg, tokenizer, init=None):
    """A fresh model, or one initialised from open_clip weights / our checkpoint (`init`: read_init's
    result). The architecture comes from the weights (our checkpoint: its config, CLS mask
    included); an --image-size on the command line interpolates the position embeddings; for
    open_clip weights, --cls-mask on the command line overrides the mask they were trained with
    (legacy)."""
    # open_clip pads CLIP's BPE with 0 (its tokenizer.py; CoCa's pad_id), where transformers' CLIP
    # tokenizer pads with [EOT]: padding must differ from [EOT], which the caption loss trains.
    if cfg.pad_id < 0:
        cfg.pad_id = 0 if tokenizer.pad_id == tokenizer.eos_id else tokenizer.pad_id
    kind, payload = init or (None, None)
    image_size = cfg.image_size if "image_size" in cfg.cli_keys else None
    if not kind and cfg.image_size % cfg.patch_size:
        raise UserError(f"--image-size {cfg.image_size} is not a multiple of --patch-size {cfg.patch_size}")
    if kind == "open_clip":
        mask = cfg.cls_mask if "cls_mask" in cfg.cli_keys else "legacy"
        model = CoCa.from_open_clip(cfg.init_from, cfg.preset if cfg.preset != "tiny" else None, pad_id=cfg.pad_id,
                                    eos_id=tokenizer.eos_id, cls_mask=mask, state=payload)
        for k in MODEL_FIELDS:
            setattr(cfg, k, getattr(model.cfg, k))
        model.cfg = cfg
    else:
        if kind == "ours":
            for k in MODEL_FIELDS:
                setattr(cfg, k, payload["config"][k])
        cfg.vocab_size = cfg.vocab_size or tokenizer.vocab_size
        model = CoCa(cfg, pad_id=cfg.pad_id, eos_id=tokenizer.eos_id)
        if kind == "ours":
            model.load_state_dict(payload["model"])
    if kind and image_size and image_size != cfg.image_size:      # serve another size: interpolate the grid
        model.visual.resize(image_size)
        cfg.image_size = image_size
    tokenizer.pad_id = cfg.pad_id            # the data pipeline pads with the model's padding id
    return model


def freeze_unused(model, cfg):
    """Without the contrastive loss (caption fine-tuning) its parameters get no gradient; DDP
    requires every trainable parameter to receive one."""
    if cfg.contrastive_weight == 0:
        unused = [model.proj, model.cls_emb, model.text_projection, model.logit_scale, *model.text.ln_final.parameters()]
        if cfg.pooler == "paper":
            unused += [*model.attn_pool_contrastive.parameters(), *model.ln_post_contrastive.parameters()]
        for p in unused:
            p.requires_grad_(False)


def compute_losses(ddp_model, cfg, images, ids, positions, targets, device, cache=None, j=0, count=None):
    """The weighted objective L = lambda_Con L_Con + lambda_Cap L_Cap (Sec. 3.2) and its parts.

    With --accum-steps K, for micro-batch j of a step: L_Con over all K micro-batches with the
    others' embeddings from `cache` (FeatureCache), and micro-batch j's part of L_Cap, its token sum
    over the step's token `count`; the K backward passes sum to the gradient of one K x B batch.
    The temperature's gradient is taken in the last pass only (open_clip's accum_freq takes it in
    each, K times)."""
    image_emb, text_emb, logit_scale, logits = ddp_model(images, ids, positions)
    losses = {"loss_caption": caption_loss(logits, targets, device, count)}
    if cfg.contrastive_weight:
        emb = {"image": image_emb.float(), "text": text_emb.float()}
        if cache is not None and cache.active:
            emb = cache.features(j, emb)
            logit_scale = logit_scale if j == len(cache.cache) - 1 else logit_scale.detach()
        losses["loss_contrastive"] = contrastive_loss(emb["image"], emb["text"], logit_scale.float())
    loss = cfg.caption_weight * losses["loss_caption"] + cfg.contrastive_weight * losses.get("loss_contrastive", 0.0)
    return loss, losses


def main(argv=None):
    rank, local_rank, world_size, device = dist.setup()
    cfg, ckpt = resolve_config(Config, PRESETS, argv, description=__doc__, recipe=task_recipe, recipes_doc=RECIPES_DOC,
                               choices={"task": TASKS, "pooler": ("open_clip", "paper"),
                                        "cls_mask": ("correct", "legacy")},
                               resume_mutable=("num_beams", "max_gen_length", "min_gen_length", "sample", "top_p"))
    precision = resolve_precision(cfg.precision, device)
    seed_everything(cfg.seed)                     # the same initial weights on every rank
    os.makedirs(cfg.output_dir, exist_ok=True)
    init = read_init(cfg.init_from) if cfg.init_from else None
    if init and init[0] == "ours" and not cfg.tokenizer:
        cfg.tokenizer = init[1]["config"]["tokenizer"]
    if init and init[0] == "open_clip" and not cfg.tokenizer:
        cfg.tokenizer = _OPEN_CLIP["tokenizer"]   # CLIP's BPE, which every open_clip CoCa uses
    tokenizer = load_tokenizer(cfg.tokenizer, cfg.init_from,
                               use_tiny=not (cfg.train_data or cfg.val_data or cfg.zeroshot_data),
                               clean=open_clip_cleaner(cfg.text_clean))   # ftfy, HTML, whitespace[, lower]
    cfg.tokenizer = tokenizer.name
    model = build_model(cfg, tokenizer, init)
    del init
    check_config(cfg, tokenizer)
    model.to(device)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing()
    loader, sampler, val, zeroshot = build_data(cfg, tokenizer, rank, world_size)
    save_config(cfg, cfg.output_dir)
    log = MetricLog(cfg.output_dir, cfg.report_to, dataclasses.asdict(cfg), project="coca",
                    resumed=ckpt is not None)
    if ckpt:
        model.load_state_dict(ckpt["model"])

    if cfg.eval_only:
        metrics = evaluate(model, cfg, val, zeroshot, tokenizer, device, precision, cfg.output_dir)
        log.write({"step": ckpt["step"] if ckpt else 0, "epoch": 0, "split": "val", **metrics})
        if dist.is_main():
            print(json.dumps(metrics))
        dist.cleanup()
        return metrics

    freeze_unused(model, cfg)
    # DDP, or FSDP2 sharding each transformer block and the rest (--fsdp)
    ddp_model = dist.parallelize(model, cfg.fsdp, device, (Block, CrossAttentionBlock), precision_dtype(precision))
    if cfg.compile:
        ddp_model = torch.compile(ddp_model)
    # AdamW as open_clip (beta2 0.98, eps 1e-6), no decay on gains, biases, embeddings (the CLS
    # too) and the temperature (the pooler's queries decay, as in open_clip); the fused kernel.
    optimizer = adamw(param_groups(model, cfg.weight_decay, ("logit_scale",)), lr=cfg.lr,
                      betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    steps_per_epoch = len(loader) // cfg.accum_steps
    check_resume_position(ckpt, steps_per_epoch)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    scheduler = cosine_schedule(optimizer, cfg.warmup_steps, total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    guard = NonFiniteGuard(cfg.max_bad_steps)
    seed_everything(cfg.seed + rank)              # each rank its own stream from here
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

    def embed(batch):                             # (images, ids, positions, ...) -> {"image", "text"}: (B, E)
        with autocast(precision, device):
            image_emb, text_emb, _, _ = ddp_model(*batch[:3])
        return {"image": image_emb.float(), "text": text_emb.float()}

    best_key = "cider" if cfg.task == "caption" else "r_mean"
    pbar = tqdm(total=total_steps, initial=step, disable=not dist.is_main(), dynamic_ncols=True)
    metrics, tick, tick_step, stopped = {}, time.time(), step, False
    with Preemption() as preemption:
        while (step < total_steps or evaluated < step) and not stopped:
            unevaluated = evaluated < step    # resumed at an epoch's end, not yet evaluated
            epoch = (step - unevaluated) // steps_per_epoch
            sampler.set_epoch(epoch, skip=(step - epoch * steps_per_epoch) * cfg.accum_steps * cfg.batch_size)
            for group in () if unevaluated else micro_batches(loader, cfg.accum_steps):
                micro = []
                for images, ids, _ in group:
                    ids = trim_padding(ids, cfg.pad_id)               # on the host: no device sync
                    positions, targets = caption_positions(ids, cfg.pad_id)
                    micro.append(tuple(x.to(device, non_blocking=True) for x in (images, ids, positions, targets)))
                # --accum-steps K: the contrastive batch is K x B (x world size) through open_clip's
                # feature cache, and L_Cap the token mean over all K micro-batches (see compute_losses)
                count = dist.all_reduce_sum(torch.tensor(float(sum(len(b[3]) for b in micro)), device=device))
                cache = FeatureCache(embed if cfg.contrastive_weight else None, micro)
                parts = []
                for j, batch in enumerate(micro):
                    with cache.replay(j), sync_gradients(ddp_model, j == len(micro) - 1):
                        with autocast(precision, device):
                            loss, losses = compute_losses(ddp_model, cfg, *batch, device, cache, j, count)
                        scaler.scale(loss).backward()
                    parts.append(losses)
                # for the log: L_Con (the same in every pass) and L_Cap summed over the micro-batches
                losses = {**parts[-1], "loss_caption": sum(p["loss_caption"] for p in parts)}
                loss = cfg.caption_weight * losses["loss_caption"] + \
                    cfg.contrastive_weight * losses.get("loss_contrastive", 0.0)
                images, ids, positions, _ = micro[-1]
                scaler.unscale_(optimizer)
                grad_norm = grad_norm_(model, cfg.grad_clip_norm)
                # A non-finite loss or gradient skips the update on the device (no host sync)
                ok = guard.check(loss, grad_norm, scaler)
                guard.step(optimizer, scaler, ok)
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                with torch.no_grad():  # open_clip: keep the scale <= 100 for stability
                    model.logit_scale.clamp_(0, math.log(100))
                step += 1
                pbar.update(1)
                guard.account(step, ok, lambda b=(images, ids, positions): first_nonfinite_module(
                    model, {"images": b[0]}, lambda: model(*b)))
                if step % cfg.log_every == 0 or step == total_steps:
                    values = {k: dist.all_reduce_mean(v).item() for k, v in {"loss": loss, **losses}.items()}
                    speed = (step - tick_step) * cfg.accum_steps * cfg.batch_size * world_size / (time.time() - tick)
                    tick, tick_step = time.time(), step
                    lr = optimizer.param_groups[0]["lr"]
                    pbar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.2e}", samples_s=f"{speed:.0f}")
                    log.write({"step": step, "epoch": epoch, "split": "train", **values, "lr": lr,
                               "logit_scale": dist.value(model.logit_scale).exp().item(), "samples_per_s": speed,
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
                metrics = evaluate(model, cfg, val, zeroshot, tokenizer, device, precision, cfg.output_dir)
            log.write({"step": step, "epoch": epoch, "split": "val", **metrics})
            if metrics and dist.is_main():
                tqdm.write(f"epoch {epoch} step {step}: " + " ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
            if dist.gather_objects(metrics.get(best_key, -1.0) > best)[0]:   # rank 0 decides for all
                best = metrics[best_key]
                checkpoint("checkpoint_best.pt")
            evaluated = step
            checkpoint("checkpoint_last.pt")
            stopped = preemption.stop(step, cfg.output_dir)   # a signal during the evaluation
            tick, tick_step = time.time(), step  # samples/s counts training only
    pbar.close()
    if not metrics and not stopped:   # resumed a finished run: evaluate its weights again
        with dist.full_parameters(model):     # FSDP: every unit gathered while evaluating
            metrics = evaluate(model, cfg, val, zeroshot, tokenizer, device, precision, cfg.output_dir)
    if dist.is_main():
        print(json.dumps(metrics or {"step": step}))
    dist.cleanup()
    return metrics


if __name__ == "__main__":
    cli(main)
