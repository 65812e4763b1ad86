"""EK-FAC curvature of the mean training loss, fitted by kronfluence, and spectral functions of it.

EK-FAC approximates the Gauss–Newton curvature of each tracked layer (weight [out, in], bias as an
extra input column) by the Kronecker eigenbasis Q_S ⊗ Q_A of its gradient and activation covariances,
with the eigenvalues Λ [out, in] re-fitted in that basis. Any function φ of the curvature then acts on
a layer's gradient G as Q_S (φ(Λ) ⊙ Q_Sᵀ G Q_A) Q_Aᵀ: influence functions use φ(σ) = 1/(σ + λ), Source
the segment terms of `dsire.attribution.source`. kronfluence fits the factors (its scores are not
needed: Source is not one of them, and the influence function is the same formula with another φ).
"""

from __future__ import annotations

import copy
import gc
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.arguments import FactorArguments
from kronfluence.factor.covariance import save_covariance_matrices
from kronfluence.task import Task
from torch import nn
from torch.utils.data import TensorDataset

from dsire.lab.data import Examples
from dsire.lab.gradients import example_gradients
from dsire.lab.margins import margin

Spectral = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class LayerFactors:
    """One layer's EK-FAC: eigenbases of the activation (Q_A) and output-gradient (Q_S) covariances and
    the corrected eigenvalues Λ [out, in] (in counts the bias column)."""

    activation_basis: torch.Tensor
    gradient_basis: torch.Tensor
    eigenvalues: torch.Tensor

    def apply(self, function: Spectral, gradients: torch.Tensor) -> torch.Tensor:
        """φ(H) G for a batch of layer gradients G [..., out, in]."""
        rotated = self.gradient_basis.T @ gradients @ self.activation_basis
        return self.gradient_basis @ (function(self.eigenvalues) * rotated) @ self.activation_basis.T


Factors = dict[str, LayerFactors]  # by module name


def negative_margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed −(z_y − logsumexp_{j≠y} z_j): the measurement whose gradient a query contributes (the
    margin is the output LDS measures; the sign makes a positive score a helpful training example,
    kronfluence's convention)."""
    return -margin(logits, labels).sum()


def tracked_modules(model: nn.Module) -> list[str]:
    """The linear layers all of whose parameters train: every layer for full fine-tuning, the LoRA A and
    B matrices (not the frozen base layers) for peft models."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and all(p.requires_grad for p in module.parameters())
    ]


def layer_gradients(
    model: nn.Module, examples: Examples, modules: list[str], loss: Callable = F.cross_entropy
) -> dict[str, torch.Tensor]:
    """Per-example gradients of `loss` as layer matrices {module: [examples, out, in (+1 for the bias)]}."""
    names = [f"{m}.{p}" for m in modules for p in ("weight", "bias") if getattr(model.get_submodule(m), p) is not None]
    grads = example_gradients(model, examples, names, loss=loss)
    out = {}
    for m in modules:
        weight = grads[f"{m}.weight"]
        bias = grads.get(f"{m}.bias")
        out[m] = weight if bias is None else torch.cat([weight, bias[..., None]], dim=-1)
    return out


class _ClassificationTask(Task):
    """kronfluence's view of a classifier: summed cross-entropy (labels drawn from the model's own
    predictions when fitting the true Fisher) and the negative margin as measurement."""

    def __init__(self, modules: list[str]):
        self.modules = modules

    def compute_train_loss(self, batch, model: nn.Module, sample: bool = False) -> torch.Tensor:
        inputs, labels = batch
        logits = model(inputs)
        if sample:
            with torch.no_grad():
                labels = torch.multinomial(torch.softmax(logits.detach(), dim=-1), 1).flatten()
        return F.cross_entropy(logits, labels, reduction="sum")

    def compute_measurement(self, batch, model: nn.Module) -> torch.Tensor:
        inputs, labels = batch
        return negative_margin(model(inputs), labels)

    def get_influence_tracked_modules(self) -> list[str]:
        return self.modules


def fit_factors(
    models: list[nn.Module], examples: Examples, modules: list[str], seed: int
) -> tuple[Factors, list[str]]:
    """EK-FAC factors of a classifier's mean training loss over `examples`, averaged over the
    checkpoints `models` (`task_factors`)."""
    device = next(models[0].parameters()).device
    inputs = examples.take(torch.arange(len(examples))).to(device)
    data = TensorDataset(inputs, examples.labels.to(device))
    return task_factors(models, _ClassificationTask(modules), data, modules, seed)


def task_factors(
    models: list[nn.Module], task: Task, data: TensorDataset, modules: list[str], seed: int
) -> tuple[Factors, list[str]]:
    """EK-FAC factors of `task`'s training loss over `data`, averaged over the checkpoints `models`
    (not modified), with a note for each layer whose eigenvalues were not finite: those entries are set
    to 0 (the flat-direction limit of every spectral function used here) and reported.

    Averaging is the paper's segment curvature H̄: the activation and gradient covariances are means
    over examples, so their mean over checkpoints is kronfluence's running sums added across
    checkpoints; one eigenbasis comes from those, and the eigenvalues re-fitted in it at each checkpoint
    (also running sums) are added the same way. True Fisher: each checkpoint's targets are drawn from
    its own predictions with the same `seed`, so identical checkpoints give exactly one checkpoint's
    factors."""
    gc.freeze()  # kronfluence calls gc.collect() between stages: with the process's objects frozen it stays cheap
    try:
        loaded = _kronfluence_factors([prepare_model(copy.deepcopy(m), task) for m in models], task, data, seed)
    finally:
        gc.unfreeze()
    factors, notes = {}, []
    for m in modules:
        eigenvalues, note = damped(loaded["lambda_matrix"][m].double() / loaded["num_lambda_processed"][m].double(), m)
        notes += [note] if note else []
        factors[m] = LayerFactors(
            loaded["activation_eigenvectors"][m].double(), loaded["gradient_eigenvectors"][m].double(), eigenvalues
        )
    return factors, notes


def _kronfluence_factors(models: list[nn.Module], task: Task, data: TensorDataset, seed: int) -> dict:
    """kronfluence's three EK-FAC stages with the covariances (stage 1) and eigenvalues (stage 3)
    summed over the checkpoints before the stage that reads them."""
    with tempfile.TemporaryDirectory() as directory, warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.filterwarnings("ignore", message=".*GradScaler.*")  # kronfluence's AMP scaler, off on CPU
        analyzers = [
            Analyzer("dsire", model, task, output_dir=directory, disable_tqdm=True, disable_model_save=True)
            for model in models
        ]
        fit = {"factor_args": FactorArguments(strategy="ekfac"), "per_device_batch_size": 256}
        for i, analyzer in enumerate(analyzers):
            torch.manual_seed(seed)
            analyzer.fit_covariance_matrices(f"covariance{i}", data, **fit)
        first = analyzers[0]
        mean = first.factors_output_dir("mean")
        mean.mkdir(parents=True)
        save_covariance_matrices(
            mean, _summed([a.load_covariance_matrices(f"covariance{i}") for i, a in enumerate(analyzers)])
        )
        first.perform_eigendecomposition("mean", factor_args=fit["factor_args"])
        for i, analyzer in enumerate(analyzers):
            torch.manual_seed(seed)
            analyzer.fit_lambda_matrices(f"lambda{i}", data, load_from_factors_name="mean", **fit)
        lambdas = _summed([a.load_lambda_matrices(f"lambda{i}") for i, a in enumerate(analyzers)])
        return first.load_eigendecomposition("mean") | lambdas


def _summed(factors: list[dict[str, dict[str, torch.Tensor]]]) -> dict[str, dict[str, torch.Tensor]]:
    """kronfluence's running sums (and their example counts) added over checkpoints."""
    return {name: {m: sum(f[name][m] for f in factors) for m in factors[0][name]} for name in factors[0]}


def damped(eigenvalues: torch.Tensor, module: str) -> tuple[torch.Tensor, str | None]:
    """Non-finite eigenvalues replaced by 0 (a flat direction: every spectral function used here stays
    finite there), with a note naming how many, so it is never silent."""
    bad = ~torch.isfinite(eigenvalues)
    if not bad.any():
        return eigenvalues, None
    note = f"{module}: {int(bad.sum())} of {bad.numel()} curvature eigenvalues were not finite; set to 0 (damped)"
    return torch.where(bad, torch.zeros_like(eigenvalues), eigenvalues), note
