"""--accum-steps: K micro-batches per optimizer step. For the contrastive losses (CLIP, CoCa,
BLIP-2's ITC) the feature cache makes the step that of one K x B batch: the gradient (read from
AdamW's first moment after one step) of 2 processes x 2 micro-batches of 4 equals that of 1 process
with one batch of 16 over the same 16 samples, within 1e-5; token-mean losses (CoCa's L_Cap, BLIP-2's
ITG and stage-2 LM loss) are means over the step's tokens. ALBEF and BLIP (momentum queues) and
BLIP-2's ITM: the documented equivalent, each micro-batch against the step's state, averaged."""
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


@pytest.mark.parametrize("name, loss", [("clip", "clip"), ("coca", None), ("clip", "siglip"), ("clip", "diht")])
def test_contrastive_accumulation_equals_one_big_batch(name, loss, tmp_path, subset, monkeypatch):  # noqa: F811
    """CLIP with each --loss (SigLIP's bias, like the temperature, takes its gradient once a step)."""
    script = importlib.import_module(f"{name}_train")
    base = script_args(name, subset) + (["--loss", loss] if loss else [])
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


def queue_model(name, tiny):
    """A small ALBEF or BLIP in training mode, its forward arguments for 8 samples, and the forward."""
    from tests.workers.dist_fixtures import blip_batch, blip_model
    from tests.test_albef import captions_batch, small_model
    if name == "albef":
        from common.data import Tokenizer
        tok = Tokenizer(os.path.join(tiny, "tokenizer"))
        model = small_model(tok, queue_size=24).train()
        images, ids, mask = captions_batch(tok, n=8)
        return model, (images, ids, mask, torch.arange(8)), lambda m, b: m(*b, torch.tensor(0.4), "pretrain")
    model, tok, _ = blip_model(queue_size=24)
    return model.train(), blip_batch(tok, 8), lambda m, b: m(*b, torch.tensor(0.4), "pretrain", 0)


@pytest.mark.parametrize("name", ["albef", "blip"])
def test_queue_methods_accumulate_micro_batches_against_the_steps_queue(name, tiny):
    """The documented equivalent for the momentum queue: K micro-batches give the mean of the
    gradients each would give alone from the step's state (momentum model, queue, its own ITM
    negatives), then one EMA update and the K micro-batches' keys enqueued in order."""
    import copy
    model, batch, forward = queue_model(name, tiny)
    micro = [tuple(x[j * 4:(j + 1) * 4] for x in batch) for j in range(2)]
    alone = [copy.deepcopy(model) for _ in micro]
    for j, (m, b) in enumerate(zip(alone, micro)):
        torch.manual_seed(10 + j)                      # MLM masks, ITM negatives: the same draws below
        sum(forward(m, b).values()).backward()
    keys = []
    for j, b in enumerate(micro):
        torch.manual_seed(10 + j)
        (sum(forward(model, b).values()) / 2).backward()
        keys.append(model.pending_keys)
    params = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
    assert len(params) > 10
    for n, p in params:
        want = sum(dict(m.named_parameters())[n].grad for m in alone) / 2
        assert torch.allclose(p.grad, want, atol=1e-6, rtol=1e-5), n
    model.finish_step(keys=keys)
    alone[0].finish_step()
    alone[1].finish_step()
    keys = [torch.cat([alone[0].image_queue[:, :4], alone[1].image_queue[:, :4]], 1),
            torch.cat([alone[0].idx_queue[:, :4], alone[1].idx_queue[:, :4]], 1)]
    assert torch.equal(model.image_queue[:, :8], keys[0]) and torch.equal(model.idx_queue[:, :8], keys[1])
    assert int(model.queue_ptr) == 8 and model.pending_keys is None
    for (n, p), p_alone in zip(model.named_parameters(), alone[0].parameters()):   # one EMA, not two
        assert torch.equal(p, p_alone), n


def test_albef_runs_with_accumulation_and_advances_the_queue_per_micro_batch(tmp_path, subset):  # noqa: F811
    import albef_train
    from tests.test_albef_train import SMALL as ALBEF_SMALL, data_args
    out = str(tmp_path / "albef")
    albef_train.main([*ALBEF_SMALL, *data_args(subset)[:2], "--tokenizer", subset[-1], "--batch-size", "4",
                      "--queue-size", "24", "--accum-steps", "2", "--max-steps", "2", "--output-dir", out])
    ckpt = torch.load(os.path.join(out, "checkpoint_last.pt"), weights_only=True)
    assert int(ckpt["model"]["queue_ptr"]) == 16 and ckpt["steps_per_epoch"] == 200 // 8


def test_blip2_stage1_accumulation_itc_and_itg_equal_one_big_batch_itm_per_micro_batch(tiny):
    """BLIP-2 stage 1, 2 micro-batches of 4: ITC through the feature cache and ITG over the step's
    tokens give the gradient of one batch of 8; ITM is each micro-batch's own, averaged (its hard
    negatives among its own pairs), as the README says."""
    import copy

    from common.data import Tokenizer
    from common.utils import FeatureCache
    from tests.test_blip2 import batch, small_model
    tok = Tokenizer(os.path.join(tiny, "tokenizer"))
    tok.add_special_tokens(["[DEC]"])
    model = small_model(tok).train()
    images, ids, mask = batch(tok, n=8)
    ids[:, -2:] = tok.pad_id                              # different lengths: ITG's token mean matters
    mask = (ids != tok.pad_id).long()
    ids[3, 5:], mask[3, 5:] = tok.pad_id, 0
    idx = torch.arange(8)
    big = copy.deepcopy(model)
    losses = big(dict(images=images, ids=ids, mask=mask, idx=idx))
    (losses["loss_itc"] + losses["loss_lm"]).backward()
    micro = [dict(images=images[s], ids=ids[s], mask=mask[s], idx=idx[s]) for s in (slice(0, 4), slice(4, 8))]
    count = torch.tensor(float((ids[:, 1:] != tok.pad_id).sum()))
    cache = FeatureCache(lambda b: {**model.itc_features(b["images"], b["ids"], b["mask"]), "idx": b["idx"]}, micro)
    itc = []
    for j, b in enumerate(micro):
        with cache.micro(j, count) as m:
            part = model(b, m)
            (part["loss_itc"] + part["loss_lm"]).backward()
        itc.append(part["loss_itc"])
    assert torch.allclose(itc[0], losses["loss_itc"], atol=1e-6) and torch.allclose(itc[1], losses["loss_itc"], atol=1e-6)
    grads = {n: p.grad for n, p in big.named_parameters() if p.grad is not None}
    assert "temp" in grads and len(grads) > 20
    for n, p in model.named_parameters():
        if n in grads:
            assert (p.grad - grads[n]).abs().max() <= 1e-5 * max(1.0, grads[n].abs().max()), n
    # ITM: the micro-batches' mean, each from its own negatives
    alone = [copy.deepcopy(big) for _ in micro]
    for j, (m, b) in enumerate(zip(alone, micro)):
        m.zero_grad()
        torch.manual_seed(j)
        m(b)["loss_itm"].backward()
    model.zero_grad()
    for j, b in enumerate(micro):
        torch.manual_seed(j)
        (model(b, cache.micro(j, count))["loss_itm"] / 2).backward()
    for n, p in model.named_parameters():
        if p.grad is not None:
            want = sum(dict(m.named_parameters())[n].grad for m in alone) / 2
            assert torch.allclose(p.grad, want, atol=1e-6, rtol=1e-5), n


def test_blip2_accumulation_under_bf16_caches_what_the_live_pass_computes(  # noqa: F811
        tmp_path, subset, monkeypatch):
    """--precision bf16 (on CPU here) with --accum-steps 2: the feature cache's pass runs under the
    same autocast as the live pass, so each micro-batch's cached ITC features are exactly (dtype and
    values) those its live pass recomputes: ITC over the K micro-batches stays one batch's.
    (Outside autocast the cache held fp32 features, ~1e-3 from the live bf16 ones.)"""
    import blip2_train
    from tests.test_albef_train import data_args
    from tests.test_blip2_train import SMALL as BLIP2_SMALL
    gaps = []

    class Spy(blip2_train.FeatureCache):
        def features(self, j, live):
            for k in ("image", "text") if self.active else ():
                cached, now = self.cache[j][k], live[k].detach()
                gap = float((cached.float() - now.float()).abs().max())
                gaps.append((k, cached.dtype, now.dtype, gap))
            return super().features(j, live)
    monkeypatch.setattr(blip2_train, "FeatureCache", Spy)
    blip2_train.main([*BLIP2_SMALL, *data_args(subset), "--precision", "bf16", "--batch-size", "4",
                      "--accum-steps", "2", "--max-steps", "1", "--k-test", "2",
                      "--output-dir", str(tmp_path)])
    assert len(gaps) == 4, gaps
    for name, cached, live, gap in gaps:
        assert cached == live == torch.bfloat16 and gap == 0.0, (name, cached, live, gap)


def test_blip2_stage2_accumulation_equals_one_big_batch(tmp_path, subset):  # noqa: F811
    """Stage 2's LM loss over the step's target tokens: 2 micro-batches of 4 give the gradient of
    one batch of 8 (the Q-Former side's, from AdamW's first moment)."""
    import blip2_train
    from tests.test_albef_train import data_args
    from tests.test_blip2_stage2_train import STAGE2
    from tests.test_blip2_train import SMALL as BLIP2_SMALL
    base = [*BLIP2_SMALL, *data_args(subset)[:2], "--tokenizer", subset[-1], *STAGE2, "--max-steps", "1"]
    blip2_train.main([*base, "--batch-size", "8", "--output-dir", str(tmp_path / "big")])
    blip2_train.main([*base, "--batch-size", "4", "--accum-steps", "2", "--output-dir", str(tmp_path / "k2")])
    assert_same_gradients(first_gradients(str(tmp_path / "k2"), 0.9), first_gradients(str(tmp_path / "big"), 0.9))
