"""clip_train.py --export: the trained tiny CLIP (the session's 160-step run) written as a transformers
CLIPModel folder and as an open_clip folder, loaded there with the library's own calls, computes our
embeddings, logits and loss; the library's own tokenizer and preprocessing give our ids and pixels, and
so our retrieval numbers; our --init-from of each export holds every weight of the checkpoint."""
import json
import os
import shutil

import pytest
import torch

import clip_train
from common.config import resolve_config
from common.data import (Tokenizer, eval_transform, load_rgb, open_clip_cleaner, read_annotations, retrieval_texts,
                         run_text_clean)
from common.metrics import retrieval_metrics
from common.utils import UserError, load_checkpoint
from common.weights import clip as clip_weights
from tests.test_distributed import one_line_error

open_clip = pytest.importorskip("open_clip")


@pytest.fixture(scope="module")
def run(trained_clip, tiny, tmp_path_factory):
    """The checkpoint, our model on it, its val split (first 40 images) and the two exports."""
    folder, _ = trained_clip
    ckpt_path = str(folder / "checkpoint_best.pt")
    ckpt = load_checkpoint(ckpt_path)
    model = clip_train.CLIP(clip_train.Config(**ckpt["config"])).eval()
    model.load_state_dict(ckpt["model"])
    out = tmp_path_factory.mktemp("export")
    for fmt in ("transformers", "open_clip"):
        clip_train.main(["--init-from", ckpt_path, "--export", str(out / fmt), "--export-format", fmt])
    val = read_annotations(os.path.join(tiny, "val.json"))[:40]
    texts, txt2img = retrieval_texts(val)
    images = [load_rgb(r["image"]) for r in val]
    return dict(ckpt_path=ckpt_path, ckpt=ckpt, model=model, out=out, val=val, texts=texts, txt2img=txt2img,
                images=images, odd=images[0].resize((131, 97)),        # resized and cropped by both
                raw="A Dog &amp;  Cat",                                  # cleaned up by ours first
                clean=open_clip_cleaner(ckpt["config"]["text_clean"]),
                ids=Tokenizer(ckpt["config"]["tokenizer"])(texts, ckpt["config"]["context_length"]))


def ours(run):
    """Our embeddings of the val images (our eval preprocessing) and texts, our CLIP loss over the
    images and their first captions, and those captions' rows."""
    model, size = run["model"], run["ckpt"]["config"]["image_size"]
    pixels = torch.stack([eval_transform(size)(im) for im in run["images"]])
    first = [run["txt2img"].tolist().index(i) for i in range(len(pixels))]    # each image's first caption
    with torch.no_grad():
        image_emb, text_emb = model.encode_image(pixels), model.encode_text(run["ids"])
        loss = clip_train.clip_loss(image_emb, text_emb[first], model.logit_scale.exp())
    return pixels, image_emb, text_emb, loss, first


def test_transformers_clipmodel_computes_ours(run):
    from transformers import AutoProcessor, CLIPModel
    folder = str(run["out"] / "transformers")
    hf, processor = CLIPModel.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)
    pixels, image_emb, text_emb, loss, first = ours(run)
    L = run["ckpt"]["config"]["context_length"]
    ids = processor(text=run["texts"], padding="max_length", max_length=L, truncation=True,
                    return_tensors="pt")["input_ids"]
    assert torch.equal(ids, run["ids"])                                     # its tokenizer: our rows
    their_pixels = processor(images=run["images"], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(their_pixels, pixels, atol=1e-5, rtol=0)     # its preprocessing: ours
    size = run["ckpt"]["config"]["image_size"]
    torch.testing.assert_close(processor(images=[run["odd"]], return_tensors="pt")["pixel_values"][0],
                               eval_transform(size)(run["odd"]), atol=1e-5, rtol=0)
    with torch.no_grad():
        out = hf(input_ids=ids[first], pixel_values=pixels, return_loss=True)
        full = hf(input_ids=ids, pixel_values=their_pixels)
    torch.testing.assert_close(out.image_embeds, image_emb, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.text_embeds, text_emb[first], atol=1e-5, rtol=0)
    scale = run["model"].logit_scale.exp()
    torch.testing.assert_close(out.logits_per_image, scale * image_emb @ text_emb[first].T, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(out.loss, loss, atol=1e-5, rtol=0)
    # a user's retrieval numbers through transformers alone equal ours on the same split
    theirs = retrieval_metrics(full.image_embeds @ full.text_embeds.T, run["txt2img"])
    assert theirs == pytest.approx(retrieval_metrics(image_emb @ text_emb.T, run["txt2img"]), abs=1e-9)
    assert theirs["r_mean"] > 20                                            # a trained model, not chance
    card = (run["out"] / "transformers" / "README.md").read_text()
    step = run["ckpt"]["step"]
    assert "library_name: transformers" in card and f"| tiny | the built-in tiny set | {step} |" in card
    assert "| r_mean |" in card and "python clip_train.py" in card and "--max-steps 160" in card


def test_open_clip_folder_computes_ours(run):
    folder = "local-dir:" + str(run["out"] / "open_clip")
    model, _, preprocess = open_clip.create_model_and_transforms(folder)
    tokenizer = open_clip.get_tokenizer(folder)
    model.eval()
    pixels, image_emb, text_emb, loss, first = ours(run)
    ids = tokenizer(run["texts"])
    assert torch.equal(ids, run["ids"])
    their_pixels = torch.stack([preprocess(im) for im in run["images"]])
    torch.testing.assert_close(their_pixels, pixels, atol=1e-5, rtol=0)
    # a resized image: the PIL resize (open_clip) vs the tensor resize (ours) differ by 1-2 of 255
    # levels (listed in the card); a wrong size, crop or interpolation would differ by far more
    size = run["ckpt"]["config"]["image_size"]
    diff = (preprocess(run["odd"]) - eval_transform(size)(run["odd"])).abs()
    assert diff.max() < 2.5 / 255 / 0.26 and diff.mean() < 1e-3, (diff.max(), diff.mean())
    # its tokenizer applies our text clean-up (tokenizer_kwargs): HTML, whitespace, case
    tok = Tokenizer(run["ckpt"]["config"]["tokenizer"], run["clean"])
    assert torch.equal(tokenizer([run["raw"]]), tok([run["raw"]], run["ckpt"]["config"]["context_length"]))
    with torch.no_grad():
        image_features, text_features, logit_scale = model(pixels, ids[first])
        their_loss = open_clip.ClipLoss()(image_features, text_features, logit_scale)
        all_images = model.encode_image(their_pixels, normalize=True)
        all_texts = model.encode_text(ids, normalize=True)
    torch.testing.assert_close(image_features, image_emb, atol=1e-5, rtol=0)
    torch.testing.assert_close(text_features, text_emb[first], atol=1e-5, rtol=0)
    torch.testing.assert_close(their_loss, loss, atol=1e-5, rtol=0)
    theirs = retrieval_metrics(all_images @ all_texts.T, run["txt2img"])
    assert theirs == pytest.approx(retrieval_metrics(image_emb @ text_emb.T, run["txt2img"]), abs=1e-9)
    assert "library_name: open_clip" in (run["out"] / "open_clip" / "README.md").read_text()


@pytest.mark.parametrize("fmt", ["transformers", "open_clip"])
def test_init_from_the_export_holds_every_weight(run, fmt):
    """The export read back through --init-from's own path (read_init, the architecture, load_init)."""
    path = str(run["out"] / fmt)
    init = clip_weights.read_init(path)
    assert init[0] == {"transformers": "hf", "open_clip": "open_clip"}[fmt]
    arch = clip_weights.init_architecture(init, path, clip_train.MODEL_FIELDS)
    assert arch == {k: run["ckpt"]["config"][k] for k in clip_train.MODEL_FIELDS}
    model = clip_train.CLIP(clip_train.Config(**arch))
    clip_weights.load_init(model, init, path)
    state = model.state_dict()
    assert state.keys() == run["ckpt"]["model"].keys()
    for key, value in run["ckpt"]["model"].items():
        assert torch.equal(state[key], value), key


def test_an_open_clip_folder_brings_its_text_clean_up(tmp_path):
    """--init-from an open_clip folder reads text as open_clip's get_tokenizer does: its
    tokenizer_kwargs.clean, else 'whitespace' with an hf_tokenizer_name, else 'lower'; a --text-clean
    on the command line wins; one we do not apply is a one-line error."""
    def clean_of(text_cfg, *flags):
        folder = tmp_path / str(len(os.listdir(tmp_path)))
        os.makedirs(folder)
        (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"text_cfg": text_cfg}}))
        cfg, _ = resolve_config(clip_train.Config, clip_train.PRESETS, ["--init-from", str(folder), *flags])
        return run_text_clean(cfg)(" A  Dog &amp; Cat"), cfg.text_clean
    assert clean_of({"tokenizer_kwargs": {"clean": "whitespace"}}) == ("A Dog & Cat", "whitespace")
    assert clean_of({"hf_tokenizer_name": ""}) == ("A Dog & Cat", "whitespace")
    assert clean_of({}) == ("a dog & cat", "lower")
    assert clean_of({"tokenizer_kwargs": {"clean": "whitespace"}}, "--text-clean", "lower") == ("a dog & cat", "lower")
    with pytest.raises(UserError, match="tokenizer_kwargs.clean 'canonicalize' is not one we apply"):
        clean_of({"tokenizer_kwargs": {"clean": "canonicalize"}})


def test_siglip_bias_goes_to_open_clip_and_the_card_says_what_transformers_lacks(run, tmp_path, monkeypatch):
    monkeypatch.setattr(clip_train, "evaluate", lambda *a, **k: {})
    clip_train.main(["--loss", "siglip", "--max-steps", "1", "--batch-size", "8", "--workers", "0",
                     "--output-dir", str(tmp_path / "run")])
    ckpt = str(tmp_path / "run" / "checkpoint_last.pt")
    bias = load_checkpoint(ckpt)["model"]["logit_bias"]
    clip_train.main(["--init-from", ckpt, "--export", str(tmp_path / "oc"), "--export-format", "open_clip"])
    model, _, _ = open_clip.create_model_and_transforms("local-dir:" + str(tmp_path / "oc"))
    assert torch.equal(model.logit_bias.detach().reshape(()), bias)
    clip_train.main(["--init-from", ckpt, "--export", str(tmp_path / "hf")])
    assert f"learned bias b = {bias.item():.4f} is not in CLIPModel" in (tmp_path / "hf" / "README.md").read_text()


def test_export_refuses_what_it_cannot_write(run, tmp_path):
    from safetensors.torch import load_file
    with pytest.raises(UserError, match="exists and is not empty"):
        clip_train.main(["--init-from", run["ckpt_path"], "--export", str(run["out"] / "transformers")])
    with pytest.raises(UserError, match="pass --init-from CHECKPOINT"):
        clip_train.main(["--export", str(tmp_path / "none")])
    old = {**run["ckpt"], "config": {"fusion_layer": 6}}
    old.pop("method")
    torch.save(old, tmp_path / "old.pt")               # saved before checkpoints named their method
    with pytest.raises(UserError, match="is not a clip_train.py checkpoint"):
        clip_train.main(["--init-from", str(tmp_path / "old.pt"), "--export", str(tmp_path / "x")])
    # a flag that contradicts the run is refused, not dropped; one that equals it, only says how to
    # evaluate (--workers) or where a file is (the tokenizer, copied elsewhere) is fine
    with pytest.raises(UserError, match=f"--loss siglip differs from 'clip' of {run['ckpt_path']}: an export is of"):
        clip_train.main(["--init-from", run["ckpt_path"], "--export", str(tmp_path / "x"), "--loss", "siglip"])
    size = run["ckpt"]["config"]["image_size"]
    with pytest.raises(UserError, match=f"--image-size {size + 16} differs from {size}"):
        clip_train.main(["--init-from", run["ckpt_path"], "--export", str(tmp_path / "x"),
                         "--image-size", str(size + 16)])
    assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "x.tmp")
    shutil.copytree(run["ckpt"]["config"]["tokenizer"], tmp_path / "tok")
    clip_train.main(["--init-from", run["ckpt_path"], "--export", str(tmp_path / "y"), "--workers", "0",
                     "--image-size", str(size), "--loss", "clip", "--tokenizer", str(tmp_path / "tok")])
    a, b = (load_file(str(d / "model.safetensors")) for d in (tmp_path / "y", run["out"] / "transformers"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_another_scripts_checkpoint_is_one_line_exit_2(run, tmp_path):
    torch.save({**run["ckpt"], "method": "albef"}, tmp_path / "albef.pt")
    line = one_line_error("clip_train.py", "--init-from", str(tmp_path / "albef.pt"), "--export", str(tmp_path / "hf"))
    assert line == f"error: {tmp_path / 'albef.pt'} is an albef checkpoint: export it with albef_train.py, not clip_train.py"


def test_resume_exports_the_same_weights(run, tmp_path):
    from safetensors.torch import load_file
    clip_train.main(["--resume", run["ckpt_path"], "--export", str(tmp_path / "hf"),
                     "--output-dir", str(tmp_path / "untouched")])
    assert not os.path.exists(tmp_path / "untouched")                  # an export writes no run folder
    a, b = (load_file(str(d / "model.safetensors")) for d in (tmp_path / "hf", run["out"] / "transformers"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
