"""BLIP weights from and to other projects: transformers' `BlipForImageTextRetrieval` (ViT, text
encoder, projections, ITM head) and `BlipForConditionalGeneration` (ViT, text decoder, LM head)
folders, the Salesforce hub checkpoints saved with save_pretrained; the --init-from dispatch
between such a folder (or an --export's two) and one of our checkpoints; and --export to them.
The functions take the model (blip_train.BLIP), or `build`: a function from a Config to a fresh
model; nothing here imports the script."""
import json
import os
from dataclasses import replace

import torch

from .. import dist
from ..data import CLIP_MEAN, CLIP_STD
from ..encoders import (hf_bert_lm_head_map, hf_bert_map, hf_blip_vision_map, load_mapped,
                        read_hf_checkpoint, resize_pos_embed)
from ..export import export_source as checked_source
from ..export import export_state, model_card, new_folder, save_safetensors, save_tokenizer
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
    hf = BlipConfig.from_pretrained(hf_folders(path)[0])
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


HEAD = "text_decoder.cls.predictions"                 # transformers' LM head in BlipForConditional-
# What a folder of each kind lacks: kept at initialisation when one is loaded alone.
ABSENT = {"retrieval": ("text_decoder.layer.", "lm_head.", "temp"),
          "captioning": ("text_encoder.layer.", "vision_proj.", "text_proj.", "itm_head.", "temp")}
ARCHITECTURES = {"retrieval": "BlipForImageTextRetrieval",
                 "captioning": "BlipForConditionalGeneration"}


def hf_map(cfg, kind, tied=True):
    """{our key: transformers key} of a BlipForImageTextRetrieval ("retrieval": ViT, text encoder,
    projections, ITM head) or BlipForConditionalGeneration ("captioning": ViT, text decoder, LM
    head) state dict; load_hf reads through it, export writes through it. The MED modules our
    encoder and decoder share map from both of our names. `tied`: the LM head's weight is the
    word embeddings (the folder stores none, as save_pretrained writes it)."""
    layers = cfg.text_layers
    mapping = hf_blip_vision_map("visual_encoder", "vision_model", cfg.vision_layers)
    own, other, hf = (("text_encoder", "text_decoder", "text_encoder") if kind == "retrieval"
                      else ("text_decoder", "text_encoder", "text_decoder.bert"))
    med = hf_bert_map(own, hf, layers, cross_layers=range(layers), token_types=False)
    mapping.update(med)
    mapping.update({k.replace(own, other, 1): v for k, v in med.items() if ".attention." not in k})
    if kind == "retrieval":
        for name in ("vision_proj", "text_proj", "itm_head"):
            mapping.update({f"{name}.{p}": f"{name}.{p}" for p in ("weight", "bias")})
    else:
        words = f"{hf}.embeddings.word_embeddings.weight"
        mapping.update(hf_bert_lm_head_map("lm_head", HEAD, tied_to=words if tied else None))
    return mapping


def hf_folders(path):
    """The BLIP folders at `path`: the folder itself, or the retrieval/ and captioning/ folders of
    an --export (both are loaded: together they hold every weight but the temperature)."""
    if not os.path.isdir(path) or os.path.isfile(os.path.join(path, "config.json")):
        return [path]
    return [os.path.join(path, k) for k in ABSENT
            if os.path.isfile(os.path.join(path, k, "config.json"))] or [path]


def load_hf(model, path):
    """Every weight of the folder(s) (hf_folders) into `model` (built from hf_architecture(path)),
    mapped and shape-checked; a missing or unused key is an error naming it. The half of the MED
    that a folder lacks (ABSENT) keeps its initialisation, or the other folder's weights, and is
    named in the log: the decoder's self-attention and the LM head for a retrieval checkpoint; the
    encoder's self-attention, the projections and the ITM head for a captioning one (the other
    MED weights are shared). The momentum encoders become copies of the loaded ones."""
    left = None
    for folder in hf_folders(path):
        _, state = read_hf_checkpoint(folder)
        kind = folder_kind(folder, state)
        ignore = ("position_ids",)
        if f"{HEAD}.decoder.weight" in state and f"{HEAD}.bias" in state:
            ignore += (f"{HEAD}.decoder.bias",)                      # the same tensor as .bias
        load_mapped(model, state, hf_map(model.cfg, kind, f"{HEAD}.decoder.weight" not in state),
                    source=folder, ignore=ignore, keep_init=[*ABSENT[kind], *MOMENTUM, *QUEUES])
        left = [k for k in ABSENT[kind] if left is None or k in left]
    model.copy_to_momentum()
    if dist.is_main():
        print(f"{path}: loaded every checkpoint weight; left at initialisation: "
              + ", ".join(k.rstrip(".") for k in left) + " (not in this checkpoint)")


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


# ---- --export: transformers' two BLIP folders, one per task, as the hub ships them ----

# --export-format: "transformers" writes DIR/retrieval and DIR/captioning; a task name, DIR alone.
FORMATS = ("transformers", "retrieval", "captioning")


def export_source(init, ckpt, cfg, presets):
    """What --export writes from (common.export.export_source): a blip_train.py checkpoint (or a
    transformers folder); another script's is a one-line error. Called before the architecture is
    read from `init`."""
    return checked_source(init, ckpt, cfg, "blip", ARCH_FIELDS, presets)


def hf_config(cfg, model, kind):
    """The transformers BlipConfig of our architecture; [DEC] its bos_token_id (generate() puts it
    first), [SEP] its sep_token_id (where generation stops), and our LM label smoothing."""
    from transformers import BlipConfig
    text = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.text_width,
                intermediate_size=cfg.text_mlp_dim, num_hidden_layers=cfg.text_layers,
                num_attention_heads=cfg.text_heads, max_position_embeddings=cfg.max_positions,
                hidden_act="gelu", layer_norm_eps=cfg.text_eps, hidden_dropout_prob=cfg.dropout,
                attention_probs_dropout_prob=cfg.dropout, bos_token_id=model.dec_id,
                eos_token_id=model.sep_id, sep_token_id=model.sep_id, pad_token_id=model.pad_id,
                label_smoothing=cfg.label_smoothing)
    vision = dict(hidden_size=cfg.vision_width, intermediate_size=cfg.vision_mlp_dim,
                  num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
                  image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_act="gelu",
                  layer_norm_eps=cfg.vision_eps)
    config = BlipConfig(text_config=text, vision_config=vision, projection_dim=cfg.embed_dim,
                        image_text_hidden_size=cfg.embed_dim, label_smoothing=cfg.label_smoothing)
    config.architectures = [ARCHITECTURES[kind]]
    return config


def export_folder(model, cfg, tokenizer, folder, kind):
    """One transformers folder: weights, config.json (+ generation_config.json for captioning) and
    BlipProcessor's files: our evaluation's preprocessing (resize to image_size x image_size, no
    crop, bicubic, our mean/std) and our tokenizer, bos_token [DEC]: our rows, [CLS] ... [SEP]
    (a BertTokenizer rebuilds that template on loading whatever the file says, so the [ENC] of
    ITM and the [DEC] of the LM loss are the user's to put first: the model card says so)."""
    import transformers
    from transformers import BlipImageProcessor, BlipProcessor, GenerationConfig
    config = hf_config(cfg, model, kind)
    with torch.device("meta"):                                 # shapes only, nothing allocated
        target = getattr(transformers, ARCHITECTURES[kind])(config).state_dict()
    state = export_state(model.state_dict(), hf_map(cfg, kind), target,
                         source=f"--export {kind}", skip=("position_ids", f"{HEAD}.decoder."))
    config.save_pretrained(folder)
    save_safetensors(state, os.path.join(folder, "model.safetensors"))
    if kind == "captioning":
        GenerationConfig(bos_token_id=model.dec_id, eos_token_id=model.sep_id,
                         pad_token_id=model.pad_id, max_length=cfg.max_gen_length,
                         min_length=cfg.min_gen_length, num_beams=cfg.num_beams
                         ).save_pretrained(folder)
    size = {"height": cfg.image_size, "width": cfg.image_size}
    # the torchvision backend (transformers' default) resizes the uint8 image as our eval_transform
    images = BlipImageProcessor(size=size, resample=3, image_mean=list(CLIP_MEAN),
                                image_std=list(CLIP_STD))
    tok = save_tokenizer(tokenizer, folder, cfg.max_length, bos_token="[DEC]")
    BlipProcessor(image_processor=images, tokenizer=tok).save_pretrained(folder)


LOAD = {"retrieval": """from transformers import BlipForImageTextRetrieval, BlipProcessor
model = BlipForImageTextRetrieval.from_pretrained("{path}").eval()
processor = BlipProcessor.from_pretrained("{path}")
inputs = processor(images=image, text=["a dog on the grass"], return_tensors="pt")
cosine = model(**inputs, use_itm_head=False).itm_score    # ITC: (images, texts)
# ITM on (image, text) pairs: [ENC] (id {enc_id}) first, as BLIP's image-grounded encoder reads it
inputs["input_ids"][:, 0] = {enc_id}
itm_logits = model(**inputs).itm_score                    # (pairs, 2): [no match, match]""",
        "captioning": """from transformers import BlipForConditionalGeneration, BlipProcessor
model = BlipForConditionalGeneration.from_pretrained("{path}").eval()
processor = BlipProcessor.from_pretrained("{path}")
inputs = processor(images=image, text={prompt!r}, return_tensors="pt")
ids = model.generate(**inputs, num_beams={num_beams}, max_length={max_length},
                     min_length={min_length})         # our evaluation's (generation_config.json)
caption = processor.decode(ids[0], skip_special_tokens=True)
# our LM loss of (image, caption) pairs: [DEC] first (generate() puts it there itself)
inputs = processor(images=image, text=[{prompt!r} + "a dog on the grass"], return_tensors="pt")
inputs["input_ids"][:, 0] = model.config.text_config.bos_token_id
labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
labels[:, :{inputs_only}] = -100                 # [DEC] and the prompt are inputs, not targets
loss = model(**inputs, labels=labels).loss   # smoothed: text_config.label_smoothing"""}


def differences(model, cfg, kind):
    """What the folder's transformers class computes differently from our model, one line each."""
    out = [f"captions went through BLIP's pre_caption (lower case, punctuation dropped, the first "
           f"{cfg.max_words} words) before tokenizing: apply it before the processor"]
    if kind == "retrieval":
        out += [f"ITM: our image-grounded encoder reads [ENC] (id {model.enc_id}) where the "
                "processor puts [CLS]: set input_ids[:, 0] to it before use_itm_head=True",
                f"ITC: use_itm_head=False returns the cosine; our ITC logits divide it by the "
                f"learned temperature {model.temp.item():.6g}, which the class does not hold",
                f"our retrieval evaluation re-ranks each query's top {cfg.k_test} ITC candidates "
                "by ITM match logit + ITC cosine; the class scores the pairs it is given"]
    else:
        out += [f"LM: our decoder reads [DEC] (id {model.dec_id}) where the processor puts [CLS]: "
                "set input_ids[:, 0] to it before forward(labels=...); generate() does it itself",
                "generate() runs the text decoder with its own defaults, not "
                "generation_config.json (our evaluation's beam search: "
                f"{cfg.num_beams} beams, max_length {cfg.max_gen_length}, min_length "
                f"{cfg.min_gen_length}, lengths counting [DEC] and the prompt): pass them, as in "
                "Load"]
    out.append("the momentum encoders and the feature queues (training state) are not in the "
               "transformers classes and are not written")
    return out


def folder_kind(folder, state=None):
    """"retrieval" or "captioning": what a transformers BLIP folder's config.json says it is, else
    what its weights are (a text encoder: retrieval)."""
    with open(os.path.join(folder, "config.json")) as f:
        names = json.load(f).get("architectures") or [""]
    kind = {v: k for k, v in ARCHITECTURES.items()}.get(names[0])
    state = state if kind or state is not None else read_hf_checkpoint(folder)[1]
    return kind or ("retrieval" if any(k.startswith("text_encoder.") for k in state)
                    else "captioning")


def trained_kinds(cfg, source):
    """The folders whose weights the source holds trained: both after pretraining, the task's
    after --task retrieval / caption (the other half of the MED is what the run started from),
    a published folder's own."""
    if source["config"] is None:
        return [folder_kind(f) for f in hf_folders(source["path"])]
    return {"retrieval": ["retrieval"], "caption": ["captioning"]}.get(cfg.task, list(ABSENT))


def export(model, cfg, tokenizer, source):
    """--export: the retrieval and captioning folders the run trained (or the one --export-format
    names) with the processor and a model card each, loadable with transformers'
    from_pretrained. A published folder's missing half is an error, not random weights."""
    fmt = cfg.export_format or FORMATS[0]
    trained = trained_kinds(cfg, source)
    kinds = trained if fmt == "transformers" else [fmt]
    if source["config"] is None and fmt not in trained + ["transformers"]:
        raise UserError(f"--export-format {fmt}: {source['path']} holds no {fmt} weights (it is "
                        f"a {' + '.join(ARCHITECTURES[k] for k in trained)} folder)")
    model = model.cpu().eval()
    prompt = cfg.prompt if cfg.task == "caption" else ""
    with new_folder(cfg.export) as out:
        for kind in kinds:
            folder = os.path.join(out, kind) if fmt == "transformers" else out
            os.makedirs(folder, exist_ok=True)
            export_folder(model, cfg, tokenizer, folder, kind)
            path = os.path.abspath(os.path.join(cfg.export, os.path.relpath(folder, out)))
            model_card(folder, title=f"BLIP {cfg.preset} ({kind})", method="blip", source=source,
                       target=f"a transformers {ARCHITECTURES[kind]}", library="transformers",
                       load=LOAD[kind].format(path=path, enc_id=model.enc_id, prompt=prompt,
                                             inputs_only=1 + len(tokenizer.tok(prompt, add_special_tokens=False)
                                                                 ["input_ids"]) if prompt else 1,
                                             num_beams=cfg.num_beams, max_length=cfg.max_gen_length,
                                             min_length=cfg.min_gen_length),
                       tags=("image-text-retrieval",) if kind == "retrieval" else
                       ("image-to-text", "image-captioning"),
                       differences=differences(model, cfg, kind) + ([] if kind in trained else [
                           f"this run trained --task {cfg.task} only: the {kind} half of the MED "
                           "is what it started from (--init-from), not trained by it"]))
    if dist.is_main():
        print(f"exported {', '.join(kinds)} to {cfg.export}", flush=True)
    return {"export": cfg.export, "format": fmt}
