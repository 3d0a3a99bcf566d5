"""Every public name imports and is what ``__all__`` promises."""

import importlib

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


def test_all_is_sorted_and_unique():
    names = [n for n in jaxla.__all__ if n != "__version__"]
    assert len(set(names)) == len(names)


def test_public_functions_document_shapes():
    for name in jaxla.__all__:
        obj = getattr(jaxla, name)
        if callable(obj) and not isinstance(obj, type):
            assert obj.__doc__ and len(obj.__doc__) > 40, f"{name} lacks a docstring"
