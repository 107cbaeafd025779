"""One-device training-step benchmark of the five methods at their paper presets, prepared to run
in one call on a GPU. Not collected by pytest.

    python tests/bench/bench_gpu.py                             # CUDA: every row, under 8 minutes
    python tests/bench/bench_gpu.py --rows clip,clip-compile    # a few rows (--list names them)
    python tests/bench/bench_gpu.py --device cpu --tiny         # the tiny presets on CPU, fp32

What one row measures: one method's training step (forward, losses, backward, the gradient norm,
fused AdamW step, and what the script does after it: the momentum EMA and queue of ALBEF / BLIP,
the temperature clamp of CLIP / CoCa) on a synthetic batch already on the device (random images,
random token ids of the preset's full caption length), bf16 autocast, as the script's main() does
it: the model's forward and the script's own loss functions. Rows (one per method unless noted):

    clip        CLIP ViT-B/16 (clip_train.py "vit-b-16", batch 256), SDPA attention
    clip-pd     the same with FLIP patch dropout 0.5 (half the image tokens)
    coca        CoCa ViT-B/32 (coca_train.py "coca-vit-b-32", batch 128); coca-pd as clip-pd
    albef       ALBEF ViT-B/16 + BERT-base (albef_train.py "vit-b", batch 64, queue 65,536)
    blip        BLIP ViT-B/16 + BERT-base (blip_train.py "vit-b", batch 75)
    blip2-s1    BLIP-2 stage 1: frozen ViT-g/14 (39 layers, width 1408, random weights) and the
                Q-Former (blip2_train.py "vit-g", batch 100)
    blip2-s2    BLIP-2 stage 2: the same encoder and a frozen OPT-2.7b-sized language model with
                random weights (transformers' OPTConfig, no download), batch 64
    *-open_clip open_clip's ViT-B-16 CLIP and coca_ViT-B-32 (create_model, pretrained=None), the
                same batch, precision and optimizer, stepped as open_clip's training loop does
    *-compile   the row with torch.compile of the model (the scripts' --compile); its first
                warm-up step, which compiles, is reported in the note

Each row runs in a fresh process (an out-of-memory row is marked failed, the others go on; peak
memory is the row's own): a few warm-up steps, then timed steps between torch.cuda.synchronize()
calls. Reported: samples/s, peak memory (torch.cuda.max_memory_allocated over the timed steps;
on CPU the process's peak RSS), and MFU = model FLOPs of one step / step time / the device's
peak dense bf16 rate. The FLOPs are counted once per row with torch.utils.flop_counter on one
forward + backward of the eager model (frozen towers: forward only; attention counted as SDPA
kernels report it, causal masks not halved). The peak rate comes from a table by device name
(PEAK_BF16, matched against the name the first row's process reports) or --peak-tflops, and the
output names which. Compile rows run after all eager rows; each row is stopped after
--row-timeout (150 s) and a global --deadline (450 s) skips what is left and says so: the run
ends within 8 minutes. The Markdown table goes to stdout and to --out (default bench_gpu.md);
--json FILE keeps the raw numbers. Rows a run skipped: run again with --rows.

--device cpu --tiny: every row at the scripts' tiny presets (batch 4, a 64-token vocabulary),
fp32, 1 warm-up + 1 timed step, no compile unless --compile; MFU against --peak-tflops if given,
else n/a; --jobs N runs N rows at once (CPU only). tests/test_bench_gpu.py runs it."""
import argparse
import importlib.util
import json
import os
import re
import resource
import shlex
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

# Dense bf16 tensor-core peak (FLOP/s, no sparsity) by a pattern of torch.cuda.get_device_name();
# the first match wins ("NVIDIA H100 80GB HBM3" is the SXM part).
PEAK_BF16 = [(r"H100.*PCIe", 756e12, "H100 PCIe"), (r"H100.*NVL", 835e12, "H100 NVL"),
             (r"H200", 989e12, "H200 / GH200"), (r"H100", 989e12, "H100 SXM"),
             (r"\bH20\b", 148e12, "H20"), (r"B200", 2250e12, "B200"), (r"A100", 312e12, "A100"),
             (r"L40S", 362e12, "L40S"), (r"\bL4\b", 121e12, "L4"), (r"A6000", 155e12, "RTX A6000")]

# (label, paper preset, name at the tiny preset) of each method
METHODS = {"clip": ("CLIP ViT-B/16", "vit-b-16", "CLIP"),
           "coca": ("CoCa ViT-B/32", "coca-vit-b-32", "CoCa"),
           "albef": ("ALBEF ViT-B/16", "vit-b", "ALBEF"),
           "blip": ("BLIP ViT-B/16", "vit-b", "BLIP"),
           "blip2-s1": ("BLIP-2 stage 1, ViT-g frozen", "vit-g", "BLIP-2 stage 1"),
           "blip2-s2": ("BLIP-2 stage 2, ViT-g + OPT-2.7b frozen", "vit-g-opt2.7b",
                        "BLIP-2 stage 2")}
SCRIPTS = {"clip": "clip_train", "coca": "coca_train", "albef": "albef_train", "blip": "blip_train",
           "blip2-s1": "blip2_train", "blip2-s2": "blip2_train"}
# OPT-2.7b's sizes (facebook/opt-2.7b config.json), built with random weights
OPT_2_7B = dict(vocab_size=50272, hidden_size=2560, num_hidden_layers=32, ffn_dim=10240,
                num_attention_heads=32, max_position_embeddings=2048, word_embed_proj_dim=2560)
BERT_IDS = dict(pad=0, cls=101, sep=102, mask=103, vocab=30522)     # bert-base-uncased
TINY = dict(batch_size=4, vocab=64)     # --tiny: the tiny presets with these


def make_rows():
    """Eager rows first, then the compiled ones (the slow ones: the deadline cuts them first)."""
    rows = []
    for m in METHODS:
        rows.append(dict(key=m, method=m, impl="ours", pd=0.0, compile=False))
        if m in ("clip", "coca"):
            rows.append(dict(key=f"{m}-pd", method=m, impl="ours", pd=0.5, compile=False))
            rows.append(dict(key=f"{m}-open_clip", method=m, impl="open_clip", pd=0.0,
                             compile=False))
    for key in list(METHODS) + ["clip-pd", "coca-pd"]:
        base = next(r for r in rows if r["key"] == key)
        rows.append(dict(base, key=f"{key}-compile", compile=True))
    return {r["key"]: r for r in rows}


ROWS = make_rows()


# ---- the worker: one row in this process ----

def make_config(method, tiny, batch_size=None):
    """The script's Config at the method's paper preset (or tiny) with a concrete vocabulary."""
    module = importlib.import_module(SCRIPTS[method])       # only the row's (start-up time)
    preset = "tiny" if tiny else METHODS[method][1]
    fields = dict(module.PRESETS[preset])
    if tiny and method == "blip2-s2":
        fields["stage"] = 2
    cfg = module.Config(**fields, preset=preset)
    vocab = TINY["vocab"] if tiny else {"albef": BERT_IDS["vocab"], "blip": BERT_IDS["vocab"] + 2,
                                        "blip2-s1": BERT_IDS["vocab"] + 1,
                                        "blip2-s2": BERT_IDS["vocab"] + 1}.get(method)
    cfg.vocab_size = cfg.vocab_size or vocab    # BLIP: + [DEC], [ENC]; BLIP-2: + [DEC]
    cfg.batch_size = batch_size or (TINY["batch_size"] if tiny else cfg.batch_size)
    return cfg


def caption_ids(B, L, low, high, first, last, device):
    """(B, L) full-length captions: `first`, random ids in [low, high), `last`; no padding."""
    import torch
    ids = torch.randint(low, high, (B, L), device=device)
    ids[:, 0], ids[:, -1] = first, last
    return ids


def build(row, args, device):
    """SimpleNamespace(model, groups (AdamW's), loss(train_model) -> scalar, after(), batch, lr)
    for one row, built as the script's main() builds it."""
    import torch
    from common.utils import autocast, param_groups
    cfg = make_config(row["method"], args.tiny, args.batch_size)
    B, V, prec = cfg.batch_size, cfg.vocab_size, args.precision
    images = lambda size: torch.randn(B, 3, size, size, device=device)   # noqa: E731
    method, special = row["method"], (BERT_IDS if not args.tiny else
                                      dict(pad=0, cls=1, sep=2, mask=3))
    ns = SimpleNamespace(batch=B, lr=cfg.lr, after=lambda: None)

    if method in ("clip", "coca") and row["impl"] == "open_clip":
        return build_open_clip(row, args, cfg, device, ns)
    if method == "clip":
        import clip_train
        cfg.eos_id, cfg.patch_dropout = V - 1, row["pd"]
        model = ns.model = clip_train.CLIP(cfg)
        x = images(cfg.image_size)
        ids = caption_ids(B, cfg.context_length, 1, V - 1, 1, V - 1, device)
        loss_fn = clip_train.contrastive_loss(cfg)

        def loss(m):                 # main(): embed under autocast, the loss on fp32 features
            with autocast(prec, device):
                image_emb, text_emb, *scalars = m(x, ids)
            return loss_fn(image_emb.float(), text_emb.float(), *[s.float() for s in scalars])
        ns.groups = param_groups(model, cfg.weight_decay, ("logit_",))
        ns.betas, ns.eps = (cfg.beta1, cfg.beta2), cfg.eps
        ns.after = lambda: model.logit_scale.data.clamp_(0, 4.605170185988092)   # log(100)
    elif method == "coca":
        import coca_train
        cfg.pad_id, cfg.patch_dropout = 0, row["pd"]
        model = ns.model = coca_train.CoCa(cfg, pad_id=0, eos_id=V - 1)
        x = images(cfg.image_size)
        ids = caption_ids(B, cfg.context_length, 1, V - 2, V - 2, V - 1, "cpu")  # [SOT] .. [EOT]
        ids = coca_train.trim_padding(ids, 0)             # on the host, as main()
        positions, targets = coca_train.caption_positions(ids, 0)
        batch = tuple(t.to(device) for t in (ids, positions, targets))

        def loss(m):
            with autocast(prec, device):
                return coca_train.compute_losses(m, cfg, (x, *batch))[0]
        ns.groups = param_groups(model, cfg.weight_decay, ("logit_scale",))
        ns.betas, ns.eps = (cfg.beta1, cfg.beta2), cfg.eps
        ns.after = lambda: model.logit_scale.data.clamp_(0, 4.605170185988092)
    elif method in ("albef", "blip"):
        if method == "albef":
            import albef_train
            model = albef_train.ALBEF(cfg, mask_id=special["mask"], pad_id=special["pad"],
                                      cls_id=special["cls"])
            ns.groups = albef_train.param_groups(model, cfg.weight_decay)
        else:
            import blip_train
            model = blip_train.BLIP(cfg, cls_id=special["cls"], enc_id=V - 1, dec_id=V - 2,
                                    sep_id=special["sep"], pad_id=special["pad"])
            ns.groups = param_groups(model, cfg.weight_decay, ("temp",))
        model.copy_to_momentum()
        ns.model = model
        x = images(cfg.image_size)
        ids = caption_ids(B, cfg.max_length, special["mask"] + 1, V - 2, special["cls"],
                          special["sep"], device)
        mask, idx = torch.ones_like(ids), torch.arange(B, device=device)
        alpha = torch.tensor(cfg.alpha, device=device)

        def loss(m):                 # L = ITC + ITM + MLM (ALBEF) / LM (BLIP), unweighted
            with autocast(prec, device):
                return sum(m(x, ids, mask, idx, alpha, "pretrain").values())
        # after the update: the momentum EMA and the enqueue of the step's momentum keys
        ns.after = lambda: model.finish_step(None, [model.pending_keys])
    else:
        import blip2_train
        with torch.device(device):   # ViT-g and the LM initialised on the device: seconds
            llm = make_llm(cfg, args, device) if method == "blip2-s2" else None
            model = ns.model = blip2_train.build_blip2(cfg, None, llm)
        blip2_train.place(model, device, prec)            # the frozen parts in bf16 on a GPU
        x = images(cfg.image_size)
        if method == "blip2-s1":
            ids = caption_ids(B, cfg.max_length, special["mask"] + 1, V - 1, special["cls"],
                              special["sep"], device)
            batch = dict(images=x, ids=ids, mask=torch.ones_like(ids),
                         idx=torch.arange(B, device=device))
        else:                        # [BOS] caption [EOS] in the LM's vocabulary, BOS unscored
            Vl = llm.config.vocab_size
            ids = caption_ids(B, cfg.max_length, 3, Vl, 2, 2, device)   # OPT: pad 1, BOS = EOS 2
            labels = ids.clone()
            labels[:, 0] = -100
            batch = dict(images=x, ids=ids, mask=torch.ones_like(ids), labels=labels)

        def loss(m):                 # stage 1: ITC + ITM + ITG; stage 2: the LM loss
            with autocast(prec, device):
                return sum(m(batch).values())
        ns.groups = blip2_train.param_groups(model, cfg)
    ns.loss = loss
    return ns


def make_llm(cfg, args, device):
    """Stage 2's frozen LM: a random OPT of OPT-2.7b's sizes (tiny: the preset's llm_* sizes)."""
    import torch
    from transformers import AutoModelForCausalLM, OPTConfig
    sizes = OPT_2_7B if not args.tiny else dict(
        vocab_size=TINY["vocab"], hidden_size=cfg.llm_width, num_hidden_layers=cfg.llm_layers,
        ffn_dim=cfg.llm_mlp_dim, num_attention_heads=cfg.llm_heads, max_position_embeddings=128,
        word_embed_proj_dim=cfg.llm_width)
    config = OPTConfig(**sizes, pad_token_id=1, bos_token_id=2, eos_token_id=2, dropout=0.0,
                       attention_dropout=0.0)
    half = device.type == "cuda" and args.precision != "fp32"   # blip2_train.place casts it anyway
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa",
                                            dtype=torch.bfloat16 if half else torch.float32)


def build_open_clip(row, args, cfg, device, ns):
    """open_clip's model of the same architecture (its registered config; tiny: ours, passed as
    model kwargs) and its loss, stepped as open_clip_train's train_one_epoch: the loss under
    autocast."""
    import torch
    import open_clip
    from common.utils import autocast, param_groups
    B, V, prec = cfg.batch_size, cfg.vocab_size, args.precision
    coca = row["method"] == "coca"
    kwargs = {}
    if args.tiny:
        vision = dict(image_size=cfg.image_size, patch_size=cfg.patch_size,
                      width=cfg.vision_width, layers=cfg.vision_layers,
                      head_width=cfg.vision_width // cfg.vision_heads, mlp_ratio=cfg.mlp_ratio)
        text = dict(context_length=cfg.context_length, vocab_size=V, width=cfg.text_width,
                    heads=cfg.text_heads, layers=cfg.text_layers, mlp_ratio=cfg.mlp_ratio)
        if coca:
            vision.update(attentional_pool=True, attn_pooler_heads=cfg.pooler_heads,
                          attn_pooler_queries=cfg.n_queries, output_tokens=True)
            text.update(embed_cls=True, output_tokens=True)
            kwargs["multimodal_cfg"] = dict(context_length=cfg.context_length, vocab_size=V,
                                            width=cfg.text_width, heads=cfg.text_heads,
                                            layers=cfg.decoder_layers, mlp_ratio=cfg.mlp_ratio)
        kwargs.update(embed_dim=cfg.embed_dim, vision_cfg=vision, text_cfg=text)
    name = "coca_ViT-B-32" if coca else "ViT-B-16"
    model = ns.model = open_clip.create_model(name, pretrained=None, device=device,
                                              force_quick_gelu=cfg.act == "quick_gelu",
                                              output_dict=True, **kwargs)
    if coca:                         # torch.empty in open_clip: never initialised there
        with torch.no_grad():
            torch.nn.init.normal_(model.text_decoder.text_projection, std=cfg.text_width ** -0.5)
        loss_fn = open_clip.loss.CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0, pad_id=0)
        ids = caption_ids(B, cfg.context_length, 1, V - 2, V - 2, V - 1, device)
    else:
        loss_fn = open_clip.loss.ClipLoss()
        ids = caption_ids(B, cfg.context_length, 1, V - 1, 1, V - 1, device)  # EOT: the largest
    x = torch.randn(B, 3, cfg.image_size, cfg.image_size, device=device)

    def loss(m):
        with autocast(prec, device):
            return sum(loss_fn(**m(x, ids), output_dict=True).values())
    ns.loss, ns.groups = loss, param_groups(model, cfg.weight_decay, ("logit_",))
    ns.betas, ns.eps = (cfg.beta1, cfg.beta2), cfg.eps
    ns.after = lambda: model.logit_scale.data.clamp_(0, 4.605170185988092)
    return ns


def device_info(device, args):
    """What the header says about the device, from the worker (the parent never opens a CUDA
    context: it would hold memory on the device the rows measure)."""
    import torch
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        text = (f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}")
        return {"device_name": props.name, "device": text, "torch": torch.__version__}
    text = f"CPU, {torch.get_num_threads()} thread(s)"
    return {"device_name": "cpu", "device": text, "torch": torch.__version__}


def worker(args):
    """Build, count one step's FLOPs, warm up, time; print one JSON line."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from common.utils import adamw, grad_norm_
    row = ROWS[args.worker]
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(0)
    b = build(row, args, device)
    model = b.model.to(device).train()
    if row["pd"]:                    # FLIP: main() sets the attribute every step
        if not hasattr(model.visual, "patch_dropout"):
            print(json.dumps({"status": "n/a", "note": "no patch_dropout in this tree"}))
            return
        model.visual.patch_dropout = row["pd"]
    n_params = sum(p.numel() for p in model.parameters())
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # model FLOPs: one forward + backward of the eager model
    with FlopCounterMode(display=False) as counter:
        b.loss(model).backward()
    flops = counter.get_total_flops()
    model.zero_grad(set_to_none=True)
    train_model = torch.compile(model) if row["compile"] else model
    opt = adamw(b.groups, lr=b.lr, **({"betas": b.betas, "eps": b.eps} if hasattr(b, "betas")
                                      else {}))

    def step():
        b.loss(train_model).backward()
        grad_norm_(model)            # as common.run.optimizer_step: the norm of every step
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            b.after()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
    first = None
    for i in range(args.warmup):
        t = time.perf_counter()
        step()
        sync()
        first = time.perf_counter() - t if i == 0 else first
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    step_s = (time.perf_counter() - t) / args.steps
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print(json.dumps({"status": "ok", **device_info(device, args), "batch": b.batch,
                      "step_s": step_s,
                      "samples_per_s": b.batch / step_s, "peak_mem_bytes": peak, "flops": flops,
                      "first_step_s": first, "params": n_params, "trained_params": n_trained}))


# ---- the parent: every row in its own process, the table ----

def peak_rate(args, device_name):
    """(FLOP/s or None, how it was chosen)."""
    if args.peak_tflops:
        return args.peak_tflops * 1e12, f"{args.peak_tflops:g} TFLOP/s (--peak-tflops)"
    if args.device.startswith("cuda") and device_name:
        for pattern, rate, label in PEAK_BF16:
            if re.search(pattern, device_name):
                return rate, f"{rate / 1e12:g} TFLOP/s dense bf16 ({label}, from the device table)"
        return None, f"n/a: {device_name} is not in the device table; pass --peak-tflops"
    return None, "n/a: pass --peak-tflops"


def device_line(results):
    """The device and the versions: the first worker's report, the packages' installed versions."""
    from importlib import metadata
    info = next((r for r in results if "device" in r), None)
    line = f"{info['device']}; torch {info['torch']}" if info else "unknown (no row ran)"
    for dist_name, name in (("transformers", "transformers"), ("open_clip_torch", "open_clip")):
        try:                         # without importing them (seconds)
            line += f", {name} {metadata.version(dist_name)}"
        except metadata.PackageNotFoundError:
            pass
    return line


def run_row(row, args, timeout):
    """The row's worker process, killed with its children (compile workers) after `timeout`."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", row["key"], "--device",
           args.device, "--precision", args.precision, "--warmup", str(args.warmup),
           "--steps", str(args.steps)]
    cmd += ["--tiny"] if args.tiny else []
    cmd += ["--batch-size", str(args.batch_size)] if args.batch_size else []
    cmd += ["--threads", str(args.threads)] if args.threads else []
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"status": "failed", "note": f"timed out after {timeout:.0f} s"}
    lines = [x for x in out.splitlines() if x.startswith("{")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    last = [x.strip() for x in err.splitlines() if x.strip()]
    return {"status": "failed", "note": f"exit {proc.returncode}: " + (last[-1] if last else "")}


def label(row, tiny):
    name = METHODS[row["method"]][2] + " tiny" if tiny else METHODS[row["method"]][0]
    return name + (" (open_clip)" if row["impl"] == "open_clip" else "")


def table(results, peak, tiny):
    cols = ["row", "model", "batch", "compile", "patch dropout", "samples/s", "step ms",
            "peak mem GiB", "GFLOP/step", "TFLOP/s", "MFU", "params M", "note"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        ok = r["status"] == "ok"
        note = r.get("note", "")
        if ok and r["row"]["compile"] and r.get("first_step_s") is not None:
            note = f"first step (compiles) {r['first_step_s']:.0f} s"
        cells = [f"`{r['row']['key']}`", label(r["row"], tiny), str(r.get("batch", "")),
                 "yes" if r["row"]["compile"] else "no", f"{r['row']['pd']:g}"]
        if ok:
            rate = r["flops"] / r["step_s"]
            cells += [f"{r['samples_per_s']:.1f}", f"{1e3 * r['step_s']:.1f}",
                      f"{r['peak_mem_bytes'] / 2**30:.2f}", f"{r['flops'] / 1e9:.4g}",
                      f"{rate / 1e12:.3g}",
                      f"{100 * rate / peak:.1f}%" if peak else "n/a",
                      f"{r['params'] / 1e6:.1f}"]
        else:
            cells += [r["status"]] + [""] * 6
        lines.append("| " + " | ".join(cells + [note.replace("|", "/")[:160]]) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default: cuda)")
    p.add_argument("--tiny", action="store_true", help="the scripts' tiny presets, batch 4")
    p.add_argument("--rows", default="", help="comma-separated row names (default: all; --list)")
    p.add_argument("--list", action="store_true", help="print the row names and exit")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="include the torch.compile rows (default: on CUDA yes, on CPU no)")
    p.add_argument("--precision", choices=("bf16", "fp32"),
                   help="autocast precision (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--warmup", type=int, help="warm-up steps (default: 3; --tiny 1)")
    p.add_argument("--steps", type=int, help="timed steps (default: 10; --tiny 1)")
    p.add_argument("--batch-size", type=int, help="every row's batch (default: the presets')")
    p.add_argument("--threads", type=int, help="CPU threads per row (default: torch's)")
    p.add_argument("--jobs", type=int, default=1,
                   help="rows run at once, each in its own process (CPU only; default 1)")
    p.add_argument("--peak-tflops", type=float, help="the device's peak rate for MFU (TFLOP/s)")
    p.add_argument("--deadline", type=float, default=450, help="seconds for all rows (450)")
    p.add_argument("--row-timeout", type=float, default=150, help="seconds per row (150)")
    p.add_argument("--out", default="bench_gpu.md", help="the Markdown table (bench_gpu.md)")
    p.add_argument("--json", default="", help="also the raw results as JSON")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device == "cuda":
        args.device = "cuda:0"       # an index: torch.cuda.set_device needs one
    args.precision = args.precision or ("fp32" if args.device == "cpu" else "bf16")
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    args.steps = args.steps or (1 if args.tiny else 10)
    if args.worker:
        return worker(args)
    if args.list:
        print("\n".join(ROWS))
        return
    compile_rows = args.compile if args.compile is not None else args.device != "cpu"
    keys = [k for k in args.rows.split(",") if k] or [k for k in ROWS
                                                      if compile_rows or not ROWS[k]["compile"]]
    unknown = [k for k in keys if k not in ROWS]
    if unknown:
        p.error(f"--rows: unknown {', '.join(unknown)} (--list names them)")
    if args.device.startswith("cuda"):
        import torch
        if args.jobs != 1:
            p.error("--jobs: rows sharing a GPU would time each other; CPU only")
        if not torch.cuda.is_available():
            p.error("--device cuda: no CUDA device here (--device cpu --tiny runs the CPU path)")
    command = "python " + " ".join(shlex.quote(a) for a in
                                   [os.path.relpath(__file__, ROOT)] + list(argv or sys.argv[1:]))
    start = time.monotonic()

    def attempt(key):                # the deadline is checked as each row starts
        row, left = ROWS[key], args.deadline - (time.monotonic() - start)
        if left < (5 if args.tiny else 20):
            res = {"status": "skipped", "note": f"skipped: the {args.deadline:g} s deadline"}
        elif row["impl"] == "open_clip" and importlib.util.find_spec("open_clip") is None:
            res = {"status": "n/a", "note": "open_clip is not installed (open_clip_torch)"}
        else:
            res = run_row(row, args, min(left, args.row_timeout))
        shown = (f"{res['samples_per_s']:.1f} samples/s" if res["status"] == "ok"
                 else f"{res['status']} {res.get('note', '')}")
        print(f"# {key}: {shown} ({time.monotonic() - start:.0f} s)", file=sys.stderr, flush=True)
        return dict(res, row=row)
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(attempt, keys))
    skipped = sum(r["status"] == "skipped" for r in results)
    device = device_line(results)
    peak, peak_text = peak_rate(args, next((r["device_name"] for r in results
                                            if "device_name" in r), ""))
    text = "\n".join([
        f"## Training step, one device ({'tiny presets' if args.tiny else 'paper presets'})", "",
        f"- device: {device}",
        f"- peak rate for MFU: {peak_text}",
        f"- command: `{command}`",
        f"- {'fp32, no' if args.precision == 'fp32' else args.precision} autocast, fused AdamW, "
        f"a synthetic batch on the device; "
        f"{args.warmup} warm-up + {args.steps} timed steps; each row a fresh process; FLOPs: "
        f"torch.utils.flop_counter on one forward + backward; peak memory: "
        + ("max_memory_allocated over the timed steps" if args.device != "cpu"
           else "the process's peak RSS"), "",
        table(results, peak, args.tiny), "",
        f"{len(results)} rows in {time.monotonic() - start:.0f} s"
        + (f"; {skipped} skipped at the {args.deadline:g} s deadline" if skipped else "")
        + f" ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})", ""])
    print(text)
    with open(args.out, "w") as f:
        f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "peak_flops": peak, "peak": peak_text,
                       "command": command, "rows": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
