"""Shared fixtures: GPU skipping, a tiny random checkpoint, process clusters."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from pdbus.procs import Cluster  # noqa: E402


def pytest_sessionstart(session):
    """Build native/cpu's kernels before any test starts a server: a cold build takes about a
    minute, which would otherwise land inside some test's first request (and its timeout)."""
    from native.cpu import kernels

    kernels()


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A tiny random ERNIE-4.5-MoE checkpoint (-PT layout, fp32), no tokenizer."""
    from conftest_model import build_hf, save_hf

    out = tmp_path_factory.mktemp("tiny-moe")
    save_hf(build_hf("moe_shared"), str(out))
    return str(out)


@pytest.fixture(scope="session")
def default_model_dir() -> str:
    from pdbus.config import default_model_dir

    path = default_model_dir()
    if not os.path.isfile(os.path.join(path, "config.json")):
        pytest.fail(f"the built-in default model is missing at {path}")
    return path


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path / "procs")
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def one_torch_thread():
    """The tiny model needs no second intra-op thread: it only fights the other processes for the
    CPU. (Used with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.)"""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    """``tiny_model_dir`` loaded on the CPU in fp32 (eval mode)."""
    from native.model.loader import load_model

    m, _ = load_model(tiny_model_dir, dtype="float32", device="cpu")
    return m.eval()
