"""Layout-free access to a DeepSpeed engine's training state: full fp32 weights, Adam moments and step, LR
schedule, loss scaler, engine counters, RNG.

The weights and moments of one parameter are read and written as full tensors in this rank's TP-local shape, whatever
the ZeRO stage, through one of three accessors (recipe and measurements: notes/deepspeed-layout-free-state.md):

| optimizer DeepSpeed built                           | accessor          | where fp32 weights / moments / step live      |
|-----------------------------------------------------|-------------------|-----------------------------------------------|
| plain torch AdamW (fp32, ZeRO-0, also under PP)     | PlainAccess       | p.data / opt.state[p]                         |
| FP16_UnfusedOptimizer (bf16 or fp16, ZeRO-0)        | UnfusedAccess     | its fp32 copy of p / base state of that copy  |
| ZeRO-1/2/3, BF16_Optimizer                          | FragmentAccess    | DS fragment API (collective gets, local sets) |

Rules the accessors follow (each was a measured failure): getters of the fragment API are collective over the DP
group, so every DP rank calls them for the same parameters in the same order; setters are local and need the full
value on every rank; setters do not touch the model weights, so `finish_load` copies master → model; the Adam `step`
is not in the fragment API and is written into the base optimizer state by hand; a fresh engine has no Adam state
until its first step, so `begin_load` creates it.
"""

from __future__ import annotations

import base64
import random
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from trainer.checkpoint.layout import CheckpointError

MOMENTS = ("exp_avg", "exp_avg_sq")
# FragmentAccess.read_all gathers the ZeRO-1/2 state of small parameters (norms, biases: up to
# READ_BUCKETED_MAX_NUMEL elements) in buckets of up to READ_BUCKET_NUMEL elements per value: one all_reduce per
# bucket and value instead of DeepSpeed's one per parameter and value, which is latency-bound on small tensors.
# Bigger parameters go through DeepSpeed's getters one by one: bandwidth-bound, and their buffer is kept as is
# (bench/bench_zero_snapshot.py; bucketing them too measured slower on CPU, from copying what a rank keeps).
READ_BUCKET_NUMEL = 2**22
READ_BUCKETED_MAX_NUMEL = 2**16


def local_shape(param: torch.Tensor) -> tuple[int, ...]:
    """This rank's (TP-local) shape of a parameter; ZeRO-3 keeps only a flat partition in `param` itself."""
    return tuple(getattr(param, "ds_shape", param.shape))


class PlainAccess:
    """Plain torch optimizer: the module parameters are the fp32 master; no communication."""

    def __init__(self, optimizer: Any) -> None:
        self.opt = optimizer

    def read(self, param: torch.nn.Parameter) -> tuple[torch.Tensor, ...]:
        state = self.opt.state.get(param, {})
        moments = [state[k] if k in state else torch.zeros_like(param) for k in MOMENTS]
        return (param.detach(), *moments)

    def read_all(self, params: Sequence[torch.nn.Parameter],
                 wanted: Sequence[bool]) -> Iterator[tuple[torch.Tensor, ...] | None]:
        return _read_wanted(self.read, params, wanted)

    def prepare_read(self) -> None: ...

    def adam_step(self) -> float:
        return _first_step(self.opt.state.values())

    def begin_load(self, step: float) -> None: ...

    def write(self, param: torch.nn.Parameter, weight: torch.Tensor, exp_avg: torch.Tensor,
              exp_avg_sq: torch.Tensor, step: float) -> None:
        with torch.no_grad():
            param.copy_(weight)
        _write_moments(self.opt, self.opt.state[param], param, exp_avg, exp_avg_sq, step)

    def finish_load(self) -> None: ...


class UnfusedAccess:
    """DeepSpeed FP16_UnfusedOptimizer (bf16/fp16 without ZeRO): an fp32 copy of every parameter drives torch AdamW;
    the model holds the low-precision cast."""

    def __init__(self, optimizer: Any) -> None:
        self.opt = optimizer
        self.base = optimizer.optimizer
        self._fp32_of = {id(lp): hp for lps, hps in zip(optimizer.fp16_groups, optimizer.fp32_groups)
                         for lp, hp in zip(lps, hps)}

    def read(self, param: torch.nn.Parameter) -> tuple[torch.Tensor, ...]:
        master = self._fp32_of[id(param)]
        state = self.base.state.get(master, {})
        return (master.detach(), *[state[k] if k in state else torch.zeros_like(master) for k in MOMENTS])

    def read_all(self, params: Sequence[torch.nn.Parameter],
                 wanted: Sequence[bool]) -> Iterator[tuple[torch.Tensor, ...] | None]:
        return _read_wanted(self.read, params, wanted)

    def prepare_read(self) -> None: ...

    def adam_step(self) -> float:
        return _first_step(self.base.state.values())

    def begin_load(self, step: float) -> None: ...

    def write(self, param: torch.nn.Parameter, weight: torch.Tensor, exp_avg: torch.Tensor,
              exp_avg_sq: torch.Tensor, step: float) -> None:
        master = self._fp32_of[id(param)]
        with torch.no_grad():
            master.copy_(weight)
            param.copy_(master)  # the model's low-precision weights follow the master (DS does this after a step)
        _write_moments(self.base, self.base.state[master], master, exp_avg, exp_avg_sq, step)

    def finish_load(self) -> None: ...


class FragmentAccess:
    """ZeRO-1/2/3 and BF16_Optimizer through DeepSpeed's tensor-fragment API."""

    def __init__(self, optimizer: Any) -> None:
        self.opt = optimizer
        self.base = optimizer.optimizer
        attr = next(a for a in _FLAT_ATTRS if hasattr(optimizer, a))
        self.flats: list[torch.Tensor] = list(getattr(optimizer, attr))
        self._buffers: list[torch.Tensor] = []  # read_all's bucket buffers, one per value, while it runs

    def _has_state(self) -> bool:
        # Same answer on every rank (all flats gain Adam state at the first applied step); getters of moments that
        # do not exist yet would raise on some ranks only and desync the collectives.
        return all(len(self.base.state.get(flat, {})) > 0 for flat in self.flats)

    def prepare_read(self) -> None:
        if self._has_state():
            self._link_fragments()

    def _link_fragments(self) -> None:
        """(Re)link every parameter's fragment to the Adam state of its flat partition. DeepSpeed 0.19.8's ZeRO-1/2
        links once, right after the *first param group's* step, when the other groups have no state yet: their
        fragments stay empty for good and `safe_get_full_optimizer_state` raises "exp_avg not found" for every
        parameter outside group 0 (we always have two groups: decay / no decay). Clearing its flag relinks."""
        if hasattr(self.opt, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2, BF16_Optimizer (private API)
            self.opt._hp_optimizer_states_linked = False
            self.opt._lazy_init_hp_params_optimizer_state()

    def read(self, param: torch.nn.Parameter) -> tuple[torch.Tensor, ...]:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        weight = safe_get_full_fp32_param(param)  # collective over this parameter's DP group
        if not self._has_state():
            return weight, torch.zeros_like(weight), torch.zeros_like(weight)
        return (weight, *[safe_get_full_optimizer_state(param, key) for key in MOMENTS])

    def read_all(self, params: Sequence[torch.nn.Parameter],
                 wanted: Sequence[bool]) -> Iterator[tuple[torch.Tensor, ...] | None]:
        """`read` of each wanted parameter (tensors the caller may keep), None for the others; collective: every rank
        takes part in every read. Small ZeRO-1/2 and BF16_Optimizer parameters are gathered in buckets (see
        READ_BUCKET_NUMEL); big ones and ZeRO-3 ones go through DeepSpeed's per-parameter getters, whose fresh
        buffers the caller keeps without a copy."""
        bucket: list[tuple[torch.nn.Parameter, bool]] = []
        bucket_numel = 0
        try:
            for param, want in zip(params, wanted, strict=True):
                bucketable = hasattr(param, "_hp_mapping") and param.numel() <= READ_BUCKETED_MAX_NUMEL
                if bucket and (not bucketable or param._dp_group is not bucket[0][0]._dp_group
                               or bucket_numel + param.numel() > READ_BUCKET_NUMEL):
                    yield from self._read_bucket(bucket)
                    bucket, bucket_numel = [], 0
                if bucketable:
                    bucket.append((param, want))
                    bucket_numel += param.numel()
                    continue
                values = self.read(param)  # DeepSpeed's getters: a fresh full-size buffer per value
                yield values if want else None
            yield from self._read_bucket(bucket)
        finally:
            self._buffers = []  # free them once the read is over

    def _read_bucket(self, bucket: list[tuple[torch.nn.Parameter, bool]]) -> Iterator[tuple[torch.Tensor, ...] | None]:
        if not bucket:
            return
        gathered = self._gather([param for param, _ in bucket])
        for (_, want), values in zip(bucket, gathered):
            yield tuple(value.clone() for value in values) if want else None  # the buffers are reused

    def _gather(self, params: list[torch.nn.Parameter]) -> list[tuple[torch.Tensor, ...]]:
        """What `deepspeed.utils.safe_get_full_fp32_param` / `safe_get_full_optimizer_state` compute, for several
        parameters at once: each rank copies its fragments into a zeroed buffer at their offsets and one all_reduce
        (a sum of disjoint fragments) assembles the full values on every rank. Values are views of the reused
        buffers."""
        import deepspeed.comm as dist

        offsets = np.cumsum([0] + [p.numel() for p in params]).tolist()
        keys = (None, *MOMENTS) if self._has_state() else (None,)
        buffers = []
        for index, key in enumerate(keys):
            buffer = self._buffer(index, offsets[-1])
            for param, offset in zip(params, offsets):
                if param._hp_mapping is not None:  # None: no fragment of it on this rank
                    address = param._hp_mapping.lp_fragment_address
                    start = offset + address.start
                    buffer[start : start + address.numel].copy_(param._hp_mapping.get_hp_fragment(key).data)
            dist.all_reduce(buffer, group=params[0]._dp_group)
            buffers.append(buffer)
        gathered = []
        for param, offset in zip(params, offsets):
            values = [buffer[offset : offset + param.numel()].view(param.shape) for buffer in buffers]
            if len(values) == 1:  # no Adam step yet: zero moments, as `read` gives
                values += [torch.zeros_like(values[0]), torch.zeros_like(values[0])]
            gathered.append(tuple(values))
        return gathered

    def _buffer(self, index: int, numel: int) -> torch.Tensor:
        """Zeroed reusable buffer `index`, `numel` fp32 elements long."""
        while len(self._buffers) <= index:
            self._buffers.append(torch.empty(READ_BUCKET_NUMEL, dtype=torch.float32, device=self.flats[0].device))
        return self._buffers[index][:numel].zero_()

    def adam_step(self) -> float:
        return _first_step(self.base.state.get(flat, {}) for flat in self.flats)

    def begin_load(self, step: float) -> None:
        for flat in self.flats:
            state = self.base.state[flat]
            for key in MOMENTS:
                if key not in state:
                    state[key] = torch.zeros_like(flat)
            state["step"] = _step_value(self.base, state.get("step"), step, flat.device)
        self._link_fragments()  # the setters write through the fragments: link them to the state just made

    def write(self, param: torch.nn.Parameter, weight: torch.Tensor, exp_avg: torch.Tensor,
              exp_avg_sq: torch.Tensor, step: float) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        device = self.flats[0].device
        safe_set_full_fp32_param(param, weight.to(device))  # local: copies this rank's fragment out of the full value
        safe_set_full_optimizer_state(param, exp_avg.to(device), "exp_avg")
        safe_set_full_optimizer_state(param, exp_avg_sq.to(device), "exp_avg_sq")

    def finish_load(self) -> None:
        """Copy the fp32 master into the model weights: the setters only wrote the master."""
        if hasattr(self.opt, "update_lp_params"):  # ZeRO-1/2, BF16_Optimizer (collective: all-gathers over DP)
            self.opt.update_lp_params()
            return
        with torch.no_grad():  # ZeRO-3: each rank's fp32 partition → its model partition (private API)
            for i, flat in enumerate(self.opt.fp32_partitioned_groups_flat):
                self.opt.fp16_partitioned_groups_flat[i].data.copy_(flat.data)
                self.opt._unflatten_partitioned_parameters(i)


_FLAT_ATTRS = ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition")


def optimizer_access(engine: Any) -> PlainAccess | UnfusedAccess | FragmentAccess:
    opt = engine.optimizer
    if any(hasattr(opt, attr) for attr in _FLAT_ATTRS):
        return FragmentAccess(opt)
    if hasattr(opt, "fp32_groups") and hasattr(opt, "fp16_groups"):
        return UnfusedAccess(opt)
    if isinstance(opt, torch.optim.Optimizer):
        return PlainAccess(opt)
    raise CheckpointError(f"engine optimizer {type(opt).__name__} is not one this checkpointer can read (pinned to "
                          f"deepspeed 0.19.8): update trainer/checkpoint/state.py")


def _read_wanted(read: Any, params: Sequence[torch.nn.Parameter],
                 wanted: Sequence[bool]) -> Iterator[tuple[torch.Tensor, ...] | None]:
    """`read` of each wanted parameter, None for the others (local accessors: nothing to take part in)."""
    return (read(p) if want else None for p, want in zip(params, wanted, strict=True))


def _first_step(states: Any) -> float:
    for state in states:
        if "step" in state:
            return float(state["step"])
    return 0.0  # no optimizer step has been applied yet


def _step_value(base: Any, current: Any, step: float, device: torch.device) -> Any:
    """The Adam step in the type this optimizer keeps: torch AdamW a 0-d float32 tensor (on the parameter's device
    when fused/capturable), DeepSpeed's CPU/fused Adam a Python int."""
    if isinstance(current, torch.Tensor):
        return torch.tensor(step, dtype=current.dtype, device=current.device)
    if isinstance(current, (int, float)):
        return type(current)(step)
    if isinstance(base, torch.optim.Optimizer) and base.__class__.__module__.startswith("torch.optim"):
        defaults = base.defaults
        on_device = defaults.get("fused") or defaults.get("capturable")
        return torch.tensor(step, dtype=torch.float32, device=device if on_device else "cpu")
    return int(step)


def _write_moments(opt: Any, state: dict[str, Any], param: torch.Tensor, exp_avg: torch.Tensor,
                   exp_avg_sq: torch.Tensor, step: float) -> None:
    for key, value in zip(MOMENTS, (exp_avg, exp_avg_sq)):
        if key in state:
            state[key].copy_(value)
        else:
            state[key] = value.to(device=param.device, dtype=param.dtype).clone()
    state["step"] = _step_value(opt, state.get("step"), step, param.device)


# ---------------------------------------------------------------------------------------------------------------------
# LR schedule, loss scaler, engine counters


def scheduler_state(engine: Any) -> dict[str, Any]:
    sched = engine.lr_scheduler
    return {"last_epoch": int(sched.last_epoch), "step_count": int(getattr(sched, "_step_count", 0))}


def load_scheduler_state(engine: Any, saved: dict[str, Any]) -> None:
    """Set the LambdaLR to `last_epoch` and push its LR into every param group. LambdaLR.load_state_dict would
    restore `last_epoch` but not the groups' lr (measured: 3.4e-3 loss drift from the next step); the LR is a pure
    function of the applied-step count, so recomputing it is exact and also fits another group count (PP stages)."""
    sched = engine.lr_scheduler
    sched.last_epoch = int(saved["last_epoch"])
    sched._step_count = int(saved["step_count"])
    lrs = [base_lr * lmbda(sched.last_epoch) for lmbda, base_lr in zip(sched.lr_lambdas, sched.base_lrs)]
    for group, lr in zip(sched.optimizer.param_groups, lrs):
        group["lr"] = lr
    sched._last_lr = lrs


_SCALER_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


def loss_scaler_state(engine: Any) -> dict[str, Any] | None:
    """fp16 dynamic loss scaling state (None without fp16)."""
    scaler = getattr(engine.optimizer, "loss_scaler", None) if engine.fp16_enabled() else None
    if scaler is None:
        return None
    return {field: float(getattr(scaler, field)) for field in _SCALER_FIELDS if hasattr(scaler, field)}


def load_loss_scaler_state(engine: Any, saved: dict[str, Any] | None) -> None:
    scaler = getattr(engine.optimizer, "loss_scaler", None) if engine.fp16_enabled() else None
    if scaler is None or not saved:
        return
    for field, value in saved.items():
        current = getattr(scaler, field, None)
        setattr(scaler, field, type(current)(value) if isinstance(current, (int, float)) else value)


def engine_counters(engine: Any) -> dict[str, int]:
    return {"global_steps": int(engine.global_steps), "global_samples": int(engine.global_samples),
            "skipped_steps": int(engine.skipped_steps)}


def load_engine_counters(engine: Any, saved: dict[str, int]) -> None:
    engine.global_steps = saved["global_steps"]  # bookkeeping only (DeepSpeed's own logging)
    engine.global_samples = saved["global_samples"]
    engine.skipped_steps = saved["skipped_steps"]


# ---------------------------------------------------------------------------------------------------------------------
# RNG (JSON, so loading it can never run code)


def rng_state() -> dict[str, Any]:
    version, mt_state, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(mt_state), gauss],
        "numpy": [np_kind, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii"),
    }
    if torch.cuda.is_initialized():  # a CUDA run; is_available() would touch the driver in a CPU run (testing.py)
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode("ascii") for s in torch.cuda.get_rng_state_all()]
    return state


def load_rng_state(state: dict[str, Any]) -> None:
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_bytes_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_initialized():
        torch.cuda.set_rng_state_all([_bytes_tensor(s) for s in state["cuda"]])


def _bytes_tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)
