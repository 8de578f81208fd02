"""Mappings and channels (``/mappings``): every mapping and channel file with its validation state,
a file with its problems marked at their lines, "try" (the dry runs of `radbridge mappings try`,
engine/pipeline/dry_run.py) and editing a mapping file (role admin).

An edit is validated by the same compiler the engine uses at start (the engine's registry's
``sources`` and HL7 structure version); it is saved only when it has no error, atomically (a
temporary file in the mappings directory, fsync, rename, fsync of the directory), after the
previous version is kept as ``<mappings dir>/.history/<name>.<UTC time>.yaml``. The edit is on the
audit trail (``mapping-edit``; a refused one too, with status 422), and the engine's registry
reloads the file before the answer, so the next message uses the new version (docs/console.md).
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from aiohttp import web
from sqlalchemy import Connection, select

from engine.channels import load_channels
from engine.connectors.registry import connector_specs
from engine.errors import RadBridgeError
from engine.mappings.registry import MappingRegistry, load_mapping_file
from engine.mappings.spec import Mapping
from engine.outbound.mapping import OutboundMapping
from engine.pipeline.dry_run import (
    Tried,
    TryError,
    read_dicom,
    stored_study,
    try_inbound,
    try_outbound,
    try_rules,
)
from engine.reconciliation.rules import ReconciliationRules
from engine.storage.local import fsync_dir
from engine.store.audit import AuditAction, Subject, study_subject
from engine.store.models import Instance, Message, MessageContent
from engine.store.tokens import Role
from engine.web.audit import audited, record_failure, record_read
from engine.web.console.pages import done, render
from engine.web.keys import ENGINE, MAPPINGS, SETTINGS
from engine.web.reads import on_reader
from engine.web.roles import requires
from engine.yamlfile import ConfigProblem

routes = web.RouteTableDef()
FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,120}\.yaml")
HISTORY_DIR = ".history"
MAX_TEXT = 512 * 1024  # a mapping file larger than this is not edited in a browser
MAX_SAMPLE = 1024 * 1024


class Validity(StrEnum):
    """What validating a file found (the badge of /mappings)."""

    OK = "ok"
    WARNINGS = "warnings"
    ERROR = "error"


@dataclass
class FileState:
    """One file of the mappings or channels directory and what validating it found."""

    name: str
    kind: str  # hl7v2, fhir, reconciliation, store, channel
    problems: list[ConfigProblem] = field(default_factory=list)
    loaded: bool = True  # the running engine has it (mappings: compiled; channels: read at start)

    @property
    def errors(self) -> int:
        return sum(1 for p in self.problems if p.severity == "error")

    @property
    def state(self) -> Validity:
        return Validity.ERROR if self.errors else (Validity.WARNINGS if self.problems else Validity.OK)


class FileRefused(RadBridgeError):
    """A file name that is not a plain name of a file in the directory (or no such file)."""


def _mappings_dir(request: web.Request) -> Path:
    return Path(request.config_dict[SETTINGS].mappings_dir)


def mapping_path(directory: Path, name: str) -> Path:
    """The file ``name`` of ``directory``: a plain file name (no directory part, no ``..``, ending in
    .yaml) of a regular file that is really in that directory (not a link out of it)."""
    if not FILE_NAME.fullmatch(name) or ".." in name:
        raise FileRefused(f"{name!r} is not the plain name of a .yaml file")
    path = directory / name
    try:
        real = path.resolve(strict=True)
    except OSError:
        raise FileRefused(f"there is no file {name} in the mappings directory") from None
    if real.parent != directory.resolve() or not real.is_file():
        raise FileRefused(f"{name} is not a file of the mappings directory")
    return path


def validate(registry: MappingRegistry, path: Path, name: str) -> tuple[Any, list[ConfigProblem]]:
    """Compile ``path`` as the engine does at start (its registry's sources and HL7 version)."""
    return load_mapping_file(path, name, structure_version=registry.structure_version, sources=registry.sources)


def _kind(compiled: Any) -> str:
    if isinstance(compiled, Mapping):
        return compiled.source
    if isinstance(compiled, ReconciliationRules):
        return "reconciliation"
    if isinstance(compiled, OutboundMapping):
        return "store"
    return "—"


def file_states(registry: MappingRegistry, mappings_dir: Path, channels_dir: Path) -> tuple[list[FileState],
                                                                                              list[FileState]]:
    """Every mapping file and every channel file, validated now as at start."""
    maps: list[FileState] = []
    for path in sorted(mappings_dir.glob("*.yaml")) if mappings_dir.is_dir() else []:
        compiled, problems = validate(registry, path, path.stem)
        maps.append(FileState(path.name, _kind(compiled), problems, path.stem in registry.names()))
    _channels, problems = load_channels(channels_dir, connector_specs(), {p.name[:-5] for p in
                                                                          mappings_dir.glob("*.yaml")})
    chans = [FileState(path.name, "channel", [p for p in problems if Path(p.file).name == path.name])
             for path in (sorted(channels_dir.glob("*.yaml")) if channels_dir.is_dir() else [])]
    return maps, chans


def numbered(text: str, problems: list[ConfigProblem]) -> list[tuple[int, str, list[ConfigProblem]]]:
    """The file's lines (1-based) with the problems found at each."""
    at: dict[int, list[ConfigProblem]] = {}
    for p in problems:
        at.setdefault(p.line, []).append(p)
    return [(n, line, at.get(n, [])) for n, line in enumerate(text.split("\n"), 1)]


@routes.get("/mappings")
@requires(Role.READ)
async def mappings_list(request: web.Request) -> web.Response:
    settings = request.config_dict[SETTINGS]
    maps, chans = await asyncio.to_thread(file_states, request.config_dict[MAPPINGS], Path(settings.mappings_dir),
                                          Path(settings.channels_dir))
    return render(request, "mappings.html", {"maps": maps, "chans": chans,
                                             "channels": request.config_dict[ENGINE].channel_status()})


def _file_view(request: web.Request, name: str, *, channel: bool = False) -> dict[str, Any]:
    settings = request.config_dict[SETTINGS]
    directory = Path(settings.channels_dir if channel else settings.mappings_dir)
    try:
        path = mapping_path(directory, name)
    except FileRefused as exc:
        raise web.HTTPNotFound(text=str(exc)) from None
    text = path.read_text(encoding="utf-8", errors="replace")
    if channel:
        maps_dir = Path(settings.mappings_dir)
        _c, found = load_channels(directory, connector_specs(), {p.name[:-5] for p in maps_dir.glob("*.yaml")})
        problems = [p for p in found if Path(p.file).name == name]
    else:
        _compiled, problems = validate(request.config_dict[MAPPINGS], path, path.stem)
    return {"name": name, "text": text, "lines": numbered(text, problems), "problems": problems,
            "channel": channel, "history": [] if channel else history_of(directory, name)}


def history_of(directory: Path, name: str) -> list[str]:
    """The kept previous versions of mapping file ``name``, newest first."""
    stem = name[:-5]
    folder = directory / HISTORY_DIR
    if not folder.is_dir():
        return []
    return sorted((p.name for p in folder.glob(f"{stem}.*.yaml") if p.name[len(stem) + 1:-5].endswith("Z")),
                  reverse=True)


@routes.get(r"/mappings/try")
@requires(Role.READ)
async def try_form(request: web.Request) -> web.Response:
    return render(request, "mapping_try.html", await _try_context(request, {}))


@routes.post(r"/mappings/try")
@requires(Role.READ)
async def try_run(request: web.Request) -> web.Response:
    form = await request.post()
    given = {k: (v.strip() if k != "sample" else v) for k in ("mapping", "sample", "message", "study")
             if isinstance(v := form.get(k), str)}
    context = await _try_context(request, given)
    try:
        context["tried"] = await _try(request, given, context)
    except TryError as exc:
        context["failure"] = str(exc)
    return render(request, "mapping_try.html", context, status=200)


async def _try_context(request: web.Request, given: dict[str, str]) -> dict[str, Any]:
    directory = _mappings_dir(request)
    names = sorted(p.stem for p in directory.glob("*.yaml")) if directory.is_dir() else []
    return {"names": names, "given": given, "tried": None, "failure": None, "problems": [], "about": None}


async def _try(request: web.Request, given: dict[str, str], context: dict[str, Any]) -> Tried:
    """The dry run the form asks for: the mapping file as it is on disk (as `radbridge mappings try`
    compiles it) on the pasted sample, a stored message or a stored study."""
    registry = request.config_dict[MAPPINGS]
    name = given.get("mapping", "")
    try:
        path = mapping_path(_mappings_dir(request), f"{name}.yaml")
    except FileRefused as exc:
        raise TryError(str(exc)) from None
    compiled, problems = await asyncio.to_thread(validate, registry, path, name)
    context["problems"] = problems
    if compiled is None:
        raise TryError(f"{name}.yaml has errors: fix them first")
    if isinstance(compiled, ReconciliationRules | OutboundMapping):
        ref = given.get("study", "")
        if not ref:
            raise TryError(f"{name} is tried on a stored study: give its Study Instance UID, accession or id")
        context["about"] = f"study {ref}"
        # a read of patient data (the study's headers, its order and patient): audited like the API's
        seen = await on_reader(request, lambda conn: _study_seen(conn, ref))
        await record_read(request, "read", "Study", 200 if seen else 404,
                          [{"study_uid": seen.study_uid}] if seen else [], seen.patient_ids if seen else [],
                          study_uid=seen.study_uid if seen else None)
        return await on_reader(request, lambda conn: _try_on_study(request, compiled, conn, ref))
    if given.get("message"):
        mid = given["message"]
        if not mid.isdigit():
            raise TryError("a stored message is named by its number")
        found = await on_reader(request, lambda conn: conn.execute(
            select(MessageContent.raw, Message.patient_id).join(Message, Message.id == MessageContent.message_id)
            .where(MessageContent.message_id == int(mid))).first())
        await record_read(request, "read", "Message", 200 if found else 404, [{"id": int(mid)}] if found else [],
                          [found.patient_id] if found is not None and found.patient_id else [], message_id=int(mid))
        if found is None:
            raise TryError(f"no stored content for message {mid}")
        context["about"] = f"message {mid}"
        return try_inbound(compiled, bytes(found.raw))
    sample = given.get("sample", "")
    if not sample.strip():
        raise TryError("paste a sample, or give a stored message's number")
    if len(sample) > MAX_SAMPLE:
        raise TryError(f"the sample is larger than {MAX_SAMPLE} characters")
    context["about"] = "the pasted sample"
    return try_inbound(compiled, sample.encode("utf-8"))


def _study_seen(conn: Connection, ref: str) -> Subject | None:
    """The stored study ``ref`` names, as the audit trail records it (its UID and patients)."""
    found = stored_study(conn, ref)
    return study_subject(conn, found[0]) if found is not None else None


def _try_on_study(request: web.Request, compiled: Any, conn: Connection, ref: str) -> Tried:
    storage = request.config_dict[ENGINE].storage
    if isinstance(compiled, OutboundMapping):
        return try_outbound(compiled, conn, ref, storage, request.config_dict[SETTINGS])
    found = stored_study(conn, ref)
    if found is None:
        raise TryError("no stored study with that Study Instance UID, accession or id")
    key = conn.execute(select(Instance.storage_key).where(Instance.study_id == found[0]).order_by(Instance.id)
                       .limit(1)).scalar()
    if key is None or storage is None:
        raise TryError(f"study {found[1]} has no stored instance to read the headers of")
    with storage.open(key) as f:
        return try_rules(compiled, read_dicom(f), conn)


@routes.get(r"/mappings/channels/{name}")
@requires(Role.READ)
async def channel_file(request: web.Request) -> web.Response:
    view = await asyncio.to_thread(_file_view, request, request.match_info["name"], channel=True)
    return render(request, "mapping_file.html", view)


@routes.get(r"/mappings/{name}")
@requires(Role.READ)
async def mapping_file(request: web.Request) -> web.Response:
    view = await asyncio.to_thread(_file_view, request, request.match_info["name"])
    return render(request, "mapping_file.html", view)


@routes.get(r"/mappings/{name}/edit")
@requires(Role.ADMIN)
async def edit_form(request: web.Request) -> web.Response:
    view = await asyncio.to_thread(_file_view, request, request.match_info["name"])
    return render(request, "mapping_edit.html", {**view, "refused": False})


def write_atomically(path: Path, data: bytes) -> None:
    """``data`` as ``path``: a temporary file beside it, fsync, rename over it, fsync of the directory."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def check_candidate(registry: MappingRegistry, path: Path, text: str) -> list[ConfigProblem]:
    """Validate ``text`` as the new ``path`` (a temporary file the registry does not load: not *.yaml),
    reported under the file's own name."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.check")
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
        _compiled, problems = validate(registry, tmp, path.stem)
    finally:
        tmp.unlink(missing_ok=True)
    return [ConfigProblem(path.name, p.line, p.field, p.message, p.severity) for p in problems]


def save_with_history(path: Path, text: str, now: datetime | None = None) -> str:
    """Keep the current ``path`` under .history/ and put ``text`` in its place; the kept file's name."""
    history = path.parent / HISTORY_DIR
    history.mkdir(exist_ok=True)
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%S.%fZ")
    kept = history / f"{path.stem}.{stamp}.yaml"
    write_atomically(kept, path.read_bytes())
    write_atomically(path, text.encode("utf-8"))
    return kept.name


@routes.post(r"/mappings/{name}")
@requires(Role.ADMIN)
async def mapping_save(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    subject = Subject("Mapping", count=1, detail=name[:200])
    try:
        path = mapping_path(_mappings_dir(request), name)
    except FileRefused as exc:
        await record_failure(request, AuditAction.MAPPING_EDIT, subject, 404)
        raise web.HTTPNotFound(text=str(exc)) from None
    form = await request.post()
    raw = form.get("text")
    text = raw.replace("\r\n", "\n") if isinstance(raw, str) else ""
    registry = request.config_dict[MAPPINGS]
    problems = ([ConfigProblem(name, 0, "", f"the text is larger than {MAX_TEXT} characters")]
                if len(text) > MAX_TEXT else await asyncio.to_thread(check_candidate, registry, path, text))
    if any(p.severity == "error" for p in problems):
        subject.detail = f"{name}: refused ({sum(p.severity == 'error' for p in problems)} error(s)); file unchanged"
        await record_failure(request, AuditAction.MAPPING_EDIT, subject, 422)
        return render(request, "mapping_edit.html", {
            "name": name, "text": text, "lines": numbered(text, problems), "problems": problems, "channel": False,
            "history": history_of(path.parent, name), "refused": True}, status=422)
    kept = await asyncio.to_thread(save_with_history, path, text)
    subject.detail = f"{name} saved; previous version {HISTORY_DIR}/{kept}"
    await audited(request, AuditAction.MAPPING_EDIT, lambda conn: None, lambda conn, _: subject)
    # Reloaded here or, a moment before, by the engine's watcher: the registry's lock makes this
    # return after either, so the next message is mapped with the new version.
    await request.config_dict[ENGINE].reload_mappings()
    warn = f" with {len(problems)} warning(s)" if problems else ""
    raise done(request, f"/mappings/{name}", f"Saved {name}{warn}: in use now; previous version kept as "
                                             f"{HISTORY_DIR}/{kept}.")
