"""Tests of qinco2.native: C kernels compiled once per source and CPU, cached, and a clear
fallback (None, one warning) where no compiler works."""

from __future__ import annotations

import ctypes
import shutil

import pytest

from qinco2 import native

SOURCE = "int qinco2_answer(int x) { return 2 * x + 1; }\n"


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """An empty cache and no library loaded yet in this process."""
    monkeypatch.setenv("QINCO2_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_LOADED", {})
    src = tmp_path / "answer.c"
    src.write_text(SOURCE)
    return src


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_compiled_once_then_loaded_from_the_cache(fresh, monkeypatch):
    monkeypatch.delenv("CC", raising=False)
    compiles = []
    real = native._compile
    monkeypatch.setattr(native, "_compile", lambda *a: compiles.append(a) or real(*a))
    lib = native.load(fresh)
    assert lib.qinco2_answer(ctypes.c_int(20)) == 41
    assert native.load(fresh) is lib and len(compiles) == 1          # kept in this process
    monkeypatch.setattr(native, "_LOADED", {})                      # a new process: the cached build
    assert native.load(fresh).qinco2_answer(3) == 7 and len(compiles) == 1
    assert [p.name for p in native.cache_dir().iterdir()] == [native.library_path(fresh, "cc").name]
    fresh.write_text(SOURCE.replace("+ 1", "+ 2"))                   # changed source: built again
    monkeypatch.setattr(native, "_LOADED", {})
    assert native.load(fresh).qinco2_answer(3) == 8 and len(compiles) == 2


def test_no_compiler_gives_none_and_one_warning(fresh, monkeypatch, caplog):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with caplog.at_level("WARNING"):
        assert native.load(fresh) is None
        assert native.load(fresh) is None
    assert caplog.text.count("could not build answer.c") == 1 and "Install a C compiler" in caplog.text
    assert not native.cache_dir().exists() or not any(native.cache_dir().iterdir())


def test_broken_source_gives_none_with_the_compiler_message(fresh, monkeypatch, caplog):
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    monkeypatch.delenv("CC", raising=False)
    fresh.write_text("this is not C\n")
    with caplog.at_level("WARNING"):
        assert native.load(fresh) is None
    assert "error" in caplog.text
    assert not any(native.cache_dir().iterdir())                    # no half-written library left


def test_disabled_by_environment(fresh, monkeypatch):
    monkeypatch.setenv("QINCO2_NATIVE", "0")
    assert native.load(fresh) is None
    assert not native.cache_dir().exists()


def test_a_compiler_without_openmp_builds_the_portable_library(fresh, tmp_path, monkeypatch, caplog):
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    wrapper = tmp_path / "cc-no-openmp"
    wrapper.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = "-fopenmp" ] && { echo "unknown option -fopenmp" >&2; '
                       'exit 1; }; done\nexec cc "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("CC", str(wrapper))
    with caplog.at_level("WARNING"):
        lib = native.load(fresh)
    assert lib.qinco2_answer(4) == 9
    assert "runs on one thread" in caplog.text and "-fopenmp" in caplog.text
    assert [p.name for p in native.cache_dir().iterdir()] == [
        native.library_path(fresh, str(wrapper), native.PORTABLE_FLAGS).name]
