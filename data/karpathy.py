"""COCO and Flickr30k Karpathy splits (Karpathy & Fei-Fei 2015) to our annotation files, the splits
every paper here reports retrieval and captioning on.

    python data/karpathy.py dataset_coco.json --out coco/          # train.json (113,287 images: train +
                                                                   # restval), val.json (5,000), test.json (5,000)
    python data/karpathy.py dataset_flickr30k.json --out flickr30k/    # 29,000 / 1,014 / 1,000

Input: Karpathy's `dataset_coco.json` / `dataset_flickr30k.json` ({"images": [{"filepath", "filename",
"split": train|restval|val|test, "sentences": [{"raw"}], "cocoid" | "imgid"}]}). Output: one entry per
image, {"image": <path under --image-root>, "caption": [its captions], "image_id"}, the layout
read_annotations reads (a training split becomes one sample per pair, as BLIP's loader).

Image paths: COCO's are `<filepath>/<filename>` (`val2014/COCO_val2014_000000391895.jpg`); Flickr30k's
`flickr30k-images/<filename>`, as BLIP's annotation files (change with --image-prefix). Pass the folder
that holds them as --image-root to the training scripts. Captions are the "raw" sentences, stripped;
"restval" joins "train" (ALBEF, BLIP and LAVIS train on 113,287 COCO images) unless --no-restval.
Image ids: COCO's cocoid (so results map back to COCO's own annotations), Flickr30k's file number.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from common.data import read_json  # noqa: E402
from common.utils import UserError, cli  # noqa: E402


def convert(karpathy, image_prefix=None, restval=True):
    """{split: [entries]} of a Karpathy file; empty sentences are dropped and counted."""
    data = read_json(karpathy, "Karpathy split file")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise UserError(f"{karpathy}: expected Karpathy's layout, {{'images': [...], 'dataset': ...}}")
    flickr = data.get("dataset", "").startswith("flickr")
    prefix = image_prefix if image_prefix is not None else ("flickr30k-images" if flickr else "")
    splits, empty = {"train": [], "val": [], "test": []}, 0
    for i, img in enumerate(data["images"]):
        where = f"{karpathy}, image {i}"
        for field in ("filename", "split", "sentences"):
            if field not in img:
                raise UserError(f"{where}: missing field '{field}'")
        split = "train" if img["split"] == "restval" and restval else img["split"]
        if split not in splits:
            if img["split"] == "restval":
                continue
            raise UserError(f"{where}: split {img['split']!r} is not train, restval, val or test")
        captions = [s["raw"].strip() for s in img["sentences"] if s.get("raw", "").strip()]
        empty += len(img["sentences"]) - len(captions)
        if not captions:
            continue
        path = "/".join(p for p in (prefix, img.get("filepath", ""), img["filename"]) if p)
        stem = os.path.splitext(img["filename"])[0]
        image_id = img.get("cocoid", int(stem) if stem.isdigit() else img.get("imgid", stem))
        splits[split].append({"image": path, "caption": captions, "image_id": image_id})
    if empty:
        print(f"{karpathy}: dropped {empty} empty sentence(s)", file=sys.stderr)
    return splits


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("karpathy", help="dataset_coco.json or dataset_flickr30k.json")
    p.add_argument("--out", required=True, help="folder for train.json, val.json and test.json")
    p.add_argument("--image-prefix", default=None,
                   help="folder put before each image path (default: none for COCO, flickr30k-images for Flickr30k)")
    p.add_argument("--no-restval", action="store_true", help="leave COCO's restval images out of train")
    args = p.parse_args(argv)
    splits = convert(args.karpathy, args.image_prefix, restval=not args.no_restval)
    os.makedirs(args.out, exist_ok=True)
    for split, entries in splits.items():
        path = os.path.join(args.out, f"{split}.json")
        with open(path, "w") as f:
            json.dump(entries, f)
        print(f"{path}: {len(entries)} images, {sum(len(e['caption']) for e in entries)} captions")


if __name__ == "__main__":
    cli(main)
