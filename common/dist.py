"""Distributed helpers: process-group set-up from torchrun's environment and the gathers
every contrastive loss needs. Every function works unchanged in a single process (no
process group): gathers return their input, `rank()` is 0, `world_size()` is 1."""
import os

import torch
import torch.distributed as dist


def setup():
    """Initialise from torchrun's RANK / LOCAL_RANK / WORLD_SIZE; without them, one process.

    Returns (rank, local_rank, world_size, device). On CUDA, `torch.cuda.set_device` runs
    before anything touches the GPU, so that every later `device=` and NCCL call lands on
    this process's own GPU (a bare `.cuda()` elsewhere would pick GPU 0 on every rank).
    """
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return rank, local_rank, world_size, device


def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()


def is_dist():
    return dist.is_available() and dist.is_initialized()


def rank():
    return dist.get_rank() if is_dist() else 0


def world_size():
    return dist.get_world_size() if is_dist() else 1


def is_main():
    return rank() == 0


def barrier():
    if is_dist():
        dist.barrier()


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's slice.

    Rank r's features appear as negatives in every other rank's loss; the backward
    all-reduces the gradient of the gathered tensor and keeps this rank's slice, so those
    terms reach r's encoder (what open_clip's gather_with_grad and Salesforce's GatherLayer do).
    """

    @staticmethod
    def forward(ctx, x):
        return _all_gather(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        W, r = dist.get_world_size(), dist.get_rank()
        b = grad.shape[0] // W
        if dist.get_backend() == "nccl":  # reduce-scatter: 1/W of an all-reduce's traffic
            out = torch.empty_like(grad[:b])
            dist.reduce_scatter_tensor(out, grad)
            return out
        grad = grad.clone()               # gloo has no reduce-scatter: all-reduce (SUM), keep our slice
        dist.all_reduce(grad)
        return grad[r * b:(r + 1) * b]


def _all_gather(x):
    """(B, ...) -> (W*B, ...) into one tensor (no Python list of outputs)."""
    out = x.new_empty((dist.get_world_size() * x.shape[0],) + tuple(x.shape[1:]))
    dist.all_gather_into_tensor(out, x.contiguous())
    return out


def gather_with_grad(x):
    """(B, ...) on each rank -> (W*B, ...) in rank order, gradient flowing back to every rank.
    All ranks must pass the same shape."""
    if not is_dist():
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def gather_no_grad(x):
    """(B, ...) on each rank -> (W*B, ...) in rank order, detached (for queues, sampling weights)."""
    if not is_dist():
        return x
    return _all_gather(x)


@torch.no_grad()
def gather_varlen(x):
    """Concatenate tensors whose first dimension differs between ranks (evaluation shards),
    in rank order, without the duplicates a padding sampler would add."""
    if not is_dist():
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    padded = x.new_zeros((max(sizes),) + tuple(x.shape[1:]))
    padded[: x.shape[0]] = x
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return torch.cat([o[:s] for o, s in zip(out, sizes)], 0)


def gather_objects(obj):
    """List of one picklable object per rank (e.g. RNG states for a checkpoint)."""
    if not is_dist():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag):
    """A bool tensor that is True on every rank where it is True on any (all-reduce MAX, no host sync)."""
    if not is_dist():
        return flag
    flag = flag.to(torch.uint8)
    dist.all_reduce(flag, dist.ReduceOp.MAX)
    return flag.bool()


_CPU_GROUP = {}


def cpu_group():
    """A gloo process group for small host-side agreements (preemption flags) that must not
    touch the GPU: the default group itself on gloo, a new gloo group beside NCCL."""
    if not is_dist():
        return None
    if dist.get_backend() == "gloo":
        return dist.group.WORLD
    if "gloo" not in _CPU_GROUP:
        _CPU_GROUP["gloo"] = dist.new_group(backend="gloo")
    return _CPU_GROUP["gloo"]


def host_max(value):
    """The largest of an int over ranks, agreed on the host (the gloo CPU group): no GPU sync."""
    if not is_dist():
        return value
    t = torch.tensor([value])
    dist.all_reduce(t, dist.ReduceOp.MAX, group=cpu_group())
    return int(t)


def host_sum(values):
    """Element-wise sums of a list of ints over ranks, on the host (the gloo CPU group): no GPU sync."""
    if not is_dist():
        return list(values)
    t = torch.tensor(list(values), dtype=torch.long)
    dist.all_reduce(t, group=cpu_group())
    return t.tolist()


def all_reduce_sum(x):
    """Sum of a tensor over ranks (evaluation counts)."""
    if not is_dist():
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x


def all_reduce_mean(x):
    """Mean of a tensor over ranks (for logging a loss that every rank computed)."""
    if not is_dist():
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / dist.get_world_size()


def shard_range(n, rank_=None, world=None):
    """Contiguous slice [start, end) of n items owned by a rank, for evaluation."""
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    return n * rank_ // world, n * (rank_ + 1) // world
