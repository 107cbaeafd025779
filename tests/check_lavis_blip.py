"""Second numerical reference for BLIP's losses: Salesforce LAVIS 1.0.2's BlipPretrain and our
BLIP on the same weights and token ids, with hard negatives pinned to the argmax (the peer's
deterministic_negatives), at step 0 (alpha 0). Not collected by pytest; runs in LAVIS's venv:

    bash ../shared/peers/lavis/setup.sh
    ~/.cache/lavis-peer/venv/bin/python tests/check_lavis_blip.py

Prints both sets of losses and exits non-zero when any differs by more than 1e-5."""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAVIS_DIR = os.path.join(ROOT, "..", "shared", "peers", "lavis")
sys.path.insert(0, LAVIS_DIR)
import lavis_tiny_common as C  # noqa: E402  (first: stubs spacy, offline env)
from run_blip import TINY, build  # noqa: E402

sys.path.insert(0, ROOT)
import blip_train  # noqa: E402
from common.encoders import hf_bert_lm_head_map, hf_bert_map, load_mapped  # noqa: E402


def vit_map(ours, theirs, layers):
    """LAVIS's timm-style VisionTransformerEncoder -> our VisionTransformer."""
    m = {f"{ours}.conv1.weight": f"{theirs}.patch_embed.proj.weight", f"{ours}.conv1.bias": f"{theirs}.patch_embed.proj.bias",
         f"{ours}.class_embedding": f"{theirs}.cls_token", f"{ours}.positional_embedding": f"{theirs}.pos_embed"}
    for p in ("weight", "bias"):
        m[f"{ours}.ln_post.{p}"] = f"{theirs}.norm.{p}"
        for i in range(layers):
            o, t = f"{ours}.transformer.resblocks.{i}", f"{theirs}.blocks.{i}"
            for a, b in (("ln_1", "norm1"), ("attn.qkv", "attn.qkv"), ("attn.proj", "attn.proj"), ("ln_2", "norm2"),
                         ("mlp.fc", "mlp.fc1"), ("mlp.proj", "mlp.fc2")):
                m[f"{o}.{a}.{p}"] = f"{t}.{b}.{p}"
    return m


def main():
    torch.set_num_threads(1)
    lavis, batch = build(batch_size=8, image_size=32, seed=0, dropout=0.0)
    tok = lavis.tokenizer
    with torch.no_grad():  # our LM head is tied to the word embeddings; give LAVIS's the same values
        lavis.text_decoder.cls.predictions.decoder.weight.copy_(lavis.text_encoder.embeddings.word_embeddings.weight)
    v, b = TINY["vit"], TINY["bert"]
    cfg = blip_train.Config(image_size=32, patch_size=v["patch_size"], vision_width=v["embed_dim"],
                            vision_layers=v["depth"], vision_heads=v["num_heads"], text_width=b["hidden_size"],
                            text_layers=b["num_hidden_layers"], text_heads=b["num_attention_heads"],
                            text_mlp_dim=b["intermediate_size"], max_positions=b["max_position_embeddings"],
                            embed_dim=TINY["embed_dim"], queue_size=TINY["queue_size"], max_length=TINY["max_txt_len"],
                            vocab_size=len(tok), momentum=TINY["momentum"], alpha=TINY["alpha"])
    ours = blip_train.BLIP(cfg, cls_id=tok.cls_token_id, enc_id=tok.enc_token_id, dec_id=tok.bos_token_id,
                           sep_id=tok.sep_token_id, pad_id=tok.pad_token_id)
    L = cfg.text_layers
    mapping = {**vit_map("visual_encoder", "visual_encoder", cfg.vision_layers),
               **vit_map("visual_encoder_m", "visual_encoder_m", cfg.vision_layers),
               **hf_bert_map("text_encoder", "text_encoder", L, cross_layers=range(L), token_types=False),
               **hf_bert_map("text_encoder_m", "text_encoder_m", L, cross_layers=range(L), token_types=False),
               **hf_bert_map("text_decoder", "text_decoder.bert", L, cross_layers=range(L), token_types=False),
               **hf_bert_lm_head_map("lm_head", "text_decoder.cls.predictions")}
    for name in ("vision_proj", "text_proj", "itm_head", "vision_proj_m", "text_proj_m"):
        mapping.update({f"{name}.{p}": f"{name}.{p}" for p in ("weight", "bias")})
    mapping.update({k: k for k in ("temp", "image_queue", "text_queue", "queue_ptr")})
    load_mapped(ours, lavis.state_dict(), mapping, source="LAVIS BlipPretrain", keep_init=("idx_queue",),
                ignore=("position_ids", "text_decoder.cls.predictions.decoder.bias"))
    enc = C.tokenize(lavis, batch)
    with C.deterministic_negatives():
        ref = lavis(batch)
        got = ours(batch["image"], enc.input_ids, enc.attention_mask, torch.arange(8), alpha=0.0, task="pretrain")
    bad = 0
    for k in ("loss_itc", "loss_itm", "loss_lm"):
        a, b_ = float(got[k]), float(getattr(ref, k))
        bad += abs(a - b_) > 1e-5
        print(f"{k}: ours {a:.8f}  LAVIS {b_:.8f}  diff {abs(a - b_):.2e}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
