"""Pretraining-step benchmark against Salesforce LAVIS 1.0.2: our blip_train.BLIP against
BlipPretrain, our albef_train.ALBEF against AlbefPretrain, our blip2_train.BLIP2 (stage 1) against
Blip2Qformer (all built by tests/lavis/peer.py), same widths, depths, heads, image size, batch,
text length, captions and thread count, alternating, each measurement in a fresh process. Not
collected by pytest.

    bash tests/lavis/setup.sh                      # once: LAVIS in its own venv (~1 min)
    python tests/bench/bench_lavis.py blip|albef|blip2 [--config tiny|compute --rounds 3 --steps 10]

--config tiny: ViT 32 px / patch 8, width 64, 2 layers; MED width 64, 4 layers; batch 16, 1 thread
(mostly Python overhead). --config compute: ViT 96 px / patch 16, width 384, 6 layers, 6 heads;
MED width 384, 6 layers, 6 heads; 32 text tokens; batch 32, 2 threads.

ALBEF: the first half of the text layers are the text encoder, the rest the fusion encoder.

One step = forward (ITC with momentum distillation + queue, ITM with hard negatives, and LM for
BLIP or MLM with distillation for ALBEF), backward and AdamW, as LAVIS's own timing loop. Peak memory is the process's peak RSS during
the timed steps (VmHWM after a reset), on CPU.

BLIP-2: a frozen EVA-layout ViT of the sizes above (MLP ratio 4.3637, as ViT-g), frozen on both
sides (no gradient, not in the optimizer), and a Q-Former with the MED's width, depth, heads and
MLP width, 8 queries, cross-attention every 2nd layer. One step = ITC, ITM with hard negatives
and ITG, backward and AdamW on the trained weights. Ours includes the host-side trim of the
padding columns that no caption reaches (blip2_train.trim_padding, part of our training step:
captions of up to 14 tokens here), while LAVIS pads every caption to max_txt_len (16 in tiny,
32 in compute): ours runs the text passes on fewer tokens, which is part of what is measured;
--no-trim measures ours on the padded captions, as LAVIS runs."""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from tests.bench.bench_clip import status_kb, summarize_steps  # noqa: E402
from tests.lavis import peer  # noqa: E402  (configurations, vocabulary, captions: the same on both sides)


def worker(args):
    import torch
    from common.data import Tokenizer
    from transformers import BertTokenizer
    torch.set_num_threads(args.threads)
    folder = tempfile.mkdtemp()
    # transformers 5 reads a vocabulary file from `vocab=` (`vocab_file=` silently gives the 5 specials)
    BertTokenizer(vocab=peer.vocab_file()).save_pretrained(folder)       # LAVIS's vocabulary
    tok = Tokenizer(folder)
    assert tok.vocab_size > len(peer.WORDS), f"vocabulary not read: {tok.vocab_size} tokens"
    torch.manual_seed(0)
    if args.model == "blip":
        import blip_train
        c = peer.config(args.config)
        cfg = blip_train.Config(**c, vision_mlp_dim=4 * c["vision_width"])
        if args.image_size:
            cfg.image_size = args.image_size
        cfg.vocab_size = tok.vocab_size + 2
        model = blip_train.build_blip(cfg, tok)
    elif args.model == "blip2":
        import blip2_train
        c = peer.config(args.config)
        cfg = blip2_train.Config(
            vision="eva", image_size=args.image_size or c["image_size"], patch_size=c["patch_size"],
            vision_width=c["vision_width"], vision_layers=c["vision_layers"], vision_heads=c["vision_heads"],
            vision_mlp_dim=int(c["vision_width"] * peer.BLIP2["vision_mlp_ratio"]),
            num_query_tokens=peer.BLIP2["num_query_token"],
            qformer_width=c["text_width"], qformer_layers=c["text_layers"], qformer_heads=c["text_heads"],
            qformer_mlp_dim=c["text_mlp_dim"], cross_attention_freq=peer.BLIP2["cross_attention_freq"],
            max_positions=c["max_positions"], embed_dim=c["embed_dim"], max_length=c["max_length"], dropout=0.0)
        model = blip2_train.build_blip2(cfg, tok)      # adds [DEC]: the vocabulary of LAVIS's BLIP-2 tokenizer
        assert model.vision_frozen
    else:
        import albef_train
        c = peer.config(args.config)
        cfg = albef_train.Config(**c, vision_mlp_dim=4 * c["vision_width"],
                                 fusion_layer=int(c["text_layers"] * peer.ALBEF_FUSION_LAYER))
        if args.image_size:
            cfg.image_size = args.image_size
        cfg.vocab_size = tok.vocab_size
        model = albef_train.build_albef(cfg, tok)
    ids = tok(peer.captions(args.batch_size), cfg.max_length)
    mask = (ids != tok.pad_id).long()
    images = torch.randn(args.batch_size, 3, cfg.image_size, cfg.image_size)
    idx = torch.arange(args.batch_size)
    rss_before = status_kb("VmRSS:") / 1024       # as LAVIS's time_steps: after the model is built
    model.train()
    from common.utils import adamw     # the training script's optimizer (fused kernel); LAVIS: torch's default
    opt = adamw([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.05)

    alpha = torch.tensor(0.4)

    def step(i):
        if args.model == "blip2":      # as blip2_train.main: padding columns trimmed on the host first
            step_ids = ids if args.no_trim else blip2_train.trim_padding(ids, tok.pad_id)
            losses = model(dict(images=images, ids=step_ids, mask=(step_ids != tok.pad_id).long(), idx=idx))
        else:
            losses = model(images, ids, mask, idx, alpha, task="pretrain")
        opt.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        opt.step()
        if args.model != "blip2":      # BLIP-2 has no momentum model or queue
            model.finish_step()        # momentum EMA and enqueue, as the training loop
    for i in range(args.warmup):
        step(i)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    times = []
    for i in range(args.steps):
        t = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - t)
    print(json.dumps({"sec_per_step_median": sorted(times)[len(times) // 2], "sec_per_step_min": min(times),
                      "peak_rss_timed_MiB": status_kb("VmHWM:") / 1024, "rss_before_training_MiB": rss_before}))


def run_lavis(args):
    out = tempfile.mktemp(suffix=".json")
    cmd = [args.lavis_python, os.path.join(ROOT, "tests", "lavis", "peer.py"), args.model, "--config", args.config,
           "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--threads", str(args.threads), "--json", out]
    if args.image_size:
        cmd += ["--image-size", str(args.image_size)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    with open(out) as f:
        return json.load(f)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", choices=("blip", "albef", "blip2"))
    p.add_argument("--config", default="tiny", choices=sorted(peer.CONFIGS))
    p.add_argument("--batch-size", type=int, help="default: 16 (tiny) or 32 (compute)")
    p.add_argument("--image-size", type=int, help="default: the configuration's")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, help="default: 1 (tiny) or 2 (compute)")
    p.add_argument("--lavis-python", default=peer.DEFAULT_PYTHON, help="the interpreter of tests/lavis/setup.sh's venv")
    p.add_argument("--no-trim", action="store_true", help="blip2: run ours on the padded captions too, as LAVIS")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    for key, value in peer.RUN_DEFAULTS[args.config].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.worker:
        return worker(args)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    res = {"ours": [], "lavis": []}
    for r in range(args.rounds):
        for impl in ("ours", "lavis") if r % 2 == 0 else ("lavis", "ours"):
            if impl == "ours":
                proc = subprocess.run([sys.executable, __file__, "--worker", *sys.argv[1:]], capture_output=True,
                                      text=True, env=env)
                if proc.returncode:
                    sys.exit(proc.stderr[-3000:])
                out = json.loads(proc.stdout.strip().splitlines()[-1])
            else:
                out = run_lavis(args)
            res[impl].append(out)
            out["training_MiB"] = out["peak_rss_timed_MiB"] - out["rss_before_training_MiB"]
            print(f"round {r} {impl:5s} {out['sec_per_step_median']:.4f} s/step (min {out['sec_per_step_min']:.4f})  peak RSS {out['peak_rss_timed_MiB']:.0f}"
                  f" MiB, of which training {out['training_MiB']:.0f} MiB", flush=True)
    summary = summarize_steps(res, "lavis")
    # whole-process peak RSS includes the libraries each side imports (transformers 5 vs 4.26)
    summary["peak_rss_ratio"] = summary["ours"]["peak_rss_MiB"] / summary["lavis"]["peak_rss_MiB"]
    summary["config"] = {k: v for k, v in vars(args).items() if k not in ("worker", "lavis_python")}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
