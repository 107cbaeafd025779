import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@pytest.fixture(scope="session")
def tiny():
    """The built-in tiny dataset (built once into the cache folder)."""
    from common.data import tiny_data
    return tiny_data()


@pytest.fixture(scope="session")
def trained_clip(tmp_path_factory):
    """(folder, final metrics) of 160 steps of clip_train.py's default tiny preset (~2 min), trained
    once per session: the CLIP learning test checks it, data/curate.py's proof curates with it."""
    import clip_train
    out = tmp_path_factory.mktemp("trained_clip")
    metrics = clip_train.main(["--max-steps", "160", "--workers", "0", "--output-dir", str(out)])
    return out, metrics
