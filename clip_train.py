"""CLIP (Radford et al. 2021, arXiv:2103.00020): an image encoder and a text encoder trained so
that the embeddings of matching image-caption pairs are close and all others far apart, with
a symmetric cross-entropy over the batch's similarity matrix (Sec. 2.3, Fig. 3). Zero-shot
classification then compares an image with the embeddings of prompts like "a photo of a {}."

The paper, in this file:
    Sec. 2.4, Fig. 3   the two towers, projections, normalised embeddings     CLIP
    Sec. 2.5           the learned temperature: init 1/0.07, at most 100      CLIP.logit_scale, main
    Fig. 3             the symmetric InfoNCE over N x N pairs                 clip_loss
    Sec. 2.5           AdamW, decoupled decay, cosine schedule, large batch   main(), Config
    Sec. 3.1.4         zero-shot prompts and prompt ensembles                 evaluate
    Table 19/20        the ViT presets                                        PRESETS

Variants as flags: SigLIP (Zhai et al. 2023, arXiv:2303.15343), DiHT (Radenovic et al. 2023,
arXiv:2301.02280), FLIP (Li et al. 2023, arXiv:2212.00794):
    SigLIP Sec. 3.2-3.3   --loss siglip: a sigmoid per pair, a learned bias      siglip_loss
    DiHT Sec. 3.3         --loss diht: hard negatives importance-weighted        hn_nce_loss
    FLIP Sec. 3           --patch-dropout P, --unmasked-steps N                  main

    python clip_train.py                                    # tiny built-in data, CPU, ~3 min
    torchrun --nproc_per_node 8 clip_train.py --preset vit-b-32 \\
        --train-data train.json --val-data val.json --zeroshot-data imagenet/val \\
        --output-dir runs/b32
    python clip_train.py --init-from clip-vit-base-patch32/ --eval-only --val-data coco_test.json
"""
import math
from dataclasses import dataclass, replace
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import dist
from common.config import BaseConfig, resolve_config
from common.data import contrastive_data, load_tokenizer, retrieval_texts, run_text_clean
from common.encoders import Block, TextTransformer, VisionTransformer
from common.export import export_source
from common.metrics import (embed_images, embed_texts, retrieval_metrics,
                            zeroshot_classifier_sharded, zeroshot_metrics)
from common.run import (end_epoch, epochs, eval_only, finish, log_train, open_log, optimizer_step,
                        start_run, step_done)
from common.utils import (FeatureCache, Preemption, UserError, adamw, autocast, cli,
                          first_nonfinite_module, param_groups, precision_dtype, resolve_precision,
                          seed_everything, sync_gradients)
from common.weights import clip as clip_weights


# ---- model ----

class CLIP(nn.Module):
    """Two towers and a learned temperature (Sec. 2.4-2.5). Both embeddings are projected by a
    bias-free linear map into the joint space and L2-normalised."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.visual = VisionTransformer(image_size=cfg.image_size, patch_size=cfg.patch_size,
                                        width=cfg.vision_width, layers=cfg.vision_layers,
                                        heads=cfg.vision_heads, mlp_ratio=cfg.mlp_ratio,
                                        act=cfg.act, eps=cfg.layer_norm_eps, pre_norm=True,
                                        patch_dropout=cfg.patch_dropout)
        self.text = TextTransformer(vocab_size=cfg.vocab_size, context_length=cfg.context_length,
                                    width=cfg.text_width, layers=cfg.text_layers,
                                    heads=cfg.text_heads, eos_id=cfg.eos_id,
                                    mlp_ratio=cfg.mlp_ratio, act=cfg.act, eps=cfg.layer_norm_eps)
        self.visual_projection = nn.Linear(cfg.vision_width, cfg.embed_dim, bias=False)
        self.text_projection = nn.Linear(cfg.text_width, cfg.embed_dim, bias=False)
        nn.init.normal_(self.visual_projection.weight, std=cfg.vision_width ** -0.5)
        nn.init.normal_(self.text_projection.weight, std=cfg.text_width ** -0.5)
        # Temperature tau as a log-parametrised scale, initialised to 1/0.07 (Sec. 2.5); SigLIP's
        # t' = log 10 and learned bias b = -10 (every pair starts near "no match", Sec. 3.2).
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10 if cfg.loss == "siglip" else 1 / 0.07)))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0)) if cfg.loss == "siglip" else None

    def set_grad_checkpointing(self, enabled=True):
        self.visual.transformer.grad_checkpointing = enabled
        self.text.transformer.grad_checkpointing = enabled

    def encode_image(self, images, normalize=True):               # (B, 3, H, W) -> (B, E)
        x = self.visual_projection(self.visual(images)[:, 0])     # class token after ln_post
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, ids, normalize=True):                   # (B, L) -> (B, E)
        x = self.text_projection(self.text(ids)[0])               # EOS token after ln_final
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, images, ids):
        """The two embeddings and the loss's learned scalars: the scale t = exp(t') and, for SigLIP,
        the bias b (open_clip's CLIP.forward order)."""
        out = self.encode_image(images), self.encode_text(ids), self.logit_scale.exp()
        return out if self.logit_bias is None else (*out, self.logit_bias)

    @classmethod
    def from_hf(cls, path, image_size=None):
        """Build from a transformers `CLIPModel` folder, every weight mapped and shape-checked
        (common/weights/clip.py); `image_size` other than the checkpoint's interpolates the
        position embeddings (bicubic, as transformers' interpolate_pos_encoding)."""
        model = cls(Config(**clip_weights.hf_architecture(path)))
        clip_weights.load_hf(model, path)
        if image_size and image_size != model.cfg.image_size:
            model.resize_image(image_size)
        return model

    def resize_image(self, image_size):
        """Serve another image size: interpolate the learned position grid (Touvron et al. 2019)."""
        self.visual.resize(image_size)
        self.cfg.image_size = image_size


# ---- loss ----

def clip_loss(image_emb, text_emb, logit_scale):
    """Symmetric InfoNCE (Fig. 3) with negatives from every rank.

    Written as open_clip's local loss with a gradient-carrying gather: each rank scores its
    own B images against all N = B*W texts (and its B texts against all N images), labels
    offset by rank*B. Because the gather's backward sums every rank's gradient for a rank's
    features, and DDP averages over ranks, the gradient equals that of the loss over the
    whole N x N matrix, at O(B*N) memory per rank instead of O(N^2). (A plain, no-grad gather
    would drop the terms where this rank's features are other ranks' negatives.)"""
    all_images = dist.gather_with_grad(image_emb)                   # (N, E)
    all_texts = dist.gather_with_grad(text_emb)                     # (N, E)
    logits_per_image = logit_scale * image_emb @ all_texts.T        # (B, N)
    logits_per_text = logit_scale * text_emb @ all_images.T         # (B, N)
    B = image_emb.shape[0]
    labels = torch.arange(B, device=image_emb.device) + B * dist.rank()
    return (F.cross_entropy(logits_per_image, labels)
            + F.cross_entropy(logits_per_text, labels)) / 2


def siglip_loss(image_features, text_features, logit_scale, logit_bias):
    """SigLIP's pairwise sigmoid loss (Sec. 3.2), z_ij = 1 for a matching pair and -1 otherwise:
    L = -1/|B| sum_i sum_j log sigmoid(z_ij (t x_i . y_j + b)), per image as open_clip's SigLipLoss.
    Across ranks: each rank's images against one rank's block of texts at a time (Sec. 3.3), each
    block recomputed in backward, so O(B^2) activations instead of O(B*N) (docs/clip.md)."""
    def block(images, texts, own):                                  # (B, B) pairs; own: diagonal
        logits = logit_scale * images @ texts.T + logit_bias
        z = 2 * torch.eye(len(images), device=logits.device) - 1 if own else -1.0
        return -F.logsigmoid(z * logits).sum()
    return dist.sum_rank_blocks(block, image_features, text_features) / len(image_features)


def hn_nce_loss(image_emb, text_emb, logit_scale, alpha=1.0, beta=0.5):
    """DiHT's hard-negative NCE (Sec. 3.3), InfoNCE with negatives weighted by hardness: with
    s_ij = t x_i . y_j, L_i2t = -1/B sum_i log e^s_ii / (alpha e^s_ii + sum_{j!=i} w_ij e^s_ij),
    w_ij = (B-1) e^(beta s_ij) / sum_{k!=i} e^(beta s_ik), L_t2i alike, L = L_i2t + L_t2i
    (alpha 1, beta 0: twice clip_loss). Negatives, and each row's weights, from every rank."""
    all_images, all_texts = dist.gather_with_grad(image_emb), dist.gather_with_grad(text_emb)
    labels = torch.arange(len(image_emb), device=image_emb.device) + len(image_emb) * dist.rank()
    return (_hn_nce(logit_scale * image_emb @ all_texts.T, labels, alpha, beta)     # (B, N)
            + _hn_nce(logit_scale * text_emb @ all_images.T, labels, alpha, beta))


def _hn_nce(logits, labels, alpha, beta):
    """One direction in log space; rows are anchors, `labels` their positives' columns."""
    positive = F.one_hot(labels, logits.shape[1]).bool()            # (B, N)
    s_pos = logits[positive]                                        # (B,)
    lse = lambda x: torch.logsumexp(x.masked_fill(positive, -math.inf), 1)  # noqa: E731  j != i
    # log sum_{j!=i} w_ij e^s_ij = log(N - 1) + lse((1 + beta) s) - lse(beta s)
    log_negatives = math.log(logits.shape[1] - 1) + lse((1 + beta) * logits) - lse(beta * logits)
    log_alpha = math.log(alpha) if alpha > 0 else -math.inf
    return (torch.logaddexp(s_pos + log_alpha, log_negatives) - s_pos).mean()


def contrastive_loss(cfg):
    """--loss: (image, text, the model's scalars) -> the loss."""
    if cfg.loss == "diht" and cfg.batch_size * cfg.accum_steps * dist.world_size() < 2:
        raise UserError("--loss diht needs negatives: 2 or more pairs per contrastive batch")
    return {"clip": clip_loss, "siglip": siglip_loss,
            "diht": partial(hn_nce_loss, alpha=cfg.diht_alpha, beta=cfg.diht_beta)}[cfg.loss]


def logged_scalars(model):
    """The temperature's scale t = exp(t') and SigLIP's bias b."""
    bias = {} if model.logit_bias is None else {"logit_bias": dist.value(model.logit_bias).item()}
    return {"logit_scale": dist.value(model.logit_scale).exp().item(), **bias}


# ---- evaluation ----

@torch.no_grad()
def evaluate(model, cfg, val, zeroshot, tokenizer, device, precision):
    """Retrieval recall@K on the val split and zero-shot top-1/top-5; every rank embeds its
    shard, the features are gathered, and every rank computes the same metrics."""
    was_training = model.training
    model.eval()
    metrics = {}
    images = lambda paths: embed_images(  # noqa: E731  (CLIP's preprocessing, gathered in order)
        model.encode_image, paths, cfg.image_size, cfg.batch_size, cfg.workers, cfg.embed_dim,
        device, precision)
    if val is not None:
        texts, txt2img = retrieval_texts(val)
        image_emb = images([r["image"] for r in val])
        text_emb = embed_texts(model.encode_text, texts, lambda t: tokenizer(t, cfg.context_length),
                               cfg.batch_size, cfg.embed_dim, device, precision)
        metrics.update(retrieval_metrics(image_emb @ text_emb.T, txt2img))
    if zeroshot is not None:
        paths, labels, classnames, templates = zeroshot
        classifier = zeroshot_classifier_sharded(model.encode_text, tokenizer, classnames, templates,
                                                 cfg.context_length, cfg.embed_dim, device, precision)
        image_emb = images(paths)
        metrics.update(zeroshot_metrics(image_emb @ classifier.T, labels))
    model.train(was_training)
    return metrics


# ---- config and presets ----

@dataclass
class Config(BaseConfig):
    # model (Table 19/20 of the paper for the ViT presets)
    image_size: int = 64            # pixels
    patch_size: int = 8             # pixels per patch side
    vision_width: int = 128         # ViT width
    vision_layers: int = 4          # ViT blocks
    vision_heads: int = 2           # width / 64 in the paper's models
    text_width: int = 128           # text transformer width
    text_layers: int = 4            # text transformer blocks
    text_heads: int = 2             # text attention heads
    context_length: int = 32        # 77 for the paper's models
    vocab_size: int = 0             # 0: the tokenizer's
    eos_id: int = -1                # -1: the tokenizer's end-of-text id (pooling position)
    embed_dim: int = 128            # joint embedding space
    mlp_ratio: float = 4.0          # MLP hidden width / width
    act: str = "quick_gelu"         # OpenAI's QuickGELU; "gelu" as open_clip's non-quickgelu models
    layer_norm_eps: float = 1e-5    # LayerNorm epsilon
    # data
    val_data: str = ""              # retrieval evaluation split; empty with tiny: its val split
    zeroshot_data: str = ""         # root/<class>/* images; empty with tiny: its zero-shot set
    text_clean: str = "lower"       # open_clip's text clean-up: lower (its CLIP BPE), whitespace
                                    # (its HF tokenizers: ftfy, HTML and whitespace, case kept)
    # optimisation (open_clip params.py / paper Sec. 2.5)
    epochs: int = 2
    batch_size: int = 128           # per process; contrastive batch: x accum_steps x world_size
    accum_steps: int = 1            # micro-batches per step (open_clip's accum_freq feature cache)
    lr: float = 5e-4
    weight_decay: float = 0.2
    beta1: float = 0.9              # AdamW beta1
    beta2: float = 0.98             # paper: 0.98 for ViTs
    eps: float = 1e-6               # AdamW epsilon
    # loss, and FLIP's image masking
    loss: str = "clip"              # clip (InfoNCE, Fig. 3) | siglip (sigmoid, Zhai et al. 2023) |
                                    # diht (HN-NCE, Radenovic et al. 2023)
    diht_alpha: float = 1.0         # diht: the positive's weight in its denominator (0: decoupled)
    diht_beta: float = 0.5          # diht: hardness, negatives weighted e^(beta s_ij) (0: InfoNCE)
    patch_dropout: float = 0.0      # FLIP: share of each training image's patches dropped, [0, 1)
    unmasked_steps: int = 0         # FLIP: the last N steps keep every patch (unmasked tuning)
    # run
    output_dir: str = "runs/clip"
    init_from: str = ""             # transformers CLIPModel or open_clip folder, or our checkpoint


CHOICES = {"loss": ["clip", "siglip", "diht"], "export_format": list(clip_weights.TARGETS)}
MODEL_FIELDS = ("image_size", "patch_size", "vision_width", "vision_layers", "vision_heads",
                "text_width", "text_layers", "text_heads", "context_length", "vocab_size", "eos_id",
                "embed_dim", "mlp_ratio", "act", "layer_norm_eps")
_VIT_TEXT = dict(text_width=512, text_layers=12, text_heads=8, context_length=77, vocab_size=49408,
                 tokenizer="openai/clip-vit-base-patch32", batch_size=256, epochs=32,
                 warmup_steps=10000, image_size=224, workers=8)
_B = dict(_VIT_TEXT, vision_width=768, vision_layers=12, vision_heads=12, embed_dim=512)
PRESETS = {
    "tiny": {},
    # Table 19/20: ViT-B/32 and B/16 (768 x 12, 12 heads; text 512 x 12, 8 heads; embed 512)
    "vit-b-32": dict(_B, patch_size=32),
    "vit-b-16": dict(_B, patch_size=16),
    # ViT-L/14: vision 1024 x 24, 16 heads; text 768 x 12, 12 heads; embed 768
    "vit-l-14": dict(_VIT_TEXT, patch_size=14, vision_width=1024, vision_layers=24, vision_heads=16,
                     text_width=768, text_heads=12, embed_dim=768, batch_size=96,
                     grad_checkpointing=True),
}


def settle_config(cfg, init, tokenizer):
    """Every change to cfg after the command line, in one place: the tokenizer's name, the
    architecture of the --init-from weights (an --image-size given on the command line stays: the
    position embeddings are interpolated), the tokenizer's vocabulary size and end-of-text id."""
    cfg.tokenizer = tokenizer.name
    arch = clip_weights.init_architecture(init, cfg.init_from, MODEL_FIELDS)
    kept = {"image_size"} & cfg.explicit_keys
    cfg.__dict__.update({k: v for k, v in arch.items() if k not in kept})
    cfg.vocab_size = cfg.vocab_size or tokenizer.vocab_size
    cfg.eos_id = tokenizer.eos_id if cfg.eos_id < 0 else cfg.eos_id
    if cfg.vocab_size < tokenizer.vocab_size or cfg.eos_id != tokenizer.eos_id:
        raise UserError(f"tokenizer {tokenizer.name} (vocab {tokenizer.vocab_size}, EOS {tokenizer.eos_id})"
                        f" does not fit the model (vocab {cfg.vocab_size}, EOS {cfg.eos_id})")
    return arch


def build_model(cfg, init, arch):
    """A fresh CLIP, or one with the --init-from weights (built at their size, then resized)."""
    model = CLIP(replace(cfg, image_size=arch.get("image_size", cfg.image_size)))
    clip_weights.load_init(model, init, cfg.init_from)
    if model.cfg.image_size != cfg.image_size:
        model.resize_image(cfg.image_size)
    model.cfg = cfg
    return model


# ---- main: the training loop ----

def main(argv=None):
    rank, local_rank, world_size, device = dist.setup()
    cfg, ckpt = resolve_config(Config, PRESETS, argv, description=__doc__, choices=CHOICES)
    precision = resolve_precision(cfg.precision, device)
    seed_everything(cfg.seed)                     # the same initial weights on every rank
    init = clip_weights.read_init(cfg.init_from)  # a transformers or open_clip folder, or ours
    source = cfg.export and export_source(init, ckpt, cfg, "clip", MODEL_FIELDS, PRESETS)
    saved_tokenizer = init[1]["config"]["tokenizer"] if init[1] else ""   # one of our checkpoints'
    tokenizer = load_tokenizer(cfg.tokenizer or saved_tokenizer, cfg.init_from,
                               use_tiny=not (cfg.train_data or cfg.val_data or cfg.zeroshot_data),
                               clean=run_text_clean(cfg))   # ftfy, HTML[, lower]
    arch = settle_config(cfg, init, tokenizer)    # from here on cfg is only read
    model = build_model(cfg, init, arch).to(device)
    del init
    if ckpt:
        model.load_state_dict(ckpt["model"])
    if cfg.export:                     # --export DIR: in the format its community loads, then exit
        return clip_weights.export(model, cfg, tokenizer, source)
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    loader, sampler, val, zeroshot = contrastive_data(cfg, tokenizer, rank, world_size)
    log = open_log(cfg, "clip", resumed=ckpt is not None)

    def evaluate_run():
        return evaluate(model, cfg, val, zeroshot, tokenizer, device, precision)
    if cfg.eval_only:
        return eval_only(log, ckpt, evaluate_run)

    # DDP, or FSDP2 sharding each transformer block and the rest (--fsdp)
    train_model = dist.parallelize(model, cfg.fsdp, device, (Block,), precision_dtype(precision))
    train_model = torch.compile(train_model) if cfg.compile else train_model
    # AdamW as the paper (Sec. 2.5, beta2 0.98, eps 1e-6), decoupled decay off for gains,
    # biases, embeddings, the temperature and SigLIP's bias; the fused kernel.
    optimizer = adamw(param_groups(model, cfg.weight_decay, ("logit_",)), lr=cfg.lr,
                      betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    # the schedule, the scaler, the non-finite guard; a resumed run's state
    run = start_run(cfg, model, optimizer, loader, sampler, log, ckpt, precision)
    del ckpt

    def embed(batch):               # (images, ids) -> ({"image", "text"}: (B, E) each, [t, (b)])
        with autocast(precision, device):
            image_emb, text_emb, *scalars = train_model(*batch)
        return {"image": image_emb.float(), "text": text_emb.float()}, [s.float() for s in scalars]

    loss_fn = contrastive_loss(cfg)            # --loss clip | siglip | diht

    with Preemption() as preemption:              # SIGTERM / SIGUSR1: save the step and leave
        for batches in epochs(run, loader):
            for group in batches:
                # FLIP: patches dropped in training, all of them in the last --unmasked-steps steps
                masked = run.step < run.total_steps - cfg.unmasked_steps
                model.visual.patch_dropout = cfg.patch_dropout if masked else 0.0
                micro = [(images.to(device, non_blocking=True), ids.to(device, non_blocking=True))
                         for images, ids, _ in group]
                # --accum-steps K: the contrastive batch is K x B (x world size), a feature cache:
                # embed every micro-batch without gradient, then each again with gradient against
                # the others' cached embeddings; the K backward passes sum to one K x B step
                cache = FeatureCache(lambda batch: embed(batch)[0], micro)
                for j, batch in enumerate(micro):
                    with cache.micro(j) as m, sync_gradients(train_model, m.last):
                        live, scalars = embed(batch)
                        emb = m.features(live)                      # (K*B, E) each
                        # the temperature's (and bias') gradient: once per step, not K times
                        scalars = [s if m.last else s.detach() for s in scalars]
                        loss = loss_fn(emb["image"], emb["text"], *scalars)
                        run.scaler.scale(loss).backward()
                diagnose = lambda b=micro[-1]: first_nonfinite_module(  # noqa: E731
                    model, {"images": b[0]}, lambda: model(*b))     # names a non-finite step's culprit
                _, grad_norm = optimizer_step(run, loss, diagnose)
                with torch.no_grad():  # open_clip: keep the scale <= 100 for stability (Sec. 2.5)
                    model.logit_scale.clamp_(0, math.log(100))
                log_train(run, {"loss": loss}, grad_norm, lambda: logged_scalars(model))
                if step_done(run, preemption):
                    break
            end_epoch(run, evaluate_run, "r_mean", preemption)   # save, evaluate, keep the best
    return finish(run, evaluate_run)


if __name__ == "__main__":
    cli(main)
