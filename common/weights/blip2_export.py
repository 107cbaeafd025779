"""--export of a BLIP-2 run: the inverse of common/weights/blip2.py's loaders, through the same key
maps (eva_hf_map, qformer_map, llm_map). Targets: "transformers" (stage 1: a
Blip2ForImageTextRetrieval folder; stage 2: Blip2ForConditionalGeneration with the language model
copied in) and "lavis" (LAVIS's {"model": state_dict} .pth that its load_checkpoint reads: what
blip2_pretrained.pth, blip2_opt's and blip2_t5's checkpoints hold). What each cannot hold:
docs/blip2.md "Export"."""
import copy
import os

import torch

from .. import dist
from ..data import CLIP_MEAN, CLIP_STD
from ..encoders import hf_bert_lm_head_map
from ..export import (export_source as common_export_source, export_state, model_card, new_folder,
                      save_safetensors, save_tokenizer)
from ..utils import UserError
from .blip2 import (MODEL_FIELDS, eva_hf_map, init_stage, lavis_vision_map, llm_map,
                    qformer_map)

TARGETS = ("transformers", "lavis")
# Blip2ForImageTextRetrieval has no ITG head and no ITC temperature: our --init-from reads them
# from this file beside the weights (transformers ignores it)
ITG_FILE = "itg_head.safetensors"


# How the run read and wrote text (the processor's length, the generation settings): an --init-from
# of our checkpoint exports with its values, unless the command line gives others
RUN_TEXT = ("max_length", "prompt", "text_end", "num_beams", "nucleus", "max_gen_length",
            "min_gen_length")


def export_source(init, ckpt, cfg, presets):
    """common.export.export_source for blip2_train.py: the stage is the source's, and RUN_TEXT's
    fields given on the command line win over the checkpoint's (they shape only the export's
    processor and generation_config)."""
    source = common_export_source(init, ckpt, cfg, "blip2", MODEL_FIELDS, presets, mutable=RUN_TEXT)
    if ckpt is None:
        cfg.stage = init_stage(*init)
    return source


def lavis_model_type(cfg, decoder):
    """LAVIS's model_type for the run's language model (its names: pretrain_opt2.7b, ...)."""
    name = os.path.basename(os.path.normpath(cfg.llm or "")).lower().replace("-", "")
    known = ("opt2.7b", "opt6.7b") if decoder else ("flant5xl", "flant5xxl")
    return f"pretrain_{name}" if name in known else "<a model_type whose config names your LM>"


# ---- transformers ----

def image_processor(cfg):
    """Our evaluation's preprocessing: image_size x image_size bicubic, no crop, OpenAI mean/std."""
    from transformers import BlipImageProcessor
    return BlipImageProcessor(size={"height": cfg.image_size, "width": cfg.image_size}, resample=3,
                              image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))


def hf_config(model, cfg, llm_tokenizer):
    """The Blip2Config of our architecture (the inverse of hf_architecture). Stage 2: the LM's own
    config, its eos our end of text, image_token_index the <image> id the processor adds."""
    from transformers import Blip2Config
    if cfg.vision != "eva":
        raise UserError(f"--export transformers: Blip2VisionModel is EVA's layout; a {cfg.vision} "
                        f"encoder (ln_pre, quick_gelu, no patch bias) is not: use --export-format "
                        f"lavis")
    vision = dict(hidden_size=cfg.vision_width, intermediate_size=cfg.vision_mlp_dim,
                  num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
                  image_size=cfg.image_size, patch_size=cfg.patch_size,
                  layer_norm_eps=cfg.vision_eps,
                  hidden_act="gelu", qkv_bias=True, attention_dropout=0.0)
    qformer = dict(hidden_size=cfg.qformer_width, num_hidden_layers=cfg.qformer_layers,
                   num_attention_heads=cfg.qformer_heads, intermediate_size=cfg.qformer_mlp_dim,
                   cross_attention_frequency=cfg.cross_attention_freq,
                   max_position_embeddings=cfg.max_positions, layer_norm_eps=cfg.qformer_eps,
                   vocab_size=cfg.vocab_size or 30523, encoder_hidden_size=cfg.vision_width,
                   hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout,
                   use_qformer_text_input=cfg.stage == 1, pad_token_id=model.pad_id)
    extra = dict(num_query_tokens=cfg.num_query_tokens, image_text_hidden_size=cfg.embed_dim)
    if cfg.stage == 1:
        config = Blip2Config(vision_config=vision, qformer_config=qformer, image_token_index=None,
                             **extra)
        config.architectures = ["Blip2ForImageTextRetrieval"]
        return config
    lm = model.language_model
    text = lm.config.to_dict()
    image_token = len(llm_tokenizer) if "<image>" not in llm_tokenizer.get_vocab() else \
        llm_tokenizer.convert_tokens_to_ids("<image>")
    rows = lm.get_input_embeddings().num_embeddings
    if image_token >= rows:
        raise UserError(f"--export transformers: the language model has {rows} embedding rows and "
                        f"no free one for Blip2's <image> token (id {image_token}, after the "
                        f"tokenizer's {len(llm_tokenizer)}); use --export-format lavis")
    if model.decoder_only:
        text["eos_token_id"] = end_of_text(cfg, llm_tokenizer)
    config = Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text,
                         image_token_index=image_token, **extra)
    config.architectures = ["Blip2ForConditionalGeneration"]
    return config


def end_of_text(cfg, tok):
    """The id a decoder-only LM's generation stops at: --text-end's (OPT: "\\n"), else </s>."""
    from .blip2 import end_ids
    return end_ids(cfg, tok, True)[0]


def hf_map(model, cfg, target):
    """Our keys -> a transformers BLIP-2 folder's: load_hf's mapping, read the other way."""
    m = eva_hf_map(cfg)
    m.update(qformer_map(cfg, "qformer", text_ffn=cfg.stage == 1, hf=True))
    m["query_tokens"] = "query_tokens"
    if cfg.stage == 2:
        m.update(llm_map(model, target))
        return m
    m.update({"qformer.word_embeddings.weight": "embeddings.word_embeddings.weight",
              "qformer.position_embeddings.weight": "embeddings.position_embeddings.weight"})
    m.update({f"{a}.{p}": f"{b}.{p}" for p in ("weight", "bias") for a, b in
              (("vision_proj", "vision_projection"), ("text_proj", "text_projection"),
               ("itm_head", "itm_head"))})
    return m


def itg_state(model):
    """What Blip2ForImageTextRetrieval cannot hold, under our names: ITG's LM head (its decoder
    weight is the word embeddings, which the folder has) and the ITC temperature."""
    return {k: v for k, v in model.state_dict().items()
            if k == "temp" or k.startswith("lm_head.") and k != "lm_head.decoder.weight"}


def export_hf(model, cfg, tokenizer, llm_tokenizer, folder, config):
    """config.json (hf_config's) + model.safetensors (+ generation_config.json in stage 2) +
    Blip2Processor's files: our preprocessing, and the Q-Former's tokenizer (stage 1) or the LM's
    with <image>."""
    from transformers import (Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval,
                              Blip2Processor)
    cls = Blip2ForImageTextRetrieval if cfg.stage == 1 else Blip2ForConditionalGeneration
    with torch.device("meta"):                                 # shapes only, nothing allocated
        target = cls(config).state_dict()
    state = export_state(model.state_dict(), hf_map(model, cfg, target), target,
                         source="--export transformers", skip=("position_ids",))
    config.save_pretrained(folder)
    save_safetensors(state, os.path.join(folder, "model.safetensors"))
    if cfg.stage == 1:
        save_safetensors(itg_state(model), os.path.join(folder, ITG_FILE))
        # the processor adds an <image> token to its tokenizer when it has none; the Q-Former's
        # files are written again after it without one (its ids are the embedding rows)
        tok = save_tokenizer(tokenizer, folder, cfg.max_length, bos_token="[DEC]")
        Blip2Processor(image_processor(cfg), copy.deepcopy(tok)).save_pretrained(folder)
        save_tokenizer(tokenizer, folder, cfg.max_length, bos_token="[DEC]")
        return
    tok = copy.deepcopy(llm_tokenizer)
    tok.padding_side = "left" if model.decoder_only else "right"    # as our prompt batches
    tok.init_kwargs["padding_side"] = tok.padding_side          # what save_pretrained writes
    tok.model_max_length = cfg.max_length
    processor = Blip2Processor(image_processor(cfg), tok, num_query_tokens=cfg.num_query_tokens)
    if processor.tokenizer.convert_tokens_to_ids("<image>") != config.image_token_index:
        raise UserError(f"--export transformers: the tokenizer's <image> id is not "
                        f"{config.image_token_index}")
    processor.save_pretrained(folder)
    generation_config(cfg, tok, model.decoder_only).save_pretrained(folder)


def generation_config(cfg, tok, decoder_only):
    """Our caption decoding: beam search (or nucleus sampling), its lengths, our end of text."""
    from transformers import GenerationConfig
    search = (dict(do_sample=True, top_p=0.9, top_k=0, num_beams=1) if cfg.nucleus else
              dict(do_sample=False, num_beams=cfg.num_beams))
    return GenerationConfig(max_new_tokens=cfg.max_gen_length, min_new_tokens=cfg.min_gen_length,
                            eos_token_id=(end_of_text(cfg, tok) if decoder_only
                                          else tok.eos_token_id),
                            pad_token_id=tok.pad_token_id,
                            bos_token_id=tok.bos_token_id, **search)


# ---- LAVIS ----

def lavis_state(model, cfg):
    """LAVIS's state dict of our model (Blip2Qformer's names in stage 1, blip2_opt's / blip2_t5's
    in stage 2), holding what LAVIS's runner saves: what trained, plus a frozen encoder or LM not
    read from a file (a random one of its seed, which LAVIS cannot rebuild)."""
    ours = model.state_dict()
    m = qformer_map(cfg, "Qformer.bert", text_ffn=cfg.stage == 1, hf=False)
    names = ["ln_vision"]
    if cfg.stage == 1:
        m.update(hf_bert_lm_head_map("lm_head", "Qformer.cls.predictions"))
        names += ["vision_proj", "text_proj", "itm_head"]
        m["temp"] = "temp"
    else:
        for k in ("qformer.word_embeddings.weight", "qformer.position_embeddings.weight"):
            m.pop(k, None)
    m.update({f"{n}.{p}": f"{n}.{p}" for n in names for p in ("weight", "bias")})
    m["query_tokens"] = "query_tokens"
    lm = "opt" if cfg.stage == 2 and model.decoder_only else "t5"
    if cfg.stage == 2:
        m.update({f"language_projection.{p}": f"{lm}_proj.{p}" for p in ("weight", "bias")})
    # trained (the checkpoint holds it), or no file to rebuild it from
    vision = model.vision_from_checkpoint or not model.vision_frozen or not cfg.vision_weights
    if vision:
        if cfg.vision != "eva":
            raise UserError("--export-format lavis: a clip-l encoder that trained or has no "
                            "--vision-weights file is not written in LAVIS's clip_vit layout")
        m.update(lavis_vision_map(cfg))
    llm = cfg.stage == 2 and (model.llm_from_checkpoint or not model.llm_frozen or not cfg.llm)
    if llm:
        m.update({k: f"{lm}_model.{k[len('language_model.'):]}" for k in ours
                  if k.startswith("language_model.")})
    # LAVIS's shapes are ours, except the encoder's class token and positions (a batch dim)
    shapes = {"visual_encoder.cls_token": (1, 1, -1), "visual_encoder.pos_embed": (1, -1, ours[
        "visual_encoder.positional_embedding"].shape[-1])}
    target = {}
    for key, dst in m.items():
        parts = dst if isinstance(dst, tuple) else (dst,)
        for d, part in zip(parts, ours[key].chunk(len(parts)) if len(parts) > 1 else [ours[key]]):
            target[d] = part.reshape(shapes.get(d, part.shape))
    state = export_state(ours, m, target, source="--export lavis")
    for i in range(cfg.vision_layers if vision else 0):           # EVA: q and v biases, no k bias
        b = f"visual_encoder.blocks.{i}.attn."
        q, _, v = state.pop(b + "qkv.bias").chunk(3)
        state[b + "q_bias"], state[b + "v_bias"] = q, v
    n = cfg.max_positions
    state["Qformer.bert.embeddings.position_ids"] = torch.arange(n).expand(1, n).clone()
    if cfg.stage == 1:                   # the decoder, tied in LAVIS, is saved under both names
        state["Qformer.cls.predictions.decoder.weight"] = state[
            "Qformer.bert.embeddings.word_embeddings.weight"]
        state["Qformer.cls.predictions.decoder.bias"] = state["Qformer.cls.predictions.bias"]
    return state, vision, llm


def export_lavis(state, cfg, tokenizer, llm_tokenizer, folder):
    """{folder}/blip2.pth: {"model": lavis_state's}, and the tokenizer(s) the run read."""
    torch.save({"model": {k: v.contiguous().clone() for k, v in state.items()}},
               os.path.join(folder, LAVIS_FILE))
    if tokenizer is not None:
        save_tokenizer(tokenizer, folder, cfg.max_length, bos_token="[DEC]")
    if llm_tokenizer is not None:
        llm_tokenizer.save_pretrained(os.path.join(folder, "llm_tokenizer"))


LAVIS_FILE = "blip2.pth"

LOAD = {1: """from transformers import Blip2ForImageTextRetrieval, Blip2Processor
model = Blip2ForImageTextRetrieval.from_pretrained("{path}")
processor = Blip2Processor.from_pretrained("{path}")
inputs = processor(images=image, text=["a photo of a cat"], return_tensors="pt",
                   padding="max_length", truncation=True)
itm = model(**inputs, use_image_text_matching_head=True).logits_per_image   # (1, 2): no / yes
itc = model(**inputs, use_image_text_matching_head=False).logits_per_image  # best query cosine""",
        2: """from transformers import Blip2ForConditionalGeneration, Blip2Processor
model = Blip2ForConditionalGeneration.from_pretrained("{path}")
processor = Blip2Processor.from_pretrained("{path}")
inputs = processor(images=image, text={prompt}, return_tensors="pt")   # adds the <image> tokens
out = model.generate(**inputs, generation_config=model.generation_config)   # our decoding
{cut}print([c.strip() for c in processor.batch_decode(out, skip_special_tokens=True)])""",
        "lavis": """from lavis.models import load_model
model = load_model("{name}", "{model_type}", is_eval=True)  # its config's architecture
model.load_checkpoint("{path}/{file}")"""}


ECHO = 'out = out[:, inputs["input_ids"].shape[1]:]   # a decoder-only LM echoes the prompt\n'


def differences(model, cfg, fmt, vision, llm):
    """What the target computes or holds differently, one line each."""
    out = []
    if fmt == "transformers" and cfg.ln_vision_eps != cfg.vision_eps:
        out.append(f"post_layernorm (LAVIS's ln_vision) runs at the encoder's layer_norm_eps "
                   f"{cfg.vision_eps:g}, trained at {cfg.ln_vision_eps:g}: transformers has one "
                   f"epsilon for both (image features differ by about that much)")
    if fmt == "transformers" and cfg.stage == 1:
        out.append(f"no ITG head and no ITC temperature in Blip2ForImageTextRetrieval (its ITC "
                   f"score is the cosine, ours over temp = {float(model.temp.detach()):.4f}); "
                   f"both are in {ITG_FILE}, which our --init-from reads")
    if fmt == "transformers" and cfg.stage == 2 and cfg.llm:
        out.append(f"the language model is a copy of {cfg.llm}"
                   + (" (trained here)" if model.llm_from_checkpoint else " (unchanged)"))
    if fmt == "transformers" and cfg.stage == 2:
        out.append("generate() uses generation_config.json only when passed "
                   "(generation_config=model.generation_config), as the load snippet does")
    if fmt == "lavis":
        eps = [("ln_vision", cfg.ln_vision_eps, 1e-5), ("Q-Former", cfg.qformer_eps, 1e-12)]
        eps += [("EVA encoder", cfg.vision_eps, 1e-6)] if cfg.vision == "eva" else []
        for name, ours, theirs in eps:                   # LAVIS's are fixed in its code
            if ours != theirs:
                out.append(f"LAVIS builds its {name} LayerNorms with eps {theirs:g}, this run's "
                           f"is {ours:g}")
        out.append("the image encoder is in the file" if vision else
                   f"the frozen image encoder is not in the file: LAVIS builds it ({cfg.vision}); "
                   f"ours was {cfg.vision_weights}")
        if cfg.stage == 2:
            out.append("the language model is in the file" if llm else
                       f"the frozen language model is not in the file: LAVIS loads it by name "
                       f"(opt_model / t5_model = {cfg.llm})")
        out.append(f"the config's architecture must be this run's (LAVIS reads no sizes from the "
                   f"file): Q-Former {cfg.qformer_layers} x {cfg.qformer_width}, "
                   f"{cfg.num_query_tokens} queries, encoder {cfg.vision_layers} x "
                   f"{cfg.vision_width} at {cfg.image_size} px")
    return out


def export(model, cfg, tokenizer, llm_tokenizer, source):
    """--export: the model in --export-format (transformers, the default, or lavis), with its
    tokenizer(s), preprocessing and a model card."""
    fmt = cfg.export_format or TARGETS[0]
    model = model.cpu().eval()
    vision = llm = config = None                            # refusals before the folder exists
    if fmt == "lavis":
        state, vision, llm = lavis_state(model, cfg)
    else:
        config = hf_config(model, cfg, llm_tokenizer)
    with new_folder(cfg.export) as folder:
        if fmt == "transformers":
            export_hf(model, cfg, tokenizer, llm_tokenizer, folder, config)
        else:
            export_lavis(state, cfg, tokenizer, llm_tokenizer, folder)
        path = os.path.abspath(cfg.export)
        decoder = cfg.stage == 2 and model.decoder_only
        load = LOAD["lavis" if fmt == "lavis" else cfg.stage].format(
            path=path, prompt=repr(cfg.prompt.rstrip(" ") if decoder else cfg.prompt),
            file=LAVIS_FILE, cut=ECHO if decoder else "",
            name="blip2" if cfg.stage == 1 else "blip2_opt" if decoder else "blip2_t5",
            model_type="pretrain" if cfg.stage == 1 else lavis_model_type(cfg, decoder))
        task = "image-text retrieval" if cfg.stage == 1 else "image-to-text"
        preset = (source["config"] or {}).get("preset", cfg.preset)
        model_card(folder, title=f"BLIP-2 {preset} (stage {cfg.stage})", method="blip2",
                   source=source, library="transformers" if fmt == "transformers" else "lavis",
                   target={"transformers": f"a transformers Blip2For"
                           f"{'ImageTextRetrieval' if cfg.stage == 1 else 'ConditionalGeneration'}",
                           "lavis": "LAVIS's .pth layout"}[fmt],
                   load=load, tags=(task.replace(" ", "-"),),
                   differences=differences(model, cfg, fmt, vision, llm))
    if dist.is_main():
        print(f"exported {fmt} (stage {cfg.stage}) to {cfg.export}", flush=True)
    return {"export": cfg.export, "format": fmt, "stage": cfg.stage}
