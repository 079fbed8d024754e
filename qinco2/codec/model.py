"""QINCo2 / QINCo1 model: architecture config, presets, step networks and the model.

Shape suffixes used throughout the package::

    N vectors in a batch     D data dimension        M steps (codes per vector)   K codebook size
    E embedding dim (d_e)    H hidden dim (d_h)      A candidates per beam        B beam width
    Q queries                S shortlist length      C IVF lists                  P pair codebooks

The modules here are pure math: no I/O, no logging, no device policy. A model works on
normalised vectors ``u = (x - mean) / scale``; :meth:`QincoModel.normalize` and
:meth:`QincoModel.denormalize` convert.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

# Architecture fields of each preset (training fields live in train_config.PRESET_TRAINING).
PRESETS: dict[str, dict] = {
    "qinco1": dict(L=16, de=None, dh=256, A=0, B=1, M=8, K=256,
                   codeword_skip=False, zero_init=False),
    "qinco2-S": dict(L=2, de=128, dh=256, A=16, B=32, M=8, K=256),
    "qinco2-M": dict(L=4, de=384, dh=384, A=16, B=32, M=8, K=256),
    "qinco2-L": dict(L=16, de=384, dh=384, A=16, B=32, M=8, K=256),
}


@dataclass
class ModelConfig:
    """Architecture of a QINCo model.

    ``de=None`` means ``d_e = D`` (no projections). ``A=0`` disables candidate
    pre-selection (exhaustive encoding), ``B=1`` is greedy encoding.
    ``codeword_skip`` adds the base codeword to the network output (QINCo2);
    with ``d_e = D`` that skip doubles the identity path, which the reference
    does; ``double_skip=True`` reproduces it, the default drops the extra skip.
    ``zero_init`` starts every step network as the identity on its codeword,
    ``f(c, x_hat) = c`` for every shape, so that a model starts exactly at its RQ
    initialisation: with projections (``d_e != D``) the output projection starts
    at zero. ``identity_init=False`` keeps the reference's random output projection
    instead (``f(c) = c + P_out P_in c`` at the start).
    """

    D: int = 0
    M: int = 8
    K: int = 256
    L: int = 2
    de: int | None = 128
    dh: int = 256
    A: int = 16
    B: int = 32
    codeword_skip: bool = True
    double_skip: bool = False
    zero_init: bool = True
    identity_init: bool = True
    ivf_K: int = 0

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModelConfig":
        """The architecture of preset ``name`` (``qinco1``, ``qinco2-S/M/L``) with ``overrides``."""
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown model field(s) {sorted(unknown)}; valid: "
                              f"{[f.name for f in dataclasses.fields(cls)]}")
        return cls(**{**PRESETS[name], **overrides}).validated()

    @classmethod
    def from_dict(cls, fields) -> "ModelConfig":
        """The config stored in a model file, checked: known fields only, each of its type
        (an integer, ``de`` also None; a bool for the flags), values as :meth:`validated`
        and ``D >= 1``, ``ivf_K >= 0``; else :class:`ConfigError` saying which."""
        if not isinstance(fields, dict):
            raise ConfigError(f"the model config must be a dict of fields, got {type(fields).__name__}")
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(map(str, set(fields) - set(known)))
        if unknown:
            raise ConfigError(f"unknown model field(s) {unknown}; valid: {list(known)}")
        for key, value in fields.items():
            flag = isinstance(known[key].default, bool)
            ok = (isinstance(value, bool) if flag else
                  (isinstance(value, int) and not isinstance(value, bool)) or (key == "de" and value is None))
            if not ok:
                kind = "a bool" if flag else "an integer" + (" or None" if key == "de" else "")
                raise ConfigError(f"model field {key} must be {kind}, got {value!r}")
        cfg = cls(**fields).validated()
        if cfg.D < 1 or cfg.ivf_K < 0:
            raise ConfigError(f"need D >= 1 and ivf_K >= 0, got D={cfg.D} ivf_K={cfg.ivf_K}")
        return cfg

    def validated(self) -> "ModelConfig":
        """``self``, or :class:`ConfigError` naming the first field out of its range."""
        for key in ("M", "K", "dh"):
            if getattr(self, key) < 1:
                raise ConfigError(f"model field {key} must be >= 1, got {getattr(self, key)}")
        if self.L < 0 or self.A < 0 or self.B < 1:
            raise ConfigError(f"need L >= 0, A >= 0, B >= 1; got L={self.L} A={self.A} B={self.B}")
        if self.A > self.K:
            raise ConfigError(f"A={self.A} candidates cannot exceed the codebook size K={self.K}")
        if self.de is not None and self.de < 1:
            raise ConfigError(f"de must be a positive width or None (= D), got {self.de}")
        return self

    @property
    def E(self) -> int:
        """Width of the step network's hidden space: ``de``, or ``D`` when ``de`` is unset."""
        return self.de or self.D

    def to_dict(self) -> dict:
        """The fields as a plain dict (stored in model files)."""
        return dataclasses.asdict(self)


class ResidualFFN(nn.Module):
    """``z + V relu(U z)`` without biases or normalisation."""

    def __init__(self, E: int, H: int, zero_init: bool):
        super().__init__()
        self.up = nn.Linear(E, H, bias=False)
        self.down = nn.Linear(H, E, bias=False)
        if zero_init:
            nn.init.kaiming_uniform_(self.up.weight, nonlinearity="relu")
            nn.init.zeros_(self.down.weight)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # in place: the product is used by nothing else, and a new tensor cost the encoder
        # about 15% of its time on the CPU (writing fresh memory)
        return z + self.down(F.relu(self.up(z), inplace=True))


class StepNetwork(nn.Module):
    """The implicit-codebook network ``f(c, x_hat)`` of one conditioned step.

    Accepts any leading dimensions that broadcast: ``c_...D`` (e.g. ``N,B,A,D``) and
    ``xhat_...D`` (e.g. ``N,B,1,D``). The fusion layer ``W [z; x_hat] + b`` is applied
    as ``W_z z + (W_x x_hat + b)`` so the x_hat half is computed once per beam.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D, E = cfg.D, cfg.E
        self.project = E != D
        self.proj_in = nn.Linear(D, E, bias=False) if self.project else nn.Identity()
        self.fuse = nn.Linear(E + D, E)
        self.blocks = nn.ModuleList(ResidualFFN(E, cfg.dh, cfg.zero_init) for _ in range(cfg.L))
        self.proj_out = nn.Linear(E, D, bias=False) if self.project else nn.Identity()
        self.codeword_skip = cfg.codeword_skip and (self.project or cfg.double_skip)
        if cfg.zero_init:
            nn.init.zeros_(self.fuse.weight)
            nn.init.zeros_(self.fuse.bias)
            if self.project:
                nn.init.kaiming_uniform_(self.proj_in.weight, nonlinearity="relu")
                if cfg.identity_init:
                    nn.init.zeros_(self.proj_out.weight)            # f(c) = c + 0: the RQ codeword
                else:
                    nn.init.kaiming_uniform_(self.proj_out.weight, nonlinearity="relu")

    def embed_codeword(self, c: torch.Tensor) -> torch.Tensor:
        """The codeword's part of the network up to the fusion layer, ``(I + W_z) P_in c``
        (``..., E``): it does not depend on ``x_hat``, so an encoder computes it once for
        the ``K`` codewords of the step instead of once per (vector, beam, candidate)."""
        z = self.proj_in(c)
        return z + F.linear(z, self.fuse.weight[:, :z.shape[-1]])

    def from_embedding(self, z: torch.Tensor, c: torch.Tensor, xhat: torch.Tensor) -> torch.Tensor:
        """The rest of the network from ``z = embed_codeword(c)``: the ``x_hat`` half of the
        fusion layer, the residual blocks, the output projection and the codeword skip."""
        z = z + F.linear(xhat, self.fuse.weight[:, z.shape[-1]:], self.fuse.bias)
        for block in self.blocks:
            z = block(z)
        y = self.proj_out(z)
        return c + y if self.codeword_skip else y

    def forward(self, c: torch.Tensor, xhat: torch.Tensor) -> torch.Tensor:
        return self.from_embedding(self.embed_codeword(c), c, xhat)


class Step(nn.Module):
    """One quantisation step: a base codebook, an optional network, an optional pre-selector.

    A step without network is a plain residual-quantisation step (the first step, or the
    frozen IVF step): ``x_hat + C[i]``. A conditioned step returns ``x_hat + f(C[i], x_hat)``.
    A frozen step holds its codebook as a buffer: it is never trained nor reset.
    """

    def __init__(self, codebook_KD: torch.Tensor, net: StepNetwork | None = None,
                 preselect: bool = False, frozen: bool = False):
        super().__init__()
        K, D = codebook_KD.shape
        self.frozen = frozen
        if frozen:
            self.register_buffer("codebook", codebook_KD.clone())
        else:
            self.codebook = nn.Parameter(codebook_KD.clone())
        self.net = net
        self.preselector = nn.Parameter(codebook_KD.clone()) if preselect else None
        # No longer read or updated (codeword resets now split live codewords); kept so that
        # model files written by earlier versions load with strict key matching.
        self.register_buffer("running_mean", torch.zeros(D))
        self.register_buffer("running_std", torch.ones(D))

    @property
    def K(self) -> int:
        return self.codebook.shape[0]

    def codebook_sq_norms(self) -> torch.Tensor | None:
        """``||C_k||^2`` ``(K,)`` of a frozen codebook, computed once and kept while the table
        is unchanged (any in-place write, e.g. ``load_state_dict``, bumps its version); None
        for a trained codebook, whose norms change at every optimiser step."""
        if not self.frozen:
            return None
        key = (self.codebook._version, self.codebook.data_ptr(), self.codebook.device)
        if getattr(self, "_sq_norms_key", None) != key:
            self._sq_norms = (self.codebook * self.codebook).sum(-1)
            self._sq_norms_key = key
        return self._sq_norms

    def delta(self, codes: torch.Tensor, xhat: torch.Tensor) -> torch.Tensor:
        """Update added to ``xhat`` for ``codes`` (same leading shape, or broadcastable)."""
        c = self.codebook[codes]
        return c if self.net is None else self.net(c, xhat)

    def forward(self, codes_N: torch.Tensor, xhat_ND: torch.Tensor) -> torch.Tensor:
        return xhat_ND + self.delta(codes_N, xhat_ND)


class QincoModel(nn.Module):
    """A sequence of steps plus the normalisation statistics of the data.

    ``steps[0]`` is the plain first step, or the frozen IVF step followed by ``M``
    conditioned steps when ``cfg.ivf_K > 0``.
    """

    def __init__(self, cfg: ModelConfig, ivf_centroids_CD: torch.Tensor | None = None):
        super().__init__()
        cfg.validated()
        if cfg.D < 1:
            raise ConfigError("ModelConfig.D (data dimension) must be set before building a model")
        self.cfg = cfg
        D, K = cfg.D, cfg.K
        self.register_buffer("mean", torch.zeros(D))
        self.register_buffer("scale", torch.ones(()))
        steps = []
        if cfg.ivf_K:
            ivf = ivf_centroids_CD if ivf_centroids_CD is not None else torch.zeros(cfg.ivf_K, D)
            steps.append(Step(ivf.float(), frozen=True))
        else:
            steps.append(Step(torch.zeros(K, D)))
        while len(steps) < cfg.M + (1 if cfg.ivf_K else 0):
            steps.append(Step(torch.zeros(K, D), StepNetwork(cfg), preselect=cfg.A > 0))
        self.steps = nn.ModuleList(steps)

    @property
    def n_codes(self) -> int:
        """Columns of a code array: M, plus one leading IVF id for IVF models."""
        return len(self.steps)

    def normalize(self, x_ND: torch.Tensor) -> torch.Tensor:
        return (x_ND.float() - self.mean) / self.scale

    def denormalize(self, u_ND: torch.Tensor) -> torch.Tensor:
        return u_ND * self.scale + self.mean

    def partial_reconstructions(self, codes_NM: torch.Tensor) -> list[torch.Tensor]:
        """Normalised reconstructions after each of the first ``codes_NM.shape[1]`` steps."""
        xhat = torch.zeros(codes_NM.shape[0], self.cfg.D, device=codes_NM.device,
                           dtype=self.steps[0].codebook.dtype)
        out = []
        for m in range(codes_NM.shape[1]):
            xhat = self.steps[m](codes_NM[:, m], xhat)
            out.append(xhat)
        return out

    def decode(self, codes_NM: torch.Tensor) -> torch.Tensor:
        """Normalised reconstruction from a full code or a code prefix."""
        return self.partial_reconstructions(codes_NM)[-1]

    def losses(self, u_ND: torch.Tensor, codes_NM: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction loss summed over steps, pre-selector loss summed over steps)."""
        xhat = torch.zeros_like(u_ND)
        loss_rec = u_ND.new_zeros(())
        loss_pre = u_ND.new_zeros(())
        for m, step in enumerate(self.steps):
            prev = xhat
            xhat = step(codes_NM[:, m], prev)
            if step.frozen:
                continue
            loss_rec = loss_rec + F.mse_loss(xhat, u_ND)
            if step.preselector is not None:
                guess = prev.detach() + step.preselector[codes_NM[:, m]]
                loss_pre = loss_pre + F.mse_loss(guess, u_ND)
        return loss_rec, loss_pre


def state_dict_problems(model: nn.Module, state: dict) -> list[str]:
    """What keeps ``state`` from loading into ``model`` (strict keys): missing and unexpected
    weights, and weights of another shape; empty when it loads."""
    expected = model.state_dict()
    problems = [f"missing weight {k}" for k in expected if k not in state]
    problems += [f"unexpected weight {k}" for k in state if k not in expected]
    problems += [f"weight {k} has shape {tuple(state[k].shape)}, the config needs {tuple(v.shape)}"
                 for k, v in expected.items() if k in state and state[k].shape != v.shape]
    return problems


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars (the frozen IVF table is a buffer and is not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def expected_parameter_count(cfg: ModelConfig) -> int:
    """Closed-form trainable-parameter count (spec section 2.4)."""
    D, K, E, H = cfg.D, cfg.K, cfg.E, cfg.dh
    conditioned = (K * D + (cfg.A > 0) * K * D + (E != D) * 2 * D * E
                   + (E + D) * E + E + cfg.L * 2 * E * H)
    if cfg.ivf_K:
        return cfg.M * conditioned
    return K * D + (cfg.M - 1) * conditioned

