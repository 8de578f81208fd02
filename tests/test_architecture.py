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


# The one reviewed exception: pynetdicom keeps a C-STORE's temporary file only in private
# attributes, and a transfer cut off (or refused for space) must delete it. Confined to one module,
# and tests/test_dicom_store.py fails if pynetdicom changes them.
LIBRARY_INTERNALS_ALLOWED = {"engine/connectors/dicom/spool.py": {"_data_set_file", "_dataset_file"}}


def test_no_code_reads_a_private_attribute_of_another_object_or_library() -> None:
    found = []
    for line in private_attributes_of_others(ENGINE):
        where, expr = line.split(": ", 1)
        if expr.rsplit(".", 1)[-1] not in LIBRARY_INTERNALS_ALLOWED.get(where.split(":")[0], set()):
            found.append(line)
    assert found == []


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
    import importlib.util
    imported = engine_names_imported_by(BENCH)
    assert imported  # the scan sees the benchmarks' imports
    private = [f"{where}: {module}.{name}" for where, module, name in imported if name.startswith("_")]
    missing = [f"{where}: {module}.{name}" for where, module, name in imported
               if not hasattr(importlib.import_module(module), name)
               and importlib.util.find_spec(f"{module}.{name}") is None]
    assert private == [] and missing == []


# --- the HTTP layer: typed AppKeys and module-level route tables (docs/architecture.md) ----------------------
WEB = ENGINE / "web"
ROUTER_METHODS = {"add_get", "add_post", "add_put", "add_patch", "add_delete", "add_head", "add_route", "add_view"}
# the only functions of engine/web handed the engine: build_app gives it to provide, which sets the keys
TAKES_ENGINE = {"engine.web.app.build_app", "engine.web.keys.provide"}


def web_modules(web: Path) -> list[tuple[Path, str, ast.Module]]:
    """(path, dotted name, syntax tree) of each module under ``web`` (a package named engine.web)."""
    out = []
    for path in sorted(web.rglob("*.py")):
        rel = path.relative_to(web.parent.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        out.append((path, name, ast.parse(path.read_text(), str(path))))
    return out


def imported_modules(module: str, is_package: bool, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The absolute names an import statement reaches (``from engine import runtime`` reaches engine.runtime)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        parts = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
        base = ".".join([*parts, *([node.module] if node.module else [])])
    return [base, *(f"{base}.{a.name}" for a in node.names)]


def web_imports_of_runtime(web: Path) -> list[str]:
    """Imports of engine.runtime in engine/web, those under ``if TYPE_CHECKING:`` included."""
    found = []
    for path, module, tree in web_modules(web):
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = imported_modules(module, path.name == "__init__.py", node)
                if any(n == "engine.runtime" or n.startswith("engine.runtime.") for n in names):
                    found.append(f"{module}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_the_http_layer_does_not_import_the_runtime() -> None:
    """engine/web knows the engine only through the protocols of engine/web/keys.py."""
    assert web_imports_of_runtime(WEB) == []


def test_the_runtime_check_sees_an_import_under_type_checking(tmp_path: Path) -> None:
    web = tmp_path / "engine" / "web"
    web.mkdir(parents=True)
    (web / "__init__.py").write_text("")
    (web / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from engine.runtime import Engine\n")
    (web / "b.py").write_text("from .. import runtime\n")
    (web / "c.py").write_text("import engine.runtime as rt\n")
    (web / "d.py").write_text("from engine.web.keys import ENGINE\nfrom engine import config\n")  # allowed
    assert [line.split(": ", 1)[0] for line in web_imports_of_runtime(web)] == [
        "engine.web.a:3", "engine.web.b:1", "engine.web.c:1"]


def _route_tables(tree: ast.Module) -> set[str]:
    """Module-level names bound to ``web.RouteTableDef()``."""
    return {t.id for node in tree.body if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
            and ast.unparse(node.value.func) in ("web.RouteTableDef", "RouteTableDef")
            for t in node.targets if isinstance(t, ast.Name)}


def _is_handler(fn: ast.AST) -> bool:
    """``async def name(request: web.Request) -> web.Response`` (or StreamResponse): a request handler,
    as opposed to a helper that takes the request and returns something else, or a middleware."""
    if not isinstance(fn, ast.AsyncFunctionDef) or fn.returns is None:
        return False
    params = fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs
    return (len(params) == 1 and params[0].annotation is not None
            and ast.unparse(params[0].annotation).split(".")[-1] == "Request"
            and ast.unparse(fn.returns).split(".")[-1] in ("Response", "StreamResponse"))


def routes_outside_route_tables(web: Path) -> list[str]:
    """Routes added with ``app.router.add_*`` and handlers that are not top-level functions registered
    on their module's ``web.RouteTableDef``."""
    found = []
    for _path, module, tree in web_modules(web):
        tables = _route_tables(tree)
        top_level = set(tree.body)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ROUTER_METHODS:
                found.append(f"{module}:{node.lineno}: {ast.unparse(node.func)}(...)")
            if not _is_handler(node):
                continue
            assert isinstance(node, ast.AsyncFunctionDef)
            registered = [d for d in node.decorator_list if isinstance(d, ast.Call)
                          and isinstance(d.func, ast.Attribute) and isinstance(d.func.value, ast.Name)
                          and d.func.value.id in tables]
            if node not in top_level:
                found.append(f"{module}:{node.lineno}: handler {node.name} is nested in a function")
            elif not registered:
                found.append(f"{module}:{node.lineno}: handler {node.name} is not on a module-level RouteTableDef")
    return found


def test_every_http_route_is_declared_on_a_module_level_route_table() -> None:
    assert routes_outside_route_tables(WEB) == []


def test_the_route_table_check_sees_closures_and_router_calls(tmp_path: Path) -> None:
    web = tmp_path / "engine" / "web"
    web.mkdir(parents=True)
    (web / "old.py").write_text(
        "from aiohttp import web\n"
        "def api_app(engine) -> web.Application:\n"
        "    app = web.Application()\n"
        "    async def channels(request: web.Request) -> web.Response:\n"
        "        return web.json_response(engine.channel_status())\n"
        "    app.router.add_get('/channels', channels)\n"
        "    return app\n")
    (web / "new.py").write_text(
        "from aiohttp import web\n"
        "routes = web.RouteTableDef()\n"
        "async def body(request: web.Request) -> bytes:\n"  # a helper, not a handler
        "    return await request.read()\n"
        "@routes.get('/channels')\n"
        "async def channels(request: web.Request) -> web.Response:\n"
        "    return web.json_response({})\n"
        "async def forgotten(request: web.Request) -> web.Response:\n"
        "    return web.json_response({})\n")
    assert [line.split(": ", 1)[1] for line in routes_outside_route_tables(web)] == [
        "handler forgotten is not on a module-level RouteTableDef",
        "handler channels is nested in a function",
        "app.router.add_get(...)",
    ]


def _parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    return {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}


def handlers_given_the_engine(web: Path) -> list[str]:
    """Where engine/web holds on to the engine rather than reading the services from the app's keys:
    a function that takes it (``engine`` or an ``Engine``/``EngineServices`` parameter) other than
    build_app and provide; build_app doing anything with it but hand it to provide; and any nested
    function or lambda that reads a variable named ``engine`` (a closure over it)."""
    found = []
    functions = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
    for _path, module, tree in web_modules(web):
        parents = _parents(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                a = node.args
                takes = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs
                         if p.arg == "engine" or (p.annotation is not None and ast.unparse(p.annotation).strip("'\"")
                                                  .split(".")[-1] in ("Engine", "EngineServices"))]
                if takes and f"{module}.{node.name}" not in TAKES_ENGINE:
                    found.append(f"{module}:{node.lineno}: {node.name} takes the engine ({', '.join(takes)})")
            if not (isinstance(node, ast.Name) and node.id == "engine" and isinstance(node.ctx, ast.Load)):
                continue
            enclosing, up = [], parents.get(node)
            while up is not None:
                if isinstance(up, functions):
                    enclosing.append(up)
                up = parents.get(up)
            if len(enclosing) > 1:
                found.append(f"{module}:{node.lineno}: a nested function reads engine")
            elif enclosing and f"{module}.{getattr(enclosing[0], 'name', '')}" == "engine.web.app.build_app":
                call = parents[node]
                if not (isinstance(call, ast.Call) and ast.unparse(call.func) == "provide" and node in call.args):
                    found.append(f"{module}:{node.lineno}: build_app uses engine for more than provide(app, engine)")
    return found


def test_handlers_read_app_keys_instead_of_closing_over_the_engine() -> None:
    """Only build_app is handed the engine, and only to put its services on the app (keys.provide);
    api_app, fhir_app and the handlers take nothing of it and read request.app / config_dict."""
    assert handlers_given_the_engine(WEB) == []


def test_the_engine_check_sees_a_closure_and_an_engine_parameter(tmp_path: Path) -> None:
    web = tmp_path / "engine" / "web"
    web.mkdir(parents=True)
    (web / "app.py").write_text(
        "def build_app(engine):\n"
        "    app = make()\n"
        "    provide(app, engine)\n"  # allowed
        "    app['writer'] = engine.writer\n"
        "    app.on_startup.append(lambda _a: engine.start())\n"
        "    return app\n")
    (web / "api.py").write_text(
        "from aiohttp import web\n"
        "def api_app(engine: 'Engine') -> web.Application:\n"
        "    async def channels(request: web.Request) -> web.Response:\n"
        "        return web.json_response(engine.channel_status())\n"
        "    return web.Application()\n"
        "async def record(ctl: 'EngineServices', request: web.Request) -> None: ...\n")
    assert sorted(line.split(": ", 1)[1] for line in handlers_given_the_engine(web)) == [
        "a nested function reads engine",
        "a nested function reads engine",
        "api_app takes the engine (engine)",
        "build_app uses engine for more than provide(app, engine)",
        "record takes the engine (ctl)",
    ]
