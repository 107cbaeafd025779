"""SigLIP's loss under torchrun: peak memory and time of one forward + backward of the loss alone
on each rank, for clip_train.siglip_loss (per-rank text blocks, each block's B x B logits
recomputed in backward), a plain all-gather (all N texts with gradient, one B x N logit matrix)
and open_clip's SigLipLoss (its default ring exchange, 'bidir', and 'gather'), on the same
normalised random features. Not collected by pytest.

    python tests/bench/bench_siglip_memory.py                        # W = 4 ranks, B = 2048 each, CPU
    python tests/bench/bench_siglip_memory.py --world 2 --batch 4096 --dim 512

Each (implementation, size) runs in a fresh `torchrun --nproc_per_node W` with gloo on the CPU
and MALLOC_MMAP_THRESHOLD_ set low, so that freed tensors leave the resident set at once: the
peak is rank 0's VmHWM during the loss minus its resident set just before (features and the
process included in neither). Also reported: the bytes autograd keeps between forward and
backward (saved_tensors_hooks), the part that grows with B x N in the plain scheme."""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
IMPLS = ("ours", "plain_gather", "open_clip_bidir", "open_clip_gather")


def status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])


def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:      # VmHWM := VmRSS
        f.write("5")


def plain_gather_loss(img, txt, t, b):
    """The scheme without chunks: every rank's texts gathered with gradient, one (B, N) matrix."""
    import torch
    import torch.nn.functional as F
    from common import dist
    all_texts = dist.gather_with_grad(txt)
    logits = t * img @ all_texts.T + b                                       # (B, N)
    B = img.shape[0]
    z = -torch.ones_like(logits)
    z[:, dist.rank() * B:(dist.rank() + 1) * B] += 2 * torch.eye(B)
    return -F.logsigmoid(z * logits).sum() / B


def worker(args):
    import torch
    import torch.nn.functional as F
    import clip_train
    from common import dist
    torch.set_num_threads(1)
    rank, _, world, _ = dist.setup()
    g = torch.Generator().manual_seed(rank)
    img = F.normalize(torch.randn(args.batch, args.dim, generator=g), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(args.batch, args.dim, generator=g), dim=-1).requires_grad_()
    t = torch.tensor(10.0, requires_grad=True)
    b = torch.tensor(-10.0, requires_grad=True)
    if args.impl == "ours":
        loss_fn = clip_train.siglip_loss
    elif args.impl == "plain_gather":
        loss_fn = plain_gather_loss
    else:
        from open_clip.loss import SigLipLoss
        loss_fn = SigLipLoss(rank=rank, world_size=world, dist_impl=args.impl.split("_")[-1])
    saved = []

    def pack(x):
        saved.append(x.numel() * x.element_size())
        return x
    for i in range(2):                       # the first one warms up allocator and process group
        dist.barrier()
        saved.clear()
        base = status_kb("VmRSS")
        reset_peak()
        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            loss = loss_fn(img, txt, t, b)
        loss.backward()
        seconds = time.perf_counter() - start
        peak = status_kb("VmHWM") - base
        img.grad = txt.grad = t.grad = b.grad = None
        del loss
    out = {"impl": args.impl, "world": world, "batch": args.batch, "dim": args.dim, "N": world * args.batch,
           "peak_MiB": peak / 1024, "saved_MiB": sum(saved) / 2**20, "seconds": seconds}
    if rank == 0:
        print("RESULT " + json.dumps(out), flush=True)
    dist.cleanup()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--batch", type=int, default=2048, help="per rank")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", default="ours", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    rows = []
    for impl in args.impls.split(","):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.world}",
               os.path.abspath(__file__), "--worker", "--impl", impl, "--batch", str(args.batch),
               "--dim", str(args.dim)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        found = [line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not found:
            print(f"{impl}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(found[0]))
        print(json.dumps(rows[-1]), flush=True)
    ours = next((r for r in rows if r["impl"] == "ours"), None)
    print(f"\nW = {args.world} ranks x B = {args.batch} (N = {args.world * args.batch}), D = {args.dim}, fp32, "
          f"CPU, rank 0\n")
    print("| loss implementation | peak MiB (loss fwd+bwd) | kept for backward MiB | seconds | peak / ours |")
    print("|---|---|---|---|---|")
    for r in rows:
        ratio = r["peak_MiB"] / ours["peak_MiB"] if ours else float("nan")
        print(f"| {r['impl']} | {r['peak_MiB']:.0f} | {r['saved_MiB']:.0f} | {r['seconds']:.2f} | {ratio:.2f} |")
    print(f"\n    python tests/bench/bench_siglip_memory.py --world {args.world} --batch {args.batch} --dim {args.dim}")


if __name__ == "__main__":
    main()
