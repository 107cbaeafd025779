"""CLIP weights from other projects: a transformers `CLIPModel` folder (openai/clip-vit-base-patch32
saved with save_pretrained, or any of the hub's CLIP checkpoints), and the --init-from dispatch
between such a folder and one of our checkpoints."""

from ..encoders import hf_clip_text_map, hf_clip_vision_map, load_mapped, read_hf_checkpoint
from .. import dist
from ..utils import UserError
from . import read_hf_or_ours


read_init = read_hf_or_ours      # a transformers folder, or one of our checkpoints


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
    cfg = model.cfg
    mapping = {"visual_projection.weight": "visual_projection.weight",
               "text_projection.weight": "text_projection.weight", "logit_scale": "logit_scale",
               **hf_clip_vision_map("visual", "vision_model", cfg.vision_layers),
               **hf_clip_text_map("text", "text_model", cfg.text_layers)}
    # SigLIP's bias (--loss siglip) is not in a CLIPModel folder: it keeps its init, b = -10
    load_mapped(model, state, mapping, source=path, ignore=("position_ids",),
                keep_init=("logit_bias",))


def init_architecture(init, path, fields):
    """The architecture `fields` that the --init-from source fixes ({} without one)."""
    kind, saved = init
    if kind == "hf":
        return hf_architecture(path)
    return {k: saved["config"][k] for k in fields} if kind == "ours" else {}


def load_init(model, init, path):
    """The --init-from weights into `model`, built at the source's architecture."""
    kind, saved = init
    if kind == "hf":
        load_hf(model, path)
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
