"""Folders a visitor types into a page (a Hugging Face model folder), resolved and checked before use.

A typed path is resolved (``~``, ``..`` and symbolic links followed) and must lie inside one of the folders
this dashboard reads models from: the user data folder (``LORA_ANALYSIS_HOME``), the folder the server was
started in, and any listed in ``LORA_ANALYSIS_MODEL_DIRS`` (separated by ``os.pathsep``). Anything else is
refused with one message that does not depend on whether the path exists, so the field cannot be used to
find out what is on the server. Pages only read what is typed here; they write nothing outside the user
data folder.

    model = model_source(typed)      # a built-in name, a hub id, or an absolute folder path inside the roots
    base = resolve_base_path(typed)  # base weights W0: a .safetensors file or a model folder inside the roots
    adapter = resolve_adapter_path(typed)   # a PEFT adapter folder or one adapter .safetensors file
    adapter_files(adapter), base_files(base)   # the files reading them opens (for "what was read")
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from lora_analysis.paths import home_dir
from lora_analysis.training.models import BUILTIN_MODELS, check_model_name

ROOTS_ENV = "LORA_ANALYSIS_MODEL_DIRS"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?")
MAX_PATH_CHARS = 1024


def allowed_roots() -> list[Path]:
    """The folders typed paths may point into, resolved."""
    extra = [p for p in os.environ.get(ROOTS_ENV, "").split(os.pathsep) if p.strip()]
    roots = []
    for p in [home_dir(), Path.cwd(), *extra]:
        root = Path(p).expanduser().resolve()
        if root not in roots:
            roots.append(root)
    return roots


def allowed_roots_text() -> str:
    """The allowed folders, named and listed (for messages and help): the user data folder, the folder the
    dashboard was started in and the folders of ``LORA_ANALYSIS_MODEL_DIRS``."""
    home, here = Path(home_dir()).expanduser().resolve(), Path.cwd().resolve()
    extra = [str(Path(p).expanduser().resolve()) for p in os.environ.get(ROOTS_ENV, "").split(os.pathsep)
             if p.strip()]
    text = f"the user data folder {home}, the folder the dashboard was started in {here}"
    return text + (f" or {ROOTS_ENV} ({', '.join(extra)})" if extra else f"; more with {ROOTS_ENV}")


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def inside_allowed(path: Path) -> bool:
    """Whether ``path``, resolved (links followed), lies inside :func:`allowed_roots`."""
    return _inside(Path(path).resolve(strict=False), allowed_roots())


def resolve_typed_folder(text: str, what: str = "model folder") -> Path:
    """``text`` as an absolute, resolved path inside :func:`allowed_roots`; raises ValueError saying what was
    refused and why. The message for a path outside the roots is the same whether or not it exists."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"the {what} is empty: type a folder path")
    text = text.strip()
    if len(text) > MAX_PATH_CHARS or "\x00" in text or any(ord(c) < 32 for c in text):
        raise ValueError(f"the {what} was refused: a path is at most {MAX_PATH_CHARS} printable characters")
    # relative paths are relative to the server's folder; resolve() follows links and "..", so a link inside
    # a root that points outside it is outside. strict=False: nothing here depends on existence.
    path = (Path.cwd() / Path(text).expanduser()).resolve(strict=False)
    if not _inside(path, allowed_roots()):
        raise ValueError(f"the {what} '{text}' was refused: it is outside the folders this dashboard reads "
                         f"models from ({allowed_roots_text()})")
    return path


def resolve_base_path(text: str) -> Path:
    """Base weights W0 typed as a path: a ``.safetensors`` file or a folder of them (a Hugging Face model
    folder, single file or sharded), resolved and inside :func:`allowed_roots`, every file it would read
    inside them too (a link in the folder may point out). Raises ValueError saying what was refused."""
    path = resolve_typed_folder(text, "base weights path")
    shown = text.strip()
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"the base weights '{shown}' must be a .safetensors file or a model folder (pickled "
                             ".bin/.pt files are never loaded)")
        return path
    if not path.is_dir():
        raise ValueError(f"the base weights '{shown}' do not exist")
    files = [*path.glob("*.safetensors"), *path.glob("*.json")]
    if not any(f.suffix == ".safetensors" for f in files):
        raise ValueError(f"the base folder '{shown}' holds no .safetensors file (pickled .bin/.pt files are never "
                         "loaded)")
    if not all(inside_allowed(f) for f in files):
        raise ValueError(f"the base folder '{shown}' was refused: its files must lie inside {allowed_roots_text()}")
    return path


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")     # a PEFT adapter folder


def resolve_adapter_path(text: str) -> Path:
    """An adapter typed as a path: a PEFT adapter folder (``adapter_config.json`` and
    ``adapter_model.safetensors``) or one ``.safetensors`` file (the single-file formats
    :func:`lora_analysis.lora.read_adapter` reads, e.g. kohya / diffusers ``lora_down``/``lora_up``), resolved and
    inside :func:`allowed_roots`, every file it would read inside them too (a link in the folder may point out).
    Raises ValueError saying what was refused."""
    path = resolve_typed_folder(text, "adapter path")
    shown = text.strip()
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"the adapter '{shown}' must be an adapter folder or a .safetensors file (pickled "
                             ".bin/.pt files are never loaded)")
        sidecar = path.with_suffix(".json")     # a loralib file's alpha may be read from <stem>.json beside it
        if sidecar.exists() and not inside_allowed(sidecar):
            raise ValueError(f"the adapter '{shown}' was refused: {sidecar.name} beside it must lie inside "
                             f"{allowed_roots_text()}")
        return path
    if not path.is_dir():
        raise ValueError(f"the adapter path '{shown}' does not exist")
    if not all((path / name).is_file() for name in ADAPTER_FILES):
        raise ValueError(f"the adapter folder '{shown}' holds no {' and '.join(ADAPTER_FILES)} (a PEFT adapter); "
                         "type the .safetensors file itself for an adapter saved as one file")
    if not all(inside_allowed(f) for f in adapter_files(path)):
        raise ValueError(f"the adapter folder '{shown}' was refused: its files must lie inside "
                         f"{allowed_roots_text()}")
    return path


def adapter_files(path: Path) -> list[Path]:
    """The files reading the adapter at ``path`` (from :func:`resolve_adapter_path`) opens."""
    path = Path(path)
    return [path] if path.is_file() else [path / name for name in ADAPTER_FILES if (path / name).is_file()]


def base_files(path: Path) -> list[Path]:
    """The safetensors files a base at ``path`` (from :func:`resolve_base_path`) may read W0 from."""
    path = Path(path)
    return [path] if path.is_file() else sorted(path.glob("*.safetensors"))


def version_of(files: list[Path]) -> tuple:
    """What changes when any of ``files`` is rewritten (names, sizes, modification times): a cache key."""
    return tuple((f.name, (st := f.stat()).st_size, st.st_mtime_ns) for f in files)


def model_source(text: str) -> str:
    """What the Fine-tune form passes on for a typed Hugging Face model: a hub id as typed (``gpt2``,
    ``org/name``) when no folder of that name is in the server's folder, otherwise the folder, resolved,
    checked to lie inside :func:`allowed_roots` and to hold a model (config.json). Raises ValueError."""
    text = (text or "").strip()
    if not text:
        raise ValueError("give a Hugging Face model folder or hub id, or choose a built-in model")
    if text in BUILTIN_MODELS:
        return text
    # a hub id unless the server's own folder (an allowed root: it may be looked at) has an entry by that name,
    # which transformers would load instead; that entry, link or not, is checked as a typed path below
    if _HUB_ID.fullmatch(text) and ".." not in text and not os.path.lexists(Path.cwd() / text):
        check_model_name(text)
        return text
    path = resolve_typed_folder(text)
    if not path.is_dir():
        raise ValueError(f"the model folder '{text}' does not exist")
    if not (path / "config.json").is_file():
        raise ValueError(f"the model folder '{text}' holds no config.json: it is not a Hugging Face model folder "
                         "(save one with save_pretrained)")
    return str(path)
