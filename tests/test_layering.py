"""The layering of the code base, checked on every module's imports (including those inside functions).

- no service imports another: the event schemas in shared/contract are the only contract between them;
- shared/ imports nothing of services/ or dicomflow/;
- the contract imports neither the bus nor storage (nor NATS), storage nothing of NATS, dicom neither.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import REPO

SERVICES = ("services.ingest", "services.router", "services.store", "services.autoscaler")


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) of every import statement in ``path``; relative imports made absolute."""
    rel = path.relative_to(REPO).with_suffix("")
    package = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.append((node.lineno, module))
            out += [(node.lineno, f"{module}.{a.name}") for a in node.names]
    return out


def _rules(module: str) -> list[tuple[str, tuple[str, ...]]]:
    """(why, forbidden prefixes) that apply to ``module``."""
    rules = []
    for svc in SERVICES:
        if module == svc or module.startswith(svc + "."):
            rules.append(("a service imports another service", tuple(s for s in SERVICES if s != svc)))
    if module.startswith("shared"):
        rules.append(("shared/ imports a service or the CLI", ("services", "dicomflow")))
    if module.startswith("shared.contract"):
        rules.append(("the contract imports the bus, storage or NATS", ("shared.bus", "shared.storage", "nats")))
    if module.startswith("shared.storage"):
        rules.append(("storage imports NATS", ("shared.bus", "nats")))
    if module.startswith("shared.dicom"):
        rules.append(("shared/dicom imports the bus or storage", ("shared.bus", "shared.storage", "nats")))
    return rules


def _matches(imported: str, prefix: str) -> bool:
    return imported == prefix or imported.startswith(prefix + ".")


def test_layers_import_only_what_they_may():
    violations = []
    for top in ("shared", "services", "dicomflow"):
        for path in sorted((REPO / top).rglob("*.py")):
            rel = path.relative_to(REPO).with_suffix("")
            module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
            for why, forbidden in _rules(module):
                for line, imported in _imports(path):
                    if any(_matches(imported, f) for f in forbidden):
                        violations.append(f"{path.relative_to(REPO)}:{line}: {why} ({imported})")
    assert not violations, "\n".join(sorted(set(violations)))


def test_the_check_sees_a_violation():
    # The rules applied to a made-up module: a store module importing the router is refused.
    assert any(_matches("services.router.rules", f) for why, fs in _rules("services.store.storing") for f in fs)
    assert not any(_matches("shared.contract.events", f) for why, fs in _rules("services.store.storing") for f in fs)
    assert any(_matches("nats.aio.client", f) for _, fs in _rules("shared.storage.fs_store") for f in fs)
