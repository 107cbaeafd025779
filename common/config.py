"""The fields every training script shares (run, data, optimisation), documented once. Each script's
`Config(BaseConfig)` adds its method's fields (model, losses, evaluation) and sets the defaults it
changes; the command line is generated from the fields and their comments (build_parser), and
resolve_config settles a run's values: defaults, preset, task recipe, command line, checkpoint."""
import argparse
import dataclasses
import inspect
import re
from dataclasses import dataclass

from . import dist
from .utils import UserError, load_checkpoint_everywhere, resume_path


@dataclass
class BaseConfig:
    preset: str = "tiny"            # tiny (the built-in data, CPU) or a paper configuration; see the list below
    # data
    train_data: str = ""            # annotation file (JSON or CSV), or webdataset shards such as
                                    # "shards/{00000..00999}.tar" (sources joined with ::); empty: tiny
    val_data: str = ""              # evaluation split; empty with tiny: its val split
    image_root: str = ""            # folder relative image paths start from (default: the file's)
    tokenizer: str = ""             # transformers tokenizer folder or name; empty: tiny's / --init-from's
    skip_bad: bool = False          # skip (and count) unreadable images and empty captions
    train_num_samples: int = 0      # shards: samples per epoch; 0: the sizes.json beside the shards
    dataset_resampled: bool = False  # shards: draw them with replacement (open_clip's flag)
    workers: int = 2                # data-loading processes per rank
    # optimisation
    epochs: int = 1                 # passes over the training data
    max_steps: int = 0              # >0: train exactly this many steps (overrides epochs)
    batch_size: int = 32            # per process; the optimizer step sees batch_size * accum_steps * world_size
    accum_steps: int = 1            # micro-batches per optimizer step (contrastive losses: a feature cache)
    lr: float = 3e-4                # peak learning rate (after warm-up)
    weight_decay: float = 0.05      # AdamW decoupled weight decay
    warmup_steps: int = 50          # linear warm-up steps, then cosine to --min-lr (or 0)
    grad_clip_norm: float = 0.0     # 0: off
    seed: int = 0                   # weights start from `seed` on every rank; rank r trains with seed + r
    precision: str = "auto"         # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16 (GradScaler)
    max_bad_steps: int = 10         # abort after this many non-finite steps in a row (each one is skipped)
    grad_checkpointing: bool = False  # recompute activations in backward (less memory, ~1/3 more compute)
    fsdp: bool = False              # shard weights, gradients and AdamW state over the ranks (FSDP2), not DDP
    compile: bool = False           # torch.compile the model
    # run
    output_dir: str = "runs"        # metrics.jsonl, config.json, checkpoints (and captions.json) go here
    resume: str = ""                # checkpoint path, or "auto": output_dir/checkpoint_last.pt if present.
                                    # A resumed run keeps its checkpoint's config (see resolve_config)
    init_from: str = ""             # published weights (see the script) or one of our checkpoints
    eval_only: bool = False         # evaluate the --init-from / --resume weights and exit
    save_every: int = 1000          # steps between checkpoint_last.pt saves (and at every epoch end)
    log_every: int = 10             # steps between train records in metrics.jsonl
    report_to: str = ""             # also send those records to "tensorboard", "wandb" or "tensorboard,wandb"
    export: str = ""                # write the --init-from / --resume weights to this new folder in
                                    # --export-format and exit (docs: "Publishing your model")
    export_format: str = ""         # empty: the script's first target (see the script's --export)


# ---- presets, task recipes, command line, checkpoint ----

def field_help(config_cls):
    """{field: help text} from the comments on the Config dataclass's lines (the comment after a
    field, plus comment-only lines that continue it at the same column)."""
    out = {}
    for cls in reversed(config_cls.__mro__):        # a base class's comments, then the script's own
        if dataclasses.is_dataclass(cls):
            out.update({k: v for k, v in _own_field_help(cls).items() if v or k not in out})
    return out


def _own_field_help(config_cls):
    lines = inspect.getsource(config_cls).splitlines()
    out, last, col = {}, None, None
    for line in lines:
        m = re.match(r"\s+(\w+)\s*:\s*[\w\[\], .]+=.*?(#\s?(.*))?$", line)
        if m and not line.strip().startswith("#"):
            last = m.group(1)
            out[last] = (m.group(3) or "").strip()
            col = line.index("#") if m.group(2) else None
        elif last and col is not None and line.strip().startswith("#") and line.index("#") == col:
            out[last] += " " + line.strip()[1:].strip()
        else:
            last = None
    return out


def _preset_epilog(presets, recipes_doc):
    rows = ["presets (--preset; the command line overrides any of these):"]
    for name, values in presets.items():
        rows.append(f"  {name}: " + (", ".join(f"{k}={v}" for k, v in values.items()) or "the Config defaults"))
    if recipes_doc:
        rows.append(recipes_doc)
    return "\n".join(rows)


def build_parser(config_cls, presets, description=None, choices=None, recipes_doc=""):
    """argparse generated from a Config dataclass: `--field-name` for `field_name`, booleans as
    `--flag/--no-flag`, each with its comment and default as help; presets in the epilog."""
    choices = {"preset": list(presets), **(choices or {})}
    parser = argparse.ArgumentParser(description=description, epilog=_preset_epilog(presets, recipes_doc),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    helps = field_help(config_cls)
    for f in dataclasses.fields(config_cls):
        name = "--" + f.name.replace("_", "-")
        text = f"{helps.get(f.name, '')} (default: {f.default!r})".strip().replace("%", "%%")
        if f.type in (bool, "bool"):
            parser.add_argument(name, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            options = choices.get(f.name)
            parser.add_argument(name, type=typ, default=None, metavar=None if options else f.name.upper(),
                                choices=options, help=text)
    return parser


# Fields a resumed run may change: where and how it runs, never what it trains. Not given on the
# command line, they keep the run's own values (its checkpoint's), except RESUME_FRESH.
# (--image-root is not one: it resolves the training annotations' image paths.)
RESUME_MUTABLE = ("output_dir", "resume", "init_from", "eval_only", "workers", "log_every", "save_every", "report_to",
                  "precision", "compile", "grad_checkpointing", "fsdp", "val_data", "zeroshot_data",
                  "max_bad_steps", "export", "export_format")
RESUME_FRESH = ("output_dir", "resume", "init_from", "eval_only", "export", "export_format")

# Counts and intervals: the smallest value each may take (checked for the fields a Config has).
AT_LEAST = {1: ("epochs", "batch_size", "accum_steps", "log_every", "save_every", "max_bad_steps", "k_test",
                "itm_batch", "num_beams", "max_gen_length", "capfilt_samples", "num_query_tokens", "queue_size"),
            0: ("max_steps", "warmup_steps", "workers", "train_num_samples", "min_gen_length", "lr",
                "weight_decay", "grad_clip_norm", "warmup_lr", "min_lr", "dropout", "label_smoothing",
                "unmasked_steps", "diht_alpha", "diht_beta")}
BELOW_ONE = ("patch_dropout",)  # fractions in [0, 1)


def check_ranges(cfg):
    """A count or interval out of range (`--save-every 0`, `--batch-size -1`) is a one-line error
    naming the flag, not a ZeroDivisionError later."""
    for low, names in AT_LEAST.items():
        for name in names:
            value = getattr(cfg, name, None)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value < low:
                raise UserError(f"--{name.replace('_', '-')} must be at least {low}, not {value}")
    for name in BELOW_ONE:
        value = getattr(cfg, name, 0.0)
        if not 0 <= value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be in [0, 1), not {value}")
    if getattr(cfg, "unmasked_steps", 0) and not cfg.patch_dropout:
        raise UserError("--unmasked-steps ends FLIP's masking: it needs --patch-dropout above 0")


def resolve_config(config_cls, presets, argv=None, *, description=None, recipe=None, recipes_doc="",
                   choices=None, resume_mutable=()):
    """The run's Config and, for a resumed run, its checkpoint. One order for every script, each
    step overriding the ones before it:

      1. the Config dataclass defaults;
      2. the preset (`--preset`, PRESETS[name]);
      3. the task recipe, `recipe(cfg) -> dict` (e.g. BLIP's fine-tuning recipe for `--preset
         vit-b --task retrieval`), for the fields the command line does not set;
      4. the command line;
      5. a resumed run (`--resume PATH|auto` finding a checkpoint) continues the run it was: every
         field comes from the checkpoint's config except those that say where and how it runs
         (RESUME_MUTABLE + `resume_mutable`), which the command line may change (not given, they
         keep the checkpoint's values too). A command-line value that contradicts the checkpoint,
         or another number of processes, is an error naming it (the sample order, the schedule
         and every rank's RNG depend on them), never a silent change.

    `cfg.explicit_keys` holds the fields set on purpose, by the command line or the task recipe (not
    a dataclass field: never saved); `cfg.given_keys` the command line's, `cfg.mutable_keys` the
    fields a resumed run (or an export) may take from it. Needs `dist.setup()` first: rank 0 decides which checkpoint to resume and every rank
    loads that same file (or all fail together with the reason)."""
    parser = build_parser(config_cls, presets, description, choices, recipes_doc)
    args = parser.parse_args(argv)
    preset = args.preset or config_cls.preset
    cfg = config_cls(**{**presets[preset], "preset": preset})
    given = {key: value for key, value in vars(args).items() if value is not None}
    for key, value in given.items():
        setattr(cfg, key, value)
    recipe_values = {k: v for k, v in (recipe(cfg) if recipe else {}).items() if k not in given}
    for key, value in recipe_values.items():
        setattr(cfg, key, value)
    cfg.explicit_keys = set(given) | set(recipe_values)   # set on purpose (command line or recipe), not by default
    cfg.given_keys, cfg.mutable_keys = set(given), set(RESUME_MUTABLE) | set(resume_mutable)   # for --export
    check_ranges(cfg)
    ckpt_path = resume_path(cfg.resume, cfg.output_dir)
    if not ckpt_path:
        return cfg, None
    ckpt = load_checkpoint_everywhere(ckpt_path)
    saved, mutable = ckpt["config"], set(RESUME_MUTABLE) | set(resume_mutable)
    for key, value in saved.items():
        if key in mutable or not hasattr(cfg, key):
            if hasattr(cfg, key) and key not in given and key not in RESUME_FRESH:
                setattr(cfg, key, value)         # the run's own value (its workers, val data, ...)
            continue
        if key in given and given[key] != value:
            raise UserError(f"--{key.replace('_', '-')} {given[key]} differs from {value!r} of the run being resumed "
                            f"({ckpt_path}); resume with the same value, or start a new run with --init-from")
        setattr(cfg, key, value)
    if ckpt.get("world_size", dist.world_size()) != dist.world_size():
        raise UserError(f"{ckpt_path} was written by a run of {ckpt['world_size']} process(es), this one has "
                        f"{dist.world_size()}: resume with the same number (each rank's sample order and RNG state "
                        f"depend on it), or start a new run with --init-from")
    cfg.init_from = ""
    cfg.resume = ckpt_path
    return cfg, ckpt


def check_resume_position(ckpt, steps_per_epoch):
    """A resumed run must see the same epoch length, or its mid-epoch skip would point at other samples."""
    if ckpt and ckpt.get("steps_per_epoch", steps_per_epoch) != steps_per_epoch:
        raise UserError(f"the resumed run had {ckpt['steps_per_epoch']} steps per epoch, this one has {steps_per_epoch}:"
                        " the training data changed since the checkpoint; resume with the same data")
