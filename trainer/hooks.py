"""Side concerns of the training loop, attached at documented points. Hooks observe and report; they never own
training math (the step, the loss and evaluation live in trainer.fit).

Hook points, in the order `fit` calls them (every rank calls every hook, so a hook may run collectives, as long as
it runs the same ones on every rank):

  on_train_start(run, state)      engine, loaders and hooks exist; no step has run; the training iterator is not
                                  created yet. A checkpointer resumes here: load the engine (weights, optimizer,
                                  LR schedule), `run.train_loader.load_state_dict(...)`, RNG, and set `state.step`.
  on_step_start(run, state)       before each optimizer step (`state.step` = steps completed).
  on_step_end(run, state, out)    after each optimizer step (`state.step` includes it). Periodic saves, a NaN/inf
                                  guard on `out.loss`, a watchdog heartbeat and preemption checks attach here; to stop
                                  cleanly after this step set `state.stop_reason` (fit checks it before the next step).
  on_eval(run, state, result)     after a validation pass (every train.eval_interval_steps and after the last step).
  on_train_end(run, state)        after the loop ends (max_steps reached or a stop reason set): final save, close files.

Hooks run in list order at each point; put a checkpointer after MetricsHook so a step is logged before it is saved.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from trainer.bootstrap import ParallelContext
from trainer.compile import CompileWarmupLog
from trainer.config import Config, Derived
from trainer.engine import global_grad_norm, loss_scale, skipped_steps
from trainer.parallelize import ParallelModel
from trainer.report import is_group_member
from trainer.stragglers import STOP_REASON as STRAGGLER_STOP
from trainer.stragglers import StragglerMonitor

log = logging.getLogger(__name__)


@dataclass
class RunContext:
    """Everything a hook may look at. Built once by trainer.train; `fit` and hooks only read it."""

    cfg: Config
    derived: Derived
    ctx: ParallelContext
    model: ParallelModel  # model.module is wrapped by the engine; engine.module is the same object
    engine: Any  # deepspeed DeepSpeedEngine (pp == 1) or PipelineEngine (pp > 1)
    train_loader: Any  # SyntheticTokens or data_pipeline TokenLoader: iterable + state_dict/load_state_dict
    eval_loader: Any | None  # a re-iterable validation pass with len(); None: no evaluation
    run_dir: Path
    flops_per_token: int  # training FLOPs per token for the whole model (trainer.estimate)
    resume_choice: Any = None  # checkpoint.init_from.ResumeChoice when the build already chose what to resume
    tasks: Any = None  # train.eval_tasks as trainer.downstream.TaskRows, tokenized once (None: none)
    eos_loss_masked: int | None = None  # train.mask_eos_loss: the eos id whose positions the loss leaves out


@dataclass
class TrainState:
    step: int = 0  # optimizer steps completed (a resumed run starts from its checkpoint's step)
    # Tokens the weights were trained on, counted step by step: a rollback takes it back with the weights, and a
    # batch size or seq_len changed at a resume does not recount the steps before it. Not the loader's position,
    # which also covers a window a rollback skipped, and restarts at 0 after checkpoint.allow_data_change.
    consumed_tokens: int = 0
    stop_reason: str | None = None  # set by a hook to end training after the current step (e.g. "preempted")


@dataclass
class StepOutput:
    step: int  # the step just completed (1-based)
    loss: torch.Tensor  # mean loss over this DP rank's micro-batches (pp > 1: already the global mean); not synced
    lr: float  # the learning rate this step used
    step_time_s: float  # wall time of the step on this rank, data wait included
    data_wait_s: float  # time this rank waited for micro-batches during the step
    batch_size: int  # global batch of the step in samples (train.global_batch_size, or less during a rampup)


@dataclass
class EvalOutput:
    step: int
    loss: float  # mean over the validation micro-batches of every DP rank
    num_microbatches: int  # per DP rank
    # With several validation datasets: each one's mean loss, by the name `tokens/<name>` uses; else empty.
    per_dataset: dict[str, float] = field(default_factory=dict)
    tasks: list[Any] = field(default_factory=list)  # trainer.downstream.TaskResult of each train.eval_tasks file


class Hook:
    """Base class: override the points you need."""

    def on_train_start(self, run: RunContext, state: TrainState) -> None: ...

    def on_step_start(self, run: RunContext, state: TrainState) -> None: ...

    def on_step_end(self, run: RunContext, state: TrainState, out: StepOutput) -> None: ...

    def on_eval(self, run: RunContext, state: TrainState, result: EvalOutput) -> None: ...

    def on_train_end(self, run: RunContext, state: TrainState) -> None: ...


class HookList(Hook):
    def __init__(self, hooks: list[Hook]) -> None:
        self.hooks = list(hooks)

    def on_train_start(self, run: RunContext, state: TrainState) -> None:
        for hook in self.hooks:
            hook.on_train_start(run, state)

    def on_step_start(self, run: RunContext, state: TrainState) -> None:
        for hook in self.hooks:
            hook.on_step_start(run, state)

    def on_step_end(self, run: RunContext, state: TrainState, out: StepOutput) -> None:
        for hook in self.hooks:
            hook.on_step_end(run, state, out)

    def on_eval(self, run: RunContext, state: TrainState, result: EvalOutput) -> None:
        for hook in self.hooks:
            hook.on_eval(run, state, result)

    def on_train_end(self, run: RunContext, state: TrainState) -> None:
        for hook in self.hooks:
            hook.on_train_end(run, state)


# ---------------------------------------------------------------------------------------------------------------------
# Metrics


# Dense bf16 tensor-core peak per GPU, TFLOP/s, matched by substring of torch.cuda.get_device_name(); more specific
# names first ("GH200" contains "H200", "A100" contains "A10", "L40S" contains "L4"). MFU always divides by the bf16
# peak, also for fp32 runs (the usual convention). Unknown GPUs: set logging.gpu_peak_tflops.
GPU_PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989.0), ("H200", 989.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0),
    ("H800", 989.0), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L4", 121.0),
    ("A10", 125.0), ("MI300X", 1307.0), ("MI250X", 383.0),
)


def peak_tflops_per_gpu(cfg: Config, device: torch.device) -> float | None:
    """The MFU denominator: logging.gpu_peak_tflops, else the table; None on CPU or an unknown GPU (no MFU)."""
    if device.type != "cuda":
        return None
    if cfg.logging.gpu_peak_tflops is not None:
        return cfg.logging.gpu_peak_tflops
    name = torch.cuda.get_device_name(device)
    for pattern, tflops in GPU_PEAK_BF16_TFLOPS:
        if pattern in name:
            return tflops
    log.warning("no peak TFLOP/s known for GPU %r: MFU is not reported; set logging.gpu_peak_tflops", name)
    return None


def memory_metrics(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {"max_memory_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30}
    # Linux reports ru_maxrss in KiB: the peak resident set of this process.
    return {"max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def data_mixture_metrics(loader: Any) -> dict[str, Any]:
    """Tokens consumed and epochs completed per data source (flat keys, so JSONL and TensorBoard both take them).

    Computed from the loader's global position, so every rank that advances a loader reports the same numbers; the
    synthetic source has no mixture and reports nothing."""
    if not hasattr(loader, "tokens_per_source"):
        return {}
    tokens = {f"tokens/{name}": count for name, count in loader.tokens_per_source().items()}
    epochs = {f"epochs/{name}": value for name, value in loader.epochs_per_source().items()}
    return {**tokens, **epochs}


def z_loss_metrics(run: RunContext) -> dict[str, float]:
    """`z_loss`: the weighted z term per micro-batch, averaged like `loss` (train.z_loss_weight > 0). Collective:
    every rank sums what its loss recorded (only the pipeline stage with the head records; TP ranks record the same
    value, and only DP and PP are summed over) since the last log step."""
    if run.model.z_loss is None:
        return {}
    total, micro_batches = run.model.z_loss.take()
    sums = torch.stack([torch.zeros((), device=run.ctx.device) if total is None else total.detach().float(),
                        torch.tensor(float(micro_batches), device=run.ctx.device)])
    dist.all_reduce(sums, group=run.ctx.dp_group)
    if run.ctx.pp > 1:
        dist.all_reduce(sums, group=run.ctx.pp_group)
    z_sum, count = sums.tolist()
    return {"z_loss": z_sum / count if count else math.nan}


class MetricsHook(Hook):
    """Loss, LR, grad norm, loss scale, throughput, TFLOP/s, MFU, memory and data wait every
    train.log_interval_steps (and at the last step); validation loss and perplexity after each eval. The loss is
    the mean over the global batch (all micro-steps of all DP ranks) averaged over the steps since the last log.
    Every rank joins the DP all-reduce of the loss; only the logging rank writes to the sinks."""

    def __init__(self, sinks: list[Any]) -> None:
        self.sinks = sinks
        self._loss_sum: torch.Tensor | None = None
        self._steps = 0
        self._samples = 0  # global samples of those steps (a batch-size rampup changes them per step)
        self._data_wait_s = 0.0
        self._busy_s = 0.0  # time inside steps since the last log line
        self._step_start_s = 0.0
        self._peak_tflops: float | None = None
        self._stragglers: StragglerMonitor | None = None

    def on_train_start(self, run: RunContext, state: TrainState) -> None:
        self._peak_tflops = peak_tflops_per_gpu(run.cfg, run.ctx.device)
        self._stragglers = StragglerMonitor(run.cfg.faults, run.ctx.world_size, run.run_dir)
        failed: Exception | None = None
        try:
            for sink in self.sinks:
                sink.open(run, state)
        except Exception as err:  # re-raised below, once every rank knows
            failed = err
        _agree_sinks_opened(run.ctx, failed)

    def on_step_start(self, run: RunContext, state: TrainState) -> None:
        self._step_start_s = time.perf_counter()

    def on_step_end(self, run: RunContext, state: TrainState, out: StepOutput) -> None:
        if run.ctx.device.type == "cuda" and self._is_log_step(run, state.step):
            torch.cuda.synchronize(run.ctx.device)  # queued GPU work belongs to this step's time
        # Throughput counts time inside steps only: eval passes and checkpoint saves between steps are not training
        # and would otherwise show up as throughput dips in the interval after them.
        self._busy_s += time.perf_counter() - self._step_start_s
        loss = out.loss.detach().float()
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
        self._steps += 1
        self._samples += out.batch_size
        self._data_wait_s += out.data_wait_s
        if self._stragglers is not None:
            self._stragglers.add_step(out.data_wait_s, out.step_time_s)
        for sink in self.sinks:
            sink.step(state.step)
        if self._is_log_step(run, state.step):
            self._emit(run, state.step, self._train_metrics(run, state, out))
            if self._stragglers is not None and self._stragglers.leave_nodes:
                state.stop_reason = STRAGGLER_STOP  # the checkpointer saves after this step (on every rank)

    @staticmethod
    def _is_log_step(run: RunContext, step: int) -> bool:
        return step % run.cfg.train.log_interval_steps == 0 or step == run.cfg.train.max_steps

    def on_eval(self, run: RunContext, state: TrainState, result: EvalOutput) -> None:
        per_dataset = {f"val_loss/{name}": loss for name, loss in result.per_dataset.items()}
        tasks = {f"{metric}/{task.name}": getattr(task, metric)
                 for task in result.tasks for metric in ("acc", "acc_norm")}
        self._emit(run, result.step, {"kind": "eval", "val_loss": result.loss, "val_ppl": perplexity(result.loss),
                                      "consumed_tokens": state.consumed_tokens, **per_dataset,
                                      **tasks})

    def on_train_end(self, run: RunContext, state: TrainState) -> None:
        for sink in self.sinks:
            sink.close()

    def _train_metrics(self, run: RunContext, state: TrainState, out: StepOutput) -> dict[str, Any]:
        assert self._loss_sum is not None
        ctx, derived = run.ctx, run.derived
        loss = self._loss_sum.clone()
        dist.all_reduce(loss, group=ctx.dp_group)  # SUM over DP ranks: each holds its own micro-batches' mean
        interval_s = self._busy_s
        tokens_per_s = self._samples * run.cfg.train.seq_len / interval_s
        tflops_per_gpu = tokens_per_s * run.flops_per_token / derived.world_size / 1e12
        metrics: dict[str, Any] = {
            "kind": "train",
            "loss": loss.item() / (ctx.dp * self._steps),
            "lr": out.lr,
            "global_batch_size": out.batch_size,  # samples, of the step logged
            "consumed_tokens": state.consumed_tokens,  # report's tokens axis
            "grad_norm": global_grad_norm(run.engine),
            "loss_scale": loss_scale(run.engine),
            "skipped_steps": skipped_steps(run.engine),
            "tokens_per_s": tokens_per_s,
            "tflops_per_gpu": tflops_per_gpu,
            "mfu": None if self._peak_tflops is None else tflops_per_gpu / self._peak_tflops,
            "step_time_s": interval_s / self._steps,
            "data_wait_s": self._data_wait_s / self._steps,  # per step, on the logging rank
            **z_loss_metrics(run),
            **memory_metrics(ctx.device),
            **data_mixture_metrics(run.train_loader),
        }
        if self._stragglers is not None and self._stragglers.due(out.step):  # collective, like the loss all-reduce
            metrics.update(self._stragglers.check(run.ctx, out.step))
        self._loss_sum, self._steps, self._samples, self._data_wait_s, self._busy_s = None, 0, 0, 0.0, 0.0
        return metrics

    def _emit(self, run: RunContext, step: int, metrics: dict[str, Any]) -> None:
        if run.ctx.is_logging_rank:
            for sink in self.sinks:
                sink.write(step, metrics)


# ---------------------------------------------------------------------------------------------------------------------
# Sinks (on the logging rank): open(run, state) / step(step) / write(step, metrics) / close()


class JsonlSink:
    """<run_dir>/metrics.jsonl: one JSON object per log line, {"step", "kind": "train"|"eval", ...}; appended, so a
    resumed run continues the same file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: Any = None

    def open(self, run: RunContext, state: TrainState) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    def step(self, step: int) -> None: ...

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        self._file.write(json.dumps({"step": step, "time_s": round(time.time(), 3), **metrics}) + "\n")
        self._file.flush()  # a crash or preemption keeps every line already logged

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class TensorBoardSink:
    """<run_dir>/tb/: scalars as train/<name> and eval/<name>, x axis = optimizer step."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._writer: Any = None

    def open(self, run: RunContext, state: TrainState) -> None:
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard (~1-3 s): only when enabled

        self._writer = SummaryWriter(log_dir=str(self.log_dir))

    def step(self, step: int) -> None: ...

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        for name, value in _scalars(metrics).items():
            self._writer.add_scalar(name, value, step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of one metrics line as `<kind>/<name>` (train/loss, eval/val_loss): what plotting sinks
    take (null MFU on CPU, a NaN loss: left out)."""
    return {f"{metrics['kind']}/{name}": value for name, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)}


class MetricsSinkError(RuntimeError):
    user_error = True  # launch/cli.py prints the message, which says what to do, without a traceback


def _agree_sinks_opened(ctx: Any, failed: Exception | None) -> None:
    """One all-reduce at the start: a sink the logging rank cannot open (W&B without a login, ...) stops every rank
    now, instead of leaving the others in their first collective for faults.collective_timeout_s."""
    flag = torch.tensor([0.0 if failed is None else 1.0], device=ctx.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if failed is not None:
        raise failed
    if flag.item():
        raise MetricsSinkError("the logging rank could not open a metrics sink (logging.*): its log, "
                               "logs/rank<N>.log of the last pipeline stage's first rank, says why")


class WandbSink:
    """Weights & Biases (logging.wandb): what TensorBoardSink writes, as train/<name> and eval/<name>, against
    `trainer/step` (the optimizer step), and the resolved config. The run id is kept in <run_dir>/wandb_run_id, so a
    resumed or requeued job continues the same W&B run. W&B's own step only increases (with `step=` it drops what
    is logged at an earlier one), so steps logged again after a resume from an earlier checkpoint are kept: they
    appear twice on the trainer/step axis, as they do in metrics.jsonl."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self._run: Any = None

    def open(self, run: RunContext, state: TrainState) -> None:
        import wandb

        logging_cfg = run.cfg.logging
        id_file = self.run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(8)  # W&B ids: [a-z0-9]
        try:
            self._run = wandb.init(project=logging_cfg.wandb_project, entity=logging_cfg.wandb_entity,
                                   name=run.cfg.name, id=run_id, resume="allow", dir=str(self.run_dir),
                                   mode=logging_cfg.wandb_mode, config=run.cfg.model_dump(mode="json"))
        except Exception as err:
            raise MetricsSinkError(
                f"logging.wandb: W&B did not start ({type(err).__name__}: {err}). Log in where the logging rank runs "
                f"(`wandb login`, or WANDB_API_KEY), or use logging.wandb_mode=offline and `wandb sync` the run "
                f"later, or set logging.wandb=false") from err
        id_file.write_text(run_id + "\n")
        self._run.define_metric("trainer/step")
        for kind in ("train", "eval"):
            self._run.define_metric(f"{kind}/*", step_metric="trainer/step")

    def step(self, step: int) -> None: ...

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        self._run.log({"trainer/step": step, **_scalars(metrics)})

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None


class ConsoleSink:
    """One log line per log step (to rank{N}.log and, on the logging rank, the console) and a tqdm progress bar with
    ETA when the console is a terminal (a batch job's log gets the lines only; they carry the ETA too)."""

    def __init__(self) -> None:
        self._bar: Any = None
        self._max_steps = 0

    def open(self, run: RunContext, state: TrainState) -> None:
        self._max_steps = run.cfg.train.max_steps
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=self._max_steps, initial=state.step, unit="step", dynamic_ncols=True)

    def step(self, step: int) -> None:
        if self._bar is not None:
            self._bar.update(step - self._bar.n)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        log.info(format_metrics(step, self._max_steps, metrics))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf  # exp overflows a float past ~709


def format_metrics(step: int, max_steps: int, m: dict[str, Any]) -> str:
    if m["kind"] == "eval":
        per_dataset = "".join(f" | {key} {value:.4f}" for key, value in m.items()
                              if key.startswith("val_loss/") or (key.startswith(("acc/", "acc_norm/"))
                                                                 and not is_group_member(key.partition("/")[2])))
        return f"step {step}/{max_steps} | val_loss {m['val_loss']:.4f} | val_ppl {m['val_ppl']:.2f}{per_dataset}"
    parts = [f"step {step}/{max_steps}", f"loss {m['loss']:.4f}", f"lr {m['lr']:.2e}"]
    if "z_loss" in m:
        parts.insert(2, f"z_loss {m['z_loss']:.3g}")
    if m["grad_norm"] is not None:
        parts.append(f"grad_norm {m['grad_norm']:.3f}")
    if m["loss_scale"] is not None:
        parts.append(f"loss_scale {m['loss_scale']:.0f}")
    if m.get("skipped_steps"):
        parts.append(f"skipped {m['skipped_steps']} (fp16 overflow)")
    parts.append(f"{m['tokens_per_s']:,.0f} tok/s")
    parts.append(f"{m['tflops_per_gpu']:.3g} TFLOP/s/gpu")
    if m["mfu"] is not None:
        parts.append(f"MFU {100 * m['mfu']:.1f}%")
    memory = m.get("max_memory_allocated_gib", m.get("max_rss_gib"))
    parts.append(f"mem {memory:.2f} GiB")
    parts.append(f"data {1000 * m['data_wait_s']:.1f} ms/step")
    parts.append(f"ETA {_duration((max_steps - step) * m['step_time_s'])}")
    return " | ".join(parts)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class TqdmLoggingHandler(logging.StreamHandler):
    """Console log handler that prints through tqdm, so log lines do not tear the progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging must never raise into training
            self.handleError(record)


def setup_rank_logging(run_dir: Path, ctx: ParallelContext) -> None:
    """Every rank logs to <run_dir>/logs/rank{N}.log; only the logging rank also prints (the others: warnings)."""
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_pretrain", False)]:
        root.removeHandler(handler)  # a second run in one process (tests) replaces our handlers, not duplicates
        handler.close()
    formatter = logging.Formatter(f"%(asctime)s rank{ctx.rank} %(levelname)s %(name)s: %(message)s")
    file_handler = logging.FileHandler(run_dir / "logs" / f"rank{ctx.rank}.log", encoding="utf-8")
    console = TqdmLoggingHandler()
    console.setLevel(logging.INFO if ctx.is_logging_rank else logging.WARNING)
    for handler in (file_handler, console):
        handler.setFormatter(formatter)
        handler._pretrain = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(logging.INFO)


def default_hooks(run: RunContext) -> list[Hook]:
    """The metrics hooks every run gets; trainer.train.training_hooks adds the watchdog, resume, NaN guard and
    checkpointer around them."""
    sinks: list[Any] = [ConsoleSink()]
    if run.cfg.logging.jsonl:
        sinks.append(JsonlSink(run.run_dir / "metrics.jsonl"))
    if run.cfg.logging.tensorboard:
        sinks.append(TensorBoardSink(run.run_dir / "tb"))
    if run.cfg.logging.wandb:
        sinks.append(WandbSink(run.run_dir))
    # Sinks touch files only on the logging rank: elsewhere they are never opened.
    hooks: list[Hook] = [MetricsHook(sinks if run.ctx.is_logging_rank else [])]
    if run.model.compile_backend is not None:
        hooks.append(CompileWarmupHook(run.model.layers_compiled, run.model.compile_backend))
    prof = run.cfg.profiling
    if prof.enabled and run.ctx.rank in prof.ranks:
        from trainer.profiling import ProfilerHook  # it builds on this module's Hook

        # Last: its window holds every other hook's share of the step (the metrics' grad-norm reduction included).
        hooks.append(ProfilerHook(prof, run.ctx.rank, run.ctx.device, Path(run.cfg.profile_dir)))
    return hooks


class CompileWarmupHook(Hook):
    """Logs the torch.compile start-up cost (first step vs second step, and torch's own compile phases) once."""

    def __init__(self, layers_compiled: int, backend: str) -> None:
        self._log: CompileWarmupLog | None = CompileWarmupLog(layers_compiled, backend)
        self.summary: dict[str, Any] | None = None

    def on_step_end(self, run: RunContext, state: TrainState, out: StepOutput) -> None:
        if self._log is None:
            return
        if run.ctx.device.type == "cuda":
            torch.cuda.synchronize(run.ctx.device)  # two steps only: the step time must include its GPU work
        self.summary = self._log.step_done(out.step_time_s)
        if self.summary is not None:
            self._log = None

