"""Distributed helpers: process-group set-up from torchrun's environment and the gathers
every contrastive loss needs. Every function works unchanged in a single process (no
process group): gathers return their input, `rank()` is 0, `world_size()` is 1."""
import atexit
import collections
import os
import sys

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


def exit_process(code):
    """End a torchrun process: exit handlers run and output is flushed, then the process exits
    without the interpreter's teardown (os._exit).

    The teardown can abort the process. The process group survives destroy_process_group() while
    anything references it (FSDP's device mesh does), so gloo's worker threads are still alive
    during teardown, and one of them may still be releasing the last collective's tensors, which
    takes the GIL. A thread that takes the GIL while Python finalizes is ended mid-destructor, and
    C++ calls std::terminate: SIGABRT, "terminate called without an active exception" (seen in a
    core dump; about half the launches of a 2-rank CPU script that only builds a device mesh and
    all-reduces; now and then in CI). Collecting garbage at exit only made it rarer. Nothing is
    left to lose here: files are closed and checkpoints written."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        # finished here, and waited for: wandb's exit handler takes the exit code from sys.exit
        # only, and waits for nothing when the process shares another's wandb service
        wandb.run.finish(exit_code=code)
    atexit._run_exitfuncs()                # logging, multiprocessing's children, wandb
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):      # a closed pipe must not keep the process alive
            pass
    os._exit(code)


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


def sum_rank_blocks(block, x, y):
    """sum over ranks r of block(x, y_r, own=r == this rank), y_r rank r's (B, ...) rows of `y`
    gathered with gradient; each block under activation checkpointing, so only one block's
    intermediate activations (a (B, B) score matrix, say) exist at a time, recomputed in backward,
    instead of all W blocks' (B, N) until backward (SigLIP's chunked loss, Sec. 3.3)."""
    from torch.utils.checkpoint import checkpoint
    ys, B = gather_with_grad(y), y.shape[0]
    return sum(checkpoint(block, x, ys[s:s + B], s == B * rank(), use_reentrant=False,
                          preserve_rng_state=False) for s in range(0, ys.shape[0], B))


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


# ---- data parallelism: DDP or FSDP2 (--fsdp) ----

def parallelize(model, fsdp, device, block_types=(), param_dtype=None, unsharded=(), methods=(), broadcast_buffers=True):
    """The model every rank trains: DistributedDataParallel (each rank a full copy, gradients
    all-reduced), or with `fsdp` FSDP2 (fsdp_wrap: sharded); the model itself in one process.
    broadcast_buffers=False: DDP does not copy rank 0's buffers before every forward (ALBEF's and
    BLIP's queues, which every rank updates identically)."""
    if world_size() == 1:
        if fsdp:
            print("--fsdp: a single process has nothing to shard; training without it", flush=True)
        return model
    if fsdp:
        return fsdp_wrap(model, block_types, None if param_dtype == torch.float32 else param_dtype, unsharded, methods)
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   broadcast_buffers=broadcast_buffers)


def is_fsdp(model):
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def fsdp_wrap(model, block_types, param_dtype=None, unsharded=(), methods=()):
    """PyTorch FSDP2 in place of DDP (as open_clip's main branch): `fully_shard` on every block of `block_types`,
    then on the root, over all ranks. Parameters, gradients and AdamW's state are sharded (each rank
    keeps 1/W); a block's parameters are all-gathered for its forward and backward only. Frozen
    parameters (ALBEF's and BLIP's momentum encoders, BLIP-2's frozen ViT) are sharded too and never
    get gradients, except those of the `unsharded` modules (BLIP-2's frozen LM), which stay whole on
    every rank as with DDP. 0-D parameters (logit_scale, temp) become 1-element first (fully_shard takes no
    scalars; full_state_dict squeezes them back). Mixed precision: the blocks gather their parameters
    in `param_dtype` (bf16/fp16, or None: as they are) and reduce gradients in fp32; the root (the
    embeddings, projections and temperatures) stays fp32. Call after loading weights and before
    building the optimizer (whose parameters become the sharded ones). `methods`: the model's methods
    other than forward that training calls (BLIP-2's itc_features), made to gather the root's
    parameters as forward does (open_clip registers encode_image and encode_text so)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (world_size(),))    # explicit: under gloo on a GPU machine the
                                                             # default mesh would be CUDA (pytorch#132471)
    model.param_order = {name: i for i, (name, _) in enumerate(model.named_parameters())}
    model.scalar_params = set()
    for module_name, module in model.named_modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.ndim == 0:
                setattr(module, name, torch.nn.Parameter(p.detach().reshape(1), requires_grad=p.requires_grad))
                model.scalar_params.add(f"{module_name}.{name}" if module_name else name)
    ignored = {p for m in unsharded for p in m.parameters()}
    blocks = [m for m in model.modules() if isinstance(m, block_types)]
    owners = collections.Counter(p for m in blocks for p in m.parameters())
    for module in blocks:
        # a block sharing weights with another (BLIP's text decoder layers share all but self-attention
        # with the encoder's) cannot be a unit of its own: its parameters stay with the root's
        if all(owners[p] == 1 and p not in ignored for p in module.parameters()):
            fully_shard(module, mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype,
                                                                          reduce_dtype=torch.float32))
    fully_shard(model, mesh=mesh, mp_policy=MixedPrecisionPolicy(reduce_dtype=torch.float32),
                ignored_params=ignored or None)
    for name in methods:
        register_fsdp_forward_method(model, name)
    return model


def named_parameters(model):
    """model.named_parameters() in the order of the unwrapped model. fully_shard re-registers a
    module's own parameters, which moves the root's before its children's; the optimizer is built
    in this order so that its state means the same with and without --fsdp."""
    named = list(model.named_parameters())
    order = getattr(model, "param_order", None)
    return sorted(named, key=lambda x: order[x[0]]) if order else named


def local(t):
    """A tensor's local values: its shard for a DTensor (FSDP), else itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def value(t):
    """A DTensor's full value (a collective under FSDP: every rank calls it), else the tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def full_state_dict(model, keep=None):
    """The model's state dict as a non-FSDP run saves it (only the keys in `keep`, if given): under
    FSDP each sharded tensor gathered in turn, to rank 0 (others get {}), 1-element scalars squeezed
    back to 0-D. A collective under FSDP: every rank calls it."""
    state = {k: v for k, v in model.state_dict().items() if keep is None or k in keep}
    if not is_fsdp(model):
        return state
    out = {}
    for k, v in state.items():
        v = v.full_tensor() if hasattr(v, "full_tensor") else v          # an all-gather, the same on every rank
        if is_main():
            out[k] = (v.reshape(()) if k in model.scalar_params else v).detach().cpu()
    return out


def _param_names(model, optimizer):
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def optimizer_state_dict(model, optimizer):
    """The optimizer's state dict as a non-FSDP run saves it (parameters by position): under FSDP
    gathered to rank 0 (others get {}). A collective under FSDP."""
    if not is_fsdp(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    full = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not full:
        return {}
    position = {name: i for i, name in enumerate(_param_names(model, optimizer))}
    squeeze = lambda name, k, v: v.reshape(()) if name in model.scalar_params and k != "step" else v  # noqa: E731
    return {"state": {position[n]: {k: squeeze(n, k, v) for k, v in s.items()} for n, s in full["state"].items()},
            "param_groups": [{**g, "params": [position[n] for n in g["params"]]} for g in full["param_groups"]]}


def load_optimizer_state_dict(model, optimizer, state):
    """Load what optimizer_state_dict saved (with or without --fsdp) into this run's optimizer."""
    if not is_fsdp(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    names = _param_names(model, optimizer)
    unsqueeze = lambda name, k, v: v.reshape(1) if name in model.scalar_params and k != "step" else v  # noqa: E731
    full = {"state": {names[i]: {k: unsqueeze(names[i], k, v) for k, v in s.items()} for i, s in state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, full, options=StateDictOptions(full_state_dict=True))


class full_parameters:
    """Context manager: every FSDP unit of `model` all-gathered for the duration (evaluation,
    generation), so that any method of any module runs, and ranks may run different numbers of
    forwards. A no-op without FSDP."""

    def __init__(self, model):
        from torch.distributed.fsdp import FSDPModule
        self.units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        self.root = model

    def __enter__(self):
        for unit in self.units:
            unit.set_reshard_after_forward(False, recurse=False)
            unit.unshard()

    def __exit__(self, *exc):
        for unit in self.units:                # back to fully_shard's default: the root stays gathered
            unit.reshard()                     # after forward (backward needs it at once), blocks not
            unit.set_reshard_after_forward(unit is not self.root, recurse=False)
