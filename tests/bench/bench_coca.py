"""CoCa benchmarks. Not collected by pytest.

1. Training step (forward + loss + backward + AdamW step): our CoCa against open_clip's CoCa with
   the same architecture, batch, precision and thread count, alternating in one run (each
   measurement in a fresh process so that peak memory is its own). Reports samples/s and peak
   memory (CUDA: max allocated; CPU: peak RSS growth during the run) for each and the ratio
   ours / open_clip (medians over rounds).

    python tests/bench/bench_coca.py                                  # tiny preset, batch 64, CPU
    python tests/bench/bench_coca.py --config compute                 # width 384, 96 px, vocab 49408, batch 16, CPU
    python tests/bench/bench_coca.py --preset coca-vit-b-32 --batch-size 128 --precision bf16   # on a GPU

   Each side runs its own training loop's step. Ours (coca_train.py's loop): trim_padding and
   caption_positions on the host, the copy to the device, model(images, ids, positions) and
   compute_losses (caption loss x 2 + contrastive loss x 1) under autocast, common.utils.adamw
   (the fused kernel). open_clip (open_clip_train's loop): the full-context ids copied to the
   device, model(images, ids) and CoCaLoss(caption 2, clip 1, pad_id 0) under autocast,
   torch.optim.AdamW. Both get the same images (random, on the device) and the same captions:
   rows [SOT] + n random tokens + [EOT] + padding (id 0) to the context length, n uniform in
   --caption-tokens (default 8-20, roughly COCO's captions in CLIP BPE), a few different batches
   in turn. What padding trimming saves (the text towers and the vocabulary projection run on the
   captions' length, not the context's) is part of what is measured; --caption-tokens 30-30 (or
   up to context_length - 2) measures the two with (nearly) nothing to trim.

2. Captioning (--generation): our CoCa.generate with and without the KV cache, beam search
   (--num-beams, default 6, open_clip's) and greedy, same random weights and images, alternating,
   in one process. The image tokens are computed once (as coca_train.evaluate does: the ViT is
   the same either way) and only decoding is timed. min_length = max_length (default 30, open_clip's
   seq_len), so [EOT] never wins and every row decodes the full length whatever the random weights
   prefer; both paths must give the same tokens (checked in fp32). Reports images/s of each and
   the speed-up cached / uncached (medians over rounds). One thread by default (as
   tests/bench/bench_generation.py): decoding one token runs many small ops, and on a loaded 2-core
   machine each op of a 2-thread run can wait milliseconds for the second thread.

    python tests/bench/bench_coca.py --generation                     # tiny preset, batch 8, CPU
    python tests/bench/bench_coca.py --generation --config compute
    python tests/bench/bench_coca.py --generation --preset coca-vit-b-32 --batch-size 32 --precision bf16   # GPU
"""
import argparse
import json
import os
import resource
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
# --config compute: a compute-bound CPU configuration (the tiny preset mostly measures Python
# overhead): ViT width 384, 6 layers, 6 heads, 96 px / patch 16 (36 patches); a 64-query pooler
# (6 heads); text width 384 (= embed_dim, which open_clip's decoder requires), 6 heads, 4 unimodal
# + 4 multimodal layers, 32 tokens; CLIP BPE's 49408-token vocabulary (the vocabulary projection
# is a large part of the decoder's cost). Batch 16 on 2 threads.
COMPUTE = dict(image_size=96, patch_size=16, vision_width=384, vision_layers=6, vision_heads=6, n_queries=64,
               pooler_heads=6, text_width=384, text_heads=6, text_layers=4, decoder_layers=4, context_length=32,
               vocab_size=49408, embed_dim=384)
RUN_DEFAULTS = {"preset": dict(threads=2), "compute": dict(batch_size=16, threads=2)}
PAD = 0
N_BATCHES = 4           # caption batches used in turn (trimming sees each batch's own longest caption)


from tests.bench.bench_clip import alternate, rss_mb  # noqa: E402  (the same rounds and peak RSS as the CLIP benchmark)


def make_config(args):
    import coca_train
    cfg = coca_train.Config(**{**coca_train.PRESETS[args.preset], "preset": args.preset,
                               **(COMPUTE if args.config == "compute" else {})})
    cfg.vocab_size = cfg.vocab_size or 64      # tiny: no tokenizer here (the tiny set's has 49 tokens)
    cfg.pad_id = PAD
    return cfg


def special_ids(cfg):
    """[SOT], [EOT]: the two last ids, as CLIP BPE's 49406 / 49407."""
    return cfg.vocab_size - 2, cfg.vocab_size - 1


def caption_ids(cfg, batch_size, lengths, seed):
    """(B, context_length) rows [SOT] + n random tokens + [EOT] + padding, n uniform in `lengths`."""
    import torch
    lo, hi = lengths
    sot, eot = special_ids(cfg)
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((batch_size, cfg.context_length), PAD, dtype=torch.long)
    for row, n in zip(ids, torch.randint(lo, hi + 1, (batch_size,), generator=g).tolist()):
        row[0] = sot
        row[1:n + 1] = torch.randint(1, sot, (n,), generator=g)      # never PAD, SOT or EOT
        row[n + 1] = eot
    return ids


def build_open_clip(cfg, device):
    import torch
    from open_clip.coca_model import CoCa
    L, V = cfg.context_length, cfg.vocab_size
    model = CoCa(
        cfg.embed_dim,
        multimodal_cfg=dict(context_length=L, vocab_size=V, width=cfg.text_width, heads=cfg.text_heads,
                            layers=cfg.decoder_layers, mlp_ratio=cfg.mlp_ratio),
        text_cfg=dict(context_length=L, vocab_size=V, width=cfg.text_width, heads=cfg.text_heads,
                      layers=cfg.text_layers, mlp_ratio=cfg.mlp_ratio, embed_cls=True, output_tokens=True),
        vision_cfg=dict(image_size=cfg.image_size, patch_size=cfg.patch_size, width=cfg.vision_width,
                        layers=cfg.vision_layers, head_width=cfg.vision_width // cfg.vision_heads,
                        mlp_ratio=cfg.mlp_ratio, attentional_pool=True, attn_pooler_heads=cfg.pooler_heads,
                        attn_pooler_queries=cfg.n_queries, output_tokens=True),
        quick_gelu=cfg.act == "quick_gelu", pad_id=PAD)
    with torch.no_grad():   # torch.empty in open_clip (its init_parameters is never called)
        torch.nn.init.normal_(model.text_decoder.text_projection, std=cfg.text_width ** -0.5)
    return model.to(device)


def worker(args):
    import torch
    import coca_train
    from common.utils import adamw, autocast
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = make_config(args)
    B = args.batch_size
    batches = [caption_ids(cfg, B, args.caption_tokens, seed=1 + i) for i in range(N_BATCHES)]   # host tensors
    base = rss_mb()
    torch.manual_seed(0)
    if args.impl == "ours":
        model = coca_train.CoCa(cfg, pad_id=PAD, eos_id=special_ids(cfg)[1]).to(device)
        opt = adamw(model.parameters(), lr=1e-4)      # coca_train's optimizer: the fused kernel
    else:
        from open_clip.loss import CoCaLoss
        model = build_open_clip(cfg, device)
        loss_fn = CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0, pad_id=PAD)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)   # open_clip_train's: torch's default
    model.train()
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    images = torch.randn(B, 3, cfg.image_size, cfg.image_size, device=device)
    n_params = sum(p.numel() for p in model.parameters())
    lengths = []

    def step(i):
        ids = batches[i % N_BATCHES]
        if args.impl == "ours":                  # as coca_train.main's loop
            ids = coca_train.trim_padding(ids, PAD)
            positions, targets = coca_train.caption_positions(ids, PAD)
            ids = ids.to(device, non_blocking=True)
            positions, targets = positions.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            with autocast(args.precision, device):
                loss, _ = coca_train.compute_losses(model, cfg, (images, ids, positions, targets))
        else:                                    # as open_clip_train's train_one_epoch
            ids = ids.to(device, non_blocking=True)
            with autocast(args.precision, device):
                out = model(images, ids)
                loss = sum(loss_fn(**out, output_dict=True).values())
        lengths.append(ids.shape[1])
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    for i in range(args.warmup):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for i in range(args.steps):
        step(args.warmup + i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base)
    print(json.dumps({"impl": args.impl, "samples_per_s": B * args.steps / elapsed, "peak_mem_mb": peak,
                      "params": n_params, "text_length": statistics.mean(lengths), "device": str(device)}))


def train_bench(args):
    alternate(__file__, args, keep=("params", "text_length"),
              describe=lambda res: f"  text length {res['text_length']:.1f}  params {res['params'] / 1e6:.2f} M")


def generation_bench(args):
    import torch
    import coca_train
    from common.utils import autocast
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = make_config(args)
    if args.max_length > cfg.context_length:
        sys.exit(f"--max-length {args.max_length} exceeds the context of {cfg.context_length} tokens")
    sot, eot = special_ids(cfg)
    torch.manual_seed(0)
    model = coca_train.CoCa(cfg, pad_id=PAD, eos_id=eot).to(device).eval()
    B = args.batch_size
    images = torch.randn(B, 3, cfg.image_size, cfg.image_size, device=device)
    with torch.no_grad(), autocast(args.precision, device):
        tokens = model.image_features(images)[1]
    min_length = args.max_length if args.min_length is None else args.min_length
    print(f"# {args.preset if args.config == 'preset' else 'compute'}: {cfg.image_size} px, {tokens.shape[1]} image "
          f"tokens of width {cfg.embed_dim}; text width {cfg.text_width}, {cfg.text_layers} + {cfg.decoder_layers} "
          f"layers; vocab {cfg.vocab_size}; batch {B}; {args.precision}; {args.threads} thread(s) on {device}; "
          f"max_length {args.max_length}, min_length {min_length}; {args.rounds} round(s)")
    print("| decoding | uncached images/s | cached images/s | speed-up |" + (" uncached / cached peak MB |"
                                                                          if device.type == "cuda" else ""))
    print("|---|---|---|---|" + ("---|" if device.type == "cuda" else ""))
    summary = {}
    for beams in (args.num_beams, 1):
        kw = dict(image_tokens=tokens, sot_id=sot, eos_id=eot, num_beams=beams, max_length=args.max_length,
                  min_length=min_length)

        def run(use_cache):
            with autocast(args.precision, device):
                out = model.generate(None, use_cache=use_cache, **kw)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return out
        for _ in range(args.warmup):
            for use_cache in (False, True):
                run(use_cache)
        times, outs, peaks = {True: [], False: []}, {}, {True: 0.0, False: 0.0}
        for r in range(args.rounds):
            for use_cache in (False, True) if r % 2 == 0 else (True, False):
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                tick = time.perf_counter()
                outs[use_cache] = run(use_cache)
                times[use_cache].append(time.perf_counter() - tick)
                if device.type == "cuda":
                    peaks[use_cache] = max(peaks[use_cache], torch.cuda.max_memory_allocated() / 2**20)
        name = f"beam search ({beams} beams)" if beams > 1 else "greedy"
        same = torch.equal(outs[True], outs[False])
        if not same:
            differ = int((outs[True] != outs[False]).any(1).sum())
            if args.precision == "fp32":
                sys.exit(f"{name}: the cache changed the tokens of {differ} of {B} captions")
            print(f"# {name}: {differ} of {B} captions differ between cached and uncached ({args.precision})")
        off, on = B / statistics.median(times[False]), B / statistics.median(times[True])
        row = f"| {name} | {off:.2f} | {on:.2f} | **{on / off:.2f}x** |"
        if device.type == "cuda":
            row += f" {peaks[False]:.0f} / {peaks[True]:.0f} |"
        print(row, flush=True)
        summary["beam" if beams > 1 else "greedy"] = {
            "uncached_images_per_s": off, "cached_images_per_s": on, "speedup": on / off, "same_tokens": same,
            "length": outs[True].shape[1], **({"peak_mem_mb": {"uncached": peaks[False], "cached": peaks[True]}}
                                              if device.type == "cuda" else {})}
    summary["config"] = {k: v for k, v in vars(args).items() if k != "impl"}
    summary["device"] = str(device)
    print(json.dumps(summary))


def caption_range(text):
    lo, _, hi = text.partition("-")
    lo, hi = int(lo), int(hi or lo)
    if not 0 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"--caption-tokens: MIN-MAX with 0 <= MIN <= MAX, not {text!r}")
    return lo, hi


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--config", default="preset", choices=sorted(RUN_DEFAULTS),
                   help="compute: the preset's architecture replaced by COMPUTE's")
    p.add_argument("--generation", action="store_true", help="captioning with and without the KV cache instead")
    p.add_argument("--batch-size", type=int,
                   help="default: training the preset's (tiny 64) or 16 (compute); generation 8")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, help="default: 3 training steps, 1 generation call per setting")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, help="default: 2 (training), 1 (generation)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--caption-tokens", type=caption_range, default=(8, 20), metavar="MIN-MAX",
                   help="caption tokens between [SOT] and [EOT], uniform (default 8-20, roughly COCO)")
    p.add_argument("--num-beams", type=int, default=6, help="generation: beam search width (greedy runs too)")
    p.add_argument("--max-length", type=int, default=30, help="generation: tokens including [SOT]")
    p.add_argument("--min-length", type=int, help="generation: default --max-length (every row runs every step)")
    p.add_argument("--impl", help=argparse.SUPPRESS)
    args = p.parse_args()
    import coca_train
    if args.preset not in coca_train.PRESETS:
        p.error(f"--preset must be one of {', '.join(coca_train.PRESETS)}")
    if args.generation:     # bench_generation.py's defaults
        args.batch_size = args.batch_size or 8
        args.threads = args.threads or 1
    for key, value in RUN_DEFAULTS[args.config].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.batch_size is None:
        args.batch_size = make_config(args).batch_size
    if args.warmup is None:
        args.warmup = 1 if args.generation else 3
    if args.generation:
        return generation_bench(args)
    context = make_config(args).context_length
    if args.caption_tokens[1] + 2 > context:
        p.error(f"--caption-tokens {args.caption_tokens[1]} + [SOT] + [EOT] exceeds the context of {context}")
    if args.impl:
        return worker(args)
    train_bench(args)


if __name__ == "__main__":
    main()
