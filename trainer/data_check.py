"""What `train` checks about its datasets before it builds anything: every manifest readable, every shard of the
splits it will read present with the size the manifest records (a stat per shard: no hashing). A truncated or
missing shard then stops the run at step 0 instead of after hours, when a rank first opens it. The sha256 of each
shard is still checked when it is opened; `pretrain inspect --verify <dataset>` checks them all up front.

Light on purpose (no torch): `train --dry-run` uses it to warn about missing data paths.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from trainer.config import ConfigError

MAX_LISTED = 10  # problems named one by one in a message; the rest are counted
# Where synthetic data ends a document (ModelConfig.uses_documents): our tokenizer's eos id (data_pipeline.tokenizer).
SYNTHETIC_EOS_ID = 2


@dataclass
class DataCheck:
    missing_datasets: list[str] = field(default_factory=list)  # a wrong path or an unfinished prepare: fix the config
    bad_shards: list[str] = field(default_factory=list)  # present dataset, damaged content: copy or prepare again
    shards_checked: int = 0

    def message(self) -> str:
        lines = []
        if self.missing_datasets:
            lines += ["data.datasets names data that is not there:", *_listed(self.missing_datasets),
                      "fix the path in data.datasets (e.g. data.datasets.0.path=data/mydata) or run `pretrain "
                      "prepare` for it"]
        if self.bad_shards:
            lines += [f"{len(self.bad_shards)} of {self.shards_checked} shards are missing or do not have the size "
                      f"their manifest records:", *_listed(self.bad_shards),
                      "copy the complete dataset folder again or re-run `pretrain prepare`; "
                      "`pretrain inspect --verify <dataset>` checks every shard's sha256"]
        return "\n".join(lines)


def _listed(items: list[str]) -> list[str]:
    shown = [f"  - {item}" for item in items[:MAX_LISTED]]
    if len(items) > MAX_LISTED:
        shown.append(f"  ... and {len(items) - MAX_LISTED} more")
    return shown


def check_datasets(data: Any, eval_enabled: bool, check_shards: bool = True) -> DataCheck:
    """Check `data.datasets` (a DataConfig). check_shards=False: only that each manifest can be read (dry run)."""
    from data_pipeline.errors import DataPipelineError
    from data_pipeline.manifest import Manifest

    result = DataCheck()
    if data.synthetic:
        return result
    for entry in data.datasets:
        try:
            manifest = Manifest.load(entry.path)
        except DataPipelineError as err:
            result.missing_datasets.append(str(err))
            continue
        if not check_shards or manifest.is_remote:  # remote shards are verified as they are downloaded
            continue
        splits = [data.train_split] + ([data.eval_split] if eval_enabled else [])
        for name in splits:
            if name in manifest.splits:  # a missing train split is reported, with its fix, by the loader
                _check_split_files(manifest, manifest.splits[name].shards, result)
    return result


def _check_split_files(manifest: Any, shards: list[Any], result: DataCheck) -> None:
    for shard in shards:
        result.shards_checked += 1
        path = manifest.resolve(shard.path)
        try:
            size_bytes = os.stat(path).st_size
        except FileNotFoundError:
            result.bad_shards.append(f"{path} is missing")
            continue
        if size_bytes != shard.num_bytes:
            result.bad_shards.append(f"{path} has {size_bytes} bytes, the manifest records {shard.num_bytes} "
                                     f"(truncated or replaced)")


def document_eos_id(cfg: Any) -> int | None:
    """The token that ends a document in this run's data, where the run looks for document ends (the model's
    ModelConfig.uses_documents, or train.mask_eos_loss; else None): the tokenizer's eos id that every prepared
    dataset's manifest records, or SYNTHETIC_EOS_ID."""
    if not (cfg.model.uses_documents or cfg.train.mask_eos_loss):
        return None
    if cfg.data.synthetic:
        return SYNTHETIC_EOS_ID
    from data_pipeline.manifest import Manifest

    eos_ids = {entry.path: Manifest.load(entry.path).tokenizer.eos_id for entry in cfg.data.datasets}
    why = ("model.attention_mask=document, model.reset_position_ids and train.mask_eos_loss find the documents' ends "
           "at the eos token")
    for path, eos_id in eos_ids.items():
        if eos_id < 0:
            raise ConfigError(f"{why}, but {path} records no eos id (its tokens were written without a tokenizer): "
                              f"prepare it with `pretrain prepare` (documents end with eos), or set "
                              f"model.attention_mask=causal model.reset_position_ids=false train.mask_eos_loss=false")
    if len(set(eos_ids.values())) > 1:
        raise ConfigError(f"{why}, but the datasets end documents with different eos ids "
                          f"({', '.join(f'{path}: {eos_id}' for path, eos_id in eos_ids.items())}): train on "
                          f"datasets prepared with one tokenizer")
    return next(iter(eos_ids.values()))


def data_tokenizer_file(cfg: Any) -> str | None:
    """The tokenizer file the first training dataset was encoded with (its manifest names it); None for synthetic
    data or a dataset written without a tokenizer."""
    if cfg.data.synthetic or not cfg.data.datasets:
        return None
    from data_pipeline.manifest import Manifest

    manifest = Manifest.load(cfg.data.datasets[0].path)
    return manifest.resolve(manifest.tokenizer.model_file) if manifest.tokenizer.model_file else None
