"""BLIP weights from other projects: transformers' `BlipForImageTextRetrieval` (ViT, text encoder,
projections, ITM head) and `BlipForConditionalGeneration` (ViT, text decoder, LM head) folders,
the Salesforce hub checkpoints saved with save_pretrained; and the --init-from dispatch between
such a folder and one of our checkpoints. The functions take the model (blip_train.BLIP), or
`build`: a function from a Config to a fresh model; nothing here imports the script."""
from dataclasses import replace

from .. import dist
from ..encoders import (hf_bert_lm_head_map, hf_bert_map, hf_blip_vision_map, load_mapped,
                        read_hf_checkpoint, resize_pos_embed)
from ..utils import UserError
from . import read_hf_or_ours

# Momentum encoders: copies of the online ones after loading (no published file has them).
MOMENTUM = ("visual_encoder_m.", "text_encoder_m.", "vision_proj_m.", "text_proj_m.")
# The feature queues and their pointer: a new run starts them over (a previous run's queued
# features and image ids would be stale).
QUEUES = ("idx_queue", "image_queue", "queue_ptr", "text_queue")
# The Config fields that weights fix: a model built from them takes the weights' state dict.
ARCH_FIELDS = ("image_size", "patch_size", "vision_width", "vision_layers", "vision_heads",
               "vision_eps", "vision_mlp_dim", "text_width", "text_layers", "text_heads",
               "text_mlp_dim", "max_positions", "text_eps", "vocab_size", "embed_dim", "queue_size")


read_init = read_hf_or_ours      # a transformers folder, or one of our checkpoints


def hf_architecture(path):
    """The Config fields of a transformers BlipConfig folder (its config.json, with transformers'
    defaults for what it omits). Sizes, not ratios: the ViT's and BERT's MLP widths as stored. An
    activation other than exact GELU (the only one our blocks have) is an error naming the field."""
    from transformers import BlipConfig
    hf = BlipConfig.from_pretrained(path)
    v, t = hf.vision_config, hf.text_config
    for name, sub in (("vision_config", v), ("text_config", t)):
        if sub.hidden_act != "gelu":
            raise UserError(f"{path}: {name}.hidden_act {sub.hidden_act!r} is not supported "
                            "(gelu only)")
    return dict(image_size=v.image_size, patch_size=v.patch_size, vision_width=v.hidden_size,
                vision_layers=v.num_hidden_layers, vision_heads=v.num_attention_heads,
                vision_eps=v.layer_norm_eps, vision_mlp_dim=v.intermediate_size,
                text_width=t.hidden_size, text_layers=t.num_hidden_layers,
                text_heads=t.num_attention_heads, text_mlp_dim=t.intermediate_size,
                max_positions=t.max_position_embeddings, text_eps=t.layer_norm_eps,
                vocab_size=t.vocab_size, embed_dim=hf.image_text_hidden_size)


def load_hf(model, path):
    """Every weight of the folder into `model` (built from hf_architecture(path)), mapped and
    shape-checked; a missing or unused key is an error naming it. The half of the MED that the
    file lacks keeps its initialisation and is named in the log: the decoder's self-attention and
    the LM head for a retrieval checkpoint; the encoder's self-attention, the projections and the
    ITM head for a captioning one (the other MED weights are shared). The momentum encoders
    become copies of the loaded ones."""
    _, state = read_hf_checkpoint(path)
    layers, head = model.cfg.text_layers, "text_decoder.cls.predictions"
    mapping = hf_blip_vision_map("visual_encoder", "vision_model", model.cfg.vision_layers)
    if any(k.startswith("text_encoder.") for k in state):            # BlipForImageTextRetrieval
        enc = hf_bert_map("text_encoder", "text_encoder", layers, cross_layers=range(layers),
                          token_types=False)
        mapping.update(enc)
        mapping.update({k.replace("text_encoder", "text_decoder", 1): src for k, src in enc.items()
                        if ".attention." not in k})                  # shared modules, same tensors
        for name in ("vision_proj", "text_proj", "itm_head"):
            mapping.update({f"{name}.{p}": f"{name}.{p}" for p in ("weight", "bias")})
        absent = ["text_decoder.layer.", "lm_head.", "temp"]
    else:                                                             # BlipForConditionalGeneration
        dec = hf_bert_map("text_decoder", "text_decoder.bert", layers, cross_layers=range(layers),
                          token_types=False)
        mapping.update(dec)
        mapping.update({k.replace("text_decoder", "text_encoder", 1): src for k, src in dec.items()
                        if ".attention." not in k})
        words = "text_decoder.bert.embeddings.word_embeddings.weight"
        tied = None if f"{head}.decoder.weight" in state else words
        mapping.update(hf_bert_lm_head_map("lm_head", head, tied_to=tied))
        absent = ["text_encoder.layer.", "vision_proj.", "text_proj.", "itm_head.", "temp"]
    ignore = ("position_ids",)
    if f"{head}.decoder.weight" in state and f"{head}.bias" in state:
        ignore += (f"{head}.decoder.bias",)                          # the same tensor as .bias
    load_mapped(model, state, mapping, source=path, ignore=ignore,
                keep_init=absent + [*MOMENTUM, *QUEUES])
    model.copy_to_momentum()
    if dist.is_main():
        print(f"{path}: loaded every checkpoint weight; left at initialisation: "
              + ", ".join(k.rstrip(".") for k in absent) + " (not in this checkpoint)")


def from_hf(build, cfg, path):
    """build(cfg) at the folder's architecture (hf_architecture), then load_hf."""
    model = build(replace(cfg, **hf_architecture(path)))
    load_hf(model, path)
    return model


def load_init(build, cfg, init):
    """build(cfg) with the cfg.init_from weights (`init`: read_init) at this run's image size and
    queue length (load_state); a transformers folder is loaded into a model of its own size first,
    built before the run's (the order of their random initialisations)."""
    kind, saved = init
    if kind == "hf":
        saved = {"model": from_hf(build, cfg, cfg.init_from).state_dict()}
    model = build(cfg)
    if kind is not None:
        load_state(model, saved["model"])
    return model


def init_architecture(init, path, fields=ARCH_FIELDS):
    """The architecture `fields` that the --init-from source fixes ({} without one)."""
    kind, saved = init
    if kind == "hf":
        return hf_architecture(path)
    return {k: saved["config"][k] for k in fields} if kind == "ours" else {}


def load_state(model, state):
    """A BLIP state dict (ours, or a model loaded by load_hf) into `model`, which may be built at
    another image size (the position grids are interpolated, bicubic); the queues are not taken:
    they start empty. Any other missing or unexpected key is an error."""
    grid = model.cfg.image_size // model.cfg.patch_size
    state = dict(state)
    for key in ("visual_encoder.positional_embedding", "visual_encoder_m.positional_embedding"):
        state[key] = resize_pos_embed(state[key], grid)
    state = {k: v for k, v in state.items() if k not in QUEUES}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and sorted(missing) == list(QUEUES), (missing, unexpected)
