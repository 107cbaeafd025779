"""Run under `torchrun --nproc_per_node 2` by test_coca.py (gloo, CPU): each rank takes its half of
a fixed global batch whose captions are much longer on rank 1 than on rank 0, runs the DDP-wrapped
CoCa and the training loop's losses (compute_losses: trimmed padding, gathered contrastive
negatives, caption tokens averaged over the global batch), and rank 0 saves the mean losses and
the averaged gradients for the test to compare with one process on the whole batch."""
import sys

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, __file__.rsplit("/tests/", 1)[0])
import coca_train  # noqa: E402
from common import dist  # noqa: E402
from tests.test_coca import SMALL, dist_batch  # noqa: E402


def main(out):
    rank, _, world, device = dist.setup()
    cfg = coca_train.Config(**SMALL)
    torch.manual_seed(0)
    model = coca_train.CoCa(cfg, pad_id=0, eos_id=63)
    images, ids = dist_batch()
    b = images.shape[0] // world
    mine = ids[rank * b:(rank + 1) * b]
    mine = coca_train.trim_padding(mine, 0, multiple=1)
    positions, targets = coca_train.caption_positions(mine, 0)
    ddp = DDP(model)     # held: a DDP wrapper collected before backward would take its gradient hooks with it
    loss, losses = coca_train.compute_losses(ddp, cfg, (images[rank * b:(rank + 1) * b], mine, positions,
                                                    targets))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    values = {k: dist.all_reduce_mean(v.detach()) for k, v in {"loss": loss, **losses}.items()}
    if rank == 0:
        torch.save({"values": values, "grads": grads, "world": world, "length": mine.shape[1]}, out)
    dist.cleanup()


if __name__ == "__main__":
    main(sys.argv[1])
