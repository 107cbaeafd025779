"""BLIP-2 stage-2 training-step benchmark: our blip2_train.BLIP2 (cfg.stage == 2, OPT language
model) against transformers' Blip2ForConditionalGeneration on the same configuration, the same
random weights (the transformers model is built, randomised, saved with save_pretrained, and ours
is loaded from that folder with BLIP2.from_hf), the same batch and thread count, fp32 on CPU,
alternating, each measurement in a fresh process. Not collected by pytest.

    python tests/bench/bench_blip2_stage2.py [--config tiny|compute] [--rounds 3 --steps 10 --warmup 2 --threads 2]

--config tiny: tests/test_blip2_stage2.py's sizes (ViT 32 px / patch 8, width 32, 2 layers;
Q-Former width 32, 4 layers, 4 queries; OPT width 24, 2 layers, vocabulary 60), batch 16, text
of up to 16 tokens (mostly Python overhead). --config compute: ViT 224 px / patch 14 (256 patches),
width 256, 4 layers, 4 heads; Q-Former width 256, 4 layers, 4 heads, 32 queries; OPT width 512,
4 layers, 8 heads, vocabulary 8000; batch 16, text of up to 32 tokens.

The batch: [BOS] caption [EOS] per row, caption lengths varied, right-padded to the longest row
(as collate_llm), labels = the ids with -100 on [BOS] and on the padding (stage-2 pretraining: no
prompt). Ours reads model(dict(images=images, ids=ids, mask=mask, labels=labels))["loss_lm"]; transformers reads
input_ids = [Q image-token placeholders; ids] with labels -100 on the placeholders, and
use_cache=False (as ours).

One step = forward with labels, backward, AdamW step, zero_grad, on what stage 2 trains: the
query tokens, the Q-Former, ln_vision (transformers: vision_model.post_layernorm) and the
language projection; the image encoder and the language model are frozen on both sides
(requires_grad False, eval mode). Each side's training optimizer: ours common.utils.adamw (the
fused kernel) on blip2_train.param_groups, transformers torch's default AdamW on the same groups
(weight decay 0.05 except biases and 1-D tensors). Before the rounds, both models are loaded once
in this process and their losses on the benchmark batch must agree to 1e-4 (the same computation).

Reported per side: seconds per step (median and min over the timed steps; medians over rounds),
and memory: the process's peak RSS during the timed steps (VmHWM, reset after the warm-up) and
the training part of it (that peak minus the RSS after the model and optimizer are built:
gradients, optimizer state, activations). throughput_ratio = theirs / ours in s/step (> 1: ours
is faster); training_memory_ratio = ours / theirs (< 1: ours uses less)."""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from tests.bench.bench_clip import rss_mb, status_kb, summarize_steps  # noqa: E402  (as the other benchmarks)

# --config compute's architecture (transformers' config names); tiny is tests/test_blip2_stage2.py's
COMPUTE = dict(
    vision=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, image_size=224,
                patch_size=14),
    qformer=dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
                 encoder_hidden_size=256, cross_attention_frequency=2, max_position_embeddings=64, vocab_size=30,
                 use_qformer_text_input=False, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    text=dict(vocab_size=8000, hidden_size=512, num_hidden_layers=4, ffn_dim=2048, num_attention_heads=8,
              max_position_embeddings=128, word_embed_proj_dim=512, pad_token_id=1, bos_token_id=2, eos_token_id=2,
              dropout=0.0, attention_dropout=0.0),
    num_query_tokens=32)
RUN_DEFAULTS = {"tiny": dict(batch_size=16, text_length=16), "compute": dict(batch_size=16, text_length=32)}
PAD, BOS, EOS = 1, 2, 2          # OPT's
LR, WEIGHT_DECAY = 1e-4, 0.05


def blip2_config(name):
    """(Blip2Config, number of queries, image token id, image size)."""
    from transformers import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, OPTConfig
    if name == "tiny":
        from tests.test_blip2 import hf_config
        from tests.test_blip2_stage2 import IMAGE_TOKEN, Q, _Tok, opt_config
        vision, qformer, extra = hf_config(_Tok, text=False)
        extra["num_query_tokens"] = Q
        text, image_token = opt_config(), IMAGE_TOKEN
    else:
        vision, qformer = Blip2VisionConfig(**COMPUTE["vision"]), Blip2QFormerConfig(**COMPUTE["qformer"])
        text = OPTConfig(**COMPUTE["text"])
        extra, image_token = dict(num_query_tokens=COMPUTE["num_query_tokens"]), COMPUTE["text"]["vocab_size"] - 1
    config = Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
                         image_token_index=image_token, **extra)
    return config, extra["num_query_tokens"], image_token, vision.image_size


def make_folder(args, folder):
    """The transformers model with random weights (every tensor, tests.test_blip2.randomise), saved."""
    import torch
    from transformers import Blip2ForConditionalGeneration
    from tests.test_blip2 import randomise
    config = blip2_config(args.config)[0]
    torch.manual_seed(0)
    hf = randomise(Blip2ForConditionalGeneration(config), 3)
    hf.save_pretrained(folder)


def make_batch(args):
    """images (B, 3, S, S); ids, mask (B, L): [BOS] caption [EOS], right-padded to the longest row
    (one row is L long); labels (B, L): the ids, -100 on [BOS] and the padding."""
    import torch
    _, _, image_token, size = blip2_config(args.config)
    B, L = args.batch_size, args.text_length
    g = torch.Generator().manual_seed(0)
    images = torch.randn(B, 3, size, size, generator=g)
    lengths = torch.randint(max(3, L // 2), L + 1, (B,), generator=g)
    lengths[0] = L
    ids = torch.full((B, L), PAD, dtype=torch.long)
    mask = torch.zeros(B, L, dtype=torch.long)
    for row, n in enumerate(lengths.tolist()):
        ids[row, 0], ids[row, n - 1] = BOS, EOS
        ids[row, 1:n - 1] = torch.randint(3, image_token, (n - 2,), generator=g)   # never pad, BOS / EOS, image
        mask[row, :n] = 1
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 0] = -100
    return images, ids, mask, labels


def load(impl, folder, args):
    """(model in its training modes, the loss of a batch, AdamW param groups) for one side."""
    import torch
    import blip2_train
    images, ids, mask, labels = make_batch(args)
    if impl == "ours":
        model = blip2_train.BLIP2.from_hf(folder)
        assert model.cfg.stage == 2 and model.vision_frozen and model.llm_frozen
        model.train()                        # the encoder and the LM stay in eval mode (BLIP2.train)
        model.cfg.weight_decay, model.cfg.lr = WEIGHT_DECAY, LR
        groups = blip2_train.param_groups(model, model.cfg)

        def loss_fn():
            return model(dict(images=images, ids=ids, mask=mask, labels=labels))["loss_lm"]
        return model, loss_fn, groups
    from transformers import Blip2ForConditionalGeneration
    model = Blip2ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    Q = model.config.num_query_tokens
    model.requires_grad_(False)
    for part in (model.query_tokens, model.qformer, model.vision_model.post_layernorm, model.language_projection):
        part.requires_grad_(True)
    model.train()
    model.vision_model.eval()
    model.language_model.eval()
    B = ids.shape[0]
    hf_ids = torch.cat([torch.full((B, Q), model.config.image_token_id), ids], 1)
    hf_mask = torch.cat([torch.ones(B, Q, dtype=torch.long), mask], 1)
    hf_labels = torch.cat([torch.full((B, Q), -100), labels], 1)
    decay, no_decay = [], []                 # blip2_train.param_groups' split
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and not name.endswith(".bias") else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]

    def loss_fn():
        return model(pixel_values=images, input_ids=hf_ids, attention_mask=hf_mask, labels=hf_labels,
                     use_cache=False).loss
    return model, loss_fn, groups


def counts(model):
    return (sum(p.numel() for p in model.parameters()),
            sum(p.numel() for p in model.parameters() if p.requires_grad))


def check(folder, args):
    """Both sides once, in their training modes, on the benchmark batch: the same trained set and
    the same loss (to 1e-4)."""
    import torch
    torch.set_num_threads(args.threads)
    losses, sizes = {}, {}
    for impl in ("ours", "hf"):
        model, loss_fn, _ = load(impl, folder, args)
        with torch.no_grad():
            losses[impl] = loss_fn().item()
        sizes[impl] = counts(model)
        del model, loss_fn
    assert sizes["ours"][1] == sizes["hf"][1], f"trained parameters differ: ours {sizes['ours']}, hf {sizes['hf']}"
    assert abs(losses["ours"] - losses["hf"]) < 1e-4, f"losses differ: {losses}"
    print(f"# check: loss ours {losses['ours']:.6f}, transformers {losses['hf']:.6f}; parameters "
          f"{sizes['ours'][0] / 1e6:.3f} M (ours) / {sizes['hf'][0] / 1e6:.3f} M (transformers), "
          f"of which trained {sizes['ours'][1] / 1e6:.3f} M", flush=True)
    return losses


def worker(args):
    import torch
    torch.set_num_threads(args.threads)
    model, loss_fn, groups = load(args.impl, args.folder, args)
    if args.impl == "ours":
        from common.utils import adamw      # blip2_train.main's optimizer: the fused kernel
        opt = adamw(groups, lr=LR)
    else:
        opt = torch.optim.AdamW(groups, lr=LR)
    rss_before = rss_mb()                    # after the model and the optimizer are built

    def step():
        loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    first = step() if args.warmup else None
    for _ in range(args.warmup - 1):
        step()
    try:                                     # reset VmHWM: the peak of the timed steps alone
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t)
        first = loss if first is None else first
    n_params, n_trained = counts(model)
    print(json.dumps({"impl": args.impl, "sec_per_step_median": statistics.median(times),
                      "sec_per_step_min": min(times), "peak_rss_timed_MiB": status_kb("VmHWM:") / 1024,
                      "rss_before_training_MiB": rss_before, "first_loss": first, "params": n_params,
                      "trained_params": n_trained}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny", choices=sorted(RUN_DEFAULTS))
    p.add_argument("--batch-size", type=int, help="default: 16")
    p.add_argument("--text-length", type=int, help="the longest row's tokens, [BOS] and [EOS] included "
                                                   "(default: 16 tiny, 32 compute)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--impl", choices=("ours", "hf"), help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    args = p.parse_args()
    for key, value in RUN_DEFAULTS[args.config].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.text_length < 3:
        p.error("--text-length: at least 3 ([BOS], one token, [EOS])")
    if args.impl:
        return worker(args)
    folder = tempfile.mkdtemp(prefix="bench-blip2-stage2-")
    try:
        make_folder(args, folder)
        check(folder, args)
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        res = {"ours": [], "hf": []}
        for r in range(args.rounds):
            for impl in ("ours", "hf") if r % 2 == 0 else ("hf", "ours"):
                proc = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--impl", impl, "--folder", folder],
                                      capture_output=True, text=True, env=env)
                if proc.returncode:
                    sys.exit(proc.stderr[-3000:])
                out = json.loads(proc.stdout.strip().splitlines()[-1])
                out["training_MiB"] = out["peak_rss_timed_MiB"] - out["rss_before_training_MiB"]
                res[impl].append(out)
                print(f"round {r} {'ours' if impl == 'ours' else 'transformers':12s} {out['sec_per_step_median']:.4f} "
                      f"s/step (min {out['sec_per_step_min']:.4f})  first loss {out['first_loss']:.6f}  peak RSS "
                      f"{out['peak_rss_timed_MiB']:.0f} MiB, of which training {out['training_MiB']:.0f} MiB", flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    summary = summarize_steps(res, "hf")
    for k, v in res.items():
        summary[k]["params"], summary[k]["trained_params"] = v[0]["params"], v[0]["trained_params"]
    summary["config"] = {k: v for k, v in vars(args).items() if k not in ("impl", "folder")}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
