"""The router process: load a strategy, serve r2r.v1.Router, warm up, report SERVING, drain on SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import time

import grpc
import torch

from r2r_serve.common.logging import get_logger
from r2r_serve.common.metrics import start_metrics_server
from r2r_serve.common.security import ServerTLS, add_server_tls_args, server_tls_from_args
from r2r_serve.common.server import ServiceHandle, serve_until_signal, start_server
from r2r_serve.proto import router_pb2_grpc
from r2r_serve.router.features import FeatureBatch
from r2r_serve.router.servicer import SERVICE_NAME, RouterServicer
from r2r_serve.router.strategies import STRATEGIES, load_strategy

log = get_logger(__name__)

DEFAULT_PORT = 50054
_WARMUP_ROWS = 8


def add_router_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--strategy", choices=STRATEGIES, default="auto",
                        help="auto = neural when --checkpoint is given, else entropy")
    parser.add_argument("--checkpoint", default=None, help="router checkpoint (.safetensors or its directory)")
    parser.add_argument("--pair", default=None,
                        help="use this model pair's router (a packaged pair's name such as qwen2.5-coder, or its "
                             "TOML file) when --strategy is auto and no --checkpoint is given")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 = any free port")
    parser.add_argument("--device", default="cpu", help="torch device for the neural router")
    parser.add_argument("--seed", type=int, default=0,
                        help="key of the random strategy's per-token draws (same seed, same draws)")
    parser.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics port (0 = off)")
    add_server_tls_args(parser)
    return parser


def warm_up(servicer: RouterServicer) -> float:
    """Score one synthetic batch through the full decode+score path (first-call allocations, lazy
    init); returns its milliseconds."""
    s = servicer.strategy
    batch = FeatureBatch.random(_WARMUP_ROWS, s.hidden_size if s.reads_tensors else 0, s.top_k or 8,
                                generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    servicer.score_features(batch.to_protos())
    return (time.perf_counter() - start) * 1000.0


async def start_router(strategy_name: str = "auto", checkpoint: str | None = None, host: str = "127.0.0.1",
                       port: int = 0, device: str = "cpu", tls: ServerTLS | None = None,
                       seed: int = 0) -> ServiceHandle:
    """Start a router in this process; returns once it is warmed up and SERVING. `tls`: see start_worker;
    `seed`: see RandomStrategy."""
    strategy = await asyncio.to_thread(load_strategy, strategy_name, checkpoint, device, seed)
    servicer = RouterServicer(strategy)

    def register(server: grpc.aio.Server) -> list[str]:
        router_pb2_grpc.add_RouterServicer_to_server(servicer, server)
        return [SERVICE_NAME]

    handle = await start_server(register, host=host, port=port, tls=tls)
    handle.servicer = servicer  # in-process callers reach the strategy through it
    warm_ms = warm_up(servicer)
    await handle.set_serving(True)
    log.info("router ready", strategy=strategy.name, checkpoint=strategy.checkpoint,
             hidden_size=strategy.hidden_size, top_k=strategy.top_k,
             default_threshold=strategy.default_threshold, seed=getattr(strategy, "seed", None),
             warmup_ms=round(warm_ms, 3))
    return handle


def strategy_from_args(args: argparse.Namespace) -> tuple[str, str | None]:
    """(strategy, checkpoint): the flags, or with `--pair` and nothing explicit, that pair's router."""
    if args.pair and args.strategy == "auto" and not args.checkpoint:
        from r2r_serve.models.pair_config import load_pair_config

        pair = load_pair_config(args.pair)
        return pair.router_strategy, pair.router_checkpoint
    return args.strategy, args.checkpoint


async def run_router(args: argparse.Namespace) -> None:
    start_metrics_server(args.metrics_port)
    strategy, checkpoint = strategy_from_args(args)
    handle = await start_router(strategy, checkpoint, host=args.host, port=args.port, device=args.device,
                                tls=server_tls_from_args(args), seed=args.seed)
    log.info("listening", host=args.host, port=handle.port)
    await serve_until_signal(handle)
