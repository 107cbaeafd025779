"""--report-to: TensorBoard and Weights & Biases (offline, no network) receive the records of
metrics.jsonl, read back from the files they write; a resumed run continues its wandb run; neither
is imported unless asked."""
import glob
import json
import os
import struct
import subprocess
import sys
import time

import pytest

import clip_train
from common.utils import UserError
from tests.test_clip_train import SMALL, read_metrics, subset  # noqa: F401  (fixture)
from tests.test_distributed import ROOT, preempt_at


def expected_scalars(out):
    """{(split/name, step): value} of metrics.jsonl, as MetricLog reports them."""
    return {(f"{r['split']}/{k}", r["step"]): v for r in read_metrics(out) for k, v in r.items()
            if k not in ("step", "split") and isinstance(v, (int, float)) and not isinstance(v, bool)}


def wandb_records(run_file):
    """The wandb_internal_pb2.Record protobufs of a wandb .wandb file: a LevelDB-style log (a 7-byte
    ':W&B' header, 32 KiB blocks of records with a 7-byte header: crc32, length, type 1 full / 2
    first / 3 middle / 4 last)."""
    from wandb.proto.wandb_internal_pb2 import Record
    data = open(run_file, "rb").read()
    assert data[:4] == b":W&B"
    pos, chunks = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:                     # zero padding to the end of the block
            pos += left
            continue
        chunks += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record


def wandb_history(run_file):
    """{(key, step): value} of a wandb .wandb file's history records."""
    out = {}
    for record in wandb_records(run_file):
        if record.WhichOneof("record_type") == "history":
            step = record.history.step.num
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                if not key.startswith("_"):
                    out[(key, step)] = json.loads(item.value_json)
    return out


def test_tensorboard_and_offline_wandb_get_the_records_of_metrics_jsonl(tmp_path, subset, monkeypatch):  # noqa: F811
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    out = str(tmp_path / "run")
    clip_train.main([*SMALL, *subset, "--max-steps", "3", "--output-dir", out, "--report-to", "tensorboard,wandb"])
    import wandb
    wandb.finish()
    want = expected_scalars(out)
    assert ("train/loss", 3) in want and ("val/r_mean", 3) in want and ("val/zeroshot_top1", 3) in want
    events = EventAccumulator(os.path.join(out, "tensorboard"))
    events.Reload()
    got = {(tag, e.step): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}
    assert got.keys() == want.keys()
    assert all(got[k] == pytest.approx(v, rel=1e-6, abs=1e-6) for k, v in want.items())   # stored as float32
    run_file, = glob.glob(os.path.join(out, "wandb", "offline-run-*", "run-*.wandb"))
    assert wandb_history(run_file) == want
    run_id = open(os.path.join(out, "wandb_run_id")).read()
    assert run_id in run_file
    # a new run in the same folder starts another wandb run (wandb drops the steps it has seen, so
    # reusing the id would lose its records) ...
    clip_train.main([*SMALL, *subset, "--max-steps", "1", "--output-dir", out, "--report-to", "wandb"])
    wandb.finish()
    assert open(os.path.join(out, "wandb_run_id")).read() != run_id
    # ... and --resume continues its run with the steps after the checkpoint
    cut = str(tmp_path / "cut")
    original = clip_train.Preemption
    preempt_at(monkeypatch, clip_train, 2)
    clip_train.main([*SMALL, *subset, "--max-steps", "4", "--output-dir", cut, "--report-to", "wandb"])
    wandb.finish()
    monkeypatch.setattr(clip_train, "Preemption", original)     # (undo() would lose WANDB_MODE too)
    first, = glob.glob(os.path.join(cut, "wandb", "offline-run-*", "run-*.wandb"))
    time.sleep(1.01 - time.time() % 1)     # offline run folders are named to the second
    clip_train.main([*SMALL, *subset, "--max-steps", "4", "--output-dir", cut, "--report-to", "wandb", "--resume", "auto"])
    wandb.finish()
    second, = set(glob.glob(os.path.join(cut, "wandb", "offline-run-*", "run-*.wandb"))) - {first}
    assert os.path.basename(second) == os.path.basename(first)                  # the same run id
    want = expected_scalars(cut)
    assert {step for _, step in wandb_history(first)} == {1, 2} and ("val/r_mean", 4) in want
    assert wandb_history(second) == {k: v for k, v in want.items() if k[1] > 2}
    with pytest.raises(UserError, match="--report-to 'mlflow': expected tensorboard, wandb"):
        clip_train.main([*SMALL, *subset, "--max-steps", "1", "--output-dir", out, "--report-to", "mlflow"])


def test_nothing_is_imported_without_report_to(tmp_path, subset):  # noqa: F811
    code = ("import sys, clip_train; clip_train.main(sys.argv[1:]); "
            "assert not {'wandb', 'tensorboard', 'torch.utils.tensorboard'} & set(sys.modules), 'imported'")
    args = [*SMALL, *subset[:2], "--tokenizer", subset[-1], "--max-steps", "1", "--output-dir", str(tmp_path)]
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("code", [0, 2])
def test_a_torchrun_process_ends_its_wandb_run_with_its_exit_code(tmp_path, code):
    """dist.exit_process (how cli() ends a torchrun process, skipping the interpreter's teardown)
    finishes the wandb run with all its records, and a failed run (status 2, a UserError) is
    recorded as failed. wandb's exit handler alone records what sys.exit was given, and waits for
    nothing when the process shares another's wandb service (this one may share pytest's, started by
    the test above): both cases failed before exit_process finished the run itself."""
    script = ("import sys, wandb; from common import dist; "
              "wandb.init(mode='offline', dir=sys.argv[1], project='t'); wandb.log({'x': 1.5}, step=1); "
              "dist.exit_process(int(sys.argv[2]))")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path), str(code)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": ROOT, "WANDB_SILENT": "true"})
    assert proc.returncode == code, proc.stderr[-2000:]
    run_file, = glob.glob(os.path.join(tmp_path, "wandb", "offline-run-*", "run-*.wandb"))
    assert wandb_history(run_file) == {("x", 1): 1.5}
    exits = [r.exit.exit_code for r in wandb_records(run_file) if r.WhichOneof("record_type") == "exit"]
    assert exits == [code]
