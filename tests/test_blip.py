"""BLIP's method pieces: momentum EMA, queues across ranks, hard-negative sampling, ITM
re-ranking, and the start-up checks."""
import json
import os

import pytest
import torch

import blip_train
from tests.workers.dist_fixtures import blip_batch, blip_model
from tests.test_distributed import ROOT, torchrun


def test_momentum_parameters_follow_the_closed_form_ema():
    """After K training steps, theta_m = m^K theta_m(0) + sum_t (1 - m) m^(K-t) theta(t), where
    theta(t) are the online weights after step t's update (finish_step; BLIP does the same update
    at the start of the next forward, the same sequence). A skipped (non-finite) step moves
    neither the momentum weights nor the queue."""
    model, tok, cfg = blip_model(momentum=0.9)
    images, ids, mask, idx = blip_batch(tok, 4)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    name = "visual_encoder.transformer.resblocks.0.mlp.fc.weight"
    online = dict(model.named_parameters())[name]
    momentum = dict(model.named_parameters())[name.replace("visual_encoder", "visual_encoder_m", 1)]
    expected, history = momentum.detach().clone(), []
    for _ in range(3):
        losses = model(images, ids, mask, idx, alpha=torch.tensor(0.4), task="pretrain")
        sum(losses.values()).backward()
        opt.step()
        opt.zero_grad()
        model.finish_step(torch.tensor(True))
        history.append(online.detach().clone())
    m = 0.9
    for theta in history:
        expected = m * expected + (1 - m) * theta
    torch.testing.assert_close(momentum.detach(), expected, atol=1e-6, rtol=1e-6)
    assert not torch.equal(history[0], history[-1])              # the online weights did move
    assert set(losses) == {"loss_itc", "loss_itm", "loss_lm"}
    queue, ptr, before = model.image_queue.clone(), int(model.queue_ptr), momentum.detach().clone()
    model(images, ids, mask, idx, alpha=torch.tensor(0.4), task="pretrain")
    with torch.no_grad():
        online.add_(1.0)
    model.finish_step(torch.tensor(False))                      # a skipped step
    assert torch.equal(momentum.detach(), before)
    assert torch.equal(model.image_queue, queue) and int(model.queue_ptr) == (ptr + 4) % cfg.queue_size


def test_queue_negatives_and_rerank_under_torchrun(tmp_path, tiny):
    val = [dict(r, image=os.path.join(tiny, r["image"])) for r in json.load(open(os.path.join(tiny, "val.json")))[:7]]
    (tmp_path / "val.json").write_text(json.dumps(val))
    out = tmp_path / "blip.pt"
    proc = torchrun([os.path.join(ROOT, "tests", "workers", "dist_blip_worker.py"), str(out), str(tmp_path / "val.json")],
                    timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(out)
    assert got["world"] == 2
    # queue: both ranks' momentum features, in rank order, equal to one process on the whole batch
    model, tok, cfg = blip_model()
    images, ids, mask, idx = blip_batch(tok, 4)
    model(images, ids, mask, idx, alpha=0.4, task="pretrain")
    model.finish_step()
    for k in ("image_queue", "text_queue"):
        torch.testing.assert_close(got["queue"][k][:, :4], getattr(model, k)[:, :4], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got["queue"][k][:, 4:], getattr(model, k)[:, 4:])   # untouched slots
    assert got["queue"]["idx_queue"][0, :4].tolist() == [0, 1, 2, 3] and int(got["queue"]["queue_ptr"]) == 4
    # hard negatives: every draw is the hardest negative, which lives on the other rank
    expected = torch.tensor([2, 3, 0, 1])[:, None].expand(4, 20)
    assert torch.equal(got["neg_image"], expected) and torch.equal(got["neg_text"], expected)
    # retrieval re-ranking with rows split over ranks == one process
    model.eval()
    metrics, n_itm = blip_train.evaluate_retrieval(model, cfg, blip_train.read_annotations(str(tmp_path / "val.json")),
                                                   tok, torch.device("cpu"), "fp32")
    assert got["metrics"] == pytest.approx(metrics, abs=1e-6) and got["n_itm"] == n_itm == 4 * (7 + 35)


def test_hard_negatives_follow_the_softmax():
    """One text, three candidate images besides its own: the sampler picks each with
    probability softmax(sim / temp) renormalised over the negatives."""
    torch.manual_seed(0)
    sims = torch.tensor([0.9, 0.5, 0.2, 0.1])          # image 0 is the positive (same id)
    image_feat = torch.eye(4)
    text_feat = sims[None].repeat(4000, 1)             # 4000 copies of the text, as a batch
    weights = torch.softmax(text_feat @ image_feat.T / 0.1, 1)
    weights[:, 0] = 0                                   # what hard_negatives does for the same id
    draws = blip_train.sample_negatives(weights)
    p = torch.softmax(sims[1:] / 0.1, 0)                # (0.72, 0.16, 0.12)
    freq = torch.bincount(draws, minlength=4)[1:].float() / 4000
    assert (freq - p).abs().max() < 0.03, (freq, p)
    assert (draws != 0).all()                           # the positive is never drawn


def test_itm_with_batch_of_one_or_duplicate_ids_does_not_crash():
    """'invalid multinomial distribution' in the official code: no valid negative in the batch."""
    model, tok, cfg = blip_model()
    images, ids, mask, _ = blip_batch(tok, 4)
    for sl, idx in ((slice(0, 1), torch.tensor([0])), (slice(0, 4), torch.tensor([5, 5, 5, 5]))):
        losses = model(images[sl], ids[sl], mask[sl], idx, alpha=0.4, task="retrieval")
        assert torch.isfinite(losses["loss_itm"]) and torch.isfinite(losses["loss_itc"])
    weights = torch.tensor([[0.0, 0.0], [float("nan"), 1.0]])
    assert blip_train.sample_negatives(weights).shape == (2,)


def test_start_up_checks(tiny, tmp_path):
    base = ["--workers", "0", "--output-dir", str(tmp_path), "--max-steps", "1"]
    with pytest.raises(ValueError, match=r"--queue-size 100 is not a multiple of the global batch 8 x 1 = 8"):
        blip_train.main([*base, "--batch-size", "8", "--queue-size", "100"])
    with pytest.raises(ValueError, match=r"--prompt .* leaves no room"):
        blip_train.main([*base, "--task", "caption", "--prompt", "a picture of " * 10])
    with pytest.raises(SystemExit) as exit_info:                   # argparse: one line, status 2
        blip_train.main([*base, "--task", "vqa"])
    assert exit_info.value.code == 2


def test_missing_image_id_falls_back_to_the_image_path(tiny, tmp_path):
    """Documented: an entry without image_id uses its image path, so two entries of the same file
    are positives of each other in retrieval fine-tuning."""
    recs = json.load(open(os.path.join(tiny, "train.json")))[:3]
    data = [{"image": os.path.join(tiny, r["image"]), "caption": c} for r in recs for c in r["caption"][:2]]
    (tmp_path / "noid.json").write_text(json.dumps(data))
    loader, _, _, records = blip_train.build_data(
        blip_train.Config(train_data=str(tmp_path / "noid.json"), batch_size=2, workers=0), blip_model()[1], 0, 1)
    assert len(records) == 3 and loader.dataset.image_ids.tolist() == [0, 1, 2]
    assert [int(loader.dataset[i][2]) for i in range(6)] == [0, 0, 1, 1, 2, 2]     # what training steps see
    assert records[0]["image_id"] == os.path.join(tiny, recs[0]["image"]) and len(records[0]["captions"]) == 2


def test_itm_pairs_and_labels(monkeypatch):
    """ITM sees [positives; (text, hard negative image); (hard negative text, image)] with labels
    [1]*B + [0]*2B, and the logits of each block are those of exactly those pairs."""
    model, tok, cfg = blip_model()
    model.eval()
    images, ids, mask, idx = blip_batch(tok, 4)
    seen, drawn = {}, {}
    real_ce, real_hn = torch.nn.functional.cross_entropy, blip_train.hard_negatives

    def spy_ce(logits, labels, *a, **k):
        seen["logits"], seen["labels"] = logits.detach(), labels
        return real_ce(logits, labels, *a, **k)

    def spy_hn(*a, **k):
        drawn["neg_image"], drawn["neg_text"], idx_all = real_hn(*a, **k)
        return drawn["neg_image"], drawn["neg_text"], idx_all

    monkeypatch.setattr(blip_train.F, "cross_entropy", spy_ce)
    monkeypatch.setattr(blip_train, "hard_negatives", spy_hn)
    with torch.no_grad():
        embeds = model.image_embed(images)
        model.loss_itm(ids, mask, idx, embeds, model.image_feat(embeds), model.text_feat(ids, mask), False)
        pos = model.itm_logits(ids, mask, embeds)
        neg_img = model.itm_logits(ids, mask, embeds[drawn["neg_image"]])
        neg_txt = model.itm_logits(ids[drawn["neg_text"]], mask[drawn["neg_text"]], embeds)
    assert seen["labels"].tolist() == [1] * 4 + [0] * 8
    assert (drawn["neg_image"] != torch.arange(4)).all() and (drawn["neg_text"] != torch.arange(4)).all()
    torch.testing.assert_close(seen["logits"], torch.cat([pos, neg_img, neg_txt]), atol=1e-5, rtol=1e-5)


def test_lm_loss_is_shifted_and_skips_prompt_and_padding(monkeypatch):
    """Position t predicts token t + 1; [DEC], the prompt and padding are never targets."""
    model, tok, cfg = blip_model()
    images, ids, mask, idx = blip_batch(tok, 4)
    seen = {}
    real_ce = torch.nn.functional.cross_entropy

    def spy_ce(logits, targets, *a, **k):
        seen["targets"], seen["k"] = targets, k
        return real_ce(logits, targets, *a, **k)

    monkeypatch.setattr(blip_train.F, "cross_entropy", spy_ce)
    with torch.no_grad():
        model.loss_lm(ids, mask, model.image_embed(images), prompt_length=3)
    targets = seen["targets"].view(4, -1)                     # (B, L - 1): targets for positions 0..L-2
    expected = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    expected[:, :2] = -100                                     # tokens 1, 2 belong to the prompt ([DEC] = 0)
    assert torch.equal(targets, expected)
    assert seen["k"]["label_smoothing"] == 0.1 and seen["k"]["ignore_index"] == -100


def test_global_negatives_gather_image_tokens_in_the_autocast_dtype(monkeypatch):
    """With negatives from every rank, the image tokens are gathered in the autocast dtype (half
    the memory and traffic of fp32) and the ITM loss is bit-identical to gathering them in fp32:
    the cross-attention projects them in that dtype anyway. Local negatives gather nothing."""
    model, tok, cfg = blip_model()
    images, ids, mask, idx = blip_batch(tok, 4)
    seen = []

    def spy(x):
        seen.append(x.dtype)
        return x
    monkeypatch.setattr(blip_train.dist, "gather_with_grad", spy)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        embeds = model.image_embed(images).float()        # fp32, as CUDA autocast's LayerNorm returns
        feats = (model.image_feat(embeds), model.text_feat(ids, mask))
        torch.manual_seed(0)
        half = model.loss_itm(ids, mask, idx, embeds, *feats, True)
        monkeypatch.setattr(torch, "get_autocast_dtype", lambda device: torch.float32)
        torch.manual_seed(0)
        full = model.loss_itm(ids, mask, idx, embeds, *feats, True)
        model.loss_itm(ids, mask, idx, embeds, *feats, False)
    assert embeds.dtype == torch.float32 and seen == [torch.bfloat16, torch.float32]
    assert torch.equal(half, full)
