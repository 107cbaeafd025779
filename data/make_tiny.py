"""The built-in tiny dataset: 64x64 pictures of one to three coloured shapes, each with five
compositional captions ("a large red circle to the left of a small blue square"), in the
Karpathy JSON format, plus a zero-shot classification folder, a word-level tokenizer, VQAv2-format
questions about colour, shape, count and position (BLIP-2's VQA), and a second word-level
tokenizer for the tiny language model of BLIP-2's stage 2 (OPT's conventions: </s> begins a text).

Shape must be seen, not only colour: every scene comes in a group of four images that differ
only in the shape of one of its objects (circle, square, triangle, diamond), all in the same
split, each with its own captions. A model that sees colour, size and layout but not shape
cannot tell the four apart. Each shape lies inside its third of the image (with a gap), so
shapes never overlap or touch, and the zero-shot prompts use only words of the captions.

Deterministic (fixed seed) and built in a few seconds with Pillow. Every training script
builds it on first use when no --train-data is given (common.data.tiny_data()).

    python data/make_tiny.py --out /tmp/tiny          # build it by hand

Layout written:
    train.json val.json test.json       [{"image": "images/train_00000.png", "caption": [5 str], "image_id": int}]
    images/*.png
    zeroshot/<colour>_<shape>/*.png, zeroshot/classnames.txt, zeroshot/templates.txt
    tokenizer/                          (a transformers PreTrainedTokenizerFast folder)
    vqa_{train,val}_questions.json      VQAv2 layout ({"questions": [{"question_id", "image_id", "question"}]}),
    vqa_{train,val}_annotations.json    each question with an "image" path too; 10 identical answers each
    tokenizer_llm/                      the tiny language model's tokenizer (BLIP-2 stage 2)

The VQA files and tokenizer_llm come from their own random stream, after everything else: the
images, captions and the first tokenizer are those of version 2.
"""
import argparse
import json
import os
import random

from PIL import Image, ImageDraw

VERSION = 3
SIZE = 64
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 60, 220),
           "yellow": (235, 215, 30), "purple": (140, 40, 170), "orange": (245, 130, 20)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle", "diamond")
RADIUS = {"small": 5, "large": 8}          # half-widths: 11 and 17 pixels across
# Columns 0-20, 21-41, 42-63: a shape keeps one pixel off its column's edges, so shapes in
# neighbouring columns are at least two pixels apart.
COLUMNS = ((0, 20), (21, 41), (42, 63))
GROUP = len(SHAPES)                         # images per scene: one per shape of the swapped object
SPLITS = {"train": 3000, "val": 200, "test": 200}   # multiples of GROUP
ZEROSHOT_PER_CLASS = 10
# Zero-shot prompts are single-shape training captions without the position (a prompt
# ensemble over sizes and backgrounds), so every word of a prompt occurs in training.
ZEROSHOT_TEMPLATES = [f"a {size} {{}} on a {bg} background" for size in RADIUS for bg in BACKGROUNDS]


def draw_shape(draw, shape, cx, cy, r, fill):
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:  # diamond
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)


def where(cx, cy):
    """Coarse position words for a single shape."""
    row = "top" if cy < SIZE / 3 else "bottom" if cy > 2 * SIZE / 3 else "middle"
    col = "left" if cx < SIZE / 3 else "right" if cx > 2 * SIZE / 3 else "center"
    return "center" if (row, col) == ("middle", "center") else f"{row} {col}"


def sample_scene(rng, n):
    """n shapes in distinct columns (left to right), so 'to the left of' is well defined; each
    lies inside its column, so no two overlap."""
    columns = sorted(rng.sample(range(3), n))
    objs = []
    for c in columns:
        size = rng.choice(list(RADIUS))
        r = RADIUS[size]
        lo, hi = COLUMNS[c]
        cx = rng.randint(lo + 1 + r, hi - 1 - r)
        cy = rng.randint(1 + r, SIZE - 2 - r)
        objs.append(dict(shape=rng.choice(SHAPES), colour=rng.choice(list(COLOURS)), size=size, cx=cx, cy=cy))
    return rng.choice(list(BACKGROUNDS)), objs


def scene_group(rng):
    """One scene drawn in GROUP versions: object k takes each shape in turn, all else equal.
    Returned in a random order, so the swapped shape's position in the file says nothing."""
    bg, objs = sample_scene(rng, rng.choice((1, 2, 3)))
    k = rng.randrange(len(objs))
    group = [(bg, [dict(o, shape=shape) if i == k else dict(o) for i, o in enumerate(objs)]) for shape in SHAPES]
    rng.shuffle(group)
    return group


def render(bg, objs):
    img = Image.new("RGB", (SIZE, SIZE), BACKGROUNDS[bg])
    draw = ImageDraw.Draw(img)
    for o in objs:
        draw_shape(draw, o["shape"], o["cx"], o["cy"], RADIUS[o["size"]], COLOURS[o["colour"]])
    return img


def captions(rng, bg, objs):
    """Five paraphrases, each naming every shape's size, colour and kind, and the layout."""
    d = [f"{o['size']} {o['colour']} {o['shape']}" for o in objs]
    if len(objs) == 1:
        pos = where(objs[0]["cx"], objs[0]["cy"])
        options = [f"a {d[0]} on a {bg} background",
                   f"a {d[0]} in the {pos}",
                   f"a {bg} picture with a {d[0]} in the {pos}",
                   f"there is a {d[0]} in the {pos} of a {bg} image",
                   f"one {d[0]} on {bg}",
                   f"a single {d[0]} placed in the {pos}"]
    elif len(objs) == 2:
        options = [f"a {d[0]} to the left of a {d[1]}",
                   f"a {d[1]} to the right of a {d[0]}",
                   f"a {d[0]} and a {d[1]} on a {bg} background",
                   f"two shapes on {bg}: a {d[0]} on the left and a {d[1]} on the right",
                   f"on a {bg} background a {d[1]} is right of a {d[0]}",
                   f"a {d[0]} left of a {d[1]}"]
    else:
        options = [f"a {d[0]}, a {d[1]} and a {d[2]} from left to right",
                   f"three shapes on a {bg} background: a {d[0]}, a {d[1]} and a {d[2]}",
                   f"a {d[1]} between a {d[0]} and a {d[2]}",
                   f"from right to left a {d[2]}, a {d[1]} and a {d[0]}",
                   f"a {d[0]} on the left, a {d[1]} in the middle and a {d[2]} on the right",
                   f"a {bg} image with a {d[0]}, a {d[1]} and a {d[2]}"]
    return rng.sample(options, 5)


def build_tokenizer(texts, out_dir):
    """Word-level tokenizer trained on the captions (lower-cased, punctuation split)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=specials))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(out_dir)


def vqa_questions(rng, bg, objs):
    """Two questions about one scene (colour, shape, count, position), each answer in the form the
    VQAv2 evaluation normalises to (digits, no articles): a unanimous human answer is not normalised."""
    options = [("how many shapes are there?", str(len(objs)))]
    shapes = [o["shape"] for o in objs]
    colours = [o["colour"] for o in objs]
    for o in objs:
        if shapes.count(o["shape"]) == 1:
            options.append((f"what colour is the {o['shape']}?", o["colour"]))
        if colours.count(o["colour"]) == 1:
            options.append((f"what shape is the {o['colour']} one?", o["shape"]))
    if len(objs) == 1:
        options.append((f"where is the {objs[0]['shape']}?", where(objs[0]["cx"], objs[0]["cy"])))
    else:
        options.append(("what colour is the shape on the left?", objs[0]["colour"]))
        options.append(("what shape is on the right?", objs[-1]["shape"]))
    return rng.sample(options, 2)


def write_vqa(out, split, items):
    """VQAv2's two files for one split; items: (image path, image id, [(question, answer)])."""
    questions, annotations = [], []
    for image, image_id, pairs in items:
        for k, (question, answer) in enumerate(pairs):
            qid = image_id * 10 + k
            questions.append({"question_id": qid, "image_id": image_id, "question": question, "image": image})
            annotations.append({"question_id": qid, "image_id": image_id, "question_type": " ".join(question.split()[:2]),
                                "answer_type": "number" if answer.isdigit() else "other",
                                "multiple_choice_answer": answer,
                                "answers": [{"answer": answer, "answer_confidence": "yes", "answer_id": j + 1}
                                            for j in range(10)]})
    meta = {"data_type": "tiny", "data_subtype": split, "task_type": "Open-Ended"}
    with open(os.path.join(out, f"vqa_{split}_questions.json"), "w") as f:
        json.dump({**meta, "questions": questions}, f, indent=0)
    with open(os.path.join(out, f"vqa_{split}_annotations.json"), "w") as f:
        json.dump({**meta, "annotations": annotations}, f, indent=0)


def build_llm_tokenizer(texts, out_dir):
    """The tiny language model's word-level tokenizer, with OPT's conventions: </s> is BOS and EOS
    and begins every text, <pad> pads, and "\n" is a token (BLIP-2 ends OPT captions with it)."""
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    specials = ["<pad>", "<unk>", "</s>"]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=specials))
    tok.add_tokens([AddedToken("\n", normalized=False)])
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", pair="</s> $A $B",
                                                       special_tokens=[("</s>", tok.token_to_id("</s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.save_pretrained(out_dir)


def build(out):
    """Write the whole dataset into `out` (which must not exist yet or be empty)."""
    rng = random.Random(0)
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    all_text = []
    image_id = 0
    scenes_of = {}
    for split, n in SPLITS.items():
        records = []
        scenes = [scene for _ in range(n // GROUP) for scene in scene_group(rng)]
        for i, (bg, objs) in enumerate(scenes):
            rel = f"images/{split}_{i:05d}.png"
            render(bg, objs).save(os.path.join(out, rel))
            caps = captions(rng, bg, objs)
            all_text += caps
            records.append({"image": rel, "caption": caps, "image_id": image_id})
            scenes_of.setdefault(split, []).append((rel, image_id, bg, objs))
            image_id += 1
        with open(os.path.join(out, f"{split}.json"), "w") as f:
            json.dump(records, f, indent=0)
    # Zero-shot classification: one shape per image, class = "<colour> <shape>" (24 classes).
    zs = os.path.join(out, "zeroshot")
    classes = [f"{c} {s}" for c in COLOURS for s in SHAPES]
    for name in classes:
        colour, shape = name.split()
        folder = os.path.join(zs, name.replace(" ", "_"))
        os.makedirs(folder, exist_ok=True)
        for k in range(ZEROSHOT_PER_CLASS):
            bg, objs = sample_scene(rng, 1)
            objs[0].update(colour=colour, shape=shape)
            render(bg, objs).save(os.path.join(folder, f"{k:03d}.png"))
    # Folder order is sorted(dirnames); classnames.txt follows it.
    with open(os.path.join(zs, "classnames.txt"), "w") as f:
        f.write("\n".join(n.replace("_", " ") for n in sorted(c.replace(" ", "_") for c in classes)) + "\n")
    with open(os.path.join(zs, "templates.txt"), "w") as f:
        f.write("\n".join(ZEROSHOT_TEMPLATES) + "\n")
    build_tokenizer(all_text + [t.format(c) for t in ZEROSHOT_TEMPLATES for c in classes],
                    os.path.join(out, "tokenizer"))
    # VQA (BLIP-2 stage 2) from a stream of its own, so that everything above stays as in version 2
    vqa_rng, llm_text = random.Random(1), list(all_text)
    for split in ("train", "val"):
        items = [(rel, i, vqa_questions(vqa_rng, bg, objs)) for rel, i, bg, objs in scenes_of[split]]
        write_vqa(out, split, items)
        llm_text += [f"Question: {q} Short answer: {a}" for _, _, pairs in items for q, a in pairs]
    build_llm_tokenizer(llm_text + ["a photo of"], os.path.join(out, "tokenizer_llm"))
    with open(os.path.join(out, "VERSION"), "w") as f:
        f.write(f"{VERSION}\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    build(parser.parse_args().out)
