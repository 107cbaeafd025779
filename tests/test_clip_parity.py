"""Our CLIP against Hugging Face transformers' CLIPModel and open_clip's ClipLoss, on the
same weights / features (tiny random configs, saved with save_pretrained, loaded with from_hf)."""
import pytest
import torch

import clip_train
from clip_train import CLIP, clip_loss

VOCAB, BOS, EOS, PAD = 99, 97, 98, 0


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel
    # Non-square on purpose: vision width 48 != text width 32, 3 vs 2 layers, context 20 < 77.
    cfg = CLIPConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=20, bos_token_id=BOS, eos_token_id=EOS,
                         pad_token_id=PAD),
        vision_config=dict(hidden_size=48, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=24)
    torch.manual_seed(0)
    model = CLIPModel(cfg).eval()
    with torch.no_grad():  # move every tensor off its default init, so a swapped key cannot hide
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("hf_clip")
    model.save_pretrained(path)
    return model, str(path)


def padded_ids():
    g = torch.Generator().manual_seed(1)
    rows = []
    for n in (5, 18, 1, 11):  # different lengths: padding after EOS; 18 + BOS/EOS fills the context
        body = torch.randint(1, BOS, (n,), generator=g).tolist()
        row = [BOS] + body + [EOS]
        rows.append(row + [PAD] * (20 - len(row)))
    ids = torch.tensor(rows)
    return ids, (ids != PAD).long()


def test_embeddings_logits_loss_match_transformers(hf_clip):
    hf, path = hf_clip
    ours = CLIP.from_hf(path).eval()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    ids, mask = padded_ids()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, pixel_values=images, return_loss=True)
        img, txt, scale = ours(images, ids)
        logits = scale * img @ txt.T
        loss = clip_loss(img, txt, scale)
    torch.testing.assert_close(img, ref.image_embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(txt, ref.text_embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, ref.logits_per_image, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, ref.loss, atol=1e-5, rtol=1e-5)
    assert ours.cfg.vision_width == 48 and ours.cfg.text_width == 32 and ours.cfg.context_length == 20


def test_position_interpolation_matches_transformers(hf_clip):
    """Serving 48 px images with a 32 px checkpoint: the same bicubic grid interpolation."""
    hf, path = hf_clip
    ours = CLIP.from_hf(path, image_size=48).eval()
    assert ours.visual.positional_embedding.shape[0] == 1 + 6 * 6
    images = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        ref = hf.vision_model(pixel_values=images, interpolate_pos_encoding=True).pooler_output
        ref = hf.visual_projection(ref)
        out = ours.encode_image(images, normalize=False)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def _resave(path, tmp_path, edit):
    import shutil
    from safetensors.torch import load_file, save_file
    new = tmp_path / "edited"
    shutil.copytree(path, new)
    state = load_file(new / "model.safetensors")
    edit(state)
    save_file(state, new / "model.safetensors")
    return str(new)


def test_missing_extra_and_misshaped_keys_are_named(hf_clip, tmp_path):
    _, path = hf_clip
    key = "text_model.encoder.layers.1.mlp.fc2.bias"
    with pytest.raises(KeyError, match=key):
        CLIP.from_hf(_resave(path, tmp_path / "a", lambda s: s.pop(key)))
    with pytest.raises(ValueError, match="vision_model.extra_head.weight"):
        CLIP.from_hf(_resave(path, tmp_path / "b", lambda s: s.update({"vision_model.extra_head.weight": torch.ones(2)})))
    with pytest.raises(ValueError, match="text_projection.weight"):
        CLIP.from_hf(_resave(path, tmp_path / "c", lambda s: s.update({"text_projection.weight": torch.ones(24, 31)})))
    with pytest.raises(FileNotFoundError, match="config.json"):
        CLIP.from_hf(str(tmp_path))


def test_loss_matches_open_clip():
    from open_clip.loss import ClipLoss
    g = torch.Generator().manual_seed(3)
    img = torch.nn.functional.normalize(torch.randn(16, 24, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(16, 24, generator=g), dim=-1)
    scale = torch.tensor(14.3)
    ref = ClipLoss(local_loss=True, gather_with_grad=True)(img, txt, scale)
    torch.testing.assert_close(clip_loss(img, txt, scale), ref, atol=1e-6, rtol=1e-6)
    # a matching batch scores a much lower loss than a shuffled one (the labels are the diagonal)
    assert clip_loss(img, img, scale) < 0.5 * clip_loss(img, img[torch.randperm(16, generator=g)], scale)


def test_gradient_checkpointing_gives_same_gradients():
    cfg = clip_train.Config(vocab_size=VOCAB, eos_id=EOS, vision_layers=2, text_layers=2, image_size=32)
    torch.manual_seed(0)
    model = CLIP(cfg)
    images, (ids, _) = torch.randn(4, 3, 32, 32), padded_ids()
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(ckpt)
        clip_loss(*model(images, ids)).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
