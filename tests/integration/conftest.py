"""The real default model, loaded once per test session (dequantizing takes seconds)."""

import pytest

from kvserve.model.checkpoint import Checkpoint, load_checkpoint


@pytest.fixture(scope="session")
def default_checkpoint() -> Checkpoint:
    return load_checkpoint(None)
