"""Every load path of the package refuses pickled code: each ``torch.load`` passes ``weights_only=True``
(or goes through :func:`dbtr.system.checkpoint.read_checkpoint`), each ``np.load`` leaves ``allow_pickle``
off, and nothing calls ``pickle.load``. Checked on the source, so a new load path cannot slip in unguarded."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "dbtr"


def _calls(tree: ast.AST, owner: str, name: str):
    for node in ast.walk(tree):
        func = getattr(node, "func", None)
        if isinstance(node, ast.Call) and isinstance(func, ast.Attribute) and func.attr == name:
            if isinstance(func.value, ast.Name) and func.value.id == owner:
                yield node


def _keyword(call: ast.Call, name: str):
    kw = next((k for k in call.keywords if k.arg == name), None)
    return None if kw is None else getattr(kw.value, "value", "<expr>")


def unsafe_loads(files) -> list[str]:
    bad = []
    for path in files:
        tree = ast.parse(path.read_text(), str(path))
        for call in _calls(tree, "torch", "load"):
            if _keyword(call, "weights_only") is not True:
                bad.append(f"{path.name}:{call.lineno}: torch.load without weights_only=True")
        for call in _calls(tree, "np", "load"):
            if _keyword(call, "allow_pickle") not in (None, False):
                bad.append(f"{path.name}:{call.lineno}: np.load with allow_pickle")
        bad += [
            f"{path.name}:{c.lineno}: pickle.{n}"
            for n in ("load", "loads")
            for c in _calls(tree, "pickle", n)
        ]
    return bad


def test_every_load_in_the_package_is_weights_only():
    files = sorted(ROOT.rglob("*.py"))
    assert len(files) > 40
    assert unsafe_loads(files) == []


def test_the_check_finds_an_unguarded_load(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import torch, numpy as np, pickle\n"
        "a = torch.load('x')\nb = torch.load('x', weights_only=False)\nc = np.load('y', allow_pickle=True)\n"
        "d = pickle.load(open('z', 'rb'))\nok = torch.load('x', weights_only=True)\n"
    )
    assert unsafe_loads([bad]) == [
        "bad.py:2: torch.load without weights_only=True",
        "bad.py:3: torch.load without weights_only=True",
        "bad.py:4: np.load with allow_pickle",
        "bad.py:5: pickle.load",
    ]
