"""--accum-steps: K micro-batches per optimizer step. For the contrastive losses (CLIP, CoCa) the
feature cache makes the step that of one K x B batch: the gradient (read from AdamW's first moment
after one step) of 2 processes x 2 micro-batches of 4 equals that of 1 process with one batch of 16
over the same 16 samples, within 1e-5."""
import importlib
import os

import pytest
import torch

from tests.test_clip_train import SMALL, subset  # noqa: F401  (fixture)
from tests.test_distributed import torchrun


def first_gradients(out, beta1):
    """Each parameter's gradient of a one-step run: AdamW's exp_avg after step 1 is (1 - beta1) g."""
    state = torch.load(os.path.join(out, "checkpoint_last.pt"), weights_only=True)["optimizer"]["state"]
    return [state[i]["exp_avg"] / (1 - beta1) for i in sorted(state)]


def assert_same_gradients(a, b, tol=1e-5):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert (x - y).abs().max() <= tol * max(1.0, y.abs().max()), (i, (x - y).abs().max(), y.abs().max())


def script_args(name, subset):  # noqa: F811
    from tests import test_coca_train
    small = {"clip": SMALL, "coca": test_coca_train.SMALL}[name]
    return [*small, *subset[:2], "--tokenizer", subset[-1], "--max-steps", "1"]


@pytest.mark.parametrize("name", ["clip", "coca"])
def test_contrastive_accumulation_equals_one_big_batch(name, tmp_path, subset, monkeypatch):  # noqa: F811
    script = importlib.import_module(f"{name}_train")
    base = script_args(name, subset)
    script.main([*base, "--batch-size", "16", "--output-dir", str(tmp_path / "big")])
    want = first_gradients(str(tmp_path / "big"), 0.9)
    script.main([*base, "--batch-size", "8", "--accum-steps", "2", "--output-dir", str(tmp_path / "k2")])
    assert_same_gradients(first_gradients(str(tmp_path / "k2"), 0.9), want)
    proc = torchrun([f"{name}_train.py", *base, "--batch-size", "4", "--accum-steps", "2", "--output-dir",
                     str(tmp_path / "dist")], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_gradients(first_gradients(str(tmp_path / "dist"), 0.9), want)
    # control: each micro-batch its own contrastive batch of 8 (no cache) gives another gradient.
    # (The temperature's gradient taken in every pass, as open_clip's accum_freq does, would be
    # twice the big batch's and fail the comparison above.)
    monkeypatch.setattr(script.FeatureCache, "features", lambda self, j, live: live)
    script.main([*base, "--batch-size", "8", "--accum-steps", "2", "--output-dir", str(tmp_path / "nocache")])
    with pytest.raises(AssertionError):
        assert_same_gradients(first_gradients(str(tmp_path / "nocache"), 0.9), want)
