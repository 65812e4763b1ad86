"""Features of a zoo, one way for every caller: the data module's batches through `DSiReModule.featurise`.

`train.py` featurises with its own trainer (DDP, the spectra cache); the zoo check and the
benchmarks call `zoo_features`, which reads a zoo source the way `data.source` does and keeps every
part of every layer (`ALL`), so that any voter set can be derived from it (`FeatureSpec.derive`).
"""

from __future__ import annotations

import lightning.pytorch as pl

from dsire.data.datamodule import LoRAZooDataModule
from dsire.distributed import gather, one_rank_at_a_time
from dsire.models.features import PARTS, Features, gather_features
from dsire.models.module import DSiReModule


def featurise(model: DSiReModule, trainer: pl.Trainer, loader) -> tuple[Features, str]:
    """Every LoRA's features (gathered from all ranks), and where their spectra came from, in words."""
    features = gather_features(Features.concat(trainer.predict(model, loader) or []))
    if model.cache is not None:
        for _ in one_rank_at_a_time():
            model.cache.flush()
    computed, cached = sum(gather(model.computed)), sum(gather(model.cached))
    unreadable = len(features.errors)
    return features, f"{computed} computed from weights, {cached} from the cache, {unreadable} not usable"


def zoo_features(source: dict, cache_dir: str | None = None, accelerator: str = "cpu") -> Features:
    """Every part (σ(ΔW), σ(down), σ(up), norms) of every layer of a zoo source (`data.source`'s keys),
    on one device, spectra cached in `cache_dir` when given (under the model's spectra settings, as
    `train.py` caches them); unreadable LoRAs are in `errors`."""
    model = DSiReModule(parts=PARTS)
    settings = {"dtype": model.hparams.spectra_dtype, "precision": model.hparams.spectra_precision}
    split = {"protocol": "kfold", "folds": 2}  # not used: the whole zoo is featurised
    datamodule = LoRAZooDataModule(source, split, cache_dir=cache_dir, cache_settings=settings)
    datamodule.setup()
    model.cache = datamodule.cache
    trainer = pl.Trainer(
        accelerator=accelerator, devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    return featurise(model, trainer, datamodule.predict_dataloader())[0]
