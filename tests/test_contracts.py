"""What a run saves does not change under a refactor: the state-dict keys, the saved config's keys
and the checkpoint's own fields of every script's default (tiny) run are those recorded in
tests/contract_keys.json from checkpoints written before the redesign of issue 20 (one step of the
default run; evaluation skipped). A renamed parameter, a dropped or renamed config field or
checkpoint field would leave earlier checkpoints unable to resume or initialise a run. Fields
added since (issue 21: CLIP's loss, diht_alpha, diht_beta, patch_dropout, unmasked_steps; CoCa's
patch_dropout, unmasked_steps; --export's export and export_format, and the checkpoint's method) are in
the lists too: a checkpoint without them resumes with
their defaults, which are the behaviour it was trained with."""
import importlib
import json
import os

import pytest

from common import utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = [("clip_train", []), ("albef_train", []), ("blip_train", []), ("coca_train", []),
        ("blip2_train", []), ("blip2_train", ["--stage", "2"])]


@pytest.mark.parametrize("script, args", RUNS, ids=["clip", "albef", "blip", "coca", "blip2", "blip2-stage2"])
def test_checkpoint_keys_are_the_recorded_ones(script, args, tmp_path, monkeypatch):
    with open(os.path.join(ROOT, "tests", "contract_keys.json")) as f:
        want = json.load(f)[" ".join([script, *args])]
    module = importlib.import_module(script)
    for name in ("evaluate", "evaluate_stage2"):          # the keys are the point, not the metrics
        if hasattr(module, name):
            monkeypatch.setattr(module, name, lambda *a, **k: {})
    module.main([*args, "--max-steps", "1", "--workers", "0", "--output-dir", str(tmp_path)])
    ckpt = utils.load_checkpoint(str(tmp_path / "checkpoint_last.pt"))
    got = {"top": sorted(ckpt), "model": sorted(ckpt["model"]), "config": sorted(ckpt["config"])}
    for part in ("top", "model", "config"):
        assert got[part] == want[part], (part, sorted(set(got[part]) ^ set(want[part]))[:10])
