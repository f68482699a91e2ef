"""OpenAI's own ``clip/model.py`` and BPE vocabulary, from the ``openai-clip`` package on PyPI, for tests.

The package (an sdist, MIT licence, (c) OpenAI) is fetched once with ``pip download`` in hash-checking mode
(the archive's sha256 is pinned, and pip checks it before it unpacks or builds anything), cached under
``<repo>/.cache/openai-clip/`` (git-ignored; see :func:`cache_dir`), and only three files are read out of
it: ``clip/model.py`` (imported by file path; it needs only torch and numpy), ``clip/simple_tokenizer.py``
and ``clip/bpe_simple_vocab_16e6.txt.gz``. Nothing of it is committed to this repository.

When the package cannot be fetched (no registry access), :class:`ReferenceUnavailable` says so and how to
provide the file by hand; tests let it fail rather than skip, so a CI job without the reference cannot pass
silently.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from types import ModuleType

PACKAGE = "openai-clip"
VERSION = "1.0.1"
SDIST = f"openai-clip-{VERSION}.tar.gz"
SDIST_SHA256 = "cd40bf2f205c096c49524fcbff484339f793b52afd6e7ffad80a2fe108151721"
MEMBERS = {
    name: f"openai-clip-{VERSION}/clip/{name}"
    for name in ("model.py", "simple_tokenizer.py", "bpe_simple_vocab_16e6.txt.gz")
}


class ReferenceUnavailable(RuntimeError):
    """The reference package could not be fetched or does not match its pinned hash."""


def cache_dir() -> Path:
    """``DBTR_OPENAI_CLIP_CACHE``, else ``.cache/openai-clip`` in the checkout (an installed, non-editable
    dbtr: ``~/.cache/dbtr/openai-clip``)."""
    env = os.environ.get("DBTR_OPENAI_CLIP_CACHE")
    if env:
        return Path(env)
    root = Path(__file__).resolve().parents[2]
    base = root / ".cache" if (root / "pyproject.toml").is_file() else Path.home() / ".cache" / "dbtr"
    return base / "openai-clip"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sdist_path() -> Path:
    """The pinned sdist in the cache, downloaded with pip when absent."""
    folder = cache_dir()
    path = folder / SDIST
    if path.is_file() and _sha256(path) == SDIST_SHA256:
        return path
    folder.mkdir(parents=True, exist_ok=True)
    requirement = folder / "requirement.txt"
    requirement.write_text(f"{PACKAGE}=={VERSION} --hash=sha256:{SDIST_SHA256}\n")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--require-hashes",
        "--no-binary",
        ":all:",
        "-d",
        str(folder),
        "-r",
        str(requirement),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not path.is_file() or _sha256(path) != SDIST_SHA256:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise ReferenceUnavailable(
            f"cannot fetch the reference {PACKAGE}=={VERSION} from PyPI into {folder} (pip exit "
            f"{proc.returncode}: {' | '.join(tail)}); on a machine with PyPI access run `pip download "
            f"{PACKAGE}=={VERSION} --no-deps -d {folder}` (sha256 {SDIST_SHA256}) or set "
            f"DBTR_OPENAI_CLIP_CACHE to a folder holding {SDIST}"
        )
    return path


def reference_file(name: str) -> Path:
    """A file of the sdist's ``clip/`` (``model.py``, ...), extracted by name (no extractall) to the cache."""
    out = cache_dir() / name
    if not out.is_file():
        with tarfile.open(sdist_path()) as tar:
            member = tar.extractfile(MEMBERS[name])
            if member is None:
                raise ReferenceUnavailable(f"{SDIST} has no {MEMBERS[name]}")
            tmp = out.with_suffix(out.suffix + ".tmp")
            tmp.write_bytes(member.read())
            tmp.replace(out)
    return out


def reference_model_module() -> ModuleType:
    """OpenAI's ``clip/model.py`` as a module (``CLIP``, ``ModifiedResNet``, ``build_model``, ...)."""
    return _import_by_path("dbtr_reference_openai_clip_model", reference_file("model.py"))


def _import_by_path(name: str, path: Path) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module
    return module


def reference_tokenizer():
    """OpenAI's ``SimpleTokenizer`` on the cached vocabulary. It imports ``ftfy``: when that is not installed
    a stand-in whose ``fix_text`` returns the text unchanged is used (dbtr's tokenizer then skips it too)."""
    stub = None
    if importlib.util.find_spec("ftfy") is None:
        stub = ModuleType("ftfy")
        stub.fix_text = lambda text: text  # type: ignore[attr-defined]
        sys.modules["ftfy"] = stub
    try:
        module = _import_by_path(
            "dbtr_reference_openai_clip_tokenizer", reference_file("simple_tokenizer.py")
        )
    finally:
        if stub is not None and sys.modules.get("ftfy") is stub:
            del sys.modules["ftfy"]
    return module.SimpleTokenizer(str(bpe_vocab_path()))


def bpe_vocab_path() -> Path:
    return reference_file("bpe_simple_vocab_16e6.txt.gz")
