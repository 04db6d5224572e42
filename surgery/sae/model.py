"""The sparse autoencoder: configuration, module, losses, save/load.

Shapes: ``B`` rows (tokens or embeddings), ``D`` input width, ``F = expansion * D`` latents.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from surgery.errors import SAEError
from surgery.io.checkpoint import write_safetensors
from surgery.io.fs import atomic_output

log = logging.getLogger(__name__)

KINDS = ("batchtopk", "topk", "relu")
NORMALISATIONS = ("scalar", "standard", "none")
B_DEC_INITS = ("geometric_median", "mean", "zeros")
SITES = ("residual", "embedding")
TOWER_NAMES = ("vision", "text")
WEIGHTS_FILE = "weights.safetensors"
CONFIG_FILE = "cfg.json"
SCHEMA = "clipsurgery.sae/1"
#: (relu'd pre-activations of this rank's rows, flat and detached; k per row) -> the smallest value the
#: batch top-k keeps over the whole (all ranks') batch, a () tensor.
BatchKth = Callable[[torch.Tensor, int], torch.Tensor]


@dataclass
class SAEConfig:
    d_in: int  # input width D (residual width or embedding width)
    expansion: int = 8  # latents F = expansion * d_in (seed 001 evaluates 8)
    kind: str = "batchtopk"  # "batchtopk" | "topk" | "relu" (ReLU + L1)
    k: int = 20  # active latents per row for topk / batchtopk (seed 001: 20); unused for relu
    l1_coeff: float = 1e-3  # relu only: weight of sum_i |z_i| (decoder rows have unit norm)
    aux_k: int = 256  # auxiliary-k: dead latents used to reconstruct the residual (capped at F)
    aux_coeff: float = 0.03  # weight of the auxiliary-k loss (Gao et al.: 1/32); 0 disables it
    dead_after: int = 20_000  # a latent is dead after this many training rows without firing
    matryoshka: tuple[int, ...] = ()  # optional nested prefix sizes (< F), each also reconstructs x
    normalisation: str = "scalar"  # "scalar": x / c with E||x||^2 = D; "standard": per-feature (x - mu) / sigma; "none"
    threshold_lr: float = 0.01  # batchtopk: EMA rate of the inference threshold (min kept activation)
    site: str = "residual"  # where the SAE reads: "residual" (input of ln_post/ln_final) or "embedding"
    tower: str = "vision"  # "vision" | "text"
    model_hash: str = ""  # surgery.io.checkpoint.state_dict_hash of the CLIP it was trained on

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise SAEError(f"unknown SAE kind {self.kind!r}; allowed: {', '.join(KINDS)}")
        if self.normalisation not in NORMALISATIONS:
            raise SAEError(f"unknown normalisation {self.normalisation!r}; allowed: {', '.join(NORMALISATIONS)}")
        if self.site not in SITES:
            raise SAEError(f"unknown site {self.site!r}; allowed: {', '.join(SITES)}")
        if self.tower not in TOWER_NAMES:
            raise SAEError(f"unknown tower {self.tower!r}; allowed: {', '.join(TOWER_NAMES)}")
        for name in ("d_in", "expansion", "k", "aux_k", "dead_after"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SAEError(f"{name} must be an integer >= 1, got {value!r}")
        if self.kind != "relu" and self.k > self.width:
            raise SAEError(f"k={self.k} is larger than the SAE width {self.width} "
                           f"(= expansion {self.expansion} x d_in {self.d_in}); lower k or raise the expansion")
        for name in ("l1_coeff", "aux_coeff"):
            if not 0 <= getattr(self, name) < math.inf:
                raise SAEError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0 < self.threshold_lr <= 1:
            raise SAEError(f"threshold_lr must be in (0, 1], got {self.threshold_lr!r}")
        self.matryoshka = tuple(int(m) for m in self.matryoshka)
        if any(b <= a for a, b in zip(self.matryoshka, self.matryoshka[1:])) or any(
                not 0 < m < self.width for m in self.matryoshka):
            raise SAEError(f"matryoshka prefixes must increase strictly within (0, {self.width}), "
                           f"got {list(self.matryoshka)}")

    @property
    def width(self) -> int:
        """Number of latents F."""
        return self.expansion * self.d_in

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["matryoshka"] = list(self.matryoshka)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SAEConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SAEError(f"unknown SAE config keys {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
        return cls(**{k: (tuple(v) if k == "matryoshka" else v) for k, v in data.items()})


@dataclass
class SAEOutput:
    x_hat: torch.Tensor  # (B, D) reconstruction in input units
    z: torch.Tensor  # (B, F) sparse codes
    pre: torch.Tensor  # (B, F) encoder pre-activations (x_n - b_dec) W_enc + b_enc
    x_norm: torch.Tensor  # (B, D) normalised input
    x_hat_norm: torch.Tensor  # (B, D) reconstruction in normalised units
    aux: dict[str, torch.Tensor] = field(default_factory=dict)  # extra terms (matryoshka partials)


class SparseAutoencoder(nn.Module):
    """Sparse autoencoder over the last dimension of its input.

    Math (``x``: (..., D); ``F`` latents)::

        x_n   = (x - shift) / scale                        input normalisation, stored as buffers
        pre   = (x_n - b_dec) W_enc + b_enc                (..., F)
        z     = act(pre)
        x_hat = (z W_dec + b_dec) * scale + shift          decoder rows ||W_dec[i]|| = 1

    ``act``: ``relu`` -> ``relu(pre)``; ``topk`` -> the k largest of ``pre`` per row, then relu;
    ``batchtopk`` in training -> the ``k * B`` largest of ``relu(pre)`` over the whole batch, at
    inference ``pre * (pre > threshold)`` with ``threshold`` the EMA of the smallest activation kept
    by the batch top-k during training (seed 001). Normalisation: ``scalar`` -> ``shift = 0`` and one
    ``scale`` with ``E||x / scale||^2 = D``; ``standard`` -> per-feature mean and std; ``none``.
    """

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        d, f = cfg.d_in, cfg.width
        self.W_enc = nn.Parameter(torch.empty(d, f))  # (D, F)
        self.b_enc = nn.Parameter(torch.zeros(f))  # (F,)
        self.W_dec = nn.Parameter(torch.empty(f, d))  # (F, D)
        self.b_dec = nn.Parameter(torch.zeros(d))  # (D,)
        self.register_buffer("shift", torch.zeros(d))  # (D,) normalisation mean
        self.register_buffer("scale", torch.ones(d))  # (D,) normalisation scale
        self.register_buffer("threshold", torch.zeros(()))  # batchtopk inference threshold
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Random unit-norm decoder rows; encoder = decoder transpose (Gao et al.)."""
        w = torch.randn(self.cfg.width, self.cfg.d_in, generator=generator)
        self.W_dec.copy_(w / w.norm(dim=1, keepdim=True))
        self.W_enc.copy_(self.W_dec.T)
        self.b_enc.zero_()
        self.b_dec.zero_()

    # ------------------------------------------------------------------------------ normalisation
    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale  # (..., D)

    def denormalise(self, x_n: torch.Tensor) -> torch.Tensor:
        return x_n * self.scale + self.shift  # (..., D)

    @torch.no_grad()
    def fit_normalisation_(self, sample: torch.Tensor) -> None:
        """Set ``shift``/``scale`` from a sample (N, D) of inputs, per :attr:`SAEConfig.normalisation`."""
        sample = sample.double()
        if self.cfg.normalisation == "scalar":
            c = math.sqrt(float(sample.pow(2).sum(1).mean()) / self.cfg.d_in)
            self.shift.zero_()
            self.scale.fill_(max(c, 1e-12))
        elif self.cfg.normalisation == "standard":
            self.shift.copy_(sample.mean(0))
            self.scale.copy_(sample.std(0).clamp_min(1e-6))
        else:
            self.shift.zero_()
            self.scale.fill_(1.0)

    @torch.no_grad()
    def init_b_dec_(self, sample: torch.Tensor, how: str = "geometric_median") -> None:
        """Pre-encoder bias from a sample (N, D) of inputs: geometric median, mean or zeros."""
        if how not in B_DEC_INITS:
            raise SAEError(f"unknown b_dec init {how!r}; allowed: {', '.join(B_DEC_INITS)}")
        x_n = self.normalise(sample.to(self.W_dec.dtype))
        if how == "zeros":
            self.b_dec.zero_()
        elif how == "mean":
            self.b_dec.copy_(x_n.mean(0))
        else:
            self.b_dec.copy_(geometric_median(x_n))

    # ---------------------------------------------------------------------------- encode/decode
    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., F): ``(x_n - b_dec) W_enc + b_enc``."""
        return (self.normalise(x) - self.b_dec) @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor, batch_topk: bool | None = None,
                 batch_kth: BatchKth | None = None) -> torch.Tensor:
        """Sparse codes from pre-activations (..., F). ``batch_topk``: default = ``self.training``.

        ``batch_kth``: for a batch split over ranks, the value the batch top-k keeps down to, over
        the whole batch (see :func:`batch_threshold_activation`); None: the top-k of this batch."""
        kind = self.cfg.kind
        if kind == "relu":
            return F.relu(pre)
        if kind == "topk":
            return topk_activation(pre, self.cfg.k)
        if batch_topk is None:
            batch_topk = self.training
        if batch_topk and batch_kth is not None:
            return batch_threshold_activation(pre, batch_kth(F.relu(pre).detach().reshape(-1), self.cfg.k))
        if batch_topk:
            return batch_topk_activation(pre, self.cfg.k)
        return threshold_activation(pre, self.threshold)

    def encode(self, x: torch.Tensor, batch_topk: bool | None = None) -> torch.Tensor:
        """(..., D) -> sparse codes (..., F)."""
        return self.activate(self.pre_activations(x), batch_topk)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(..., F) -> reconstruction (..., D) in input units."""
        return self.denormalise(z @ self.W_dec + self.b_dec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) -> reconstruction (..., D)."""
        return self.decode(self.encode(x))

    def run(self, x: torch.Tensor, batch_topk: bool | None = None, batch_kth: BatchKth | None = None) -> SAEOutput:
        """Everything the losses need, for rows x (B, D)."""
        x_n = self.normalise(x)  # (B, D)
        pre = (x_n - self.b_dec) @ self.W_enc + self.b_enc  # (B, F)
        z = self.activate(pre, batch_topk, batch_kth)  # (B, F)
        aux: dict[str, torch.Tensor] = {}
        if self.cfg.matryoshka:
            partials = [z[:, :m] @ self.W_dec[:m] + self.b_dec for m in self.cfg.matryoshka]
            aux["matryoshka"] = torch.stack(partials)  # (P, B, D)
        x_hat_n = z @ self.W_dec + self.b_dec  # (B, D)
        return SAEOutput(self.denormalise(x_hat_n), z, pre, x_n, x_hat_n, aux)

    # ------------------------------------------------------------------------------- training aids
    @torch.no_grad()
    def normalise_decoder_(self) -> None:
        """Rescale decoder rows to unit norm."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_parallel_gradient_(self) -> None:
        """Drop the part of W_dec's gradient along each (unit) row, so steps keep the norm ~1."""
        if self.W_dec.grad is None:
            return
        parallel = (self.W_dec.grad * self.W_dec).sum(1, keepdim=True)  # (F, 1)
        self.W_dec.grad.sub_(parallel * self.W_dec)

    @torch.no_grad()
    def update_threshold_(self, z: torch.Tensor) -> None:
        """batchtopk: move the inference threshold toward the smallest kept activation of a batch."""
        positive = z[z > 0]
        if positive.numel():
            if float(self.threshold) == 0.0:  # first batch: start at its value instead of creeping up from 0
                self.threshold.copy_(positive.min())
                return
            lr = self.cfg.threshold_lr
            self.threshold.mul_(1 - lr).add_(lr * positive.min())


# ------------------------------------------------------------------------------------- activations
def topk_activation(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Keep each row's k largest pre-activations (then relu), zero elsewhere: (..., F)."""
    top = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, top.indices, F.relu(top.values))


def batch_topk_activation(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k * B`` largest of relu(pre) over the whole batch (B, F), zero elsewhere."""
    flat = F.relu(pre).reshape(-1)
    n_keep = min(k * (pre.numel() // pre.shape[-1]), flat.numel())
    top = flat.topk(n_keep)
    return torch.zeros_like(flat).scatter(0, top.indices, top.values).reshape(pre.shape)


def batch_threshold_activation(pre: torch.Tensor, kth: torch.Tensor) -> torch.Tensor:
    """relu(pre) where it is >= ``kth`` (the batch top-k's smallest kept value, found over every
    rank's rows) and > 0, zero elsewhere: (..., F). The same entries as :func:`batch_topk_activation`
    over the whole batch (up to ties at ``kth``)."""
    act = F.relu(pre)
    return act * ((act >= kth) & (act > 0)).to(act.dtype)


def threshold_activation(pre: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """JumpReLU: ``pre`` where ``pre > threshold`` (threshold >= 0), else 0: (..., F)."""
    return pre * (pre > threshold).to(pre.dtype)


def geometric_median(points: torch.Tensor, iters: int = 50, eps: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the summed distance to points (N, D) -> (D,)."""
    pts = points.double()
    guess = pts.mean(0)
    for _ in range(iters):
        dist = (pts - guess).norm(dim=1).clamp_min(eps)  # (N,)
        weights = 1.0 / dist
        new = (weights[:, None] * pts).sum(0) / weights.sum()
        if (new - guess).norm() < eps * max(1.0, float(guess.norm())):
            guess = new
            break
        guess = new
    return guess.to(points.dtype)


# ------------------------------------------------------------------------------------------ losses
def reconstruction_loss(x_n: torch.Tensor, x_hat_n: torch.Tensor) -> torch.Tensor:
    """Squared error summed over features, mean over rows: (B, D), (B, D) -> ()."""
    return (x_hat_n - x_n).pow(2).sum(-1).mean()


def l1_loss(z: torch.Tensor) -> torch.Tensor:
    """Sum of |z| over latents, mean over rows (decoder rows have unit norm): (B, F) -> ()."""
    return z.abs().sum(-1).mean()


def aux_k_loss(x_n: torch.Tensor, x_hat_n: torch.Tensor, pre: torch.Tensor, dead: torch.Tensor,
               W_dec: torch.Tensor, k_aux: int) -> torch.Tensor:
    """Auxiliary-k (Gao et al.): the top ``k_aux`` dead latents reconstruct the residual.

    ``x_n, x_hat_n`` (B, D), ``pre`` (B, F), ``dead`` (F,) bool, ``W_dec`` (F, D). Returns the
    squared error of that reconstruction of ``x_n - x_hat_n`` (residual detached from the main
    path), summed over features and averaged over rows; 0 when no latent is dead.
    """
    n_dead = int(dead.sum())
    if n_dead == 0:
        return pre.new_zeros(())
    k = min(k_aux, n_dead)
    residual = (x_n - x_hat_n).detach()  # (B, D)
    masked = torch.where(dead, pre, torch.full_like(pre, -math.inf))  # (B, F)
    top = masked.topk(k, dim=-1)
    z_aux = torch.zeros_like(pre).scatter(-1, top.indices, F.relu(top.values))  # (B, F)
    return (z_aux @ W_dec - residual).pow(2).sum(-1).mean()


def normalised_mse(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` over rows (B, D); 0 = perfect, 1 = the mean."""
    err = (x - x_hat).double().pow(2).sum()
    var = (x.double() - x.double().mean(0)).pow(2).sum()
    return float(err / var.clamp_min(1e-30))


def explained_variance(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """``1 - Var(x - x_hat) / Var(x)`` summed over features, rows (B, D)."""
    resid = (x - x_hat).double()
    var_r = (resid - resid.mean(0)).pow(2).sum()
    var_x = (x.double() - x.double().mean(0)).pow(2).sum()
    return float(1 - var_r / var_x.clamp_min(1e-30))


# --------------------------------------------------------------------------------------- save/load
def save_sae(sae: SparseAutoencoder, out_dir: str, extra: dict[str, Any] | None = None) -> None:
    """Write ``out_dir/weights.safetensors`` and ``out_dir/cfg.json`` (each atomically)."""
    os.makedirs(out_dir, exist_ok=True)
    meta = {"clipsurgery.sae_config": sae.cfg.to_dict(), "clipsurgery.schema": SCHEMA}
    write_safetensors(dict(sae.state_dict()), os.path.join(out_dir, WEIGHTS_FILE), meta)
    record = {"schema": SCHEMA, "config": sae.cfg.to_dict(), **(extra or {})}
    with atomic_output(os.path.join(out_dir, CONFIG_FILE)) as tmp:
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True))


def read_sae_config(sae_dir: str) -> dict[str, Any]:
    """The cfg.json record of a saved SAE folder."""
    path = os.path.join(sae_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise SAEError(f"{sae_dir}: no {CONFIG_FILE}; pass a folder written by 'clipsurgery sae train'")
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise SAEError(f"{path}: not valid JSON ({type(exc).__name__}); retrain or restore the file") from None
    if not isinstance(record, dict) or record.get("schema") != SCHEMA:
        schema = record.get("schema") if isinstance(record, dict) else None
        raise SAEError(f"{path}: schema {str(schema)[:40]!r}, this version reads {SCHEMA}")
    if not isinstance(record.get("config"), dict):
        raise SAEError(f"{path}: 'config' must be an object with the SAE's settings; retrain or restore the file")
    return record


def load_sae(sae_dir: str) -> SparseAutoencoder:
    """Load a folder written by :func:`save_sae` (eval mode)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from safetensors import safe_open

    record = read_sae_config(sae_dir)
    try:
        cfg = SAEConfig.from_dict(record["config"])
    except SAEError:
        raise
    except (TypeError, ValueError) as exc:  # a value of the wrong type that the checks could not compare
        raise SAEError(f"{os.path.join(sae_dir, CONFIG_FILE)}: bad config ({exc}); retrain or restore the "
                       "file") from None
    path = os.path.join(sae_dir, WEIGHTS_FILE)
    try:  # the header first: a config that does not fit the weights (a huge d_in) allocates nothing
        with safe_open(path, framework="pt") as fh:
            shape = list(fh.get_slice("W_enc").get_shape()) if "W_enc" in fh.keys() else None
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise SAEError(f"{path}: unreadable SAE weights ({str(exc).splitlines()[0][:160]}); retrain") from None
    if shape != [cfg.d_in, cfg.width]:
        raise SAEError(f"{path}: weights do not fit {CONFIG_FILE} (W_enc is {shape}, the config says "
                       f"[{cfg.d_in}, {cfg.width}]); retrain or restore the files")
    sae = SparseAutoencoder(cfg)
    try:
        state = load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise SAEError(f"{path}: unreadable SAE weights ({str(exc).splitlines()[0][:160]}); retrain") from None
    try:
        sae.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise SAEError(f"{path}: weights do not fit {CONFIG_FILE} ({str(exc).splitlines()[0][:160]}); retrain") from None
    return sae.eval()
