"""Second numerical reference for BLIP-2's stage-1 losses: Salesforce LAVIS 1.0.2's Blip2Qformer
(tests/lavis/peer.py's tiny EVA ViT and Q-Former) and our blip2_train.BLIP2 on the same weights,
images and token ids, with hard negatives pinned to the argmax (peer.deterministic_negatives for
LAVIS, our sample_negatives replaced by the argmax). Not collected by pytest; runs in LAVIS's
environment (.ci/run runs it on every change):

    bash tests/lavis/setup.sh
    ~/.cache/blip-lavis-peer/venv/bin/python tests/lavis/check_blip2.py

The weights reach our model through our loaders on LAVIS's own file formats: LAVIS's state dict
without the frozen encoder saved as {"model": ...} (what LAVIS saves and releases as
blip2_pretrained.pth: its runner drops the parameters that do not train) is read by
BLIP2.from_lavis, and the encoder, its prefix stripped, as eva_vit_g.pth (timm names, separate
q_bias / v_bias) by load_vision through cfg.vision_weights.

The comparison is made after 50 AdamW steps of LAVIS on another batch (lr 1e-3, negatives at the
argmax), not at its initialisation: there the random Q-Former's outputs hardly depend on the input
(the [CLS] features of different captions agree to cosine 0.9998, the ITC similarities to 0.005),
so the gradients of the projections and of temp are differences of nearly equal numbers, and
float32 rounding alone moves LAVIS's own ones by 1e-3 of their size from its float64 ones (ours
are as close to float64 as LAVIS's; the losses agree to 3e-7 there too). After the steps the
two sides' gradients agree to 3e-6 of their size.

One thing the file cannot carry is set explicitly: the Q-Former's head count (no tensor has a
per-head shape). from_lavis reads it as width / 64 (bert-base's 768 / 12, right for every released
checkpoint, unless --qformer-heads is given); the tiny Q-Former is 64 wide with 2 heads, so the
check passes it as the command line would.

The peer runs a one-process gloo group (Blip2Qformer.forward calls dist.get_rank()), under which
LAVIS's concat_all_gather has no gradient and our common.dist is world size 1 (checked below).
Gradients are compared twice:
- with our dist.gather_with_grad replaced by a detach (what LAVIS's concat_all_gather does, on one
  GPU too: the i2t term then updates only the image side, t2i only the text side): every trained
  weight's gradient must equal LAVIS's;
- with our exact gather: the projections' gradients must differ from LAVIS's by far more than the
  tolerance (the two terms LAVIS drops; tests/test_blip2.py checks they are exactly those).

Prints both sets of losses and exits non-zero when any differs by more than 1e-5, or a gradient
by more than 1e-4 of that gradient's largest entry (or the exact gather's does not differ)."""
import os
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
import blip2_train  # noqa: E402
from common import dist  # noqa: E402
from tests.lavis import peer  # noqa: E402
from tests.lavis.check_blip import grad_difference  # noqa: E402
from common.encoders import hf_bert_lm_head_map  # noqa: E402

TOL_LOSS, TOL_GRAD = 1e-5, 1e-4


def trainable_map(cfg):
    """Our trained keys -> LAVIS's (the correspondence from_lavis loads with), for the gradients."""
    mapping = blip2_train.blip2_weights.qformer_map(cfg, "Qformer.bert", text_ffn=True, hf=False)
    mapping.update(hf_bert_lm_head_map("lm_head", "Qformer.cls.predictions",
                                       tied_to="Qformer.bert.embeddings.word_embeddings.weight"))
    mapping.update({f"{n}.{p}": f"{n}.{p}" for n in ("ln_vision", "vision_proj", "text_proj", "itm_head")
                    for p in ("weight", "bias")})
    mapping.update(query_tokens="query_tokens", temp="temp")
    return mapping


def train_lavis(lavis, steps=50, lr=1e-3):
    """A few of LAVIS's own training steps (AdamW) on another batch: weights away from the
    initialisation, where ITC's gradients are ill-conditioned (see above)."""
    batch = peer.make_batch(8, peer.config("tiny")["image_size"], seed=1)
    opt = torch.optim.AdamW([p for p in lavis.parameters() if p.requires_grad], lr=lr)
    lavis.train()
    with peer.deterministic_negatives():
        for _ in range(steps):
            out = lavis(batch)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
    opt.zero_grad(set_to_none=True)
    print(f"LAVIS after {steps} steps on another batch: loss_itc {float(out.loss_itc):.4f} loss_itm "
          f"{float(out.loss_itm):.4f} loss_lm {float(out.loss_lm):.4f} temp {float(lavis.temp):.4f}")


def build_ours(lavis, folder):
    """Our BLIP2 from LAVIS's weights, written in LAVIS's two file formats and read by our loaders."""
    c, tok = peer.config("tiny"), lavis.tokenizer
    state = lavis.state_dict()
    trained = {k: v for k, v in state.items() if not k.startswith("visual_encoder.")}
    eva = {k[len("visual_encoder."):]: v for k, v in state.items() if k.startswith("visual_encoder.")}
    qformer_file, eva_file = os.path.join(folder, "blip2_pretrained.pth"), os.path.join(folder, "eva_vit_g.pth")
    torch.save({"model": trained}, qformer_file)
    torch.save(eva, eva_file)
    qc = lavis.Qformer.config
    cfg = blip2_train.Config(
        vision="eva", image_size=c["image_size"], patch_size=c["patch_size"], vision_width=c["vision_width"],
        vision_layers=c["vision_layers"], vision_heads=c["vision_heads"],
        vision_mlp_dim=int(c["vision_width"] * peer.BLIP2["vision_mlp_ratio"]), ln_vision_eps=1e-5,
        num_query_tokens=peer.BLIP2["num_query_token"], qformer_width=qc.hidden_size,
        qformer_layers=qc.num_hidden_layers, qformer_heads=qc.num_attention_heads,
        qformer_mlp_dim=qc.intermediate_size, cross_attention_freq=peer.BLIP2["cross_attention_freq"],
        max_positions=qc.max_position_embeddings, vocab_size=len(tok), embed_dim=c["embed_dim"],
        max_length=lavis.max_txt_len, dropout=0.0, vision_weights=eva_file)
    cfg.explicit_keys = {"qformer_heads"}          # as --qformer-heads on the command line: the file cannot say
    ours = blip2_train.BLIP2.from_lavis(qformer_file, cfg)
    print(f"heads: LAVIS {qc.num_attention_heads}, ours {ours.cfg.qformer_heads} (the file has no per-head shape; "
          f"without the flag from_lavis takes width / 64 = {qc.hidden_size // 64})")
    assert ours.cfg.qformer_heads == qc.num_attention_heads
    # tokenizer=None: [DEC] is the last id and [PAD] 0, which is where LAVIS's tokenizer has them
    assert (ours.dec_id, ours.pad_id) == (tok.bos_token_id, tok.pad_token_id), (ours.dec_id, ours.pad_id)
    for k in ("image_size", "patch_size", "vision_width", "vision_layers", "vision_heads", "vision_mlp_dim",
              "num_query_tokens", "qformer_width", "qformer_layers", "qformer_heads", "qformer_mlp_dim",
              "cross_attention_freq", "max_positions", "vocab_size", "embed_dim"):
        assert getattr(ours.cfg, k) == getattr(cfg, k), (k, getattr(ours.cfg, k), getattr(cfg, k))
    assert ours.vision_frozen and not any(p.requires_grad for p in ours.visual_encoder.parameters())
    return ours


def main():
    torch.set_num_threads(1)
    batch_size = 8
    lavis, batch = peer.build_blip2("tiny", batch_size=batch_size, dropout=0.0, seed=0)
    # LAVIS's gathers see its one-process group; ours must then act as world size 1
    assert torch.distributed.is_initialized() and torch.distributed.get_world_size() == 1
    assert (dist.rank(), dist.world_size()) == (0, 1)
    x = torch.randn(3, 2, requires_grad=True)
    assert torch.equal(dist.gather_with_grad(x), x) and torch.equal(dist.gather_no_grad(x), x)
    assert torch.equal(torch.autograd.grad(dist.gather_with_grad(x).square().sum(), x)[0], 2 * x)
    assert float(dist.all_reduce_sum(torch.tensor(3.0))) == 3.0
    train_lavis(lavis)
    state = lavis.state_dict()
    assert lavis.Qformer.cls.predictions.decoder.weight is lavis.Qformer.bert.embeddings.word_embeddings.weight
    with tempfile.TemporaryDirectory() as folder:
        ours = build_ours(lavis, folder)
    mapping = trainable_map(ours.cfg)
    for key, p in ours.named_parameters():          # every trained weight is LAVIS's (q, k, v fused in ours)
        if p.requires_grad:
            srcs = mapping[key] if isinstance(mapping[key], tuple) else (mapping[key],)
            assert torch.equal(p, torch.cat([state[s].reshape(-1) for s in srcs]).reshape(p.shape)), f"{key} != {srcs}"
    lavis.train()
    ours.train()
    enc = peer.tokenize(lavis, batch)
    images, ids, mask, idx = batch["image"], enc.input_ids, enc.attention_mask, torch.arange(batch_size)
    bad = 0
    # the frozen EVA encoder (read from eva_vit_g.pth) and ln_vision: the features all three losses read
    with torch.no_grad():
        a, b = ours.image_embeds(images), lavis.ln_vision(lavis.visual_encoder(images))
    diff = float((a - b).abs().max())
    bad += diff > TOL_LOSS
    print(f"image features (EVA + ln_vision) {tuple(a.shape)}: largest difference {diff:.2e}")
    # LAVIS draws with torch.multinomial (pinned by the peer), ours with the exponential trick: pin
    # ours to the same argmax of the same weights.
    blip2_train.sample_negatives = lambda weights: weights.argmax(1)
    exact_gather = dist.gather_with_grad
    dist.gather_with_grad = lambda t: t.detach()              # LAVIS's concat_all_gather
    try:
        with peer.deterministic_negatives():
            ref = lavis(batch)
            got = ours(dict(images=images, ids=ids, mask=mask, idx=idx))
    finally:
        dist.gather_with_grad = exact_gather
    for k in ("loss_itc", "loss_itm", "loss_lm"):
        a, b = float(got[k]), float(getattr(ref, k))
        bad += abs(a - b) > TOL_LOSS
        print(f"{k}: ours {a:.8f}  LAVIS {b:.8f}  diff {abs(a - b):.2e}")
    sum(got.values()).backward()
    ref.loss.backward()
    worst, name = grad_difference(ours, lavis, mapping)
    bad += worst > TOL_GRAD
    print(f"gradients, gather without gradient (as LAVIS): largest difference {worst:.2e} of the gradient's "
          f"largest entry ({name})")
    # our exact gather: the i2t term's gradient reaches the text side and t2i's the image side
    ours.zero_grad(set_to_none=True)
    with peer.deterministic_negatives():
        again = ours(dict(images=images, ids=ids, mask=mask, idx=idx))
    assert all(torch.equal(again[k], got[k]) for k in got), "the gather changed a loss value"
    sum(again.values()).backward()
    projections = []
    for proj in ("text_proj", "vision_proj"):
        part = {k: v for k, v in mapping.items() if k.startswith(proj + ".")}
        holder = torch.nn.Module()
        setattr(holder, proj, getattr(ours, proj))
        projections.append(grad_difference(holder, lavis, part))
        print(f"gradients, exact gather: {proj} differs from LAVIS's by {projections[-1][0]:.2e} of the "
              f"gradient's largest entry ({projections[-1][1]})")
    worst, name = grad_difference(ours, lavis, mapping)
    print(f"gradients, exact gather: largest difference {worst:.2e} ({name})")
    if min(d for d, _ in projections) < 100 * TOL_GRAD:
        bad += 1
        print("the exact gather's projection gradients should differ from LAVIS's (which drops two ITC terms)")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
