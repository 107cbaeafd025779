"""Annotation readers, image loading, tokenizer, sampler: every documented error and conversion."""
import json
import logging
import os
import types

import numpy as np
import pytest
from PIL import Image

import clip_train
from common import data
from common.data import (Example, ImageTextDataset, ShardedSampler, Tokenizer, image_folder, load_rgb, read_annotations,
                         train_loader, train_transform)


def write_image(path, mode="RGB", size=(16, 16)):
    colour = {"RGB": (10, 200, 30), "L": 128, "RGBA": (200, 0, 0, 0), "P": 3}[mode]
    img = Image.new(mode, size, colour)
    if mode == "P":
        img.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] * 64)
    img.save(path)
    return path


@pytest.fixture
def folder(tmp_path):
    for name in ("a.png", "b.png"):
        write_image(tmp_path / name)
    return tmp_path


def write_json(path, data):
    path.write_text(json.dumps(data))
    return str(path)


def test_json_and_csv_formats(folder):
    recs = read_annotations(write_json(folder / "ann.json", [
        {"image": "a.png", "caption": ["one", "two"], "image_id": 7}, {"image": "b.png", "caption": "three"}]))
    assert [r["captions"] for r in recs] == [["one", "two"], ["three"]]
    assert recs[0]["image_id"] == 7 and recs[1]["image_id"] == "b.png"
    assert recs[0]["image"] == str(folder / "a.png")
    (folder / "pairs.csv").write_text('image,caption\na.png,"a red, round thing"\nb.png,two\na.png,more\n')
    recs = read_annotations(str(folder / "pairs.csv"))
    assert recs[0]["captions"] == ["a red, round thing", "more"] and recs[1]["captions"] == ["two"]
    (folder / "oc.csv").write_text("filepath,title\nb.png,open clip style\n")
    assert read_annotations(str(folder / "oc.csv"))[0]["captions"] == ["open clip style"]
    # FlagAI's / open_clip's pairs.csv: tab-separated despite the extension, caption first
    (folder / "pairs_tab.csv").write_text("title\tfilepath\na cat, sitting\ta.png\n")
    assert read_annotations(str(folder / "pairs_tab.csv"))[0]["captions"] == ["a cat, sitting"]


def test_byte_order_mark_csv_and_json(folder):
    """Excel's "CSV UTF-8" export starts with a byte-order mark; so do some JSON writers."""
    (folder / "excel.csv").write_bytes("\ufeffimage,caption\na.png,caf\u00e9 au lait\n".encode("utf-8"))
    assert read_annotations(str(folder / "excel.csv"))[0]["captions"] == ["caf\u00e9 au lait"]
    (folder / "excel_tab.csv").write_bytes("\ufefftitle\tfilepath\nx\tb.png\n".encode("utf-8"))
    assert read_annotations(str(folder / "excel_tab.csv"))[0]["captions"] == ["x"]
    (folder / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([{"image": "a.png", "caption": "y"}]).encode())
    assert read_annotations(str(folder / "bom.json"))[0]["captions"] == ["y"]
    (folder / "latin.csv").write_bytes("image,caption\na.png,caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin\.csv is not UTF-8"):
        read_annotations(str(folder / "latin.csv"))


def test_missing_image_names_file_and_entry(folder):
    path = write_json(folder / "ann.json", [{"image": "a.png", "caption": "x"}, {"image": "gone.png", "caption": "y"}])
    with pytest.raises(FileNotFoundError, match=r"entry 1.*gone\.png"):
        read_annotations(path)
    (folder / "p.csv").write_text("image,caption\na.png,x\n\nnope.jpg,y\n")
    with pytest.raises(FileNotFoundError, match=r"line 4.*nope\.jpg"):
        read_annotations(str(folder / "p.csv"))


def test_invalid_json_and_missing_fields(folder):
    (folder / "bad.json").write_text('[{"image": "a.png", "caption": "x"},\n oops]')
    with pytest.raises(ValueError, match=r"bad\.json is not valid JSON.*line 2"):
        read_annotations(str(folder / "bad.json"))
    with pytest.raises(ValueError, match=r"entry 0: missing field 'caption'"):
        read_annotations(write_json(folder / "f.json", [{"image": "a.png", "text": "x"}]))
    with pytest.raises(ValueError, match=r"entry 0: missing field 'image'"):
        read_annotations(write_json(folder / "g.json", [{"caption": "x"}]))
    (folder / "h.csv").write_text("path,text\na.png,x\n")
    with pytest.raises(ValueError, match=r"h\.csv.*lacks the 'image' column"):
        read_annotations(str(folder / "h.csv"))
    (folder / "i.csv").write_text("image,caption\na.png,x,extra\n")
    with pytest.raises(ValueError, match=r"i\.csv, line 2"):
        read_annotations(str(folder / "i.csv"))


def test_empty_caption_is_an_error_or_counted_skip(folder, caplog):
    path = write_json(folder / "e.json", [{"image": "a.png", "caption": ["ok", "  "]}, {"image": "b.png", "caption": ""}])
    with pytest.raises(ValueError, match=r"entry 0: empty caption"):
        read_annotations(path)
    with caplog.at_level(logging.WARNING):
        recs = read_annotations(path, skip_bad=True)
    assert [r["captions"] for r in recs] == [["ok"]]
    assert "skipped 2 empty caption(s)" in caplog.text


def test_corrupt_and_truncated_images(folder, tiny, caplog):
    (folder / "corrupt.png").write_bytes(b"not an image at all")
    big = folder / "big.png"
    write_image(big, size=(200, 200))
    Image.effect_noise((200, 200), 50).convert("RGB").save(big)
    (folder / "trunc.png").write_bytes(big.read_bytes()[: len(big.read_bytes()) // 2])
    for name in ("corrupt.png", "trunc.png"):
        with pytest.raises(OSError, match=name):
            load_rgb(str(folder / name))
    assert load_rgb(str(folder / "a.png")).size == (16, 16)  # a good image beside them loads
    recs = read_annotations(write_json(folder / "c.json", [{"image": "trunc.png", "caption": "x"},
                                                           {"image": "a.png", "caption": "y"}]))
    tok = Tokenizer(os.path.join(tiny, "tokenizer"))
    with pytest.raises(OSError, match="trunc.png"):
        ImageTextDataset(recs, Example(train_transform(16), tok, 8))[0]
    ds = ImageTextDataset(recs, Example(train_transform(16), tok, 8), skip_bad=True)
    with caplog.at_level(logging.WARNING):
        image, ids, r = ds[0]
    assert r == 1 and image.shape == (3, 16, 16) and ds.skipped == 1   # replaced by another image's pair
    assert "trunc.png" in caplog.text and "1 skipped" in caplog.text


def test_skip_bad_replaces_a_broken_image_by_other_images_once_per_epoch(tmp_path, tiny, caplog, monkeypatch):
    """A broken image with 5 captions: tried and counted once per epoch (not once per caption), and
    its 5 pairs go to different images (not all to the next one), the same after a restart."""
    (tmp_path / "bad.png").write_bytes(b"not an image")
    for i in range(20):
        write_image(tmp_path / f"g{i}.png")
    recs = read_annotations(write_json(tmp_path / "ann.json", [{"image": "bad.png", "caption": [f"bad {k}" for k in range(5)]}]
                                       + [{"image": f"g{i}.png", "caption": f"good {i}"} for i in range(20)]))
    tries = []
    monkeypatch.setattr(data, "load_rgb", lambda path, name=None: tries.append(path) or load_rgb(path, name))
    tok = Tokenizer(os.path.join(tiny, "tokenizer"))
    ds = ImageTextDataset(recs, Example(train_transform(16), tok, 8), skip_bad=True)
    sampler, epochs = ShardedSampler(len(ds), seed=0), []
    with caplog.at_level(logging.WARNING):
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            epochs.append([int(ds[key][2]) for key in sampler])
    assert ds.skipped == 2 and sum(p.endswith("bad.png") for p in tries) == 2     # once per epoch
    assert "1 skipped" in caplog.text and "2 skipped" in caplog.text
    for got in epochs:
        assert 0 not in got and len(got) == 25
        assert max(got.count(r) for r in set(got)) <= 3               # 1 + at most 2 of the 5 replacements
        assert len([r for r in set(got) if got.count(r) > 1]) >= 3    # spread over several images
    again = ImageTextDataset(recs, Example(train_transform(16), tok, 8), skip_bad=True)
    sampler.set_epoch(1)
    assert [int(again[key][2]) for key in sampler] == epochs[1]       # a resumed run draws the same
    # through the loader, 2 workers: metrics.jsonl's count is each worker's, once per epoch
    cfg = types.SimpleNamespace(batch_size=5, accum_steps=1, workers=2, seed=0, skip_bad=True, train_num_samples=0,
                                dataset_resampled=False)
    loader, sampler = train_loader(recs, Example(train_transform(16), tok, 8), cfg, 0, 1, "ann.json")
    want = 0
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        keys = list(sampler)
        want += len({b % 2 for b in range(5) if any(k[0] < 5 for k in keys[5 * b: 5 * b + 5])})
        assert sum(len(batch[2]) for batch in loader) == 25
    assert 2 <= want and sampler.stats() == {"data_skipped_bad_image": want}
    resumed = ShardedSampler(25)
    resumed.bad_files = ImageTextDataset(recs, None, skip_bad=True).bad_files
    resumed.load_state_dict(sampler.state_dict())                    # the count goes on after a resume
    assert resumed.stats() == {"data_skipped_bad_image": want}
    (tmp_path / "g0.png").write_bytes(b"broken too")
    only_bad = read_annotations(write_json(tmp_path / "b.json", [{"image": "bad.png", "caption": "x"},
                                                                 {"image": "g0.png", "caption": "y"}]))
    with pytest.raises(ValueError, match="none of the 2 training images is readable"):
        ImageTextDataset(only_bad, Example(train_transform(16), tok, 8), skip_bad=True)[0]


def test_sixteen_bit_grayscale_keeps_its_levels(tmp_path):
    """A 16-bit grey PNG (PIL mode I;16) scaled to 8 bits, not clipped to white by convert('RGB')."""
    levels = np.repeat(np.array([0, 16384, 32768, 49152], dtype=np.uint16), 4).reshape(4, 4)
    Image.fromarray(levels).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    got = np.asarray(load_rgb(str(tmp_path / "g16.png")))
    assert got.shape == (4, 4, 3) and got[::1, 0, 0].tolist() == [0, 64, 128, 192]


def test_grayscale_palette_rgba_become_rgb(tmp_path):
    for mode in ("L", "P", "RGBA"):
        img = load_rgb(write_image(tmp_path / f"{mode}.png", mode))
        assert img.mode == "RGB" and img.size == (16, 16)
    assert load_rgb(str(tmp_path / "RGBA.png")).getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    assert load_rgb(str(tmp_path / "P.png")).getpixel((0, 0)) == (0, 0, 255)
    assert load_rgb(str(tmp_path / "L.png")).getpixel((0, 0)) == (128, 128, 128)


def test_tokenizer_truncates_keeping_eos(tiny):
    tok = Tokenizer(os.path.join(tiny, "tokenizer"))
    ids = tok(["a red circle", "a " * 50 + "square", ""], 8)
    assert ids.shape == (3, 8)
    assert ids[0, 0] == tok.bos_id and ids[0, 4] == tok.eos_id and (ids[0, 5:] == tok.pad_id).all()
    assert ids[1, -1] == tok.eos_id and (ids[1] != tok.pad_id).all()     # truncated, EOS kept last
    assert ids[2, :2].tolist() == [tok.bos_id, tok.eos_id]               # empty text: BOS EOS
    assert tok.decode(ids[0].tolist()) == "a red circle"


def test_sampler_shards_are_disjoint_and_resume_exactly():
    full = [list(ShardedSampler(103, rank=r, world_size=2, seed=5)) for r in range(2)]
    idx = [i for shard in full for i, _, _ in shard]
    assert len(idx) == 102 and len(set(idx)) == 102                     # 51 per rank, one dropped
    s = ShardedSampler(103, rank=1, world_size=2, seed=5)
    s.set_epoch(0, skip=20)
    assert list(s) == full[1][20:]                                      # same indices and crop seeds
    s.set_epoch(1)
    assert [i for i, _, _ in s] != [i for i, _, _ in full[1]]           # reshuffled per epoch


def test_image_folder_classes_and_templates(tmp_path):
    for cls in ("n02_dog", "n01_cat"):
        (tmp_path / cls).mkdir()
        write_image(tmp_path / cls / "x.jpg")
    (tmp_path / "n01_cat" / "notes.txt").write_text("not an image")
    paths, labels, names, templates = image_folder(str(tmp_path))
    assert names == ["n01 cat", "n02 dog"] and labels.tolist() == [0, 1] and len(templates) == 80
    (tmp_path / "classnames.txt").write_text("cat\ndog\n")
    assert image_folder(str(tmp_path))[2] == ["cat", "dog"]
    (tmp_path / "classnames.txt").write_text("cat\n")
    with pytest.raises(ValueError, match="1 names for 2 class folders"):
        image_folder(str(tmp_path))


def test_batch_larger_than_dataset_is_a_clear_error(folder, tmp_path):
    path = write_json(folder / "small.json", [{"image": "a.png", "caption": ["a red circle", "a square"]}])
    with pytest.raises(ValueError, match=r"--batch-size 4 x 1 process\(es\) is larger than the 2 image-caption pairs"):
        clip_train.main(["--train-data", path, "--batch-size", "4", "--output-dir", str(tmp_path / "o"),
                         "--tokenizer", os.path.join(tiny_dir(), "tokenizer"), "--workers", "0"])


def tiny_dir():
    from common.data import tiny_data
    return tiny_data()


def test_shipped_imagenet_classnames_are_openais():
    """common/imagenet_classnames.txt is OpenAI's curated list as open_clip ships it, in class
    index order, and common/imagenet_wnids.txt is ImageNet-1k's sorted wnids as timm ships them."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
    from timm.data import ImageNetInfo
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "common")
    with open(os.path.join(here, "imagenet_classnames.txt")) as f:
        names = f.read().splitlines()
    assert len(names) == 1000 and names == list(IMAGENET_CLASSNAMES)
    with open(os.path.join(here, "imagenet_wnids.txt")) as f:
        wnids = f.read().splitlines()
    assert len(wnids) == 1000 and wnids == list(ImageNetInfo("imagenet-1k").label_names())


def test_imagenet_val_folder_gets_openai_names(tmp_path):
    """A folder laid out as ImageNet's val after valprep.sh (1,000 wnid folders, no classnames.txt)
    loads with OpenAI's class names in the standard (sorted wnid) order; an unknown wnid is named."""
    from timm.data import ImageNetInfo
    wnids = list(ImageNetInfo("imagenet-1k").label_names())
    for wnid in reversed(wnids):
        (tmp_path / wnid).mkdir()
    expected = {"n01440764": "tench", "n01443537": "goldfish", "n02123045": "tabby cat",
                "n15075141": "toilet paper"}
    for wnid in expected:
        write_image(tmp_path / wnid / f"ILSVRC2012_val_{wnid}.JPEG")
    paths, labels, names, templates = image_folder(str(tmp_path))
    assert len(names) == 1000 and len(templates) == 80
    assert labels.tolist() == [0, 1, 281, 999]
    assert [names[i] for i in labels] == list(expected.values())
    assert [os.path.basename(os.path.dirname(p)) for p in paths] == list(expected)
    os.rename(tmp_path / "n15075141", tmp_path / "n99999999")
    with pytest.raises(ValueError, match="class folder n99999999 is not one of the 1,000 ImageNet-1k wnids"):
        image_folder(str(tmp_path))
    (tmp_path / "classnames.txt").write_text("".join(f"class {i}\n" for i in range(1000)))
    assert image_folder(str(tmp_path))[2][999] == "class 999"          # a classnames.txt still wins


def shape_components(paths):
    """Per image, its background colour (the corner pixel's) and its shapes as found in the pixels:
    [(colour, bounding box, pixel mask)] for each 8-connected region of non-background pixels."""
    import torch
    import torch.nn.functional as F
    from torchvision.transforms.v2.functional import pil_to_tensor
    images = torch.stack([pil_to_tensor(load_rgb(p)) for p in paths])          # (N, 3, H, W) uint8
    N, _, H, W = images.shape
    fg = (images != images[:, :, :1, :1]).any(1, keepdim=True)                  # (N, 1, H, W)
    labels = torch.arange(1, H * W + 1, dtype=torch.float32).view(1, 1, H, W) * fg
    while True:  # every region takes its largest pixel index: flood fill by 3x3 max-pooling
        grown = F.max_pool2d(labels, 3, stride=1, padding=1) * fg
        if torch.equal(grown, labels):
            break
        labels = grown
    found = []
    for n in range(N):
        shapes = []
        for value in labels[n, 0].unique()[1:].tolist():                       # 0 is the background
            mask = labels[n, 0] == value
            ys, xs = mask.nonzero(as_tuple=True)
            colour = tuple(images[n, :, ys[0], xs[0]].tolist())
            shapes.append((colour, (xs.min().item(), ys.min().item(), xs.max().item(), ys.max().item()),
                           mask.numpy().tobytes()))
        found.append((tuple(images[n, :, 0, 0].tolist()), sorted(shapes)))
    return found


def test_tiny_data_shapes_are_apart_and_come_with_shape_swapped_twins(tiny):
    """In every split: the shapes named in a caption are all separately visible (none overlap or
    touch; their bounding boxes are disjoint), and every image has a twin in its split that differs
    only in the shape of one object (same background, colours and boxes), with its own captions."""
    import re
    shape_words = {"circle", "square", "triangle", "diamond"}
    for split in ("train", "val", "test"):
        with open(os.path.join(tiny, f"{split}.json")) as f:
            records = json.load(f)
        backgrounds_and_shapes = shape_components([os.path.join(tiny, r["image"]) for r in records])
        by_layout = {}
        found = [shapes for _, shapes in backgrounds_and_shapes]
        for i, (rec, (background, shapes)) in enumerate(zip(records, backgrounds_and_shapes)):
            named = sum(w in shape_words for w in re.findall(r"\w+", rec["caption"][0]))
            assert len(shapes) == named, (split, rec)
            boxes = [box for _, box, _ in shapes]
            for a in range(len(boxes)):
                for b in range(a + 1, len(boxes)):
                    (x0, y0, x1, y1), (u0, v0, u1, v1) = boxes[a], boxes[b]
                    assert x1 < u0 or u1 < x0 or y1 < v0 or v1 < y0, (split, rec["image"], boxes)
            by_layout.setdefault((background, tuple((c, box) for c, box, _ in shapes)), []).append(i)
        for members in by_layout.values():
            for i in members:
                twins = [j for j in members if sum(a != b for a, b in zip(found[i], found[j])) == 1]
                assert twins, (split, records[i]["image"], "has no shape-swapped twin")
                assert all(records[j]["caption"] != records[i]["caption"] for j in twins)


def test_tiny_zeroshot_prompts_use_only_caption_words(tiny):
    """Every word of every zero-shot prompt (template filled with a class name) occurs in the
    training captions, and the 24 classes are '<colour> <shape>'."""
    import re
    with open(os.path.join(tiny, "train.json")) as f:
        vocab = {w for r in json.load(f) for c in r["caption"] for w in re.findall(r"\w+", c.lower())}
    _, labels, classnames, templates = image_folder(os.path.join(tiny, "zeroshot"))
    assert len(classnames) == 24 and all(len(c.split()) == 2 for c in classnames)
    assert labels.bincount().tolist() == [10] * 24
    words = {w for t in templates for c in classnames for w in re.findall(r"\w+", t.format(c).lower())}
    assert words <= vocab, sorted(words - vocab)
