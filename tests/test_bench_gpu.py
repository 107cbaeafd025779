"""The GPU benchmark's CPU path (tests/bench/bench_gpu.py --device cpu --tiny): every row runs at
the tiny presets in its own process and lands in the table with a positive throughput, and the
FLOP count MFU rests on agrees with a count of CLIP's matrix multiplies by hand, so that the
script stays runnable for the day a GPU is lent and its MFU column means what it says."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.bench import bench_gpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "bench", "bench_gpu.py")
HAVE_OPEN_CLIP = importlib.util.find_spec("open_clip") is not None


def run(*args, timeout=240):
    return subprocess.run([sys.executable, SCRIPT, "--device", "cpu", "--tiny", "--threads", "1",
                           *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_gpu")
    md, js = out / "bench.md", out / "bench.json"
    proc = run("--jobs", "2", "--out", str(md), "--json", str(js))   # two rows at a time
    assert proc.returncode == 0, proc.stderr[-3000:]
    return md.read_text(), json.loads(js.read_text()), proc.stdout


def table_rows(markdown):
    """{row name: {column: cell}} of the Markdown table."""
    lines = [x for x in markdown.splitlines() if x.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))
        rows[cells["row"].strip("`")] = cells
    return rows


def clip_matmul_flops(cfg):
    """Forward + backward FLOPs of CLIP's weight matrix multiplies, written out from the config:
    6 per weight and token through it (2 forward, 4 backward: Kaplan et al. 2020's C = 6ND).
    Per block: qkv and out projections 4 w^2, the MLP 2 w * mlp_ratio w; the patch embedding on
    each patch; the two projections on one token per sample. The attention scores themselves
    (about a fifth more at these sizes) are left out."""
    def block(width):
        return 4 * width * width + 2 * width * int(cfg.mlp_ratio * width)
    patches = (cfg.image_size // cfg.patch_size) ** 2
    vision = (block(cfg.vision_width) * cfg.vision_layers * (patches + 1)
              + 3 * cfg.patch_size ** 2 * cfg.vision_width * patches
              + cfg.vision_width * cfg.embed_dim)
    text = (block(cfg.text_width) * cfg.text_layers * cfg.context_length
            + cfg.text_width * cfg.embed_dim)
    return 6 * cfg.batch_size * (vision + text)


def test_every_row_in_the_table(tiny_run):
    markdown, results, stdout = tiny_run
    assert markdown.strip() in stdout                   # the same table on stdout
    expected = [k for k, r in bench_gpu.ROWS.items() if not r["compile"]]   # CPU: no compile
    rows = table_rows(markdown)
    assert sorted(rows) == sorted(expected)
    for key in expected:
        if key.endswith("open_clip") and not HAVE_OPEN_CLIP:
            continue
        assert float(rows[key]["samples/s"]) > 0, rows[key]
        assert float(rows[key]["GFLOP/step"]) > 0, rows[key]
        assert rows[key]["MFU"] == "n/a"                # no --peak-tflops, no device table
    assert "peak rate for MFU: n/a" in markdown and "command: `python tests/bench/" in markdown
    by_key = {r["row"]["key"]: r for r in results["rows"]}
    for key in expected:
        if by_key[key]["status"] == "ok":
            assert by_key[key]["flops"] > 0 and by_key[key]["samples_per_s"] > 0


def test_clip_flops_match_a_count_by_hand(tiny_run):
    _, results, _ = tiny_run
    by_key = {r["row"]["key"]: r for r in results["rows"]}
    counted = by_key["clip"]["flops"]
    estimate = clip_matmul_flops(bench_gpu.make_config("clip", tiny=True))
    assert 0.9 < counted / estimate < 1.4, (counted, estimate)   # + attention scores (GPU only)
    # FLIP at 0.5: half the image tokens, so fewer FLOPs (the vision tower is most of them)
    assert by_key["clip-pd"]["flops"] < 0.8 * counted
    if HAVE_OPEN_CLIP:       # the same architecture: the same count within a few percent
        assert abs(by_key["clip-open_clip"]["flops"] / counted - 1) < 0.05


def test_peak_rate_and_deadline(tmp_path):
    """--peak-tflops gives an MFU column; a row past its timeout is killed and marked failed, and
    the rows after the deadline are skipped and said so."""
    md = tmp_path / "b.md"
    proc = run("--rows", "clip,coca", "--row-timeout", "0.5", "--deadline", "5.5",
               "--peak-tflops", "1", "--out", str(md), timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = table_rows(md.read_text())
    assert rows["clip"]["samples/s"] == "failed" and "timed out" in rows["clip"]["note"]
    assert rows["coca"]["samples/s"] == "skipped" and "deadline" in rows["coca"]["note"]
    assert "1 TFLOP/s (--peak-tflops)" in md.read_text()
    assert bench_gpu.main(["--list"]) is None
