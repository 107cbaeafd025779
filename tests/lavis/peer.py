"""Salesforce LAVIS 1.0.2's pretraining models (BlipPretrain, AlbefPretrain, Blip2Qformer stage 1)
built from small random configurations, offline, on CPU: the peer that tests/lavis/check_blip.py
and tests/bench/bench_lavis.py compare our BLIP and ALBEF with. Runs in the environment of tests/lavis/setup.sh
(transformers 4.26, numpy 1); the vocabulary and caption helpers also import in the project's.

    bash tests/lavis/setup.sh
    ~/.cache/blip-lavis-peer/venv/bin/python tests/lavis/peer.py blip [--config compute --threads 2]

The only changes to LAVIS's classes replace what would download: the tokenizer (a BertTokenizer on
a small vocabulary written here, with the special tokens each model family adds), and for BLIP-2
the EVA ViT-g and bert-base Q-Former weights (the same classes, built from small configs).
forward() is LAVIS's own and stateful for BLIP/ALBEF (momentum update, queue, temperature clamp).

    from tests.lavis import peer
    model, batch = peer.build_blip("tiny", batch_size=8)
    ids = peer.tokenize(model, batch)           # the token ids forward() builds
    with peer.deterministic_negatives():        # ITM hard negatives at the argmax, not sampled
        out = model(batch)                      # out.loss_itc, out.loss_itm, out.loss_lm

tests/lavis/ has no __init__.py on purpose: a script run from tests/ has that folder first on
sys.path, where a regular package `lavis` would shadow LAVIS's; a namespace folder does not."""
import argparse
import contextlib
import io
import itertools
import json
import math
import os
import random
import resource
import sys
import tempfile
import time
import types

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "blip-lavis-peer")
DEFAULT_PYTHON = os.path.join(os.environ.get("LAVIS_VENV") or os.path.join(CACHE, "venv"), "bin", "python")

# Architectures in our blip_train.Config's field names; LAVIS's arguments are derived from them.
# tiny: what the first comparisons used (dominated by Python overhead on one thread);
# compute: ViT and MED width 384, 6 layers, 96 px / patch 16 (36 patches), 32 text tokens.
CONFIGS = {
    "tiny": dict(image_size=32, patch_size=8, vision_width=64, vision_layers=2, vision_heads=2,
                 text_width=64, text_layers=4, text_heads=2, text_mlp_dim=256, max_positions=64,
                 embed_dim=32, queue_size=256, max_length=16),
    "compute": dict(image_size=96, patch_size=16, vision_width=384, vision_layers=6, vision_heads=6,
                    text_width=384, text_layers=6, text_heads=6, text_mlp_dim=1536, max_positions=64,
                    embed_dim=256, queue_size=256, max_length=32),
}
# Run settings the benchmarks use with each configuration.
RUN_DEFAULTS = {"tiny": dict(batch_size=16, threads=1), "compute": dict(batch_size=32, threads=2)}
ALBEF_FUSION_LAYER = 0.5        # fraction of the text layers that are text-only (med_config_albef: 6 of 12)
BLIP2 = dict(num_query_token=8, cross_attention_freq=2, vision_mlp_ratio=4.3637)  # EVA ViT-g's MLP ratio


def config(name):
    return dict(CONFIGS[name]) if isinstance(name, str) else dict(name)


# ---- vocabulary, tokenizer, data ----

WORDS = ["".join(w) for w in itertools.product("bdfgklmnprstvz", "aeiou", "bdfgklmnprst")][:500]


def vocab_file():
    """A BERT vocabulary: specials, letters and digits (with ## pieces), punctuation and 500
    three-letter words. Written once into the cache folder; returns its path."""
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *("##" + c for c in chars),
              *".,!?'-", *WORDS]
    text = "\n".join(tokens) + "\n"
    path = os.path.join(CACHE, "vocab.txt")
    try:
        with open(path) as f:
            if f.read() == text:
                return path
    except OSError:
        pass
    os.makedirs(CACHE, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=CACHE)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)      # atomic: concurrent processes never read half a file
    return path


def tokenizer(family):
    """LAVIS's tokenizer for a model family on our vocabulary: BLIP adds [DEC] as BOS and [ENC]
    (BlipBase.init_tokenizer), BLIP-2 adds [DEC] (Blip2Base), ALBEF adds nothing (AlbefBase)."""
    from transformers import BertTokenizer
    tok = BertTokenizer(vocab_file(), do_lower_case=True)
    if family in ("blip", "blip2"):
        tok.add_special_tokens({"bos_token": "[DEC]"})
    if family == "blip":
        tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        tok.enc_token_id = tok.additional_special_tokens_ids[0]
    return tok


def captions(n, seed=0):
    """n captions of 4 to 12 words of the vocabulary, the same for a given seed."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(n)]


def make_batch(batch_size, image_size, seed=0):
    """The samples dict LAVIS's forward() takes (epoch/iters drive ALBEF/BLIP's alpha ramp-up)."""
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(batch_size, 3, image_size, image_size, generator=g),
            "text_input": captions(batch_size, seed), "epoch": 0, "iters": 0, "num_iters_per_epoch": 100}


def tokenize(model, batch):
    """The BatchEncoding LAVIS's BLIP/ALBEF/BLIP-2 forward() builds from batch["text_input"]."""
    return model.tokenizer(batch["text_input"], padding="max_length", truncation=True,
                           max_length=model.max_txt_len, return_tensors="pt")


@contextlib.contextmanager
def deterministic_negatives():
    """ITM hard negatives at the argmax of the weights instead of torch.multinomial draws (all
    three LAVIS models, and our BLIP, draw one index per row with it), so that two implementations
    pick the same negatives whatever the order of their random calls."""
    original = torch.multinomial

    def argmax(weights, num_samples, *args, **kwargs):
        assert num_samples == 1, "only one draw per row is pinned"
        return weights.argmax(dim=-1, keepdim=True)

    torch.multinomial = argmax
    try:
        yield
    finally:
        torch.multinomial = original


# ---- LAVIS models ----

def import_lavis():
    """`import lavis` runs lavis/__init__.py, which imports every model module; one of them
    (img2prompt_models) imports spacy at module level, which the models here never use."""
    if "spacy" not in sys.modules:
        try:
            import spacy  # noqa: F401
        except ImportError:
            def load(*args, **kwargs):
                raise RuntimeError("spacy is a stub in tests/lavis/peer.py")

            stub = types.ModuleType("spacy")
            stub.load = load
            sys.modules["spacy"] = stub
    import warnings
    for category in (FutureWarning, UserWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    import lavis.models  # noqa: F401


def _single_process_group():
    """A one-process gloo group through a file (Blip2Qformer.forward calls dist.get_rank())."""
    import torch.distributed as dist
    if dist.is_initialized():
        return
    path = os.path.join(tempfile.mkdtemp(prefix="lavis-peer-"), "store")
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=0, world_size=1)


def _with_tokenizer(cls, family, **overrides):
    """A subclass of a LAVIS model whose init_tokenizer reads our vocabulary (no download)."""
    return type(f"Tiny{cls.__name__}", (cls,), {"init_tokenizer": classmethod(lambda c: tokenizer(family)),
                                               **overrides})


def _vit(c):
    """LAVIS's timm-style ViT (BLIP/ALBEF), LayerNorm eps 1e-6 as from_config's default."""
    from lavis.models.vit import VisionTransformerEncoder
    vit = VisionTransformerEncoder(img_size=c["image_size"], patch_size=c["patch_size"], embed_dim=c["vision_width"],
                                   depth=c["vision_layers"], num_heads=c["vision_heads"], mlp_ratio=4.0,
                                   use_grad_checkpointing=False, ckpt_layer=0, drop_path_rate=0.0, norm_layer=None)
    vit.vision_width = c["vision_width"]       # set by VisionTransformerEncoder.from_config
    return vit


def _med_config(c, vocab_size, dropout, **extra):
    """configs/models/med_config.json at our sizes: BERT with cross-attention, no token types."""
    from transformers import BertConfig
    return BertConfig(vocab_size=vocab_size, hidden_size=c["text_width"], num_hidden_layers=c["text_layers"],
                      num_attention_heads=c["text_heads"], intermediate_size=c["text_mlp_dim"],
                      max_position_embeddings=c["max_positions"], hidden_act="gelu", hidden_dropout_prob=dropout,
                      attention_probs_dropout_prob=dropout, initializer_range=0.02, layer_norm_eps=1e-12,
                      pad_token_id=0, add_type_embeddings=False, encoder_width=c["vision_width"],
                      add_cross_attention=True, **extra)


def _check_queue(c, batch_size):
    if c["queue_size"] % batch_size:
        raise ValueError(f"LAVIS needs the queue ({c['queue_size']}) to be a multiple of the batch ({batch_size})")


def build_blip(cfg="tiny", batch_size=16, dropout=0.0, seed=0):
    """LAVIS BlipPretrain (ITC with momentum distillation and queues, ITM, LM) -> (model, batch)."""
    import_lavis()
    from lavis.models.blip_models.blip_pretrain import BlipPretrain
    from lavis.models.med import XBertEncoder, XBertLMHeadDecoder
    c = config(cfg)
    _check_queue(c, batch_size)
    torch.manual_seed(seed)
    med = _med_config(c, len(tokenizer("blip")), dropout)
    vit = _vit(c)
    encoder, decoder = XBertEncoder(config=med, add_pooling_layer=False), XBertLMHeadDecoder(config=med)
    with contextlib.redirect_stdout(io.StringIO()):        # tie_encoder_decoder_weights prints every tie
        model = _with_tokenizer(BlipPretrain, "blip")(
            image_encoder=vit, text_encoder=encoder, text_decoder=decoder, queue_size=c["queue_size"], alpha=0.4,
            embed_dim=c["embed_dim"], momentum=0.995, tie_enc_dec_weights=True, max_txt_len=c["max_length"])
    model.reset_queue_ptr()
    return model, make_batch(batch_size, c["image_size"], seed)


def build_albef(cfg="tiny", batch_size=16, dropout=0.0, seed=0):
    """LAVIS AlbefPretrain (ITC with momentum distillation and queues, ITM, MLM) -> (model, batch).
    The first half of the text layers are text-only, the rest fuse the image (med_config_albef)."""
    import_lavis()
    from lavis.models.albef_models.albef_pretrain import AlbefPretrain
    from lavis.models.med import BertForMaskedLM
    c = config(cfg)
    _check_queue(c, batch_size)
    torch.manual_seed(seed)
    # AlbefPretrain never resizes the embeddings: the config's vocabulary is the tokenizer's
    med = _med_config(c, len(tokenizer("albef")), dropout,
                      fusion_layer=int(c["text_layers"] * ALBEF_FUSION_LAYER))
    model = _with_tokenizer(AlbefPretrain, "albef")(
        image_encoder=_vit(c), text_encoder=BertForMaskedLM(config=med), queue_size=c["queue_size"],
        embed_dim=c["embed_dim"], mlm_mask_prob=0.15, temp=0.07, momentum=0.995, alpha=0.4,
        max_txt_len=c["max_length"])
    return model, make_batch(batch_size, c["image_size"], seed)


def build_blip2(cfg="tiny", batch_size=16, dropout=0.0, seed=0):
    """LAVIS Blip2Qformer, stage 1 (ITC, ITM, image-grounded LM over learned queries), with a small
    frozen EVA ViT (LAVIS's class for ViT-g, in fp32: fp16 weights fail on CPU without autocast)
    and a small Q-Former (LAVIS's BertLMHeadModel) in place of the downloaded ones -> (model, batch)."""
    import_lavis()
    from functools import partial
    from lavis.models.blip2_models.blip2 import LayerNorm
    from lavis.models.blip2_models.blip2_qformer import Blip2Qformer
    from lavis.models.blip2_models.Qformer import BertConfig, BertLMHeadModel
    from lavis.models.eva_vit import VisionTransformer
    c = config(cfg)
    _single_process_group()
    torch.manual_seed(seed)

    def init_vision_encoder(cls, model_name, img_size, drop_path_rate, use_grad_checkpoint, precision):
        vit = VisionTransformer(img_size=img_size, patch_size=c["patch_size"], use_mean_pooling=False,
                                embed_dim=c["vision_width"], depth=c["vision_layers"], num_heads=c["vision_heads"],
                                mlp_ratio=BLIP2["vision_mlp_ratio"], qkv_bias=True, drop_path_rate=drop_path_rate,
                                norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_checkpoint=use_grad_checkpoint)
        return vit, LayerNorm(vit.num_features)

    def init_Qformer(cls, num_query_token, vision_width, cross_attention_freq=2):
        qc = BertConfig(vocab_size=len(tokenizer("blip2")), hidden_size=c["text_width"],
                        num_hidden_layers=c["text_layers"], num_attention_heads=c["text_heads"],
                        intermediate_size=c["text_mlp_dim"], max_position_embeddings=c["max_positions"],
                        hidden_act="gelu", hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                        initializer_range=0.02, layer_norm_eps=1e-12, pad_token_id=0, type_vocab_size=2)
        qc.encoder_width, qc.add_cross_attention = vision_width, True       # as Blip2Base.init_Qformer
        qc.cross_attention_freq, qc.query_length = cross_attention_freq, num_query_token
        query_tokens = torch.nn.Parameter(torch.zeros(1, num_query_token, qc.hidden_size))
        query_tokens.data.normal_(mean=0.0, std=qc.initializer_range)
        return BertLMHeadModel(config=qc), query_tokens

    cls = _with_tokenizer(Blip2Qformer, "blip2", init_vision_encoder=classmethod(init_vision_encoder),
                          init_Qformer=classmethod(init_Qformer))
    model = cls(vit_model="eva_clip_g", img_size=c["image_size"], drop_path_rate=0.0, use_grad_checkpoint=False,
                vit_precision="fp32", freeze_vit=True, num_query_token=BLIP2["num_query_token"],
                cross_attention_freq=BLIP2["cross_attention_freq"], embed_dim=c["embed_dim"],
                max_txt_len=c["max_length"])
    return model, make_batch(batch_size, c["image_size"], seed)


BUILDERS = {"blip": build_blip, "albef": build_albef, "blip2": build_blip2}


# ---- timing ----

def proc_status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])


def reset_peak_rss():
    """Reset the process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def time_steps(model, batch, warmup=2, steps=10):
    """Training steps as LAVIS's runner: forward (out.loss), backward, AdamW (lr 1e-4, weight
    decay 0.05). Returns the median step time, the RSS after the model is built and the peak RSS
    of the timed steps, and the first and last losses."""
    rss_before = proc_status_kb("VmRSS") / 1024
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.05)
    keys = ("loss", "loss_itc", "loss_itm", "loss_lm", "loss_mlm")
    times, losses = [], []
    for i in range(warmup + steps):
        if i == warmup:
            reset_peak_rss()
        batch["iters"] = i
        t = time.perf_counter()
        out = model(batch)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t)
            losses.append({k: float(getattr(out, k)) for k in keys if getattr(out, k, None) is not None})
    return {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "batch_size": batch["image"].shape[0], "image_size": batch["image"].shape[-1],
            "params": sum(p.numel() for p in model.parameters()),
            "sec_per_step_median": sorted(times)[len(times) // 2], "sec_per_step_min": min(times),
            "rss_before_training_MiB": rss_before, "peak_rss_timed_MiB": proc_status_kb("VmHWM") / 1024,
            "max_rss_process_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "first_losses": losses[0], "last_losses": losses[-1]}


def main():
    p = argparse.ArgumentParser(description="Time training steps of a LAVIS model built from a small random config.")
    p.add_argument("model", choices=[*sorted(BUILDERS), "all"], help="all: each in turn (CI runs one step of each)")
    p.add_argument("--config", default="tiny", choices=sorted(CONFIGS))
    p.add_argument("--batch-size", type=int, help="default: 16 (tiny) or 32 (compute)")
    p.add_argument("--image-size", type=int, help="default: the configuration's")
    p.add_argument("--threads", type=int, help="torch.set_num_threads; default: 1 (tiny) or 2 (compute)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args()
    run = {**RUN_DEFAULTS[args.config], **{k: v for k, v in (("batch_size", args.batch_size),
                                                               ("threads", args.threads)) if v}}
    torch.set_num_threads(run["threads"])
    cfg = config(args.config)
    if args.image_size:
        cfg["image_size"] = args.image_size
    results = []
    for name in sorted(BUILDERS) if args.model == "all" else [args.model]:
        model, batch = BUILDERS[name](cfg, batch_size=run["batch_size"], dropout=args.dropout, seed=args.seed)
        results.append({"model": f"lavis_{name}", "config": args.config,
                        **time_steps(model, batch, warmup=args.warmup, steps=args.steps)})
        print(json.dumps(results[-1]), flush=True)
        bad = [k for k, v in results[-1]["last_losses"].items() if not math.isfinite(v)]
        if bad:
            sys.exit(f"lavis_{name}: non-finite {bad}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results[0] if len(results) == 1 else results, f, indent=1)


if __name__ == "__main__":
    main()
