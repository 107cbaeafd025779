"""data/curate.py's inputs and outputs on 40 images of the tiny val split with tiny models (1
training step or random weights): every input format written back in its own format and read by
the training scripts, every model kind's embeddings against the model's own encoders, a resumed
embedding pass, 2 ranks against 1 process, bad input, and the pieces (SemDeDup against a
brute-force transcription, k-means torch against faiss, the CLIP-score cuts, the image checks).
The proof on noisy data: tests/test_curate.py."""
import collections
import csv
import json
import os
import shutil
import tarfile
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import clip_train
import coca_train
from common.data import Tokenizer, eval_transform, load_rgb, read_annotations
from common.shards import ShardLoader
from common.utils import UserError
from data import curate, make_shards
from tests.test_clip_train import SMALL as CLIP_SMALL
from tests.test_coca_train import SMALL as COCA_SMALL, tiny_open_clip_folder
from tests.test_distributed import ROOT, one_line_error, torchrun
from tests.test_shards import Captions

N_IMAGES = 40


def curate_run(data, model, out, *flags):
    return curate.main(["--data", str(data), "--model", str(model), "--out", str(out), "--workers", "0",
                        *flags])


def read_removed(out):
    with open(os.path.join(out, "removed.jsonl")) as f:
        return [json.loads(line) for line in f]


def pairs_of(records):
    return collections.Counter((r["image"], c) for r in records for c in r["captions"])


@pytest.fixture(scope="module")
def small(tiny, tmp_path_factory):
    """The first 40 val images (200 pairs) as JSON (absolute paths) and CSV; the tokenizer."""
    d = tmp_path_factory.mktemp("small")
    with open(os.path.join(tiny, "val.json")) as f:
        records = json.load(f)[:N_IMAGES]
    for r in records:
        r["image"] = os.path.join(tiny, r["image"])
    (d / "small.json").write_text(json.dumps(records))
    with open(d / "small.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        w.writerows([r["image"], c] for r in records for c in r["caption"])
    return types.SimpleNamespace(dir=d, json=d / "small.json", csv=d / "small.csv",
                                 tokenizer=os.path.join(tiny, "tokenizer"), tiny=tiny)


@pytest.fixture(scope="module")
def clip_ckpt(small, tmp_path_factory):
    """One of our CLIP checkpoints: 1 step of clip_train.py on the small set."""
    out = tmp_path_factory.mktemp("clip")
    clip_train.main([*CLIP_SMALL, "--train-data", str(small.json), "--tokenizer", small.tokenizer,
                     "--max-steps", "1", "--output-dir", str(out)])
    return out / "checkpoint_last.pt"


@pytest.fixture(scope="module")
def json_run(small, clip_ckpt, tmp_path_factory):
    """--quality --keep-fraction 0.7 on the JSON input: (out, report)."""
    out = tmp_path_factory.mktemp("json_run")
    report = curate_run(small.json, clip_ckpt, out, "--quality", "--keep-fraction", "0.7", "--chunk", "16")
    return out, report


def kept_pairs_by_content(records_or_pairs):
    """(image bytes' digest, caption) of pairs, to compare across formats whose image names differ."""
    import hashlib
    return collections.Counter((hashlib.md5(img).hexdigest(), c) for img, c in records_or_pairs)


def file_pairs(records):
    out = []
    for r in records:
        with open(r["image"], "rb") as f:
            data = f.read()
        out += [(data, c) for c in r["captions"]]
    return out


# ---- 1. inputs and outputs in the input's format ----

def check_accounting(out, report, all_pairs, kept):
    """kept + removed = every pair, each removed pair once with reason and score; report.json's
    counts are removed.jsonl's; report.png has one row per reason."""
    removed = read_removed(out)
    removed_pairs = collections.Counter((r["image"], r["caption"]) for r in removed)
    assert max(removed_pairs.values()) == 1
    assert kept + removed_pairs == all_pairs
    assert all(set(r) >= {"reason", "score"} for r in removed)
    assert all(r["score"] is not None for r in removed if r["reason"] != "unreadable")
    counts = collections.Counter(r["reason"] for r in removed)
    assert report["removed_pairs"] == dict(counts) and report["kept_pairs"] == sum(kept.values())
    with open(os.path.join(out, "report.json")) as f:
        assert json.load(f)["removed_pairs"] == dict(counts)
    with Image.open(os.path.join(out, "report.png")) as sheet:
        sheet.load()
        assert sheet.height == len(counts) * (96 + 28)        # a row: a 96 px image and 2 lines of text
    return removed


def test_json_input_gives_kept_json_that_trains(json_run, small, tmp_path):
    out, report = json_run
    kept_file = out / "kept.json"
    kept = pairs_of(read_annotations(str(kept_file)))
    all_pairs = pairs_of(read_annotations(str(small.json)))
    removed = check_accounting(out, report, all_pairs, kept)
    assert 0 < len(removed) < sum(all_pairs.values())
    checked = 200 - sum(report["removed_pairs"].get(r, 0) for r in ("near_duplicate", "exact_duplicate"))
    assert report["removed_pairs"]["low_clip_score"] == checked - int(checked * 0.7)  # the top 0.7 by score
    metrics = clip_train.main([*CLIP_SMALL, "--train-data", str(kept_file), "--tokenizer", small.tokenizer,
                               "--max-steps", "1", "--output-dir", str(tmp_path / "train")])
    assert metrics is not None
    with open(tmp_path / "train" / "metrics.jsonl") as f:
        assert any(json.loads(line).get("step") == 1 for line in f)


def test_csv_input_gives_kept_csv_with_the_same_pairs(json_run, small, clip_ckpt, tmp_path):
    """The same data as CSV: the same decisions, written as CSV."""
    out = tmp_path / "out"
    report = curate_run(small.csv, clip_ckpt, out, "--quality", "--keep-fraction", "0.7", "--chunk", "16")
    assert not (out / "kept.json").exists()
    with open(out / "kept.csv") as f:
        assert next(csv.reader(f)) == ["image", "caption"]
    kept = pairs_of(read_annotations(str(out / "kept.csv")))
    check_accounting(out, report, pairs_of(read_annotations(str(small.csv))), kept)
    assert kept == pairs_of(read_annotations(str(json_run[0] / "kept.json")))


def test_shard_input_gives_shards_the_loader_reads(json_run, small, clip_ckpt, tmp_path):
    """Shards of make_shards.py (a sample per caption, one image_id per image): one image per
    image_id (not 200 images that SemDeDup would call duplicates), the same decisions as the JSON
    run, kept shards + sizes.json that the training scripts' ShardLoader reads."""
    make_shards.write_shards(str(small.json), str(tmp_path / "in"), shard_size=64)
    spec = str(tmp_path / "in" / "{00000..00003}.tar")
    out = tmp_path / "out"
    report = curate_run(spec, clip_ckpt, out, "--quality", "--keep-fraction", "0.7", "--chunk", "16")
    assert report["images"] == N_IMAGES and report["pairs"] == 200
    tars = sorted(p for p in os.listdir(out / "shards") if p.endswith(".tar"))
    with open(out / "shards" / "sizes.json") as f:
        sizes = json.load(f)
    assert sorted(sizes) == tars and sum(sizes.values()) == report["kept_pairs"]
    kept_spec = str(out / "shards" / f"{{00000..{len(tars) - 1:05d}}}.tar")
    ld = ShardLoader(kept_spec, Captions(), batch_size=1, workers=0, seed=0, rank=0, world_size=1)
    ld.set_epoch(0)
    texts = [t for _, batch, _ in ld for t in batch]
    # the kept samples, by their image bytes and caption, are the JSON run's kept pairs
    samples = []
    for name in tars:
        with tarfile.open(out / "shards" / name) as tar:
            members = {m.name: m for m in tar}
            for key in sorted({n.split(".")[0] for n in members}):
                img = next(tar.extractfile(members[f"{key}.{e}"]).read() for e in ("png", "jpg")
                           if f"{key}.{e}" in members)
                samples.append((img, tar.extractfile(members[f"{key}.txt"]).read().decode()))
                assert f"{key}.json" in members
    assert sorted(texts) == sorted(c for _, c in samples)
    json_kept = file_pairs(read_annotations(str(json_run[0] / "kept.json")))
    assert kept_pairs_by_content(samples) == kept_pairs_by_content(json_kept)
    removed = read_removed(out)
    assert len(removed) + len(samples) == 200
    assert collections.Counter(r["reason"] for r in removed) == collections.Counter(report["removed_pairs"])


# ---- 2. models ----

def reference_embeddings(encode_image, encode_text, images, captions, size, ids_of):
    transform = eval_transform(size, crop=True)
    with torch.no_grad():
        x = torch.stack([transform(load_rgb(p)) for p in images])
        return (F.normalize(encode_image(x).float(), dim=-1).numpy(),
                F.normalize(encode_text(ids_of(captions)).float(), dim=-1).numpy())


def check_embeddings(out, want_images, want_captions):
    folder = os.path.join(out, "embeddings")
    got = {kind: np.concatenate([np.load(os.path.join(folder, f)) for f in sorted(os.listdir(folder))
                                 if f.startswith(kind + "_")]) for kind in ("images", "captions")}
    for kind, want in (("images", want_images), ("captions", want_captions)):
        assert got[kind].dtype == np.float16 and got[kind].shape == want.shape
        with open(os.path.join(folder, f"{kind}.jsonl")) as f:          # the rows' keys
            assert sum(1 for _ in f) == len(want)
        np.testing.assert_allclose(got[kind].astype(np.float32), want, atol=2e-3, rtol=0)


@pytest.fixture(scope="module")
def model_data(small, tmp_path_factory):
    """12 images (60 pairs) for the model tests, the first one not square (CLIP's preprocessing:
    the shorter side resized, then the centre cropped)."""
    d = tmp_path_factory.mktemp("model_data")
    with open(small.json) as f:
        records = json.load(f)[:12]
    Image.open(records[0]["image"]).convert("RGB").resize((96, 64)).save(d / "wide.png")
    records[0]["image"] = str(d / "wide.png")
    (d / "data.json").write_text(json.dumps(records))
    return d / "data.json", [r["image"] for r in records], [c for r in records for c in r["caption"]]


def test_our_clip_checkpoint(clip_ckpt, model_data, tmp_path):
    path, images, captions = model_data
    curate_run(path, clip_ckpt, tmp_path, "--chunk", "5")
    model, tok, _ = curate.load_model(str(clip_ckpt), "cpu")
    saved = torch.load(clip_ckpt, weights_only=True)
    assert isinstance(model, clip_train.CLIP)
    for k, v in model.state_dict().items():          # the checkpoint's weights, not a fresh model
        torch.testing.assert_close(v, saved["model"][k])
    cfg = saved["config"]
    want = reference_embeddings(model.encode_image, model.encode_text, images, captions, cfg["image_size"],
                                lambda t: tok(t, cfg["context_length"]))
    check_embeddings(tmp_path, *want)


def test_our_coca_checkpoint(small, model_data, tmp_path):
    path, images, captions = model_data
    coca_train.main([*COCA_SMALL, "--preset", "tiny", "--train-data", str(path), "--tokenizer",
                     small.tokenizer, "--max-steps", "1", "--output-dir", str(tmp_path / "coca")])
    ckpt = tmp_path / "coca" / "checkpoint_last.pt"
    curate_run(path, ckpt, tmp_path / "out", "--chunk", "7")
    model, tok, _ = curate.load_model(str(ckpt), "cpu")
    saved = torch.load(ckpt, weights_only=True)
    assert isinstance(model, coca_train.CoCa)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, saved["model"][k])
    cfg = saved["config"]
    want = reference_embeddings(model.encode_image, model.encode_text, images, captions, cfg["image_size"],
                                lambda t: tok(t, cfg["context_length"]))
    check_embeddings(tmp_path / "out", *want)


def test_transformers_clip_folder(small, model_data, tmp_path):
    """A random transformers CLIPModel: the embeddings are transformers' own projections."""
    from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast
    path, images, captions = model_data
    tok = Tokenizer(small.tokenizer)
    torch.manual_seed(0)
    hf = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32, eos_token_id=tok.eos_id,
                         bos_token_id=tok.bos_id, pad_token_id=tok.pad_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=64, patch_size=16), projection_dim=16)).eval()
    hf.save_pretrained(tmp_path / "hf")
    PreTrainedTokenizerFast.from_pretrained(small.tokenizer).save_pretrained(tmp_path / "hf")
    curate_run(path, tmp_path / "hf", tmp_path / "out", "--chunk", "5")

    def image(x):                       # transformers' get_image_features / get_text_features
        return hf.visual_projection(hf.vision_model(pixel_values=x).pooler_output)

    def text(ids):
        mask = (ids != tok.pad_id).long()
        return hf.text_projection(hf.text_model(input_ids=ids, attention_mask=mask).pooler_output)

    want = reference_embeddings(image, text, images, captions, 64, lambda t: tok(t, 32))
    check_embeddings(tmp_path / "out", *want)


def test_open_clip_coca_weights(small, model_data, tmp_path):
    """open_clip CoCa weights (a hub folder): the embeddings are open_clip's encode_image/encode_text.
    open_clip's tokenizer is a hub download; --tokenizer gives the tiny one (its vocabulary matches),
    and a context of 16 (below coca_train's caption length) still loads: generation is not used."""
    path, images, captions = model_data
    tok = Tokenizer(small.tokenizer)
    ref = tiny_open_clip_folder(str(tmp_path / "oc"), tok.vocab_size, 16)
    curate_run(path, tmp_path / "oc", tmp_path / "out", "--chunk", "5", "--tokenizer", small.tokenizer)
    want = reference_embeddings(lambda x: ref.encode_image(x, normalize=True),
                                lambda ids: ref.encode_text(ids, normalize=True), images, captions, 32,
                                lambda t: tok(t, 16))
    check_embeddings(tmp_path / "out", *want)


def test_open_clip_clip_folder(clip_ckpt, model_data, tmp_path):
    """Our CLIP exported as an open_clip folder (its own tokenizer files): the embeddings are open_clip's
    encode_image / encode_text, with open_clip's own tokenizer, on our preprocessing."""
    open_clip = pytest.importorskip("open_clip")
    path, images, captions = model_data
    clip_train.main(["--init-from", str(clip_ckpt), "--export", str(tmp_path / "oc"), "--export-format", "open_clip"])
    curate_run(path, tmp_path / "oc", tmp_path / "out", "--chunk", "5")
    folder = "local-dir:" + str(tmp_path / "oc")
    ref = open_clip.create_model_and_transforms(folder)[0].eval()
    size = torch.load(clip_ckpt, weights_only=True)["config"]["image_size"]
    want = reference_embeddings(ref.encode_image, ref.encode_text, images, captions, size,
                                open_clip.get_tokenizer(folder))
    check_embeddings(tmp_path / "out", *want)


def test_models_of_other_kinds_are_one_line_errors_naming_them(small, model_data, tmp_path):
    """One of our ALBEF checkpoints (1 step), a transformers BERT folder, a missing file, an open_clip
    CLIP that pools the text at argmax (not ours)."""
    import albef_train
    from tests.test_albef_train import SMALL as ALBEF_SMALL
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast
    path = model_data[0]
    albef_train.main([*ALBEF_SMALL, "--train-data", str(path), "--tokenizer", small.tokenizer,
                      "--batch-size", "4", "--max-steps", "1", "--output-dir", str(tmp_path / "albef")])
    albef = tmp_path / "albef" / "checkpoint_last.pt"
    BertModel(BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(tmp_path / "bert")
    os.makedirs(tmp_path / "oc_clip")                    # an open_clip CLIP folder we do not build
    (tmp_path / "oc_clip" / "open_clip_config.json").write_text(json.dumps({"model_cfg": {
        "embed_dim": 8, "text_cfg": {"pool_type": "argmax"}}}))
    PreTrainedTokenizerFast.from_pretrained(small.tokenizer).save_pretrained(tmp_path / "oc_clip")
    for model, kind in ((albef, "ALBEF"), (tmp_path / "bert", "'bert'"), (tmp_path / "missing.pt", "exist"),
                        (tmp_path / "oc_clip", "needs text_cfg.pool_type")):
        with pytest.raises(UserError) as e:
            curate_run(path, model, tmp_path / "out")
        assert str(model) in str(e.value) and kind in str(e.value) and "\n" not in str(e.value), e.value
    assert not (tmp_path / "out" / "kept.json").exists()


# ---- 3. a resumable embedding pass ----

def test_a_second_run_recomputes_only_the_missing_chunk(json_run, small, clip_ckpt, monkeypatch):
    """json_run saved 3 image chunks of 16 (40 images); remove the second and report.json: the
    rerun embeds those 16 images and no caption, and writes the same outputs."""
    out = json_run[0]
    folder = out / "embeddings"
    before = {f: (folder / f).read_bytes() for f in os.listdir(folder)}
    outputs = {f: (out / f).read_bytes() for f in ("kept.json", "removed.jsonl")}
    assert sum(f.startswith("images_") for f in before) == 3
    assert sum(f.startswith("captions_") for f in before) > 1
    os.remove(folder / "images_000001.npy")
    os.remove(out / "report.json")
    mtimes = {f: os.stat(folder / f).st_mtime_ns for f in os.listdir(folder) if f.endswith(".npy")}
    encoded = collections.Counter()
    load = curate.load_model

    def counting_load(*a, **kw):
        model, tok, cfg = load(*a, **kw)
        for name in ("encode_image", "encode_text"):
            def wrapped(x, _f=getattr(model, name), _name=name):
                encoded[_name] += len(x)
                return _f(x)
            setattr(model, name, wrapped)
        return model, tok, cfg

    monkeypatch.setattr(curate, "load_model", counting_load)
    curate_run(small.json, clip_ckpt, out, "--quality", "--keep-fraction", "0.7", "--chunk", "16")
    assert encoded == {"encode_image": 16}
    assert {f: os.stat(folder / f).st_mtime_ns for f in mtimes} == mtimes          # the others untouched
    assert {f: (folder / f).read_bytes() for f in os.listdir(folder)} == before
    assert {f: (out / f).read_bytes() for f in outputs} == outputs and (out / "report.json").exists()
    # another model's embeddings in the same OUT: an error naming the manifest, nothing mixed
    other = out.parent / "other_model.pt"
    shutil.copy(clip_ckpt, other)
    with pytest.raises(UserError, match="manifest.json"):
        curate_run(small.json, other, out, "--quality", "--keep-fraction", "0.7", "--chunk", "16")
    assert {f: (folder / f).read_bytes() for f in os.listdir(folder)} == before


# ---- 4. two ranks ----

def test_two_ranks_give_the_outputs_of_one_process(json_run, small, clip_ckpt, tmp_path):
    """The image checks shared by range, the 3 image chunks by rank (0 and 2, then 1): the same
    embeddings, kept.json and removed.jsonl as json_run's one process."""
    out = tmp_path / "out"
    flags = ["--workers", "0", "--quality", "--keep-fraction", "0.7", "--chunk", "16"]
    proc = torchrun([os.path.join(ROOT, "data", "curate.py"), "--data", str(small.json), "--model",
                     str(clip_ckpt), "--out", str(out), *flags], timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for f in ("kept.json", "removed.jsonl"):
        assert (out / f).read_bytes() == (json_run[0] / f).read_bytes(), f
    for f in os.listdir(json_run[0] / "embeddings"):
        if f.endswith(".npy"):
            assert (out / "embeddings" / f).read_bytes() == (json_run[0] / "embeddings" / f).read_bytes(), f


# ---- 5. bad input ----

def test_missing_annotation_file(clip_ckpt, tmp_path):
    for name in ("missing.json", "missing.csv"):
        with pytest.raises(UserError) as e:
            curate_run(tmp_path / name, clip_ckpt, tmp_path / "out")
        assert str(tmp_path / name) in str(e.value) and "\n" not in str(e.value)


def test_an_unreadable_image_is_counted_and_the_run_goes_on(small, clip_ckpt, tmp_path):
    with open(small.json) as f:
        records = json.load(f)[:10]
    good = Image.open(records[3]["image"])
    good.save(tmp_path / "broken.png")
    data = (tmp_path / "broken.png").read_bytes()
    (tmp_path / "broken.png").write_bytes(data[:len(data) // 3])          # truncated
    (tmp_path / "garbage.png").write_bytes(b"not an image at all" * 10)
    records[3]["image"] = str(tmp_path / "broken.png")
    records[6]["image"] = str(tmp_path / "garbage.png")
    (tmp_path / "data.json").write_text(json.dumps(records))
    report = curate_run(tmp_path / "data.json", clip_ckpt, tmp_path / "out", "--keep-fraction", "1")
    removed = read_removed(tmp_path / "out")
    unreadable = collections.Counter(r["image"] for r in removed if r["reason"] == "unreadable")
    assert unreadable == {str(tmp_path / "broken.png"): 5, str(tmp_path / "garbage.png"): 5}
    assert report["removed_pairs"]["unreadable"] == 10 and report["kept_pairs"] > 0
    kept = read_annotations(str(tmp_path / "out" / "kept.json"))
    assert {r["image"] for r in kept} <= {r["image"] for r in records} - set(unreadable)


def test_flags_and_empty_results_are_errors_that_write_nothing(small, clip_ckpt, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UserError, match="1.5") as e:
        curate_run(small.json, clip_ckpt, out, "--min-clip-score", "1.5")
    assert "\n" not in str(e.value)
    assert not any((out / f).exists() for f in ("kept.json", "report.json", "removed.jsonl", "report.png"))
    for flags, match in ((["--min-clip-score", "0.1", "--keep-fraction", "0.5"], "not both"),
                         (["--keep-fraction", "0"], "--keep-fraction")):
        with pytest.raises(UserError, match=match):
            curate_run(small.json, clip_ckpt, tmp_path / "out2", *flags)
    assert not (tmp_path / "out2").exists()


def test_the_command_exits_2_with_one_line(clip_ckpt, tmp_path):
    missing = tmp_path / "nothing.json"
    line = one_line_error(os.path.join("data", "curate.py"), "--data", str(missing), "--model", str(clip_ckpt),
                          "--out", str(tmp_path / "out"), "--workers", "0")
    assert str(missing) in line


# ---- 6. the pieces ----

def brute_force_semdedup(x, assign, centroids, eps):
    """SemDeDup as the paper states it: within each cluster, farthest from the centroid first, an
    item goes when its cosine to any item before it exceeds 1 - eps. ({item: (cosine, that item)},
    the largest distance in that order between an item removed and the item it repeats)."""
    removed, reach = {}, 0
    for c in range(len(centroids)):
        members = [i for i in range(len(x)) if assign[i] == c]
        members.sort(key=lambda i: float(x[i] @ centroids[c]))
        for j in range(1, len(members)):
            cos = [float(x[members[i]] @ x[members[j]]) for i in range(j)]
            best = int(np.argmax(cos))
            if cos[best] > 1 - eps:
                removed[members[j]] = (cos[best], members[best])
                reach = max(reach, j - best)
    return removed, reach


def test_semdedup_matches_the_brute_force_transcription(monkeypatch):
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((3, 24))
    x = np.concatenate([c + 0.3 * rng.standard_normal((30, 24)) for c in centres])
    copies = rng.choice(len(x), 25, replace=False)
    x = np.concatenate([x, x[copies] + 0.01 * rng.standard_normal((25, 24))])        # near copies
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    emb = np.concatenate([rng.standard_normal((7, 24)), x]).astype(np.float16)    # rows 0-6: not candidates
    candidates = list(rng.permutation(np.arange(7, len(emb))))
    xc = torch.nn.functional.normalize(torch.from_numpy(emb[candidates]).float(), dim=1)
    truth = torch.tensor([int(np.argmax(centres @ v)) for v in xc.numpy().astype(np.float64)])
    centroids = F.normalize(torch.stack([xc[truth == c].mean(0) for c in range(3)]), dim=1)
    monkeypatch.setattr(curate, "kmeans", lambda x, k, iters, backend, seed=0: (truth, centroids))
    # eps 0.005: the near copies (next to their originals in the order); eps 0.07: items that repeat
    # one more than a block of 7 before them (clusters of ~38: the blockwise path)
    for eps, lo, hi, far in ((0.005, 15, 40, 0), (0.07, 20, 80, 7)):
        args = types.SimpleNamespace(clusters=3, kmeans="torch", kmeans_iters=1, dedup_eps=eps)
        want, reach = brute_force_semdedup(xc.numpy(), truth.numpy(), centroids.numpy(), eps)
        assert lo <= len(want) < hi and reach > far, (eps, len(want), reach)
        for block in (7, 4096):
            got = curate.semdedup(emb, candidates, args, block=block)
            assert sorted(got) == sorted(candidates[j] for j in want), (eps, block)
            for j, (cos, by) in want.items():
                assert got[candidates[j]][0] == pytest.approx(cos, abs=1e-5)
                assert got[candidates[j]][1] == candidates[by]


def test_kmeans_torch_and_faiss_find_the_same_blobs():
    """Four well-separated blobs: both backends find them (k-means, like every k-means start, can
    split one blob and merge two for good on harder data: docs/curate.md)."""
    pytest.importorskip("faiss")
    rng = np.random.default_rng(2)
    centres = np.linalg.qr(rng.standard_normal((32, 4)))[0].T * 10                # orthogonal, far apart
    labels = np.repeat(np.arange(4), 50)
    x = F.normalize(torch.from_numpy(centres[labels] + rng.standard_normal((200, 32))).float(), dim=1)
    for backend in ("torch", "faiss"):
        assign, centroids = curate.kmeans(x, 4, 20, backend)
        assert centroids.shape == (4, 32)
        assert len(set(zip(labels.tolist(), assign.tolist()))) == 4, backend     # the blobs, relabelled


def test_clip_score_cuts():
    rng = np.random.default_rng(2)
    scores = rng.uniform(-0.2, 0.6, 37).astype(np.float32)
    for fraction in (0.3, 0.5, 1.0):
        args = types.SimpleNamespace(min_clip_score=None, keep_fraction=fraction)
        keep, threshold, _ = curate.clip_score_filter(scores, None, None, args)
        top = set(np.argsort(-scores)[:int(37 * fraction)].tolist())
        assert set(np.flatnonzero(keep).tolist()) == top, fraction
    s = float(scores[5])
    keep, threshold, _ = curate.clip_score_filter(scores, None, None,
                                                  types.SimpleNamespace(min_clip_score=s, keep_fraction=None))
    assert keep[5] and threshold == s
    assert keep.tolist() == (scores >= s).tolist() and 0 < keep.sum() < 37


@pytest.mark.parametrize("n", [1, 3, 10])
def test_default_rank_rule_keeps_true_pairs_of_small_datasets_and_drops_swapped_ones(n):
    """n images with one caption each that fits it (cosine ~0.9, ~0 to the others): every pair is
    kept, though the random draws hit each pair's own image (left out) and n < 100 draws; with the
    captions rolled by one (n > 1) every pair is removed."""
    g = torch.Generator().manual_seed(n)
    images = F.normalize(torch.randn(n, 64, generator=g), dim=1)
    captions = F.normalize(images + 0.3 * torch.randn(n, 64, generator=g) / 8, dim=1)
    args = types.SimpleNamespace(min_clip_score=None, keep_fraction=None)
    for rows, want in [(np.arange(n), True)] + ([(np.roll(np.arange(n), 1), False)] if n > 1 else []):
        scores = (images[rows] * captions).sum(1).numpy()
        keep, _, _ = curate.clip_score_filter(scores, images.half().numpy(), captions.half().numpy(), args, rows)
        assert keep.tolist() == [want] * n, (n, want, keep)


def test_relative_image_root_gives_absolute_paths(small, clip_ckpt, tmp_path, monkeypatch):
    """--image-root given relative to the working folder: kept.json's paths still resolve from OUT."""
    with open(small.json) as f:
        records = json.load(f)[:4]
    monkeypatch.chdir(os.path.dirname(records[0]["image"]))
    for r in records:
        r["image"] = os.path.basename(r["image"])
    (tmp_path / "rel.json").write_text(json.dumps(records))
    curate_run(tmp_path / "rel.json", clip_ckpt, tmp_path / "out", "--image-root", ".", "--keep-fraction", "1")
    kept = read_annotations(str(tmp_path / "out" / "kept.json"))
    assert kept and all(os.path.isabs(r["image"]) and os.path.isfile(r["image"]) for r in kept)


def test_image_checks_too_small_odd_aspect_and_copied_file(small, tmp_path):
    with open(small.json) as f:
        records = json.load(f)[:8]
    src = [r["image"] for r in records]
    Image.open(src[0]).convert("RGB").resize((20, 20)).save(tmp_path / "small.png")
    Image.open(src[1]).convert("RGB").resize((200, 40)).save(tmp_path / "wide.png")
    shutil.copy(src[2], tmp_path / "copy.png")
    paths = src + [str(tmp_path / n) for n in ("small.png", "wide.png", "copy.png")]
    records = [{"image": p, "caption": f"c{i}"} for i, p in enumerate(paths)]
    (tmp_path / "data.json").write_text(json.dumps(records))
    data = curate.Dataset(str(tmp_path / "data.json"), "")
    args = types.SimpleNamespace(workers=0, quality=True, min_size=32, min_aspect=0.35, low_information=0.2,
                                 blurry=0.6, changed_pixels=0.001)
    failed, _ = curate.image_checks(data, args)
    assert failed == {8: ("too_small", 20, None), 9: ("odd_aspect_ratio", 0.2, None),
                      10: ("exact_duplicate", 1.0, 2)}
    args.quality = False                         # without --quality only unreadable images go
    assert curate.image_checks(data, args)[0] == {}
