"""Small training utilities every script uses the same way: config resolution and --help from
the Config dataclass, user errors, seeding, optimiser groups, warm-up + cosine schedule,
precision, checkpoints (atomic, fsynced, loaded with weights_only=True), the lifecycle guards
(SIGTERM / SIGUSR1 preemption, non-finite steps), and the metrics log."""
import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import pickle
import random
import secrets
import signal
import sys
import threading
import traceback

import numpy as np
import torch

from . import dist


# ---- user errors ----

class UserError(ValueError):
    """A mistake in the user's input (a flag, a file, an annotation). `cli` prints it as one line
    and exits with status 2; tracebacks are for bugs."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder named by the user does not exist."""


class RunAborted(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps in a row); printed as one line too."""


def cli(main):
    """Run `main()` as a command: a UserError or RunAborted prints `error: ...` (rank 0 only under
    torchrun, where every rank hits the same error) and exits with status 2. Under torchrun every
    ending, an unexpected exception's (traceback, status 1) included, goes through
    dist.exit_process, which skips the interpreter's teardown."""
    torchrun = int(os.environ.get("WORLD_SIZE", 1)) > 1
    code = 0
    record_preemption_signals()      # from here on a signal is never the default action's kill
    try:
        main()
    except (UserError, RunAborted) as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        code = 2
    except SystemExit as e:                 # argparse: --help, a bad flag
        if not torchrun:
            raise
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    except BaseException:
        if not torchrun:
            raise
        traceback.print_exc()
        code = 1
    if torchrun:
        dist.exit_process(code)
    sys.exit(code)


# ---- training utilities ----

def seed_everything(seed):
    """Python, NumPy and torch (every device) generators from one seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def param_groups(model, weight_decay, extra_no_decay=()):
    """AdamW groups: no weight decay on biases, norms, embeddings, 1-D tensors and the named
    extras (e.g. logit_scale), as open_clip's exclude_from_wd plus the embedding tables."""
    decay, no_decay = [], []
    for name, p in dist.named_parameters(model):
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "embedding" in name or any(e in name for e in extra_no_decay):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(groups, **kwargs):
    """AdamW with the fused kernel (CUDA and CPU): one kernel for all parameters, and it honours
    `found_inf`, which lets a non-finite step be skipped on the device without a host sync."""
    return torch.optim.AdamW(groups, fused=True, **kwargs)


def grad_norm_(model, max_norm=0.0):
    """The total gradient norm as a device tensor (no host sync), clipped to `max_norm` when > 0.
    Under FSDP the norm over every rank's shards (a collective)."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = dist.value(torch.nn.utils.get_total_norm([p.grad for p in params]))
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def cosine_schedule(optimizer, warmup_steps, total_steps, warmup_from=None, final=0.0):
    """Linear warm-up from lr/warmup to lr over `warmup_steps`, then cosine to 0 at `total_steps`
    (open_clip scheduler.py: base * (step + 1) / warmup, then 0.5 * (1 + cos(pi * progress))).
    `warmup_from`, `final`: fractions of lr to warm up from and to end at (timm's warmup_lr and
    min_lr, as ALBEF's scheduler: lr = min + (lr - min) * 0.5 * (1 + cos))."""
    def factor(step):
        if step < warmup_steps:
            if warmup_from is None:
                return (step + 1) / warmup_steps
            return warmup_from + (1 - warmup_from) * step / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def resolve_precision(precision, device):
    """'auto' -> bf16 on CUDA GPUs that support it, fp32 otherwise (CPU bf16 matmul is slow)."""
    if precision == "auto":
        # native bf16 only (Ampere and newer); V100/T4 would emulate it slowly
        return ("bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
                else "fp32")
    if precision not in ("fp32", "bf16", "fp16"):
        raise UserError(f"--precision must be auto, fp32, bf16 or fp16, not {precision!r}")
    return precision


def precision_dtype(precision):
    """The dtype of a resolved --precision (bf16, fp16, fp32)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def autocast(precision, device):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


# ---- checkpoints ----

def rng_state():
    """Every generator's state in types `torch.load(weights_only=True)` accepts (tensors, tuples)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(state):
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def check_finite(module):
    """A checkpoint is never written from non-finite weights: error naming the first such tensor (on
    every rank: under FSDP each checks its shards and they agree)."""
    bad = next((name for name, t in module.state_dict().items()
                if t.is_floating_point() and not bool(torch.isfinite(dist.local(t)).all())), None)
    if dist.is_fsdp(module):
        bad = next((b for b in dist.gather_objects(bad) if b), None)
    if bad:
        raise RunAborted(f"weight {bad} is not finite: refusing to write a checkpoint from it")


def save_checkpoint(path, state):
    """Atomic and durable: write a temporary file, fsync it, os.replace it over `path`, fsync the
    folder. A crash or a preemption mid-write never leaves a truncated checkpoint where
    --resume auto would find it, and a machine crash right after the rename keeps the new file."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path):
    """torch.load(weights_only=True): a checkpoint given to --resume / --init-from can never run
    code. Ours hold only tensors and plain types; a file that needs pickled classes is refused."""
    if not os.path.isfile(path):
        raise MissingFileError(f"checkpoint {path} does not exist")
    try:
        return upgrade_checkpoint(torch.load(path, map_location="cpu", weights_only=True))
    except pickle.UnpicklingError as e:
        if "global" not in str(e).lower():       # not a pickle at all (a truncated or foreign file)
            raise UserError(f"{path} is not a readable PyTorch checkpoint") from None
        raise UserError(f"{path} needs pickled Python objects to load, which could run code; only plain "
                        f"state dicts load (torch.load weights_only=True). Re-save its tensors as a state dict.") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise UserError(f"{path} is not a readable PyTorch checkpoint ({str(e).splitlines()[0]})") from None


def upgrade_checkpoint(ckpt):
    """Our checkpoints of earlier versions: `vision_mlp_ratio` (before the ViT's MLP width was
    stored as a size) becomes the `vision_mlp_dim` it built (int(width * ratio), as the encoder
    did); ALBEF's queues from before `queue_filled` were full (random keys at the start)."""
    saved = ckpt.get("config") if isinstance(ckpt, dict) else None
    if isinstance(saved, dict) and "vision_mlp_ratio" in saved and "vision_width" in saved:
        saved["vision_mlp_dim"] = int(saved["vision_width"] * saved.pop("vision_mlp_ratio"))
    model = ckpt.get("model") if isinstance(saved, dict) else None
    if isinstance(model, dict) and "fusion_layer" in saved and "image_queue" in model \
            and "queue_filled" not in model:        # ALBEF's queues, before they were marked: all full
        model["queue_filled"] = torch.ones(1, model["image_queue"].shape[1], dtype=torch.bool)
    return ckpt


def resume_path(resume, output_dir):
    """--resume auto -> output_dir/checkpoint_last.pt if it exists (else None); a path -> itself.
    Decided by rank 0 and broadcast, so node-local output folders cannot split the ranks."""
    if not resume:
        return None
    path = None
    if dist.is_main():
        if resume == "auto":
            auto = os.path.join(output_dir, "checkpoint_last.pt")
            path = auto if os.path.isfile(auto) else None
        else:
            path = resume
    return dist.gather_objects(path)[0]


def load_checkpoint_everywhere(path):
    """Every rank loads the same file; if any rank cannot, all fail together naming it."""
    ckpt, error = None, None
    try:
        ckpt = load_checkpoint(path)
    except UserError as e:
        error = str(e)
    errors = dist.gather_objects(error)
    failed = [(r, e) for r, e in enumerate(errors) if e]
    if failed:
        r, e = failed[0]
        raise UserError(f"rank {r} cannot resume from {path}: {e}" if dist.is_dist() else e)
    return ckpt


# ---- lifecycle: preemption and non-finite steps ----

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_recorded = []          # signals that came outside a Preemption block (start-up, final evaluation)


def _record(signum, frame):
    _recorded.append(signal.Signals(signum).name)


def record_preemption_signals():
    """From here on (`cli` calls it first) SIGTERM / SIGUSR1 outside the training loop (start-up,
    the final evaluation) are recorded instead of killing the process with the default action; the
    training loop's Preemption then acts on them at its first check, as on one received inside it."""
    for s in PREEMPTION_SIGNALS:
        signal.signal(s, _record)


def ignore_preemption_signals(worker_id=None):
    """DataLoader `worker_init_fn` (map-style and shard workers): a data worker ignores SIGTERM and
    SIGUSR1 from others. torchrun and SLURM signal every process of a rank (its process group),
    workers included; a worker that died of it made the main process raise "DataLoader worker ...
    is killed by signal" instead of finishing the step and saving. The main process decides: it
    saves, then shuts its workers down. A SIGTERM from the main process itself (multiprocessing's
    terminate(), at exit) still ends the worker, as PyTorch's own worker handler does: the signals
    are blocked and a thread reads each with its sender (sigwaitinfo). Before this runs, a forked
    worker still has the main process's handlers (they set a flag: harmless). Where there is no
    sigwaitinfo (not Linux) both are ignored outright, the main process's SIGTERM included."""
    if not hasattr(signal, "sigwaitinfo"):
        for s in PREEMPTION_SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPTION_SIGNALS)   # threads started later inherit it
    threading.Thread(target=_end_on_parents_sigterm, args=(os.getppid(),), daemon=True).start()


class DataLoader(torch.utils.data.DataLoader):
    """torch's DataLoader whose workers start with SIGTERM / SIGUSR1 blocked (a forked worker
    inherits the mask), so a signal sent to the rank's process group while workers are starting
    (every epoch of the shard loader, every evaluation) waits for `ignore_preemption_signals`
    instead of killing a worker that has not run it yet. The main process unblocks them right after
    and gets any that came meanwhile. (Under the spawn or forkserver start methods the mask is not
    inherited and that window stays.)"""

    def __iter__(self):
        if not hasattr(signal, "pthread_sigmask"):          # not POSIX
            return super().__iter__()
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPTION_SIGNALS)
        try:
            return super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _end_on_parents_sigterm(parent):
    while True:
        info = signal.sigwaitinfo(PREEMPTION_SIGNALS)
        if info.si_signo == signal.SIGTERM and info.si_pid == parent:
            os._exit(0)


class Preemption:
    """SIGTERM / SIGUSR1 (what SLURM, Kubernetes and torchrun send before they kill a job) set a
    flag; `requested()` is True on every rank once any rank got one, so all ranks finish the same
    step, save `checkpoint_last.pt` together and exit cleanly. Use as a context manager: the
    previous handlers come back on exit; a signal recorded before it (record_preemption_signals,
    during start-up) counts as received. The per-step agreement is an all-reduce of one number on
    a CPU (gloo) group: no GPU sync."""

    SIGNALS = PREEMPTION_SIGNALS

    def __enter__(self):
        self.received, self.previous = None, {}
        try:
            self.previous = {s: signal.signal(s, self._on_signal) for s in self.SIGNALS}
        except ValueError:   # not the main thread: signals cannot be caught here
            pass
        if _recorded:
            self.received = _recorded[-1]
            _recorded.clear()
        self.group = dist.cpu_group()
        return self

    def _on_signal(self, signum, frame):
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def requested(self):
        flag = torch.tensor([float(self.received is not None)])
        if dist.is_dist():
            torch.distributed.all_reduce(flag, torch.distributed.ReduceOp.MAX, group=self.group)
        return bool(flag)

    def stop(self, step, output_dir, save=None):
        """At a point where the run may stop (after a step, after an evaluation): True when a signal
        reached any rank, after `save()` (checkpoint_last.pt, on every rank) and a log line. A
        collective: every rank calls it at the same points."""
        if not self.requested():
            return False
        if save:
            save()
        if dist.is_main():
            print(f"{self.received or 'a signal on another rank'}: stopped after step {step}, saved "
                  f"{os.path.join(output_dir, 'checkpoint_last.pt')}; --resume auto continues", flush=True)
        return True


def evaluation_pending(ckpt, steps_per_epoch, total_steps):
    """1 if the run being resumed stopped at the end of an epoch (or of training) before that
    epoch's evaluation finished (a signal on the epoch's last step, or during the evaluation):
    the resumed run evaluates it first. 0 otherwise (or for checkpoints without "evaluated")."""
    if not ckpt:
        return 0
    step = ckpt["step"]
    at_end = step > 0 and (step % steps_per_epoch == 0 or step >= total_steps)
    return int(at_end and ckpt.get("evaluated", step) < step)


def load_scaler_state(scaler, state):
    """The GradScaler state of the run being resumed. A bf16 / fp32 run's disabled scaler saved {}:
    resumed with --precision fp16, the scaler starts afresh (GradScaler refuses an empty state)."""
    if state:
        scaler.load_state_dict(state)


class NonFiniteGuard:
    """Skips the update of a step whose loss or gradient norm is not finite, counts it, names the
    first module whose output went non-finite the first time it happens (as transformers'
    DebugUnderflowOverflow), and aborts after `max_bad` such steps in a row.

    `ok = guard.check(loss, grad_norm, scaler)` is a 0-d bool on the device, the same on every
    rank; `guard.step(optimizer, scaler, ok)` skips on the device (fused AdamW's found_inf), the
    momentum encoders and queues take `ok` the same way, so a GPU step never waits for the host.
    `guard.account(step, ok, diagnose)` does the host-side bookkeeping: on CUDA one step late
    (the flag is copied asynchronously), on CPU at once."""

    def __init__(self, max_bad):
        self.max_bad, self.total, self.in_a_row, self.culprit = max_bad, 0, 0, None
        self.pending = None

    def state_dict(self):
        """The counts for a checkpoint, the step in flight counted first (flush): `bad_steps` in all,
        `bad_in_a_row` up to now, so that --max-bad-steps goes on counting after a resume."""
        self.flush()
        return {"bad_steps": self.total, "bad_in_a_row": self.in_a_row}

    def load_state_dict(self, state):
        self.total, self.in_a_row = state["bad_steps"], state.get("bad_in_a_row", 0)

    @staticmethod
    def check(loss, grad_norm, scaler):
        bad = ~torch.isfinite(loss.detach())
        if not scaler.is_enabled():          # fp16: an overflowing gradient is the scaler's business
            bad = bad | ~torch.isfinite(grad_norm)
        return ~dist.any_rank(bad)

    @staticmethod
    def step(optimizer, scaler, ok):
        if scaler.is_enabled():              # a non-finite loss has non-finite gradients: the scaler skips
            scaler.step(optimizer)
            scaler.update()
            return
        optimizer.found_inf = (~ok).float()
        optimizer.step()
        del optimizer.found_inf

    def account(self, step, ok, diagnose):
        """Host bookkeeping for `step`; `diagnose()` re-runs that step's forward and names the culprit."""
        if ok.device.type != "cuda":
            self._count(step, bool(ok), diagnose)
            return
        flag = torch.empty((), dtype=torch.bool, pin_memory=True)
        flag.copy_(ok, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.flush()                     # the previous step's flag: its copy finished while this step ran
        self.pending = (step, flag, event, diagnose)

    def flush(self):
        if self.pending:
            step, flag, event, diagnose = self.pending
            self.pending = None
            event.synchronize()
            self._count(step, bool(flag), diagnose)

    def _count(self, step, ok, diagnose):
        if ok:
            self.in_a_row = 0
            return
        self.total += 1
        self.in_a_row += 1
        if self.culprit is None:
            self.culprit = diagnose()
        if dist.is_main():
            print(f"step {step}: non-finite loss or gradient norm, update skipped ({self.total} so far); "
                  f"first non-finite output on that batch: {self.culprit}", flush=True)
        if self.in_a_row >= self.max_bad:
            raise RunAborted(f"{self.in_a_row} non-finite steps in a row, the last at step {step} (--max-bad-steps "
                             f"{self.max_bad}); first non-finite output: {self.culprit}")


def first_nonfinite_module(model, inputs, forward):
    """Re-run `forward()` (no grad, RNG untouched) with a forward hook on every sub-module and
    return the name of the first one, in execution order, whose output holds a NaN or inf;
    `inputs` {name: tensor} are checked first."""
    for name, t in inputs.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return f"the input {name}"
    found = []

    def hook(name):
        def fn(module, args, output):
            outs = output if isinstance(output, (tuple, list)) else (output,)
            if not found and any(torch.is_tensor(o) and o.is_floating_point() and not bool(torch.isfinite(o).all())
                                 for o in outs):
                found.append(f"{name} ({type(module).__name__})")
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            forward()
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else "none (the forward is finite: the loss or the backward overflowed)"


# ---- gradient accumulation ----

def micro_batches(loader, k):
    """Groups of `k` consecutive batches of `loader` (one optimizer step each); a last incomplete
    group is dropped, as the loaders drop a last incomplete batch."""
    group = []
    for batch in loader:
        group.append(batch)
        if len(group) == k:
            yield group
            group = []


def sync_gradients(model, last):
    """DDP all-reduces (FSDP reduce-scatters) gradients in the backward of the last micro-batch only:
    one reduction per optimizer step, of the summed micro-batch gradients (FSDP2's
    set_requires_gradient_sync, DDP's no_sync)."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()


@contextlib.contextmanager
def _seeded(seed):
    """Run the block on the CPU (and this GPU's) generator seeded with `seed`; the generators'
    states outside it are untouched."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        if devices:
            torch.cuda.manual_seed(seed)
        yield


class FeatureCache:
    """open_clip's accum_freq for a contrastive loss over K micro-batches.

    Pass 1 (`FeatureCache(forward, batches)`): every micro-batch's features {name: (B, ...)} without
    gradient, each micro-batch on its own random stream (a seed drawn from the run's generator).
    Pass 2, for each micro-batch j: within `replay(j)` (that stream again: the same dropout draws as
    pass 1, and what the step draws after the features, ITM negatives say, is its own) the caller
    runs the forward again with gradient, and `features(j, live)` puts those features in j's place
    among the cached ones, (K*B, ...) each. The loss over K*B is then the loss of one K*B batch, and
    as only micro-batch j's features carry gradient in pass j, the K backward passes sum to exactly
    that batch's gradient. With K = 1, or no `forward` (nothing contrastive to cache), there is no
    pass 1 (`active` is False): replay changes nothing and features are the live ones."""

    def __init__(self, forward, batches):
        self.cache, self.seeds = [None] * len(batches), [None] * len(batches)
        self.active = forward is not None and len(batches) > 1
        if not self.active:
            return
        with torch.no_grad():
            for j, batch in enumerate(batches):
                self.seeds[j] = int(torch.randint(1 << 62, ()))
                with self.replay(j):
                    self.cache[j] = {k: v.detach() for k, v in forward(batch).items()}

    def replay(self, j):
        return contextlib.nullcontext() if self.seeds[j] is None else _seeded(self.seeds[j])

    def micro(self, j, tokens=None):
        """Micro-batch j's MicroBatch (a context manager: pass 2 of j runs inside it)."""
        return MicroBatch(j, len(self.cache), tokens, self)

    def features(self, j, live):
        """{name: (K*B, ...)}: micro-batch j's from `live` (with gradient), the others' from pass 1."""
        if not self.active:
            return live
        return {k: torch.cat([c[k] for c in self.cache[:j]] + [v] + [c[k] for c in self.cache[j + 1:]])
                for k, v in live.items()}


@dataclasses.dataclass
class MicroBatch:
    """What a loss needs to know about its micro-batch so that the K backward passes of --accum-steps
    K sum to one K x B step, and nothing else: the model's `forward(batch, micro)` reads these fields,
    never the cache. `MicroBatch()` is a whole step (K = 1). As a context manager it replays the
    micro-batch's random stream of pass 1 (`FeatureCache.replay`).

    index, count: j and K. `last`: the pass that takes a parameter's gradient once per step (the
    temperature is in every pass). `tokens`: the step's target-token count over all ranks and
    micro-batches (a token-mean text loss divides its sum by it; None: by its own count).
    `accumulating`: the contrastive features come from the cache (K > 1 with a feature pass).
    `features(live)`: {name: (K*B, ...)} with this micro-batch's live (gradient) features in place."""
    index: int = 0
    count: int = 1
    tokens: "torch.Tensor | None" = None
    cache: "FeatureCache | None" = dataclasses.field(default=None, repr=False)

    @property
    def last(self):
        return self.index == self.count - 1

    @property
    def accumulating(self):
        return self.cache is not None and self.cache.active

    def features(self, live):
        return self.cache.features(self.index, live) if self.accumulating else live

    def __enter__(self):
        self._replay = self.cache.replay(self.index) if self.cache is not None else contextlib.nullcontext()
        self._replay.__enter__()
        return self

    def __exit__(self, *exc):
        return self._replay.__exit__(*exc)


# ---- logging ----

class MetricLog:
    """Appends one JSON object per line to output_dir/metrics.jsonl (rank 0 only), and sends the same
    records to TensorBoard (output_dir/tensorboard) and/or Weights & Biases with `report_to`
    ("tensorboard", "wandb" or both, comma-separated), each imported only when asked: a scalar
    `<split>/<name>` per number at the record's step. wandb follows its own settings (WANDB_MODE=offline
    logs without a network; WANDB_PROJECT overrides `project`); a resumed run (`resumed`) continues the
    same wandb run (its id is kept in output_dir/wandb_run_id), a new run in the same folder starts
    another (wandb would drop the steps it had already seen)."""

    def __init__(self, output_dir, report_to="", config=None, project="vlp", resumed=False):
        wanted = [x.strip() for x in report_to.split(",") if x.strip()]
        for name in wanted:                  # every rank checks, so that no rank waits for a failed one
            if name not in ("tensorboard", "wandb"):
                raise UserError(f"--report-to {name!r}: expected tensorboard, wandb or both (comma-separated)")
            if importlib.util.find_spec(name) is None:
                raise UserError(f"--report-to {name} needs the {name} package: pip install {name}")
        self.project = project               # the method; checkpoints carry it (an --export checks it)
        self.path = os.path.join(output_dir, "metrics.jsonl") if dist.is_main() else None
        self.tensorboard = self.wandb = None
        if not dist.is_main():
            return
        if "tensorboard" in wanted:
            from torch.utils.tensorboard import SummaryWriter
            self.tensorboard = SummaryWriter(os.path.join(output_dir, "tensorboard"))
        if "wandb" in wanted:
            import wandb
            id_file = os.path.join(output_dir, "wandb_run_id")
            run_id = open(id_file).read().strip() if resumed and os.path.isfile(id_file) else secrets.token_hex(4)
            with open(id_file, "w") as f:
                f.write(run_id)
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", project), id=run_id, resume="allow",
                                    dir=output_dir, name=os.path.basename(os.path.abspath(output_dir)), config=config,
                                    reinit="finish_previous")

    def write(self, record):
        if not self.path:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {f"{record['split']}/{k}": v for k, v in record.items()
                   if k not in ("step", "split") and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tensorboard:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, record["step"])
            self.tensorboard.flush()
        if self.wandb:
            self.wandb.log(scalars, step=record["step"])


def save_config(cfg, output_dir):
    if dist.is_main():
        with open(os.path.join(output_dir, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2)


def concat_json_lines(parts, path):
    """One JSON array in `path`, laid out as json.dump(records, f, indent=1), from JSON-lines files
    read in order and deleted, one record in memory at a time; atomic (a temporary file renamed)."""
    first = True
    with open(path + ".tmp", "w") as out:
        out.write("[")
        for name in parts:
            with open(name) as f:
                for line in f:
                    record = json.dumps(json.loads(line), indent=1).replace("\n", "\n ")
                    out.write(("\n " if first else ",\n ") + record)
                    first = False
        out.write("]" if first else "\n]")
    os.replace(path + ".tmp", path)
    for name in parts:
        os.remove(name)


def sample_negatives(weights):
    """One index per row, drawn with probability proportional to `weights` (B, N), by the
    exponential trick: argmax_j w_j / E_j with E_j ~ Exp(1) picks j with probability w_j / sum(w),
    as torch.multinomial, without its host syncs. Rows with no mass left (a batch of one, every
    candidate sharing the image id, NaN similarities) draw uniformly instead of failing."""
    weights = torch.nan_to_num(weights.float(), nan=0.0, posinf=0.0, neginf=0.0).clamp_(min=0)
    weights = torch.where(weights.sum(1, keepdim=True) > 0, weights, 1.0)   # no boolean indexing
    noise = torch.empty_like(weights).exponential_().clamp_(min=1e-30)   # E = 0: 0/0 = NaN
    return (weights / noise).argmax(1)
