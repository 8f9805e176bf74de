"""The engine's fast paths (EngineConfig.fast_paths=True, the default) against its reference paths.

Fast: decode-only batches run on a persistent, batch-major DecodeGroup (no KV re-padding while a batch
stays the same), tokens and router features computed batched with one host copy. Reference: the ragged,
re-padded forward for every batch and features.router_features row by row. Both engines get the same
calls (the reference engine's tokens are fed to both), through membership changes, reordering, a prefill
joining decoders, a crop, a release, sampling and partial feature requests; outputs must agree: tokens
exactly, floats to float64 rounding.
"""

from __future__ import annotations

import pytest
import torch

from conftest import worker_config
from r2r_serve.common.tensors import from_proto
from r2r_serve.worker.engine import ExtendWork, ModelEngine, forward_kind
from r2r_serve.worker.sampling import Sampling

PROMPTS = [
    list(range(5, 17)),
    list(range(40, 47)),
    list(range(100, 121)),
    [7, 8, 9],
    list(range(200, 230)),
]


def _engine(tiny_pair, fast: bool, **kw) -> ModelEngine:
    engine = ModelEngine(worker_config(tiny_pair["slm"], "slm", fast_paths=fast, **kw))
    engine.load()
    return engine


@pytest.fixture(scope="module")
def engines(tiny_pair):
    return _engine(tiny_pair, True), _engine(tiny_pair, False)


def _same_features(a, b):
    assert (a is None) == (b is None)
    if a is None:
        return
    assert a.token_id == b.token_id and a.vocab_size == b.vocab_size
    assert a.entropy == pytest.approx(b.entropy, rel=1e-9, abs=1e-12)
    assert a.top1_prob == pytest.approx(b.top1_prob, rel=1e-9, abs=1e-12)
    for field in ("hidden_state", "topk_logits", "token_embedding"):
        x, y = getattr(a, field), getattr(b, field)
        assert x.dtype == y.dtype and list(x.shape) == list(y.shape)
        torch.testing.assert_close(from_proto(x), from_proto(y), rtol=1e-9, atol=1e-12)


class Pair:
    """Drives a fast and a reference engine with identical calls and checks that they answer alike."""

    def __init__(self, fast: ModelEngine, ref: ModelEngine, tag: str):
        self.fast, self.ref, self.tag = fast, ref, tag
        self.history: dict[str, list[int]] = {}
        self.next: dict[str, int] = {}

    def sid(self, n: int) -> str:
        return f"{self.tag}-{n}"

    def open(self, *ns: int) -> None:
        """Prefill sessions (together, in one ragged batch)."""
        self.run([(n, PROMPTS[n % len(PROMPTS)]) for n in ns])

    def step(self, *ns: int, sampling: dict[int, Sampling] | None = None, features=None) -> None:
        """One decode step of the given sessions, each with its own next token."""
        self.run([(n, [self.next[self.sid(n)]]) for n in ns], sampling=sampling, features=features)

    def run(self, items, sampling=None, features=None, position=None):
        sampling, position = sampling or {}, position or {}
        works = []
        for n, toks in items:
            sid = self.sid(n)
            hist = self.history.setdefault(sid, [])
            pos = position.get(n, len(hist))
            del hist[pos:]
            works.append(ExtendWork(sid, pos, list(toks), sampling=sampling.get(n, Sampling()),
                                    want_features=True if features is None else n in features))
            hist.extend(toks)
        got, want = self.fast.extend(works), self.ref.extend(works)
        for g, w in zip(got, want):
            assert (g.session_id, g.status, g.held_tokens, g.token) == (w.session_id, w.status, w.held_tokens, w.token)
            assert g.status == "ok", w.error
            assert g.logprob == pytest.approx(w.logprob, rel=1e-9, abs=1e-12)
            _same_features(g.features, w.features)
            self.next[g.session_id] = w.token
        return got


def _count_regroups(engine, monkeypatch) -> list[int]:
    calls = [0]
    original = engine._regroup

    def counting(sessions):
        calls[0] += 1
        return original(sessions)

    monkeypatch.setattr(engine, "_regroup", counting)
    return calls


def test_steady_decode_batch_reuses_its_kv(engines, monkeypatch):
    fast, ref = engines
    pair = Pair(fast, ref, "steady")
    pair.open(0, 1, 2)
    regroups = _count_regroups(fast, monkeypatch)
    for _ in range(50):  # past the first capacity: the group grows in place
        pair.step(0, 1, 2)
    assert regroups[0] == 1
    group = fast.kv.get(pair.sid(0)).group
    assert group is not None and group.rows == 3 and group.width == max(len(p) for p in PROMPTS[:3]) + 50
    fast.release([pair.sid(n) for n in range(3)])
    ref.release([pair.sid(n) for n in range(3)])
    assert not fast._groups


def test_single_session_decode(engines, monkeypatch):
    pair = Pair(*engines, "single")
    pair.open(3)
    regroups = _count_regroups(engines[0], monkeypatch)
    for _ in range(45):
        pair.step(3)
    assert regroups[0] == 1


def test_membership_changes_order_and_mixed_batches(engines):
    pair = Pair(*engines, "mixed")
    pair.open(0, 1)
    pair.open(2)
    for _ in range(3):
        pair.step(0, 1, 2)
    pair.step(2, 0, 1)          # same members, another order: no rebuild needed
    pair.step(0, 2)             # a subset: 1 stays in the old group
    pair.step(1)
    pair.step(1, 0, 2)          # merged again from two groups
    pair.run([(3, PROMPTS[3]), (0, [pair.next[pair.sid(0)]]), (1, [pair.next[pair.sid(1)]])])  # prefill joins
    for _ in range(3):
        pair.step(0, 1, 2, 3)
    # a resend after a lost response: session 1 goes back 2 tokens (crop out of its group)
    hist = pair.history[pair.sid(1)]
    pair.run([(1, hist[-2:])], position={1: len(hist) - 2})
    pair.step(0, 1, 2, 3)
    # the catch-up chunk of an LLM-like step: several tokens for one session among decoders
    pair.run([(0, [5, 6, 7]), (2, [pair.next[pair.sid(2)]])])
    pair.step(0, 2)
    pair.step(0, 1, 2, 3)
    for eng in engines:
        eng.release([pair.sid(1)])
    pair.step(0, 2, 3)
    pair.step(0, 2, 3)


def test_regrouped_buffers_never_read_what_was_not_written(engines, monkeypatch):
    """Decode groups are allocated uninitialised (only the padding before each row's tokens is zeroed) and rows
    are copied from old groups in runs of adjacent rows. With every new_empty buffer full of NaN, any read of a
    column nobody wrote would poison the outputs: subsets with gaps, a merge of two groups, growth past the
    capacity and a release must all still match the reference."""
    plain = torch.Tensor.new_empty

    def poisoned(self, *size, **kw):
        t = plain(self, *size, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch.Tensor, "new_empty", poisoned)
    pair = Pair(*engines, "poison")
    pair.open(0, 1, 2, 3, 4)
    pair.step(0, 1, 2, 3, 4)
    pair.step(0, 2, 4)           # rows 0, 2, 4 of the old group: three runs
    pair.step(3, 1, 0)           # 1 and 3 from the first group, 0 from the second
    pair.step(0, 1, 2, 3, 4)     # merged from three groups
    for _ in range(40):          # past the group's first capacity: it grows into a fresh buffer
        pair.step(0, 1, 2, 3, 4)
    for eng in engines:
        eng.release([pair.sid(2)])
    pair.step(4, 0, 1)
    pair.step(4, 3, 0, 1)


def test_sampling_and_partial_features(engines):
    pair = Pair(*engines, "sample")
    pair.open(0, 1, 2, 4)
    seeded = {1: Sampling(temperature=0.8, top_p=0.9, seed=11), 4: Sampling(temperature=1.3, top_k=5, seed=3)}
    for step in range(6):
        pair.step(0, 1, 2, 4, sampling=seeded, features={0, 4} if step % 2 else set())
    pair.step(0, 1, 2, 4, features={2})


def test_features_in_bfloat16_and_new_single_token_sessions(tiny_pair):
    fast = _engine(tiny_pair, True, features_dtype="bfloat16")
    ref = _engine(tiny_pair, False, features_dtype="bfloat16")
    pair = Pair(fast, ref, "bf16")
    pair.run([(0, [9]), (1, [10])])  # brand-new sessions, one token each: nothing to group yet
    pair.run([(0, [11]), (1, [12]), (2, PROMPTS[2])])
    for _ in range(4):
        pair.step(0, 1, 2)


def test_eviction_frees_group_rows(tiny_pair):
    fast = _engine(tiny_pair, True, max_total_tokens=45)
    ref = _engine(tiny_pair, False, max_total_tokens=45)
    pair = Pair(fast, ref, "evict")
    pair.open(0, 1)                   # 12 + 7 tokens
    pair.step(0, 1)
    pair.open(4)                      # 30 more than the budget allows: 0 (least recently used) goes
    assert fast.kv.get(pair.sid(0)) is None and ref.kv.get(pair.sid(0)) is None
    pair.step(1, 4)
    pair.step(1, 4)
    assert all(g.live == g.rows for g in fast._groups)


def test_forward_seconds_are_split_by_kind(tiny_pair):
    """GetLoad's prefill_s / decode_s (the harness's "where the time goes"): a session's first forward is a
    prefill, one new token per row a decode step, several an extend; together they are forward_s."""
    engine = _engine(tiny_pair, True)
    assert forward_kind([0, 5], [3, 1]) == "prefill"  # one row starts a session: the forward is a prefill
    assert forward_kind([4, 5], [1, 1]) == "decode" and forward_kind([4, 5], [1, 2]) == "extend"
    spent = []
    for works in ([ExtendWork("a", 0, PROMPTS[0])], [ExtendWork("a", 12, [3])], [ExtendWork("a", 13, [4, 5, 6])]):
        before = dict(engine.forward_s_by_kind)
        engine.extend(works)
        spent.append({k: engine.forward_s_by_kind[k] - before[k] for k in before})
    for kind, delta in zip(("prefill", "decode", "extend"), spent):
        assert delta[kind] > 0 and sum(v for k, v in delta.items() if k != kind) == 0, (kind, delta)
    assert sum(engine.forward_s_by_kind.values()) == pytest.approx(engine.forward_s)
