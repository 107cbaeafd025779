"""Second numerical reference for ALBEF's losses: Salesforce LAVIS 1.0.2's AlbefPretrain and our
ALBEF on the same weights, token ids and masked positions, with hard negatives pinned to the
argmax (tests/lavis/peer.py's deterministic_negatives). Not collected by pytest; runs in LAVIS's
environment (.ci/run runs it on every change):

    bash tests/lavis/setup.sh
    ~/.cache/blip-lavis-peer/venv/bin/python tests/lavis/check_albef.py

Two differences from the official code that LAVIS has are aligned explicitly:
- LAVIS's BERT has no token-type embeddings (med_config_albef.json: add_type_embeddings false);
  the official one adds row 0 to every token. Ours is built with type_vocab_size=0 here.
- LAVIS ramps the distillation weight over two epochs, the official code over one. The batch is
  put half-way through LAVIS's first epoch (alpha = 0.4 * 50 / 200 = 0.1) and ours gets the same
  alpha, so that the momentum-distillation terms of ITC and MLM are compared too.

Prints both sets of losses and exits non-zero when any differs by more than 1e-5, or any weight's
gradient by more than 1e-4 of that gradient's largest entry."""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
import albef_train  # noqa: E402
from tests.lavis import peer  # noqa: E402
from tests.lavis.check_blip import grad_difference  # noqa: E402
from common.encoders import hf_bert_lm_head_map, hf_bert_map, load_mapped, timm_vit_map  # noqa: E402


def main():
    torch.set_num_threads(1)
    batch_size = 8
    lavis, batch = peer.build_albef("tiny", batch_size=batch_size, dropout=0.0, seed=0)
    batch.update(iters=50, num_iters_per_epoch=100)                          # LAVIS's alpha: 0.4 * 50 / 200
    alpha = lavis.alpha * lavis._rampup_factor(batch["epoch"], batch["iters"], batch["num_iters_per_epoch"])
    tok = lavis.tokenizer
    c = peer.config("tiny")
    fusion = lavis.text_encoder.config.fusion_layer
    cfg = albef_train.Config(**c, vision_mlp_dim=4 * c["vision_width"], fusion_layer=fusion, type_vocab_size=0,
                             vocab_size=len(tok),
                             momentum=lavis.momentum, alpha=lavis.alpha, mlm_probability=lavis.mlm_probability)
    ours = albef_train.ALBEF(cfg, mask_id=tok.mask_token_id, pad_id=tok.pad_token_id, cls_id=tok.cls_token_id)
    L = cfg.text_layers
    mapping = {}
    for s in ("", "_m"):
        mapping.update(timm_vit_map(f"visual_encoder{s}", f"visual_encoder{s}", cfg.vision_layers))
        mapping.update(hf_bert_map(f"text_encoder{s}", f"text_encoder{s}.bert", L, cross_layers=range(fusion, L),
                                   token_types=False))
        mapping.update(hf_bert_lm_head_map(f"mlm_head{s}", f"text_encoder{s}.cls.predictions",
                                           tied_to=f"text_encoder{s}.bert.embeddings.word_embeddings.weight"))
        for name in ("vision_proj", "text_proj"):
            mapping.update({f"{name}{s}.{p}": f"{name}{s}.{p}" for p in ("weight", "bias")})
    mapping.update({f"itm_head.{p}": f"itm_head.{p}" for p in ("weight", "bias")})
    mapping.update({k: k for k in ("temp", "image_queue", "text_queue", "queue_ptr")})
    state = lavis.state_dict()
    for s in ("", "_m"):   # LAVIS ties its MLM decoder to the word embeddings too: check, then map once
        assert torch.equal(state[f"text_encoder{s}.cls.predictions.decoder.weight"],
                           state[f"text_encoder{s}.bert.embeddings.word_embeddings.weight"])
    load_mapped(ours, state, mapping, source="LAVIS AlbefPretrain", keep_init=("idx_queue", "queue_filled"),
                ignore=("position_ids", "cls.predictions.decoder."))
    ours.queue_filled.fill_(True)           # LAVIS's queues of random unit vectors take part in ITC
    enc = peer.tokenize(lavis, batch)
    # The same masked positions and replacement tokens on both sides: ours drawn once, given to LAVIS.
    g = torch.Generator().manual_seed(1)
    masked, labels = albef_train.mask_tokens(enc.input_ids, cfg.mlm_probability, tok.mask_token_id, len(tok),
                                             never=(tok.pad_token_id, tok.cls_token_id), generator=g)
    assert (labels != -100).sum() > 0
    albef_train.mask_tokens = lambda *args, **kwargs: (masked.clone(), labels.clone())
    lavis.mask = lambda input_ids, vocab_size, device, targets=None, probability_matrix=None: (masked.clone(),
                                                                                                labels.clone())
    # LAVIS draws with torch.multinomial (pinned by the peer), ours with the exponential trick: pin
    # ours to the same argmax of the same weights.
    albef_train.sample_negatives = lambda weights: weights.argmax(1)
    with peer.deterministic_negatives():
        ref = lavis(batch)
        got = ours(batch["image"], enc.input_ids, enc.attention_mask, torch.arange(batch_size),
                   alpha=torch.tensor(alpha), task="pretrain")
    bad = 0
    print(f"alpha {alpha}, {int((labels != -100).sum())} masked tokens")
    for k in ("loss_itc", "loss_itm", "loss_mlm"):
        a, b_ = float(got[k]), float(getattr(ref, k))
        bad += abs(a - b_) > 1e-5
        print(f"{k}: ours {a:.8f}  LAVIS {b_:.8f}  diff {abs(a - b_):.2e}")
    sum(got.values()).backward()
    ref.loss.backward()
    worst, name = grad_difference(ours, lavis, mapping)
    bad += worst > 1e-4
    print(f"gradients: largest difference {worst:.2e} of the gradient's largest entry ({name})")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
