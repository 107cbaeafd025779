"""Our BLIP against transformers' BlipForImageTextRetrieval and BlipForConditionalGeneration on
the same tiny random weights (save_pretrained -> BLIP.from_hf): ITM logits, ITC cosine
similarities, decoder logits, and greedy / beam-search captions token for token."""
import os

import pytest
import torch

from blip_train import BLIP
from common.data import Tokenizer


@pytest.fixture(scope="module")
def tok(tiny):
    t = Tokenizer(os.path.join(tiny, "tokenizer"))
    t.add_special_tokens(["[DEC]", "[ENC]"])
    return t


def hf_config(tok):
    from transformers import BlipConfig
    dec, enc = tok.tok.convert_tokens_to_ids(["[DEC]", "[ENC]"])
    # non-square: vision width 44 != text width 32; 3 vision layers, 2 text layers; an MLP width that
    # is no integer multiple of the width (98 = 44 x 2.227..., rebuilt from a ratio it came out 97) and
    # a LayerNorm epsilon of the file's own (1e-3): the loader takes sizes, not ratios
    return BlipConfig(
        text_config=dict(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=72, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=40, encoder_hidden_size=44,
                         bos_token_id=dec, pad_token_id=tok.pad_id, sep_token_id=tok.eos_id, eos_token_id=tok.eos_id,
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
        vision_config=dict(hidden_size=44, intermediate_size=98, num_hidden_layers=3, num_attention_heads=4,
                           image_size=32, patch_size=8, layer_norm_eps=1e-3),
        image_text_hidden_size=24)


def perturb(model, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


TEXTS = ["a large red circle on a white background", "a blue square", "three shapes on a black background: a "
         "small green diamond, a large yellow circle and a small red square"]


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))


def test_retrieval_itm_and_cosine_match_transformers(tok, images, tmp_path):
    from transformers import BlipForImageTextRetrieval
    hf = perturb(BlipForImageTextRetrieval(hf_config(tok)))
    hf.save_pretrained(tmp_path)
    ours = BLIP.from_hf(str(tmp_path), tok).eval()
    ids = tok(TEXTS, 24)
    mask = (ids != tok.pad_id).long()
    enc_ids = ids.clone()
    enc_ids[:, 0] = ours.enc_id            # transformers takes the ids as given; BLIP puts [ENC] first
    with torch.no_grad():
        ref_itm = hf(input_ids=enc_ids, pixel_values=images, attention_mask=mask, use_itm_head=True).itm_score
        ref_cos = hf(input_ids=ids, pixel_values=images, attention_mask=mask, use_itm_head=False).itm_score
        itm = ours.itm_logits(ids, mask, ours.image_embed(images))
        cos = ours.encode_image(images) @ ours.encode_text(ids, mask).T
    torch.testing.assert_close(itm, ref_itm, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cos, ref_cos, atol=1e-5, rtol=1e-5)
    # momentum encoders start as exact copies
    for (a, b) in ours.model_pairs():
        for p, q in zip(a.parameters(), b.parameters()):
            assert torch.equal(p, q)


def test_an_activation_our_blocks_lack_is_refused_naming_the_field(tok, tmp_path):
    from transformers import BlipForImageTextRetrieval
    from common.utils import UserError
    config = hf_config(tok)
    config.text_config.hidden_act = "relu"
    BlipForImageTextRetrieval(config).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="text_config.hidden_act 'relu'"):
        BLIP.from_hf(str(tmp_path), tok)


@pytest.fixture(scope="module")
def captioner(tok, tmp_path_factory):
    from transformers import BlipForConditionalGeneration
    hf = perturb(BlipForConditionalGeneration(hf_config(tok)), seed=1)
    path = tmp_path_factory.mktemp("blip_cap")
    hf.save_pretrained(path)
    return hf, BLIP.from_hf(str(path), tok).eval()


def test_decoder_logits_match_transformers(tok, images, captioner):
    hf, ours = captioner
    ids = tok(TEXTS, 24)
    mask = (ids != tok.pad_id).long()
    dec_ids = ids.clone()
    dec_ids[:, 0] = ours.dec_id
    with torch.no_grad():
        ref = hf(input_ids=dec_ids, pixel_values=images, attention_mask=mask).logits
        out = ours.lm_logits(ids, mask, ours.image_embed(images))
    keep = mask.bool()
    torch.testing.assert_close(out[keep], ref[keep], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("prompt", ["", "a picture of"])
def test_generation_matches_transformers_token_for_token(tok, images, captioner, num_beams, prompt):
    hf, ours = captioner
    kwargs = dict(num_beams=num_beams, max_length=14, min_length=5)
    prompt_ids = tok(prompt, 16)[0]
    prompt_ids = prompt_ids[1: int((prompt_ids != tok.pad_id).sum()) - 1]            # no [CLS], [SEP]
    with torch.no_grad():
        if prompt:
            hf_ids = tok([prompt] * 3, 16)
            hf_ids = hf_ids[:, : len(prompt_ids) + 2]                                  # [CLS] prompt [SEP]
            ref = hf.generate(pixel_values=images, input_ids=hf_ids, do_sample=False, **kwargs)
        else:
            ref = hf.generate(pixel_values=images, do_sample=False, **kwargs)
        out = ours.generate(images, prompt_ids, **kwargs)

    def strip(rows):
        return [[t for t in r.tolist() if t != tok.pad_id] for r in rows]
    assert strip(out) == strip(ref)
    assert all(len(r) >= 5 for r in strip(out))                                       # min_length honoured


def test_decoder_shares_all_but_self_attention(captioner):
    _, ours = captioner
    enc, dec = ours.text_encoder, ours.text_decoder
    shared = [(enc.word_embeddings.weight, dec.word_embeddings.weight),
              (enc.layer[1].crossattention.attn.kv.weight, dec.layer[1].crossattention.attn.kv.weight),
              (enc.layer[0].intermediate.weight, dec.layer[0].intermediate.weight),
              (enc.layer[0].output_norm.bias, dec.layer[0].output_norm.bias),
              (dec.word_embeddings.weight, ours.lm_head.decoder.weight)]
    with torch.no_grad():
        for a, b in shared:
            before = b.clone()
            a.add_(1.0)                                   # a change to the encoder's tensor...
            assert torch.equal(b, before + 1.0)           # ...is the decoder's change
            a.sub_(1.0)
        for i in range(2):
            assert enc.layer[i].attention.attn.qkv.weight.data_ptr() != dec.layer[i].attention.attn.qkv.weight.data_ptr()
            assert not torch.equal(enc.layer[i].attention.attn.qkv.weight, dec.layer[i].attention.attn.qkv.weight)
    n_shared = sum(p.numel() for n, p in dec.named_parameters() if ".attention." not in n)
    n_own = sum(p.numel() for n, p in dec.named_parameters() if ".attention." in n)
    assert n_shared > 0 and n_own > 0
