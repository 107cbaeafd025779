"""Run under `torchrun --nproc_per_node 2` by test_blip.py (gloo, CPU). Rank 0 saves:
- the feature queues after one pretraining step on each rank's half of a fixed global batch;
- the hard negatives drawn for constructed features whose hardest negatives live on the other rank;
- retrieval metrics (ITC + ITM re-ranking) with the rows split over the two ranks."""
import sys

import torch

sys.path.insert(0, __file__.rsplit("/tests/", 1)[0])
import blip_train  # noqa: E402
from common import dist  # noqa: E402
from tests.workers.dist_fixtures import blip_batch, blip_model  # noqa: E402


def main(out, val_file):
    rank, _, world, _ = dist.setup()
    model, tok, cfg = blip_model()
    images, ids, mask, idx = blip_batch(tok, 4)
    b = 4 // world
    mine = slice(rank * b, (rank + 1) * b)
    model(images[mine], ids[mine], mask[mine], idx[mine], alpha=0.4, task="pretrain")
    model.finish_step()
    queue = {k: getattr(model, k).clone() for k in ("image_queue", "text_queue", "idx_queue", "queue_ptr")}
    # hard negatives: global images = the 4 basis vectors; the text of global sample j equals image
    # (j + 2) % 4, i.e. its hardest negative sits on the other rank (its own image is excluded).
    feats = torch.eye(4)
    texts = feats[[(j + 2) % 4 for j in range(4)]]
    negs = [blip_train.hard_negatives(feats[mine], texts[mine], idx[mine], 0.01) for _ in range(20)]
    neg_image = dist.gather_no_grad(torch.stack([n[0] for n in negs], 1))       # (4, 20) global indices
    neg_text = dist.gather_no_grad(torch.stack([n[1] for n in negs], 1))
    model.eval()
    val = blip_train.read_annotations(val_file)
    metrics, n_itm = blip_train.evaluate_retrieval(model, cfg, val, tok, torch.device("cpu"), "fp32")
    if rank == 0:
        torch.save({"queue": queue, "neg_image": neg_image, "neg_text": neg_text, "metrics": metrics,
                    "n_itm": n_itm, "world": world}, out)
    dist.cleanup()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
