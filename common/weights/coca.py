"""CoCa weights from other projects: open_clip's published CoCa files (`coca_ViT-B-32`,
`coca_ViT-L-14`: `open_clip_pytorch_model.bin` or `open_clip_model.safetensors`, alone or in a hub
folder with its `open_clip_config.json`), the architecture they imply, their key map onto our
modules (both ways), the --init-from dispatch between such a file and one of our checkpoints, and
--export to an open_clip CoCa folder."""
import json
import math
import os

import torch

from ..encoders import (blocks_map, load_mapped, open_clip_blocks_map,
                        open_clip_cross_attention_map, open_clip_vision_map, read_weights_file,
                        split_mha_in_proj)
from .. import dist
from ..data import CLIP_MEAN, CLIP_STD, TOKENIZER_FILES
from ..export import (export_state, model_card, new_folder, save_json, save_safetensors,
                      save_tokenizer)
from ..utils import MissingFileError, UserError, load_checkpoint

OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
OPEN_CLIP_CONFIG = "open_clip_config.json"
# CLIP's BPE, which every open_clip CoCa uses (its files name no tokenizer)
OPEN_CLIP_TOKENIZER = "openai/clip-vit-base-patch32"


def read_open_clip_state(path, saved=None):
    """open_clip's state dict from a file or a hub folder (safetensors first, as open_clip), its
    {'state_dict': ...} wrapper and `module.` prefixes (DDP-saved files) removed. `saved`: the
    file's contents when already loaded."""
    if os.path.isdir(path):
        files = [os.path.join(path, f) for f in OPEN_CLIP_FILES
                 if os.path.isfile(os.path.join(path, f))]
        if not files:
            raise MissingFileError(f"{path}: no {' or '.join(OPEN_CLIP_FILES)}")
        path = files[0]
    if saved is None:
        saved = read_weights_file(path)[0]
    if isinstance(saved, dict) and isinstance(saved.get("state_dict"), dict):
        saved = saved["state_dict"]
    if not isinstance(saved, dict) or not all(torch.is_tensor(v) for v in saved.values()):
        raise UserError(f"{path}: not a flat state dict of tensors (open_clip's weights file)")
    return {k.removeprefix("module."): v for k, v in saved.items()}


def _config_heads(model_cfg, file, vision_width):
    """Heads, widths and the activation an open_clip model config (its JSON) names."""
    model_cfg = model_cfg.get("model_cfg", model_cfg)          # hub open_clip_config.json wraps it
    v, t = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
    mm = model_cfg.get("multimodal_cfg", {})
    heads = {"vision_heads": v.get("width", vision_width) // v.get("head_width", 64),
             "text_heads": t.get("heads", 8), "pooler_heads": v.get("attn_pooler_heads", 8)}
    if mm and mm.get("heads", 8) != heads["text_heads"]:
        raise UserError(f"{file}: multimodal heads {mm.get('heads', 8)} differ from text heads "
                        f"{heads['text_heads']}: not supported")
    read = {"vision_width": v.get("width"), "text_width": t.get("width"),
            "embed_dim": model_cfg.get("embed_dim"), "patch_size": v.get("patch_size")}
    if model_cfg.get("quick_gelu"):
        heads["act"] = "quick_gelu"
    return heads, {k: x for k, x in read.items() if x is not None}


def open_clip_architecture(state, config, path, presets):
    """The model's Config fields for open_clip weights (all but pad_id and cls_mask): widths,
    depths, lengths and sizes from the tensors' shapes; heads (and the activation) from `config`:
    a name in `presets` (the script's), an open_clip model config JSON (or a hub
    `open_clip_config.json`), or None: the folder's `open_clip_config.json`, else open_clip's
    default heads (width / 64, 8 in the pooler). A config that disagrees with the weights is an
    error naming the field."""
    if any(k.startswith("visual.attn_pool_contrastive.") for k in state):
        raise UserError(f"{path}: open_clip's 'parallel'/'cascade' poolers (unfinished upstream) "
                        f"are not supported; only the default single pooler")
    for key in ("visual.conv1.weight", "visual.attn_pool.query", "text.token_embedding.weight",
                "text.cls_emb", "text_decoder.text_projection"):
        if key not in state:
            raise UserError(f"{path}: no '{key}': not open_clip CoCa weights "
                            f"(keys start {sorted(state)[:3]})")

    def depth(prefix):
        return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})

    conv = state["visual.conv1.weight"]
    grid = math.isqrt(state["visual.positional_embedding"].shape[0] - 1)
    text_width = state["text.cls_emb"].shape[0]
    arch = dict(image_size=grid * conv.shape[-1], patch_size=conv.shape[-1],
                vision_width=conv.shape[0], vision_layers=depth("visual.transformer.resblocks."),
                pooler="open_clip",
                n_queries=state["visual.attn_pool.query"].shape[0], text_width=text_width,
                text_layers=depth("text.transformer.resblocks."),
                decoder_layers=depth("text_decoder.resblocks."),
                context_length=state["text.positional_embedding"].shape[0] - 1,
                vocab_size=state["text.token_embedding.weight"].shape[0],
                embed_dim=state["visual.proj"].shape[1],
                mlp_ratio=state["text.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
                / text_width,
                act="gelu", layer_norm_eps=1e-5)
    # open_clip's defaults where no config names the heads: width / 64 (head_width), 8 in the pooler
    arch.update(vision_heads=max(1, arch["vision_width"] // 64),
                text_heads=max(1, text_width // 64), pooler_heads=8)
    file = None
    if config in presets and config != "tiny":
        heads = {k: presets[config][k] for k in ("vision_heads", "text_heads", "pooler_heads")}
        read = {k: presets[config][k] for k in ("vision_width", "text_width", "embed_dim",
                                                "patch_size") if k in presets[config]}
    else:
        folder_file = os.path.join(path, "open_clip_config.json") if os.path.isdir(path) else None
        file = config or folder_file
        if config and not os.path.isfile(config):
            raise UserError(f"open_clip config {config!r} is neither a preset "
                            f"({', '.join(presets)}) nor a file")
        heads, read = {}, {}
        if file and os.path.isfile(file):
            with open(file) as f:
                heads, read = _config_heads(json.load(f), file, arch["vision_width"])
    for k, x in read.items():
        if arch[k] != x:
            raise UserError(f"{path}: the weights have {k} {arch[k]}, the config {config or file} "
                            f"says {x}")
    arch.update(heads)
    return arch


def open_clip_map(cfg):
    """Our CoCa's keys -> open_clip's, both ways (load_open_clip, export). open_clip keeps the
    pooler's and the cross-attention's q/k/v in one nn.MultiheadAttention in-projection: named
    here `in_proj[q]` / `in_proj[kv]` (split_mha_in_proj, merge_mha_in_proj)."""
    Lv, Lt, Ld = cfg.vision_layers, cfg.text_layers, cfg.decoder_layers
    m = {"logit_scale": "logit_scale", "proj": "visual.proj",
         "attn_pool.query": "visual.attn_pool.query", "cls_emb": "text.cls_emb",
         "text_projection": "text.text_projection",
         "text.token_embedding.weight": "text.token_embedding.weight",
         "text.positional_embedding": "text.positional_embedding",
         "text_decoder.text_projection": "text_decoder.text_projection",
         **open_clip_vision_map("visual", "visual", Lv),
         **open_clip_cross_attention_map("attn_pool", "visual.attn_pool.attn"),
         **open_clip_blocks_map("text.transformer", "text.transformer", Lt),
         **open_clip_blocks_map("text_decoder", "text_decoder", Ld)}
    for p in ("weight", "bias"):
        m.update({f"attn_pool.ln_q.{p}": f"visual.attn_pool.ln_q.{p}",
                  f"attn_pool.ln_k.{p}": f"visual.attn_pool.ln_k.{p}",
                  f"ln_post.{p}": f"visual.ln_post.{p}", f"text.ln_final.{p}": f"text.ln_final.{p}",
                  f"text_decoder.ln_final.{p}": f"text_decoder.ln_final.{p}"})
    # the decoder's cross-attention blocks
    m.update(blocks_map("text_decoder.cross_attn", "text_decoder.cross_attn.{}", Ld, {
        "ln_1": "ln_1", "ln_1_kv": "ln_1_kv", "attn.q": "attn.in_proj[q]",
        "attn.kv": "attn.in_proj[kv]", "attn.proj": "attn.out_proj", "ln_2": "ln_2",
        "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"}))
    return m


def _in_proj_prefixes(cfg):
    """open_clip's nn.MultiheadAttention modules whose q/k/v ours keeps as q and kv."""
    return ["visual.attn_pool.attn"] + [f"text_decoder.cross_attn.{i}.attn"
                                        for i in range(cfg.decoder_layers)]


def load_open_clip(model, state, path):
    """Every tensor of open_clip's state dict into `model` (built from open_clip_architecture),
    mapped and shape-checked; a missing or unused key is an error naming it. With unequal vision
    and pooler widths open_clip's file has separate q/k/v weights for the pooler."""
    cfg = model.cfg
    for prefix in _in_proj_prefixes(cfg):
        width = cfg.embed_dim if prefix.startswith("visual") else cfg.text_width
        state = split_mha_in_proj(state, prefix, width)
    load_mapped(model, state, open_clip_map(cfg), source=path)


# ---- --init-from ----

def read_init(path):
    """What --init-from names, read once: ("open_clip", its state dict), ("ours", our checkpoint),
    or (None, None) without one."""
    if not path:
        return None, None
    if os.path.isdir(path) or path.endswith(".safetensors"):
        return "open_clip", read_open_clip_state(path)
    saved = load_checkpoint(path)
    if isinstance(saved, dict) and "model" in saved and "config" in saved:
        return "ours", saved
    return "open_clip", read_open_clip_state(path, saved)


def init_tokenizer(init, path):
    """The tokenizer the --init-from source implies ("": none, or the folder's own files, such as
    an --export folder's, which load_tokenizer reads)."""
    kind, saved = init
    if kind == "open_clip" and os.path.isdir(path) and any(
            os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        return ""
    return {"ours": lambda: saved["config"]["tokenizer"], "open_clip": lambda: OPEN_CLIP_TOKENIZER,
            None: lambda: ""}[kind]()


def init_architecture(init, path, config, fields, presets):
    """The architecture `fields` the --init-from source fixes ({} without one). open_clip's
    weights: open_clip_architecture(...) and the CLS mask they were trained with (legacy); our
    checkpoint: its config's (its mask and padding id included)."""
    kind, saved = init
    if kind == "open_clip":
        return {**open_clip_architecture(saved, config, path, presets), "cls_mask": "legacy"}
    return {k: saved["config"][k] for k in fields} if kind == "ours" else {}


def load_init(model, init, path):
    """The --init-from weights into `model`, built at the source's architecture."""
    kind, saved = init
    if kind == "open_clip":
        load_open_clip(model, saved, path)
    elif kind == "ours":
        model.load_state_dict(saved["model"])


# ---- --export: an open_clip CoCa folder (open_clip_config.json + open_clip_model.safetensors) ----

TARGETS = ("open_clip",)


def merge_mha_in_proj(state, prefix):
    """The inverse of split_mha_in_proj: `in_proj[q]` and `in_proj[kv]` at `prefix` back into
    nn.MultiheadAttention's in_proj_weight, or q/k/v_proj_weight when the keys' width differs from
    the queries' (kdim != embed_dim), and one in_proj_bias."""
    q, kv = (state.pop(f"{prefix}.in_proj[{x}].weight") for x in ("q", "kv"))
    if q.shape[1] == kv.shape[1]:
        state[f"{prefix}.in_proj_weight"] = torch.cat([q, kv])
    else:
        k, v = kv.chunk(2)
        state.update({f"{prefix}.q_proj_weight": q, f"{prefix}.k_proj_weight": k,
                      f"{prefix}.v_proj_weight": v})
    state[f"{prefix}.in_proj_bias"] = torch.cat([state.pop(f"{prefix}.in_proj[{x}].bias")
                                                 for x in ("q", "kv")])
    return state


def is_clip_bpe(tokenizer, pad_id):
    """CLIP's BPE padded with id 0: open_clip's own SimpleTokenizer gives the same rows."""
    t = tokenizer.tok
    return (tokenizer.vocab_size == 49408 and pad_id == 0 and (t.convert_ids_to_tokens(
        tokenizer.bos_id), t.convert_ids_to_tokens(tokenizer.eos_id)) ==
        ("<|startoftext|>", "<|endoftext|>"))


def open_clip_config(cfg, tokenizer, clean):
    """open_clip 3.3's CoCa config of our model (open_clip_config.json: model_cfg, as its
    coca_ViT-B-32.json, and preprocess_cfg, our evaluation's). What open_clip cannot build is a
    one-line error naming the field. The text pooling is the appended CLS (embed_cls), whatever
    pool_type; patch dropout (training only) is not written."""
    for bad, why in [
            (cfg.cls_mask != "legacy", "--cls-mask correct: open_clip 3.3 builds only the legacy "
             "CLS mask (its text_cfg has no correct_cls_mask); train with --cls-mask legacy"),
            (cfg.pooler != "open_clip", "--pooler paper: open_clip's 'parallel' pooler (unfinished "
             "upstream) normalises the ViT tokens before pooling, ours after"),
            (cfg.act not in ("gelu", "quick_gelu"), f"--act {cfg.act}: open_clip builds gelu or "
             "quick_gelu"),
            (cfg.mlp_ratio != 4.0, f"--mlp-ratio {cfg.mlp_ratio}: open_clip builds its multimodal "
             "decoder with 4"),
            (cfg.layer_norm_eps != 1e-5, f"--layer-norm-eps {cfg.layer_norm_eps}: open_clip's "
             "pooler and multimodal decoder norms use 1e-5"),
            (cfg.embed_dim != cfg.text_width, f"--embed-dim {cfg.embed_dim} differs from "
             f"--text-width {cfg.text_width}: open_clip's decoder cross-attends at its own width")]:
        if bad:
            raise UserError(f"--export open_clip: {why}")
    text = dict(context_length=cfg.context_length, vocab_size=cfg.vocab_size, width=cfg.text_width,
                heads=cfg.text_heads, layers=cfg.text_layers, mlp_ratio=cfg.mlp_ratio,
                embed_cls=True, output_tokens=True, pad_id=cfg.pad_id, eos_id=tokenizer.eos_id)
    if clean != "lower" or not is_clip_bpe(tokenizer, cfg.pad_id):   # else its SimpleTokenizer
        text.update(hf_tokenizer_name=cfg.tokenizer if not os.path.exists(cfg.tokenizer) else ".",
                    tokenizer_kwargs={"clean": clean})
    model_cfg = {
        "embed_dim": cfg.embed_dim, "quick_gelu": cfg.act == "quick_gelu", "custom_text": True,
        "pad_id": cfg.pad_id,                                  # generate's padding
        "vision_cfg": dict(image_size=cfg.image_size, patch_size=cfg.patch_size,
                           width=cfg.vision_width, layers=cfg.vision_layers,
                           head_width=cfg.vision_width // cfg.vision_heads, mlp_ratio=cfg.mlp_ratio,
                           attentional_pool=True, attn_pooler_queries=cfg.n_queries,
                           attn_pooler_heads=cfg.pooler_heads, output_tokens=True),
        "text_cfg": text,
        "multimodal_cfg": dict(context_length=cfg.context_length, vocab_size=cfg.vocab_size,
                               width=cfg.text_width, heads=cfg.text_heads,
                               layers=cfg.decoder_layers, attn_pooler_heads=cfg.pooler_heads)}
    preprocess = {"size": cfg.image_size, "mean": list(CLIP_MEAN), "std": list(CLIP_STD),
                  "interpolation": "bicubic", "resize_mode": "shortest"}
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess}


def export_open_clip(model, cfg, tokenizer, folder, config):
    """open_clip_config.json (`config`), open_clip_model.safetensors (open_clip_map, the q/k/v
    merged back) and the tokenizer's files, padding with our padding id."""
    ours, mapping = model.state_dict(), open_clip_map(cfg)
    # open_clip's shapes are ours (the test loads the folder in open_clip, strictly)
    state = export_state(ours, mapping, {mapping[k]: v for k, v in ours.items()},
                         source="--export open_clip")
    for prefix in _in_proj_prefixes(cfg):
        merge_mha_in_proj(state, prefix)
    save_json(config, os.path.join(folder, OPEN_CLIP_CONFIG))
    save_safetensors(state, os.path.join(folder, OPEN_CLIP_FILES[0]))
    save_tokenizer(tokenizer, folder, cfg.context_length,
                   pad_token=tokenizer.tok.convert_ids_to_tokens(cfg.pad_id))


LOAD = """import open_clip
model, _, preprocess = open_clip.create_model_and_transforms("local-dir:{path}")
tokenizer = open_clip.get_tokenizer("local-dir:{path}")
image, text = preprocess(image).unsqueeze(0), tokenizer(["a photo of a cat"])
image_features, text_features = model.encode_image(image), model.encode_text(text)
# greedy captions (open_clip 3.3 turns generate off under transformers 5: open_clip#1129)
caption = model.generate(image, generation_type="top_k", top_k=1, seq_len={seq_len},
                         min_seq_len={min_len}, sot_token_id={sot}, eos_token_id={eos})"""


def export(model, cfg, tokenizer, source):
    """--export: the model as an open_clip CoCa folder with its tokenizer, our evaluation's
    preprocessing and a model card, loadable with open_clip's own calls."""
    saved = source["config"] or {}

    def run(key):                   # the run's setting (its checkpoint's), not the command line's
        return saved.get(key, getattr(cfg, key))
    config = open_clip_config(cfg, tokenizer, run("text_clean"))   # what open_clip cannot build
    pad_token = tokenizer.tok.pad_token_id
    differences = ["open_clip's generate ends a caption at the padding id as at EOT, and forces "
                   "EOT as its last token (at seq_len); ours stops at --max-gen-length without it",
                   "open_clip's default generation (6 beams in 3 groups, no diversity penalty, raw "
                   "logits summed) is not our beam search (log-probabilities, length-normalised)",
                   f"images not already {cfg.image_size} px: open_clip resizes the PIL image, our "
                   "evaluation the tensor (both bicubic, antialiased): 1-2 of 255 levels apart "
                   "at a few pixels"]
    if pad_token is not None and pad_token != cfg.pad_id:
        differences.append(f"padding id {cfg.pad_id} is a vocabulary token: in a caption holding "
                           "it, open_clip 3.3's legacy mask hides the position after it from every "
                           "row, ours (the published weights' mask) from the CLS only")
    with new_folder(cfg.export) as folder:
        export_open_clip(model.cpu().eval(), cfg, tokenizer, folder, config)
        load = LOAD.format(path=os.path.abspath(cfg.export), seq_len=run("max_gen_length") + 1,
                           min_len=run("min_gen_length"), sot=tokenizer.bos_id,
                           eos=tokenizer.eos_id)
        model_card(folder, title=f"CoCa {run('preset')} ({run('task')})", method="coca",
                   source=source,
                   target="an open_clip CoCa model", load=load, library="open_clip",
                   tags=("image-to-text", "zero-shot-image-classification"),
                   differences=differences)
    if dist.rank() == 0:
        print(f"exported open_clip to {cfg.export}", flush=True)
    return {"export": cfg.export, "format": "open_clip"}
