"""Training-step benchmark: our CLIP against open_clip's CLIP with the same architecture, batch,
precision and thread count, alternating in one run (each measurement in a fresh process so
that peak memory is its own). Not collected by pytest.

    python tests/bench/bench_clip.py                                  # tiny preset, CPU
    python tests/bench/bench_clip.py --config compute                 # width 384, 6 layers, 96 px, batch 32, CPU
    python tests/bench/bench_clip.py --preset vit-b-32 --batch-size 128 --precision bf16   # on a GPU
    python tests/bench/bench_clip.py --config compute --patch-dropout 0.5      # FLIP, both sides

Reports samples/s and peak memory (CUDA: max allocated; CPU: peak RSS growth during the run)
for each and the ratio ours / open_clip."""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
# --config compute: a compute-bound CPU configuration (the tiny preset mostly measures Python
# overhead), the same as tests/bench/bench_lavis.py's: both towers width 384, 6 layers, 6 heads;
# 96 px / patch 16 (36 patches); 32 text tokens; batch 32 on 2 threads.
COMPUTE = dict(image_size=96, patch_size=16, vision_width=384, vision_layers=6, vision_heads=6, text_width=384,
               text_layers=6, text_heads=6, context_length=32, embed_dim=256)
RUN_DEFAULTS = {"preset": dict(batch_size=128, threads=2), "compute": dict(batch_size=32, threads=2)}


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def status_kb(field):
    """A field of /proc/self/status in kB (VmRSS: now, VmHWM: the peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])


def summarize_steps(res, peer):
    """{side: [a worker's output per round]} (sec_per_step_median/_min, peak_rss_timed_MiB,
    training_MiB) -> medians over the rounds, the fastest step of all rounds (on a shared machine a
    busy core can slow a 2-thread step ~10x: the least disturbed estimate), and the ratios: `peer`'s
    time per step over ours, our training memory over `peer`'s."""
    summary = {k: {key: statistics.median(x[src] for x in v) for key, src in (
        ("sec_per_step", "sec_per_step_median"), ("peak_rss_MiB", "peak_rss_timed_MiB"),
        ("training_MiB", "training_MiB"))} for k, v in res.items()}
    for k, v in res.items():
        summary[k]["sec_per_step_best"] = min(x["sec_per_step_min"] for x in v)
    summary["throughput_ratio"] = summary[peer]["sec_per_step"] / summary["ours"]["sec_per_step"]
    summary["throughput_ratio_best"] = summary[peer]["sec_per_step_best"] / summary["ours"]["sec_per_step_best"]
    summary["training_memory_ratio"] = summary["ours"]["training_MiB"] / max(summary[peer]["training_MiB"], 1e-9)
    return summary


def build(impl, cfg, device):
    if impl == "ours":
        import clip_train
        model = clip_train.CLIP(cfg).to(device)
        return model, clip_train.clip_loss, lambda out: out
    import open_clip
    model = open_clip.model.CLIP(
        cfg.embed_dim,
        vision_cfg=dict(layers=cfg.vision_layers, width=cfg.vision_width, head_width=cfg.vision_width // cfg.vision_heads,
                        patch_size=cfg.patch_size, image_size=cfg.image_size, mlp_ratio=cfg.mlp_ratio,
                        patch_dropout=cfg.patch_dropout),
        text_cfg=dict(context_length=cfg.context_length, vocab_size=cfg.vocab_size, width=cfg.text_width,
                      heads=cfg.text_heads, layers=cfg.text_layers, mlp_ratio=cfg.mlp_ratio),
        quick_gelu=cfg.act == "quick_gelu").to(device)
    loss = open_clip.loss.ClipLoss()
    return model, loss, lambda out: out[:3]  # (image_features, text_features, logit_scale.exp())


def worker(args):
    import torch
    import clip_train
    from common.utils import autocast
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = clip_train.Config(**{**clip_train.PRESETS[args.preset], "preset": args.preset,
                               **(COMPUTE if args.config == "compute" else {})})
    cfg.vocab_size = cfg.vocab_size or 64
    cfg.patch_dropout = args.patch_dropout
    cfg.image_size = args.image_size or cfg.image_size
    cfg.eos_id = cfg.vocab_size - 1   # open_clip pools at argmax(ids): EOS must be the largest id
    base = rss_mb()
    torch.manual_seed(0)
    model, loss_fn, unpack = build(args.impl, cfg, device)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    # each side's training optimizer: ours the fused kernel (common.utils.adamw), open_clip torch's default
    if args.impl == "ours":
        from common.utils import adamw
        opt = adamw(model.parameters(), lr=1e-4)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    B = args.batch_size
    images = torch.randn(B, 3, cfg.image_size, cfg.image_size, device=device)
    ids = torch.randint(1, cfg.vocab_size - 1, (B, cfg.context_length), device=device)
    ids[torch.arange(B), torch.randint(2, cfg.context_length, (B,))] = cfg.eos_id
    def step():
        with autocast(args.precision, device):
            out = model(images, ids)
        img, txt, scale = unpack(out)
        loss = loss_fn(img.float(), txt.float(), scale.float())
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base)
    print(json.dumps({"impl": args.impl, "samples_per_s": B * args.steps / elapsed, "peak_mem_mb": peak,
                      "device": str(device)}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--config", default="preset", choices=sorted(RUN_DEFAULTS),
                   help="compute: the preset's architecture replaced by COMPUTE's")
    p.add_argument("--batch-size", type=int, help="default: 128 (preset) or 32 (compute)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, help="default: 2")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--patch-dropout", type=float, default=0.0, help="FLIP: on both sides")
    p.add_argument("--image-size", type=int, help="default: the configuration's")
    p.add_argument("--impl", help=argparse.SUPPRESS)
    args = p.parse_args()
    for key, value in RUN_DEFAULTS[args.config].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.impl:
        return worker(args)
    alternate(__file__, args)


def alternate(script, args, keep=(), describe=lambda res: ""):
    """Run `script` (this command line plus `--impl ours|open_clip`) for args.rounds rounds, the
    order swapped every round, each run a fresh process with OMP_NUM_THREADS=args.threads; print
    every round (`describe(result)` appended) and the summary: medians, ratios, the configuration,
    and the first round's `keep` fields per implementation."""
    results = {"ours": [], "open_clip": []}
    passthrough = list(sys.argv[1:])
    for r in range(args.rounds):
        for impl in ("ours", "open_clip") if r % 2 == 0 else ("open_clip", "ours"):
            out = subprocess.run([sys.executable, script, *passthrough, "--impl", impl], capture_output=True,
                                 text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
            if out.returncode:
                sys.exit(out.stderr)
            res = json.loads(out.stdout.strip().splitlines()[-1])
            results[impl].append(res)
            print(f"round {r} {impl:9s} {res['samples_per_s']:8.1f} samples/s  peak {res['peak_mem_mb']:8.1f} MB"
                  + describe(res), flush=True)
    summary = {}
    for impl, rs in results.items():
        summary[impl] = {"samples_per_s": statistics.median(x["samples_per_s"] for x in rs),
                         "peak_mem_mb": statistics.median(x["peak_mem_mb"] for x in rs),
                         **{k: rs[0][k] for k in keep}}
    summary["throughput_ratio"] = summary["ours"]["samples_per_s"] / summary["open_clip"]["samples_per_s"]
    summary["memory_ratio"] = summary["ours"]["peak_mem_mb"] / summary["open_clip"]["peak_mem_mb"]
    summary["config"] = {k: v for k, v in vars(args).items() if k != "impl"}
    summary["device"] = results["ours"][0]["device"]
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
