"""BLIP-2 (Li et al. 2023, arXiv:2301.12597): a Q-Former's 32 learned queries read a frozen
image encoder; stage 1 trains them with ITC + ITM + ITG (Sec. 3.2), each through its own
self-attention mask over [queries; text], to extract the visual features most relevant to the
text; stage 2 (`--stage 2`) feeds them to a frozen language model as a soft prompt (Sec. 3.3).

The paper, in this file:
    Sec. 3.1          the frozen image encoder (ViT-g/14, last layer dropped)   image_encoder
    Sec. 3.1, Fig. 2  the Q-Former: queries + text, cross-attention to the image QFormer
    Fig. 2 (right)    the three self-attention masks                          attention_masks
    Sec. 3.2          ITC: the best of the Q query-text similarities          BLIP2.loss_itc
    Sec. 3.2          ITM with hard negatives from the ITC similarities       BLIP2.loss_itm
    Sec. 3.2          ITG: the text generated from the queries                BLIP2.loss_lm
    Sec. 3.3, Fig. 3  the queries as a soft prompt to a frozen LLM            BLIP2.soft_prompt
    Sec. 3.3          (prefix) language modeling loss                         BLIP2.loss_llm
    Sec. 3.4          the pre-training recipe (AdamW, cosine, 224 px)         PRESETS, param_groups
    Sec. 4.1-4.4      zero-shot VQA, captions, retrieval (ITC, ITM re-rank)   evaluate*

    python blip2_train.py                                        # tiny built-in data, stage 1, CPU
    python blip2_train.py --stage 2                              # tiny: stage 2, a tiny random LM
    torchrun --nproc_per_node 8 blip2_train.py --preset vit-g --vision-weights eva_vit_g.pth \\
        --init-text bert-base-uncased/ --train-data laion_129m.json --val-data coco_test.json
    torchrun --nproc_per_node 8 blip2_train.py --preset vit-g-opt2.7b --init-from \\
        blip2_pretrained.pth --vision-weights eva_vit_g.pth --llm opt-2.7b/ \\
        --train-data laion_129m.json --val-data coco_karpathy_val.json    # stage 2 from stage 1
    python blip2_train.py --preset vit-g --eval-only --init-from Salesforce/blip2-itm-vit-g/ \\
        --val-data coco_karpathy_test.json --k-test 128                   # transformers' weights
Differences from the official code (LAVIS, transformers): docs/blip2.md.
"""
import functools
import json
import os
import random
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as recompute

from common import dist
from common.config import BaseConfig, resolve_config
from common.data import (Example, collate_llm, eval_image_loader, pre_caption_blip,
                         pre_question_blip, read_annotations, read_vqa, retrieval_texts, tiny_data,
                         train_loader, train_transform, training_records, trim_padding)
from common.encoders import BertAttention, BertLMHead, Block, VisionTransformer, _bert_init
from common.metrics import (embed_sharded, image_tokens, rerank_topk, retrieval_metrics,
                            score_captions, vqa_accuracy)
from common.run import (end_epoch, epochs, eval_only, finish, log_train, open_log, optimizer_step,
                        start_run, step_done)
from common.utils import (FeatureCache, MicroBatch, MissingFileError, Preemption, UserError, adamw,
                          autocast, cli, first_nonfinite_module, precision_dtype, resolve_precision,
                          seed_everything, sync_gradients)
from common.weights import blip2 as blip2_weights, blip2_export
from common.weights.blip2 import (checkpoint_llm_layers, end_ids, llm_example,  # noqa: F401
                                  load_text_init, load_trainable, load_vision, prompt_batch,
                                  tiny_llm)


# ==== stage 1 ====

# ---- model: the frozen image encoder (Sec. 3.1) ----

def image_encoder(cfg):
    """EVA ViT-g (patch bias, no pre-norm, exact GELU, no final norm: ln_vision follows) or CLIP
    ViT-L/14 (pre-norm, QuickGELU), its last layer dropped. Every token: (B, 1 + P, Dv)."""
    clip = cfg.vision == "clip-l"
    vit = VisionTransformer(image_size=cfg.image_size, patch_size=cfg.patch_size,
                            width=cfg.vision_width, layers=cfg.vision_layers,
                            heads=cfg.vision_heads, mlp_dim=cfg.vision_mlp_dim,
                            act="quick_gelu" if clip else "gelu", eps=cfg.vision_eps, pre_norm=clip,
                            patch_bias=not clip, post_norm=False)
    if not clip:
        # EVA has q and v biases, no k bias: the k third of the fused bias stays 0 (no gradient)
        for block in vit.transformer.resblocks:
            bias = block.attn.qkv.bias
            with torch.no_grad():
                bias[cfg.vision_width: 2 * cfg.vision_width] = 0
            keep = torch.ones_like(bias)
            keep[cfg.vision_width: 2 * cfg.vision_width] = 0
            bias.register_hook(lambda grad, keep=keep: grad * keep.to(grad.device, grad.dtype))
    return vit


# ---- model: the Q-Former (Sec. 3.1, Fig. 2) ----

class QFormerLayer(nn.Module):
    """One post-LN BERT layer of the Q-Former: self-attention over [queries; text] (the mask decides
    who sees whom), cross-attention to the image for the queries only (every other layer), and
    separate FFNs for the queries and the text (none for the text in stage 2: `text=False`)."""

    def __init__(self, cfg, cross, text=True):
        super().__init__()
        D, eps, p = cfg.qformer_width, cfg.qformer_eps, cfg.dropout
        self.attention = BertAttention(D, cfg.qformer_heads, eps=eps, dropout=p)
        self.crossattention = (BertAttention(D, cfg.qformer_heads, kv_dim=cfg.vision_width, eps=eps,
                                             dropout=p) if cross else None)
        if text:
            self.intermediate = nn.Linear(D, cfg.qformer_mlp_dim)
            self.output = nn.Linear(cfg.qformer_mlp_dim, D)
            self.output_norm = nn.LayerNorm(D, eps=eps)
        self.intermediate_query = nn.Linear(D, cfg.qformer_mlp_dim)
        self.output_query = nn.Linear(cfg.qformer_mlp_dim, D)
        self.output_query_norm = nn.LayerNorm(D, eps=eps)
        self.dropout = nn.Dropout(p)

    def forward(self, x, n_query, mask=None, image=None, past=None):
        """x (B, S, D), the queries first; mask (B, 1, S, S') bool, True = attend; past: the
        queries' self-attention (k, v) of an earlier pass (ITG reuses ITC's). -> x, rows' (k, v)."""
        cache = {} if past is None else {"kv": past}
        x = self.attention(x, mask=mask, cache=cache)
        kv = cache["kv"]
        queries, text = x[:, :n_query], x[:, n_query:]
        if n_query and self.crossattention is not None and image is not None:
            queries = self.crossattention(queries, context=image)   # queries only read the image
        out = []
        if n_query:
            out.append(self.output_query_norm(queries + self.dropout(
                self.output_query(F.gelu(self.intermediate_query(queries))))))
        if text.shape[1]:
            out.append(self.output_norm(text + self.dropout(
                self.output(F.gelu(self.intermediate(text))))))
        return torch.cat(out, 1) if len(out) > 1 else out[0], kv


class QFormer(nn.Module):
    """BERT embeddings (words + positions, from 0 after the queries too; one LayerNorm over
    [queries; text]) and QFormerLayers. `text=False` (stage 2): the queries only."""

    def __init__(self, cfg, text=True):
        super().__init__()
        if text:
            self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.qformer_width)
            self.position_embeddings = nn.Embedding(cfg.max_positions, cfg.qformer_width)
        self.embed_norm = nn.LayerNorm(cfg.qformer_width, eps=cfg.qformer_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layer = nn.ModuleList(
            QFormerLayer(cfg, cross=i % cfg.cross_attention_freq == 0, text=text)
            for i in range(cfg.qformer_layers))
        self.grad_checkpointing = False
        self.apply(_bert_init)

    def forward(self, queries=None, ids=None, mask=None, image=None, past=None):
        """queries (B, Q, D) and/or ids (B, L); mask (B, 1, S, S') or None (all attend); image
        (B, 1 + P, Dv); past: per layer an earlier pass's query (k, v). -> (B, S, D), kv."""
        parts = [] if queries is None else [queries]
        if ids is not None:
            parts.append(self.word_embeddings(ids) + self.position_embeddings.weight[:ids.shape[1]])
        x = self.dropout(self.embed_norm(torch.cat(parts, 1) if len(parts) > 1 else parts[0]))
        n_query = 0 if queries is None else queries.shape[1]
        kvs = []
        for i, layer in enumerate(self.layer):
            p = None if past is None else past[i]
            if self.grad_checkpointing and self.training:
                x, kv = recompute(layer, x, n_query, mask, image, p, use_reentrant=False)
            else:
                x, kv = layer(x, n_query, mask, image, p)
            kvs.append(kv)
        return x, kvs


def attention_masks(text_mask, n_query):
    """The three self-attention masks of Fig. 2 (right) over [Q queries; L text tokens],
    (B, Q + L, Q + L) bool, True = row may attend to column. A padding token is never attended to.

      uni-modal (ITC):            Q sees Q, T sees T          (two encoders that share weights)
      bi-directional (ITM):       Q and T see everything      (queries capture the pair)
      multi-modal causal (ITG):   Q sees Q, T sees Q and the T up to itself (text is generated
                                  from what the queries extracted, never the other way)
    """
    B, L = text_mask.shape
    S = n_query + L
    is_query = torch.arange(S, device=text_mask.device) < n_query
    queries = torch.ones(B, n_query, dtype=torch.bool, device=text_mask.device)
    key = torch.cat([queries, text_mask.bool()], 1)[:, None, :]          # (B, 1, S): not padding
    same_side = is_query[:, None] == is_query[None, :]
    earlier = torch.ones(S, S, dtype=torch.bool, device=text_mask.device).tril()
    causal = is_query[None, :] | (~is_query[:, None] & earlier)   # column a query, or earlier text
    return {"unimodal": same_side & key, "bidirectional": key.expand(B, S, S),
            "multimodal_causal": causal & key}


# ---- model: BLIP-2 ----

class BLIP2(nn.Module):
    """Stage 1 (Fig. 2): frozen image encoder -> ln_vision -> Q-Former (queries + text), the ITC
    projections, the ITM head, ITG's LM head (tied to the word embeddings). Stage 2 (Fig. 3): the
    same without the text parts, `language_projection` and the frozen `language_model`."""

    def __init__(self, cfg, *, dec_id, pad_id, llm=None):
        super().__init__()
        self.cfg = cfg
        self.dec_id, self.pad_id = dec_id, pad_id
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.vision_seed)        # a random encoder is a function of its seed
            self.visual_encoder = image_encoder(cfg)
        self.ln_vision = nn.LayerNorm(cfg.vision_width, eps=cfg.ln_vision_eps)
        self.query_tokens = nn.Parameter(
            torch.randn(1, cfg.num_query_tokens, cfg.qformer_width) * 0.02)
        self.qformer = QFormer(cfg, text=cfg.stage == 1)
        if cfg.stage == 1:
            self.lm_head = BertLMHead(cfg.qformer_width, cfg.vocab_size, eps=cfg.qformer_eps)
            self.lm_head.decoder.weight = self.qformer.word_embeddings.weight
            self.vision_proj = nn.Linear(cfg.qformer_width, cfg.embed_dim)           # 768 -> 256
            self.text_proj = nn.Linear(cfg.qformer_width, cfg.embed_dim)
            self.itm_head = nn.Linear(cfg.qformer_width, 2)
            self.temp = nn.Parameter(torch.tensor(cfg.temp))
        else:
            # Sec. 3.3: "a fully-connected (FC) layer to linearly project the output query
            # embeddings Z into the same dimension as the text embedding of the LLM" (768 -> 2560)
            self.language_projection = nn.Linear(cfg.qformer_width,
                                                 llm.get_input_embeddings().embedding_dim)
            self.language_model = llm
            self.llm_from_checkpoint = False
            self.set_llm_frozen(cfg.freeze_llm)
        self.vision_from_checkpoint = False
        self.set_frozen(cfg.freeze_vision)

    def set_frozen(self, frozen):
        """Sec. 3.1: the image encoder is frozen: no gradient, eval mode, run under no_grad."""
        self.vision_frozen = frozen
        self.visual_encoder.requires_grad_(not frozen)
        self.visual_encoder.train(self.training and not frozen)

    def set_llm_frozen(self, frozen):
        """Sec. 3.3: the LM is frozen like the encoder; gradients pass through it to the prompt."""
        self.llm_frozen = frozen
        self.language_model.requires_grad_(not frozen)
        self.language_model.train(self.training and not frozen)

    def train(self, mode=True):
        super().train(mode)
        self.visual_encoder.train(mode and not self.vision_frozen)
        if self.cfg.stage == 2:
            self.language_model.train(mode and not self.llm_frozen)
        return self

    def set_grad_checkpointing(self, enabled=True):
        self.qformer.grad_checkpointing = enabled
        self.visual_encoder.transformer.grad_checkpointing = enabled and not self.vision_frozen
        if self.cfg.stage == 2 and enabled:
            checkpoint_llm_layers(self.language_model)

    def trainable_state_dict(self):
        """What our checkpoints keep: all but a frozen encoder or LM rebuilt from its file."""
        skip = []
        if self.vision_frozen and not self.vision_from_checkpoint:
            skip.append("visual_encoder.")
        if (self.cfg.stage == 2 and self.llm_frozen and not self.llm_from_checkpoint
                and self.cfg.llm):
            skip.append("language_model.")
        return {k: v for k, v in self.state_dict().items() if not k.startswith(tuple(skip))}

    # -- encoders --

    def image_embeds(self, images):
        """ln_vision(frozen ViT(images)): (B, 1 + P, Dv) fp32, once per step for all losses."""
        vit = self.visual_encoder
        dtype = vit.conv1.weight.dtype
        if self.vision_frozen:
            with torch.no_grad():
                feats = vit(images.to(dtype))
        else:
            feats = vit(images)
        return self.ln_vision(feats.float())

    def query_pass(self, image_embeds):
        """The queries alone reading the image (ITC, uni-modal): (B, Q, D) and per-layer (k, v)."""
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        return self.qformer(queries, image=image_embeds)

    def text_pass(self, ids, mask):
        """The text alone (ITC's text side, uni-modal mask): (B, L, D)."""
        return self.qformer(ids=ids, mask=attention_masks(mask, 0)["unimodal"][:, None])[0]

    def image_feats(self, query_output):                    # (B, Q, E): one embedding per query
        return F.normalize(self.vision_proj(query_output), dim=-1)

    def text_feat(self, text_output):                       # (B, E): the [CLS] token's
        return F.normalize(self.text_proj(text_output[:, 0]), dim=-1)

    def itm_logits(self, ids, mask, image_embeds):
        """ITM (bi-directional mask): the head scores each query output; the Q logits averaged."""
        Q = self.cfg.num_query_tokens
        queries = self.query_tokens.expand(ids.shape[0], -1, -1)
        both = attention_masks(mask, Q)["bidirectional"][:, None]
        h, _ = self.qformer(queries, ids, both, image_embeds)
        return self.itm_head(h[:, :Q]).mean(1)

    def encode_image(self, images):
        return self.image_feats(self.query_pass(self.image_embeds(images))[0])

    def encode_text(self, ids, mask):
        return self.text_feat(self.text_pass(ids, mask))

    def forward(self, batch, micro=MicroBatch()):
        """Stage 1: the three losses (Sec. 3.2) of images (B, 3, H, W), ids and mask (B, L) and
        image ids idx (B,), sharing one encoder and one query pass. Stage 2: the LM loss (Sec.
        3.3). `micro` (--accum-steps K): ITC over all K micro-batches (features cached), the text
        losses as parts of the step's token mean; ITM stays the micro-batch's."""
        images, ids, mask = batch["images"], batch["ids"], batch["mask"]
        if self.cfg.stage == 2:
            return {"loss_lm": self.loss_llm(images, ids, mask, batch["labels"], micro.tokens)}
        idx, task = batch["idx"], self.cfg.task
        image_embeds = self.image_embeds(images)                      # (B, 1 + P, Dv)
        query_output, query_kv = self.query_pass(image_embeds)        # (B, Q, D)
        image_feats = self.image_feats(query_output)                  # (B, Q, E)
        text_feat = self.text_feat(self.text_pass(ids, mask))         # (B, E)
        losses = {}
        # --- ITC: image-text contrastive learning (uni-modal mask) ---
        if not micro.accumulating:
            losses["loss_itc"], sim_i2t, sim_t2i, idx_all = self.loss_itc(image_feats, text_feat,
                                                                          idx, task)
        else:
            with torch.no_grad():            # this micro-batch's similarities: its ITM negatives
                _, sim_i2t, sim_t2i, idx_all = self.loss_itc(image_feats, text_feat, idx, task)
            step = micro.features({"image": image_feats, "text": text_feat, "idx": idx})
            # the temperature's gradient is taken in the last pass only (it is in all K)
            losses["loss_itc"] = self.loss_itc(step["image"], step["text"], step["idx"], task,
                                               temp_grad=micro.last)[0]
        # --- ITM: image-text matching with hard negatives (bi-directional mask) ---
        losses["loss_itm"] = self.loss_itm(image_embeds, ids, mask, idx, idx_all, sim_i2t, sim_t2i)
        # --- ITG: image-grounded text generation (multi-modal causal mask) ---
        losses["loss_lm"] = self.loss_lm(ids, mask, query_kv, micro.tokens)
        return losses

    def itc_features(self, images, ids, mask):
        """What ITC compares, {"image": (B, Q, E), "text": (B, E)}, in forward's order."""
        return {"image": self.encode_image(images), "text": self.encode_text(ids, mask)}

    # -- losses (Sec. 3.2) --

    def loss_itc(self, image_feats, text_feat, idx, task, temp_grad=True):
        """Sec. 3.2 ITC: an image-text similarity is the highest of the Q query-text ones, over
        temperature; negatives: every other pair of the global batch (gathered with gradient).
        Targets: the diagonal, or every pair sharing the image id (retrieval), smoothed by 0.1.
        Returns the loss, the similarities (B, N) without gradient and the gathered ids."""
        image_all = dist.gather_with_grad(image_feats)                           # (N, Q, E)
        text_all = dist.gather_with_grad(text_feat)                              # (N, E)
        idx_all = dist.gather_no_grad(idx)
        temp = self.temp if temp_grad else self.temp.detach()
        B, N = idx.shape[0], idx_all.shape[0]
        # fp32 similarities: at temperature 0.07 bf16's spacing would blur the logits that matter
        with torch.autocast(image_feats.device.type, enabled=False):
            sim_i2t = torch.einsum("bqe,ne->bnq", image_feats.float(), text_all.float()).amax(-1)
            sim_t2i = torch.einsum("be,nqe->bnq", text_feat.float(), image_all.float()).amax(-1)
            sim_i2t, sim_t2i = sim_i2t / temp, sim_t2i / temp                     # (B, N) each
            if task == "retrieval":
                positive = (idx[:, None] == idx_all[None, :]).float()
            else:
                mine = torch.arange(B, device=idx.device) + dist.rank() * B
                positive = F.one_hot(mine, N).float()
            s = self.cfg.label_smoothing
            targets = (1 - s) * positive / positive.sum(1, keepdim=True) + s / N
            loss = (-(F.log_softmax(sim_i2t, 1) * targets).sum(1).mean()
                    - (F.log_softmax(sim_t2i, 1) * targets).sum(1).mean()) / 2
        return loss, sim_i2t.detach(), sim_t2i.detach(), idx_all

    def loss_itm(self, image_embeds, ids, mask, idx, idx_all, sim_i2t, sim_t2i):
        """Sec. 3.2 ITM with ALBEF's hard negatives: every positive pair, and for each text an image
        and for each image a text drawn from the softmax of the global batch's ITC similarities
        (never one with the same image id). A pair is scored on its image's rank (token ids travel);
        each rank's sum over its 3B pairs, so that DDP's average is the mean over all 3N."""
        B, rank = ids.shape[0], dist.rank()
        with torch.no_grad():
            # the softmax over the candidates only (no floor on the weights: docs/blip2.md)
            same = idx[:, None] == idx_all[None, :]
            # (B,) of N images, (B,) of N texts
            neg_image = sample_negatives(F.softmax(sim_t2i.masked_fill(same, float("-inf")), 1))
            neg_text = sample_negatives(F.softmax(sim_i2t.masked_fill(same, float("-inf")), 1))
        ids_all, mask_all = dist.gather_no_grad(ids), dist.gather_no_grad(mask)
        mine = torch.arange(B, device=ids.device)
        # pairs of this rank's images: (text, image, is a match)
        texts = [mine + rank * B, neg_text]
        images = [mine, mine]
        # each text of the global batch with its negative image, where that image lives here
        neg_image_all = dist.gather_no_grad(neg_image)                                     # (N,)
        if dist.world_size() > 1:
            text_of = (neg_image_all // B == rank).nonzero()[:, 0]        # (n,) one host sync
            texts.append(text_of)
            images.append(neg_image_all[text_of] - rank * B)
        else:
            texts.append(mine)
            images.append(neg_image_all)
        texts, images = torch.cat(texts), torch.cat(images)
        # a "negative" sharing the image id (there was no valid one) is a match
        labels = (idx_all[texts] == idx[images]).long()
        logits = self.itm_logits(ids_all[texts], mask_all[texts], image_embeds[images])
        return F.cross_entropy(logits.float(), labels, reduction="sum") / (3 * B)

    def itg_logits(self, ids, mask, query_kv):
        """ITG's next-token logits (B, L - 1, V) and labels, -100 at padding; [DEC] replaces [CLS]
        (multi-modal causal mask). Only the text rows run: the query rows are the ITC pass's."""
        Q = self.cfg.num_query_tokens
        dec = ids.clone()
        dec[:, 0] = self.dec_id
        text_rows = attention_masks(mask, Q)["multimodal_causal"][:, None, Q:]   # (B, 1, L, Q + L)
        h, _ = self.qformer(ids=dec, mask=text_rows, past=query_kv)
        return self.lm_head(h[:, :-1]).float(), dec[:, 1:].masked_fill(mask[:, 1:] == 0, -100)

    def loss_lm(self, ids, mask, query_kv, count=None):
        """Sec. 3.2 ITG: next-token cross-entropy (smoothing 0.1) of the text given the queries,
        over the global batch's tokens (each rank's sum x world size / count: DDP averages)."""
        logits, labels = self.itg_logits(ids, mask, query_kv)
        if count is None:
            count = dist.all_reduce_sum((labels != -100).sum().float())
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                               reduction="sum", label_smoothing=self.cfg.label_smoothing)
        return loss * dist.world_size() / count.clamp(min=1)

    # ==== stage 2 (Sec. 3.3, Fig. 3): the queries as a soft prompt to a frozen language model ====

    @property
    def decoder_only(self):
        return not self.language_model.config.is_encoder_decoder

    def soft_prompt(self, images=None, image_embeds=None):
        """Fig. 3: the output query embeddings projected to the LM's width (B, Q, H), "soft visual
        prompts that condition the LLM on visual representation"."""
        if image_embeds is None:
            image_embeds = self.image_embeds(images)
        return self.language_projection(self.query_pass(image_embeds)[0])

    def llm_inputs(self, prompt, ids, mask):
        """[soft prompt; text embeddings] and mask: a decoder-only LM's or an encoder's input."""
        embeds = self.language_model.get_input_embeddings()(ids)
        return (torch.cat([prompt.to(embeds.dtype), embeds], 1),
                torch.cat([mask.new_ones(prompt.shape[:2]), mask], 1))

    def llm_logits(self, images, ids, mask, labels):
        """The LM's next-token logits (B, T, V) and labels (B, T), -100 where nothing is predicted.
        Decoder-only: the LM reads [queries; ids]; the last query predicts ids[0], text position t
        token t + 1. Encoder-decoder: the encoder reads [queries; ids], the decoder `labels`."""
        x, m = self.llm_inputs(self.soft_prompt(images), ids, mask)
        lm = self.language_model
        if self.decoder_only:
            logits = lm(inputs_embeds=x, attention_mask=m, use_cache=False,
                        logits_to_keep=ids.shape[1] + 1).logits                  # the last query on
            return logits[:, :-1], labels
        decoder_ids = lm.prepare_decoder_input_ids_from_labels(labels=labels)
        return lm(inputs_embeds=x, attention_mask=m, decoder_input_ids=decoder_ids,
                  use_cache=False).logits, labels

    def loss_llm(self, images, ids, mask, labels, count=None):
        """Sec. 3.3: the (prefix) language modeling loss, unsmoothed, over the global batch's targets."""
        logits, labels = self.llm_logits(images, ids, mask, labels)
        if count is None:
            count = dist.all_reduce_sum((labels != -100).sum().float())
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                               reduction="sum")
        return loss * dist.world_size() / count.clamp(min=1)

    @torch.no_grad()
    def generate(self, images, ids, mask, image_embeds=None, **kwargs):
        """The LM's `generate` (kwargs as transformers') on [soft prompt; prompt] (ids / mask from
        prompt_batch). Returns the new tokens only, (B x num_return_sequences, T)."""
        x, m = self.llm_inputs(self.soft_prompt(images, image_embeds), ids, mask)
        out = self.language_model.generate(inputs_embeds=x, attention_mask=m, **kwargs)
        return out if self.decoder_only else out[:, 1:]   # an encoder-decoder's: after its start

    # -- published weights (common/weights/blip2.py) --

    @classmethod
    def from_hf(cls, path, cfg=None, tokenizer=None):
        """A transformers BLIP-2 folder (stage 1 or 2, at its config.json's architecture)."""
        return blip2_weights.from_hf(path, cfg, Config,
                                     lambda c, llm: build_blip2(c, tokenizer, llm))

    @classmethod
    def from_lavis(cls, path, cfg=None, tokenizer=None, state=None):
        """LAVIS's stage-1 file (blip2_pretrained.pth); the encoder from cfg.vision_weights."""
        return blip2_weights.from_lavis(path, cfg, Config, lambda c: build_blip2(c, tokenizer),
                                        state)


def build_blip2(cfg, tokenizer, llm=None):
    """The model for a tokenizer with [DEC] (the ITG BOS); without one (published weights, stage
    2) [DEC] is the last id and [PAD] 0, as BERT + [DEC]. vocab_size 0: the tokenizer's."""
    if tokenizer is None:
        return BLIP2(cfg, dec_id=cfg.vocab_size - 1, pad_id=0, llm=llm)
    (dec_id,) = tokenizer.add_special_tokens(["[DEC]"])
    cfg.vocab_size = cfg.vocab_size or tokenizer.vocab_size
    if cfg.vocab_size < tokenizer.vocab_size:
        raise UserError(f"model vocabulary {cfg.vocab_size} is smaller than the tokenizer's "
                        f"{tokenizer.vocab_size} (with [DEC])")
    return BLIP2(cfg, dec_id=dec_id, pad_id=tokenizer.pad_id)


def sample_negatives(weights):
    """One index per row with probability proportional to `weights` (B, N): argmax_j w_j / E_j,
    E_j ~ Exp(1) (torch.multinomial's, no host sync); a row with no mass draws uniformly."""
    weights = torch.nan_to_num(weights.float(), nan=0.0, posinf=0.0, neginf=0.0).clamp_(min=0)
    weights = torch.where(weights.sum(1, keepdim=True) > 0, weights, 1.0)   # no boolean indexing
    noise = torch.empty_like(weights).exponential_().clamp_(min=1e-30)
    return (weights / noise).argmax(1)


# ---- data ----

def caption_text(cfg):       # LAVIS's blip_caption: every caption (after the prompt)
    return functools.partial(pre_caption_blip, max_words=cfg.max_words)


def question_text(cfg):      # LAVIS's blip_question: every VQA question, before --vqa-prompt
    return functools.partial(pre_question_blip, max_words=cfg.max_words)


def build_data(cfg, tokenizer, rank, world_size):
    """Training loader and sampler (none with --eval-only), val records; by default the tiny set."""
    tiny = None if (cfg.train_data or cfg.val_data) else tiny_data()
    val_file = cfg.val_data or (os.path.join(tiny, "val.json") if tiny else "")
    root = cfg.image_root or None
    val = read_annotations(val_file, root) if val_file else None
    if cfg.eval_only:
        return None, None, val
    train_file = cfg.train_data or os.path.join(tiny_data(), "train.json")
    # crop 0.5-1 and flips at the paper presets (the tiny captions say left and right: no flips)
    example = Example(train_transform(cfg.image_size, cfg.min_scale, cfg.hflip), tokenizer,
                      cfg.max_length, text=caption_text(cfg))
    records = training_records(train_file, root, cfg.skip_bad)   # an annotation file's, or shards
    loader, sampler = train_loader(records, example, cfg, rank, world_size, train_file)
    return loader, sampler, val


def stage1_batch(batch, pad_id, trim, device):
    """A stage-1 micro-batch on the device and its ITG target count; `trim`: unused padding cut."""
    images, ids, idx = batch
    ids = trim_padding(ids, pad_id) if trim else ids
    tokens = int((ids[:, 1:] != pad_id).sum())
    images, ids = images.to(device, non_blocking=True), ids.to(device, non_blocking=True)
    idx = idx.to(device, non_blocking=True)                      # image ids: positives share one
    return dict(images=images, ids=ids, mask=(ids != pad_id).long(), idx=idx), tokens


# ---- evaluation: retrieval (Sec. 4.4) ----

@torch.no_grad()
def evaluate(model, cfg, val, tokenizer, device, precision):
    """ITC for all pairs (the highest query-text cosine), then ITM re-ranks each row's top k:
    score = the ITM match logit + the ITC cosine, -100 outside the top k. Each rank embeds its
    shard of the texts and images and keeps its images' encoder features for ITM."""
    if val is None:
        return {}
    was_training = model.training
    model.eval()
    tick = time.time()
    texts, txt2img = retrieval_texts(val, caption_text(cfg))
    ids = tokenizer(texts, cfg.max_length).to(device)
    mask = (ids != tokenizer.pad_id).long()
    t0, t1 = dist.shard_range(len(texts))
    text_feat = embed_sharded(lambda a, b: model.encode_text(ids[a:b], mask[a:b]), t0, t1,
                              cfg.batch_size, cfg.embed_dim, device, precision)       # (n_txt, E)
    i0, i1 = dist.shard_range(len(val))
    tokens = image_tokens(model.image_embeds, [r["image"] for r in val[i0:i1]], cfg.image_size,
                          cfg.batch_size, cfg.workers, device, precision)       # (mine, 1 + P, Dv)
    Q, E = cfg.num_query_tokens, cfg.embed_dim
    image_feats = embed_sharded(lambda a, b: model.image_feats(model.query_pass(tokens[a:b])[0])
                                .flatten(1), 0, len(tokens), cfg.batch_size, Q * E, device,
                                precision).view(-1, Q, E)                          # (n_img, Q, E)
    # the highest of the Q cosines, a block of images at a time (n_img x Q x n_txt would not fit)
    sim = torch.cat([torch.einsum("iqe,te->itq", image_feats[a:a + 64], text_feat).amax(-1)
                     for a in range(0, len(image_feats), 64)]) if len(image_feats) else \
        image_feats.new_zeros(0, len(texts))
    k = min(cfg.k_test, len(texts), len(val))

    def itm(t, i):              # ITM match logits of texts t with this rank's images i
        with autocast(precision, device):
            return model.itm_logits(ids[t], mask[t], tokens[i])[:, 1].float()
    rows_i2t, rows_t2i = rerank_topk(sim, (i0, i1), k, itm, cfg.itm_batch, add_similarity=True)
    metrics = retrieval_metrics(rows_i2t, txt2img, rows_t2i)
    metrics["itc_r_mean"] = retrieval_metrics(sim, txt2img)["r_mean"]        # before re-ranking
    metrics.update(itm_pairs=k * (len(texts) + len(val)), retrieval_eval_s=time.time() - tick)
    metrics.update(evaluate_itg(model, cfg, val[i0:i1], tokenizer, device, precision, tokens))
    model.train(was_training)
    return metrics


@torch.no_grad()
def evaluate_itg(model, cfg, recs, tokenizer, device, precision, tokens):
    """ITG's teacher-forced next-token accuracy on the val captions, and `itg_acc_majority`, that
    of always predicting the most frequent token (a model ignoring the image and the words)."""
    ids = tokenizer(retrieval_texts(recs, caption_text(cfg))[0], cfg.max_length).to(device)
    image_of = torch.tensor([i for i, r in enumerate(recs) for _ in r["captions"]],
                            dtype=torch.long, device=device)
    correct = torch.zeros((), device=device)
    counts = torch.zeros(cfg.vocab_size, device=device)
    for a in range(0, len(ids), cfg.batch_size):
        b = slice(a, a + cfg.batch_size)
        with autocast(precision, device):
            query_kv = model.query_pass(tokens[image_of[b]])[1]
            logits, labels = model.itg_logits(ids[b], (ids[b] != tokenizer.pad_id).long(), query_kv)
        target = labels != -100
        correct += (logits.argmax(-1)[target] == labels[target]).sum()
        counts += torch.bincount(labels[target], minlength=cfg.vocab_size).float()
    correct, counts = dist.all_reduce_sum(correct), dist.all_reduce_sum(counts)
    total = counts.sum().clamp(min=1)
    return {"itg_acc": float(100 * correct / total),
            "itg_acc_majority": float(100 * counts.max() / total)}


# ==== stage 2 (Sec. 3.3): the Q-Former as a soft prompt to a frozen language model ====

# ---- stage 2: data, texts for the language model (its loading, tokens: common/weights/blip2.py) --

def build_data_stage2(cfg, tok, decoder_only, rank, world_size):
    """Stage 2: training loader, caption val records, VQA questions. The tiny set mixes its VQA
    train questions in (the tiny LM knows no language: it learns the answer format here)."""
    tiny = None if (cfg.train_data or cfg.val_data) else tiny_data()
    root = cfg.image_root or None
    val = vqa = None
    if cfg.task == "vqa":
        answers = os.path.join(tiny, "vqa_val_annotations.json") if tiny else ""
        vqa = read_vqa(cfg.val_data or os.path.join(tiny, "vqa_val_questions.json"),
                       cfg.val_answers or answers, root)
    else:
        val_file = cfg.val_data or (os.path.join(tiny, "val.json") if tiny else "")
        val = read_annotations(val_file, root) if val_file else None
        if tiny:
            vqa = read_vqa(os.path.join(tiny, "vqa_val_questions.json"),
                           os.path.join(tiny, "vqa_val_annotations.json"))
    if cfg.eval_only:
        return None, None, val, vqa
    train_file = cfg.train_data or os.path.join(tiny_data(), "train.json")
    records = training_records(train_file, root, cfg.skip_bad)
    caption, question = caption_text(cfg), question_text(cfg)
    if tiny:
        records += [{"image": q["image"], "captions": [q["answers"][0]],
                     "prompt": cfg.vqa_prompt.format(question(q["question"])),
                     "image_id": q["question_id"]}
                    for q in read_vqa(os.path.join(tiny, "vqa_train_questions.json"),
                                      os.path.join(tiny, "vqa_train_annotations.json"))]
    end = end_ids(cfg, tok, decoder_only)
    split_prefix = not decoder_only and cfg.task == "pretrain"

    def encode(record, c, seed):
        prompt = record.get("prompt", cfg.prompt)
        target = record["captions"][c]
        target = target if "prompt" in record else caption(target)   # a caption, not a VQA answer
        if split_prefix and "prompt" not in record:
            # Sec. 3.3 prefix language modeling: the caption is cut at a random word boundary, the
            # prefix goes to the encoder after the queries, the suffix is generated (docs/blip2.md)
            words = target.split()
            k = random.Random(seed).randrange(len(words)) if seed is not None and words else 0
            prompt, target = " ".join(words[:k]), " ".join(words[k:])
        return llm_example(tok, prompt, target, cfg.max_length, decoder_only, end)

    example = Example(train_transform(cfg.image_size, cfg.min_scale, cfg.hflip), encode=encode)
    loader, sampler = train_loader(records, example, cfg, rank, world_size, train_file,
                                   collate_fn=collate_llm(tok.pad_token_id))
    return loader, sampler, val, vqa


def stage2_batch(batch, device):
    """A stage-2 micro-batch on the device and its count of the LM's target tokens."""
    tokens = int((batch[3] != -100).sum())
    images, ids, mask, labels = (x.to(device, non_blocking=True) for x in batch[:4])
    return dict(images=images, ids=ids, mask=mask, labels=labels), tokens


# ---- stage 2: evaluation, captions (Sec. 4.2) and zero-shot VQA (Sec. 4.1) ----

@torch.no_grad()
def generate_texts(model, cfg, paths, prompts, tok, device, precision, generation):
    """The LM's text for each of this rank's shard of (image, prompt) pairs."""
    start, end = dist.shard_range(len(paths))
    decoder_only = model.decoder_only
    stop = dict(eos_token_id=end_ids(cfg, tok, True)[0] if decoder_only else tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
    texts = []
    for images, index in eval_image_loader(paths[start:end], cfg.image_size, cfg.batch_size,
                                           cfg.workers):
        ids, mask = prompt_batch(tok, [prompts[start + i] for i in index.tolist()], decoder_only)
        with autocast(precision, device):
            new = model.generate(images.to(device), ids.to(device), mask.to(device), **generation,
                                 **stop)
        texts += [tok.decode(t, skip_special_tokens=True).strip() for t in new.tolist()]
    return texts


def caption_generation(cfg):
    """Beam search (5 beams, 30 / 8 new tokens in COCO) or nucleus sampling (top-p 0.9)."""
    lengths = dict(max_new_tokens=cfg.max_gen_length, min_new_tokens=cfg.min_gen_length)
    if cfg.nucleus:
        return dict(do_sample=True, top_p=0.9, top_k=0, num_beams=1, **lengths)
    return dict(do_sample=False, num_beams=cfg.num_beams, **lengths)


def evaluate_captions(model, cfg, val, tok, device, precision):
    """Sec. 4.2: a caption per val image (--prompt when fine-tuning), scored (captions.json)."""
    prompt = cfg.prompt if cfg.task == "caption" else ""
    mine = generate_texts(model, cfg, [r["image"] for r in val], [prompt] * len(val), tok, device,
                          precision, caption_generation(cfg))
    return score_captions(mine, val, cfg.output_dir)


def evaluate_vqa(model, cfg, questions, tok, device, precision):
    """Zero-shot VQA (Sec. 4.1): --vqa-prompt after the soft prompt, VQA_GENERATION; vqa_acc:
    VQAv2's accuracy (percent); vqa_answers.json in VQAv2's result format."""
    prompts = [cfg.vqa_prompt.format(question_text(cfg)(q["question"])) for q in questions]
    answers = [a for part in dist.gather_objects(generate_texts(
        model, cfg, [q["image"] for q in questions], prompts, tok, device, precision,
        VQA_GENERATION)) for a in part]
    if dist.is_main():
        with open(os.path.join(cfg.output_dir, "vqa_answers.json"), "w") as f:
            json.dump([{"question_id": q["question_id"], "answer": a}
                       for q, a in zip(questions, answers)], f, indent=1)
    right = sum(vqa_accuracy(a, q["answers"]) for q, a in zip(questions, answers))
    return {"vqa_acc": 100 * right / len(questions)}


@torch.no_grad()
def evaluate_stage2(model, cfg, val, vqa, tok, device, precision):
    was_training = model.training
    model.eval()
    tick, metrics = time.time(), {}
    if val is not None:
        metrics.update(evaluate_captions(model, cfg, val, tok, device, precision))
    if vqa is not None:
        metrics.update(evaluate_vqa(model, cfg, vqa, tok, device, precision))
    if metrics:
        metrics["generation_eval_s"] = time.time() - tick
    model.train(was_training)
    return metrics


# ==== Config, presets, and the model of a run ====

@dataclass
class Config(BaseConfig):
    stage: int = 1                  # 1: the Q-Former, ITC + ITM + ITG (Sec. 3.2); 2: the soft
                                    # prompt to a frozen LM (Sec. 3.3)
    task: str = "pretrain"          # stage 1: pretrain | retrieval (COCO fine-tuning); stage 2:
                                    # pretrain | caption (COCO, --prompt) | vqa (with --eval-only)
    # frozen image encoder (Sec. 3.1)
    vision: str = "eva"             # eva: EVA's ViT (ViT-g/14 in vit-g, last of 40 layers dropped),
                                    # sized below | clip-l: CLIP ViT-L/14, 23 of 24 layers (LAVIS)
    vision_weights: str = ""        # eva_vit_g.pth, a BLIP-2 or CLIP folder, clip_vit_L.pth;
                                    # empty: random, from vision_seed (docs/blip2.md)
    vision_seed: int = 0            # seed of a random frozen encoder: its source, rebuilt on resume
    freeze_vision: bool = True      # Sec. 3.1; retrieval and caption fine-tuning train it
    image_size: int = 64            # pixels (224 in stage 1, 364 in fine-tuning)
    patch_size: int = 8             # pixels per patch side (14)
    vision_width: int = 128         # 1408 for ViT-g
    vision_layers: int = 4          # 39 for ViT-g (its 40th is dropped, Sec. 3.1)
    vision_heads: int = 2           # 16
    vision_mlp_dim: int = 558       # 6144 for ViT-g (EVA's mlp_ratio 4.3637 x width, rounded down)
    vision_eps: float = 1e-6        # the encoder's LayerNorm epsilon (EVA: 1e-6; CLIP ViT-L: 1e-5)
    ln_vision_eps: float = 1e-5     # the trainable LayerNorm after the encoder (LAVIS's default)
    # Q-Former (Sec. 3.1): a bert-base with cross-attention and the queries' own FFNs
    num_query_tokens: int = 8       # learned queries (32 in the paper)
    qformer_width: int = 128        # 768
    qformer_layers: int = 4         # 12
    qformer_heads: int = 2          # 12
    qformer_mlp_dim: int = 512      # 3072
    cross_attention_freq: int = 2   # cross-attention in layers with layer % freq == 0 (6 of 12)
    max_positions: int = 64         # BERT's 512
    qformer_eps: float = 1e-12      # BERT LayerNorm epsilon
    dropout: float = 0.0            # BERT hidden/attention dropout (0.1 in bert-base)
    vocab_size: int = 0             # 0: the tokenizer's (bert-base-uncased + [DEC]: 30523)
    max_length: int = 32            # text tokens, [CLS] and [SEP] included (max_txt_len 32)
    max_words: int = 50             # words kept by LAVIS's blip_caption / blip_question (50)
    embed_dim: int = 64             # ITC space (256)
    # stage 2 (Sec. 3.3): the language model
    llm: str = ""                   # the frozen LM's transformers folder (OPT, FlanT5, BLIP-2's);
                                    # empty: a random tiny OPT (llm_* fields), trained along
    freeze_llm: bool = True         # Sec. 3.3 (the tiny random LM knows no language: it trains)
    llm_width: int = 128            # the tiny random OPT (--llm empty): its width
    llm_layers: int = 2             # the tiny random OPT: its decoder layers
    llm_heads: int = 2              # the tiny random OPT: its attention heads
    llm_mlp_dim: int = 512          # the tiny random OPT: its feed-forward width
    prompt: str = ""                # text before every caption, out of the loss ("a photo of ")
    text_end: str = "\n"            # decoder-only LMs: ends every target and generation (OPT: "\n")
    vqa_prompt: str = "Question: {} Short answer:"  # zero-shot VQA (Sec. 4.1)
    num_beams: int = 5              # captions: beam search width (5), or --nucleus
    nucleus: bool = False           # captions: nucleus sampling (top-p 0.9) instead of beam search
    max_gen_length: int = 30        # captions: at most this many new tokens (30)
    min_gen_length: int = 1         # captions: at least this many new tokens (8 in COCO)
    # method
    temp: float = 0.07              # ITC temperature, learnable and not clamped (as LAVIS)
    label_smoothing: float = 0.1    # ITC and ITG targets (blip2_qformer.py, Qformer.py)
    k_test: int = 16                # ITM re-ranking candidates per query (128 for COCO)
    itm_batch: int = 256            # (image, text) pairs per ITM forward when re-ranking
    # data
    val_data: str = ""              # an annotation file (--task vqa: VQAv2's questions)
    val_answers: str = ""           # --task vqa: VQAv2's annotation file (10 answers per question)
    image_root: str = ""
    tokenizer: str = ""             # the Q-Former's (bert-base-uncased); [DEC] is added
    llm_tokenizer: str = ""         # stage 2: the LM's; empty: --llm's (--init-from's), else tiny's
    skip_bad: bool = False
    min_scale: float = 0.9          # RandomResizedCrop's least area (0.5: blip2_image_train)
    hflip: bool = False             # random flips (paper presets; tiny's captions say left/right)
    # optimisation
    batch_size: int = 32            # per process (100 in stage 1)
    accum_steps: int = 1            # micro-batches per step; stage 1's ITC spans them all
    lr: float = 3e-4                # peak learning rate (1e-4 in stage 1)
    warmup_lr: float = 0.0          # warm-up starts here (1e-6); 0: lr / warmup_steps
    min_lr: float = 0.0             # the cosine ends here (1e-5)
    weight_decay: float = 0.05      # AdamW's (not on biases and 1-D tensors)
    layer_decay: float = 1.0        # a trained encoder's layer-wise lr decay (0.95 in fine-tuning)
    warmup_steps: int = 30          # linear warm-up, then cosine to min_lr (5,000 in stage 1)
    grad_clip_norm: float = 0.0     # clip the global gradient norm (0: off, as LAVIS)
    grad_checkpointing: bool = False  # recompute the Q-Former's and a trained encoder's activations
    # run
    output_dir: str = "runs/blip2"
    init_from: str = ""             # a transformers BLIP-2 folder, LAVIS's blip2_pretrained.pth,
                                    # or ours (stage 2 from stage 1 drops the text-only parts)
    init_text: str = ""             # a BERT folder to start the Q-Former from (cross-attn is new)


VIT_G = dict(vision="eva", image_size=224, patch_size=14, vision_width=1408, vision_layers=39,
             vision_heads=16, vision_mlp_dim=6144, vision_eps=1e-6)
QFORMER_BASE = dict(num_query_tokens=32, qformer_width=768, qformer_layers=12, qformer_heads=12,
                    qformer_mlp_dim=3072, max_positions=512, dropout=0.1, embed_dim=256,
                    tokenizer="bert-base-uncased")
# Sec. 3.4 (LAVIS pretrain_stage1.yaml): AdamW, warm-up from 1e-6, cosine to 1e-5, the ViT frozen
STAGE1 = dict(batch_size=100, lr=1e-4, warmup_lr=1e-6, min_lr=1e-5, weight_decay=0.05,
              warmup_steps=5000, epochs=10, workers=8, k_test=128, min_scale=0.5, hflip=True)
# pretrain_stage2.yaml: the same with batch 64, 2,000 warm-up steps; the LM from --llm
STAGE2 = dict(STAGE1, stage=2, batch_size=64, warmup_steps=2000, max_length=32)
PRESETS = {
    "tiny": {},
    "vit-g": {**VIT_G, **QFORMER_BASE, **STAGE1},
    "vit-l": {**VIT_G, **QFORMER_BASE, **STAGE1, "vision": "clip-l"},   # LAVIS's pretrain_vitL
    "vit-g-opt2.7b": {**VIT_G, **QFORMER_BASE, **STAGE2},
    "vit-g-opt6.7b": {**VIT_G, **QFORMER_BASE, **STAGE2},
    "vit-g-flant5xl": {**VIT_G, **QFORMER_BASE, **STAGE2},
}
# CLIP ViT-L/14 up to its penultimate layer (LAVIS create_clip_vit_L)
CLIP_L = dict(patch_size=14, vision_width=1024, vision_layers=23, vision_heads=16,
              vision_mlp_dim=4096, vision_eps=1e-5)
# Fine-tuning recipes of a paper preset, under the command line. Retrieval (Sec. 4.4: "we finetune
# the image encoder together with Q-Former on COCO"; LAVIS retrieval_coco_ft.yaml, blip2_coco.yaml)
FINETUNE = {
    "retrieval": dict(image_size=364, freeze_vision=False, layer_decay=0.95, lr=1e-5,
                      warmup_lr=1e-8, min_lr=0.0, warmup_steps=1000, epochs=5, batch_size=14,
                      k_test=128, grad_checkpointing=True),
    # Sec. 4.2, LAVIS caption_coco_ft.yaml: the encoder trains too
    "caption": dict(image_size=364, freeze_vision=False, lr=1e-5, warmup_lr=1e-8, min_lr=0.0,
                    warmup_steps=1000, epochs=5, batch_size=16, prompt="a photo of ", num_beams=5,
                    max_gen_length=30, min_gen_length=8, grad_checkpointing=True),
}
TASKS = ("pretrain", "retrieval", "caption", "vqa")
STAGE_TASKS = {1: ("pretrain", "retrieval"), 2: ("pretrain", "caption", "vqa")}
CHOICES = {"task": TASKS, "stage": (1, 2), "vision": ("eva", "clip-l"),
           "export_format": blip2_export.TARGETS}
# Zero-shot VQA (Sec. 4.1): length penalty -1 "encourages shorter answers"
VQA_GENERATION = dict(num_beams=5, max_new_tokens=10, min_new_tokens=1, length_penalty=-1.0)
# The tiny preset's stage 2 (a Q-Former and an LM both new) learns faster at a higher rate
TINY_STAGE2 = dict(lr=1e-3)


def task_recipe(cfg):
    """A paper preset's --task recipe (under the command line); the tiny stage 2's rate."""
    if cfg.preset == "tiny":
        return TINY_STAGE2 if cfg.stage == 2 else {}
    return FINETUNE.get(cfg.task, {})


RECIPES_DOC = "\n".join(
    ["task recipes (--task retrieval / caption with a paper preset; the command line overrides "
     "them):"] + [f"  {task}: " + ", ".join(f"{k}={v}" for k, v in values.items())
                  for task, values in {**FINETUNE, "tiny, --stage 2": TINY_STAGE2}.items()])


def check_config(cfg):
    """Start-up checks with clear messages (instead of an assert deep in the first step)."""
    if cfg.task not in STAGE_TASKS[cfg.stage]:
        raise UserError(f"--task {cfg.task} is not a stage-{cfg.stage} task "
                        f"({', '.join(STAGE_TASKS[cfg.stage])})")
    if cfg.task == "vqa" and not cfg.eval_only:
        raise UserError("--task vqa evaluates zero-shot VQA: add --eval-only")
    if cfg.stage == 2 and cfg.preset != "tiny" and not (cfg.llm or cfg.init_from or cfg.resume):
        raise UserError(f"--preset {cfg.preset}: pass --llm, the language model's transformers "
                        f"folder (or --init-from a Blip2ForConditionalGeneration folder)")
    if cfg.stage == 2 and cfg.llm and not os.path.isfile(os.path.join(cfg.llm, "config.json")):
        raise MissingFileError(f"--llm {cfg.llm}: no config.json; expected a transformers language "
                               f"model folder")
    if "{}" not in cfg.vqa_prompt:
        raise UserError(f"--vqa-prompt {cfg.vqa_prompt!r} has no {{}} for the question")
    if cfg.max_length > cfg.max_positions:
        raise UserError(f"--max-length {cfg.max_length} exceeds the {cfg.max_positions} position "
                        f"embeddings")
    if cfg.max_length < 2:
        raise UserError(f"--max-length {cfg.max_length}: ITG needs at least [DEC] and one token")
    if cfg.cross_attention_freq < 1:
        raise UserError(f"--cross-attention-freq {cfg.cross_attention_freq} must be at least 1")
    if cfg.num_query_tokens < 1:
        raise UserError(f"--num-query-tokens {cfg.num_query_tokens} must be at least 1")
    patch = CLIP_L["patch_size"] if cfg.vision == "clip-l" else cfg.patch_size   # settle_config's
    if cfg.image_size % patch:
        raise UserError(f"--image-size {cfg.image_size} is not a multiple of --patch-size {patch}")
    if not 0 <= cfg.label_smoothing < 1:
        raise UserError(f"--label-smoothing {cfg.label_smoothing} must be in [0, 1)")
    if cfg.init_text and cfg.stage == 2:
        raise UserError("--init-text starts stage 1's Q-Former from a BERT; stage 2's starts from "
                        "stage 1 (--init-from)")
    if cfg.init_text and cfg.init_from:
        raise UserError(f"--init-text starts the Q-Former from a BERT; --init-from {cfg.init_from} "
                        f"already holds one")


def settle_config(cfg, init, tokenizer, llm_tokenizer):
    """Every change to cfg after the command line, in one place: CLIP ViT-L's fields, the
    tokenizers, what --init-from fixes, the vocabulary with [DEC], the tiny LM trains along."""
    if cfg.vision == "clip-l":
        cfg.__dict__.update(CLIP_L)
    if tokenizer is not None:
        cfg.tokenizer = tokenizer.name
    if llm_tokenizer is not None:
        cfg.llm_tokenizer = llm_tokenizer.name_or_path
    cfg.__dict__.update(blip2_weights.settle_init(cfg, init, task_recipe))
    if tokenizer is not None:
        tokenizer.add_special_tokens(["[DEC]"])    # LAVIS's Blip2Base.init_tokenizer
        cfg.vocab_size = cfg.vocab_size or tokenizer.vocab_size
    if cfg.stage == 2 and not cfg.llm:
        cfg.freeze_llm = False
    if not cfg.vision_weights and cfg.preset != "tiny" and dist.is_main():
        print(f"warning: no --vision-weights: the frozen {cfg.vision} encoder is random "
              f"(seed {cfg.vision_seed})")


def build_model(cfg, init, tokenizer, llm_tokenizer):
    """The model of the settled cfg: fresh, or from --init-from (common/weights/blip2.py)."""
    return blip2_weights.build_model(cfg, init, tokenizer, llm_tokenizer, build_blip2)


def param_groups(model, cfg):
    """AdamW groups: no decay on biases and 0-/1-d tensors; a trained encoder's layer i gets
    lr x layer_decay^(L + 1 - i) (embeddings as layer 0)."""
    L, groups = cfg.vision_layers, {}
    for name, p in dist.named_parameters(model):       # the unwrapped order (FSDP re-registers)
        if not p.requires_grad:
            continue
        decay = p.ndim >= 2 and not name.endswith(".bias")
        scale = 1.0
        if name.startswith("visual_encoder."):
            layer = int(name.split(".")[3]) + 1 if ".resblocks." in name else 0
            scale = cfg.layer_decay ** (L + 1 - layer)
        group = groups.setdefault((decay, scale), {
            "params": [], "weight_decay": cfg.weight_decay if decay else 0.0, "lr": cfg.lr * scale})
        group["params"].append(p)
    return list(groups.values())


def place(model, device, precision):
    """The model on the device; on GPU the frozen encoder and LM in half precision."""
    model.to(device)
    half = torch.bfloat16 if precision == "bf16" else torch.float16
    if model.vision_frozen and device.type == "cuda" and precision != "fp32":
        model.visual_encoder.to(half)
    if model.cfg.stage == 2 and model.llm_frozen and device.type == "cuda" and precision != "fp32":
        model.language_model.to(half)
    if model.cfg.grad_checkpointing:
        model.set_grad_checkpointing()


# ---- main: the training loop ----

def main(argv=None):
    rank, local_rank, world_size, device = dist.setup()
    cfg, ckpt = resolve_config(Config, PRESETS, argv, description=__doc__, recipe=task_recipe,
                               recipes_doc=RECIPES_DOC, choices=CHOICES,
                               resume_mutable=("k_test", "itm_batch", "vision_weights"))
    check_config(cfg)
    precision = resolve_precision(cfg.precision, device)
    seed_everything(cfg.seed)                     # the same initial weights on every rank
    init = blip2_weights.read_init(cfg.init_from)   # a folder, LAVIS's file, or our checkpoint
    source = cfg.export and blip2_export.export_source(init, ckpt, cfg, PRESETS)   # and its stage
    tokenizer, llm_tokenizer = blip2_weights.load_tokenizers(cfg, init)
    settle_config(cfg, init, tokenizer, llm_tokenizer)   # from here on cfg is only read
    model = build_model(cfg, init, tokenizer, llm_tokenizer)   # resumed: the saved encoder source
    del init
    # the frozen parts are not saved but rebuilt from their sources: fingerprints check them
    fingerprints = {} if cfg.eval_only or cfg.export else blip2_weights.fingerprints(model)
    if ckpt:
        load_trainable(model, ckpt, cfg.resume)
    if cfg.export:               # --export DIR: these weights in the format their community loads
        return blip2_export.export(model, cfg, tokenizer, llm_tokenizer, source)
    place(model, device, precision)
    if cfg.stage == 1:
        loader, sampler, val = build_data(cfg, tokenizer, rank, world_size)
        prepare = functools.partial(stage1_batch, pad_id=tokenizer.pad_id, trim=not cfg.compile,
                                    device=device)
        evaluate_run = functools.partial(evaluate, model, cfg, val, tokenizer, device, precision)
    else:
        loader, sampler, val, vqa = build_data_stage2(cfg, llm_tokenizer, model.decoder_only, rank,
                                                      world_size)
        prepare = functools.partial(stage2_batch, device=device)
        evaluate_run = functools.partial(evaluate_stage2, model, cfg, val, vqa, llm_tokenizer,
                                         device, precision)
    log = open_log(cfg, "blip2", resumed=ckpt is not None)
    if cfg.eval_only:
        return eval_only(log, ckpt, evaluate_run)

    # DDP, or FSDP2 (--fsdp) sharding each block of the encoder (frozen: without gradients), of the
    # Q-Former and of a trained LM, then the rest; a frozen LM is not sharded
    keep = set(model.trainable_state_dict())       # what the checkpoints hold
    lm_blocks, frozen_lm = blip2_weights.llm_fsdp_units(model)
    train_model = dist.parallelize(model, cfg.fsdp, device, (Block, QFormerLayer) + lm_blocks,
                                   precision_dtype(precision), unsharded=frozen_lm,
                                   methods=("itc_features",))   # the feature cache calls it
    train_model = torch.compile(train_model) if cfg.compile else train_model
    optimizer = adamw(param_groups(model, cfg), lr=cfg.lr)   # each group's lr: warm-up, cosine
    run = start_run(cfg, model, optimizer, loader, sampler, log, ckpt, precision, keep=keep,
                    extra=fingerprints)
    del ckpt

    def features(b):     # under the live pass's autocast: the cache holds its features
        with autocast(precision, device):
            feats = model.itc_features(b["images"], b["ids"], b["mask"])
        return {**feats, "idx": b["idx"]}

    with Preemption() as preemption:              # SIGTERM / SIGUSR1: save the step and leave
        for batches in epochs(run, loader):
            for group in batches:
                micro, counts = zip(*(prepare(batch) for batch in group))
                # --accum-steps K: ITC over the K micro-batches through the feature cache, the
                # text losses over the step's target tokens (all ranks), ITM the micro-batches' mean
                tokens = dist.all_reduce_sum(torch.tensor(float(sum(counts)), device=device))
                cache = FeatureCache(features if cfg.stage == 1 else None, micro)
                parts = []
                for j, batch in enumerate(micro):
                    with cache.micro(j, tokens) as m, sync_gradients(train_model, m.last):
                        with autocast(precision, device):
                            losses = train_model(batch, m)
                        # stage 1: L_itc + L_itm + L_itg, unweighted
                        loss = sum(v / m.count if k == "loss_itm" else v for k, v in losses.items())
                        run.scaler.scale(loss).backward()
                    parts.append(losses)
                losses = {"loss_lm": sum(p["loss_lm"] for p in parts)}   # parts of the step's mean
                if cfg.stage == 1:
                    losses = {"loss_itc": parts[-1]["loss_itc"],   # the step's, in every pass
                              "loss_itm": sum(p["loss_itm"] for p in parts) / len(parts), **losses}
                loss = sum(losses.values())
                # names the first non-finite module (b bound now: CUDA calls it a step late)
                diagnose = (lambda b=micro[-1]: first_nonfinite_module(
                    model, {"images": b["images"]}, lambda: model(b)))
                ok, grad_norm = optimizer_step(run, loss, diagnose)
                log_train(run, {"loss": loss, **losses}, grad_norm,
                          lambda: {"temp": dist.value(model.temp).item()} if cfg.stage == 1 else {})
                if step_done(run, preemption):
                    break
            # save, evaluate, keep the best (by r_mean; stage 2: CIDEr, or VQA accuracy)
            end_epoch(run, evaluate_run, lambda m: "r_mean" if cfg.stage == 1 else
                      "cider" if "cider" in m else "vqa_acc", preemption)
    return finish(run, evaluate_run)


if __name__ == "__main__":
    cli(main)
