"""Multiple-choice downstream tasks (`pretrain eval --task FILE`): accuracy by log-likelihood, in any layout.

A task is a JSON Lines file, one example per line: `{"context": str, "choices": [str, ...], "label": int}` (HellaSwag,
ARC, PIQA, ... converted once by the user; nothing is downloaded). Each choice is scored as lm-evaluation-harness
scores it: the sum of the log-probabilities of its tokens after the context. `acc` picks the highest sum, `acc_norm`
the highest sum per character of the choice (lm-eval's length normalisation). Context and choice are tokenized as
lm-eval 0.4 tokenizes them for the exported model (`encode_pair`) with the run's data tokenizer; a context longer than
the sequence loses its first tokens. The numbers equal lm-eval's on the HF export of the same weights
(tests/trainer/test_downstream.py runs lm-eval itself) when the task is written as lm-eval writes its requests: the
context ends with the target delimiter (a space for most tasks) and the choices are the bare answers.

How the scores come out of any layout: every (example, choice) is one row of `train.seq_len` tokens whose labels are
ignored (-100) except the choice's tokens, cut after the task's longest row (rounded up to 64). The rows go through
the model in micro-batches as validation batches do (spread over DP ranks, through the pipeline under PP), and the
loss function is swapped for `RowLogLikelihoods`, which computes each row's summed cross entropy with the run's own
loss (vocab-parallel under TP, fused lm_head under parallel.lm_loss=fused_linear) and keeps it. The rows' sums are
then gathered over DP and sent from the last pipeline stage to every rank.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from trainer.config import ConfigError
from trainer.report import is_group_member

IGNORE = -100


@dataclass(frozen=True)
class MultipleChoiceTask:
    name: str
    contexts: list[str]
    choices: list[list[str]]
    labels: list[int]

    @classmethod
    def load(cls, path: str | os.PathLike[str], group: str | None = None) -> MultipleChoiceTask:
        """The task in a JSON Lines file; every bad line is reported with its number and what it needs. A task of
        a group (a directory of task files) is named <group>/<file stem>."""
        source = Path(path)
        if not source.is_file():
            raise ConfigError(f"task file {source} not found: pass a JSON Lines file of "
                              f'{{"context": ..., "choices": [...], "label": N}} examples')
        contexts, choices, labels = [], [], []
        for number, line in enumerate(source.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            example = _parse(line, f"{source}:{number}")
            contexts.append(example["context"])
            choices.append(example["choices"])
            labels.append(example["label"])
        if not contexts:
            raise ConfigError(f"task file {source} holds no examples")
        return cls(f"{group}/{source.stem}" if group else source.stem, contexts, choices, labels)


def _parse(line: str, where: str) -> dict[str, Any]:
    try:
        example = json.loads(line)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{where}: not JSON ({err})") from None
    ok = (isinstance(example, dict) and isinstance(example.get("context"), str)
          and isinstance(example.get("choices"), list) and len(example["choices"]) >= 2
          and all(isinstance(c, str) and c for c in example["choices"])
          and isinstance(example.get("label"), int) and 0 <= example["label"] < len(example["choices"]))
    if not ok:
        raise ConfigError(f'{where}: an example needs "context" (text), "choices" (2 or more non-empty texts) and '
                          f'"label" (the index of the right choice)')
    return example


@dataclass(frozen=True)
class TaskResult:
    name: str
    acc: float
    acc_norm: float
    num_examples: int
    logliks: list[list[float]]  # per example, per choice: the sum of the choice tokens' log-probabilities


@dataclass(frozen=True)
class TaskRows:
    """A task as the rows the model scores, built once at the run's sequence length (`task_rows`)."""

    task: MultipleChoiceTask
    tokens: torch.Tensor  # (R, seq_len)
    labels: torch.Tensor  # (R, seq_len)
    owners: list[tuple[int, int]]  # (example, choice) of each row


def load_tasks(cfg: Any) -> list[TaskRows] | None:
    """train.eval_tasks, tokenized once (train.eval_tasks_tokenizer, else the first dataset's tokenizer) into the
    rows every evaluation scores; None without tasks."""
    if not cfg.train.eval_tasks:
        return None
    from data_pipeline.tokenizer import load_tokenizer
    from trainer.data_check import data_tokenizer_file

    tokenizer_path = cfg.train.eval_tasks_tokenizer or data_tokenizer_file(cfg)
    if tokenizer_path is None:
        raise ConfigError("train.eval_tasks need the tokenizer the model trains with, and the data has none on record "
                          "(synthetic data, or a dataset without tokenizer/): set train.eval_tasks_tokenizer=DIR "
                          "(pretrain eval: --tokenizer DIR)")
    tokenizer = load_tokenizer(tokenizer_path)
    tasks = [MultipleChoiceTask.load(path, group) for path, group in task_files(cfg.train.eval_tasks)]
    return [TaskRows(task, *task_rows(task, tokenizer, cfg.train.seq_len)) for task in tasks]


def task_files(paths: list[str]) -> list[tuple[Path, str | None]]:
    """(task file, its group): each path is a task file (no group), or a directory whose *.jsonl files are the
    tasks of a group named after it (what `pretrain convert lm-eval-task` writes for a group such as mmlu)."""
    files: list[tuple[Path, str | None]] = []
    for path in map(Path, paths):
        if not path.is_dir():
            files.append((path, None))
            continue
        found = sorted(path.glob("*.jsonl"))
        if not found:
            raise ConfigError(f"task directory {path} holds no *.jsonl task files: pass task files, or a directory "
                              f"that `pretrain convert lm-eval-task ... --output {path}` wrote")
        files += [(file, path.name) for file in found]
    return files


def score_tasks(run: Any, tasks: list[TaskRows]) -> list[TaskResult]:
    """Each task's accuracy under the run's model as it is now. Collective (every rank calls it, with the same
    tasks); every rank gets the results."""
    results = []
    for rows in tasks:
        logliks = -row_loss_sums(run, rows.tokens, rows.labels)
        per_example: list[list[float]] = [[] for _ in rows.task.contexts]
        for (example, _), loglik in zip(rows.owners, logliks.tolist(), strict=True):
            per_example[example].append(loglik)
        results.append(_accuracy(rows.task, per_example))
    return results + group_results(results)


def group_results(results: list[TaskResult]) -> list[TaskResult]:
    """Each group's acc and acc_norm: the mean over its tasks weighted by their examples (lm-eval's rule for mmlu,
    i.e. the accuracy over all of the group's examples)."""
    groups: dict[str, list[TaskResult]] = {}
    for result in results:
        if is_group_member(result.name):
            groups.setdefault(result.name.rpartition("/")[0], []).append(result)
    out = []
    for name, members in groups.items():
        examples = sum(member.num_examples for member in members)
        acc, acc_norm = (sum(getattr(member, metric) * member.num_examples for member in members) / examples
                         for metric in ("acc", "acc_norm"))
        out.append(TaskResult(name, acc, acc_norm, examples, []))
    return out


def task_rows(task: MultipleChoiceTask, tokenizer: Any,
              seq_len: int) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """(tokens (R, seq_len), labels (R, seq_len), [(example, choice)] per row): one row per choice, labels ignored
    except on the choice's tokens, padded at the end."""
    rows_tokens, rows_labels, owners = [], [], []
    for example, (context, choices) in enumerate(zip(task.contexts, task.choices, strict=True)):
        for choice, text in enumerate(choices):
            context_ids, choice_ids = encode_pair(tokenizer, context, text)
            ids = (context_ids + choice_ids)[-(seq_len + 1):]  # a long context loses its first tokens
            scored = min(len(choice_ids), len(ids) - 1)
            tokens = torch.zeros(seq_len, dtype=torch.long)
            labels = torch.full((seq_len,), IGNORE, dtype=torch.long)
            tokens[:len(ids) - 1] = torch.tensor(ids[:-1])
            labels[len(ids) - 1 - scored:len(ids) - 1] = torch.tensor(ids[len(ids) - scored:])
            rows_tokens.append(tokens)
            rows_labels.append(labels)
            owners.append((example, choice))
    return torch.stack(rows_tokens), torch.stack(rows_labels), owners


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-evaluation-harness 0.4 encodes them for an HF model of ours, so scores
    compare with its numbers: the context's trailing whitespace moves to the continuation; the pair is encoded whole
    and the continuation is what follows the context's own encoding, both with the bos first where the tokenizer
    prepends one by default (`prepends_bos`: AutoTokenizer's default, which lm-eval keeps). An empty context is the
    bos (else eos) token, or the continuation's own first token when it is that token."""
    if not context:
        prefix = tokenizer.bos_id if tokenizer.bos_id >= 0 else tokenizer.eos_id
        ids = tokenizer.encode([continuation])[0].tolist()
        return ([prefix], ids) if ids[:1] != [prefix] else (ids[:1], ids[1:])
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    # lm-eval leaves the special tokens out for a context that already starts with the bos as text.
    bos = [tokenizer.bos_id] if tokenizer.prepends_bos and not context.startswith(
        tokenizer.id_to_piece(tokenizer.bos_id)) else []
    whole, alone = (bos + ids.tolist() for ids in tokenizer.encode([context + continuation, context]))
    return alone, whole[len(alone):]


def _accuracy(task: MultipleChoiceTask, logliks: list[list[float]]) -> TaskResult:
    right = right_norm = 0
    for choices, scores, label in zip(task.choices, logliks, task.labels, strict=True):
        right += max(range(len(scores)), key=scores.__getitem__) == label
        per_char = [score / len(choice) for score, choice in zip(scores, choices, strict=True)]  # lm-eval: characters
        right_norm += max(range(len(per_char)), key=per_char.__getitem__) == label
    count = len(task.labels)
    return TaskResult(task.name, right / count, right_norm / count, count, logliks)


class RowLogLikelihoods:
    """Stands in for the model's loss function while rows are scored: each row's summed cross entropy over its
    labelled tokens (the run's own loss times the row's count), kept in `sums`. Returns their mean, which nobody
    reads (DeepSpeed's pipeline needs a loss)."""

    def __init__(self, loss_fn: Any) -> None:
        self.loss_fn = loss_fn
        self.sums: list[torch.Tensor] = []

    def __call__(self, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        sums = []
        for row in range(labels.shape[0]):
            count = (labels[row] != IGNORE).sum()
            # Padding rows are scored too, and their NaN (0 / 0 tokens) is dropped: every rank must call the loss
            # alike, as it may hold a collective (the fused loss under ZeRO-3 gathers lm_head's weight at each call).
            row_loss = self.loss_fn(outputs[row:row + 1], labels[row:row + 1]).float()
            sums.append(torch.where(count > 0, row_loss * count, 0.0))
        self.sums += sums
        return torch.stack(sums).mean()


@torch.no_grad()
def row_loss_sums(run: Any, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(R,) summed cross entropy of each row, on every rank. Rows are padded to whole micro-batches on every DP rank
    and micro-batch m goes to DP rank m % dp."""
    micro, dp, dp_rank = run.cfg.train.micro_batch_size_per_gpu, run.ctx.dp, run.ctx.dp_rank
    tokens, labels = _trim_columns(tokens, labels, run.ctx.tp)
    num_rows = tokens.shape[0]
    padded = -(-num_rows // (micro * dp)) * micro * dp
    tokens = torch.cat([tokens, tokens.new_zeros(padded - num_rows, tokens.shape[1])])
    labels = torch.cat([labels, labels.new_full((padded - num_rows, labels.shape[1]), IGNORE)])
    mine = [m for m in range(padded // micro) if m % dp == dp_rank]
    batches = [(tokens[m * micro:(m + 1) * micro], labels[m * micro:(m + 1) * micro]) for m in mine]
    scorer = RowLogLikelihoods(run.model.loss_fn)
    if run.model.is_pipeline:
        pipe = run.engine.module
        pipe.loss_fn, original = scorer, pipe.loss_fn
        # The stages exchange activation shapes once and then reuse their buffers: rows shorter than the training
        # sequence need new ones, and training needs its own back afterwards.
        run.engine.reset_activation_shape()
        try:
            run.engine.eval_batch(iter(batches), num_micro_batches=len(batches))
        finally:
            pipe.loss_fn = original
            run.engine.reset_activation_shape()
    else:
        run.engine.eval()
        for batch_tokens, batch_labels in batches:
            scorer(run.engine(batch_tokens.to(run.ctx.device)), batch_labels.to(run.ctx.device))
        run.engine.train()
    return _gather(run, mine, micro, scorer.sums, padded)[:num_rows]


def _trim_columns(tokens: torch.Tensor, labels: torch.Tensor, tp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows are left-aligned and causal attention never looks right, so the padding columns after the longest row's
    last scored token change nothing: cut them (a task of 100-token rows need not pay for a 2048-token sequence).
    The length is a multiple of 64 (kernel tiles, FP8's multiples of 16) and of tp (sequence parallelism splits it),
    at most the training sequence."""
    columns = torch.arange(labels.shape[1])
    used = int(((labels != IGNORE) * (columns + 1)).max())  # one past the last scored position of any row
    align = math.lcm(64, tp)
    length = min(labels.shape[1], -(-used // align) * align)
    return tokens[:, :length], labels[:, :length]


def _gather(run: Any, mine: list[int], micro: int, sums: list[torch.Tensor], padded: int) -> torch.Tensor:
    """Every DP rank's row sums in row order, on every rank: only the pipeline's last stage computed them."""
    ctx = run.ctx
    local = torch.stack(sums).cpu() if sums else torch.empty(0)
    pieces: list[Any] = [None] * ctx.dp
    dist.all_gather_object(pieces, (mine, local), group=ctx.dp_group)
    if ctx.pp > 1:  # the last stage holds them; every stage gets them
        holder = [pieces]
        last = dist.get_global_rank(ctx.pp_group, ctx.pp - 1)
        dist.broadcast_object_list(holder, src=last, group=ctx.pp_group)
        pieces = holder[0]
    out = torch.zeros(padded, dtype=torch.float64)
    for micro_batches, values in pieces:
        rows = torch.cat([torch.arange(m * micro, (m + 1) * micro) for m in micro_batches])
        out[rows] = values.double()
    return out
