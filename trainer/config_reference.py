"""docs/config.md, generated from trainer/config.py: every key of the config tree with its type, default and the
comment written next to it in the code (the one place the meaning is kept; tests/trainer/test_config_reference.py
fails when the page is stale).

    python -m trainer.config_reference --write     # regenerate docs/config.md
    python -m trainer.config_reference             # print it

No torch: it reads the pydantic models and their source.
"""

from __future__ import annotations

import argparse
import inspect
import io
import sys
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from trainer.config import Config

DOC = Path(__file__).resolve().parents[1] / "docs" / "config.md"
HEADER = """# Configuration reference

Generated from `trainer/config.py` by `python -m trainer.config_reference --write` (a test fails when this page is
stale): every key, its type and default, and the comment next to it in the code. Set keys in a YAML config
(`configs/*.yaml`) or override them on the command line as dotted keys with YAML values, e.g.
`pretrain train --config configs/tiny.yaml optim.lr=1e-3 "optim.betas=[0.9,0.95]" data.datasets.0.weight=2`.
Checks that involve several keys (and the world size) run before anything starts and say what to change:
`pretrain train --config X --dry-run --world-size N`. A run saves its resolved config as `<run_dir>/config.yaml`.
"""


@dataclass(frozen=True)
class Key:
    path: str  # dotted, as on the command line
    type: str
    default: str
    meaning: str


def field_comments(cls: type) -> dict[str, str]:
    """Each field's comment in the class body: the comment lines right above it plus the one at the end of its line."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments: dict[int, str] = {}
    code_lines: set[int] = set()  # lines with a token other than a comment: a comment there trails code
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
        elif token.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            code_lines.add(token.start[0])
    lines = source.splitlines()
    found: dict[str, str] = {}
    for number, text in enumerate(lines, start=1):
        name = text.strip().split(":", 1)[0]
        if not (text.startswith("    ") and not text.startswith("     ") and name.isidentifier()
                and name in getattr(cls, "model_fields", {})):
            continue
        above, previous = [], number - 1
        while previous in comments and previous not in code_lines:
            above.insert(0, comments[previous])
            previous -= 1
        trailing = comments.get(number)
        found[name] = " ".join([*above, *([trailing] if trailing else [])])
    return found


def keys(model: type[BaseModel] = Config, prefix: str = "") -> list[Key]:
    """Every leaf key under `model`, in declaration order; nested sections recurse (a list of sections as `.N.`)."""
    comments = field_comments(model)
    out = []
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        section = _section_type(info.annotation)
        if section is not None and _is_optional(info.annotation):  # the section's own row, then its keys
            out.append(Key(path, f"{{{', '.join(section.model_fields)}}} or null", default_text(info),
                           comments.get(name, "")))
            out.extend(keys(section, f"{path}."))
            continue
        if section is not None and not _is_list(info.annotation):
            nested = keys(section, f"{path}.")
            if prefix and section.__doc__:  # a section inside a section: its docstring leads its first key's meaning
                first = nested[0]
                nested[0] = Key(first.path, first.type, first.default,
                                f"{inspect.getdoc(section)} {first.meaning}".strip())
            out.extend(nested)
            continue
        out.append(Key(path, type_text(info.annotation, info.metadata), default_text(info), comments.get(name, "")))
        if section is not None:  # a list of sections: its entries' keys, N = the entry's index
            out.extend(keys(section, f"{path}.N."))
    return out


def _section_type(annotation: Any) -> type[BaseModel] | None:
    candidates = [annotation, *typing.get_args(annotation)]
    return next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)


def _is_optional(annotation: Any) -> bool:
    return type(None) in typing.get_args(annotation)


def _is_list(annotation: Any) -> bool:
    return typing.get_origin(annotation) is list


def type_text(annotation: Any, metadata: list[Any] | tuple[Any, ...] = ()) -> str:
    """`int ≥ 1`, `cosine | linear | constant`, `str or null`, `list of float ≥ 0 < 1`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return type_text(args[0], [*args[1:], *metadata])
    bounds = _bounds_text(metadata)
    if origin is typing.Literal:
        return " | ".join(str(arg) for arg in args)
    if origin in (typing.Union, types.UnionType):
        parts = [type_text(arg) for arg in args if arg is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in args else "")
    if origin is list:
        item = args[0] if args else Any
        section = _section_type(item)
        if section is not None:
            return f"list of {{{', '.join(section.model_fields)}}}"
        item_text = type_text(item)
        return f"list of {f'({item_text})' if ' ' in item_text else item_text}{',' + bounds if bounds else ''}"
    name = getattr(annotation, "__name__", str(annotation))
    return f"{name}{bounds}"


def _bounds_text(metadata: Any) -> str:
    """`≥ 0, < 1`, `length 2`, `matching `re``: annotated-types constraints, also inside a pydantic Field."""
    found: dict[str, Any] = {}
    for item in metadata:
        for inner in [item, *getattr(item, "metadata", [])]:  # Field(ge=1) keeps its constraints in .metadata
            for attr in ("ge", "gt", "le", "lt", "min_length", "max_length", "pattern"):
                value = getattr(inner, attr, None)
                if value is not None and not callable(value):
                    found[attr] = value
    words = [f"{symbol} {found[attr]}" for attr, symbol in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"))
             if attr in found]
    if "min_length" in found and found.get("min_length") == found.get("max_length"):
        words.append(f"length {found['min_length']}")
    else:
        words += [f"{label} {found[attr]}" for attr, label in (("min_length", "length ≥"),
                                                                ("max_length", "length ≤")) if attr in found]
    if "pattern" in found:
        words.append(f"matching `{found['pattern']}`")
    return (" " + ", ".join(words)) if words else ""


def default_text(info: Any) -> str:
    if info.default is PydanticUndefined and info.default_factory is None:
        return "required"
    value = info.default_factory() if info.default is PydanticUndefined else info.default
    return _yaml(value)


def _yaml(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    if isinstance(value, int) and abs(value) >= 10_000:
        return f"{value:_}"
    return str(value)


def render() -> str:
    parts = [HEADER]
    for name, info in Config.model_fields.items():
        section = _section_type(info.annotation)
        if section is None:
            continue
        doc = inspect.getdoc(section) if section.__doc__ else ""
        parts.append(f"\n## `{name}`\n" + (f"{doc}\n" if doc else ""))
        parts.append("\n| key | type | default | meaning |\n|---|---|---|---|\n")
        parts.extend(f"| `{k.path}` | {_cell(k.type)} | `{k.default}` | {_cell(k.meaning)} |\n"
                     for k in keys(section, f"{name}."))
    top = [k for k in keys() if "." not in k.path]
    parts.append("\n## top level\n\n| key | type | default | meaning |\n|---|---|---|---|\n")
    parts.extend(f"| `{k.path}` | {_cell(k.type)} | `{k.default}` | {_cell(k.meaning)} |\n"
                 for k in top)
    return "".join(parts)


def _cell(text: str) -> str:
    """Markdown table cell: `|` escaped everywhere; outside `code` spans also `<` (GitHub would take `<r>` for a tag)
    and `*` (a pair would italicise)."""
    parts = text.split("`")
    for i in range(0, len(parts), 2):  # even parts are outside code spans
        parts[i] = parts[i].replace("<", "&lt;").replace("*", "\\*")
    return "`".join(parts).replace("|", "\\|")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="print (or --write) docs/config.md from trainer/config.py")
    parser.add_argument("--write", action="store_true", help=f"write {DOC}")
    args = parser.parse_args(argv)
    text = render()
    if args.write:
        DOC.write_text(text, encoding="utf-8")
        print(f"wrote {DOC}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
