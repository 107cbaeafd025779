"""Data-loading throughput: the same images and captions read from an annotation file (JSON, one
file per image) and from webdataset shards (data/make_shards.py), through the training loaders
the scripts use (common.data.train_loader: decoding, CLIP's training crop, tokenizing, in
DataLoader workers; the 224 px crop, or 64 px for --images tiny), alternating, each measurement in a
fresh process. Not collected by pytest.

    python tests/bench/bench_data.py [--images jpeg256|tiny --rounds 3 --batches 60 --workers 2 --batch-size 64]

The data: the tiny set's training split, 3,000 images and 15,000 pairs, either re-encoded as
256 px JPEGs (quality 95; img2dataset's default size, cropped to 224 px: the default, a realistic
decoding cost) or as they are (64 px PNGs cropped to 64 px: mostly per-sample overhead), written
once into an annotation file and into shards of 500 pairs in a temporary folder. Reports samples/s
(median over rounds) of each and the ratio shards / JSON."""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def worker(args):
    from common.data import Example, Tokenizer, tiny_data, train_loader, train_transform, training_records
    source = args.annotations if args.impl == "json" else args.shards
    size = 224 if args.images == "jpeg256" else 64
    example = Example(train_transform(size), Tokenizer(os.path.join(tiny_data(), "tokenizer")), 32)
    cfg = types.SimpleNamespace(batch_size=args.batch_size, accum_steps=1, workers=args.workers, seed=0, skip_bad=False,
                                train_num_samples=0, dataset_resampled=False)
    loader, sampler = train_loader(training_records(source), example, cfg, 0, 1, source)
    sampler.set_epoch(0)
    n, start = 0, None
    for i, (images, ids, _) in enumerate(loader):
        if i == args.warmup:
            start, n = time.perf_counter(), 0
        n += images.shape[0]
        if i + 1 == args.warmup + args.batches:
            break
    print(json.dumps({"impl": args.impl, "samples_per_s": n / (time.perf_counter() - start)}))


def jpeg_copy(annotations, folder):
    """The annotation file's images as 256 px JPEGs in `folder`, and an annotation file for them."""
    from PIL import Image
    os.makedirs(folder)
    with open(annotations) as f:
        records = json.load(f)
    root = os.path.dirname(annotations)
    for i, r in enumerate(records):
        with Image.open(os.path.join(root, r["image"])) as img:
            img.convert("RGB").resize((256, 256), Image.BICUBIC).save(os.path.join(folder, f"{i}.jpg"), quality=95)
        r["image"] = f"{i}.jpg"
    path = os.path.join(folder, "train.json")
    with open(path, "w") as f:
        json.dump(records, f)
    return path


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batches", type=int, default=60, help="timed batches per round")
    p.add_argument("--warmup", type=int, default=5, help="batches before timing (worker start-up)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--images", choices=["jpeg256", "tiny"], default="jpeg256")
    p.add_argument("--impl", help=argparse.SUPPRESS)
    p.add_argument("--shards", help=argparse.SUPPRESS)
    p.add_argument("--annotations", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.impl:
        return worker(args)
    from common.data import tiny_data
    from data.make_shards import write_shards
    with tempfile.TemporaryDirectory() as folder:
        annotations = os.path.join(tiny_data(), "train.json")
        if args.images == "jpeg256":
            annotations = jpeg_copy(annotations, os.path.join(folder, "jpeg"))
        sizes = write_shards(annotations, os.path.join(folder, "shards"), shard_size=500, shuffle=True)
        shards = os.path.join(folder, "shards", f"{{00000..{len(sizes) - 1:05d}}}.tar")
        res = {"json": [], "shards": []}
        for r in range(args.rounds):
            for impl in ("json", "shards") if r % 2 == 0 else ("shards", "json"):
                out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--impl", impl, "--shards", shards,
                                      "--annotations", annotations], capture_output=True, text=True)
                if out.returncode:
                    sys.exit(out.stderr[-3000:])
                res[impl].append(json.loads(out.stdout.strip().splitlines()[-1])["samples_per_s"])
                print(f"round {r} {impl:6s} {res[impl][-1]:8.1f} samples/s", flush=True)
    summary = {k: {"samples_per_s": statistics.median(v), "rounds": v} for k, v in res.items()}
    summary["throughput_ratio"] = summary["shards"]["samples_per_s"] / summary["json"]["samples_per_s"]
    summary["config"] = {k: v for k, v in vars(args).items() if k not in ("impl", "shards")}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
