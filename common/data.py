"""Image-text data: annotation readers (Karpathy-style JSON, CSV pairs, VQAv2), datasets for
training, retrieval evaluation and zero-shot classification, transforms, tokenizer, sampler, and
the built-in tiny dataset.

Bad input fails early with the file and the entry/line named; with `skip_bad=True` an
unreadable image is replaced by another image's pair and counted in the log instead."""
import csv
import hashlib
import html
import importlib.util
import json
import logging
import math
import multiprocessing
import os
import random
import re
import shutil
import tempfile

import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

try:
    import ftfy          # open_clip's tokenizer repairs mojibake with it; not a dependency here
except ImportError:
    ftfy = None

from . import dist
from .utils import DataLoader, MissingFileError, UserError, ignore_preemption_signals

log = logging.getLogger("data")

# OpenAI CLIP's normalisation (clip.py::_transform), used by CLIP, ALBEF, BLIP and BLIP-2.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ---- the built-in tiny dataset ----

def tiny_root():
    """Where the built-in tiny dataset's versions are built: VLP_TINY_DIR or ~/.cache/vlp-reference."""
    return os.environ.get("VLP_TINY_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "vlp-reference")


def tiny_data(cache_dir=None):
    """Folder of the built-in tiny dataset, built on first use (deterministic, ~2 s).

    Built into a temporary folder and renamed into place, so concurrent ranks or test
    processes never see a half-written copy. Override the location with VLP_TINY_DIR."""
    root = cache_dir or tiny_root()
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
    `[BOS] tokens [EOS] [PAD]...`. BERT-style tokenizers (with CLS and SEP) give [CLS] ... [SEP]
    whatever their bos token: LAVIS's init_tokenizer and transformers' BLIP-2 conversion save
    bert-base-uncased with bos_token [DEC], which only ITG/LM rows start with (the scripts put it
    there). Others (CLIP's BPE, GPT-style) give their bos/eos tokens. Text longer than the context
    is truncated with EOS kept as the last token. `clean` (optional) is applied to every text first:
    open_clip's tokenizer cleaning for CLIP and CoCa (clean_open_clip)."""

    def __init__(self, name_or_path, clean=None):
        from transformers import AutoTokenizer
        self.name, self.clean = name_or_path, clean
        self.tok = AutoTokenizer.from_pretrained(name_or_path)
        t = self.tok
        bert = t.cls_token_id is not None and t.sep_token_id is not None
        self.bos_id = t.cls_token_id if bert or t.bos_token_id is None else t.bos_token_id
        self.eos_id = t.sep_token_id if bert or t.eos_token_id is None else t.eos_token_id
        self.pad_id = t.pad_token_id if t.pad_token_id is not None else 0
        if self.bos_id is None or self.eos_id is None:
            raise UserError(f"tokenizer {name_or_path} has neither bos/eos nor cls/sep tokens")
        self.vocab_size = len(t)

    def __call__(self, texts, context_length):
        if isinstance(texts, str):
            texts = [texts]
        if self.clean is not None:
            texts = [self.clean(t) for t in texts]
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


def load_tokenizer(name, init_from="", use_tiny=False, clean=None):
    """The run's tokenizer: `name` if given; else the --init-from folder's own tokenizer; else,
    for the built-in data, the tiny set's. Anything else is an error asking for --tokenizer.
    `clean`: applied to every text (Tokenizer)."""
    if name:
        return Tokenizer(name, clean)
    if init_from and os.path.isdir(init_from) and any(os.path.isfile(os.path.join(init_from, f))
                                                      for f in TOKENIZER_FILES):
        return Tokenizer(init_from, clean)
    if use_tiny:
        return Tokenizer(os.path.join(tiny_data(), "tokenizer"), clean)
    raise UserError("no tokenizer: pass --tokenizer (a transformers tokenizer folder or hub name)")


# ---- text processing: each method's official clean-up of captions and questions ----
# Part of how the published weights were trained and evaluated; each script picks its own and
# applies it in training and evaluation (caption references for CIDEr & co. stay as written).

def pre_caption_albef(caption, max_words=30):
    """ALBEF's pre_caption (salesforce/ALBEF dataset/utils.py; 30 words in every dataset there):
    lower case; , . ' ! ? " ( ) * # : ; ~ deleted; - and / become spaces; '<person>' becomes
    'person'; runs of 2+ whitespace become one space; trimmed; the first max_words words."""
    text = re.sub(r"[,.'!?\"()*#:;~]", "", caption.lower())
    text = text.replace("-", " ").replace("/", " ").replace("<person>", "person")
    text = re.sub(r"\s{2,}", " ", text).rstrip("\n").strip(" ")
    return " ".join(text.split(" ")[:max_words])


def pre_caption_blip(caption, max_words=50):
    """BLIP's pre_caption (salesforce/BLIP data/utils.py; its datasets pass 30 words), the same code
    as LAVIS's "blip_caption" processor (lavis/processors/blip_processors.py BlipCaptionProcessor,
    50 words unless the config says otherwise; BLIP-2's configs don't): lower case; . ! " ( ) * # :
    ; ~ become spaces (commas and apostrophes stay); runs of 2+ whitespace become one space;
    trimmed; the first max_words words. LAVIS's prompt is put before it by the script."""
    text = re.sub(r"[.!\"()*#:;~]", " ", caption.lower())
    text = re.sub(r"\s{2,}", " ", text).rstrip("\n").strip(" ")
    return " ".join(text.split(" ")[:max_words])


def pre_question_blip(question, max_words=50):
    """BLIP's pre_question (salesforce/BLIP data/utils.py), the same code as LAVIS's "blip_question"
    processor (BlipQuestionProcessor, 50 words), which BLIP-2's zero-shot VQA configs use: lower
    case; . ! " ( ) * # : ; ~ deleted (a '?' stays); trailing spaces removed; the first max_words
    words. Unlike pre_caption, inner whitespace is left as it is."""
    text = re.sub(r"[.!\"()*#:;~]", "", question.lower()).rstrip(" ")
    return " ".join(text.split(" ")[:max_words])


def clean_open_clip(text):
    """open_clip's tokenizer cleaning (mlfoundations/open_clip tokenizer.py, the default 'lower'
    clean of its SimpleTokenizer, which CLIP's and CoCa's weights were trained with): ftfy.fix_text,
    HTML entities unescaped twice, whitespace runs collapsed to one space, trimmed, lower case.
    ftfy (open_clip's dependency, not ours) is used when it is installed; without it, mojibake and
    odd Unicode are left as they are and the rest is done."""
    return _clean_whitespace(text).lower()


def open_clip_cleaner(kind):
    """`--text-clean`: 'lower' (clean_open_clip) or 'whitespace', the same with the case kept:
    open_clip's default for hub tokenizers (HFTokenizer), for a case-sensitive vocabulary."""
    cleaners = {"lower": clean_open_clip, "whitespace": _clean_whitespace}
    if kind not in cleaners:
        raise UserError(f"--text-clean {kind!r}: expected one of {', '.join(cleaners)}")
    return cleaners[kind]


def run_text_clean(cfg):
    """The run's `--text-clean` function, as open_clip's get_tokenizer applies it: the command
    line's; else an open_clip --init-from folder's own (text_cfg.tokenizer_kwargs.clean; without
    one, 'whitespace' for a folder with hf_tokenizer_name, 'lower' for its SimpleTokenizer); else
    the default. Sets cfg.text_clean, so the run saves and exports the one it used."""
    config = os.path.join(cfg.init_from or "", "open_clip_config.json")
    if cfg.init_from and os.path.isfile(config) and "text_clean" not in getattr(cfg, "explicit_keys", ()):
        with open(config) as f:
            text = json.load(f).get("model_cfg", {}).get("text_cfg", {})
        cfg.text_clean = text.get("tokenizer_kwargs", {}).get("clean", "whitespace" if "hf_tokenizer_name" in text
                                                              else "lower")
        if cfg.text_clean not in ("lower", "whitespace"):
            raise UserError(f"{config}: tokenizer_kwargs.clean {cfg.text_clean!r} is not one we apply (lower, "
                            f"whitespace)")
    return open_clip_cleaner(cfg.text_clean)


def _clean_whitespace(text):
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split())


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
        with open(path, encoding="utf-8-sig") as f:       # -sig: a byte-order mark is skipped
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text: {e}") from None


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
    name): the separator is taken from the header line. UTF-8, with or without the byte-order mark
    that Excel's "CSV UTF-8" export writes."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        try:
            delimiter = "\t" if "\t" in f.readline() else ","
            f.seek(0)
            rows = list(csv.reader(f, delimiter=delimiter))
        except csv.Error as e:
            raise UserError(f"{path} is not valid CSV: {e}") from None
        except UnicodeDecodeError as e:
            raise UserError(f"{path} is not UTF-8 text: {e}") from None
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
    """Open an image (a path, or a file object with `name` for messages) as RGB. Grayscale (8- and
    16-bit) and palette images are converted; transparency is composited on white (a plain convert('RGB') would turn
    transparent pixels black or noise)."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode.startswith("I;16") or (img.mode == "I" and img.getextrema()[1] > 255):
                img = img.point(lambda v: v * (1 / 256)).convert("L")   # 16-bit grey: convert() clips at 255
            if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
                img = img.convert("RGBA")
                canvas = Image.new("RGB", img.size, (255, 255, 255))
                canvas.paste(img, mask=img.getchannel("A"))
                return canvas
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise OSError(f"cannot read image {name or path}: {e}") from None


class RandomAugment(torch.nn.Module):
    """ALBEF's and BLIP's RandAugment variant, RandomAugment(N, M) (salesforce/ALBEF
    dataset/randaugment.py, salesforce/BLIP transform/randaugment.py, LAVIS's copy in
    blip_image_train), written with torchvision ops on a uint8 (3, H, W) image: N ops drawn with
    replacement from `ops`, each applied with probability 0.5, at the fixed level M of 10:
    Brightness / Sharpness factor M/10 * 1.8 + 0.1 (1.0, i.e. none, at BLIP's M = 5), shear
    M/10 * 0.3 about the top-left corner, translation M pixels, rotation M/10 * 30 degrees (those
    three with a random sign, bilinear, grey 128 fill), AutoContrast, Equalize, Identity. Random
    draws come from torch's generator, so Example's per-sample seed fixes them. Checked op by op
    against LAVIS's OpenCV code: equal for AutoContrast, Equalize, Brightness and Translate; shear
    and rotation within bilinear rounding (mean 1/255); Sharpness clamps to 0-255 where the official
    uint8 cast wraps overflowing pixels around (at factors above 1)."""

    OPS = ("Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness", "ShearX", "ShearY",
           "TranslateX", "TranslateY", "Rotate")           # the list both repositories pass
    FILL = [128.0, 128.0, 128.0]

    def __init__(self, num_ops=2, magnitude=7, ops=OPS):
        super().__init__()
        self.num_ops, self.magnitude, self.ops = num_ops, magnitude, tuple(ops)

    def _signed(self, value):
        return -value if torch.rand(()) < 0.5 else value

    def _apply(self, op, img):
        level, bilinear = self.magnitude / 10, v2.InterpolationMode.BILINEAR
        if op in ("Brightness", "Sharpness"):
            fn = TF.adjust_brightness if op == "Brightness" else TF.adjust_sharpness
            return fn(img, level * 1.8 + 0.1)
        # cv2 puts pixel centres at integers, torchvision at half-integers: cv2's point p is p + 0.5
        if op in ("ShearX", "ShearY"):         # cv2's [[1, s, 0], [0, 1, 0]] about (0, 0): -atan(s)
            angle = -math.degrees(math.atan(self._signed(level * 0.3)))
            shear = [angle, 0.0] if op == "ShearX" else [0.0, angle]
            return TF.affine(img, angle=0.0, translate=[0.0, 0.0], scale=1.0, shear=shear,
                             interpolation=bilinear, fill=self.FILL, center=[0.5, 0.5])
        if op in ("TranslateX", "TranslateY"):
            shift = self._signed(float(self.magnitude))
            translate = [shift, 0.0] if op == "TranslateX" else [0.0, shift]
            return TF.affine(img, angle=0.0, translate=translate, scale=1.0, shear=[0.0, 0.0],
                             interpolation=bilinear, fill=self.FILL)
        if op == "Rotate":                     # about cv2's (W / 2, H / 2)
            centre = [img.shape[-1] / 2 + 0.5, img.shape[-2] / 2 + 0.5]
            return TF.rotate(img, self._signed(level * 30), interpolation=bilinear, fill=self.FILL,
                             center=centre)
        return {"AutoContrast": TF.autocontrast, "Equalize": TF.equalize}.get(op, lambda x: x)(img)

    def forward(self, img):
        for k in torch.randint(len(self.ops), (self.num_ops,)).tolist():
            if torch.rand(()) < 0.5:
                img = self._apply(self.ops[k], img)
        return img

    def extra_repr(self):
        return f"num_ops={self.num_ops}, magnitude={self.magnitude}, ops={self.ops}"


def train_transform(size, min_scale=0.9, flip=False, randaugment=0):
    """The training transform: RandomResizedCrop(size, scale (min_scale, 1), bicubic), then an
    optional horizontal flip and RandomAugment(2, randaugment), normalised as CLIP. The defaults are
    open_clip's crop (scale 0.9-1.0, no flip), which CLIP and CoCa use at every preset and the other
    scripts at the tiny preset, whose captions say 'left' and 'right' (a flip would make them
    wrong). The paper presets set the method's own: LAVIS's blip2_image_train (0.5, flip) for
    BLIP-2; BLIP's (0.2 pretraining / 0.5 fine-tuning, flip, RandomAugment(2, 5)); ALBEF's
    (0.2 / 0.5, flip, RandomAugment(2, 7))."""
    crop = v2.RandomResizedCrop(size, scale=(min_scale, 1.0), interpolation=v2.InterpolationMode.BICUBIC,
                                antialias=True)
    ops = [v2.ToImage(), crop]
    ops += [v2.RandomHorizontalFlip()] if flip else []
    ops += [RandomAugment(2, randaugment)] if randaugment else []
    return v2.Compose(ops + [v2.ToDtype(torch.float32, scale=True), v2.Normalize(CLIP_MEAN, CLIP_STD)])


def eval_transform(size, crop=True):
    """CLIP's preprocessing: bicubic resize of the short side, centre crop, normalise. With
    crop=False, BLIP's: resize to size x size (aspect ratio not kept, nothing cut off)."""
    resize = [v2.Resize(size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True), v2.CenterCrop(size)] \
        if crop else [v2.Resize((size, size), interpolation=v2.InterpolationMode.BICUBIC, antialias=True)]
    return v2.Compose([v2.ToImage(), *resize, v2.ToDtype(torch.float32, scale=True), v2.Normalize(CLIP_MEAN, CLIP_STD)])


# ---- datasets ----

class Example:
    """One training example from a decoded image and a caption: (image (3, H, W), text) where text is
    the token ids (L,) of `prefix` + text(caption) (`text`: the method's caption processing, such as
    pre_caption_blip; None: the caption as written) or, with `encode(record, caption index, seed)`,
    its result (BLIP-2's LM texts). With a seed, the augmentation depends on it alone, so a resumed
    run sees exactly the crops an uninterrupted one would. Shared by the annotation-file dataset and
    the shard stream; picklable, for DataLoader workers."""

    def __init__(self, transform, tokenizer=None, context_length=0, prefix="", encode=None, text=None):
        self.transform, self.tokenizer, self.context_length = transform, tokenizer, context_length
        self.prefix, self.encode, self.text = prefix, encode, text

    def __call__(self, image, record, c, seed):
        if seed is not None:
            with torch.random.fork_rng(devices=[]):      # CPU generator only; CUDA's untouched
                torch.default_generator.manual_seed(seed)
                image = self.transform(image)
        else:
            image = self.transform(image)
        if self.encode is not None:
            return image, self.encode(record, c, seed)
        caption = record["captions"][c] if self.text is None else self.text(record["captions"][c])
        return image, self.tokenizer(self.prefix + caption, self.context_length)[0]


class ImageTextDataset(torch.utils.data.Dataset):
    """Training pairs of an annotation file: every (image, caption) pair of the records is one sample
    (as BLIP's COCO loader). Returns (image, text, image id index) with `example` (an `Example`)
    making the first two; image id indices are equal for the captions of one image (image_id_index).

    Keys may be (index, seed, epoch) from `ShardedSampler`: the augmentation then depends only on
    (seed, epoch, index). With skip_bad, a pair whose image is unreadable is replaced by a pair of
    another image, drawn at random (seeded by the key, so a resumed run draws the same): the file's
    other captions then neither cost a decode each nor all go to one neighbour. Each bad file is
    tried, logged and counted once per epoch in each worker (`skipped`: this process's count;
    `bad_files`: all workers', in shared memory, which ShardedSampler.stats() reports)."""

    def __init__(self, records, example, skip_bad=False):
        self.records, self.example, self.skip_bad = records, example, skip_bad
        self.pairs = [(r, c) for r, rec in enumerate(records) for c in range(len(rec["captions"]))]
        self.image_ids = image_id_index(records)
        self.skipped, self.bad, self.epoch = 0, set(), None
        self.bad_files = multiprocessing.Value("q", 0) if skip_bad else None    # DataLoader workers share it

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, key):
        index, seed, epoch = (*key, None, None)[:3] if isinstance(key, tuple) else (key, None, None)
        if epoch != self.epoch:                    # bad files are tried and counted again each epoch
            self.epoch, self.bad = epoch, set()
        r, c = self.pairs[index]
        draw, image = random.Random(f"{seed}/{index}"), None
        for _ in range(len(self.pairs) + len(self.records)):
            if r not in self.bad:
                try:
                    image = load_rgb(self.records[r]["image"])
                    break
                except OSError as e:
                    if not self.skip_bad:
                        raise
                    self.bad.add(r)
                    self.skipped += 1
                    with self.bad_files.get_lock():
                        self.bad_files.value += 1
                    log.warning("%s; its pairs are replaced by other images' this epoch (%d skipped in this "
                                "worker)", e, self.skipped)
            if len(self.bad) == len(self.records):
                break
            r, c = self.pairs[draw.randrange(len(self.pairs))]      # another image, any of its captions
        if image is None:
            raise UserError(f"--skip-bad: none of the {len(self.records)} training images is readable")
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


def eval_image_loader(paths, size, batch_size, workers, crop=False):
    """The images of `paths` in order through eval_transform: resized to size x size without
    cropping (BLIP's and ALBEF's evaluation), or with `crop` CLIP's short-side resize and centre
    crop; `batch_size` at a time, (images, index) batches."""
    return DataLoader(ImageDataset(paths, eval_transform(size, crop=crop)),
                      batch_size=batch_size, num_workers=workers,
                      worker_init_fn=ignore_preemption_signals)


def retrieval_texts(records, text=None):
    """Flatten an evaluation split: texts (each through `text`, the method's caption processing, if
    given), txt2img (image index of each text)."""
    texts, txt2img = [], []
    for i, rec in enumerate(records):
        texts += rec["captions"] if text is None else [text(c) for c in rec["captions"]]
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
    of steps and gathered batches have equal shapes). Yields (index, seed, epoch) keys so that
    augmentations are a function of (seed, epoch, index), and can start `skip` samples into
    the epoch for an exact mid-epoch resume."""

    def __init__(self, n, *, rank=0, world_size=1, seed=0, shuffle=True):
        self.n, self.rank, self.world, self.seed, self.shuffle = n, rank, world_size, seed, shuffle
        self.per_rank = n // world_size
        self.epoch, self.skip = 0, 0
        self.bad_files, self.bad_before = None, 0     # --skip-bad: the dataset's shared count, a resume's

    def set_epoch(self, epoch, skip=0):
        self.epoch, self.skip = epoch, skip

    def __len__(self):
        return self.per_rank - self.skip

    # The same interface as the shard stream (common/shards.py): the position is (epoch, skip),
    # which the training step already determines; the state is the --skip-bad count.
    def state_dict(self):
        return {} if self.bad_files is None else {"bad_image": self.bad_before + self.bad_files.value}

    def load_state_dict(self, state):
        self.bad_before = (state or {}).get("bad_image", 0)

    def stats(self):
        """With --skip-bad, {data_skipped_bad_image: unreadable image files met since the run began}
        (each once per epoch and worker, summed over ranks; batches the workers prefetched included):
        a collective, every rank calls it. Without, {}."""
        if self.bad_files is None:
            return {}
        return {"data_skipped_bad_image": dist.host_sum([self.bad_before + self.bad_files.value])[0]}

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        mine = order[self.rank: self.per_rank * self.world: self.world][self.skip:].tolist()
        for i in mine:
            digest = hashlib.blake2b(f"{self.seed}/{self.epoch}/{i}".encode(), digest_size=8).digest()
            yield i, int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF, self.epoch


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
    sampler.bad_files = train_set.bad_files
    loader = DataLoader(train_set, batch_size=batch_size, sampler=sampler, drop_last=True,
                        num_workers=workers, pin_memory=torch.cuda.is_available(), collate_fn=collate_fn,
                        persistent_workers=workers > 0, generator=torch.Generator().manual_seed(seed),
                        worker_init_fn=ignore_preemption_signals)
    return loader, sampler


def training_records(source, image_root=None, skip_bad=False):
    """What train_loader takes for --train-data: a shard spec as it is, an annotation file's records."""
    from .shards import is_shards
    return source if is_shards(source) else read_annotations(source, image_root, skip_bad)


def contrastive_data(cfg, tokenizer, rank, world_size):
    """CLIP's and CoCa's data: the training loader and sampler (None with --eval-only), the
    retrieval split and the zero-shot set (None without them). With no data flag at all, the
    built-in tiny set (train, val and zero-shot splits). Training images take open_clip's crop
    (scale 0.9-1, bicubic, no flip) at every preset."""
    tiny = None if (cfg.train_data or cfg.val_data or cfg.zeroshot_data) else tiny_data()
    val_file = cfg.val_data or (os.path.join(tiny, "val.json") if tiny else "")
    zs_root = cfg.zeroshot_data or (os.path.join(tiny, "zeroshot") if tiny else "")
    root = cfg.image_root or None
    val = read_annotations(val_file, root) if val_file else None
    zeroshot = image_folder(zs_root) if zs_root else None
    if cfg.eval_only:
        return None, None, val, zeroshot
    train_file = cfg.train_data or os.path.join(tiny_data(), "train.json")
    example = Example(train_transform(cfg.image_size), tokenizer, cfg.context_length)
    records = training_records(train_file, root, cfg.skip_bad)   # an annotation file's, or shards
    loader, sampler = train_loader(records, example, cfg, rank, world_size, train_file)
    return loader, sampler, val, zeroshot


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


# ---- text padding and VQA annotations (BLIP-2) ----

def trim_padding(ids, pad_id):
    """Drop the padding columns no caption of the global batch reaches. Exact: padding is never
    attended to and never a target, and text positions
    start at 0 either way. On the host, before the copy to the GPU; the ranks agree on the length
    (ITM sends token ids between them)."""
    position = torch.arange(1, ids.shape[1] + 1)
    longest = dist.host_max(int(((ids != pad_id) * position).max()) if ids.numel() else 0)
    return ids[:, :max(longest, 2)]


def collate_llm(pad_id):
    """Batches of (image, (ids, labels), image id) padded on the right to the batch's longest:
    images, ids, mask, labels (-100 at padding), image ids."""
    def collate(batch):
        images, texts, r = zip(*batch)
        n, m = max(len(t[0]) for t in texts), max(len(t[1]) for t in texts)
        ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        labels = torch.full((len(batch), m), -100, dtype=torch.long)
        for i, (x, y) in enumerate(texts):
            ids[i, :len(x)], mask[i, :len(x)] = torch.tensor(x), 1
            labels[i, :len(y)] = torch.tensor(y)
        return torch.stack(images), ids, mask, labels, torch.tensor(r)
    return collate


def read_vqa(questions_path, answers_path, image_root=None):
    """VQAv2's two files -> [{"image", "question", "question_id", "answers": [str] * 10}]. The
    image is the entry's "image" path (the tiny split's) or COCO's file name for its image_id and
    the file's data_subtype (val2014/COCO_val2014_000000000042.jpg) under --image-root."""
    def load(path, field):
        data = read_json(path, "VQA file")
        if not isinstance(data, dict) or not isinstance(data.get(field), list):
            raise UserError(f"{path}: expected VQAv2's layout, an object with a '{field}' list")
        return data
    if not answers_path:
        raise UserError("--task vqa: pass --val-answers (VQAv2's annotation file) with --val-data "
                        "(its questions)")
    questions, annotations = load(questions_path, "questions"), load(answers_path, "annotations")
    root = image_root or os.path.dirname(os.path.abspath(questions_path))
    answers = {}
    for i, a in enumerate(annotations["annotations"]):
        try:
            answers[a["question_id"]] = [x["answer"] for x in a["answers"]]
        except (KeyError, TypeError):
            raise UserError(f"{answers_path}, annotation {i}: needs 'question_id' and 'answers' "
                            f"[{{'answer'}}]") from None
    out = []
    for i, q in enumerate(questions["questions"]):
        needs = ("question_id", "image_id", "question")
        if not (isinstance(q, dict) and all(k in q for k in needs)):
            raise UserError(f"{questions_path}, question {i}: needs 'question_id', 'image_id' and "
                            f"'question'")
        if q["question_id"] not in answers:
            raise UserError(f"{questions_path}: question {q['question_id']} has no annotation in "
                            f"{answers_path}")
        subtype = questions.get("data_subtype", "")
        image = q.get("image") or os.path.join(subtype, f"COCO_{subtype}_{q['image_id']:012d}.jpg")
        image = image if os.path.isabs(image) else os.path.join(root, image)
        if not os.path.isfile(image):
            raise MissingFileError(f"{questions_path}, question {q['question_id']}: image file "
                                   f"{image} does not exist")
        out.append({"image": image, "question": q["question"], "question_id": q["question_id"],
                    "answers": answers[q["question_id"]]})
    if not out:
        raise UserError(f"{questions_path}: no questions")
    return out
