"""Small training utilities every script uses the same way: config from the command line,
optimiser parameter groups, warm-up + cosine schedule, precision, atomic checkpoints, RNG
state, and the metrics log."""
import argparse
import dataclasses
import json
import math
import os
import random

import numpy as np
import torch

from . import dist


def parse_config(config_cls, presets, argv=None, description=None):
    """argparse generated from a Config dataclass: `--field-name` for `field_name`, booleans as
    `--flag/--no-flag`. The preset's values are applied first, the command line over them."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(config_cls):
        name = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            parser.add_argument(name, action=argparse.BooleanOptionalAction, default=None)
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            parser.add_argument(name, type=typ, default=None, metavar=f.name.upper(),
                                choices=list(presets) if f.name == "preset" else None)
    args = parser.parse_args(argv)
    preset = args.preset or config_cls.preset
    cfg = config_cls(**{**presets[preset], "preset": preset})
    given = {key: value for key, value in vars(args).items() if value is not None}
    for key, value in given.items():
        setattr(cfg, key, value)
    cfg.cli_keys = set(given)  # what the user set explicitly (not a dataclass field: never saved)
    return cfg


def param_groups(model, weight_decay, extra_no_decay=()):
    """AdamW groups: no weight decay on biases, norms, embeddings, 1-D tensors and the named
    extras (e.g. logit_scale), as open_clip's exclude_from_wd plus the embedding tables."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "embedding" in name or any(e in name for e in extra_no_decay):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def cosine_schedule(optimizer, warmup_steps, total_steps):
    """Linear warm-up from lr/warmup to lr over `warmup_steps`, then cosine to 0 at `total_steps`
    (open_clip scheduler.py: base * (step + 1) / warmup, then 0.5 * (1 + cos(pi * progress)))."""
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def resolve_precision(precision, device):
    """'auto' -> bf16 on CUDA GPUs that support it, fp32 otherwise (CPU bf16 matmul is slow)."""
    if precision == "auto":
        # native bf16 only (Ampere and newer); V100/T4 would emulate it slowly
        return ("bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
                else "fp32")
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"--precision must be auto, fp32, bf16 or fp16, not {precision!r}")
    return precision


def autocast(precision, device):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def rng_state():
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(path, state):
    """Atomic: write to a temporary file, then os.replace, so a crash mid-write never leaves a
    truncated checkpoint where --resume auto would find it."""
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def resume_path(resume, output_dir):
    """--resume auto -> output_dir/checkpoint_last.pt if it exists (else None); a path -> itself."""
    if not resume:
        return None
    if resume == "auto":
        path = os.path.join(output_dir, "checkpoint_last.pt")
        return path if os.path.isfile(path) else None
    if not os.path.isfile(resume):
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint")
    return resume


class MetricLog:
    """Appends one JSON object per line to output_dir/metrics.jsonl (rank 0 only)."""

    def __init__(self, output_dir):
        self.path = os.path.join(output_dir, "metrics.jsonl") if dist.is_main() else None

    def write(self, record):
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def save_config(cfg, output_dir):
    if dist.is_main():
        with open(os.path.join(output_dir, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2)
