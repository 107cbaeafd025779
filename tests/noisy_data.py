"""A noisy copy of the tiny training set for data/curate.py's proof (tests/test_curate.py and the
numbers in docs/curate.md): the clean pairs, plus images and pairs of each kind web data is full of.

    kinds: exact (a copied file), jpeg (re-encoded at quality 75), resized (64 -> 58 px), each with
    its source's captions; blurred (Gaussian, radius 2) with its source's captions; blank (one flat
    colour) with the captions of a random image; swapped (clean images whose captions are given to another of them)."""
import json
import os
import random
import shutil

from PIL import Image, ImageFilter

KINDS = ("exact", "jpeg", "resized", "blank", "blurred", "swapped")


def make_noisy(tiny, out, added=100, swapped=300, seed=0):
    """OUT/noisy.json and its images; returns {pair (image path, caption): kind} for every pair,
    kind "clean" for the untouched ones. `added` images of each added kind, `swapped` clean images
    whose caption lists are passed round a cycle (each gets the next one's captions)."""
    rng = random.Random(seed)
    records = json.load(open(os.path.join(tiny, "train.json")))
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    path = lambda r: os.path.join(tiny, r["image"])        # noqa: E731
    entries, kind_of = [], {}
    cycle = rng.sample(range(len(records)), swapped)
    captions = {a: records[b]["caption"] for a, b in zip(cycle, cycle[1:] + cycle[:1])}
    for i, r in enumerate(records):
        entries.append({"image": path(r), "caption": captions.get(i, r["caption"]), "image_id": r["image_id"]})
        for c in entries[-1]["caption"]:
            kind_of[(path(r), c)] = "swapped" if i in captions else "clean"
    for kind in KINDS[:-1]:
        for n, i in enumerate(rng.sample(range(len(records)), added)):
            src, file = records[i], os.path.join(out, "images", f"{kind}_{n:04d}")
            img = Image.open(path(src)).convert("RGB")
            if kind == "exact":
                shutil.copyfile(path(src), file + ".png")
            elif kind == "jpeg":
                img.save(file + ".jpg", quality=75)
            elif kind == "resized":
                img.resize((58, 58), Image.BICUBIC).save(file + ".png")
            elif kind == "blank":
                Image.new("RGB", img.size, tuple(rng.randrange(256) for _ in range(3))).save(file + ".png")
            else:
                img.filter(ImageFilter.GaussianBlur(2)).save(file + ".png")
            file += ".jpg" if kind == "jpeg" else ".png"
            caps = records[rng.randrange(len(records))]["caption"] if kind == "blank" else src["caption"]
            entries.append({"image": file, "caption": caps, "image_id": f"{kind}_{n}"})
            for c in caps:
                kind_of[(file, c)] = kind
    with open(os.path.join(out, "noisy.json"), "w") as f:
        json.dump(entries, f)
    return kind_of
