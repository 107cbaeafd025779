"""clip_train.py end to end: learning on the tiny data, torchrun with 2 processes, checkpoints,
--resume auto, an interrupted run resumed to the same losses, --init-from and --eval-only."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import clip_train
from common.encoders import resize_pos_embed
from tests.test_distributed import ROOT, torchrun

SMALL = ["--vision-layers", "2", "--text-layers", "2", "--vision-width", "64", "--text-width", "64",
         "--embed-dim", "64", "--batch-size", "16", "--workers", "0", "--warmup-steps", "5", "--log-every", "1"]


@pytest.fixture(scope="module")
def subset(tiny, tmp_path_factory):
    """40 training images (200 pairs: 6 steps per epoch at 2 x 16) and 20 val images."""
    d = tmp_path_factory.mktemp("subset")
    for split, n in (("train", 40), ("val", 20)):
        with open(os.path.join(tiny, f"{split}.json")) as f:
            recs = json.load(f)[:n]
        for r in recs:
            r["image"] = os.path.join(tiny, r["image"])
        (d / f"{split}.json").write_text(json.dumps(recs))
    return ["--train-data", str(d / "train.json"), "--val-data", str(d / "val.json"),
            "--zeroshot-data", os.path.join(tiny, "zeroshot"), "--tokenizer", os.path.join(tiny, "tokenizer")]


def empty_caption_data(subset, tmp_path):
    """--train-data flags of 4 subset entries whose entry 2 has an empty caption (a user mistake
    every script must name by its entry)."""
    with open(subset[1]) as f:
        records = json.load(f)[:4]
    records[2]["caption"] = ["a red circle", "   "]
    bad = tmp_path / "empty.json"
    bad.write_text(json.dumps(records))
    return ["--train-data", str(bad), "--tokenizer", subset[-1]]


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_losses(out):
    """{step: loss} from metrics.jsonl; a step logged twice (before a crash and after resume) keeps the last."""
    return {r["step"]: r["loss"] for r in read_metrics(out) if r["split"] == "train"}


def kill_tree(pid):
    """SIGKILL a process and all its descendants (torchrun starts its workers in their own sessions)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry))
    todo, tree = [pid], []
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def twin_accuracy(checkpoint, tiny):
    """Shape, measured where only shape can tell: the tiny val split comes in groups of four images
    that differ only in one object's shape (data/make_tiny.py). For each caption, is its own image
    scored strictly above its three twins? A model blind to shape sees four identical scenes:
    25 % at best (ties count as misses)."""
    from common.data import ImageDataset, Tokenizer, eval_transform
    from common.utils import load_checkpoint
    saved = load_checkpoint(str(checkpoint))
    cfg = clip_train.Config(**saved["config"])
    model = clip_train.CLIP(cfg)
    model.load_state_dict(saved["model"])
    model.eval()
    with open(os.path.join(tiny, "val.json")) as f:
        val = json.load(f)
    tok = Tokenizer(os.path.join(tiny, "tokenizer"))
    images = ImageDataset([os.path.join(tiny, r["image"]) for r in val], eval_transform(cfg.image_size))
    hits = total = 0
    with torch.no_grad():
        image_emb = model.encode_image(torch.stack([images[i][0] for i in range(len(images))]))
        for g in range(0, len(val), 4):
            captions = [c for r in val[g:g + 4] for c in r["caption"]]
            owner = torch.tensor([j for j in range(4) for _ in val[g + j]["caption"]])
            scores = model.encode_text(tok(captions, cfg.context_length)) @ image_emb[g:g + 4].T    # (20, 4)
            own = scores[torch.arange(len(captions)), owner]
            twins = scores.masked_fill(torch.nn.functional.one_hot(owner, 4).bool(), -float("inf")).max(1).values
            hits += int((own > twins).sum())
            total += len(captions)
    return 100.0 * hits / total


def test_learns_far_above_chance_and_learns_shape(trained_clip, tiny):
    """160 steps of the default tiny preset (~2 min). Chance on 200 val images x 5 captions:
    R@1/5/10 = 0.5/2.5/5 both ways, r_mean 2.7; zero-shot top-1/top-5 4.2/20.8. Measured: r_mean
    72.4, zero-shot 33.3/100, twin accuracy 45.2. The same run with every shape word of the
    training captions replaced by one word (a model that can learn colour, size and layout only)
    gives r_mean 61.4, zero-shot 29.2/100 and twin accuracy 26.6 (at most 25 without shape, plus
    noise), so the twin assertion fails for it. Zero-shot top-1 is only checked against chance: a
    colour-only model reaches 25-29 there (README). The rolled-label controls of the v1 data gave
    r_mean 1.7-2.7."""
    tmp_path, metrics = trained_clip          # clip_train.main(["--max-steps", "160", "--workers", "0"])
    assert metrics["r_mean"] > 50, metrics
    assert metrics["zeroshot_top1"] > 15, metrics                         # chance 4.2 (24 classes)
    assert metrics["zeroshot_top5"] > 50, metrics                         # chance 20.8
    assert os.path.isfile(tmp_path / "checkpoint_best.pt")
    twins = twin_accuracy(tmp_path / "checkpoint_last.pt", tiny)
    assert twins > 36, twins                                               # colour-only: 26.6


def test_torchrun_checkpoint_and_resume_auto(tmp_path, subset):
    out = str(tmp_path / "run")
    first = torchrun(["clip_train.py", *SMALL, *subset, "--max-steps", "4", "--output-dir", out], timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    final = json.loads(first.stdout.strip().splitlines()[-1])
    assert set(final) >= {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "r_mean",
                          "zeroshot_top1", "zeroshot_top5"}
    ckpt = torch.load(os.path.join(out, "checkpoint_last.pt"), weights_only=True)
    assert ckpt["step"] == 4 and len(ckpt["rng"]) == 2 and ckpt["config"]["batch_size"] == 16
    assert set(ckpt) >= {"model", "optimizer", "scheduler", "scaler"} and ckpt["world_size"] == 2
    assert os.path.isfile(os.path.join(out, "checkpoint_best.pt"))
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["vision_layers"] == 2
    # Per-rank seeding: both ranks did the same work, so only different seeds (seed + rank) can
    # leave their generators in different states (one seed for all ranks left them equal).
    assert not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])
    # Resuming a finished run evaluates it again; another --max-steps is an error, not a silent change.
    second = torchrun(["clip_train.py", *SMALL, *subset, "--max-steps", "4", "--output-dir", out,
                       "--resume", "auto"], timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout and "at step 4" in second.stdout
    assert json.loads(second.stdout.strip().splitlines()[-1]) == pytest.approx(final, abs=1e-6)
    steps = [r["step"] for r in read_metrics(out) if r["split"] == "train"]
    assert steps == [1, 2, 3, 4]
    third = torchrun(["clip_train.py", *SMALL, *subset, "--max-steps", "8", "--output-dir", out,
                      "--resume", "auto"], timeout=300)
    assert third.returncode != 0 and "error: --max-steps 8 differs from 4 of the run being resumed" in third.stderr


def test_killed_run_resumes_to_the_same_losses(tmp_path, subset):
    """SIGKILL a 2-process run after its first mid-epoch checkpoint, resume it, and compare every
    step's loss with an uninterrupted run: same batches, same crops, same optimizer state."""
    args = [*SMALL, *subset, "--max-steps", "40", "--save-every", "4"]
    ref = str(tmp_path / "ref")
    proc = torchrun(["clip_train.py", *args, "--output-dir", ref], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = str(tmp_path / "killed")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "clip_train.py",
           *args, "--output-dir", out]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    victim = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and victim.poll() is None:
        if os.path.isfile(os.path.join(out, "metrics.jsonl")) and max(train_losses(out), default=0) >= 9:
            break
        time.sleep(0.02)
    kill_tree(victim.pid)
    victim.wait()
    killed_at = max(train_losses(out))
    assert 9 <= killed_at < 40, f"the run was not killed mid-way (last step {killed_at})"
    saved = torch.load(os.path.join(out, "checkpoint_last.pt"), weights_only=True)["step"]
    assert saved % 4 == 0 and 4 <= saved <= killed_at
    proc = torchrun(["clip_train.py", *args, "--output-dir", out, "--resume", "auto"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"at step {saved}" in proc.stdout
    want, got = train_losses(ref), train_losses(out)
    assert sorted(got) == list(range(1, 41))
    for step in range(1, 41):
        assert abs(got[step] - want[step]) < 1e-5, (step, got[step], want[step])
    final_ref = {k: v for k, v in read_metrics(ref)[-1].items() if k not in ("step", "epoch", "split")}
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == pytest.approx(final_ref, abs=1e-6)


def test_init_from_hf_and_eval_only(tmp_path, tiny):
    """--init-from a transformers CLIPModel folder (with its tokenizer) and --eval-only."""
    from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast
    from common.data import Tokenizer
    tok = Tokenizer(os.path.join(tiny, "tokenizer"))
    hf = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32, eos_token_id=tok.eos_id,
                         bos_token_id=tok.bos_id, pad_token_id=tok.pad_id),
        vision_config=dict(hidden_size=32, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                           image_size=64, patch_size=16), projection_dim=16))
    hf.save_pretrained(tmp_path / "hf")
    PreTrainedTokenizerFast.from_pretrained(os.path.join(tiny, "tokenizer")).save_pretrained(tmp_path / "hf")
    metrics = clip_train.main(["--init-from", str(tmp_path / "hf"), "--eval-only", "--workers", "0",
                               "--output-dir", str(tmp_path / "out")])
    assert set(metrics) >= {"r_mean", "zeroshot_top1"}
    with open(tmp_path / "out" / "config.json") as f:
        cfg = json.load(f)
    assert (cfg["vision_width"], cfg["patch_size"], cfg["embed_dim"]) == (32, 16, 16)
    # fine-tune from it on user data, then resume: the run keeps the checkpoint folder's tokenizer
    data = ["--train-data", os.path.join(tiny, "val.json"), "--batch-size", "16", "--workers", "0",
            "--output-dir", str(tmp_path / "ft")]
    clip_train.main(["--init-from", str(tmp_path / "hf"), "--max-steps", "3", *data])
    clip_train.main(["--resume", "auto", "--max-steps", "3", *data])
    ckpt = torch.load(tmp_path / "ft" / "checkpoint_last.pt", weights_only=True)
    assert ckpt["step"] == 3 and ckpt["epoch"] == 0 and ckpt["config"]["tokenizer"] == str(tmp_path / "hf")
    # --init-from that checkpoint at another image size (lr 0: the weights stay as loaded): its
    # tokenizer, not a --tokenizer question, and its 4 x 4 position grid interpolated to 6 x 6
    clip_train.main(["--init-from", str(tmp_path / "ft" / "checkpoint_last.pt"),
                     "--image-size", "96", "--lr", "0", "--max-steps", "1", *data[:-1], str(tmp_path / "ft96")])
    again = torch.load(tmp_path / "ft96" / "checkpoint_last.pt", weights_only=True)
    assert again["config"]["image_size"] == 96
    assert again["config"]["tokenizer"] == str(tmp_path / "hf")
    torch.testing.assert_close(again["model"]["visual.positional_embedding"],
                               resize_pos_embed(ckpt["model"]["visual.positional_embedding"], 6))
    assert math.isfinite(train_losses(str(tmp_path / "ft96"))[1])


@pytest.mark.parametrize("flags", [["--precision", "bf16"], ["--precision", "fp16"], ["--grad-checkpointing"]])
def test_precision_and_checkpointing_flags_run(tmp_path, subset, flags):
    """bf16 autocast, fp16 with a GradScaler and gradient checkpointing run end to end (on CPU
    here; the same code paths run on CUDA) and give a finite loss."""
    clip_train.main([*SMALL, *subset, "--max-steps", "2", "--output-dir", str(tmp_path), *flags])
    losses = train_losses(str(tmp_path))
    assert sorted(losses) == [1, 2] and all(math.isfinite(v) for v in losses.values())
