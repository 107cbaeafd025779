"""blip_train.py --export: a tiny BLIP run written as transformers' BlipForImageTextRetrieval and
BlipForConditionalGeneration folders, loaded there with from_pretrained, computes our ITC
similarities, ITM logits, LM loss and greedy captions; the folders' own BlipProcessor gives our ids
and pixels; our --init-from of the export holds every weight of the checkpoint but the ones
transformers has no place for."""
import json
import os
from dataclasses import replace

import pytest
import torch

import blip_train
from common.data import Tokenizer, eval_transform, load_rgb, read_annotations
from common.utils import UserError, load_checkpoint
from common.weights import blip as blip_weights
from tests.test_distributed import one_line_error
from tests.workers.dist_fixtures import BLIP_SMALL_ARGS

SMALL = [*BLIP_SMALL_ARGS, "--workers", "0", "--warmup-steps", "1"]
PROMPT = "a picture of "


@pytest.fixture(scope="module")
def run(tiny, tmp_path_factory):
    """A 3-step run (with its evaluation: the card's metrics), our model on its checkpoint, six val
    images with a caption each, and the default export (retrieval/ and captioning/)."""
    out = tmp_path_factory.mktemp("blip_export")
    blip_train.main([*SMALL, "--max-steps", "3", "--output-dir", str(out / "run")])
    ckpt_path = str(out / "run" / "checkpoint_last.pt")
    ckpt = load_checkpoint(ckpt_path)
    cfg = blip_train.Config(**ckpt["config"])
    tokenizer = Tokenizer(cfg.tokenizer)
    model = blip_train.build_blip(cfg, tokenizer).eval()
    model.load_state_dict(ckpt["model"])
    blip_train.main(["--init-from", ckpt_path, "--export", str(out / "hf")])
    val = read_annotations(os.path.join(tiny, "val.json"))[:6]
    texts = [blip_train.caption_text(cfg)(r["captions"][0]) for r in val]
    ids = tokenizer(texts, cfg.max_length)
    images = [load_rgb(r["image"]) for r in val]
    pixels = torch.stack([eval_transform(cfg.image_size, crop=False)(im) for im in images])
    return dict(out=out, ckpt_path=ckpt_path, ckpt=ckpt, cfg=cfg, tokenizer=tokenizer, model=model,
                texts=texts, ids=ids, mask=(ids != tokenizer.pad_id).long(), images=images,
                pixels=pixels)


def processor_inputs(run, folder):
    """The folder's own processor (AutoProcessor) on our texts and images; checks its pixels."""
    from transformers import AutoProcessor, BlipProcessor
    processor = AutoProcessor.from_pretrained(folder)
    assert isinstance(processor, BlipProcessor)
    inputs = processor(images=run["images"], text=run["texts"], padding="max_length",
                       max_length=run["cfg"].max_length, truncation=True, return_tensors="pt")
    torch.testing.assert_close(inputs["pixel_values"], run["pixels"], atol=1e-5, rtol=0)
    assert torch.equal(inputs["attention_mask"], run["mask"])
    return processor, inputs


def test_retrieval_folder_computes_our_itc_and_itm(run):
    from transformers import BlipForImageTextRetrieval
    folder = str(run["out"] / "hf" / "retrieval")
    model, ids, mask, pixels = run["model"], run["ids"], run["mask"], run["pixels"]
    _, inputs = processor_inputs(run, folder)
    assert torch.equal(inputs["input_ids"], ids)                      # [CLS] ... [SEP]: our rows
    hf = BlipForImageTextRetrieval.from_pretrained(folder).eval()
    with torch.no_grad():
        embeds = model.image_embed(pixels)
        itc = model.image_feat(embeds) @ model.text_feat(ids, mask).T
        itm = model.itm_logits(ids, mask, embeds)
        their_itc = hf(**inputs, use_itm_head=False).itm_score
        enc = inputs["input_ids"].clone()
        enc[:, 0] = model.enc_id                                       # as the model card says
        their_itm = hf(input_ids=enc, attention_mask=mask, pixel_values=pixels).itm_score
        as_given = hf(**inputs).itm_score
    torch.testing.assert_close(their_itc, itc, atol=1e-5, rtol=0)
    torch.testing.assert_close(their_itm, itm, atol=1e-5, rtol=0)
    assert not torch.allclose(as_given, itm, atol=1e-3)               # why the card names [ENC]
    card = (run["out"] / "hf" / "retrieval" / "README.md").read_text()
    step = run["ckpt"]["step"]
    assert "library_name: transformers" in card and f"| tiny | the built-in tiny set | {step} |" in card
    assert "| r_mean |" in card and "python blip_train.py" in card and "--max-steps 3" in card
    assert f"[ENC] (id {model.enc_id})" in card and f"{model.temp.item():.6g}" in card
    assert "momentum encoders and the feature queues" in card


def test_captioning_folder_computes_our_lm_loss_and_greedy_captions(run):
    from transformers import BlipForConditionalGeneration
    folder = str(run["out"] / "hf" / "captioning")
    model, ids, mask, pixels, cfg = (run[k] for k in ("model", "ids", "mask", "pixels", "cfg"))
    processor, inputs = processor_inputs(run, folder)
    assert torch.equal(inputs["input_ids"], ids)                      # [CLS] ... [SEP]: our rows
    dec = ids.clone()
    dec[:, 0] = model.dec_id                                           # as the model card says
    hf = BlipForConditionalGeneration.from_pretrained(folder).eval()
    assert hf.config.text_config.label_smoothing == cfg.label_smoothing == 0.1
    with torch.no_grad():
        loss = model.loss_lm(ids, mask, model.image_embed(pixels), 0)
        labels = dec.masked_fill(mask == 0, -100)
        their_loss = hf(input_ids=dec, attention_mask=mask, pixel_values=pixels, labels=labels).loss
        as_given = hf(**inputs, labels=labels).loss
    torch.testing.assert_close(their_loss, loss, atol=1e-5, rtol=0)
    assert abs(as_given - loss) > 1e-3                                  # why the card names [DEC]
    # greedy captions after [DEC] alone (images only) and after the prompt, token for token, at
    # our lengths and at ones that force both bounds; then our evaluation's beam search
    gen = hf.generation_config
    assert (gen.num_beams, gen.max_length, gen.min_length) == (cfg.num_beams, cfg.max_gen_length,
                                                                cfg.min_gen_length)
    for prompt, beams, lengths in [("", 1, (gen.min_length, gen.max_length)), (PROMPT, 1, (8, 9)),
                                   (PROMPT, 1, (gen.min_length, gen.max_length)),
                                   (PROMPT, gen.num_beams, (gen.min_length, gen.max_length))]:
        prompt_ids = blip_train.prompt_token_ids(run["tokenizer"], prompt, cfg.max_length)
        with torch.no_grad():
            ours = model.generate(pixels, prompt_ids, num_beams=beams, max_length=lengths[1],
                                  min_length=lengths[0])
            text = {"text": [prompt] * len(pixels)} if prompt else {}
            their_inputs = processor(images=run["images"], return_tensors="pt", **text)
            theirs = hf.generate(**their_inputs, num_beams=beams, min_length=lengths[0],
                                 max_length=lengths[1])
        ours, theirs = caption_rows(ours, model), caption_rows(theirs, model)
        assert theirs == ours, (prompt, beams, lengths)
        assert all(row[: 1 + len(prompt_ids)] == [model.dec_id, *prompt_ids.tolist()] for row in ours)
        assert all(lengths[0] <= len(row) <= lengths[1] for row in ours)
        if lengths == (8, 9):                  # no [SEP] before 8 tokens, at most 9
            assert any(row[-1] != model.sep_id for row in ours)
        assert [processor.decode(row, skip_special_tokens=True) for row in theirs] == [
            run["tokenizer"].decode(row) for row in ours]
    assert (run["out"] / "hf" / "captioning" / "generation_config.json").is_file()
    card = (run["out"] / "hf" / "captioning" / "README.md").read_text()
    assert "library_name: transformers" in card and f"[DEC] (id {model.dec_id})" in card


def caption_rows(seqs, model):
    """Each generated row up to its first [SEP] after [DEC] (what follows is padding: [PAD] in
    ours, in transformers' greedy search; [SEP] in its beam search)."""
    rows = []
    for row in seqs.tolist():
        end = row.index(model.sep_id, 1) + 1 if model.sep_id in row[1:] else len(row)
        rows.append([t for t in row[:end] if t != model.pad_id])
    return rows


def held(state, ckpt_state, skip):
    """The keys of the checkpoint whose tensors `state` does not reproduce, outside `skip`."""
    return [k for k, v in ckpt_state.items()
            if not k.startswith(skip) and k not in blip_weights.QUEUES and not torch.equal(state[k], v)]


def test_init_from_the_export_holds_every_weight(run, capsys):
    """The export read back through --init-from's own path (read_init, the architecture,
    load_init): both folders together give every weight but the temperature; the momentum
    encoders become copies of the online ones; each folder alone, its half of the MED."""
    cfg, ckpt = run["cfg"], run["ckpt"]
    path = str(run["out"] / "hf")
    init = blip_weights.read_init(path)
    arch = blip_weights.init_architecture(init, path)
    assert arch == {k: ckpt["config"][k] for k in blip_weights.ARCH_FIELDS if k != "queue_size"}
    state = blip_train.build_model(replace(cfg, init_from=path), run["tokenizer"], init).state_dict()
    assert state.keys() == ckpt["model"].keys()
    assert held(state, ckpt["model"], blip_weights.MOMENTUM) == ["temp"]
    for key in ckpt["model"]:
        if key.startswith(blip_weights.MOMENTUM):
            assert torch.equal(state[key], state[key.replace("_m.", ".", 1)]), key
    assert "left at initialisation: temp (not" in capsys.readouterr().out
    for kind, absent in blip_weights.ABSENT.items():
        one = os.path.join(path, kind)
        state = blip_train.build_model(replace(cfg, init_from=one), run["tokenizer"],
                                       blip_weights.read_init(one)).state_dict()
        diff = held(state, ckpt["model"], blip_weights.MOMENTUM)
        assert diff and all(k.startswith(absent) for k in diff), (kind, diff)


def test_a_fine_tuned_task_exports_its_folder_and_a_published_folder_round_trips(run, tmp_path):
    """By default a --task caption run writes captioning/ alone (its ITC/ITM half is what it
    started from); a transformers folder given to --init-from is written back as it was, and the
    half it lacks is refused, not made up."""
    from safetensors.torch import load_file
    torch.save({**run["ckpt"], "config": {**run["ckpt"]["config"], "task": "caption"}},
               tmp_path / "cap.pt")
    blip_train.main(["--init-from", str(tmp_path / "cap.pt"), "--export", str(tmp_path / "a")])
    assert os.listdir(tmp_path / "a") == ["captioning"]
    blip_train.main(["--init-from", str(tmp_path / "cap.pt"), "--export", str(tmp_path / "b"),
                     "--export-format", "retrieval"])
    assert "this run trained --task caption only" in (tmp_path / "b" / "README.md").read_text()
    # the export itself (both folders, its own tokenizer) through --init-from, written back
    blip_train.main(["--init-from", str(run["out"] / "hf"), "--export", str(tmp_path / "c")])
    for kind in blip_weights.ABSENT:
        first, again = run["out"] / "hf" / kind, tmp_path / "c" / kind
        before, after = (load_file(os.path.join(f, "model.safetensors")) for f in (first, again))
        assert before.keys() == after.keys()
        assert all(torch.equal(after[k], v) for k, v in before.items()), kind
        for name in ("config.json", "tokenizer.json", "processor_config.json"):
            assert (again / name).read_text() == (first / name).read_text(), name
        assert "published weights, no run" in (again / "README.md").read_text()
    published = str(run["out"] / "hf" / "retrieval")
    blip_train.main(["--init-from", published, "--export", str(tmp_path / "e")])
    assert os.listdir(tmp_path / "e") == ["retrieval"]
    with pytest.raises(UserError, match="holds no captioning weights"):
        blip_train.main(["--init-from", published, "--export", str(tmp_path / "d"),
                         "--export-format", "captioning"])


def test_one_task_folder_and_what_export_refuses(run, tmp_path):
    """--export-format captioning writes that folder at the path; an existing folder, no
    weights, or a checkpoint without our architecture fields is refused, nothing left behind."""
    blip_train.main(["--init-from", run["ckpt_path"], "--export", str(tmp_path / "cap"),
                     "--export-format", "captioning"])
    assert sorted(os.listdir(tmp_path / "cap"))[:3] == ["README.md", "config.json",
                                                        "generation_config.json"]
    assert "BlipForConditionalGeneration" in (tmp_path / "cap" / "config.json").read_text()
    # the decoding flags given with --export set generation_config.json; a flag that contradicts the run
    # (--image-size) is refused, never dropped
    blip_train.main(["--init-from", run["ckpt_path"], "--export", str(tmp_path / "beams"), "--export-format",
                     "captioning", "--num-beams", "2", "--max-gen-length", "7", "--min-gen-length", "3"])
    generation = json.loads((tmp_path / "beams" / "generation_config.json").read_text())
    assert (generation["num_beams"], generation["max_length"], generation["min_length"]) == (2, 7, 3)
    assert "num_beams=2, max_length=7," in (tmp_path / "beams" / "README.md").read_text()
    assert run["cfg"].num_beams != 2 and json.loads((tmp_path / "cap" / "generation_config.json").read_text())[
        "num_beams"] == run["cfg"].num_beams
    with pytest.raises(UserError, match=f"--image-size 64 differs from {run['cfg'].image_size} of"):
        blip_train.main(["--init-from", run["ckpt_path"], "--export", str(tmp_path / "big"), "--image-size", "64"])
    with pytest.raises(UserError, match="exists and is not empty"):
        blip_train.main(["--init-from", run["ckpt_path"], "--export", str(tmp_path / "cap")])
    with pytest.raises(UserError, match="pass --init-from CHECKPOINT"):
        blip_train.main(["--export", str(tmp_path / "none")])
    old = {**run["ckpt"], "config": {"fusion_layer": 6}}
    old.pop("method")
    torch.save(old, tmp_path / "old.pt")               # saved before checkpoints named their method
    with pytest.raises(UserError, match="is not a blip_train.py checkpoint"):
        blip_train.main(["--init-from", str(tmp_path / "old.pt"), "--export", str(tmp_path / "x")])
    assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "x.tmp")


def test_another_scripts_checkpoint_is_one_line_exit_2(run, tmp_path):
    torch.save({**run["ckpt"], "method": "coca"}, tmp_path / "coca.pt")
    line = one_line_error("blip_train.py", "--init-from", str(tmp_path / "coca.pt"), "--export", str(tmp_path / "hf"))
    assert line == f"error: {tmp_path / 'coca.pt'} is a coca checkpoint: export it with coca_train.py, not blip_train.py"
    assert not os.path.exists(tmp_path / "hf")
