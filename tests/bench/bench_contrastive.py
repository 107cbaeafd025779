"""Time to accuracy of clip_train.py's contrastive variants on the built-in tiny data: the CLIP,
SigLIP and DiHT losses, each with FLIP's patch dropout 0 and 0.5, the same budget of steps and
every other setting the tiny preset's; then training throughput with and without patch dropout.
Not collected by pytest; run it on a quiet machine (the seconds are wall-clock).

    python tests/bench/bench_contrastive.py                 # 6 runs x 200 steps + throughput (~25 min, 2 cores)
    python tests/bench/bench_contrastive.py --steps 100 --every 25 --only clip,siglip

Each run is `clip_train.main` in a fresh process with --loss L --patch-dropout P, evaluated every
--every steps (retrieval on the val split and zero-shot, as at an epoch end; the evaluation time
is not counted). Reported: training seconds and steps until r_mean first reaches --target, and at
the budget r_mean, zero-shot top-1 and twin accuracy (each caption's own image scored above its
three shape-swapped twins: shape, which colour-only matching cannot tell; 25 % for a model blind
to shape; tests/test_clip_train.py). Throughput: tests/bench/bench_clip.py's step (ours, fp32,
random data) with --patch-dropout 0 and 0.5 alternating in fresh processes, at its compute
configuration and at an image-heavier one (160 px: 100 patches, as the paper's image towers
dominate their text towers)."""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def worker(args):
    """One run: clip_train.main with an evaluation every args.every steps, training time measured
    between the loop's steps (evaluations excluded)."""
    import torch
    import clip_train
    from common.data import contrastive_data, load_tokenizer, open_clip_cleaner
    torch.set_num_threads(args.threads)
    curve, clock = [], {"train": 0.0, "last": None}
    real_start_run, real_step_done = clip_train.start_run, clip_train.step_done
    evaluation = {}

    def start_run(cfg, *a, **k):
        run = real_start_run(cfg, *a, **k)
        tok = load_tokenizer(cfg.tokenizer, "", use_tiny=True, clean=open_clip_cleaner(cfg.text_clean))
        _, _, val, zeroshot = contrastive_data(cfg, tok, 0, 1)
        evaluation.update(val=val, zeroshot=zeroshot, tokenizer=tok)
        clock["last"] = time.perf_counter()
        return run

    def step_done(run, preemption):
        clock["train"] += time.perf_counter() - clock["last"]
        if run.step % args.every == 0 or run.step == args.steps:
            m = clip_train.evaluate(run.model, run.cfg, evaluation["val"], evaluation["zeroshot"],
                                    evaluation["tokenizer"], torch.device("cpu"), "fp32")
            curve.append({"step": run.step, "train_s": clock["train"], "r_mean": m["r_mean"],
                          "zeroshot_top1": m["zeroshot_top1"]})
        done = real_step_done(run, preemption)
        clock["last"] = time.perf_counter()
        return done
    clip_train.start_run, clip_train.step_done = start_run, step_done
    out = os.path.join(args.out_root, f"{args.loss}_{args.patch_dropout}")
    clip_train.main(["--loss", args.loss, "--patch-dropout", str(args.patch_dropout), "--max-steps",
                     str(args.steps), "--workers", "0", "--output-dir", out, "--log-every", "1000",
                     "--save-every", "100000"])
    from tests.test_clip_train import twin_accuracy
    from common.data import tiny_data
    twins = twin_accuracy(os.path.join(out, "checkpoint_last.pt"), tiny_data())
    print("RESULT " + json.dumps({"loss": args.loss, "patch_dropout": args.patch_dropout, "curve": curve,
                                  "twins": twins}), flush=True)


def reached(curve, target):
    for point in curve:
        if point["r_mean"] >= target:
            return point
    return None


def throughput(args):
    """bench_clip.py's training step, ours, patch dropout 0 and 0.5 alternating: samples/s."""
    rows = []
    for label, extra in (("compute (96 px, 36 patches)", []),
                         ("compute at 160 px (100 patches)", ["--image-size", "160"])):
        res = {0.0: [], 0.5: []}
        for r in range(args.rounds):
            for p in (0.0, 0.5) if r % 2 == 0 else (0.5, 0.0):
                cmd = [sys.executable, os.path.join(ROOT, "tests", "bench", "bench_clip.py"), "--config", "compute",
                       "--steps", "4", "--warmup", "1", "--patch-dropout", str(p), *extra, "--impl", "ours"]
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                                      env={**os.environ, "OMP_NUM_THREADS": "2"})
                if proc.returncode:
                    sys.exit(proc.stderr[-3000:])
                res[p].append(json.loads(proc.stdout.strip().splitlines()[-1])["samples_per_s"])
        a, b = statistics.median(res[0.0]), statistics.median(res[0.5])
        rows.append((label, a, b, b / a))
        print(f"throughput {label}: {a:.1f} -> {b:.1f} samples/s, x{b / a:.2f}", flush=True)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200, help="the budget of every run")
    p.add_argument("--every", type=int, default=25, help="steps between evaluations")
    p.add_argument("--target", type=float, default=40.0, help="r_mean to reach")
    p.add_argument("--only", default="clip,siglip,diht", help="losses")
    p.add_argument("--ratios", default="0,0.5", help="patch dropout ratios")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="throughput rounds")
    p.add_argument("--no-throughput", action="store_true")
    p.add_argument("--out-root", default="/tmp/bench_contrastive")
    p.add_argument("--loss", help=argparse.SUPPRESS)
    p.add_argument("--patch-dropout", type=float, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.loss:
        return worker(args)
    results = []
    for loss in args.only.split(","):
        for pd in map(float, args.ratios.split(",")):
            cmd = [sys.executable, os.path.abspath(__file__), "--loss", loss, "--patch-dropout", str(pd),
                   "--steps", str(args.steps), "--every", str(args.every), "--threads", str(args.threads),
                   "--out-root", args.out_root]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                                  env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
            found = [line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode or not found:
                sys.exit(f"{loss} {pd}: failed\n{proc.stderr[-3000:]}")
            results.append(json.loads(found[0]))
            print(json.dumps(results[-1]), flush=True)
    speed = [] if args.no_throughput else throughput(args)
    print(f"\nTiny preset (batch 128, lr 5e-4, 50 warm-up steps), {args.steps} steps each, evaluated every "
          f"{args.every}; target r_mean {args.target:g} (chance 2.7; zero-shot chance 4.2; twins: 25 blind to shape)\n")
    print("| loss | patch dropout | train s to target | steps to target | r_mean at budget | zero-shot top-1 "
          "| twins % | train s for the budget |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        hit, last = reached(r["curve"], args.target), r["curve"][-1]
        to_s, to_steps = (f"{hit['train_s']:.0f}", str(hit["step"])) if hit else ("not reached", "-")
        print(f"| {r['loss']} | {r['patch_dropout']:g} | {to_s} | {to_steps} | {last['r_mean']:.1f} | "
              f"{last['zeroshot_top1']:.1f} | {r['twins']:.1f} | {last['train_s']:.0f} |")
    if speed:
        print("\n| configuration (bench_clip.py, ours, fp32, batch 32, 2 threads) | samples/s, P = 0 "
              "| samples/s, P = 0.5 | speed-up |")
        print("|---|---|---|---|")
        for label, a, b, ratio in speed:
            print(f"| {label} | {a:.1f} | {b:.1f} | {ratio:.2f}x |")
    print(f"\n    python tests/bench/bench_contrastive.py --steps {args.steps} --every {args.every} "
          f"--target {args.target:g}")


if __name__ == "__main__":
    main()
