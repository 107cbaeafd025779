"""What the published weights were trained and evaluated with, from the data side: each method's
official text processing (ALBEF's and BLIP's pre_caption, LAVIS's blip_caption / blip_question,
open_clip's tokenizer cleaning), its training transform at the paper presets (crop scale, flip,
RandomAugment), and the first token of a BERT tokenizer's rows. Expected texts are written by hand
from the official regular expressions."""
import importlib.util
import os
import types

import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

import albef_train
import blip2_train
import blip_train
import clip_train
import coca_train
from common import data
from common.data import (Example, RandomAugment, Tokenizer, clean_open_clip, contrastive_data, pre_caption_albef,
                         pre_caption_blip, pre_question_blip, train_transform)

# ---- text ----

WORDS40 = " ".join(f"w{i}" for i in range(40))


@pytest.mark.parametrize("text, want", [
    ("A Man's dog-walker, running to the park!!  ", "a mans dog walker running to the park"),
    ("<person> rides a bike/scooter.", "person rides a bike scooter"),
    ("Hello;World", "helloworld"),                             # deleted, not replaced by a space
    ("a (big) #1 dog: ~yes~", "a big 1 dog yes"),
    ("two  \t dogs\n", "two dogs"),
    ("one\ttab", "one\ttab"),                                  # a single whitespace character stays
    (WORDS40, " ".join(f"w{i}" for i in range(30))),
])
def test_albef_pre_caption(text, want):
    assert pre_caption_albef(text, 30) == want


@pytest.mark.parametrize("text, want", [
    ("A Man's dog-walker, running to the park!!  ", "a man's dog-walker, running to the park"),
    ("<person> rides a bike/scooter.", "<person> rides a bike/scooter"),
    ("Hello;World", "hello world"),                            # replaced by a space
    ("a (big) #1 dog: ~yes~", "a big 1 dog yes"),
    ("three shapes on a black background: a red circle",
     "three shapes on a black background a red circle"),
    ("two  \t dogs\n", "two dogs"),
    (WORDS40, " ".join(f"w{i}" for i in range(30))),
])
def test_blip_pre_caption_is_lavis_blip_caption(text, want):
    assert pre_caption_blip(text, 30) == want
    assert pre_caption_blip(WORDS40) == " ".join(f"w{i}" for i in range(40))     # LAVIS's 50 words


@pytest.mark.parametrize("text, want", [
    ("What colour is the triangle?", "what colour is the triangle?"),   # '?' is not in BLIP's class
    ("How many  people are there. ", "how many  people are there"),     # inner spaces stay
    ("Is it a dog (or cat)!", "is it a dog or cat"),
    ("  Leading spaces stay", "  leading spaces stay"),
    ("a b c d", "a b c"),
])
def test_blip_pre_question_is_lavis_blip_question(text, want):
    assert pre_question_blip(text, 3 if text == "a b c d" else 50) == want


MOJIBAKE = "The Mona Lisa doesn\u00c3\u00a2\u00e2\u201a\u00ac\u00e2\u201e\u00a2t have eyebrows."
CLEAN_CASES = ["  A&amp;amp;B\n\tCAF\u00c9  ", "&lt;b&gt;Bold&lt;/b&gt;   text", MOJIBAKE,
               "Plain Caption.", "two\u00a0spaces\u2003here", "\ufb01ne ligature"]


def test_open_clip_cleaning():
    assert clean_open_clip("  A&amp;amp;B\n\tCAF\u00c9  ") == "a&b caf\u00e9"
    assert clean_open_clip("&lt;b&gt;Bold&lt;/b&gt;   text") == "<b>bold</b> text"


def open_clip_tokenizer_module():
    """open_clip's tokenizer.py on its own (importing the package takes ~10 s: torch, timm, ...)."""
    spec = importlib.util.find_spec("open_clip")
    pytest.importorskip("ftfy")
    if spec is None:
        pytest.skip("open_clip is not installed")
    path = os.path.join(spec.submodule_search_locations[0], "tokenizer.py")
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location("oc_tokenizer", path))
    module.__spec__.loader.exec_module(module)
    return module


def test_open_clip_cleaning_equals_open_clips_own():
    tokenizer = open_clip_tokenizer_module()
    theirs = getattr(tokenizer, "_clean_lower",
                     lambda x: tokenizer.whitespace_clean(tokenizer.basic_clean(x)).lower())
    for text in CLEAN_CASES:
        assert clean_open_clip(text) == theirs(text), text
    assert clean_open_clip(MOJIBAKE) == "the mona lisa doesn't have eyebrows."     # ftfy's repair
    # --text-clean whitespace: open_clip's HFTokenizer default, the case kept
    whitespace = getattr(tokenizer, "_clean_whitespace",
                         lambda x: tokenizer.whitespace_clean(tokenizer.basic_clean(x)))
    for text in CLEAN_CASES:
        assert data.open_clip_cleaner("whitespace")(text) == whitespace(text), text
    assert data.open_clip_cleaner("whitespace")("A  Dog") == "A Dog"
    assert data.open_clip_cleaner("lower") is clean_open_clip
    with pytest.raises(data.UserError, match="--text-clean 'upper'"):
        data.open_clip_cleaner("upper")


def test_open_clip_cleaning_without_ftfy(monkeypatch):
    monkeypatch.setattr(data, "ftfy", None)
    assert clean_open_clip("  A&amp;amp;B\n\tCAF\u00c9  ") == "a&b caf\u00e9"   # the rest done
    assert clean_open_clip(MOJIBAKE) == MOJIBAKE.lower()                         # mojibake left


class Stop(Exception):
    pass


class SpyTokenizer:
    """Records the texts an evaluation tokenizes, then stops it (no model needed)."""

    def __init__(self):
        self.texts = None

    def __call__(self, texts, context_length):
        self.texts = list(texts)
        raise Stop


def stub_model():
    return types.SimpleNamespace(training=False, eval=lambda: None, train=lambda mode=True: None)


RAW = [{"image": "x.png", "captions": ["A Red, circle: Left!", "Two  dogs."], "image_id": 0}]


@pytest.mark.parametrize("module, words, want", [
    (albef_train, 30, ["a red circle left", "two dogs"]),
    (blip_train, 30, ["a red, circle left", "two dogs"]),
    (blip2_train, 50, ["a red, circle left", "two dogs"]),
])
def test_scripts_process_captions_in_training_and_evaluation(module, words, want, tiny):
    cfg = module.Config(workers=0)
    assert cfg.max_words == words
    assert module.caption_text(cfg)(WORDS40).split() == WORDS40.split()[:words]
    tok = Tokenizer(os.path.join(tiny, "tokenizer"))
    loader = module.build_data(cfg, tok, 0, 1)[0]
    example = loader.dataset.example                         # training: the annotation file's pairs
    assert [example.text(c) for c in RAW[0]["captions"]] == want
    _, ids = example(Image.new("RGB", (8, 8)), RAW[0], 0, 1)
    assert ids.tolist() == tok(want[0], cfg.max_length)[0].tolist()
    spy, device = SpyTokenizer(), torch.device("cpu")         # evaluation: retrieval texts
    evaluate = module.evaluate if module is blip2_train else module.evaluate_retrieval
    with pytest.raises(Stop):
        evaluate(stub_model(), cfg, RAW, spy, device, "fp32")
    assert spy.texts == want
    if module is not blip_train:                        # ALBEF's MLM and BLIP-2's ITG accuracy
        spy = SpyTokenizer()
        with pytest.raises(Stop):
            (module.evaluate_mlm if module is albef_train else module.evaluate_itg)(
                stub_model(), cfg, RAW, spy, device, "fp32", tokens=torch.zeros(1))
        assert spy.texts == want


def test_blip_caption_prompt_goes_before_the_processed_caption(tiny):
    cfg = blip_train.Config(workers=0, task="caption")
    tok = Tokenizer(os.path.join(tiny, "tokenizer"))
    example = blip_train.build_data(cfg, tok, 0, 1)[0].dataset.example
    _, ids = example(Image.new("RGB", (8, 8)), {"captions": ["A Red circle."]}, 0, 1)
    assert ids.tolist() == tok("a picture of a red circle", cfg.max_length)[0].tolist()


def test_blip2_sends_questions_and_captions_as_lavis(tiny, tmp_path, monkeypatch):
    """Zero-shot VQA: the question through blip_question, then --vqa-prompt; stage-2 captions
    through blip_caption (the tiny set's VQA answers as they are)."""
    prompts = []

    def generate_texts(model, cfg, paths, texts, *args):
        prompts.extend(texts)
        raise Stop
    monkeypatch.setattr(blip2_train, "generate_texts", generate_texts)
    cfg = blip2_train.Config(stage=2, task="vqa", output_dir=str(tmp_path), workers=0)
    questions = [{"image": "x.png", "question": "What Colour is the triangle?", "question_id": 1,
                  "answers": ["red"] * 10}]
    with pytest.raises(Stop):
        blip2_train.evaluate_vqa(None, cfg, questions, None, torch.device("cpu"), "fp32")
    assert prompts == ["Question: what colour is the triangle? Short answer:"]
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(os.path.join(tiny, "tokenizer_llm"))
    cfg = blip2_train.Config(stage=2, workers=0)
    loader = blip2_train.build_data_stage2(cfg, tok, True, 0, 1)[0]
    encode = loader.dataset.example.encode
    end = blip2_train.end_ids(cfg, tok, True)
    assert encode({"captions": ["A Red circle."]}, 0, 1) == \
        blip2_train.llm_example(tok, "", "a red circle", cfg.max_length, True, end)
    # the tiny set's VQA questions mixed into training go through blip_question too
    image = loader.dataset.records[0]["image"]
    monkeypatch.setattr(blip2_train, "read_vqa", lambda *args: [dict(questions[0], image=image)])
    records = blip2_train.build_data_stage2(cfg, tok, True, 0, 1)[0].dataset.records
    assert records[-1]["prompt"] == "Question: what colour is the triangle? Short answer:"
    assert records[-1]["captions"] == ["red"]


@pytest.mark.parametrize("module", [clip_train, coca_train])
def test_clip_and_coca_tokenizers_clean_as_open_clip(module, tmp_path, monkeypatch):
    seen = {}

    def load_tokenizer(*args, **kwargs):
        seen.update(kwargs)
        raise Stop
    monkeypatch.setattr(module, "load_tokenizer", load_tokenizer)
    with pytest.raises(Stop):
        module.main(["--output-dir", str(tmp_path)])
    assert seen["clean"] is clean_open_clip
    with pytest.raises(Stop):                                     # a case-sensitive vocabulary
        module.main(["--output-dir", str(tmp_path), "--text-clean", "whitespace"])
    assert seen["clean"]("A  Dog") == "A Dog"


def test_tokenizer_cleans_every_text(tiny):
    tok = Tokenizer(os.path.join(tiny, "tokenizer"), clean=clean_open_clip)
    plain = Tokenizer(os.path.join(tiny, "tokenizer"))
    assert tok(["A&amp;amp;red   circle"], 8).tolist() == plain(["a&red circle"], 8).tolist()


# ---- the first token ----

def bert_folder(path, bos=None):
    """A BERT WordPiece tokenizer saved as LAVIS's init_tokenizer leaves bert-base-uncased (and
    transformers' BLIP-2 conversion saves it): bos_token [DEC]."""
    from transformers import BertTokenizerFast
    os.makedirs(path, exist_ok=True)
    vocab = os.path.join(path, "vocab.txt")
    with open(vocab, "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle", ""]))
    tok = BertTokenizerFast.from_pretrained(path)          # from vocab.txt (transformers 4 and 5)
    if bos:
        tok.add_special_tokens({"bos_token": bos})
    tok.save_pretrained(path)
    return path


def test_bert_rows_start_with_cls_even_when_bos_is_dec(tmp_path, tiny):
    tok = Tokenizer(bert_folder(str(tmp_path / "lavis"), bos="[DEC]"))
    t = tok.tok
    assert t.bos_token == "[DEC]"
    row = tok(["a red circle"], 8)[0].tolist()
    assert row[:5] == [2, 5, 6, 7, 3]                          # [CLS] a red circle [SEP]
    assert tok.bos_id == t.cls_token_id == 2 and t.convert_tokens_to_ids("[DEC]") == 8
    # BLIP-2's [DEC] is the same token (not a new one) and only ITG rows start with it
    model = blip2_train.build_blip2(blip2_train.Config(), tok)
    assert model.dec_id == 8 and tok.vocab_size == 9
    plain = Tokenizer(bert_folder(str(tmp_path / "plain")))
    assert plain(["a red circle"], 8).tolist() == [row]
    llm = Tokenizer(os.path.join(tiny, "tokenizer_llm"))     # GPT-style: bos/eos, no CLS/SEP
    assert llm(["a red circle"], 8)[0, 0] == llm.tok.bos_token_id == llm.bos_id


# ---- training transforms ----

# ALBEF's and BLIP's list (dataset/__init__.py, data/__init__.py; LAVIS's blip_image_train)
OFFICIAL_OPS = {"Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness", "ShearX",
                "ShearY", "TranslateX", "TranslateY", "Rotate"}
BICUBIC = v2.InterpolationMode.BICUBIC


def describe(transform):
    out = []
    for op in transform.transforms:
        if isinstance(op, v2.RandomResizedCrop):
            out.append(("crop", tuple(op.size), tuple(op.scale), op.interpolation))
        elif isinstance(op, v2.RandomHorizontalFlip):
            out.append(("flip", op.p))
        elif isinstance(op, RandomAugment):
            assert set(op.ops) == OFFICIAL_OPS and len(op.ops) == 10
            out.append(("randaugment", op.num_ops, op.magnitude))
    return out


def preset_transform(module, preset, task, tiny):
    cfg = module.Config(**{**module.PRESETS[preset], "preset": preset})
    cfg.task = task                                            # (CLIP has one task and no field)
    for key, value in (module.task_recipe(cfg) if hasattr(module, "task_recipe") else {}).items():
        setattr(cfg, key, value)
    cfg.workers = 0
    if module is blip2_train and cfg.stage == 2:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(os.path.join(tiny, "tokenizer_llm"))
        loader = module.build_data_stage2(cfg, tok, True, 0, 1)[0]
    else:
        build = contrastive_data if module in (clip_train, coca_train) else module.build_data
        loader = build(cfg, Tokenizer(os.path.join(tiny, "tokenizer")), 0, 1)[0]
    return cfg.image_size, describe(loader.dataset.example.transform)


def crop(size, low):
    return ("crop", (size, size), (low, 1.0), BICUBIC)


TINY = [crop(64, 0.9)]          # open_clip's light crop, no flip: tiny captions say left and right
FLIP, RA7, RA5 = ("flip", 0.5), ("randaugment", 2, 7), ("randaugment", 2, 5)
PAPER = [   # (module, preset, task, the official transform but for the size)
    (albef_train, "vit-b", "pretrain", [0.2, FLIP, RA7]),     # ALBEF's pretrain_transform
    (albef_train, "vit-b", "retrieval", [0.5, FLIP, RA7]),    # its train_transform
    (blip_train, "vit-b", "pretrain", [0.2, FLIP, RA5]),      # pretrain.py's min_scale 0.2
    (blip_train, "vit-l", "pretrain", [0.2, FLIP, RA5]),
    (blip_train, "vit-b", "retrieval", [0.5, FLIP, RA5]),
    (blip_train, "vit-b", "caption", [0.5, FLIP, RA5]),
    (blip2_train, "vit-g", "pretrain", [0.5, FLIP]),          # blip2_image_train
    (blip2_train, "vit-l", "retrieval", [0.5, FLIP]),
    (blip2_train, "vit-g-opt2.7b", "pretrain", [0.5, FLIP]),
    (blip2_train, "vit-g-flant5xl", "caption", [0.5, FLIP]),
] + [(m, p, "pretrain", [0.9]) for m in (clip_train, coca_train) for p in m.PRESETS if p != "tiny"]


@pytest.mark.parametrize("module, preset, task, want", PAPER,
                         ids=lambda x: getattr(x, "__name__", str(x)))
def test_paper_presets_build_the_official_train_transform(module, preset, task, want, tiny):
    size, got = preset_transform(module, preset, task, tiny)
    assert got == [crop(size, want[0])] + want[1:]


@pytest.mark.parametrize("module", [albef_train, blip_train, blip2_train, clip_train, coca_train])
def test_tiny_preset_keeps_the_no_flip_crop(module, tiny):
    assert preset_transform(module, "tiny", "pretrain", tiny) == (64, TINY)


def test_random_augment_ops_and_levels():
    """The official level-to-argument rules at ALBEF's M = 7 and BLIP's M = 5, on uint8 images."""
    flat = torch.full((3, 32, 32), 100, dtype=torch.uint8)
    assert RandomAugment(2, 7)._apply("Brightness", flat).unique().tolist() == [136]   # 100 x 1.36
    assert RandomAugment(2, 5)._apply("Brightness", flat).unique().tolist() == [100]   # 1.0 at M 5
    line = torch.zeros((3, 32, 32), dtype=torch.uint8)
    line[:, :, 12] = 255
    moved = RandomAugment(2, 7)._apply("TranslateX", line)
    assert moved[0, 5, :].argmax().item() in (5, 19)                  # 7 pixels either way
    assert (moved[:, :, :7] == 128).all() or (moved[:, :, -7:] == 128).all()   # grey fill
    black = torch.zeros((3, 32, 32), dtype=torch.uint8)
    assert RandomAugment(2, 7)._apply("Rotate", black)[:, 0, 0].tolist() == [128] * 3   # 21 degrees
    stripes = torch.zeros((3, 32, 32), dtype=torch.uint8)
    stripes[:, :, ::4] = 255
    sheared = RandomAugment(2, 7)._apply("ShearX", stripes).float()
    top, bottom = [(sheared[:, r] - stripes[:, r].float()).abs().mean() for r in (0, 31)]
    assert top < 20 < bottom                             # about the top-left corner, as cv2's
    image = Image.effect_noise((48, 48), 60).convert("RGB")
    example = Example(train_transform(32, 0.5, True, 7), encode=lambda record, c, seed: None)
    a, b, c = (example(image, {}, 0, seed)[0] for seed in (3, 3, 4))
    assert a.shape == (3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)   # the seed's


def test_random_augment_draws_two_ops_each_applied_half_the_time(monkeypatch):
    applied = []
    monkeypatch.setattr(RandomAugment, "_apply", lambda self, op, img: applied.append(op) or img)
    torch.manual_seed(0)
    ra, img = RandomAugment(2, 7), torch.zeros((3, 8, 8), dtype=torch.uint8)
    for _ in range(1000):
        ra(img)
    assert set(applied) == OFFICIAL_OPS and 900 < len(applied) < 1100       # 2 draws x p 0.5
