"""Model pairs as config files: one TOML file per pair says which SLM and LLM to serve, their dtype per
device kind, the router (strategy, checkpoint, default threshold) and chat-template options.

`r2r serve` uses the default pair's file (`pairs/qwen2.5-coder.toml`) when no models are named, and
`--pair NAME|FILE` selects another; explicit flags (--slm, --router-checkpoint, ...) override the file.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from r2r_serve.common import cpu

PAIRS_DIR = Path(__file__).resolve().parent / "pairs"
PACKAGE_DIR = Path(__file__).resolve().parent.parent  # the installed r2r_serve package
DEFAULT_PAIR_NAME = "qwen2.5-coder"


class PairConfigError(ValueError):
    """A pair file that is missing, unreadable or inconsistent; the message names the file and the field."""


@dataclass(frozen=True)
class RoleConfig:
    model: str
    dtype: dict[str, str] = field(default_factory=lambda: {"cpu": "auto", "cuda": "bfloat16"})

    def dtype_for(self, device: str) -> str:
        kind = "cuda" if device.startswith("cuda") else "cpu"
        return self.dtype.get(kind, "auto")


@dataclass(frozen=True)
class PairConfig:
    name: str
    slm: RoleConfig
    llm: RoleConfig
    router_strategy: str = "auto"
    router_checkpoint: str | None = None      # resolved absolute path
    threshold: float | None = None
    system_prompt: str = ""
    template_kwargs: dict = field(default_factory=dict)
    source: str = ""
    description: str = ""


def available_pairs() -> list[str]:
    return sorted(p.stem for p in PAIRS_DIR.glob("*.toml"))


def pair_file(name_or_path: str | os.PathLike) -> Path:
    """A pair's file: an existing path, or the name of a file in the packaged `pairs/` folder."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    packaged = PAIRS_DIR / f"{name_or_path}.toml"
    if packaged.is_file():
        return packaged
    raise PairConfigError(f"no model pair {str(name_or_path)!r}: not a file, and not one of the packaged pairs "
                          f"({', '.join(available_pairs())})")


def _resolve_checkpoint(value: str | None, base: Path) -> str | None:
    if not value:
        return None
    if value.startswith("package:"):
        path = PACKAGE_DIR / value.removeprefix("package:")
    else:
        path = Path(value).expanduser()
        if not path.is_absolute():
            path = base / path
    return str(path)


def _role(data: dict, role: str, source: Path) -> RoleConfig:
    section = data.get(role)
    if not isinstance(section, dict) or not isinstance(section.get("model"), str) or not section["model"]:
        raise PairConfigError(f"{source}: [{role}] needs model = \"<name, folder or hub id>\"")
    dtype = section.get("dtype", {"cpu": "auto", "cuda": "bfloat16"})
    if isinstance(dtype, str):
        dtype = {"cpu": dtype, "cuda": dtype}
    bad = {k: v for k, v in dtype.items() if k not in ("cpu", "cuda") or not _dtype_ok(v)}
    if bad:
        raise PairConfigError(f"{source}: [{role}] dtype {bad} is not understood; keys cpu/cuda, values auto, "
                              "a dtype (float32, bfloat16, float16, float64) or DECODE/PREFILL (bfloat16/float32)")
    return RoleConfig(model=section["model"], dtype=dict(dtype))


def _dtype_ok(value) -> bool:
    from r2r_serve.common.dtypes import parse_dtype_policy

    if value == "auto":
        return True
    try:
        parse_dtype_policy(value)
    except (ValueError, AttributeError):
        return False
    return True


def load_pair_config(name_or_path: str | os.PathLike = DEFAULT_PAIR_NAME) -> PairConfig:
    path = pair_file(name_or_path)
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise PairConfigError(f"{path}: cannot read it as TOML ({exc})") from None
    router = data.get("router", {})
    chat = data.get("chat", {})
    threshold = router.get("threshold")
    if threshold is not None and (not isinstance(threshold, (int, float)) or threshold < 0):
        raise PairConfigError(f"{path}: [router] threshold must be a number >= 0, got {threshold!r}")
    checkpoint = _resolve_checkpoint(router.get("checkpoint"), path.parent)
    if checkpoint and not Path(checkpoint).exists():
        raise PairConfigError(f"{path}: the router checkpoint {checkpoint} does not exist")
    kwargs = chat.get("template_kwargs", {})
    if not isinstance(kwargs, dict):
        raise PairConfigError(f"{path}: [chat] template_kwargs must be a table")
    return PairConfig(name=data.get("name", path.stem), slm=_role(data, "slm", path), llm=_role(data, "llm", path),
                      router_strategy=router.get("strategy", "auto"), router_checkpoint=checkpoint,
                      threshold=float(threshold) if threshold is not None else None,
                      system_prompt=chat.get("system_prompt", "") or "", template_kwargs=kwargs, source=str(path),
                      description=data.get("description", ""))


def auto_dtype(device: str) -> str:
    """bf16 on GPUs and on CPUs with bf16 units (AVX512-BF16 or AMX), where bf16 forwards beat fp32 at every
    length; on other x86 CPUs (AVX2) bf16 decode steps with fp32 long forwards (common/dtypes.py: each
    forward in the cheaper copy of the weights), because there bf16 multi-token forwards are 4-5x slower
    than fp32; else fp32."""
    if device.startswith("cuda") or cpu.has_bf16_units():
        return "bfloat16"
    return "bfloat16/float32" if cpu.has_avx2() else "float32"
