"""Multi-node: `torchrun --nnodes 2 --nproc_per_node 1` with c10d rendezvous on loopback (two
launchers on this machine, as two nodes would run them) trains to the same losses as
`--nproc_per_node 2` on one node."""
import os
import socket
import subprocess
import sys

from tests.test_clip_train import SMALL, subset, train_losses  # noqa: F401  (fixture)
from tests.test_distributed import ROOT, torchrun


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_train_as_one_node_with_two_processes(tmp_path, subset):  # noqa: F811
    args = ["clip_train.py", *SMALL, *subset[:2], "--tokenizer", subset[-1], "--max-steps", "5"]
    one = str(tmp_path / "one_node")
    proc = torchrun([*args, "--output-dir", one], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = str(tmp_path / "two_nodes")       # the shared output folder (a shared filesystem on a cluster)
    port = free_port()
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
              "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "vlp-test",
              *args, "--output-dir", two]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    nodes = [subprocess.Popen(launch, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]
    want, got = train_losses(one), train_losses(two)
    assert sorted(got) == list(range(1, 6))
    for step in want:
        assert abs(got[step] - want[step]) < 1e-6, (step, got[step], want[step])
    assert os.path.isfile(os.path.join(two, "checkpoint_last.pt"))
