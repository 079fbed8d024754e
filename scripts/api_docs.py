"""Write the API reference (docs/api.md) from the docstrings of the public modules.

    python scripts/api_docs.py            # rewrite docs/api.md
    python scripts/api_docs.py --check    # exit 1 if docs/api.md is not what the code says

Every name in the ``__all__`` of :data:`MODULES` gets its signature and docstring; a class
also gets its public methods and properties. The test suite runs ``--check``, so the page
never drifts from the code.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "docs" / "api.md"
MODULES = ("qinco2", "qinco2.ivfpq", "qinco2.ivfsearch")

HEADER = """# API reference

Generated from the docstrings by `python scripts/api_docs.py` (do not edit by hand; the tests
check that this page matches the code). Each section lists the public names of one module
(its `__all__`). Arrays are numpy or torch tensors (answered in kind); shapes follow the
letters of the README's shape key.
"""


def _doc(obj) -> str:
    return inspect.cleandoc(obj.__doc__) if obj.__doc__ else "(no docstring)"


def _signature(name: str, obj) -> str:
    """``name(params) -> result`` with the annotations as written (not quoted strings)."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return name

    def plain(annotation):
        return inspect.Parameter.empty if annotation is inspect.Parameter.empty else _Raw(annotation)
    sig = sig.replace(parameters=[p.replace(annotation=plain(p.annotation)) for p in sig.parameters.values()],
                      return_annotation=plain(sig.return_annotation))
    return f"{name}{sig}"


class _Raw:
    """An annotation shown as its source text, without the quotes of a string."""

    def __init__(self, annotation):
        self.text = annotation.strip("'\"") if isinstance(annotation, str) else inspect.formatannotation(annotation)

    def __repr__(self) -> str:
        return self.text


def _summary(obj) -> str:
    """The first paragraph of ``obj``'s docstring, on one line."""
    return " ".join(_doc(obj).split("\n\n")[0].split())


def _members(cls) -> list[str]:
    """Public methods and properties defined by ``cls`` itself, in source order."""
    out = []
    for name, attr in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(attr, property):
            out.append(f"- `{name}` (property): {_summary(attr)}")
        elif isinstance(attr, (staticmethod, classmethod)) or inspect.isfunction(attr):
            fn = attr.__func__ if isinstance(attr, (staticmethod, classmethod)) else attr
            out.append(f"- `{_signature(name, fn)}`: {_summary(fn)}")
    return out


def _entry(module: str, name: str, obj) -> list[str]:
    if inspect.isclass(obj):
        lines = [f"### `{module}.{name}`", "", f"class `{_signature(name, obj)}`", "", _doc(obj), ""]
        members = _members(obj)
        return lines + (["Members:", "", *members, ""] if members else [])
    if callable(obj):
        return [f"### `{module}.{name}`", "", f"`{_signature(name, obj)}`", "", _doc(obj), ""]
    return [f"### `{module}.{name}`", "", f"`{name} = {obj!r}`"[:300], ""]


def render() -> str:
    lines = [HEADER]
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        lines += [f"## `{module_name}`", "", _doc(module), ""]
        for name in module.__all__:
            if name.startswith("__"):
                continue
            lines += _entry(module_name, name, getattr(module, name))
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not OUTPUT.is_file() or OUTPUT.read_text() != text:
            print(f"{OUTPUT} is out of date: run `python scripts/api_docs.py`", file=sys.stderr)
            return 1
        return 0
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
