"""Every public name imports and is what ``__all__`` promises."""

import importlib
import re

import jaxla


def test_every_public_name_imports():
    assert jaxla.__version__
    for name in jaxla.__all__:
        assert hasattr(jaxla, name), name
    for sub in ("lora", "spectral"):
        if sub in jaxla.__all__:
            module = importlib.import_module(f"jaxla.{sub}")
            for name in module.__all__:
                assert hasattr(module, name), f"jaxla.{sub}.{name}"


def _isort_key(name):
    """The order ruff's RUF022 enforces: SCREAMING_CASE, then CamelCase, then the rest, each in
    natural order (digit runs compared as numbers)."""
    group = 0 if name.isupper() else 1 if name[0].isupper() else 2
    return group, [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def test_isort_key_matches_ruff_examples():
    assert sorted(["__version__", "apply", "Chunked", "EMPTY_LSE", "a10", "a2"], key=_isort_key) == [
        "EMPTY_LSE", "Chunked", "__version__", "a2", "a10", "apply"]


def test_all_is_sorted_and_unique():
    for module_name in ("jaxla", "jaxla.lora", "jaxla.spectral", "jaxla.attention"):
        names = list(importlib.import_module(module_name).__all__)
        assert len(set(names)) == len(names), f"{module_name}.__all__ repeats a name"
        assert names == sorted(names, key=_isort_key), (
            f"{module_name}.__all__ is not sorted; expected {sorted(names, key=_isort_key)}")


def test_public_functions_document_shapes():
    for name in jaxla.__all__:
        obj = getattr(jaxla, name)
        if callable(obj) and not isinstance(obj, type):
            assert obj.__doc__ and len(obj.__doc__) > 40, f"{name} lacks a docstring"


def test_atomic_write_keeps_old_file_on_failure_and_normal_permissions(tmp_path):
    from jaxla import _files

    target = tmp_path / "out.bin"
    _files.write_atomic(target, b"first")
    assert target.read_bytes() == b"first"
    assert target.stat().st_mode & 0o777 == 0o666 & ~_umask()

    # A failure while writing leaves the old content and no temp files behind.
    import pytest

    with pytest.raises(TypeError):
        _files.write_atomic(target, object())  # type: ignore[arg-type]
    assert target.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _files.write_atomic(tmp_path / "missing" / "x.bin", b"")


def _umask():
    import os

    m = os.umask(0o022)
    os.umask(m)
    return m
