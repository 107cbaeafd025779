"""Write webdataset shards (img2dataset's layout) from one of our annotation files, or a sizes.json
for shards that lack one.

    python data/make_shards.py coco/train.json --out coco/shards            # -> coco/shards/00000.tar ... + sizes.json
    python data/make_shards.py cc3m.csv --out cc3m/shards --shard-size 5000 --image-root cc3m/images
    python data/make_shards.py --sizes laion/shards                          # sizes.json from img2dataset's
                                                                             # *_stats.json (or by counting)

Each image-caption pair becomes one sample, as the annotation-file loader counts them: KEY.jpg (the
file's bytes as they are; .jpeg, .png and .webp keep their extension, other formats are re-encoded as
PNG), KEY.txt (the caption) and KEY.json ({"image_id", "image", "caption_index"}: the captions of one
image share its image_id, which the training scripts use as ITM/ITC positives). Keys are 9-digit
sample numbers as img2dataset writes them. `--shuffle` writes the pairs in a seeded random order, so
that neighbouring samples (and the captions of one image) are spread over shards. Members have mtime
0, so the same input gives byte-identical shards.

The training scripts read them with `--train-data 'coco/shards/{00000..00011}.tar'`; sizes.json
beside them sets the epoch (else give --train-num-samples)."""
import argparse
import glob
import io
import json
import os
import random
import sys
import tarfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from common.data import read_annotations  # noqa: E402
from common.utils import UserError, cli  # noqa: E402

KEPT = {".jpg": "jpg", ".jpeg": "jpeg", ".png": "png", ".webp": "webp"}


def add_member(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def image_bytes(path):
    """(bytes, extension): the file as it is for JPEG/PNG/WebP, else re-encoded as PNG."""
    ext = os.path.splitext(path)[1].lower()
    if ext in KEPT:
        with open(path, "rb") as f:
            return f.read(), KEPT[ext]
    from common.data import load_rgb
    out = io.BytesIO()
    load_rgb(path).save(out, format="PNG")
    return out.getvalue(), "png"


def write_shards(annotations, out, shard_size=10000, image_root=None, shuffle=False, seed=0, skip_bad=False):
    """Shards {00000..}.tar and sizes.json in `out` from an annotation file; returns {shard: samples}."""
    if shard_size < 1:
        raise UserError(f"--shard-size must be at least 1, not {shard_size}")
    records = read_annotations(annotations, image_root, skip_bad)
    pairs = [(r, c) for r, rec in enumerate(records) for c in range(len(rec["captions"]))]
    if shuffle:
        random.Random(seed).shuffle(pairs)
    os.makedirs(out, exist_ok=True)
    root = image_root or os.path.dirname(os.path.abspath(annotations))
    sizes = {}
    for start in range(0, len(pairs), shard_size):
        name = f"{start // shard_size:05d}.tar"
        tmp = os.path.join(out, name + ".tmp")
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for n, (r, c) in enumerate(pairs[start:start + shard_size], start=start):
                rec, key = records[r], f"{n:09d}"
                data, ext = image_bytes(rec["image"])
                meta = {"image_id": str(rec["image_id"]), "image": os.path.relpath(rec["image"], root),
                        "caption_index": c}
                add_member(tar, f"{key}.{ext}", data)
                add_member(tar, f"{key}.json", json.dumps(meta).encode())
                add_member(tar, f"{key}.txt", rec["captions"][c].encode())
        os.replace(tmp, os.path.join(out, name))
        sizes[name] = min(shard_size, len(pairs) - start)
    write_sizes(out, sizes)
    return sizes


def write_sizes(folder, sizes):
    with open(os.path.join(folder, "sizes.json"), "w") as f:
        json.dump(sizes, f, indent=1, sort_keys=True)


def count_tar(path):
    """Samples in a shard: the distinct keys of its members that have a caption (.txt)."""
    from webdataset.tariterators import base_plus_ext
    keys = set()
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                key, ext = base_plus_ext(member.name)
                if key is not None and ext.lower() == "txt":
                    keys.add(key)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise UserError(f"{path} is not a readable tar file ({e}); it counts as 0 only if you delete it") from None
    return len(keys)


def sizes_for(folder):
    """{shard: samples} for the .tar files of `folder`: img2dataset's NNNNN_stats.json "successes"
    where present (no need to read the shard), else counted."""
    shards = sorted(glob.glob(os.path.join(folder, "*.tar")))
    if not shards:
        raise UserError(f"{folder} holds no .tar shards")
    sizes = {}
    for path in shards:
        stats = path[:-len(".tar")] + "_stats.json"
        if os.path.isfile(stats):
            with open(stats) as f:
                sizes[os.path.basename(path)] = int(json.load(f)["successes"])
        else:
            sizes[os.path.basename(path)] = count_tar(path)
    return sizes


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("annotations", nargs="?", help="annotation file (our JSON, or CSV with image,caption columns)")
    p.add_argument("--out", help="output folder for the shards and sizes.json")
    p.add_argument("--shard-size", type=int, default=10000, help="samples per shard (img2dataset's default 10000)")
    p.add_argument("--image-root", default=None, help="folder relative image paths start from (default: the file's)")
    p.add_argument("--shuffle", action="store_true", help="write the pairs in a seeded random order")
    p.add_argument("--seed", type=int, default=0, help="seed of --shuffle")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) empty captions instead of failing")
    p.add_argument("--sizes", metavar="FOLDER", help="only write FOLDER/sizes.json for the shards there")
    args = p.parse_args(argv)
    if args.sizes:
        sizes = sizes_for(args.sizes)
        write_sizes(args.sizes, sizes)
        print(f"{os.path.join(args.sizes, 'sizes.json')}: {len(sizes)} shards, {sum(sizes.values())} samples")
        return
    if not args.annotations or not args.out:
        p.error("give an annotation file and --out (or --sizes FOLDER)")
    sizes = write_shards(args.annotations, args.out, args.shard_size, args.image_root, args.shuffle, args.seed,
                         args.skip_bad)
    last = len(sizes) - 1
    print(f"{args.out}: {len(sizes)} shards, {sum(sizes.values())} samples; "
          f"--train-data '{os.path.join(args.out, f'{{00000..{last:05d}}}.tar')}'")


if __name__ == "__main__":
    cli(main)
