"""--fsdp (PyTorch FSDP2) on CPU with gloo, 2 processes: the same losses and evaluation as DDP,
checkpoints in the layout of a non-FSDP run (0-D temperatures, AdamW state by position) that load
without FSDP and back, mid-run in both directions."""
import json
import os

import pytest
import torch

import clip_train
from tests.test_clip_train import SMALL, read_metrics, subset, train_losses  # noqa: F401  (fixture)
from tests.test_distributed import sigterm_mid_run, torchrun


def run_ok(args, timeout=600):
    """torchrun that must succeed. (A rank that died of SIGABRT at exit, now and then, was a gloo
    thread during the interpreter's teardown; see common.dist.exit_process.)"""
    proc = torchrun(args, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def assert_close_losses(got, want, steps, tol=1e-5):
    assert sorted(got) == list(range(1, steps + 1)), sorted(got)
    for step in got:
        assert abs(got[step] - want[step]) <= tol * max(1.0, abs(want[step])), (step, got[step], want[step])


def assert_compiled_run_matches(args, out, ddp, steps, tol=1e-5):
    """--fsdp --compile (the aot_eager backend: Dynamo's capture and AOT autograd, no Inductor) gives
    the eager DDP run's losses, from compiled graphs (Dynamo breaks the graph at FSDP's hooks)."""
    run_ok(["tests/workers/compiled_run.py", *args, "--output-dir", out, "--fsdp", "--compile"])
    assert_close_losses(train_losses(out), train_losses(ddp), steps, tol=tol)
    for r in range(2):
        with open(os.path.join(out, f"compiled_graphs_rank{r}.json")) as f:
            assert sum(json.load(f)) > 50, r


def val_metrics(out):
    """The val records of metrics.jsonl without their position and timings."""
    return [{k: v for k, v in r.items() if k not in ("step", "epoch", "split") and not k.endswith("_s")}
            for r in read_metrics(out) if r["split"] == "val"]


def test_clip_fsdp_equals_ddp_and_checkpoints_round_trip(tmp_path, subset):  # noqa: F811
    args = ["clip_train.py", *SMALL, *subset, "--max-steps", "8", "--save-every", "100"]
    ddp, fsdp = str(tmp_path / "ddp"), str(tmp_path / "fsdp")
    run_ok([*args, "--output-dir", ddp])
    run_ok([*args, "--output-dir", fsdp, "--fsdp"])
    assert_close_losses(train_losses(fsdp), train_losses(ddp), 8)
    assert_compiled_run_matches(args, str(tmp_path / "compiled"), ddp, 8)
    assert len(val_metrics(ddp)) == len(val_metrics(fsdp)) == 2                # epoch 0's end (step 6), step 8
    for got, want in zip(val_metrics(fsdp), val_metrics(ddp)):
        assert got == pytest.approx(want, abs=1e-4)
    # the checkpoint has the layout of a non-FSDP run: the same keys, shapes (0-D logit_scale) and
    # AdamW state by position
    a, b = (torch.load(os.path.join(d, "checkpoint_last.pt"), weights_only=True) for d in (ddp, fsdp))
    assert {k: v.shape for k, v in a["model"].items()} == {k: v.shape for k, v in b["model"].items()}
    assert b["model"]["logit_scale"].shape == ()
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], atol=1e-5), k
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    for i, s in a["optimizer"]["state"].items():
        assert s["exp_avg"].shape == b["optimizer"]["state"][i]["exp_avg"].shape, i
        assert torch.allclose(s["exp_avg_sq"], b["optimizer"]["state"][i]["exp_avg_sq"], atol=1e-6), i
    # FSDP -> one process: its weights give the FSDP run's evaluation
    metrics = clip_train.main([*SMALL, *subset, "--init-from", os.path.join(fsdp, "checkpoint_last.pt"), "--eval-only",
                               "--output-dir", str(tmp_path / "eval")])
    assert metrics == pytest.approx(val_metrics(fsdp)[-1], abs=1e-4)
    # mid-run, both ways: stopped by SIGTERM under one, resumed under the other, the losses of
    # the uninterrupted DDP run (weights and AdamW state carried over)
    for first, then in ((["--fsdp"], []), ([], ["--fsdp"])):
        out = str(tmp_path / ("from_fsdp" if first else "to_fsdp"))
        log = sigterm_mid_run("clip_train.py", [*args[1:], *first], out, 3, str(tmp_path / "log.txt"))
        saved = torch.load(os.path.join(out, "checkpoint_last.pt"), weights_only=True)["step"]
        assert 3 <= saved < 8, log[-2000:]
        run_ok([*args, "--output-dir", out, "--resume", "auto", *then])
        assert_close_losses(train_losses(out), train_losses(ddp), 8)


def script_args(name, subset):  # noqa: F811
    from tests import test_albef_train, test_blip2_stage2_train, test_blip2_train, test_blip_train, test_coca_train
    from tests.test_albef_train import data_args
    small = {"clip": SMALL, "albef": test_albef_train.SMALL, "blip": test_blip_train.SMALL, "coca": test_coca_train.SMALL,
             "blip2": test_blip2_train.SMALL, "blip2_stage2": [*test_blip2_train.SMALL, *test_blip2_stage2_train.STAGE2]}
    data = data_args(subset) if name not in ("clip", "coca") else subset
    return [f"{name.replace('_stage2', '')}_train.py", *small[name], *data, "--batch-size", "4"]


@pytest.mark.parametrize("name", ["albef", "blip", "coca", "blip2", "blip2_stage2"])
def test_fsdp_equals_ddp_in_every_script(name, tmp_path, subset):  # noqa: F811
    """3 steps and an evaluation under FSDP and under DDP: the same losses, metrics and checkpoint."""
    args = [*script_args(name, subset), "--max-steps", "3"]
    ddp, fsdp = str(tmp_path / "ddp"), str(tmp_path / "fsdp")
    run_ok([*args, "--output-dir", ddp])
    run_ok([*args, "--output-dir", fsdp, "--fsdp"])
    assert_close_losses(train_losses(fsdp), train_losses(ddp), 3, tol=1e-4)
    assert_compiled_run_matches(args, str(tmp_path / "compiled"), ddp, 3, tol=1e-4)
    (got,), (want,) = val_metrics(fsdp), val_metrics(ddp)
    assert got == pytest.approx(want, abs=1e-3)
    a, b = (torch.load(os.path.join(d, "checkpoint_last.pt"), weights_only=True) for d in (ddp, fsdp))
    assert {k: v.shape for k, v in a["model"].items()} == {k: v.shape for k, v in b["model"].items()}
    for k in a["model"]:
        assert torch.allclose(a["model"][k].float(), b["model"][k].float(), atol=1e-4), k
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert {i: s["exp_avg"].shape for i, s in a["optimizer"]["state"].items()} == \
        {i: s["exp_avg"].shape for i, s in b["optimizer"]["state"].items()}


def test_clip_fsdp_bf16_mixed_precision_runs_close_to_ddp(tmp_path, subset):  # noqa: F811
    """The mixed-precision policy (blocks gathered in bf16, gradients reduced in fp32) on CPU: 3 steps
    within bf16 rounding of DDP under the same bf16 autocast."""
    args = ["clip_train.py", *SMALL, *subset[:2], "--tokenizer", subset[-1], "--max-steps", "3", "--precision", "bf16"]
    ddp, fsdp = str(tmp_path / "ddp"), str(tmp_path / "fsdp")
    run_ok([*args, "--output-dir", ddp])
    run_ok([*args, "--output-dir", fsdp, "--fsdp"])
    assert_close_losses(train_losses(fsdp), train_losses(ddp), 3, tol=1e-2)
    assert train_losses(fsdp) != train_losses(ddp)          # the blocks did run on bf16 weights


@pytest.mark.parametrize("name, extra", [("clip", ["--loss", "diht"]),
                                         ("clip", ["--loss", "siglip", "--patch-dropout", "0.5"]), ("blip2", [])])
def test_fsdp_with_accumulation_equals_ddp(name, extra, tmp_path, subset):  # noqa: F811
    """--accum-steps 2 under FSDP (gradient sync on the last micro-batch only; BLIP-2's feature cache
    calling itc_features outside forward) gives DDP's losses; for CLIP with DiHT's loss, and with
    SigLIP's (its bias a sharded parameter) and FLIP's patch dropout (the same masks: the same seeds)."""
    from tests import test_blip2_train
    small = {"clip": SMALL, "blip2": test_blip2_train.SMALL}[name]
    args = [f"{name}_train.py", *small, "--train-data", subset[1], "--tokenizer", subset[-1], "--batch-size", "4",
            "--accum-steps", "2", "--max-steps", "2", *extra]
    ddp, fsdp = str(tmp_path / "ddp"), str(tmp_path / "fsdp")
    run_ok([*args, "--output-dir", ddp])
    run_ok([*args, "--output-dir", fsdp, "--fsdp"])
    assert_close_losses(train_losses(fsdp), train_losses(ddp), 2, tol=1e-4)
