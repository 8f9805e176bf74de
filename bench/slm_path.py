"""Where a token's time goes on the SLM path: the bare model, the worker over gRPC, the whole service.

    python -m bench.slm_path [--tokens 128] [--rounds 5] [pair flags]

The same prompt, decoded greedily for exactly --tokens tokens (EOS ignored) by three layers, interleaved
round by round so machine drift hits them alike:

  hf        the bare SLM in this process: a plain HF decode loop (one forward per token, DynamicCache)
  worker    the SLM worker's ExtendStream, called directly: one prefill, then one item per token (each
            carrying the token the last step chose), as the coordinator's batcher sends them; also reports
            the worker's own time per item (`forward_ms`: queue, engine thread and the forward)
  service   the coordinator's Generate stream at threshold 2 (the router never routes: SLM alone)

Per-token times leave the prefill / first token out. The gaps between the rows locate the overhead:
worker - hf is the engine and the worker's gRPC, service - worker is the coordinator and its client stream.
Results: a table and bench/results/slm_path-<date>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import torch

from bench import humaneval, runner
from bench.args import add_pair_args, resolve_pair
from bench.machine import write_stamped

LAYERS = ("hf", "worker", "service")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pair_args(p)
    p.add_argument("--tokens", type=int, default=128, help="tokens decoded per run (EOS ignored)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default="bench/results")
    return p.parse_args(argv)


@torch.inference_mode()
def hf_ms_per_token(model, prompt: list[int], tokens: int) -> tuple[float, list[int]]:
    from transformers import DynamicCache

    cache = DynamicCache()
    ids = torch.tensor([prompt])
    out = model(input_ids=ids, cache=cache, use_cache=True)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    chosen = [nxt]
    started = time.perf_counter()
    for _ in range(tokens - 1):
        out = model(input_ids=nxt, cache=cache, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        chosen.append(nxt)
    ids = torch.cat(chosen, dim=1)[0].tolist()  # waits for the device
    return (time.perf_counter() - started) * 1000 / (tokens - 1), ids


async def worker_ms_per_token(endpoint: str, prompt: list[int], tokens: int,
                              session: str) -> tuple[float, float, list[int]]:
    """(wall ms per token, the worker's own forward_ms per token, the tokens) over direct one-item
    ExtendStream calls."""
    import grpc

    from r2r_serve.proto import common_pb2, worker_pb2, worker_pb2_grpc

    greedy = common_pb2.SamplingParams(temperature=0.0)
    async with grpc.aio.insecure_channel(endpoint) as channel:
        stub = worker_pb2_grpc.ModelWorkerStub(channel)
        call = stub.ExtendStream()
        history = list(prompt)
        position, batch, inside = 0, 0, 0.0
        started = 0.0
        for step in range(tokens):
            if step == 1:
                started, inside = time.perf_counter(), 0.0
            batch += 1
            req = worker_pb2.ExtendRequest(batch_id=batch)
            req.items.add(session_id=session, position=position, tokens=history[position:], sampling=greedy)
            await call.write(req)
            resp = await call.read()
            result = resp.results[0]
            if result.status != worker_pb2.EXTEND_OK:
                raise RuntimeError(f"worker answered {result.status}: {result.error}")
            inside += resp.forward_ms
            position = result.held_tokens
            history.append(result.token)
        wall = (time.perf_counter() - started) * 1000 / (tokens - 1)
        await call.done_writing()
        await stub.Release(worker_pb2.ReleaseRequest(session_ids=[session]))
    return wall, inside / (tokens - 1), history[len(prompt):]


async def service_ms_per_token(target: str, messages: list[dict], tokens: int) -> tuple[float, list[int]]:
    from r2r_client import AsyncR2RClient

    async with AsyncR2RClient(target, wait_for_ready=True) as client:
        stamps, ids = [], []
        async for tok in client.stream(messages, max_tokens=tokens, threshold=2.0, ignore_eos=True):
            stamps.append(time.perf_counter())
            ids.append(tok.token_id)
    if len(stamps) < 2:
        raise RuntimeError("the service streamed fewer than 2 tokens")
    return (stamps[-1] - stamps[0]) * 1000 / (len(stamps) - 1), ids


def main(argv=None) -> int:
    args = parse_args(argv)
    slm, llm = resolve_pair(args)
    from r2r_serve.common.dtypes import parse_dtype_policy

    from bench.assisted import _eos_ids as assisted_eos, _load_model, prompt_ids

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    problem = humaneval.load_problems(1)[0]
    messages = humaneval.chat_messages(problem)
    services = runner.start_services(slm, llm, device=args.device, slm_dtype=args.slm_dtype, llm_dtype=args.llm_dtype,
                                     strategies={"entropy": None}, threads=args.threads,
                                     slm_draft_vocab=args.slm_draft_vocab)
    try:
        target = services.coordinators["entropy"]
        # The worker decodes in its policy's DECODE dtype; so does this bare loop.
        model = _load_model(slm, parse_dtype_policy(args.slm_dtype).decode, torch.device(args.device))
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(slm, local_files_only=True)
        if args.slm_draft_vocab:  # the worker's drafting head, on the bare model too
            from r2r_serve.worker.draft_vocab import draft_token_ids, install_draft_head

            vocab = model.get_output_embeddings().out_features
            install_draft_head(model, draft_token_ids(tokenizer, args.slm_draft_vocab, vocab,
                                                      always=assisted_eos(tokenizer, model)))
        prompt = prompt_ids(tokenizer, messages)
        runner.warm_up(target, [2.0])
        hf_ms_per_token(model, prompt, 8)
        ms: dict[str, list[float]] = {name: [] for name in (*LAYERS, "worker_inside")}
        answers: dict[str, list[int]] = {}
        for r in range(args.rounds):
            order = LAYERS[r % 3:] + LAYERS[: r % 3]
            for layer in order:
                if layer == "hf":
                    spent, answers["hf"] = hf_ms_per_token(model, prompt, args.tokens)
                elif layer == "worker":
                    spent, inside, answers["worker"] = asyncio.run(worker_ms_per_token(
                        services.slm.split(",")[0], prompt, args.tokens, f"slm-path-{r}"))
                    ms["worker_inside"].append(inside)
                else:
                    spent, answers["service"] = asyncio.run(service_ms_per_token(target, messages, args.tokens))
                ms[layer].append(spent)
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in ms.items()), flush=True)
    finally:
        services.stop()
    medians = {k: statistics.median(v) for k, v in ms.items()}
    # The same greedy tokens from every layer (in float32 exactly; bf16 kernels may tip a near-tie).
    agree = {layer: answers[layer] == answers["hf"] for layer in LAYERS}
    print(f"\nms per token, median of {args.rounds} rounds ({args.tokens} tokens, SLM {args.slm_dtype}):")
    for k, v in medians.items():
        print(f"  {k:14s} {v:7.1f}  ({1000 / v:5.2f} tok/s)  vs hf {v / medians['hf']:.3f}")
    print("tokens equal to the bare model's:", agree)
    path = write_stamped(args.out, "slm_path", dict(
        slm=str(slm), slm_dtype=args.slm_dtype, tokens=args.tokens, rounds=args.rounds, ms_per_token=ms,
        median_ms_per_token=medians, tokens_agree=agree), args.device)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
