"""Shared inputs for the distributed checks (imported by the torchrun worker and the tests)."""
import torch


def clip_config(**overrides):
    import clip_train
    return clip_train.Config(vocab_size=50, eos_id=49, image_size=32, patch_size=8, vision_width=64, vision_layers=2,
                             vision_heads=2, text_width=32, text_layers=2, text_heads=2, context_length=12,
                             embed_dim=24, **overrides)


def clip_batch(n=8):
    g = torch.Generator().manual_seed(123)
    images = torch.randn(n, 3, 32, 32, generator=g)
    ids = torch.zeros(n, 12, dtype=torch.long)
    for i in range(n):
        k = 2 + i % 9
        ids[i, :k] = torch.randint(1, 49, (k,), generator=g)
        ids[i, k] = 49   # EOS, then padding
    return images, ids


BLIP_SMALL = dict(image_size=32, patch_size=16, vision_width=32, vision_layers=1, vision_heads=2, text_width=32,
                  vision_mlp_dim=128, text_layers=2, text_heads=2, text_mlp_dim=64, max_positions=32, max_length=24,
                  embed_dim=16, queue_size=8, k_test=4, batch_size=4, max_gen_length=10, min_gen_length=3)
BLIP_SMALL_ARGS = [f"--{k.replace('_', '-')}={v}" for k, v in BLIP_SMALL.items()]


def blip_model(seed=0, **overrides):
    """A small BLIP on the tiny tokenizer, identical on every rank for the same seed."""
    import os
    import blip_train
    from common.data import Tokenizer, tiny_data
    tok = Tokenizer(os.path.join(tiny_data(), "tokenizer"))
    cfg = blip_train.Config(**{**BLIP_SMALL, **overrides})
    cfg.vocab_size = tok.vocab_size + 2
    torch.manual_seed(seed)
    return blip_train.build_blip(cfg, tok), tok, cfg


def blip_batch(tok, n=4):
    g = torch.Generator().manual_seed(7)
    images = torch.randn(n, 3, 32, 32, generator=g)
    texts = ["a large red circle", "a small blue square on a black background", "a green triangle",
             "two shapes: a red diamond and a yellow circle"] * (n // 4 + 1)
    ids = tok(texts[:n], 24)
    return images, ids, (ids != tok.pad_id).long(), torch.arange(n)
