"""Print (or write into README.md) the settings table, generated from ``service.config.Settings``.

The README's settings table is this script's output, held between ``<!-- settings:start -->`` and
``<!-- settings:end -->``, so the documented names, defaults and meanings are the code's own and cannot drift:
``tests/unit/test_docs.py`` regenerates the table and fails when the README holds another one.

    .venv/bin/python scripts/settings_table.py           # print the table
    .venv/bin/python scripts/settings_table.py --write   # replace the table in README.md
"""

from __future__ import annotations

import argparse
import sys
from enum import Enum
from pathlib import Path

from pydantic.fields import FieldInfo

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
START = "<!-- settings:start -->"
END = "<!-- settings:end -->"
WRITE_COMMAND = ".venv/bin/python scripts/settings_table.py --write"

if str(ROOT) not in sys.path:  # run as a script from anywhere: the service package lives at the repo root
    sys.path.insert(0, str(ROOT))


def _default(field: FieldInfo) -> str:
    """The default as an operator would type it: ``unset`` for None, enum values, plain numbers and paths."""
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if isinstance(value, Enum):
        return str(value.value)
    return str(value)


def _summary(description: str) -> str:
    """The description's first clause (up to ``;``): the README stays a front door; ``--help`` has the rest."""
    return description.split(";")[0].strip()


def _cell(text: str) -> str:
    """One markdown table cell: no newlines, pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|")


def settings_table() -> str:
    """The markdown table: env variable, default and meaning of every field of ``Settings``, in order.

    The flag is not a column: it is always the field name with dashes (``BERTSERVE_MAX_QUEUE`` is ``--max-queue``,
    see ``service.config.parse_args``), and the README says so once instead of 30 times.
    """
    from service.config import Settings

    prefix = str(Settings.model_config.get("env_prefix", "BERTSERVE_"))
    rows = [
        "| env (flag: `--name-with-dashes`) | default | meaning |",
        "| --- | --- | --- |",
    ]
    for name, field in Settings.model_fields.items():
        env = f"{prefix}{name.upper()}"
        rows.append(f"| `{env}` | `{_cell(_default(field))}` | {_cell(_summary(field.description or ''))} |")
    return "\n".join(rows) + "\n"


def replace_table(document: str, table: str) -> str:
    """``document`` with the text between the settings markers replaced by ``table``."""
    start, end = document.find(START), document.find(END)
    if start < 0 or end < start:
        raise ValueError(f"README.md has no {START} ... {END} section")
    return document[: start + len(START)] + "\n" + table + document[end:]


def current_table(document: str) -> str:
    """The table the document holds between the settings markers ('' when there is none)."""
    start, end = document.find(START), document.find(END)
    if start < 0 or end < start:
        return ""
    return document[start + len(START) : end].lstrip("\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true", help="replace the table in README.md instead of printing")
    parser.add_argument("--readme", type=Path, default=README, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    table = settings_table()
    if not args.write:
        sys.stdout.write(table)
        return 0
    document = args.readme.read_text(encoding="utf-8")
    updated = replace_table(document, table)
    if updated != document:
        args.readme.write_text(updated, encoding="utf-8")
        print(f"updated the settings table in {args.readme}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
