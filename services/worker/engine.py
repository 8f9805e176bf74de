"""A causal LM with per-session KV caches and one batched, ragged `extend` forward.

`extend` takes, for each session, the tokens this worker has not yet consumed, runs ONE forward over the
whole batch and returns each session's next token. Ragged batches are laid out like HF's left-padded
generation: past KV left-padded to the longest past, new tokens right-padded to the longest chunk, a 2D
attention mask marking real entries and explicit position ids per row, so every row computes exactly
what it would alone.

Decode-only batches (one new token per session, the SLM's steady state) take a faster road to the same
numbers (EngineConfig.fast_paths): the batch's KV stays laid out that way between steps in a DecodeGroup
(kv_store.py), preallocated and batch-major, so while the same sessions keep stepping together nothing is
re-padded or split back, and a changed batch is rebuilt with one copy. Tokens, logprobs and router features
are computed for the whole batch in batched ops and read back to the host once.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from r2r_serve.common import metrics
from r2r_serve.common.dtypes import default_prefill_from_tokens, parse_dtype_policy
from r2r_serve.common.logging import get_logger
from r2r_serve.common.memory import trim_heap
from r2r_serve.common.tensors import parse_dtype, to_proto
from r2r_serve.common.tokenizer import fingerprint, tokenizer_files
from r2r_serve.proto import common_pb2
from r2r_serve.worker.features import router_features
from r2r_serve.worker.grouping import DEFAULT_FIXED_ROWS, forward_groups
from r2r_serve.worker.int8_weights import BF16_UNITS_MAX_ROWS, int8_weights_available, quantize_int8_weights
from r2r_serve.worker.kv_store import CapacityError, DecodeGroup, KVStore, SessionKV
from r2r_serve.worker.prepack import prepack_available, prepack_linears
from r2r_serve.worker.sampling import Sampling, choose_tokens, validate

log = get_logger(__name__)

OK, RESYNC, INVALID, OVER_CAPACITY = "ok", "resync", "invalid", "over_capacity"


@dataclass
class ExtendWork:
    session_id: str
    position: int
    tokens: list[int]
    sampling: Sampling = field(default_factory=Sampling)
    want_features: bool = False
    verify_from: int = 0  # judge the fed tokens at positions >= this (verify mode); 0 = none


@dataclass
class Verification:
    """This model's judgement of fed tokens: at positions start, start + 1, ... its own choice (under the
    request's sampling) and the log-probability it gives the token that was fed there."""

    start: int
    tokens: list[int]
    logprobs: list[float]
    choice_logprobs: list[float]


@dataclass
class ExtendOutcome:
    session_id: str
    status: str
    held_tokens: int
    token: int = -1
    logprob: float = 0.0
    features: object | None = None  # common_pb2.RouterFeatures
    error: str = ""
    verification: Verification | None = None


@dataclass
class EngineConfig:
    model: str
    role: str = "slm"
    device: str = "cpu"
    # One dtype, or DECODE/PREFILL (common/dtypes.py): forwards of >= prefill_from_tokens token rows run in
    # PREFILL weights, shorter ones in DECODE weights (also the KV cache's dtype). 0 = the measured crossover
    # for how the PREFILL copy is held (prepacked or not).
    dtype: str = "float32"
    prefill_from_tokens: int = 0
    # float32 linear layers on the CPU use oneDNN prepacked weights (worker/prepack.py): same math, 1.3-2.7x
    # cheaper forwards of 1-32 tokens. False keeps plain nn.Linear.
    prepack: bool = True
    max_sessions: int = 256
    max_tokens_per_session: int = 0       # 0 = the model's context length
    max_total_tokens: int = 1_000_000
    max_batch_tokens: int = 4096          # new tokens per forward; bigger batches are split
    # A forward's fixed cost in token rows (worker/grouping.py): a batch is split into forwards when padding its
    # rows to the longest chunk would cost more than that per extra forward. 0 = the device's default.
    forward_fixed_rows: int = 0
    features_top_k: int = 100
    features_dtype: str = "float32"
    threads: int = 0                      # torch intra-op threads; 0 = torch's default
    attn_implementation: str | None = None
    # "int8": dynamic int8 nn.Linear layers (CPU, float32 only); "int8-weight": int8 weights for short
    # forwards, activations in the model's dtype (CPU; worker/int8_weights.py)
    quantize: str = "none"
    # True: decode-only batches run on persistent per-batch KV (DecodeGroup) and tokens/features are computed
    # batched with one host copy. False: the reference paths (re-padded KV every forward, per-row features),
    # kept for tests and bench/engine_step.py; the outputs are the same.
    fast_paths: bool = True
    # SLM only: the output head keeps the rows of this many frequent tokens (worker/draft_vocab.py); 0 = all.
    draft_vocab: int = 0
    draft_vocab_corpus: str | None = None  # the texts that rank tokens for it; None = the Python standard library


QUANTIZE_SCHEMES = {"int8": "dynamic int8, per-channel",
                    "int8-weight": f"int8 weights, per-channel (bf16 on an AVX2-only CPU: every length; else "
                                   f"below {BF16_UNITS_MAX_ROWS} token rows)"}


QUANTIZE_CHOICES = ("none", *QUANTIZE_SCHEMES)


def check_quantize(quantize: str, device: str, dtype: str) -> None:
    """Refuse a quantization this engine cannot run, before any weights are loaded."""
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"unknown quantize {quantize!r}; choose one of {', '.join(QUANTIZE_CHOICES)}")
    if quantize == "none":
        return
    if torch.device(device).type != "cpu":
        raise ValueError(f"quantize={quantize!r} runs on the CPU only (PyTorch's CPU int8 kernels); "
                         f"device {device!r} must use quantize='none' (bf16 is the GPU choice)")
    if quantize == "int8-weight":
        decode = parse_dtype_policy(dtype).decode
        if decode not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"quantize='int8-weight' needs bfloat16, float16 or float32 decode weights, "
                             f"not {decode!r}")
        if not int8_weights_available():
            raise ValueError("quantize='int8-weight' needs torch.ops.aten._weight_int8pack_mm, which this torch lacks")
        return
    if dtype != "float32":  # a split policy ("bfloat16/float32") too: one set of float32 weights
        raise ValueError(f"quantize={quantize!r} needs dtype float32 (the int8 layers take and return "
                         f"float32 activations), not {dtype!r}")


def quantize_int8(model: torch.nn.Module) -> int:
    """Dynamic int8 quantization of every nn.Linear (lm_head included), in place: int8 weights with
    per-output-channel scales, activations quantized per forward. Per-channel rather than per-tensor: as fast
    for k <= 16 new tokens and closer to fp32 (bench/forward_costs.py). Returns how many layers it quantized."""
    import warnings

    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    count = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*deprecated.*")  # torch.ao.quantization's notices; works in 2.13
        quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
    return count


def quantize_model(model: torch.nn.Module, quantize: str) -> int:
    """Apply a --quantize scheme in place (the decode copy's weights); returns how many layers it replaced.
    The benchmarks call this too, so every baseline runs the same quantized weights as the workers."""
    if quantize == "int8":
        return quantize_int8(model)
    if quantize == "int8-weight":
        return quantize_int8_weights(model)
    if quantize == "none":
        return 0
    raise ValueError(f"unknown quantize {quantize!r}; choose one of {', '.join(QUANTIZE_CHOICES)}")


RELEASED_MEMORY = 65536  # released session ids remembered (refused if they come back)


FORWARD_KINDS = ("prefill", "decode", "extend")


def forward_kind(start_lengths: list[int], new_tokens: list[int]) -> str:
    """`prefill` when any row starts a session (its prompt, or an LLM's first catch-up over prompt and answer so
    far), `decode` when every row adds one token, `extend` otherwise (catch-ups, verify passes)."""
    if any(n == 0 for n in start_lengths):
        return "prefill"
    return "decode" if all(k == 1 for k in new_tokens) else "extend"


class ModelEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.model = None
        self.tokenizer = None
        self.kv: KVStore | None = None
        self.batches = 0
        self.forward_s = 0.0  # summed over every forward (GetLoad reports it)
        # The same seconds by kind of forward (forward_kind): where a worker's time goes under load.
        self.forward_s_by_kind = dict.fromkeys(FORWARD_KINDS, 0.0)
        self.last_forward_ms = 0.0
        # Set to a dict to accumulate seconds per phase of each forward (bench/engine_step.py); None = off.
        # On CUDA every mark synchronizes the device, so only benchmarks should turn it on.
        self.phase_times: dict[str, float] | None = None
        self._mark_at = 0.0
        self._groups: list[DecodeGroup] = []  # decode batches whose KV lives batch-major (fast_paths)
        # Released session ids, newest last: an extend that was already on its way when its session was
        # released (a request cancelled mid-step) must not bring the session back as a KV nobody frees.
        # Written under the lock by any thread (mark_released); the engine thread frees their KV.
        self._released: OrderedDict[str, None] = OrderedDict()
        self._to_free: list[str] = []
        self._release_lock = threading.Lock()

    # ---- loading -------------------------------------------------------------------------------
    def load(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        cfg = self.config
        check_quantize(cfg.quantize, cfg.device, cfg.dtype)
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        path = cfg.model
        if not Path(path).exists() and os.environ.get("HF_HUB_OFFLINE", "1") == "1":
            raise FileNotFoundError(f"model {path!r} is not a local folder and the hub is offline "
                                    "(set HF_HUB_OFFLINE=0 where a hub is reachable, or prepare the model)")
        started = time.perf_counter()
        self.device = torch.device(cfg.device)
        self.policy = parse_dtype_policy(cfg.dtype)
        if cfg.prefill_from_tokens < 0:
            raise ValueError(f"prefill_from_tokens must be >= 1 (or 0 = automatic), got {cfg.prefill_from_tokens}")
        self.dtype = parse_dtype(self.policy.decode)  # also the KV cache's
        self.features_dtype = parse_dtype(cfg.features_dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        kwargs = {}
        if cfg.attn_implementation:
            kwargs["attn_implementation"] = cfg.attn_implementation

        def load_weights(dtype: torch.dtype):
            return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs).to(self.device).eval()

        prefill_dtype = parse_dtype(self.policy.prefill)
        # A split policy holds a second copy of the weights for long forwards (both stay resident). The wider
        # copy loads first: its load peak (about twice its size) then has only the narrow copy's room beside it.
        prefill_model = (load_weights(prefill_dtype)
                         if self.policy.split and prefill_dtype.itemsize > self.dtype.itemsize else None)
        self.model = load_weights(self.dtype)
        if self.policy.split and prefill_model is None:
            prefill_model = load_weights(prefill_dtype)
        self.draft_vocab = self._install_draft_head(self.model, prefill_model)
        params = sum(p.numel() for p in self.model.parameters())
        self.prepacked = 0  # linear layers on prepacked weights, over both copies
        if cfg.prepack and cfg.quantize != "int8" and self.device.type == "cpu" and prepack_available():
            # int8-weight replaces the decode copy's layers: only a separate prefill copy is packed
            packable = (self.model, prefill_model) if cfg.quantize == "none" else (prefill_model,)
            self.prepacked = sum(prepack_linears(m) for m in packable if m is not None)
        packed_prefill = prefill_model is not None and self.prepacked > 0 and prefill_dtype == torch.float32
        self.prefill_from = cfg.prefill_from_tokens or default_prefill_from_tokens(
            packed_prefill, int8_decode=cfg.quantize == "int8-weight")
        if cfg.quantize != "none":
            quantized = quantize_model(self.model, cfg.quantize)
            log.info("model_quantized", model=path, role=cfg.role, scheme=QUANTIZE_SCHEMES[cfg.quantize],
                     linear_layers=quantized)
        mc = self.model.config
        layer_types = set(getattr(mc, "layer_types", None) or ["full_attention"])
        if layer_types != {"full_attention"}:
            raise NotImplementedError(f"{path}: layer types {sorted(layer_types)} are not supported yet "
                                      "(only full-attention decoders)")
        self.decode_weights = _Weights.of(self.model)
        self.prefill_weights = _Weights.of(prefill_model) if prefill_model is not None else self.decode_weights
        self.embedding = self.model.get_input_embeddings()  # router features (same values in either copy)
        self.forwards_by_dtype: dict[str, int] = {}
        self.vocab_size = self.embedding.num_embeddings
        self.max_context = int(getattr(mc, "max_position_embeddings", 0) or 32768)
        per_session = cfg.max_tokens_per_session or self.max_context
        self.kv = KVStore(cfg.max_sessions, min(per_session, self.max_context), cfg.max_total_tokens)
        self.fingerprint = fingerprint(self.tokenizer)
        self.tokenizer_files = tokenizer_files(self.tokenizer, path if Path(path).is_dir() else None)
        self.eos_token_ids = self._eos_ids()
        self._metrics = _WorkerMetrics(cfg.role)
        self._metrics.kv_capacity.set(self.kv.max_total_tokens)
        resident_before, resident_after = trim_heap()  # the load's freed temporaries: gigabytes glibc would keep
        log.info("model_loaded", model=path, role=cfg.role, dtype=str(self.policy), device=cfg.device,
                 prefill_from_tokens=self.prefill_from if self.policy.split else None,
                 prepacked_linears=self.prepacked,
                 quantize=cfg.quantize, params_m=round(params / 1e6, 1),
                 resident_gib=_round(resident_after), resident_before_trim_gib=_round(resident_before),
                 load_s=round(time.perf_counter() - started, 2))

    def _install_draft_head(self, *models) -> int:
        """--draft-vocab: the SLM's head over its frequent tokens only (draft_vocab.py), before prepacking and
        quantization wrap it. Returns how many tokens it keeps (0 = the full head)."""
        size = self.config.draft_vocab
        if size < 0:
            raise ValueError(f"--draft-vocab must be >= 0 (0 = the whole vocabulary), got {size}")
        if size == 0:
            return 0
        if self.config.role != "slm":
            raise ValueError("--draft-vocab is for the SLM worker: the LLM writes and judges with its whole vocabulary")
        from r2r_serve.worker.draft_vocab import corpus_files, draft_token_ids, install_draft_head

        started = time.perf_counter()
        vocab = self.model.get_output_embeddings().out_features
        ids = draft_token_ids(self.tokenizer, size, vocab, always=self._eos_ids(),
                              sources=corpus_files(self.config.draft_vocab_corpus))
        if len(ids) >= vocab:
            log.info("draft_vocab_off", reason="the set covers the whole vocabulary", size=size, vocab=vocab)
            return 0
        for model in models:
            if model is not None:
                install_draft_head(model, ids)
        log.info("draft_vocab", kept=len(ids), vocab=vocab, rank_s=round(time.perf_counter() - started, 2))
        return len(ids)

    def _eos_ids(self) -> list[int]:
        ids = set()
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        for value in (gen_eos, self.tokenizer.eos_token_id):
            if value is None:
                continue
            ids.update(value if isinstance(value, (list, tuple)) else [value])
        return sorted(int(i) for i in ids)

    def warmup(self) -> None:
        """Real forwards (a prefill, then a decode step: each set of weights of a split policy runs once) so
        the first request does not pay for lazy initialisation."""
        sid, n = "__warmup__", max(3, self.prefill_from)
        feats = self.config.role == "slm"
        self.extend([ExtendWork(sid, 0, list(range(n)), want_features=feats)])
        self.extend([ExtendWork(sid, n, [0], want_features=feats)])
        self.release([sid])

    def info(self) -> dict:
        mc = self.model.config
        return dict(role=self.config.role, model_name=str(getattr(mc, "_name_or_path", "") or self.config.model),
                    vocab_size=self.vocab_size, tokenizer_fingerprint=self.fingerprint,
                    hidden_size=int(mc.hidden_size), dtype=str(self.policy), device=str(self.device),
                    max_sessions=self.kv.max_sessions, max_tokens_per_session=self.kv.max_tokens_per_session,
                    max_total_tokens=self.kv.max_total_tokens, features_top_k=self.config.features_top_k,
                    eos_token_ids=self.eos_token_ids, features_dtype=self.config.features_dtype)

    def mark_released(self, session_ids) -> int:
        """From any thread, at once (never behind a forward): the sessions are refused from now on and their
        KV is freed at the engine thread's next turn (free_released, also run first by every extend).
        Returns how many of them hold KV here now."""
        with self._release_lock:
            for sid in session_ids:
                self._released[sid] = None
                self._released.move_to_end(sid)
            while len(self._released) > RELEASED_MEMORY:
                self._released.popitem(last=False)
            self._to_free.extend(session_ids)
        return sum(sid in self.kv for sid in session_ids)

    def free_released(self) -> int:
        """Engine thread: free the KV of every session marked released so far; returns how many held some."""
        with self._release_lock:
            ids, self._to_free = self._to_free, []
        if not ids:
            return 0
        released = self.kv.release(ids)
        self._prune_groups()
        self._metrics.update_kv(self.kv)
        return released

    def release(self, session_ids) -> int:
        """Engine thread: mark and free now."""
        self.mark_released(session_ids)
        return self.free_released()

    # ---- the hot path --------------------------------------------------------------------------
    def _mark(self, phase: str | None) -> None:
        """Charge the time since the previous mark to `phase` (None: just restart the clock)."""
        if self.phase_times is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        if phase is not None:
            self.phase_times[phase] = self.phase_times.get(phase, 0.0) + now - self._mark_at
        self._mark_at = now

    @torch.inference_mode()
    def extend(self, works: list[ExtendWork]) -> list[ExtendOutcome]:
        self.free_released()  # releases that arrived during the last forward: their room is needed now
        outcomes: dict[int, ExtendOutcome] = {}
        runnable: list[int] = []
        seen: set[str] = set()
        for i, w in enumerate(works):
            problem = self._check(w, seen)
            seen.add(w.session_id)
            if problem:
                outcomes[i] = ExtendOutcome(w.session_id, INVALID, self.kv.held(w.session_id), error=problem)
                continue
            held = self.kv.held(w.session_id)
            if w.position > held:
                outcomes[i] = ExtendOutcome(w.session_id, RESYNC, held,
                                            error=f"worker holds {held} tokens, request assumed {w.position}")
                continue
            if w.position < held:
                self.kv.get(w.session_id).crop(w.position)
            runnable.append(i)

        # Admit what fits the KV budget, run it, then the rest: a batch bigger than the budget degrades to
        # several forwards (sessions evicted in between are rebuilt by their owner), never to errors.
        while runnable:
            admitted, runnable = self._admit(works, runnable, outcomes)
            for chunk in self._chunks(works, admitted):
                self._run_chunk(works, chunk, outcomes)
            for i in runnable:  # deferred items whose KV was evicted meanwhile must be re-sent whole
                w = works[i]
                if self.kv.held(w.session_id) < w.position:
                    outcomes[i] = ExtendOutcome(w.session_id, RESYNC, self.kv.held(w.session_id),
                                                error="evicted while waiting for KV room")
            runnable = [i for i in runnable if i not in outcomes]
        results = [outcomes[i] for i in range(len(works))]
        self._metrics.record(results, self.kv)
        return results

    def _check(self, w: ExtendWork, seen: set[str]) -> str | None:
        if not w.session_id:
            return "session_id is empty"
        if w.session_id in seen:
            return f"session {w.session_id} appears twice in one batch"
        if w.session_id in self._released:
            return f"session {w.session_id} was released; a new request needs a new session id"
        if not w.tokens:
            return "no new tokens to extend with"
        bad = [t for t in w.tokens if not 0 <= t < self.vocab_size]
        if bad:
            return f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})"
        if w.position + len(w.tokens) >= self.max_context:
            return (f"session would reach {w.position + len(w.tokens)} tokens; "
                    f"the model's context is {self.max_context}")
        return validate(w.sampling)

    def _admit(self, works, runnable, outcomes) -> tuple[list[int], list[int]]:
        """Split `runnable` into what fits the KV budget now (room made by evicting idle sessions) and
        what must wait for the next forward. An item that cannot fit even alone is refused."""
        growth = {works[i].session_id: len(works[i].tokens) for i in runnable}
        try:
            self.kv.make_room(growth)
            return runnable, []
        except CapacityError:
            pass
        admitted, deferred, room = [], [], {}
        for i in runnable:
            w = works[i]
            if self.kv.held(w.session_id) < w.position:
                # Evicted just now to make room for an item before it in this batch: running it on an empty
                # cache would answer from the wrong context. Its owner re-sends the history.
                outcomes[i] = ExtendOutcome(w.session_id, RESYNC, self.kv.held(w.session_id),
                                            error="evicted to make room for another session of this batch")
                continue
            try:
                self.kv.make_room({**room, w.session_id: len(w.tokens)})
            except CapacityError as exc:
                if admitted:
                    deferred.append(i)
                    continue
                outcomes[i] = ExtendOutcome(w.session_id, OVER_CAPACITY, self.kv.held(w.session_id), error=str(exc))
                continue
            admitted.append(i)
            room[w.session_id] = len(w.tokens)
        return admitted, deferred

    def _chunks(self, works, runnable):
        """The forwards that run `runnable`: a new session's prompt does not pad every decode step in the
        batch to its length (grouping.py)."""
        fixed = self.config.forward_fixed_rows or DEFAULT_FIXED_ROWS.get(self.device.type, DEFAULT_FIXED_ROWS["cpu"])
        for group in forward_groups([len(works[i].tokens) for i in runnable], fixed, self.config.max_batch_tokens):
            yield [runnable[g] for g in group]

    def _run_chunk(self, works, chunk, outcomes) -> None:
        sessions = [self.kv.touch(works[i].session_id) for i in chunk]
        started = time.perf_counter()
        self._mark(None)
        chunks = [works[i].tokens for i in chunk]
        kind = forward_kind([s.length for s in sessions], [len(c) for c in chunks])
        weights = self._weights_for(len(chunks) * max(len(c) for c in chunks))
        starts = [s.length for s in sessions]  # before the forward: where each row's new tokens begin
        hidden, every_hidden = self._forward(sessions, chunks, weights)
        logits = weights.lm_head(hidden)
        name = str(weights.dtype).removeprefix("torch.")
        self.forwards_by_dtype[name] = self.forwards_by_dtype.get(name, 0) + 1
        params = [works[i].sampling for i in chunk]
        positions = [s.length for s in sessions]  # position of the token being chosen
        # Router features are the SLM's to give: an LLM worker ignores the flag (and saves the work).
        want = [works[i].want_features and self.config.role == "slm" for i in chunk]
        if self.config.fast_paths:
            tokens, logprobs, feats = self._choose_with_features(logits, hidden, params, positions, want)
        else:
            tokens, logprobs, feats = self._choose_with_features_per_row(logits, hidden, params, positions, want)
        verifications = [self._verify(weights, every_hidden, j, works[i], starts[j]) for j, i in enumerate(chunk)]
        self.batches += 1
        elapsed = time.perf_counter() - started
        self.last_forward_ms = elapsed * 1000
        self.forward_s += elapsed
        self.forward_s_by_kind[kind] += elapsed
        self._metrics.forward(len(chunk), sum(len(works[i].tokens) for i in chunk), elapsed)
        for j, i in enumerate(chunk):
            outcomes[i] = ExtendOutcome(works[i].session_id, OK, sessions[j].length, token=tokens[j],
                                        logprob=logprobs[j], features=feats[j], verification=verifications[j])
        self._mark("outcomes")

    VERIFY_ROWS = 64  # positions judged per lm_head call: bounds the [rows, vocab] logits a long catch-up makes

    def _verify(self, w: "_Weights", every_hidden, row: int, work: ExtendWork, start: int) -> Verification | None:
        """Verify mode: judge the fed tokens of `row` from `work.verify_from` on. The hidden state at input
        position p predicts position p + 1, so the first fed token (predicted by an earlier forward) is never
        judged here, and a decode step (one token) judges nothing."""
        first, end = max(work.verify_from, start + 1), start + len(work.tokens)
        if not work.verify_from or first >= end or every_hidden is None:
            return None
        fed = torch.tensor(work.tokens[first - start:], dtype=torch.long, device=self.device)
        choices, fed_logprobs, choice_logprobs = [], [], []
        for lo in range(first, end, self.VERIFY_ROWS):
            hi = min(end, lo + self.VERIFY_ROWS)
            logits = w.lm_head(every_hidden[row, lo - 1 - start: hi - 1 - start])
            work_logits = logits.double() if logits.dtype == torch.float64 else logits.float()
            logp = torch.log_softmax(work_logits, dim=-1)
            fed_logprobs.append(logp.gather(-1, fed[lo - first: hi - first, None])[:, 0])
            if work.sampling.greedy:
                choice = torch.argmax(work_logits, dim=-1)
            else:  # seeded by position: the same draw a decode step at that position would make
                choice = choose_tokens(logits, [work.sampling] * (hi - lo), list(range(lo, hi)))[0]
            choices.append(choice)
            choice_logprobs.append(logp.gather(-1, choice[:, None])[:, 0])
        self._mark("verify")
        return Verification(first, torch.cat(choices).tolist(), torch.cat(fed_logprobs).double().tolist(),
                            torch.cat(choice_logprobs).double().tolist())

    def _choose_with_features_per_row(self, logits, hidden, params, positions, want):
        """The reference path (fast_paths=False): features.router_features, values read back row by row."""
        tokens, logprobs = choose_tokens(logits, params, positions)
        self._mark("head")
        feats = [None] * len(params)
        if any(want):
            rows = [j for j, w in enumerate(want) if w]
            computed = router_features(logits[rows], hidden[rows], tokens[rows], self.embedding,
                                       self.config.features_top_k, self.features_dtype)
            for j, f in zip(rows, computed):
                feats[j] = f
            self._mark("features")
        return ([int(tokens[j]) for j in range(len(params))], [float(logprobs[j]) for j in range(len(params))],
                feats)

    def _choose_with_features(self, logits, hidden, params, positions, want):
        """Tokens, logprobs and router features for the whole batch in batched ops, read back to the host in
        two copies (scalars, then the feature vectors) instead of several per row. Values are those of
        choose_tokens + features.router_features: the same ops on the same inputs (float64 stays float64,
        anything else works in float32), one log_softmax shared by the logprobs and the entropy."""
        B, V = logits.shape
        work = logits.double() if logits.dtype == torch.float64 else logits.float()  # = both references' input
        rows = [j for j, w in enumerate(want) if w]
        logp = None
        if all(p.greedy for p in params):
            logp = torch.log_softmax(work, dim=-1)
            tokens = torch.argmax(work, dim=-1)
            logprobs = logp.gather(-1, tokens[:, None])[:, 0]
        else:
            tokens, logprobs = choose_tokens(logits, params, positions)
        self._mark("head")
        feats = [None] * B
        if not rows:
            host = torch.cat([tokens.double(), logprobs.double()]).cpu().tolist()
            return [int(t) for t in host[:B]], host[B:], feats
        sel = None if len(rows) == B else torch.tensor(rows, device=logits.device)
        pick = (lambda t: t) if sel is None else (lambda t: t.index_select(0, sel))
        if logp is None:
            logp = torch.log_softmax(work, dim=-1)
        lp = pick(logp)
        probs = lp.exp()
        entropy = -(probs * lp).nan_to_num().sum(-1)  # 0 * -inf -> 0
        top1 = probs.max(-1).values
        topk = torch.topk(pick(work), min(self.config.features_top_k, V), dim=-1).values
        chosen = pick(tokens)
        emb = self.embedding(chosen.to(self.embedding.weight.device)).to(logits.device)
        fd = self.features_dtype
        h = pick(hidden)
        widths = (h.shape[1], topk.shape[1], emb.shape[1])
        host = torch.cat([tokens.double(), logprobs.double(), entropy.double(), top1.double()]).cpu().tolist()
        dense = torch.cat([h.to(fd), topk.to(fd), emb.to(fd)], dim=1).cpu()
        R = len(rows)
        entropies, top1s = host[2 * B: 2 * B + R], host[2 * B + R:]
        a, b = widths[0], widths[0] + widths[1]
        for n, j in enumerate(rows):
            f = common_pb2.RouterFeatures(token_id=int(host[j]), entropy=entropies[n], top1_prob=top1s[n],
                                          vocab_size=V)
            to_proto(dense[n, :a], f.hidden_state)
            to_proto(dense[n, a:b], f.topk_logits)
            to_proto(dense[n, b:], f.token_embedding)
            feats[j] = f
        self._mark("features")
        return [int(t) for t in host[:B]], host[B: 2 * B], feats

    def _weights_for(self, rows: int) -> "_Weights":
        """The weights a forward over `rows` token rows (batch x padded new tokens) runs in."""
        return self.prefill_weights if rows >= self.prefill_from else self.decode_weights

    def _to_kv(self, t: torch.Tensor, copy: bool) -> torch.Tensor:
        """A forward's keys/values as the KV cache stores them (the decode dtype); `copy`: never a view."""
        if t.dtype != self.dtype:
            return t.to(self.dtype)
        return t.clone() if copy else t

    def _forward(self, sessions: list[SessionKV], chunks: list[list[int]], w: "_Weights"):
        """Run the decoder (weights `w`) over each session's new tokens; update its KV; return the final-norm
        hidden state at each session's last new token, [B, H], and at every new token, [B, N, H] (row b's
        new tokens first, then padding; None for a decode step, which has one)."""
        from transformers import DynamicCache

        dev = self.device
        if self.config.fast_paths:
            if all(len(c) == 1 for c in chunks) and any(s.length for s in sessions):
                return self._forward_decode(sessions, chunks, w), None
            for s in sessions:  # the paths below read (and replace) each session's own KV
                s.own()
        if len(sessions) == 1:  # no padding needed
            s, toks = sessions[0], chunks[0]
            past = s.layers
            if past and past[0][0].dtype != w.dtype:
                past = [(k.to(w.dtype), v.to(w.dtype)) for k, v in past]
            cache = DynamicCache(ddp_cache_data=past) if past else DynamicCache()
            ids = torch.tensor([toks], dtype=torch.long, device=dev)
            self._mark("kv")
            out = w.base(input_ids=ids, cache=cache, use_cache=True)
            self._mark("forward")
            s.layers = [(self._to_kv(layer.keys, False), self._to_kv(layer.values, False)) for layer in cache.layers]
            s.length += len(toks)
            return out.last_hidden_state[:, -1], out.last_hidden_state

        past = [s.length for s in sessions]
        new = [len(c) for c in chunks]
        P, N, B = max(past), max(new), len(sessions)
        ids = torch.zeros((B, N), dtype=torch.long, device=dev)
        mask = torch.zeros((B, P + N), dtype=torch.long, device=dev)
        positions = torch.empty((B, N), dtype=torch.long, device=dev)
        for b, (p, c) in enumerate(zip(past, chunks)):
            ids[b, : len(c)] = torch.tensor(c, dtype=torch.long)
            mask[b, P - p: P + len(c)] = 1
            positions[b] = torch.arange(p, p + N)
        cache = DynamicCache()
        if P > 0:
            ref = next(s.layers for s in sessions if s.layers)
            layers = []
            for li, (k0, v0) in enumerate(ref):
                k = k0.new_zeros((B, k0.shape[1], P, k0.shape[3]), dtype=w.dtype)
                v = v0.new_zeros((B, v0.shape[1], P, v0.shape[3]), dtype=w.dtype)
                for b, s in enumerate(sessions):
                    if s.length:
                        k[b, :, P - s.length:] = s.layers[li][0][0]
                        v[b, :, P - s.length:] = s.layers[li][1][0]
                layers.append((k, v))
            cache = DynamicCache(ddp_cache_data=layers)
        self._mark("kv")
        out = w.base(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
        self._mark("forward")
        for b, s in enumerate(sessions):
            lo, hi = P - past[b], P + new[b]
            # copies: a view would keep the whole padded batch tensor alive
            s.layers = [(self._to_kv(layer.keys[b: b + 1, :, lo:hi], True),
                         self._to_kv(layer.values[b: b + 1, :, lo:hi], True)) for layer in cache.layers]
            s.length += new[b]
        last = torch.tensor([n - 1 for n in new], device=dev)
        hidden = out.last_hidden_state[torch.arange(B, device=dev), last]
        self._mark("kv")
        return hidden, out.last_hidden_state


    # ---- decode batches on persistent KV ----------------------------------------------------------
    def _forward_decode(self, sessions: list[SessionKV], chunks: list[list[int]], w: "_Weights") -> torch.Tensor:
        """One new token per session, on a DecodeGroup: reused as is when these sessions are exactly the
        group of the previous step (no KV copied), else built once from where each session's KV lives.
        Same padding, mask and positions as the ragged path would use for this batch."""
        g = sessions[0].group
        if g is None or not g.serves(sessions):
            g = self._regroup(sessions)
        g.reserve(1, self._headroom(g.width))
        B = len(sessions)
        rows = [s.row for s in sessions]
        ordered = list(range(B)) == rows
        ids = [0] * B
        for s, c in zip(sessions, chunks):
            ids[s.row] = c[0]
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)[:, None]
        positions = (g.width - g.pad)[:, None]
        mask = g.mask[:, : g.width + 1] if B > 1 else None  # one row never has padding
        cache = _group_cache(g)
        self._mark("kv")
        out = w.base(input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=cache,
                     use_cache=True)
        self._mark("forward")
        g.width += 1
        for s in sessions:
            s.length += 1
        hidden = out.last_hidden_state[:, -1]
        if not ordered:
            hidden = hidden.index_select(0, torch.tensor(rows, device=hidden.device))
        return hidden

    @staticmethod
    def _headroom(width: int) -> int:
        return 32 + width // 4

    def _regroup(self, sessions: list[SessionKV]) -> DecodeGroup:
        """A new DecodeGroup holding `sessions`: rows that sit together in an old group are copied with
        one slice per layer, others from their own KV. Old groups lose those rows; an emptied group is
        dropped, a mostly-dead one dissolved (its remaining sessions take their own copies)."""
        by_group: dict[int, tuple[DecodeGroup, list[SessionKV]]] = {}
        owned = []
        for s in sessions:
            if s.group is not None:
                by_group.setdefault(id(s.group), (s.group, []))[1].append(s)
            else:
                owned.append(s)
        for _, members in by_group.values():  # old row order: rows that sat together are copied as one slice
            members.sort(key=lambda s: s.row)
        order = [s for _, members in by_group.values() for s in members] + owned
        ref = next(iter(by_group.values()))[0].keys[0] if by_group else next(s.layers[0][0] for s in owned if s.layers)
        n_layers = len(next(iter(by_group.values()))[0].keys) if by_group else len(next(s.layers for s in owned if s.layers))
        B, W = len(order), max(s.length for s in order)
        shape = (B, ref.shape[1], W + 1 + self._headroom(W), ref.shape[3])
        # Uninitialised: only the padding before each row's tokens is ever read (masked, but it must be finite:
        # 0 x NaN is NaN), so only that is zeroed; columns from W on are written before attention reads them.
        # Zero-filling whole buffers was ~1/4 of a regroup, which a 16-session batch pays most steps.
        keys = [ref.new_empty(shape) for _ in range(n_layers)]
        values = [ref.new_empty(shape) for _ in range(n_layers)]
        start = 0
        for old, members in by_group.values():
            m, gw = max(s.length for s in members), old.width
            end = start + len(members)
            # Runs of adjacent old rows, copied as slices: an index tensor would gather into a temporary and copy
            # again (16 rows x 800 tokens of the 0.5B's KV: 30 ms by index, 12 ms by runs).
            runs = _row_runs([s.row for s in members])
            for dst, srcs in ((keys, old.keys), (values, old.values)):
                for li in range(n_layers):
                    dst[li][start:end, :, : W - m].zero_()
                    if m:  # the old group's rows carry their own zero padding inside [gw - m, gw)
                        for at, first, n in runs:
                            dst[li][start + at: start + at + n, :, W - m: W] = srcs[li][first: first + n, :, gw - m: gw]
            for s in members:
                old.drop(s)
            start = end
        for r, s in enumerate(owned, start):
            for li in range(n_layers):
                for dst, kv in ((keys, 0), (values, 1)):
                    dst[li][r, :, : W - s.length].zero_()
                    if s.layers:
                        dst[li][r, :, W - s.length: W] = s.layers[li][kv][0]
        group = DecodeGroup(keys, values, order, W)
        self._groups = [group] + [g for g in self._groups if g is not group]
        self._prune_groups()
        return group

    def _prune_groups(self) -> None:
        """Free groups nobody sits in; dissolve those mostly dead (a few idle sessions pinning big buffers)."""
        kept = []
        for g in self._groups:
            if g.live and g.live * 2 < g.rows:
                g.dissolve()
            if g.live:
                kept.append(g)
        self._groups = kept


def _row_runs(rows: list[int]) -> list[tuple[int, int, int]]:
    """Sorted row numbers as runs of consecutive rows: (index in `rows`, first row, length)."""
    runs: list[tuple[int, int, int]] = []
    for i, r in enumerate(rows):
        if runs and runs[-1][1] + runs[-1][2] == r:
            at, first, n = runs[-1]
            runs[-1] = (at, first, n + 1)
        else:
            runs.append((i, r, 1))
    return runs


def _round(value: float | None) -> float | None:
    return round(value, 2) if value is not None else None


@dataclass(frozen=True)
class _Weights:
    """One copy of the model's weights: the decoder, its head and their dtype."""

    base: torch.nn.Module
    lm_head: torch.nn.Module
    dtype: torch.dtype

    @classmethod
    def of(cls, model) -> "_Weights":
        return cls(getattr(model, model.base_model_prefix), model.get_output_embeddings(), model.dtype)


def _group_cache(group: DecodeGroup):
    """A transformers Cache over a DecodeGroup's buffers: each layer's update writes the new keys/values in
    place at the group's width and returns views up to them (no concatenation)."""
    from transformers.cache_utils import Cache

    layers = getattr(group, "hf_layers", None)
    if layers is None:
        cls = _group_layer_class()
        layers = group.hf_layers = [cls(group, i) for i in range(len(group.keys))]
    return Cache(layers=layers)


_GROUP_LAYER = None


def _group_layer_class():
    global _GROUP_LAYER
    if _GROUP_LAYER is None:
        from transformers.cache_utils import DynamicLayer

        class GroupLayer(DynamicLayer):
            is_croppable = False

            def __init__(self, group: DecodeGroup, index: int):
                super().__init__()
                # A weak reference: the group caches its layers, and a strong one back would make a cycle that
                # only Python's cyclic GC frees. Dropped groups (a regroup can happen every step when sessions
                # wait on the LLM) then pinned their KV buffers for minutes and the SLM worker's resident
                # memory grew by gigabytes in half an hour of 16-session R2R.
                self._group, self.index = weakref.ref(group), index
                self.is_initialized = True
                self.device = group.keys[index].device

            @property
            def group(self) -> DecodeGroup:
                return self._group()

            def update(self, key_states, value_states, *args, **kwargs):
                g, i = self.group, self.index
                w = g.width
                end = w + key_states.shape[-2]
                g.keys[i][:, :, w:end] = key_states  # cast to the cache's dtype when the forward's differs
                g.values[i][:, :, w:end] = value_states
                self.keys, self.values = g.keys[i][:, :, :end], g.values[i][:, :, :end]
                if key_states.dtype != self.keys.dtype:  # a split policy's long forward: attend in its dtype
                    return self.keys.to(key_states.dtype), self.values.to(value_states.dtype)
                return self.keys, self.values

            def get_seq_length(self) -> int:
                return self.group.width

        _GROUP_LAYER = GroupLayer
    return _GROUP_LAYER


class _WorkerMetrics:
    """This worker's children of the shared Prometheus metrics (label: role)."""

    def __init__(self, role: str):
        self.role = role
        self.sessions = metrics.WORKER_ACTIVE_SESSIONS.labels(role)
        self.kv_tokens = metrics.WORKER_KV_TOKENS.labels(role)
        self.kv_capacity = metrics.WORKER_KV_CAPACITY.labels(role)
        self.batch_size = metrics.WORKER_BATCH_SIZE.labels(role)
        self.forward_seconds = metrics.WORKER_FORWARD_SECONDS.labels(role)
        self.new_tokens = metrics.WORKER_NEW_TOKENS.labels(role)
        self.evictions = metrics.WORKER_EVICTIONS.labels(role)
        self._evictions_seen = 0

    def forward(self, sessions: int, tokens: int, seconds: float) -> None:
        self.batch_size.observe(sessions)
        self.forward_seconds.observe(seconds)
        self.new_tokens.inc(tokens)

    def update_kv(self, kv: KVStore) -> None:
        self.sessions.set(len(kv))
        self.kv_tokens.set(kv.held_tokens)
        if kv.evictions > self._evictions_seen:
            self.evictions.inc(kv.evictions - self._evictions_seen)
            self._evictions_seen = kv.evictions

    def record(self, outcomes: list[ExtendOutcome], kv: KVStore) -> None:
        for o in outcomes:
            metrics.WORKER_ITEMS.labels(self.role, o.status).inc()
        self.update_kv(kv)
