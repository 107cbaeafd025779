"""BLIP-2 stage 2 (blip2_train.py --stage 2): parity with transformers' Blip2ForConditionalGeneration
on tiny random configs with an OPT and a T5 language model (logits, LM loss, greedy and beam-search
generations), what trains and what stays frozen, the loss mask and truncation, and the start from
stage 1."""
import pytest
import torch

import blip2_train
from tests.test_blip2 import hf_config, randomise

Q, VOCAB, IMAGE_TOKEN = 4, 60, 59


def opt_config():
    from transformers import OPTConfig
    return OPTConfig(vocab_size=VOCAB, hidden_size=24, num_hidden_layers=2, ffn_dim=48, num_attention_heads=2,
                     max_position_embeddings=64, word_embed_proj_dim=24, pad_token_id=1, bos_token_id=2,
                     eos_token_id=2, dropout=0.0, attention_dropout=0.0)


def t5_config():
    from transformers import T5Config
    return T5Config(vocab_size=VOCAB, d_model=24, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=3,
                    relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
                    decoder_start_token_id=0, feed_forward_proj="gated-gelu", tie_word_embeddings=False)


class _Tok:   # hf_config reads the Q-Former vocabulary from a tokenizer; stage 2's Q-Former reads no text
    vocab_size = 31


@pytest.fixture(scope="module", params=["opt", "t5"])
def pair(request, tmp_path_factory):
    """(transformers model, ours via from_hf, kind) on the same random weights."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration
    vision, qformer, extra = hf_config(_Tok, text=False)
    extra["num_query_tokens"] = Q
    text = opt_config() if request.param == "opt" else t5_config()
    config = Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
                         image_token_index=IMAGE_TOKEN, **extra)
    torch.manual_seed(0)
    hf = randomise(Blip2ForConditionalGeneration(config), 3)
    path = tmp_path_factory.mktemp(f"blip2-{request.param}")
    hf.save_pretrained(path)
    ours = blip2_train.BLIP2.from_hf(str(path)).eval()
    assert ours.cfg.stage == 2 and ours.cfg.llm == str(path)
    return hf, ours, request.param


def batch(kind, B=3, L=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, 3, 32, 32, generator=g)
    ids = torch.randint(3, IMAGE_TOKEN, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 5:] = 0                                     # right padding
    ids[1, 5:] = 1 if kind == "opt" else 0
    if kind == "opt":
        ids[:, 0] = 2                                   # [BOS]
    return images, ids, mask


def test_logits_and_loss_equal_transformers(pair):
    """The same image and text: the LM's logits within 1e-5 and the LM loss equal to the one
    transformers returns with labels (decoder-only: [image tokens; text] with -100 on the queries,
    the prompt and the padding, and [BOS] a target where there is no prompt, predicted by the last
    query; encoder-decoder: the encoder's text and the decoder's labels)."""
    hf, ours, kind = pair
    images, ids, mask = batch(kind)
    labels = ids.masked_fill(mask == 0, -100)
    if kind == "opt":
        labels[:2, :3] = -100                  # rows 0, 1: [BOS] and a 2-token prompt; row 2: none
        hf_ids = torch.cat([torch.full((3, Q), IMAGE_TOKEN), ids], 1)
        hf_mask = torch.cat([torch.ones(3, Q, dtype=torch.long), mask], 1)
        out = hf(pixel_values=images, input_ids=hf_ids, attention_mask=hf_mask,
                 labels=torch.cat([torch.full((3, Q), -100), labels], 1))
        with torch.no_grad():
            x, m = ours.llm_inputs(ours.soft_prompt(images), ids, mask)
            full = ours.language_model(inputs_embeds=x, attention_mask=m).logits
            logits, shifted = ours.llm_logits(images, ids, mask, labels)
        valid = hf_mask.bool()
        assert (full - out.logits)[valid].abs().max() < 1e-5
        # ours runs the LM head on the last query and the text positions only; t predicts t + 1
        assert (logits - out.logits[:, Q - 1:-1]).abs().max() < 1e-5
        assert torch.equal(shifted, labels)
    else:
        target = torch.randint(2, IMAGE_TOKEN, (3, 5), generator=torch.Generator().manual_seed(1))
        labels = target.clone()
        labels[2, 3:] = -100
        hf_ids = torch.cat([torch.full((3, Q), IMAGE_TOKEN), ids], 1)
        hf_mask = torch.cat([torch.ones(3, Q, dtype=torch.long), mask], 1)
        out = hf(pixel_values=images, input_ids=hf_ids, attention_mask=hf_mask, labels=labels)
        with torch.no_grad():
            logits, same = ours.llm_logits(images, ids, mask, labels)
        assert (logits - out.logits).abs().max() < 1e-5 and torch.equal(same, labels)
    with torch.no_grad():
        loss = ours(dict(images=images, ids=ids, mask=mask, labels=labels))["loss_lm"]
    assert abs(loss.item() - out.loss.item()) < 1e-5, (loss.item(), out.loss.item())


@pytest.mark.parametrize("beams", [1, 3])
def test_generate_equals_transformers(pair, beams):
    """Greedy and beam-search generations token for token equal to Blip2ForConditionalGeneration.generate
    (the same prompt), and a batch with prompts of different lengths equal to each one alone."""
    hf, ours, kind = pair
    images = batch(kind)[0]
    prompt = [2, 17, 33] if kind == "opt" else [17, 33, 1]          # OPT: [BOS] prompt; T5: prompt </s>
    kw = dict(num_beams=beams, max_new_tokens=6, min_new_tokens=2, do_sample=False)
    hf_ids = torch.tensor([[IMAGE_TOKEN] * Q + prompt] * 3)
    want = hf.generate(pixel_values=images, input_ids=hf_ids, attention_mask=torch.ones_like(hf_ids), **kw)
    want = want[:, hf_ids.shape[1]:] if kind == "opt" else want[:, 1:]
    ids = torch.tensor([prompt] * 3)
    got = ours.generate(images, ids, torch.ones_like(ids), **kw)
    assert torch.equal(got, want), (got, want)
    # prompts per sample: padded (OPT on the left, T5 on the right) = one at a time
    prompts = [[2, 17, 33, 40], [2, 5], [2, 9, 11]] if kind == "opt" else [[17, 33, 40, 1], [5, 1], [9, 11, 1]]
    n = max(map(len, prompts))
    ids = torch.full((3, n), 1 if kind == "opt" else 0)
    mask = torch.zeros(3, n, dtype=torch.long)
    for i, p in enumerate(prompts):
        span = slice(n - len(p), n) if kind == "opt" else slice(0, len(p))
        ids[i, span], mask[i, span] = torch.tensor(p), 1
    kw.update(max_new_tokens=5, min_new_tokens=5)                     # equal lengths: no padding to compare
    together = ours.generate(images, ids, mask, **kw)
    for i, p in enumerate(prompts):
        alone = ours.generate(images[i:i + 1], torch.tensor([p]), torch.ones(1, len(p), dtype=torch.long), **kw)
        assert torch.equal(together[i], alone[0]), (i, together[i], alone[0])
