"""Shared test fixtures: a real local Ray cluster, tiny sweep files on synthetic data."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures"
RAY_TESTS = REPO / "tests" / "ray"


def pytest_collection_modifyitems(config, items):
    """The real-Ray tests are exactly those under tests/ray/: marked `ray` there, refused elsewhere. So
    `make test` runs them as `pytest tests/ray` and collects only those modules (collecting the whole
    suite to deselect all but 8 tests costs ~15 s of imports)."""
    for item in items:
        if item.path.is_relative_to(RAY_TESTS):
            item.add_marker(pytest.mark.ray)
        elif "ray_cluster" in getattr(item, "fixturenames", ()):
            raise pytest.UsageError(f"{item.nodeid} starts a real Ray cluster (ray_cluster): move it to tests/ray/")


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core box OpenMP spinning makes
    them up to ~20x slower (Ray workers get one thread per CPU for the same reason)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ray_cluster():
    """One real local Ray for the session: 4 logical CPUs and 1 logical GPU on this CPU-only
    machine (a logical GPU lets tests check fractional placement; the models stay on CPU).
    The dashboard stays on: Ray Train frees a stopped trial's worker placement group through the
    State API it serves, and without it an ASHA-stopped trial would hang the sweep."""
    import ray

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # Train's controller polls its workers every 2 s, so each trial waits up to 2 s after its last epoch
    # before it is seen to finish; the tests' trials are seconds long, so poll more often (the raylet
    # started below passes the environment on to the controllers).
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    # Nothing preempts this machine's nodes: one actor (a Python process) less per trial.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    if not ray.is_initialized():
        ray.init(num_cpus=4, num_gpus=1, include_dashboard=True, log_to_driver=False,
                 configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("synthetic")
