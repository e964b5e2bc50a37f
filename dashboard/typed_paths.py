"""Folders a visitor types into a page (a Hugging Face model folder), resolved and checked before use.

A typed path is resolved (``~``, ``..`` and symbolic links followed) and must lie inside one of the folders
this dashboard reads models from: the user data folder (``LORA_ANALYSIS_HOME``), the folder the server was
started in, and any listed in ``LORA_ANALYSIS_MODEL_DIRS`` (separated by ``os.pathsep``). Anything else is
refused with one message that does not depend on whether the path exists, so the field cannot be used to
find out what is on the server. Pages only read what is typed here; they write nothing outside the user
data folder.

    model = model_source(typed)      # a built-in name, a hub id, or an absolute folder path inside the roots
    base = resolve_base_path(typed)  # base weights W0: a .safetensors file or a model folder inside the roots
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
    return "the user data folder, the folder the dashboard was started in" + \
        (f" or {ROOTS_ENV}" if os.environ.get(ROOTS_ENV) else f" (more with {ROOTS_ENV})")


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
