"""lm-evaluation-harness multiple-choice tasks → our task files (`pretrain convert lm-eval-task`).

lm-eval builds each task's requests itself (its dataset loading, prompt template, few-shot examples drawn with its
seed): one (context, delimiter + choice) pair per choice. They are written as our JSON Lines examples
(trainer/downstream.py) that score the same: {"context": context + delimiter, "choices": [choice, ...], "label":
gold}. Scored by `pretrain eval --task` or train.eval_tasks, the tokens and the per-character normalisation are then
lm-eval's: the context's trailing whitespace (the delimiter, a space for most tasks) moves to the continuation
exactly as lm-eval moves it.

Run it once where the datasets can be downloaded (a login node); the files it writes need nothing else. Refused, by
name: tasks that are not multiple choice (generation, perplexity), tasks that score one continuation under several
contexts (Winogrande: lm-eval's multiple_input), golds that are lists or out of range, and a target delimiter that is
not whitespace (lm-eval splits the pair before it; our encoding would split after it).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.config import ConfigError

FEWSHOT_SEED = 1234  # lm_eval.simple_evaluate's default fewshot_random_seed


@dataclass(frozen=True)
class ConvertedTask:
    name: str
    path: Path
    num_examples: int
    num_fewshot: int


def convert_lm_eval_tasks(names: Sequence[str], out_dir: Path, *, num_fewshot: int | None = None,
                          limit: int | None = None, include_path: str | None = None,
                          overwrite: bool = False) -> list[ConvertedTask]:
    """Every leaf task of `names` (a group such as mmlu expands to its tasks) as <out_dir>/<task>.jsonl."""
    manager = _task_manager(include_path)
    try:
        tasks = manager.load(list(names))["tasks"]
    except KeyError as err:  # lm-eval's message names the task and says it is unknown
        raise ConfigError(f"lm-eval: {err.args[0]}; `lm-eval ls tasks` lists them, --include-path adds a folder of "
                          f"task YAML files") from None
    # Every task is checked and built before the first file is written: a refused task leaves no partial output.
    built = []
    for name, task in tasks.items():
        path = out_dir / f"{name}.jsonl"
        if path.exists() and not overwrite:
            raise ConfigError(f"{path} exists: pass --overwrite to replace it, or choose another --output")
        shots = _prepare(name, task, num_fewshot)
        built.append((name, path, shots, task_examples(name, task, limit)))
    out_dir.mkdir(parents=True, exist_ok=True)
    converted = []
    for name, path, shots, examples in built:
        path.write_text("".join(json.dumps(example, ensure_ascii=False) + "\n" for example in examples),
                        encoding="utf-8")
        converted.append(ConvertedTask(name, path, len(examples), shots))
    return converted


def _task_manager(include_path: str | None) -> Any:
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ConfigError('converting lm-eval tasks needs lm-evaluation-harness: pip install "lm_eval>=0.4.13" '
                          "(or this package's [eval] extra), on a machine that can download the datasets") from None
    return TaskManager(include_path=include_path)


def _prepare(name: str, task: Any, num_fewshot: int | None) -> int:
    """lm-eval's own preparation (simple_evaluate): the shot count (the task's, unless given and the task does not
    fix 0), the few-shot seed. Refuses what our format cannot express."""
    if task.OUTPUT_TYPE != "multiple_choice":
        raise ConfigError(f"lm-eval task {name} is {task.OUTPUT_TYPE}, not multiple_choice: only multiple-choice tasks "
                          f"are scored by log-likelihood here (acc, acc_norm)")
    if task.multiple_input:
        raise ConfigError(f"lm-eval task {name} scores one continuation under several contexts (multiple_input, as "
                          f"Winogrande does); a task file here has one context per example")
    delimiter = task.config.target_delimiter
    if delimiter.strip():
        raise ConfigError(f"lm-eval task {name} joins context and choice with {delimiter!r}, which is not whitespace: "
                          f"its pairs cannot be written so that they encode as lm-eval encodes them")
    configured = task.get_config("num_fewshot")
    shots = configured if configured == 0 or num_fewshot is None else num_fewshot
    task.set_config(key="num_fewshot", value=shots or 0)
    task.set_fewshot_seed(seed=FEWSHOT_SEED)
    return shots or 0


def task_examples(name: str, task: Any, limit: int | None) -> list[dict[str, Any]]:
    """Our examples from the requests lm-eval builds: one per document, its choices in lm-eval's order."""
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    delimiter = task.config.target_delimiter
    requests: dict[int, list[Any]] = {}
    for instance in task.instances:
        requests.setdefault(instance.doc_id, []).append(instance)
    examples = []
    for doc_id, instances in sorted(requests.items()):
        instances.sort(key=lambda instance: instance.idx)
        contexts = {instance.arguments[0] for instance in instances}
        choices = [instance.arguments[1].removeprefix(delimiter) for instance in instances]
        label = _gold(name, doc_id, task.doc_to_target(instances[0].doc), choices)
        assert len(contexts) == 1, (name, doc_id)  # one context per document: multiple_input was refused
        examples.append({"context": contexts.pop() + delimiter, "choices": choices, "label": label})
    return examples


def _gold(name: str, doc_id: int, gold: Any, choices: list[str]) -> int:
    """The right choice's index, as lm-eval reads doc_to_target: an index, or the choice's text."""
    if isinstance(gold, str) and gold in choices:
        return choices.index(gold)
    if isinstance(gold, int) and 0 <= gold < len(choices):
        return gold
    raise ConfigError(f"lm-eval task {name}, document {doc_id}: its gold {gold!r} is not one of its {len(choices)} "
                      f"choices (a list of golds or one out of range; lm-eval would count the document wrong)")
