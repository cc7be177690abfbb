"""Private APIs of Lightning, jsonargparse and torch: where the package still uses one (there is no public
way), a test here fails as soon as an upgrade changes it; and no other private name creeps in."""

from __future__ import annotations

import ast
import importlib
import inspect

import pytest
import torch
from lightning.pytorch.cli import LightningCLI

from nst_lightning.cli.fit import StyleTransferCLI
from nst_lightning.run.runtime import bf16_is_native_on_cpu
from tests.conftest import REPO

# Each private name the package uses, and why (the comment at the use says the same).
ALLOWED = {
    # LightningCLI would overwrite the run's model settings with a checkpoint's, silently: no public switch.
    "_parse_ckpt_path",
    # oneDNN's own test of native bfloat16: no public query.
    "_is_mkldnn_bf16_supported",
}


# Lightning before 2.6 has no _parse_ckpt_path: it does not adopt a checkpoint's settings, so there is
# nothing to turn off (the dependency floors run on such a version).
HAS_PARSE_CKPT_PATH = "_parse_ckpt_path" in vars(LightningCLI)


@pytest.mark.skipif(not HAS_PARSE_CKPT_PATH, reason="Lightning < 2.6: no checkpoint settings adopted")
def test_lightning_cli_still_calls_parse_ckpt_path_between_parsing_and_instantiation(monkeypatch):
    monkeypatch.setattr("sys.argv", ["cli.py"])
    # StyleTransferCLI overrides it with nothing: if LightningCLI renames it or stops calling it there,
    # its own version (which adopts a checkpoint's model settings) would run instead, or ours never.
    assert "_parse_ckpt_path" in vars(LightningCLI)
    calls = []

    class Stop(Exception):
        pass

    class Recording(StyleTransferCLI):
        def parse_arguments(self, parser, args):
            super().parse_arguments(parser, args)
            calls.append("parse_arguments")

        def _parse_ckpt_path(self):
            calls.append("_parse_ckpt_path")

        def before_instantiate_classes(self):
            calls.append("before_instantiate_classes")
            raise Stop

    with pytest.raises(Stop):
        Recording(args=["fit", "--data.content", "c.png", "--data.style", "s.png"])
    assert calls == ["parse_arguments", "_parse_ckpt_path", "before_instantiate_classes"]


def test_the_bf16_query_still_exists():
    assert callable(torch.ops.mkldnn._is_mkldnn_bf16_supported)
    assert isinstance(torch.ops.mkldnn._is_mkldnn_bf16_supported(), bool)
    assert bf16_is_native_on_cpu() == torch.ops.mkldnn._is_mkldnn_bf16_supported()


# The top-level modules of the optional extras (pyproject.toml: web, video), which serve/ and video/ import.
EXTRAS = {"fastapi", "starlette", "uvicorn", "multipart", "python_multipart", "av", "cv2", "numpy"}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _foreign_private_names(path) -> set[str]:
    """Private names the file takes from objects that are not its own: ``x._y`` where ``x`` is not ``self``
    (or ``cls``), ``self._y`` where no code of the class sets or defines ``_y``, and a method ``_y`` that
    overrides one of a base class from another package."""
    tree = ast.parse(path.read_text())
    try:
        module = importlib.import_module(".".join(path.relative_to(REPO).with_suffix("").parts))
    except ModuleNotFoundError as err:  # serve/ or video/ where its extra is not installed (CI's floors venv)
        if (err.name or "").split(".")[0] not in EXTRAS:
            raise
        module = None  # its own names are still read from its source; its base classes cannot be (hasattr: False)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                found.add(node.attr)
    for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
        own = {f.name for f in cls.body if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))}
        for node in ast.walk(cls):
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            own |= {t.attr for t in targets if isinstance(t, ast.Attribute) and _private(t.attr)}
        own |= {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
        uses = {
            n.attr
            for n in ast.walk(cls)
            if isinstance(n, ast.Attribute)
            and isinstance(n.value, ast.Name)
            and n.value.id == "self"
            and _private(n.attr)
        }
        found |= uses - own
        # A class defined inside a function is not an attribute of the module: its bases go unchecked.
        mro = inspect.getmro(getattr(module, cls.name)) if hasattr(module, cls.name) else (object,)
        bases = [b for b in mro[1:] if not b.__module__.startswith("nst_")]
        found |= {name for name in own if _private(name) and any(name in vars(b) for b in bases)}
    return found


def test_no_other_private_name_is_used():
    files = sorted((REPO / "nst_lightning").rglob("*.py"))
    used = {str(path.relative_to(REPO)): _foreign_private_names(path) for path in files}
    unexpected = {name: names - ALLOWED for name, names in used.items() if names - ALLOWED}
    assert not unexpected, f"private names of other packages: {unexpected} (add a public way, or a pin here)"
    expected = ALLOWED if HAS_PARSE_CKPT_PATH else ALLOWED - {"_parse_ckpt_path"}
    assert set().union(*used.values()) == expected, "an allowed private name is no longer used: drop it from ALLOWED"
