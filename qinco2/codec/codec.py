"""QincoCodec: the user-facing codec (numpy in, numpy out) around a :class:`QincoModel`."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import load_checkpoint, save_checkpoint
from ..distributed import Workers
from ..errors import ConfigError, InputError, ModelFileError, NotTrainedError
from ..ivf import check_centroids
from ..tensor_io import accepts_tensors
from ..validation import check_codes, check_vectors
from .code_layout import CodeLayout
from .encode import decode_prepared, encode, prepare_steps
from .model import PRESETS, ModelConfig, QincoModel, state_dict_problems
from .precision import check_precision
from .reference import model_from_reference
from .sizing import (
    MIXED_VALUES_PER_PARAMETER,
    SMALL_DATA_MIX,
    SMALL_DATA_PATIENCE,
    VALUES_PER_PARAMETER,
    fit_to_data,
)
from .train import TrainConfig, TrainState, fit, initialize

log = logging.getLogger(__name__)

_MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}
_TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
SMALL_DATA_CHOICES = ("adapt", "keep")


def _as_device(device) -> torch.device:
    if device is None:
        return torch.device("cpu")
    return torch.device(device)


class QincoCodec:
    """Train, encode, decode, save and load a QINCo2 (or QINCo1) codec.

    >>> codec = QincoCodec.from_preset("qinco2-S", M=8)      # doctest: +SKIP
    >>> codec.train(x_train).encode(x)                       # doctest: +SKIP

    ``device`` is chosen by the caller ("cpu", "cuda", "cuda:1", ...). The learned state is
    ``model_`` (None until :meth:`train` or :meth:`load`).
    """

    def __init__(self, model_config: ModelConfig, train_config: TrainConfig | None = None,
                 device=None, *, small_data: str = "adapt", fixed: set[str] | None = None):
        if small_data not in SMALL_DATA_CHOICES:
            raise ConfigError(f"small_data must be one of {SMALL_DATA_CHOICES}, got {small_data!r}")
        self.model_config = model_config
        self.train_config = train_config or TrainConfig()
        self.device = _as_device(device)
        self.small_data = small_data
        # fields :meth:`train` must not adapt to a small training set (None: all of them)
        self.fixed = None if fixed is None else set(fixed)
        self.model_: QincoModel | None = None
        self.train_state_: TrainState | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_preset(cls, name: str, *, device=None, small_data: str = "adapt", **overrides) -> "QincoCodec":
        """A codec from a preset (``qinco1``, ``qinco2-S/M/L``); any field may be overridden.

        ``small_data="adapt"``: when the training set turns out to be small for the network
        (:mod:`qinco2.codec.sizing`), :meth:`train` shrinks the fields not given here, stops
        earlier and mixes the training rows with their neighbours (``neighbour_mix``, unless
        given), and logs a warning saying so; ``"keep"``: only the warning."""
        unknown = set(overrides) - _MODEL_FIELDS - _TRAIN_FIELDS
        if unknown:
            raise ConfigError(f"unknown codec field(s) {sorted(unknown)}; model fields: "
                              f"{sorted(_MODEL_FIELDS)}; training fields: {sorted(_TRAIN_FIELDS)}")
        model_cfg = ModelConfig.from_preset(name, **{k: v for k, v in overrides.items() if k in _MODEL_FIELDS})
        train_cfg = TrainConfig.from_preset(name, **{k: v for k, v in overrides.items() if k in _TRAIN_FIELDS})
        return cls(model_cfg, train_cfg, device=device, small_data=small_data, fixed=set(overrides))

    @property
    def presets(self) -> list[str]:
        """Names of the presets :meth:`from_preset` knows."""
        return sorted(PRESETS)

    # ------------------------------------------------------------------ checks
    def _model(self) -> QincoModel:
        if self.model_ is None:
            raise NotTrainedError("this codec has no model yet: call train(x) or QincoCodec.load(path) first")
        return self.model_

    @property
    def dim(self) -> int:
        """Dimension ``D`` of the vectors the trained model encodes."""
        return self._model().cfg.D

    @property
    def n_codes(self) -> int:
        """Columns of the code arrays: M (plus the leading IVF id for IVF models)."""
        return self._model().n_codes

    @property
    def code_layout(self) -> CodeLayout:
        """Byte layout of a packed code (:mod:`qinco2.codec.code_layout`)."""
        cfg = self._model().cfg
        return CodeLayout(M=cfg.M, K=cfg.K, ivf_K=cfg.ivf_K)

    @property
    def code_size(self) -> int:
        """Bytes per vector of the packed codes (``encode(..., packed=True)``), as faiss's ``sa_code_size``."""
        return self.code_layout.code_size

    def _tensor(self, x: np.ndarray) -> torch.Tensor:
        """Float32 rows on the device (already validated, NaN/Inf included, by ``check_vectors``);
        rows of a read-only memory map are copied (torch does not wrap read-only memory)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        return torch.as_tensor(x if x.flags.writeable else x.copy(), device=self.device)

    # ------------------------------------------------------------------ training
    @accepts_tensors
    def train(self, x_train: np.ndarray, x_val: np.ndarray | None = None, *, mse_scale: float = 1.0,
              output=None, resume: bool = False, init_model=None, ivf_centroids: np.ndarray | None = None,
              progress: bool = True, workers: Workers = Workers()) -> "QincoCodec":
        """Train on ``x_train`` (rows may be uint8 or float; memory-mapped arrays are read batch
        by batch). Without ``x_val`` the last min(10 000, N/10) rows are held out for validation.

        ``output``: file where the best model is written (atomically) whenever validation
        improves; with ``resume=True`` an existing ``output`` is continued.
        ``init_model``: a model file to continue training from (its weights, fresh optimizer).
        ``ivf_centroids``: raw-space ``(C, D)`` table used as a frozen first step (IVF model).
        ``workers``: the data-parallel processes of a launched job (:mod:`qinco2.distributed`).

        Empty sets are refused; rows are checked for NaN/Inf as they are read (the initialisation
        sample, each training and validation batch), not by a scan of the whole file upfront.
        """
        self.train_config.validated()
        x_train = check_vectors(x_train, "x_train", finite=False)
        if x_val is None:
            n_val = min(10_000, len(x_train) // 10)
            if n_val == 0:
                raise InputError(f"{len(x_train)} training vectors are too few to hold out a validation "
                                 "set; pass x_val or more training vectors")
            x_train, x_val = x_train[:-n_val], x_train[-n_val:]
        check_vectors(x_val, "x_val", x_train.shape[1], dim_owner=f"x_train has dimension {x_train.shape[1]}",
                      finite=False)
        if len(x_val) == 0:
            raise InputError("x_val has no rows, so there is nothing to validate on; pass at least one "
                             "validation vector (from the command line: ds.valset >= 1)")
        if len(x_train) < self.model_config.K:
            raise InputError(f"need at least K={self.model_config.K} training vectors, got {len(x_train)}")
        torch.manual_seed(self.train_config.seed)
        started = time.monotonic()
        resume_payload = self._prepare_model(x_train, output, resume, init_model, ivf_centroids)
        self.train_state_ = fit(self.model_, self.train_config, x_train, x_val, mse_scale=mse_scale,
                                output=output, resume=resume_payload, progress=progress, workers=workers,
                                init_s=time.monotonic() - started)
        return self

    def _prepare_model(self, x_train, output, resume, init_model, ivf_centroids) -> dict | None:
        D = x_train.shape[1]
        if resume and output is not None and Path(output).is_file():
            payload = load_checkpoint(output)
            self.model_ = self._build(payload).to(self.device)
            if "training" not in payload:
                raise ConfigError(f"{output} holds no training state and cannot be resumed; drop resume=true")
            if self.model_.cfg.D != D:
                raise InputError(f"cannot resume {output}: it is a model of D={self.model_.cfg.D} vectors but the "
                                 f"training data has D={D}; resume with the data it was trained on, or write a "
                                 "new model (another output=, or overwrite=true)")
            self.model_config = self.model_.cfg
            log.info("resuming from %s at epoch %d", output, payload["training"]["state"]["epoch"])
            return payload["training"]
        if init_model is not None:
            self.model_ = self._build(load_checkpoint(init_model)).to(self.device)
            if self.model_.cfg.D != D:
                raise InputError(f"model {init_model} has D={self.model_.cfg.D}, training data has D={D}")
            return None
        cfg = self._fit_to_data(dataclasses.replace(self.model_config, D=D), len(x_train))
        ivf = None
        if ivf_centroids is not None:
            ivf = torch.as_tensor(check_centroids(ivf_centroids, D))
            cfg = dataclasses.replace(cfg, ivf_K=len(ivf))
        self.model_config = cfg
        self.model_ = QincoModel(cfg, ivf).to(self.device)
        initialize(self.model_, self.train_config, x_train)
        return None

    def _fit_to_data(self, cfg: ModelConfig, n_train: int) -> ModelConfig:
        """``cfg`` shrunk for a small training set (see :mod:`.sizing`), with a warning."""
        fixed = _MODEL_FIELDS if self.fixed is None or self.small_data == "keep" else self.fixed
        chosen = self.fixed or _TRAIN_FIELDS
        sets_mix = self.small_data == "adapt" and "neighbour_mix" not in chosen
        mixing = sets_mix or self.train_config.neighbour_mix > 0
        new, note = fit_to_data(cfg, n_train, fixed, MIXED_VALUES_PER_PARAMETER if mixing else VALUES_PER_PARAMETER)
        if note is None:
            return cfg
        if new is not cfg and "patience" not in chosen:
            self.train_config = dataclasses.replace(
                self.train_config, patience=min(self.train_config.patience, SMALL_DATA_PATIENCE))
        if sets_mix:
            self.train_config = dataclasses.replace(self.train_config, neighbour_mix=SMALL_DATA_MIX)
            note += (f"; each training row is moved up to {SMALL_DATA_MIX:g} of the way to one of its nearest "
                     f"training rows (neighbour_mix={SMALL_DATA_MIX:g}; neighbour_mix=0 turns it off)")
        log.warning(note)
        return new

    # ------------------------------------------------------------------ inference
    @accepts_tensors
    def encode(self, x: np.ndarray, *, A: int | None = None, B: int | None = None, packed: bool = False,
               batch_size: int = 65_536, max_bytes: int | None = None, precision: str = "fp32") -> np.ndarray:
        """Codes ``(N, n_codes)`` int32 of raw vectors; ``A``/``B`` override the trained values.
        ``packed``: ``(N, code_size)`` uint8 instead, the vectors at their real size (as faiss's
        ``sa_encode``; :attr:`code_layout` gives the byte layout). ``max_bytes``: working memory
        of one chunk of rows (default 32 MiB on the CPU, up to 4 GiB on a GPU); codes do not
        depend on it. ``precision``: ``"fp32"`` (default), ``"bf16"`` (CPU or CUDA), ``"fp16"``
        or ``"tf32"`` (CUDA): the arithmetic of the step networks (:mod:`qinco2.codec.precision`);
        the reduced ones are faster on hardware with bfloat16/TF32 units and give codes of
        nearly the same error (each re-scored in float32 among the best final beams)."""
        model = self._model()
        check_precision(precision, self.device)
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise InputError(f"batch_size must be a whole number >= 1 (rows per batch), got {batch_size!r}; "
                             "pass e.g. batch_size=65536 (less to use less memory)")
        x = check_vectors(x, "x", model.cfg.D, dim_owner=f"the codec was trained on D={model.cfg.D}")
        A = model.cfg.A if A is None else A
        B = model.cfg.B if B is None else B
        if A < 0 or B < 1:
            raise InputError(f"need A >= 0 and B >= 1, got A={A} B={B}")
        if A > 0 and model.cfg.A == 0:
            raise InputError(f"A={A} needs pre-selection codebooks, but this model was trained with A=0; "
                             "encode with A=0 (exhaustive) or retrain with A > 0")
        layout = self.code_layout
        out = (np.empty((len(x), layout.code_size), dtype=np.uint8) if packed
               else np.empty((len(x), model.n_codes), dtype=np.int32))
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                u = model.normalize(self._tensor(x[i:i + batch_size]))
                codes = encode(model, u, A=A, B=B, max_bytes=max_bytes, precision=precision)[0].cpu().numpy()
                out[i:i + len(u)] = layout.pack(codes) if packed else codes
        return out

    @accepts_tensors
    def decode(self, codes: np.ndarray, *, packed: bool = False, batch_size: int = 65_536,
               precision: str = "fp32") -> np.ndarray:
        """Float32 vectors ``(N, D)`` from codes ``(N, m)``; ``m < n_codes`` decodes the prefix
        (the first ``m`` steps: a lower rate from the same model). ``packed``: ``codes`` are the
        ``(N, code_size)`` uint8 of ``encode(..., packed=True)`` (whole codes only). Values are
        checked batch by batch, so a memory-mapped array is read once. ``precision``: the
        arithmetic of the step networks, as for :meth:`encode` (``"bf16"``: faster where the
        processor has bfloat16 units; on sift-photos the vectors moved by 1e-4 of the codec's
        squared error)."""
        model = self._model()
        check_precision(precision, self.device)
        runners = self._prepared_steps(precision)
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise InputError(f"batch_size must be a whole number >= 1 (rows per batch), got {batch_size!r}; "
                             "pass e.g. batch_size=65536 (less to use less memory)")
        if packed:
            check_codes(codes, columns=self.code_size, columns_are="code_size bytes per vector",
                        fix="pass the packed codes made by this model")
        else:
            check_codes(codes, columns=(1, model.n_codes), columns_are="a prefix of this model's steps")
        out = np.empty((len(codes), model.cfg.D), dtype=np.float32)
        with torch.no_grad():
            for i in range(0, len(codes), batch_size):
                block = codes[i:i + batch_size]
                block = self.code_layout.unpack(block) if packed else np.asarray(block)
                check_codes(block, [s.K for s in model.steps[:block.shape[1]]], fix="pass codes made by this model")
                c = torch.as_tensor(block.astype(np.int64), device=self.device)
                out[i:i + len(c)] = model.denormalize(decode_prepared(model, runners, c)).cpu().numpy()
        return out

    def _prepared_steps(self, precision: str):
        """:func:`~qinco2.codec.encode.prepare_steps` of the model, kept while its weights are
        unchanged (any in-place write bumps a parameter's version), for the last precision asked."""
        model = self._model()
        key = (precision, tuple((p.data_ptr(), p._version) for p in model.parameters()))
        cached = getattr(self, "_prepared", None)
        if cached is None or cached[0] != key:
            self._prepared = cached = (key, prepare_steps(model, precision))
        return cached[1]

    # ------------------------------------------------------------------ files
    def save(self, path) -> None:
        """Write the model (config, normalisation, weights) atomically to ``path``."""
        model = self._model()
        save_checkpoint(path, model.cfg.to_dict(), model.state_dict())

    @classmethod
    def load(cls, path, *, device=None, **overrides) -> "QincoCodec":
        """Load a model file; ``A``/``B`` (and training fields) may be overridden."""
        payload = load_checkpoint(path)
        model = cls._build(payload)
        codec = cls(model.cfg, device=device)
        codec.model_ = model.to(codec.device)
        if payload.get("training"):
            try:
                codec.train_config = TrainConfig(**payload["training"]["config"])
            except (TypeError, KeyError) as exc:
                raise ModelFileError(f"{path} holds a damaged training state ({type(exc).__name__}: {exc}); "
                                     "retrain or use another copy") from exc
        for key, value in overrides.items():
            if key in ("A", "B"):
                if key == "A" and value and not codec.model_.cfg.A:
                    raise ConfigError(f"{path} was trained with A=0 (no pre-selection codebooks): "
                                      "it can only encode with A=0")
                setattr(codec.model_.cfg, key, value)
            elif key in _TRAIN_FIELDS:
                setattr(codec.train_config, key, value)
            else:
                raise ConfigError(f"cannot override {key!r} when loading; only A, B and training fields")
        codec.model_config = codec.model_.cfg
        return codec

    @classmethod
    def from_reference(cls, path, *, device=None) -> "QincoCodec":
        """A codec from a model file of the reference QINCo release (QINCo2, IVF-QINCo2 or a
        pickled QINCo1; :mod:`qinco2.codec.reference` lists what is read); :meth:`save` then
        writes it as a qinco2 model file."""
        model = model_from_reference(path)
        codec = cls(model.cfg, device=device)
        codec.model_ = model.to(codec.device)
        return codec

    @staticmethod
    def _build(payload: dict) -> QincoModel:
        """The model of a :func:`~qinco2.checkpoint.load_checkpoint` payload; ModelFileError
        naming the file when its config is invalid or its weights do not fit the config."""
        source = payload.get("source", "the model file")
        try:
            model = QincoModel(ModelConfig.from_dict(payload["model_config"]))
        except ConfigError as exc:
            raise ModelFileError(f"{source} holds an invalid model config: {exc}; the file is damaged "
                                 "or was edited: retrain or use another copy") from exc
        problems = state_dict_problems(model, payload["state_dict"])
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise ModelFileError(f"{source} is a damaged model file: its weights do not match its config: "
                                 f"{'; '.join(problems[:5])}{more}; retrain or use another copy")
        model.load_state_dict(payload["state_dict"])
        return model

    def to(self, device) -> "QincoCodec":
        """Move the model to ``device`` (``"cpu"``, ``"cuda"``, a torch device); returns ``self``."""
        self.device = _as_device(device)
        if self.model_ is not None:
            self.model_.to(self.device)
        return self

