"""Evaluation metrics with the names of DESIGN.md: retrieval recall@K (percent) and zero-shot
top-1/top-5 (percent).

Ties count against the model: a candidate scored equal to the ground truth ranks ahead of
it. So a collapsed model that gives every pair the same score gets recall 0, never 100."""
import torch


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
