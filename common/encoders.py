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

from .utils import MissingFileError, UserError, load_checkpoint


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

    `cache` (generation, see `KVCache`): this module's dict of keys and values. Self-attention
    appends the new tokens' keys and values to the cached ones and attends over all of them (x
    holds only the new tokens); cross-attention projects the context on the first call and reuses
    the result afterwards. Cached context rows may be fewer than x's rows: then x's rows come in
    groups of G consecutive rows per context row (beams of one image), folded into the query length
    so that one copy of the image's keys and values serves the whole group (a context mask then
    has the context's rows).
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

    def forward(self, x, context=None, mask=None, causal=False, cache=None):
        B, L, D = x.shape
        H = self.heads
        if self.cross:
            q = self.q(x).view(B, L, H, D // H).transpose(1, 2)
            if cache is not None and "kv" in cache:
                k, v = cache["kv"]                                    # the image's, computed once
            else:
                Bc, S = context.shape[:2]
                k, v = self.kv(context).view(Bc, S, 2, H, D // H).permute(2, 0, 3, 1, 4)
                if cache is not None:
                    cache["kv"] = k, v
        else:
            q, k, v = self.qkv(x).view(B, L, 3, H, D // H).permute(2, 0, 3, 1, 4)  # 3 x (B, H, L, D/H)
            if cache is not None:
                if "kv" in cache:                                     # earlier tokens' keys and values
                    k, v = torch.cat([cache["kv"][0], k], 2), torch.cat([cache["kv"][1], v], 2)
                cache["kv"] = k, v
        L_q, L_k = q.shape[2], k.shape[2]
        if causal and (mask is not None or L_q != L_k):
            # padding and causal together, or new queries after cached keys (SDPA's is_causal
            # aligns the triangle top-left, which is wrong there): one boolean mask, the last
            # L_q of L_k positions
            tri = torch.ones(L_q, L_k, dtype=torch.bool, device=x.device).tril(L_k - L_q)
            mask, causal = (tri if mask is None else mask & tri), False
        G = B // k.shape[0]
        if G > 1:                                                     # (B, H, L, D/H) -> (B/G, H, G*L, D/H)
            q = q.view(B // G, G, H, L, D // H).transpose(1, 2).reshape(B // G, H, G * L, D // H)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                             dropout_p=self.dropout if self.training else 0.0)
        if G > 1:
            out = out.view(B // G, H, G, L, D // H).transpose(1, 2).reshape(B, H, L, D // H)
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

    def __init__(self, dim, heads, *, mlp_ratio=4.0, act="gelu", eps=1e-5, mlp_dim=None):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads)
        self.ln_2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, mlp_dim or int(dim * mlp_ratio), act)     # mlp_dim: a file's exact size

    def forward(self, x, mask=None, causal=False, cache=None):
        """`cache`: this block's self-attention dict of a `KVCache` (generation), or None."""
        x = x + self.attn(self.ln_1(x), mask=mask, causal=causal, cache=cache)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of pre-LN blocks with optional gradient checkpointing (recompute each block's
    activations in backward: ~1/3 more compute for activation memory of one block)."""

    def __init__(self, dim, layers, heads, *, mlp_ratio=4.0, act="gelu", eps=1e-5, mlp_dim=None):
        super().__init__()
        self.resblocks = nn.ModuleList(Block(dim, heads, mlp_ratio=mlp_ratio, act=act, eps=eps,
                                             mlp_dim=mlp_dim) for _ in range(layers))
        self.grad_checkpointing = False

    def forward(self, x, mask=None, causal=False, caches=None):
        """`caches`: one self-attention dict of a `KVCache` per block (generation: x holds only the
        tokens after the cached ones), or None."""
        for i, block in enumerate(self.resblocks):
            if caches is not None:
                x = block(x, mask=mask, causal=causal, cache=caches[i])
            elif self.grad_checkpointing and self.training:
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
    """ViT (Dosovitskiy et al. 2021): conv patch embedding, class token, learned positions,
    optional pre-norm (`ln_pre`, CLIP only) and a final norm on every token (`ln_post`; CoCa's
    attentional pooler normalises its own keys instead: `post_norm=False`), and FLIP's patch
    dropout in training (`patch_dropout`, see drop_patches; an attribute the loop may change).
    Returns all tokens, (B, 1 + P, D) or (B, 1 + P', D) after patch dropout; token 0: class."""

    def __init__(self, *, image_size, patch_size, width, layers, heads, mlp_ratio=4.0,
                 act="gelu", eps=1e-5, pre_norm=True, patch_bias=False, post_norm=True,
                 mlp_dim=None, patch_dropout=0.0):
        super().__init__()
        self.patch_dropout = patch_dropout
        assert image_size % patch_size == 0, f"image size {image_size} is not a multiple of patch {patch_size}"
        self.image_size, self.patch_size = image_size, patch_size
        self.grid = image_size // patch_size
        # CLIP's patch embedding has no bias; timm/DeiT ViTs (BLIP, ALBEF) have one.
        self.conv1 = nn.Conv2d(3, width, patch_size, stride=patch_size, bias=patch_bias)
        # Linear layers keep PyTorch's default init; OpenAI CLIP's MultiheadAttention uses
        # xavier-uniform in-projections. Pretrained weights replace both.
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.grid ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width, eps=eps) if pre_norm else nn.Identity()
        self.transformer = Transformer(width, layers, heads, mlp_ratio=mlp_ratio, act=act, eps=eps,
                                       mlp_dim=mlp_dim)
        self.ln_post = nn.LayerNorm(width, eps=eps) if post_norm else nn.Identity()

    def forward(self, images):                                       # (B, 3, H, W)
        x = self.conv1(images).flatten(2).transpose(1, 2)            # (B, P, D)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        pos = self.positional_embedding
        if x.shape[1] + 1 != pos.shape[0]:                            # another image size at eval
            pos = resize_pos_embed(pos, int(math.isqrt(x.shape[1])))
        x = torch.cat([cls, x], 1) + pos.to(x.dtype)                 # (B, 1 + P, D)
        if self.training and self.patch_dropout > 0:
            x = drop_patches(x, self.patch_dropout)                  # (B, 1 + P', D)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x)

    def resize(self, image_size):
        """Serve another image size (a fine-tuning resolution): interpolate the learned position
        grid once, in place (Touvron et al. 2019; `resize_pos_embed`)."""
        if image_size % self.patch_size:
            raise UserError(f"--image-size {image_size} is not a multiple of the weights' patch "
                            f"size {self.patch_size}")
        self.image_size, self.grid = image_size, image_size // self.patch_size
        pos = resize_pos_embed(self.positional_embedding.data, self.grid)
        self.positional_embedding = nn.Parameter(pos, self.positional_embedding.requires_grad)


def drop_patches(x, p):
    """FLIP's image masking (Li et al. 2023, Sec. 3; open_clip's patch_dropout): each image keeps a
    uniformly random max(1, int(P (1 - p))) of its P patch tokens, after the positions are added,
    so the kept ones need no mask and the encoder's cost falls with the ratio; the class token
    (token 0) is always kept. (B, 1 + P, D) -> (B, 1 + P', D)."""
    B, P, D = x.shape[0], x.shape[1] - 1, x.shape[2]
    keep = max(1, int(P * (1 - p)))
    kept = _random_subsets(B, P, keep, x.device)                        # (B, P'), per image
    patches = x[:, 1:].gather(1, kept.unsqueeze(-1).expand(B, keep, D))
    return torch.cat([x[:, :1], patches], 1)


@torch.compiler.disable
def _random_subsets(B, P, keep, device):
    """`keep` of P indices per row, drawn eagerly even under torch.compile: the feature cache's two
    passes (no-grad, then with gradient: two compiled graphs) must draw the same masks from the
    same seed, which the eager generator guarantees."""
    return torch.rand(B, P, device=device).argsort(1)[:, :keep]


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
        is_eos[:, 0] = False                                         # BOS may equal EOS (GPT-2 style)
        # Checked outside training only: the check syncs with the GPU, and training ids come
        # from common.data.Tokenizer, which always ends a row with EOS.
        if not self.training and not bool(is_eos.any(1).all()):
            raise ValueError(f"a text has no end-of-text token (id {self.eos_id}); tokenize with common.data.Tokenizer")
        eos = is_eos.int().argmax(1)                                 # first EOS after BOS
        return x[torch.arange(x.shape[0], device=x.device), eos], x  # (B, D), (B, L, D)


# ---- BERT-family encoder / decoder (ALBEF, BLIP, BLIP-2) ----

class BertAttention(nn.Module):
    """Post-LN attention sub-layer of BERT: LayerNorm(x + attn(x)). Self-attention, or
    cross-attention to `context` when `kv_dim` is given (image features of another width)."""

    def __init__(self, width, heads, *, kv_dim=None, eps=1e-12, dropout=0.0):
        super().__init__()
        self.attn = Attention(width, heads, kv_dim=kv_dim, dropout=dropout)
        self.LayerNorm = nn.LayerNorm(width, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, context=None, mask=None, causal=False, cache=None):
        return self.LayerNorm(x + self.dropout(self.attn(x, context=context, mask=mask, causal=causal, cache=cache)))


class BertLayer(nn.Module):
    """BERT layer: self-attention, optional cross-attention to image features (skipped when no
    context is passed: the unimodal text mode), GELU feed-forward, each post-LN."""

    def __init__(self, width, heads, mlp_dim, *, cross_dim=None, eps=1e-12, dropout=0.0):
        super().__init__()
        self.attention = BertAttention(width, heads, eps=eps, dropout=dropout)
        self.crossattention = (BertAttention(width, heads, kv_dim=cross_dim, eps=eps, dropout=dropout)
                               if cross_dim else None)
        self.intermediate = nn.Linear(width, mlp_dim)
        self.output = nn.Linear(mlp_dim, width)
        self.output_norm = nn.LayerNorm(width, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, mask=None, causal=False, context=None, context_mask=None, cache=None):
        """`cache`: this layer's {"self": {}, "cross": {}} of a `KVCache` (generation), or None."""
        x = self.attention(x, mask=mask, causal=causal, cache=None if cache is None else cache["self"])
        if context is not None and self.crossattention is not None:
            x = self.crossattention(x, context=context, mask=context_mask,
                                    cache=None if cache is None else cache["cross"])
        return self.output_norm(x + self.dropout(self.output(F.gelu(self.intermediate(x)))))


class BertEncoder(nn.Module):
    """BERT (Devlin et al. 2019) with learned absolute positions, optional token types, and
    cross-attention in the layers listed in `cross_layers` (BLIP: all, ALBEF: the last six,
    BLIP-2's Q-Former: every other one). Self-attention is bidirectional, or causal for the
    decoder. `forward(ids, attention_mask, causal, context, context_mask)` -> (B, L, D).

    Generation passes a `KVCache` as `cache`: `ids` are then only the tokens after the cached
    ones (positions continue from `cache.length`), `attention_mask`, if any, covers the cached and
    the new tokens (B, cache.length + L), and `context` is projected once and kept."""

    def __init__(self, *, vocab_size, width, layers, heads, mlp_dim, max_positions=512, type_vocab_size=0,
                 cross_dim=None, cross_layers=(), eps=1e-12, dropout=0.0):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, width)
        self.position_embeddings = nn.Embedding(max_positions, width)
        self.token_type_embeddings = nn.Embedding(type_vocab_size, width) if type_vocab_size else None
        self.embed_norm = nn.LayerNorm(width, eps=eps)
        self.dropout = nn.Dropout(dropout)
        cross_layers = set(cross_layers)
        self.layer = nn.ModuleList(
            BertLayer(width, heads, mlp_dim, cross_dim=cross_dim if i in cross_layers else None, eps=eps,
                      dropout=dropout) for i in range(layers))
        self.grad_checkpointing = False
        self.apply(_bert_init)

    def embed(self, ids, offset=0):
        x = self.word_embeddings(ids) + self.position_embeddings.weight[offset: offset + ids.shape[1]]
        if self.token_type_embeddings is not None:
            x = x + self.token_type_embeddings.weight[0]
        return self.dropout(self.embed_norm(x))

    def forward(self, ids, attention_mask=None, causal=False, context=None, context_mask=None, cache=None, *,
                start=0, end=None, hidden=None):
        """`start`, `end`: run only layers [start, end); `hidden`: start from these hidden states
        (B, L, D) instead of embedding `ids` (ALBEF: the text encoder is layers [0, fusion), the
        fusion encoder layers [fusion, L) on the text encoder's output)."""
        offset = cache.length if cache is not None else 0
        x = self.embed(ids, offset) if hidden is None else hidden            # (B, L, D)
        # With a cache the queries are the last L of the keys; Attention places the triangle.
        mask = (padding_mask(attention_mask.bool(), causal and cache is None) if attention_mask is not None
                else None)
        cmask = padding_mask(context_mask.bool()) if context_mask is not None else None
        for i in range(start, len(self.layer) if end is None else end):
            layer = self.layer[i]
            if cache is not None:
                x = layer(x, mask, causal, context, cmask, cache=cache.layers[i])
            elif self.grad_checkpointing and self.training:
                x = checkpoint(layer, x, mask, causal, context, cmask, use_reentrant=False)
            else:
                x = layer(x, mask, causal, context, cmask)
        if cache is not None:
            cache.length += ids.shape[1]
        return x


class KVCache:
    """Keys and values a BertEncoder keeps between generation steps (`forward(..., cache=)`): per
    layer, the self-attention keys and values of every token seen so far (N, H, T, D/H), and the
    cross-attention keys and values of the context (B, H, S, D/H), projected once. `length` is T,
    the position of the next token."""

    def __init__(self, layers):
        self.layers = [{"self": {}, "cross": {}} for _ in range(layers)]
        self.length = 0

    def reorder(self, index):
        """Keep the self-attention rows `index` (N',), in that order (beam search: copy the prompt's
        rows to every beam, then follow the surviving beams). The context's keys and values are
        left as they are: row i of the new batch must belong to context row i // (N' / B), which
        holds for beams that stay with their own image. Returns the cache."""
        for layer in self.layers:
            if "kv" in layer["self"]:
                k, v = layer["self"]["kv"]
                layer["self"]["kv"] = k.index_select(0, index), v.index_select(0, index)
        return self


class BertLMHead(nn.Module):
    """Masked / causal LM head: dense + GELU + LayerNorm, then a vocabulary projection."""

    def __init__(self, width, vocab_size, eps=1e-12):
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.LayerNorm = nn.LayerNorm(width, eps=eps)
        self.decoder = nn.Linear(width, vocab_size)
        self.apply(_bert_init)

    def forward(self, x):
        return self.decoder(self.LayerNorm(F.gelu(self.dense(x))))


def _bert_init(m):
    """BERT's initialisation: normal(0, 0.02) weights, zero biases, unit LayerNorms."""
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=0.02)
    if isinstance(m, nn.Linear) and m.bias is not None:
        nn.init.zeros_(m.bias)


# ---- Hugging Face checkpoints ----

def read_hf_checkpoint(path):
    """(config dict, state dict) from a `save_pretrained` folder: config.json plus
    model.safetensors, pytorch_model.bin, or their sharded `*.index.json` forms."""
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise MissingFileError(f"{path}: no config.json; expected a Hugging Face save_pretrained folder")
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
    raise MissingFileError(f"{path}: no model.safetensors or pytorch_model.bin (or a sharded index)")


def read_weights_file(path):
    """(the file's object, its state dict) for a .safetensors file or a torch file read with
    load_checkpoint (weights only), the state dict bare or under 'model' / 'state_dict'."""
    if path.endswith(".safetensors"):
        if not os.path.isfile(path):
            raise MissingFileError(f"{path} does not exist")
        from safetensors.torch import load_file
        saved = load_file(path)
    else:
        saved = load_checkpoint(path)
    state = saved
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise UserError(f"{path}: expected a state dict, found {type(state).__name__}")
    return saved, state


def load_mapped(module, hf_state, mapping, *, source, ignore=(), keep_init=()):
    """Copy `hf_state` into `module` through `mapping` {our key: hf key | tuple of hf keys to
    concatenate on dim 0 (fused q, k, v)}. Every one of our keys must be mapped (except those
    starting with a `keep_init` prefix, which keep their current values), every hf key used
    (except those containing an `ignore` substring), and every shape equal up to leading
    singleton dimensions; otherwise an error names the key."""
    ours = module.state_dict()
    unmapped = sorted(k for k in set(ours) - set(mapping) if not k.startswith(tuple(keep_init)))
    if unmapped:
        raise UserError(f"{source}: no checkpoint key maps to our parameter(s) {unmapped[:5]}")
    used, new_state = set(), dict(ours)
    for key, src in mapping.items():
        srcs = src if isinstance(src, tuple) else (src,)
        missing = [s for s in srcs if s not in hf_state]
        if missing:
            raise UserError(f"{source}: checkpoint lacks key '{missing[0]}' (needed for '{key}')")
        value = torch.cat([hf_state[s] for s in srcs], 0) if len(srcs) > 1 else hf_state[srcs[0]]
        if key not in ours:
            raise UserError(f"{source}: mapping names '{key}', which our model does not have")
        squeezed = value.shape[len(value.shape) - len(ours[key].shape):] if value.ndim > ours[key].ndim else None
        if value.shape != ours[key].shape and not (
                squeezed == ours[key].shape and all(d == 1 for d in value.shape[: value.ndim - ours[key].ndim])):
            raise UserError(f"{source}: shape of '{srcs[0]}' is {tuple(value.shape)}, "
                             f"our '{key}' is {tuple(ours[key].shape)}")
        new_state[key] = value.reshape(ours[key].shape)
        used.update(srcs)
    extra = sorted(k for k in set(hf_state) - used if not any(s in k for s in ignore))
    if extra:
        raise UserError(f"{source}: checkpoint key(s) not used by our model: {extra[:5]}")
    module.load_state_dict(new_state, strict=True)


def blocks_map(ours, theirs, layers, table):
    """Our pre-LN blocks `{ours}.i` (i < layers) <- a checkpoint's blocks `theirs.format(i)`; `table`
    {our sub-module: theirs, or a tuple of theirs to concatenate (separate q, k, v)} for both the
    weight and the bias. The one shape of every block map below."""
    m = {}
    for i in range(layers):
        o, t = f"{ours}.{i}", theirs.format(i)
        for p in ("weight", "bias"):
            for a, b in table.items():
                m[f"{o}.{a}.{p}"] = tuple(f"{t}.{x}.{p}" for x in b) if isinstance(b, tuple) else f"{t}.{b}.{p}"
    return m


def hf_clip_layers_map(ours, hf, layers):
    """Pre-LN blocks: our `resblocks.i` <- HF CLIP `encoder.layers.i`."""
    return blocks_map(f"{ours}.resblocks", f"{hf}.layers.{{}}", layers, {
        "ln_1": "layer_norm1", "attn.qkv": tuple(f"self_attn.{n}_proj" for n in "qkv"),
        "attn.proj": "self_attn.out_proj", "ln_2": "layer_norm2", "mlp.fc": "mlp.fc1", "mlp.proj": "mlp.fc2"})


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


def hf_bert_map(ours, hf, layers, *, cross_layers=(), token_types=True):
    """Our BertEncoder at `ours` <- HF `BertModel` at `hf` ('bert' in BertLMHeadModel, ''
    for a bare BertModel, 'text_encoder' in BLIP). Self-attention q, k, v are fused."""
    pre = f"{hf}." if hf else ""
    m = {f"{ours}.word_embeddings.weight": f"{pre}embeddings.word_embeddings.weight",
         f"{ours}.position_embeddings.weight": f"{pre}embeddings.position_embeddings.weight"}
    if token_types:
        m[f"{ours}.token_type_embeddings.weight"] = f"{pre}embeddings.token_type_embeddings.weight"
    for p in ("weight", "bias"):
        m[f"{ours}.embed_norm.{p}"] = f"{pre}embeddings.LayerNorm.{p}"
        for i in range(layers):
            o, h = f"{ours}.layer.{i}", f"{pre}encoder.layer.{i}"
            m[f"{o}.attention.attn.qkv.{p}"] = tuple(f"{h}.attention.self.{n}.{p}" for n in ("query", "key", "value"))
            m[f"{o}.attention.attn.proj.{p}"] = f"{h}.attention.output.dense.{p}"
            m[f"{o}.attention.LayerNorm.{p}"] = f"{h}.attention.output.LayerNorm.{p}"
            if i in cross_layers:
                m[f"{o}.crossattention.attn.q.{p}"] = f"{h}.crossattention.self.query.{p}"
                m[f"{o}.crossattention.attn.kv.{p}"] = (f"{h}.crossattention.self.key.{p}",
                                                        f"{h}.crossattention.self.value.{p}")
                m[f"{o}.crossattention.attn.proj.{p}"] = f"{h}.crossattention.output.dense.{p}"
                m[f"{o}.crossattention.LayerNorm.{p}"] = f"{h}.crossattention.output.LayerNorm.{p}"
            m[f"{o}.intermediate.{p}"] = f"{h}.intermediate.dense.{p}"
            m[f"{o}.output.{p}"] = f"{h}.output.dense.{p}"
            m[f"{o}.output_norm.{p}"] = f"{h}.output.LayerNorm.{p}"
    return m


def hf_bert_lm_head_map(ours, hf, tied_to=None):
    """Our BertLMHead at `ours` <- HF `cls.predictions` at `hf` (e.g. 'cls.predictions'). With
    tied embeddings the checkpoint stores no decoder weight: pass the embedding key as `tied_to`."""
    m = {f"{ours}.decoder.weight": tied_to or f"{hf}.decoder.weight", f"{ours}.decoder.bias": f"{hf}.bias"}
    for p in ("weight", "bias"):
        m[f"{ours}.dense.{p}"] = f"{hf}.transform.dense.{p}"
        m[f"{ours}.LayerNorm.{p}"] = f"{hf}.transform.LayerNorm.{p}"
    return m


def _vit_map(ours, embeddings, final_norm, blocks):
    """Our VisionTransformer (no ln_pre, patch bias) at `ours` <- `embeddings` {our conv1.weight,
    conv1.bias, class_embedding, positional_embedding: theirs}, the final norm and the blocks."""
    m = {f"{ours}.{k}": v for k, v in embeddings.items()}
    m.update({f"{ours}.ln_post.{p}": f"{final_norm}.{p}" for p in ("weight", "bias")})
    m.update(blocks)
    return m


def timm_vit_map(ours, theirs, layers):
    """Our VisionTransformer (no ln_pre, patch bias) at `ours` <- a timm / DeiT `VisionTransformer`
    state dict at `theirs` ('' for a bare one; 'visual_encoder' in ALBEF, BLIP and LAVIS, which
    keep timm's names): cls_token, pos_embed, patch_embed.proj, blocks.i.{norm1, attn.qkv,
    attn.proj, norm2, mlp.fc1, mlp.fc2}, norm."""
    pre = f"{theirs}." if theirs else ""
    blocks = blocks_map(f"{ours}.transformer.resblocks", f"{pre}blocks.{{}}", layers, {
        "ln_1": "norm1", "attn.qkv": "attn.qkv", "attn.proj": "attn.proj", "ln_2": "norm2", "mlp.fc": "mlp.fc1",
        "mlp.proj": "mlp.fc2"})
    return _vit_map(ours, {"conv1.weight": f"{pre}patch_embed.proj.weight", "conv1.bias": f"{pre}patch_embed.proj.bias",
                           "class_embedding": f"{pre}cls_token", "positional_embedding": f"{pre}pos_embed"},
                    f"{pre}norm", blocks)


def hf_vit_map(ours, hf, layers):
    """Our VisionTransformer (no ln_pre, patch bias) at `ours` <- a transformers `ViTModel` at `hf`
    ('' for a bare ViTModel, 'vit' inside ViTForImageClassification). q, k, v are fused."""
    pre = f"{hf}." if hf else ""
    e = f"{pre}embeddings"
    blocks = blocks_map(f"{ours}.transformer.resblocks", f"{pre}encoder.layer.{{}}", layers, {
        "ln_1": "layernorm_before", "attn.qkv": tuple(f"attention.attention.{n}" for n in ("query", "key", "value")),
        "attn.proj": "attention.output.dense", "ln_2": "layernorm_after", "mlp.fc": "intermediate.dense",
        "mlp.proj": "output.dense"})
    return _vit_map(ours, {"conv1.weight": f"{e}.patch_embeddings.projection.weight",
                           "conv1.bias": f"{e}.patch_embeddings.projection.bias", "class_embedding": f"{e}.cls_token",
                           "positional_embedding": f"{e}.position_embeddings"}, f"{pre}layernorm", blocks)


def hf_blip_vision_map(ours, hf, layers):
    """Our VisionTransformer (no ln_pre, patch bias) at `ours` <- HF `BlipVisionModel` at `hf`."""
    e = f"{hf}.embeddings"
    blocks = blocks_map(f"{ours}.transformer.resblocks", f"{hf}.encoder.layers.{{}}", layers, {
        "ln_1": "layer_norm1", "attn.qkv": "self_attn.qkv", "attn.proj": "self_attn.projection", "ln_2": "layer_norm2",
        "mlp.fc": "mlp.fc1", "mlp.proj": "mlp.fc2"})
    return _vit_map(ours, {"conv1.weight": f"{e}.patch_embedding.weight", "conv1.bias": f"{e}.patch_embedding.bias",
                           "class_embedding": f"{e}.class_embedding",
                           "positional_embedding": f"{e}.position_embedding"}, f"{hf}.post_layernorm", blocks)


# ---- open_clip checkpoints (OpenAI CLIP's module names) ----

def open_clip_blocks_map(ours, theirs, layers):
    """Our Transformer at `ours` <- an open_clip / OpenAI CLIP `Transformer` at `theirs`:
    resblocks.i.{ln_1, attn.in_proj_weight/bias (q, k, v fused, as ours), attn.out_proj, ln_2,
    mlp.c_fc, mlp.c_proj}."""
    m = blocks_map(f"{ours}.resblocks", f"{theirs}.resblocks.{{}}", layers, {
        "ln_1": "ln_1", "attn.proj": "attn.out_proj", "ln_2": "ln_2", "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"})
    m.update({f"{ours}.resblocks.{i}.attn.qkv.{p}": f"{theirs}.resblocks.{i}.attn.in_proj_{p}"
              for i in range(layers) for p in ("weight", "bias")})      # in_proj_weight, not in_proj.weight
    return m


def open_clip_vision_map(ours, theirs, layers):
    """Our VisionTransformer (CLIP layout: ln_pre, no patch bias) at `ours` <- open_clip's
    `VisionTransformer` at `theirs` ('visual'), without `ln_post` and `proj` (the caller's: CLIP
    normalises the class token, CoCa its pooler's output)."""
    m = {f"{ours}.conv1.weight": f"{theirs}.conv1.weight", f"{ours}.class_embedding": f"{theirs}.class_embedding",
         f"{ours}.positional_embedding": f"{theirs}.positional_embedding",
         f"{ours}.ln_pre.weight": f"{theirs}.ln_pre.weight", f"{ours}.ln_pre.bias": f"{theirs}.ln_pre.bias"}
    m.update(open_clip_blocks_map(f"{ours}.transformer", f"{theirs}.transformer", layers))
    return m


def split_mha_in_proj(state, prefix, dim):
    """`nn.MultiheadAttention` at `prefix` keeps q, k, v in one `in_proj_weight` (3D, D), or in
    `q_proj_weight`, `k_proj_weight`, `v_proj_weight` when the keys' width differs; one
    `in_proj_bias` (3D) either way. Our cross-attention has `q` (D, D) and a fused `kv` (2D, Dkv):
    returns `state` with those keys replaced by `{prefix}.in_proj[q].{weight,bias}` and
    `{prefix}.in_proj[kv].{weight,bias}` for a key map to name (a missing key stays missing)."""
    state = dict(state)
    if f"{prefix}.in_proj_weight" in state:
        w = state.pop(f"{prefix}.in_proj_weight")
        state[f"{prefix}.in_proj[q].weight"], state[f"{prefix}.in_proj[kv].weight"] = w[:dim], w[dim:]
    elif f"{prefix}.q_proj_weight" in state:
        state[f"{prefix}.in_proj[q].weight"] = state.pop(f"{prefix}.q_proj_weight")
        if f"{prefix}.k_proj_weight" in state and f"{prefix}.v_proj_weight" in state:
            state[f"{prefix}.in_proj[kv].weight"] = torch.cat([state.pop(f"{prefix}.k_proj_weight"),
                                                               state.pop(f"{prefix}.v_proj_weight")], 0)
    if f"{prefix}.in_proj_bias" in state:
        b = state.pop(f"{prefix}.in_proj_bias")
        state[f"{prefix}.in_proj[q].bias"], state[f"{prefix}.in_proj[kv].bias"] = b[:dim], b[dim:]
    return state


def open_clip_cross_attention_map(ours, theirs):
    """Our cross-attention `Attention` (q, kv, proj) at `ours` <- a `nn.MultiheadAttention` at
    `theirs` after `split_mha_in_proj(state, theirs, dim)`."""
    return {f"{ours}.{a}.{p}": f"{theirs}.{b}.{p}" for p in ("weight", "bias")
            for a, b in (("q", "in_proj[q]"), ("kv", "in_proj[kv]"), ("proj", "out_proj"))}
