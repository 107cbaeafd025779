"""Shared inputs for the distributed checks (imported by the torchrun worker and the tests)."""
import torch


def clip_config():
    import clip_train
    return clip_train.Config(vocab_size=50, eos_id=49, image_size=32, patch_size=8, vision_width=64, vision_layers=2,
                             vision_heads=2, text_width=32, text_layers=2, text_heads=2, context_length=12,
                             embed_dim=24)


def clip_batch(n=8):
    g = torch.Generator().manual_seed(123)
    images = torch.randn(n, 3, 32, 32, generator=g)
    ids = torch.zeros(n, 12, dtype=torch.long)
    for i in range(n):
        k = 2 + i % 9
        ids[i, :k] = torch.randint(1, 49, (k,), generator=g)
        ids[i, k] = 49   # EOS, then padding
    return images, ids
