"""Routing strategies: FeatureBatch -> P(divergent) per row, float64 in [0, 1].

The paper's two training-free baselines (normalized entropy, 1 - top-1 probability) and the trained
neural router. Default thresholds for the baselines aim at the paper's operating point (~10-15% of
tokens to the LLM); calibrate per model pair with a threshold curve for real use:
- entropy 0.08: normalized entropy H / ln(V) >= 0.08 is ~0.95 nats at Qwen's V=151,936. In reasoning
  traces ~80% of tokens sit below ~0.67 nats (Wang et al. 2025, "high-entropy minority tokens"), so
  ~1 nat keeps roughly the top 10-15% — the forking tokens.
- top1 0.4: route when the SLM's top-1 probability is below 0.6, about the confidence of a
  distribution with ~1 nat of entropy, so both baselines route a similar share.

A fourth, `random`, ignores what the SLM thinks: the control that tells whether a router's choice of
tokens matters at all, compared at the same LLM share.
"""

from __future__ import annotations

import copy
import hashlib
import struct
from abc import ABC, abstractmethod

import torch

from r2r_serve.common.logging import get_logger
from r2r_serve.router.checkpoint import CheckpointMeta, load_checkpoint
from r2r_serve.router.features import FeatureBatch
from r2r_serve.router.mlp import RouterMLP

log = get_logger(__name__)

ENTROPY_DEFAULT_THRESHOLD = 0.08
TOP1_DEFAULT_THRESHOLD = 0.4
RANDOM_DEFAULT_THRESHOLD = 0.9  # score >= 0.9 for 10% of rows: the paper's ~10% LLM share

STRATEGIES = ("auto", "neural", "entropy", "top1", "random")


class RouterStrategy(ABC):
    """What the servicer needs: a name, what features it expects, a default threshold, `score`."""

    name: str
    hidden_size: int = 0           # hidden-state width it reads; 0 = any (does not read them)
    top_k: int = 0                 # top-k logits it reads; 0 = any
    reads_tensors: bool = False    # False: hidden_state/token_embedding may be omitted
    default_threshold: float = 0.5
    slm_name: str = ""
    llm_name: str = ""
    slm_tokenizer_fingerprint: str = ""
    checkpoint: str = ""

    @abstractmethod
    def score(self, batch: FeatureBatch) -> torch.Tensor:
        """P(divergent) [B], float64 in [0, 1], on CPU."""

    def threshold_curve(self) -> list[tuple[float, float, float]]:
        """(threshold, recall, LLM share) calibration points; empty when not calibrated."""
        return []


class EntropyStrategy(RouterStrategy):
    """P = entropy / ln(vocab_size): 0 for a certain SLM, 1 for a uniform distribution."""

    name = "entropy"
    default_threshold = ENTROPY_DEFAULT_THRESHOLD

    def score(self, batch: FeatureBatch) -> torch.Tensor:
        max_entropy = batch.vocab_size.double().clamp(min=2).log()
        return (batch.entropy.double() / max_entropy).clamp(0.0, 1.0).cpu()


class Top1Strategy(RouterStrategy):
    """P = 1 - top1_prob: the SLM's doubt in its own first choice."""

    name = "top1"
    default_threshold = TOP1_DEFAULT_THRESHOLD

    def score(self, batch: FeatureBatch) -> torch.Tensor:
        return (1.0 - batch.top1_prob.double()).clamp(0.0, 1.0).cpu()


class RandomStrategy(RouterStrategy):
    """P = a uniform draw in [0, 1) per row, so threshold t routes a share 1 - t in expectation.

    Each row's draw is a hash of (seed, token_id, the row's top-2 logits rounded to 1/256), not a
    stream: a row's number depends only on the seed and the row itself, never on which rows share its
    batch or in which order batches arrive. A request carries no session id or position, so the row's
    own features are what identifies it; the logits make identical tokens in different contexts draw
    independently. Caveats:
    - a row is only as reproducible as its features: where the SLM's logits move with batch
      composition (float32/bf16 kernels that round differently per batch shape), a logit that crosses
      a 1/256 step gives that row a fresh draw: rare in float32 (noise ~1e-6..1e-5: a few rows in 1000),
      common in bf16. The share routed stays 1 - t in expectation either way; run the SLM in float64
      (as the tests do) for bit-identical decisions.
    - rows with the same token and the same rounded top-2 logits (a repeated context) share a draw,
      as they would share a score under any other strategy.
    Draws are multiples of 2^-24, exact in the float32 the wire carries, so they stay below 1 there."""

    name = "random"
    default_threshold = RANDOM_DEFAULT_THRESHOLD
    KEY_LOGITS = 2         # top-k logits in the key; the first 2 are the same whatever top_k a worker sends
    LOGIT_STEP = 256       # rounding grid (1/256): coarse enough to absorb float32 noise, fine enough to identify
    _BITS = 24

    def __init__(self, seed: int = 0):
        if not -(1 << 63) <= seed < (1 << 63):
            raise ValueError(f"seed must fit in 64 bits, got {seed}")
        self.seed = int(seed)

    def score(self, batch: FeatureBatch) -> torch.Tensor:
        logits = batch.topk_logits[:, :self.KEY_LOGITS].double().cpu()
        rounded = (logits * self.LOGIT_STEP).round().to(torch.int64).tolist()
        tokens = batch.token_ids.cpu().tolist()
        draws = [self._draw(token, key) for token, key in zip(tokens, rounded)]
        return torch.tensor(draws, dtype=torch.float64)

    def threshold_curve(self) -> list[tuple[float, float, float]]:
        """Exact by construction: threshold t routes a share 1 - t (and catches that share of divergent
        tokens, since the draw ignores them)."""
        return [(t / 20, 1 - t / 20, 1 - t / 20) for t in range(21)]

    def _draw(self, token: int, logits: list[int]) -> float:
        packed = struct.pack(f"<qq{len(logits)}q", self.seed, token, *logits)
        digest = hashlib.blake2b(packed, digest_size=8).digest()
        return (int.from_bytes(digest, "little") >> (64 - self._BITS)) / (1 << self._BITS)


class NeuralStrategy(RouterStrategy):
    """The trained MLP; its checkpoint metadata says which SLM it reads and its default threshold.

    It computes in float64 by default: float32 GEMMs round differently for different batch sizes, so a
    token's score would depend on which other sessions shared its batch; in float64 those differences
    (~1e-16) vanish when the score is sent as float32. It costs well under 2 ms for 64 rows at H=896."""

    name = "neural"
    reads_tensors = True

    def __init__(self, model: RouterMLP, meta: CheckpointMeta | None = None, checkpoint: str = "",
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float64):
        self.model = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
        self.device = torch.device(device)
        self.meta = meta or CheckpointMeta.for_model(model)
        self.hidden_size = model.config.hidden_size
        self.top_k = model.config.top_k
        self.default_threshold = self.meta.default_threshold
        self.slm_name = self.meta.slm_name
        self.llm_name = self.meta.llm_name
        self.slm_tokenizer_fingerprint = self.meta.slm_tokenizer_fingerprint
        self.checkpoint = checkpoint

    @classmethod
    def from_checkpoint(cls, path: str, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float64) -> "NeuralStrategy":
        loaded = load_checkpoint(path)
        return cls(loaded.model, loaded.meta, checkpoint=str(loaded.path), device=device, dtype=dtype)

    def score(self, batch: FeatureBatch) -> torch.Tensor:
        if len(batch) == 0:
            return torch.zeros(0, dtype=torch.float64)
        return self.model.predict_proba(batch.to(self.device)).double().cpu()

    def threshold_curve(self) -> list[tuple[float, float, float]]:
        return [(p.threshold, p.recall, p.llm_share) for p in self.meta.threshold_curve]


def load_strategy(strategy: str = "auto", checkpoint: str | None = None,
                  device: str | torch.device = "cpu", seed: int = 0) -> RouterStrategy:
    """"auto" = neural when a checkpoint is given, else entropy. `seed` keys the random strategy."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown router strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if strategy == "auto":
        strategy = "neural" if checkpoint else "entropy"
    if seed and strategy != "random":
        log.warning("seed ignored", strategy=strategy, seed=seed)
    if strategy == "neural":
        if not checkpoint:
            raise ValueError("the neural router needs a checkpoint (--checkpoint PATH)")
        return NeuralStrategy.from_checkpoint(checkpoint, device=device)
    if checkpoint:
        log.warning("checkpoint ignored", strategy=strategy, checkpoint=checkpoint)
    if strategy == "random":
        return RandomStrategy(seed)
    return EntropyStrategy() if strategy == "entropy" else Top1Strategy()
