"""albef_train.py --export: a tiny run written in the official ALBEF .pth layout ({'model':
state_dict} with ALBEF.pth's key names, the momentum copies and the queues), read back by our
official loader and our --init-from with every weight identical, in LAVIS (tests/lavis/
check_albef_export.py, when LAVIS's environment is there) with our losses; the folder's config,
tokenizer and model card; the refusals."""
import json
import os
import subprocess

import pytest
import torch

import albef_train
from common.data import Tokenizer
from common.utils import UserError, load_checkpoint
from common.weights import albef as albef_weights
from tests.test_distributed import ROOT, one_line_error

RUN = ["--max-steps", "2", "--workers", "0", "--batch-size", "8", "--queue-size", "16"]
LAVIS_PYTHON = os.path.join(ROOT, ".venv-lavis", "bin", "python")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run of 2 steps (evaluated: metrics.jsonl for the card; its queue of 16 full, the
    pointer back at 0) and its export."""
    out = tmp_path_factory.mktemp("albef")
    albef_train.main(RUN + ["--k-test", "2", "--output-dir", str(out / "run")])   # a short ITM pass
    ckpt_path = str(out / "run" / "checkpoint_last.pt")
    albef_train.main(["--init-from", ckpt_path, "--export", str(out / "export")])
    return dict(out=out, ckpt_path=ckpt_path, ckpt=load_checkpoint(ckpt_path), folder=out / "export")


def init_from(path, **config):
    """Our model as --init-from `path` builds it (read_init, the architecture, load_init)."""
    init = albef_weights.read_init(path)
    arch = albef_weights.init_architecture(init, path, albef_train.MODEL_FIELDS)
    cfg = albef_train.Config(**{"queue_size": 16, **config, **arch})
    model = albef_train.ALBEF(cfg, mask_id=3, pad_id=0, cls_id=1)
    albef_weights.load_init(model, init, path)
    return model, arch


def assert_identical(model, reference, skip=()):
    state, ref = model.state_dict(), reference.state_dict()
    assert state.keys() == ref.keys()
    for key, value in ref.items():
        if not key.startswith(skip):
            assert torch.equal(state[key], value), key


def test_init_from_the_export_holds_every_weight(run):
    """The folder, its model.pth and its model.safetensors through --init-from: the checkpoint's
    architecture and every weight and queue as --init-from of the checkpoint itself gives them."""
    ckpt = run["ckpt"]
    reference, _ = init_from(run["ckpt_path"])
    assert bool(ckpt["model"]["queue_filled"].all()) and int(ckpt["model"]["queue_ptr"]) == 0
    for key, value in ckpt["model"].items():               # the checkpoint's own weights and queues
        if key != "idx_queue":                             # (ids of its own data: never loaded)
            assert torch.equal(reference.state_dict()[key], value), key
    for path in (run["folder"], run["folder"] / "model.pth", run["folder"] / "model.safetensors"):
        model, arch = init_from(str(path))
        assert arch == {k: ckpt["config"][k] for k in albef_train.MODEL_FIELDS     # but the run's
                        if k not in ("image_size", "queue_size", "vision_eps", "text_eps")}
        assert_identical(model, reference)
    # our official loader, as for ALBEF.pth
    official = albef_train.ALBEF.from_official(str(run["folder"] / "model.pth"), reference.cfg)
    assert_identical(official, reference)


def test_the_file_is_the_official_layout(run):
    state = torch.load(run["folder"] / "model.pth", map_location="cpu", weights_only=True)
    assert list(state) == ["model"]
    state = state["model"]
    c = run["ckpt"]["config"]
    # ALBEF.pth's 844 keys at 12 + 12 layers (6 fusion): per copy a ViT (6 + 12 per block), BERT
    # (6 + 16 per layer + 10 per fusion layer), the MLM head (7) and the projections (4); itm_head,
    # temp, the queues and queue_ptr once
    per_copy = 6 + 12 * c["vision_layers"] + 6 + 16 * c["text_layers"] \
        + 10 * (c["text_layers"] - c["fusion_layer"]) + 7 + 4
    assert len(state) == 2 * per_copy + 6
    for key in ("visual_encoder.pos_embed", "visual_encoder_m.blocks.0.attn.qkv.weight",
                "text_encoder.bert.embeddings.position_ids", "text_encoder.cls.predictions.bias",
                f"text_encoder_m.bert.encoder.layer.{c['fusion_layer']}.crossattention.self.key.weight",
                "vision_proj_m.weight", "itm_head.bias", "temp", "image_queue", "queue_ptr"):
        assert key in state, key
    assert state["visual_encoder.pos_embed"].shape == (1, 1 + (c["image_size"] // c["patch_size"]) ** 2,
                                                       c["vision_width"])
    assert not any(".crossattention." in k for k in state if ".layer.0." in k)
    words = "text_encoder.bert.embeddings.word_embeddings.weight"
    assert state["text_encoder.cls.predictions.decoder.weight"].data_ptr() == state[words].data_ptr()
    assert torch.equal(state[words], run["ckpt"]["model"]["text_encoder.word_embeddings.weight"])
    from safetensors.torch import load_file
    weights = load_file(run["folder"] / "model.safetensors")
    assert weights.keys() == state.keys() and all(torch.equal(weights[k], v) for k, v in state.items())


def test_config_tokenizer_and_card(run):
    from transformers import AutoTokenizer
    folder, c = run["folder"], run["ckpt"]["config"]
    config = json.loads((folder / "config.json").read_text())
    assert config["fusion_layer"] == c["fusion_layer"] and config["num_hidden_layers"] == c["text_layers"]
    assert config["hidden_size"] == c["text_width"] and config["encoder_width"] == c["vision_width"]
    assert config["vocab_size"] == c["vocab_size"] and config["type_vocab_size"] == c["type_vocab_size"]
    for key, field in (("layer_norm_eps", "text_eps"), ("intermediate_size", "text_mlp_dim"),
                       ("num_attention_heads", "text_heads"), ("max_position_embeddings", "max_positions")):
        assert config[key] == c[field], key
    assert config["add_cross_attention"] is True      # LAVIS's BERT has no cross-attention without
    import yaml                                       # as the official code and LAVIS read it
    run_yaml = yaml.safe_load((folder / "config.yaml").read_text())
    assert run_yaml["image_res"] == c["image_size"] and run_yaml["bert_config"] == "config.json"
    for key in ("vision_width", "patch_size", "vision_layers", "vision_heads", "vision_mlp_dim",
                "vision_eps", "embed_dim", "queue_size", "temp", "momentum", "alpha", "mlm_probability"):
        assert run_yaml[key] == c[key] and type(run_yaml[key]) is type(c[key]), key   # 1e-06: a float
    texts = ["a red circle left of a blue square", "green"]
    ids = AutoTokenizer.from_pretrained(folder)(texts, padding="max_length", max_length=c["max_length"],
                                                truncation=True, return_tensors="pt")["input_ids"]
    assert torch.equal(ids, Tokenizer(c["tokenizer"])(texts, c["max_length"]))
    card = (folder / "README.md").read_text()
    assert "| tiny | the built-in tiny set | 2 |" in card and "| r_mean |" in card
    assert "--max-steps 2" in card and "--queue-size 16" in card
    assert "LAVIS's BERT has no token-type embeddings" in card          # the run has token types
    assert "queue slots held no key" not in card                        # its queue is full
    assert "update the momentum model at the start of each forward" in card


def test_a_bert_tokenizer_gets_the_vocab_txt_the_official_code_reads(run, tmp_path):
    from transformers import BertTokenizer
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "circle", "square",
             "left", "of", "##s"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(tmp_path / "bert")
    path = variant(run, tmp_path, "bert", {"tokenizer": str(tmp_path / "bert")})
    albef_train.main(["--init-from", path, "--export", str(tmp_path / "out")])
    assert (tmp_path / "out" / "vocab.txt").read_text() == "\n".join(words) + "\n"
    texts, L = ["a red circle left of blue squares", "a green square"], run["ckpt"]["config"]["max_length"]
    vocab_only = BertTokenizer(str(tmp_path / "out" / "vocab.txt"))     # as older transformers read it
    ids = vocab_only(texts, padding="max_length", max_length=L, return_tensors="pt")["input_ids"]
    assert torch.equal(ids, Tokenizer(str(tmp_path / "bert"))(texts, L))


def variant(run, tmp_path, name, config=None, model=None):
    """The run's checkpoint with other config fields / weights, saved as another checkpoint."""
    ckpt = {**run["ckpt"], "config": {**run["ckpt"]["config"], **(config or {})},
            "model": {**run["ckpt"]["model"], **(model or {})}}
    ckpt["model"] = {k: v for k, v in ckpt["model"].items() if v is not None}
    torch.save(ckpt, tmp_path / f"{name}.pt")
    return str(tmp_path / f"{name}.pt")


def test_no_token_types_and_a_queue_not_full(run, tmp_path):
    """A run without token types writes zeros (the official code adds row 0), read back as none;
    LAVIS loads it with every key but those (tests/lavis/check_albef_export.py, when its
    environment is there); empty queue slots become random unit vectors, said in the card."""
    filled = torch.ones(1, 16, dtype=torch.bool)
    filled[0, 10:] = False
    drop = {f"text_encoder{s}.token_type_embeddings.weight": None for s in ("", "_m")}
    path = variant(run, tmp_path, "types0", {"type_vocab_size": 0}, drop)
    albef_train.main(["--init-from", path, "--export", str(tmp_path / "types0")])
    state = torch.load(tmp_path / "types0" / "model.pth", weights_only=True)["model"]
    assert not state["text_encoder.bert.embeddings.token_type_embeddings.weight"].any()
    model, arch = init_from(str(tmp_path / "types0"))
    assert arch["type_vocab_size"] == 0
    assert_identical(model, init_from(path)[0])
    if os.path.isfile(LAVIS_PYTHON):
        proc = subprocess.run([LAVIS_PYTHON, "tests/lavis/check_albef_export.py", str(tmp_path / "types0"), path],
                              cwd=ROOT, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "loss_mlm: ours" in proc.stdout
    path = variant(run, tmp_path, "partial", model={"queue_filled": filled})
    albef_train.main(["--init-from", path, "--export", str(tmp_path / "partial")])
    assert "6 of the 16 queue slots held no key yet" in (tmp_path / "partial" / "README.md").read_text()
    state = torch.load(tmp_path / "partial" / "model.pth", weights_only=True)["model"]
    queue = run["ckpt"]["model"]["image_queue"]
    assert torch.equal(state["image_queue"][:, :10], queue[:, :10])
    torch.testing.assert_close(state["image_queue"][:, 10:].norm(dim=0), torch.ones(6))
    assert not torch.equal(state["image_queue"][:, 10:], queue[:, 10:])


def test_retrieval_run_is_the_retrieval_models_layout(run, tmp_path):
    """model_retrieval.py's layout: text_encoder.* (a BertModel), no MLM head, idx_queue."""
    ids = torch.arange(16)[None]
    path = variant(run, tmp_path, "retrieval", {"task": "retrieval"}, {"idx_queue": ids})
    albef_train.main(["--init-from", path, "--export", str(tmp_path / "retrieval")])
    state = torch.load(tmp_path / "retrieval" / "model.pth", weights_only=True)["model"]
    assert "text_encoder.embeddings.word_embeddings.weight" in state and torch.equal(state["idx_queue"], ids)
    assert not any(k.startswith(("text_encoder.bert.", "text_encoder.cls.")) for k in state)
    model, _ = init_from(str(tmp_path / "retrieval"))
    assert torch.equal(model.idx_queue, ids)
    assert_identical(model, init_from(path)[0], skip=("mlm_head", "idx_queue"))   # no MLM head there


def test_export_refuses_what_it_cannot_write(run, tmp_path):
    with pytest.raises(UserError, match="exists and is not empty"):
        albef_train.main(["--init-from", run["ckpt_path"], "--export", str(run["folder"])])
    with pytest.raises(UserError, match="pass --init-from CHECKPOINT"):
        albef_train.main(["--export", str(tmp_path / "none")])
    path = variant(run, tmp_path, "heads", {"vision_heads": 4})
    with pytest.raises(UserError, match="--vision-heads 4 is not ALBEF's 2"):
        albef_train.main(["--init-from", path, "--export", str(tmp_path / "heads")])
    assert not os.path.exists(tmp_path / "heads") and not os.path.exists(tmp_path / "heads.tmp")
    old = {**run["ckpt"], "config": {"loss": "clip"}}
    old.pop("method")
    torch.save(old, tmp_path / "old.pt")                 # saved before checkpoints named their method
    with pytest.raises(UserError, match="is not a albef_train.py checkpoint"):
        albef_train.main(["--init-from", str(tmp_path / "old.pt"), "--export", str(tmp_path / "x")])


def test_another_scripts_checkpoint_is_one_line_exit_2(run, tmp_path):
    torch.save({**run["ckpt"], "method": "blip"}, tmp_path / "blip.pt")
    line = one_line_error("albef_train.py", "--init-from", str(tmp_path / "blip.pt"), "--export", str(tmp_path / "out"))
    assert line == f"error: {tmp_path / 'blip.pt'} is a blip checkpoint: export it with blip_train.py, not albef_train.py"
    assert not os.path.exists(tmp_path / "out")
