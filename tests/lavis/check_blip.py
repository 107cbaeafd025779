"""Second numerical reference for BLIP's losses: Salesforce LAVIS 1.0.2's BlipPretrain and our
BLIP on the same weights and token ids, with hard negatives pinned to the argmax
(tests/lavis/peer.py's deterministic_negatives), at step 0 (alpha 0). Not collected by pytest;
runs in LAVIS's environment (.ci/run runs it on every change):

    bash tests/lavis/setup.sh
    ~/.cache/blip-lavis-peer/venv/bin/python tests/lavis/check_blip.py

Prints both sets of losses and exits non-zero when any differs by more than 1e-5, or any weight's
gradient by more than 1e-4 of that gradient's largest entry."""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
import blip_train  # noqa: E402
from tests.lavis import peer  # noqa: E402
from common.encoders import hf_bert_lm_head_map, hf_bert_map, load_mapped, timm_vit_map  # noqa: E402


def main():
    torch.set_num_threads(1)
    batch_size = 8
    lavis, batch = peer.build_blip("tiny", batch_size=batch_size, dropout=0.0, seed=0)
    tok = lavis.tokenizer
    with torch.no_grad():  # our LM head is tied to the word embeddings; give LAVIS's the same values
        lavis.text_decoder.cls.predictions.decoder.weight.copy_(lavis.text_encoder.embeddings.word_embeddings.weight)
    c = peer.config("tiny")
    cfg = blip_train.Config(**c, vision_mlp_dim=4 * c["vision_width"], vocab_size=len(tok), momentum=lavis.momentum,
                            alpha=lavis.alpha)
    ours = blip_train.BLIP(cfg, cls_id=tok.cls_token_id, enc_id=tok.enc_token_id, dec_id=tok.bos_token_id,
                           sep_id=tok.sep_token_id, pad_id=tok.pad_token_id)
    L = cfg.text_layers
    mapping = {**timm_vit_map("visual_encoder", "visual_encoder", cfg.vision_layers),
               **timm_vit_map("visual_encoder_m", "visual_encoder_m", cfg.vision_layers),
               **hf_bert_map("text_encoder", "text_encoder", L, cross_layers=range(L), token_types=False),
               **hf_bert_map("text_encoder_m", "text_encoder_m", L, cross_layers=range(L), token_types=False),
               **hf_bert_map("text_decoder", "text_decoder.bert", L, cross_layers=range(L), token_types=False),
               **hf_bert_lm_head_map("lm_head", "text_decoder.cls.predictions")}
    for name in ("vision_proj", "text_proj", "itm_head", "vision_proj_m", "text_proj_m"):
        mapping.update({f"{name}.{p}": f"{name}.{p}" for p in ("weight", "bias")})
    mapping.update({k: k for k in ("temp", "image_queue", "text_queue", "queue_ptr")})
    load_mapped(ours, lavis.state_dict(), mapping, source="LAVIS BlipPretrain", keep_init=("idx_queue",),
                ignore=("position_ids", "text_decoder.cls.predictions.decoder.bias"))
    enc = peer.tokenize(lavis, batch)
    # LAVIS draws with torch.multinomial (pinned by the peer), ours with the exponential trick: pin
    # ours to the same argmax of the same weights.
    blip_train.sample_negatives = lambda weights: weights.argmax(1)
    with peer.deterministic_negatives():
        ref = lavis(batch)
        got = ours(batch["image"], enc.input_ids, enc.attention_mask, torch.arange(batch_size), alpha=0.0, task="pretrain")
    bad = 0
    for k in ("loss_itc", "loss_itm", "loss_lm"):
        a, b_ = float(got[k]), float(getattr(ref, k))
        bad += abs(a - b_) > 1e-5
        print(f"{k}: ours {a:.8f}  LAVIS {b_:.8f}  diff {abs(a - b_):.2e}")
    # At initialisation the losses hardly depend on some weights (a 1% change of a cross-attention
    # matrix moves them by ~1e-6), so compare the gradients of every trainable weight too.
    sum(got[k] for k in ("loss_itc", "loss_itm", "loss_lm")).backward()
    ref.loss.backward()
    worst, name = grad_difference(ours, lavis, mapping)
    bad += worst > 1e-4
    print(f"gradients: largest difference {worst:.2e} of the gradient's largest entry ({name})")
    sys.exit(1 if bad else 0)


def grad_difference(ours, theirs, mapping):
    """Largest |our gradient - theirs| / max |theirs| over our trainable tensors. A tensor shared by
    several of our keys (tied weights) is compared with the sum of the gradients of the distinct
    tensors those keys map to: our LM head is the word-embedding matrix, LAVIS's a separate copy."""
    mine = dict(ours.named_parameters(remove_duplicate=False))
    other = dict(theirs.named_parameters(remove_duplicate=False))
    groups = {}
    for key, p in mine.items():
        if p.requires_grad:
            groups.setdefault(id(p), (p, []))[1].append(key)
    worst, worst_key = 0.0, ""
    for p, keys in groups.values():
        sources = {}
        for key in keys:
            srcs = mapping[key] if isinstance(mapping[key], tuple) else (mapping[key],)
            sources[tuple(id(other[s]) for s in srcs)] = [other[s] for s in srcs]
        expected = sum(torch.cat([zero_if_none(t).reshape(-1) for t in ts]).reshape(p.shape) for ts in sources.values())
        diff = float((zero_if_none(p) - expected).abs().max() / expected.abs().max().clamp(min=1e-12))
        if diff >= worst:
            worst, worst_key = diff, keys[0]
    return worst, worst_key


def zero_if_none(p):
    return p.grad if p.grad is not None else torch.zeros_like(p)


if __name__ == "__main__":
    main()
