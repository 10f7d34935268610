"""tests/gpu run only when asked for by marker (`-m gpu`): any other selection (`-m "not slow"`, a
plain run) leaves them out, so they never fail a CPU machine's run; asked for without a GPU, they fail."""

from __future__ import annotations


def pytest_collection_modifyitems(config, items):
    if "gpu" in (config.getoption("markexpr") or "").replace("not gpu", ""):
        return
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if not item.get_closest_marker("gpu")]
