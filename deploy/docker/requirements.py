"""Print the service's runtime requirements, read from pyproject.toml, for one image flavour: gpu or cpu.

pyproject.toml chooses between onnxruntime-gpu and onnxruntime by platform marker, which suits `pip install .`
on a workstation. An image must not leave that choice to the build platform: the gpu image needs
onnxruntime-gpu (and should fail to build where no such wheel exists, rather than quietly ship a CPU-only
runtime), the cpu image wants the small CPU-only onnxruntime wheel. Every other requirement passes through
unchanged, markers included. Standard library only: it runs in the Dockerfile's builder stages.

    python requirements.py --flavor gpu pyproject.toml > requirements.txt
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
_RUNTIMES = {"gpu": "onnxruntime-gpu", "cpu": "onnxruntime"}


def canonical(name: str) -> str:
    """PEP 503 normalised project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    match = _NAME.match(requirement)
    if match is None:
        raise ValueError(f"cannot read a project name from requirement {requirement!r}")
    return canonical(match.group(1))


def runtime_requirements(pyproject: dict, flavor: str) -> list[str]:
    """The `[project] dependencies` with exactly one ONNX Runtime, the flavour's, stripped of its marker."""
    keep = _RUNTIMES[flavor]
    drop = {name for name in _RUNTIMES.values() if name != keep}
    out: list[str] = []
    for requirement in pyproject["project"]["dependencies"]:
        name = requirement_name(requirement)
        if name in drop:
            continue
        if name == keep:
            requirement = requirement.split(";", 1)[0].strip()  # the flavour decides, not the platform
        out.append(requirement)
    if keep not in {requirement_name(r) for r in out}:
        raise SystemExit(f"pyproject.toml declares no {keep} dependency")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pyproject", type=Path)
    parser.add_argument("--flavor", choices=sorted(_RUNTIMES), required=True)
    args = parser.parse_args(argv)
    pyproject = tomllib.loads(args.pyproject.read_text(encoding="utf-8"))
    sys.stdout.write("".join(f"{r}\n" for r in runtime_requirements(pyproject, args.flavor)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
