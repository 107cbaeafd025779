"""Image-text data: annotation readers (Karpathy-style JSON, CSV pairs), datasets for training,
retrieval evaluation and zero-shot classification, transforms, tokenizer, sampler, and the
built-in tiny dataset.

Bad input fails early with the file and the entry/line named; with `skip_bad=True` an
unreadable image is replaced by the next sample and counted in the log instead."""
import csv
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile

import torch
from PIL import Image
from torchvision.transforms import v2

from .utils import MissingFileError, UserError

log = logging.getLogger("data")

# OpenAI CLIP's normalisation (clip.py::_transform), used by CLIP, ALBEF, BLIP and BLIP-2.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ---- the built-in tiny dataset ----

def tiny_data(cache_dir=None):
    """Folder of the built-in tiny dataset, built on first use (deterministic, ~2 s).

    Built into a temporary folder and renamed into place, so concurrent ranks or test
    processes never see a half-written copy. Override the location with VLP_TINY_DIR."""
    root = cache_dir or os.environ.get("VLP_TINY_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "vlp-reference")
    spec = importlib.util.spec_from_file_location(
        "make_tiny", os.path.join(os.path.dirname(__file__), "..", "data", "make_tiny.py"))
    make_tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_tiny)
    out = os.path.join(root, f"tiny-v{make_tiny.VERSION}")
    if not os.path.isfile(os.path.join(out, "VERSION")):
        os.makedirs(root, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=root, prefix=".building-")
        make_tiny.build(tmp)
        try:
            os.replace(tmp, out)
        except OSError:  # another process finished first; its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    return out


# ---- tokenizer ----

class Tokenizer:
    """Any `transformers` tokenizer (a folder or a hub name) producing fixed-length rows
    `[BOS] tokens [EOS] [PAD]...`. BOS/EOS are the tokenizer's bos/eos tokens, or CLS/SEP for
    BERT-style ones. Text longer than the context is truncated with EOS kept as the last token."""

    def __init__(self, name_or_path):
        from transformers import AutoTokenizer
        self.name = name_or_path
        self.tok = AutoTokenizer.from_pretrained(name_or_path)
        t = self.tok
        self.bos_id = t.bos_token_id if t.bos_token_id is not None else t.cls_token_id
        self.eos_id = t.eos_token_id if t.eos_token_id is not None else t.sep_token_id
        self.pad_id = t.pad_token_id if t.pad_token_id is not None else 0
        if self.bos_id is None or self.eos_id is None:
            raise UserError(f"tokenizer {name_or_path} has neither bos/eos nor cls/sep tokens")
        self.vocab_size = len(t)

    def __call__(self, texts, context_length):
        if isinstance(texts, str):
            texts = [texts]
        rows = self.tok(list(texts), add_special_tokens=False)["input_ids"]
        out = torch.full((len(rows), context_length), self.pad_id, dtype=torch.long)
        for i, ids in enumerate(rows):
            ids = [self.bos_id] + ids[: context_length - 2] + [self.eos_id]
            out[i, : len(ids)] = torch.tensor(ids)
        return out

    def decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=True)

    def add_special_tokens(self, tokens):
        """Add tokens (e.g. BLIP's [DEC], [ENC]) unless the vocabulary has them; returns their ids."""
        missing = [t for t in tokens if t not in self.tok.get_vocab()]
        if missing:
            self.tok.add_special_tokens({"additional_special_tokens": missing})
        self.vocab_size = len(self.tok)
        return [self.tok.convert_tokens_to_ids(t) for t in tokens]


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt")


def load_tokenizer(name, init_from="", use_tiny=False):
    """The run's tokenizer: `name` if given; else the --init-from folder's own tokenizer; else,
    for the built-in data, the tiny set's. Anything else is an error asking for --tokenizer."""
    if name:
        return Tokenizer(name)
    if init_from and os.path.isdir(init_from) and any(os.path.isfile(os.path.join(init_from, f))
                                                      for f in TOKENIZER_FILES):
        return Tokenizer(init_from)
    if use_tiny:
        return Tokenizer(os.path.join(tiny_data(), "tokenizer"))
    raise UserError("no tokenizer: pass --tokenizer (a transformers tokenizer folder or hub name)")


# ---- annotations ----

def _check_caption(cap, where, skip_bad, counter):
    if not isinstance(cap, str):
        raise UserError(f"{where}: caption must be a string, got {type(cap).__name__}")
    if not cap.strip():
        if skip_bad:
            counter[0] += 1
            return None
        raise UserError(f"{where}: empty caption (pass --skip-bad to skip such captions)")
    return cap.strip()


def read_json(path, what):
    """A JSON file; a missing file or invalid JSON is an error naming the file (`what`: how the
    message calls it) and, for JSON, the line and column."""
    if not os.path.isfile(path):
        raise MissingFileError(f"{what} {path} does not exist")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None


def read_annotations(path, image_root=None, skip_bad=False):
    """Records [{"image": abs path, "captions": [str], "image_id": id}] from
    - JSON: [{"image": path, "caption": str or [str], "image_id": optional}] (Karpathy / BLIP), or
    - CSV with a header naming `image,caption` (or open_clip's `filepath,title`), one pair per row;
      rows of the same image are merged.
    Relative image paths are taken from `image_root` (default: the annotation file's folder).
    Every image is checked to exist; a missing one is an error naming it and its entry/line."""
    root = image_root or os.path.dirname(os.path.abspath(path))
    empty = [0]
    if path.endswith(".csv") or path.endswith(".tsv"):
        if not os.path.isfile(path):
            raise MissingFileError(f"annotation file {path} does not exist")
        entries = _read_csv(path)
    else:
        data = read_json(path, "annotation file")
        if not isinstance(data, list):
            raise UserError(f"{path}: expected a JSON list of {{'image', 'caption'}} objects")
        entries = []
        for i, item in enumerate(data):
            where = f"{path}, entry {i}"
            for field in ("image", "caption"):
                if not isinstance(item, dict) or field not in item:
                    raise UserError(f"{where}: missing field '{field}'")
            caps = item["caption"] if isinstance(item["caption"], list) else [item["caption"]]
            entries.append((where, item["image"], caps, item.get("image_id")))
    records, by_image = [], {}
    for where, image, caps, image_id in entries:
        caps = [c for c in (_check_caption(c, where, skip_bad, empty) for c in caps) if c is not None]
        full = image if os.path.isabs(image) else os.path.join(root, image)
        if full in by_image:                       # the same image listed again: merge captions
            by_image[full]["captions"] += caps
            continue
        if not os.path.isfile(full):
            raise MissingFileError(f"{where}: image file {full} does not exist")
        rec = {"image": full, "captions": caps, "image_id": image_id if image_id is not None else image}
        by_image[full] = rec
        records.append(rec)
    if empty[0]:
        log.warning("%s: skipped %d empty caption(s)", path, empty[0])
    records = [r for r in records if r["captions"]]
    if not records:
        raise UserError(f"{path}: no image-caption pairs")
    return records


def image_id_index(records):
    """Each record's image id as an integer, (N,): positives in retrieval fine-tuning, exclusions for
    ITM negatives. An entry without "image_id" has its image path as id (read_annotations), so the
    captions of one image share it."""
    ids = {}
    return torch.tensor([ids.setdefault(r["image_id"], len(ids)) for r in records])


def _read_csv(path):
    """Comma- or tab-separated (FlagAI's and open_clip's pairs.csv are tab-separated despite the
    name): the separator is taken from the header line."""
    with open(path, newline="") as f:
        delimiter = "\t" if "\t" in f.readline() else ","
        f.seek(0)
        try:
            rows = list(csv.reader(f, delimiter=delimiter))
        except csv.Error as e:
            raise UserError(f"{path} is not valid CSV: {e}") from None
    if not rows:
        raise UserError(f"{path} is empty")
    header = [h.strip() for h in rows[0]]
    cols = {}
    for field, alias in (("image", "filepath"), ("caption", "title")):
        name = field if field in header else alias if alias in header else None
        if name is None:
            raise UserError(f"{path}: header {header} lacks the '{field}' column")
        cols[field] = header.index(name)
    entries = []
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != len(header):
            raise UserError(f"{path}, line {line}: {len(row)} fields, the header has {len(header)}")
        entries.append((f"{path}, line {line}", row[cols["image"]], [row[cols["caption"]]], None))
    return entries


# ---- images and transforms ----

def load_rgb(path, name=None):
    """Open an image (a path, or a file object with `name` for messages) as RGB. Grayscale and palette
    images are converted; transparency is composited on white (a plain convert('RGB') would turn
    transparent pixels black or noise)."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
                img = img.convert("RGBA")
                canvas = Image.new("RGB", img.size, (255, 255, 255))
                canvas.paste(img, mask=img.getchannel("A"))
                return canvas
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise OSError(f"cannot read image {name or path}: {e}") from None


def train_transform(size):
    """open_clip's training crop (RandomResizedCrop, scale 0.9-1.0, bicubic); no flips, since
    captions say 'left' and 'right'."""
    return v2.Compose([v2.ToImage(), v2.RandomResizedCrop(size, scale=(0.9, 1.0), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(CLIP_MEAN, CLIP_STD)])


def eval_transform(size, crop=True):
    """CLIP's preprocessing: bicubic resize of the short side, centre crop, normalise. With
    crop=False, BLIP's: resize to size x size (aspect ratio not kept, nothing cut off)."""
    resize = [v2.Resize(size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True), v2.CenterCrop(size)] \
        if crop else [v2.Resize((size, size), interpolation=v2.InterpolationMode.BICUBIC, antialias=True)]
    return v2.Compose([v2.ToImage(), *resize, v2.ToDtype(torch.float32, scale=True), v2.Normalize(CLIP_MEAN, CLIP_STD)])


# ---- datasets ----

class Example:
    """One training example from a decoded image and a caption: (image (3, H, W), text) where text is
    the caption's token ids (L,) or, with `encode(record, caption index, seed)`, its result (BLIP-2's
    LM texts). With a seed, the augmentation depends on it alone, so a resumed run sees exactly the
    crops an uninterrupted one would. Shared by the annotation-file dataset and the shard stream;
    picklable, for DataLoader workers."""

    def __init__(self, transform, tokenizer=None, context_length=0, prefix="", encode=None):
        self.transform, self.tokenizer, self.context_length = transform, tokenizer, context_length
        self.prefix, self.encode = prefix, encode

    def __call__(self, image, record, c, seed):
        if seed is not None:
            with torch.random.fork_rng(devices=[]):      # CPU generator only; CUDA's untouched
                torch.default_generator.manual_seed(seed)
                image = self.transform(image)
        else:
            image = self.transform(image)
        if self.encode is not None:
            return image, self.encode(record, c, seed)
        return image, self.tokenizer(self.prefix + record["captions"][c], self.context_length)[0]


class ImageTextDataset(torch.utils.data.Dataset):
    """Training pairs of an annotation file: every (image, caption) pair of the records is one sample
    (as BLIP's COCO loader). Returns (image, text, image id index) with `example` (an `Example`)
    making the first two; image id indices are equal for the captions of one image (image_id_index).

    Keys may be (index, seed) from `ShardedSampler`: the augmentation then depends only on
    (seed, epoch, index). With skip_bad, an unreadable image is replaced by the next sample and
    counted in the log."""

    def __init__(self, records, example, skip_bad=False):
        self.records, self.example, self.skip_bad = records, example, skip_bad
        self.pairs = [(r, c) for r, rec in enumerate(records) for c in range(len(rec["captions"]))]
        self.image_ids = image_id_index(records)
        self.skipped = 0

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        for attempt in range(len(self)):
            r, c = self.pairs[(index + attempt) % len(self)]
            try:
                image = load_rgb(self.records[r]["image"])
                break
            except OSError as e:
                if not self.skip_bad:
                    raise
                self.skipped += 1
                log.warning("%s; using the next sample instead (%d skipped in this worker)", e, self.skipped)
        image, text = self.example(image, self.records[r], c, seed)
        return image, text, self.image_ids[r]


class ImageDataset(torch.utils.data.Dataset):
    """Images only (evaluation): returns (image, index)."""

    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.transform(load_rgb(self.paths[i])), i


def retrieval_texts(records):
    """Flatten an evaluation split: texts, txt2img (image index of each text)."""
    texts, txt2img = [], []
    for i, rec in enumerate(records):
        texts += rec["captions"]
        txt2img += [i] * len(rec["captions"])
    return texts, torch.tensor(txt2img)


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _read_lines(path):
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def _is_wnid(name):
    """A WordNet noun id as ImageNet names its class folders: 'n' and 8 digits (n01440764)."""
    return len(name) == 9 and name[0] == "n" and name[1:].isdigit()


def imagenet_classnames(folders, root):
    """OpenAI's 1,000 curated ImageNet class names (CLIP's notebooks, open_clip's
    zero_shot_metadata.IMAGENET_CLASSNAMES) for the 1,000 wnid folders of ImageNet-1k,
    checked against the shipped wnid list (sorted wnids = the standard class index)."""
    here = os.path.dirname(os.path.abspath(__file__))
    wnids = _read_lines(os.path.join(here, "imagenet_wnids.txt"))
    known = set(wnids)
    for d in folders:
        if d not in known:
            raise UserError(f"{root}: class folder {d} is not one of the 1,000 ImageNet-1k wnids; "
                             "add a classnames.txt (one name per line, in sorted folder order)")
    return _read_lines(os.path.join(here, "imagenet_classnames.txt"))


def image_folder(root):
    """Zero-shot classification folder `root/<class>/<image>` (ImageNet's val layout).
    Returns (paths, labels, classnames, templates). Class names come from `classnames.txt`
    (one per line, in sorted folder order) if present; else, for exactly 1,000 wnid-named
    folders (ImageNet-1k after valprep.sh), OpenAI's ImageNet class names shipped beside this
    file; else the folder names. Prompt templates from `templates.txt` if present, else
    OpenAI's 80 ImageNet templates."""
    if not os.path.isdir(root):
        raise MissingFileError(f"zero-shot folder {root} does not exist")
    folders = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not folders:
        raise UserError(f"{root}: no class sub-folders")
    names_file = os.path.join(root, "classnames.txt")
    if os.path.isfile(names_file):
        classnames = _read_lines(names_file)
        if len(classnames) != len(folders):
            raise UserError(f"{names_file}: {len(classnames)} names for {len(folders)} class folders")
    elif len(folders) == 1000 and all(_is_wnid(d) for d in folders):
        classnames = imagenet_classnames(folders, root)
    else:
        if all(_is_wnid(d) for d in folders):
            log.warning("%s: %d wnid-named class folders, not ImageNet-1k's 1,000: the class names are the "
                        "folder names; add a classnames.txt for meaningful prompts", root, len(folders))
        classnames = [d.replace("_", " ") for d in folders]
    tmpl_file = os.path.join(root, "templates.txt")
    if os.path.isfile(tmpl_file):
        templates = _read_lines(tmpl_file)
    else:
        templates = OPENAI_IMAGENET_TEMPLATES
    paths, labels = [], []
    for label, d in enumerate(folders):
        for name in sorted(os.listdir(os.path.join(root, d))):
            if name.lower().endswith(IMAGE_EXTENSIONS):
                paths.append(os.path.join(root, d, name))
                labels.append(label)
    return paths, torch.tensor(labels), classnames, templates


# ---- sampler ----

class ShardedSampler(torch.utils.data.Sampler):
    """Distributed training sampler: a seeded permutation per epoch, split into equal
    per-rank shards (the last incomplete round dropped, so every rank runs the same number
    of steps and gathered batches have equal shapes). Yields (index, seed) keys so that
    augmentations are a function of (seed, epoch, index), and can start `skip` samples into
    the epoch for an exact mid-epoch resume."""

    def __init__(self, n, *, rank=0, world_size=1, seed=0, shuffle=True):
        self.n, self.rank, self.world, self.seed, self.shuffle = n, rank, world_size, seed, shuffle
        self.per_rank = n // world_size
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch, skip=0):
        self.epoch, self.skip = epoch, skip

    def __len__(self):
        return self.per_rank - self.skip

    # The same interface as the shard stream (common/shards.py): the position is (epoch, skip),
    # which the training step already determines, so there is no state to save and no counts.
    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass

    def stats(self):
        return {}

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        mine = order[self.rank: self.per_rank * self.world: self.world][self.skip:].tolist()
        for i in mine:
            digest = hashlib.blake2b(f"{self.seed}/{self.epoch}/{i}".encode(), digest_size=8).digest()
            yield i, int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def train_loader(data, example, cfg, rank, world_size, source, collate_fn=None):
    """(loader, sampler) of the training data: cfg.batch_size per rank, the last incomplete batch
    dropped (cfg: the run's Config; also accum_steps, workers, seed, skip_bad, train_num_samples,
    dataset_resampled).

    `data`: the records of an annotation file (read_annotations), or a webdataset shard spec
    (common.shards: streamed, cfg.train_num_samples per epoch or sizes.json's). `example` (an
    Example) makes (image, text) of an image and caption. The sampler has set_epoch(epoch, skip),
    state_dict(), load_state_dict() and stats() for both kinds.

    The loader has its own seeded generator: starting an epoch (or a resume) must not consume the
    global RNG that dropout, masking and negative sampling use. A global batch larger than the data
    is an error naming `source` (the annotation file)."""
    batch_size, accum_steps, workers, seed = cfg.batch_size, cfg.accum_steps, cfg.workers, cfg.seed
    if accum_steps < 1:
        raise UserError(f"--accum-steps must be at least 1, not {accum_steps}")
    if isinstance(data, str):
        from .shards import ShardLoader
        loader = ShardLoader(data, example, batch_size=batch_size, accum_steps=accum_steps, workers=workers, seed=seed,
                             rank=rank, world_size=world_size, num_samples=cfg.train_num_samples,
                             resampled=cfg.dataset_resampled, collate_fn=collate_fn)
        return loader, loader                  # the loader is its own sampler
    if cfg.train_num_samples or cfg.dataset_resampled:
        raise UserError(f"--train-num-samples and --dataset-resampled apply to webdataset shards; --train-data {source} "
                        f"is an annotation file, whose epoch is its image-caption pairs")
    train_set = ImageTextDataset(data, example, skip_bad=cfg.skip_bad)
    if batch_size * accum_steps * world_size > len(train_set):
        accum = f" x --accum-steps {accum_steps}" if accum_steps > 1 else ""
        raise UserError(f"--batch-size {batch_size}{accum} x {world_size} process(es) is larger than the "
                        f"{len(train_set)} image-caption pairs of {source}; use a smaller --batch-size")
    sampler = ShardedSampler(len(train_set), rank=rank, world_size=world_size, seed=seed)
    loader = torch.utils.data.DataLoader(train_set, batch_size=batch_size, sampler=sampler, drop_last=True,
                                         num_workers=workers, pin_memory=torch.cuda.is_available(), collate_fn=collate_fn,
                                         persistent_workers=workers > 0, generator=torch.Generator().manual_seed(seed))
    return loader, sampler


def training_records(source, image_root=None, skip_bad=False):
    """What train_loader takes for --train-data: a shard spec as it is, an annotation file's records."""
    from .shards import is_shards
    return source if is_shards(source) else read_annotations(source, image_root, skip_bad)


# OpenAI's 80 prompt templates for zero-shot ImageNet (CLIP notebooks / open_clip zero_shot_metadata).
OPENAI_IMAGENET_TEMPLATES = [
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.",
    "a photo of a {}.", "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
    "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.",
    "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.",
]
assert len(OPENAI_IMAGENET_TEMPLATES) == 80
