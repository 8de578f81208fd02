"""The layer rules that import-linter cannot express: no private name crosses a package boundary.

(The layers themselves and the absence of package cycles are import-linter contracts in
.importlinter, run by .ci/run.)"""

from __future__ import annotations

import ast
from pathlib import Path

ENGINE = Path(__file__).resolve().parents[1] / "engine"


def package_of(module: str) -> str:
    """engine.a.b.c -> engine.a; a module directly under engine is its own package."""
    return ".".join(module.split(".")[:2])


def private_imports_across_packages(root: Path) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.ImportFrom) or not node.module or not node.module.startswith("engine"):
                continue
            if package_of(node.module) == package_of(module) and node.module != "engine":
                continue
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.endswith("__"):  # __version__ is public
                    found.append(f"{path}:{node.lineno}: {module} imports {node.module}.{alias.name}")
    return found


def test_no_private_name_is_imported_across_packages() -> None:
    assert private_imports_across_packages(ENGINE) == []


def test_the_check_sees_a_private_import(tmp_path: Path) -> None:
    pkg = tmp_path / "engine"
    (pkg / "a").mkdir(parents=True)
    (pkg / "b").mkdir()
    (pkg / "a" / "x.py").write_text("def _hidden() -> None: ...\n")
    (pkg / "b" / "y.py").write_text("from engine.a.x import _hidden\n")
    (pkg / "a" / "z.py").write_text("from engine.a.x import _hidden\n")  # same package: allowed
    assert [line.split(": ", 1)[1] for line in private_imports_across_packages(pkg)] == [
        "engine.b.y imports engine.a.x._hidden"]


def private_attributes_of_others(root: Path) -> list[str]:
    """``x._name`` where x is not self/cls: a private attribute of another object or module, such as
    a library's internals (SQLAlchemy's ``compiled._bind_processors``), which a new release of that
    library may change silently. Comparing with another instance of the same class is allowed."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Attribute) or not node.attr.startswith("_") or node.attr.startswith("__"):
                continue
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls", "other"):
                continue
            found.append(f"{path.relative_to(root.parent)}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_code_reads_a_private_attribute_of_another_object_or_library() -> None:
    assert private_attributes_of_others(ENGINE) == []


def test_the_check_sees_a_library_internal(tmp_path: Path) -> None:
    pkg = tmp_path / "engine"
    pkg.mkdir()
    (pkg / "x.py").write_text("def f(compiled, self):\n    return compiled._bind_processors, self._mine\n")
    assert [line.split(": ", 1)[1] for line in private_attributes_of_others(pkg)] == ["compiled._bind_processors"]


def test_every_error_the_engine_raises_on_purpose_derives_from_radbridgeerror() -> None:
    """One hierarchy: the error classes defined under engine/ (not private helpers) are RadBridgeErrors,
    and the ERR and mapping records that used to be plain dataclasses are exceptions too."""
    import importlib
    import inspect

    from engine.errors import RadBridgeError
    from engine.hl7.errors import HL7Error
    from engine.mappings.spec import MappingError

    outside = []
    for path in sorted(ENGINE.rglob("*.py")):
        if "migrations" in path.parts or path.name == "__main__.py":
            continue
        rel = path.relative_to(ENGINE.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        module = importlib.import_module(name)
        for cls_name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != name or cls_name.startswith("_"):
                continue
            if issubclass(cls, Exception) and not issubclass(cls, RadBridgeError):
                outside.append(f"{name}.{cls_name}")
    assert outside == []
    err = HL7Error(102, "bad date", "PID", field=7)
    assert isinstance(err, RadBridgeError) and err == HL7Error(102, "bad date", "PID", field=7)
    assert str(err) == "102 Data type error at PID-7: bad date"
    assert isinstance(MappingError("patient.birth_date", "PID-7", "not a date"), RadBridgeError)


BENCH = ENGINE.parent / "bench"


def engine_names_imported_by(root: Path) -> list[tuple[str, str, str]]:
    """(file:line, module, name) for every ``from engine... import name`` in the scripts under root,
    including imports inside functions, which only run when a benchmark reaches them."""
    found = []
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "engine":
                found += [(f"{path.name}:{node.lineno}", node.module, alias.name) for alias in node.names]
    return found


def test_the_benchmarks_import_only_public_names_the_engine_has() -> None:
    """bench/ is not run by the tests: a renamed engine function would break a benchmark unseen."""
    import importlib
    imported = engine_names_imported_by(BENCH)
    assert imported  # the scan sees the benchmarks' imports
    private = [f"{where}: {module}.{name}" for where, module, name in imported if name.startswith("_")]
    missing = [f"{where}: {module}.{name}" for where, module, name in imported
               if not hasattr(importlib.import_module(module), name)
               and importlib.util.find_spec(f"{module}.{name}") is None]
    assert private == [] and missing == []
