"""BLIP pretraining-step benchmark: our blip_train.BLIP against Salesforce LAVIS 1.0.2's
BlipPretrain, same widths, depths, heads, image size, batch, text length and thread count,
alternating, each measurement in a fresh process. Not collected by pytest.

    bash ../shared/peers/lavis/setup.sh            # once: LAVIS in its own venv (~3.5 min)
    python tests/bench_blip.py [--batch-size 16 --image-size 32 --steps 10 --rounds 3 --threads 1]

One step = forward (ITC with momentum distillation + queue, ITM with hard negatives, LM),
backward and AdamW, as LAVIS's own timing loop. Peak memory is the process's peak RSS during
the timed steps (VmHWM after a reset), on CPU."""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
LAVIS_DIR = os.path.join(ROOT, "..", "shared", "peers", "lavis")
# The LAVIS peer's tiny configuration (run_blip.py TINY), mirrored field by field.
TINY = dict(patch_size=8, vision_width=64, vision_layers=2, vision_heads=2, text_width=64, text_layers=4,
            text_heads=2, text_mlp_dim=256, max_positions=64, embed_dim=32, queue_size=256, max_length=16)


def status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])


def worker(args):
    import random
    import torch
    import blip_train
    from common.data import Tokenizer
    from transformers import BertTokenizer
    torch.set_num_threads(args.threads)
    folder = tempfile.mkdtemp()
    BertTokenizer(vocab=os.path.join(LAVIS_DIR, "tiny_vocab.txt")).save_pretrained(folder)   # LAVIS's vocabulary
    tok = Tokenizer(folder)
    cfg = blip_train.Config(image_size=args.image_size, **TINY)
    cfg.vocab_size = tok.vocab_size + 2
    torch.manual_seed(0)
    model = blip_train.build_blip(cfg, tok)
    words = [w for w in tok.tok.get_vocab() if w.isalpha()]
    rng = random.Random(0)
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) for _ in range(args.batch_size)]
    ids = tok(texts, cfg.max_length)
    mask = (ids != tok.pad_id).long()
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    idx = torch.arange(args.batch_size)
    rss_before = status_kb("VmRSS:") / 1024       # as LAVIS's time_steps: after the model is built
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.05)

    def step(i):
        losses = model(images, ids, mask, idx, alpha=0.4, task="pretrain")
        opt.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        opt.step()
    for i in range(args.warmup):
        step(i)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    times = []
    for i in range(args.steps):
        t = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - t)
    print(json.dumps({"sec_per_step_median": sorted(times)[len(times) // 2],
                      "peak_rss_timed_MiB": status_kb("VmHWM:") / 1024, "rss_before_training_MiB": rss_before}))


def run_lavis(args):
    out = tempfile.mktemp(suffix=".json")
    cmd = [args.lavis_python, os.path.join(LAVIS_DIR, "run_blip.py"), "--batch-size", str(args.batch_size),
           "--image-size", str(args.image_size), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--threads", str(args.threads), "--no-dropout", "--json", out]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    with open(out) as f:
        return json.load(f)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lavis-python", default=os.path.join(os.environ.get("VENV", os.path.expanduser(
        "~/.cache/lavis-peer/venv")), "bin", "python"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
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
            print(f"round {r} {impl:5s} {out['sec_per_step_median']:.4f} s/step  peak RSS {out['peak_rss_timed_MiB']:.0f}"
                  f" MiB, of which training {out['training_MiB']:.0f} MiB", flush=True)
    summary = {k: {key: statistics.median(x[src] for x in v) for key, src in (
        ("sec_per_step", "sec_per_step_median"), ("peak_rss_MiB", "peak_rss_timed_MiB"), ("training_MiB", "training_MiB"))}
        for k, v in res.items()}
    summary["throughput_ratio"] = summary["lavis"]["sec_per_step"] / summary["ours"]["sec_per_step"]
    # whole-process peak RSS includes the libraries each side imports (transformers 5 vs 4.26)
    summary["peak_rss_ratio"] = summary["ours"]["peak_rss_MiB"] / summary["lavis"]["peak_rss_MiB"]
    summary["training_memory_ratio"] = summary["ours"]["training_MiB"] / summary["lavis"]["training_MiB"]
    summary["config"] = {k: v for k, v in vars(args).items() if k not in ("worker", "lavis_python")}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
