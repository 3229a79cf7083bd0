import os

import pytest

from lab.engine.backend import backend_instance


@pytest.fixture(scope="session")
def wgpu_backend():
    """The wgpu backend (lavapipe on CPU-only machines). CI sets LAB_REQUIRE_WGPU=1 so a missing adapter fails
    the run instead of skipping every kernel test."""
    try:
        return backend_instance("wgpu")
    except Exception as e:
        if os.environ.get("LAB_REQUIRE_WGPU") == "1":
            raise
        pytest.skip(f"no wgpu adapter: {e}")


@pytest.fixture(scope="session")
def numpy_backend():
    return backend_instance("numpy")


@pytest.fixture(params=["numpy", "wgpu"])
def any_backend(request):
    """Each test using this runs on both backends."""
    return request.getfixturevalue(f"{request.param}_backend")


@pytest.fixture
def use_backend(any_backend):
    """Make `any_backend` the active backend for the test, restoring the previous one after."""
    from lab.engine import backend as B
    prev = dict(B._state)
    B._state["backend"], B._state["reason"] = any_backend, "test"
    yield any_backend
    B._state.update(prev)
