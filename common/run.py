"""The run machinery every training script shares, as plain functions over one `Run` record: start a
run (schedule, scaler, non-finite guard, and a resumed run's state), the guarded optimizer step, the
train log line, the preemption exit, checkpoints (the collectives inside), the end of an epoch
(save, evaluate, keep the best) and the end of the run. The loop itself (micro-batches -> forward ->
backward -> step) is written out in each script's main():

    run = start_run(cfg, model, optimizer, loader, sampler, log, ckpt, precision)
    with Preemption() as preemption:
        for batches in epochs(run, loader):
            for group in batches:
                ...                                   # the method: forward and backward per micro-batch
                ok, grad_norm = optimizer_step(run, loss, diagnose)
                log_train(run, {"loss": loss}, grad_norm)
                if step_done(run, preemption):
                    break
            end_epoch(run, evaluate, "r_mean", preemption)
    return finish(run, evaluate)
"""
import dataclasses
import json
import os
import time

import torch
from tqdm import tqdm

from . import dist
from .config import check_resume_position
from .utils import (MetricLog, NonFiniteGuard, check_finite, cosine_schedule,
                    evaluation_pending, grad_norm_, load_scaler_state, micro_batches, rng_state,
                    save_checkpoint, save_config, seed_everything, set_rng_state)


@dataclasses.dataclass
class Run:
    """What the loop carries from step to step and what a checkpoint holds besides the weights."""
    cfg: object
    model: torch.nn.Module           # the unwrapped model (saved, evaluated); the step runs its DDP/FSDP wrapper
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    guard: NonFiniteGuard
    sampler: object                  # the training sampler or shard stream (set_epoch, state_dict, stats)
    log: MetricLog
    steps_per_epoch: int
    total_steps: int
    keep: object = None              # the state-dict keys a checkpoint holds (None: all; BLIP-2: the trained ones)
    extra: dict = dataclasses.field(default_factory=dict)   # more checkpoint fields (BLIP-2's fingerprints)
    step: int = 0
    epoch: int = 0
    best: float = -1.0               # the best value of the evaluation metric that picks checkpoint_best.pt
    evaluated: int = 0               # the step whose evaluation last finished
    metrics: dict = dataclasses.field(default_factory=dict)
    stopped: bool = False            # a signal: the loop ends after saving
    pbar: object = None
    tick: float = 0.0                # time and step of the last train log line (samples/s)
    tick_step: int = 0


def open_log(cfg, project, resumed):
    """The output folder, its config.json (the settled config) and the metrics log."""
    os.makedirs(cfg.output_dir, exist_ok=True)
    save_config(cfg, cfg.output_dir)
    return MetricLog(cfg.output_dir, cfg.report_to, dataclasses.asdict(cfg), project=project, resumed=resumed)


def eval_only(log, ckpt, evaluate):
    """--eval-only: evaluate the loaded weights once, log and print the metrics."""
    metrics = evaluate()
    log.write({"step": ckpt["step"] if ckpt else 0, "epoch": 0, "split": "val", **metrics})
    if dist.is_main():
        print(json.dumps(metrics))
    dist.cleanup()
    return metrics


def start_run(cfg, model, optimizer, loader, sampler, log, ckpt, precision, keep=None, extra=None):
    """The schedule (linear warm-up, from cfg.warmup_lr when the Config has one, then cosine to
    cfg.min_lr or 0, per step), the fp16 GradScaler, the non-finite guard, each rank's own random
    stream from here on (seed + rank), and for a resumed run (`ckpt`) every piece of its state: the
    optimizer, schedule, scaler, step, best metric, bad-step counts, each rank's RNG and data position."""
    steps_per_epoch = len(loader) // cfg.accum_steps
    check_resume_position(ckpt, steps_per_epoch)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    warmup_lr, min_lr = getattr(cfg, "warmup_lr", 0.0), getattr(cfg, "min_lr", 0.0)
    scheduler = cosine_schedule(optimizer, cfg.warmup_steps, total_steps,
                                warmup_from=warmup_lr / cfg.lr if warmup_lr else None,
                                final=min_lr / cfg.lr if min_lr else 0.0)
    device_type = next(model.parameters()).device.type
    scaler = torch.amp.GradScaler(device_type, enabled=precision == "fp16")
    run = Run(cfg, model, optimizer, scheduler, scaler, NonFiniteGuard(cfg.max_bad_steps), sampler, log,
              steps_per_epoch, total_steps, keep=keep, extra=extra or {})
    rank, world_size = dist.rank(), dist.world_size()
    seed_everything(cfg.seed + rank)              # each rank its own stream from here (dropout, masks, negatives)
    if ckpt:
        dist.load_optimizer_state_dict(model, optimizer, ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        load_scaler_state(scaler, ckpt["scaler"])     # {} from a bf16/fp32 run: a fresh scale
        run.step, run.best = ckpt["step"], ckpt["best"]
        run.guard.load_state_dict(ckpt)               # bad steps in all and in a row
        set_rng_state(ckpt["rng"][rank])
        sampler.load_state_dict(ckpt.get("data", [{}] * world_size)[rank])   # shards: the stream position
        if dist.is_main():
            print(f"resumed from {cfg.resume} at step {run.step}")
    # a run stopped at the end of an epoch before its evaluation (a signal) evaluates it first
    run.evaluated = run.step - evaluation_pending(ckpt, steps_per_epoch, total_steps)
    run.pbar = tqdm(total=total_steps, initial=run.step, disable=not dist.is_main(), dynamic_ncols=True)
    run.tick, run.tick_step = time.time(), run.step
    return run


def epochs(run, loader):
    """One item per epoch still to train: its groups of --accum-steps batches (one optimizer step
    each), from the step a resumed run stopped at; none for an epoch that ended before its evaluation
    did (a resumed run evaluates it first)."""
    while (run.step < run.total_steps or run.evaluated < run.step) and not run.stopped:
        unevaluated = run.evaluated < run.step
        run.epoch = (run.step - unevaluated) // run.steps_per_epoch
        done = (run.step - run.epoch * run.steps_per_epoch) * run.cfg.accum_steps * run.cfg.batch_size
        run.sampler.set_epoch(run.epoch, skip=done)
        yield () if unevaluated else micro_batches(loader, run.cfg.accum_steps)


def optimizer_step(run, loss, diagnose):
    """Unscale (fp16), clip (--grad-clip-norm), and update unless the loss or the gradient norm is
    not finite on some rank (skipped on the device, no host sync); then the schedule. `diagnose()`
    names the first non-finite module, called the first time a step is skipped. Returns the step's
    `ok` flag (0-d bool: momentum encoders and queues take it) and its gradient norm."""
    run.scaler.unscale_(run.optimizer)
    grad_norm = grad_norm_(run.model, run.cfg.grad_clip_norm)
    ok = run.guard.check(loss, grad_norm, run.scaler)
    run.guard.step(run.optimizer, run.scaler, ok)
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    run.step += 1
    run.pbar.update(1)
    run.guard.account(run.step, ok, diagnose)
    return ok, grad_norm


def log_train(run, losses, grad_norm, extra=None):
    """Every --log-every steps (and the last): the losses averaged over ranks, the learning rate
    (the largest group's), samples/s, the gradient norm and the skipped steps, plus `extra()`
    {name: value} (a temperature), to metrics.jsonl and the progress bar."""
    if run.step % run.cfg.log_every and run.step != run.total_steps:
        return
    values = {k: dist.all_reduce_mean(v).item() for k, v in losses.items()}
    cfg = run.cfg
    speed = (run.step - run.tick_step) * cfg.accum_steps * cfg.batch_size * dist.world_size() / (time.time() - run.tick)
    run.tick, run.tick_step = time.time(), run.step
    lr = max(g["lr"] for g in run.optimizer.param_groups)
    run.pbar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.2e}", samples_s=f"{speed:.0f}")
    run.log.write({"step": run.step, "epoch": run.epoch, "split": "train", **values, "lr": lr,
                   **(extra() if extra else {}), "samples_per_s": speed, "grad_norm": grad_norm.item(),
                   "bad_steps": run.guard.total, **run.sampler.stats()})


def checkpoint(run, name):
    """Save output_dir/name (atomically, rank 0) with everything a resumed run needs. A collective:
    under FSDP the weights and the optimizer state are gathered to rank 0, in a non-FSDP run's layout;
    every rank's RNG state and data position are gathered too."""
    check_finite(run.model)
    state = {"model": dist.full_state_dict(run.model, run.keep),
             "optimizer": dist.optimizer_state_dict(run.model, run.optimizer),
             "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict(), "step": run.step,
             "epoch": run.step // run.steps_per_epoch, "best": run.best, **run.guard.state_dict(),
             "evaluated": run.evaluated, "steps_per_epoch": run.steps_per_epoch,
             "world_size": dist.world_size(), "config": dataclasses.asdict(run.cfg), **run.extra,
             "method": run.log.project,
             "rng": dist.gather_objects(rng_state()), "data": dist.gather_objects(run.sampler.state_dict())}
    if dist.is_main():
        save_checkpoint(os.path.join(run.cfg.output_dir, name), state)


def step_done(run, preemption):
    """After a step: True when the epoch loop must end, because a signal reached some rank (this step
    is saved first) or training is over; checkpoint_last.pt every --save-every steps."""
    if preemption.stop(run.step, run.cfg.output_dir, lambda: checkpoint(run, "checkpoint_last.pt")):
        run.stopped = True
        return True
    if run.step % run.cfg.save_every == 0 and run.step % run.steps_per_epoch:
        checkpoint(run, "checkpoint_last.pt")
    return run.step >= run.total_steps


def end_epoch(run, evaluate, key, preemption):
    """The end of an epoch (or of training): save first, so that a signal during the evaluation loses
    no step (resumed, the run evaluates this epoch first); evaluate on every rank (FSDP: with every
    unit gathered); keep checkpoint_best.pt by metric `key` (a name, or a function of the metrics);
    save again. Nothing when a signal stopped the epoch."""
    if run.stopped:
        return
    checkpoint(run, "checkpoint_last.pt")
    with dist.full_parameters(run.model):
        run.metrics = evaluate()
    run.log.write({"step": run.step, "epoch": run.epoch, "split": "val", **run.metrics})
    if run.metrics and dist.is_main():
        tqdm.write(f"epoch {run.epoch} step {run.step}: "
                   + " ".join(f"{k} {v:.3f}" for k, v in run.metrics.items()))
    name = key(run.metrics) if callable(key) else key
    if dist.gather_objects(run.metrics.get(name, -1.0) > run.best)[0]:   # rank 0 decides for all
        run.best = run.metrics[name]
        checkpoint(run, "checkpoint_best.pt")
    run.evaluated = run.step
    checkpoint(run, "checkpoint_last.pt")
    run.stopped = preemption.stop(run.step, run.cfg.output_dir)   # a signal during the evaluation
    run.tick, run.tick_step = time.time(), run.step               # samples/s counts training only


def finish(run, evaluate):
    """The end of the run: a resumed finished run evaluates its weights again; print the final metrics
    as the last line (JSON), leave the process group."""
    run.pbar.close()
    if not run.metrics and not run.stopped:
        with dist.full_parameters(run.model):
            run.metrics = evaluate()
    if dist.is_main():
        print(json.dumps(run.metrics or {"step": run.step}))
    dist.cleanup()
    return run.metrics
