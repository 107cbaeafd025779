"""data/ preparation scripts on fabricated inputs in the real formats (Karpathy's split files, the
ILSVRC2012 devkit and Kaggle's solution file, Conceptual Captions TSVs, img2dataset's outputs), and
their outputs accepted by the training scripts' --val-data / --zeroshot-data / --train-data."""
import csv
import json
import os
import random
import tarfile

import numpy as np
import pytest
from PIL import Image

import clip_train
from common.data import image_folder, read_annotations
from common.utils import UserError
from data import cc_tsv, imagenet_val, karpathy
from tests.test_clip_train import SMALL

COCO_SPLITS = ["train", "restval", "val", "test", "train", "test"]


def jpeg(path, i):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (20, 20), (40 * i % 256, 90, 200)).save(path, format="JPEG")


def karpathy_file(path, root, flickr=False):
    images = []
    for i, split in enumerate(COCO_SPLITS):
        folder = "" if flickr else ("train2014" if split in ("train", "restval") else "val2014")
        name = f"{1000 + i}.jpg" if flickr else f"COCO_{folder}_{i:012d}.jpg"
        entry = {"filename": name, "imgid": i, "split": split,
                 "sentences": [{"raw": f" image {i} sentence {k} ", "tokens": ["image"]} for k in range(5)]}
        if not flickr:
            entry.update(filepath=folder, cocoid=100 + i)
        images.append(entry)
        jpeg(os.path.join(root, "flickr30k-images" if flickr else folder, name), i)
    images[0]["sentences"][4]["raw"] = "  "                          # an empty sentence is dropped
    with open(path, "w") as f:
        json.dump({"images": images, "dataset": "flickr30k" if flickr else "coco"}, f)


def test_karpathy_coco_and_flickr_splits_load_as_val_data(tmp_path, tiny):
    root = tmp_path / "coco"
    karpathy_file(tmp_path / "dataset_coco.json", root)
    karpathy.main([str(tmp_path / "dataset_coco.json"), "--out", str(tmp_path / "out")])
    train = json.loads((tmp_path / "out" / "train.json").read_text())
    test = json.loads((tmp_path / "out" / "test.json").read_text())
    assert [e["image_id"] for e in train] == [100, 101, 104] and [e["image_id"] for e in test] == [103, 105]
    assert train[1] == {"image": "train2014/COCO_train2014_000000000001.jpg", "image_id": 101,
                        "caption": [f"image 1 sentence {k}" for k in range(5)]}      # restval joins train
    assert len(train[0]["caption"]) == 4
    karpathy.main([str(tmp_path / "dataset_coco.json"), "--out", str(tmp_path / "norestval"), "--no-restval"])
    assert len(json.loads((tmp_path / "norestval" / "train.json").read_text())) == 2
    # the test split is what the scripts evaluate: read with --image-root, every image found
    assert len(read_annotations(str(tmp_path / "out" / "test.json"), str(root))) == 2
    metrics = clip_train.main([*SMALL, "--eval-only", "--val-data", str(tmp_path / "out" / "test.json"),
                               "--image-root", str(root), "--tokenizer", os.path.join(tiny, "tokenizer"),
                               "--output-dir", str(tmp_path / "run")])
    assert set(metrics) >= {"i2t_r1", "t2i_r1", "r_mean"}
    # Flickr30k: images under flickr30k-images/, ids from the file numbers
    karpathy_file(tmp_path / "dataset_flickr30k.json", tmp_path / "flickr", flickr=True)
    karpathy.main([str(tmp_path / "dataset_flickr30k.json"), "--out", str(tmp_path / "fl")])
    val = json.loads((tmp_path / "fl" / "val.json").read_text())
    assert val == [{"image": "flickr30k-images/1002.jpg", "image_id": 1002,
                    "caption": [f"image 2 sentence {k}" for k in range(5)]}]
    assert len(read_annotations(str(tmp_path / "fl" / "train.json"), str(tmp_path / "flickr"))) == 3
    (tmp_path / "bad.json").write_text(json.dumps([{"image": "x.jpg"}]))
    with pytest.raises(UserError, match="bad.json: expected Karpathy's layout"):
        karpathy.convert(str(tmp_path / "bad.json"))


def fake_devkit(folder, val_wnids):
    """A devkit with meta.mat laid out as the real one (1,000 leaf synsets in ILSVRC2012_ID order,
    which is not the sorted-wnid order, then non-leaf synsets) and the ground truth of val_wnids."""
    from scipy.io import savemat
    wnids = imagenet_val.wnids_1k()
    order = wnids[:]
    random.Random(0).shuffle(order)
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images"]
    rows = [(k, w, f"words {w}", "gloss", 0, np.zeros(0), 0, 1300) for k, w in enumerate(order, start=1)]
    rows += [(1000 + k, f"n9999999{k}", "parent", "gloss", 3, np.array([1, 2, 3]), 2, 0) for k in range(1, 4)]
    synsets = np.empty((len(rows), 1), dtype=[(f, object) for f in fields])
    for i, row in enumerate(rows):
        synsets[i, 0] = row
    os.makedirs(os.path.join(folder, "data"))
    savemat(os.path.join(folder, "data", "meta.mat"), {"synsets": synsets})
    ids = {w: k for k, w in enumerate(order, start=1)}
    with open(os.path.join(folder, "data", "ILSVRC2012_validation_ground_truth.txt"), "w") as f:
        f.write("\n".join(str(ids[w]) for w in val_wnids) + "\n")


def test_imagenet_val_into_class_folders_loads_as_zeroshot_data(tmp_path, tiny):
    wnids = imagenet_val.wnids_1k()
    val_wnids = [wnids[0], wnids[999], wnids[0], wnids[500]]
    flat = tmp_path / "ILSVRC2012_img_val"
    for k in range(1, 5):
        jpeg(str(flat / f"ILSVRC2012_val_{k:08d}.JPEG"), k)
    fake_devkit(str(tmp_path / "ILSVRC2012_devkit_t12"), val_wnids)
    with tarfile.open(tmp_path / "devkit.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "ILSVRC2012_devkit_t12", arcname="ILSVRC2012_devkit_t12")
    for devkit, out in ((tmp_path / "ILSVRC2012_devkit_t12", tmp_path / "a"), (tmp_path / "devkit.tar.gz", tmp_path / "b")):
        imagenet_val.main([str(flat), "--devkit", str(devkit), "--out", str(out)])
        assert len(os.listdir(out)) == 1000
        for k, wnid in enumerate(val_wnids, start=1):
            assert os.path.samefile(out / wnid / f"ILSVRC2012_val_{k:08d}.JPEG", flat / f"ILSVRC2012_val_{k:08d}.JPEG")
    # Kaggle's solution file gives the same folders
    with open(tmp_path / "LOC_val_solution.csv", "w") as f:
        f.write("ImageId,PredictionString\n" + "".join(f"ILSVRC2012_val_{k:08d},{w} 1 2 3 4 {w} 5 6 7 8\n"
                                                        for k, w in enumerate(val_wnids, start=1)))
    imagenet_val.main([str(flat), "--solution", str(tmp_path / "LOC_val_solution.csv"), "--out", str(tmp_path / "c"),
                       "--mode", "copy"])
    assert sorted(os.listdir(tmp_path / "c" / wnids[0])) == ["ILSVRC2012_val_00000001.JPEG", "ILSVRC2012_val_00000003.JPEG"]
    # the class folders are ImageNet-1k to the scripts: OpenAI's class names, labels in sorted-wnid order
    paths, labels, classnames, templates = image_folder(str(tmp_path / "a"))
    assert classnames[0] == "tench" and len(classnames) == 1000 and len(templates) == 80
    assert labels.tolist() == [0, 0, 500, 999]
    metrics = clip_train.main([*SMALL, "--eval-only", "--zeroshot-data", str(tmp_path / "a"),
                               "--tokenizer", os.path.join(tiny, "tokenizer"), "--output-dir", str(tmp_path / "run")])
    assert set(metrics) == {"zeroshot_top1", "zeroshot_top5"}
    # mistakes name the culprit
    jpeg(str(flat / "ILSVRC2012_val_00000009.JPEG"), 9)
    with pytest.raises(UserError, match="ILSVRC2012_val_00000009.JPEG has no label"):
        imagenet_val.main([str(flat), "--devkit", str(devkit), "--out", str(tmp_path / "d")])
    (tmp_path / "other.csv").write_text("image,label\nILSVRC2012_val_00000001,n01440764\n")
    with pytest.raises(UserError, match="other.csv: expected the header ImageId,PredictionString"):
        imagenet_val.solution_labels(str(tmp_path / "other.csv"))


def test_conceptual_captions_tsv_to_csv_and_img2dataset_files_to_train_data(tmp_path, capsys):
    (tmp_path / "cc3m.tsv").write_text("a dog on grass\thttp://x.org/1.jpg\n"
                                       "no url here\tnot a url\n"
                                       "\thttps://x.org/2.jpg\n"
                                       "a red car\thttps://x.org/3.jpg\r\n")
    (tmp_path / "cc12m.tsv").write_text("https://y.org/a.png\tthe <PERSON> on a stage\n"
                                        "https://y.org/b.png\tone\ttoo many\n")
    assert cc_tsv.tsv_to_csv(str(tmp_path / "cc3m.tsv"), str(tmp_path / "cc3m.csv")) == (2, 2)
    with open(tmp_path / "cc3m.csv", newline="") as f:
        assert list(csv.reader(f)) == [["url", "caption"], ["http://x.org/1.jpg", "a dog on grass"],
                                       ["https://x.org/3.jpg", "a red car"]]
    err = capsys.readouterr().err
    assert "cc3m.tsv, line 2: no http(s) URL" in err and "line 3: empty caption" in err
    cc_tsv.main([str(tmp_path / "cc12m.tsv"), "--out", str(tmp_path / "cc12m.csv")])
    with open(tmp_path / "cc12m.csv", newline="") as f:
        assert list(csv.reader(f))[1:] == [["https://y.org/a.png", "the <PERSON> on a stage"]]
    assert "line 2: 3 fields" in capsys.readouterr().err
    # img2dataset --output_format files: 00000/000000000.jpg + .txt; one without caption
    for key, caption in (("000000000", "a dog on grass"), ("000000001", "a red car"), ("000000002", None)):
        jpeg(str(tmp_path / "files" / "00000" / f"{key}.jpg"), int(key))
        if caption:
            (tmp_path / "files" / "00000" / f"{key}.txt").write_text(caption)
    cc_tsv.main(["--from-files", str(tmp_path / "files"), "--out", str(tmp_path / "train.csv")])
    records = read_annotations(str(tmp_path / "train.csv"))
    assert [r["captions"] for r in records] == [["a dog on grass"], ["a red car"]]
    assert "skipped 1 image(s) without a caption" in capsys.readouterr().err
    with pytest.raises(UserError, match="no row with a URL and a caption"):
        cc_tsv.tsv_to_csv(str(tmp_path / "train.csv"), str(tmp_path / "x.csv"))
