"""The `r2r` command: serve locally, generate, or run one service (for separate nodes)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from dataclasses import dataclass, field

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub unless the user asks
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Before torch loads libgomp: after a forward, its helper threads busy-wait 300,000 spins by default (~10 ms
# here) before sleeping, which takes the cores from the other worker process: on 2 cores 4 concurrent R2R
# sessions ran at 4.8 tok/s together instead of 15.1 with 10,000 spins (inside a forward the gaps between
# parallel regions are microseconds, so a step slows little). Set GOMP_SPINCOUNT yourself to override.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")


def _run_async(coro) -> int:
    try:
        asyncio.run(coro)
    except KeyboardInterrupt:
        pass
    return 0


# ---- single services ---------------------------------------------------------------------------
def cmd_worker(args) -> int:
    from r2r_serve.common.logging import configure_logging
    from r2r_serve.worker.app import run_worker

    configure_logging(f"worker-{args.role}")
    return _run_async(run_worker(args))


def cmd_router(args) -> int:
    from r2r_serve.common.logging import configure_logging
    from r2r_serve.router.app import run_router

    configure_logging("router")
    return _run_async(run_router(args))


def cmd_gateway(args) -> int:
    from r2r_serve.common.logging import configure_logging
    from r2r_serve.gateway.app import run_gateway

    configure_logging("gateway")
    return _run_async(run_gateway(args))


def cmd_coordinator(args) -> int:
    from r2r_serve.common.logging import configure_logging
    from r2r_serve.coordinator.app import run_coordinator

    configure_logging("coordinator")
    return _run_async(run_coordinator(args))


# ---- local serving -----------------------------------------------------------------------------
def _prepared(name: str) -> str:
    """resolve_model, preparing the default pair first when one of its models is asked for and missing."""
    from r2r_serve.models.registry import ModelNotPreparedError, resolve_model

    try:
        return resolve_model(name)
    except ModelNotPreparedError:
        print("The default model pair is not prepared yet; preparing it now (one time, several minutes).",
              file=sys.stderr, flush=True)
        from r2r_serve.models.prepare import main as prepare_main

        if prepare_main([]) != 0:
            raise SystemExit("model preparation failed (see above)")
        return resolve_model(name)


@dataclass
class ServePlan:
    """What `r2r serve` starts: the models, dtypes, router and chat options, from the pair file and flags."""

    slm: str
    llm: str
    slm_dtype: str
    llm_dtype: str
    router_strategy: str = "auto"
    router_checkpoint: str | None = None
    threshold: float | None = None
    coordinator_args: list[str] = field(default_factory=list)
    pair: str = ""


def resolve_models(args):
    """(slm, llm, pair config or None): --tiny models, else flags over the pair file (`--pair`, else the
    default pair's when --slm/--llm are not both given)."""
    from r2r_serve.models.pair_config import DEFAULT_PAIR_NAME, load_pair_config

    if getattr(args, "tiny", None):
        from r2r_serve.testing.tiny import build_tiny_pair

        paths = build_tiny_pair(args.tiny)
        return str(paths["slm"]), str(paths["llm"]), None
    pair_name = getattr(args, "pair", None)
    if not pair_name and args.slm and args.llm:
        return args.slm, args.llm, None
    pair = load_pair_config(pair_name or DEFAULT_PAIR_NAME)
    return args.slm or _prepared(pair.slm.model), args.llm or _prepared(pair.llm.model), pair


def serve_plan(args) -> ServePlan:
    """Flags win over the pair file, which names the models, their dtype per device kind, the router and chat
    options; its router is used only with its own SLM (a router reads one SLM's features)."""
    from r2r_serve.models.pair_config import auto_dtype

    slm, llm, pair = resolve_models(args)

    def dtype(flag: str, role) -> str:
        chosen = flag if flag != "auto" else (role.dtype_for(args.device) if role else "auto")
        return auto_dtype(args.device) if chosen == "auto" else chosen

    plan = ServePlan(slm, llm, dtype(args.slm_dtype, pair and pair.slm), dtype(args.llm_dtype, pair and pair.llm),
                     args.router_strategy, args.router_checkpoint, args.threshold, pair=pair.name if pair else "")
    if args.llm_prefetch_min_tokens:
        plan.coordinator_args += ["--llm-prefetch-min-tokens", str(args.llm_prefetch_min_tokens)]
    if not args.lookahead:
        plan.coordinator_args.append("--no-lookahead")
    if args.llm_only_above_sessions is not None:
        plan.coordinator_args += ["--llm-only-above-sessions", str(args.llm_only_above_sessions)]
    if pair is None:
        return plan
    if args.router_strategy == "auto" and not args.router_checkpoint and not args.slm:
        plan.router_strategy, plan.router_checkpoint = pair.router_strategy, pair.router_checkpoint
        if plan.threshold is None:
            plan.threshold = pair.threshold
    if pair.system_prompt:
        plan.coordinator_args += ["--system-prompt", pair.system_prompt]
    if pair.template_kwargs:
        plan.coordinator_args += ["--chat-template-kwargs", json.dumps(pair.template_kwargs)]
    return plan


def cmd_serve(args) -> int:
    from r2r_serve.common.security import generate_dev_certs, load_tokens
    from r2r_serve.launcher import LocalCluster, start_deployment

    from r2r_serve.models.pair_config import PairConfigError

    try:
        plan = serve_plan(args)
    except (PairConfigError, FileNotFoundError) as exc:
        print(f"r2r serve: {exc}", file=sys.stderr)
        return 2
    slm, llm, slm_dtype, llm_dtype = plan.slm, plan.llm, plan.slm_dtype, plan.llm_dtype
    if args.slm_quantize != "none" or args.llm_quantize != "none":
        from r2r_serve.worker.engine import check_quantize

        try:  # refuse before any worker starts (each worker would refuse too, one log file later)
            check_quantize(args.slm_quantize, args.device, slm_dtype)
            check_quantize(args.llm_quantize, args.device, llm_dtype)
        except ValueError as exc:
            print(f"r2r serve: {exc}", file=sys.stderr)
            return 2
    token = (load_tokens(args.auth_token) or [None])[0]
    certs = generate_dev_certs(args.tls_dir) if args.tls_dir else None
    cluster = LocalCluster(args.log_dir, tls=certs.client() if certs else None)
    print(f"logs: {cluster.log_dir}", flush=True)
    if certs:
        print(f"TLS: certificates in {certs.dir} (mutual TLS between the services)", flush=True)
    try:
        d = start_deployment(cluster, slm=slm, llm=llm, slm_dtype=slm_dtype, llm_dtype=llm_dtype, device=args.device,
                             threads=args.threads, slm_replicas=args.slm_replicas, llm_replicas=args.llm_replicas,
                             router_strategy=plan.router_strategy, router_checkpoint=plan.router_checkpoint,
                             threshold=plan.threshold, port=args.port, certs=certs, token=token,
                             slm_quantize=args.slm_quantize, llm_quantize=args.llm_quantize,
                             slm_draft_vocab=args.slm_draft_vocab, coordinator_args=plan.coordinator_args)
        coord_ep = d.coordinator
        print(f"R2R coordinator listening on {coord_ep}  (slm {d.slm}, llm {d.llm}, router {d.router})", flush=True)
        if args.gateway_port:
            from r2r_serve.gateway.app import wait_http_healthy

            gw_args, scheme, context = ["gateway", "--coordinator", coord_ep], "http", None
            if certs:
                import ssl

                gw_args += ["--tls-ca", str(certs.ca), "--tls-cert", str(certs.server_cert),
                            "--tls-key", str(certs.server_key)]
                scheme, context = "https", ssl.create_default_context(cafile=str(certs.ca))
            gw = cluster.start("gateway", gw_args, port=args.gateway_port, env={"R2R_TOKEN": token} if token else None,
                               ready=lambda ep, t, alive: wait_http_healthy(f"{scheme}://{ep}/health", t, alive,
                                                                            ssl_context=context))
            print(f"OpenAI-compatible gateway on {scheme}://{gw}/v1", flush=True)
        client_tls = certs.client(with_cert=False) if certs else None
        if args.prompt:
            return _generate(coord_ep, args.prompt, args, token=token, tls=client_tls)
        hint = "".join([f" --tls-ca {certs.ca}" if certs else "", " --token $R2R_TOKEN" if token else ""])
        print(f"Ctrl-C to stop. Try: r2r generate{hint} \"Write a Python function that reverses a string\"",
              flush=True)
        import signal
        import time

        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        while (dead := cluster.check_alive()) is None:
            time.sleep(1.0)
        print(f"{dead.name} exited (code {dead.process.returncode}); see {dead.log_path}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        print("stopping services ...", file=sys.stderr, flush=True)
        cluster.stop()


# ---- client ------------------------------------------------------------------------------------
def _generate(target: str, prompt: str, args, token: str | None = None, tls=None) -> int:
    from rich.console import Console
    from rich.text import Text

    from r2r_client import R2RClient, R2RError

    console = Console(highlight=False, force_terminal=None if args.color == "auto" else args.color == "always",
                      no_color=args.color == "never")
    mark_llm = args.color == "never" or not console.is_terminal
    messages = prompt if args.raw else [{"role": "user", "content": prompt}]
    params = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                  seed=args.seed, stop=args.stop or (), threshold=args.threshold, llm_share=args.llm_share,
                  rollback_below=args.rollback_below, max_draft_tokens=args.max_draft_tokens,
                  min_draft_probability=args.min_draft_probability)
    tls_kw = {} if tls is None else dict(tls=True, tls_ca=tls.ca, tls_client_cert=tls.cert, tls_client_key=tls.key,
                                         tls_server_name=tls.server_name)
    with R2RClient(target, wait_for_ready=True, token=token, **tls_kw) as client:
        try:
            stream = client.stream(messages, timeout=args.timeout, **params)
            tokens = []
            for tok in stream:
                tokens.append(tok)
                if args.json:
                    continue
                if tok.source == "llm":
                    console.print(Text(f"«{tok.text}»" if mark_llm else tok.text, style="bold magenta"), end="")
                else:
                    console.print(Text(tok.text), end="")
        except R2RError as exc:
            console.print(f"\nerror ({exc.code.name}): {exc.details}", style="red")
            return 2
    s = stream.stats
    if args.json:
        print(json.dumps({"text": stream.text, "token_ids": [t.token_id for t in tokens],
                          "sources": [t.source for t in tokens], "stats": vars(s)}))
        return 0
    console.print(Text(s.text_tail), end="")
    legend = "«…» = written by the LLM" if mark_llm else "magenta = written by the LLM"
    by_load = f", {s.load_llm_only_tokens} of them alone under load" if s.load_llm_only_tokens else ""
    console.print(f"\n\n— {s.completion_tokens} tokens · LLM wrote {100 * s.llm_share:.1f}% ({s.llm_tokens}{by_load}) · "
                  f"{s.tokens_per_s:.2f} tok/s · TTFT {s.time_to_first_token_s:.2f} s · finish: {s.finish_reason} "
                  f"· {legend}", style="dim")
    return 0


def cmd_generate(args) -> int:
    from r2r_serve.common.security import client_tls_from_args

    return _generate(args.target, args.prompt, args, token=args.token, tls=client_tls_from_args(args))


def cmd_models(args) -> int:
    from r2r_serve.models.prepare import main as prepare_main

    return prepare_main(args.rest)


def cmd_make_tiny_models(args) -> int:
    from r2r_serve.testing.tiny import build_tiny_pair

    for name, path in build_tiny_pair(args.out).items():
        print(f"{name}: {path}")
    return 0


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--threshold", type=float, default=None, help="router threshold (default: the server's)")
    p.add_argument("--llm-share", type=float, default=None,
                   help="instead of --threshold: the share of tokens the LLM should write (needs a trained router)")
    p.add_argument("--rollback-below", type=float, default=None, metavar="P",
                   help="verify mode: at routed tokens the LLM judges the SLM's tokens and rolls back the first it "
                        "gives P < this (1 = every disagreement: the LLM's own answer); tokens stream once judged")
    p.add_argument("--max-draft-tokens", type=int, default=None, metavar="N",
                   help="verify mode: the LLM judges at least every N SLM tokens (0 = only where the router "
                        "routes; default: the server's)")
    p.add_argument("--min-draft-probability", type=float, default=None, metavar="P",
                   help="verify mode: a draft also ends where the SLM gives its token a probability below P "
                        "(0.4 = Hugging Face's assistant default; 0 = off; default: the server's)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", help="stop sequence (repeatable)")
    p.add_argument("--raw", action="store_true", help="send the prompt as plain text, without the chat template")
    p.add_argument("--timeout", type=float, default=None, help="seconds")
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")


def build_parser() -> argparse.ArgumentParser:
    from r2r_serve.common.security import add_client_tls_args
    from r2r_serve.coordinator.app import add_coordinator_args, sessions_or_off
    from r2r_serve.gateway.app import add_gateway_args
    from r2r_serve.router.app import add_router_args
    from r2r_serve.router.strategies import STRATEGIES
    from r2r_serve.worker.app import add_worker_args, worker_dtype_arg
    from r2r_serve.worker.engine import QUANTIZE_CHOICES

    parser = argparse.ArgumentParser(prog="r2r", description="R2R small/large model token routing over gRPC")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run SLM worker, LLM worker, router and coordinator locally")
    p.add_argument("--pair", help="model pair config: a packaged pair's name (default: qwen2.5-coder when --slm/--llm "
                                  "are not both given) or a TOML file; flags override it")
    p.add_argument("--slm", help="SLM folder or id (default: the pair's)")
    p.add_argument("--llm", help="LLM folder or id (default: the pair's)")
    p.add_argument("--tiny", metavar="DIR", help="build (once) and serve tiny random test models from DIR")
    p.add_argument("--device", default="cpu")
    dtype_help = ("auto (bf16 on GPUs and CPUs with bf16 units, bfloat16/float32 on other x86 CPUs), a dtype, or "
                  "DECODE/PREFILL: short forwards in DECODE, long ones in PREFILL (see r2r worker --help)")
    p.add_argument("--slm-dtype", default="auto", type=worker_dtype_arg, help=dtype_help)
    p.add_argument("--llm-dtype", default="auto", type=worker_dtype_arg, help=dtype_help)
    quantize_help = ("int8-weight: int8 weights for decode steps, activations in the worker's dtype (CPU; "
                     "1.5x cheaper steps, top-1 drift about twice bf16's); int8: dynamic int8 linear layers (CPU, "
                     "float32 only; outputs drift far more)")
    p.add_argument("--slm-quantize", default="none", choices=list(QUANTIZE_CHOICES),
                   help=f"the SLM worker's --quantize. {quantize_help}")
    p.add_argument("--llm-quantize", default="none", choices=list(QUANTIZE_CHOICES),
                   help=f"the LLM worker's --quantize. {quantize_help}")
    p.add_argument("--slm-draft-vocab", type=int, default=0, metavar="N",
                   help="the SLM worker's --draft-vocab: its head scores only the N most frequent tokens "
                        "(a cheaper step; lossless in verify mode at rollback_below 1). 0 = off")
    p.add_argument("--threads", type=int, default=0, help="torch threads per worker (0 = default)")
    p.add_argument("--slm-replicas", type=int, default=1, help="SLM worker processes")
    p.add_argument("--llm-replicas", type=int, default=1, help="LLM worker processes")
    p.add_argument("--router-strategy", default="auto", choices=list(STRATEGIES),
                   help="auto = the pair's router (the shipped neural router for the default pair), else "
                        "neural with --router-checkpoint, else entropy")
    p.add_argument("--router-checkpoint")
    p.add_argument("--llm-prefetch-min-tokens", type=int, default=0, metavar="N",
                   help="eager LLM catch-up of lags >= N tokens while the LLM is idle (0 = off; see r2r coordinator)")
    p.add_argument("--lookahead", action=argparse.BooleanOptionalAction, default=True,
                   help="send each next extend before the router has judged the token (see r2r coordinator)")
    p.add_argument("--llm-only-above-sessions", type=sessions_or_off, default=None, metavar="N|off",
                   help="above N active requests the LLM writes routed requests alone (default off; "
                        "see r2r coordinator)")
    p.add_argument("--port", type=int, default=50051, help="coordinator port")
    p.add_argument("--gateway-port", type=int, default=0, help="also start the OpenAI-compatible gateway (0 = no)")
    p.add_argument("--log-dir", help="where service logs go (default: a new temp folder)")
    p.add_argument("--prompt", help="answer this prompt, then stop the services")
    p.add_argument("--tls-dir", metavar="DIR",
                   help="mutual TLS between the services and TLS on the public ports, with a throwaway CA and "
                        "loopback certificates made in DIR if it has none (ca.pem there is what clients trust)")
    p.add_argument("--auth-token", default=os.environ.get("R2R_AUTH_TOKEN") or None, metavar="TOKEN",
                   help="the coordinator requires 'authorization: Bearer TOKEN' [env R2R_AUTH_TOKEN]")
    _add_generation_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("generate", help="stream an answer from a running coordinator")
    p.add_argument("prompt")
    p.add_argument("--target", default=os.environ.get("R2R_TARGET", "127.0.0.1:50051"), help="coordinator HOST:PORT")
    p.add_argument("--token", default=os.environ.get("R2R_TOKEN") or None,
                   help="bearer token for a coordinator run with --auth-token [env R2R_TOKEN]")
    _add_generation_args(p)
    add_client_tls_args(p, "the coordinator", short_cert_names=True)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("worker", help="run one model worker (SLM or LLM role)")
    add_worker_args(p)
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("router", help="run the router service")
    add_router_args(p)
    p.set_defaults(func=cmd_router)

    p = sub.add_parser("coordinator", help="run the coordinator (the public API)")
    add_coordinator_args(p)
    p.set_defaults(func=cmd_coordinator)

    p = sub.add_parser("gateway", help="run the OpenAI-compatible HTTP gateway in front of a coordinator")
    add_gateway_args(p)
    p.set_defaults(func=cmd_gateway)

    p = sub.add_parser("models", help="prepare the default model pair: r2r models prepare [--cache-dir D]")
    p.add_argument("action", choices=["prepare"])
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_models)

    from r2r_serve.training.cli import add_label_args, add_train_args, run_label, run_train

    p = sub.add_parser("label", help="label SLM tokens with the LLM for router training (resumable stages)")
    add_label_args(p)
    p.set_defaults(func=run_label)

    p = sub.add_parser("train-router", help="train and calibrate a router on a labeled run")
    add_train_args(p)
    p.set_defaults(func=run_train)

    p = sub.add_parser("make-tiny-models", help="write a tiny random SLM/LLM pair (tests, demos)")
    p.add_argument("out")
    p.set_defaults(func=cmd_make_tiny_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
