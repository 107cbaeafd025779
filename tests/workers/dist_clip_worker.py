"""Run under `torchrun --nproc_per_node 2` by test_distributed.py (gloo, CPU): each rank takes its
half of a fixed global batch, runs the DDP-wrapped CLIP and the gathered loss, and rank 0 saves
the mean loss, the averaged gradients and the results of the gather helpers for the test to
compare with one process on the whole batch; the same for SigLIP's and DiHT's losses."""
import sys

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, __file__.rsplit("/tests/", 1)[0])
import clip_train  # noqa: E402
from common import dist  # noqa: E402
from tests.workers.dist_fixtures import clip_batch, clip_config  # noqa: E402


def main(out):
    rank, _, world, _ = dist.setup()
    torch.manual_seed(0)
    model = clip_train.CLIP(clip_config())
    images, ids = clip_batch()
    b = images.shape[0] // world
    ddp = DDP(model)
    img, txt, scale = ddp(images[rank * b:(rank + 1) * b], ids[rank * b:(rank + 1) * b])
    loss = clip_train.clip_loss(img, txt, scale)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    # SigLIP (its bias a parameter of the model) and DiHT's HN-NCE on the same halves
    others = {}
    for name, loss_fn in (("siglip", clip_train.siglip_loss), ("diht", clip_train.hn_nce_loss)):
        torch.manual_seed(0)
        m = clip_train.CLIP(clip_config(loss=name))
        wrapped = DDP(m)                 # kept: its hooks average the gradients in backward
        outputs = wrapped(images[rank * b:(rank + 1) * b], ids[rank * b:(rank + 1) * b])
        other = loss_fn(*outputs)
        other.backward()
        others[name] = {"loss": dist.all_reduce_mean(other.detach()),
                        "grads": {n: p.grad.clone() for n, p in m.named_parameters()}}
    # gather helpers: rank r contributes r + 1 rows (variable length), in rank order
    varlen = dist.gather_varlen(torch.full((rank + 1, 2), float(rank)))
    nograd = dist.gather_no_grad(torch.tensor([[rank]]))
    objs = dist.gather_objects({"rank": rank})
    if rank == 0:
        torch.save({"loss": dist.all_reduce_mean(loss), "grads": grads, "varlen": varlen, "nograd": nograd,
                    "objs": objs, "world": world, **others}, out)
    else:
        dist.all_reduce_mean(loss)
    dist.cleanup()


if __name__ == "__main__":
    main(sys.argv[1])
