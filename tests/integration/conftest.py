"""The real default model, loaded once per test session (dequantizing takes seconds)."""

import pytest

from kvserve.model.checkpoint import Checkpoint, load_checkpoint


@pytest.fixture(scope="module")
def offline():
    """transformers reads local files only (HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("TRANSFORMERS_OFFLINE", "1")
        yield


@pytest.fixture(scope="session")
def default_checkpoint() -> Checkpoint:
    return load_checkpoint(None)
