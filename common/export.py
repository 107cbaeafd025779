"""--export: a run's weights written in the format another library loads with its own call
(transformers' from_pretrained, open_clip's `local-dir:`, the official .pth layouts). What every
method's exporter (common/weights/<method>.py) shares: the source checkpoint's check, the inverse
of encoders.load_mapped, the folder written whole or not at all, safetensors, the tokenizer with
the special tokens our rows carry, and the model card (README.md) a hub upload expects."""
import copy
import dataclasses
import json
import os
import shlex
import shutil
from contextlib import contextmanager

import torch

from . import dist
from .config import RESUME_FRESH
from .data import tiny_root
from .utils import UserError


# Where the run's files are, not what it was: given with --export, these win (a tokenizer or LM on a
# machine without the hub, a copy of the data) and a wrong one fails on loading or its checks
WHERE = ("tokenizer", "llm", "vision_weights", "init_text", "image_root", "train_data", "val_data", "zeroshot_data")


def export_source(init, ckpt, cfg, method, fields, presets, mutable=()):
    """What an --export writes from: one of `method`'s own checkpoints (--init-from, or --resume:
    `ckpt`), or published weights the script loads (converted as they are). Returns {path,
    config, step, script, command} for the model card. Another script's checkpoint (its `method`;
    for one saved before checkpoints carried it, a missing architecture field of `fields`), or no
    weights at all, is a one-line error. Call it before the architecture is read from `init`.

    The export is of that run: cfg takes the checkpoint's config. A field the command line sets is
    kept where a resumed run could change it (how it evaluates and generates: the script's
    resume-mutable fields, `mutable`) or where it says where files are (WHERE); anywhere else a
    value other than the checkpoint's is a one-line error, as on --resume, never silently dropped."""
    script = f"{method}_train.py"
    if dist.world_size() > 1:
        raise UserError(f"--export runs in one process: python {script} ..., not torchrun")
    kind, saved = init if ckpt is None else ("ours", ckpt)
    path = cfg.init_from if ckpt is None else cfg.resume
    if kind is None:
        raise UserError(f"--export writes trained weights: pass --init-from CHECKPOINT (or --resume) "
                        f"to {script}")
    if kind != "ours":
        return {"path": path, "config": None, "step": None, "script": script, "command": None}
    other = saved.get("method")
    if other is not None and other != method:
        article = "an" if other[0] in "aeiou" else "a"
        raise UserError(f"{path} is {article} {other} checkpoint: export it with {other}_train.py, "
                        f"not {script}")
    missing = [k for k in fields if k not in saved["config"]]
    if missing:
        raise UserError(f"{path} is not a {script} checkpoint (its config lacks {', '.join(missing[:3])})")
    # the export is of that run: its loss (SigLIP's bias), preset, text clean-up, ... (not this command's)
    given, kept = getattr(cfg, "given_keys", set()), {*getattr(cfg, "mutable_keys", ()), *mutable, *WHERE}
    for key, value in saved["config"].items():
        if not hasattr(cfg, key) or key in RESUME_FRESH or (key in given and key in kept):
            continue
        if key in given and getattr(cfg, key) != value:
            raise UserError(f"--{key.replace('_', '-')} {getattr(cfg, key)} differs from {value!r} of {path}: an export "
                            f"is of the run as trained; leave the flag out")
        setattr(cfg, key, value)
    return {"path": path, "config": saved["config"], "step": saved.get("step"), "script": script,
            "command": reproduce_command(script, saved["config"], type(cfg), presets)}


def export_state(ours, mapping, target, *, source, skip=()):
    """The inverse of encoders.load_mapped: the target library's state dict from our `ours` through
    `mapping` {our key: their key | a tuple of their keys, split from ours on dim 0 (fused q, k, v)}.
    `target` is the target model's own state dict (a freshly built one): it gives every shape and
    dtype. Every target key must be written except those containing a `skip` substring (buffers
    such as position_ids); a key or a shape that does not fit is an error naming it."""
    out = {}
    for key, dst in mapping.items():
        if key not in ours:
            raise UserError(f"{source}: our model has no '{key}' to export")
        dsts = dst if isinstance(dst, tuple) else (dst,)
        unknown = [d for d in dsts if d not in target]
        if unknown:
            raise UserError(f"{source}: the target has no key '{unknown[0]}' (for our '{key}')")
        value = ours[key].detach().cpu()
        parts = torch.split(value, [target[d].shape[0] for d in dsts]) if len(dsts) > 1 else (value,)
        for d, part in zip(dsts, parts):
            if part.numel() != target[d].numel():
                raise UserError(f"{source}: our '{key}' {tuple(value.shape)} does not fit the target's "
                                f"'{d}' {tuple(target[d].shape)}")
            out[d] = part.reshape(target[d].shape).to(target[d].dtype).clone()
    missing = sorted(k for k in target if k not in out and not any(s in k for s in skip))
    if missing:
        raise UserError(f"{source}: nothing of ours maps to the target's {missing[:5]}")
    return out


@contextmanager
def new_folder(folder):
    """Write the export into `folder`.tmp and rename it at the end: an interrupted export leaves no
    folder that looks whole. An existing non-empty folder is refused (nothing is overwritten)."""
    if os.path.isdir(folder) and os.listdir(folder) or os.path.isfile(folder):
        raise UserError(f"--export {folder} exists and is not empty: choose a new folder")
    tmp = folder.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.isdir(folder):
        os.rmdir(folder)
    os.replace(tmp, folder)


def save_safetensors(state, path):
    """A safetensors file of contiguous, unshared tensors (tied weights are stored twice)."""
    from safetensors.torch import save_file
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in state.items()}, path,
              metadata={"format": "pt"})


def save_json(obj, path):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def save_tokenizer(tokenizer, folder, context_length, **extra_config):
    """Our tokenizer's files, so that the target's own call gives our rows: its post-processor adds
    the BOS/CLS and EOS/SEP ids our Tokenizer puts around every text (the tiny WordLevel tokenizer
    adds none by itself), and model_max_length is the context length. `extra_config`: more
    tokenizer_config.json entries (e.g. a bos_token the target reads)."""
    from tokenizers import processors
    tok = copy.deepcopy(tokenizer.tok)
    bos, eos = (tok.convert_ids_to_tokens(i) for i in (tokenizer.bos_id, tokenizer.eos_id))
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} $B:1 {eos}:1",
        special_tokens=[(bos, tokenizer.bos_id), (eos, tokenizer.eos_id)])
    tok.model_max_length = context_length
    if tok.pad_token is None:                   # ours pads with pad_id (0 without a pad token)
        tok.pad_token = tok.convert_ids_to_tokens(tokenizer.pad_id)
    for key, value in extra_config.items():
        setattr(tok, key, value)
    tok.save_pretrained(folder)
    return tok


def reproduce_command(script, saved, config_cls, presets):
    """A command line that trains the same run: the preset and every field that differs from it
    (values shell-quoted), its --init-from included."""
    base = dataclasses.asdict(config_cls(**presets.get(saved.get("preset", "tiny"), {})))
    # where it ran, and what the script derives from the tokenizer
    skip = {"output_dir", "resume", "eval_only", "export", "export_format", "preset", "vocab_size",
            "eos_id", "pad_id"}
    if not any(saved.get(k) for k in ("train_data", "val_data", "zeroshot_data")):
        # the built-in data: its tokenizer (and other files) are the default
        skip |= {k for k, v in saved.items() if isinstance(v, str) and v.startswith(tiny_root())}
    args = [f"python {script}", f"--preset {saved.get('preset', 'tiny')}"]
    for key, value in saved.items():
        if key in skip or key not in base or base[key] == value:
            continue
        flag = "--" + key.replace("_", "-")
        args.append(flag if value is True else f"--no-{flag[2:]}" if value is False
                    else f"{flag} {shlex.quote(str(value))}")
    return " \\\n    ".join(args)


def final_metrics(source):
    """The evaluation record of the checkpoint's step in metrics.jsonl beside it (else the last one)."""
    path = os.path.join(os.path.dirname(os.path.abspath(source["path"])), "metrics.jsonl")
    if source["config"] is None or not os.path.isfile(path):
        return None
    with open(path) as f:
        records = [r for r in map(json.loads, filter(str.strip, f)) if r.get("split") != "train"]
    same = [r for r in records if r.get("step") == source["step"]]
    return (same or records or [None])[-1]


def model_card(folder, *, title, method, source, target, load, library, tags=(), differences=()):
    """README.md as a hub upload expects: front matter, the method, the run (preset, data, steps),
    the final metrics from metrics.jsonl, how to load the folder, the command that trained it and
    what the target computes differently (`differences`, one line each)."""
    saved, script = source["config"], source["script"]
    lines = ["---", f"library_name: {library}", "tags:"]
    lines += [f"- {t}" for t in (method, "vision-language", *tags)] + ["---", "", f"# {title}", ""]
    if saved is None:
        lines += [f"Converted by `{script} --export` from `{source['path']}` (published weights, no run).", ""]
    else:
        data = saved.get("train_data") or "the built-in tiny set"
        lines += [f"Trained with `{script}` ({method}), exported with `--export` as {target}.", "",
                  "| preset | training data | steps |", "|---|---|---|",
                  f"| {saved.get('preset')} | {data} | {source['step']} |", ""]
        metrics = final_metrics(source)
        if metrics:
            lines += [f"## Metrics (step {metrics.get('step')}, split {metrics.get('split')})", "",
                      "| metric | value |", "|---|---|"]
            lines += [f"| {k} | {f'{v:.2f}' if isinstance(v, float) else v} |" for k, v in metrics.items()
                      if k not in ("step", "epoch", "split") and isinstance(v, (int, float))
                      and not k.endswith(("_s", "_pairs"))]                    # timings and counts
            lines.append("")
    lines += ["## Load", "", "```python", load.strip(), "```", ""]
    if saved is not None:
        lines += ["## Train it again", "", "```", source["command"], "```", ""]
    if differences:
        lines += ["## What the target computes differently", ""] + [f"- {d}" for d in differences] + [""]
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write("\n".join(lines))
