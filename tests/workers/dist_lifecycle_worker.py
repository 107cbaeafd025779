"""Run under `torchrun --nproc_per_node 2` by test_lifecycle.py: each rank writes what it saw."""
import json
import os
import signal
import sys

import torch

sys.path.insert(0, __file__.rsplit("/tests/", 1)[0])
from common import dist, utils  # noqa: E402


def main(folder):
    rank, _, _, _ = dist.setup()
    path = os.path.join(folder, "checkpoint_last.pt")
    if rank == 0:
        utils.save_checkpoint(path, {"config": {}, "step": 1})
    dist.barrier()
    real_isfile = os.path.isfile
    if rank == 1:   # rank 1's node-local folder has no checkpoint
        os.path.isfile = lambda p: False if p == path else real_isfile(p)
    resume = utils.resume_path("auto", folder)
    os.path.isfile = real_isfile
    real_load = utils.load_checkpoint
    if rank == 1:
        utils.load_checkpoint = lambda p: (_ for _ in ()).throw(utils.UserError(f"{p} is not readable here"))
    try:
        utils.load_checkpoint_everywhere(resume)
        error = ""
    except utils.UserError as e:
        error = str(e)
    utils.load_checkpoint = real_load
    with utils.Preemption() as preemption:
        before = preemption.requested()
        if rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        after = preemption.requested()
        received = preemption.received
    flag = dist.any_rank(torch.tensor(rank == 1))
    with open(os.path.join(folder, f"rank{rank}.json"), "w") as f:
        json.dump({"resume": resume, "load_error": error, "preempt_before": before, "preempt_after": after,
                   "received": received, "any_rank": bool(flag)}, f)
    dist.cleanup()


if __name__ == "__main__":
    main(sys.argv[1])
