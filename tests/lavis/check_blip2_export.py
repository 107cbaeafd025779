"""blip2_train.py --export-format lavis, loaded by LAVIS itself: our BLIP-2 stage 1 written by
common/weights/blip2_export.py as {"model": state_dict} under LAVIS's names is read by LAVIS 1.0.2's
own BaseModel.load_checkpoint into a fresh Blip2Qformer (tests/lavis/peer.py's tiny one, other
random weights), and that model's ITC, ITM and ITG losses equal ours on the same images and token
ids (hard negatives at the argmax on both sides). Not collected by pytest; runs in LAVIS's
environment (.ci/run):

    "$LAVIS_VENV/bin/python" tests/lavis/check_blip2_export.py

Our model starts from LAVIS's weights after a few of LAVIS's steps (check_blip2.build_ours: a
young Q-Former's outputs hardly depend on the input), then takes a few AdamW steps of its own, so
that what is exported is ours and not a copy of what LAVIS had. Its frozen encoder is written into
the file too (the export does so for an encoder that is not read from a file; LAVIS loads it with
the rest), which checks the EVA layout (timm names, q_bias and v_bias) as well.

Checks: the file's keys are exactly those of LAVIS's Blip2Qformer.state_dict(); load_checkpoint
reports no missing and no unexpected key; every tensor arrives unchanged; the three losses agree
within 1e-5. Then stage 2 (stage2()): the blip2_opt layout, with the tiny LM in the file, loaded
into LAVIS's Blip2OPT: the same keys, its LM loss equal to ours within 1e-5, and its greedy
captions (Blip2OPT.generate) equal to ours. Exits non-zero otherwise."""
import dataclasses
import os
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
import blip2_train  # noqa: E402
from common.weights import blip2_export  # noqa: E402
from tests.lavis import peer  # noqa: E402
from tests.lavis.check_blip2 import build_ours, train_lavis  # noqa: E402

TOL_LOSS = 1e-5


def train_ours(ours, lavis, steps=5, lr=1e-3):
    """A few of our own AdamW steps on a third batch (negatives at the argmax)."""
    batch = peer.make_batch(8, peer.config("tiny")["image_size"], seed=2)
    enc = peer.tokenize(lavis, batch)
    inputs = dict(images=batch["image"], ids=enc.input_ids, mask=enc.attention_mask, idx=torch.arange(8))
    opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=lr)
    ours.train()
    for _ in range(steps):
        loss = sum(ours(inputs).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


CAPTIONS = ["a small red circle on a white background", "two shapes on gray",
            "one large blue square on black", "a green triangle"]


def stage2(bad):
    """Stage 2 (OPT): our tiny model (random LM of the tiny data's tokenizer, weights randomised so
    that the queries depend on the image) exported as blip2_opt's .pth, loaded by LAVIS's
    load_checkpoint into its Blip2OPT (the peer's tiny EVA and Q-Former; the OPT it would download
    replaced by LAVIS's own OPTForCausalLM class at our LM's config): keys, and the LM loss."""
    from transformers import PreTrainedTokenizerFast
    from lavis.models.blip2_models import blip2_opt
    from lavis.models.blip2_models.modeling_opt import OPTConfig, OPTForCausalLM
    from common.data import collate_llm, tiny_data
    files = os.path.join(tiny_data(), "tokenizer_llm")
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(files, "tokenizer.json"), bos_token="</s>",
                                  eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    c = peer.config("tiny")
    cfg = blip2_train.Config(
        stage=2, image_size=c["image_size"], patch_size=c["patch_size"], vision_width=c["vision_width"],
        vision_layers=c["vision_layers"], vision_heads=c["vision_heads"],
        vision_mlp_dim=int(c["vision_width"] * peer.BLIP2["vision_mlp_ratio"]), ln_vision_eps=1e-5,
        num_query_tokens=peer.BLIP2["num_query_token"], qformer_width=c["text_width"],
        qformer_layers=c["text_layers"], qformer_heads=c["text_heads"], qformer_mlp_dim=c["text_mlp_dim"],
        cross_attention_freq=peer.BLIP2["cross_attention_freq"], max_positions=c["max_positions"],
        max_length=c["max_length"], llm_width=32, llm_layers=2, llm_heads=2, llm_mlp_dim=64, freeze_llm=False)
    torch.manual_seed(0)
    ours = blip2_train.BLIP2(cfg, dec_id=0, pad_id=0, llm=blip2_train.tiny_llm(cfg, tok))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if not name.startswith("visual_encoder."):     # the LM more: its greedy words vary
                p.add_(torch.randn(p.shape, generator=g) * (1.0 if name.startswith("language_model.") else 0.05))
    ours.eval()
    # LAVIS's Blip2OPT with the peer's small encoder and Q-Former (from its Blip2Qformer builder)
    qformer_model, _ = peer.build_blip2("tiny", batch_size=4, seed=5)
    vit, qformer = type(qformer_model).init_vision_encoder, type(qformer_model).init_Qformer
    config = OPTConfig(**ours.language_model.config.to_dict())
    blip2_opt.OPTForCausalLM = type("TinyOPT", (), {"from_pretrained": staticmethod(
        lambda *a, **k: OPTForCausalLM(config))})
    blip2_opt.AutoTokenizer = type("TinyTok", (), {"from_pretrained": staticmethod(lambda *a, **k: tok)})
    cls = type("TinyBlip2OPT", (blip2_opt.Blip2OPT,), {
        "init_tokenizer": classmethod(lambda k: peer.tokenizer("blip2")),
        "init_vision_encoder": classmethod(lambda k, *a: vit(*a)),
        "init_Qformer": classmethod(lambda k, *a, **kw: qformer(*a, **kw))})
    lavis = cls(img_size=cfg.image_size, vit_precision="fp32", num_query_token=cfg.num_query_tokens,
                opt_model="tiny", max_txt_len=cfg.max_length).float()
    with tempfile.TemporaryDirectory() as folder:
        blip2_export.export(ours, dataclasses.replace(cfg, export=os.path.join(folder, "export"),
                                                      export_format="lavis"),
                            None, tok, {"path": "check", "config": None, "step": None,
                                        "script": "blip2_train.py", "command": None})
        path = os.path.join(folder, "export", blip2_export.LAVIS_FILE)
        saved = torch.load(path, map_location="cpu")["model"]
        theirs = set(lavis.state_dict())
        if set(saved) != theirs:
            bad += 1
            print(f"stage 2 keys: the file lacks {sorted(theirs - set(saved))[:5]}, LAVIS lacks "
                  f"{sorted(set(saved) - theirs)[:5]}")
        msg = lavis.load_checkpoint(path)
    missing, unexpected = list(msg.missing_keys), list(msg.unexpected_keys)
    bad += bool(missing or unexpected)
    print(f"stage 2, LAVIS Blip2OPT load_checkpoint: {len(saved)} tensors; missing {missing[:5]}, "
          f"unexpected {unexpected[:5]}")
    images = torch.randn(len(CAPTIONS), 3, cfg.image_size, cfg.image_size, generator=g)
    end = blip2_train.end_ids(cfg, tok, True)
    items = [(images[i], blip2_train.llm_example(tok, "", t, cfg.max_length, True, end), i)
             for i, t in enumerate(CAPTIONS)]
    _, ids, mask, labels = collate_llm(tok.pad_token_id)(items)[:4]
    lavis.eval()
    forward = ours.language_model.forward     # transformers 4.26 (LAVIS's) has no logits_to_keep

    def keep_last(*args, logits_to_keep=0, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = out.logits[:, -logits_to_keep:] if logits_to_keep else out.logits
        return out
    ours.language_model.forward = keep_last
    with torch.no_grad():
        ref = lavis({"image": images, "text_input": CAPTIONS})["loss"]
        got = ours(dict(images=images, ids=ids, mask=mask, labels=labels))["loss_lm"]
    a, b = float(got), float(ref)
    bad += abs(a - b) > TOL_LOSS
    print(f"stage 2 loss_lm: ours {a:.8f}  LAVIS Blip2OPT on our export {b:.8f}  diff {abs(a - b):.2e}")
    return greedy_captions(ours, lavis, images, tok, end[0], bad)


def greedy_captions(ours, lavis, images, tok, eos, bad, new_tokens=8):
    """LAVIS's own Blip2OPT.generate (its prompt "", 1 beam, its end of text "\n") on our export
    against our model's greedy decoding of the same images: the same captions. Ours is decoded
    step by step from our forward pass (our BLIP2.generate needs generate(inputs_embeds=), which
    LAVIS's transformers 4.26 lacks for OPT; it is compared with transformers' own BLIP-2 in
    tests/test_blip2_export.py)."""
    ids, mask = blip2_train.prompt_batch(tok, [""] * len(images), True)   # [BOS], as LAVIS's
    if not torch.equal(ids, tok([""] * len(images), return_tensors="pt").input_ids):
        return bad + 1
    if eos != lavis.eos_token_id:
        print(f"end of text: ours {eos}, LAVIS {lavis.eos_token_id}")
        return bad + 1
    with torch.no_grad():
        theirs = lavis.generate({"image": images, "prompt": ""}, num_beams=1, max_length=new_tokens,
                                min_length=1)
        x, m = ours.llm_inputs(ours.soft_prompt(images), ids, mask)
        rows = torch.empty(len(images), 0, dtype=torch.long)
        for _ in range(new_tokens):
            step = ours.language_model(inputs_embeds=x, attention_mask=m).logits[:, -1].argmax(-1)
            rows = torch.cat([rows, step[:, None]], 1)
            x = torch.cat([x, ours.language_model.get_input_embeddings()(step)[:, None]], 1)
            m = torch.cat([m, m.new_ones(len(images), 1)], 1)
    rows = [r[:r.index(eos)] if eos in r else r for r in rows.tolist()]      # up to the end of text
    mine = [tok.decode(r, skip_special_tokens=True).strip() for r in rows]
    bad += mine != theirs or not all(mine)
    print(f"stage 2 greedy captions (ids {rows}): ours {mine}  LAVIS Blip2OPT on our export {theirs}  "
          f"{'equal' if mine == theirs else 'DIFFER'}")
    return bad


def main():
    torch.set_num_threads(1)
    blip2_train.sample_negatives = lambda weights: weights.argmax(1)      # as LAVIS's, pinned below
    lavis, batch = peer.build_blip2("tiny", batch_size=8, dropout=0.0, seed=0)
    train_lavis(lavis, steps=20)
    bad = 0
    with tempfile.TemporaryDirectory() as folder:
        ours = build_ours(lavis, folder)
        train_ours(ours, lavis)
        # the encoder as one not read from a file: the export writes it (LAVIS could not rebuild it)
        cfg = dataclasses.replace(ours.cfg, vision_weights="", export=os.path.join(folder, "export"),
                                  export_format="lavis")
        blip2_export.export(ours, cfg, None, None, {"path": "check", "config": None, "step": None,
                                                    "script": "blip2_train.py", "command": None})
        path = os.path.join(folder, "export", blip2_export.LAVIS_FILE)
        saved = torch.load(path, map_location="cpu")["model"]
        fresh, _ = peer.build_blip2("tiny", batch_size=8, dropout=0.0, seed=1)
        theirs = set(fresh.state_dict())
        if set(saved) != theirs:
            bad += 1
            print(f"keys: the file lacks {sorted(theirs - set(saved))[:5]}, LAVIS lacks "
                  f"{sorted(set(saved) - theirs)[:5]}")
        changed = sum(not torch.equal(fresh.state_dict()[k], v) for k, v in saved.items() if k in theirs)
        msg = fresh.load_checkpoint(path)                   # LAVIS's own loader (strict=False)
    missing = list(getattr(msg, "missing_keys", []))
    unexpected = list(getattr(msg, "unexpected_keys", []))
    bad += bool(missing or unexpected)
    print(f"LAVIS load_checkpoint: {len(saved)} tensors, {changed} differed from the fresh model's; "
          f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    state = fresh.state_dict()
    differ = [k for k, v in saved.items() if k in state and not torch.equal(state[k], v)]
    bad += bool(differ)
    print(f"tensors not arriving unchanged: {differ[:5]}")
    fresh.train()
    ours.train()
    enc = peer.tokenize(fresh, batch)
    with torch.no_grad(), peer.deterministic_negatives():
        ref = fresh(batch)
        got = ours(dict(images=batch["image"], ids=enc.input_ids, mask=enc.attention_mask,
                        idx=torch.arange(8)))
    for k in ("loss_itc", "loss_itm", "loss_lm"):
        a, b = float(got[k]), float(getattr(ref, k))
        bad += abs(a - b) > TOL_LOSS
        print(f"{k}: ours {a:.8f}  LAVIS on our export {b:.8f}  diff {abs(a - b):.2e}")
    bad = stage2(bad)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
