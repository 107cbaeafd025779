"""common/generation.py and the KV cache of common/encoders.py: the cached encoder gives the
hidden states of a full forward; BLIP's cached generation gives the tokens of full recomputation
(greedy, beam search, sampling); one beam is greedy; min_length, EOS, padding and nucleus
sampling behave as transformers' generate. (Token parity with transformers itself:
test_blip_parity.py.)"""
import pytest
import torch

from common.encoders import BertEncoder, KVCache
from common.generation import beam_search, greedy_or_sample, nucleus_sample
from tests.workers.dist_fixtures import blip_model

EOS, PAD = 1, 0


def decoder(layers=3, width=32, heads=4, cross_dim=24, seed=0):
    torch.manual_seed(seed)
    enc = BertEncoder(vocab_size=40, width=width, layers=layers, heads=heads, mlp_dim=64, max_positions=32,
                      type_vocab_size=2, cross_dim=cross_dim, cross_layers=(0, 2))
    with torch.no_grad():                     # larger than BERT's init: positions and context must matter
        for p in enc.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return enc.eval()


def test_cached_encoder_gives_the_hidden_states_of_a_full_forward():
    """A prompt of 3, then a chunk of 2, then single tokens: every new position's hidden state equals
    the full causal forward's, with and without a padding mask (a wrong position offset, a
    misplaced causal triangle or a lost cached key fails this by far more than 1e-5)."""
    enc = decoder()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 40, (3, 9), generator=g)
    image = torch.randn(3, 5, 24, generator=g)
    keep = torch.ones(3, 9, dtype=torch.long)
    keep[0, 1] = keep[2, 4] = 0                                    # keys nobody may attend to
    for mask in (None, keep):
        with torch.no_grad():
            full = enc(ids, mask, causal=True, context=image)
            cache, got = KVCache(len(enc.layer)), []
            for a, b in ((0, 3), (3, 5), (5, 6), (6, 7), (7, 8), (8, 9)):
                got.append(enc(ids[:, a:b], None if mask is None else mask[:, :b], causal=True, context=image,
                               cache=cache))
        assert cache.length == 9
        torch.testing.assert_close(torch.cat(got, 1), full, atol=1e-5, rtol=1e-5)
        # the check has teeth: the same tokens without their past differ
        assert (enc(ids[:, 8:9], causal=True, context=image) - full[:, 8:9]).abs().max() > 0.1


def test_cache_reordered_for_beams_shares_the_image_keys():
    """Prompt on B rows, cache copied to K beams per row, beams permuted within their example, one
    more token: equal to a full forward of the permuted sequences with the image repeated per
    beam. The image's keys and values stay (B, ...): computed once, never copied per beam."""
    enc = decoder()
    B, K = 2, 3
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(2, 40, (B, 4), generator=g)
    image = torch.randn(B, 5, 24, generator=g)
    with torch.no_grad():
        cache = KVCache(len(enc.layer))
        enc(prompt, causal=True, context=image, cache=cache)
        cache.reorder(torch.arange(B).repeat_interleave(K))
        seqs = prompt.repeat_interleave(K, 0)
        nxt = torch.randint(2, 40, (B * K, 1), generator=g)
        enc(nxt, causal=True, context=image, cache=cache)
        seqs = torch.cat([seqs, nxt], 1)
        perm = torch.tensor([2, 2, 0, 4, 3, 3])                    # beams follow parents of their own example
        cache.reorder(perm)
        seqs = seqs[perm]
        last = torch.randint(2, 40, (B * K, 1), generator=g)
        got = enc(last, causal=True, context=image, cache=cache)[:, 0]
        seqs = torch.cat([seqs, last], 1)
        want = enc(seqs, causal=True, context=image.repeat_interleave(K, 0))[:, -1]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert cache.layers[0]["cross"]["kv"][0].shape[0] == B and cache.layers[0]["self"]["kv"][0].shape[:3] == (6, 4, 6)
    assert cache.layers[1]["cross"] == {}                          # layer 1 has no cross-attention


def test_grad_checkpointing_still_gives_the_same_gradients():
    enc = decoder(layers=2).train()
    ids = torch.randint(2, 40, (2, 6))
    image = torch.randn(2, 5, 24)
    grads = []
    for ckpt in (False, True):
        enc.grad_checkpointing = ckpt
        enc.zero_grad()
        enc(ids, torch.ones_like(ids), causal=True, context=image).square().sum().backward()
        grads.append([p.grad.clone() for p in enc.parameters() if p.grad is not None])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


# ---- BLIP: cached generation == full recomputation ----

@pytest.fixture(scope="module")
def blip():
    model, tok, _ = blip_model()
    torch.manual_seed(3)
    with torch.no_grad():                     # varied captions (a fresh model repeats one token)
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("kwargs", [dict(num_beams=1), dict(num_beams=3), dict(num_beams=4, repetition_penalty=1.3),
                                    dict(sample=True, repetition_penalty=1.1), dict(sample=True, top_p=0.5)])
def test_blip_cache_changes_no_token(blip, kwargs):
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    prompt = torch.tensor([5, 6, 7])
    out = {}
    for use_cache in (True, False):
        torch.manual_seed(0)
        out[use_cache] = blip.generate(images, prompt, max_length=18, min_length=6, use_cache=use_cache, **kwargs)
    assert torch.equal(out[True], out[False]), (out[True], out[False])
    assert len({tuple(r.tolist()) for r in out[True]}) >= 3         # not one caption repeated
    assert out[True].shape[1] > 8


def test_blip_cache_feeds_new_tokens_only_and_projects_the_image_once(blip):
    images = torch.randn(2, 3, 32, 32)
    lengths, kv_calls = [], []
    h1 = blip.text_decoder.register_forward_pre_hook(lambda m, args, kw: lengths.append(args[0].shape[1]),
                                                     with_kwargs=True)
    hooks = [h1] + [layer.crossattention.attn.kv.register_forward_hook(lambda *a: kv_calls.append(1))
                    for layer in blip.text_decoder.layer]
    try:
        seqs = blip.generate(images, torch.tensor([5, 6]), num_beams=3, max_length=12, min_length=12)
        assert lengths == [3] + [1] * (seqs.shape[1] - 4)        # [DEC] + prompt, then one token per step
        assert len(kv_calls) == len(blip.text_decoder.layer)      # image keys / values: once per layer
        lengths.clear()
        blip.generate(images, torch.tensor([5, 6]), num_beams=3, max_length=12, min_length=12, use_cache=False)
        assert lengths == list(range(3, 12))
    finally:
        for h in hooks:
            h.remove()


def test_one_beam_is_greedy(blip):
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    embeds = blip.image_embed(images).detach()

    def step(tokens, cache):
        with torch.no_grad():
            return blip.lm_head(blip.text_decoder(tokens, causal=True, context=embeds, cache=cache)[:, -1]), cache

    prompt = torch.full((6, 1), blip.dec_id)
    eos_bias = blip.lm_head.decoder.bias
    saved = eos_bias[blip.sep_id].clone()
    try:
        with torch.no_grad():       # a likelier EOS, so that some rows end early whatever the vocabulary
            eos_bias[blip.sep_id] += 4.0
        for min_length in (2, 7):
            args = dict(max_length=16, min_length=min_length, eos_id=blip.sep_id, pad_id=blip.pad_id)
            layers = len(blip.text_decoder.layer)
            greedy = greedy_or_sample(step, prompt, KVCache(layers), **args)
            beam = beam_search(step, prompt, KVCache(layers), num_beams=1, **args)
            assert torch.equal(beam, greedy)
            assert (greedy == blip.sep_id).any()                    # some rows end early: EOS / padding compared
    finally:
        with torch.no_grad():
            eos_bias[blip.sep_id] = saved


# ---- decoding rules on scripted models ----

class Scripted:
    """A model with fixed logits: the row whose prompt starts with token 20 + r wants EOS once its
    sequence has `eos_at[r]` tokens and token 7 otherwise (tokens 2-6 a distant second). The cache
    is the token history, so beams and reorders are followed exactly."""

    def __init__(self, eos_at, V=24):
        self.eos_at, self.V = eos_at, V

    def step(self, tokens, seqs):
        seqs = tokens if seqs is None else torch.cat([seqs, tokens], 1)
        row = seqs[:, 0] - 20
        logits = torch.zeros(seqs.shape[0], self.V)
        logits[:, 7] = 5.0
        logits[:, 2:7] = 0.1 * torch.arange(5.0)
        wants = torch.tensor([self.eos_at[int(r)] for r in row]) == seqs.shape[1]
        logits[wants, EOS] = 10.0
        return logits, seqs


def test_min_length_eos_and_padding():
    m = Scripted(eos_at=[3, 5, 7])
    prompt = torch.tensor([[20, 9], [21, 9], [22, 9]])
    reorder = lambda seqs, index: seqs[index]  # noqa: E731
    for decode in ("greedy", "beam"):
        def run(**kw):
            args = dict(eos_id=EOS, pad_id=PAD, **kw)
            if decode == "greedy":
                return greedy_or_sample(m.step, prompt, None, **args)
            return beam_search(m.step, prompt, None, reorder, num_beams=2, **args)

        out = run(max_length=20, min_length=0)
        assert out.tolist() == [[20, 9, 7, EOS, PAD, PAD, PAD, PAD],
                                [21, 9, 7, 7, 7, EOS, PAD, PAD],
                                [22, 9, 7, 7, 7, 7, 7, EOS]], decode
        # min_length 5: row 0 may not end at length 4; it never wants EOS again and runs to max_length
        out = run(max_length=10, min_length=5)
        assert out.tolist() == [[20, 9] + [7] * 8,
                                [21, 9, 7, 7, 7, EOS, PAD, PAD, PAD, PAD],
                                [22, 9, 7, 7, 7, 7, 7, EOS, PAD, PAD]], decode
        # max_length cuts the last row before its EOS
        out = run(max_length=6, min_length=0)
        assert out.tolist() == [[20, 9, 7, EOS, PAD, PAD], [21, 9, 7, 7, 7, EOS], [22, 9, 7, 7, 7, 7]], decode


def test_beam_search_keeps_padding_ids_inside_a_caption():
    """A caption may contain the padding id (open_clip pads CLIP BPE with 0, which is "!"): the
    final crop keeps every token up to the last non-padding one."""
    seq = [4, PAD, PAD, 5, 6, EOS]

    def step(tokens, seqs):
        seqs = tokens if seqs is None else torch.cat([seqs, tokens], 1)
        nxt = seq[min(seqs.shape[1] - 1, len(seq) - 1)]
        return torch.full((seqs.shape[0], 8), -10.0).index_fill(1, torch.tensor([nxt]), 0.0), seqs

    out = beam_search(step, torch.tensor([[9]]), None, lambda s, i: s[i], num_beams=2, max_length=10, eos_id=EOS,
                      pad_id=PAD)
    assert out.tolist() == [[9] + seq]


def test_sampling_pads_finished_rows_and_stops_when_all_are_done():
    m = Scripted(eos_at=[3, 4])
    torch.manual_seed(0)
    out = greedy_or_sample(m.step, torch.tensor([[20, 9], [21, 9]]), None, sample=True, top_p=0.01, max_length=30,
                           eos_id=EOS, pad_id=PAD)
    assert out.tolist() == [[20, 9, 7, EOS, PAD], [21, 9, 7, 7, EOS]]   # top_p 0.01: only the best token


def test_beam_search_finds_the_better_sequence_greedy_misses():
    """First token: A (p 0.5) or B (0.4); after A, EOS has p 0.3, after B 0.95. Greedy takes A;
    beam search (2 beams) finishes B EOS, the higher length-normalised log-probability."""
    A, B = 2, 3

    after = {A: [1e-6, 0.3, 0.35, 0.35], B: [1e-6, 0.95, 0.025, 0.025]}     # p(PAD, EOS, A, B | last)

    def step(tokens, seqs):
        seqs = tokens if seqs is None else torch.cat([seqs, tokens], 1)
        p = torch.tensor([after.get(last, [1e-6, 0.1, 0.5, 0.4]) for last in seqs[:, -1].tolist()])
        return p.log(), seqs

    prompt = torch.tensor([[9]])
    args = dict(max_length=3, eos_id=EOS, pad_id=PAD)
    assert greedy_or_sample(step, prompt, None, **args).tolist() == [[9, A, A]]
    assert beam_search(step, prompt, None, lambda s, i: s[i], num_beams=2, **args).tolist() == [[9, B, EOS]]


def test_nucleus_and_top_k():
    torch.manual_seed(0)
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    draws = nucleus_sample(probs.log().repeat(4000, 1), top_p=0.7)
    freq = torch.bincount(draws, minlength=4).float() / 4000
    # the smallest set with mass >= 0.7 is {0, 1}, renormalised to 0.625 / 0.375
    assert freq[2:].sum() == 0 and abs(freq[0] - 0.625) < 0.03, freq
    flat = torch.zeros(4000, 60)
    flat[:, :50] = torch.linspace(1.0, 0.9, 50)                     # 50 best, 10 a hair below
    flat[:, 50:] = 0.89
    draws = nucleus_sample(flat, top_p=1.0)
    assert draws.max() < 50 and len(draws.unique()) > 40
    assert nucleus_sample(flat, top_p=1.0, top_k=0).max() >= 50     # top_k 0: no cut
