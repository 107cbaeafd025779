"""albef_train.py --export in LAVIS: the exported model.pth (the official layout) loaded into
Salesforce LAVIS 1.0.2's AlbefPretrain with LAVIS's own BaseModel.load_checkpoint, and its losses
on a batch against our model on the checkpoint the export came from. Not collected by pytest; runs
in LAVIS's environment (.ci/run):

    bash tests/lavis/setup.sh
    ~/.cache/blip-lavis-peer/venv/bin/python tests/lavis/check_albef_export.py [EXPORT_DIR CHECKPOINT]

Without arguments it makes its own tiny run (2 steps, a full queue of 16, --type-vocab-size 0) and
export with the project's Python (.venv/bin/python, or $PROJECT_PYTHON): our tokenizer is read by
transformers 5, which LAVIS's environment does not have; our model itself imports here.

LAVIS's AlbefPretrain is built from what the folder says, not from our run: its BERT from the
exported config.json through BertConfig.from_json_file, as LAVIS's from_config reads
med_config_albef.json (LAVIS then fixes fusion_layer at 6, bert-base's: the file's is kept), its
ViT, embed_dim, queue, temperature, momentum, alpha and masking probability from config.yaml
(what VisionTransformerEncoder.from_config fixes for ViT-B/16: the file's sizes, its LayerNorm
epsilon as vit_layer_norm_epsilon), with the exported tokenizer.json as its tokenizer. So a wrong
size, epsilon or setting in either file fails the load, the settings or the losses. load_checkpoint is strict=False:
the check requires that LAVIS misses no key and lists exactly the keys it does not hold (the
token-type matrices: LAVIS's BERT has none; the run has none either, so the file's are zeros).
Two things are aligned as in check_albef.py: the masked positions (ours drawn once, given to
LAVIS) and the ITM hard negatives (the argmax on both sides). LAVIS, as the official code, updates
the momentum model at the start of forward, we right after each step: our model gets that one
more EMA update before its forward, so that both see the same momentum weights.

Exits non-zero when a key does not load as stated, a setting of the model built from the folder
(LayerNorm epsilons, queue, momentum, alpha, ...) is not the run's or a loss differs by more than
1e-5."""
import json
import os
import random
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
import albef_train  # noqa: E402
from tests.lavis import peer  # noqa: E402

RUN = ["--max-steps", "2", "--workers", "0", "--batch-size", "8", "--queue-size", "16",
       "--type-vocab-size", "0"]


def tiny_export(out):
    """(export folder, checkpoint) of a tiny run in `out`, made with the project's Python."""
    python = os.environ.get("PROJECT_PYTHON") or os.path.join(ROOT, ".venv", "bin", "python")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for args in (RUN + ["--output-dir", f"{out}/run"],
                 ["--init-from", f"{out}/run/checkpoint_last.pt", "--export", f"{out}/export"]):
        subprocess.run([python, "albef_train.py", *args], cwd=ROOT, env=env, check=True,
                       stdout=subprocess.DEVNULL)
    return f"{out}/export", f"{out}/run/checkpoint_last.pt"


def lavis_tokenizer(folder):
    """Our exported tokenizer as LAVIS's transformers (4.26) reads it: tokenizer.json, whose
    post-processor puts [CLS] ... [SEP] around every text, and the special tokens and length
    (LAVIS's max_txt_len) of its config."""
    from transformers import PreTrainedTokenizerFast
    with open(os.path.join(folder, "tokenizer_config.json")) as f:
        config = json.load(f)
    special = {k: config[k] for k in ("pad_token", "cls_token", "sep_token", "mask_token",
                                      "unk_token", "model_max_length") if k in config}
    return PreTrainedTokenizerFast(tokenizer_file=os.path.join(folder, "tokenizer.json"), **special)


def lavis_model(folder, tok):
    """AlbefPretrain as the folder's config.json and config.yaml describe it."""
    from functools import partial

    import yaml
    from lavis.models.albef_models.albef_pretrain import AlbefPretrain
    from lavis.models.med import BertConfig, BertForMaskedLM
    from lavis.models.vit import VisionTransformerEncoder
    med = BertConfig.from_json_file(os.path.join(folder, "config.json"))   # as from_config does
    with open(os.path.join(folder, "config.yaml")) as f:
        y = yaml.safe_load(f)
    assert y["bert_config"] == "config.json"
    vit = VisionTransformerEncoder(img_size=y["image_res"], patch_size=y["patch_size"],
                                   embed_dim=y["vision_width"], depth=y["vision_layers"],
                                   num_heads=y["vision_heads"],
                                   mlp_ratio=y["vision_mlp_dim"] / y["vision_width"],
                                   norm_layer=partial(torch.nn.LayerNorm, eps=y["vision_eps"]))
    vit.vision_width = y["vision_width"]       # set by VisionTransformerEncoder.from_config
    torch.manual_seed(0)
    cls = type("ExportedAlbefPretrain", (AlbefPretrain,),
               {"init_tokenizer": classmethod(lambda c: tok)})
    return cls(image_encoder=vit, text_encoder=BertForMaskedLM(config=med), queue_size=y["queue_size"],
               embed_dim=y["embed_dim"], mlm_mask_prob=y["mlm_probability"], temp=y["temp"],
               momentum=y["momentum"], alpha=y["alpha"], max_txt_len=tok.model_max_length), y


def check(folder, ckpt_path):
    """Loads the export into LAVIS and compares the losses; True when all is as stated."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    cfg = albef_train.Config(**ckpt["config"])
    peer.import_lavis()
    tok = lavis_tokenizer(folder)
    lavis, y = lavis_model(folder, tok)
    msg = lavis.load_checkpoint(os.path.join(folder, "model.pth"))          # LAVIS's own loader
    print(f"LAVIS load_checkpoint: missing {msg.missing_keys}, not held {msg.unexpected_keys}")
    bad = bool(msg.missing_keys)
    # what the losses cannot tell apart (a LayerNorm epsilon of 1e-5 for 1e-12 moves them by
    # ~5e-6; the temperature is the file's parameter; the masks are given): the run's, exactly
    eps = {name: {m.eps for m in part.modules() if isinstance(m, torch.nn.LayerNorm)}
           for name, part in (("vision", lavis.visual_encoder), ("text", lavis.text_encoder))}
    built = dict(vision_eps=eps["vision"], text_eps=eps["text"], queue_size=lavis.queue_size,
                 momentum=lavis.momentum, alpha=lavis.alpha, mlm_probability=lavis.mlm_probability,
                 temp=y["temp"], max_length=lavis.max_txt_len)
    for k, v in built.items():
        run = {getattr(cfg, k)} if isinstance(v, set) else getattr(cfg, k)
        if v != run:
            bad = True
            print(f"LAVIS's model from the folder has {k} {v}, the run {run}")
    if cfg.type_vocab_size == 0:
        expected = [f"text_encoder{s}.bert.embeddings.token_type_embeddings.weight" for s in ("", "_m")]
        bad |= sorted(msg.unexpected_keys) != expected
    ours = albef_train.ALBEF(cfg, mask_id=tok.mask_token_id, pad_id=tok.pad_token_id, cls_id=tok.cls_token_id)
    ours.load_state_dict(ckpt["model"])
    ours.queue_filled.fill_(True)      # the run's queue is full (and LAVIS's slots are all keys)
    assert bool(ckpt["model"]["queue_filled"].all()) and int(ckpt["model"]["queue_ptr"]) == 0

    B = 8
    rng = random.Random(0)
    words = sorted(w for w in tok.get_vocab() if not w.startswith("["))
    batch = {"image": torch.randn(B, 3, y["image_res"], y["image_res"], generator=torch.Generator().manual_seed(0)),
             "text_input": [" ".join(rng.choice(words) for _ in range(rng.randint(3, 8))) for _ in range(B)],
             "epoch": 0, "iters": 50, "num_iters_per_epoch": 100}
    # LAVIS's forward ramps up its own alpha (config.yaml's); ours gets the run's
    alpha = cfg.alpha * lavis._rampup_factor(batch["epoch"], batch["iters"], batch["num_iters_per_epoch"])
    enc = peer.tokenize(lavis, batch)
    assert (enc.input_ids[:, 0] == tok.cls_token_id).all() and (enc.input_ids == tok.sep_token_id).sum() == B
    g = torch.Generator().manual_seed(1)
    masked, labels = albef_train.mask_tokens(enc.input_ids, cfg.mlm_probability, tok.mask_token_id, len(tok),
                                             never=(tok.pad_token_id, tok.cls_token_id), generator=g)
    assert (labels != -100).sum() > 0
    albef_train.mask_tokens = lambda *args, **kwargs: (masked.clone(), labels.clone())
    lavis.mask = lambda input_ids, vocab_size, device, targets=None, probability_matrix=None: (masked.clone(),
                                                                                                labels.clone())
    albef_train.sample_negatives = lambda weights: weights.argmax(1)
    ours.momentum_update()             # LAVIS's forward starts with this update (_momentum_update)
    with peer.deterministic_negatives(), torch.no_grad():
        ref = lavis(batch)
        got = ours(batch["image"], enc.input_ids, enc.attention_mask, torch.arange(B), alpha=torch.tensor(alpha),
                   task="pretrain")
    print(f"alpha {alpha}, {int((labels != -100).sum())} masked tokens")
    for k in ("loss_itc", "loss_itm", "loss_mlm"):
        a, b_ = float(got[k]), float(getattr(ref, k))
        bad |= abs(a - b_) > 1e-5
        print(f"{k}: ours {a:.8f}  LAVIS {b_:.8f}  diff {abs(a - b_):.2e}")
    return not bad


def main():
    torch.set_num_threads(1)
    if len(sys.argv) > 2:
        ok = check(*sys.argv[1:3])
    else:
        with tempfile.TemporaryDirectory(prefix="albef-export-") as out:
            ok = check(*tiny_export(out))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
