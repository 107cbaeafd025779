"""Distributed equivalence under torchrun (2 processes, gloo, CPU): the same global batch split
over two ranks gives the loss and, after DDP averaging, the gradients of one process on the
whole batch; the gather helpers return every rank's data in rank order."""
import os
import subprocess
import sys

import torch

import clip_train
from tests.workers.dist_fixtures import clip_batch, clip_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torchrun(args, nproc=2, **kw):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] + args
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, **kw)


def preempt_at(monkeypatch, script, calls):
    """Make an in-process run of `script` see a preemption request at its `calls`-th check (once per
    step), as SIGTERM would."""
    class PreemptAt(script.Preemption):
        def requested(self):
            self.calls = getattr(self, "calls", 0) + 1
            return self.calls == calls
    monkeypatch.setattr(script, "Preemption", PreemptAt)


def one_line_error(*args, timeout=300):
    """Run `python *args` in the repository root as a user would: it must exit 2 with one `error: ...`
    line on stderr (library warnings aside) and no traceback. Returns that line."""
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "Warning" not in line]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    return lines[0]


def signal_processes(pids, name="TERM"):
    """Send SIGTERM (or SIG`name`) to `pids` from another process, as torchrun or SLURM do (a
    DataLoader worker signalled by its own parent exits quietly instead). A worker that has just
    finished its share is no error."""
    subprocess.run(["kill", "-s", name, *map(str, pids)], stderr=subprocess.DEVNULL)


def signal_at(monkeypatch, script, calls, name="TERM"):
    """Make an in-process run of `script` get a real SIGTERM (or SIG`name`) just before its
    `calls`-th preemption check, sent as torchrun and SLURM send it: to the process and to its
    DataLoader workers (a rank's process group)."""
    import multiprocessing
    import time

    class SignalAt(script.Preemption):
        def requested(self):
            self.calls = getattr(self, "calls", 0) + 1
            if self.calls == calls:
                signal_processes([*(p.pid for p in multiprocessing.active_children()), os.getpid()], name)
                deadline = time.time() + 30   # delivery is asynchronous: another thread may take it later
                while self.received is None and time.time() < deadline:
                    time.sleep(0.01)
            return super().requested()
    monkeypatch.setattr(script, "Preemption", SignalAt)


def sigterm_mid_run(script, args, out, stop_at, log_path, timeout=300, workers=2):
    """Start `torchrun --nproc_per_node 2 script args --workers 2 --output-dir out` and send it
    SIGTERM once its metrics.jsonl has a train step >= stop_at; wait for it to exit. torchrun sends
    it to each rank's process group, the DataLoader workers included, as SLURM or Kubernetes would
    signal every process. Returns its combined stdout and stderr."""
    import signal
    import time
    from tests.test_clip_train import train_losses
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    with open(log_path, "w") as log:
        victim = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                   script, *args, "--workers", str(workers), "--output-dir", out], cwd=ROOT, env=env,
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline and victim.poll() is None:
            if os.path.isfile(os.path.join(out, "metrics.jsonl")) and max(train_losses(out), default=0) >= stop_at:
                break
            time.sleep(0.02)
        victim.send_signal(signal.SIGTERM)
        victim.wait(timeout=120)
    with open(log_path) as f:
        return f.read()


def test_two_ranks_match_one_process(tmp_path):
    out = tmp_path / "dist.pt"
    proc = torchrun([os.path.join(ROOT, "tests", "workers", "dist_clip_worker.py"), str(out)], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(out)
    assert got["world"] == 2
    torch.manual_seed(0)
    model = clip_train.CLIP(clip_config())
    images, ids = clip_batch()
    loss = clip_train.clip_loss(*model(images, ids))
    loss.backward()
    torch.testing.assert_close(got["loss"], loss.detach(), atol=1e-5, rtol=1e-5)
    n_checked = 0
    for name, p in model.named_parameters():
        torch.testing.assert_close(got["grads"][name], p.grad, atol=1e-5, rtol=1e-4, msg=name)
        n_checked += p.grad.abs().sum() > 0
    assert n_checked == len(list(model.parameters()))        # every gradient is non-zero and compared
    # SigLIP (each rank's images against both ranks' text blocks) and DiHT's HN-NCE (hardness
    # weights over the whole gathered row): the same loss and every gradient as one process
    for name, loss_fn in (("siglip", clip_train.siglip_loss), ("diht", clip_train.hn_nce_loss)):
        torch.manual_seed(0)
        model = clip_train.CLIP(clip_config(loss=name))
        loss = loss_fn(*model(images, ids))
        loss.backward()
        torch.testing.assert_close(got[name]["loss"], loss.detach(), atol=1e-5, rtol=1e-5, msg=name)
        for p_name, p in model.named_parameters():
            torch.testing.assert_close(got[name]["grads"][p_name], p.grad, atol=1e-5, rtol=1e-5,
                                       msg=f"{name} {p_name}")
            assert p.grad.abs().sum() > 0, (name, p_name)
        assert ("logit_bias" in got[name]["grads"]) == (name == "siglip")
    assert got["varlen"].tolist() == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
    assert got["nograd"].tolist() == [[0], [1]]
    assert got["objs"] == [{"rank": 0}, {"rank": 1}]


def test_gradient_without_grad_gather_would_differ():
    """The check above can fail: dropping the cross-rank terms (a no-grad gather) changes the
    text-side gradients by far more than the tolerance."""
    torch.manual_seed(0)
    model = clip_train.CLIP(clip_config())
    images, ids = clip_batch()
    img, txt, scale = model(images, ids)
    full = torch.autograd.grad(clip_train.clip_loss(img, txt, scale), img)[0]
    # rank 0's view with a detached copy of rank 1's features: its gradient for its own rows
    b = 4
    logits = scale * img[:b] @ txt.detach().T
    logits_t = scale * txt[:b].detach() @ torch.cat([img[:b], img[b:].detach()]).T
    labels = torch.arange(b)
    part = (torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits_t, labels)) / 2
    partial = torch.autograd.grad(part / 2, img)[0]
    assert (partial[:b] - full[:b]).abs().max() > 1e-3
