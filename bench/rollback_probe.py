"""How strongly does the LLM disagree with the SLM's answers? The data behind verify mode's rollback_below.

    python -m bench.rollback_probe bench/results/<run>/answers/slm-0.json --limit 24

Reads saved SLM-alone answers (the harness's answers files), lets the LLM read each prompt + answer once
(teacher-forced, in-process) and, at every answer position where its own greedy choice differs from the SLM's
token, records the probability it gives the SLM's token. Verify mode rolls back the first such token below
rollback_below, so the quantiles say how many disagreements a value would reject, and the per-answer counts
how far apart rollbacks would fall. The answer text is tokenized again, which can differ from the generated
ids at a few positions: a probe, not a replay.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench import humaneval  # noqa: E402
from bench.args import add_pair_args, resolve_auto_dtypes  # noqa: E402

CUTS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3)


@torch.inference_mode()
def disagreements(model, tokenizer, messages: list[dict], answer: str) -> tuple[int, list[float]]:
    """(answer tokens, P_LLM(SLM token) at each answer position where the LLM's greedy choice differs)."""
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + answer_ids], device=model.device)
    logits = model(ids).logits[0, len(prompt_ids) - 1: -1].float()  # predicts each answer position
    probs = logits.softmax(-1)
    fed = torch.tensor(answer_ids, device=model.device)
    differ = logits.argmax(-1) != fed
    return len(answer_ids), probs.gather(-1, fed[:, None])[:, 0][differ].tolist()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("answers", type=Path, help="an SLM-alone answers file (bench/results/<run>/answers/slm-0.json)")
    add_pair_args(p, "float32")
    p.add_argument("--limit", type=int, default=24, help="answers to read")
    p.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = p.parse_args(argv)
    resolve_auto_dtypes(args)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from r2r_serve.cli import resolve_models
    from r2r_serve.common.tensors import parse_dtype
    from r2r_serve.common.dtypes import parse_dtype_policy

    _, llm_path, _ = resolve_models(args)
    dtype = parse_dtype(parse_dtype_policy(args.llm_dtype).prefill)  # one long forward per answer
    model = AutoModelForCausalLM.from_pretrained(llm_path, dtype=dtype).to(args.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(llm_path)
    problems = {p.task_id: p for p in humaneval.load_problems()}
    record = json.loads(args.answers.read_text())
    per_answer, every = [], []
    for o in record["outcomes"][: args.limit]:
        n, probs = disagreements(model, tokenizer, humaneval.chat_messages(problems[o["key"]]), o["text"])
        per_answer.append({"key": o["key"], "tokens": n, "disagreements": len(probs),
                           "below": {f"{c:g}": sum(q < c for q in probs) for c in CUTS}})
        every += probs
    tokens = sum(a["tokens"] for a in per_answer)
    summary = {"answers": len(per_answer), "tokens": tokens, "disagreements": len(every),
               "disagreement_rate": len(every) / tokens if tokens else 0.0,
               "p_quantiles": {f"{q:g}": statistics.quantiles(every, n=20)[int(q * 20) - 1] for q in (0.1, 0.25, 0.5, 0.75, 0.9)}
               if len(every) >= 20 else None,
               "rejected_share": {f"{c:g}": sum(q < c for q in every) / len(every) if every else 0.0 for c in CUTS},
               "per_answer": per_answer, "llm": llm_path, "dtype": str(dtype)}
    print(f"{len(per_answer)} answers, {tokens} tokens: the LLM would have written another token at "
          f"{len(every)} ({100 * summary['disagreement_rate']:.1f}%)")
    for c in CUTS:
        hit = sum(a["below"][f"{c:g}"] for a in per_answer)
        print(f"  P(SLM token) < {c:<4g}: {hit:4d} of them ({100 * hit / max(1, len(every)):.0f}%), "
              f"{hit / len(per_answer):.1f} per answer")
    if args.out:
        args.out.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
