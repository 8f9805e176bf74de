"""The coordinator program: `r2r coordinator --slm HOST:PORT[,...] --llm ... --router HOST:PORT`."""

from __future__ import annotations

import argparse
import asyncio
import json

from r2r_serve.common.logging import get_logger
from r2r_serve.common.metrics import start_metrics_server
from r2r_serve.common.security import (BearerTokenInterceptor, ClientTLS, ServerTLS, add_auth_args,
                                       add_client_tls_args, add_server_tls_args, client_tls_from_args,
                                       server_tls_from_args, tokens_from_args)
from r2r_serve.common.server import DEFAULT_MAX_MESSAGE_BYTES, ServiceHandle, serve_until_signal, start_server
from r2r_serve.common.tokenizer import fingerprint, load_tokenizer_from_files
from r2r_serve.coordinator.pool import RouterClient, WorkerPool
from r2r_serve.coordinator.requests import ChatOptions
from r2r_serve.coordinator.servicer import CoordinatorServicer, CoordinatorSettings
from r2r_serve.proto import coordinator_pb2, coordinator_pb2_grpc, worker_pb2

log = get_logger(__name__)

SERVICE_NAME = coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"].full_name


class PairMismatch(RuntimeError):
    """The SLM and LLM (or the router) do not belong together."""


def add_coordinator_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--slm", required=True,
                   help="SLM workers: HOST:PORT[,HOST:PORT...] or dns:///NAME:PORT (every address of NAME)")
    p.add_argument("--llm", required=True, help="LLM workers, same forms as --slm")
    p.add_argument("--router", required=True, help="router endpoint HOST:PORT")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--threshold", type=float, default=None, help="default router threshold (default: the router's)")
    p.add_argument("--max-concurrent-sessions", type=int, default=64)
    p.add_argument("--max-new-sessions-per-s", type=float, default=0.0, help="0 = no rate limit")
    p.add_argument("--max-prompt-tokens", type=int, default=8192)
    p.add_argument("--max-new-tokens", type=int, default=4096)
    p.add_argument("--default-max-tokens", type=int, default=256)
    p.add_argument("--connect-timeout-s", type=float, default=600.0, help="wait this long for workers at start-up")
    p.add_argument("--drain-s", type=float, default=30.0)
    p.add_argument("--router-fallback", choices=["llm", "slm", "fail"], default="llm",
                   help="when the router is unreachable: route to the LLM (keep quality), keep the SLM's "
                        "token (keep speed) or fail the request")
    p.add_argument("--llm-prefetch-min-tokens", type=int, default=0, metavar="N",
                   help="eager LLM catch-up: while an LLM replica is idle, catch up sessions that lag by >= N "
                        "tokens (their prompts first), so a routed token costs a short extend; 0 = off "
                        "(coordinator/prefetch.py)")
    p.add_argument("--lookahead", action=argparse.BooleanOptionalAction, default=True,
                   help="send each session's next extend as soon as its token is known, before the router has "
                        "judged it; discarded when the LLM changes the token (coordinator/lookahead.py)")
    p.add_argument("--llm-only-above-sessions", type=sessions_or_off, default=None, metavar="N|off",
                   help="while more than N requests are active, routed requests are written by the LLM alone "
                        "(where batched LLM decode is compute-bound, e.g. a small CPU under load, R2R's SLM steps "
                        "only add work; the bench sweep shows the crossover); default off "
                        "(coordinator/load_policy.py)")
    p.add_argument("--verify-max-draft", type=int, default=0, metavar="N",
                   help="verify mode (requests with rollback_below): the LLM judges the SLM's tokens at least every "
                        "N tokens unless the request sets max_draft_tokens; 0 = only where the router routes "
                        "(coordinator/verify.py)")
    p.add_argument("--lookahead-min-probability", type=probability, default=0.0, metavar="P",
                   help="no lookahead on an SLM proposal the SLM gives a probability below P: such tokens are the "
                        "likely routes, where an early SLM forward competes with the LLM's catch-up for shared "
                        "cores; 0 = always look ahead (coordinator/lookahead.py)")
    p.add_argument("--verify-min-draft-probability", type=probability, default=0.0, metavar="P",
                   help="verify mode: a draft also ends where the SLM gives its token a probability below P, unless "
                        "the request sets min_draft_probability (0.4 is Hugging Face's assistant default); 0 = off")
    p.add_argument("--system-prompt", default="", help="system message for chat requests that carry none")
    p.add_argument("--chat-template-kwargs", type=_json_object, default={}, metavar="JSON",
                   help='extra apply_chat_template arguments, e.g. \'{"enable_thinking": false}\'')
    p.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics port (0 = off)")
    p.add_argument("--dns-refresh-s", type=float, default=10.0, help="re-resolve dns:/// endpoints this often")
    add_server_tls_args(p)
    add_client_tls_args(p, "the workers and the router")
    add_auth_args(p)


def settings_from_args(args: argparse.Namespace) -> CoordinatorSettings:
    return CoordinatorSettings(max_concurrent_sessions=args.max_concurrent_sessions,
                               max_new_sessions_per_s=args.max_new_sessions_per_s,
                               max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_new_tokens,
                               default_max_tokens=args.default_max_tokens, default_threshold=args.threshold,
                               router_fallback=args.router_fallback,
                               llm_prefetch_min_tokens=args.llm_prefetch_min_tokens,
                               lookahead=args.lookahead, llm_only_above_sessions=args.llm_only_above_sessions,
                               verify_max_draft=args.verify_max_draft,
                               verify_min_draft_probability=args.verify_min_draft_probability,
                               lookahead_min_probability=args.lookahead_min_probability,
                               chat=ChatOptions(args.system_prompt, args.chat_template_kwargs))


def probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1], got {text}")
    return value


def sessions_or_off(text: str) -> int | None:
    """A session count >= 0, or off (also an empty value: an unset configuration variable)."""
    if text.strip().lower() in ("", "off", "none"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of sessions or 'off', got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (or 'off'), got {value}")
    return value


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def check_pair(slm: worker_pb2.WorkerInfo, llm: worker_pb2.WorkerInfo, router_info) -> None:
    if slm.tokenizer_fingerprint != llm.tokenizer_fingerprint:
        raise PairMismatch(
            f"the SLM and LLM tokenizers differ: SLM {slm.model_name!r} has tokenizer {slm.tokenizer_fingerprint}, "
            f"LLM {llm.model_name!r} has {llm.tokenizer_fingerprint}; R2R needs a pair that shares one tokenizer")
    if router_info.hidden_size and router_info.hidden_size != slm.hidden_size:
        raise PairMismatch(f"the router expects SLM hidden size {router_info.hidden_size} "
                           f"({router_info.slm_name or 'unnamed SLM'}), but SLM {slm.model_name!r} has {slm.hidden_size}")
    if router_info.top_k and router_info.top_k != slm.features_top_k:
        raise PairMismatch(f"the router expects top-{router_info.top_k} logits; the SLM worker sends "
                           f"top-{slm.features_top_k} (set the worker's --features-top-k)")
    if (router_info.slm_tokenizer_fingerprint and
            router_info.slm_tokenizer_fingerprint != slm.tokenizer_fingerprint):
        raise PairMismatch(f"the router was trained for SLM {router_info.slm_name!r} (tokenizer "
                           f"{router_info.slm_tokenizer_fingerprint}); the SLM worker serves {slm.model_name!r} "
                           f"(tokenizer {slm.tokenizer_fingerprint})")


async def start_coordinator(slm: str | list[str], llm: str | list[str], router: str,
                            settings: CoordinatorSettings | None = None, host: str = "127.0.0.1", port: int = 0,
                            connect_timeout_s: float = 600.0, dns_refresh_s: float = 10.0,
                            tls: ServerTLS | None = None, upstream_tls: ClientTLS | None = None,
                            auth_tokens: list[str] | None = None) -> ServiceHandle:
    """Connect to the workers and the router, then serve the public API. `tls`: this port's TLS (mTLS with a
    client CA); `upstream_tls`: TLS (and the client certificate) for the channels to workers and router;
    `auth_tokens`: if any, every call but health/reflection needs `authorization: Bearer <one of them>`."""
    settings = settings or CoordinatorSettings()
    slm_pool = WorkerPool("slm", slm, DEFAULT_MAX_MESSAGE_BYTES, refresh_s=dns_refresh_s, tls=upstream_tls)
    llm_pool = WorkerPool("llm", llm, DEFAULT_MAX_MESSAGE_BYTES, refresh_s=dns_refresh_s, tls=upstream_tls)
    router_client = RouterClient(router, DEFAULT_MAX_MESSAGE_BYTES, tls=upstream_tls)
    if upstream_tls is not None:
        log.info("upstream_tls", **upstream_tls.describe())
    try:
        await asyncio.gather(slm_pool.connect(connect_timeout_s), llm_pool.connect(connect_timeout_s),
                             router_client.connect(connect_timeout_s))
        check_pair(slm_pool.info, llm_pool.info, router_client.info)
        files = await slm_pool.replicas[0].stub.GetTokenizer(worker_pb2.GetTokenizerRequest(), timeout=60)
        tokenizer = await asyncio.to_thread(load_tokenizer_from_files, dict(files.files))
        if fingerprint(tokenizer) != slm_pool.info.tokenizer_fingerprint:
            raise PairMismatch("the tokenizer files the SLM worker sent do not match its fingerprint")
    except BaseException:
        await asyncio.gather(slm_pool.close(), llm_pool.close(), router_client.close())
        raise
    eos = set(slm_pool.info.eos_token_ids) | set(llm_pool.info.eos_token_ids)
    servicer = CoordinatorServicer(settings, tokenizer, slm_pool, llm_pool, router_client, eos)

    def register(server):
        coordinator_pb2_grpc.add_CoordinatorServicer_to_server(servicer, server)
        return [SERVICE_NAME]

    interceptors = [BearerTokenInterceptor(auth_tokens)] if auth_tokens else []
    try:
        handle = await start_server(register, host=host, port=port, tls=tls, interceptors=interceptors)
    except BaseException:
        await asyncio.gather(slm_pool.close(), llm_pool.close(), router_client.close())
        raise
    if auth_tokens:
        log.info("auth_enabled", scheme="bearer", tokens=len(auth_tokens))

    async def close_clients():
        await servicer.flush_releases()  # requests cut by the stop scheduled releases: send them first
        await asyncio.gather(slm_pool.close(), llm_pool.close(), router_client.close())

    handle.on_stop.append(close_clients)
    handle.servicer = servicer
    await handle.set_serving(True)
    log.info("listening", port=handle.port, host=host, slm=slm_pool.info.model_name, llm=llm_pool.info.model_name,
             router=router_client.info.strategy, threshold=servicer.default_threshold)
    return handle


async def run_coordinator(args: argparse.Namespace) -> None:
    start_metrics_server(args.metrics_port)
    handle = await start_coordinator(args.slm, args.llm, args.router, settings_from_args(args), args.host, args.port,
                                     args.connect_timeout_s, args.dns_refresh_s, tls=server_tls_from_args(args),
                                     upstream_tls=client_tls_from_args(args), auth_tokens=tokens_from_args(args))
    print(f"coordinator listening on {args.host}:{handle.port}", flush=True)

    handle.before_stop.append(lambda: handle.servicer.drain(args.drain_s))
    await serve_until_signal(handle, grace_s=5.0)
