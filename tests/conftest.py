"""Shared test set-up: Triton in interpreter mode on CPU-only machines, the real data path."""
import os
from pathlib import Path

import pytest
import torch

# Triton reads this when kernels are decorated: set it before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
HH_HARMLESS = REPO_ROOT.parent / "shared" / "data" / "hh-harmless"


def require_hh_harmless() -> Path:
    """Path of ../shared/data/hh-harmless: skip when absent, fail when absent under CI."""
    if (HH_HARMLESS / "train.jsonl.gz").is_file():
        return HH_HARMLESS
    message = f"real preference data not found at {HH_HARMLESS} (../shared/data/hh-harmless)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message + " and CI=true: CI must provide it")
    pytest.skip(message)


@pytest.fixture(scope="session", autouse=True)
def fresh_compile_cache(tmp_path_factory):
    """torch.compile's on-disk caches start empty in every test session. PyTorch keys a cached
    compiled graph by the traced graph, not by our ops' schemas or autograd formulas, so a cache
    written by an earlier build of the ops would replay their old calls."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("inductor-cache")))
    yield
    mp.undo()


@pytest.fixture
def hh_harmless() -> Path:
    return require_hh_harmless()


@pytest.fixture
def one_thread():
    """Tiny models run fastest (and least noisily on a shared machine) on one torch thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (run benchmarks/gpu_check.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
