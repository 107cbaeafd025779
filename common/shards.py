"""Streaming training data from webdataset shards in img2dataset's layout, for LAION / CC scale.

A shard is a tar file whose members are grouped into samples by key: KEY.jpg|jpeg|png|webp (the
image), KEY.txt (the caption) and optionally KEY.json (metadata; an "image_id" there marks the
captions of one image, as data/make_shards.py writes them). `--train-data` names the shards:
`shards/{00000..01023}.tar` (braces expanded), several sources joined with `::`, or `pipe:` commands
(`pipe:aws s3 cp s3://bucket/{00000..00329}.tar -`), as open_clip.

The pipeline (as open_clip's get_wds_dataset), one generator per DataLoader worker:
  1. shard order: shuffled with (seed, epoch), the same on every rank;
  2. split: rank r takes every R-th shard of that order and worker w every W-th of those (with fewer
     shards than R x W, every worker reads all of them and keeps every (R*W)-th sample, logged);
     with `--dataset-resampled`, each worker instead draws shards with replacement;
  3. samples: tar members grouped by key (webdataset's tar reader);
  4. a seeded shuffle buffer of raw (undecoded) samples;
  5. decoding and augmentation (common.data.Example), then batches of `batch_size`.
A sample without caption or image, an undecodable image and a truncated or unreadable shard are
logged and counted, never fatal: the counts go into metrics.jsonl (`data_skipped_*`).

An epoch is `--train-num-samples` samples (or the total of the shards' sizes.json): num_samples //
(batch x world) steps, the same on every rank, batch i of a rank coming from worker i mod W. A worker
whose shards run out reads them again (logged and counted), as webdataset's with_epoch.

Exact resume: every batch carries its worker's position in its raw sample stream (samples out of the
shuffle buffer, bad ones included) and the counts so far. The checkpoint keeps each worker's position
at the last batch consumed; a resumed worker replays its stream to there, reading tar bytes but
decoding nothing, so the rest of the epoch is the same batches in the same order with the same crops.
"""
import collections
import hashlib
import io
import json
import logging
import os
import random
import tarfile

import torch

from . import dist
from .data import load_rgb, read_json
from .utils import DataLoader, MissingFileError, UserError, ignore_preemption_signals

log = logging.getLogger("shards")

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
COUNTS = ("no_text", "no_image", "bad_image", "bad_shard", "reread", "shared")   # what metrics.jsonl reports
STAT_NAMES = {"reread": "data_shards_reread", "shared": "data_shards_shared"}      # the others: data_skipped_*
SHUFFLE_BUFFER = 2000          # raw samples per worker (open_clip: 5,000 decoded-later samples)
LOGGED_PER_KIND = 5            # warnings per worker and kind before only powers of ten are logged


def is_shards(spec):
    """Whether --train-data names webdataset shards rather than an annotation file."""
    return bool(spec) and any(part.strip().endswith(".tar") or part.startswith("pipe:") for part in spec.split("::"))


def _is_remote(url):
    return url.startswith("pipe:") or "://" in url


def _webdataset():
    try:
        import webdataset
    except ImportError:
        raise UserError("--train-data names webdataset shards: pip install 'webdataset==0.2.86' "
                        "(open_clip's pin; later releases changed the tar grouping)") from None
    return webdataset


def expand_shards(spec):
    """The shard URLs of a --train-data spec: `::`-separated sources, braces expanded (webdataset's
    expand_urls). A missing local shard is an error naming it."""
    _webdataset()
    from webdataset.shardlists import expand_urls
    urls = expand_urls(spec)
    missing = [u for u in urls if not _is_remote(u) and not os.path.isfile(u)]
    if missing:
        raise MissingFileError(f"--train-data: shard {missing[0]} does not exist "
                               f"({len(missing)} of the {len(urls)} shards are missing)")
    if not urls:
        raise UserError(f"--train-data {spec!r} names no shards")
    return urls


def count_samples(urls, num_samples=0):
    """(samples in an epoch, where the number comes from): --train-num-samples when given, else the
    sum over the shards of the sizes.json beside them ({shard file name: samples}, as open_clip reads
    it; data/make_shards.py writes it, also from img2dataset's *_stats.json)."""
    if num_samples > 0:
        return num_samples, "--train-num-samples"
    total, sizes_of = 0, {}
    for url in urls:
        if _is_remote(url):
            raise UserError(f"--train-data {url} is remote: give the number of samples of an epoch with "
                            f"--train-num-samples")
        folder, name = os.path.split(os.path.abspath(url))
        path = os.path.join(folder, "sizes.json")
        if folder not in sizes_of:
            sizes_of[folder] = read_json(path, "sizes file") if os.path.isfile(path) else None
        sizes = sizes_of[folder]
        if sizes is None:
            raise UserError(f"--train-num-samples is not set and {path} does not exist: give the number of samples of "
                            f"an epoch, or write sizes.json (python data/make_shards.py --sizes {folder})")
        if name not in sizes:
            raise UserError(f"{path} has no entry for the shard {name}")
        total += int(sizes[name])
    return total, "sizes.json"


def _digest(text):
    """A 63-bit integer from a string, the same in every process (Python's hash() is salted)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") & 0x7FFF_FFFF_FFFF_FFFF


def tar_members(stream):
    """(name, bytes) of the regular files of a tar stream, in order (webdataset's tar_file_iterator,
    which cannot tell a truncated archive from a complete one: Python's tarfile ends quietly at a cut
    header). Raises tarfile.ReadError for a cut in a member's data or before the end-of-archive block."""
    tar = tarfile.open(fileobj=stream, mode="r|*")
    for info in tar:
        if info.isreg() and not os.path.basename(info.name).startswith("__"):    # __meta__ files
            try:
                data = tar.extractfile(info).read()
            except tarfile.ReadError as e:
                e.member = info.name                  # the sample before this member is complete
                raise
            yield info.name, data
        tar.members = []                               # keep memory flat over a 10,000-sample shard
    # a complete archive ends with a zero block at tar.offset, which tarfile has read
    if tar.fileobj.pos < tar.offset + tarfile.BLOCKSIZE:
        raise tarfile.ReadError(f"the archive ends at byte {tar.fileobj.pos} without its end-of-archive block")


def shard_samples(url, note):
    """The samples of one shard, {"__key__", "__url__", ext: bytes}: consecutive members with the same
    key (webdataset's base_plus_ext: the name up to its first dot) form a sample. A shard that cannot
    be opened or read to the end (truncated, corrupt, a failed download) ends here: `note("bad_shard",
    ...)`, its incomplete last sample dropped, and the stream goes on with the next shard."""
    from webdataset.gopen import gopen
    from webdataset.tariterators import base_plus_ext
    current, n = None, 0
    try:
        stream = gopen(url)
        try:
            for name, data in tar_members(stream):
                key, ext = base_plus_ext(name)
                if key is None:
                    continue
                if current is not None and key != current["__key__"]:
                    yield current
                    n += 1
                    current = None
                if current is None:
                    current = {"__key__": key, "__url__": url}
                current[ext.lower()] = data
        finally:
            stream.close()
    except Exception as e:       # noqa: BLE001 -- any failure of one shard is logged, counted and survived
        # the sample being read is kept if the failure is in the next one's data; after a cut header
        # (the archive just ends) it may be incomplete and is dropped
        failed = getattr(e, "member", None)
        complete = current is not None and failed is not None and base_plus_ext(failed)[0] != current["__key__"]
        note("bad_shard", f"shard {url} is unreadable after {n + complete} sample(s) ({type(e).__name__}: {e}); "
                          f"going on with the next shard")
        if complete:
            yield current
        return
    if current is not None:
        yield current


def shuffle_buffer(samples, rng, size):
    """A seeded buffer shuffle (webdataset's shuffle): keep `size` samples, emit a random one as each
    new one arrives, the rest in random order at the end."""
    buf = []
    for sample in samples:
        buf.append(sample)
        if len(buf) >= size:
            k = rng.randrange(len(buf))
            buf[k], buf[-1] = buf[-1], buf[k]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


class ShardStream(torch.utils.data.IterableDataset):
    """One rank's batches of an epoch, produced by DataLoader workers (see the module docstring).
    Yields (batch, (role, position, counts)), or (None, ("error", message)) for a problem the main
    process should report as a user error. `start` (set by ShardLoader before each iteration) says
    where the epoch resumes: batches consumed, and each role's raw position and counts there."""

    def __init__(self, urls, example, *, batch_size, steps, seed, rank, world_size, workers, resampled, collate_fn):
        self.urls, self.example, self.batch_size, self.steps = urls, example, batch_size, steps
        self.seed, self.rank, self.world, self.workers, self.resampled = seed, rank, world_size, max(workers, 1), resampled
        self.collate = collate_fn or torch.utils.data.default_collate
        self.per_shard = resampled or len(urls) >= world_size * self.workers
        self.epoch, self.start = 0, {"batches": 0, "pos": {}, "counts": {}}

    # -- raw samples of one role (a worker's share of this rank's data) --

    def raw_samples(self, role, note):
        """Endless: the role's samples of this epoch, shuffled, then again (a new round) if the epoch
        needs more than its shards hold."""
        R, W, epoch = self.world, self.workers, self.epoch
        if self.resampled:      # shards drawn with replacement, a stream per (rank, worker)
            rng = random.Random(f"{self.seed}/{epoch}/{self.rank}/{role}")

            def drawn():
                empty = 0
                while True:
                    got = False
                    for sample in shard_samples(rng.choice(self.urls), note):
                        got = True
                        yield sample
                    empty = 0 if got else empty + 1
                    if empty > max(100, 2 * len(self.urls)):
                        raise UserError(f"{empty} shards in a row drawn from --train-data held no sample")
            yield from shuffle_buffer(drawn(), rng, SHUFFLE_BUFFER)
            return
        order = list(self.urls)
        random.Random(f"{self.seed}/{epoch}").shuffle(order)                  # the same on every rank
        if self.per_shard:
            mine, keep = order[self.rank::R][role::W], None
        else:                       # too few shards: everyone reads all, keeps every (R*W)-th sample
            mine, keep = order, self.rank * W + role
        for rnd in range(1 << 62):
            if rnd:                 # the same shards again, in another order
                mine = list(mine)
                random.Random(f"{self.seed}/{epoch}/{rnd}/{self.rank}/{role}").shuffle(mine)

            def samples():
                i = 0
                for url in mine:
                    if keep is not None:   # the same for every worker: logged by one, counted by all
                        note("shared", f"{url}: read by all {R * W} workers (fewer shards than {R} rank(s) x {W} "
                                       f"worker(s)); this one keeps every {R * W}th sample", logged=keep == 0)
                    for sample in shard_samples(url, note):
                        if keep is None or i % (R * W) == keep:
                            yield sample
                        i += 1
            n = 0
            for sample in shuffle_buffer(samples(), random.Random(f"{self.seed}/{epoch}/{rnd}/{self.rank}/{role}"),
                                         SHUFFLE_BUFFER):
                n += 1
                yield sample
            if n == 0:
                raise UserError(f"rank {self.rank} worker {role}: its shards of --train-data hold no sample "
                                f"({', '.join(mine[:3])}{', ...' if len(mine) > 3 else ''})")
            note("reread", f"read all {len(mine)} of its shard(s) ({n} samples) in epoch {epoch}; reading them "
                           f"again (round {rnd + 2}) to fill the epoch: --train-num-samples or sizes.json says "
                           f"more samples than this worker's shards hold")

    def decode(self, sample, note):
        """(image, text, image id) of a raw sample, or None (noted) if it has no caption, no image or
        an undecodable image."""
        where = f"{sample['__url__']}:{sample['__key__']}"
        text = sample.get("txt", b"")
        try:
            text = text.decode("utf-8").strip()
        except UnicodeDecodeError:
            text = ""
        if not text:
            note("no_text", f"{where} has no caption (.txt missing, empty or not UTF-8); skipped")
            return None
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if ext is None:
            note("no_image", f"{where} has no image ({'/'.join(IMAGE_EXTENSIONS)}); skipped")
            return None
        try:
            image = load_rgb(io.BytesIO(sample[ext]), name=f"{where}.{ext}")
        except OSError as e:
            note("bad_image", f"{e}; skipped")
            return None
        image_id = f"{os.path.dirname(sample['__url__'])}/{sample['__key__']}"
        if "json" in sample:                  # the captions of one image share its image_id
            try:
                meta = json.loads(sample["json"])
                if isinstance(meta, dict) and "image_id" in meta:
                    image_id = f"image_id:{meta['image_id']}"
            except ValueError:
                pass                          # metadata is optional; the key identifies the sample
        record = {"captions": [text], "image": where, "image_id": image_id}
        image, text = self.example(image, record, 0, _digest(f"{self.seed}/{self.epoch}/{where}"))
        return image, text, _digest(image_id)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        j, W = (info.id, info.num_workers) if info else (0, 1)
        if W != self.workers:
            raise RuntimeError(f"ShardStream built for {self.workers} workers runs in {W}")
        done = self.start["batches"]
        # DataLoader worker j yields batches done + j, done + j + W, ... (its round-robin order); the
        # stream it plays ("role") is that of the worker that made batch done + j in an unbroken epoch
        role, quota = (j + done) % W, len(range(done + j, self.steps, W))
        if quota == 0:
            return
        counts = collections.Counter(self.start["counts"].get(role, {}))
        replay = [True]

        def note(kind, message, logged=True):
            if replay[0]:                          # already counted before the checkpoint
                return
            counts[kind] += 1
            if logged and (counts[kind] <= LOGGED_PER_KIND or str(counts[kind]).strip("0") == "1"):
                log.warning("rank %d worker %d: %s [%s: %d so far]", self.rank, role, message, kind, counts[kind])

        position, batch = self.start["pos"].get(role, 0), []
        try:
            stream = self.raw_samples(role, note)
            for _ in range(position):              # exact resume: replay without decoding
                next(stream)
            replay[0] = False
            for sample in stream:
                position += 1
                item = self.decode(sample, note)
                if item is None:
                    continue
                batch.append(item)
                if len(batch) == self.batch_size:
                    yield self.collate(batch), (role, position, dict(counts))
                    batch, quota = [], quota - 1
                    if quota == 0:
                        return
        except UserError as e:
            yield None, ("error", str(e))


class ShardLoader:
    """The training loader of webdataset shards, with the interface the scripts use for annotation
    files (DataLoader + ShardedSampler in one): `len()` is the batches per epoch (a multiple of
    accum_steps), `set_epoch(epoch,
    skip)` before iterating, `state_dict()` / `load_state_dict()` for the checkpoint (what makes a
    mid-epoch resume exact), `stats()` for the counts of skipped samples (summed over ranks)."""

    def __init__(self, spec, example, *, batch_size, workers, seed, rank, world_size, num_samples=0,
                 resampled=False, collate_fn=None, accum_steps=1):
        urls = expand_shards(spec)
        total, origin = count_samples(urls, num_samples)
        steps = total // (batch_size * accum_steps * world_size) * accum_steps     # batches per rank and epoch
        if steps == 0:
            accum = f" x --accum-steps {accum_steps}" if accum_steps > 1 else ""
            raise UserError(f"--batch-size {batch_size}{accum} x {world_size} process(es) is larger than the {total} "
                            f"samples of an epoch ({origin}); use a smaller --batch-size")
        self.workers, self.batch_size, self.steps = workers, batch_size, steps
        self.dataset = ShardStream(urls, example, batch_size=batch_size, steps=steps, seed=seed, rank=rank,
                                   world_size=world_size, workers=workers, resampled=resampled, collate_fn=collate_fn)
        W = self.dataset.workers
        if rank == 0:
            log.warning("%d shard(s), %d samples per epoch (%s): %d batches of %d per rank (x %d ranks); %s", len(urls), total, origin,
                        steps, batch_size, world_size,
                        "shards drawn with replacement" if resampled else
                        f"{len(urls) // (world_size * W)}+ shard(s) per worker" if self.dataset.per_shard else
                        f"fewer shards than {world_size} rank(s) x {W} worker(s): every worker reads all of them and "
                        f"keeps every {world_size * W}th sample; write at least {world_size * W} shards to read each once")
        self.epoch, self.batches, self.pos, self.counts = 0, 0, {}, {}
        self.finished = collections.Counter()       # counts of the epochs before this one
        self.loaded = None

    def __len__(self):
        return self.steps

    def set_epoch(self, epoch, skip=0):
        """Start `epoch` after `skip` samples of this rank (a multiple of the batch size)."""
        batches = skip // self.batch_size
        if epoch != self.epoch:                     # the counts of the epoch before are final
            for c in self.counts.values():
                self.finished.update(c)
            self.counts = {}
        state, self.loaded = self.loaded, None
        self.epoch, self.batches = epoch, batches
        if batches == 0:
            self.pos, self.counts = {}, {}
        elif state and state["epoch"] == epoch and state["batches"] == batches:
            if state["workers"] != self.dataset.workers:
                raise UserError(f"the checkpoint stopped mid-epoch with --workers {state['workers']}; resume with the "
                                f"same number (each worker's share of the shards depends on it)")
            self.pos = {int(r): p for r, p in state["pos"].items()}
        else:           # no saved position: assume no bad sample before it (exact only then)
            W = self.dataset.workers
            self.pos = {r: len(range(r, batches, W)) * self.batch_size for r in range(W)}
            log.warning("resuming the shard stream at batch %d of epoch %d without a saved position: exact only if "
                        "no sample was skipped before it", batches, epoch)
        self.dataset.epoch = epoch
        self.dataset.start = {"batches": batches, "pos": dict(self.pos), "counts": dict(self.counts)}

    def __iter__(self):
        # its own generator: starting an epoch (or a resume) must not draw from the global RNG that
        # dropout, masking and negative sampling use (the workers' seeds are not used by the stream)
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.workers,
                            pin_memory=torch.cuda.is_available(), persistent_workers=False,
                            generator=torch.Generator().manual_seed(self.dataset.seed),
                            worker_init_fn=ignore_preemption_signals)
        for batch, meta in loader:
            if meta[0] == "error":
                raise UserError(meta[1])
            role, position, counts = meta
            self.pos[role], self.counts[role] = position, counts
            self.batches += 1
            yield batch

    def state_dict(self):
        return {"epoch": self.epoch, "batches": self.batches, "workers": self.dataset.workers,
                "pos": {str(r): p for r, p in self.pos.items()},
                "counts": {str(r): dict(c) for r, c in self.counts.items()}, "finished": dict(self.finished)}

    def load_state_dict(self, state):
        """A checkpoint's state; the next set_epoch() continues from it if it names the same position."""
        if state:
            self.loaded, self.epoch = state, state["epoch"]
            self.counts = {int(r): c for r, c in state["counts"].items()}
            self.finished = collections.Counter(state["finished"])

    def stats(self):
        """{data_skipped_<kind>: count} over all ranks since the run began (`data_shards_reread` for
        re-read rounds, `data_shards_shared` for shard reads shared by every worker because there are
        fewer shards than ranks x workers). A collective: every rank calls it."""
        total = collections.Counter(self.finished)
        for c in self.counts.values():
            total.update(c)
        values = dist.host_sum([total[k] for k in COUNTS])
        return {STAT_NAMES.get(k, f"data_skipped_{k}"): v for k, v in zip(COUNTS, values)}
