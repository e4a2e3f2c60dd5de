"""Fixtures shared by several test modules."""

import importlib.util
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("processing_decd") is None:  # plain `pytest` from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from decd.synthetic import generate_synthetic_person_search  # noqa: E402
from processing_decd import DecdProcessor  # noqa: E402

# The smallest synthetic benchmark that still has every split: 6 training identities, 2 val, 3 test, 2 images each.
TINY_SET = dict(num_train_ids=6, num_val_ids=2, num_test_ids=3, images_per_id=2, progress=False)


@pytest.fixture(scope="session")
def tiny_set(tmp_path_factory):
    """A tiny synthetic benchmark folder, generated once per run. Read it; copy it before changing anything."""
    return generate_synthetic_person_search(tmp_path_factory.mktemp("synthetic") / "set", **TINY_SET)


@pytest.fixture(scope="session")
def processor():
    """The default DecdProcessor (384 x 128 crops, CLIP's tokenizer with the mask token)."""
    return DecdProcessor()
