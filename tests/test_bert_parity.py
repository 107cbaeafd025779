"""The BERT-family encoder/decoder of common/encoders.py against transformers' BertModel
(bidirectional, token types, padding) and BertLMHeadModel with cross-attention (causal)."""
import torch
import torch.nn as nn

from common.encoders import BertEncoder, BertLMHead, hf_bert_lm_head_map, hf_bert_map, load_mapped, read_hf_checkpoint


def perturb(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def ids_and_mask(vocab, lengths, L):
    g = torch.Generator().manual_seed(2)
    ids = torch.zeros(len(lengths), L, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(1, vocab, (n,), generator=g)
    return ids, (ids != 0).long()


def test_bidirectional_encoder_matches_bert_model(tmp_path):
    from transformers import BertConfig, BertModel
    cfg = BertConfig(vocab_size=70, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=80,
                     max_position_embeddings=24, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    hf = perturb(BertModel(cfg, add_pooling_layer=False))
    hf.save_pretrained(tmp_path)
    holder = nn.Module()
    holder.bert = BertEncoder(vocab_size=70, width=32, layers=3, heads=4, mlp_dim=80, max_positions=24,
                              type_vocab_size=2)
    _, state = read_hf_checkpoint(str(tmp_path))
    load_mapped(holder, state, hf_bert_map("bert", "", 3), source=str(tmp_path), ignore=("position_ids",))
    ids, mask = ids_and_mask(70, [7, 12, 3], 12)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        out = holder.bert.eval()(ids, attention_mask=mask)
    keep = mask.bool()  # padded positions are undefined in both; compare real tokens
    torch.testing.assert_close(out[keep], ref[keep], atol=1e-5, rtol=1e-5)


def test_causal_decoder_with_cross_attention_matches_bert_lm_head_model(tmp_path):
    from transformers import BertConfig, BertLMHeadModel
    cfg = BertConfig(vocab_size=70, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=80,
                     max_position_embeddings=24, is_decoder=True, add_cross_attention=True,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    hf = perturb(BertLMHeadModel(cfg))
    hf.save_pretrained(tmp_path)
    holder = nn.Module()
    holder.bert = BertEncoder(vocab_size=70, width=32, layers=2, heads=4, mlp_dim=80, max_positions=24,
                              type_vocab_size=2, cross_dim=32, cross_layers=range(2))  # BERT: image width = text width
    holder.cls = BertLMHead(32, 70)
    holder.cls.decoder.weight = holder.bert.word_embeddings.weight          # tied, as in the checkpoint
    _, state = read_hf_checkpoint(str(tmp_path))
    mapping = {**hf_bert_map("bert", "bert", 2, cross_layers=range(2)),
               **hf_bert_lm_head_map("cls", "cls.predictions", tied_to="bert.embeddings.word_embeddings.weight")}
    load_mapped(holder, state, mapping, source=str(tmp_path), ignore=("position_ids",))
    ids, mask = ids_and_mask(70, [9, 4], 9)
    image = torch.randn(2, 5, 32)
    image_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, encoder_hidden_states=image,
                 encoder_attention_mask=image_mask).logits
        out = holder.cls(holder.bert.eval()(ids, attention_mask=mask, causal=True, context=image,
                                           context_mask=image_mask))
    keep = mask.bool()
    torch.testing.assert_close(out[keep], ref[keep], atol=1e-5, rtol=1e-5)
    # the text-only mode skips cross-attention: the image no longer changes the output
    with torch.no_grad():
        a = holder.bert(ids, attention_mask=mask, causal=True)
        b = holder.bert(ids, attention_mask=mask, causal=True, context=None)
        c = holder.bert(ids, attention_mask=mask, causal=True, context=image)
    torch.testing.assert_close(a, b)
    assert (a - c).abs().max() > 1e-3
