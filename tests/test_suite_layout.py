"""tests/conftest.py's rule for the real-Ray tests: exactly those under tests/ray/, marked `ray` there, and the
`ray_cluster` fixture refused anywhere else (`make test` runs that pass as `pytest tests/ray`, so a real-Ray
test elsewhere would land in the Ray-free pass)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from tests.conftest import RAY_TESTS, pytest_collection_modifyitems


def _item(path, *fixtures):
    item = SimpleNamespace(path=path, fixturenames=list(fixtures), nodeid=f"{path.name}::test_x", markers=[])
    item.add_marker = item.markers.append
    return item


def test_tests_under_tests_ray_are_marked_ray_and_no_others(tmp_path):
    inside, outside = _item(RAY_TESTS / "test_e2e.py", "ray_cluster"), _item(tmp_path / "test_plain.py", "tmp_path")
    pytest_collection_modifyitems(None, [inside, outside])
    assert [m.name for m in inside.markers] == ["ray"] and outside.markers == []


def test_a_real_ray_test_outside_tests_ray_is_refused_with_its_id(tmp_path):
    stray = _item(tmp_path / "test_stray.py", "ray_cluster")
    with pytest.raises(pytest.UsageError, match=r"^test_stray\.py::test_x starts a real Ray cluster \(ray_cluster\): "
                                                r"move it to tests/ray/$"):
        pytest_collection_modifyitems(None, [stray])
