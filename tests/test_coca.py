"""Our CoCa against open_clip's CoCa and CoCaLoss on the same weights (a tiny random config with
unequal widths, saved as open_clip saves its hub files, loaded with CoCa.from_open_clip), the
CLS attention mask, exact padding trimming, and generation (greedy against a step-by-step argmax
over open_clip's forward, beam search, the KV cache)."""
import json

import pytest
import torch
import torch.nn.functional as F

import coca_train
from coca_train import CoCa, caption_loss, caption_positions, cls_attention_mask, contrastive_loss, trim_padding
from common.utils import UserError

VOCAB, SOT, EOT, PAD, CTX = 64, 62, 63, 0, 12
# vision width 48 != embed/text width 32: the pooler then has separate q/k/v weights in open_clip
OPEN_CLIP_CFG = dict(
    embed_dim=32,
    vision_cfg=dict(image_size=32, layers=2, width=48, head_width=24, patch_size=8, attentional_pool=True,
                    attn_pooler_heads=4, attn_pooler_queries=6, output_tokens=True),
    text_cfg=dict(context_length=CTX, vocab_size=VOCAB, width=32, heads=2, layers=2, embed_cls=True,
                  output_tokens=True),
    multimodal_cfg=dict(context_length=CTX, vocab_size=VOCAB, width=32, heads=2, layers=3))


def build_open_clip(seed=0, cfg=OPEN_CLIP_CFG):
    from open_clip.coca_model import CoCa as OpenClipCoCa
    torch.manual_seed(seed)
    model = OpenClipCoCa(**cfg).eval()
    with torch.no_grad():
        # open_clip leaves text_decoder.text_projection as torch.empty (its init_parameters is never called)
        torch.nn.init.normal_(model.text_decoder.text_projection, std=32 ** -0.5)
        for p in model.parameters():      # move every tensor off its default init, so a swapped key cannot hide
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def open_clip_coca(tmp_path_factory):
    model = build_open_clip()
    path = tmp_path_factory.mktemp("open_clip_coca")
    torch.save(model.state_dict(), path / "open_clip_pytorch_model.bin")          # open_clip's hub file layout
    with open(path / "open_clip_config.json", "w") as f:
        json.dump({"model_cfg": OPEN_CLIP_CFG, "preprocess_cfg": {}}, f)
    return model, str(path)


def padded_ids(lengths=(3, 10, 1, 6), seed=1):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:    # 10 + SOT/EOT fills the context
        row = [SOT] + torch.randint(1, SOT, (n,), generator=g).tolist() + [EOT]
        rows.append(row + [PAD] * (CTX - len(row)))
    return torch.tensor(rows)


def images(n=4, seed=2):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def ours_from(path, **kw):
    return CoCa.from_open_clip(path, pad_id=PAD, eos_id=EOT, **kw).eval()


def test_embeddings_logits_and_loss_match_open_clip(open_clip_coca):
    from open_clip.loss import CoCaLoss
    ref, path = open_clip_coca
    ours = ours_from(path)                          # legacy CLS mask: the weights' training mask
    cfg = ours.cfg
    assert (cfg.vision_width, cfg.embed_dim, cfg.text_width, cfg.n_queries, cfg.decoder_layers) == (48, 32, 32, 6, 3)
    assert (cfg.vision_heads, cfg.pooler_heads, cfg.text_heads, cfg.cls_mask) == (2, 4, 2, "legacy")
    x, ids = images(), padded_ids()
    with torch.no_grad():
        out = ref(x, ids)
        img, txt, scale, logits = ours(x, ids)
        total = sum(CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0, pad_id=PAD)(
            out["image_features"], out["text_features"], out["logits"], out["labels"], out["logit_scale"]))
        positions, targets = caption_positions(ids, PAD)
        ours_total = 2.0 * caption_loss(ours(x, ids, positions)[3], targets, x.device) + contrastive_loss(img, txt, scale)
    torch.testing.assert_close(img, out["image_features"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(txt, out["text_features"], atol=1e-5, rtol=1e-5)
    # every position the loss reads (a real input token); open_clip 3.3 also hides padding keys from
    # the padding rows, the weights' mask does not (test_legacy_cls_mask_is_the_one_...)
    real = ids[:, :-1] != PAD
    torch.testing.assert_close(logits[real], out["logits"][real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scale, out["logit_scale"])
    torch.testing.assert_close(ours_total, total, atol=1e-5, rtol=1e-5)
    # the decoder's image tokens: open_clip's 255 (here 5) pooled tokens after token 0
    with torch.no_grad():
        torch.testing.assert_close(ours.image_features(x)[1], ref._encode_image(x)[1], atol=1e-5, rtol=1e-5)


def test_correct_cls_mask_matches_open_clip_flag(open_clip_coca):
    """open_clip's `correct_cls_mask` (set by hand: its configs never pass it) equals ours."""
    ref, path = open_clip_coca
    ours = ours_from(path, cls_mask="correct")
    ids = padded_ids()
    ref.text.correct_cls_mask = True
    try:
        with torch.no_grad():
            want = ref.encode_text(ids)
    finally:
        ref.text.correct_cls_mask = False
    with torch.no_grad():
        got = ours.encode_text(ids)
        legacy = ours_from(path).encode_text(ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - legacy).abs().max() > 1e-3          # the two masks really differ on padded captions


def test_cls_mask_sees_every_token_and_no_padding():
    ids = torch.tensor([[SOT, 5, 6, EOT, PAD, PAD], [SOT, 7, EOT, PAD, PAD, PAD]])
    keep = cls_attention_mask(ids, PAD)[:, 0, 0]                  # (B, L + 1) keys anyone may see
    assert keep.tolist() == [[1, 1, 1, 1, 0, 0, 1], [1, 1, 1, 0, 0, 0, 1]]
    legacy = cls_attention_mask(ids, PAD, legacy=True)[:, 0]      # (B, L + 1, L + 1)
    # the CLS row, shifted (open_clip#549)
    assert legacy[:, -1].tolist() == [[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0, 0]]
    assert legacy[:, :-1].all()                                   # the caption rows: causal only


def legacy_mask_by_hand(ids):
    """The mask open_clip's CoCa weights were trained with (build_cls_mask, open_clip 76c8f85,
    Jan 2023, unchanged until 2.32), on top of the causal one, built entry by entry: every
    caption row keeps every key; the CLS row (last) keeps key 0 and key k when token k - 1 is not
    padding."""
    B, L = ids.shape
    keep = torch.ones(B, L + 1, L + 1, dtype=torch.bool)
    for b in range(B):
        for k in range(1, L + 1):
            keep[b, L, k] = bool(ids[b, k - 1] != PAD)
    return keep


def test_legacy_cls_mask_is_the_one_the_weights_were_trained_with(open_clip_coca):
    """A pad id inside a caption: CLIP BPE's "!" is id 0, open_clip's padding ("wow !?!!" ->
    "!", "?!!"). The published weights' caption rows saw it (causal only); open_clip >= 3.0's legacy
    mode hides it from every row. Ours (legacy) equals open_clip's model run with the 76c8f85 mask
    built by hand: text embedding, token states and caption logits."""
    import open_clip
    assert 0 in open_clip.get_tokenizer("coca_ViT-B-32")(["wow !?!!"])[0, :3].tolist()
    ref, path = open_clip_coca
    ours = ours_from(path)
    x, ids = images(), padded_ids()
    ids[0, 2], ids[1, 5], ids[1, 6], ids[3, 1] = PAD, PAD, PAD, PAD       # "!" inside captions

    def build_76c8f85(text, seq_len, dtype):
        keep = legacy_mask_by_hand(text)
        mask = torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, float("-inf"))
        return mask.repeat_interleave(ref.text.heads, 0)                 # (B * H, L + 1, L + 1)
    with torch.no_grad():
        stock = ref._encode_text(ids)[1]     # open_clip 3.3's legacy: pad keys hidden in every row
        ref.text._build_additive_mask = build_76c8f85
        try:
            want, want_tokens = ref._encode_text(ids)
            out = ref(x, ids)
        finally:
            del ref.text._build_additive_mask
        got, got_tokens = ours.text_features(ids)
        _, txt, _, logits = ours(x, ids)
    torch.testing.assert_close(F.normalize(got, dim=-1), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_tokens, want_tokens, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(txt, out["text_features"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, out["logits"], atol=1e-5, rtol=1e-5)
    assert (stock - want_tokens).abs().max() > 1e-3    # open_clip 3.3 runs another mask


@pytest.mark.parametrize("cls_mask", ["correct", "legacy"])
def test_padding_changes_nothing_and_trimming_is_exact(open_clip_coca, cls_mask):
    """The CLS embedding and every caption logit ignore what the padding positions hold (the
    correct mask), and cutting trailing padding (trim_padding) changes no output for either mask."""
    _, path = open_clip_coca
    ours = ours_from(path, cls_mask=cls_mask)
    x, ids = images(), padded_ids()
    with torch.no_grad():
        img, txt, _, logits = ours(x, ids)
        trimmed = trim_padding(ids, PAD, multiple=1)
        assert trimmed.shape[1] == 12 and trim_padding(padded_ids((3, 6, 1, 6)), PAD, multiple=1).shape[1] == 9
        short = padded_ids((3, 6, 1, 6))
        s_img, s_txt, _, s_logits = ours(x, short)
        t_img, t_txt, _, t_logits = ours(x, trim_padding(short, PAD, multiple=1))
        torch.testing.assert_close(t_txt, s_txt, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(t_logits, s_logits[:, :t_logits.shape[1]], atol=1e-5, rtol=1e-5)
        if cls_mask == "correct":     # hold something else at the padding positions: no change
            emb = ours.text.token_embedding
            noise = torch.zeros_like(emb.weight)
            noise[PAD] = torch.randn(noise.shape[1])
            emb.weight.add_(noise)
            try:
                _, p_txt, _, p_logits = ours(x, ids)
            finally:
                emb.weight.sub_(noise)
            torch.testing.assert_close(p_txt, txt, atol=1e-5, rtol=1e-5)
            real = ids[:, :-1] != PAD
            torch.testing.assert_close(p_logits[real], logits[real], atol=1e-5, rtol=1e-5)


def test_loads_safetensors_prefixed_and_wrapped_files(open_clip_coca, tmp_path):
    from safetensors.torch import save_file
    ref, path = open_clip_coca
    state = ref.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "open_clip_model.safetensors")
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, tmp_path / "ddp.pt")
    cfg_file = f"{path}/open_clip_config.json"
    x = images(2)
    with torch.no_grad():
        want = ref.encode_image(x)
        for p in (str(tmp_path), str(tmp_path / "ddp.pt")):
            torch.testing.assert_close(ours_from(p, config=cfg_file).encode_image(x), want, atol=1e-5, rtol=1e-5)
        # without a config: heads from open_clip's defaults (width / 64 -> here wrong), shapes still load
        assert ours_from(str(tmp_path / "ddp.pt")).cfg.vision_width == 48


def test_bad_files_name_the_key(open_clip_coca, tmp_path):
    ref, path = open_clip_coca
    cfg_file = f"{path}/open_clip_config.json"
    state = ref.state_dict()
    cases = {
        "missing.bin": ({k: v for k, v in state.items() if k != "text_decoder.cross_attn.1.ln_1_kv.weight"},
                        "text_decoder.cross_attn.1.ln_1_kv.weight"),
        "extra.bin": ({**state, "text.extra_thing": torch.zeros(1)}, "text.extra_thing"),
        "shape.bin": ({**state, "visual.attn_pool.ln_k.weight": torch.zeros(7)}, "visual.attn_pool.ln_k.weight"),
        "clip.bin": ({k: v for k, v in state.items() if not k.startswith("text_decoder")}, "text_decoder"),
    }
    for name, (bad, key) in cases.items():
        torch.save(bad, tmp_path / name)
        with pytest.raises(UserError, match=key.replace(".", r"\.")):
            ours_from(str(tmp_path / name), config=cfg_file)
    with open(tmp_path / "wrong.json", "w") as f:
        json.dump({**OPEN_CLIP_CFG, "embed_dim": 64}, f)
    with pytest.raises(UserError, match="embed_dim"):
        ours_from(path, config=str(tmp_path / "wrong.json"))
    with pytest.raises(UserError, match="no open_clip_model.safetensors or open_clip_pytorch_model.bin"):
        ours_from(str(tmp_path))


def open_clip_greedy(ref, x, steps):
    """The reference: append argmax of open_clip's full forward, one token at a time."""
    seqs = torch.full((x.shape[0], 1), SOT)
    with torch.no_grad():
        for _ in range(steps):
            logits = ref(x, seqs, output_labels=False)["logits"][:, -1]
            seqs = torch.cat([seqs, logits.argmax(-1, keepdim=True)], 1)
    return seqs


def test_greedy_matches_open_clip_argmax_and_cache(open_clip_coca):
    ref, path = open_clip_coca
    ours = ours_from(path)
    x = images(3, seed=5)
    want = open_clip_greedy(ref, x, CTX - 1)
    # EOT suppressed until the end (min_length = max_length), so every row runs CTX - 1 steps
    kw = dict(sot_id=SOT, eos_id=VOCAB + 1, num_beams=1, max_length=CTX, min_length=0)
    for use_cache in (True, False):
        got = ours.generate(x, use_cache=use_cache, **kw)
        assert torch.equal(got, want), use_cache
    # with the real EOT: rows stop, pad after it, and agree with the reference up to their EOT
    got = ours.generate(x, sot_id=SOT, eos_id=EOT, num_beams=1, max_length=CTX, min_length=2)
    assert torch.equal(got, ours.generate(x, sot_id=SOT, eos_id=EOT, num_beams=1, max_length=CTX, min_length=2,
                                          use_cache=False))


def test_beam_search_one_beam_is_greedy_and_cache_is_exact(open_clip_coca):
    _, path = open_clip_coca
    ours = ours_from(path)
    x = images(3, seed=6)
    kw = dict(sot_id=SOT, eos_id=EOT, max_length=CTX, min_length=3)
    greedy = ours.generate(x, num_beams=1, **kw)
    from common.generation import beam_search
    image_tokens = ours.image_features(x)[1]

    def step(tokens, seqs):
        seqs = tokens if seqs is None else torch.cat([seqs, tokens], 1)
        return ours.decode(seqs, image_tokens.repeat_interleave(seqs.shape[0] // 3, 0))[:, -1], seqs
    one_beam = beam_search(step, torch.full((3, 1), SOT), None, lambda s, i: s[i], num_beams=1, max_length=CTX,
                           min_length=3, eos_id=EOT, pad_id=PAD)
    assert torch.equal(one_beam, greedy[:, :one_beam.shape[1]])
    for beams in (3, 6):
        cached = ours.generate(x, num_beams=beams, **kw)
        assert torch.equal(cached, ours.generate(x, num_beams=beams, use_cache=False, **kw)), beams
        assert ((cached == EOT).sum(1) <= 1).all()


def test_nucleus_sampling_is_seeded_and_cache_exact(open_clip_coca):
    _, path = open_clip_coca
    ours = ours_from(path)
    x = images(3, seed=7)
    kw = dict(sot_id=SOT, eos_id=EOT, sample=True, top_p=0.9, max_length=CTX, min_length=3)
    torch.manual_seed(3)
    a = ours.generate(x, **kw)
    torch.manual_seed(3)
    b = ours.generate(x, use_cache=False, **kw)
    assert torch.equal(a, b)


def test_paper_pooler_shapes_and_gradients():
    cfg = coca_train.Config(pooler="paper", vocab_size=VOCAB, image_size=32, n_queries=5)
    model = CoCa(cfg, pad_id=PAD, eos_id=EOT)
    assert model.attn_pool_contrastive.query.shape == (1, cfg.embed_dim)
    latent, tokens = model.image_features(images(2))
    assert latent.shape == (2, cfg.embed_dim) and tokens.shape == (2, 5, cfg.embed_dim)   # all n queries decode
    ids = padded_ids()[:2]
    img, txt, scale, logits = model(images(2), ids)
    (contrastive_loss(img, txt, scale) + logits.sum() * 0).backward()
    assert model.attn_pool_contrastive.query.grad.abs().sum() > 0


SMALL = dict(image_size=32, patch_size=8, vision_width=48, vision_layers=2, vision_heads=2, n_queries=6, pooler_heads=2,
             text_width=32, text_layers=2, text_heads=2, decoder_layers=2, context_length=CTX, vocab_size=VOCAB,
             embed_dim=32, pad_id=PAD)


def dist_batch():
    """8 pairs; rank 0's half has short captions, rank 1's long ones (unequal caption-token counts)."""
    return images(8, seed=11), torch.cat([padded_ids((1, 2, 1, 3), seed=12), padded_ids((9, 10, 8, 10), seed=13)])


def test_two_ranks_give_the_loss_and_gradients_of_one_process(tmp_path):
    """Contrastive (negatives gathered with gradient) and captioning (token mean over the global
    batch) losses and their gradients under torchrun x2 equal one process on the whole batch."""
    from tests.test_distributed import torchrun
    out = str(tmp_path / "dist.pt")
    proc = torchrun(["tests/workers/dist_coca_worker.py", out], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(out, weights_only=True)
    assert got["world"] == 2 and got["length"] == 6          # rank 0 trimmed its padding: 5 tokens + 1 of 12 columns
    cfg = coca_train.Config(**SMALL)
    torch.manual_seed(0)
    model = CoCa(cfg, pad_id=PAD, eos_id=EOT)
    x, ids = dist_batch()
    positions, targets = caption_positions(ids, PAD)
    loss, losses = coca_train.compute_losses(model, cfg, (x, ids, positions, targets))
    loss.backward()
    for k, v in {"loss": loss, **losses}.items():
        torch.testing.assert_close(got["values"][k], v.detach(), atol=1e-5, rtol=1e-5, msg=k)
    for n, p in model.named_parameters():
        torch.testing.assert_close(got["grads"][n], p.grad, atol=1e-5, rtol=1e-4, msg=n)
    # the per-rank token mean (open_clip's) would not be one process's loss on this batch
    with torch.no_grad():
        halves = []
        for half in (slice(0, 4), slice(4, 8)):
            pos, tgt = caption_positions(ids[half], PAD)
            halves.append(F.cross_entropy(model(x[half], ids[half], pos)[3], tgt))
    assert abs(float(sum(halves) / 2 - losses["loss_caption"])) > 1e-2
