"""Evaluation metrics with the names of DESIGN.md: retrieval recall@K (percent), zero-shot
top-1/top-5 (percent), captioning scores, VQAv2 accuracy.

Ties count against the model: a candidate scored equal to the ground truth ranks ahead of
it. So a collapsed model that gives every pair the same score gets recall 0, never 100."""
import json
import os
import re

import torch

from . import dist
from .data import ImageDataset, eval_image_loader, eval_transform
from .utils import DataLoader, autocast, ignore_preemption_signals, precision_dtype


def _recall(ranks, ks=(1, 5, 10)):
    return [100.0 * (ranks < k).float().mean().item() for k in ks]


@torch.no_grad()
def retrieval_metrics(sim, txt2img, sim_t2i=None):
    """sim: (n_images, n_texts) scores; txt2img: (n_texts,) index of each text's image
    (an image may have several captions); sim_t2i: (n_texts, n_images) scores for text->image
    when they differ from sim.T (re-ranked retrieval scores each direction separately).

    i2t: an image's rank is the number of other images' captions scoring >= its best caption.
    t2i: a text's rank is the number of other images scoring >= its own image."""
    # NaN (a diverged model) becomes -inf: it then ties with everything and counts as a miss.
    sim = sim.float().cpu().nan_to_num(nan=-float("inf"))
    txt2img = txt2img.cpu()
    sim_t2i = sim.T if sim_t2i is None else sim_t2i.float().cpu().nan_to_num(nan=-float("inf"))
    n_img, n_txt = sim.shape
    is_gt = torch.zeros(n_img, n_txt, dtype=torch.bool)
    is_gt[txt2img, torch.arange(n_txt)] = True
    best_gt = sim.masked_fill(~is_gt, float("-inf")).max(1).values            # (n_img,)
    i2t_ranks = ((sim >= best_gt[:, None]) & ~is_gt).sum(1)
    gt_score = sim_t2i[torch.arange(n_txt), txt2img]                             # (n_txt,)
    t2i_ranks = ((sim_t2i >= gt_score[:, None]) & ~is_gt.T).sum(1)
    i2t, t2i = _recall(i2t_ranks), _recall(t2i_ranks)
    out = {f"i2t_r{k}": v for k, v in zip((1, 5, 10), i2t)}
    out.update({f"t2i_r{k}": v for k, v in zip((1, 5, 10), t2i)})
    out["r_mean"] = sum(i2t + t2i) / 6
    return out


@torch.no_grad()
def zeroshot_metrics(logits, labels):
    """logits: (n_images, n_classes); labels: (n_images,). Top-1 and top-5 accuracy in percent."""
    logits, labels = logits.float().cpu().nan_to_num(nan=-float("inf")), labels.cpu()
    gt = logits.gather(1, labels[:, None])
    others_ahead = (logits >= gt).sum(1) - 1                                     # itself excluded
    top1, top5 = _recall(others_ahead, (1, 5))
    return {"zeroshot_top1": top1, "zeroshot_top5": top5}


@torch.no_grad()
def zeroshot_classifier(encode_text, tokenizer, classnames, templates, context_length, device):
    """(n_classes, D) classifier: per class, the mean of the normalised embeddings of all its
    prompts, re-normalised (CLIP's prompt ensembling; open_clip zero_shot_classifier.py)."""
    weights = []
    for name in classnames:
        ids = tokenizer([t.format(name) for t in templates], context_length).to(device)
        emb = torch.nn.functional.normalize(encode_text(ids).float(), dim=-1).mean(0)
        weights.append(emb / emb.norm())
    return torch.stack(weights, 0)


@torch.no_grad()
def zeroshot_classifier_sharded(encode_text, tokenizer, classnames, templates, context_length, dim, device, precision):
    """zeroshot_classifier with the classes split over the ranks (more ranks than classes: empty
    shards) and gathered in order: (n_classes, dim), the same on every rank."""
    start, end = dist.shard_range(len(classnames))
    classifier = torch.zeros(0, dim, device=device)
    if end > start:
        with autocast(precision, device):
            classifier = zeroshot_classifier(encode_text, tokenizer, classnames[start:end], templates, context_length,
                                             device).float()
    return dist.gather_varlen(classifier)


@torch.no_grad()
def embed_texts(encode_text, texts, tokenize, batch_size, dim, device, precision):
    """(n_texts, dim) embeddings: this rank encodes its contiguous shard of `texts`, `batch_size` at a
    time (tokenize(list of str) -> ids on the host), and the shards are gathered in order."""
    start, end = dist.shard_range(len(texts))
    feats = [torch.zeros(0, dim, device=device)]
    for i in range(start, end, batch_size):
        ids = tokenize(texts[i:min(i + batch_size, end)]).to(device)
        with autocast(precision, device):
            feats.append(encode_text(ids).float())
    return dist.gather_varlen(torch.cat(feats))


def embed_images(encode_image, paths, image_size, batch_size, workers, dim, device, precision):
    """(n_images, dim) embeddings: this rank encodes its contiguous shard of `paths` with CLIP's
    preprocessing (short-side resize, centre crop) in DataLoader workers, and the shards are
    gathered in order; embed_texts's twin for images."""
    start, end = dist.shard_range(len(paths))
    loader = eval_image_loader(paths[start:end], image_size, batch_size, workers, crop=True)
    feats = [torch.zeros(0, dim, device=device)]
    for images, _ in loader:
        with autocast(precision, device):
            feats.append(encode_image(images.to(device)).float())
    return dist.gather_varlen(torch.cat(feats))


@torch.no_grad()
def embed_sharded(encode, start, end, batch_size, dim, device, precision):
    """(n, dim) features gathered over the ranks in rank order: this rank calls encode(i, j) ->
    (j - i, dim) on [start, end), `batch_size` rows at a time, under autocast; fp32."""
    feats = [torch.zeros(0, dim, device=device)]
    for i in range(start, end, batch_size):
        with autocast(precision, device):
            feats.append(encode(i, min(i + batch_size, end)).float())
    return dist.gather_varlen(torch.cat(feats))


def caption_metrics(predictions, references):
    """BLEU-4, METEOR, ROUGE-L and CIDEr with pycocoevalcap (the COCO caption evaluation), after
    its PTB tokenizer. predictions: {image_id: str}; references: {image_id: [str, ...]}.
    SPICE is left out: it downloads Stanford CoreNLP at first use. METEOR starts a JVM (~9 s)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    keys = sorted(predictions, key=str)
    tok = PTBTokenizer()
    res = tok.tokenize({k: [{"caption": predictions[k]}] for k in keys})
    gts = tok.tokenize({k: [{"caption": c} for c in references[k]] for k in keys})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    meteor = Meteor()                    # its JVM exits when the scorer is garbage-collected
    meteor_score, _ = meteor.compute_score(gts, res)
    del meteor
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    return {"bleu4": float(bleu[3]), "meteor": float(meteor_score), "rouge_l": float(rouge), "cider": float(cider)}


def score_captions(mine, records, output_dir=None):
    """Each rank's captions of its contiguous shard of `records`, gathered in rank order, scored
    by caption_metrics on rank 0 (its scores returned on every rank); rank 0 writes captions.json
    ({"image", "image_id", "caption"} per record) into `output_dir` if given."""
    predictions = dict(enumerate(c for part in dist.gather_objects(mine) for c in part))
    references = {i: r["captions"] for i, r in enumerate(records)}
    metrics = caption_metrics(predictions, references) if dist.is_main() else {}
    metrics = dist.gather_objects(metrics)[0]                                # rank 0's everywhere
    if output_dir and dist.is_main():
        with open(os.path.join(output_dir, "captions.json"), "w") as f:
            json.dump([{"image": records[i]["image"], "image_id": records[i]["image_id"],
                        "caption": c} for i, c in predictions.items()], f, indent=1)
    return metrics


# ---- retrieval with ITM re-ranking (ALBEF, BLIP, BLIP-2) ----

@torch.no_grad()
def image_tokens(encode, paths, image_size, batch_size, workers, device, precision):
    """encode(images) -> (b, T, D) for the given image files (a rank's shard of an evaluation
    split), resized to image_size x image_size without cropping (BLIP's and ALBEF's evaluation
    transform), kept in the autocast dtype: they are only read through linear layers that cast to
    it. An empty tensor when `paths` is empty."""
    loader = DataLoader(ImageDataset(paths, eval_transform(image_size, crop=False)),
                        batch_size=batch_size, num_workers=workers,
                        worker_init_fn=ignore_preemption_signals)
    dtype = precision_dtype(precision)   # not get_autocast_dtype outside autocast: CUDA's default is fp16
    out = []
    for images, _ in loader:
        with autocast(precision, device):
            out.append(encode(images.to(device)).to(dtype))
    return torch.cat(out) if out else torch.zeros(0, device=device)


@torch.no_grad()
def rerank_topk(sim, image_range, k, score_pairs, batch, add_similarity):
    """ITC retrieval re-ranked by an ITM head (ALBEF Retrieval.py, BLIP train_retrieval.py): each
    image's top-k texts and each text's top-k images by the similarity `sim` (n_img, n_txt, the
    same on every rank) get score_pairs(texts, images) -> (n,): the ITM score of texts[j] with this
    rank's image images[j] (indices local to `image_range` = (i0, i1), the images this rank holds),
    plus the similarity with `add_similarity` (BLIP); -100 outside the top k. Image->text rows are
    this rank's images, `batch` pairs per call; each text->image pair is scored by the rank holding
    the image. Returns the gathered (n_img, n_txt) and (n_txt, n_img) scores, the same everywhere."""
    i0, i1 = image_range
    device = sim.device
    rows_i2t = torch.full_like(sim[i0:i1], -100.0)
    if i1 > i0:
        top_sim, top_txt = sim[i0:i1].topk(k, 1)                                     # (R, k)
        per = max(1, batch // max(k, 1))
        for r0 in range(0, i1 - i0, per):
            r = torch.arange(r0, min(r0 + per, i1 - i0), device=device).repeat_interleave(k)
            c = top_txt[r0:r0 + per].reshape(-1)
            score = score_pairs(c, r)
            rows_i2t[r, c] = score + top_sim[r0:r0 + per].reshape(-1) if add_similarity else score
    top_sim, top_img = sim.T.topk(k, 1)                                               # (n_txt, k)
    t, j = ((top_img >= i0) & (top_img < i1)).nonzero(as_tuple=True)
    scores = [torch.zeros(0, device=device)]
    for b in range(0, len(t), batch):
        tb, jb = t[b:b + batch], j[b:b + batch]
        scores.append(score_pairs(tb, top_img[tb, jb] - i0))
    score = torch.cat(scores) + top_sim[t, j] if add_similarity else torch.cat(scores)
    pairs = dist.gather_varlen(torch.stack([t.float(), top_img[t, j].float(), score], 1))   # (k * n_txt, 3)
    rows_t2i = torch.full_like(sim.T, -100.0)
    rows_t2i[pairs[:, 0].long(), pairs[:, 1].long()] = pairs[:, 2]
    return dist.gather_varlen(rows_i2t), rows_t2i


# ---- VQA accuracy (Antol et al. 2015; the VQAv2 evaluation script's normalisation) ----

# Number words become digits, articles go, and contractions written without their apostrophe get
# it back. The official table's capitalised keys (Im, Ive, Id've, I'dve) are left out: words are
# lower-cased before the lookup, so they never match there either; "somebody'd" -> "somebodyd" is
# the official table's own (reversed) entry, kept so that scores agree.
_NUMBERS = dict(none="0", zero="0", one="1", two="2", three="3", four="4", five="5", six="6", seven="7", eight="8",
                nine="9", ten="10")
_ARTICLES = ("a", "an", "the")
_CONTRACTIONS = dict(pair.split(">") for pair in """
    aint>ain't arent>aren't cant>can't couldve>could've couldnt>couldn't couldn'tve>couldn't've
    couldnt've>couldn't've didnt>didn't doesnt>doesn't dont>don't hadnt>hadn't hadnt've>hadn't've
    hadn'tve>hadn't've hasnt>hasn't havent>haven't hed>he'd hed've>he'd've he'dve>he'd've hes>he's
    howd>how'd howll>how'll hows>how's isnt>isn't itd>it'd itd've>it'd've it'dve>it'd've itll>it'll
    let's>let's maam>ma'am mightnt>mightn't mightnt've>mightn't've mightn'tve>mightn't've mightve>might've
    mustnt>mustn't mustve>must've neednt>needn't notve>not've oclock>o'clock oughtnt>oughtn't
    ow's'at>'ow's'at 'ows'at>'ow's'at 'ow'sat>'ow's'at shant>shan't shed've>she'd've she'dve>she'd've
    she's>she's shouldve>should've shouldnt>shouldn't shouldnt've>shouldn't've shouldn'tve>shouldn't've
    somebody'd>somebodyd somebodyd've>somebody'd've somebody'dve>somebody'd've somebodyll>somebody'll
    somebodys>somebody's someoned>someone'd someoned've>someone'd've someone'dve>someone'd've
    someonell>someone'll someones>someone's somethingd>something'd somethingd've>something'd've
    something'dve>something'd've somethingll>something'll thats>that's thered>there'd thered've>there'd've
    there'dve>there'd've therere>there're theres>there's theyd>they'd theyd've>they'd've they'dve>they'd've
    theyll>they'll theyre>they're theyve>they've twas>'twas wasnt>wasn't wed've>we'd've we'dve>we'd've
    weve>we've werent>weren't whatll>what'll whatre>what're whats>what's whatve>what've whens>when's
    whered>where'd wheres>where's whereve>where've whod>who'd whod've>who'd've who'dve>who'd've wholl>who'll
    whos>who's whove>who've whyll>why'll whyre>why're whys>why's wont>won't wouldve>would've
    wouldnt>wouldn't wouldnt've>wouldn't've wouldn'tve>wouldn't've yall>y'all yall'll>y'all'll
    y'allll>y'all'll yall'd've>y'all'd've y'alld've>y'all'd've y'all'dve>y'all'd've youd>you'd
    youd've>you'd've you'dve>you'd've youll>you'll youre>you're youve>you've""".split())
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
                "!")
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")
# The official pattern is "(?!<=\d)(\.)(?!\d)": its "(?!<=" was meant as a look-behind but is a
# look-ahead that always holds, so it strips every period not followed by a digit, as this does.
_PERIOD = re.compile(r"\.(?!\d)")


def vqa_punctuation(text):
    """The evaluation's processPunctuation: each mark is deleted where it touches a space somewhere
    in the answer (or the answer has a digit group like 1,000), else replaced by a space; then
    periods not followed by a digit go (at most 32: the official script passes re.UNICODE, 32, as
    the count)."""
    out = text
    for p in _PUNCTUATION:
        if p + " " in text or " " + p in text or _DIGIT_COMMA.search(text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=32)


def vqa_digits_articles(text):
    """processDigitArticle: lower-case, number words to digits, articles dropped, contractions."""
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(prediction, answers):
    """VQAv2 accuracy of one predicted answer against the human answers (10 in VQAv2): min(#humans
    who said it / 3, 1), averaged over the 10 subsets of 9 humans. The prediction is normalised
    (punctuation, then digits/articles/contractions); the human answers only get the punctuation
    step, and only when they disagree: the official script's behaviour, kept so that scores agree
    (a unanimous "yes!" is not matched by "yes!", which normalises to "yes")."""
    pred = vqa_digits_articles(vqa_punctuation(prediction.replace("\n", " ").replace("\t", " ").strip()))
    if len(set(answers)) > 1:
        answers = [vqa_punctuation(a) for a in answers]
    if not answers:
        raise ValueError("a question without human answers")
    scores = [min(1.0, sum(a == pred for j, a in enumerate(answers) if j != i) / 3) for i in range(len(answers))]
    return sum(scores) / len(scores)
