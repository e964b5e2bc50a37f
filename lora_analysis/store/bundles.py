"""Sharing a run: one zip per run, both ways.

Bundles hold only json/csv/safetensors/txt files and are validated before anything is extracted; nothing
is ever unpickled. An import is extracted into a hidden staging folder named for the importing process
(``.import-<pid>-<start ms>-<random>``), each file written through :mod:`.files`, and renamed into place at
once; a staging folder whose process died is removed by the next listing.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import stat
import time
import zipfile
from pathlib import Path, PurePosixPath

from .files import atomic_write, atomic_write_text
from .liveness import process_identity
from .runs import IMPORTING_PREFIX, RUN_FILE, Run, load_run, new_run_id, read_run, runs_root

ALLOWED_SUFFIXES = (".json", ".csv", ".safetensors", ".txt")
MAX_BUNDLE_BYTES = 2 * 2**30       # uncompressed size limit of an imported zip
MAX_BUNDLE_FILES = 1000


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
    if len(infos) > MAX_BUNDLE_FILES:
        raise ValueError(f"'{source}' holds {len(infos)} files: a run bundle holds at most {MAX_BUNDLE_FILES}")
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
        if PurePosixPath(name).suffix not in ALLOWED_SUFFIXES:
            raise ValueError(f"'{source}' holds {name!r}: only {', '.join(ALLOWED_SUFFIXES)} files are allowed "
                             "in a run bundle (no pickles, no code)")
        total += info.file_size
        if total > max_bytes:
            raise ValueError(f"'{source}' unpacks to more than {max_bytes / 2**20:.0f} MiB: refused")
    names = [i.filename for i in infos]
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
        with zf.open(info) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):   # count real bytes: headers can lie about sizes
                written += len(chunk)
                if written > max_bytes:
                    raise ValueError(f"'{source}' unpacks to more than {max_bytes / 2**20:.0f} MiB: refused")
                dst.write(chunk)

    for info in infos:
        target = staging / info.filename[len(prefix):]
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, lambda tmp, info=info: copy(info, tmp))


def _check_safetensors(staging: Path, source: Path) -> None:
    from safetensors import SafetensorError, safe_open

    for path in staging.rglob("*.safetensors"):
        try:
            with safe_open(str(path), framework="pt") as f:
                list(f.keys())
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"'{source}': {path.relative_to(staging)} is not a valid safetensors "
                             f"file ({exc})") from exc


def import_run(bundle: str | os.PathLike, runs_dir: str | os.PathLike | None = None,
               max_bytes: int = MAX_BUNDLE_BYTES) -> Run:
    """Import a zip written by :func:`export_run` and return the run. The zip is checked before anything is
    written (paths, file types, size, a valid run.json, readable safetensors headers); the run keeps its
    id unless that id is taken here, then it gets a new one."""
    source = Path(bundle)
    if not source.is_file():
        raise ValueError(f"bundle '{source}' does not exist")
    try:
        zf = zipfile.ZipFile(source)
    except zipfile.BadZipFile as exc:
        raise ValueError(f"'{source}' is not a zip file ({exc})") from exc
    root = runs_root(runs_dir)
    root.mkdir(parents=True, exist_ok=True)
    with zf:
        infos, prefix = _check_entries(zf, source, max_bytes)
        try:
            record = json.loads(zf.read(prefix + RUN_FILE).decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"'{source}': {RUN_FILE} is not valid JSON ({exc})") from exc
        if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
            raise ValueError(f"'{source}': {RUN_FILE} does not hold a run record")
        staging = _staging_dir(root)
        staging.mkdir()
        try:
            _extract(zf, infos, prefix, staging, source, max_bytes)
            _check_safetensors(staging, source)
            run_id = str(record.get("id") or "")
            if not run_id or run_id.startswith(".") or "/" in run_id or "\\" in run_id or (root / run_id).exists():
                record["imported_as_new_id_of"] = run_id or None
                run_id = new_run_id()
            record.update(id=run_id, imported_from=source.name, imported=time.time())
            atomic_write_text(staging / RUN_FILE, json.dumps(record, indent=2) + "\n")
            os.rename(staging, root / run_id)
        except BaseException:
            # the import's own error is the one to report; what this cleanup misses, a listing removes
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return read_run(root / run_id)
