"""The model worker program: `r2r worker --role slm|llm --model PATH ...`."""

from __future__ import annotations

import argparse
import asyncio

from r2r_serve.common.dtypes import dtype_policy_arg
from r2r_serve.common.logging import get_logger
from r2r_serve.common.metrics import start_metrics_server
from r2r_serve.common.security import ServerTLS, add_server_tls_args, server_tls_from_args
from r2r_serve.common.server import ServiceHandle, serve_until_signal, start_server
from r2r_serve.proto import worker_pb2, worker_pb2_grpc
from r2r_serve.worker.batcher import EngineBatcher
from r2r_serve.worker.engine import QUANTIZE_CHOICES, EngineConfig, ModelEngine
from r2r_serve.worker.servicer import WorkerServicer

log = get_logger(__name__)

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["ModelWorker"].full_name


def add_worker_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--role", choices=["slm", "llm"], required=True)
    p.add_argument("--model", required=True, help="local Hugging Face folder, default-pair name or hub id")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="float32", type=worker_dtype_arg,
                   help="float32, bfloat16, float16, float64; DECODE/PREFILL (e.g. bfloat16/float32: forwards of "
                        "fewer than --prefill-from-tokens token rows in bf16, longer ones in fp32, KV in bf16: the "
                        "fast choice on CPUs without bf16 units); auto: this machine's best (as r2r serve picks)")
    p.add_argument("--prefill-from-tokens", type=int, default=0,
                   help="with a DECODE/PREFILL dtype: forwards of at least this many token rows (batch x new "
                        "tokens) use the PREFILL weights; 0 = the measured crossover (prepacked fp32: 2, "
                        "dense: 6; over int8-weight decode weights: 16)")
    p.add_argument("--no-prepack", dest="prepack", action="store_false",
                   help="keep plain nn.Linear for float32 weights on the CPU (default: oneDNN prepacked weights, "
                        "the same math and 1.3-2.7x cheaper forwards of 1-32 tokens)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 = any free port (printed)")
    p.add_argument("--max-sessions", type=int, default=256)
    p.add_argument("--max-tokens-per-session", type=int, default=0, help="0 = the model's context length")
    p.add_argument("--max-total-tokens", type=int, default=1_000_000, help="KV budget of this worker, in tokens")
    p.add_argument("--max-batch-tokens", type=int, default=4096, help="new tokens per forward pass")
    p.add_argument("--forward-fixed-rows", type=int, default=0,
                   help="a forward's fixed cost in token rows: batches whose padding costs more are split "
                        "(0 = the device's default: 32 on a CPU, 512 on a GPU)")
    p.add_argument("--trim-heap-every-s", type=float, default=30.0,
                   help="give freed activation memory back to the OS at most this often (0 = never)")
    p.add_argument("--features-top-k", type=int, default=100)
    p.add_argument("--features-dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    p.add_argument("--attn-implementation", default=None, help="eager, sdpa, ... (default: the model's)")
    p.add_argument("--quantize", default="none", choices=list(QUANTIZE_CHOICES),
                   help="int8-weight: int8 weights (per-channel scales), activations in --dtype (CPU; bf16 layers on "
                        "an AVX2-only CPU: every forward, else below 8 token rows, dense weights above; "
                        "decode steps ~1.1-1.5x cheaper, catch-ups up to 2.7x, "
                        "top-1 drift about twice bf16's, memory 1.5x where the dense weights stay). "
                        "int8: dynamic int8 linear layers (CPU and "
                        "--dtype float32 only); 2-3x cheaper forwards but outputs drift far from the float model")
    p.add_argument("--draft-vocab", type=int, default=0, metavar="N",
                   help="SLM only: its output head keeps the N most frequent tokens (and every special token); "
                        "the rest are never proposed. A cheaper decode step (the 0.5B's head is ~1/5 of it); "
                        "lossless in verify mode at rollback_below 1, elsewhere the SLM's tokens come from that "
                        "set (worker/draft_vocab.py). 0 = the whole vocabulary")
    p.add_argument("--draft-vocab-corpus", default=None, metavar="PATH",
                   help="with --draft-vocab: a text file or folder of the domain served whose token frequencies "
                        "rank the vocabulary (default: the Python standard library's source)")
    p.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics port (0 = off)")
    add_server_tls_args(p)


def worker_dtype_arg(spec: str) -> str:
    return spec if spec == "auto" else dtype_policy_arg(spec)


def config_from_args(args: argparse.Namespace) -> EngineConfig:
    from r2r_serve.models.pair_config import auto_dtype
    from r2r_serve.models.registry import resolve_model

    dtype = auto_dtype(args.device) if args.dtype == "auto" else args.dtype  # resolved on the worker's own node
    return EngineConfig(model=resolve_model(args.model), role=args.role, device=args.device, dtype=dtype,
                        prefill_from_tokens=args.prefill_from_tokens, prepack=args.prepack,
                        max_sessions=args.max_sessions, max_tokens_per_session=args.max_tokens_per_session,
                        max_total_tokens=args.max_total_tokens, max_batch_tokens=args.max_batch_tokens,
                        forward_fixed_rows=args.forward_fixed_rows,
                        features_top_k=args.features_top_k, features_dtype=args.features_dtype,
                        threads=args.threads, attn_implementation=args.attn_implementation,
                        quantize=args.quantize, draft_vocab=args.draft_vocab,
                        draft_vocab_corpus=args.draft_vocab_corpus)


async def start_worker(config: EngineConfig, host: str = "127.0.0.1", port: int = 0,
                       tls: ServerTLS | None = None, trim_heap_every_s: float = 30.0) -> ServiceHandle:
    """Load, warm up and serve; health turns SERVING only after the warm-up forward. `tls` with a client CA =
    mutual TLS: only callers holding a certificate signed by it (the coordinator) get in."""
    engine = ModelEngine(config)
    batcher = EngineBatcher(engine, trim_heap_every_s)
    # Load on the engine thread too: every thread that runs a parallel torch op gets its own OpenMP pool,
    # and with more pooled threads than cores libgomp stops spinning between parallel regions. A second pool
    # (the load's) made each CPU decode step ~15% slower, one core idling a third of the time.
    await batcher.call(engine.load)
    batcher.start()
    servicer = WorkerServicer(engine, batcher)

    def register(server):
        worker_pb2_grpc.add_ModelWorkerServicer_to_server(servicer, server)
        return [SERVICE_NAME]

    handle = await start_server(register, host=host, port=port, tls=tls)
    handle.on_stop.append(batcher.close)
    await batcher.call(engine.warmup)
    await handle.set_serving(True)
    handle.servicer = servicer
    log.info("listening", role=config.role, port=handle.port, host=host)
    return handle


async def run_worker(args: argparse.Namespace) -> None:
    start_metrics_server(args.metrics_port)
    tls = server_tls_from_args(args)
    handle = await start_worker(config_from_args(args), args.host, args.port, tls=tls,
                                trim_heap_every_s=args.trim_heap_every_s)
    print(f"{args.role} worker listening on {args.host}:{handle.port}", flush=True)
    await serve_until_signal(handle)
