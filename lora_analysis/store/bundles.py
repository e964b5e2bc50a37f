"""Sharing a run: one zip per run, both ways.

Bundles hold only json/csv/safetensors/txt files and are validated before anything is extracted; nothing
is ever unpickled. What a bundle may hold is stated once, in :data:`LIMITS`: its size unpacked, its number
of files, each file's size by type and each file's compression ratio (a zip bomb is refused from its
headers, and the bytes actually unpacked are counted too). run.json is checked against the run schema
(:class:`~.runs.RunRecord`) before anything is written; an imported run is never "running" (it becomes
"interrupted": its process is not here). An import is extracted into a hidden staging folder named for the
importing process (``.import-<pid>-<start ms>-<random>``), each file written through :mod:`.files`; its id
is claimed with an exclusive ``mkdir`` (two imports of one bundle at once get two ids) and the staging
folder is renamed onto the claim at once. A failed import leaves nothing; a staging folder whose process
died is removed by the next listing.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import stat
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .files import atomic_write, atomic_write_text
from .liveness import process_identity
from .runs import IMPORTING_PREFIX, RUN_FILE, Run, load_run, new_run_id, read_run, runs_root, validate_record

ALLOWED_SUFFIXES = (".json", ".csv", ".safetensors", ".txt")


@dataclass(frozen=True)
class BundleLimits:
    """Everything an imported bundle may be, in one place (the dashboard's upload limit is its own, and
    smaller: what a browser may send)."""

    max_bytes: int = 2 * 2**30                 # all files together, unpacked
    max_files: int = 1000
    max_ratio: float = 200.0                   # unpacked / packed size of one file (deflate's most is ~1032)
    ratio_floor_bytes: int = 2**20             # files smaller than this may be packed better (a tiny json)
    max_file_bytes: tuple[tuple[str, int], ...] = ((".json", 16 * 2**20), (".txt", 16 * 2**20),
                                                   (".csv", 256 * 2**20), (".safetensors", 2 * 2**30))

    def file_limit(self, suffix: str) -> int:
        return dict(self.max_file_bytes).get(suffix, 0)


LIMITS = BundleLimits()
MAX_BUNDLE_BYTES = LIMITS.max_bytes       # the names callers used before
MAX_BUNDLE_FILES = LIMITS.max_files
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _write_zip(run_dir: Path, target: str) -> None:
    """Entries relative to the run directory; only allowed, visible, regular files."""
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(run_dir.rglob("*")):
            rel = path.relative_to(run_dir)
            if (path.is_file() and not path.is_symlink() and path.suffix in ALLOWED_SUFFIXES
                    and not any(part.startswith(".") for part in rel.parts)):
                zf.write(path, rel.as_posix())


def export_run(run: str | os.PathLike | Run, destination: str | os.PathLike | None = None,
               runs_dir: str | os.PathLike | None = None) -> Path:
    """Write the run as one zip (``<id>.zip`` in the current folder, or ``destination``: a .zip path or a
    folder). Entries are relative to the run directory; only json/csv/safetensors/txt files go in."""
    run = run if isinstance(run, Run) else load_run(run, runs_dir)
    if run.status == "running":
        raise ValueError(f"run {run.id} is still running: export it when it has finished")
    dest = Path(destination) if destination else Path.cwd() / f"{run.id}.zip"
    if dest.is_dir() or (destination and not str(dest).endswith(".zip")):
        dest.mkdir(parents=True, exist_ok=True)
        dest = dest / f"{run.id}.zip"
    dest.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(dest, lambda tmp: _write_zip(run.dir, tmp))


def _check_entries(zf: zipfile.ZipFile, source: Path, max_bytes: int) -> tuple[list[zipfile.ZipInfo], str]:
    infos = [i for i in zf.infolist() if not i.is_dir()]
    if not infos:
        raise ValueError(f"'{source}' is an empty zip")
    if len(infos) > LIMITS.max_files:
        raise ValueError(f"'{source}' holds {len(infos)} files: a run bundle holds at most {LIMITS.max_files}")
    names = [i.filename for i in infos]
    if len(set(names)) != len(names):
        raise ValueError(f"'{source}' holds the same entry twice: not a bundle written by export")
    folders = {str(parent) for n in names for parent in PurePosixPath(n).parents}
    if clash := sorted(folders & set(names)):
        raise ValueError(f"'{source}' holds {clash[0]!r} as a file and as a folder: not a bundle written by export")
    total = 0
    for info in infos:
        name = info.filename
        parts = PurePosixPath(name).parts
        if (name.startswith(("/", "\\")) or "\\" in name or ":" in name or ".." in parts or not parts
                or any(p.startswith(".") for p in parts)):
            raise ValueError(f"'{source}' holds the entry {name!r}, whose path is not allowed (absolute, "
                             "parent '..', hidden or Windows-style paths are refused)")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise ValueError(f"'{source}' holds the symbolic link {name!r}: links are refused")
        suffix = PurePosixPath(name).suffix
        if suffix not in ALLOWED_SUFFIXES:
            raise ValueError(f"'{source}' holds {name!r}: only {', '.join(ALLOWED_SUFFIXES)} files are allowed "
                             "in a run bundle (no pickles, no code)")
        if info.file_size > LIMITS.file_limit(suffix):
            raise ValueError(f"'{source}': {name!r} unpacks to {info.file_size / 2**20:.3g} MiB: a {suffix} file "
                             f"in a run bundle may be at most {LIMITS.file_limit(suffix) / 2**20:.3g} MiB")
        if (info.file_size > LIMITS.ratio_floor_bytes
                and info.file_size > LIMITS.max_ratio * max(info.compress_size, 1)):
            raise ValueError(f"'{source}': {name!r} unpacks {info.file_size / max(info.compress_size, 1):.0f} "
                             f"times larger than it is packed (at most {LIMITS.max_ratio:.0f} times): refused as "
                             "a zip bomb")
        total += info.file_size
        if total > max_bytes:
            raise ValueError(f"'{source}' unpacks to more than {max_bytes / 2**20:.0f} MiB: refused")
    if RUN_FILE in names:
        prefix = ""
    else:
        tops = {PurePosixPath(n).parts[0] for n in names}
        if len(tops) == 1 and f"{next(iter(tops))}/{RUN_FILE}" in names:
            prefix = next(iter(tops)) + "/"
        else:
            raise ValueError(f"'{source}' has no {RUN_FILE} at its top level: not a run bundle")
    return infos, prefix


def _staging_dir(root: Path) -> Path:
    """A hidden folder named for this process, so a listing can tell an import in progress from a dead one."""
    me = process_identity()
    return root / f"{IMPORTING_PREFIX}{me['pid']}-{int(me['pid_start_time'] * 1000)}-{secrets.token_hex(4)}"


def _extract(zf: zipfile.ZipFile, infos: list[zipfile.ZipInfo], prefix: str, staging: Path, source: Path,
             max_bytes: int) -> None:
    written = 0

    def copy(info: zipfile.ZipInfo, tmp: str) -> None:
        nonlocal written
        limit, mine = LIMITS.file_limit(PurePosixPath(info.filename).suffix), 0
        with zf.open(info) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):   # count real bytes: headers can lie about sizes
                written, mine = written + len(chunk), mine + len(chunk)
                if written > max_bytes:
                    raise ValueError(f"'{source}' unpacks to more than {max_bytes / 2**20:.0f} MiB: refused")
                if mine > limit:
                    raise ValueError(f"'{source}': {info.filename!r} unpacks to more than {limit / 2**20:.3g} MiB: "
                                     "refused")
                dst.write(chunk)

    for info in infos:
        target = staging / info.filename[len(prefix):]
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            atomic_write(target, lambda tmp, info=info: copy(info, tmp))
        except _CORRUPT as exc:
            raise ValueError(f"'{source}': the entry {info.filename!r} is corrupt ({exc})") from None


_CORRUPT = (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError)


def _check_safetensors(staging: Path, source: Path) -> None:
    from safetensors import SafetensorError, safe_open

    for path in staging.rglob("*.safetensors"):
        try:
            with safe_open(str(path), framework="pt") as f:
                list(f.keys())
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"'{source}': {path.relative_to(staging)} is not a valid safetensors "
                             f"file ({exc})") from exc


def _claim_id(root: Path, wanted: str) -> str:
    """Claim ``root/<id>`` with an exclusive mkdir: ``wanted`` when it is a valid id that is free, else a
    new one. Two imports at once never get the same folder."""
    if _RUN_ID.match(wanted):
        try:
            (root / wanted).mkdir()
            return wanted
        except FileExistsError:
            pass
    for _ in range(100):
        run_id = new_run_id()
        try:
            (root / run_id).mkdir()
            return run_id
        except FileExistsError:
            continue
    raise RuntimeError(f"could not claim a new run folder under {root}")  # pragma: no cover


def import_run(bundle: str | os.PathLike, runs_dir: str | os.PathLike | None = None,
               max_bytes: int = MAX_BUNDLE_BYTES) -> Run:
    """Import a zip written by :func:`export_run` and return the run. The zip is checked before anything is
    written (paths, file types, sizes and compression ratios (:data:`LIMITS`), run.json against the run
    schema), then safetensors headers after unpacking; the run keeps its id unless that id is taken here,
    then it gets a new one. A run exported while "running" is imported as "interrupted". On any error
    nothing is left in the store."""
    source = Path(bundle)
    if not source.is_file():
        raise ValueError(f"bundle '{source}' does not exist")
    try:
        zf = zipfile.ZipFile(source)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ValueError(f"'{source}' is not a zip file ({exc})") from exc
    root = runs_root(runs_dir)
    root.mkdir(parents=True, exist_ok=True)
    with zf:
        infos, prefix = _check_entries(zf, source, max_bytes)
        try:
            record = json.loads(zf.read(prefix + RUN_FILE).decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise ValueError(f"'{source}': {RUN_FILE} is not valid JSON ({type(exc).__name__}: {exc})") from None
        except _CORRUPT as exc:
            raise ValueError(f"'{source}': the entry {prefix + RUN_FILE!r} is corrupt ({exc})") from None
        validate_record(record, f"'{source}'", imported=True)
        if record["status"] == "running":
            record.update(status="interrupted", error=record.get("error") or "exported while it was running: "
                          "imported as interrupted (its process is not here)")
        staging = _staging_dir(root)
        staging.mkdir()
        claimed = None
        try:
            _extract(zf, infos, prefix, staging, source, max_bytes)
            _check_safetensors(staging, source)
            wanted = str(record.get("id") or "")
            claimed = run_id = _claim_id(root, wanted)
            # the same run wherever it goes: the first id it had (an older record: the id it arrives with)
            record["origin"] = record.get("origin") or record.get("imported_as_new_id_of") or wanted or run_id
            if run_id != wanted:
                record["imported_as_new_id_of"] = wanted or None
            record.update(id=run_id, imported_from=source.name, imported=time.time())
            atomic_write_text(staging / RUN_FILE, json.dumps(record, indent=2) + "\n")
            os.rename(staging, root / run_id)         # onto our own empty claim: atomic
        except BaseException:
            # the import's own error is the one to report; what this cleanup misses, a listing removes
            shutil.rmtree(staging, ignore_errors=True)
            if claimed is not None and (root / claimed).is_dir() and not any((root / claimed).iterdir()):
                (root / claimed).rmdir()
            raise
    return read_run(root / run_id, store=root)
