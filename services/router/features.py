"""The router's input: a batch of SLM features as torch tensors, decoded from (and encoded to) protos.

One `FeatureBatch` holds B rows; every strategy, the MLP and training read this one layout:
hidden [B,H] f32, topk_logits [B,K] f32 (sorted desc), token_embedding [B,H] f32, token_ids [B] long,
entropy [B] f64 (nats), top1_prob [B] f64, vocab_size [B] long.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from r2r_serve.common.tensors import from_proto, to_proto
from r2r_serve.proto import common_pb2

# Slack for scalars a worker computes in float32/bf16: an entropy of -1e-9 is rounding, not a bug.
_TOLERANCE = 1e-4

_ITEMSIZE = {common_pb2.DTYPE_FLOAT32: 4, common_pb2.DTYPE_FLOAT16: 2, common_pb2.DTYPE_BFLOAT16: 2,
             common_pb2.DTYPE_FLOAT64: 8}

TENSOR_FIELDS = ("hidden_state", "topk_logits", "token_embedding")


@dataclass
class FeatureBatch:
    """B feature rows. The constructor coerces dtypes (so bf16 hidden states or Python lists are fine)
    and checks shapes; `validate()` checks values. `vocab_size` may be an int for the whole batch.
    Strategies that do not read tensors accept hidden/token_embedding of width 0 ([B, 0])."""

    hidden: torch.Tensor
    topk_logits: torch.Tensor
    token_embedding: torch.Tensor
    token_ids: torch.Tensor
    entropy: torch.Tensor
    top1_prob: torch.Tensor
    vocab_size: torch.Tensor | int

    def __post_init__(self) -> None:
        self.hidden = _matrix(self.hidden, "hidden")
        self.topk_logits = _matrix(self.topk_logits, "topk_logits")
        self.token_embedding = _matrix(self.token_embedding, "token_embedding")
        b = self.hidden.shape[0]
        device = self.hidden.device
        if isinstance(self.vocab_size, int):
            self.vocab_size = torch.full((b,), self.vocab_size, dtype=torch.long, device=device)
        self.token_ids = _vector(self.token_ids, "token_ids", torch.long, b)
        self.entropy = _vector(self.entropy, "entropy", torch.float64, b)
        self.top1_prob = _vector(self.top1_prob, "top1_prob", torch.float64, b)
        self.vocab_size = _vector(self.vocab_size, "vocab_size", torch.long, b)
        for name in ("topk_logits", "token_embedding"):
            if getattr(self, name).shape[0] != b:
                raise ValueError(f"{name} has {getattr(self, name).shape[0]} rows, hidden has {b}")
        if self.token_embedding.shape[1] != self.hidden.shape[1]:
            raise ValueError(f"token_embedding has {self.token_embedding.shape[1]} values per row, "
                             f"hidden has {self.hidden.shape[1]}")

    # ---- shape ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.hidden.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.hidden.shape[1]

    @property
    def top_k(self) -> int:
        return self.topk_logits.shape[1]

    def select(self, index: torch.Tensor | slice | Sequence[int]) -> "FeatureBatch":
        """Rows by index (minibatches, train/test splits)."""
        if not isinstance(index, slice):
            index = torch.as_tensor(index, dtype=torch.long, device=self.hidden.device)
        return FeatureBatch(self.hidden[index], self.topk_logits[index], self.token_embedding[index],
                            self.token_ids[index], self.entropy[index], self.top1_prob[index],
                            self.vocab_size[index])

    def to(self, device: torch.device | str) -> "FeatureBatch":
        return FeatureBatch(*(t.to(device) for t in (self.hidden, self.topk_logits, self.token_embedding,
                                                     self.token_ids, self.entropy, self.top1_prob,
                                                     self.vocab_size)))

    @classmethod
    def concat(cls, batches: Sequence["FeatureBatch"]) -> "FeatureBatch":
        names = ("hidden", "topk_logits", "token_embedding", "token_ids", "entropy", "top1_prob", "vocab_size")
        return cls(*(torch.cat([getattr(b, n) for b in batches]) for n in names))

    # ---- construction -----------------------------------------------------------------------------
    @classmethod
    def empty(cls, hidden_size: int = 0, top_k: int = 0) -> "FeatureBatch":
        return cls(torch.zeros(0, hidden_size), torch.zeros(0, top_k), torch.zeros(0, hidden_size),
                   torch.zeros(0, dtype=torch.long), torch.zeros(0), torch.zeros(0), 0)

    @classmethod
    def from_logits(cls, logits: torch.Tensor, hidden: torch.Tensor, token_embedding: torch.Tensor,
                    token_ids: torch.Tensor, top_k: int) -> "FeatureBatch":
        """The reference definition of the features from the SLM's full next-token logits [B, V]
        (same maths as the worker: entropy in nats and top-1 prob of softmax(logits), top-k sorted)."""
        work = logits.double() if logits.dtype == torch.float64 else logits.float()
        logp = torch.log_softmax(work, dim=-1)
        probs = logp.exp()
        entropy = -(probs * logp).nan_to_num().sum(-1)  # 0 * -inf -> 0
        topk = torch.topk(work, min(top_k, work.shape[-1]), dim=-1).values
        return cls(hidden, topk, token_embedding, token_ids, entropy, probs.max(-1).values, work.shape[-1])

    @classmethod
    def random(cls, batch_size: int, hidden_size: int, top_k: int, vocab_size: int = 1000,
               generator: torch.Generator | None = None) -> "FeatureBatch":
        """Valid random features (warm-up, tests), derived from random logits of varied sharpness, so
        entropy, top1_prob and topk_logits agree with each other."""
        g = generator
        logits = torch.randn(batch_size, vocab_size, generator=g) * torch.rand(batch_size, 1, generator=g) * 8
        hidden = torch.randn(batch_size, hidden_size, generator=g)
        emb = torch.randn(batch_size, hidden_size, generator=g)
        tokens = torch.randint(0, vocab_size, (batch_size,), generator=g)
        return cls.from_logits(logits, hidden, emb, tokens, top_k)

    @classmethod
    def from_protos(cls, features: Sequence[common_pb2.RouterFeatures], expect_hidden: int | None = None,
                    expect_top_k: int | None = None, require_tensors: bool = True) -> "FeatureBatch":
        """Decode and validate a batch; raises ValueError naming the first bad row. Each tensor field is
        decoded with one buffer join and one from_proto call, not per element.
        `require_tensors=False` lets a batch omit hidden_state/token_embedding altogether (for
        strategies that never read them); they then decode as [B, 0]."""
        b = len(features)
        if b == 0:
            return cls.empty(expect_hidden or 0, expect_top_k or 0)
        topk = _decode_field(features, "topk_logits", expect_top_k, ", the router expects", required=True)
        hidden = _decode_field(features, "hidden_state", expect_hidden, ", the router expects", required=require_tensors)
        if hidden.shape[1] == 0 and any(f.HasField("token_embedding") for f in features):
            raise ValueError("features: token_embedding was sent without hidden_state; send both or neither")
        emb = _decode_field(features, "token_embedding", hidden.shape[1], " but hidden_state has",
                            required=hidden.shape[1] > 0)
        token_ids = torch.from_numpy(np.fromiter((f.token_id for f in features), np.int64, b))
        entropy = torch.from_numpy(np.fromiter((f.entropy for f in features), np.float64, b))
        top1 = torch.from_numpy(np.fromiter((f.top1_prob for f in features), np.float64, b))
        vocab = torch.from_numpy(np.fromiter((f.vocab_size for f in features), np.int64, b))
        batch = cls(hidden, topk, emb, token_ids, entropy, top1, vocab)
        batch.validate(expect_hidden, expect_top_k)
        return batch

    def to_protos(self, dtype: torch.dtype = torch.float32) -> list[common_pb2.RouterFeatures]:
        """Encode each row (what a worker sends); width-0 tensors are left out."""
        out = []
        cpu = self.to("cpu")
        for i in range(len(cpu)):
            f = common_pb2.RouterFeatures(token_id=int(cpu.token_ids[i]), entropy=float(cpu.entropy[i]),
                                          top1_prob=float(cpu.top1_prob[i]), vocab_size=int(cpu.vocab_size[i]))
            if cpu.hidden_size:
                to_proto(cpu.hidden[i].to(dtype), f.hidden_state)
                to_proto(cpu.token_embedding[i].to(dtype), f.token_embedding)
            to_proto(cpu.topk_logits[i].to(dtype), f.topk_logits)
            out.append(f)
        return out

    # ---- values -----------------------------------------------------------------------------------
    def validate(self, expect_hidden: int | None = None, expect_top_k: int | None = None) -> None:
        """Raise ValueError for the first row whose values break the contract (vectorized checks)."""
        if expect_hidden and self.hidden_size != expect_hidden:
            raise ValueError(f"features: hidden_state has {self.hidden_size} values, the router expects {expect_hidden}")
        if expect_top_k and self.top_k != expect_top_k:
            raise ValueError(f"features: topk_logits has {self.top_k} values, the router expects {expect_top_k}")
        if len(self) and self.top_k == 0:
            raise ValueError("features: topk_logits is empty; send at least the top-1 logit")
        for name, values in (("hidden_state", self.hidden), ("topk_logits", self.topk_logits),
                             ("token_embedding", self.token_embedding)):
            _fail_first(~torch.isfinite(values).all(dim=1), f"{name} contains NaN or infinity")
        _fail_first(self.topk_logits[:, 1:] > self.topk_logits[:, :-1],
                    "topk_logits must be sorted in descending order", row_any=True)
        _fail_first(~torch.isfinite(self.entropy) | (self.entropy < -_TOLERANCE),
                    "entropy is {}; it must be a finite number >= 0 (nats)", self.entropy)
        bad_top1 = ~torch.isfinite(self.top1_prob) | (self.top1_prob < -_TOLERANCE) | (self.top1_prob > 1 + _TOLERANCE)
        _fail_first(bad_top1, "top1_prob is {}; it must be in [0, 1]", self.top1_prob)
        _fail_first(self.vocab_size < 2, "vocab_size is {}; it must be at least 2 (is it set?)", self.vocab_size)
        _fail_first((self.token_ids < 0) | (self.token_ids >= self.vocab_size),
                    "token_id {} is outside the vocabulary", self.token_ids)


# ---- helpers ------------------------------------------------------------------------------------------
def _matrix(t, name: str) -> torch.Tensor:
    t = torch.as_tensor(t)
    if t.dim() != 2:
        raise ValueError(f"{name} must be a [batch, n] matrix, got shape {list(t.shape)}")
    return t if t.dtype == torch.float32 else t.float()


def _vector(t, name: str, dtype: torch.dtype, b: int) -> torch.Tensor:
    t = torch.as_tensor(t).to(dtype)
    if t.shape != (b,):
        raise ValueError(f"{name} must have shape [{b}], got {list(t.shape)}")
    return t


def _fail_first(bad: torch.Tensor, message: str, values: torch.Tensor | None = None, row_any: bool = False) -> None:
    if row_any:
        bad = bad.any(dim=1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        text = message.format(values[i].item()) if values is not None else message
        raise ValueError(f"features[{i}]: {text}")


def _decode_field(features: Sequence[common_pb2.RouterFeatures], field: str, width: int | None,
                  width_source: str, required: bool) -> torch.Tensor:
    """One tensor field of every row -> [B, width] float32. Shapes and byte counts are checked per row
    (cheap attribute reads), then all rows' bytes are joined and decoded once."""
    b = len(features)
    present = [f.HasField(field) for f in features]
    if not any(present) and not required:
        return torch.zeros(b, 0)
    if not all(present):
        i = present.index(False)
        if required:
            raise ValueError(f"features[{i}]: {field} is missing")
        raise ValueError(f"features[{i}]: {field} is missing but features[{present.index(True)}] has one; "
                         f"send it for every row or for none")
    if width is None:  # no expectation: the first row sets the width for the batch
        width, width_source = _width(features[0], field, 0), " but features[0] has"
    datas, dtypes = [], set()
    for i, f in enumerate(features):
        t = getattr(f, field)
        n = _width(f, field, i)
        if n != width:
            raise ValueError(f"features[{i}]: {field} has {n} values{width_source} {width}")
        itemsize = _ITEMSIZE.get(t.dtype)
        if itemsize is None or len(t.data) != n * itemsize:
            _decode_one(t, field, i)  # raises from_proto's precise message
        datas.append(t.data)
        dtypes.add(t.dtype)
    if len(dtypes) > 1:  # unusual: rows in different dtypes; decode each
        return torch.stack([_decode_one(getattr(f, field), field, i).float() for i, f in enumerate(features)])
    joined = common_pb2.Tensor(shape=[b, width], dtype=dtypes.pop(), data=b"".join(datas))
    return from_proto(joined).float()


def _width(f: common_pb2.RouterFeatures, field: str, i: int) -> int:
    shape = getattr(f, field).shape
    if len(shape) != 1:
        raise ValueError(f"features[{i}]: {field} must be a 1-D tensor, got shape {list(shape)}")
    return shape[0]


def _decode_one(t: common_pb2.Tensor, field: str, i: int) -> torch.Tensor:
    try:
        return from_proto(t)
    except ValueError as e:
        raise ValueError(f"features[{i}]: {field}: {e}") from None
