"""Every ``from cotune... import name`` in the package names something that exists, including
the imports inside functions (cotune imports lazily to keep start-up cheap, so a moved or
renamed name would otherwise fail only when that code path first runs)."""

import ast
import importlib
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "cotune"


def cotune_imports() -> list[tuple[str, int, str, str]]:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.ImportFrom)
                and node.level == 0
                and (node.module == "cotune" or (node.module or "").startswith("cotune."))
            ):
                where = str(path.relative_to(SRC.parent))
                found += [(where, node.lineno, node.module, a.name) for a in node.names]
    return found


def test_every_name_imported_from_cotune_exists():
    imports = cotune_imports()
    assert len(imports) > 500
    missing = []
    for where, line, module, name in imports:
        mod = importlib.import_module(module)
        if name != "*" and not hasattr(mod, name):
            try:  # a submodule: from cotune.paradigms import splitting
                importlib.import_module(f"{module}.{name}")
            except ModuleNotFoundError:
                missing.append(f"{where}:{line}: from {module} import {name}")
    assert not missing, "\n".join(missing)


def test_the_device_forkserver_preloads_modules_that_exist():
    """``cotune launch`` forks devices from a process that imported these first; a name that
    fails to import is skipped there without a word, so a renamed module must fail here."""
    from cotune.deploy.procs import PRELOAD

    for name in PRELOAD:
        if name.startswith("cotune"):
            importlib.import_module(name)
