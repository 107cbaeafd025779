"""BLIP-2 stage 1 against transformers on the same weights (Blip2ForImageTextRetrieval,
Blip2ForConditionalGeneration and BertModel folders built from tiny random configs), the three
attention masks of Fig. 2 on constructed inputs, the frozen image encoder, the exact ITC gradient
against LAVIS's no-grad gather, and the losses under torchrun. The losses themselves are compared
with LAVIS's Blip2Qformer in tests/lavis/check_blip2.py."""
import os

import pytest
import torch

import blip2_train
from common.data import Tokenizer
from common.utils import UserError
from tests.test_distributed import torchrun

SMALL = dict(image_size=32, patch_size=8, vision_width=32, vision_layers=2, vision_heads=2,
             vision_mlp_dim=64,
             num_query_tokens=4, qformer_width=32, qformer_layers=4, qformer_heads=2, qformer_mlp_dim=64,
             max_positions=40, max_length=16, embed_dim=16, batch_size=4, k_test=4)


@pytest.fixture(scope="module")
def tok(tiny):
    """The tiny tokenizer with BLIP-2's [DEC] added (the last id), as build_blip2 leaves it."""
    t = Tokenizer(os.path.join(tiny, "tokenizer"))
    t.add_special_tokens(["[DEC]"])
    return t


def small_model(tok, seed=0, **overrides):
    cfg = blip2_train.Config(**{**SMALL, **overrides})
    torch.manual_seed(seed)
    return blip2_train.build_blip2(cfg, tok).eval()


TEXTS = ["a large red circle", "a small blue square on a black background", "a green triangle",
         "two shapes: a red diamond and a yellow circle", "a purple diamond"]


def batch(tok, n=4, seed=0):
    ids = tok([TEXTS[i % len(TEXTS)] for i in range(n)], SMALL["max_length"])
    images = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    return images, ids, (ids != tok.pad_id).long()


# ---- parity with transformers ----

def hf_config(tok, text=True):
    from transformers import Blip2QFormerConfig, Blip2VisionConfig
    vision = Blip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                               image_size=32, patch_size=8)
    qformer = Blip2QFormerConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                                 # a ConditionalGeneration folder keeps bert-base's 30522 in its config, one
                                 # short of BERT + [DEC]: it has no text side to read it from
                                 encoder_hidden_size=32, vocab_size=tok.vocab_size - (0 if text else 1),
                                 max_position_embeddings=40,
                                 use_qformer_text_input=text, hidden_dropout_prob=0.0,
                                 attention_probs_dropout_prob=0.0)
    return vision, qformer, dict(num_query_tokens=4, image_text_hidden_size=16)


def randomise(model, seed):
    """transformers initialises biases and norms to constants: randomise every tensor, keeping EVA's
    k bias at zero (the Blip2 conversion writes cat(q_bias, 0, v_bias))."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.05 if p.ndim > 1 else 0.2) + (1.0 if "norm" in name.lower()
                                                                                             and name.endswith("weight") else 0))
            if name.endswith("self_attn.qkv.bias"):
                D = p.shape[0] // 3
                p[D:2 * D] = 0
    return model.eval()


@pytest.fixture(scope="module")
def hf_retrieval(tok, tmp_path_factory):
    from transformers import Blip2Config, Blip2ForImageTextRetrieval
    vision, qformer, extra = hf_config(tok)
    hf = randomise(Blip2ForImageTextRetrieval(Blip2Config(vision_config=vision.to_dict(),
                                                          qformer_config=qformer.to_dict(), **extra)), 1)
    path = tmp_path_factory.mktemp("hf") / "itm"
    hf.save_pretrained(path)
    return hf, str(path)


def test_vision_model_features_match_transformers(tok, hf_retrieval):
    """Blip2VisionModel's last_hidden_state (post_layernorm on every token) = ln_vision(our EVA)."""
    hf, path = hf_retrieval
    ours = blip2_train.BLIP2.from_hf(path, tokenizer=tok).eval()
    assert ours.cfg.ln_vision_eps == 1e-6 and ours.cfg.num_query_tokens == 4
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours.image_embeds(x), hf.vision_model(pixel_values=x).last_hidden_state,
                                   atol=1e-5, rtol=1e-5)


def test_a_folders_sizes_and_epsilon_are_its_own_and_other_values_are_refused(tok, tmp_path):
    """A transformers folder whose vision MLP width is not a multiple of its width (44 / 49) and
    whose encoder LayerNorm eps is 1e-3: built with exactly those (sizes stored as sizes), equal to
    transformers. The same encoder under --vision-weights of a model with another eps, and config
    values our modules do not have (the Q-Former's hidden_act, the encoder's qkv_bias), are refused
    naming the field."""
    import json
    import shutil
    from transformers import Blip2Config, Blip2ForImageTextRetrieval
    vision, qformer, extra = hf_config(tok)
    vision.hidden_size, vision.intermediate_size, vision.layer_norm_eps = 44, 49, 1e-3
    config = Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), **extra)
    hf = randomise(Blip2ForImageTextRetrieval(config), 7)
    path = str(tmp_path / "odd")
    hf.save_pretrained(path)
    ours = blip2_train.BLIP2.from_hf(path, tokenizer=tok).eval()
    cfg = ours.cfg
    assert (cfg.vision_mlp_dim, cfg.vision_eps, cfg.ln_vision_eps) == (49, 1e-3, 1e-3)
    images, ids, mask = batch(tok)
    with torch.no_grad():
        ref = hf(pixel_values=images, input_ids=ids, attention_mask=mask,
                 use_image_text_matching_head=True).logits_per_image
        image_embeds = ours.image_embeds(images)
        want = hf.vision_model(pixel_values=images).last_hidden_state
        torch.testing.assert_close(image_embeds, want, atol=1e-5, rtol=1e-5)
        got = ours.itm_logits(ids, mask, image_embeds)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    model = small_model(tok, vision_width=44, vision_mlp_dim=49, vision_weights=path)
    with pytest.raises(UserError, match=r"odd: its layer_norm_eps is 0.001, this encoder's 1e-06 "
                                        r"\(--vision-eps\)"):
        blip2_train.load_vision(model, model.cfg)
    for part, field, value in (("qformer_config", "hidden_act", "relu"),
                               ("vision_config", "qkv_bias", False)):
        bad = str(tmp_path / field)
        shutil.copytree(path, bad)
        with open(os.path.join(bad, "config.json")) as f:
            config = json.load(f)
        config[part][field] = value
        with open(os.path.join(bad, "config.json"), "w") as f:
            json.dump(config, f)
        with pytest.raises(UserError, match=rf"{field}: {part}.{field} is {value!r}; this BLIP-2 "):
            blip2_train.BLIP2.from_hf(bad, tokenizer=tok)


def test_itm_logits_and_itc_similarity_match_blip2_for_image_text_retrieval(tok, hf_retrieval):
    hf, path = hf_retrieval
    ours = blip2_train.BLIP2.from_hf(path, tokenizer=tok).eval()
    images, ids, mask = batch(tok)
    with torch.no_grad():
        ref = hf(pixel_values=images, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True)
        image_embeds = ours.image_embeds(images)
        torch.testing.assert_close(ours.itm_logits(ids, mask, image_embeds), ref.logits_per_image, atol=1e-5, rtol=1e-5)
        # without the ITM head: the highest query-text cosine of each image with its own text
        # (transformers' diagonal use; it has no temperature)
        ref = hf(pixel_values=images, input_ids=ids, attention_mask=mask, use_image_text_matching_head=False)
        image_feats = ours.image_feats(ours.query_pass(image_embeds)[0])          # (B, Q, E)
        text_feat = ours.encode_text(ids, mask)                                   # (B, E)
        sim = torch.einsum("bqe,ne->bnq", image_feats, text_feat).amax(-1)
    torch.testing.assert_close(image_feats, ref.image_embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(text_feat, ref.text_embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sim.diagonal(), ref.logits_per_image.diagonal(), atol=1e-5, rtol=1e-5)


def test_conditional_generation_folder_gives_vision_and_qformer(tok, tmp_path):
    """Blip2ForConditionalGeneration (OPT language model) read for stage 1: the encoder and the
    Q-Former's query side load, the text side is named as missing, and the query outputs equal transformers'."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, OPTConfig
    vision, qformer, extra = hf_config(tok, text=False)
    opt = OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                    max_position_embeddings=64, word_embed_proj_dim=16)
    hf = randomise(Blip2ForConditionalGeneration(Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                                                             text_config=opt.to_dict(), image_token_index=60, **extra)), 2)
    hf.save_pretrained(tmp_path / "opt")
    ours = blip2_train.BLIP2.from_hf(str(tmp_path / "opt"), blip2_train.Config(stage=1), tokenizer=tok).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        image = hf.vision_model(pixel_values=x).last_hidden_state
        ref = hf.qformer(query_embeds=hf.query_tokens.expand(2, -1, -1), encoder_hidden_states=image).last_hidden_state
        torch.testing.assert_close(ours.query_pass(ours.image_embeds(x))[0], ref, atol=1e-5, rtol=1e-5)


def test_clip_l_option_is_the_penultimate_layer_of_a_transformers_clip_folder(tok, tmp_path):
    """--vision clip-l (LAVIS's clip_L): OpenAI's ViT layout (pre-norm, QuickGELU) up to its
    penultimate layer, no final norm: our encoder from a CLIPVisionModel folder equals its
    hidden_states[-2]; the unused last layer and post_layernorm are named, not an error."""
    from transformers import CLIPVisionConfig, CLIPVisionModel
    hf = randomise(CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=3,
                                                    num_attention_heads=2, image_size=32, patch_size=8,
                                                    hidden_act="quick_gelu")), 6)
    hf.save_pretrained(tmp_path / "clip")
    model = small_model(tok, vision="clip-l", vision_mlp_dim=128, vision_eps=1e-5,
                        vision_weights=str(tmp_path / "clip"))
    blip2_train.load_vision(model, model.cfg)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = hf(pixel_values=x, output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(model.visual_encoder(x), want, atol=1e-5, rtol=1e-5)


def test_eva_k_bias_must_be_zero_and_stays_zero_in_training(tok, hf_retrieval, tmp_path):
    from transformers import Blip2ForImageTextRetrieval
    hf, _ = hf_retrieval
    bad = Blip2ForImageTextRetrieval(hf.config)
    bad.load_state_dict(hf.state_dict())
    with torch.no_grad():
        bad.vision_model.encoder.layers[1].self_attn.qkv.bias[40] = 0.5           # inside the k third (32..63)
    bad.save_pretrained(tmp_path / "bad")
    with pytest.raises(UserError, match=r"layers\.1\.self_attn\.qkv\.bias.*non-zero k bias"):
        blip2_train.BLIP2.from_hf(str(tmp_path / "bad"), tokenizer=tok)
    # a trained (unfrozen) EVA keeps k = 0: its gradient is zeroed there
    model = small_model(tok, freeze_vision=False).train()
    images, ids, mask = batch(tok)
    sum(model(dict(images=images, ids=ids, mask=mask, idx=torch.arange(4))).values()).backward()
    g = model.visual_encoder.transformer.resblocks[0].attn.qkv.bias.grad
    assert g[32:64].abs().max() == 0 and g[:32].abs().max() > 0 and g[64:].abs().max() > 0


def test_init_text_starts_the_qformer_from_bert(tok, tmp_path):
    """--init-text: BertModel's embeddings, self-attention and FFNs; the query FFNs copy the text
    FFNs; the text-only pass equals BertModel's output; [DEC]'s new row stays ours."""
    from transformers import BertConfig, BertForMaskedLM
    torch.manual_seed(3)
    bert = BertForMaskedLM(BertConfig(vocab_size=tok.vocab_size - 1, hidden_size=32, num_hidden_layers=4,
                                      num_attention_heads=2, intermediate_size=64, max_position_embeddings=40,
                                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).eval()
    randomise(bert, 3)
    with torch.no_grad():
        bert.bert.embeddings.token_type_embeddings.weight.zero_()   # the Q-Former has no token types
    bert.save_pretrained(tmp_path / "bert")
    model = small_model(tok)
    dec_row = model.qformer.word_embeddings.weight[-1].clone()
    blip2_train.load_text_init(model, str(tmp_path / "bert"))
    _, ids, mask = batch(tok)
    with torch.no_grad():
        ref = bert(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        torch.testing.assert_close(model.text_pass(ids, mask), ref, atol=1e-5, rtol=1e-5)
    layer = model.qformer.layer[1]
    assert torch.equal(layer.intermediate_query.weight, layer.intermediate.weight)
    assert torch.equal(layer.output_query_norm.bias, layer.output_norm.bias)
    assert torch.equal(model.qformer.word_embeddings.weight[-1], dec_row)
    assert model.lm_head.decoder.weight is model.qformer.word_embeddings.weight


# ---- the three masks of Fig. 2 ----

def joint(model, ids, mask, image_embeds, which):
    """One Q-Former pass over [queries; text] with one of the three masks."""
    Q = model.cfg.num_query_tokens
    queries = model.query_tokens.expand(ids.shape[0], -1, -1)
    m = blip2_train.attention_masks(mask, Q)[which][:, None]
    return model.qformer(queries, ids, m, image_embeds)[0]


def test_the_three_masks_on_a_constructed_input(tok):
    model = small_model(tok, seed=4)
    images, ids, mask = batch(tok, 2)
    changed = ids.clone()
    j = 3                                              # a text token inside both captions
    assert bool(mask[:, j + 1].all())
    changed[:, j] = (changed[:, j] + 7) % tok.vocab_size
    Q = model.cfg.num_query_tokens
    with torch.no_grad():
        image_embeds = model.image_embeds(images)
        runs = {w: (joint(model, ids, mask, image_embeds, w), joint(model, changed, mask, image_embeds, w))
                for w in ("unimodal", "bidirectional", "multimodal_causal")}
        # ITC (uni-modal): no query output changes; the joint pass is the two separate passes
        a, b = runs["unimodal"]
        assert torch.equal(a[:, :Q], b[:, :Q])
        torch.testing.assert_close(a[:, :Q], model.query_pass(image_embeds)[0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(a[:, Q:], model.text_pass(ids, mask), atol=1e-6, rtol=1e-6)
        # ITM (bi-directional): every query output changes
        a, b = runs["bidirectional"]
        assert bool(((a[:, :Q] - b[:, :Q]).abs().amax(-1) > 1e-4).all())
        # ITG (multi-modal causal): nothing before the changed token changes, the token after it does
        a, b = runs["multimodal_causal"]
        assert torch.equal(a[:, :Q + j], b[:, :Q + j])
        assert bool(((a[:, Q + j + 1] - b[:, Q + j + 1]).abs().amax(-1) > 1e-4).all())
        # ITG's text rows reuse the ITC query pass's keys and values: the same as the joint pass
        dec = ids.clone()
        dec[:, 0] = model.dec_id
        full = joint(model, dec, mask, image_embeds, "multimodal_causal")
        kv = model.query_pass(image_embeds)[1]
        rows = blip2_train.attention_masks(mask, Q)["multimodal_causal"][:, None, Q:]
        torch.testing.assert_close(model.qformer(ids=dec, mask=rows, past=kv)[0], full[:, Q:], atol=1e-5, rtol=1e-5)


def test_masks_never_attend_to_padding_and_are_the_figure(tok):
    text_mask = torch.tensor([[1, 1, 1, 0]])
    m = blip2_train.attention_masks(text_mask, 2)
    uni, bi, causal = (m[k][0].int().tolist() for k in ("unimodal", "bidirectional", "multimodal_causal"))
    #          q q t t t pad
    assert uni == [[1, 1, 0, 0, 0, 0]] * 2 + [[0, 0, 1, 1, 1, 0]] * 4
    assert bi == [[1, 1, 1, 1, 1, 0]] * 6
    assert causal == [[1, 1, 0, 0, 0, 0]] * 2 + [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0],
                                                 [1, 1, 1, 1, 1, 0]]


# ---- the frozen image encoder, and what trains ----

def test_frozen_encoder_gets_no_gradient_no_state_and_does_not_change(tok):
    model = small_model(tok).train()
    assert not model.visual_encoder.training                       # eval() even in a training model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(blip2_train.param_groups(model, model.cfg), lr=1e-2)
    images, ids, mask = batch(tok)
    for _ in range(3):
        losses = model(dict(images=images, ids=ids, mask=mask, idx=torch.arange(4)))
        sum(losses.values()).backward()
        assert all(p.grad is None for p in model.visual_encoder.parameters())
        optimizer.step()
        optimizer.zero_grad()
    frozen = set(map(id, model.visual_encoder.parameters()))
    assert not any(id(p) in frozen for g in optimizer.param_groups for p in g["params"])
    assert not any(id(p) in frozen for p in optimizer.state)
    after = model.state_dict()
    for k, v in before.items():
        if k.startswith("visual_encoder."):
            assert torch.equal(after[k], v), k
    for k in ("ln_vision.weight", "query_tokens", "qformer.layer.0.crossattention.attn.kv.weight",
              "qformer.layer.1.intermediate_query.weight", "qformer.word_embeddings.weight", "itm_head.weight",
              "temp", "lm_head.dense.weight"):
        assert not torch.equal(after[k], before[k]), k
    assert not any(k.startswith("visual_encoder.") for k in model.trainable_state_dict())


def test_itc_gradient_is_exact_where_a_no_grad_gather_drops_terms(tok, monkeypatch):
    """ITC's value and gradient against the formula written out here; and LAVIS's gather (no
    gradient, even for the rank's own features; emulated by detaching, which
    tests/lavis/check_blip2.py compares with LAVIS itself) loses exactly two terms: i2t's gradient
    on the text side and t2i's on the image side."""
    import torch.nn.functional as F
    from common import dist
    model = small_model(tok)
    g = torch.Generator().manual_seed(5)
    image_feats = F.normalize(torch.randn(4, 4, 16, generator=g), dim=-1).requires_grad_()   # (B, Q, E)
    text_feat = F.normalize(torch.randn(4, 16, generator=g), dim=-1).requires_grad_()        # (B, E)
    idx = torch.arange(4)

    def grads(loss):
        return torch.autograd.grad(loss, (image_feats, text_feat), allow_unused=True)

    exact = grads(model.loss_itc(image_feats, text_feat, idx, "pretrain")[0])
    with monkeypatch.context() as m:
        m.setattr(dist, "gather_with_grad", lambda x: x.detach())
        lavis = grads(model.loss_itc(image_feats, text_feat, idx, "pretrain")[0])
    # the formula: max over queries of the cosine / temp, CE with label smoothing 0.1, both directions
    temp = model.temp.detach()
    sim = torch.einsum("bqe,ne->bnq", image_feats, text_feat).amax(-1) / temp                   # (images, texts)
    i2t = F.cross_entropy(sim, idx, label_smoothing=0.1) / 2
    t2i = F.cross_entropy(sim.T, idx, label_smoothing=0.1) / 2
    full = torch.autograd.grad(i2t + t2i, (image_feats, text_feat), retain_graph=True)
    for ours, want in zip(exact, full):
        torch.testing.assert_close(ours, want, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model.loss_itc(image_feats, text_feat, idx, "pretrain")[0], i2t + t2i)
    drop_image = torch.autograd.grad(t2i, image_feats, retain_graph=True)[0]
    drop_text = torch.autograd.grad(i2t, text_feat)[0]
    torch.testing.assert_close(exact[0] - lavis[0], drop_image, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(exact[1] - lavis[1], drop_text, atol=1e-6, rtol=1e-5)
    assert drop_text.abs().max() > 1e-2 and drop_image.abs().max() > 1e-2       # not a vanishing difference


# ---- distributed ----

def test_two_ranks_match_one_process_itc_itm_itg(tok, tmp_path, tiny):
    """torchrun --nproc_per_node 2 against one process on the same global batch of 4, ITM
    negatives pinned to the argmax: every loss and every gradient equal; each rank's hardest
    negatives are constructed to live on the other rank (image ids), and the ITM pairs scored
    on a rank include texts of the other."""
    out = str(tmp_path / "dist.pt")
    proc = torchrun(["tests/workers/dist_blip2_worker.py", out])
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(out, weights_only=True)
    from tests.workers.dist_blip2_worker import run
    ref = run(rank=0, world=1)
    for k in ("loss_itc", "loss_itm", "loss_lm"):
        assert abs(got["losses"][k] - ref["losses"][k]) < 1e-5, (k, got["losses"][k], ref["losses"][k])
    for name, g in ref["grads"].items():
        torch.testing.assert_close(got["grads"][name], g, atol=1e-5, rtol=1e-4, msg=name)
    assert got["foreign_texts"] > 0           # rank 0 scored pairs whose text came from rank 1
