"""The flags every benchmark takes to pick the model pair, device and dtypes."""

from __future__ import annotations

import argparse


def add_pair_args(p: argparse.ArgumentParser, dtype_default: str = "auto") -> None:
    p.add_argument("--slm", help="SLM folder or id (default: the prepared default pair's)")
    p.add_argument("--llm", help="LLM folder or id (default: the prepared default pair's)")
    p.add_argument("--tiny", metavar="DIR", help="tiny random models built in DIR (a smoke run)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--slm-dtype", default=dtype_default)
    p.add_argument("--llm-dtype", default=dtype_default)
    from r2r_serve.worker.engine import QUANTIZE_CHOICES

    for role in ("slm", "llm"):
        p.add_argument(f"--{role}-quantize", default="none", choices=list(QUANTIZE_CHOICES),
                       help=f"the {role.upper()} worker's --quantize; the in-process baselines get the same weights")
    p.add_argument("--slm-draft-vocab", type=int, default=0, metavar="N",
                   help="the SLM worker's --draft-vocab (its head scores the N most frequent tokens); HF assisted "
                        "generation's assistant gets the same head (bench.ab --modes assisted-full: its whole head)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (0 = torch's default)")


def resolve_pair(args: argparse.Namespace) -> tuple[str, str]:
    """The SLM and LLM folders these flags name (never a hub: HF_HUB_OFFLINE unless set), with `auto` dtypes
    resolved in `args`: what every benchmark that starts the services does first."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from r2r_serve.cli import resolve_models

    slm, llm, _ = resolve_models(args)
    resolve_auto_dtypes(args)
    return slm, llm


def resolve_auto_dtypes(args: argparse.Namespace) -> None:
    """`auto` dtypes resolved as r2r serve resolves them (bf16, or bfloat16/float32 on AVX2 CPUs)."""
    from r2r_serve.models.pair_config import auto_dtype

    for role in ("slm", "llm"):
        if getattr(args, f"{role}_dtype") == "auto":
            setattr(args, f"{role}_dtype", auto_dtype(args.device))
