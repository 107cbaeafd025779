"""Conceptual Captions (CC3M, CC12M) from Google's TSV files to what the training scripts read.

    python data/cc_tsv.py Train_GCC-training.tsv --out cc3m.csv        # CC3M: caption<TAB>url, no header
    python data/cc_tsv.py cc12m.tsv --out cc12m.csv                    # CC12M: url<TAB>caption, no header
    img2dataset --url_list cc3m.csv --input_format csv --url_col url --caption_col caption \\
        --output_format webdataset --output_folder cc3m/shards --image_size 256 --resize_mode keep_ratio
    python data/make_shards.py --sizes cc3m/shards                     # sizes.json from img2dataset's stats
    # then: --train-data 'cc3m/shards/{00000..00331}.tar'

    python data/cc_tsv.py --from-files cc3m/files --out cc3m/train.csv # img2dataset --output_format files:
                                                                       # an image,caption CSV for --train-data

The TSV step writes a CSV with the header `url,caption` (img2dataset's input); which column is the URL
is read per row (CC3M and CC12M differ). A row without a URL or a caption, or with another number of
fields, is skipped and counted, the first few named by line. The images themselves come from the web;
this machine-independent step only prepares the list. `--from-files` pairs each image of an
img2dataset `files` output (`<shard>/<key>.jpg` + `<key>.txt`) with its caption.
"""
import argparse
import csv
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from common.utils import MissingFileError, UserError, cli  # noqa: E402

SHOWN = 5


def _is_url(text):
    return text.startswith(("http://", "https://"))


def tsv_to_csv(tsv, out):
    """Write out (url,caption); returns (rows written, rows skipped)."""
    if not os.path.isfile(tsv):
        raise MissingFileError(f"{tsv} does not exist")
    written, skipped = 0, []
    with open(tsv, encoding="utf-8", newline="") as f, open(out + ".tmp", "w", newline="") as g:
        writer = csv.writer(g)
        writer.writerow(["url", "caption"])
        for line, row in enumerate(f, start=1):
            fields = [x.strip() for x in row.rstrip("\r\n").split("\t")]
            if len(fields) != 2:
                skipped.append((line, f"{len(fields)} fields"))
                continue
            url, caption = fields if _is_url(fields[0]) else fields[::-1]
            if not _is_url(url):
                skipped.append((line, "no http(s) URL"))
                continue
            if not caption:
                skipped.append((line, "empty caption"))
                continue
            writer.writerow([url, caption])
            written += 1
    if not written:
        os.remove(out + ".tmp")
        raise UserError(f"{tsv}: no row with a URL and a caption (is it a Conceptual Captions TSV?)")
    os.replace(out + ".tmp", out)
    for line, why in skipped[:SHOWN]:
        print(f"{tsv}, line {line}: {why}; skipped", file=sys.stderr)
    if skipped:
        print(f"{tsv}: skipped {len(skipped)} row(s)", file=sys.stderr)
    return written, len(skipped)


def files_to_csv(folder, out):
    """An image,caption CSV (paths relative to its folder) from img2dataset's `files` layout."""
    if not os.path.isdir(folder):
        raise MissingFileError(f"{folder} does not exist")
    base = os.path.dirname(os.path.abspath(out))
    rows, missing = [], 0
    for root, _, names in sorted(os.walk(folder)):
        for name in sorted(names):
            stem, ext = os.path.splitext(name)
            if ext.lower() not in (".jpg", ".jpeg", ".png", ".webp"):
                continue
            txt = os.path.join(root, stem + ".txt")
            caption = open(txt, encoding="utf-8").read().strip() if os.path.isfile(txt) else ""
            if not caption:
                missing += 1
                continue
            rows.append([os.path.relpath(os.path.join(root, name), base), caption])
    if not rows:
        raise UserError(f"{folder}: no image with a caption (.txt) beside it")
    with open(out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        writer.writerows(rows)
    if missing:
        print(f"{folder}: skipped {missing} image(s) without a caption", file=sys.stderr)
    return len(rows), missing


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("tsv", nargs="?", help="CC3M or CC12M .tsv")
    p.add_argument("--from-files", metavar="FOLDER", help="img2dataset `files` output instead of a TSV")
    p.add_argument("--out", required=True, help="the CSV to write")
    args = p.parse_args(argv)
    if args.from_files:
        n, _ = files_to_csv(args.from_files, args.out)
        print(f"{args.out}: {n} image-caption pairs; --train-data {args.out}")
    elif args.tsv:
        n, _ = tsv_to_csv(args.tsv, args.out)
        print(f"{args.out}: {n} URLs with captions (img2dataset --input_format csv --url_col url --caption_col caption)")
    else:
        p.error("give a TSV file or --from-files FOLDER")


if __name__ == "__main__":
    cli(main)
