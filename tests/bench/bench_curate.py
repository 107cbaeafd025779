"""data/curate.py's costs: the embedding pass (pairs/s) with the tiny CLIP and a ViT-B/32-sized
CLIP (random weights: the rate does not depend on them), and SemDeDup (k-means and the within-
cluster pass) on clustered random float16 embeddings of dim 512 with 1 % exact copies, torch
against faiss; then what LAION-400M needs, projected from the measured rates by flop counts.

    python tests/bench/bench_curate.py --quick          # 10k embeddings, the tiny CLIP only (~1 min)
    python tests/bench/bench_curate.py                  # 100k and 1M embeddings, both CLIPs (~8 min)
"""
import argparse
import json
import os
import resource
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import clip_train  # noqa: E402
from common.data import Tokenizer, tiny_data  # noqa: E402
from data import curate  # noqa: E402


def embedding_rate(preset, n_images, tmp):
    """(images/s, pairs/s) of curate.embed: n_images tiny val images and their 5 captions each."""
    tiny = tiny_data()
    tok = Tokenizer(os.path.join(tiny, "tokenizer"))
    cfg = clip_train.Config(**clip_train.PRESETS[preset])
    cfg.vocab_size, cfg.eos_id = tok.vocab_size, tok.eos_id
    model = clip_train.CLIP(cfg).eval()
    records = json.load(open(os.path.join(tiny, "val.json")))[:n_images]
    images = [os.path.join(tiny, r["image"]) for r in records]
    captions = [c for r in records for c in r["caption"]]
    args = SimpleNamespace(out=os.path.join(tmp, preset), model=preset, chunk=65536, batch_size=64,
                           workers=2, precision="fp32")
    start = time.perf_counter()
    curate.embed(model, tok, cfg, images, captions, args, torch.device("cpu"))       # both towers
    both = time.perf_counter() - start
    os.remove(os.path.join(args.out, "embeddings", "captions_000000.npy"))
    start = time.perf_counter()
    curate.embed(model, tok, cfg, images, captions, args, torch.device("cpu"))       # the captions alone
    image_s = both - (time.perf_counter() - start)
    return len(images) / image_s, len(captions) / both


def clustered(n, dim, centres, dup_share, seed=0):
    """n normalised float16 rows around `centres` random centres; dup_share of them exact copies."""
    g = np.random.default_rng(seed)
    c = g.standard_normal((centres, dim)).astype(np.float32)
    x = c[g.integers(0, centres, n)] + 0.5 * g.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    dup = g.choice(n, int(n * dup_share), replace=False)
    x[dup] = x[g.integers(0, n, len(dup))]
    return x.astype(np.float16)


def dedup(emb, backend, iters):
    """(k-means s, within-cluster s, removed, largest cluster, peak RSS GiB) of curate.semdedup."""
    times, sizes, real = {}, {}, curate.kmeans

    def timed(*a, **kw):
        start = time.perf_counter()
        assign, centroids = real(*a, **kw)
        times["kmeans"], sizes["max"] = time.perf_counter() - start, int(torch.bincount(assign).max())
        return assign, centroids
    curate.kmeans = timed
    args = SimpleNamespace(clusters=0, kmeans=backend, kmeans_iters=iters, dedup_eps=0.0001)
    start = time.perf_counter()
    try:
        removed = curate.semdedup(emb, np.arange(len(emb)), args)
    finally:
        curate.kmeans = real
    total = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    return times["kmeans"], total - times["kmeans"], len(removed), sizes["max"], rss


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="10k embeddings and the tiny CLIP only")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--iters", type=int, default=20, help="k-means iterations")
    p.add_argument("--gpu-tflops", type=float, default=200.0,
                   help="sustained TFLOP/s assumed for one GPU in the projection")
    args = p.parse_args()
    import tempfile
    tmp = tempfile.mkdtemp()
    print("| model | images/s | pairs/s (5 captions an image) |\n|---|---|---|")
    for preset, n in [("tiny", 200)] + ([] if args.quick else [("vit-b-32", 32)]):
        ips, pps = embedding_rate(preset, n, tmp)
        print(f"| {preset} | {ips:,.0f} | {pps:,.0f} |", flush=True)

    print("\n| n | backend | clusters | iters | k-means s | within-cluster s | removed | largest cluster "
          "| peak RSS GiB |\n|---|---|---|---|---|---|---|---|---|")
    rates = {}
    for n in [10_000] if args.quick else [100_000, 1_000_000]:
        emb = clustered(n, args.dim, max(10, n // 300), 0.01)
        k = max(1, -(-n // 10000))
        for backend in ("torch", "faiss"):
            km, within, removed, largest, rss = dedup(emb, backend, args.iters)
            print(f"| {n:,} | {backend} | {k} | {args.iters} | {km:.1f} | {within:.1f} | {removed:,} | "
                  f"{largest:,} | {rss:.2f} |", flush=True)
            if backend == "torch":
                # Lloyd's iterations on min(n, 256 k) rows, then every row assigned once
                rates["kmeans"] = (args.iters * min(n, 256 * k) + n) * k * args.dim * 2 / km
                rates["within"] = n * (n / k) * args.dim / within      # ~ sum over clusters of m^2 x E
    N, K = 400_000_000, 40_000
    flops = {"k-means (20 Lloyd iterations on 256 rows per centroid, then every row assigned once)":
             (args.iters * 256 * K * K + N * K) * args.dim * 2,
             "within-cluster pairs (clusters of ~10,000)": N * (N / K) * args.dim}
    print(f"\nLAION-400M at dim {args.dim}, one cluster per 10,000 images ({K:,} clusters):\n")
    print(f"- embeddings on disk, float16: {N * args.dim * 2 / 2 ** 30:,.0f} GiB for the images, as much "
          f"again for the captions; SemDeDup holds the images' in float32: {N * args.dim * 4 / 2 ** 30:,.0f} GiB")
    for name, f in flops.items():
        rate = rates["kmeans" if name.startswith("k-means") else "within"]
        print(f"- {name}: {f:.2g} flops: {f / rate / 3600:,.0f} h at this machine's measured "
              f"{rate / 1e9:.0f} GFLOP/s, {f / (args.gpu_tflops * 1e12) / 60:.1f} min on one GPU at "
              f"{args.gpu_tflops:.0f} TFLOP/s")


if __name__ == "__main__":
    main()
