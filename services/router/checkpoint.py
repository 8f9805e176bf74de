"""Router checkpoints: one `.safetensors` file, weights plus JSON metadata in its header, and `fit_router`.

The metadata lives in the safetensors header (`__metadata__["r2r_router"]`, a JSON string), not in a
sidecar: one file cannot lose its description when copied, and the header is readable without
loading weights (`read_metadata`). Schema (format_version 1):

    {"format": "r2r-router", "format_version": 1,
     "model": {hidden_size, top_k, width, depth, dropout},
     "features": {hidden_size, top_k, hidden_dtype, logits_dtype},
     "slm_name", "llm_name", "slm_tokenizer_fingerprint", "default_threshold",
     "threshold_curve": [{threshold, recall, llm_share}, ...], "training": {...free-form stats...}}
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from r2r_serve.common.logging import get_logger
from r2r_serve.router.features import FeatureBatch
from r2r_serve.router.mlp import RouterConfig, RouterMLP

log = get_logger(__name__)

FORMAT_NAME = "r2r-router"
FORMAT_VERSION = 1
METADATA_KEY = "r2r_router"
DEFAULT_FILENAME = "router.safetensors"  # looked for when a directory is given


class CheckpointError(ValueError):
    """A router checkpoint exists but cannot be used."""


@dataclass
class FeatureSpec:
    hidden_size: int
    top_k: int
    hidden_dtype: str = "float32"  # dtype the SLM worker sent during training (informational)
    logits_dtype: str = "float32"


@dataclass
class ThresholdPoint:
    threshold: float
    recall: float      # share of divergent tokens routed to the LLM at this threshold
    llm_share: float   # share of all tokens routed to the LLM


@dataclass
class CheckpointMeta:
    model: RouterConfig
    features: FeatureSpec
    slm_name: str = ""
    llm_name: str = ""
    slm_tokenizer_fingerprint: str = ""
    default_threshold: float = 0.5
    threshold_curve: list[ThresholdPoint] = field(default_factory=list)
    training: dict = field(default_factory=dict)

    @classmethod
    def for_model(cls, model: RouterMLP, **kw) -> "CheckpointMeta":
        c = model.config
        return cls(model=c, features=FeatureSpec(c.hidden_size, c.top_k), **kw)

    def to_json(self) -> str:
        d = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **asdict(self)}
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = "checkpoint") -> "CheckpointMeta":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{where}: router metadata is not valid JSON ({e})") from None
        if d.get("format") != FORMAT_NAME:
            raise CheckpointError(f"{where}: metadata format is {d.get('format')!r}, expected {FORMAT_NAME!r}")
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise CheckpointError(f"{where}: router checkpoint format version {version} is not supported by this "
                                  f"build (it reads version {FORMAT_VERSION}); re-export it or upgrade r2r-serve")
        try:
            return cls(model=RouterConfig.from_dict(d["model"]), features=FeatureSpec(**d["features"]),
                       slm_name=d.get("slm_name", ""), llm_name=d.get("llm_name", ""),
                       slm_tokenizer_fingerprint=d.get("slm_tokenizer_fingerprint", ""),
                       default_threshold=float(d.get("default_threshold", 0.5)),
                       threshold_curve=[ThresholdPoint(**p) for p in d.get("threshold_curve", [])],
                       training=dict(d.get("training", {})))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{where}: router metadata is incomplete or malformed ({e})") from None


@dataclass
class LoadedRouter:
    model: RouterMLP
    meta: CheckpointMeta
    path: Path


def resolve_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / DEFAULT_FILENAME
    if not p.is_file():
        raise FileNotFoundError(f"router checkpoint {p} does not exist")
    return p


def save_checkpoint(path: str | os.PathLike, model: RouterMLP, meta: CheckpointMeta | None = None) -> Path:
    """Write weights + metadata atomically (temp file + rename: a reader never sees half a file)."""
    meta = meta or CheckpointMeta.for_model(model)
    if meta.model != model.config:
        raise ValueError(f"metadata model config {meta.model} differs from the model's {model.config}")
    p = Path(path)
    if p.is_dir():
        p = p / DEFAULT_FILENAME
    p.parent.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=p.name, suffix=".tmp")
    os.close(fd)
    try:
        save_file(weights, tmp, metadata={METADATA_KEY: meta.to_json()})
        os.replace(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return p


def read_metadata(path: str | os.PathLike) -> CheckpointMeta:
    """Metadata only (header read; no weights)."""
    p = resolve_path(path)
    with _open(p) as f:
        return _meta_of(f, p)


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedRouter:
    """Load a router checkpoint into an eval-mode RouterMLP; clear errors for a missing file, a foreign
    or newer format, or weights that do not fit the stored config."""
    p = resolve_path(path)
    with _open(p) as f:
        meta = _meta_of(f, p)
        weights = {k: f.get_tensor(k) for k in f.keys()}
    model = RouterMLP(meta.model)
    _check_weights(model, weights, meta.model, p)
    model.load_state_dict(weights, strict=True)
    return LoadedRouter(model=model.to(device).eval(), meta=meta, path=p)


def _open(p: Path):
    try:
        return safe_open(str(p), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{p} is not a readable safetensors file ({e})") from None


def _meta_of(f, p: Path) -> CheckpointMeta:
    text = (f.metadata() or {}).get(METADATA_KEY)
    if text is None:
        raise CheckpointError(f"{p} has no router metadata (header key {METADATA_KEY!r}); "
                              "it was not written by r2r_serve.router.checkpoint.save_checkpoint")
    return CheckpointMeta.from_json(text, where=str(p))


def _check_weights(model: RouterMLP, weights: dict[str, torch.Tensor], config: RouterConfig, p: Path) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = [f"missing {k}" for k in sorted(set(expected) - set(weights))]
    problems += [f"unexpected {k}" for k in sorted(set(weights) - set(expected))]
    problems += [f"{k} has shape {list(weights[k].shape)}, expected {list(s)}"
                 for k, s in expected.items() if k in weights and tuple(weights[k].shape) != s]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... {len(problems) - 5} more" if len(problems) > 5 else "")
        raise CheckpointError(f"{p}: weights do not match the stored config {config}: {shown}")


# ---- training ------------------------------------------------------------------------------------
def fit_router(features: FeatureBatch, labels: torch.Tensor, steps: int = 200, lr: float = 3e-3,
               pos_weight: float | None = None, seed: int = 0, config: RouterConfig | None = None,
               batch_size: int | None = 256, weight_decay: float = 1e-4) -> RouterMLP:
    """Train a RouterMLP with class-weighted BCE (AdamW, minibatches drawn with `seed`).
    pos_weight=None weights positives by n_negative / n_positive, as divergent tokens are rare.
    Deterministic for a given seed; leaves the global RNG untouched. Returns the model in eval()."""
    labels = torch.as_tensor(labels).float().reshape(-1)
    if labels.shape[0] != len(features):
        raise ValueError(f"{labels.shape[0]} labels for {len(features)} feature rows")
    if not bool(((labels == 0) | (labels == 1)).all()):
        raise ValueError("labels must be 0 (neutral) or 1 (divergent)")
    n_pos = int(labels.sum())
    n_neg = labels.shape[0] - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"labels have {n_pos} divergent and {n_neg} neutral rows; training needs both")
    if pos_weight is None:
        pos_weight = n_neg / n_pos
    config = config or RouterConfig(hidden_size=features.hidden_size, top_k=features.top_k)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = RouterMLP(config)
        g = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(float(pos_weight)))
        model.train()
        n, loss = len(features), torch.tensor(float("nan"))
        for _ in range(steps):
            rows = torch.randint(0, n, (batch_size,), generator=g) if batch_size and batch_size < n else None
            part = features.select(rows) if rows is not None else features
            target = labels[rows] if rows is not None else labels
            loss = loss_fn(model(part), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        log.debug("router trained", steps=steps, final_loss=float(loss.detach()), pos_weight=pos_weight)
    return model.eval()
