"""Read the model files of the reference QINCo release and turn them into qinco2 models.

What the files hold was learnt by reading these files of the reference repository
(github.com/facebookresearch/Qinco); no code of it is used or copied here (its license forbids it):
``qinco/utils.py`` (``save_model``, ``load_saved_model_data``), ``qinco/model/qinco_base.py``
(the module tree), ``qinco/qinco_tasks.py`` (``QincoConvertTask``), ``model_qinco.py`` at the
root (= ``qinco_v1/model_qinco.py``), ``train_qinco.py`` and ``codec_qinco.py``.

Two layouts are read:

* **QINCo2 release** (``qinco2-models/*.pt``: QINCo1 and QINCo2-L 1M models, IVF-QINCo2-S/M
  1B models): a plain dict ``{"model": state_dict, "parameters": {K, M, de, dh, L, A, B,
  ivf_in_use, ivf_K, qinco1_mode} (None values left out), "data_dim": D, "epoch", "optimizer",
  "scheduler", "logger"}``. Weights: ``data_mean (D,)``, ``data_std ()``; per step ``m``
  ``steps.m.codebook.weight (K, D)``, ``steps.m.xtarget_mean / xtarget_var (D,)``; conditioned
  steps add ``concat.mlp.weight (E, E+D)`` and ``.bias (E,)`` (input order: projected codeword,
  then x_hat), ``residual_blocks.l.up_proj.weight (H, E)`` / ``down_proj.weight (E, H)``,
  ``in_proj.weight (E, D)`` / ``out_proj.weight (D, E)`` when ``E != D``, and
  ``substep.codebook.weight (K, D)`` (the pre-selector) when ``A > 0``. Step 0 is a plain
  codebook, or for IVF models ``steps.0.ivf_centroids.weight (ivf_K, D)``, already normalised.
  ``qinco1_mode`` drops the explicit codeword skip; without it the skip is always added, so
  ``E = D`` adds the codeword twice (``double_skip``). Older files may carry ``module.``
  prefixes, ``residual_blocks.N.in_proj``/``out_proj`` names and an unused
  ``steps.0.substep``; they are read too.
* **QINCo1** (``QINCo/models/*.pt``): a whole ``model_qinco.QINCo``, ``IVFQINCo`` or
  ``QINCoLR`` module pickled with ``torch.save(model)``, data scale in its attribute
  ``db_scale`` (no mean). Weights: ``codebook0.weight`` (the IVF table for ``IVFQINCo``), then
  ``step{m}.codebook.weight``, ``step{m}.MLPconcat.weight (D, 2D)`` / ``.bias``,
  ``step{m}.residual_block{l}.0.weight (h, D)`` and ``.2.weight (D, h)``; ``m`` runs from 1
  (from 0 after an IVF table). ``QINCoLR`` replaces ``MLPconcat`` by two bias-free maps
  ``MLPconcat.0 (h, 2D)``, ``MLPconcat.1 (D, h)``, converted to their product (exact up to
  float rounding). The pickle is read by torch's ``weights_only`` unpickler with plain stand-ins
  for the reference classes (and for ``torch.nn`` layers and numpy scalars), so no class is
  imported and no code of the file runs; needs torch >= 2.6. PQ-QINCo files are refused.
"""

from __future__ import annotations

import logging
import math
import pickle
import re
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import FORMAT_TAG
from ..errors import ConfigError, ModelFileError
from .model import ModelConfig, QincoModel

log = logging.getLogger(__name__)

EXPECTED = ("a file of the reference QINCo release: a QINCo2 checkpoint (a dict with 'model', "
            "'parameters' and 'data_dim', as dl.fbaipublicfiles.com/QINCo/qinco2-models/*.pt) or a "
            "QINCo1 model pickled whole (model_qinco.QINCo, IVFQINCo or QINCoLR, as "
            "dl.fbaipublicfiles.com/QINCo/models/*.pt)")


# ---------------------------------------------------------------- reading pickles without their classes

class _Pickled:
    """Stand-in for a pickled reference object: keeps its attributes, runs none of its code."""

    reference_class = "?"


def _stand_in(full_name: str) -> type:
    return type(full_name.rsplit(".", 1)[1], (_Pickled,), {"reference_class": full_name})


class _NumpyDType:
    """Stand-in for ``numpy.dtype`` inside a pickle: the type code and byte order only."""

    def __init__(self, code="f8", align=False, copy=True):
        self.code, self.order = str(code), "="

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">", "|", "="):
            self.order = state[1]


def _numpy_scalar(dtype, data=b""):
    """A numpy number of the pickle (e.g. QINCo1's ``db_scale = xt.max()``) as a Python number."""
    if (not isinstance(dtype, _NumpyDType) or not re.fullmatch(r"[fiub][1248]", dtype.code)
            or not isinstance(data, bytes)):
        raise pickle.UnpicklingError(f"unsupported numpy scalar of type {getattr(dtype, 'code', dtype)!r}")
    order = "" if dtype.order in ("|", "=") else dtype.order
    return np.frombuffer(data, dtype=np.dtype(order + dtype.code))[0].item()


_QINCO1_CLASSES = [f"{mod}.{name}" for mod in ("model_qinco", "qinco_v1.model_qinco")
                   for name in ("QINCo", "IVFQINCo", "QINCoLR", "QINCoStep", "PQ_QINCo")]
_TORCH_LAYERS = ["torch.nn.modules.sparse.Embedding", "torch.nn.modules.linear.Linear",
                 "torch.nn.modules.linear.Identity", "torch.nn.modules.container.Sequential",
                 "torch.nn.modules.container.ModuleList", "torch.nn.modules.activation.ReLU"]
_SAFE_GLOBALS = ([(_stand_in(name), name) for name in _QINCO1_CLASSES + _TORCH_LAYERS]
                 + [(_numpy_scalar, f"{mod}.multiarray.scalar") for mod in ("numpy.core", "numpy._core")]
                 + [(_NumpyDType, "numpy.dtype")])


def _named_safe_globals() -> bool:
    """Whether this torch maps a pickled name to an object of ours (``(obj, "module.name")``)."""
    return hasattr(torch.serialization, "safe_globals") and torch.__version__ >= (2, 6)


def _read(path: Path):
    """The object of a torch file, read by torch's ``weights_only`` unpickler (plus stand-ins)."""
    if path.is_dir():
        raise ModelFileError(f"{path} is a directory; give the path of a reference model file")
    if not path.is_file():
        raise ModelFileError(f"{path} does not exist; download one of the released models (README, "
                             "'Released QINCo checkpoints')")
    try:
        if _named_safe_globals():
            with torch.serialization.safe_globals(_SAFE_GLOBALS):
                return torch.load(path, map_location="cpu", weights_only=True)
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise ModelFileError(f"{path} cannot be read: {exc}") from exc
    except MemoryError:
        raise
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found is None:
            raise _not_torch(path, exc) from exc
        extra = ("; reading a pickled QINCo1 model needs torch >= 2.6, this is torch "
                 f"{torch.__version__}" if not _named_safe_globals() else "")
        raise ModelFileError(f"{path} holds an object of class {found.group(1)}, which is not part of "
                             f"{EXPECTED}{extra}") from exc
    except Exception as exc:    # torch.load raises many types on foreign or damaged bytes
        raise _not_torch(path, exc) from exc


def _not_torch(path: Path, exc: Exception) -> ModelFileError:
    """The error for bytes torch cannot read: the unpickler's own reason, without its advice."""
    text = str(exc)
    reason = text.partition("WeightsUnpickler error:")[2].partition("Check the documentation")[0].strip()
    reason = reason or (text.splitlines()[0] if text else type(exc).__name__)
    return ModelFileError(f"{path} is not a torch file or is damaged (torch.load: {reason}); expected {EXPECTED}")


def _describe(obj) -> str:
    if isinstance(obj, dict):
        return f"a dict with keys {sorted(map(str, obj))[:12]}"
    if isinstance(obj, _Pickled):
        return f"a pickled {obj.reference_class}"
    return f"a {type(obj).__name__}"


# ---------------------------------------------------------------- the two layouts -> reference QINCo2 names

def _qinco2_release(obj: dict, path: Path) -> tuple[dict, dict, int]:
    """Weights (QINCo2 names, cleaned of older spellings), parameters and D of a QINCo2 file."""
    state, params, D = obj.get("model"), obj.get("parameters"), obj.get("data_dim")
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ModelFileError(f"{path}: its 'model' entry is not a dict of named tensors "
                             f"({type(state).__name__}); expected {EXPECTED}")
    if params is None or D is None:
        raise ModelFileError(
            f"{path} is a QINCo2 checkpoint without 'parameters' and 'data_dim' (a file from before the "
            "reference's task=convert): it lacks the model arguments and the data normalisation; "
            "upgrade it with the reference code's task=convert first, or use a released file")
    if not isinstance(params, dict) or isinstance(D, bool) or not isinstance(D, int) or D < 1:
        raise ModelFileError(f"{path}: 'parameters' must be a dict and 'data_dim' a positive integer, got "
                             f"{type(params).__name__} and {D!r}; the file is damaged")
    ref = {}
    for name, t in state.items():
        name = name.removeprefix("module.")
        name = re.sub(r"residual_blocks\.\d+\.(in_proj|out_proj)", r"\1", name)   # older spelling
        ref[name] = t
    ref.pop("steps.0.substep.codebook.weight", None)      # unused pre-selector of older files
    if "data_std" in ref and ref["data_std"].numel() == 1:
        ref["data_std"] = ref["data_std"].reshape(())
    return ref, params, D


def _module_tensors(obj: _Pickled, prefix: str = "") -> dict[str, torch.Tensor]:
    """``state_dict()`` of a pickled module tree of stand-ins."""
    attrs, out = vars(obj), {}
    skip = attrs.get("_non_persistent_buffers_set") or set()
    for name, t in (attrs.get("_parameters") or {}).items():
        if t is not None:
            out[prefix + name] = t
    for name, t in (attrs.get("_buffers") or {}).items():
        if t is not None and name not in skip:
            out[prefix + name] = t
    for name, child in (attrs.get("_modules") or {}).items():
        if isinstance(child, _Pickled):
            out.update(_module_tensors(child, f"{prefix}{name}."))
    return out


_QINCO1_NAMES = (   # QINCo1 weight -> QINCo2 weight, {k}: index of the step in the QINCo2 layout
    (r"step(\d+)\.codebook\.weight", "steps.{k}.codebook.weight"),
    (r"step(\d+)\.MLPconcat\.(weight|bias)", "steps.{k}.concat.mlp.{1}"),
    (r"step(\d+)\.MLPconcat\.([01])\.weight", "steps.{k}.concat.lowrank{1}"),
    (r"step(\d+)\.residual_block(\d+)\.0\.weight", "steps.{k}.residual_blocks.{1}.up_proj.weight"),
    (r"step(\d+)\.residual_block(\d+)\.2\.weight", "steps.{k}.residual_blocks.{1}.down_proj.weight"),
)


def _qinco1_name(name: str, ivf: bool) -> str:
    if name == "codebook0.weight":
        return "steps.0.ivf_centroids.weight" if ivf else "steps.0.codebook.weight"
    for pattern, target in _QINCO1_NAMES:
        found = re.fullmatch(pattern, name)
        if found:
            return target.format(*found.groups(), k=int(found.group(1)) + ivf)
    return f"(QINCo1) {name}"        # reported as unknown


def _qinco1_module(obj: _Pickled, path: Path) -> tuple[dict, dict, int]:
    """Weights (QINCo2 names), parameters and D of a pickled QINCo1 model."""
    kind = obj.reference_class.rsplit(".", 1)[1]
    if kind not in ("QINCo", "IVFQINCo", "QINCoLR"):
        raise ModelFileError(f"{path} holds a pickled {obj.reference_class}; qinco2 converts QINCo, IVFQINCo "
                             "and QINCoLR models (not PQ-QINCo, nor a single step)")
    scale = vars(obj).get("db_scale")
    if isinstance(scale, torch.Tensor) and scale.numel() == 1:
        scale = scale.item()
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ModelFileError(f"{path}: the pickled {kind} has no positive db_scale (found {scale!r}); "
                             "expected the data scale that train_qinco.py sets")
    ivf = kind == "IVFQINCo"
    ref = {_qinco1_name(name, ivf): t for name, t in _module_tensors(obj).items()}
    for k in sorted({int(n.split(".")[1]) for n in ref if n.endswith("concat.lowrank0")}):
        low0, low1 = ref.pop(f"steps.{k}.concat.lowrank0"), ref.pop(f"steps.{k}.concat.lowrank1", None)
        if low1 is None or low1.shape[1] != low0.shape[0]:
            raise ModelFileError(f"{path}: QINCoLR step {k - ivf} lacks MLPconcat.1 or its shape does not "
                                 "chain with MLPconcat.0; the file is damaged")
        ref[f"steps.{k}.concat.mlp.weight"] = (low1.double() @ low0.double()).float()
        ref[f"steps.{k}.concat.mlp.bias"] = low1.new_zeros(low1.shape[0])
    table = ref.get("steps.0.ivf_centroids.weight", ref.get("steps.0.codebook.weight"))
    if table is None or table.ndim != 2:
        raise ModelFileError(f"{path}: the pickled {kind} has no codebook0 table; the file is damaged")
    D = table.shape[1]
    ref["data_mean"], ref["data_std"] = torch.zeros(D), torch.tensor(float(scale))
    return ref, {"qinco1_mode": True, "A": 0, "B": 1, "ivf_in_use": ivf}, D


# ---------------------------------------------------------------- config and our weights

def _arch(ref: dict, params: dict, last: str, conditioned: bool) -> tuple[int | None, int, int]:
    """``(de, dh, L)`` read from the weights of the last step (parameters when it has none)."""
    if not conditioned:
        return params.get("de") or None, int(params.get("dh") or 256), int(params.get("L") or 0)
    de = ref[last + "in_proj.weight"].shape[0] if last + "in_proj.weight" in ref else None
    blocks = {int(m.group(1)) for k in ref if (m := re.match(re.escape(last) + r"residual_blocks\.(\d+)\.", k))}
    L = len(blocks)
    dh = ref[last + "residual_blocks.0.up_proj.weight"].shape[0] if L else int(params.get("dh") or 256)
    return de, dh, L


def _config(ref: dict, params: dict, D: int, path: Path) -> ModelConfig:
    """Our :class:`ModelConfig` for reference weights, checked against the stored parameters."""
    steps = sorted({int(m.group(1)) for k in ref if (m := re.match(r"steps\.(\d+)\.", k))})
    if not steps or steps != list(range(len(steps))):
        raise ModelFileError(f"{path}: the weights name steps {steps[:10]}, expected steps 0..n-1; "
                             f"expected {EXPECTED}")
    ivf = "steps.0.ivf_centroids.weight" in ref
    if params.get("ivf_in_use") and not ivf:
        raise ModelFileError(f"{path}: its parameters say ivf_in_use but it holds no IVF table "
                             "(steps.0.ivf_centroids.weight); the file is incomplete")
    last = f"steps.{len(steps) - 1}."
    lacking = [k for k in (last + "codebook.weight", "data_mean", "data_std") if k not in ref]
    conditioned = ivf or len(steps) > 1
    if conditioned and last + "concat.mlp.weight" not in ref:
        lacking.append(last + "concat.mlp.weight")
    if lacking:
        raise ModelFileError(f"{path} lacks the weights {lacking}; it holds {sorted(ref)[:8]}...; "
                             f"expected {EXPECTED}")
    de, dh, L = _arch(ref, params, last, conditioned)
    M, K = len(steps) - ivf, ref[last + "codebook.weight"].shape[0]
    A, q1 = int(params.get("A") or 0), bool(params.get("qinco1_mode"))
    if conditioned and (last + "substep.codebook.weight" in ref) != (A > 0):
        raise ModelFileError(f"{path}: parameter A={params.get('A')} does not match the pre-selection "
                             f"codebooks, which it {'holds' if A == 0 else 'lacks'}; the file is inconsistent")
    derived = {"M": M, "K": K, "L": L, "dh": dh, "de": de or D}
    if ivf:
        derived["ivf_K"] = ref["steps.0.ivf_centroids.weight"].shape[0]
    wrong = [f"{k}={params[k]} (weights: {v})" for k, v in derived.items()
             if params.get(k) and int(params[k]) != v and (conditioned or k in ("M", "K"))]
    if wrong:
        raise ModelFileError(f"{path}: its parameters disagree with its weights: {', '.join(wrong)}; "
                             "the file is inconsistent")
    try:
        return ModelConfig(D=D, M=M, K=K, L=L, de=de, dh=dh, A=A, B=int(params.get("B") or 1),
                           codeword_skip=not q1, double_skip=not q1 and de is None, zero_init=not q1,
                           identity_init=False, ivf_K=derived.get("ivf_K", 0)).validated()
    except ConfigError as exc:
        raise ModelFileError(f"{path}: its model arguments are not valid: {exc}") from exc


_OUR_NAMES = (   # reference QINCo2 weight -> qinco2 weight
    (r"data_mean", "mean"), (r"data_std", "scale"),
    (r"steps\.(\d+)\.(?:ivf_centroids|codebook)\.weight", r"steps.\1.codebook"),
    (r"steps\.(\d+)\.substep\.codebook\.weight", r"steps.\1.preselector"),
    (r"steps\.(\d+)\.concat\.mlp\.(weight|bias)", r"steps.\1.net.fuse.\2"),
    (r"steps\.(\d+)\.residual_blocks\.(\d+)\.up_proj\.weight", r"steps.\1.net.blocks.\2.up.weight"),
    (r"steps\.(\d+)\.residual_blocks\.(\d+)\.down_proj\.weight", r"steps.\1.net.blocks.\2.down.weight"),
    (r"steps\.(\d+)\.in_proj\.weight", r"steps.\1.net.proj_in.weight"),
    (r"steps\.(\d+)\.out_proj\.weight", r"steps.\1.net.proj_out.weight"),
    (r"steps\.(\d+)\.xtarget_mean", r"steps.\1.running_mean"),
    (r"steps\.(\d+)\.xtarget_var", r"steps.\1.running_std"),     # holds a standard deviation
)


def _our_name(name: str) -> str | None:
    for pattern, target in _OUR_NAMES:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, target, name)
    return None


def _our_state(ref: dict, model: QincoModel, path: Path) -> dict[str, torch.Tensor]:
    """The reference weights under our names, every shape checked; running statistics, which
    the reference's IVF step and QINCo1 lack, keep their defaults."""
    state = model.state_dict()
    unknown, wrong, filled = [], [], set()
    for name, t in ref.items():
        ours = _our_name(name)
        if ours not in state:
            unknown.append(name)
        elif tuple(t.shape) != tuple(state[ours].shape):
            wrong.append(f"{name} has shape {tuple(t.shape)}, expected {tuple(state[ours].shape)}")
        else:
            state[ours] = t.detach().to(torch.float32).clone()
            filled.add(ours)
    missing = [k for k in state if k not in filled and not k.endswith(("running_mean", "running_std"))]
    problems = ([f"unknown weights {unknown[:5]}"] * bool(unknown) + wrong[:5]
                + [f"nothing for qinco2's {missing[:5]}"] * bool(missing))
    if problems:
        raise ModelFileError(f"{path} does not have the weights of the model its arguments describe "
                             f"({model.cfg}): {'; '.join(problems)}; expected {EXPECTED}")
    return state


def read_reference(path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Config and weights (reference QINCo2 names) of a reference model file; :class:`ModelFileError`
    saying what was found and what was expected for anything else."""
    path = Path(path)
    obj = _read(path)
    if isinstance(obj, dict) and obj.get("format") == FORMAT_TAG:
        raise ModelFileError(f"{path} is already a qinco2 model file: use it as it is "
                             "(model=..., QincoCodec.load)")
    if isinstance(obj, dict) and "model" in obj:
        ref, params, D = _qinco2_release(obj, path)
        layout = "QINCo2 release checkpoint"
    elif isinstance(obj, _Pickled) and obj.reference_class in _QINCO1_CLASSES:
        ref, params, D = _qinco1_module(obj, path)
        layout = f"pickled QINCo1 {obj.reference_class}"
    else:
        raise ModelFileError(f"{path} holds {_describe(obj)}; expected {EXPECTED}")
    cfg = _config(ref, params, D, path)
    log.info("%s is a %s: %s", path, layout, cfg)
    return cfg, ref


def model_from_reference(path) -> QincoModel:
    """The :class:`QincoModel` of a model file of the reference QINCo release (see the module doc)."""
    cfg, ref = read_reference(path)
    model = QincoModel(cfg)
    model.load_state_dict(_our_state(ref, model, Path(path)))
    return model
