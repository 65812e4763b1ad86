"""DSiRe checkpoints: one safetensors file, tensors plus a JSON header, no pickled objects.

Everything prediction needs is in it: per-voter index vectors, training labels, normaliser
bounds, voter (layer/part) names, feature and vote settings, the size regression and its
calibration (held-out errors and distances), recipe metadata from the zoo, every layer's shape
(a LoRA of another base model, same layer names and rank but other widths, is refused), and the
configuration model selection chose (with its inner scores), which prediction uses.
A checkpoint of an older format is refused with a line telling to refit it: it lacks the shapes.
Loading goes through the same bounded safetensors reader as LoRA files, and every field is
checked, so a truncated or structurally damaged checkpoint is refused with a clear error. The
header also holds a SHA-256 of every tensor's bytes, so damage inside a tensor (a flipped byte) is
refused too. It is a checksum, not a signature: whoever can rewrite the file can rewrite the hash.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.torch import save_file

from dsire.atomic import atomic_path
from dsire.errors import UserError
from dsire.hashing import tensors_sha256
from dsire.lora.files import read_safetensors
from dsire.lora.model import LoRAError
from dsire.models.calibration import Calibration
from dsire.models.knn import KNNVote
from dsire.models.module import DSiReModule
from dsire.models.regression import SizeRegressor
from dsire.models.select import Candidate
from dsire.settings import from_config

FORMAT = "dsire-checkpoint-v4"  # v3: content hash of the tensors; v4: layer shapes, selected configuration
HEADER_KEY = "dsire_checkpoint"


class CheckpointError(LoRAError):
    """A DSiRe checkpoint that cannot be trusted or read; names the file and the problem."""


def save_checkpoint(module: DSiReModule, path: str | Path) -> Path:
    path = Path(path)
    tensors, settings = module.knn.state()
    regression_tensors, regression = module.regressor.state()
    tensors |= regression_tensors
    header = {
        "format": FORMAT,
        "hparams": dict(module.hparams),
        "knn": settings,
        "regression": regression,
        "metadata": module.metadata,
        "shapes": {layer: list(shape) for layer, shape in module.shapes.items()},
        "inputs": module.inputs,
        "chosen": module.chosen.as_dict(),
        "selection": module.selection.report() if module.selection is not None else None,
    }
    if module.calibration is not None:
        calibration_tensors, header["calibration"] = module.calibration.state()
        tensors |= calibration_tensors
    header["sha256"] = tensors_sha256(tensors)
    with atomic_path(path) as tmp:
        save_file(
            {k: v.contiguous() for k, v in tensors.items()},
            str(tmp),
            metadata={HEADER_KEY: json.dumps(header, default=list)},
        )
    return path


def load_checkpoint(path: str | Path, use_faiss_gpu: bool = True) -> DSiReModule:
    path = Path(path)
    try:
        tensors, file_metadata = read_safetensors(path)
    except LoRAError as exc:
        raise CheckpointError(path, exc.problem) from exc
    try:
        header = json.loads(file_metadata[HEADER_KEY])
        if header["format"] != FORMAT:  # older ones lack the layer shapes that refuse a LoRA of another base
            raise ValueError(f"format {header['format']!r}, expected {FORMAT}: refit it with train.py")
        if header["sha256"] != tensors_sha256(tensors):
            raise ValueError("the tensors' content hash differs from the one saved with them (a damaged file)")
        voters = header["knn"]["voters"]
        n_train = tensors["labels"].shape[0]
        for i in range(len(voters)):
            vectors = tensors[f"voter.{i}"]
            if vectors.dim() != 2 or vectors.shape[0] != n_train or not vectors.isfinite().all():
                raise ValueError(f"voter {i} vectors have shape {tuple(vectors.shape)} for {n_train} labels")
            if tensors[f"low.{i}"].shape != vectors.shape[1:] or tensors[f"high.{i}"].shape != vectors.shape[1:]:
                raise ValueError(f"voter {i} normaliser bounds do not match its vectors")
        weights = tensors["voter_weights"]
        if weights.shape != (len(voters),) or not (weights.isfinite().all() and (weights >= 0).all()):
            raise ValueError(f"voter weights have shape {tuple(weights.shape)} for {len(voters)} voters")
        hparams = dict(header["hparams"], use_faiss_gpu=use_faiss_gpu)
        module = DSiReModule(**hparams)
        module.knn = KNNVote.from_state(tensors, header["knn"], use_gpu=use_faiss_gpu)
        module.regressor = SizeRegressor.from_state(tensors, header["regression"], voters)
        coef, width = module.regressor.coef, sum(x.shape[1] for x in module.knn.vectors)
        if coef.shape != (width,) or not np.isfinite(coef).all():
            raise ValueError(f"regression coefficients have shape {tuple(coef.shape)}, expected ({width},)")
        module.shapes = _shapes(header["shapes"])
        module.inputs = {str(v): int(d) for v, d in header["inputs"].items()}
        module.chosen = from_config(Candidate, header["chosen"], "chosen")
        if module.voters({v: np.zeros((1, d)) for v, d in module.inputs.items()}).keys() != set(voters):
            raise ValueError("the chosen configuration's voters are not the saved ones")
        if "calibration" in header:
            module.calibration = Calibration.from_state(tensors, header["calibration"])
    except (KeyError, TypeError, ValueError, UserError, json.JSONDecodeError) as exc:
        raise CheckpointError(path, f"not a valid DSiRe checkpoint ({type(exc).__name__}: {exc})") from exc
    module.metadata = dict(header.get("metadata", {}))
    return module


def _shapes(saved: dict) -> dict[str, tuple[int, int]]:
    """{layer: (out, in)} from the header, each two positive whole numbers."""
    shapes = {}
    for layer, shape in saved.items():
        if not (isinstance(shape, list) and len(shape) == 2 and all(type(x) is int and x > 0 for x in shape)):
            raise ValueError(f"layer {layer} has shape {shape!r}, expected [out, in]")
        shapes[layer] = (shape[0], shape[1])
    return shapes
