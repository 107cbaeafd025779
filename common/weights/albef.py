"""ALBEF weights from other projects, and the --init-from / --init-text dispatch: Salesforce's
released checkpoints (ALBEF.pth, ALBEF_4M.pth: pretraining; mscoco.pth, flickr30k.pth:
retrieval), a DeiT / ViT to start the image encoder from (a timm state dict or a transformers
ViTModel folder), a transformers BERT folder for the text and fusion encoder, and one of our own
checkpoints. The functions take the model (albef_train.ALBEF) and return plain dicts of Config
fields; nothing here imports the script."""
import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import dist
from ..export import (export_source as source_of, model_card, new_folder, save_json,
                      save_safetensors, save_tokenizer)
from ..encoders import (hf_bert_lm_head_map, hf_bert_map, hf_vit_map, load_mapped,
                        read_hf_checkpoint, read_weights_file, resize_pos_embed, timm_vit_map)
from ..utils import UserError

QUEUES = ("idx_queue", "image_queue", "queue_filled", "queue_ptr", "text_queue")
WEIGHTS = "model.pth"           # --export's file: the official layout, {'model': state_dict}
MOMENTUM = ("visual_encoder_m.", "text_encoder_m.", "mlm_head_m.", "vision_proj_m.", "text_proj_m.")


def read_init(path):
    """What an --init-from is, and its contents, read once: ('ours', our checkpoint), ('official',
    its state dict: ALBEF's layout), ('vit', a timm/DeiT state dict, or None for a transformers
    folder); (None, None) without one."""
    if not path:
        return None, None
    if os.path.isfile(os.path.join(path, WEIGHTS)):          # a folder written by --export
        path = os.path.join(path, WEIGHTS)
    elif os.path.isdir(path):
        return "vit", None
    saved, state = read_weights_file(path)
    if "visual_encoder.pos_embed" in state:
        return "official", state
    if "visual_encoder.positional_embedding" in state:
        return "ours", saved
    if "pos_embed" in state or "cls_token" in state:
        return "vit", state
    other = saved.get("method") if isinstance(saved, dict) else None
    if other:                                # one of our checkpoints, of another script
        raise UserError(f"--init-from {path}: a checkpoint of {other}_train.py, not of albef_train.py")
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
                    type_vocab_size=token_types(state, text),
                    vocab_size=vocab, embed_dim=state["vision_proj.weight"].shape[0],
                    image_size=grid * patch)
    except (KeyError, ValueError) as e:
        raise UserError(f"{path}: not in the official ALBEF key layout ({type(e).__name__}: {e})") \
            from None


def official_map(cfg, bert, *, lm_head=True, momentum=True):
    """Our ALBEF's keys -> the official layout's, both ways (load_official, export). `bert`: the
    text encoder's prefix, 'text_encoder.bert' in the pretraining model (xbert BertForMaskedLM) or
    'text_encoder' in the retrieval model (a BertModel); `lm_head`: the file holds the MLM head
    (text_encoder.cls.predictions; without it our decoder maps to the tied word embeddings);
    `momentum`: the momentum copies (*_m). The token types are mapped when the model has them."""
    L, f = cfg.text_layers, cfg.fusion_layer
    mapping = {}
    for s in ("", "_m")[:1 + momentum]:
        vit, text = f"visual_encoder{s}", bert.replace("text_encoder", f"text_encoder{s}")
        mapping.update(timm_vit_map(vit, vit, cfg.vision_layers))
        mapping.update(hf_bert_map(f"text_encoder{s}", text, L, cross_layers=range(f, L),
                                   token_types=cfg.type_vocab_size > 0))
        words = text + ".embeddings.word_embeddings.weight"
        if lm_head:
            mapping.update(hf_bert_lm_head_map(f"mlm_head{s}", f"text_encoder{s}.cls.predictions",
                                               tied_to=words))
        else:
            mapping[f"mlm_head{s}.decoder.weight"] = words          # tied: the word embeddings
        for name in ("vision_proj", "text_proj"):
            mapping.update({f"{name}{s}.{p}": f"{name}{s}.{p}" for p in ("weight", "bias")})
    mapping.update({f"itm_head.{p}": f"itm_head.{p}" for p in ("weight", "bias")})
    mapping["temp"] = "temp"
    return mapping


def token_types(state, text):
    """Rows of the token-type matrix; 0 without one (LAVIS's BERT) or with one of zeros, which adds
    nothing (the export of a run without token types writes zeros, which the official code adds)."""
    rows = state.get(text + "embeddings.token_type_embeddings.weight")
    return len(rows) if rows is not None and bool(rows.any()) else 0


def load_official(model, state, path):
    """A released checkpoint into `model` (built at official_architecture's fields): the
    pretraining files ({'model': state_dict} with text_encoder.bert.*, text_encoder.cls.*, the
    momentum copies, the queues and temp) or the retrieval files (text_encoder.* with no 'bert.',
    no MLM head, no momentum model, no queues). Positions are interpolated to the model's image
    size. Every key is mapped and shape-checked; the parts a file may lack are named in the log and
    start as the official code would: the MLM head at BERT's initialisation, the momentum model as
    a copy, the queues empty (a pretraining file's are loaded, as Retrieval.py does). A zero
    token-type matrix (--export of a run without token types) is read as none."""
    state = dict(state)
    cfg = model.cfg
    bert = "text_encoder.bert" if any(k.startswith("text_encoder.bert.") for k in state) \
        else "text_encoder"
    momentum = any(k.startswith("visual_encoder_m.") for k in state)
    lm_head = "text_encoder.cls.predictions.bias" in state
    lacking = ([] if lm_head else ["MLM head"]) + ([] if momentum else ["momentum model"])
    grid = cfg.image_size // cfg.patch_size
    for vit in ("visual_encoder", "visual_encoder_m")[:1 + momentum]:
        state[f"{vit}.pos_embed"] = resize_pos_embed(state[f"{vit}.pos_embed"][0], grid)
    mapping = official_map(cfg, bert, lm_head=lm_head, momentum=momentum)
    keep = list(QUEUES) + ([] if momentum else list(MOMENTUM))
    if not lm_head:
        keep += [f"mlm_head{s}.{n}" for s in ("", "_m")
                 for n in ("dense.", "LayerNorm.", "decoder.bias")]
    ignore = ("position_ids", "cls.predictions.decoder.", "image_queue", "text_queue", "idx_queue",
              "queue_ptr") + (() if cfg.type_vocab_size else ("token_type_embeddings",))
    load_mapped(model, state, mapping, source=path, ignore=ignore, keep_init=keep)
    if not momentum:
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


# ---- --export: the official .pth layout ----

def export_source(init, ckpt, cfg, fields, presets):
    """common.export.export_source, a DeiT / ViT --init-from refused (not an ALBEF), and our
    checkpoint's state dict ('state'), which export() writes as saved where the run's sizes are
    the checkpoint's (--init-from rolls the queues and leaves idx_queue out)."""
    if ckpt is None and init[0] == "vit":
        raise UserError(f"--export writes an ALBEF: --init-from {cfg.init_from} is a ViT, not one")
    source = source_of(init, ckpt, cfg, "albef", fields, presets)
    return {**source, "state": init[1]["model"]} if ckpt is None and init[0] == "ours" else source


def official_state(model, task):
    """Our model in the layout the official code saves and loads: the pretraining model's
    (ALBEF.pth: text_encoder.bert.*, the MLM head text_encoder.cls.predictions.*) or, for a
    retrieval run, model_retrieval.py's (text_encoder.*, no MLM head, idx_queue); the momentum
    copies, the queues, queue_ptr and temp; xbert's position_ids and the tied decoder entries, as
    the files hold them. Returns (state dict, what differs from the official model's state)."""
    cfg, ours = model.cfg, model.state_dict()
    retrieval = task == "retrieval"
    bert = "text_encoder" if retrieval else "text_encoder.bert"
    mapping = official_map(cfg, bert, lm_head=not retrieval)
    state = {}
    for key, dst in mapping.items():              # the inverse of load_mapped: q, k, v split
        dsts = dst if isinstance(dst, tuple) else (dst,)
        value = ours[key].detach().cpu()
        for d, part in zip(dsts, value.chunk(len(dsts)) if len(dsts) > 1 else (value,)):
            lead = {"cls_token": 2, "pos_embed": 1}.get(d.rsplit(".", 1)[-1], 0)
            state[d] = part.reshape((1,) * lead + part.shape).clone()
    for s in ("", "_m"):
        text = bert.replace("text_encoder", f"text_encoder{s}") + ".embeddings"
        state[f"{text}.position_ids"] = torch.arange(cfg.max_positions)[None]
        if not cfg.type_vocab_size:       # xbert always adds row 0: zeros add nothing
            state[f"{text}.token_type_embeddings.weight"] = torch.zeros(2, cfg.text_width)
        if not retrieval:                 # the decoder's entries: the same tensors (tied)
            head = f"text_encoder{s}.cls.predictions"
            state[f"{head}.decoder.weight"] = state[f"{text}.word_embeddings.weight"]
            state[f"{head}.decoder.bias"] = state[f"{head}.bias"]
    filled = model.queue_filled[0].cpu()
    queues = {k: getattr(model, k).detach().cpu().clone() for k in ("image_queue", "text_queue")}
    differences = []
    if not filled.all():                  # the official queues start from random unit vectors
        g = torch.Generator().manual_seed(0)
        for q in queues.values():
            q[:, ~filled] = F.normalize(torch.randn(q.shape[0], int((~filled).sum()), generator=g),
                                        dim=0)
        differences.append(f"{int((~filled).sum())} of the {cfg.queue_size} queue slots held no "
                           "key yet (ours leave them out of ITC): they hold random unit vectors, "
                           "as the official queues start, and take part in the official ITC")
    state.update(queues, queue_ptr=model.queue_ptr.detach().cpu().clone())
    if retrieval:                         # model_retrieval.py's buffer: the keys' image ids
        state["idx_queue"] = model.idx_queue.detach().cpu().clone()
    return state, differences


def bert_config(cfg, tokenizer):
    """configs/config_bert.json of the official code at our sizes (xbert reads fusion_layer and
    encoder_width; LAVIS's med_config_albef.json adds add_cross_attention, without which its BERT
    has no cross-attention, and add_type_embeddings: its BERT adds no token types anyway)."""
    return {"architectures": ["BertForMaskedLM"], "attention_probs_dropout_prob": cfg.dropout,
            "hidden_act": "gelu", "hidden_dropout_prob": cfg.dropout, "hidden_size": cfg.text_width,
            "initializer_range": 0.02, "intermediate_size": cfg.text_mlp_dim,
            "layer_norm_eps": cfg.text_eps, "max_position_embeddings": cfg.max_positions,
            "model_type": "bert", "num_attention_heads": cfg.text_heads,
            "num_hidden_layers": cfg.text_layers, "pad_token_id": tokenizer.pad_id,
            "type_vocab_size": cfg.type_vocab_size or 2, "vocab_size": cfg.vocab_size,
            "fusion_layer": cfg.fusion_layer, "encoder_width": cfg.vision_width,
            "add_cross_attention": True, "add_type_embeddings": False}


def run_config(cfg):
    """configs/Pretrain.yaml's model fields (bert_config, image_res, ...), and the ViT's sizes,
    which the official model_pretrain.py fixes in code (ViT-B/16: 768 wide, 12 blocks, 12 heads)."""
    fields = dict(bert_config="config.json", image_res=cfg.image_size,
                  vision_width=cfg.vision_width, embed_dim=cfg.embed_dim, temp=cfg.temp,
                  mlm_probability=cfg.mlm_probability, queue_size=cfg.queue_size,
                  momentum=cfg.momentum, alpha=cfg.alpha,
                  patch_size=cfg.patch_size, vision_layers=cfg.vision_layers,
                  vision_heads=cfg.vision_heads, vision_mlp_dim=cfg.vision_mlp_dim,
                  vision_eps=cfg.vision_eps)
    # YAML 1.1 (PyYAML) reads 1e-06 as a string: a float's mantissa needs its point (1.0e-06)
    yaml = {k: repr(v).replace("e", ".0e") if isinstance(v, float) and "." not in repr(v) else v
            for k, v in fields.items()}
    return "".join(f"{k}: {v}\n" for k, v in yaml.items())


LOAD = """import torch, yaml
from transformers import BertTokenizer
state = torch.load("{path}/model.pth", map_location="cpu")["model"]
# salesforce/ALBEF: models/model_pretrain.py (a retrieval run's file: model_retrieval.py), which
# builds ViT-B/16 + bert-base; other sizes: its classes built at config.json / config.yaml's
config = dict(yaml.safe_load(open("{path}/config.yaml")), bert_config="{path}/config.json")
model = ALBEF(config=config, text_encoder="bert-base-uncased",
              tokenizer=BertTokenizer.from_pretrained("{path}"), init_deit=False)
msg = model.load_state_dict(state, strict=False)        # as Pretrain.py / Retrieval.py do
# LAVIS: AlbefPretrain(...) at these sizes, then model.load_checkpoint("{path}/model.pth")
# the same state dict, not pickled: safetensors.torch.load_file("{path}/model.safetensors")"""


def export(model, cfg, tokenizer, source):
    """--export DIR: model.pth ({'model': state_dict} in the official layout, which the official
    code and LAVIS torch.load), model.safetensors (the same state dict), config.json (the BERT
    config), config.yaml (Pretrain.yaml's model fields), the tokenizer and README.md. What our
    loader would read back differently is refused, named (official_architecture reads the heads as
    width / 64 and takes the LayerNorm epsilons as ALBEF's)."""
    for name, ours, official in (("vision-heads", cfg.vision_heads, cfg.vision_width // 64),
                                 ("text-heads", cfg.text_heads, cfg.text_width // 64),
                                 ("vision-eps", cfg.vision_eps, 1e-6),
                                 ("text-eps", cfg.text_eps, 1e-12)):
        if ours != official:
            raise UserError(f"--export official: --{name} {ours} is not ALBEF's {official}, "
                            f"which the layout cannot record (read back as {official})")
    task = (source["config"] or {}).get("task", cfg.task)
    saved, ours = source.get("state"), model.state_dict()
    if saved is not None and all(saved[k].shape == v.shape for k, v in ours.items()):
        model.load_state_dict(saved)    # --init-from ours: its queues as saved, idx_queue too
    state, differences = official_state(model.cpu().eval(), task)
    differences.append("the official code and LAVIS update the momentum model at the start of "
                       "each forward, ours right after each step: the file holds the last step's "
                       "update, which their first training forward applies once more")
    if cfg.type_vocab_size:
        differences.append("LAVIS's BERT has no token-type embeddings (it drops text_encoder."
                           "*.token_type_embeddings, whose row 0 the official code adds): LAVIS "
                           "computes our numbers only for runs with --type-vocab-size 0")
    with new_folder(cfg.export) as folder:
        torch.save({"model": state}, os.path.join(folder, WEIGHTS))
        save_safetensors(state, os.path.join(folder, "model.safetensors"))
        save_json(bert_config(cfg, tokenizer), os.path.join(folder, "config.json"))
        with open(os.path.join(folder, "config.yaml"), "w") as f:
            f.write(run_config(cfg))
        words = json.loads(save_tokenizer(tokenizer, folder, cfg.max_length)
                           .backend_tokenizer.to_str())["model"]
        if words["type"] == "WordPiece":  # BertTokenizer's vocab.txt (transformers 5 writes none)
            with open(os.path.join(folder, "vocab.txt"), "w") as f:
                f.write("".join(t + "\n" for t in sorted(words["vocab"], key=words["vocab"].get)))
        model_card(folder, title=f"ALBEF {cfg.preset} ({task})", method="albef", source=source,
                   target="the official ALBEF .pth layout", library="pytorch",
                   load=LOAD.format(path=os.path.abspath(cfg.export)), tags=(task,),
                   differences=differences)
    if dist.is_main():
        print(f"exported the official ALBEF layout to {cfg.export}", flush=True)
    return {"export": cfg.export, "format": "official"}
