"""blip2_train.py --stage 2 end to end: what trains and what stays frozen, the loss mask and
truncation, stage 1 -> stage 2 -> caption fine-tuning -> zero-shot VQA under torchrun with SIGTERM
and exact resume, and learning on the tiny data."""
import json
import os

import pytest
import torch

import blip2_train
from common.utils import adamw
from tests.test_albef_train import data_args
from tests.test_blip2_train import MODEL, SMALL, run_ok
from tests.test_clip_train import read_metrics, subset, train_losses  # noqa: F401  (fixture)
from tests.test_distributed import sigterm_mid_run

LLM = dict(llm_width=32, llm_layers=2, llm_heads=2, llm_mlp_dim=64)
STAGE2 = ["--stage", "2", *[f"--{k.replace('_', '-')}={v}" for k, v in LLM.items()], "--max-gen-length", "6",
          "--num-beams", "2"]
QFORMER_SIDE = ("qformer.", "query_tokens", "ln_vision.", "language_projection.")


@pytest.fixture(scope="module")
def llm_tok(tiny):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(os.path.join(tiny, "tokenizer_llm"))


def a_batch(tok, cfg, n=4):
    texts = [("", "a small red circle on a white background"), ("a photo of ", "two shapes on gray"),
             ("Question: how many shapes are there? Short answer:", "2"), ("", "one large blue square on black")][:n]
    end = blip2_train.end_ids(cfg, tok, True)
    items = [(torch.randn(3, cfg.image_size, cfg.image_size), blip2_train.llm_example(tok, p, t, cfg.max_length, True,
                                                                                        end), i)
             for i, (p, t) in enumerate(texts)]
    return blip2_train.collate_llm(tok.pad_token_id)(items)[:4]


@pytest.mark.parametrize("finetune", [False, True])
def test_only_the_qformer_and_projection_train_and_the_llm_stays_bit_identical(finetune, llm_tok, tmp_path):
    """Stage 2 with a frozen LM from a folder: gradients and optimizer state only for the Q-Former
    side (queries, ln_vision, Q-Former, projection), plus the image encoder in caption fine-tuning;
    after optimizer steps the LM (and a frozen encoder) is bit-identical, and the LM is in eval mode
    inside model.train(). Gradient checkpointing through the frozen LM gives the same gradients."""
    torch.manual_seed(0)
    folder = str(tmp_path / "llm")
    cfg = blip2_train.Config(**{**MODEL, **LLM}, stage=2)
    blip2_train.tiny_llm(cfg, llm_tok).save_pretrained(folder)
    llm_tok.save_pretrained(folder)
    cfg = blip2_train.Config(**{**MODEL, **LLM}, stage=2, llm=folder, freeze_vision=not finetune, dropout=0.0)
    blip2_train.settle_config(cfg, (None, None), None, llm_tok)
    model = blip2_train.build_model(cfg, (None, None), None, llm_tok)
    model.train()
    assert not model.language_model.training and model.visual_encoder.training == finetune
    trains = QFORMER_SIDE + (("visual_encoder.",) if finetune else ())
    groups = blip2_train.param_groups(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    in_optimizer = sorted(names[id(p)] for g in groups for p in g["params"])
    assert in_optimizer == sorted(n for n, _ in model.named_parameters() if n.startswith(trains))
    llm_before = {k: v.clone() for k, v in model.language_model.state_dict().items()}
    vit_before = {k: v.clone() for k, v in model.visual_encoder.state_dict().items()}
    qformer_before = next(model.qformer.parameters()).clone()
    optimizer = adamw(groups, lr=1e-2)
    batch = a_batch(llm_tok, cfg)
    for _ in range(3):
        loss = model(dict(zip(("images", "ids", "mask", "labels"), batch)))["loss_lm"]
        loss.backward()
        for n, p in model.named_parameters():
            assert (p.grad is not None) == n.startswith(trains), n
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert all(torch.equal(v, llm_before[k]) for k, v in model.language_model.state_dict().items())
    assert all(torch.equal(v, vit_before[k]) for k, v in model.visual_encoder.state_dict().items()) != finetune
    assert not torch.equal(next(model.qformer.parameters()), qformer_before)
    # the frozen LM's layers recomputed in backward: the same loss and gradients
    loss = model(dict(zip(("images", "ids", "mask", "labels"), batch)))["loss_lm"]
    loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.set_grad_checkpointing()
    again = model(dict(zip(("images", "ids", "mask", "labels"), batch)))["loss_lm"]
    again.backward()
    assert again.item() == loss.item()
    for n, p in model.named_parameters():
        if n in want:
            assert torch.allclose(p.grad, want[n], atol=1e-6, rtol=1e-5), n


def test_the_loss_counts_only_the_targets_and_truncation_keeps_the_end(llm_tok):
    """llm_example: labels -100 on the prompt and its [BOS] ([BOS] is a target without a prompt);
    collate_llm: -100 on padding; the loss is the cross-entropy of exactly the target tokens,
    computed here from the LM's logits over the whole [queries; text] sequence (the last query
    predicts [BOS]); padding tokens change nothing. A caption longer than max_length is cut
    with its end ("\\n", the LM's stop signal) kept; for an encoder-decoder the prompt goes to the
    encoder and the target keeps its </s>."""
    torch.manual_seed(0)
    cfg = blip2_train.Config(**{**MODEL, **LLM}, stage=2, dropout=0.0)
    blip2_train.settle_config(cfg, (None, None), None, llm_tok)
    model = blip2_train.build_model(cfg, (None, None), None, llm_tok)
    model.eval()
    newline = llm_tok("\n", add_special_tokens=False)["input_ids"]
    prompt = "Question: how many shapes are there? Short answer:"
    ids, labels = blip2_train.llm_example(llm_tok, prompt, "2", 32, True, newline)
    n_prompt = len(llm_tok(prompt)["input_ids"])
    assert ids[0] == llm_tok.bos_token_id and labels[:n_prompt] == [-100] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] == llm_tok("2", add_special_tokens=False)["input_ids"] + newline
    long = " ".join(["a small red circle"] * 10)
    ids, labels = blip2_train.llm_example(llm_tok, "a photo of ", long, 12, True, newline)
    assert len(ids) == 12 and ids[-1] == labels[-1] == newline[0] and labels[:4] == [-100] * 4
    images, ids, mask, labels = a_batch(llm_tok, cfg)
    assert ((labels == -100) | (mask == 1)).all() and (labels[mask == 0] == -100).all()
    with torch.no_grad():
        loss = model(dict(images=images, ids=ids, mask=mask, labels=labels))["loss_lm"]
        x, m = model.llm_inputs(model.soft_prompt(images), ids, mask)
        full = model.language_model(inputs_embeds=x, attention_mask=m).logits         # (B, Q + L, V)
        Q = cfg.num_query_tokens
        terms = [torch.nn.functional.cross_entropy(full[b, Q + t - 1], labels[b, t])
                 for b in range(len(ids)) for t in range(ids.shape[1]) if labels[b, t] != -100]
        assert (labels[:, 0] != -100).sum() == 2               # the two samples without a prompt
        assert abs(loss.item() - torch.stack(terms).mean().item()) < 1e-5
        noisy = ids.masked_fill(mask == 0, 7)
        assert model(dict(images=images, ids=noisy, mask=mask, labels=labels))["loss_lm"].item() == loss.item()
    # encoder-decoder: a T5-style tokenizer (text </s>)
    from tokenizers import processors
    t5_tok = llm_tok.__class__.from_pretrained(llm_tok.name_or_path)
    t5_tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", t5_tok.eos_token_id)])
    ids, labels = blip2_train.llm_example(t5_tok, "a photo of", long, 6, False, [])
    assert ids == t5_tok("a photo of")["input_ids"] and ids[-1] == t5_tok.eos_token_id
    assert len(labels) == 6 and labels[-1] == t5_tok.eos_token_id


def test_opt_targets_are_lavis_blip2_opt_targets(llm_tok):
    """The decoder-only loss is LAVIS blip2_opt.forward's, built here as it builds it: the texts
    tokenised with "\n" appended, right-padded; targets = the ids with -100 at padding and, with a
    prompt, on its first prompt_length tokens ([BOS] included); -100 for the queries in front; the
    LM's own shift. Without a prompt (stage-2 pretraining) the last query learns to predict
    [BOS]."""
    torch.manual_seed(0)
    cfg = blip2_train.Config(**{**MODEL, **LLM}, stage=2, dropout=0.0)
    blip2_train.settle_config(cfg, (None, None), None, llm_tok)
    model = blip2_train.build_model(cfg, (None, None), None, llm_tok)
    model.eval()
    end = blip2_train.end_ids(cfg, llm_tok, True)
    captions = ["a small red circle on a white background", "two shapes on gray", "a blue square"]
    images = torch.randn(3, 3, cfg.image_size, cfg.image_size)
    for prompt in ("", "a photo of "):         # pretraining; caption fine-tuning (LAVIS's prompt)
        tokens = llm_tok([prompt + c + "\n" for c in captions], padding="longest",
                         return_tensors="pt")
        targets = tokens.input_ids.masked_fill(tokens.input_ids == llm_tok.pad_token_id, -100)
        if prompt:
            targets[:, :int(llm_tok(prompt, return_tensors="pt").attention_mask.sum())] = -100
        Q = cfg.num_query_tokens
        targets = torch.cat([torch.full((3, Q), -100), targets], 1)
        ids, mask, labels = blip2_train.collate_llm(llm_tok.pad_token_id)(
            [(images[i], blip2_train.llm_example(llm_tok, prompt, c, 32, True, end), i)
             for i, c in enumerate(captions)])[1:4]
        assert torch.equal(ids, tokens.input_ids) and torch.equal(mask, tokens.attention_mask)
        with torch.no_grad():
            x, m = model.llm_inputs(model.soft_prompt(images), ids, mask)
            logits = model.language_model(inputs_embeds=x, attention_mask=m).logits
            lavis = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1),
                                                      targets[:, 1:].flatten())
            ours = model(dict(images=images, ids=ids, mask=mask, labels=labels))["loss_lm"]
        assert abs(ours.item() - lavis.item()) < 1e-6, (prompt, ours.item(), lavis.item())
        assert (targets[:, Q] != -100).all() == (not prompt)   # the last query's target: [BOS]


def stage1_checkpoint(path, tiny, **fields):
    """One of our stage-1 checkpoints (what --init-from reads: config, trainable weights, the
    encoder's fingerprint), written directly."""
    import dataclasses
    from common.data import Tokenizer
    cfg = blip2_train.Config(**{**MODEL, **fields})
    model = blip2_train.build_blip2(cfg, Tokenizer(os.path.join(tiny, "tokenizer")))
    blip2_train.load_vision(model, cfg)
    torch.save({"config": dataclasses.asdict(cfg), "model": model.trainable_state_dict(),
                "vision_fingerprint": blip2_train.blip2_weights.fingerprint(model.visual_encoder)}, path)
    return str(path)


def test_stage2_from_stage1_takes_the_command_lines_image_size_and_encoder(  # noqa: F811
        tmp_path, subset, tiny, llm_tok, monkeypatch):
    """Stage 2 built from a stage-1 start keeps what the command line (or a task recipe) sets, not
    the checkpoint's or the folder's values: --image-size (config.json and the model's positions),
    --vision-weights, --vision-seed, and the caption recipe's 364 px from a transformers folder."""
    from transformers import Blip2Config, Blip2ForImageTextRetrieval
    from tests.test_blip2 import hf_config, randomise
    from tests.test_blip2_stage2 import _Tok
    from tests.test_blip2_train import write_random_eva

    def build(argv):
        cfg, _ = blip2_train.resolve_config(blip2_train.Config, blip2_train.PRESETS, argv,
                                            recipe=blip2_train.task_recipe)
        init = blip2_train.blip2_weights.read_init(cfg.init_from)
        blip2_train.settle_config(cfg, init, None, llm_tok)
        return blip2_train.build_model(cfg, init, None, llm_tok), cfg

    eva = write_random_eva(tmp_path)
    s1 = stage1_checkpoint(tmp_path / "eva.pt", tiny, vision_weights=eva)
    out = str(tmp_path / "at48")
    monkeypatch.setattr(blip2_train, "evaluate_stage2", lambda *a: {})   # config.json is the point
    blip2_train.main([*SMALL, *STAGE2, "--val-data", subset[3], "--eval-only", "--init-from", s1,
                      "--image-size", "48", "--output-dir", out])
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["image_size"] == 48
    model, cfg = build([*SMALL, *STAGE2, "--init-from", s1, "--image-size", "48"])
    assert cfg.image_size == 48 and model.visual_encoder.positional_embedding.shape[0] == 6 * 6 + 1
    (tmp_path / "other").mkdir()
    other = write_random_eva(tmp_path / "other", seed=8)
    model, cfg = build([*SMALL, *STAGE2, "--init-from", s1, "--vision-weights", other])
    assert cfg.vision_weights == other
    want = torch.load(other, weights_only=True)["patch_embed.proj.weight"]
    assert torch.equal(model.visual_encoder.conv1.weight, want)
    seeded = stage1_checkpoint(tmp_path / "seeded.pt", tiny)
    model, cfg = build([*SMALL, *STAGE2, "--init-from", seeded, "--vision-seed", "3"])
    torch.manual_seed(3)                         # a random encoder is its seed's (BLIP2.__init__)
    want = blip2_train.image_encoder(blip2_train.Config(**MODEL)).conv1.weight
    assert cfg.vision_seed == 3 and torch.equal(model.visual_encoder.conv1.weight, want)
    # a retrieval folder at a paper preset's caption recipe: 364 px, not the folder's 28
    vision, qformer, extra = hf_config(_Tok)
    vision.image_size, vision.patch_size = 28, 14
    folder = str(tmp_path / "itm")
    config = Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), **extra)
    randomise(Blip2ForImageTextRetrieval(config), 4).save_pretrained(folder)
    model, cfg = build(["--preset", "vit-g-opt2.7b", "--task", "caption", "--init-from", folder])
    assert cfg.image_size == 364
    assert model.visual_encoder.positional_embedding.shape[0] == 26 * 26 + 1


def write_vqa_subset(tiny, out, n=12):
    with open(os.path.join(tiny, "vqa_val_questions.json")) as f:
        questions = json.load(f)
    with open(os.path.join(tiny, "vqa_val_annotations.json")) as f:
        annotations = json.load(f)
    questions["questions"] = [dict(q, image=os.path.join(tiny, q["image"])) for q in questions["questions"][:n]]
    keep = {q["question_id"] for q in questions["questions"]}
    annotations["annotations"] = [a for a in annotations["annotations"] if a["question_id"] in keep]
    (out / "q.json").write_text(json.dumps(questions))
    (out / "a.json").write_text(json.dumps(annotations))
    return ["--val-data", str(out / "q.json"), "--val-answers", str(out / "a.json")]


def test_stage1_stage2_caption_vqa_under_torchrun_with_exact_resume(tmp_path, subset, tiny):  # noqa: F811
    """torchrun x2: stage 1, then stage 2 from its checkpoint (the Q-Former's text parts dropped),
    stopped by SIGTERM and resumed with every step's loss equal to an uninterrupted run; caption
    fine-tuning from that (the encoder trains and is saved); zero-shot VQA on VQAv2-format files."""
    s1 = str(tmp_path / "s1")
    run_ok([*SMALL, *data_args(subset), "--max-steps", "4", "--output-dir", s1])
    args = [*SMALL, *data_args(subset), *STAGE2, "--init-from", os.path.join(s1, "checkpoint_last.pt"),
            "--max-steps", "8", "--dropout", "0.1"]
    ref = str(tmp_path / "ref")
    final = json.loads(run_ok([*args, "--output-dir", ref]).stdout.strip().splitlines()[-1])
    assert {"bleu4", "cider", "meteor", "rouge_l"} <= set(final)
    out = str(tmp_path / "stopped")
    stdout = sigterm_mid_run("blip2_train.py", args, out, 3, tmp_path / "stdout.txt")
    last = max(train_losses(out))
    assert 3 <= last < 8 and f"stopped after step {last}" in stdout, stdout[-3000:]
    ckpt = torch.load(os.path.join(out, "checkpoint_last.pt"), weights_only=True)
    keys = set(ckpt["model"])
    assert "language_projection.weight" in keys and not any(k.startswith("visual_encoder.") for k in keys)
    assert any(k.startswith("language_model.") for k in keys)         # the tiny random LM trains: it is saved
    assert not any(k.startswith(("qformer.word_embeddings", "itm_head", "lm_head", "temp")) for k in keys)
    assert not any(".intermediate." in k for k in keys)                # text FFNs dropped, query FFNs kept
    second = run_ok([*args, "--output-dir", out, "--resume", "auto"])
    want = {r["step"]: r for r in read_metrics(ref) if r["split"] == "train"}
    got = {r["step"]: r for r in read_metrics(out) if r["split"] == "train"}
    assert sorted(got) == list(range(1, 9))
    for step in range(1, 9):
        assert abs(got[step]["loss_lm"] - want[step]["loss_lm"]) < 1e-5, (step, got[step], want[step])
    assert json.loads(second.stdout.strip().splitlines()[-1])["cider"] == pytest.approx(final["cider"], abs=1e-6)
    # caption fine-tuning (the encoder trains, in fp32, and is saved), with its prompt
    cap = str(tmp_path / "caption")
    run_ok([*SMALL, *data_args(subset), *STAGE2, "--task", "caption", "--no-freeze-vision", "--prompt", "a photo of ",
            "--init-from", os.path.join(out, "checkpoint_last.pt"), "--max-steps", "3", "--output-dir", cap])
    ckpt = torch.load(os.path.join(cap, "checkpoint_last.pt"), weights_only=True)
    assert any(k.startswith("visual_encoder.") for k in ckpt["model"])
    with open(os.path.join(cap, "captions.json")) as f:
        assert len(json.load(f)) == 20
    # zero-shot VQA of the fine-tuned model
    vqa = str(tmp_path / "vqa")
    proc = run_ok([*STAGE2, "--task", "vqa", "--eval-only", *write_vqa_subset(tiny, tmp_path),
                   "--init-from", os.path.join(cap, "checkpoint_last.pt"), "--output-dir", vqa, "--workers", "0"])
    metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 0 <= metrics["vqa_acc"] <= 100
    with open(os.path.join(vqa, "vqa_answers.json")) as f:
        answers = json.load(f)
    assert len(answers) == 12 and {"question_id", "answer"} <= set(answers[0])


def test_bad_stage2_input_is_a_clear_error(tmp_path, subset, tiny):  # noqa: F811
    from common.utils import MissingFileError, UserError
    out = str(tmp_path / "bad")
    with pytest.raises(UserError, match="--task vqa evaluates zero-shot VQA: add --eval-only"):
        blip2_train.main([*SMALL, *STAGE2, "--task", "vqa", "--output-dir", out])
    with pytest.raises(UserError, match="--preset vit-g-opt2.7b: pass --llm"):
        blip2_train.main(["--preset", "vit-g-opt2.7b", "--output-dir", out])
    vqa = write_vqa_subset(tiny, tmp_path)
    answers = json.loads((tmp_path / "a.json").read_text())
    lost = answers["annotations"].pop(3)["question_id"]
    (tmp_path / "a.json").write_text(json.dumps(answers))
    with pytest.raises(UserError, match=f"question {lost} has no annotation in"):
        blip2_train.main([*SMALL, *STAGE2, "--task", "vqa", "--eval-only", *vqa, "--output-dir", out])
    with pytest.raises(UserError, match="pass --val-answers"):
        blip2_train.main([*SMALL, *STAGE2, "--task", "vqa", "--eval-only", *vqa[:2], "--output-dir", out])
    questions = json.loads((tmp_path / "q.json").read_text())
    questions["questions"][1]["image"] = "no/such.png"
    (tmp_path / "q.json").write_text(json.dumps(questions))
    with pytest.raises(MissingFileError, match="no/such.png does not exist"):
        blip2_train.main([*SMALL, *STAGE2, "--task", "vqa", "--eval-only", *vqa, "--output-dir", out])
    with pytest.raises(MissingFileError, match="--llm no/such: no config.json"):
        blip2_train.main([*SMALL, *STAGE2, *data_args(subset), "--llm", "no/such", "--output-dir", out])


def blind_vqa_accuracy(tiny):
    """What answering from the question alone can reach: each val question answered with the most
    frequent training answer to the same question text (the language prior a model without the
    image could learn)."""
    from collections import Counter, defaultdict
    from common.metrics import vqa_accuracy

    def load(split):
        with open(os.path.join(tiny, f"vqa_{split}_questions.json")) as f:
            questions = json.load(f)["questions"]
        with open(os.path.join(tiny, f"vqa_{split}_annotations.json")) as f:
            answers = {a["question_id"]: [x["answer"] for x in a["answers"]] for a in json.load(f)["annotations"]}
        return [(q["question"], answers[q["question_id"]]) for q in questions]
    prior = defaultdict(Counter)
    for question, answers in load("train"):
        prior[question][answers[0]] += 1
    val = load("val")
    return 100 * sum(vqa_accuracy(prior[q].most_common(1)[0][0] if q in prior else "", a) for q, a in val) / len(val)


def test_stage2_learns_captions_and_vqa_far_above_the_untrained_and_the_blind_model(tmp_path, tiny):
    """The default tiny stage-2 run (one epoch, 656 steps, ~1.3 min on 2 cores): captions and VQA
    answers far above the untrained model and above what the question alone gives (the blind
    prior, 26.2 %). Measured: CIDEr 2.35, BLEU-4 0.54, VQA 49.3 %; untrained CIDEr 0.0, VQA 0.0 %.
    With the queries zeroed (the LM never sees the image) CIDEr is 0.40 and VQA 26.5 % at 400 steps;
    with the LM's targets not shifted (each token predicting itself) CIDEr is 0.0: each fails an
    assertion below (controls run by hand with a patched script; see the README)."""
    untrained = blip2_train.main(["--stage", "2", "--eval-only", "--workers", "0", "--output-dir", str(tmp_path / "u")])
    assert untrained["cider"] < 0.3 and untrained["vqa_acc"] < 10, untrained
    m = blip2_train.main(["--stage", "2", "--workers", "0", "--output-dir", str(tmp_path / "t")])
    blind = blind_vqa_accuracy(tiny)
    assert 20 < blind < 30
    assert m["cider"] > 1.5 and m["bleu4"] > 0.3, m
    assert m["vqa_acc"] > blind + 12, (m, blind)


def test_start_from_a_transformers_generation_folder(tmp_path, subset, llm_tok):  # noqa: F811
    """The README's command lines on a Blip2ForConditionalGeneration folder (tiny, with the tiny LM
    tokenizer saved in it): --eval-only captions from it; caption fine-tuning from it keeps the LM
    frozen and out of the checkpoint, which records the folder and the LM's fingerprint; an
    --init-from of that checkpoint rebuilds the LM from the folder and gives the same captions; an
    LM whose weights differ from the recorded fingerprint is refused."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration
    from common.utils import UserError
    from tests.test_blip2 import hf_config, randomise
    from tests.test_blip2_stage2 import _Tok, opt_config
    vision, qformer, extra = hf_config(_Tok, text=False)
    text = opt_config()
    text.vocab_size, text.pad_token_id, text.bos_token_id, text.eos_token_id = (
        len(llm_tok) + 1, llm_tok.pad_token_id, llm_tok.bos_token_id, llm_tok.eos_token_id)
    config = Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
                         image_token_index=len(llm_tok), **extra)
    folder = str(tmp_path / "blip2-opt")
    randomise(Blip2ForConditionalGeneration(config), 5).save_pretrained(folder)
    llm_tok.save_pretrained(folder)
    common = ["--stage", "2", "--workers", "0", "--batch-size", "4", "--max-gen-length", "5", "--num-beams", "2"]
    first = blip2_train.main([*common, "--eval-only", "--init-from", folder, "--val-data", subset[3],
                              "--output-dir", str(tmp_path / "ev")])
    assert "cider" in first
    ft = str(tmp_path / "ft")
    blip2_train.main([*common, "--task", "caption", "--prompt", "a photo of ", "--init-from", folder,
                      "--train-data", subset[1], "--val-data", subset[3], "--max-steps", "2", "--output-dir", ft])
    ckpt = torch.load(os.path.join(ft, "checkpoint_last.pt"), weights_only=True)
    assert ckpt["config"]["llm"] == folder and ckpt["llm_fingerprint"]
    assert not any(k.startswith(("language_model.", "visual_encoder.")) for k in ckpt["model"])
    with open(os.path.join(ft, "captions.json")) as f:
        tuned = [c["caption"] for c in json.load(f)]
    again = str(tmp_path / "again")
    blip2_train.main([*common, "--task", "caption", "--prompt", "a photo of ", "--eval-only", "--val-data", subset[3],
                      "--init-from", os.path.join(ft, "checkpoint_last.pt"), "--output-dir", again])
    with open(os.path.join(again, "captions.json")) as f:
        assert [c["caption"] for c in json.load(f)] == tuned
    ckpt["llm_fingerprint"] *= 1.01
    torch.save(ckpt, tmp_path / "other.pt")
    with pytest.raises(UserError, match="language model rebuilt from .* is not the one"):
        blip2_train.main([*common, "--eval-only", "--val-data", subset[3], "--init-from", str(tmp_path / "other.pt"),
                          "--output-dir", again])
