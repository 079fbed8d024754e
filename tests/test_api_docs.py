"""docs/api.md is generated from the docstrings and matches the code; every public name,
method and property has a docstring."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _api_docs():
    spec = importlib.util.spec_from_file_location("api_docs", ROOT / "scripts" / "api_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_api_page_matches_the_code():
    api_docs = _api_docs()
    assert api_docs.main(["--check"]) == 0, "docs/api.md is out of date: run `python scripts/api_docs.py`"


def test_every_public_name_is_documented():
    text = _api_docs().render()
    missing = [line for line in text.splitlines() if "(no docstring)" in line]
    assert not missing, missing
    for name in ("QincoCodec", "open_vectors", "ivfpq.search", "ivfpq.IndexParams"):
        assert f"`qinco2.{name}`" in text
