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


def test_openai_legacy_eos_and_gelu_checkpoints(tmp_path):
    """OpenAI's checkpoints carry eos_token_id = 2 (transformers then pools at argmax(ids), the
    EOT being the largest id); LAION's use exact GELU. Both must match transformers."""
    from transformers import CLIPConfig, CLIPModel
    cfg = CLIPConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=20, eos_token_id=2, hidden_act="gelu"),
        vision_config=dict(hidden_size=32, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                           image_size=32, patch_size=16, hidden_act="gelu"), projection_dim=16)
    torch.manual_seed(0)
    hf = CLIPModel(cfg).eval()
    hf.save_pretrained(tmp_path)
    ours = CLIP.from_hf(str(tmp_path)).eval()
    assert ours.cfg.eos_id == VOCAB - 1 and ours.cfg.act == "gelu"
    ids = torch.full((2, 20), PAD)
    ids[0, :4] = torch.tensor([BOS, 5, 6, VOCAB - 1])
    ids[1, :3] = torch.tensor([BOS, 9, VOCAB - 1])
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=(ids != PAD).long(), pixel_values=images)
        img, txt, _ = ours(images, ids)
    torch.testing.assert_close(txt, ref.text_embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(img, ref.image_embeds, atol=1e-5, rtol=1e-5)


def test_causal_attention_with_a_padding_mask_stays_causal():
    from common.encoders import Attention, padding_mask
    torch.manual_seed(0)
    attn = Attention(16, 2).eval()
    x = torch.randn(2, 5, 16)
    keep = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]).bool()
    with torch.no_grad():
        both = attn(x, mask=padding_mask(keep), causal=True)
        causal_only = attn(x, causal=True)
        x2 = x.clone()
        x2[:, 4] += 10.0                              # a future token must not change earlier outputs
        both2 = attn(x2, mask=padding_mask(keep), causal=True)
    torch.testing.assert_close(both[0], causal_only[0])          # no padding: the same as is_causal
    torch.testing.assert_close(both[:, :4], both2[:, :4])


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
    with pytest.raises(ValueError, match=key):
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


def test_optimizer_groups_schedule_and_logit_scale():
    import math
    from common.utils import cosine_schedule, param_groups
    cfg = clip_train.Config(vocab_size=VOCAB, eos_id=EOS, vision_layers=1, text_layers=1, image_size=32)
    model = CLIP(cfg)
    assert abs(model.logit_scale.item() - math.log(1 / 0.07)) < 1e-6
    decay, no_decay = param_groups(model, 0.2, ("logit_scale",))
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert {"logit_scale", "visual.class_embedding", "visual.positional_embedding", "text.positional_embedding",
            "text.token_embedding.weight", "visual.ln_pre.weight", "text.transformer.resblocks.0.attn.qkv.bias"} <= no_decay_names
    assert all(p.ndim >= 2 for p in decay["params"]) and "visual.conv1.weight" not in no_decay_names
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = cosine_schedule(opt, warmup_steps=4, total_steps=14)
    lrs = []
    for _ in range(14):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]                      # linear warm-up
    assert abs(lrs[9] - 0.5) < 1e-9 and lrs[-1] < 0.03            # cosine: half-way at step 9, ~0 at the end


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
