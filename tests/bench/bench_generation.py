"""Captioning speed with and without the KV cache: BLIP.generate(use_cache=True) against
use_cache=False (every step recomputes the whole prefix and the image's cross-attention keys and
values, as generation did before the cache), same random weights, same images, alternating, on the
same thread count. Not collected by pytest.

    python tests/bench/bench_generation.py --preset tiny --rounds 3
    python tests/bench/bench_generation.py --preset vit-b --image-size 224 --rounds 1

Times one batch of captions from precomputed ViT tokens (the ViT is the same either way), beam
search (3 beams) and nucleus sampling (top-p 0.9, repetition penalty 1.1) at max lengths 20 and 30
with min_length = max_length, so that every run decodes the full length whatever the random weights
prefer. Checks that both paths give the same tokens. Prints a Markdown table (median seconds per batch)."""
import argparse
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def build(preset, image_size):
    import blip_train
    cfg = blip_train.Config(**{**blip_train.PRESETS[preset], "image_size": image_size or
                               blip_train.PRESETS[preset].get("image_size", blip_train.Config.image_size)})
    if preset == "tiny":
        from common.data import Tokenizer, tiny_data
        tok = Tokenizer(os.path.join(tiny_data(), "tokenizer"))
        cfg.vocab_size = tok.vocab_size + 2                           # [DEC], [ENC]
        return blip_train.build_blip(cfg, tok).eval(), cfg
    cfg.vocab_size = 30524                                            # bert-base-uncased + [DEC], [ENC]
    model = blip_train.BLIP(cfg, cls_id=101, enc_id=30523, dec_id=30522, sep_id=102, pad_id=0)
    return model.eval(), cfg


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=["tiny", "vit-b"])
    p.add_argument("--image-size", type=int, default=0, help="0: the preset's")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-beams", type=int, default=3)
    p.add_argument("--max-lengths", type=int, nargs="+", default=[20, 30])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, cfg = build(args.preset, args.image_size)
    images = torch.randn(args.batch_size, 3, cfg.image_size, cfg.image_size)
    prompt = torch.tensor([5, 6, 7])                                 # a 3-token prompt, as "a picture of"
    with torch.no_grad():
        embeds = model.image_embed(images)
    print(f"# {args.preset}: image {cfg.image_size} px ({embeds.shape[1]} tokens, width {cfg.vision_width}), "
          f"MED {cfg.text_layers} layers width {cfg.text_width}, vocab {cfg.vocab_size}, batch {args.batch_size}, "
          f"{args.threads} thread(s), {args.rounds} round(s)")
    print("| decoding | max length | uncached s/batch | cached s/batch | speed-up |")
    print("|---|---|---|---|---|")
    for mode in ("beam", "sample"):
        for max_length in args.max_lengths:
            kw = dict(max_length=max_length, min_length=max_length, image_embeds=embeds)
            kw.update(num_beams=args.num_beams) if mode == "beam" else kw.update(sample=True, repetition_penalty=1.1)
            times = {True: [], False: []}
            outs = {}
            for _ in range(args.rounds):
                for use_cache in (False, True):
                    torch.manual_seed(1)
                    tick = time.perf_counter()
                    outs[use_cache] = model.generate(images, prompt, use_cache=use_cache, **kw)
                    times[use_cache].append(time.perf_counter() - tick)
            assert torch.equal(outs[True], outs[False]), f"{mode} {max_length}: the cache changed a token"
            off, on = statistics.median(times[False]), statistics.median(times[True])
            name = f"beam search ({args.num_beams} beams)" if mode == "beam" else "nucleus sampling"
            print(f"| {name} | {max_length} | {off:.3f} | {on:.3f} | **{off / on:.1f}x** |", flush=True)


if __name__ == "__main__":
    main()
