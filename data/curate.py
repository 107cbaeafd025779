"""Curate an image-text dataset with a model trained here: cleanvision's image checks, DataComp's
CLIP-score filter (Gadre et al. 2023) and SemDeDup (Abbas et al. 2023, arXiv:2303.09540), every
removal written down with its reason and the score that decided it.

    python data/curate.py --data train.json --model runs/clip/checkpoint_best.pt --out curated --quality
    python data/curate.py --data 'laion/{00000..00999}.tar' --model clip-vit-b-32/ --out curated \
        --keep-fraction 0.3
    torchrun --nproc_per_node 8 data/curate.py ...        # image checks and embeddings sharded over ranks

A pair (image, caption) is removed by the first step that rejects it:
    1. image checks (--quality)  unreadable, too small, odd aspect ratio, low information, blurry,
                                 exact duplicate (pixel hash), near duplicate (perceptual hash,
                                 confirmed on pixels)                              image_checks
    2. embeddings                images and captions through the model's two encoders; float16
                                 chunks on disk, a killed run recomputes only what it had not saved
                                                                                   embed
    3. CLIP score (DataComp)     cos(image, caption) >= --min-clip-score, or the top --keep-fraction,
                                 or by default the rank rule below                 clip_score_filter
    4. SemDeDup                  k-means on the image embeddings; within a cluster an image closer
                                 than 1 - eps to one kept before it is removed     semdedup
    5. outputs                   kept data in the input's format, removed.jsonl, report.json and
                                 report.png (a contact sheet of each reason)       write_outputs

Unreadable images are removed (and counted) with or without --quality. Defaults that hold on any
dataset and any model (docs/curate.md has the measurements behind them):
- low information and blur are judged against the dataset itself: grey entropy below 0.2 x the
  dataset's median (cleanvision's absolute 3 bits flags every flat synthetic image), and blur as the
  share of the Laplacian's variance that survives one more 1-px Gaussian blur (a sharp image loses
  most of it, a blurred one little; the variance itself measures how many edges there are);
- near duplicates: a perceptual hash within 4 bits finds the candidates, and at 64 px at most
  0.1 % of the pixels may differ (a re-encoding or a resize changes none; another object does);
- the CLIP score without a threshold flag: a fixed cosine means nothing across models, so each
  caption ranks its own image among 100 other images of the dataset drawn at random (seeded; all of
  them in a smaller set) and the pair is kept when at most 5 % score higher (its top 5 %);
- SemDeDup's eps is 0.0001: only what the model sees as one image goes (the paper's 0.01-0.07
  would remove different images of one scene on the tiny data; choose it on purpose).

--model: one of our CLIP or CoCa checkpoints, a transformers CLIPModel folder, an open_clip CLIP
folder (as our --export writes) or open_clip CoCa weights (the loaders of clip_train.py and
coca_train.py). --data: every source --train-data reads
(a JSON or CSV annotation file, local webdataset shards); the kept pairs are written in the same
format (OUT/kept.json, OUT/kept.csv, or OUT/shards/ with sizes.json)."""
import argparse
import hashlib
import io
import json
import math
import os
import shutil
import sys
import tarfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from common import dist  # noqa: E402
from common.config import resolve_config  # noqa: E402
from common.data import (eval_transform, load_rgb, load_tokenizer, read_annotations,  # noqa: E402
                         run_text_clean)
from common.shards import expand_shards, is_shards, _is_remote  # noqa: E402
from common.utils import UserError, autocast, cli, load_checkpoint, resolve_precision  # noqa: E402
from data.make_shards import add_member, write_sizes  # noqa: E402

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


# ---- the data: every source --train-data reads ----

class Dataset:
    """images: one entry per distinct image, a path or a (shard, offset, size, name) reference;
    pairs: [(image index, caption)]; format: json | csv | shards, for writing the kept pairs back."""

    def __init__(self, spec, image_root):
        self.spec = spec
        if is_shards(spec):
            self.format = "shards"
            self.images, self.pairs, self.samples = read_shards(spec)
        else:
            self.format = "csv" if spec.endswith((".csv", ".tsv")) else "json"
            self.records = read_annotations(spec, image_root or None)
            self.images = [r["image"] for r in self.records]
            self.pairs = [(i, c) for i, r in enumerate(self.records) for c in r["captions"]]

    def name(self, i):
        ref = self.images[i]
        return ref if isinstance(ref, str) else f"{ref[0]}:{ref[3]}"


def open_image(ref):
    """An image as RGB from a path or a shard member; OSError when it cannot be decoded."""
    if isinstance(ref, str):
        return load_rgb(ref)
    shard, offset, size, name = ref
    with open(shard, "rb") as f:
        f.seek(offset)
        return load_rgb(io.BytesIO(f.read(size)), name=f"{shard}:{name}")


def read_shards(spec):
    """(image refs, pairs, samples) of local shards, read by their tar index (each image is opened
    later at its offset). A sample is KEY.{jpg,png,...}, KEY.txt[, KEY.json]; samples whose json has
    the same "image_id" (data/make_shards.py writes one sample per caption) are one image."""
    from webdataset.tariterators import base_plus_ext
    urls = expand_shards(spec)
    remote = [u for u in urls if _is_remote(u)]
    if remote:
        raise UserError(f"--data {remote[0]}: curate.py reads local shards (it opens images at their "
                        f"offsets); download them first")
    images, pairs, samples, by_id = [], [], [], {}
    for url in urls:
        try:
            with tarfile.open(url, "r:") as tar:               # uncompressed: images are read at offsets
                members = {}
                for m in tar:
                    key, ext = base_plus_ext(m.name)            # webdataset's grouping of a sample's files
                    if m.isreg() and key is not None:
                        members.setdefault(key, {})[ext.lower()] = m
                for key, parts in members.items():
                    image = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
                    if image is None or "txt" not in parts:
                        continue
                    caption = tar.extractfile(parts["txt"]).read().decode("utf-8").strip()
                    meta = json.loads(tar.extractfile(parts["json"]).read()) if "json" in parts else {}
                    group = (url, key) if meta.get("image_id") is None else ("id", str(meta["image_id"]))
                    if group not in by_id:
                        by_id[group] = len(images)
                        images.append((url, image.offset_data, image.size, image.name))
                    pairs.append((by_id[group], caption))
                    samples.append((url, [(m.name, m.offset_data, m.size) for m in parts.values()]))
        except (tarfile.TarError, OSError, EOFError, ValueError) as e:
            raise UserError(f"--data: shard {url} cannot be read ({e})") from None
    if not pairs:
        raise UserError(f"--data {spec}: no image-caption samples in the shards")
    return images, pairs, samples


def write_kept(data, kept_pairs, out):
    """The kept pairs (indices into data.pairs) in the input's format, written under a temporary
    name and renamed; returns the path. Image paths are absolute, so the file works from OUT."""
    if data.format == "shards":
        folder, tmp = os.path.join(out, "shards"), os.path.join(out, "shards.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        sizes = {}
        for start in range(0, len(kept_pairs), 10000):
            name = f"{start // 10000:05d}.tar"
            with tarfile.open(os.path.join(tmp, name), "w", format=tarfile.USTAR_FORMAT) as tar:
                for n in kept_pairs[start:start + 10000]:
                    url, members = data.samples[n]
                    with open(url, "rb") as f:
                        for member, offset, size in members:        # the sample's files as they are
                            f.seek(offset)
                            add_member(tar, member, f.read(size))
            sizes[name] = len(kept_pairs[start:start + 10000])
        write_sizes(tmp, sizes)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        return os.path.join(folder, f"{{00000..{len(sizes) - 1:05d}}}.tar")
    by_image = {}
    for n in kept_pairs:
        i, caption = data.pairs[n]
        by_image.setdefault(i, []).append(caption)
    if data.format == "csv":
        import csv
        text = io.StringIO()
        writer = csv.writer(text)
        writer.writerow(["image", "caption"])
        writer.writerows([os.path.abspath(data.images[i]), c] for i, caps in by_image.items() for c in caps)
        return write_atomic(os.path.join(out, "kept.csv"), text.getvalue())
    kept = [{"image": os.path.abspath(data.images[i]), "caption": caps, "image_id": data.records[i]["image_id"]}
            for i, caps in by_image.items()]
    return write_atomic(os.path.join(out, "kept.json"), json.dumps(kept, indent=1))


def write_atomic(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
    return path


# ---- the model: ours or published, through the training scripts' loaders ----

def model_kind(path):
    """clip or coca, from what `path` holds; anything else is an error naming it."""
    if os.path.isdir(path):
        config = os.path.join(path, "config.json")
        if os.path.isfile(config):
            with open(config) as f:
                kind = json.load(f).get("model_type", "?")
            if kind != "clip":
                raise UserError(f"--model {path}: a transformers {kind!r} folder; curate.py embeds with CLIP "
                                f"(a CLIPModel or open_clip folder), CoCa (open_clip weights) or our "
                                f"CLIP/CoCa checkpoints")
            return "clip"
        config = os.path.join(path, "open_clip_config.json")
        if os.path.isfile(config):
            with open(config) as f:
                if "multimodal_cfg" not in json.load(f).get("model_cfg", {}):
                    return "clip"              # clip_train's loader checks it is a CLIP we build
        return "coca"                          # open_clip's folder: coca_train's loader checks it
    if not os.path.isfile(path):
        raise UserError(f"--model {path} does not exist")
    saved = load_checkpoint(path)
    if not (isinstance(saved, dict) and "model" in saved and "config" in saved):
        return "coca"                          # a bare state dict: open_clip's weights file
    keys = set(saved["model"])
    if any(k.startswith("text_decoder.") for k in keys):
        return "coca"
    if "visual_projection.weight" in keys:
        return "clip"
    family = ("BLIP-2" if any("Qformer" in k or "query_tokens" in k for k in keys) else
              "ALBEF or BLIP" if any(k.startswith("text_encoder.") for k in keys) else "another model's")
    raise UserError(f"--model {path}: {family} checkpoint; curate.py embeds with CLIP or CoCa "
                    f"(one image and one text embedding per pair)")


def load_model(path, device, tokenizer_name=""):
    """(model with encode_image / encode_text, tokenizer, its config), built as clip_train.py or
    coca_train.py builds it from --init-from PATH (generation settings, unused here, left aside)."""
    kind = model_kind(path)
    import clip_train
    import coca_train
    script = clip_train if kind == "clip" else coca_train
    weights = script.clip_weights if kind == "clip" else script.coca_weights
    generation = [] if kind == "clip" else ["--max-gen-length", "1", "--min-gen-length", "0"]
    cfg, _ = resolve_config(script.Config, script.PRESETS, ["--init-from", path, *generation])
    init = weights.read_init(path)
    if not tokenizer_name and kind == "clip":
        tokenizer_name = init[1]["config"]["tokenizer"] if init[0] == "ours" else ""   # "": the folder's
    elif not tokenizer_name:
        tokenizer_name = weights.init_tokenizer(init, path)   # the run's, the folder's or BPE
    tokenizer = load_tokenizer(tokenizer_name, path, clean=run_text_clean(cfg))
    arch = script.settle_config(cfg, init, tokenizer)
    model = (script.build_model(cfg, init, arch) if kind == "clip" else
             script.build_model(cfg, tokenizer, init, arch))
    return model.to(device).eval(), tokenizer, cfg


# ---- 1. image checks (cleanvision) ----

def image_properties(ref):
    """What the checks need, from one read of the image: size, entropy (bits, of the grey
    histogram: 0 for a flat image), blur (see below), an md5 of the decoded pixels (cleanvision's
    exact-duplicate hash) and a perceptual hash. None when it cannot be read."""
    try:
        img = open_image(ref)
    except OSError:
        return None
    grey = img.convert("L")
    grey.thumbnail((256, 256))
    # blur: the share of the Laplacian's variance that one more 1-px Gaussian blur keeps
    blur = laplacian_var(grey.filter(ImageFilter.GaussianBlur(1))) / max(laplacian_var(grey), 1e-6)
    return {"width": img.width, "height": img.height, "entropy": grey.entropy(), "blur": blur,
            "md5": hashlib.md5(img.tobytes()).hexdigest(), "phash": phash(grey)}


def readable_size(ref):
    """Without --quality: only whether the image decodes (its size), None when it does not."""
    try:
        return {"size": open_image(ref).size}
    except OSError:
        return None


def laplacian_var(grey):
    lap = grey.filter(ImageFilter.Kernel((3, 3), (0, 1, 0, 1, -4, 1, 0, 1, 0), 1, 128))
    return float(np.asarray(lap, dtype=np.float32)[1:-1, 1:-1].var())      # the border is padding


_DCT = np.cos(np.pi * (2 * np.arange(32)[None, :] + 1) * np.arange(32)[:, None] / 64)


def phash(grey):
    """Perceptual hash: the signs of the 8 x 8 lowest DCT frequencies of a 32 x 32 grey thumbnail
    against their median, the DC term left out: 63 bits."""
    g = np.asarray(grey.resize((32, 32), Image.LANCZOS), dtype=np.float64)
    c = (_DCT @ g @ _DCT.T)[:8, :8].flatten()[1:]
    return int("".join("1" if v else "0" for v in c > np.median(c)), 2)


def changed_pixels(ref_a, ref_b):
    """The share of pixels that differ by more than 0.2 in any channel between two images at
    64 x 64 after a 1-px blur: ~0 for a re-encoding or resize, the object's area for another object."""
    a, b = (np.asarray(open_image(r).resize((64, 64), Image.BILINEAR).filter(ImageFilter.GaussianBlur(1)),
                       dtype=np.int16) for r in (ref_a, ref_b))
    return float((np.abs(a - b).max(-1) > 51).mean())


class _Map(torch.utils.data.Dataset):
    """fn(item) for each item, in DataLoader workers."""

    def __init__(self, fn, items):
        self.fn, self.items = fn, items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.fn(self.items[i])


def sharded_map(fn, items, workers):
    """[fn(item) for item in items], this rank's contiguous share in DataLoader workers, gathered."""
    start, end = dist.shard_range(len(items))
    loader = torch.utils.data.DataLoader(_Map(fn, items[start:end]), batch_size=None, num_workers=workers,
                                         collate_fn=lambda x: x)
    return [x for part in dist.gather_objects(list(loader)) for x in part]


def image_checks(data, args):
    """({image: (reason, score, duplicate of)} for the images that fail, statistics). The checks in
    order: unreadable; too_small (shorter side < --min-size); odd_aspect_ratio (short / long <
    --min-aspect); low_information (entropy < --low-information x the median); blurry (blur >
    --blurry); exact_duplicate (the pixels of an image before it); near_duplicate (near_duplicates)."""
    props = sharded_map(image_properties if args.quality else readable_size, data.images, args.workers)
    failed = {i: ("unreadable", None, None) for i, p in enumerate(props) if p is None}
    readable = [p for p in props if p is not None]
    if not readable:
        raise UserError(f"--data {data.spec}: not one image could be read")
    if not args.quality:
        return failed, {}
    median_entropy = float(np.median([p["entropy"] for p in readable]))
    seen = {}
    for i, p in enumerate(props):
        if p is None:
            continue
        short, long = sorted((p["width"], p["height"]))
        for reason, bad, score in [("too_small", short < args.min_size, short),
                                   ("odd_aspect_ratio", short / long < args.min_aspect, short / long),
                                   ("low_information", p["entropy"] < args.low_information * median_entropy,
                                    p["entropy"]),
                                   ("blurry", p["blur"] > args.blurry, p["blur"])]:
            if bad:
                failed[i] = (reason, score, None)
                break
        else:
            if p["md5"] in seen:
                failed[i] = ("exact_duplicate", 1.0, seen[p["md5"]])
            else:
                seen[p["md5"]] = i
    failed.update(near_duplicates(data, props, failed, args))
    return failed, {"median_entropy": median_entropy}


def near_duplicates(data, props, failed, args, bands=5, radius=4):
    """{image: ("near_duplicate", changed share, the image before it that it repeats)}. Candidates
    share one of `bands` slices of their perceptual hash (if two hashes differ in at most `radius` <
    `bands` bits, some slice is equal) and differ in at most `radius` bits; a candidate is confirmed
    when at most --changed-pixels of its pixels differ (changed_pixels)."""
    width, buckets, candidates = math.ceil(63 / bands), {}, []
    alive = [i for i, p in enumerate(props) if p is not None and i not in failed]
    for i in alive:
        h = props[i]["phash"]
        keys = [(b, (h >> (b * width)) & ((1 << width) - 1)) for b in range(bands)]
        near = {j for key in keys for j in buckets.get(key, ())}
        candidates += [(j, i) for j in sorted(near) if bin(h ^ props[j]["phash"]).count("1") <= radius]
        for key in keys:
            buckets.setdefault(key, []).append(i)
    changed = sharded_map(lambda ji: changed_pixels(data.images[ji[0]], data.images[ji[1]]), candidates,
                          args.workers)
    found = {}
    for (j, i), share in zip(candidates, changed):        # in order: an image repeats one kept before it
        if share <= args.changed_pixels and j not in found and i not in found:
            found[i] = ("near_duplicate", share, j)
    return found


# ---- 2. embeddings ----

class _Images(torch.utils.data.Dataset):
    def __init__(self, refs, size):
        self.refs, self.transform = refs, eval_transform(size, crop=True)     # CLIP's preprocessing

    def __len__(self):
        return len(self.refs)

    def __getitem__(self, i):
        return self.transform(open_image(self.refs[i]))


@torch.no_grad()
def embed(model, tokenizer, cfg, images, captions, args, device):
    """Normalised image (n_images, E) and caption (n_captions, E) embeddings, float16. The work is
    cut into chunks of --chunk items; rank r embeds chunks r, r + W, ...; each finished chunk is
    saved under OUT/embeddings/ (a temporary name, then renamed), so a killed run recomputes only
    the chunks it had not finished. manifest.json names what they embed: another model or other
    data in the same OUT is an error, not a silent mix."""
    folder = os.path.join(args.out, "embeddings")
    manifest = {"model": os.path.abspath(args.model), "chunk": args.chunk,
                "images": hashlib.md5("\n".join(map(str, images)).encode()).hexdigest(),
                "captions": hashlib.md5("\n".join(captions).encode()).hexdigest()}
    path = os.path.join(folder, "manifest.json")
    if os.path.isfile(path):
        with open(path) as f:
            if json.load(f) != manifest:
                raise UserError(f"{path}: these embeddings are of another model or other data; "
                                f"remove {folder} or choose another --out")
    dist.barrier()
    if dist.is_main():
        os.makedirs(folder, exist_ok=True)
        write_atomic(path, json.dumps(manifest, indent=1))
    dist.barrier()
    precision = resolve_precision(args.precision, device)

    def run(kind, items, batches, encode):
        n_chunks = math.ceil(len(items) / args.chunk)
        mine = [c for c in range(dist.rank(), n_chunks, dist.world_size())
                if not os.path.isfile(os.path.join(folder, f"{kind}_{c:06d}.npy"))]
        from tqdm import tqdm
        bar = tqdm(total=sum(len(items[c * args.chunk:(c + 1) * args.chunk]) for c in mine),
                   unit="pair" if kind == "captions" else "image", desc=f"{kind} (rank {dist.rank()})",
                   disable=not dist.is_main(), mininterval=5)
        for c in mine:
            out = []
            for batch in batches(items[c * args.chunk:(c + 1) * args.chunk]):
                with autocast(precision, device):
                    out.append(F.normalize(encode(batch).float(), dim=-1).half().cpu())
                bar.update(len(out[-1]))
            file = os.path.join(folder, f"{kind}_{c:06d}.npy")
            np.save(file + ".tmp.npy", torch.cat(out).numpy())
            os.replace(file + ".tmp.npy", file)
        bar.close()
        dist.barrier()
        return np.concatenate([np.load(os.path.join(folder, f"{kind}_{c:06d}.npy")) for c in range(n_chunks)])

    def image_batches(part):              # decoded and resized in DataLoader workers
        return torch.utils.data.DataLoader(_Images(part, cfg.image_size), batch_size=args.batch_size,
                                           num_workers=args.workers)

    def caption_batches(part):
        return (part[i:i + args.batch_size] for i in range(0, len(part), args.batch_size))

    image_emb = run("images", images, image_batches, lambda x: model.encode_image(x.to(device)))
    text_emb = run("captions", captions, caption_batches,
                   lambda t: model.encode_text(tokenizer(t, cfg.context_length).to(device)))
    return image_emb, text_emb


# ---- 3. CLIP score (DataComp) ----

def clip_score_filter(scores, image_emb, text_emb, args, pair_row=None, draws=100, allowed=0.05):
    """(keep mask over the pairs, threshold or None, the rule in words). --min-clip-score S keeps
    score >= S; --keep-fraction F the top F (DataComp's rank cut). By default each caption is scored
    against `draws` images of the dataset drawn at random (seeded; all of them when there are fewer;
    its own image, pair_row, left out) and the pair is kept when at most `allowed` of them score above its own image: a
    rank, so no cosine tuned to the model."""
    if args.min_clip_score is not None:
        return scores >= args.min_clip_score, args.min_clip_score, f"score >= {args.min_clip_score}"
    if args.keep_fraction is not None:
        k = max(1, int(len(scores) * args.keep_fraction))
        threshold = float(np.sort(scores)[::-1][k - 1])
        return scores >= threshold, threshold, f"the top {args.keep_fraction:g} (score >= {threshold:.4f})"
    g = torch.Generator().manual_seed(0)
    images, rows = torch.from_numpy(image_emb), torch.from_numpy(np.asarray(pair_row))
    keep = torch.zeros(len(scores), dtype=torch.bool)
    for start in range(0, len(scores), 4096):
        t, own = torch.from_numpy(text_emb[start:start + 4096]).float(), rows[start:start + 4096]   # (b, E)
        drawn = (torch.randint(len(images), (len(t), draws), generator=g) if len(images) > draws + 1 else
                 torch.arange(len(images)).expand(len(t), -1))           # (b, M); a small set: every image
        s = torch.einsum("be,bme->bm", t, images[drawn].float())
        own_score = torch.einsum("be,be->b", t, images[own].float())                  # the same arithmetic
        other = drawn != own[:, None]
        keep[start:start + len(t)] = ((s > own_score[:, None]) & other).sum(1) <= allowed * other.sum(1)
    rule = f"rank: at most {allowed:.0%} of {draws} random other images score above the pair's own"
    return keep.numpy(), None, rule


# ---- 4. SemDeDup ----

def kmeans(x, k, iters, backend, seed=0):
    """Spherical k-means of normalised rows x (n, E): (assignment (n,), centroids (k, E)). faiss when
    installed (or --kmeans faiss; the best of 3 random starts), else torch: Lloyd's iterations on the
    cosine, from greedy k-means++ (Arthur & Vassilvitskii 2007; of 2 + log k rows drawn by squared
    distance, the one that lowers the potential most) on a sample of 20 k rows when k <= 1,000 (it
    costs O(20 k^2) dot products), from k random rows above that; both train on at most 256 rows
    per centroid, then assign every row once."""
    if backend == "faiss":
        import faiss
        km = faiss.Kmeans(x.shape[1], k, niter=iters, seed=seed, spherical=True, verbose=False, nredo=3,
                          max_points_per_centroid=256, min_points_per_centroid=1)
        km.train(x.cpu().numpy())
        centroids = torch.from_numpy(km.centroids).to(x.device)
    else:
        g = torch.Generator().manual_seed(seed)
        sample = x[torch.randperm(len(x), generator=g)[:20 * k if k <= 1000 else k]].cpu()
        centroids = sample[:k].clone()
        if k <= 1000:
            centroids = sample[:1].clone()
            d2 = (2 - 2 * sample @ centroids[0]).clamp(min=0)              # squared distance to the closest
            while len(centroids) < k:
                trials = torch.multinomial(d2 + 1e-12, 2 + int(math.log(k)), generator=g)
                new = torch.minimum(d2[None], (2 - 2 * sample[trials] @ sample.T).clamp(min=0))
                best = int(new.sum(1).argmin())
                centroids, d2 = torch.cat([centroids, sample[trials[best]][None]]), new[best]
        centroids = centroids.to(x.device)
        train = x if len(x) <= 256 * k else x[torch.randperm(len(x), generator=g)[:256 * k]]
        for _ in range(iters):                     # on 256 rows per centroid at most, as faiss trains
            assign = torch.cat([(part @ centroids.T).argmax(1) for part in train.split(65536)])
            sums = torch.zeros_like(centroids).index_add_(0, assign, train)
            filled = sums.norm(dim=1) > 0                      # an empty cluster keeps its centroid
            centroids[filled] = F.normalize(sums[filled], dim=1)
    centroids = F.normalize(centroids, dim=1)
    return torch.cat([(part @ centroids.T).argmax(1) for part in x.split(65536)]), centroids


def semdedup(image_emb, candidates, args, block=4096, device="cpu"):
    """{image: (cosine, the kept image it repeats)} among `candidates` (image indices). SemDeDup (Abbas
    et al. 2023, Sec. 3 and their code): k-means on the embeddings (--clusters), each cluster ordered
    by distance to its centroid, farthest first (the code's keep_hard), and an image is removed when
    its cosine to any image before it exceeds 1 - eps (--dedup-eps). The within-cluster pairs are
    computed `block` columns at a time: memory O(cluster size x block). On `device` (a GPU when
    there is one): every row is held there in float32, n x E x 4 bytes."""
    if len(candidates) < 2:
        return {}
    x = F.normalize(torch.from_numpy(image_emb[candidates]).to(device).float(), dim=1)
    k = min(len(candidates), args.clusters or math.ceil(len(candidates) / 10000))
    backend = args.kmeans if args.kmeans != "auto" else ("faiss" if _has_faiss() else "torch")
    assign, centroids = kmeans(x, k, args.kmeans_iters, backend)
    removed = {}
    for c in range(k):
        members = (assign == c).nonzero().flatten()
        order = members[(x[members] @ centroids[c]).argsort()]           # farthest from the centroid first
        e, order = x[order], order.tolist()
        for s in range(1, len(order), block):
            sim = e[:s + block] @ e[s:s + block].T                         # (rows before, block)
            rows = torch.arange(len(sim), device=x.device)[:, None]
            sim[rows >= torch.arange(s, s + sim.shape[1], device=x.device)[None, :]] = -2   # only rows before
            best, by = sim.max(0)
            for j in (best > 1 - args.dedup_eps).nonzero().flatten().tolist():
                removed[candidates[order[s + j]]] = (float(best[j]), candidates[order[int(by[j])]])
    return removed


def _has_faiss():
    try:
        import faiss  # noqa: F401
        return True
    except ImportError:
        return False


# ---- 5. outputs ----

def contact_sheet(path, data, removed, neighbour, per_reason=6, size=96):
    """report.png: a row per removal reason, up to `per_reason` images spread over its list, each
    beside the kept image neighbour(pair) (the one it repeats; for a low CLIP score the kept image
    its caption fits best; else the nearest kept image), with the score and the caption."""
    reasons = sorted({r["reason"] for r in removed})
    width, height = 160 + per_reason * (2 * size + 12), max(1, len(reasons)) * (size + 28)
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    for y, reason in zip(range(0, sheet.height, size + 28), reasons):
        draw.text((4, y + size // 2), reason, fill="black")
        first = {}                                              # one caption per image
        for r in removed:
            if r["reason"] == reason:
                first.setdefault(r["image_index"], r)
        first = list(first.values())
        examples = [first[k * len(first) // per_reason] for k in range(min(per_reason, len(first)))]
        for x, r in zip(range(160, sheet.width, 2 * size + 12), examples):
            for dx, index in ((0, r["image_index"]), (size + 4, neighbour(r["pair_index"]))):
                try:
                    img = open_image(data.images[index])
                    img.thumbnail((size, size))
                except OSError:
                    img = Image.new("RGB", (size, size), "grey")
                sheet.paste(img, (x + dx, y))
            score = "" if r["score"] is None else f"{r['score']:.3f}"
            draw.text((x, y + size + 2), f"removed {score}", fill="red")
            draw.text((x + size + 4, y + size + 2), "kept", fill="green")
            draw.text((x, y + size + 14), r["caption"][:2 * size // 6], fill="black")
    sheet.save(path + ".tmp.png")
    os.replace(path + ".tmp.png", path)


def write_outputs(data, args, decisions, kept_pairs, report, neighbour):
    """OUT/kept.json (kept.csv, shards/), removed.jsonl, report.json, report.png: each written under
    a temporary name and renamed."""
    os.makedirs(args.out, exist_ok=True)
    removed = [dict(image=data.name(data.pairs[n][0]), caption=data.pairs[n][1], reason=reason, score=score,
                    duplicate_of=None if other is None else data.name(other), image_index=data.pairs[n][0],
                    pair_index=n)
               for n, (reason, score, other) in sorted(decisions.items())]
    report["kept_data"] = write_kept(data, kept_pairs, args.out)
    write_atomic(os.path.join(args.out, "removed.jsonl"), "".join(
        json.dumps({k: v for k, v in r.items() if not k.endswith("_index")}) + "\n" for r in removed))
    write_atomic(os.path.join(args.out, "report.json"), json.dumps(report, indent=1))
    contact_sheet(os.path.join(args.out, "report.png"), data, removed, neighbour)


# ---- main ----

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="annotation file (JSON, CSV) or local webdataset shards")
    p.add_argument("--image-root", default="", help="folder relative image paths start from")
    p.add_argument("--model", required=True,
                   help="our CLIP/CoCa checkpoint, CLIPModel folder, open_clip CLIP/CoCa folder")
    p.add_argument("--tokenizer", default="", help="tokenizer folder or hub name (default: the model's)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--quality", action="store_true", help="run the image checks (step 1)")
    p.add_argument("--min-size", type=int, default=32, help="shorter side (px) below which an image goes")
    p.add_argument("--min-aspect", type=float, default=0.35, help="short/long side below which")
    p.add_argument("--low-information", type=float, default=0.2, help="entropy below this x the median")
    p.add_argument("--blurry", type=float, default=0.6, help="blur above which (share of the Laplacian kept)")
    p.add_argument("--changed-pixels", type=float, default=0.001, help="near duplicate: share changed")
    p.add_argument("--min-clip-score", type=float, help="keep pairs with cosine >= S")
    p.add_argument("--keep-fraction", type=float, help="keep the top F of the pairs by cosine")
    p.add_argument("--dedup-eps", type=float, default=0.0001, help="SemDeDup: remove cosine > 1 - eps")
    p.add_argument("--clusters", type=int, default=0, help="k-means clusters (0: one per 10,000 images)")
    p.add_argument("--kmeans", default="auto", choices=["auto", "torch", "faiss"],
                   help="auto: faiss if installed")
    p.add_argument("--kmeans-iters", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--chunk", type=int, default=65536, help="items per saved embedding chunk")
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers")
    p.add_argument("--precision", default="auto", help="auto (bf16 on GPUs that have it), fp32, bf16, fp16")
    args = p.parse_args(argv)
    for bad, message in [
            (args.min_clip_score is not None and args.keep_fraction is not None,
             "give --min-clip-score or --keep-fraction, not both"),
            (args.keep_fraction is not None and not 0 < args.keep_fraction <= 1,
             f"--keep-fraction must be in (0, 1], not {args.keep_fraction}"),
            (not 0 <= args.dedup_eps < 1, f"--dedup-eps must be in [0, 1), not {args.dedup_eps}"),
            (args.chunk < 1 or args.batch_size < 1, "--chunk and --batch-size must be at least 1")]:
        if bad:
            raise UserError(message)
    if args.kmeans == "faiss" and not _has_faiss():
        raise UserError("--kmeans faiss: pip install faiss-cpu (or faiss-gpu)")
    _, _, _, device = dist.setup()
    started = time.time()
    data = Dataset(args.data, args.image_root)
    model, tokenizer, cfg = load_model(args.model, device, args.tokenizer)

    # 1. image checks
    failed, stats = image_checks(data, args)
    # decisions: {pair: (reason, score, the image it repeats or None)}
    decisions = {n: failed[i] for n, (i, _) in enumerate(data.pairs) if i in failed}
    good = [i for i in range(len(data.images)) if i not in failed]
    row_of = {i: r for r, i in enumerate(good)}                          # image -> embedding row
    live = [n for n, (i, _) in enumerate(data.pairs) if i in row_of]
    if not live:
        raise UserError(f"--data {data.spec}: every image failed the image checks (report: {stats})")
    # 2. embeddings of the images and captions that passed
    embedding_started = time.time()
    image_emb, text_emb = embed(model, tokenizer, cfg, [data.images[i] for i in good],
                                [data.pairs[n][1] for n in live], args, device)
    embedding_seconds = time.time() - embedding_started
    if dist.is_main():          # the keys of the arrays' rows: images_*.npy, then captions_*.npy
        folder = os.path.join(args.out, "embeddings")
        write_atomic(os.path.join(folder, "images.jsonl"), "".join(
            json.dumps({"image": data.name(i)}) + "\n" for i in good))
        write_atomic(os.path.join(folder, "captions.jsonl"), "".join(
            json.dumps({"image": data.name(data.pairs[n][0]), "caption": data.pairs[n][1]}) + "\n"
            for n in live))
    pair_row = np.array([row_of[data.pairs[n][0]] for n in live])
    scores = (image_emb[pair_row].astype(np.float32) * text_emb.astype(np.float32)).sum(1)
    # 3. CLIP score (every rank decides the same; rank 0 writes)
    keep, threshold, rule = clip_score_filter(scores, image_emb, text_emb, args, pair_row)
    decisions.update({n: ("low_clip_score", float(s), None) for n, s, k in zip(live, scores, keep) if not k})
    # 4. SemDeDup over the images that keep a caption
    survivors = sorted({data.pairs[n][0] for n, k in zip(live, keep) if k})
    repeats = semdedup(image_emb, [row_of[i] for i in survivors], args, device=device)
    for n, k in zip(live, keep):
        if k and row_of[data.pairs[n][0]] in repeats:
            cos, other = repeats[row_of[data.pairs[n][0]]]
            decisions[n] = ("semantic_duplicate", cos, good[other])
    kept_pairs = [n for n in range(len(data.pairs)) if n not in decisions]
    counts = {}
    for reason, _, _ in decisions.values():
        counts[reason] = counts.get(reason, 0) + 1
    if not kept_pairs:
        raise UserError(f"every pair was removed (CLIP score: {rule}; --dedup-eps {args.dedup_eps}; "
                        f"{counts}): "
                        f"nothing written")
    # 5. outputs
    report = {"data": args.data, "model": args.model, "pairs": len(data.pairs), "images": len(data.images),
              "kept_pairs": len(kept_pairs), "kept_images": len({data.pairs[n][0] for n in kept_pairs}),
              "removed_pairs": counts, "clip_score_rule": rule, "clip_score_threshold": threshold,
              "quality": {"on": args.quality, **stats, **{k: getattr(args, k) for k in (
                  "min_size", "min_aspect", "low_information", "blurry", "changed_pixels")}},
              "dedup_eps": args.dedup_eps, "clusters": args.clusters or math.ceil(len(survivors) / 10000),
              "seconds": round(time.time() - started, 1),
              "embedding_seconds": round(embedding_seconds, 1)}       # chunks found on disk included
    kept_images = sorted({data.pairs[n][0] for n in kept_pairs})
    kept_emb, caption_row = torch.from_numpy(image_emb[[row_of[i] for i in kept_images]]).float(), dict(
        zip(live, range(len(live))))

    def neighbour(n):           # report.png: the kept image shown beside removed pair n
        (reason, _, other), i = decisions[n], data.pairs[n][0]
        if other is not None or i not in row_of:
            return other if other is not None else kept_images[i % len(kept_images)]
        query = text_emb[caption_row[n]] if reason == "low_clip_score" else image_emb[row_of[i]]
        return kept_images[int((kept_emb @ torch.from_numpy(query).float()).argmax())]

    if dist.is_main():
        write_outputs(data, args, decisions, kept_pairs, report, neighbour)
        print(json.dumps({k: v for k, v in report.items() if k != "quality"}), flush=True)
    dist.barrier()
    dist.cleanup()
    return report if dist.is_main() else None


if __name__ == "__main__":
    cli(main)
