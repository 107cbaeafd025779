"""CLIP (Radford et al. 2021, arXiv:2103.00020): an image encoder and a text encoder trained so
that the embeddings of matching image-caption pairs are close and all others far apart, with
a symmetric cross-entropy over the batch's similarity matrix (Sec. 2.3, Fig. 3). Zero-shot
classification then compares an image with the embeddings of prompts like "a photo of a {}."

    python clip_train.py                                               # tiny built-in data, CPU, ~3 min
    torchrun --nproc_per_node 8 clip_train.py --preset vit-b-32 \\
        --train-data train.json --val-data val.json --zeroshot-data imagenet/val --output-dir runs/b32
    python clip_train.py --init-from clip-vit-base-patch32/ --eval-only --val-data coco_test.json
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
from tqdm import tqdm

from common import dist
from common.data import (Example, ImageDataset, eval_transform, image_folder, open_clip_cleaner,
                         load_tokenizer, read_annotations, retrieval_texts, tiny_data, train_loader,
                         train_transform, training_records)
from common.encoders import (Block, TextTransformer, VisionTransformer, hf_clip_text_map, hf_clip_vision_map,
                             load_mapped, read_hf_checkpoint)
from common.metrics import embed_texts, retrieval_metrics, zeroshot_classifier_sharded, zeroshot_metrics
from common.utils import (FeatureCache, MetricLog, NonFiniteGuard, Preemption, UserError, adamw,
                          autocast, check_finite, check_resume_position, cli, cosine_schedule,
                          evaluation_pending, first_nonfinite_module, grad_norm_,
                          ignore_preemption_signals, load_checkpoint, load_scaler_state,
                          micro_batches, param_groups, precision_dtype, resolve_config,
                          resolve_precision, rng_state, save_checkpoint, save_config,
                          seed_everything, set_rng_state, sync_gradients)


# ---- config ----

@dataclass
class Config:
    preset: str = "tiny"            # tiny (the built-in data, CPU) or a paper configuration; see the list below
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
    train_data: str = ""            # annotation file (JSON or CSV), or webdataset shards such as
                                    # "shards/{00000..00999}.tar" (sources joined with ::); empty: tiny
    val_data: str = ""              # retrieval evaluation split; empty with tiny: its val split
    image_root: str = ""            # folder relative image paths start from (default: the file's)
    zeroshot_data: str = ""         # image folder root/<class>/*; empty with tiny: its zero-shot set
    tokenizer: str = ""             # transformers tokenizer folder or name; empty: tiny's / --init-from's
    text_clean: str = "lower"       # open_clip's text clean-up: lower (its CLIP BPE), whitespace (its HF
                                    # tokenizers: ftfy, HTML and whitespace, case kept)
    skip_bad: bool = False          # skip (and count) unreadable images and empty captions
    train_num_samples: int = 0      # shards: samples per epoch; 0: the sizes.json beside the shards
    dataset_resampled: bool = False  # shards: draw them with replacement (open_clip's flag)
    workers: int = 2                # data-loading processes per rank
    # optimisation (open_clip params.py / paper Sec. 2.5)
    epochs: int = 2                 # passes over the training data
    max_steps: int = 0              # >0: train exactly this many steps (overrides epochs)
    batch_size: int = 128           # per process; the contrastive batch is batch_size * accum_steps * world_size
    accum_steps: int = 1            # micro-batches per optimizer step (open_clip's accum_freq feature cache)
    lr: float = 5e-4                # peak learning rate (after warm-up)
    weight_decay: float = 0.2       # AdamW decoupled weight decay
    beta1: float = 0.9              # AdamW beta1
    beta2: float = 0.98             # paper: 0.98 for ViTs
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
    output_dir: str = "runs/clip"   # metrics.jsonl, config.json, checkpoints (and captions.json) go here
    resume: str = ""                # checkpoint path, or "auto": output_dir/checkpoint_last.pt if present.
                                    # A resumed run keeps its checkpoint's config (see resolve_config)
    init_from: str = ""             # Hugging Face CLIPModel folder, or one of our checkpoints
    eval_only: bool = False         # evaluate the --init-from / --resume weights and exit
    save_every: int = 1000          # steps between checkpoint_last.pt saves (and at every epoch end)
    log_every: int = 10             # steps between train records in metrics.jsonl
    report_to: str = ""             # also send those records to "tensorboard", "wandb" or "tensorboard,wandb"


_VIT_TEXT = dict(text_width=512, text_layers=12, text_heads=8, context_length=77, vocab_size=49408,
                 tokenizer="openai/clip-vit-base-patch32", batch_size=256, epochs=32, warmup_steps=10000,
                 image_size=224, workers=8)
PRESETS = {
    "tiny": {},
    # Table 19/20: ViT-B/32 and B/16 (width 768, 12 layers, 12 heads; text 512 x 12, 8 heads; embed 512)
    "vit-b-32": dict(_VIT_TEXT, patch_size=32, vision_width=768, vision_layers=12, vision_heads=12, embed_dim=512),
    "vit-b-16": dict(_VIT_TEXT, patch_size=16, vision_width=768, vision_layers=12, vision_heads=12, embed_dim=512),
    # ViT-L/14: vision 1024 x 24, 16 heads; text 768 x 12, 12 heads; embed 768
    "vit-l-14": dict(_VIT_TEXT, patch_size=14, vision_width=1024, vision_layers=24, vision_heads=16,
                     text_width=768, text_heads=12, embed_dim=768, batch_size=96, grad_checkpointing=True),
}


# ---- model ----

class CLIP(nn.Module):
    """Two towers and a learned temperature (Sec. 2.4-2.5). Both embeddings are projected by a
    bias-free linear map into the joint space and L2-normalised."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.visual = VisionTransformer(image_size=cfg.image_size, patch_size=cfg.patch_size, width=cfg.vision_width,
                                        layers=cfg.vision_layers, heads=cfg.vision_heads, mlp_ratio=cfg.mlp_ratio,
                                        act=cfg.act, eps=cfg.layer_norm_eps, pre_norm=True)
        self.text = TextTransformer(vocab_size=cfg.vocab_size, context_length=cfg.context_length,
                                    width=cfg.text_width, layers=cfg.text_layers, heads=cfg.text_heads,
                                    eos_id=cfg.eos_id, mlp_ratio=cfg.mlp_ratio, act=cfg.act, eps=cfg.layer_norm_eps)
        self.visual_projection = nn.Linear(cfg.vision_width, cfg.embed_dim, bias=False)
        self.text_projection = nn.Linear(cfg.text_width, cfg.embed_dim, bias=False)
        nn.init.normal_(self.visual_projection.weight, std=cfg.vision_width ** -0.5)
        nn.init.normal_(self.text_projection.weight, std=cfg.text_width ** -0.5)
        # Temperature tau as a log-parametrised scale, initialised to 1/0.07 (Sec. 2.5).
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

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
        return self.encode_image(images), self.encode_text(ids), self.logit_scale.exp()

    @classmethod
    def from_hf(cls, path, image_size=None):
        """Build from a Hugging Face `CLIPModel` folder (e.g. openai/clip-vit-base-patch32 saved
        with save_pretrained). Every weight is mapped and shape-checked; a missing or unused key
        is an error naming it. `image_size` other than the checkpoint's interpolates the
        position embeddings (bicubic, as transformers' interpolate_pos_encoding)."""
        from transformers import CLIPConfig
        hf = CLIPConfig.from_pretrained(path)                       # fills the defaults config.json omits
        v, t = hf.vision_config, hf.text_config
        for name, sub in (("vision", v), ("text", t)):
            if sub.hidden_act not in ("quick_gelu", "gelu"):
                raise UserError(f"{path}: {name} activation {sub.hidden_act!r} is not supported")
        if (v.intermediate_size / v.hidden_size != t.intermediate_size / t.hidden_size or v.hidden_act != t.hidden_act
                or v.layer_norm_eps != t.layer_norm_eps):
            raise UserError(f"{path}: vision and text towers differ in MLP ratio, activation or LayerNorm eps")
        # transformers pools at argmax(ids) when eos_token_id is the legacy value 2 (OpenAI's
        # checkpoints); OpenAI's EOT is the largest id, so that is the first EOS = vocab_size - 1.
        eos = t.vocab_size - 1 if t.eos_token_id == 2 else t.eos_token_id
        cfg = Config(image_size=v.image_size, patch_size=v.patch_size, vision_width=v.hidden_size,
                     vision_layers=v.num_hidden_layers, vision_heads=v.num_attention_heads,
                     text_width=t.hidden_size, text_layers=t.num_hidden_layers, text_heads=t.num_attention_heads,
                     context_length=t.max_position_embeddings, vocab_size=t.vocab_size, eos_id=eos,
                     embed_dim=hf.projection_dim, mlp_ratio=v.intermediate_size / v.hidden_size,
                     act=v.hidden_act, layer_norm_eps=v.layer_norm_eps)
        _, state = read_hf_checkpoint(path)
        mapping = {"visual_projection.weight": "visual_projection.weight",
                   "text_projection.weight": "text_projection.weight", "logit_scale": "logit_scale",
                   **hf_clip_vision_map("visual", "vision_model", cfg.vision_layers),
                   **hf_clip_text_map("text", "text_model", cfg.text_layers)}
        model = cls(cfg)
        load_mapped(model, state, mapping, source=path, ignore=("position_ids",))
        if image_size and image_size != cfg.image_size:
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
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


# ---- data ----

def build_data(cfg, tokenizer, rank, world_size):
    """Training set and loader (None with --eval-only), evaluation sets. With no data flag at
    all, the built-in tiny set (train, val and zero-shot splits)."""
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
def embed_images(model, paths, cfg, device, precision):
    """Embeddings of this rank's contiguous shard of `paths`, gathered in order from all ranks."""
    start, end = dist.shard_range(len(paths))
    loader = torch.utils.data.DataLoader(ImageDataset(paths[start:end], eval_transform(cfg.image_size)),
                                         batch_size=cfg.batch_size, num_workers=cfg.workers,
                                         worker_init_fn=ignore_preemption_signals)
    feats = [torch.zeros(0, cfg.embed_dim, device=device)]
    for images, _ in loader:
        with autocast(precision, device):
            feats.append(model.encode_image(images.to(device)).float())
    return dist.gather_varlen(torch.cat(feats))


@torch.no_grad()
def evaluate(model, cfg, val, zeroshot, tokenizer, device, precision):
    """Retrieval recall@K on the val split and zero-shot top-1/top-5; every rank embeds its
    shard, the features are gathered, and every rank computes the same metrics."""
    was_training = model.training
    model.eval()
    metrics = {}
    if val is not None:
        texts, txt2img = retrieval_texts(val)
        image_emb = embed_images(model, [r["image"] for r in val], cfg, device, precision)
        tokenize = lambda t: tokenizer(t, cfg.context_length)  # noqa: E731
        text_emb = embed_texts(model.encode_text, texts, tokenize, cfg.batch_size, cfg.embed_dim, device, precision)
        metrics.update(retrieval_metrics(image_emb @ text_emb.T, txt2img))
    if zeroshot is not None:
        paths, labels, classnames, templates = zeroshot
        classifier = zeroshot_classifier_sharded(model.encode_text, tokenizer, classnames, templates,
                                                 cfg.context_length, cfg.embed_dim, device, precision)
        image_emb = embed_images(model, paths, cfg, device, precision)
        metrics.update(zeroshot_metrics(image_emb @ classifier.T, labels))
    model.train(was_training)
    return metrics


# ---- training ----

MODEL_FIELDS = ("image_size", "patch_size", "vision_width", "vision_layers", "vision_heads", "text_width",
                "text_layers", "text_heads", "context_length", "vocab_size", "eos_id", "embed_dim", "mlp_ratio",
                "act", "layer_norm_eps")


def build_model(cfg, tokenizer, saved=None):
    """A fresh model, or one initialised from a Hugging Face folder / our checkpoint (`saved`, when
    the caller has loaded it). The architecture fields of cfg become those of the loaded weights
    (except an --image-size given on the command line, for which the position embeddings are
    interpolated)."""
    if cfg.init_from and os.path.isdir(cfg.init_from):
        model = CLIP.from_hf(cfg.init_from, image_size=cfg.image_size if "image_size" in cfg.cli_keys else None)
        for k in MODEL_FIELDS:
            setattr(cfg, k, getattr(model.cfg, k))
        model.cfg = cfg
    else:
        image_size = cfg.image_size
        if cfg.init_from:
            saved = saved or load_checkpoint(cfg.init_from)
            for k in MODEL_FIELDS:
                setattr(cfg, k, saved["config"][k])
        cfg.vocab_size = cfg.vocab_size or tokenizer.vocab_size
        cfg.eos_id = tokenizer.eos_id if cfg.eos_id < 0 else cfg.eos_id
        model = CLIP(cfg)
        if cfg.init_from:
            model.load_state_dict(saved["model"])
            if "image_size" in getattr(cfg, "cli_keys", ()) and image_size != cfg.image_size:
                model.resize_image(image_size)
    if cfg.vocab_size < tokenizer.vocab_size or cfg.eos_id != tokenizer.eos_id:
        raise UserError(f"tokenizer {tokenizer.name} (vocab {tokenizer.vocab_size}, EOS {tokenizer.eos_id}) does not "
                         f"fit the model (vocab {cfg.vocab_size}, EOS {cfg.eos_id})")
    return model, cfg


def main(argv=None):
    rank, local_rank, world_size, device = dist.setup()
    cfg, ckpt = resolve_config(Config, PRESETS, argv, description=__doc__)
    precision = resolve_precision(cfg.precision, device)
    seed_everything(cfg.seed)                     # the same initial weights on every rank
    os.makedirs(cfg.output_dir, exist_ok=True)
    ours = cfg.init_from and not os.path.isdir(cfg.init_from)
    init = load_checkpoint(cfg.init_from) if ours else None
    if init and not cfg.tokenizer:                # one of our checkpoints: its tokenizer
        cfg.tokenizer = init["config"]["tokenizer"]
    tokenizer = load_tokenizer(cfg.tokenizer, cfg.init_from,
                               use_tiny=not (cfg.train_data or cfg.val_data or cfg.zeroshot_data),
                               clean=open_clip_cleaner(cfg.text_clean))   # ftfy, HTML, whitespace[, lower]
    cfg.tokenizer = tokenizer.name
    model, cfg = build_model(cfg, tokenizer, init)
    del init
    model.to(device)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing()
    loader, sampler, val, zeroshot = build_data(cfg, tokenizer, rank, world_size)
    save_config(cfg, cfg.output_dir)
    log = MetricLog(cfg.output_dir, cfg.report_to, dataclasses.asdict(cfg), project="clip",
                    resumed=ckpt is not None)

    if ckpt:
        model.load_state_dict(ckpt["model"])
    if cfg.eval_only:
        metrics = evaluate(model, cfg, val, zeroshot, tokenizer, device, precision)
        log.write({"step": ckpt["step"] if ckpt else 0, "epoch": 0, "split": "val", **metrics})
        if dist.is_main():
            print(json.dumps(metrics))
        dist.cleanup()
        return metrics

    # DDP, or FSDP2 sharding each transformer block and the rest (--fsdp)
    ddp_model = dist.parallelize(model, cfg.fsdp, device, (Block,), precision_dtype(precision))
    if cfg.compile:
        ddp_model = torch.compile(ddp_model)
    # AdamW as the paper (Sec. 2.5, beta2 0.98, eps 1e-6), decoupled decay off for gains,
    # biases, embeddings and the temperature; the fused kernel.
    optimizer = adamw(param_groups(model, cfg.weight_decay, ("logit_scale",)), lr=cfg.lr,
                      betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    steps_per_epoch = len(loader) // cfg.accum_steps
    check_resume_position(ckpt, steps_per_epoch)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    scheduler = cosine_schedule(optimizer, cfg.warmup_steps, total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    guard = NonFiniteGuard(cfg.max_bad_steps)
    seed_everything(cfg.seed + rank)              # each rank its own stream from here (dropout, ...)
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

    def embed(batch):                             # (images, ids) -> ({"image", "text"}: (B, E) each, scale)
        with autocast(precision, device):
            image_emb, text_emb, logit_scale = ddp_model(*batch)
        return {"image": image_emb.float(), "text": text_emb.float()}, logit_scale.float()

    pbar = tqdm(total=total_steps, initial=step, disable=not dist.is_main(), dynamic_ncols=True)
    metrics, tick, tick_step, stopped = {}, time.time(), step, False
    with Preemption() as preemption:
        while (step < total_steps or evaluated < step) and not stopped:
            unevaluated = evaluated < step    # resumed at an epoch's end, not yet evaluated
            epoch = (step - unevaluated) // steps_per_epoch
            sampler.set_epoch(epoch, skip=(step - epoch * steps_per_epoch) * cfg.accum_steps * cfg.batch_size)
            for group in () if unevaluated else micro_batches(loader, cfg.accum_steps):
                micro = [(images.to(device, non_blocking=True), ids.to(device, non_blocking=True))
                         for images, ids, _ in group]
                # --accum-steps K: the contrastive batch is K x B (x world size), open_clip's feature
                # cache: embed every micro-batch without gradient, then each again with gradient
                # against the others' cached embeddings; the K backward passes sum to one K x B step
                cache = FeatureCache(lambda batch: embed(batch)[0], micro)
                for j, batch in enumerate(micro):
                    last = j == len(micro) - 1
                    with cache.replay(j), sync_gradients(ddp_model, last):
                        live, logit_scale = embed(batch)
                        emb = cache.features(j, live)
                        # the temperature is in every pass; its gradient is taken once (open_clip's
                        # accum_freq takes it in each pass, K times)
                        loss = clip_loss(emb["image"], emb["text"], logit_scale if last else logit_scale.detach())
                        scaler.scale(loss).backward()
                images, ids = micro[-1]
                scaler.unscale_(optimizer)
                grad_norm = grad_norm_(model, cfg.grad_clip_norm)
                # A non-finite loss or gradient skips the update on the device (no host sync)
                ok = guard.check(loss, grad_norm, scaler)
                guard.step(optimizer, scaler, ok)
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                with torch.no_grad():  # open_clip: keep the scale <= 100 for stability (Sec. 2.5)
                    model.logit_scale.clamp_(0, math.log(100))
                step += 1
                pbar.update(1)
                guard.account(step, ok, lambda images=images, ids=ids: first_nonfinite_module(
                    model, {"images": images}, lambda: model(images, ids)))
                if step % cfg.log_every == 0 or step == total_steps:
                    loss_value = dist.all_reduce_mean(loss).item()
                    speed = (step - tick_step) * cfg.accum_steps * cfg.batch_size * world_size / (time.time() - tick)
                    tick, tick_step = time.time(), step
                    lr = optimizer.param_groups[0]["lr"]
                    pbar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", samples_s=f"{speed:.0f}")
                    log.write({"step": step, "epoch": epoch, "split": "train", "loss": loss_value, "lr": lr,
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
                metrics = evaluate(model, cfg, val, zeroshot, tokenizer, device, precision)
            log.write({"step": step, "epoch": epoch, "split": "val", **metrics})
            if metrics and dist.is_main():
                tqdm.write(f"epoch {epoch} step {step}: " + " ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
            # rank 0 decides, so every rank enters checkpoint()'s collective together
            if dist.gather_objects(metrics.get("r_mean", -1.0) > best)[0]:
                best = metrics["r_mean"]
                checkpoint("checkpoint_best.pt")
            evaluated = step
            checkpoint("checkpoint_last.pt")
            stopped = preemption.stop(step, cfg.output_dir)   # a signal during the evaluation
            tick, tick_step = time.time(), step  # samples/s counts training only
    pbar.close()
    if not metrics and not stopped:   # resumed a finished run: evaluate its weights again
        with dist.full_parameters(model):
            metrics = evaluate(model, cfg, val, zeroshot, tokenizer, device, precision)
    if dist.is_main():
        print(json.dumps(metrics or {"step": step}))
    dist.cleanup()
    return metrics


if __name__ == "__main__":
    cli(main)
