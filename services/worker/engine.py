"""A causal LM with per-session KV caches and one batched, ragged `extend` forward.

`extend` takes, for each session, the tokens this worker has not yet consumed, runs ONE forward over the
whole batch and returns each session's next token. Ragged batches are laid out like HF's left-padded
generation: past KV left-padded to the longest past, new tokens right-padded to the longest chunk, a 2D
attention mask marking real entries and explicit position ids per row, so every row computes exactly
what it would alone.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from r2r_serve.common import metrics
from r2r_serve.common.logging import get_logger
from r2r_serve.common.tensors import parse_dtype
from r2r_serve.common.tokenizer import fingerprint, tokenizer_files
from r2r_serve.worker.features import router_features
from r2r_serve.worker.kv_store import CapacityError, KVStore, SessionKV
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


@dataclass
class ExtendOutcome:
    session_id: str
    status: str
    held_tokens: int
    token: int = -1
    logprob: float = 0.0
    features: object | None = None  # common_pb2.RouterFeatures
    error: str = ""


@dataclass
class EngineConfig:
    model: str
    role: str = "slm"
    device: str = "cpu"
    dtype: str = "float32"
    max_sessions: int = 256
    max_tokens_per_session: int = 0       # 0 = the model's context length
    max_total_tokens: int = 1_000_000
    max_batch_tokens: int = 4096          # new tokens per forward; bigger batches are split
    features_top_k: int = 100
    features_dtype: str = "float32"
    threads: int = 0                      # torch intra-op threads; 0 = torch's default
    attn_implementation: str | None = None
    quantize: str = "none"                # "int8": dynamic int8 nn.Linear layers (CPU, float32 only)


QUANTIZE_CHOICES = ("none", "int8")


def check_quantize(quantize: str, device: str, dtype: str) -> None:
    """Refuse a quantization this engine cannot run, before any weights are loaded."""
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"unknown quantize {quantize!r}; choose one of {', '.join(QUANTIZE_CHOICES)}")
    if quantize == "none":
        return
    if torch.device(device).type != "cpu":
        raise ValueError(f"quantize={quantize!r} runs on the CPU only (PyTorch's dynamic int8 kernels); "
                         f"device {device!r} must use quantize='none' (bf16 is the GPU choice)")
    if dtype != "float32":
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


class ModelEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.model = None
        self.tokenizer = None
        self.kv: KVStore | None = None
        self.batches = 0
        self.last_forward_ms = 0.0

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
        self.dtype = parse_dtype(cfg.dtype)
        self.features_dtype = parse_dtype(cfg.features_dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        kwargs = {"dtype": self.dtype}
        if cfg.attn_implementation:
            kwargs["attn_implementation"] = cfg.attn_implementation
        self.model = AutoModelForCausalLM.from_pretrained(path, **kwargs).to(self.device).eval()
        params = sum(p.numel() for p in self.model.parameters())
        if cfg.quantize == "int8":
            quantized = quantize_int8(self.model)
            log.info("model_quantized", model=path, role=cfg.role, scheme="dynamic int8, per-channel",
                     linear_layers=quantized)
        mc = self.model.config
        layer_types = set(getattr(mc, "layer_types", None) or ["full_attention"])
        if layer_types != {"full_attention"}:
            raise NotImplementedError(f"{path}: layer types {sorted(layer_types)} are not supported yet "
                                      "(only full-attention decoders)")
        self.base = getattr(self.model, self.model.base_model_prefix)
        self.lm_head = self.model.get_output_embeddings()
        self.embedding = self.model.get_input_embeddings()
        self.vocab_size = self.embedding.num_embeddings
        self.max_context = int(getattr(mc, "max_position_embeddings", 0) or 32768)
        per_session = cfg.max_tokens_per_session or self.max_context
        self.kv = KVStore(cfg.max_sessions, min(per_session, self.max_context), cfg.max_total_tokens)
        self.fingerprint = fingerprint(self.tokenizer)
        self.tokenizer_files = tokenizer_files(self.tokenizer, path if Path(path).is_dir() else None)
        self.eos_token_ids = self._eos_ids()
        self._metrics = _WorkerMetrics(cfg.role)
        self._metrics.kv_capacity.set(self.kv.max_total_tokens)
        log.info("model_loaded", model=path, role=cfg.role, dtype=cfg.dtype, device=cfg.device,
                 quantize=cfg.quantize, params_m=round(params / 1e6, 1),
                 load_s=round(time.perf_counter() - started, 2))

    def _eos_ids(self) -> list[int]:
        ids = set()
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        for value in (gen_eos, self.tokenizer.eos_token_id):
            if value is None:
                continue
            ids.update(value if isinstance(value, (list, tuple)) else [value])
        return sorted(int(i) for i in ids)

    def warmup(self) -> None:
        """One real forward so the first request does not pay for lazy initialisation."""
        sid = "__warmup__"
        self.extend([ExtendWork(sid, 0, [0, 1, 2], want_features=self.config.role == "slm")])
        self.release([sid])

    def info(self) -> dict:
        mc = self.model.config
        return dict(role=self.config.role, model_name=str(getattr(mc, "_name_or_path", "") or self.config.model),
                    vocab_size=self.vocab_size, tokenizer_fingerprint=self.fingerprint,
                    hidden_size=int(mc.hidden_size), dtype=self.config.dtype, device=str(self.device),
                    max_sessions=self.kv.max_sessions, max_tokens_per_session=self.kv.max_tokens_per_session,
                    max_total_tokens=self.kv.max_total_tokens, features_top_k=self.config.features_top_k,
                    eos_token_ids=self.eos_token_ids, features_dtype=self.config.features_dtype)

    def release(self, session_ids) -> int:
        released = self.kv.release(session_ids)
        self._metrics.update_kv(self.kv)
        return released

    # ---- the hot path --------------------------------------------------------------------------
    @torch.inference_mode()
    def extend(self, works: list[ExtendWork]) -> list[ExtendOutcome]:
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
        chunk, tokens = [], 0
        for i in runnable:
            n = len(works[i].tokens)
            if chunk and tokens + n > self.config.max_batch_tokens:
                yield chunk
                chunk, tokens = [], 0
            chunk.append(i)
            tokens += n
        if chunk:
            yield chunk

    def _run_chunk(self, works, chunk, outcomes) -> None:
        sessions = [self.kv.touch(works[i].session_id) for i in chunk]
        started = time.perf_counter()
        hidden = self._forward(sessions, [works[i].tokens for i in chunk])
        logits = self.lm_head(hidden)
        params = [works[i].sampling for i in chunk]
        positions = [s.length for s in sessions]  # position of the token being chosen
        tokens, logprobs = choose_tokens(logits, params, positions)
        # Router features are the SLM's to give: an LLM worker ignores the flag (and saves the work).
        want = [works[i].want_features and self.config.role == "slm" for i in chunk]
        feats = [None] * len(chunk)
        if any(want):
            rows = [j for j, w in enumerate(want) if w]
            computed = router_features(logits[rows], hidden[rows], tokens[rows], self.embedding,
                                       self.config.features_top_k, self.features_dtype)
            for j, f in zip(rows, computed):
                feats[j] = f
        self.batches += 1
        elapsed = time.perf_counter() - started
        self.last_forward_ms = elapsed * 1000
        self._metrics.forward(len(chunk), sum(len(works[i].tokens) for i in chunk), elapsed)
        for j, i in enumerate(chunk):
            outcomes[i] = ExtendOutcome(works[i].session_id, OK, sessions[j].length, token=int(tokens[j]),
                                        logprob=float(logprobs[j]), features=feats[j])

    def _forward(self, sessions: list[SessionKV], chunks: list[list[int]]) -> torch.Tensor:
        """Run the decoder over each session's new tokens; update its KV; return the final-norm hidden
        state at each session's last new token, [B, H]."""
        from transformers import DynamicCache

        dev = self.device
        if len(sessions) == 1:  # no padding needed
            s, toks = sessions[0], chunks[0]
            cache = DynamicCache(ddp_cache_data=s.layers) if s.layers else DynamicCache()
            ids = torch.tensor([toks], dtype=torch.long, device=dev)
            out = self.base(input_ids=ids, cache=cache, use_cache=True)
            s.layers = [(layer.keys, layer.values) for layer in cache.layers]
            s.length += len(toks)
            return out.last_hidden_state[:, -1]

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
                k = k0.new_zeros((B, k0.shape[1], P, k0.shape[3]))
                v = v0.new_zeros((B, v0.shape[1], P, v0.shape[3]))
                for b, s in enumerate(sessions):
                    if s.length:
                        k[b, :, P - s.length:] = s.layers[li][0][0]
                        v[b, :, P - s.length:] = s.layers[li][1][0]
                layers.append((k, v))
            cache = DynamicCache(ddp_cache_data=layers)
        out = self.base(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
        for b, s in enumerate(sessions):
            lo, hi = P - past[b], P + new[b]
            # clone: a view would keep the whole padded batch tensor alive
            s.layers = [(layer.keys[b: b + 1, :, lo:hi].clone(), layer.values[b: b + 1, :, lo:hi].clone())
                        for layer in cache.layers]
            s.length += new[b]
        last = torch.tensor([n - 1 for n in new], device=dev)
        return out.last_hidden_state[torch.arange(B, device=dev), last]


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
