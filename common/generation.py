"""Autoregressive decoding for the captioning scripts: greedy, nucleus sampling and beam search,
with the logits processors and beam bookkeeping of transformers' `generate`, so that a model
ported from transformers captions with the same tokens.

The model enters through two functions; nothing here knows what a decoder is:

    step(tokens, cache) -> (logits, cache)
        tokens (N, t): the tokens the model has not seen yet: the whole prompt on the first call,
        then the token chosen at the previous step. logits (N, V): the next-token logits of each
        row. `cache` is whatever the model keeps between calls (a `common.encoders.KVCache`, or the
        token history for a model that recomputes every step); it starts as the `cache` argument.
    reorder(cache, index) -> cache
        the cache with its rows replaced by rows `index` (N',) (beam search only: copy the prompt's
        rows to every beam, then follow the beams that survive each step).

Lengths count every token, prompt included (transformers' `max_length` / `min_length`). Rows that
reach `eos_id` continue with `pad_id`; generation stops when every row has or at `max_length`.
"""
import torch
import torch.nn.functional as F


def process_logits(scores, seqs, min_length, eos_id, repetition_penalty=1.0):
    """transformers' RepetitionPenaltyLogitsProcessor (CTRL, Keskar et al. 2019: a token already in
    the row has its score divided by the penalty if positive, multiplied if negative) and
    MinLengthLogitsProcessor (no `eos_id` while the row is shorter than `min_length`).
    scores (N, V), seqs (N, T) the tokens so far. Returns new scores."""
    if repetition_penalty != 1.0:
        prev = scores.gather(1, seqs)
        scores = scores.scatter(1, seqs, torch.where(prev < 0, prev * repetition_penalty, prev / repetition_penalty))
    if seqs.shape[1] < min_length:
        scores = scores.index_fill(1, torch.tensor([eos_id], device=scores.device), -float("inf"))
    return scores


def nucleus_sample(scores, top_p, top_k=50):
    """One token per row of scores (N, V): keep the `top_k` best (transformers' default of 50,
    which BLIP's sampling inherits; 0 = all), then the smallest set whose probability reaches
    `top_p` (Holtzman et al. 2020), and draw from it with torch.multinomial."""
    if top_k:
        kth = scores.topk(min(top_k, scores.shape[-1]), -1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    probs = F.softmax(scores, -1)
    sorted_probs, order = probs.sort(-1, descending=True)
    drop = sorted_probs.cumsum(-1) - sorted_probs > top_p          # the mass before a token already >= p
    probs = probs.scatter(1, order, sorted_probs.masked_fill(drop, 0))
    return torch.multinomial(probs, 1).squeeze(1)


@torch.no_grad()
def greedy_or_sample(step, prompt, cache=None, *, sample=False, max_length, min_length=0, top_p=0.9, top_k=50,
                     eos_id, pad_id, repetition_penalty=1.0):
    """Greedy decoding, or nucleus sampling with `sample=True`, from `prompt` (B, Lp) (see the
    module docstring for `step`). Returns (B, T) tokens, prompt included, T <= max_length; rows
    that ended early are padded with `pad_id` after their `eos_id`."""
    seqs, new = prompt, prompt
    done = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    while seqs.shape[1] < max_length and not done.all():
        logits, cache = step(new, cache)
        scores = process_logits(logits, seqs, min_length, eos_id, repetition_penalty)
        token = nucleus_sample(scores, top_p, top_k) if sample else scores.argmax(-1)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        new = token[:, None]
        seqs = torch.cat([seqs, new], 1)
        done |= token == eos_id
    return seqs


@torch.no_grad()
def beam_search(step, prompt, cache=None, reorder=None, *, num_beams, max_length, min_length=0, eos_id, pad_id,
                repetition_penalty=1.0, length_penalty=1.0):
    """Beam search as transformers' `generate` (early_stopping=False): keep the 2K best
    continuations, finish those hitting `eos_id` or `max_length` if among the top K, score finished
    beams by sum(log p) / generated_length^length_penalty, stop when no running beam can beat the
    worst finished one. The prompt (B, Lp) runs once per example and its cache is copied to the K
    beams with `reorder` (default: `cache.reorder(index)`). Returns the best finished sequence per
    example (B, T), padded with `pad_id` and cropped to the longest. (The transformers 4.15 that
    BLIP used divided by the whole length, prompt included; current transformers, and this
    function, count generated tokens only.)"""
    reorder = reorder or (lambda c, index: c.reorder(index))
    B, Lp = prompt.shape
    K, dev = num_beams, prompt.device
    logits, cache = step(prompt, cache)                                          # (B, V): equal for every beam
    start = torch.arange(B, device=dev).repeat_interleave(K)
    logits, cache, seqs = logits[start], reorder(cache, start), prompt[start]    # (B*K, ...)
    running = torch.tensor([0.0] + [-1e9] * (K - 1), device=dev).repeat(B, 1)  # (B, K): one live beam at first
    finished = torch.full((B, K, max_length), pad_id, dtype=torch.long, device=dev)
    finished_scores = torch.full((B, K), -1e9, device=dev)
    is_finished = torch.zeros(B, K, dtype=torch.bool, device=dev)
    can_improve = torch.ones(B, 1, dtype=torch.bool, device=dev)
    top_k_mask = torch.arange(2 * K, device=dev) < K
    row0 = torch.arange(B, device=dev)[:, None] * K                             # first beam row of each example
    cur = Lp
    while True:
        logp = process_logits(F.log_softmax(logits, -1), seqs, min_length, eos_id, repetition_penalty)
        V = logp.shape[-1]
        acc = (logp.view(B, K, V) + running[..., None]).view(B, K * V)
        top_scores, top_idx = acc.topk(2 * K, 1)                                  # (B, 2K)
        beam, token = top_idx // V, top_idx % V
        cand = torch.cat([seqs.view(B, K, cur).gather(1, beam[..., None].expand(-1, -1, cur)), token[..., None]], 2)
        hits = (token == eos_id) | (cur + 1 >= max_length)
        # running beams for the next step: the K best that did not finish
        run_scores = top_scores - 1e9 * hits.float()
        keep = run_scores.topk(K, 1).indices
        seqs = cand.gather(1, keep[..., None].expand(-1, -1, cur + 1)).view(B * K, cur + 1)
        running = run_scores.gather(1, keep)
        # finished hypotheses: only candidates among the top K, length-normalised
        fin = top_scores / (cur + 1 - Lp) ** length_penalty
        fin = fin - 1e9 * (~can_improve).float() - 1e9 * (~(hits & top_k_mask)).float()
        padded = F.pad(cand, (0, max_length - cur - 1), value=pad_id)
        merged = torch.cat([finished, padded], 1)
        merged_scores = torch.cat([finished_scores, fin], 1)
        merged_done = torch.cat([is_finished, hits & top_k_mask], 1)
        best = merged_scores.topk(K, 1).indices
        finished = merged.gather(1, best[..., None].expand(-1, -1, max_length))
        finished_scores, is_finished = merged_scores.gather(1, best), merged_done.gather(1, best)
        cur += 1
        best_running = running[:, :1] / (cur - Lp) ** length_penalty
        worst_finished = torch.where(is_finished, finished_scores.min(1, keepdim=True).values,
                                     torch.full_like(finished_scores, -1e9))
        can_improve = can_improve & (best_running > worst_finished).any(1, keepdim=True)
        if not can_improve.any() or hits.all():
            break
        cache = reorder(cache, (row0 + beam.gather(1, keep)).view(-1))           # each survivor's parent row
        logits, cache = step(seqs[:, -1:], cache)
    out = finished[:, 0]
    # trailing padding removed, as generate crops: up to the last non-padding token of any row (a
    # padding id inside a caption, CLIP BPE's "!" = 0 in open_clip, does not shorten it)
    length = int(((out != pad_id) * torch.arange(1, out.shape[1] + 1, device=dev)).max())
    return out[:, :max(length, Lp)]
