"""ImageNet-1k validation images into class folders, the layout --zeroshot-data reads.

    python data/imagenet_val.py ILSVRC2012_img_val/ --devkit ILSVRC2012_devkit_t12.tar.gz --out imagenet/val
    python data/imagenet_val.py ILSVRC2012_img_val/ --solution LOC_val_solution.csv --out imagenet/val   # Kaggle's

The 50,000 images of ILSVRC2012_img_val (flat: ILSVRC2012_val_00000001.JPEG ...) go to
`out/<wnid>/`, one folder per class (all 1,000, as valprep.sh makes them). The class of image k is
line k of the devkit's data/ILSVRC2012_validation_ground_truth.txt, an ILSVRC2012_ID that the
devkit's data/meta.mat maps to a wnid (its 1,000 synsets without children; reading it needs scipy),
or the first wnid of the image's row in Kaggle's LOC_val_solution.csv. --devkit takes the devkit
folder or its .tar.gz. Images are symbolic links by default (--mode copy, hardlink or move).

The training scripts then find the 1,000 wnid folders and use OpenAI's curated class names shipped in
common/imagenet_classnames.txt and the 80 prompt templates: `--zeroshot-data imagenet/val`.
"""
import argparse
import csv
import io
import os
import shutil
import sys
import tarfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from common.utils import MissingFileError, UserError, cli  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
META = "data/meta.mat"


def wnids_1k():
    with open(os.path.join(HERE, "..", "common", "imagenet_wnids.txt")) as f:
        return [line.strip() for line in f if line.strip()]


def _devkit_file(devkit, name):
    """The bytes of a devkit file, from the devkit folder or its .tar.gz."""
    if os.path.isdir(devkit):
        path = os.path.join(devkit, name)
        if not os.path.isfile(path):
            raise MissingFileError(f"{path} does not exist (is {devkit} the ILSVRC2012 devkit?)")
        with open(path, "rb") as f:
            return f.read()
    if not os.path.isfile(devkit):
        raise MissingFileError(f"--devkit {devkit} does not exist")
    with tarfile.open(devkit) as tar:
        for member in tar.getmembers():
            if member.name.endswith("/" + name) or member.name == name:
                return tar.extractfile(member).read()
    raise UserError(f"{devkit} has no {name}")


def devkit_labels(devkit):
    """[wnid of validation image 1, 2, ...] from the devkit."""
    try:
        from scipy.io import loadmat
    except ImportError:
        raise UserError("reading the devkit's meta.mat needs scipy: pip install scipy "
                        "(or use --solution LOC_val_solution.csv)") from None
    synsets = loadmat(io.BytesIO(_devkit_file(devkit, META)), squeeze_me=True)["synsets"]
    id_to_wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}
    if len(id_to_wnid) != 1000:
        raise UserError(f"{devkit}: {META} has {len(id_to_wnid)} leaf synsets, not 1,000")
    labels = []
    for line, text in enumerate(_devkit_file(devkit, GROUND_TRUTH).decode().split(), start=1):
        if not text.isdigit() or int(text) not in id_to_wnid:
            raise UserError(f"{devkit}: {GROUND_TRUTH}, line {line}: {text!r} is not an ILSVRC2012_ID of {META}")
        labels.append(id_to_wnid[int(text)])
    return labels


def solution_labels(path):
    """{image name stem: wnid} from Kaggle's LOC_val_solution.csv (ImageId,PredictionString)."""
    if not os.path.isfile(path):
        raise MissingFileError(f"--solution {path} does not exist")
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0][:2] != ["ImageId", "PredictionString"]:
        raise UserError(f"{path}: expected the header ImageId,PredictionString")
    out = {}
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != 2 or not row[1].split():
            raise UserError(f"{path}, line {line}: expected an image id and its boxes")
        out[row[0]] = row[1].split()[0]
    return out


def reorganise(val_dir, out, labels, mode="symlink"):
    """Put each image of val_dir in out/<wnid>/; labels: {stem: wnid}. Returns the count per class."""
    if not os.path.isdir(val_dir):
        raise MissingFileError(f"{val_dir} does not exist")
    known = wnids_1k()
    unknown = sorted(set(labels.values()) - set(known))
    if unknown:
        raise UserError(f"{unknown[0]} is not one of ImageNet-1k's 1,000 wnids ({len(unknown)} unknown)")
    images = sorted(n for n in os.listdir(val_dir) if n.lower().endswith((".jpeg", ".jpg", ".png")))
    if not images:
        raise UserError(f"{val_dir} holds no images")
    unlabelled = [n for n in images if os.path.splitext(n)[0] not in labels]
    if unlabelled:
        raise UserError(f"{os.path.join(val_dir, unlabelled[0])} has no label ({len(unlabelled)} images without)")
    for wnid in known:
        os.makedirs(os.path.join(out, wnid), exist_ok=True)
    counts = {}
    for name in images:
        wnid = labels[os.path.splitext(name)[0]]
        src, dst = os.path.abspath(os.path.join(val_dir, name)), os.path.join(out, wnid, name)
        if os.path.lexists(dst):
            os.remove(dst)
        {"symlink": os.symlink, "hardlink": os.link, "copy": shutil.copy2, "move": shutil.move}[mode](src, dst)
        counts[wnid] = counts.get(wnid, 0) + 1
    return counts


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("val_dir", help="the flat ILSVRC2012_img_val folder")
    p.add_argument("--out", required=True, help="output folder (one sub-folder per wnid)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--devkit", help="ILSVRC2012_devkit_t12 folder or .tar.gz")
    src.add_argument("--solution", help="Kaggle's LOC_val_solution.csv")
    p.add_argument("--mode", choices=["symlink", "hardlink", "copy", "move"], default="symlink",
                   help="how images reach their class folder")
    args = p.parse_args(argv)
    if args.devkit:
        labels = {f"ILSVRC2012_val_{k:08d}": wnid for k, wnid in enumerate(devkit_labels(args.devkit), start=1)}
    else:
        labels = solution_labels(args.solution)
    counts = reorganise(args.val_dir, args.out, labels, args.mode)
    print(f"{args.out}: {sum(counts.values())} images in {len(counts)} of 1,000 classes; --zeroshot-data {args.out}")


if __name__ == "__main__":
    cli(main)
