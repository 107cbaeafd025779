"""ALBEF's model against independent implementations on the same weights (timm's ViT, transformers'
ViTModel and BertForMaskedLM, a checkpoint in the official key layout built from those), and the
exact pieces of its losses: MLM masking, the momentum EMA, hard negatives, the queues under
torchrun. The losses themselves are compared with LAVIS's AlbefPretrain in tests/lavis/check_albef.py."""
import json
import os
from functools import partial

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import albef_train
from common.data import Tokenizer, read_annotations
from common.utils import UserError
from common.weights import albef as albef_weights
from tests.test_distributed import torchrun

# widths of 128 with 2 heads: the official layout reads heads off the width (width / 64)
SMALL = dict(image_size=32, patch_size=8, vision_width=128, vision_layers=2, vision_heads=2, text_width=128,
             text_layers=4, fusion_layer=2, text_heads=2, text_mlp_dim=256, max_positions=32, max_length=16,
             embed_dim=16, queue_size=16, batch_size=4, k_test=4)


@pytest.fixture(scope="module")
def tok(tiny):
    return Tokenizer(os.path.join(tiny, "tokenizer"))


def small_model(tok, seed=0, **overrides):
    cfg = albef_train.Config(**{**SMALL, **overrides})
    cfg.vocab_size = tok.vocab_size
    torch.manual_seed(seed)
    return albef_train.build_albef(cfg, tok).eval()


def captions_batch(tok, n=4, seed=0):
    texts = ["a large red circle", "a small blue square on a black background", "a green triangle",
             "two shapes: a red diamond and a yellow circle", "a purple diamond"]
    ids = tok([texts[i % len(texts)] for i in range(n)], SMALL["max_length"])
    images = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    return images, ids, (ids != tok.pad_id).long()


# ---- parity with independent implementations ----

def timm_vit(mlp_ratio=4.0):
    import timm.models.vision_transformer as tv
    torch.manual_seed(1)
    vit = tv.VisionTransformer(img_size=32, patch_size=8, embed_dim=128, depth=2, num_heads=2, mlp_ratio=mlp_ratio,
                               qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), num_classes=10)
    for p in vit.parameters():          # timm initialises biases and norms to constants: randomise all
        p.data.normal_(0, 0.05) if p.ndim < 2 else None
    return vit.eval()


def test_vit_matches_timm_deit_loaded_from_a_state_dict(tok, tmp_path):
    vit = timm_vit()
    path = str(tmp_path / "deit.pth")
    torch.save({"model": vit.state_dict()}, path)             # DeiT's release format (classifier head included)
    model = small_model(tok)
    albef_weights.load_vision_init(model, path)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.visual_encoder(x), vit.forward_features(x), atol=1e-5, rtol=1e-5)
    # at another image size the positions are interpolated (DeiT 224 -> ALBEF 256)
    bigger = small_model(tok, image_size=48)
    albef_weights.load_vision_init(bigger, path)
    assert bigger.visual_encoder.positional_embedding.shape == (1 + 36, 128)
    torch.save({"model": {**vit.state_dict(), "dist_token": torch.zeros(1, 1, 128)}}, path)
    with pytest.raises(UserError, match="distilled DeiT"):
        albef_weights.load_vision_init(model, path)


def test_vit_matches_transformers_vit_model_folder(tok, tmp_path):
    from transformers import ViTConfig, ViTModel
    torch.manual_seed(2)
    hf = ViTModel(ViTConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512,
                            image_size=32, patch_size=8, layer_norm_eps=1e-6, hidden_act="gelu"),
                  add_pooling_layer=False).eval()
    for p in hf.parameters():
        p.data.normal_(0, 0.05) if p.ndim < 2 else None
    hf.save_pretrained(tmp_path / "vit")
    model = small_model(tok)
    albef_weights.load_vision_init(model, str(tmp_path / "vit"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.visual_encoder(x), hf(pixel_values=x).last_hidden_state, atol=1e-5, rtol=1e-5)
    # a config field that would change the numbers is refused, named
    edit_config(tmp_path / "vit", hidden_act="relu")
    with pytest.raises(UserError, match="config.json has hidden_act 'relu'"):
        albef_weights.load_vision_init(model, str(tmp_path / "vit"))


def edit_config(folder, **fields):
    with open(folder / "config.json") as f:
        config = json.load(f)
    with open(folder / "config.json", "w") as f:
        json.dump({**config, **fields}, f)


def hf_bert(tok, seed=3):
    from transformers import BertConfig, BertForMaskedLM
    torch.manual_seed(seed)
    bert = BertForMaskedLM(BertConfig(vocab_size=tok.vocab_size, hidden_size=128, num_hidden_layers=4,
                                      num_attention_heads=2, intermediate_size=256, max_position_embeddings=32,
                                      type_vocab_size=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    for p in bert.parameters():
        p.data.normal_(0, 0.05) if p.ndim < 2 else None
    return bert.eval()


def test_text_encoder_and_mlm_head_match_bert_for_masked_lm(tok, tmp_path):
    bert = hf_bert(tok)
    bert.save_pretrained(tmp_path / "bert")
    model = small_model(tok)
    albef_weights.load_text_init(model, str(tmp_path / "bert"))
    _, ids, mask = captions_batch(tok)
    with torch.no_grad():
        ref = bert(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        # text encoder = layers [0, fusion): BERT's hidden state after layer 2
        torch.testing.assert_close(model.text_embed(ids, mask), ref.hidden_states[2], atol=1e-5, rtol=1e-5)
        # every layer without an image (cross-attention skipped) + the MLM head = BertForMaskedLM
        logits = model.mlm_head(model.text_encoder(ids, mask))
    torch.testing.assert_close(logits, ref.logits, atol=1e-5, rtol=1e-5)
    assert model.mlm_head.decoder.weight is model.text_encoder.word_embeddings.weight
    # config fields that change the numbers but no weight's shape: refused, named (never ignored)
    for field, value in (("layer_norm_eps", 1e-5), ("hidden_act", "relu"), ("num_attention_heads", 4),
                         ("position_embedding_type", "relative_key")):
        bert.save_pretrained(tmp_path / "bert")
        edit_config(tmp_path / "bert", **{field: value})
        with pytest.raises(UserError, match=f"config.json has {field} {value!r}"):
            albef_weights.load_text_init(model, str(tmp_path / "bert"))


def official_state(tok, vit, bert, fusion=2, seed=4):
    """An ALBEF.pth in the official key layout (Sec. 10.1.2 of the reference notes), assembled from
    timm's and transformers' own state dicts: the cross-attention of the fusion layers, the
    projections, the ITM head and the momentum copies are random tensors of the official shapes."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g) * 0.05   # noqa: E731
    state = {f"visual_encoder.{k}": v for k, v in vit.state_dict().items() if not k.startswith("head.")}
    state.update({f"text_encoder.{k}": v for k, v in bert.state_dict().items()})
    state["text_encoder.bert.embeddings.position_ids"] = torch.arange(32)[None]
    for i in range(fusion, 4):
        pre = f"text_encoder.bert.encoder.layer.{i}.crossattention"
        for n in ("query", "key", "value"):
            state[f"{pre}.self.{n}.weight"], state[f"{pre}.self.{n}.bias"] = rnd(128, 128), rnd(128)
        state[f"{pre}.output.dense.weight"], state[f"{pre}.output.dense.bias"] = rnd(128, 128), rnd(128)
        state[f"{pre}.output.LayerNorm.weight"], state[f"{pre}.output.LayerNorm.bias"] = 1 + rnd(128), rnd(128)
    for name, shape in (("vision_proj", (16, 128)), ("text_proj", (16, 128)), ("itm_head", (2, 128))):
        state[f"{name}.weight"], state[f"{name}.bias"] = rnd(*shape), rnd(shape[0])
    momentum = {}
    for k, v in state.items():
        head, _, rest = k.partition(".")
        if head in ("visual_encoder", "text_encoder", "vision_proj", "text_proj"):
            momentum[f"{head}_m.{rest}"] = v + (rnd(*v.shape) if v.is_floating_point() else 0)
    state.update(momentum)
    state["text_encoder_m.cls.predictions.decoder.weight"] = state["text_encoder_m.bert.embeddings.word_embeddings.weight"]
    state["text_encoder_m.cls.predictions.decoder.bias"] = state["text_encoder_m.cls.predictions.bias"]
    # the queues as in ALBEF.pth: no idx_queue (ALBEF issue #79); here as long as SMALL's, pointer at 4
    state.update(temp=torch.tensor(0.05), image_queue=F.normalize(rnd(16, 16), dim=0),
                 text_queue=F.normalize(rnd(16, 16), dim=0), queue_ptr=torch.tensor([4]))
    return state


def test_official_layout_checkpoint_loads_through_from_official(tok, tmp_path, capsys):
    vit, bert = timm_vit(), hf_bert(tok)
    state = official_state(tok, vit, bert)
    path = str(tmp_path / "ALBEF.pth")
    torch.save({"model": state, "epoch": 29}, path)
    cfg = albef_train.Config(**SMALL)
    model = albef_train.ALBEF.from_official(path, cfg, tok).eval()
    assert (model.cfg.fusion_layer, model.cfg.text_layers, model.cfg.vision_heads, model.cfg.embed_dim) == (2, 4, 2, 16)
    x = torch.randn(2, 3, 32, 32)
    _, ids, mask = captions_batch(tok, 2)
    with torch.no_grad():
        torch.testing.assert_close(model.visual_encoder(x), vit.forward_features(x), atol=1e-5, rtol=1e-5)
        ref = bert(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        torch.testing.assert_close(model.text_embed(ids, mask), ref.hidden_states[2], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.mlm_head(model.text_encoder(ids, mask)), ref.logits, atol=1e-5, rtol=1e-5)
    ours = model.state_dict()
    for a, b in (("text_encoder.layer.3.crossattention.attn.q.weight", "text_encoder.bert.encoder.layer.3.crossattention.self.query.weight"),
                 ("text_encoder_m.layer.0.attention.attn.proj.bias", "text_encoder_m.bert.encoder.layer.0.attention.output.dense.bias"),
                 ("visual_encoder_m.transformer.resblocks.1.mlp.fc.weight", "visual_encoder_m.blocks.1.mlp.fc1.weight"),
                 ("mlm_head_m.decoder.weight", "text_encoder_m.bert.embeddings.word_embeddings.weight"),
                 ("itm_head.weight", "itm_head.weight"), ("temp", "temp")):
        assert torch.equal(ours[a], state[b]), a
    kv = ours["text_encoder.layer.2.crossattention.attn.kv.weight"]
    assert torch.equal(kv, torch.cat([state[f"text_encoder.bert.encoder.layer.2.crossattention.self.{n}.weight"]
                                      for n in ("key", "value")]))
    # the file's queues, as Retrieval.py loads them: rolled so that the oldest key (at the file's
    # pointer) is in slot 0, the pointer 0; their image ids unknown (-100, never a positive)
    assert torch.equal(model.image_queue, state["image_queue"].roll(-4, 1))
    assert torch.equal(model.text_queue, state["text_queue"].roll(-4, 1))
    assert int(model.queue_ptr) == 0 and bool(model.queue_filled.all()) and bool((model.idx_queue == -100).all())
    capsys.readouterr()
    other = albef_train.ALBEF.from_official(path, albef_train.Config(**{**SMALL, "queue_size": 8}), tok)
    assert "not in it: queues of this run's length (the file's 16, --queue-size 8)" in capsys.readouterr().out
    assert not other.queue_filled.any()                                         # then empty
    # token-type row 0 is added, as the official BertEmbeddings (token_type_ids default to zeros)
    assert model.text_encoder.token_type_embeddings is not None

    # a retrieval file (mscoco.pth): no 'bert.', no MLM head, no momentum model, no queues, 2x the grid
    retrieval = {k.replace("text_encoder.bert.", "text_encoder."): v for k, v in state.items()
                 if not (k.startswith(("visual_encoder_m.", "text_encoder_m.", "vision_proj_m.", "text_proj_m.",
                                       "text_encoder.cls.")) or k.endswith("_queue") or k == "queue_ptr")}
    retrieval["visual_encoder.pos_embed"] = torch.randn(1, 1 + 64, 128)
    torch.save({"model": retrieval}, path)
    capsys.readouterr()
    model = albef_train.ALBEF.from_official(path, cfg, tok)
    assert "not in it: MLM head, momentum model, queues" in capsys.readouterr().out
    assert not model.queue_filled.any() and int(model.queue_ptr) == 0                  # empty
    assert model.visual_encoder.positional_embedding.shape == (1 + 16, 128)     # 64 patches -> the run's 16
    for p, p_m in zip(*(m.parameters() for m in model.online_and_momentum())):
        assert torch.equal(p, p_m)                                              # momentum = a copy
    assert model.mlm_head.decoder.weight is model.text_encoder.word_embeddings.weight
    assert torch.equal(model.text_encoder.word_embeddings.weight, retrieval["text_encoder.embeddings.word_embeddings.weight"])

    # a key missing or one too many: an error naming it (never a silent strict=False)
    broken = dict(retrieval)
    del broken["text_encoder.encoder.layer.3.crossattention.self.key.bias"]
    torch.save({"model": broken}, path)
    with pytest.raises(UserError, match="crossattention.self.key.bias"):
        albef_train.ALBEF.from_official(path, cfg, tok)
    torch.save({"model": {**retrieval, "text_encoder.encoder.layer.0.extra.weight": torch.zeros(1)}}, path)
    with pytest.raises(UserError, match="extra.weight"):
        albef_train.ALBEF.from_official(path, cfg, tok)
    torch.save({"model": {"something": torch.zeros(1)}}, path)
    with pytest.raises(UserError, match="neither an ALBEF checkpoint"):
        albef_weights.read_init(path)


def test_official_file_with_an_mlp_width_not_a_multiple_of_the_width(tok, tmp_path):
    """The ViT's MLP width is read off the file and kept as a size (200 for width 128), not a ratio."""
    vit = timm_vit(mlp_ratio=200 / 128)
    path = str(tmp_path / "ALBEF.pth")
    torch.save({"model": official_state(tok, vit, hf_bert(tok))}, path)
    model = albef_train.ALBEF.from_official(path, albef_train.Config(**SMALL), tok).eval()
    assert model.cfg.vision_mlp_dim == 200
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.visual_encoder(x), vit.forward_features(x), atol=1e-5, rtol=1e-5)


# ---- the pieces of the losses ----

def test_mlm_masking_rates_exclusions_and_labels(tok):
    g = torch.Generator().manual_seed(0)
    n, L, V = 4000, 20, 1000
    ids = torch.randint(5, V, (n, L), generator=g)
    lengths = torch.randint(2, L + 1, (n,), generator=g)
    ids[:, 0] = 2                                                     # [CLS]
    ids[torch.arange(L)[None] >= lengths[:, None]] = 0                # [PAD] after each caption
    ids[torch.arange(n), lengths - 1] = 3                             # [SEP]
    masked, labels = albef_train.mask_tokens(ids, 0.15, 4, V, never=(0, 2), generator=g)
    chosen = labels != -100
    eligible = (ids != 0) & (ids != 2)
    assert not (chosen & ~eligible).any()                             # never [PAD] or [CLS]
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(masked[~chosen], ids[~chosen])
    m = int(eligible.sum())
    rate = float(chosen.sum()) / m
    assert abs(rate - 0.15) < 4 * (0.15 * 0.85 / m) ** 0.5, rate       # within 4 sigma
    c = int(chosen.sum())
    to_mask = float((masked[chosen] == 4).sum()) / c
    changed = float(((masked[chosen] != 4) & (masked[chosen] != ids[chosen])).sum()) / c
    kept = float((masked[chosen] == ids[chosen]).sum()) / c
    sigma = (0.1 * 0.9 / c) ** 0.5
    assert abs(to_mask - 0.8) < 5 * sigma and abs(changed - 0.1) < 5 * sigma and abs(kept - 0.1) < 5 * sigma, \
        (to_mask, changed, kept)
    assert (ids[:, 1:] == 3).any() and chosen[ids == 3].any()         # [SEP] may be masked, as the official code


def test_mlm_loss_with_nothing_masked_is_zero_not_nan(tok):
    model = small_model(tok).train()
    ids = tok(["", ""], 16)                                            # [CLS] [SEP] only
    assert int((ids != tok.pad_id).sum()) == 4
    images = torch.randn(2, 3, 32, 32)
    original = albef_train.mask_tokens
    try:   # nothing chosen at all: the official CrossEntropyLoss would be 0/0
        albef_train.mask_tokens = lambda ids, *a, **k: (ids.clone(), torch.full_like(ids, -100))
        losses = model(images, ids, (ids != tok.pad_id).long(), torch.arange(2), torch.tensor(0.4))
    finally:
        albef_train.mask_tokens = original
    assert float(losses["loss_mlm"].detach()) == 0.0
    sum(losses.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_mlm_distillation_is_the_mixture_of_hard_and_soft_cross_entropy(tok):
    """loss_mlm = (1 - alpha) CE(label) + alpha CE(momentum softmax), averaged over the masked
    tokens: checked against the two terms computed separately, with a momentum model that
    differs from the online one."""
    model = small_model(tok).train()
    with torch.no_grad():
        for p in model.momentum_params():
            p.add_(0.05 * torch.randn_like(p))
    images, ids, mask = captions_batch(tok)
    g = torch.Generator().manual_seed(5)
    masked, labels = albef_train.mask_tokens(ids, 0.5, model.mask_id, model.cfg.vocab_size, never=(0, 2), generator=g)
    original = albef_train.mask_tokens
    try:
        albef_train.mask_tokens = lambda *a, **k: (masked, labels)
        embeds, embeds_m = model.visual_encoder(images), model.visual_encoder_m(images)
        got = model.loss_mlm(ids, mask, embeds, embeds_m, torch.tensor(0.3))
    finally:
        albef_train.mask_tokens = original
    with torch.no_grad():
        logits = model.mlm_head(model.text_encoder(masked, mask, context=embeds))
        q = F.softmax(model.mlm_head_m(model.text_encoder_m(masked, mask, context=embeds_m)), -1)
    sel = labels != -100
    hard = F.cross_entropy(logits[sel], labels[sel])
    soft = -(F.log_softmax(logits[sel], -1) * q[sel]).sum(-1).mean()
    torch.testing.assert_close(got, 0.7 * hard + 0.3 * soft, atol=1e-5, rtol=1e-5)
    assert abs(float(hard - soft)) > 1e-3                               # the two terms do differ


def test_momentum_update_closed_form_and_skipped_step(tok):
    model = small_model(tok, momentum=0.9)
    with torch.no_grad():
        for p in model.momentum_params():
            p.add_(torch.randn_like(p))
    online, momentum = (list(m.parameters()) for m in model.online_and_momentum())
    before = [p.clone() for p in momentum]
    assert len(online) == len(momentum) and len({id(p) for p in momentum}) == len(momentum)
    model.finish_step(torch.tensor(False))                            # a skipped step leaves it alone
    assert all(torch.equal(a, b) for a, b in zip(momentum, before))
    model.finish_step()
    for p, p_m, b in zip(online, momentum, before):
        torch.testing.assert_close(p_m, 0.9 * b + 0.1 * p)
    # the tied MLM decoder was updated once, as the word embeddings it is
    assert model.mlm_head_m.decoder.weight is model.text_encoder_m.word_embeddings.weight


def test_hard_negatives_never_the_positive_and_degenerate_batches(tok):
    g = torch.Generator().manual_seed(0)
    feats = lambda n: F.normalize(torch.randn(n, 16, generator=g), dim=-1)   # noqa: E731
    idx = torch.tensor([0, 0, 1, 2, 3, 3, 4, 5])                      # two images with two captions each
    img, txt, img_m, txt_m = feats(8), feats(8), feats(8), feats(8)
    for _ in range(200):
        neg_image, neg_text, idx_all = albef_train.hard_negatives(img, txt, img_m, txt_m, idx, 0.07)
        assert (idx_all[neg_image] != idx).all() and (idx_all[neg_text] != idx).all()
    # the hardest key is drawn most often: put text 1's momentum key on image 0
    img_m2 = img_m.clone()
    draws = torch.stack([albef_train.hard_negatives(img, txt, img_m2, txt_m, torch.arange(8), 0.07)[1]
                         for _ in range(300)])
    sims = img @ txt_m.T
    sims.fill_diagonal_(-1)
    assert (draws == sims.argmax(1)).float().mean() > 0.3
    # a batch of one and a batch of one image id: no crash, labels say "match" for the forced pairs
    model = small_model(tok).train()
    images, ids, mask = captions_batch(tok, 4)
    for batch, index in (((images[:1], ids[:1], mask[:1]), torch.tensor([7])),
                         ((images, ids, mask), torch.tensor([3, 3, 3, 3]))):
        losses = model(*batch, index, torch.tensor(0.4))
        assert all(torch.isfinite(v) for v in losses.values()), losses


def test_itc_targets_are_the_positives_by_image_id_in_retrieval(tok):
    """Retrieval fine-tuning: y spreads over every key (batch and queue) with the same image id."""
    model = small_model(tok).train()
    model.image_queue.copy_(F.normalize(torch.randn(16, 16), dim=0))
    model.text_queue.copy_(F.normalize(torch.randn(16, 16), dim=0))
    model.queue_filled.fill_(True)
    model.idx_queue[0, :3] = torch.tensor([5, 6, 5])
    f = F.normalize(torch.randn(4, 16), dim=-1)
    loss = model.loss_itc(f, f, f, f, torch.tensor([5, 6, 7, 5]), torch.tensor(0.0), "retrieval")
    keys_t = torch.cat([f.T, model.text_queue], 1)
    keys_i = torch.cat([f.T, model.image_queue], 1)
    ids_all = torch.cat([torch.tensor([5, 6, 7, 5]), model.idx_queue[0]])
    pos = (torch.tensor([5, 6, 7, 5])[:, None] == ids_all).float()
    y = pos / pos.sum(1, keepdim=True)
    want = (-(F.log_softmax(f @ keys_t / model.temp, 1) * y).sum(1).mean()
            - (F.log_softmax(f @ keys_i / model.temp, 1) * y).sum(1).mean()) / 2
    torch.testing.assert_close(loss, want)
    assert float(pos[0].sum()) == 4                                   # itself, sample 3, queue 0 and queue 2


@pytest.mark.parametrize("task", ["pretrain", "retrieval"])
def test_queue_slots_not_yet_filled_take_no_part_in_itc(tok, task):
    """A queue that starts empty: with 8 of its 16 slots filled, the ITC loss (its softmax, the
    distillation targets, the positives by image id) and its gradient are those of a queue of the
    8 filled keys alone. Nothing filled: the batch alone, and finite."""
    g = torch.Generator().manual_seed(0)
    feats = lambda n: F.normalize(torch.randn(n, 16, generator=g), dim=-1)         # noqa: E731
    partial, full = small_model(tok).train(), small_model(tok, queue_size=8).train()
    for step in range(2):                           # two steps of 4 keys, ids 5, 6, 7, 8 and 7, 8, 9, 10
        keys = (feats(4), feats(4), torch.arange(4) + 5 + 2 * step)
        partial.dequeue_and_enqueue(*keys)
        full.dequeue_and_enqueue(*keys)
    assert int(partial.queue_ptr) == 8
    q_i, q_t, q_i_m, q_t_m = (feats(4).requires_grad_() for _ in range(4))
    idx, alpha = torch.tensor([5, 7, 11, 12]), torch.tensor(0.4)
    loss = partial.loss_itc(q_i, q_t, q_i_m, q_t_m, idx, alpha, task)
    grads = torch.autograd.grad(loss, (q_i, q_t))
    want = full.loss_itc(q_i, q_t, q_i_m, q_t_m, idx, alpha, task)
    torch.testing.assert_close(loss, want)
    for got, ref in zip(grads, torch.autograd.grad(want, (q_i, q_t))):
        torch.testing.assert_close(got, ref)
    empty = small_model(tok).train()
    loss = empty.loss_itc(q_i, q_t, q_i_m, q_t_m, idx, alpha, task)
    assert torch.isfinite(loss) and all(torch.isfinite(x).all() for x in torch.autograd.grad(loss, (q_i, q_t)))


def test_init_from_our_checkpoint_keeps_its_queues_as_retrieval_py_keeps_a_pretraining_files(tok):
    """--init-from one of our pretraining checkpoints: its queues (the filled slots only) arrive rolled
    to pointer 0, their image ids unknown (-100, never positives); another queue length starts empty."""
    import dataclasses

    pre = small_model(tok).train()
    g = torch.Generator().manual_seed(0)
    for step in range(3):                                   # 12 of 16 slots, pointer 12
        pre.dequeue_and_enqueue(F.normalize(torch.randn(4, 16, generator=g), dim=-1),
                                F.normalize(torch.randn(4, 16, generator=g), dim=-1), torch.arange(4) + 4 * step)
    saved = {"config": dataclasses.asdict(pre.cfg), "model": pre.state_dict()}
    cfg = albef_train.Config(**{**SMALL, "task": "retrieval", "init_from": "pre.pt"})
    albef_train.settle_config(cfg, ("ours", saved), tok)
    model = albef_train.build_model(cfg, tok, ("ours", saved))
    assert int(model.queue_ptr) == 0 and bool((model.idx_queue == -100).all())
    for name in ("image_queue", "text_queue", "queue_filled"):
        assert torch.equal(getattr(model, name), getattr(pre, name).roll(-12, 1)), name
    assert int(model.queue_filled.sum()) == 12
    cfg = albef_train.Config(**{**SMALL, "task": "retrieval", "init_from": "pre.pt", "queue_size": 8})
    cfg.explicit_keys = {"queue_size"}                           # --queue-size 8 on the command line
    albef_train.settle_config(cfg, ("ours", saved), tok)
    other = albef_train.build_model(cfg, tok, ("ours", saved))
    assert other.queue_filled.shape == (1, 8) and not other.queue_filled.any()


# ---- distributed: queues in rank order, global negatives, sharded evaluation ----

def test_queues_global_negatives_and_sharded_eval_under_torchrun(tok, tiny, tmp_path):
    val = os.path.join(tiny, "val.json")
    with open(val) as f:
        records = json.load(f)[:6]
    small_val = tmp_path / "val.json"
    for r in records:
        r["image"] = os.path.join(tiny, r["image"])
    small_val.write_text(json.dumps(records))
    out = str(tmp_path / "dist.pt")
    proc = torchrun(["tests/workers/dist_albef_worker.py", out, str(small_val)], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(out, weights_only=True)
    assert got["world"] == 2
    # single-process reference: the whole batch at once gives the same queue columns in order
    model = small_model(tok, seed=0, **{k: v for k, v in got["overrides"].items()})
    images, ids, mask = captions_batch(tok, 4)
    model.train()
    model(images, ids, mask, torch.arange(4), torch.tensor(0.4))
    model.finish_step()
    for k in ("image_queue", "text_queue", "idx_queue", "queue_ptr"):
        torch.testing.assert_close(got["queue"][k], getattr(model, k), atol=1e-5, rtol=1e-5)
    assert int(got["queue"]["queue_ptr"]) == 4 and got["queue"]["idx_queue"][0, :4].tolist() == [0, 1, 2, 3]
    # global negatives: every hardest negative lives on the other rank and is drawn from there
    assert (got["neg_image"] == torch.tensor([2, 3, 0, 1])[:, None]).float().mean() > 0.9
    assert (got["neg_text"] == torch.tensor([2, 3, 0, 1])[:, None]).float().mean() > 0.9
    assert got["global_itm_finite"]
    # evaluation with rows split over two ranks equals one process
    model.eval()
    ref, n_itm = albef_train.evaluate_retrieval(model, model.cfg, read_annotations(str(small_val)), tok,
                                                torch.device("cpu"), "fp32")
    assert n_itm == got["n_itm"]
    assert ref == pytest.approx(got["metrics"], abs=1e-4)
