"""BLIP-2 weights from other projects, and the --init-from dispatch: transformers' BLIP-2 folders
(Blip2ForImageTextRetrieval, Blip2ForConditionalGeneration), LAVIS's stage-1 file
(blip2_pretrained.pth), the frozen image encoders (LAVIS's eva_vit_g.pth, a transformers BLIP-2 or
CLIP folder, OpenAI's clip_vit_L.pth), a BERT for --init-text, the stage-2 language model (--llm),
and our own checkpoints, whose frozen parts are rebuilt from their sources and checked by
fingerprint. The functions take the model (blip2_train.BLIP2) or its class's builder and return
plain dicts of Config fields; nothing here imports the script. Differences from the official code:
docs/blip2.md."""
import dataclasses
import json
import os

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint as recompute

from .. import dist
from ..encoders import (hf_bert_lm_head_map, hf_bert_map, hf_blip_vision_map, hf_clip_vision_map,
                        load_mapped, open_clip_vision_map, read_hf_checkpoint, read_weights_file,
                        resize_pos_embed, timm_vit_map)
from ..data import load_tokenizer, tiny_data
from ..utils import MissingFileError, UserError

# What a model's weights fix (taken from an --init-from source).
MODEL_FIELDS = ("vision", "image_size", "patch_size", "vision_width", "vision_layers",
                "vision_heads", "vision_mlp_dim", "vision_eps", "ln_vision_eps", "num_query_tokens",
                "qformer_width", "qformer_layers", "qformer_heads", "qformer_mlp_dim",
                "cross_attention_freq", "max_positions", "qformer_eps", "vocab_size", "embed_dim")
# Set by the run, not by the weights: an --init-from of our checkpoint keeps these from the command
# line or the task recipe (fine-tuning at 364 px from 224 px interpolates the encoder's positions).
RUN_FIELDS = ("image_size",)
# Where a stage-2 checkpoint's language model comes from (rebuilt on resume, unless it was saved).
LLM_FIELDS = ("llm", "llm_width", "llm_layers", "llm_heads", "llm_mlp_dim")


def fingerprint(module):
    """A number that changes when any weight does: the frozen encoder is not saved in our
    checkpoints but rebuilt from its source, and this checks the rebuilt one is the same. The
    position table is left out: a run at another image size interpolates it."""
    with torch.no_grad():
        return float(sum(p.double().square().sum() + p.double().sum()
                         for n, p in module.named_parameters() if n != "positional_embedding"))



def is_generation_folder(config):
    """A Blip2ForConditionalGeneration folder's config.json (a retrieval folder's has a default
    text_config too, and no language model)."""
    return "Blip2ForConditionalGeneration" in (config.get("architectures") or [])


def llm_from_config(text_config, source):
    """An LM with random weights from a Blip2ForConditionalGeneration config's text_config (OPT:
    AutoModelForCausalLM; T5: AutoModelForSeq2SeqLM); its weights are loaded by the caller."""
    from transformers import AutoConfig
    if "model_type" not in text_config:
        raise UserError(f"{source}: text_config has no model_type")
    config = AutoConfig.for_model(**text_config)
    return llm_class(config).from_config(config)


def llm_class(config):
    """transformers' auto class of a language model config: FlanT5 is an encoder-decoder."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM
    return AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM


def llm_map(model, state):
    """language_projection and language_model.* <- the same names in a Blip2ForConditionalGeneration
    file; a tied weight the file holds once (OPT's lm_head = embed_tokens, T5's encoder / decoder
    embed_tokens = shared) is read from the key it is tied to."""
    m = {f"language_projection.{p}": f"language_projection.{p}" for p in ("weight", "bias")}
    tied = {}
    for k, v in model.language_model.state_dict(keep_vars=True).items():
        tied.setdefault(id(v), []).append(f"language_model.{k}")
    for group in tied.values():
        present = [k for k in group if k in state]
        for k in group:
            m[k] = k if k in state else (present[0] if present else k)
    return m


def load_llm(path):
    """--llm: a transformers LM folder (OPT, FlanT5, any AutoModelForCausalLM / Seq2SeqLM), or a
    Blip2ForConditionalGeneration folder, whose language_model.* weights are read."""
    from transformers import AutoConfig
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise MissingFileError(f"--llm {path}: no config.json; expected a transformers language "
                               f"model folder")
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    if is_generation_folder(config):
        _, state = read_hf_checkpoint(path)
        holder = nn.Module()
        holder.language_model = llm_from_config(config["text_config"], path)
        mapping = {k: v for k, v in llm_map(holder, state).items()
                   if k.startswith("language_model.")}
        load_mapped(holder, state, mapping, source=path,
                    ignore=("vision_model.", "qformer.", "query_tokens", "language_projection.",
                            "embeddings."))
        return holder.language_model
    return llm_class(AutoConfig.from_pretrained(path)).from_pretrained(path)


def qformer_map(cfg, prefix, *, text_ffn, hf):
    """Our QFormer <- LAVIS's Qformer.bert (BERT names: attention.self.*, embeddings.LayerNorm) or
    transformers' qformer (attention.attention.*, the embedding norm as qformer.layernorm, the word
    and position embeddings outside it: the caller maps those). Query FFNs: intermediate_query,
    output_query. Without `text_ffn` the text FFNs are left out (a stage-2 Q-Former has none)."""
    L = cfg.qformer_layers
    m = hf_bert_map("qformer", prefix, L, cross_layers=range(0, L, cfg.cross_attention_freq),
                    token_types=False)
    for p in ("weight", "bias"):
        for i in range(L):
            o, t = f"qformer.layer.{i}", f"{prefix}.encoder.layer.{i}"
            m[f"{o}.intermediate_query.{p}"] = f"{t}.intermediate_query.dense.{p}"
            m[f"{o}.output_query.{p}"] = f"{t}.output_query.dense.{p}"
            m[f"{o}.output_query_norm.{p}"] = f"{t}.output_query.LayerNorm.{p}"
            if not text_ffn:
                for name in ("intermediate", "output", "output_norm"):
                    del m[f"{o}.{name}.{p}"]
    if hf:   # transformers' renames (convert_blip_2_original_to_pytorch.py)
        m = {k: tuple(x.replace(".self.", ".attention.") for x in v) if isinstance(v, tuple)
             else v.replace(".self.", ".attention.") for k, v in m.items()}
        for p in ("weight", "bias"):
            m[f"qformer.embed_norm.{p}"] = f"{prefix}.layernorm.{p}"
        del m["qformer.word_embeddings.weight"], m["qformer.position_embeddings.weight"]
    return m


def eva_hf_map(cfg):
    """visual_encoder + ln_vision <- transformers' Blip2VisionModel ('vision_model': BLIP's vision
    names; its post_layernorm is LAVIS's ln_vision)."""
    m = hf_blip_vision_map("visual_encoder", "vision_model", cfg.vision_layers)
    for p in ("weight", "bias"):
        m[f"ln_vision.{p}"] = m.pop(f"visual_encoder.ln_post.{p}")
    return m


HF_QKV_BIAS = "vision_model.encoder.layers.{}.self_attn.qkv.bias"     # q, 0, v in transformers


def check_eva_k_bias(state, key, cfg, source):
    """EVA has no k bias: transformers folds q, 0, v into one qkv bias; its k third must be zero."""
    D = cfg.vision_width
    for i in range(cfg.vision_layers):
        k_bias = state[key.format(i)][D:2 * D]
        if k_bias.abs().max() > 0:
            raise UserError(f"{source}: '{key.format(i)}' has a non-zero k bias (max |b| "
                            f"{float(k_bias.abs().max()):.3g}); "
                            f"EVA's attention has none, so this is not an EVA encoder")
    return state


# transformers config fields our modules have one value of (EVA's and the Q-Former's): another value
# would change the numbers, so it is refused (dropout is the run's: --dropout; the encoder has none)
HF_FIXED = {"vision_config": dict(hidden_act="gelu", qkv_bias=True),
            "qformer_config": dict(hidden_act="gelu", position_embedding_type="absolute")}


def hf_architecture(config, state, path):
    """Config fields of a transformers BLIP-2 folder (config.json: vision_config, qformer_config):
    every field that changes the numbers is taken (sizes as sizes) or, where our modules have one
    value only (HF_FIXED), refused naming it."""
    try:
        v, q = config["vision_config"], config["qformer_config"]
        for part, fixed in HF_FIXED.items():
            for k, want in fixed.items():
                if config[part].get(k, want) != want:
                    raise UserError(f"{path}: {part}.{k} is {config[part][k]!r}; this BLIP-2 has "
                                    f"{want!r} only")
        words = state.get("embeddings.word_embeddings.weight")
        eps = v.get("layer_norm_eps", 1e-6)     # the encoder's norms and post_layernorm (ln_vision)
        return dict(image_size=v.get("image_size", 224), patch_size=v.get("patch_size", 14),
                    vision_width=v["hidden_size"], vision_layers=v.get("num_hidden_layers", 39),
                    vision_heads=v.get("num_attention_heads", 16),
                    vision_mlp_dim=v.get("intermediate_size", 6144), vision_eps=eps,
                    ln_vision_eps=eps,
                    num_query_tokens=config.get("num_query_tokens", 32),
                    qformer_width=q.get("hidden_size", 768),
                    qformer_layers=q.get("num_hidden_layers", 12),
                    qformer_heads=q.get("num_attention_heads", 12),
                    qformer_mlp_dim=q.get("intermediate_size", 3072),
                    cross_attention_freq=q.get("cross_attention_frequency", 2),
                    max_positions=q.get("max_position_embeddings", 512),
                    qformer_eps=q.get("layer_norm_eps", 1e-12),
                    embed_dim=config.get("image_text_hidden_size", 256),
                    # without text embeddings (ConditionalGeneration) the text side starts new:
                    # the tokenizer's
                    **({"vocab_size": words.shape[0]} if words is not None else {}))
    except (KeyError, TypeError) as e:
        raise UserError(f"{path}: not a transformers BLIP-2 config ({type(e).__name__}: {e})") \
            from None


def lavis_architecture(state, path):
    """Q-Former fields of a LAVIS checkpoint, read off its shapes. No tensor shows the head count:
    width / 64, bert-base's (every released checkpoint), unless --qformer-heads is given."""
    b = "Qformer.bert."
    try:
        vocab, D = state[b + "embeddings.word_embeddings.weight"].shape
        layers = 1 + max(int(k[len(b):].split(".")[2]) for k in state
                         if k.startswith(b + "encoder.layer."))
        cross = sorted({int(k[len(b):].split(".")[2]) for k in state if ".crossattention." in k})
        mlp = state[b + "encoder.layer.0.intermediate.dense.weight"].shape[0]
        return dict(num_query_tokens=state["query_tokens"].shape[1], qformer_width=D,
                    qformer_layers=layers, qformer_heads=max(1, D // 64), qformer_mlp_dim=mlp,
                    cross_attention_freq=cross[1] - cross[0] if len(cross) > 1 else layers,
                    max_positions=state[b + "embeddings.position_embeddings.weight"].shape[0],
                    vocab_size=vocab,
                    embed_dim=state["vision_proj.weight"].shape[0],
                    vision_width=state[b + "encoder.layer.0.crossattention.self.key.weight"]
                    .shape[1])
    except (KeyError, ValueError, IndexError) as e:
        raise UserError(f"{path}: not in LAVIS's Blip2Qformer key layout ({type(e).__name__}: "
                        f"{e})") from None


def load_vision(model, cfg):
    """The frozen encoder from cfg.vision_weights (nothing: it stays the random one of its seed).
    eva: LAVIS's eva_vit_g.pth (timm names, separate q_bias / v_bias, 40 blocks of which the last
    is dropped) or a transformers BLIP-2 folder; clip-l: a transformers CLIP folder or an OpenAI-
    format state dict (clip_vit_L.pth, bare or under 'visual.'), without its last layer and ln_post.
    Positions are interpolated to the run's image size; every weight of ours must be in the file;
    what is left over (the dropped layer, heads) is named."""
    path, L, grid = cfg.vision_weights, cfg.vision_layers, cfg.image_size // cfg.patch_size
    if not path:
        return
    holder = nn.Module()                           # our keys 'visual_encoder.*' and nothing else
    holder.visual_encoder = model.visual_encoder
    if os.path.isdir(path):
        config, state = read_hf_checkpoint(path)
        v = config.get("vision_config") or config           # a whole model's, or a vision model's
        act = "quick_gelu" if cfg.vision == "clip-l" else "gelu"
        for k, ours, flag in (("layer_norm_eps", cfg.vision_eps, "--vision-eps"),
                              ("hidden_act", act, "--vision")):
            if v.get(k, ours) != ours:
                raise UserError(f"--vision-weights {path}: its {k} is {v[k]!r}, this encoder's "
                                f"{ours!r} ({flag})")
        # a whole model's folder (Blip2*, CLIPModel) keeps the tower under vision_model.; a bare
        # Blip2VisionModel / CLIPVisionModel folder (transformers 5) at the top level
        if not any(k.startswith("vision_model.") for k in state):
            state = {"vision_model." + k: v for k, v in state.items()}
        if cfg.vision == "eva":
            pos = "vision_model.embeddings.position_embedding"
            state = check_eva_k_bias(state, HF_QKV_BIAS, cfg, path)
            mapping = eva_hf_map(cfg)
            del mapping["ln_vision.weight"], mapping["ln_vision.bias"]
        else:
            pos = "vision_model.embeddings.position_embedding.weight"
            mapping = hf_clip_vision_map("visual_encoder", "vision_model", L)
            del mapping["visual_encoder.ln_post.weight"], mapping["visual_encoder.ln_post.bias"]
    else:
        state = dict(read_weights_file(path)[1])
        if cfg.vision == "eva":
            pos = "pos_embed"
            blocks = {int(k.split(".")[1]) for k in state if k.startswith("blocks.")}
            if blocks and len(blocks) < L:
                raise UserError(f"--vision-weights {path}: {len(blocks)} blocks, the encoder needs "
                                f"{L} (--vision-layers)")
            for i in range(L):
                q, v = state.get(f"blocks.{i}.attn.q_bias"), state.get(f"blocks.{i}.attn.v_bias")
                if q is None or v is None:
                    raise UserError(f"{path}: no 'blocks.{i}.attn.q_bias' / 'v_bias': not an EVA "
                                    f"ViT (eva_vit_g.pth)")
                state[f"blocks.{i}.attn.qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])
            mapping = timm_vit_map("visual_encoder", "", L)
            del mapping["visual_encoder.ln_post.weight"], mapping["visual_encoder.ln_post.bias"]
        else:
            prefix = "visual" if "visual.conv1.weight" in state else ""
            pos = f"{prefix}.positional_embedding" if prefix else "positional_embedding"
            mapping = open_clip_vision_map("visual_encoder", prefix, L)
            if not prefix:
                mapping = {k: v.lstrip(".") if isinstance(v, str) else
                           tuple(x.lstrip(".") for x in v)
                           for k, v in mapping.items()}
    if pos not in state:
        raise UserError(f"--vision-weights {path}: no '{pos}'; not a {cfg.vision} encoder in a "
                        f"format we read")
    state[pos] = resize_pos_embed(state[pos].reshape(-1, state[pos].shape[-1]), grid)
    used = {x for v in mapping.values() for x in (v if isinstance(v, tuple) else (v,))}
    merged = {k for k in state
              if k.endswith((".attn.q_bias", ".attn.v_bias")) and int(k.split(".")[1]) < L}
    left = sorted(k for k in state if k not in used and k not in merged)
    load_mapped(holder, state, mapping, source=path, ignore=tuple(left) + tuple(merged))
    if left and dist.is_main():
        print(f"--vision-weights {path}: {len(left)} key(s) not used (the dropped last layer, "
              f"norms, heads, "
              f"the text side): {', '.join(left[:4])}{', ...' if len(left) > 4 else ''}")


def load_text_init(model, path):
    """--init-text: a transformers BERT folder (bert-base-uncased) into the Q-Former's embeddings,
    self-attention and text FFNs, and the query FFNs too ("initialised from the text ones", as
    LAVIS's init_Qformer); cross-attention keeps its initialisation, and the LM head comes from
    cls.predictions when there is one. [DEC]'s row (one past BERT's vocabulary) stays new."""
    _, state = read_hf_checkpoint(path)
    cfg = model.cfg
    pre = "bert" if any(k.startswith("bert.") for k in state) else ""
    dot = f"{pre}." if pre else ""
    L = cfg.qformer_layers
    mapping = hf_bert_map("qformer", pre, L, token_types=False)
    for i in range(L):
        for p in ("weight", "bias"):
            o = f"qformer.layer.{i}"
            mapping.update({f"{o}.intermediate_query.{p}": mapping[f"{o}.intermediate.{p}"],
                            f"{o}.output_query.{p}": mapping[f"{o}.output.{p}"],
                            f"{o}.output_query_norm.{p}": mapping[f"{o}.output_norm.{p}"]})
    state = dict(state)
    words = f"{dot}embeddings.word_embeddings.weight"
    ours_words = model.qformer.word_embeddings.weight.detach()
    n = state[words].shape[0]
    if n < ours_words.shape[0]:             # BERT's 30522 + our [DEC]: the new rows stay ours
        state[words] = torch.cat([state[words], ours_words[n:]])
    keep = [f"qformer.layer.{i}.crossattention." for i in range(0, L, cfg.cross_attention_freq)]
    holder = nn.Module()
    holder.qformer, holder.lm_head = model.qformer, model.lm_head
    if "cls.predictions.bias" in state:
        bias = state["cls.predictions.bias"]
        state["cls.predictions.bias"] = torch.cat(
            [bias, torch.zeros(ours_words.shape[0] - bias.shape[0])])
        mapping.update(hf_bert_lm_head_map("lm_head", "cls.predictions", tied_to=words))
    else:
        mapping["lm_head.decoder.weight"] = words
        keep += ["lm_head.dense.", "lm_head.LayerNorm.", "lm_head.decoder.bias"]
    load_mapped(holder, state, mapping, source=path, keep_init=keep,
                ignore=("position_ids", "pooler.", "token_type_embeddings", "cls.seq_relationship.",
                        "cls.predictions.decoder."))


def read_init(path):
    """What an --init-from is, read once: ('hf', {"config": its config.json, "state": its weights})
    for a transformers folder, ('lavis', its state dict) for LAVIS's stage-1 file, ('ours', our
    checkpoint); (None, None) without one."""
    if not path:
        return None, None
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise MissingFileError(f"--init-from {path}: no config.json; expected a transformers "
                                   f"BLIP-2 folder")
        return "hf", dict(zip(("config", "state"), read_hf_checkpoint(path)))
    saved, state = read_weights_file(path)
    if "Qformer.bert.embeddings.LayerNorm.weight" in state:
        return "lavis", state
    if isinstance(saved, dict) and "config" in saved and "qformer.embed_norm.weight" in state:
        return "ours", saved
    other = saved.get("method") if isinstance(saved, dict) else None
    if other and other != "blip2":
        raise UserError(f"--init-from {path} is a {other} checkpoint ({other}_train.py's), not "
                        f"one of blip2_train.py's")
    raise UserError(f"--init-from {path}: neither a transformers BLIP-2 folder, LAVIS's "
                    f"blip2_pretrained.pth nor one of our BLIP-2 checkpoints (its keys start "
                    f"{sorted(state)[:3]})")


def init_stage(kind, saved):
    """The stage an --init-from holds: 2 for a Blip2ForConditionalGeneration folder or one of our
    stage-2 checkpoints, 1 for the rest (a retrieval folder, LAVIS's file, our stage-1
    checkpoint)."""
    return 2 if (kind == "hf" and is_generation_folder(saved["config"])
                 or kind == "ours" and saved["config"].get("stage", 1) == 2) else 1


def load_trainable(model, saved, source, check_vision=True):
    """Our checkpoint's weights (all but a frozen encoder) into `model`; its encoder must be the
    one the checkpoint was trained with (same fingerprint), unless another was asked for."""
    state = dict(saved["model"])
    key = "visual_encoder.positional_embedding"
    if key in state:
        state[key] = resize_pos_embed(state[key], model.cfg.image_size // model.cfg.patch_size)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(("visual_encoder.", "language_model."))]
    if missing or unexpected:
        raise UserError(f"{source}: keys {(missing or unexpected)[:4]} do not match this model")
    model.vision_from_checkpoint = any(k.startswith("visual_encoder.") for k in state)
    if model.cfg.stage == 2:
        model.llm_from_checkpoint = any(k.startswith("language_model.") for k in state)
        if not model.llm_from_checkpoint and saved.get("llm_fingerprint"):
            now = fingerprint(model.language_model)
            if abs(now - saved["llm_fingerprint"]) > 1e-6 * abs(saved["llm_fingerprint"]):
                raise UserError(f"{source}: the language model rebuilt from {model.cfg.llm} is not "
                                f"the one this checkpoint was trained with (fingerprint {now:.6g} "
                                f"vs {saved['llm_fingerprint']:.6g})")
    trained = any(k.startswith("visual_encoder.") for k in state)
    if check_vision and not trained and saved.get("vision_fingerprint"):
        now = fingerprint(model.visual_encoder)
        if abs(now - saved["vision_fingerprint"]) > 1e-6 * abs(saved["vision_fingerprint"]):
            hint = ("" if model.cfg.vision_weights else
                    f"; a random encoder is its seed at one image size "
                    f"({saved['config']['image_size']} px here)")
            raise UserError(f"{source}: the frozen image encoder rebuilt from "
                            f"{model.cfg.vision_weights or 'its seed'} is not the one this "
                            f"checkpoint was trained with (fingerprint {now:.6g} vs "
                            f"{saved['vision_fingerprint']:.6g}){hint}")


def hf_fields(config, state, path, stage):
    """The Config fields a transformers BLIP-2 folder fixes: hf_architecture's, EVA's layout, and in
    stage 2 its language model (the folder itself)."""
    fields = {**hf_architecture(config, state, path), "vision": "eva"}
    if stage == 2 and not any(k.startswith("language_model.") for k in state):
        raise UserError(f"{path}: no language model (text_config) in this folder; stage 2 loads a "
                        f"Blip2ForConditionalGeneration folder (or starts from stage 1 with --llm)")
    return {**fields, "llm": path} if stage == 2 else fields


def from_hf(path, cfg, config_class, build):
    """BLIP2.from_hf: the model of a transformers BLIP-2 folder, `build(cfg, llm)` at its
    architecture (over `cfg`, else the class's defaults at the folder's stage), every weight loaded.
    An --image-size named on the command line stays (the positions are interpolated to it)."""
    config, state = read_hf_checkpoint(path)
    if cfg is None:
        cfg = config_class(stage=2 if any(k.startswith("language_model.") for k in state) else 1)
    fields = hf_fields(config, state, path, cfg.stage)
    if "image_size" in getattr(cfg, "explicit_keys", ()):
        fields.pop("image_size")
    cfg = dataclasses.replace(cfg, **fields)
    model = build(cfg, llm_from_config(config["text_config"], path) if cfg.stage == 2 else None)
    load_hf(model, state, path)
    return model


def load_hf(model, state, path):
    """A transformers BLIP-2 folder's weights into `model` (built at its hf_fields). Every key is
    mapped and shape-checked; what the folder lacks (ITG's LM head, which transformers does not
    have, and for ConditionalGeneration in stage 1 the text side) keeps its initialisation and is
    named."""
    cfg = model.cfg
    state = check_eva_k_bias(dict(state), HF_QKV_BIAS, cfg, path)
    state["vision_model.embeddings.position_embedding"] = resize_pos_embed(
        state["vision_model.embeddings.position_embedding"][0], cfg.image_size // cfg.patch_size)
    mapping = eva_hf_map(cfg)
    text = "embeddings.word_embeddings.weight" in state and cfg.stage == 1
    mapping.update(qformer_map(cfg, "qformer", text_ffn=text, hf=True))
    mapping["query_tokens"] = "query_tokens"
    if cfg.stage == 2:   # ConditionalGeneration: vision, Q-Former, projection and LM; nothing new
        mapping.update(llm_map(model, state))
        load_mapped(model, state, mapping, source=path, ignore=("position_ids",))
        if dist.is_main():
            print(f"{path}: loaded every weight (vision, Q-Former, language_projection, "
                  f"{type(model.language_model).__name__})")
        return
    keep = ["lm_head.", "temp"]
    itg = os.path.join(path, "itg_head.safetensors")       # our export's: ITG's head and temp
    if text and os.path.isfile(itg):
        from safetensors.torch import load_file
        head = load_file(itg)
        state.update(head)
        mapping.update({k: k for k in head})
        mapping["lm_head.decoder.weight"] = "embeddings.word_embeddings.weight"   # tied
        keep = []
    if text:
        mapping.update({"qformer.word_embeddings.weight": "embeddings.word_embeddings.weight",
                        "qformer.position_embeddings.weight":
                            "embeddings.position_embeddings.weight"})
        mapping.update({f"{a}.{p}": f"{b}.{p}" for p in ("weight", "bias") for a, b in
                        (("vision_proj", "vision_projection"), ("text_proj", "text_projection"),
                         ("itm_head", "itm_head"))})
    else:
        keep += ["qformer.word_embeddings.", "qformer.position_embeddings.", "vision_proj.",
                 "text_proj.", "itm_head."]
        keep += [f"qformer.layer.{i}.{m}" for i in range(cfg.qformer_layers)
                 for m in ("intermediate.", "output.", "output_norm.")]
    load_mapped(model, state, mapping, source=path, keep_init=keep,
                ignore=("position_ids", "language_projection.", "language_model."))
    if dist.is_main() and not keep:
        print(f"{path}: loaded every weight (ITG's head and temp from {os.path.basename(itg)})")
    elif dist.is_main():
        lacking = "ITG's LM head" + (
            "" if text else ", the text side (embeddings, text FFNs, projections, ITM)")
        print(f"{path}: loaded every image-side and Q-Former weight; not in a transformers "
              f"folder: {lacking}")


def from_lavis(path, cfg, config_class, build, state=None):
    """BLIP2.from_lavis: the model of LAVIS's stage-1 file, `build(cfg)` at its architecture (over
    `cfg`, else the class's defaults), every weight loaded; the encoder from cfg.vision_weights. A
    --qformer-heads named on the command line stays (the file cannot say)."""
    state = dict(state) if state is not None else read_weights_file(path)[1]
    fields = lavis_architecture(state, path)
    if cfg is not None and "qformer_heads" in getattr(cfg, "explicit_keys", ()):
        fields.pop("qformer_heads")
    model = build(dataclasses.replace(cfg or config_class(), **fields))
    load_lavis(model, state, path)
    return model


def load_lavis(model, state, path):
    """LAVIS's stage-1 checkpoint (blip2_pretrained.pth, blip2_pretrained_vitL.pth: {'model': ...}
    with Qformer.bert.*, Qformer.cls.*, query_tokens, ln_vision, vision_proj, text_proj, itm_head,
    temp; no image encoder: LAVIS saves only what trains) into `model`, then the encoder from
    cfg.vision_weights. Every key is mapped and shape-checked."""
    cfg = model.cfg
    # LAVIS's BertLMPredictionHead shares its decoder's weight with the word embeddings and its
    # bias with `bias` (self.decoder.bias = self.bias): the file holds each twice
    p = "Qformer.cls.predictions."
    for a, b in ((p + "decoder.weight", "Qformer.bert.embeddings.word_embeddings.weight"),
                 (p + "decoder.bias", p + "bias")):
        if a in state and not torch.equal(state[a], state[b]):
            raise UserError(f"{path}: '{a}' differs from '{b}', which LAVIS ties it to")
    mapping = qformer_map(cfg, "Qformer.bert", text_ffn=True, hf=False)
    mapping.update(hf_bert_lm_head_map("lm_head", "Qformer.cls.predictions",
                                       tied_to="Qformer.bert.embeddings.word_embeddings.weight"))
    names = ("ln_vision", "vision_proj", "text_proj", "itm_head")
    mapping.update({f"{n}.{p}": f"{n}.{p}" for n in names for p in ("weight", "bias")})
    mapping.update(query_tokens="query_tokens", temp="temp")
    # a file with the encoder (a fine-tuned one's, or our export's of one not read from a file)
    vision = any(k.startswith("visual_encoder.") for k in state)
    if vision:
        state = dict(state)
        for i in range(cfg.vision_layers):          # EVA's q and v biases; k has none
            b = f"visual_encoder.blocks.{i}.attn."
            q, v = state.pop(b + "q_bias", None), state.pop(b + "v_bias", None)
            if q is None or v is None:
                raise UserError(f"{path}: no '{b}q_bias' / 'v_bias': its encoder is not an EVA "
                                f"ViT of {cfg.vision_layers} blocks (--vision-layers)")
            state[b + "qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])
        mapping.update(lavis_vision_map(cfg))
    load_mapped(model, state, mapping, source=path,
                keep_init=() if vision else ("visual_encoder.",),
                ignore=("position_ids", "Qformer.cls.predictions.decoder."))
    if not vision:
        load_vision(model, cfg)
    if dist.is_main():
        print(f"{path}: loaded every Q-Former weight; the image encoder from "
              f"{'the file' if vision else cfg.vision_weights or 'its seed'}")


def lavis_vision_map(cfg):
    """Our EVA <- LAVIS's visual_encoder (timm names; its q_bias and v_bias joined as qkv.bias)."""
    m = timm_vit_map("visual_encoder", "visual_encoder", cfg.vision_layers)
    del m["visual_encoder.ln_post.weight"], m["visual_encoder.ln_post.bias"]
    return m


def fingerprints(model):
    """The checkpoint's fingerprints of the frozen parts rebuilt from their sources: the encoder,
    and in stage 2 a language model read from --llm (None: nothing to check)."""
    cfg = model.cfg
    return {"vision_fingerprint": fingerprint(model.visual_encoder),
            "llm_fingerprint": (fingerprint(model.language_model) if cfg.stage == 2 and cfg.llm
                                else None)}


def load_tokenizers(cfg, init):
    """(Q-Former tokenizer, LM tokenizer): stage 1 reads text with BERT's (--tokenizer, else an
    --init-from checkpoint's, a retrieval folder's, --init-text's, or tiny's); a
    ConditionalGeneration folder's tokenizer is its LM's, which the Q-Former cannot read. Stage 2's
    Q-Former reads no text: the LM's (--llm-tokenizer, else --llm's, a stage-2 checkpoint's or
    folder's, else tiny's)."""
    kind, saved = init
    if cfg.stage == 1:
        name = cfg.tokenizer or (saved["config"]["tokenizer"] if kind == "ours" else "")
        qformer_folder = kind == "hf" and (saved["config"].get("qformer_config") or {}).get(
            "use_qformer_text_input")
        return load_tokenizer(name, cfg.init_text or (cfg.init_from if qformer_folder else ""),
                              use_tiny=not (cfg.train_data or cfg.val_data)), None
    own = kind and init_stage(kind, saved) == 2      # the source holds an LM
    explicit = getattr(cfg, "explicit_keys", ())
    pick = {k: saved["config"][k] if own and kind == "ours" and k not in explicit
            else getattr(cfg, k) for k in ("llm", "llm_tokenizer")}
    return None, load_llm_tokenizer(pick["llm_tokenizer"] or pick["llm"]
                                    or (cfg.init_from if own and kind == "hf" else ""))


def load_llm_tokenizer(name):
    """The LM's tokenizer (load_tokenizers picks its folder), else tiny's (tokenizer_llm/)."""
    from transformers import AutoTokenizer
    name = name or os.path.join(tiny_data(), "tokenizer_llm")
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise UserError(f"no tokenizer in {name} ({type(e).__name__}); pass --llm-tokenizer") \
            from None


def init_fields(cfg, init, recipe):
    """The Config fields an --init-from source fixes for a run of cfg.stage: a transformers
    folder's or LAVIS's architecture, or our checkpoint's model and sources; what the command line
    (or a task recipe) sets to another value stays."""
    kind, saved = init
    explicit = set(getattr(cfg, "explicit_keys", ()))
    if kind == "hf":
        if cfg.stage == 2 and cfg.llm and "llm" in explicit:
            raise UserError(f"--llm {cfg.llm}: --init-from {cfg.init_from} holds its own language "
                            f"model")
        fields = hf_fields(saved["config"], saved["state"], cfg.init_from, cfg.stage)
        if "image_size" in explicit:
            fields.pop("image_size")               # the run's: positions are interpolated to it
        return {**fields, "vision_weights": cfg.vision_weights or cfg.init_from}
    if kind == "lavis":
        fields = lavis_architecture(saved, cfg.init_from)
        if "qformer_heads" in explicit:
            fields.pop("qformer_heads")                 # the file cannot say; the command line did
        return fields
    if kind == "ours":
        run = {k: getattr(cfg, k) for k in RUN_FIELDS if k in explicit or k in recipe}
        # a moved LM folder may be named again
        names = MODEL_FIELDS + (LLM_FIELDS if cfg.stage == 2 else ())
        fields = {k: saved["config"][k] for k in names if k not in explicit or k not in LLM_FIELDS}
        sources = {k: saved["config"][k] for k in ("vision_weights", "vision_seed")
                   if k not in explicit}
        return {**fields, **run, **sources}
    return {}


def to_stage2(stage1, cfg, llm, model_class):
    """Stage 2 starts from stage 1 (LAVIS pretrain_stage2.yaml loads blip2_pretrained.pth with
    strict=False): the image encoder, ln_vision, the queries and the Q-Former's query path are
    kept; its text-only parts (word and position embeddings, text FFNs, ITG's head, the ITC
    projections, the ITM head, temp) are dropped, and the projection to the LM starts new."""
    model = model_class(cfg, dec_id=stage1.dec_id, pad_id=stage1.pad_id, llm=llm)
    model.visual_encoder = stage1.visual_encoder
    ours = model.state_dict()
    state = {k: v for k, v in stage1.state_dict().items() if k in ours}
    missing = [k for k in ours if k not in state
               and not k.startswith(("language_model.", "language_projection."))]
    if missing:
        raise UserError(f"{cfg.init_from}: stage 1 has no {missing[:4]}")
    model.load_state_dict(state, strict=False)
    model.vision_from_checkpoint = stage1.vision_from_checkpoint
    if dist.is_main():
        dropped = sorted({k.split(".")[0] if not k.startswith("qformer.") else
                          "the Q-Former's text parts"
                          for k in stage1.state_dict() if k not in ours})
        print(f"{cfg.init_from}: stage 1 -> stage 2: kept the encoder, ln_vision, queries and "
              f"Q-Former; dropped {', '.join(dropped)}")
    return model


# ---- the stage-2 language model and its tokenizer ----

def tiny_llm(cfg, tokenizer):
    """The tiny preset's language model: a random OPT (pre-LN decoder, learned positions) of the
    llm_* sizes over the tokenizer's vocabulary and one row more, without dropout: the id
    transformers' Blip2 gives its <image> token (OPT-2.7b's 50272 rows leave it room past 50265)."""
    from transformers import AutoModelForCausalLM, OPTConfig
    config = OPTConfig(vocab_size=len(tokenizer) + 1, hidden_size=cfg.llm_width,
                       num_hidden_layers=cfg.llm_layers, ffn_dim=cfg.llm_mlp_dim,
                       num_attention_heads=cfg.llm_heads, word_embed_proj_dim=cfg.llm_width,
                       max_position_embeddings=max(128, cfg.num_query_tokens + 2 * cfg.max_length),
                       dropout=0.0, attention_dropout=0.0, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return AutoModelForCausalLM.from_config(config)


def make_llm(cfg, tokenizer):
    """--llm's language model (its weights), else the tiny random one."""
    return load_llm(cfg.llm) if cfg.llm else tiny_llm(cfg, tokenizer)


def checkpoint_llm_layers(lm):
    """Gradient checkpointing for the LM: a frozen one runs in eval mode, where transformers' own
    (model.gradient_checkpointing_enable) is off; so each of its layers is wrapped here."""
    from transformers.modeling_layers import GradientCheckpointingLayer
    for layer in lm.modules():
        if (isinstance(layer, GradientCheckpointingLayer)
                and not getattr(layer, "_blip2_recompute", False)):
            forward = layer.forward
            layer.forward = lambda *a, _f=forward, **k: recompute(_f, *a, use_reentrant=False, **k)
            layer._blip2_recompute = True


def prompt_batch(tok, prompts, decoder_only):
    """Generation prompts per sample: decoder-only: [BOS] prompt, left-padded (the new tokens follow
    every row's last prompt token); encoder-decoder: prompt </s>, right-padded."""
    rows = [tok(p.rstrip(" ") if decoder_only else p)["input_ids"] for p in prompts]
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(n - len(r), n) if decoder_only else slice(0, len(r))
        ids[i, span], mask[i, span] = torch.tensor(r), 1
    return ids, mask


def llm_example(tok, prompt, target, max_length, decoder_only, end_ids):
    """One sample's (ids, labels) for the LM, unpadded. Decoder-only: ids = [BOS] prompt target
    end, labels -100 on [BOS] prompt (without a prompt [BOS] is a target, predicted by the last
    query); the prompt's trailing space goes with the target. Encoder-decoder: ids = prompt </s>,
    labels = target </s>. A long target is cut, its end token (what teaches stopping) kept."""
    if decoder_only:
        head = prompt.rstrip(" ")
        p = tok(head)["input_ids"]                                        # [BOS] prompt
        t = tok(prompt[len(head):] + target, add_special_tokens=False)["input_ids"]
        t = t[:max(0, max_length - len(p) - len(end_ids))] + end_ids
        return p + t, (p if not head else [-100] * len(p)) + t
    p = tok(prompt)["input_ids"]
    t = tok(target)["input_ids"]                                          # target </s>
    if len(t) > max_length:
        t = t[:max_length - 1] + t[-1:]
    return p, t



def end_ids(cfg, tok, decoder_only):
    """The ids that end a decoder-only target (LAVIS: "\n" for OPT): cfg.text_end, else </s>."""
    if not decoder_only:
        return []
    ids = tok(cfg.text_end, add_special_tokens=False)["input_ids"] if cfg.text_end else []
    return ids or [tok.eos_token_id]


# ---- the --init-from dispatch: the model of a run ----

def _stage1_config(cfg):
    """Stage 2 from a stage-1 source: the stage-1 Config its weights are read with."""
    stage1 = dataclasses.replace(cfg, stage=1, init_text="")
    stage1.explicit_keys = set(getattr(cfg, "explicit_keys", ()))
    return stage1


def from_stage1(cfg, init):
    """Whether cfg is stage 2 and its --init-from source holds stage 1."""
    kind, saved = init
    return cfg.stage == 2 and bool(kind) and init_stage(kind, saved) == 1


def settle_init(cfg, init, recipe):
    """The Config fields the --init-from source fixes (init_fields); stage 2 from a stage-1
    source takes its encoder and Q-Former fields only."""
    if from_stage1(cfg, init):
        stage1 = _stage1_config(cfg)
        kept = MODEL_FIELDS + ("vision_weights", "vision_seed")
        return {k: v for k, v in init_fields(stage1, init, recipe(stage1)).items() if k in kept}
    return init_fields(cfg, init, recipe(cfg))


def build_model(cfg, init, tokenizer, llm_tokenizer, build):
    """The model of the settled cfg, built by build(cfg, tokenizer, llm=None): fresh (its encoder
    from --vision-weights; in stage 2 its LM from --llm); or with the --init-from weights: a
    transformers folder, LAVIS's stage-1 file, or one of our checkpoints (its frozen parts rebuilt
    from the sources it records, unless the command line names others); then --init-text a BERT.
    Stage 2 from a stage-1 source builds that and drops its text parts (to_stage2)."""
    kind, saved = init
    explicit = set(getattr(cfg, "explicit_keys", ()))
    llm = (lambda: make_llm(cfg, llm_tokenizer)) if cfg.stage == 2 else (lambda: None)
    if from_stage1(cfg, init):
        stage1 = build_model(_stage1_config(cfg), init, None, None, build)
        model = to_stage2(stage1, cfg, llm(), type(stage1))
    elif kind == "hf":
        lm = (llm_from_config(saved["config"]["text_config"], cfg.init_from)
              if cfg.stage == 2 else None)
        model = build(cfg, tokenizer, lm)
        load_hf(model, saved["state"], cfg.init_from)
        if cfg.vision_weights != cfg.init_from:
            load_vision(model, cfg)
    elif kind == "lavis":
        model = build(cfg, tokenizer)
        load_lavis(model, dict(saved), cfg.init_from)
    else:
        model = build(cfg, tokenizer, llm())
        load_vision(model, cfg)
        if kind == "ours":
            load_trainable(model, saved, cfg.init_from,
                           check_vision=not {"vision_weights", "vision_seed"} & explicit)
    if cfg.init_text:
        load_text_init(model, cfg.init_text)
    model.set_frozen(cfg.freeze_vision)
    if cfg.stage == 2:
        model.set_llm_frozen(cfg.freeze_llm)
    return model


def llm_fsdp_units(model):
    """Stage 2 under FSDP: a trained LM shards layer by layer (transformers' decoder layers), a
    frozen one stays whole. Returns (layer classes, unsharded modules)."""
    if model.cfg.stage == 1:
        return (), []
    if model.llm_frozen:
        return (), [model.language_model]
    from transformers.modeling_layers import GradientCheckpointingLayer
    return (GradientCheckpointingLayer,), []
