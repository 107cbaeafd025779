"""CLIP weights from and to other projects: a transformers `CLIPModel` folder (openai/clip-vit-base-
patch32 saved with save_pretrained, or any of the hub's CLIP checkpoints) and an open_clip folder
(`open_clip_config.json` + `open_clip_model.safetensors`, as open_clip's hub uploads), the
--init-from dispatch between those and our checkpoints, and --export to either."""
import json
import os

import torch

from ..data import CLIP_MEAN, CLIP_STD
from ..encoders import (hf_clip_text_map, hf_clip_vision_map, load_mapped, open_clip_blocks_map,
                        open_clip_vision_map, read_hf_checkpoint, read_weights_file)
from .. import dist
from ..export import export_state, model_card, new_folder, save_json, save_safetensors, save_tokenizer
from ..utils import UserError
from . import read_hf_or_ours

OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS = "open_clip_config.json", "open_clip_model.safetensors"


def read_init(path):
    """("open_clip", None) for an open_clip folder; else a transformers folder or our checkpoint."""
    if path and os.path.isfile(os.path.join(path, OPEN_CLIP_CONFIG)):
        return "open_clip", None
    return read_hf_or_ours(path)


def hf_architecture(path):
    """The Config fields of a transformers CLIPModel folder (its config.json, with transformers'
    defaults for what it omits); an activation or a tower mismatch we do not build is an error."""
    from transformers import CLIPConfig
    hf = CLIPConfig.from_pretrained(path)
    v, t = hf.vision_config, hf.text_config
    for name, sub in (("vision", v), ("text", t)):
        if sub.hidden_act not in ("quick_gelu", "gelu"):
            raise UserError(f"{path}: {name} activation {sub.hidden_act!r} is not supported")
    if (v.intermediate_size / v.hidden_size != t.intermediate_size / t.hidden_size or v.hidden_act != t.hidden_act
            or v.layer_norm_eps != t.layer_norm_eps):
        raise UserError(f"{path}: vision and text towers differ in MLP ratio, activation or LayerNorm eps")
    # transformers pools at argmax(ids) when eos_token_id is the legacy value 2 (OpenAI's
    # checkpoints); OpenAI's EOT is the largest id, so that is the first EOS = vocab_size - 1.
    eos = t.vocab_size - 1 if t.eos_token_id == 2 else t.eos_token_id
    return dict(image_size=v.image_size, patch_size=v.patch_size, vision_width=v.hidden_size,
                vision_layers=v.num_hidden_layers, vision_heads=v.num_attention_heads,
                text_width=t.hidden_size, text_layers=t.num_hidden_layers, text_heads=t.num_attention_heads,
                context_length=t.max_position_embeddings, vocab_size=t.vocab_size, eos_id=eos,
                embed_dim=hf.projection_dim, mlp_ratio=v.intermediate_size / v.hidden_size,
                act=v.hidden_act, layer_norm_eps=v.layer_norm_eps)


def load_hf(model, path):
    """Every weight of the folder into `model` (built from hf_architecture(path)), mapped and
    shape-checked; a missing or unused key is an error naming it."""
    _, state = read_hf_checkpoint(path)
    # SigLIP's bias (--loss siglip) is not in a CLIPModel folder: it keeps its init, b = -10
    load_mapped(model, state, hf_map(model.cfg), source=path, ignore=("position_ids",),
                keep_init=("logit_bias",))


def hf_map(cfg):
    """Our CLIP's keys -> a transformers CLIPModel's (both ways: load_hf and export)."""
    return {"visual_projection.weight": "visual_projection.weight",
            "text_projection.weight": "text_projection.weight", "logit_scale": "logit_scale",
            **hf_clip_vision_map("visual", "vision_model", cfg.vision_layers),
            **hf_clip_text_map("text", "text_model", cfg.text_layers)}


# open_clip keeps the projections as (width, embed) matrices applied as x @ proj: ours transposed
OPEN_CLIP_TRANSPOSED = {"visual_projection.weight": "visual.proj", "text_projection.weight": "text_projection"}


def open_clip_map(cfg, bias):
    """Our CLIP's keys -> an open_clip CLIP's (text tower at the top level, as its built-in CLIP)."""
    m = {"visual.ln_post.weight": "visual.ln_post.weight", "visual.ln_post.bias": "visual.ln_post.bias",
         "text.token_embedding.weight": "token_embedding.weight",
         "text.positional_embedding": "positional_embedding", "text.ln_final.weight": "ln_final.weight",
         "text.ln_final.bias": "ln_final.bias", "logit_scale": "logit_scale", **OPEN_CLIP_TRANSPOSED,
         **open_clip_vision_map("visual", "visual", cfg.vision_layers),
         **open_clip_blocks_map("text.transformer", "transformer", cfg.text_layers)}
    return {**m, "logit_bias": "logit_bias"} if bias else m


def open_clip_architecture(path):
    """The Config fields of an open_clip CLIP folder written by --export (its open_clip_config.json);
    a tower open_clip builds differently from ours is an error naming the field."""
    with open(os.path.join(path, OPEN_CLIP_CONFIG)) as f:
        mc = json.load(f).get("model_cfg", {})
    v, t = mc.get("vision_cfg", {}), mc.get("text_cfg", {})
    eps = {v.get("norm_kwargs", {}).get("eps", 1e-5), t.get("norm_kwargs", {}).get("eps", 1e-5)}
    for name, ok in (("text_cfg.pool_type", t.get("pool_type") == "eos"), ("one LayerNorm eps", len(eps) == 1),
                     ("vision_cfg.mlp_ratio = text_cfg.mlp_ratio",
                      v.get("mlp_ratio", 4.0) == t.get("mlp_ratio", 4.0)),
                     ("a plain ViT and text transformer", not any(
                         v.get(k) for k in ("timm_model_name", "attentional_pool", "ls_init_value", "no_ln_pre"))
                      and not t.get("hf_model_name") and not t.get("embed_cls"))):
            if not ok:
                raise UserError(f"{path}: {OPEN_CLIP_CONFIG} needs {name} for our CLIP")
    return dict(image_size=v["image_size"], patch_size=v["patch_size"], vision_width=v["width"],
                vision_layers=v["layers"], vision_heads=v["width"] // v.get("head_width", 64),
                text_width=t["width"], text_layers=t["layers"], text_heads=t["heads"],
                context_length=t["context_length"], vocab_size=t["vocab_size"], eos_id=t["eos_id"],
                embed_dim=mc["embed_dim"], mlp_ratio=v.get("mlp_ratio", 4.0),
                act="quick_gelu" if mc.get("quick_gelu") else "gelu", layer_norm_eps=eps.pop())


def load_open_clip(model, path):
    """Every weight of an open_clip folder into `model` (built from open_clip_architecture)."""
    _, state = read_weights_file(os.path.join(path, OPEN_CLIP_WEIGHTS))
    if "logit_bias" in state and model.logit_bias is None:
        raise UserError(f"{path} holds SigLIP's logit_bias: pass --loss siglip")
    state = {k: v.T if k in OPEN_CLIP_TRANSPOSED.values() else v for k, v in state.items()}
    load_mapped(model, state, open_clip_map(model.cfg, "logit_bias" in state), source=path,
                keep_init=("logit_bias",))


def init_architecture(init, path, fields):
    """The architecture `fields` that the --init-from source fixes ({} without one)."""
    kind, saved = init
    if kind in ("hf", "open_clip"):
        return (hf_architecture if kind == "hf" else open_clip_architecture)(path)
    return {k: saved["config"][k] for k in fields} if kind == "ours" else {}


def load_init(model, init, path):
    """The --init-from weights into `model`, built at the source's architecture."""
    kind, saved = init
    if kind == "hf":
        load_hf(model, path)
    elif kind == "open_clip":
        load_open_clip(model, path)
    elif kind == "ours":
        # one loss's weights may start another's run: SigLIP's bias is added (at its init) or left
        missing, unused = model.load_state_dict(saved["model"], strict=False)
        missing, unused = ([k for k in keys if k != "logit_bias"] for keys in (missing, unused))
        if missing or unused:
            raise UserError(f"{path}: keys missing {missing[:5]} or unused {unused[:5]}")
        if (model.logit_bias is None) != ("logit_bias" not in saved["model"]) and dist.rank() == 0:
            print(f"{path}: a {saved['config'].get('loss', 'clip')} checkpoint starts a "
                  f"--loss {model.cfg.loss} run: SigLIP's bias "
                  f"{'left out' if model.logit_bias is None else 'starts at -10'}", flush=True)


# ---- --export: a transformers CLIPModel folder (the default) or an open_clip folder ----

def check_exportable(cfg, tokenizer):
    """Both targets pool the text at the first EOS in the row, ours at the first after BOS."""
    if tokenizer.bos_id == cfg.eos_id:
        raise UserError(f"--export: the tokenizer's BOS is its EOS (id {cfg.eos_id}); transformers and "
                        "open_clip would pool the text at BOS")


def hf_config(cfg, tokenizer):
    """The transformers CLIPConfig of our architecture. Its text pooling takes the first
    eos_token_id, except for the legacy value 2 (argmax of the ids): refused."""
    from transformers import CLIPConfig
    if cfg.eos_id == 2:
        raise UserError("--export transformers: an EOS id of 2 makes CLIPModel pool at argmax(ids), not at EOS; "
                        "use --export-format open_clip")
    tower = dict(num_hidden_layers=0, hidden_act=cfg.act, layer_norm_eps=cfg.layer_norm_eps,
                 projection_dim=cfg.embed_dim)
    text = dict(tower, vocab_size=cfg.vocab_size, hidden_size=cfg.text_width,
                intermediate_size=int(cfg.text_width * cfg.mlp_ratio), num_hidden_layers=cfg.text_layers,
                num_attention_heads=cfg.text_heads, max_position_embeddings=cfg.context_length,
                bos_token_id=tokenizer.bos_id, eos_token_id=cfg.eos_id, pad_token_id=tokenizer.pad_id)
    vision = dict(tower, hidden_size=cfg.vision_width, intermediate_size=int(cfg.vision_width * cfg.mlp_ratio),
                  num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
                  image_size=cfg.image_size, patch_size=cfg.patch_size)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=cfg.embed_dim)
    config.architectures = ["CLIPModel"]
    return config


def export_hf(model, cfg, tokenizer, folder):
    """CLIPModel weights + config, and CLIPProcessor's files: our evaluation's preprocessing (short
    side resized bicubic to image_size, centre crop, OpenAI mean/std) and our tokenizer."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor
    config = hf_config(cfg, tokenizer)
    with torch.device("meta"):                                 # shapes only, nothing allocated
        target = CLIPModel(config).state_dict()
    state = export_state(model.state_dict(), hf_map(cfg), target, source="--export transformers",
                         skip=("position_ids",))
    config.save_pretrained(folder)
    save_safetensors(state, os.path.join(folder, "model.safetensors"))
    size = cfg.image_size
    images = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                resample=3, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    CLIPProcessor(image_processor=images, tokenizer=save_tokenizer(tokenizer, folder, cfg.context_length)
                  ).save_pretrained(folder)


def open_clip_config(cfg, tokenizer):
    """open_clip's model and preprocessing config of our architecture (a `local-dir:` / hub folder's
    open_clip_config.json). Its tokenizer is the folder's own (hf_tokenizer_name), with open_clip's
    clean-up of ours (--text-clean)."""
    if cfg.vision_width % cfg.vision_heads:
        raise UserError(f"--export open_clip: vision width {cfg.vision_width} is not a multiple of "
                        f"{cfg.vision_heads} heads")
    norm = {} if cfg.layer_norm_eps == 1e-5 else {"norm_kwargs": {"eps": cfg.layer_norm_eps}}
    name = cfg.tokenizer if not os.path.exists(cfg.tokenizer) else "."   # a hub name, or this folder
    model_cfg = {"embed_dim": cfg.embed_dim, "quick_gelu": cfg.act == "quick_gelu",
                 "vision_cfg": {"image_size": cfg.image_size, "patch_size": cfg.patch_size,
                                "width": cfg.vision_width, "layers": cfg.vision_layers,
                                "head_width": cfg.vision_width // cfg.vision_heads,
                                "mlp_ratio": cfg.mlp_ratio, **norm},
                 "text_cfg": {"context_length": cfg.context_length, "vocab_size": cfg.vocab_size,
                              "width": cfg.text_width, "heads": cfg.text_heads, "layers": cfg.text_layers,
                              "mlp_ratio": cfg.mlp_ratio, "pool_type": "eos", "eos_id": cfg.eos_id,
                              "pad_id": tokenizer.pad_id, "hf_tokenizer_name": name,
                              "tokenizer_kwargs": {"clean": cfg.text_clean}, **norm}}
    if model_cfg["quick_gelu"] is False and cfg.act != "gelu":
        raise UserError(f"--export open_clip: activation {cfg.act!r} is not one open_clip builds")
    if cfg.loss == "siglip":                                   # SigLIP's learned bias b
        model_cfg["init_logit_bias"] = -10.0
    preprocess = {"size": cfg.image_size, "mean": list(CLIP_MEAN), "std": list(CLIP_STD),
                  "interpolation": "bicubic", "resize_mode": "shortest"}
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess}


def export_open_clip(model, cfg, tokenizer, folder):
    """open_clip_config.json + open_clip_model.safetensors + the tokenizer's files."""
    config = open_clip_config(cfg, tokenizer)
    mapping = open_clip_map(cfg, model.logit_bias is not None)
    ours = {k: v.T if k in OPEN_CLIP_TRANSPOSED else v for k, v in model.state_dict().items()}
    # open_clip's shapes are ours, the projections transposed (the test loads it in open_clip)
    state = export_state(ours, mapping, {mapping[k]: v for k, v in ours.items()}, source="--export open_clip")
    save_json(config, os.path.join(folder, OPEN_CLIP_CONFIG))
    save_safetensors(state, os.path.join(folder, OPEN_CLIP_WEIGHTS))
    save_tokenizer(tokenizer, folder, cfg.context_length)


TARGETS = {"transformers": export_hf, "open_clip": export_open_clip}

LOAD = {"transformers": """from transformers import CLIPModel, CLIPProcessor
model = CLIPModel.from_pretrained("{path}")
processor = CLIPProcessor.from_pretrained("{path}")
inputs = processor(text=["a photo of a cat"], images=image, return_tensors="pt",
                   padding="max_length", truncation=True)
outputs = model(**inputs)    # logits_per_image, image_embeds, text_embeds""",
        "open_clip": """import open_clip
model, _, preprocess = open_clip.create_model_and_transforms("local-dir:{path}")
tokenizer = open_clip.get_tokenizer("local-dir:{path}")
image_features = model.encode_image(preprocess(image).unsqueeze(0))
text_features = model.encode_text(tokenizer(["a photo of a cat"]))"""}


def export(model, cfg, tokenizer, source):
    """--export: the model in --export-format (transformers, the default, or open_clip) with the
    tokenizer, the preprocessing and a model card, loadable with the target's own call."""
    fmt = cfg.export_format or "transformers"
    check_exportable(cfg, tokenizer)
    differences = []
    if model.logit_bias is not None and fmt == "transformers":
        differences.append(f"SigLIP's learned bias b = {model.logit_bias.item():.4f} is not in CLIPModel: "
                           "add it to logits_per_image / logits_per_text before the sigmoid")
    clean = {"lower": "ftfy, HTML unescaped twice, whitespace collapsed, lower case",
             "whitespace": "ftfy, HTML unescaped twice, whitespace collapsed"}.get(cfg.text_clean, cfg.text_clean)
    if fmt == "transformers":
        differences.append(f"our captions are cleaned before tokenizing ({clean}): apply that before the "
                           "processor (its tokenizer does only its own normalisation)")
    else:
        differences.append("open_clip's preprocess resizes the PIL image, ours the decoded tensor (both "
                           "bicubic, antialiased): images not already at the model's size differ by 1-2 "
                           "of 255 levels in a few pixels")
        if not cfg.tokenizer or os.path.exists(cfg.tokenizer):
            differences.append("the tokenizer is this folder's own: for an hf-hub: upload set "
                               "model_cfg.text_cfg.hf_tokenizer_name in open_clip_config.json to the "
                               "repository's name")
    with new_folder(cfg.export) as folder:
        TARGETS[fmt](model.cpu().eval(), cfg, tokenizer, folder)
        title = f"CLIP {cfg.preset} ({cfg.loss})" if source["config"] else "CLIP (converted weights)"
        model_card(folder, title=title, method="clip", source=source,
                   target={"transformers": "a transformers CLIPModel", "open_clip": "an open_clip model"}[fmt],
                   load=LOAD[fmt].format(path=os.path.abspath(cfg.export)),
                   library={"transformers": "transformers", "open_clip": "open_clip"}[fmt],
                   tags=("zero-shot-image-classification",) + (("siglip",) if cfg.loss == "siglip" else ()),
                   differences=differences)
    if dist.rank() == 0:
        print(f"exported {fmt} to {cfg.export}", flush=True)
    return {"export": cfg.export, "format": fmt}
