"""Run under `torchrun --nproc_per_node 2` by test_blip2.py (gloo, CPU), and in-process with one
rank as its reference: BLIP-2's three losses and their gradients (averaged over ranks, as DDP)
on a fixed global batch of 4, the ITM negatives at the argmax. Image ids [0, 0, 1, 1]: each
rank's two samples share an id, so every valid hard negative lives on the other rank."""
import os
import sys

import torch

sys.path.insert(0, __file__.rsplit("/tests/", 1)[0])
import blip2_train  # noqa: E402
from common import dist  # noqa: E402
from common.data import Tokenizer, tiny_data  # noqa: E402
from tests.test_blip2 import SMALL, batch  # noqa: E402


def run(rank, world):
    tok = Tokenizer(os.path.join(tiny_data(), "tokenizer"))
    torch.manual_seed(0)
    model = blip2_train.build_blip2(blip2_train.Config(**SMALL), tok).train()
    images, ids, mask = batch(tok, 4)
    idx = torch.tensor([0, 0, 1, 1])
    b = 4 // world
    mine = slice(rank * b, (rank + 1) * b)
    seen = []
    itm_logits = model.itm_logits

    def recording(ids_, mask_, image_embeds):
        seen.append(ids_)
        return itm_logits(ids_, mask_, image_embeds)
    model.itm_logits = recording
    original = blip2_train.sample_negatives
    blip2_train.sample_negatives = lambda weights: weights.argmax(1)
    try:
        losses = model(dict(images=images[mine], ids=ids[mine], mask=mask[mine], idx=idx[mine]))
    finally:
        blip2_train.sample_negatives = original
    sum(losses.values()).backward()
    grads = {n: dist.all_reduce_mean(p.grad) for n, p in model.named_parameters() if p.grad is not None}
    other = {tuple(r) for r in ids[slice((1 - rank) * b, (2 - rank) * b)].tolist()} if world > 1 else set()
    foreign = sum(tuple(r) in other for r in torch.cat(seen).tolist())
    return {"losses": {k: float(dist.all_reduce_mean(v.detach())) for k, v in losses.items()}, "grads": grads,
            "foreign_texts": foreign}


def main(out):
    rank, _, world, _ = dist.setup()
    result = run(rank, world)
    if rank == 0:
        torch.save(result, out)
    dist.cleanup()


if __name__ == "__main__":
    main(sys.argv[1])
