"""Files into documents: ``scopegate ingest S PATH`` for a directory or files.

Text comes from ``.txt`` and ``.md`` (UTF-8), ``.html``/``.htm`` (the visible text:
scripts, styles and markup dropped) and ``.pdf`` (pypdf, page by page). Under a
directory, a file's folder is its directory (``eng/runbooks/db.md`` lands in folder
``eng__runbooks``, the separator of :mod:`connectors.mapping`) and its document id is
its relative path made into an id (``eng__runbooks__db.md``). Directories nest as
folders do in a fronted collection: ``eng__runbooks`` gets ``eng`` as its parent folder
(and ``eng`` the source), so a grant or a task on ``folder:eng`` covers the runbooks.

ACLs come from a mapping file, ``scopegate-acl.json`` at the root unless named:
``{"rules": [{"glob": "eng/**", "viewers": ["group:eng#member"], "agents": [...]}]}``.
Every rule whose glob matches a file's relative path adds its principals; a file no
rule matches gets no grant of its own (only what the source grants).

A file that cannot be read or yields no text is reported with the reason and left
out of the request: it is never half-ingested. Unchanged files are skipped by the
ingestion's fingerprints (text, metadata, ACL and folder).
"""

from __future__ import annotations

import fnmatch
import html.parser
import json
import re
import warnings
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from connectors.mapping import FOLDER_SEPARATOR
from gateway.errors import InvalidRequest, ScopegateError
from gateway.ids import validate_id

SUFFIXES = frozenset({".txt", ".md", ".html", ".htm", ".pdf"})
ACL_FILE = "scopegate-acl.json"
LINKS_PER_CALL = 500  # the most relationship changes one call may carry
MAX_FILE_BYTES = 50 * 1024 * 1024
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True, slots=True)
class AclRule:
    glob: str
    viewers: tuple[str, ...] = ()
    agents: tuple[str, ...] = ()


@dataclass(slots=True)
class Collected:
    """Documents ready for ingestion and the files that could not become one."""

    documents: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)
    paths: dict[str, str] = field(default_factory=dict)  # document id -> relative path


def is_file_input(path: Path) -> bool:
    """Whether ``scopegate ingest`` should read ``path`` as files, not JSON Lines."""
    return path.is_dir() or path.suffix.lower() in SUFFIXES


def load_rules(path: Path | None) -> list[AclRule]:
    """The rules of an ACL mapping file (none when there is no file)."""
    if path is None or not path.exists():
        return []
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequest(f"{path}: not a readable JSON ACL mapping ({exc})") from exc
    rules = raw.get("rules") if isinstance(raw, dict) else None
    if not isinstance(rules, list):
        raise InvalidRequest(f'{path}: expected {{"rules": [...]}}')
    found = []
    for number, rule in enumerate(rules, 1):
        if not isinstance(rule, dict) or not isinstance(rule.get("glob"), str):
            raise InvalidRequest(f"{path}: rule {number} needs a glob")
        found.append(
            AclRule(
                rule["glob"],
                tuple(_strings(rule.get("viewers"), path, number)),
                tuple(_strings(rule.get("agents"), path, number)),
            )
        )
    return found


def _strings(value: object, path: Path, number: int) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidRequest(f"{path}: rule {number}: viewers and agents are lists of refs")
    return list(value)


def acl_for(relative: str, rules: Sequence[AclRule]) -> dict[str, list[str]]:
    viewers: set[str] = set()
    agents: set[str] = set()
    for rule in rules:
        if fnmatch.fnmatchcase(relative, rule.glob):
            viewers.update(rule.viewers)
            agents.update(rule.agents)
    return {"viewers": sorted(viewers), "agents": sorted(agents)}


def files_under(root: Path) -> Iterator[Path]:
    """The ingestible files of ``root`` (itself when it is a file), in a stable order."""
    if root.is_file():
        yield root
        return
    for path in sorted(root.rglob("*")):
        if _ingestible(path, root):
            yield path


def _ingestible(path: Path, root: Path) -> bool:
    hidden = any(part.startswith(".") for part in path.relative_to(root).parts)
    return not hidden and path.is_file() and path.suffix.lower() in SUFFIXES


def collect(root: Path, acl_file: Path | None = None) -> Collected:
    """Read every file under ``root`` into an ingestion document (or a failure)."""
    if not root.exists():
        raise InvalidRequest(f"{root}: no such file or directory")
    base = root if root.is_dir() else root.parent
    rules = load_rules(acl_file if acl_file is not None else base / ACL_FILE)
    found = Collected()
    for path in files_under(root):
        relative = path.relative_to(base).as_posix()
        try:
            document = _document(path, relative, rules)
        except (InvalidRequest, OSError, ValueError) as exc:
            reason = exc.message if isinstance(exc, InvalidRequest) else str(exc)
            found.failed.append({"path": relative, "reason": reason[:300]})
            continue
        if document["id"] in found.paths:
            found.failed.append(
                {"path": relative, "reason": f"same id as {found.paths[document['id']]}"}
            )
            continue
        found.paths[document["id"]] = relative
        found.documents.append(document)
    return found


def _document(path: Path, relative: str, rules: Sequence[AclRule]) -> dict[str, Any]:
    if path.stat().st_size > MAX_FILE_BYTES:
        raise InvalidRequest(f"larger than {MAX_FILE_BYTES} bytes")
    text = extract_text(path).strip()
    if not text:
        raise InvalidRequest("no text found")
    parts = relative.split("/")
    document: dict[str, Any] = {
        "id": _id(FOLDER_SEPARATOR.join(parts), "document id"),
        "text": text,
        "metadata": {"path": relative},
        "acl": acl_for(relative, rules),
    }
    if len(parts) > 1:
        document["folder"] = _id(FOLDER_SEPARATOR.join(parts[:-1]), "folder")
    return document


def _id(raw: str, what: str) -> str:
    value = _UNSAFE.sub("-", raw).strip("-.")[:128]
    value = re.sub(r"\.{2,}", ".", value)
    try:
        return validate_id(value, what)
    except InvalidRequest as exc:
        raise InvalidRequest(f"cannot make a {what} of {raw!r}") from exc


def extract_text(path: Path) -> str:
    """The text of one file by its suffix (ValueError when it cannot be read)."""
    suffix = path.suffix.lower()
    if suffix == ".pdf":
        return _pdf_text(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError("not UTF-8 text") from exc
    return html_text(raw) if suffix in {".html", ".htm"} else raw


def _pdf_text(path: Path) -> str:
    from pypdf import PdfReader

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pypdf warns about every repaired defect
            reader = PdfReader(path)
            return "\n\n".join((page.extract_text() or "") for page in reader.pages)
    except Exception as exc:  # a malformed PDF can raise anything: the file is reported
        raise ValueError(f"unreadable PDF: {type(exc).__name__}") from exc


class _VisibleText(html.parser.HTMLParser):
    HIDDEN = frozenset({"script", "style", "noscript", "template", "head"})
    BLOCKS = frozenset({"p", "div", "br", "li", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "pre"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._hidden = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.HIDDEN:
            self._hidden += 1
        elif tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.HIDDEN and self._hidden:
            self._hidden -= 1

    def handle_data(self, data: str) -> None:
        if not self._hidden:
            self.parts.append(data)


def html_text(raw: str) -> str:
    """Visible text of an HTML page: no scripts, styles or tags; blank runs collapsed."""
    parser = _VisibleText()
    parser.feed(raw)
    parser.close()
    lines = (" ".join(line.split()) for line in "".join(parser.parts).splitlines())
    return "\n".join(line for line in lines if line)


IngestBatch = Callable[[list[dict[str, Any]]], Awaitable[Mapping[str, Any]]]
#: Writes ``parent`` relationships (``POST /v1/relationships`` ``writes``).
LinkFolders = Callable[[list[dict[str, str]]], Awaitable[object]]


def folder_links(source: str, folders: Sequence[str]) -> list[dict[str, str]]:
    """``parent`` links that nest ``a__b`` under ``a`` (and ``a`` under the source)."""
    links: dict[tuple[str, str], None] = {}
    for folder in folders:
        parts = folder.split(FOLDER_SEPARATOR)
        for depth in range(1, len(parts)):
            parent = FOLDER_SEPARATOR.join(parts[:depth])
            grand = (
                f"source:{source}"
                if depth == 1
                else "folder:" + FOLDER_SEPARATOR.join(parts[: depth - 1])
            )
            links[(grand, f"folder:{parent}")] = None
            links[(f"folder:{parent}", "folder:" + FOLDER_SEPARATOR.join(parts[: depth + 1]))] = (
                None
            )
    return [{"user": u, "relation": "parent", "object": o} for u, o in links]


async def ingest_files(
    collected: Collected,
    ingest: IngestBatch,
    *,
    batch_size: int = 50,
    existing: set[str] | None = None,
    progress: Callable[[int], object] | None = None,
    source: str | None = None,
    link: LinkFolders | None = None,
) -> dict[str, Any]:
    """Ingest collected documents in batches; the summary of what happened to each file.

    ``existing`` (ids the source already holds) splits ingested files into ``new`` and
    ``changed``; without it they are counted as ``ingested``. A batch the gateway
    refuses (409, 422) is reported as failed, file by file, and the rest goes on.
    With ``source`` and ``link``, the folders of the ingested files are then nested as
    their directories are (:func:`folder_links`); a refused link is reported as failed.
    """
    summary: dict[str, Any] = {"files": len(collected.documents) + len(collected.failed)}
    counts = {"new": 0, "changed": 0, "ingested": 0, "skipped": 0, "chunks": 0}
    failed = list(collected.failed)
    step = max(batch_size, 1)
    folders: dict[str, None] = {}
    for start in range(0, len(collected.documents), step):
        batch = collected.documents[start : start + step]
        try:
            result = await ingest(batch)
        except ScopegateError as exc:
            failed += [
                {"path": collected.paths[d["id"]], "reason": f"{exc.code}: {exc.message}"}
                for d in batch
            ]
        else:
            folders.update((d["folder"], None) for d in batch if d.get("folder"))
            written = len(batch) - int(result.get("skipped", 0))
            counts["skipped"] += int(result.get("skipped", 0))
            counts["chunks"] += int(result.get("chunks", 0))
            if existing is None:
                counts["ingested"] += written
            else:
                fresh = sum(1 for d in batch if d["id"] not in existing)
                counts["new"] += fresh
                counts["changed"] += written - fresh
        if progress is not None:
            progress(len(batch))
    if source is not None and link is not None:
        failed += await _link_folders(folder_links(source, list(folders)), link)
    if existing is None:
        del counts["new"], counts["changed"]
    else:
        del counts["ingested"]
    return {**summary, **counts, "failed": failed}


async def _link_folders(links: list[dict[str, str]], link: LinkFolders) -> list[dict[str, str]]:
    """Write the nesting links, in calls of at most 500; a refused call is reported."""
    failed = []
    for start in range(0, len(links), LINKS_PER_CALL):
        try:
            await link(links[start : start + LINKS_PER_CALL])
        except ScopegateError as exc:
            failed.append({"path": "(folders)", "reason": f"{exc.code}: {exc.message}"})
    return failed
