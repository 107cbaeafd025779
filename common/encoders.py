"""Transformer building blocks shared by every script, and the Hugging Face key maps for them.

Module names follow OpenAI CLIP (`conv1`, `class_embedding`, `ln_pre`, `resblocks`,
`ln_post`, `ln_final`) so that the weight maps below are short tables. All attention runs
on `F.scaled_dot_product_attention`, which picks the flash / memory-efficient kernels on
GPU and a fused kernel on CPU.
"""
import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


# ---- attention and blocks ----

class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation OpenAI CLIP was trained with."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": QuickGELU, "gelu": nn.GELU}


def padding_mask(keep, causal=False, dtype=None):
    """(B, S) bool, True = attend -> boolean SDPA mask (B, 1, L|1, S), optionally causal."""
    mask = keep[:, None, None, :]
    if causal:
        L = keep.shape[1]
        mask = mask & torch.ones(L, L, dtype=torch.bool, device=keep.device).tril()
    return mask


class Attention(nn.Module):
    """Multi-head attention on SDPA.

    Self-attention projects q, k, v with one fused matrix (one GEMM instead of three);
    cross-attention (`kv_dim` given) projects q from x and k, v from the context.
    `mask`: boolean (B, 1, L|1, S), True = attend; `causal`: lower-triangular self-attention
    without materialising a mask (SDPA's `is_causal`).
    """

    def __init__(self, dim, heads, *, kv_dim=None, bias=True, dropout=0.0):
        super().__init__()
        assert dim % heads == 0, f"width {dim} is not divisible by {heads} heads"
        self.heads, self.dropout = heads, dropout
        self.cross = kv_dim is not None
        if self.cross:
            self.q = nn.Linear(dim, dim, bias=bias)
            self.kv = nn.Linear(kv_dim, 2 * dim, bias=bias)
        else:
            self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, x, context=None, mask=None, causal=False):
        B, L, D = x.shape
        H = self.heads
        if self.cross:
            S = context.shape[1]
            q = self.q(x).view(B, L, H, D // H).transpose(1, 2)
            k, v = self.kv(context).view(B, S, 2, H, D // H).permute(2, 0, 3, 1, 4)
        else:
            q, k, v = self.qkv(x).view(B, L, 3, H, D // H).permute(2, 0, 3, 1, 4)  # 3 x (B, H, L, D/H)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(B, L, D))


class MLP(nn.Module):
    def __init__(self, dim, hidden, act="gelu"):
        super().__init__()
        self.fc = nn.Linear(dim, hidden)
        self.act = ACTIVATIONS[act]()
        self.proj = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.proj(self.act(self.fc(x)))


class Block(nn.Module):
    """Pre-LN transformer block (GPT-2 / CLIP / ViT): x + attn(ln_1 x), then x + mlp(ln_2 x)."""

    def __init__(self, dim, heads, *, mlp_ratio=4.0, act="gelu", eps=1e-5):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads)
        self.ln_2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio), act)

    def forward(self, x, mask=None, causal=False):
        x = x + self.attn(self.ln_1(x), mask=mask, causal=causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of pre-LN blocks with optional gradient checkpointing (recompute each block's
    activations in backward: ~1/3 more compute for activation memory of one block)."""

    def __init__(self, dim, layers, heads, *, mlp_ratio=4.0, act="gelu", eps=1e-5):
        super().__init__()
        self.resblocks = nn.ModuleList(Block(dim, heads, mlp_ratio=mlp_ratio, act=act, eps=eps)
                                       for _ in range(layers))
        self.grad_checkpointing = False

    def forward(self, x, mask=None, causal=False):
        for block in self.resblocks:
            if self.grad_checkpointing and self.training:
                x = checkpoint(block, x, mask, causal, use_reentrant=False)
            else:
                x = block(x, mask=mask, causal=causal)
        return x

    def init_clip_(self):
        """OpenAI CLIP's initialisation (clip/model.py): in-proj std w^-1/2, output projections
        std w^-1/2 (2L)^-1/2, fc std (2w)^-1/2, biases zero."""
        w, L = self.resblocks[0].ln_1.normalized_shape[0], len(self.resblocks)
        attn_std, proj_std, fc_std = w ** -0.5, w ** -0.5 * (2 * L) ** -0.5, (2 * w) ** -0.5
        for b in self.resblocks:
            for lin, std in ((b.attn.qkv, attn_std), (b.attn.proj, proj_std),
                             (b.mlp.fc, fc_std), (b.mlp.proj, proj_std)):
                nn.init.normal_(lin.weight, std=std)
                nn.init.zeros_(lin.bias)


# ---- vision transformer ----

def resize_pos_embed(pos, new_grid):
    """(1 + G*G, D) learned positions -> (1 + new_grid^2, D): bicubic interpolation of the
    patch grid (align_corners=False, as timm and transformers), class position unchanged."""
    cls, grid = pos[:1], pos[1:]
    G = int(math.isqrt(grid.shape[0]))
    assert G * G == grid.shape[0], f"position embedding of {grid.shape[0]} patches is not a square grid"
    if G == new_grid:
        return pos
    grid = grid.reshape(1, G, G, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(new_grid * new_grid, -1).to(pos.dtype)
    return torch.cat([cls, grid], 0)


class VisionTransformer(nn.Module):
    """ViT (Dosovitskiy et al. 2021) as CLIP builds it: bias-free conv patch embedding, class
    token, learned positions, optional pre-norm (`ln_pre`, CLIP) and a final norm on every
    token (`ln_post`). Returns all tokens (B, 1 + P, D); token 0 is the class token."""

    def __init__(self, *, image_size, patch_size, width, layers, heads, mlp_ratio=4.0,
                 act="gelu", eps=1e-5, pre_norm=True):
        super().__init__()
        assert image_size % patch_size == 0, f"image size {image_size} is not a multiple of patch {patch_size}"
        self.image_size, self.patch_size = image_size, patch_size
        self.grid = image_size // patch_size
        self.conv1 = nn.Conv2d(3, width, patch_size, stride=patch_size, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.grid ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width, eps=eps) if pre_norm else nn.Identity()
        self.transformer = Transformer(width, layers, heads, mlp_ratio=mlp_ratio, act=act, eps=eps)
        self.ln_post = nn.LayerNorm(width, eps=eps)

    def forward(self, images):                                       # (B, 3, H, W)
        x = self.conv1(images).flatten(2).transpose(1, 2)            # (B, P, D)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        pos = self.positional_embedding
        if x.shape[1] + 1 != pos.shape[0]:                            # another image size at eval
            pos = resize_pos_embed(pos, int(math.isqrt(x.shape[1])))
        x = torch.cat([cls, x], 1) + pos.to(x.dtype)                 # (B, 1 + P, D)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x)


# ---- CLIP text transformer ----

class TextTransformer(nn.Module):
    """CLIP's text tower: token + learned positions, causal pre-LN transformer, `ln_final`,
    pooled at the end-of-text token. Padding needs no mask: it follows EOS, and causal
    attention never lets EOS (or anything before it) see it."""

    def __init__(self, *, vocab_size, context_length, width, layers, heads, eos_id,
                 mlp_ratio=4.0, act="gelu", eps=1e-5):
        super().__init__()
        self.eos_id, self.context_length = eos_id, context_length
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = Transformer(width, layers, heads, mlp_ratio=mlp_ratio, act=act, eps=eps)
        self.ln_final = nn.LayerNorm(width, eps=eps)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        self.transformer.init_clip_()

    def forward(self, ids):                                          # (B, L) token ids
        L = ids.shape[1]
        if L > self.context_length:
            raise ValueError(f"text of {L} tokens is longer than the context of {self.context_length}")
        x = self.token_embedding(ids) + self.positional_embedding[:L]
        x = self.ln_final(self.transformer(x, causal=True))          # (B, L, D)
        is_eos = ids == self.eos_id
        # Checked outside training only: the check syncs with the GPU, and training ids come
        # from common.data.Tokenizer, which always ends a row with EOS.
        if not self.training and not bool(is_eos.any(1).all()):
            raise ValueError(f"a text has no end-of-text token (id {self.eos_id}); tokenize with common.data.Tokenizer")
        eos = is_eos.int().argmax(1)                                 # first EOS of each row
        return x[torch.arange(x.shape[0], device=x.device), eos], x  # (B, D), (B, L, D)


# ---- Hugging Face checkpoints ----

def read_hf_checkpoint(path):
    """(config dict, state dict) from a `save_pretrained` folder: config.json plus
    model.safetensors, pytorch_model.bin, or their sharded `*.index.json` forms."""
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"{path}: no config.json; expected a Hugging Face save_pretrained folder")
    with open(cfg_file) as f:
        config = json.load(f)
    for name in ("model.safetensors", "pytorch_model.bin"):
        index = os.path.join(path, name + ".index.json")
        files = []
        if os.path.isfile(os.path.join(path, name)):
            files = [os.path.join(path, name)]
        elif os.path.isfile(index):
            with open(index) as f:
                files = [os.path.join(path, s) for s in sorted(set(json.load(f)["weight_map"].values()))]
        if files:
            state = {}
            for file in files:
                if file.endswith(".safetensors"):
                    from safetensors.torch import load_file
                    state.update(load_file(file))
                else:
                    state.update(torch.load(file, map_location="cpu", weights_only=True))
            return config, state
    raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin (or a sharded index)")


def load_mapped(module, hf_state, mapping, *, source, ignore=()):
    """Copy `hf_state` into `module` through `mapping` {our key: hf key | tuple of hf keys to
    concatenate on dim 0 (fused q, k, v)}. Every one of our keys must be mapped, every hf key
    used (except those matching `ignore` substrings), and every shape equal; otherwise a
    ValueError names the key."""
    ours = module.state_dict()
    unmapped = sorted(set(ours) - set(mapping))
    if unmapped:
        raise ValueError(f"{source}: no checkpoint key maps to our parameter(s) {unmapped[:5]}")
    used, new_state = set(), {}
    for key, src in mapping.items():
        srcs = src if isinstance(src, tuple) else (src,)
        missing = [s for s in srcs if s not in hf_state]
        if missing:
            raise KeyError(f"{source}: checkpoint lacks key '{missing[0]}' (needed for '{key}')")
        value = torch.cat([hf_state[s] for s in srcs], 0) if len(srcs) > 1 else hf_state[srcs[0]]
        if key not in ours:
            raise KeyError(f"{source}: mapping names '{key}', which our model does not have")
        if value.shape != ours[key].shape:
            raise ValueError(f"{source}: shape of '{srcs[0]}' is {tuple(value.shape)}, "
                             f"our '{key}' is {tuple(ours[key].shape)}")
        new_state[key] = value
        used.update(srcs)
    extra = sorted(k for k in set(hf_state) - used if not any(s in k for s in ignore))
    if extra:
        raise ValueError(f"{source}: checkpoint key(s) not used by our model: {extra[:5]}")
    module.load_state_dict(new_state, strict=True)


def hf_clip_layers_map(ours, hf, layers):
    """Pre-LN blocks: our `resblocks.i` <- HF CLIP `encoder.layers.i`."""
    m = {}
    for i in range(layers):
        o, h = f"{ours}.resblocks.{i}", f"{hf}.layers.{i}"
        for p in ("weight", "bias"):
            m[f"{o}.ln_1.{p}"] = f"{h}.layer_norm1.{p}"
            m[f"{o}.attn.qkv.{p}"] = tuple(f"{h}.self_attn.{n}_proj.{p}" for n in "qkv")
            m[f"{o}.attn.proj.{p}"] = f"{h}.self_attn.out_proj.{p}"
            m[f"{o}.ln_2.{p}"] = f"{h}.layer_norm2.{p}"
            m[f"{o}.mlp.fc.{p}"] = f"{h}.mlp.fc1.{p}"
            m[f"{o}.mlp.proj.{p}"] = f"{h}.mlp.fc2.{p}"
    return m


def hf_clip_vision_map(ours, hf, layers):
    """Our VisionTransformer at `ours` <- HF `CLIPVisionTransformer` at `hf` (e.g. 'vision_model')."""
    m = {f"{ours}.conv1.weight": f"{hf}.embeddings.patch_embedding.weight",
         f"{ours}.class_embedding": f"{hf}.embeddings.class_embedding",
         f"{ours}.positional_embedding": f"{hf}.embeddings.position_embedding.weight"}
    for p in ("weight", "bias"):
        m[f"{ours}.ln_pre.{p}"] = f"{hf}.pre_layrnorm.{p}"
        m[f"{ours}.ln_post.{p}"] = f"{hf}.post_layernorm.{p}"
    m.update(hf_clip_layers_map(f"{ours}.transformer", f"{hf}.encoder", layers))
    return m


def hf_clip_text_map(ours, hf, layers):
    """Our TextTransformer at `ours` <- HF `CLIPTextTransformer` at `hf` (e.g. 'text_model')."""
    m = {f"{ours}.token_embedding.weight": f"{hf}.embeddings.token_embedding.weight",
         f"{ours}.positional_embedding": f"{hf}.embeddings.position_embedding.weight"}
    for p in ("weight", "bias"):
        m[f"{ours}.ln_final.{p}"] = f"{hf}.final_layer_norm.{p}"
    m.update(hf_clip_layers_map(f"{ours}.transformer", f"{hf}.encoder", layers))
    return m
