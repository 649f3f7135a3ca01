"""`pretrain inspect`: what a prepared dataset holds, whether its shards are intact, and what a sample says.

The summary comes from manifest.json alone (instant, also for a URL). `--sample K` reads one sample through the same
reader the loader uses and decodes it with the dataset's own tokenizer/tokenizer.model; `--verify` re-hashes every
shard against the manifest.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.errors import DataPipelineError, ShardIntegrityError
from data_pipeline.manifest import Manifest
from data_pipeline.shards import ShardCache, ShardEntry, default_cache_dir, open_shard

# Shown between packed documents when decoding: the eos id itself decodes to nothing.
EOS_MARKER = "<|eos|>"


@dataclass(frozen=True)
class SampleView:
    split: str
    index: int
    shard: str
    index_in_shard: int
    token_ids: np.ndarray      # (seq_len + 1,) as stored
    text: str | None           # decoded, documents separated by EOS_MARKER; None when no tokenizer model is there


def _count(value: int) -> str:
    """1234567 -> '1,234,567 (1.23M)': exact for scripts, short for eyes."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value:,} ({value / scale:.2f}{suffix})"
    return f"{value:,}"


def _size(num_bytes: int) -> str:
    for scale, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {suffix}"
    return f"{num_bytes} bytes"


def summarize(manifest: Manifest) -> str:
    """Multi-line summary of a manifest: format, fingerprint, tokenizer, sample shape, splits, bad input, sources."""
    tok = manifest.tokenizer
    lines = [
        f"dataset      {manifest.name}",
        f"format       {manifest.format} v{manifest.format_version}",
        f"fingerprint  {manifest.fingerprint}",
        f"tokenizer    {tok.model_type}, vocab {tok.vocab_size:,}, fingerprint {tok.fingerprint}",
        (f"             special ids unk {tok.unk_id} bos {tok.bos_id} eos {tok.eos_id} pad {tok.pad_id}; "
         f"model {tok.model_file or '(none)'}"),
        (f"samples      seq_len {manifest.seq_len} ({manifest.sample_len_tokens} tokens stored per sample), "
         f"dtype {manifest.dtype}, {manifest.samples_per_shard:,} samples per shard"),
    ]
    for name, split in manifest.splits.items():
        shard_bytes = sum(s.num_bytes for s in split.shards)
        lines.append(f"split {name:<6} {_count(split.num_samples)} samples, {_count(split.num_tokens)} tokens, "
                     f"{_count(split.num_documents)} documents, {len(split.shards)} shards "
                     f"({_size(shard_bytes)}), {split.dropped_tail_tokens:,} tail tokens dropped")
    lines.append(_bad_input_line(manifest))
    if manifest.sources:
        lines.append(f"sources      {len(manifest.sources)} input file entries")
    return "\n".join(lines)


def _bad_input_line(manifest: Manifest) -> str:
    bad = manifest.bad_input
    total = int(bad.get("total", 0))
    by_reason = bad.get("by_reason", {})
    reasons = ", ".join(f"{reason} {count:,}" for reason, count in sorted(by_reason.items()) if count)
    report = f" (report: {bad['report_file']})" if bad.get("report_file") and total else ""
    return f"bad input    {total:,} records skipped" + (f": {reasons}" if reasons else "") + report


def _cache_for(manifest: Manifest, cache_dir: str | None) -> ShardCache | None:
    return ShardCache(cache_dir or default_cache_dir()) if manifest.is_remote else None


def locate_sample(manifest: Manifest, split: str, index: int) -> tuple[ShardEntry, int]:
    """The shard holding sample `index` of `split`, and the sample's index inside it."""
    shards = manifest.split(split).shards
    num_samples = manifest.split(split).num_samples
    if not 0 <= index < num_samples:
        raise DataPipelineError(f"split {split!r} of {manifest.name} has samples 0..{num_samples - 1}; "
                                f"--sample {index} is out of range")
    starts = np.cumsum([0] + [s.num_samples for s in shards])
    shard = int(np.searchsorted(starts, index, side="right")) - 1
    return shards[shard], index - int(starts[shard])


def read_sample(manifest: Manifest, split: str, index: int, verify: bool = True,
                cache_dir: str | None = None) -> SampleView:
    entry, index_in_shard = locate_sample(manifest, split, index)
    reader = open_shard(manifest.resolve(entry.path), entry, verify, _cache_for(manifest, cache_dir))
    token_ids = np.array(reader.sample(index_in_shard))  # a copy: the reader's map closes with it
    return SampleView(split, index, entry.path, index_in_shard, token_ids, decode_tokens(manifest, token_ids))


def decode_tokens(manifest: Manifest, token_ids: np.ndarray) -> str | None:
    """Decode with the dataset's own tokenizer model; documents packed into the sample are joined by EOS_MARKER."""
    model_file = manifest.tokenizer.model_file
    if not model_file:
        return None
    location = manifest.resolve(model_file)
    try:
        if manifest.is_remote:
            import fsspec

            with fsspec.open(location, "rb") as f:
                model_bytes = f.read()
        else:
            model_bytes = Path(location).read_bytes()
        processor = _decoder(model_bytes, model_file)
    except (OSError, RuntimeError, DataPipelineError) as err:
        raise DataPipelineError(f"cannot load the dataset's tokenizer {location} ({err}); the dataset folder is "
                                "incomplete, re-copy it or re-run `pretrain prepare`") from err
    eos_id = manifest.tokenizer.eos_id
    pieces, current = [], []
    for token in token_ids.tolist():
        if token == eos_id:
            pieces.append(processor.decode(current))
            current = []
        else:
            current.append(token)
    pieces.append(processor.decode(current))
    return EOS_MARKER.join(pieces)


def _decoder(model_bytes: bytes, model_file: str) -> Any:
    """Something with decode(ids): the sentencepiece model, or an HF tokenizer.json (data_pipeline.hf_tokenizer)."""
    if model_file.endswith(".json"):
        from data_pipeline.hf_tokenizer import HFTokenizer

        return HFTokenizer(model_bytes.decode("utf-8"), source=model_file)
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_proto=model_bytes)


def format_sample(view: SampleView, max_ids_shown: int = 32) -> str:
    ids = view.token_ids.tolist()
    shown = " ".join(map(str, ids[:max_ids_shown])) + (" ..." if len(ids) > max_ids_shown else "")
    header = (f"sample {view.index} of split {view.split} ({view.shard}, sample {view.index_in_shard} in shard), "
              f"{len(ids)} tokens")
    lines = [header, f"ids   {shown}"]
    if view.text is None:
        lines.append("text  (the manifest names no tokenizer model; ids only)")
    else:
        lines.append(f"text  ({EOS_MARKER} marks document ends)")
        lines.append(view.text)
    return "\n".join(lines)


def verify_shards(manifest: Manifest, cache_dir: str | None = None,
                  progress: Callable[[str], None] | None = None) -> tuple[int, list[str]]:
    """Re-hash and re-index every shard of every split; returns (shards checked, one message per bad shard)."""
    cache = _cache_for(manifest, cache_dir)
    checked, failures = 0, []
    for split in manifest.splits.values():
        for entry in split.shards:
            try:
                reader = open_shard(manifest.resolve(entry.path), entry, verify=True, cache=cache)
                reader.close()
            except ShardIntegrityError as err:
                failures.append(str(err))
            checked += 1
            if progress is not None and checked % 100 == 0:
                progress(f"verified {checked} shards")
    return checked, failures


def inspect_dataset(dataset: str | os.PathLike, split: str = "train", sample: int | None = None,
                    verify: bool = False, cache_dir: str | None = None,
                    out: Callable[[str], None] = print) -> Manifest:
    """The whole `pretrain inspect` job; raises ShardIntegrityError when --verify finds a bad shard."""
    manifest = Manifest.load(dataset)
    out(summarize(manifest))
    if verify:
        checked, failures = verify_shards(manifest, cache_dir, progress=out)
        for failure in failures:
            out(f"FAILED  {failure}")
        if failures:
            raise ShardIntegrityError(f"{len(failures)} of {checked} shards failed verification (listed above)")
        out(f"verify       all {checked} shards match their sha256 and sample counts")
    if sample is not None:
        out("")
        out(format_sample(read_sample(manifest, split, sample, cache_dir=cache_dir)))
    return manifest


__all__ = ["EOS_MARKER", "SampleView", "decode_tokens", "format_sample", "inspect_dataset",
           "locate_sample", "read_sample", "summarize", "verify_shards"]
