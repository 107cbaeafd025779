"""ALBEF weights from other projects, and the --init-from / --init-text dispatch: Salesforce's
released checkpoints (ALBEF.pth, ALBEF_4M.pth: pretraining; mscoco.pth, flickr30k.pth:
retrieval), a DeiT / ViT to start the image encoder from (a timm state dict or a transformers
ViTModel folder), a transformers BERT folder for the text and fusion encoder, and one of our own
checkpoints. The functions take the model (albef_train.ALBEF) and return plain dicts of Config
fields; nothing here imports the script."""
import os

import torch
import torch.nn as nn

from .. import dist
from ..encoders import (hf_bert_lm_head_map, hf_bert_map, hf_vit_map, load_mapped,
                        read_hf_checkpoint, read_weights_file, resize_pos_embed, timm_vit_map)
from ..utils import UserError

QUEUES = ("idx_queue", "image_queue", "queue_filled", "queue_ptr", "text_queue")
MOMENTUM = ("visual_encoder_m.", "text_encoder_m.", "mlm_head_m.", "vision_proj_m.", "text_proj_m.")


def read_init(path):
    """What an --init-from is, and its contents, read once: ('ours', our checkpoint), ('official',
    its state dict: ALBEF's layout), ('vit', a timm/DeiT state dict, or None for a transformers
    folder); (None, None) without one."""
    if not path:
        return None, None
    if os.path.isdir(path):
        return "vit", None
    saved, state = read_weights_file(path)
    if "visual_encoder.pos_embed" in state:
        return "official", state
    if "visual_encoder.positional_embedding" in state:
        return "ours", saved
    if "pos_embed" in state or "cls_token" in state:
        return "vit", state
    raise UserError(f"--init-from {path}: neither an ALBEF checkpoint (official or ours) nor a "
                    f"timm/DeiT ViT (its keys start {sorted(state)[:3]})")


def init_architecture(init, path, fields):
    """The Config fields that the --init-from weights fix: an official file's architecture (read
    off its shapes; not its image size: the run's, positions interpolated), our checkpoint's
    `fields`; {} for a DeiT / ViT or none (the run's config builds the model)."""
    kind, saved = init
    if kind == "official":
        arch = official_architecture(saved, path)
        arch.pop("image_size")
        return arch
    return {k: saved["config"][k] for k in fields} if kind == "ours" else {}


def load_init(model, init, path, text_path=""):
    """The --init-from weights into `model` (built at init_architecture's fields), then the
    --init-text BERT; the momentum model becomes a copy of what a DeiT / BERT started."""
    kind, saved = init
    if kind == "official":
        load_official(model, saved, path)
    elif kind == "ours":
        load_ours(model, saved, path)
    elif kind == "vit":
        load_vision_init(model, path, saved)
    if text_path:
        load_text_init(model, text_path)
    if text_path or kind == "vit":
        model.copy_to_momentum()


# ---- Salesforce's released files ----

def read_official(path):
    """The state dict of an official ALBEF checkpoint ({'model': state_dict}, or a bare one)."""
    _, state = read_weights_file(path)
    if "visual_encoder.pos_embed" not in state:
        raise UserError(f"{path}: not an ALBEF checkpoint (no 'model' state dict with "
                        f"'visual_encoder.pos_embed')")
    return dict(state)


def official_architecture(state, path):
    """Config fields of an official checkpoint, read off its shapes (heads = width / 64, as every
    ALBEF model)."""
    text = "text_encoder.bert." if "text_encoder.bert.embeddings.word_embeddings.weight" in state \
        else "text_encoder."
    try:
        width, _, patch, _ = state["visual_encoder.patch_embed.proj.weight"].shape
        grid = int((state["visual_encoder.pos_embed"].shape[1] - 1) ** 0.5)
        vocab, text_width = state[text + "embeddings.word_embeddings.weight"].shape
        layers = 1 + max(int(k.split(".")[2]) for k in state
                         if k.startswith("visual_encoder.blocks."))
        bert_layers = [(int(k[len(text):].split(".")[2]), k) for k in state
                       if k.startswith(text + "encoder.layer.")]
        return dict(patch_size=patch, vision_width=width, vision_layers=layers,
                    vision_heads=width // 64,
                    vision_mlp_dim=state["visual_encoder.blocks.0.mlp.fc1.weight"].shape[0],
                    text_width=text_width, text_layers=1 + max(i for i, _ in bert_layers),
                    fusion_layer=min(i for i, k in bert_layers if ".crossattention." in k),
                    text_heads=text_width // 64,
                    text_mlp_dim=state[text + "encoder.layer.0.intermediate.dense.weight"].shape[0],
                    max_positions=state[text + "embeddings.position_embeddings.weight"].shape[0],
                    type_vocab_size=len(state[text + "embeddings.token_type_embeddings.weight"]),
                    vocab_size=vocab, embed_dim=state["vision_proj.weight"].shape[0],
                    image_size=grid * patch)
    except (KeyError, ValueError) as e:
        raise UserError(f"{path}: not in the official ALBEF key layout ({type(e).__name__}: {e})") \
            from None


def load_official(model, state, path):
    """A released checkpoint into `model` (built at official_architecture's fields): the
    pretraining files ({'model': state_dict} with text_encoder.bert.*, text_encoder.cls.*, the
    momentum copies, the queues and temp) or the retrieval files (text_encoder.* with no 'bert.',
    no MLM head, no momentum model, no queues). Positions are interpolated to the model's image
    size. Every key is mapped and shape-checked; the parts a file may lack are named in the log and
    start as the official code would: the MLM head at BERT's initialisation, the momentum model as
    a copy, the queues empty (a pretraining file's are loaded, as Retrieval.py does)."""
    state = dict(state)
    cfg = model.cfg
    L, f = cfg.text_layers, cfg.fusion_layer
    bert = "text_encoder.bert" if any(k.startswith("text_encoder.bert.") for k in state) \
        else "text_encoder"
    grid = cfg.image_size // cfg.patch_size
    mapping, lacking = {}, []
    for suffix in ("", "_m"):
        if suffix and not any(k.startswith("visual_encoder_m.") for k in state):
            lacking.append("momentum model")
            break
        vit, text = f"visual_encoder{suffix}", bert.replace("text_encoder", f"text_encoder{suffix}")
        state[f"{vit}.pos_embed"] = resize_pos_embed(state[f"{vit}.pos_embed"][0], grid)
        mapping.update(timm_vit_map(vit, vit, cfg.vision_layers))
        mapping.update(hf_bert_map(f"text_encoder{suffix}", text, L, cross_layers=range(f, L),
                                   token_types=True))
        words = text + ".embeddings.word_embeddings.weight"
        if f"text_encoder{suffix}.cls.predictions.bias" in state:
            mapping.update(hf_bert_lm_head_map(f"mlm_head{suffix}",
                                               f"text_encoder{suffix}.cls.predictions",
                                               tied_to=words))
        else:
            mapping[f"mlm_head{suffix}.decoder.weight"] = words      # tied: the word embeddings
            if not suffix:
                lacking.append("MLM head")
        for name in ("vision_proj", "text_proj"):
            mapping.update({f"{name}{suffix}.{p}": f"{name}{suffix}.{p}"
                            for p in ("weight", "bias")})
    mapping.update({f"itm_head.{p}": f"itm_head.{p}" for p in ("weight", "bias")})
    mapping["temp"] = "temp"
    keep = list(QUEUES)
    if "momentum model" in lacking:
        keep += MOMENTUM
    if "MLM head" in lacking:
        keep += [f"mlm_head{s}.{n}" for s in ("", "_m")
                 for n in ("dense.", "LayerNorm.", "decoder.bias")]
    ignore = ("position_ids", "cls.predictions.decoder.", "image_queue", "text_queue", "idx_queue",
              "queue_ptr")
    load_mapped(model, state, mapping, source=path, ignore=ignore, keep_init=keep)
    if "momentum model" in lacking:
        model.copy_to_momentum()
    lacking += load_official_queues(model, state)
    if dist.is_main():
        print(f"{path}: loaded every weight of the file"
              + (f"; not in it: {', '.join(lacking)}" if lacking else ""))


def load_official_queues(model, state):
    """A pretraining file's queues (the momentum features of its last steps) into the model, as
    Retrieval.py's load_state_dict does; only idx_queue is not in the files (ALBEF issue #79), so
    those keys keep id -100, never a positive. Rolled so that the oldest key is in slot 0 and the
    pointer 0 (the same keys, overwritten in the same order, whatever the global batch). Returns
    what could not be loaded, for the log; the queues then start empty."""
    if "image_queue" not in state:
        return ["queues"]
    if state["image_queue"].shape != model.image_queue.shape:
        return [f"queues of this run's length (the file's {state['image_queue'].shape[1]}, "
                f"--queue-size {model.cfg.queue_size})"]
    ptr = int(state.get("queue_ptr", torch.zeros(1))[0])
    with torch.no_grad():
        model.queue_filled.fill_(True)              # official files: full; ours say which slots are
        for name in ("image_queue", "text_queue", "idx_queue", "queue_filled"):
            if name in state:
                getattr(model, name).copy_(state[name].roll(-ptr, 1))
        model.queue_ptr.zero_()
    return []


# ---- our checkpoints ----

def load_ours(model, saved, path):
    """One of our checkpoints into `model` (its architecture; the run's image size, positions
    interpolated, and queue length): its queues too, when the length is the same, as Retrieval.py
    keeps a pretraining file's (ids of its own data: never positives here)."""
    state = dict(saved["model"])
    grid = model.cfg.image_size // model.cfg.patch_size
    for key in ("visual_encoder.positional_embedding", "visual_encoder_m.positional_embedding"):
        state[key] = resize_pos_embed(state[key], grid)
    missing, unexpected = model.load_state_dict({k: v for k, v in state.items() if k not in QUEUES},
                                                strict=False)
    assert not unexpected and sorted(missing) == list(QUEUES), missing
    lacking = load_official_queues(model, {k: state[k] for k in QUEUES
                                           if k in state and k != "idx_queue"})
    if lacking and dist.is_main():
        print(f"{path}: the queues start empty; not loaded: {', '.join(lacking)}")


# ---- pretraining from DeiT and BERT ----

def load_vision_init(model, path, state=None):
    """--init-from a DeiT / ViT for pretraining from scratch (ALBEF starts its ViT from DeiT-B/16):
    a timm-format state dict file (cls_token, pos_embed, blocks.i..., norm; a classifier head is
    dropped) or a transformers ViTModel / ViTForImageClassification folder. Positions are
    interpolated to the run's image size; every ViT weight must be there with our shape."""
    ours, c = model.visual_encoder, model.cfg
    if os.path.isdir(path):
        config, state = read_hf_checkpoint(path)
        pre = "vit." if any(k.startswith("vit.") for k in state) else ""
        key = f"{pre}embeddings.position_embeddings"
        check_hf_config(path, config, num_attention_heads=(c.vision_heads, "--vision-heads"),
                        layer_norm_eps=(c.vision_eps, "--vision-eps"), hidden_act=("gelu", None),
                        qkv_bias=(True, None))
        mapping = hf_vit_map("visual_encoder", pre.rstrip("."), c.vision_layers)
        ignore = ("pooler.", "classifier.")
    else:
        state = state if state is not None else read_weights_file(path)[1]
        if "dist_token" in state:
            raise UserError(f"{path}: a distilled DeiT (dist_token); ALBEF starts from the plain "
                            f"DeiT-B/16 (deit_base_patch16_224)")
        key = "pos_embed"
        mapping = timm_vit_map("visual_encoder", "", c.vision_layers)
        ignore = ("head.", "fc_norm.", "pre_logits.")
    if key not in state:
        raise UserError(f"{path}: no '{key}'; expected a timm/DeiT ViT state dict or a "
                        f"transformers ViTModel folder")
    state = dict(state)
    state[key] = resize_pos_embed(state[key].reshape(-1, state[key].shape[-1]), ours.grid)
    holder = nn.Module()                           # our keys 'visual_encoder.*' and nothing else
    holder.visual_encoder = ours
    load_mapped(holder, state, mapping, source=path, ignore=ignore)


def check_hf_config(path, config, **fields):
    """Refuse a transformers config.json field that would change what our modules compute, naming
    it: `fields` maps each to (our value, the flag that sets it, or None where ours is fixed).
    (Sizes need no check: the weights' shapes are compared key by key.)"""
    for key, (ours, flag) in fields.items():
        if config.get(key, ours) != ours:
            how = f" (set {flag})" if flag else " (the only one supported)"
            raise UserError(f"{path}: config.json has {key} {config[key]!r}, this run's model "
                            f"{ours!r}{how}")


def load_text_init(model, path):
    """--init-text: a transformers BERT folder (bert-base-uncased: BertForPreTraining /
    BertForMaskedLM / BertModel) into the text and fusion encoder and the MLM head. The fusion
    layers' cross-attention is not in BERT and keeps its initialisation, as in ALBEF; the MLM head
    too when the folder is a bare BertModel."""
    config, state = read_hf_checkpoint(path)
    cfg = model.cfg
    check_hf_config(path, config, num_attention_heads=(cfg.text_heads, "--text-heads"),
                    layer_norm_eps=(cfg.text_eps, "--text-eps"),
                    num_hidden_layers=(cfg.text_layers, "--text-layers"),
                    hidden_act=("gelu", None), position_embedding_type=("absolute", None))
    pre = "bert" if any(k.startswith("bert.") for k in state) else ""
    holder = nn.Module()
    holder.text_encoder, holder.mlm_head = model.text_encoder, model.mlm_head
    mapping = hf_bert_map("text_encoder", pre, cfg.text_layers, token_types=cfg.type_vocab_size > 0)
    keep = [f"text_encoder.layer.{i}.crossattention."
            for i in range(cfg.fusion_layer, cfg.text_layers)]
    words = f"{pre + '.' if pre else ''}embeddings.word_embeddings.weight"
    if "cls.predictions.bias" in state:
        mapping.update(hf_bert_lm_head_map("mlm_head", "cls.predictions", tied_to=words))
    else:
        mapping["mlm_head.decoder.weight"] = words                       # tied: the word embeddings
        keep += ["mlm_head.dense.", "mlm_head.LayerNorm.", "mlm_head.decoder.bias"]
    load_mapped(holder, state, mapping, source=path, keep_init=keep,
                ignore=("position_ids", "pooler.", "cls.seq_relationship.",
                        "cls.predictions.decoder."))
