"""Shared fixtures: tiny model folders of every architecture, built once per session."""

from __future__ import annotations

import pytest
import torch

from edgepeft.tiny import TINY_CONFIGS, TINY_VOCAB, save_tiny_model


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """tiny_dir("llama") -> path of a saved tiny model folder (cached per session)."""
    made: dict[str, object] = {}

    def make(model_type: str = "llama"):
        if model_type not in made:
            made[model_type] = save_tiny_model(tmp_path_factory.mktemp(model_type), model_type)
        return made[model_type]

    return make


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matmuls gain nothing from a thread pool, which only waits on busy cores (seconds
    instead of milliseconds per forward on a loaded machine). Use it module-wide with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def input_ids():
    """A fixed batch of token ids (2 sequences of 9 tokens)."""
    return torch.randint(0, TINY_VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))


ALL_ARCHS = sorted(TINY_CONFIGS)
