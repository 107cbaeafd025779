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
