"""coca_train.py --export: a tiny CoCa run written as an open_clip folder, loaded with open_clip's own
calls (create_model_and_transforms, get_tokenizer, generate), computes our embeddings, contrastive
logits, captioning logits and losses and our greedy captions; its tokenizer and preprocessing give
our ids and pixels; our --init-from of the folder holds every weight of the checkpoint; what open_clip
cannot build, and another script's checkpoint, are one-line errors."""
import os

import pytest
import torch

import coca_train
from common.data import (Tokenizer, eval_transform, load_rgb, open_clip_cleaner, read_annotations,
                         retrieval_texts)
from common.utils import UserError, load_checkpoint
from common.weights import coca as coca_weights
from tests.test_distributed import one_line_error

open_clip = pytest.importorskip("open_clip")

# small towers at the tiny images' own size (64 px: no resampling in either preprocessing); the
# legacy CLS mask, the one open_clip 3.3 builds
MODEL = dict(image_size=64, patch_size=16, vision_width=48, vision_layers=2, vision_heads=2,
             n_queries=6, pooler_heads=2, text_width=32, text_layers=2, text_heads=2,
             decoder_layers=2, embed_dim=32, batch_size=8, max_gen_length=12, min_gen_length=3,
             num_beams=2, cls_mask="legacy")
ARGS = [f"--{k.replace('_', '-')}={v}" for k, v in MODEL.items()] + ["--workers", "0"]


@pytest.fixture(scope="module")
def run(tiny, tmp_path_factory):
    """A 60-step run with its final evaluation (metrics.jsonl for the card), its export, our model
    on the checkpoint, and 16 val images with their captions, as our evaluation reads them."""
    out = tmp_path_factory.mktemp("coca_export")
    coca_train.main([*ARGS, "--max-steps", "60", "--warmup-steps", "5", "--output-dir", str(out / "run")])
    ckpt_path = str(out / "run" / "checkpoint_last.pt")
    ckpt = load_checkpoint(ckpt_path)
    coca_train.main(["--init-from", ckpt_path, "--export", str(out / "oc")])
    cfg = coca_train.Config(**ckpt["config"])
    tokenizer = Tokenizer(cfg.tokenizer, clean=open_clip_cleaner(cfg.text_clean))
    tokenizer.pad_id = cfg.pad_id
    model = coca_train.CoCa(cfg, pad_id=cfg.pad_id, eos_id=tokenizer.eos_id).eval()
    model.load_state_dict(ckpt["model"])
    val = read_annotations(os.path.join(tiny, "val.json"))[:16]
    texts, txt2img = retrieval_texts(val)
    images = [load_rgb(r["image"]) for r in val]
    return dict(ckpt_path=ckpt_path, ckpt=ckpt, cfg=cfg, model=model, tokenizer=tokenizer,
                out=out, texts=texts, images=images, ids=tokenizer(texts, cfg.context_length),
                first=[txt2img.tolist().index(i) for i in range(len(images))],
                pixels=torch.stack([eval_transform(cfg.image_size)(im) for im in images]))


def load_open_clip(run):
    folder = "local-dir:" + str(run["out"] / "oc")
    model, _, preprocess = open_clip.create_model_and_transforms(folder)
    return model.eval(), preprocess, open_clip.get_tokenizer(folder)


def test_open_clip_computes_our_embeddings_logits_and_losses(run):
    theirs, preprocess, tokenizer = load_open_clip(run)
    assert type(theirs).__name__ == "CoCa" and isinstance(tokenizer, open_clip.tokenizer.HFTokenizer)
    ours, cfg, first = run["model"], run["cfg"], run["first"]
    ids = tokenizer(run["texts"])
    assert torch.equal(ids, run["ids"])                                  # its tokenizer: our rows
    pixels = torch.stack([preprocess(im) for im in run["images"]])
    torch.testing.assert_close(pixels, run["pixels"], atol=1e-5, rtol=0)  # its preprocessing: ours
    with torch.no_grad():
        image_emb, text_emb = ours.encode_image(pixels), ours.encode_text(ids)
        their_image, their_text = theirs.encode_image(pixels), theirs.encode_text(ids)
        out = theirs(pixels, ids[first])                     # image i with its first caption
        want_loss, parts = coca_train.compute_losses(
            ours, cfg, (pixels, ids[first], *coca_train.caption_positions(ids[first], cfg.pad_id)))
        logits = ours(pixels, ids[first])[3]                                  # (B, L-1, V)
        their_contrastive, their_caption = open_clip.CoCaLoss(
            caption_loss_weight=cfg.caption_weight, clip_loss_weight=cfg.contrastive_weight,
            pad_id=cfg.pad_id)(out["image_features"], out["text_features"], out["logits"],
                               out["labels"], out["logit_scale"])
    torch.testing.assert_close(their_image, image_emb, atol=1e-5, rtol=0)
    torch.testing.assert_close(their_text, text_emb, atol=1e-5, rtol=0)
    scale = ours.logit_scale.exp()
    torch.testing.assert_close(out["logit_scale"], scale)
    torch.testing.assert_close(out["logit_scale"] * their_image @ their_text.T,
                               scale * image_emb @ text_emb.T, atol=1e-5, rtol=1e-6)
    # the captioning logits wherever the caption loss reads them (open_clip 3.3's legacy mask also
    # hides the padding from the padding rows, which no loss reads)
    real = ids[first][:, 1:] != cfg.pad_id
    torch.testing.assert_close(out["logits"][real], logits[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(their_caption, cfg.caption_weight * parts["loss_caption"],
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(their_contrastive, cfg.contrastive_weight * parts["loss_contrastive"],
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(their_caption + their_contrastive, want_loss, atol=1e-5, rtol=0)
    card = (run["out"] / "oc" / "README.md").read_text()
    assert "library_name: open_clip" in card and "| tiny | the built-in tiny set | 60 |" in card
    assert "| r_mean |" in card and "--cls-mask legacy" in card and "--max-steps 60" in card
    assert "seq_len=13," in card and "sot_token_id=2, eos_token_id=3)" in card


def test_open_clip_generate_gives_our_greedy_captions(run, monkeypatch):
    """open_clip's own generate (top_k 1: greedy). open_clip 3.3 switches generate off under
    transformers 5, whose BeamSearchScorer import fails (open_clip#1129); its top-k path needs only
    TopKLogitsWarper, given back here. It forces EOT as the last token at seq_len: asked for one
    more token than ours, its captions are ours, then EOT where ours hit the length limit."""
    from transformers import TopKLogitsWarper
    from open_clip import coca_model
    monkeypatch.setattr(coca_model, "_has_transformers", True)
    monkeypatch.setitem(coca_model.GENERATION_TYPES, "top_k", TopKLogitsWarper)
    theirs, _, _ = load_open_clip(run)
    cfg, tok, pixels = run["cfg"], run["tokenizer"], run["pixels"]
    for max_length in (cfg.max_gen_length, cfg.min_gen_length + 1):   # captions that end, cut ones
        with torch.no_grad():
            mine = run["model"].generate(pixels, sot_id=tok.bos_id, eos_id=tok.eos_id, num_beams=1,
                                         max_length=max_length, min_length=cfg.min_gen_length)
            got = theirs.generate(pixels, generation_type="top_k", top_k=1, seq_len=max_length + 1,
                                  min_seq_len=cfg.min_gen_length, sot_token_id=tok.bos_id,
                                  eos_token_id=tok.eos_id)
        ended = (mine == tok.eos_id).any(1)
        assert ended.any() if max_length == cfg.max_gen_length else not ended.any()
        for row in mine.tolist():            # the padding id only after EOT (open_clip stops at it)
            assert cfg.pad_id not in row[:row.index(tok.eos_id) if tok.eos_id in row else None]
        assert torch.equal(got[:, :mine.shape[1]], mine)
        if not ended.all():                  # the rows at the limit: open_clip's forced EOT
            assert got.shape[1] == mine.shape[1] + 1 and (got[~ended, -1] == tok.eos_id).all()
        else:
            assert got.shape == mine.shape


def test_init_from_the_export_holds_every_weight(run, tmp_path):
    """The folder read back through --init-from (read_init, the architecture, load_init), and
    through main: re-exported, every tensor is the same."""
    folder = str(run["out"] / "oc")
    init = coca_weights.read_init(folder)
    arch = coca_weights.init_architecture(init, folder, None, coca_train.MODEL_FIELDS,
                                          coca_train.PRESETS)
    saved = run["ckpt"]["config"]
    assert arch == {k: saved[k] for k in coca_train.MODEL_FIELDS if k != "pad_id"}
    model = coca_train.CoCa(coca_train.Config(**arch, pad_id=saved["pad_id"]),
                            pad_id=saved["pad_id"], eos_id=run["tokenizer"].eos_id)
    coca_weights.load_init(model, init, folder)
    state = model.state_dict()
    assert state.keys() == run["ckpt"]["model"].keys()
    for key, value in run["ckpt"]["model"].items():
        assert torch.equal(state[key], value), key
    coca_train.main(["--init-from", folder, "--export", str(tmp_path / "again")])
    from safetensors.torch import load_file
    a, b = (load_file(os.path.join(f, "open_clip_model.safetensors")) for f in (folder, tmp_path / "again"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "again" / "open_clip_config.json").read_text() == \
        (run["out"] / "oc" / "open_clip_config.json").read_text()


def clip_bpe_folder(path):
    """CLIP's BPE as a transformers tokenizer folder, built from the vocabulary open_clip ships (no
    download): what --tokenizer openai/clip-vit-base-patch32 loads."""
    from transformers import CLIPTokenizer
    simple = open_clip.tokenizer.SimpleTokenizer()
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {names.get(k, k): v for k, v in simple.encoder.items()}
    merges = [tuple(m) for m, _ in sorted(simple.bpe_ranks.items(), key=lambda x: x[1])]
    CLIPTokenizer(vocab=vocab, merges=merges).save_pretrained(path)
    return str(path)


def test_clip_bpe_exports_to_open_clips_own_tokenizer(run, tmp_path, monkeypatch):
    """With CLIP's BPE (padded with id 0, as open_clip) the folder names no hf_tokenizer_name:
    open_clip's SimpleTokenizer, as its own CoCa configs, gives our rows; the model computes ours."""
    monkeypatch.setattr(coca_train, "evaluate", lambda *a, **k: {})
    tokenizer = clip_bpe_folder(tmp_path / "bpe")
    coca_train.main([*ARGS, "--tokenizer", tokenizer, "--max-steps", "1", "--output-dir",
                     str(tmp_path / "run")])
    ckpt = load_checkpoint(str(tmp_path / "run" / "checkpoint_last.pt"))
    assert ckpt["config"]["pad_id"] == 0
    coca_train.main(["--init-from", str(tmp_path / "run" / "checkpoint_last.pt"), "--export",
                     str(tmp_path / "oc")])
    folder = "local-dir:" + str(tmp_path / "oc")
    theirs, their_tokenizer = open_clip.create_model_and_transforms(folder)[0], \
        open_clip.get_tokenizer(folder)
    assert isinstance(their_tokenizer, open_clip.tokenizer.SimpleTokenizer)
    ours = Tokenizer(tokenizer, clean=open_clip_cleaner("lower"))
    ours.pad_id = 0
    texts = run["texts"] + ["Wow!! a <b>Photo</b> &amp; caf\u00e9", "x " * 40]
    ids = ours(texts, 32)
    assert torch.equal(their_tokenizer(texts), ids)
    model = coca_train.CoCa(coca_train.Config(**ckpt["config"]), pad_id=0, eos_id=ours.eos_id)
    model.load_state_dict(ckpt["model"])
    with torch.no_grad():
        torch.testing.assert_close(theirs.eval().encode_text(ids[:16]),         # no "!" (id 0)
                                   model.eval().encode_text(ids[:16]), atol=1e-5, rtol=0)
    card = (tmp_path / "oc" / "README.md").read_text()
    assert "padding id 0 is a vocabulary token" in card


def test_export_refuses_what_open_clip_cannot_build(run, tmp_path):
    with pytest.raises(UserError, match="exists and is not empty"):
        coca_train.main(["--init-from", run["ckpt_path"], "--export", str(run["out"] / "oc")])
    ckpt = run["ckpt"]
    for field, value, message in [("cls_mask", "correct", "--cls-mask correct: open_clip 3.3 builds "
                                   "only the legacy CLS mask"),
                                  ("pooler", "paper", "--pooler paper")]:
        saved = {**ckpt, "config": {**ckpt["config"], field: value}}
        if field == "pooler":                    # the paper's second pooler, as such a run has
            model = coca_train.CoCa(coca_train.Config(**saved["config"]), pad_id=0, eos_id=3)
            saved["model"] = model.state_dict()
        torch.save(saved, tmp_path / f"{field}.pt")
        with pytest.raises(UserError, match=message):
            coca_train.main(["--init-from", str(tmp_path / f"{field}.pt"), "--export",
                             str(tmp_path / field)])
        assert not os.path.exists(tmp_path / field) and not os.path.exists(tmp_path / f"{field}.tmp")
    with pytest.raises(UserError, match="pass --init-from CHECKPOINT"):
        coca_train.main(["--export", str(tmp_path / "none")])


def test_another_scripts_checkpoint_is_one_line_exit_2(run, tmp_path):
    torch.save({**run["ckpt"], "method": "blip"}, tmp_path / "blip.pt")
    line = one_line_error("coca_train.py", "--init-from", str(tmp_path / "blip.pt"), "--export", str(tmp_path / "oc"))
    assert line == f"error: {tmp_path / 'blip.pt'} is a blip checkpoint: export it with blip_train.py, not coca_train.py"
    assert not os.path.exists(tmp_path / "oc")
