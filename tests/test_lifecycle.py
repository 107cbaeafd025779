"""The template's lifecycle, shared by every script: config resolution and resume checks, per-rank
seeding, SIGTERM / SIGUSR1 preemption, non-finite steps, safe checkpoints, one-line user errors,
--help, and a compiled training step (no graph breaks, no recompiles, the eager loss)."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

import blip_train
import clip_train
from common import config, utils
from tests.workers.dist_fixtures import blip_batch, blip_model, clip_batch, clip_config
from tests.test_distributed import ROOT, one_line_error, signal_processes, torchrun

TINY_CLIP = ["--vision-layers", "1", "--text-layers", "1", "--vision-width", "32", "--text-width", "32",
             "--embed-dim", "32", "--batch-size", "16", "--workers", "0", "--warmup-steps", "2", "--log-every", "1"]


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# ---- compile ----

def _compiled_matches_eager(model, step):
    """Loss and gradients of a compiled step (one graph, AOT autograd with functionalisation)
    equal eager; a second step with other Python-side values does not recompile."""
    eager = step(model, 0.4)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = step(compiled, 0.4)
        for n, p in model.named_parameters():
            if n in grads:
                torch.testing.assert_close(p.grad, grads[n], atol=1e-5, rtol=1e-4, msg=n)
        step(compiled, 0.3)          # another alpha: the same graph
    torch.testing.assert_close(got, eager, atol=1e-5, rtol=1e-5)
    assert len(grads) > 10


def test_compiled_clip_step_equals_eager():
    torch.manual_seed(0)
    model = clip_train.CLIP(clip_config())
    images, ids = clip_batch()

    def step(m, _):
        loss = clip_train.clip_loss(*m(images, ids))
        loss.backward()
        return loss.detach()
    _compiled_matches_eager(model, step)


def test_compiled_blip_step_equals_eager():
    """The BLIP step compiles as one graph: alpha is a tensor, the queue pointer and the EMA live
    in finish_step() outside the compiled forward, the negatives are drawn without multinomial."""
    model, tok, cfg = blip_model()
    images, ids, mask, idx = blip_batch(tok, 4)

    def step(m, alpha):
        torch.manual_seed(1)
        losses = m(images, ids, mask, idx, torch.tensor(alpha), "pretrain")
        loss = sum(losses.values())
        loss.backward()
        return torch.stack([losses[k].detach() for k in sorted(losses)])
    _compiled_matches_eager(model, step)


def test_compiled_albef_step_equals_eager(tiny):
    """The ALBEF step compiles as one graph too: the MLM masking draws on the device, and the MLM
    loss averages over the masked tokens without selecting them (no data-dependent shapes)."""
    import os
    import albef_train
    from common.data import Tokenizer
    from tests.test_albef import SMALL, captions_batch
    tok = Tokenizer(os.path.join(tiny, "tokenizer"))
    cfg = albef_train.Config(**SMALL, vocab_size=tok.vocab_size)
    torch.manual_seed(0)
    model = albef_train.build_albef(cfg, tok)
    images, ids, mask = captions_batch(tok)

    def step(m, alpha):
        torch.manual_seed(1)
        losses = m(images, ids, mask, torch.arange(4), torch.tensor(alpha), "pretrain")
        sum(losses.values()).backward()
        return torch.stack([losses[k].detach() for k in sorted(losses)])
    _compiled_matches_eager(model, step)


def test_compiled_coca_step_equals_eager():
    """The CoCa step compiles as one graph: the caption positions and their targets are selected on
    the host (index_select of a given index, no boolean mask), the losses are the training loop's."""
    import coca_train
    from tests.test_coca import SMALL, dist_batch
    cfg = coca_train.Config(**SMALL)
    torch.manual_seed(0)
    model = coca_train.CoCa(cfg, pad_id=0, eos_id=63)
    images, ids = dist_batch()
    ids = coca_train.trim_padding(ids, 0)
    positions, targets = coca_train.caption_positions(ids, 0)

    def step(m, _):
        loss, losses = coca_train.compute_losses(m, cfg, (images, ids, positions, targets))
        loss.backward()
        return torch.stack([losses[k].detach() for k in sorted(losses)])
    _compiled_matches_eager(model, step)


def test_compiled_blip2_step_equals_eager(tiny):
    """The BLIP-2 stage-1 step compiles as one graph: the three masks, the ITM pairs of one process
    (no data-dependent selection), ITG's reuse of the query pass's keys and values."""
    import blip2_train
    from common.data import Tokenizer
    from tests.test_blip2 import SMALL, batch
    tok = Tokenizer(os.path.join(tiny, "tokenizer"))
    torch.manual_seed(0)
    model = blip2_train.build_blip2(blip2_train.Config(**SMALL), tok).train()
    images, ids, mask = batch(tok)

    def step(m, _):
        torch.manual_seed(1)
        losses = m(dict(images=images, ids=ids, mask=mask, idx=torch.arange(4)))
        sum(losses.values()).backward()
        return torch.stack([losses[k].detach() for k in sorted(losses)])
    _compiled_matches_eager(model, step)


# ---- --help and user errors ----

@pytest.mark.parametrize("script", ["clip_train", "blip_train", "albef_train", "coca_train", "blip2_train"])
def test_help_documents_every_flag_default_preset_and_task(script):
    import importlib
    script = importlib.import_module(script)
    text = config.build_parser(script.Config, script.PRESETS, choices={"task": getattr(script, "TASKS", None)},
                              recipes_doc=getattr(script, "RECIPES_DOC", "")).format_help()
    helps = config.field_help(script.Config)
    for f in script.Config.__dataclass_fields__:
        assert f"--{f.replace('_', '-')}" in text and helps[f], f          # every flag, with its meaning
    assert text.count("(default:") >= len(helps)
    assert all(f"  {name}:" in text for name in script.PRESETS)
    if script is blip_train:
        assert "{pretrain,retrieval,caption,capfilt}" in text and "retrieval: image_size=384" in text
    if script.__name__ == "coca_train":
        assert "{pretrain,caption}" in text and "contrastive_weight=0.0" in text
    if script.__name__ == "blip2_train":
        assert "{pretrain,retrieval,caption,vqa}" in text and "freeze_vision=False" in text
        assert "vit-g-opt2.7b" in text and "a photo of" in text


@pytest.mark.parametrize("args, culprit", [
    (["clip_train.py", "--train-data", "no/such/train.json", "--tokenizer", "TINY"],
     "annotation file no/such/train.json does not exist"),
    (["clip_train.py", "--train-data", "no/such/train.json"], "no tokenizer: pass --tokenizer"),
    (["blip_train.py", "--batch-size", "8", "--queue-size", "100"], "--queue-size 100 is not a multiple"),
    (["coca_train.py", "--max-gen-length", "40"], "--max-gen-length 40 exceeds the context of 32"),
    (["blip2_train.py", "--stage", "2", "--task", "retrieval"], "--task retrieval is not a stage-2 task"),
    (["coca_train.py", "--save-every", "0"], "--save-every must be at least 1, not 0"),
])
def test_user_mistake_prints_one_line_and_exits_2(tmp_path, tiny, args, culprit):
    args = [os.path.join(tiny, "tokenizer") if a == "TINY" else a for a in args]
    assert culprit in one_line_error(*args, "--workers", "0", "--output-dir", str(tmp_path))


# ---- config resolution and resume ----

def _fake_checkpoint(folder, cfg, world_size=1):
    import dataclasses
    os.makedirs(folder, exist_ok=True)
    utils.save_checkpoint(os.path.join(folder, "checkpoint_last.pt"),
                          {"config": dataclasses.asdict(cfg), "world_size": world_size, "step": 5})


def test_config_order_preset_recipe_command_line_checkpoint(tmp_path):
    """preset -> task recipe -> command line; a resumed run keeps its checkpoint's values (here a
    retrieval fine-tuning run started at 224 px with a 64-entry queue, against the recipe's
    384 / 57,600), and a contradicting flag is an error naming it."""
    resolve = lambda argv: config.resolve_config(blip_train.Config, blip_train.PRESETS, argv,  # noqa: E731
                                                recipe=blip_train.task_recipe)
    fresh, _ = resolve(["--preset", "vit-b", "--task", "retrieval", "--output-dir", str(tmp_path)])
    assert (fresh.image_size, fresh.queue_size, fresh.lr, fresh.vision_width) == (384, 57600, 1e-5, 768)
    started, _ = resolve(["--preset", "vit-b", "--task", "retrieval", "--image-size", "224", "--queue-size", "64",
                          "--output-dir", str(tmp_path)])
    assert (started.image_size, started.queue_size, started.lr) == (224, 64, 1e-5)
    _fake_checkpoint(tmp_path, started)
    resumed, ckpt = resolve(["--preset", "vit-b", "--task", "retrieval", "--resume", "auto",
                             "--output-dir", str(tmp_path), "--workers", "3"])
    assert (resumed.image_size, resumed.queue_size, resumed.workers) == (224, 64, 3) and ckpt["step"] == 5
    assert resumed.resume == os.path.join(str(tmp_path), "checkpoint_last.pt")
    with pytest.raises(utils.UserError, match=r"--image-size 384 differs from 224 of the run being resumed"):
        resolve(["--preset", "vit-b", "--task", "retrieval", "--resume", "auto", "--image-size", "384",
                 "--output-dir", str(tmp_path)])
    with pytest.raises(utils.UserError, match=r"--batch-size 16 differs"):
        resolve(["--preset", "vit-b", "--task", "retrieval", "--resume", "auto", "--batch-size", "16",
                 "--output-dir", str(tmp_path)])
    _fake_checkpoint(tmp_path, started, world_size=8)
    with pytest.raises(utils.UserError, match=r"run of 8 process\(es\), this one has 1"):
        resolve(["--resume", "auto", "--output-dir", str(tmp_path)])
    with pytest.raises(utils.UserError, match="the training data changed"):
        config.check_resume_position({"steps_per_epoch": 10}, 11)


def test_resumed_finetuning_run_keeps_its_image_size_and_queue(tmp_path):
    """The bug: a resumed retrieval run started with --image-size / --queue-size got the defaults
    back and failed in load_state_dict. Now the checkpoint's config wins; a finished run resumed
    is evaluated again."""
    from tests.workers.dist_fixtures import BLIP_SMALL_ARGS
    args = [*BLIP_SMALL_ARGS, "--workers", "0", "--task", "retrieval", "--output-dir", str(tmp_path)]
    first = blip_train.main([*args, "--image-size", "48", "--queue-size", "16", "--max-steps", "2"])
    again = blip_train.main([a for a in args if a not in ("--image-size=32", "--queue-size=8")] + ["--resume", "auto"])
    first.pop("retrieval_eval_s"), again.pop("retrieval_eval_s")
    assert again == pytest.approx(first)
    with open(tmp_path / "config.json") as f:
        saved = json.load(f)
    assert (saved["image_size"], saved["queue_size"], saved["max_steps"]) == (48, 16, 2)


# ---- checkpoints ----

class _Code:
    pass


def test_checkpoints_load_without_running_code(tmp_path, monkeypatch):
    good = tmp_path / "good.pt"
    state = {"config": {"a": 1}, "rng": [utils.rng_state()], "model": {"w": torch.ones(2)}}
    calls = []
    monkeypatch.setattr(utils.os, "fsync", lambda fd: calls.append("fsync"))
    real_replace = os.replace
    monkeypatch.setattr(utils.os, "replace", lambda a, b: (calls.append("replace"), real_replace(a, b)))
    utils.save_checkpoint(str(good), state)
    assert calls == ["fsync", "replace", "fsync"]                # file synced before the rename, then the folder
    loaded = utils.load_checkpoint(str(good))                      # weights_only=True
    utils.set_rng_state(loaded["rng"][0])
    torch.save({"config": {}, "obj": _Code()}, tmp_path / "code.pt")
    with pytest.raises(utils.UserError, match="needs pickled Python objects"):
        utils.load_checkpoint(str(tmp_path / "code.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(utils.UserError, match="not a readable PyTorch checkpoint"):
        utils.load_checkpoint(str(tmp_path / "junk.pt"))
    with pytest.raises(utils.MissingFileError):
        utils.load_checkpoint(str(tmp_path / "none.pt"))
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.bias[1] = float("nan")
    with pytest.raises(utils.RunAborted, match="weight bias is not finite"):
        utils.check_finite(model)


# ---- non-finite steps ----

def test_nonfinite_step_is_skipped_counted_and_named(tmp_path, monkeypatch, capsys):
    """A NaN loss at step 3: no optimizer update (fused AdamW's step count stays one behind),
    counted in metrics.jsonl, the culprit search reports a finite forward; training goes on."""
    real, calls = clip_train.clip_loss, [0]

    def nan_at_step_3(*a):
        calls[0] += 1
        loss = real(*a)
        return loss * float("nan") if calls[0] == 3 else loss
    monkeypatch.setattr(clip_train, "clip_loss", nan_at_step_3)
    clip_train.main([*TINY_CLIP, "--max-steps", "5", "--output-dir", str(tmp_path)])
    train = [r for r in read_metrics(str(tmp_path)) if r["split"] == "train"]
    assert [r["bad_steps"] for r in train] == [0, 0, 1, 1, 1]
    ckpt = utils.load_checkpoint(str(tmp_path / "checkpoint_last.pt"))
    assert ckpt["bad_steps"] == 1 and ckpt["step"] == 5
    assert {int(s["step"]) for s in ckpt["optimizer"]["state"].values()} == {4}
    assert "step 3: non-finite loss or gradient norm, update skipped" in capsys.readouterr().out


def test_nonfinite_steps_in_a_row_abort_naming_step_and_module(tmp_path, monkeypatch):
    """Every forward poisoned from the first MLP: after --max-bad-steps 3 the run aborts naming
    the step and the first module whose output went non-finite; no checkpoint is written."""
    from common import encoders
    real = encoders.MLP.forward
    monkeypatch.setattr(encoders.MLP, "forward", lambda self, x: real(self, x) * float("nan"))
    with pytest.raises(utils.RunAborted, match=r"3 non-finite steps in a row, the last at step 3 .*"
                                               r"visual\.transformer\.resblocks\.0\.mlp \(MLP\)"):
        clip_train.main([*TINY_CLIP, "--max-steps", "5", "--max-bad-steps", "3", "--output-dir", str(tmp_path)])
    assert not os.path.exists(tmp_path / "checkpoint_last.pt")


def test_nonfinite_input_is_named():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    x = torch.tensor([[1.0, float("inf")]])
    assert utils.first_nonfinite_module(model, {"images": x}, lambda: model(x)) == "the input images"


# ---- distributed agreement ----

def test_ranks_agree_on_resume_load_failure_and_preemption(tmp_path):
    """Under torchrun: rank 0 alone decides which checkpoint to resume (rank 1 sees no file, as with
    node-local folders); a file rank 1 cannot read fails on both ranks naming rank 1; a SIGTERM on
    rank 1 only stops both; any_rank spreads a flag."""
    proc = torchrun([os.path.join(ROOT, "tests", "workers", "dist_lifecycle_worker.py"), str(tmp_path)], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for g in got:
        assert g["resume"] == os.path.join(str(tmp_path), "checkpoint_last.pt")
        assert "rank 1 cannot resume" in g["load_error"]
        assert g["preempt_before"] is False and g["preempt_after"] is True and g["any_rank"] is True
    assert got[1]["received"] == "SIGTERM" and got[0]["received"] is None


# ---- runs that survive a cluster: signals, evaluation, resume ----

def test_data_workers_ignore_preemption_signals(tmp_path):
    """torchrun and SLURM signal every process of a rank, DataLoader workers included. The workers
    (map-style and shards) ignore SIGTERM and SIGUSR1, so the main process can finish the step and
    save; a worker that died of it made the main process raise 'DataLoader worker ... is killed by
    signal' and nothing was saved."""
    import multiprocessing
    import time
    import types
    from common.data import read_annotations, train_loader
    from common.shards import ShardLoader
    from data import make_shards
    from tests.test_shards import Captions, fabricate
    ann = fabricate(tmp_path / "imgs", 24)
    make_shards.write_shards(ann, str(tmp_path / "shards"), shard_size=6)
    cfg = types.SimpleNamespace(batch_size=3, accum_steps=1, workers=2, seed=0, skip_bad=False, train_num_samples=0,
                                dataset_resampled=False)
    mapstyle = lambda: train_loader(read_annotations(ann), Captions(), cfg, 0, 1, ann)[0]  # noqa: E731
    shards = lambda: ShardLoader(str(tmp_path / "shards" / "{00000..00003}.tar"), Captions(),  # noqa: E731
                                 batch_size=3, workers=2, seed=0, rank=0, world_size=1)
    for make in (mapstyle, shards):
        loader = make()
        (loader if make is shards else loader.sampler).set_epoch(0)
        batches = iter(loader)
        texts = list(next(batches)[1])
        workers = [w.pid for w in multiprocessing.active_children()]
        assert len(workers) >= 2
        signal_processes(workers, "TERM")              # from another process, as torchrun sends it
        signal_processes(workers, "USR1")
        time.sleep(0.5)
        texts += [t for batch in batches for t in batch[1]]
        assert sorted(texts) == sorted(f"image {i} caption 0" for i in range(24)), make
        del batches, loader
    # a SIGTERM from the main process itself (multiprocessing's terminate() at exit) still ends a worker:
    # ignoring it would hang the exit of a run that crashed with its loader alive
    batches = iter(mapstyle())
    next(batches)
    workers = multiprocessing.active_children()
    for w in workers:
        w.terminate()
        w.join(timeout=10)
    assert workers and not any(w.is_alive() for w in workers) and {w.exitcode for w in workers} == {0}


def _ignore_after_a_second(worker_id):
    import time
    from common.utils import ignore_preemption_signals
    time.sleep(1.0)                                   # a worker still starting (loaded machine, slow imports)
    ignore_preemption_signals(worker_id)


def test_workers_still_starting_survive_a_signal():
    """Workers start at every shard epoch and evaluation; a signal to the process group that comes
    before a worker ran its worker_init_fn waits for it (our DataLoader starts them with the signals
    blocked). Control: torch's own DataLoader loses that worker."""
    from common.utils import DataLoader
    for loader_class in (DataLoader, torch.utils.data.DataLoader):
        loader = loader_class(list(range(8)), batch_size=2, num_workers=2, worker_init_fn=_ignore_after_a_second)
        batches = iter(loader)
        signal_processes([w.pid for w in batches._workers], "TERM")
        signal_processes([w.pid for w in batches._workers], "USR1")
        if loader_class is DataLoader:
            assert [int(x) for batch in batches for x in batch] == list(range(8))
        else:
            with pytest.raises(RuntimeError, match="DataLoader worker"):   # killed by signal, exited unexpectedly
                list(batches)
        del batches


def test_signal_outside_the_training_loop_is_recorded_not_fatal(tmp_path):
    """Under `cli` a SIGUSR1 / SIGTERM during start-up is not the default action's kill: the
    training loop's Preemption sees it at its first check; one during the final evaluation (after
    the loop) lets the run finish and exit 0."""
    code = ("import os, signal, sys\n"
            "from common import utils\n"
            "def main():\n"
            "    os.kill(os.getpid(), signal.SIGUSR1)          # start-up\n"
            "    with utils.Preemption() as p:\n"
            "        print('loop', p.requested(), p.received)\n"
            "    os.kill(os.getpid(), signal.SIGTERM)          # final evaluation\n"
            "    os.kill(os.getpid(), signal.SIGUSR1)\n"
            "    print('evaluated')\n"
            "utils.cli(main)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert proc.stdout.split() == ["loop", "True", "SIGUSR1", "evaluated"]


@pytest.mark.parametrize("signal_step", [4, 5])
def test_signal_at_the_epochs_end_or_during_its_evaluation_loses_nothing(tmp_path, monkeypatch, signal_step):
    """4 steps per epoch. A signal on the epoch's last step (4), or a run killed during that epoch's
    evaluation (5: the 5th check is the one after it), keeps checkpoint_last.pt at step 4 (written
    before the evaluation), and the resumed run evaluates epoch 0 first, then goes on. A signal
    during the evaluation stops the run right after it."""
    from tests.test_distributed import preempt_at
    data = [*tiny_subset(tmp_path, 14), "--batch-size", "16", "--max-steps", "6"]    # 70 pairs: 4 steps an epoch
    args = [*TINY_CLIP, *data, "--output-dir", str(tmp_path)]
    preempt_at(monkeypatch, clip_train, signal_step)
    if signal_step == 5:            # the evaluation of epoch 0 is cut short (SIGKILL at the grace period's end)
        real = clip_train.evaluate
        monkeypatch.setattr(clip_train, "evaluate", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            clip_train.main(args)
        monkeypatch.setattr(clip_train, "evaluate", real)
    else:
        clip_train.main(args)
    ckpt = utils.load_checkpoint(str(tmp_path / "checkpoint_last.pt"))
    assert ckpt["step"] == 4 and ckpt["steps_per_epoch"] == 4
    assert not [r for r in read_metrics(str(tmp_path)) if r["split"] == "val"]
    monkeypatch.undo()
    clip_train.main([*args, "--resume", "auto"])
    records = read_metrics(str(tmp_path))
    assert [(r["step"], r["epoch"]) for r in records if r["split"] == "val"] == [(4, 0), (6, 1)]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert utils.load_checkpoint(str(tmp_path / "checkpoint_last.pt"))["evaluated"] == 6
    # a signal during the evaluation (its flag seen at the check after it): the run stops there
    out = str(tmp_path / "during")
    preempt_at(monkeypatch, clip_train, 5)
    clip_train.main([*TINY_CLIP, *data, "--output-dir", out])
    ckpt = utils.load_checkpoint(os.path.join(out, "checkpoint_last.pt"))
    assert ckpt["step"] == 4 and ckpt["evaluated"] == 4
    assert [r["step"] for r in read_metrics(out) if r["split"] == "val"] == [4]


def tiny_subset(folder, n):
    """--train-data, --val-data and --tokenizer flags of the tiny val split's first n images (5 captions each)."""
    from common.data import tiny_data
    tiny = tiny_data()
    with open(os.path.join(tiny, "val.json")) as f:
        records = [{**r, "image": os.path.join(tiny, r["image"])} for r in json.load(f)[:n]]
    path = os.path.join(folder, "subset.json")
    with open(path, "w") as f:
        json.dump(records, f)
    return ["--train-data", path, "--val-data", path, "--tokenizer", os.path.join(tiny, "tokenizer")]


def test_resume_keeps_the_runs_own_values_of_what_it_may_change(tmp_path):
    """Fields a resumed run may change but the command line does not give come from the run's
    checkpoint, not the Config defaults: evaluation stayed on (--val-data), a preset's workers=8,
    gradient checkpointing, precision. Given, they change; --val-data '' turns evaluation off.
    --image-root resolves the training annotations' paths: another one is refused."""
    resolve = lambda argv: config.resolve_config(clip_train.Config, clip_train.PRESETS, argv)  # noqa: E731
    out = ["--output-dir", str(tmp_path)]
    started, _ = resolve(["--preset", "vit-l-14", "--val-data", "v.json", "--precision", "bf16",
                          "--image-root", "/data/coco", "--save-every", "7", *out])     # the preset: workers 8,
    assert (started.workers, started.grad_checkpointing) == (8, True)                   # grad checkpointing
    _fake_checkpoint(tmp_path, started)
    resumed, _ = resolve(["--resume", "auto", *out])
    assert (resumed.preset, resumed.val_data, resumed.workers, resumed.grad_checkpointing, resumed.precision,
            resumed.image_root, resumed.save_every) == ("vit-l-14", "v.json", 8, True, "bf16", "/data/coco", 7)
    changed, _ = resolve(["--resume", "auto", "--val-data", "", "--workers", "2", "--no-grad-checkpointing", *out])
    assert (changed.val_data, changed.workers, changed.grad_checkpointing) == ("", 2, False)
    with pytest.raises(utils.UserError, match=r"--image-root /elsewhere differs from '/data/coco'"):
        resolve(["--resume", "auto", "--image-root", "/elsewhere", *out])


def test_resume_with_fp16_after_fp32_and_bad_steps_in_a_row_across_resume(tmp_path, monkeypatch):
    """A run saved under fp32 (its disabled GradScaler saved {}) resumes with --precision fp16 (it
    crashed). The mid-epoch --save-every checkpoint counts the step in flight (guard.flush(); on
    CUDA its flag is read a step late) and the bad steps in a row, which go on counting after a
    resume: NaN at steps 3, 4, stop at 4, NaN at 5 aborts with --max-bad-steps 3."""
    from tests.test_distributed import preempt_at
    real, calls, saved = clip_train.clip_loss, [0], {}

    def nan_at(steps):
        def loss(*a):
            calls[0] += 1
            return real(*a) * float("nan") if calls[0] in steps else real(*a)
        return loss

    class LateGuard(utils.NonFiniteGuard):       # the CUDA path on CPU: each flag counted one step late
        def account(self, step, ok, diagnose):
            self.flush()
            self.pending = (step, ok, diagnose)

        def flush(self):
            if self.pending:
                (step, ok, diagnose), self.pending = self.pending, None
                self._count(step, bool(ok), diagnose)

    from common import run as run_machinery
    real_save = run_machinery.save_checkpoint
    monkeypatch.setattr(run_machinery, "save_checkpoint", lambda path, state: (
        saved.setdefault(state["step"], (state["bad_steps"], state.get("bad_in_a_row"))), real_save(path, state)))
    monkeypatch.setattr(run_machinery, "NonFiniteGuard", LateGuard)
    monkeypatch.setattr(clip_train, "clip_loss", nan_at({3, 4}))
    preempt_at(monkeypatch, clip_train, 4)
    args = [*TINY_CLIP, "--max-steps", "8", "--save-every", "3", "--max-bad-steps", "3", "--output-dir", str(tmp_path)]
    clip_train.main([*args, "--precision", "fp32"])
    assert saved[3] == (1, 1) and saved[4] == (2, 2)
    calls[0] = 0
    monkeypatch.setattr(clip_train, "clip_loss", nan_at({1}))
    monkeypatch.setattr(clip_train, "Preemption", utils.Preemption)
    with pytest.raises(utils.RunAborted, match="3 non-finite steps in a row, the last at step 5"):
        clip_train.main([*args, "--resume", "auto", "--precision", "fp16"])


@pytest.mark.parametrize("flag, value", [("--save-every", "0"), ("--log-every", "0"), ("--batch-size", "0"),
                                         ("--epochs", "0"), ("--accum-steps", "0"), ("--workers", "-1"),
                                         ("--max-steps", "-5"), ("--max-bad-steps", "0"), ("--warmup-steps", "-1")])
def test_counts_and_intervals_out_of_range_are_one_line_errors(tmp_path, flag, value):
    """--save-every 0 / --log-every 0 raised ZeroDivisionError mid-run; every count and interval is
    checked when the config is resolved."""
    with pytest.raises(utils.UserError, match=f"^{flag} must be at least [01], not {value}$"):
        config.resolve_config(clip_train.Config, clip_train.PRESETS, [flag, value, "--output-dir", str(tmp_path)])
    for script in ("albef_train", "blip2_train"):
        import importlib
        module = importlib.import_module(script)
        with pytest.raises(utils.UserError, match="--k-test must be at least 1"):
            config.resolve_config(module.Config, module.PRESETS, ["--k-test", "0", "--output-dir", str(tmp_path)])


def test_readme_slurm_script_saves_first_and_requeues_after(tmp_path):
    """The SLURM script of docs/scale.md with a fake `scontrol` and `srun` on PATH:
    SIGUSR1 to the batch shell (--signal=B:USR1) reaches srun, the script waits for it to finish
    saving, and only then runs `scontrol requeue` (which ends a running job)."""
    import re
    import signal
    import time
    with open(os.path.join(ROOT, "docs", "scale.md")) as f:
        readme = f.read()
    script = next(b for b in re.findall(r"```bash\n(.*?)```", readme, re.S) if "scontrol requeue" in b)
    log, bin_dir = tmp_path / "log.txt", tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/bash\n[ "$1" = show ] && { echo node1; exit 0; }\n'
                                      'echo "scontrol $*" >> "$LOG"\n')
    (bin_dir / "srun").write_text('#!/bin/bash\n'
                                  'trap \'echo "srun got USR1" >> "$LOG"; sleep 1; echo "srun saved" >> "$LOG"; exit 0\' USR1\n'
                                  'echo "srun started $1" >> "$LOG"\nwhile true; do sleep 0.05; done\n')
    for name in ("scontrol", "srun"):
        os.chmod(bin_dir / name, 0o755)
    (tmp_path / "job.sh").write_text(script)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "LOG": str(log), "SLURM_JOB_ID": "42",
           "SLURM_JOB_NODELIST": "node1", "SLURM_NNODES": "1"}
    job = subprocess.Popen(["bash", str(tmp_path / "job.sh")], env=env, start_new_session=True)
    deadline = time.time() + 30
    while time.time() < deadline and not (log.exists() and "started" in log.read_text()):
        time.sleep(0.05)
    time.sleep(0.2)
    job.send_signal(signal.SIGUSR1)                 # the batch shell only, as --signal=B: does
    job.wait(timeout=30)                            # 138: the script's last command, the wait, was interrupted
    assert log.read_text().splitlines() == ["srun started torchrun", "srun got USR1", "srun saved",
                                            "scontrol requeue 42"]


def test_checkpoints_from_before_mlp_sizes_load_with_the_size_they_built(tmp_path):
    """ALBEF/BLIP/BLIP-2 stored the ViT's MLP width as a ratio (vision_mlp_ratio) before they stored
    the size: such a checkpoint's config reads back with the vision_mlp_dim its encoder was built with."""
    path = str(tmp_path / "old.pt")
    torch.save({"config": {"vision_width": 44, "vision_mlp_ratio": 49 / 44}, "model": {}}, path)
    assert utils.load_checkpoint(path)["config"] == {"vision_width": 44, "vision_mlp_dim": 48}   # int(44 x 49/44)


def test_albef_checkpoints_from_before_queue_marks_resume_with_full_queues(tmp_path):
    """ALBEF's queues were full of (random, then real) keys before unfilled slots were marked: such
    a checkpoint loads (strictly) with every slot marked filled, as it computed."""
    import albef_train
    from common.data import load_tokenizer
    tokenizer = load_tokenizer("", use_tiny=True)
    cfg = albef_train.Config(vocab_size=tokenizer.vocab_size)
    model = albef_train.build_albef(cfg, tokenizer)
    state = {k: v for k, v in model.state_dict().items() if k != "queue_filled"}
    torch.save({"config": dataclasses.asdict(cfg), "model": state}, str(tmp_path / "old.pt"))
    saved = utils.load_checkpoint(str(tmp_path / "old.pt"))["model"]
    assert bool(saved["queue_filled"].all())
    model.load_state_dict(saved)                                   # strict
    # BLIP's checkpoints (queues, no fusion layer) are left as they are
    torch.save({"config": {"alpha": 0.4}, "model": {"image_queue": torch.zeros(2, 4)}}, str(tmp_path / "b.pt"))
    assert "queue_filled" not in utils.load_checkpoint(str(tmp_path / "b.pt"))["model"]
