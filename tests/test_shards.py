"""Webdataset shards (common/shards.py, data/make_shards.py): the layout written, an epoch that reads
every sample once over ranks and workers, exact mid-epoch resume with bad samples in the stream,
bad shards and samples logged and counted, resampling, clear errors, and all five scripts training
from shards (CLIP to the same losses after an interruption)."""
import io
import json
import os
import tarfile

import pytest
import torch
from PIL import Image

import clip_train
from common.data import tiny_data
from common.shards import ShardLoader, expand_shards
from common.utils import MissingFileError, UserError
from data import make_shards
from tests.test_clip_train import read_metrics, subset, train_losses  # noqa: F401  (fixture)


class Captions:
    """An Example that keeps the caption text, to see which samples came (picklable for workers)."""

    def __call__(self, image, record, c, seed):
        return torch.tensor(image.size), record["captions"][c]


def fabricate(folder, n_images, captions_per_image=1):
    """An annotation file of n distinct 8x8 PNGs with captions 'image i caption c'."""
    os.makedirs(folder, exist_ok=True)
    records = []
    for i in range(n_images):
        Image.new("RGB", (8, 8), (i % 256, (7 * i) % 256, 90)).save(os.path.join(folder, f"{i}.png"))
        records.append({"image": f"{i}.png", "caption": [f"image {i} caption {c}" for c in range(captions_per_image)]})
    path = os.path.join(folder, "ann.json")
    with open(path, "w") as f:
        json.dump(records, f)
    return path


def loader(spec, **kw):
    kw = {"batch_size": 3, "workers": 0, "seed": 0, "rank": 0, "world_size": 1, **kw}
    return ShardLoader(spec, Captions(), **kw)


def epoch_texts(ld, epoch=0, skip=0):
    ld.set_epoch(epoch, skip)
    return [t for _, texts, _ in ld for t in texts]


def test_make_shards_layout_sizes_and_determinism(tmp_path):
    ann = fabricate(tmp_path / "imgs", 10, captions_per_image=2)
    sizes = make_shards.write_shards(ann, str(tmp_path / "a"), shard_size=8)
    assert sizes == {"00000.tar": 8, "00001.tar": 8, "00002.tar": 4}
    assert json.loads((tmp_path / "a" / "sizes.json").read_text()) == sizes
    with tarfile.open(tmp_path / "a" / "00000.tar") as tar:
        names = tar.getnames()
        assert names[:3] == ["000000000.png", "000000000.json", "000000000.txt"]
        meta0, meta1 = (json.loads(tar.extractfile(f"00000000{k}.json").read()) for k in (0, 1))
        assert tar.extractfile("000000001.txt").read() == b"image 0 caption 1"
        assert tar.extractfile("000000000.png").read() == (tmp_path / "imgs" / "0.png").read_bytes()  # as it was
    assert meta0["image_id"] == meta1["image_id"] and meta1["caption_index"] == 1          # one image, 2 captions
    make_shards.write_shards(ann, str(tmp_path / "b"), shard_size=8)
    assert (tmp_path / "a" / "00001.tar").read_bytes() == (tmp_path / "b" / "00001.tar").read_bytes()
    # --sizes: counted from the tars, or taken from img2dataset's *_stats.json
    os.remove(tmp_path / "b" / "sizes.json")
    (tmp_path / "b" / "00002_stats.json").write_text(json.dumps({"count": 9, "successes": 7}))
    make_shards.main(["--sizes", str(tmp_path / "b")])
    assert json.loads((tmp_path / "b" / "sizes.json").read_text()) == {**sizes, "00002.tar": 7}
    # the captions of one image come with one image id (ITM/ITC positives), other images' differ
    ld = loader(str(tmp_path / "a" / "{00000..00002}.tar"), batch_size=20)
    ld.set_epoch(0)
    (_, texts, ids), = list(ld)
    by_image = {}
    for t, i in zip(texts, ids.tolist()):
        by_image.setdefault(t.split(" caption")[0], set()).add(i)
    assert all(len(v) == 1 for v in by_image.values()) and len(set.union(*by_image.values())) == 10


@pytest.fixture(scope="module")
def shards48(tmp_path_factory):
    """48 samples in 8 shards of 6."""
    d = tmp_path_factory.mktemp("s48")
    make_shards.write_shards(fabricate(d / "imgs", 48), str(d / "shards"), shard_size=6)
    return str(d / "shards" / "{00000..00007}.tar")


def test_an_epoch_reads_each_sample_once_over_ranks_and_workers(shards48):
    """2 ranks x 2 workers, 2 shards each: together they read all 48 samples once per epoch, in
    another order the next epoch; each rank runs the same number of steps."""
    everything = {f"image {i} caption 0" for i in range(48)}
    epochs = []
    for epoch in (0, 1):
        per_rank = [epoch_texts(loader(shards48, workers=2, rank=r, world_size=2), epoch) for r in range(2)]
        assert [len(t) for t in per_rank] == [24, 24]
        assert sorted(per_rank[0] + per_rank[1]) == sorted(everything)
        epochs.append(per_rank[0])
    assert epochs[0] != epochs[1]
    # workers=0 reads the same data as one worker process would
    assert epoch_texts(loader(shards48, workers=0)) == epoch_texts(loader(shards48, workers=1))


def rewrite_tar(path, change):
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for member, data in change(members):
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def cut_tar(path, member, into):
    """Truncate a tar `into` bytes after the start of `member`'s header (< 512: inside the header)
    or of its data (>= 512)."""
    with tarfile.open(path) as tar:
        offset = tar.getmember(member).offset
    data = open(path, "rb").read()
    open(path, "wb").write(data[:offset + into])


def corrupt_shards(folder):
    """6 shards of 8 with one bad sample of each kind: no caption (sample 2), no image (9), an
    undecodable image (17); shard 3 cut inside sample 28's image data and shard 4 inside sample 36's
    header. 36 good samples are left: 0-27 but 2, 9 and 17; 32-34 (35 may be incomplete where the
    archive just ends); 40-47."""
    make_shards.write_shards(fabricate(os.path.join(folder, "imgs"), 48), os.path.join(folder, "shards"), shard_size=8)
    shard = lambda i: os.path.join(folder, "shards", f"{i:05d}.tar")  # noqa: E731
    rewrite_tar(shard(0), lambda ms: [(n, d) for n, d in ms if n != "000000002.txt"])
    rewrite_tar(shard(1), lambda ms: [(n, d) for n, d in ms if n != "000000009.png"])
    rewrite_tar(shard(2), lambda ms: [(n, b"not an image" if n == "000000017.png" else d) for n, d in ms])
    cut_tar(shard(3), "000000028.png", 512 + 10)
    cut_tar(shard(4), "000000036.png", 100)
    good = sorted(set(range(28)) - {2, 9, 17} | set(range(32, 35)) | set(range(40, 48)))
    return os.path.join(folder, "shards", "{00000..00005}.tar"), [f"image {i} caption 0" for i in good]


def test_bad_samples_and_shards_are_logged_and_counted(tmp_path, caplog):
    spec, good = corrupt_shards(str(tmp_path))
    assert len(good) == 36
    ld = loader(spec, batch_size=1, num_samples=36)
    with caplog.at_level("WARNING"):
        texts = epoch_texts(ld)
    assert sorted(texts) == sorted(good)
    assert ld.stats() == {"data_skipped_no_text": 1, "data_skipped_no_image": 1, "data_skipped_bad_image": 1,
                          "data_skipped_bad_shard": 2, "data_shards_reread": 0, "data_shards_shared": 0}
    for what in ("00000.tar:000000002 has no caption", "00001.tar:000000009 has no image",
                 "cannot read image", "00002.tar:000000017.png", "00003.tar is unreadable after 4 sample(s)",
                 "00004.tar is unreadable after 3 sample(s)", "without its end-of-archive block"):
        assert what in caplog.text, what
    # an epoch longer than the shards hold reads them again, and says so
    ld = loader(spec, batch_size=1, num_samples=40)
    with caplog.at_level("WARNING"):
        assert len(epoch_texts(ld)) == 40
    assert ld.stats()["data_shards_reread"] == 1 and "reading them again (round 2)" in caplog.text


def test_mid_epoch_resume_is_exact_with_bad_samples_and_workers(tmp_path):
    """Stop after 5 batches, save the state, resume in a new loader: the remaining batches equal an
    unbroken epoch's, though bad samples were skipped before the stop (2 workers, round-robin)."""
    spec, _ = corrupt_shards(str(tmp_path))
    full = loader(spec, batch_size=3, workers=2, num_samples=45)
    full.set_epoch(0)
    want = [texts for _, texts, _ in full]
    first = loader(spec, batch_size=3, workers=2, num_samples=45)
    first.set_epoch(0)
    got = []
    for _, texts, _ in first:
        got.append(texts)
        if len(got) == 5:
            break
    state = json.loads(json.dumps(first.state_dict()))            # as it comes back from a checkpoint
    second = loader(spec, batch_size=3, workers=2, num_samples=45)
    second.load_state_dict(state)
    second.set_epoch(0, skip=5 * 3)
    got += [texts for _, texts, _ in second]
    assert got == want and len(want) == 15
    assert second.stats() == full.stats()                        # the counts before the stop are kept
    with pytest.raises(UserError, match="--workers 2"):
        third = loader(spec, batch_size=3, workers=1, num_samples=45)
        third.load_state_dict(state)
        third.set_epoch(0, skip=5 * 3)


def test_more_workers_than_shards_split_by_sample(shards48, caplog):
    """2 shards for 2 ranks x 2 workers: every worker reads both and keeps its share of the samples
    (logged, and counted: 2 ranks x 2 workers x 2 shards read); each sample is still read once per
    epoch."""
    two = shards48.replace("00007", "00001")
    loaders = [loader(two, workers=2, batch_size=3, rank=r, world_size=2) for r in range(2)]
    with caplog.at_level("WARNING"):
        per_rank = [epoch_texts(ld) for ld in loaders]
    assert "fewer shards than 2 rank(s) x 2 worker(s)" in caplog.text
    assert [ld.stats()["data_shards_shared"] for ld in loaders] == [4, 4]       # one process: its rank's
    with caplog.at_level("WARNING"):            # workers=0: the worker logs in this process
        epoch_texts(loader(two, batch_size=2, rank=2, world_size=3))
        assert "read by all" not in caplog.text                      # rank 0's first worker only
        epoch_texts(loader(two, batch_size=2, rank=0, world_size=3))
    for shard in ("00000", "00001"):             # logged per shard read (the first five of an epoch), not once
        assert f"{shard}.tar: read by all 3 workers (fewer shards than 3 rank(s) x 1 worker(s))" in caplog.text
    texts = per_rank[0] + per_rank[1]
    assert sorted(texts) == sorted(f"image {i} caption 0" for i in range(12))


def test_resampled_draws_shards_with_replacement_deterministically(shards48):
    a = epoch_texts(loader(shards48, resampled=True, num_samples=96, batch_size=4))
    assert a == epoch_texts(loader(shards48, resampled=True, num_samples=96, batch_size=4))
    assert a != epoch_texts(loader(shards48, resampled=True, num_samples=96, batch_size=4), epoch=1)
    assert len(a) == 96 and len(set(a)) < 48 + 1        # 96 draws from 48 samples: repeats
    other_rank = epoch_texts(loader(shards48, resampled=True, num_samples=96, batch_size=4, rank=1, world_size=2))
    assert other_rank[:8] != a[:8]


def test_shard_errors_name_the_culprit(tmp_path, shards48):
    with pytest.raises(MissingFileError, match=r"00008.tar does not exist \(2 of the 10 shards are missing\)"):
        expand_shards(shards48.replace("00007", "00009"))
    folder = os.path.dirname(shards48)
    os.makedirs(tmp_path / "nosizes")
    for name in ("00000.tar", "00001.tar"):
        os.link(os.path.join(folder, name), tmp_path / "nosizes" / name)
    with pytest.raises(UserError, match="sizes.json does not exist"):
        loader(str(tmp_path / "nosizes" / "{00000..00001}.tar"))
    assert len(loader(str(tmp_path / "nosizes" / "{00000..00001}.tar"), num_samples=12, batch_size=4)) == 3
    with pytest.raises(UserError, match="is remote"):
        loader("pipe:cat " + os.path.join(folder, "00000.tar"))
    with pytest.raises(UserError, match="larger than the 48 samples"):
        loader(shards48, batch_size=49)
    # the shard-only flags with an annotation file are an error, not silently ignored
    with pytest.raises(UserError, match="--train-num-samples and --dataset-resampled apply to webdataset shards"):
        clip_train.main(["--train-data", os.path.join(folder, "..", "imgs", "ann.json"), "--train-num-samples", "10",
                         "--tokenizer", os.path.join(tiny_data(), "tokenizer"), "--output-dir", str(tmp_path / "run")])
    # a pipe: source streams like a file
    texts = epoch_texts(loader("pipe:cat " + os.path.join(folder, "00000.tar"), num_samples=6))
    assert sorted(texts) == [f"image {i} caption 0" for i in range(6)]


@pytest.fixture(scope="module")
def tiny_shards(subset, tmp_path_factory):  # noqa: F811
    """The CLIP tests' 40-image subset (200 pairs) in 8 shards of 25."""
    out = str(tmp_path_factory.mktemp("tinyshards"))
    make_shards.write_shards(subset[1], out, shard_size=25, shuffle=True)
    return os.path.join(out, "{00000..00007}.tar")


def script_cases():
    from tests import test_albef_train, test_blip2_stage2_train, test_blip2_train, test_blip_train, test_coca_train
    return {"albef": (test_albef_train.SMALL, []), "blip": (test_blip_train.SMALL, []),
            "blip2": (test_blip2_train.SMALL, []), "blip2_stage2": (test_blip2_train.SMALL, test_blip2_stage2_train.STAGE2),
            "coca": (test_coca_train.SMALL, [])}


@pytest.mark.parametrize("name", ["albef", "blip", "blip2", "blip2_stage2", "coca"])
def test_every_script_trains_from_shards(name, tiny_shards, subset, tmp_path, monkeypatch):  # noqa: F811
    """3 steps from shards with 2 data workers, a SIGTERM to the process and its workers (as torchrun
    and SLURM send it) after step 3: the workers ignore it, the run saves that step and stops."""
    import importlib
    from tests.test_distributed import signal_at
    script = importlib.import_module(name.replace("_stage2", "") + "_train")
    small, extra = script_cases()[name]
    out = str(tmp_path / name)
    signal_at(monkeypatch, script, 3)
    script.main([*small, *extra, "--train-data", tiny_shards, "--tokenizer", subset[-1], "--batch-size", "4",
                 "--max-steps", "5", "--save-every", "2", "--workers", "2", "--output-dir", out])
    train = [r for r in read_metrics(out) if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3] and all(r["data_skipped_bad_image"] == 0 for r in train)
    ckpt = torch.load(os.path.join(out, "checkpoint_last.pt"), weights_only=True)
    assert ckpt["data"][0]["batches"] == 3 and ckpt["steps_per_epoch"] == 200 // 4


@pytest.mark.parametrize("name", ["clip", "albef"])
def test_on_shards_a_run_resumes_mid_epoch_to_the_same_losses(name, tiny_shards, subset, tmp_path, monkeypatch):  # noqa: F811
    """A run preempted at step 3 of a 6-step epoch (2 workers) and resumed gives every step's loss of
    an unbroken run, into the second epoch. ALBEF draws MLM masks and ITM negatives from the global
    generator, so starting the shard loader must not draw from it."""
    import importlib
    from tests.test_albef_train import SMALL as ALBEF_SMALL
    from tests.test_clip_train import SMALL
    from tests.test_distributed import signal_at
    script = importlib.import_module(f"{name}_train")
    small = {"clip": SMALL, "albef": [*ALBEF_SMALL, "--queue-size", "64"]}[name]
    args = [*[a for a in small if a not in ("--workers", "0")], "--workers", "2", "--train-data", tiny_shards,
            "--train-num-samples", "200", "--batch-size", "32", "--tokenizer", subset[-1], "--max-steps", "9"]
    ref = str(tmp_path / "ref")
    script.main([*args, "--output-dir", ref])
    out = str(tmp_path / "cut")
    signal_at(monkeypatch, script, 3)            # a real SIGTERM, the 2 data workers included
    script.main([*args, "--output-dir", out])
    assert max(train_losses(out)) == 3
    monkeypatch.undo()
    script.main([*args, "--output-dir", out, "--resume", "auto"])
    want, got = train_losses(ref), train_losses(out)
    assert sorted(got) == list(range(1, 10))
    for step in range(1, 10):
        assert abs(got[step] - want[step]) < 1e-6, (step, got[step], want[step])
