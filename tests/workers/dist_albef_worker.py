"""Run under `torchrun --nproc_per_node 2` by test_albef.py (gloo, CPU). Rank 0 saves:
- the feature queues after one pretraining step on each rank's half of a fixed global batch;
- hard negatives drawn across ranks (--itm-negatives global) for constructed features whose
  hardest negatives live on the other rank, and whether a global-negative ITM step is finite;
- retrieval metrics (ITC + ITM re-ranking) with the rows split over the two ranks."""
import sys

import torch

sys.path.insert(0, __file__.rsplit("/tests/", 1)[0])
import albef_train  # noqa: E402
from common import dist  # noqa: E402
from tests.test_albef import SMALL, captions_batch  # noqa: E402

OVERRIDES = {}


def main(out, val_file):
    import os
    from common.data import Tokenizer, tiny_data
    rank, _, world, _ = dist.setup()
    tok = Tokenizer(os.path.join(tiny_data(), "tokenizer"))
    cfg = albef_train.Config(**{**SMALL, **OVERRIDES})
    cfg.vocab_size = tok.vocab_size
    torch.manual_seed(0)
    model = albef_train.build_albef(cfg, tok)
    images, ids, mask = captions_batch(tok, 4)
    b = 4 // world
    mine = slice(rank * b, (rank + 1) * b)
    model.train()
    model(images[mine], ids[mine], mask[mine], torch.arange(4)[mine], torch.tensor(0.4))
    model.finish_step()
    queue = {k: getattr(model, k).clone() for k in ("image_queue", "text_queue", "idx_queue", "queue_ptr")}
    # global negatives: momentum image keys = the 4 basis vectors; the online text of global sample j
    # equals image (j + 2) % 4, i.e. its hardest negative sits on the other rank (its own is excluded)
    feats = torch.eye(4)
    texts = feats[[(j + 2) % 4 for j in range(4)]]
    negs = [albef_train.hard_negatives(feats[mine], texts[mine], feats[mine], texts[mine], torch.arange(4)[mine],
                                       0.01, all_ranks=True) for _ in range(20)]
    neg_image = dist.gather_no_grad(torch.stack([n[0] for n in negs], 1))       # (4, 20) global indices
    neg_text = dist.gather_no_grad(torch.stack([n[1] for n in negs], 1))
    # one step with negatives from every rank (image tokens and text outputs gathered with gradient)
    model.cfg.itm_negatives = "global"
    losses = model(images[mine], ids[mine], mask[mine], torch.arange(4)[mine], torch.tensor(0.4))
    sum(losses.values()).backward()
    finite = all(bool(torch.isfinite(v)) for v in losses.values())
    model.cfg.itm_negatives = "local"
    model.pending_keys = None
    model.eval()
    val = albef_train.read_annotations(val_file)
    metrics, n_itm = albef_train.evaluate_retrieval(model, cfg, val, tok, torch.device("cpu"), "fp32")
    if rank == 0:
        torch.save({"queue": queue, "neg_image": neg_image, "neg_text": neg_text, "metrics": metrics,
                    "n_itm": n_itm, "world": world, "overrides": OVERRIDES, "global_itm_finite": finite}, out)
    dist.cleanup()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
