"""blip2_train.py --export: a tiny stage-1 run (with its metrics) and a tiny stage-2 run written as
transformers' Blip2ForImageTextRetrieval and Blip2ForConditionalGeneration folders, loaded there with
from_pretrained and the folder's own Blip2Processor: ITC and ITM equal ours, the LM loss and greedy
generations too, the processor gives our ids and pixels; our --init-from of each export holds every
weight of the checkpoint; LAVIS's .pth layout holds LAVIS's names (loaded in LAVIS by
tests/lavis/check_blip2_export.py); an OPT and a FlanT5 generation folder are written back
unchanged; another script's checkpoint is a one-line error."""
import dataclasses
import json
import os

import pytest
import torch

import blip2_train
from common.data import eval_transform, load_rgb
from common.utils import load_checkpoint
from common.weights import blip2 as blip2_weights, blip2_export
from tests.test_blip2_stage2_train import STAGE2, a_batch
from tests.test_blip2_train import SMALL
from tests.test_distributed import one_line_error

TEXTS = ["a large red circle", "a small blue square on a black background", "a green triangle",
         "two shapes: a red diamond and a yellow circle"]


STEPS = {1: 10, 2: 10}


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    """Stage 1 (2 steps, evaluated: metrics.jsonl for the card) and stage 2 (2 steps, not
    evaluated), each exported in both formats. ln_vision's epsilon is the encoder's: transformers
    has one for both (the card lists the difference otherwise)."""
    out = tmp_path_factory.mktemp("blip2_export")
    ckpts = {}
    with pytest.MonkeyPatch.context() as mp:
        for stage, extra in ((1, []), (2, STAGE2)):
            if stage == 2:
                mp.setattr(blip2_train, "evaluate_stage2", lambda *a: {})
            run = str(out / f"run{stage}")
            blip2_train.main([*SMALL, *extra, "--max-steps", str(STEPS[stage]),
                              "--ln-vision-eps", "1e-6", "--output-dir", run])
            ckpts[stage] = os.path.join(run, "checkpoint_last.pt")
            for fmt in blip2_export.TARGETS:
                blip2_train.main(["--init-from", ckpts[stage], "--export", str(out / f"{fmt}{stage}"),
                                  "--export-format", fmt])
    with open(os.path.join(tiny, "val.json")) as f:
        images = [load_rgb(os.path.join(tiny, r["image"])) for r in json.load(f)[:4]]
    return dict(out=out, ckpts=ckpts, images=images)


def ours(path):
    """Our model of a checkpoint through --init-from's own path (the frozen parts rebuilt), eval;
    the run's text settings."""
    saved = load_checkpoint(path)["config"]
    cfg, _ = blip2_train.resolve_config(blip2_train.Config, blip2_train.PRESETS,
                                        ["--init-from", path, "--stage", str(saved["stage"])],
                                        recipe=blip2_train.task_recipe)
    cfg.__dict__.update({k: saved[k] for k in blip2_export.RUN_TEXT})
    return build(cfg)


def build(cfg):
    init = blip2_weights.read_init(cfg.init_from)
    tokenizer, llm_tok = blip2_weights.load_tokenizers(cfg, init)
    blip2_train.settle_config(cfg, init, tokenizer, llm_tok)
    return blip2_train.build_model(cfg, init, tokenizer, llm_tok).eval(), cfg, tokenizer, llm_tok


def test_retrieval_folder_computes_our_itc_and_itm(runs):
    from transformers import AutoProcessor, Blip2ForImageTextRetrieval
    folder = str(runs["out"] / "transformers1")
    hf = Blip2ForImageTextRetrieval.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    assert type(processor).__name__ == "Blip2Processor"
    model, cfg, tok, _ = ours(runs["ckpts"][1])
    ids = tok(TEXTS, cfg.max_length)
    inputs = processor(images=runs["images"], text=TEXTS, padding="max_length", truncation=True,
                       return_tensors="pt")
    assert torch.equal(inputs["input_ids"], ids)                      # its tokenizer: our rows
    assert torch.equal(inputs["attention_mask"], (ids != tok.pad_id).long())
    pixels = torch.stack([eval_transform(cfg.image_size, crop=False)(im) for im in runs["images"]])
    torch.testing.assert_close(inputs["pixel_values"], pixels, atol=1e-5, rtol=0)   # our pixels
    mask = inputs["attention_mask"]
    with torch.no_grad():
        itc = hf(**inputs, use_image_text_matching_head=False)
        itm = hf(**inputs, use_image_text_matching_head=True).logits_per_image
        image_embeds = model.image_embeds(pixels)
        image_feats = model.image_feats(model.query_pass(image_embeds)[0])       # (B, Q, E)
        text_feat = model.encode_text(ids, mask)                                  # (B, E)
        sim = torch.einsum("iqe,te->itq", image_feats, text_feat).amax(-1)      # the best query
        want_itm = model.itm_logits(ids, mask, image_embeds)
    torch.testing.assert_close(itc.image_embeds, image_feats, atol=1e-5, rtol=0)
    torch.testing.assert_close(itc.text_embeds, text_feat, atol=1e-5, rtol=0)
    torch.testing.assert_close(itc.logits_per_image, sim, atol=1e-5, rtol=0)
    torch.testing.assert_close(itm, want_itm, atol=1e-5, rtol=0)
    # a young Q-Former's outputs hardly depend on the input (tests/lavis/check_blip2.py), but do
    assert sim.std() > 2e-4 and (itm[:, 1] - itm[:, 0]).std() > 2e-4, (sim, itm)
    card = (runs["out"] / "transformers1" / "README.md").read_text()
    assert "library_name: transformers" in card and "| tiny | the built-in tiny set | 10 |" in card
    assert "| r_mean |" in card and "--max-steps 10" in card and "no ITG head" in card
    assert "layer_norm_eps" not in card                      # ln_vision's epsilon is the encoder's
    other = dataclasses.replace(cfg, ln_vision_eps=1e-5)     # the default: the card says so
    assert "layer_norm_eps 1e-06, trained at 1e-05" in blip2_export.differences(
        model, other, "transformers", None, None)[0]


def test_generation_folder_computes_our_loss_and_greedy_captions(runs):
    from transformers import AutoProcessor, Blip2ForConditionalGeneration
    folder = str(runs["out"] / "transformers2")
    hf = Blip2ForConditionalGeneration.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    model, cfg, _, tok = ours(runs["ckpts"][2])
    Q = cfg.num_query_tokens
    image_token = hf.config.image_token_index
    assert image_token == len(tok) and processor.tokenizer.convert_tokens_to_ids("<image>") == image_token
    # the LM loss: [<image> x Q; ids] with the queries out of the labels
    images, ids, mask, labels = a_batch(tok, cfg)
    B = ids.shape[0]
    with torch.no_grad():
        out = hf(pixel_values=images, input_ids=torch.cat([torch.full((B, Q), image_token), ids], 1),
                 attention_mask=torch.cat([torch.ones(B, Q, dtype=torch.long), mask], 1),
                 labels=torch.cat([torch.full((B, Q), -100), labels], 1))
        loss = model(dict(images=images, ids=ids, mask=mask, labels=labels))["loss_lm"]
    assert abs(out.loss.item() - loss.item()) < 1e-5, (out.loss.item(), loss.item())
    # greedy captions and answers through the processor (prompts of different lengths: padded on
    # the left after the <image> tokens, as ours) and the folder's own end of text
    prompts = ["", "a photo of", "Question: how many shapes are there? Short answer:", "two"]
    inputs = processor(images=runs["images"], text=prompts, padding=True, return_tensors="pt")
    ids, mask = blip2_train.prompt_batch(tok, prompts, True)
    assert torch.equal(inputs["input_ids"][:, :Q], torch.full((4, Q), image_token))
    assert torch.equal(inputs["input_ids"][:, Q:], ids) and torch.equal(inputs["attention_mask"][:, Q:], mask)
    pixels = torch.stack([eval_transform(cfg.image_size, crop=False)(im) for im in runs["images"]])
    torch.testing.assert_close(inputs["pixel_values"], pixels, atol=1e-5, rtol=0)
    kw = dict(do_sample=False, num_beams=1, max_new_tokens=8)
    with torch.no_grad():
        theirs = hf.generate(**inputs, **kw)[:, inputs["input_ids"].shape[1]:]
        want = model.generate(pixels, ids, mask, eos_token_id=blip2_train.end_ids(cfg, tok, True)[0],
                              pad_token_id=tok.pad_token_id, **kw)
    assert torch.equal(theirs, want), (theirs, want)
    assert (want != tok.pad_token_id).sum() >= 8                      # it wrote something
    with open(os.path.join(folder, "generation_config.json")) as f:
        generation = json.load(f)
    assert generation["num_beams"] == cfg.num_beams == 2 and generation["max_new_tokens"] == 6
    card = (runs["out"] / "transformers2" / "README.md").read_text()
    assert "Blip2ForConditionalGeneration" in card and "--stage 2" in card


def full_state(path):
    """Every weight of a checkpoint's model, the frozen ones rebuilt from their sources."""
    return ours(path)[0].state_dict()


@pytest.mark.parametrize("fmt, stage", [("transformers", 1), ("transformers", 2), ("lavis", 1)])
def test_init_from_the_export_holds_every_weight(runs, fmt, stage):
    """Through --init-from's own path. LAVIS's file holds no sizes it cannot show (the head count,
    the encoder's image size, ln_vision's epsilon): the command line gives them, as for LAVIS."""
    want = full_state(runs["ckpts"][stage])
    path = str(runs["out"] / f"{fmt}{stage}")
    args = [*SMALL, "--ln-vision-eps", "1e-6", "--init-from", os.path.join(path, "blip2.pth")] \
        if fmt == "lavis" else ["--stage", str(stage), "--init-from", path]
    cfg, _ = blip2_train.resolve_config(blip2_train.Config, blip2_train.PRESETS, args)
    model, cfg, _, _ = build(cfg)
    saved = load_checkpoint(runs["ckpts"][stage])["config"]
    assert {k: getattr(cfg, k) for k in blip2_train.blip2_weights.MODEL_FIELDS} == \
        {k: saved[k] for k in blip2_train.blip2_weights.MODEL_FIELDS}
    got = model.state_dict()
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert torch.equal(got[key], value), key


def test_lavis_layout_holds_lavis_names(runs):
    """The .pth LAVIS's load_checkpoint reads ({"model": ...}); stage 1 with Blip2Qformer's keys
    (a random encoder is in the file: LAVIS could not rebuild it), stage 2 with blip2_opt's."""
    one = torch.load(runs["out"] / "lavis1" / "blip2.pth", weights_only=True)["model"]
    assert {"query_tokens", "temp", "ln_vision.weight", "itm_head.weight", "vision_proj.weight",
            "Qformer.cls.predictions.decoder.weight", "Qformer.bert.embeddings.position_ids",
            "visual_encoder.blocks.0.attn.q_bias", "visual_encoder.pos_embed",
            "Qformer.bert.encoder.layer.0.crossattention.self.key.weight",
            "Qformer.bert.encoder.layer.0.intermediate_query.dense.weight"} <= set(one)
    assert not any(k.startswith(("qformer.", "lm_head.")) for k in one)
    assert torch.equal(one["Qformer.cls.predictions.decoder.weight"],
                       one["Qformer.bert.embeddings.word_embeddings.weight"])
    two = torch.load(runs["out"] / "lavis2" / "blip2.pth", weights_only=True)["model"]
    assert {"opt_proj.weight", "opt_model.lm_head.weight", "query_tokens"} <= set(two)
    assert not any(".intermediate." in k or "word_embeddings" in k for k in two)
    card = (runs["out"] / "lavis2" / "README.md").read_text()
    assert "library_name: lavis" in card and "blip2_opt" in card


def test_export_refuses_what_it_cannot_write(runs, tmp_path):
    from common.utils import UserError
    with pytest.raises(UserError, match="exists and is not empty"):
        blip2_train.main(["--init-from", runs["ckpts"][1], "--export", str(runs["out"] / "transformers1")])
    # another script's checkpoint: one line through the CLI, exit 2
    other = load_checkpoint(runs["ckpts"][1])
    torch.save({**other, "method": "clip", "model": {"logit_scale": torch.tensor(1.0)}}, tmp_path / "clip.pt")
    line = one_line_error("blip2_train.py", "--init-from", str(tmp_path / "clip.pt"), "--export", str(tmp_path / "x"))
    assert "is a clip checkpoint" in line and "clip_train.py" in line
    assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "x.tmp")
    # an LM with no free embedding row for transformers' <image> token
    model, cfg, _, tok = ours(runs["ckpts"][2])
    cfg = dataclasses.replace(cfg, export=str(tmp_path / "full"), export_format="transformers")
    model.language_model.resize_token_embeddings(len(tok))
    with pytest.raises(UserError, match="no free one for Blip2's <image> token"):
        blip2_export.export(model, cfg, None, tok, {"path": "x", "config": None, "step": None,
                                                    "script": "blip2_train.py", "command": None})
    assert not os.path.exists(tmp_path / "full")


class _LMTok:
    """What the export reads of an LM tokenizer without its processor: its length (the <image> id)
    and the id of the end of text."""
    def __init__(self, n):
        self.n, self.eos_token_id = n, 2

    def __len__(self):
        return self.n

    def get_vocab(self):
        return {}

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [7]}


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_a_generation_folder_of_either_lm_is_written_back_unchanged(kind):
    """A transformers folder (OPT or FlanT5 layout) read by us and written by the export: the same
    tensors under the same names, the LM's config with our end of text (OPT)."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration
    from common.export import export_state
    from tests.test_blip2 import hf_config, randomise
    from tests.test_blip2_stage2 import IMAGE_TOKEN, Q, _Tok, opt_config, t5_config
    vision, qformer, extra = hf_config(_Tok, text=False)
    text = opt_config() if kind == "opt" else t5_config()
    hf = randomise(Blip2ForConditionalGeneration(Blip2Config(
        vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
        image_token_index=IMAGE_TOKEN, **{**extra, "num_query_tokens": Q})), 3)
    model = blip2_train.BLIP2(blip2_train.Config(**{**blip2_weights.hf_fields(
        hf.config.to_dict(), hf.state_dict(), "src", 2), "stage": 2}), dec_id=0, pad_id=0,
        llm=hf.language_model).eval()
    blip2_weights.load_hf(model, hf.state_dict(), "src")
    config = blip2_export.hf_config(model, model.cfg, _LMTok(IMAGE_TOKEN))
    assert config.image_token_index == IMAGE_TOKEN and config.num_query_tokens == Q
    assert config.use_decoder_only_language_model == (kind == "opt")
    assert config.text_config.eos_token_id == (7 if kind == "opt" else text.eos_token_id)
    with torch.device("meta"):
        target = Blip2ForConditionalGeneration(config).state_dict()
    state = export_state(model.state_dict(), blip2_export.hf_map(model, model.cfg, target), target,
                         source="test", skip=("position_ids",))
    want = {k: v for k, v in hf.state_dict().items() if "position_ids" not in k}
    assert state.keys() == want.keys()
    for key, value in want.items():
        assert torch.equal(state[key], value), key
