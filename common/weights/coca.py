"""CoCa weights from other projects: open_clip's published CoCa files (`coca_ViT-B-32`,
`coca_ViT-L-14`: `open_clip_pytorch_model.bin` or `open_clip_model.safetensors`, alone or in a hub
folder with its `open_clip_config.json`), the architecture they imply, their key map onto our
modules, and the --init-from dispatch between such a file and one of our checkpoints."""
import json
import math
import os

import torch

from ..encoders import (blocks_map, load_mapped, open_clip_blocks_map,
                        open_clip_cross_attention_map, open_clip_vision_map, read_weights_file,
                        split_mha_in_proj)
from ..utils import MissingFileError, UserError, load_checkpoint

OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
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


def load_open_clip(model, state, path):
    """Every tensor of open_clip's state dict into `model` (built from open_clip_architecture),
    mapped and shape-checked; a missing or unused key is an error naming it. open_clip keeps the
    pooler's and the cross-attention's q/k/v as one nn.MultiheadAttention in-projection (split
    here); with unequal vision and pooler widths its file has separate q/k/v weights."""
    cfg = model.cfg
    E, Lv, Lt, Ld = cfg.embed_dim, cfg.vision_layers, cfg.text_layers, cfg.decoder_layers
    state = split_mha_in_proj(state, "visual.attn_pool.attn", E)
    for i in range(Ld):
        state = split_mha_in_proj(state, f"text_decoder.cross_attn.{i}.attn", cfg.text_width)
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
    # the decoder's cross-attention blocks (their q / kv split by split_mha_in_proj above)
    m.update(blocks_map("text_decoder.cross_attn", "text_decoder.cross_attn.{}", Ld, {
        "ln_1": "ln_1", "ln_1_kv": "ln_1_kv", "attn.q": "attn.in_proj[q]",
        "attn.kv": "attn.in_proj[kv]", "attn.proj": "attn.out_proj", "ln_2": "ln_2",
        "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"}))
    load_mapped(model, state, m, source=path)


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


def init_tokenizer(init):
    """The tokenizer the --init-from source implies ("" without one)."""
    kind, saved = init
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
