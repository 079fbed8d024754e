"""Small C kernels, compiled on first use and loaded with ctypes.

A kernel is one C source file shipped in the package. :func:`load` compiles it with the
system's C compiler (``$CC``, else ``cc``) into a shared library cached under
``$QINCO2_CACHE`` (default ``~/.cache/qinco2``), named by a hash of the source, the compiler
flags and this CPU (the code is built for the CPU it runs on, ``-march=native``), and loads it.
It links OpenMP from the runtime torch already loaded (one pool of threads, see
:mod:`qinco2.openmp`); where those flags fail (a compiler without OpenMP or ``-march=native``)
it builds with ``PORTABLE_FLAGS`` (one thread), with a warning. Where no compiler works, or
``QINCO2_NATIVE=0``, :func:`load` returns None once per process, after one warning, and the
callers use their slower path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-fopenmp", "-std=c99")
PORTABLE_FLAGS = ("-O3", "-fPIC", "-shared", "-std=c99")     # where those fail (e.g. no OpenMP): one thread
_LOADED: dict[Path, ctypes.CDLL | None] = {}


def enabled() -> bool:
    """False where ``QINCO2_NATIVE=0`` asks for the pure Python/faiss paths."""
    return os.environ.get("QINCO2_NATIVE", "1") != "0"


def cache_dir() -> Path:
    """Where compiled kernels are kept (``$QINCO2_CACHE/native``, default ``~/.cache/qinco2``)."""
    root = os.environ.get("QINCO2_CACHE") or Path.home() / ".cache" / "qinco2"
    return Path(root) / "native"


def _cpu_key() -> str:
    """The CPU model and flags, so a cache shared between machines keeps one build per CPU."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor() or platform.machine()


def library_path(source: Path, compiler: str, flags: tuple[str, ...] = FLAGS) -> Path:
    """The cached library of ``source`` built by ``compiler`` with ``flags`` for this CPU."""
    key = hashlib.sha256(b"\0".join([source.read_bytes(), compiler.encode(), " ".join(flags).encode(),
                                     _cpu_key().encode()])).hexdigest()[:16]
    return cache_dir() / f"{source.stem}-{key}.so"


def _compile(source: Path, target: Path, compiler: str, flags: tuple[str, ...]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *flags, str(source), "-o", tmp], check=True, capture_output=True, text=True,
                       timeout=120)
        os.replace(tmp, target)             # atomic: a concurrent process sees all of it or nothing
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load(source: Path) -> ctypes.CDLL | None:
    """The compiled ``source`` (compiled now if not cached), or None where it cannot be built."""
    source = Path(source)
    if source in _LOADED:
        return _LOADED[source]
    lib, compiler, errors = None, os.environ.get("CC", "cc"), []
    for flags in (FLAGS, PORTABLE_FLAGS) if enabled() else ():
        try:
            target = library_path(source, compiler, flags)
            if not target.exists():
                log.info("compiling %s with %s %s into %s", source.name, compiler, " ".join(flags), target)
                _compile(source, target, compiler, flags)
            lib = ctypes.CDLL(str(target))
            break
        except (OSError, subprocess.SubprocessError) as e:
            errors.append((getattr(e, "stderr", None) or str(e)).strip()[:500])
    if lib is None and errors:
        log.warning("could not build %s with %s (%s): the slower path is used. Install a C compiler "
                    "(gcc) or set CC=<compiler>; QINCO2_NATIVE=0 silences this.", source.name, compiler, errors[0])
    elif errors:
        log.warning("built %s without %s (%s): it runs on one thread", source.name, " ".join(FLAGS), errors[0])
    _LOADED[source] = lib
    return lib
