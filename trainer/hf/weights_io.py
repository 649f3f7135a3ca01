"""HF weight files: model.safetensors, or shards `model-0000i-of-0000n.safetensors` plus
model.safetensors.index.json when the total exceeds a size threshold (the layout transformers writes and reads)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from trainer.hf.errors import HFConversionError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# transformers' own save_pretrained default: 5 GB shards (decimal, as it counts them).
DEFAULT_MAX_SHARD_BYTES = 5_000_000_000
# Older transformers saved the rotary frequencies as a buffer; they are recomputed from the config, and
# transformers itself ignores them on load.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def plan_shards(state: dict[str, torch.Tensor], max_shard_bytes: int) -> list[list[str]]:
    """Keys grouped in order into shards of at most `max_shard_bytes` (a larger tensor gets a shard of its own)."""
    if max_shard_bytes < 1:
        raise HFConversionError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
    shards: list[list[str]] = [[]]
    used_bytes = 0
    for key, tensor in state.items():
        size = tensor_bytes(tensor)
        if shards[-1] and used_bytes + size > max_shard_bytes:
            shards.append([])
            used_bytes = 0
        shards[-1].append(key)
        used_bytes += size
    return shards


def write_hf_weights(state: dict[str, torch.Tensor], out_dir: Path, max_shard_bytes: int) -> list[str]:
    """Write `state` (HF names) as one file or as shards with an index. Returns the file names written."""
    shards = plan_shards(state, max_shard_bytes)
    if len(shards) == 1:
        save_safetensors(_contiguous(state, shards[0]), out_dir / SINGLE_FILE)
        return [SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, keys in zip(names, shards, strict=True):
        save_safetensors(_contiguous(state, keys), out_dir / name)
        weight_map.update({key: name for key in keys})
    total_bytes = sum(tensor_bytes(tensor) for tensor in state.values())
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return [*names, INDEX_FILE]


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, then the mode any new file gets here (0644 under umask 022). save_file writes through
    a private temp file (mode 0600): on a shared cluster nobody else could read the weights beside 0644 configs."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt", **(metadata or {})})
    os.chmod(path, new_file_mode(path.parent))


def new_file_mode(directory: Path) -> int:
    """Permission bits of a file created in `directory` by open(): 0o666 minus the umask. Probed with a real file
    rather than by os.umask(), which would change the process-wide umask for a moment under other threads."""
    probe = directory / f".mode-probe-{os.getpid()}"
    fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    try:
        return os.fstat(fd).st_mode & 0o777
    finally:
        os.close(fd)
        os.unlink(probe)


def _contiguous(state: dict[str, torch.Tensor], keys: list[str]) -> dict[str, torch.Tensor]:
    return {key: state[key].detach().cpu().contiguous() for key in keys}  # safetensors writes host memory


def read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF directory's safetensors weights, by HF name, as stored (dtype kept)."""
    files, weight_map = _weight_files(hf_dir)
    state: dict[str, torch.Tensor] = {}
    for path in files:
        state.update(_read_safetensors(path))
    if weight_map is not None and set(weight_map) != set(state):
        stray = sorted(set(weight_map) ^ set(state))[:6]
        raise HFConversionError(f"{hf_dir / INDEX_FILE} does not match its shards (e.g. {', '.join(stray)}): "
                                f"the directory mixes files of different saves; copy it again")
    return {key: value for key, value in state.items() if not key.endswith(_IGNORED_SUFFIXES)}


def _weight_files(hf_dir: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files to read, and the index's key → file map when there is one."""
    if (hf_dir / SINGLE_FILE).is_file():
        return [hf_dir / SINGLE_FILE], None
    index_path = hf_dir / INDEX_FILE
    if index_path.is_file():
        return _files_of_index(index_path)
    if any(hf_dir.glob("pytorch_model*.bin")):
        raise HFConversionError(
            f"{hf_dir} holds pytorch_model*.bin weights only: re-save them as safetensors (transformers: "
            f"AutoModelForCausalLM.from_pretrained(dir).save_pretrained(new_dir)) and import new_dir"
        )
    raise HFConversionError(f"{hf_dir} has no {SINGLE_FILE} nor {INDEX_FILE}: pass an HF model directory")


def _files_of_index(index_path: Path) -> tuple[list[Path], dict[str, str]]:
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise HFConversionError(f"{index_path} is not a safetensors index (needs a weight_map): {err}") from None
    files = [index_path.parent / name for name in dict.fromkeys(weight_map.values())]
    missing = [path.name for path in files if not path.is_file()]
    if missing:
        raise HFConversionError(f"{index_path} lists shard(s) that do not exist: {', '.join(missing)}; "
                                f"copy the complete model directory")
    return files, weight_map


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise HFConversionError(f"cannot read {path}: {err}; the file is truncated or not safetensors") from None
