"""Helpers for the deployment tests: read the Dockerfile, .dockerignore, kustomize output and PromQL the way the
real tools do, and run a real bertserve server (`python -m service ...`) as a subprocess.

Self-contained on purpose (standard library, PyYAML, httpx): tests/deploy must not depend on test helpers that
other suites may reshape.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = REPO / "k8s"
OVERLAYS = ("cpu", "gpu")
COMPONENTS = ("servicemonitor", "prometheusrule", "keda", "model-pvc")


# --------------------------------------------------------------------------------------------------------------
# Tools


def find_tool(name: str) -> str | None:
    """A command from this interpreter's environment (pip-installed tools) or else from PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    return shutil.which(name)


def require_tool(name: str, install: str) -> str:
    """A validator the dev extra installs: missing means a broken environment, so fail, do not skip."""
    path = find_tool(name)
    if path is None:
        pytest.fail(f"{name} not found: {install}")
    return path


def system_tool(name: str, install: str) -> str:
    """A system binary (Debian package) the tests use when present and skip, saying why, when not."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed ({install}); the tests that need it are skipped")
    return path


# --------------------------------------------------------------------------------------------------------------
# Dockerfile


@dataclass
class Instruction:
    keyword: str  # upper case: FROM, RUN, CMD ...
    value: str  # the rest of the logical line, continuations joined
    line: int  # 1-based line where it starts
    flags: dict[str, str] = field(default_factory=dict)  # --from=..., --interval=... (leading flags only)

    def exec_form(self) -> list[str] | None:
        """The JSON-array (exec form) argument list, or None for shell form."""
        text = self.body().strip()
        if not text.startswith("["):
            return None
        parsed = json.loads(text)
        if not (isinstance(parsed, list) and all(isinstance(x, str) for x in parsed)):
            return None
        return parsed

    def body(self) -> str:
        """The value without leading --flags."""
        rest = self.value.lstrip()
        while rest.startswith("--"):
            _, _, rest = rest.partition(" ")
            rest = rest.lstrip()
        return rest


@dataclass
class Stage:
    name: str | None
    base: str
    instructions: list[Instruction]

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None

    def env(self) -> dict[str, str]:
        """ENV key=value pairs of this stage, in order (the `ENV key value` legacy form is not used here)."""
        out: dict[str, str] = {}
        for ins in self.all("ENV"):
            for token in shlex.split(ins.value):
                key, sep, value = token.partition("=")
                if not sep:
                    raise ValueError(f"line {ins.line}: use ENV key=value, got {token!r}")
                out[key] = value
        return out


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"no stage named {name!r}; stages: {[s.name for s in self.stages]}")

    def base_image(self, stage: Stage) -> str:
        """The stage's FROM image with global ARG defaults substituted."""
        return substitute(stage.base, self.global_args)


def substitute(text: str, args: Mapping[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), text)


def logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, logical line) with comments and blank lines dropped and `\\` continuations joined."""
    buffer: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not buffer):
            continue  # comments may sit inside continued instructions too
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer.append(stripped[:-1].strip())
            continue
        buffer.append(stripped)
        yield start, " ".join(part for part in buffer if part)
        buffer = []
    if buffer:
        yield start, " ".join(buffer)


def parse_dockerfile(path: Path) -> Dockerfile:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for number, line in logical_lines(path.read_text(encoding="utf-8")):
        keyword, _, value = line.partition(" ")
        keyword = keyword.upper()
        flags = {}
        for token in value.split():
            if not token.startswith("--"):
                break
            key, _, flag_value = token[2:].partition("=")
            flags[key] = flag_value
        instruction = Instruction(keyword, value.strip(), number, flags)
        if keyword == "FROM":
            parts = value.split()
            parts = [p for p in parts if not p.startswith("--")]
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(name, parts[0], [instruction]))
        elif not stages:
            if keyword == "ARG":
                key, _, default = value.partition("=")
                global_args[key.strip()] = default.strip()
        else:
            stages[-1].instructions.append(instruction)
    return Dockerfile(global_args, stages)


def image_settings(stage: Stage) -> dict[str, str]:
    """The BERTSERVE_* settings the image sets (ENV): the image passes no flags, so these are its configuration."""
    return {k: v for k, v in stage.env().items() if k.startswith("BERTSERVE_")}


def image_argv(stage: Stage) -> list[str]:
    """What `docker run IMAGE` executes: exec-form ENTRYPOINT + exec-form CMD of the stage."""
    entrypoint = stage.last("ENTRYPOINT")
    cmd = stage.last("CMD")
    out: list[str] = []
    for ins in (entrypoint, cmd):
        if ins is None:
            continue
        form = ins.exec_form()
        if form is None:
            raise AssertionError(f"line {ins.line}: {ins.keyword} must be exec form (a JSON array)")
        out += form
    return out


# --------------------------------------------------------------------------------------------------------------
# .dockerignore, with the semantics of moby/patternmatcher (what `docker build` uses)


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "*":
            if pattern[i : i + 2] == "**":
                i += 2
                if pattern[i : i + 1] == "/":  # "**/" matches zero or more directories
                    i += 1
                    out += "(?:.*/)?"
                else:
                    out += ".*"
                continue
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "[":
            end = pattern.find("]", i)
            out += pattern[i : end + 1] if end > i else re.escape(c)
            i = end if end > i else i
        elif c == "\\" and i + 1 < len(pattern):
            i += 1
            out += re.escape(pattern[i])
        else:
            out += re.escape(c)
        i += 1
    return re.compile(out + r"\Z")


@dataclass
class DockerIgnore:
    patterns: list[tuple[bool, re.Pattern[str], str]]  # (negated, regex, source text)

    @classmethod
    def load(cls, path: Path) -> DockerIgnore:
        patterns = []
        for raw in path.read_text(encoding="utf-8").splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            negated = line.startswith("!")
            text = line[1:].strip() if negated else line
            text = os.path.normpath(text).lstrip("/")
            if text == ".":
                continue
            patterns.append((negated, _pattern_regex(text), line))
        return cls(patterns)

    def excluded(self, relpath: str) -> bool:
        """Whether `docker build` leaves this file (path relative to the context, `/`-separated) out."""
        parts = relpath.split("/")
        parents = ["/".join(parts[: i + 1]) for i in range(len(parts) - 1)]
        result = False
        for negated, regex, _ in self.patterns:
            if regex.match(relpath) or any(regex.match(p) for p in parents):
                result = not negated
        return result


# --------------------------------------------------------------------------------------------------------------
# kustomize


def kustomize(directory: Path) -> list[dict[str, Any]]:
    proc = subprocess.run(
        ["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=120, check=False
    )
    if proc.returncode != 0:
        raise AssertionError(f"kubectl kustomize {directory} failed:\n{proc.stderr}")
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def find(objects: Sequence[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objects: Sequence[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = find(objects, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


# --------------------------------------------------------------------------------------------------------------
# PromQL: the metric names an expression reads

_PROMQL_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
    "atan2",
    "start",
    "end",
}
_DURATION = re.compile(r"\[[^\]]*\]")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w:.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?")


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (functions, aggregations, keywords and label names left out)."""
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = _DURATION.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    names = set()
    for match in _IDENT.finditer(text):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in _PROMQL_KEYWORDS:
            continue
        names.add(name)
    return names


_SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}")
_MATCHER = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*("(?:[^"\\]|\\.)*")\s*,?')


def selectors(expr: str) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """(metric, [(label, op, quoted value)]) for every `metric{...}` vector selector in an expression."""
    out = []
    for match in _SELECTOR.finditer(expr):
        body = match.group(2)
        matchers = [(m.group(1), m.group(2), m.group(3)) for m in _MATCHER.finditer(body)]
        out.append((match.group(1), matchers))
    return out


def exposition_names(text: str) -> set[str]:
    """Sample names in a Prometheus text exposition (`x_bucket`, `x_sum`, `x_count` for histograms)."""
    names = set()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names


# --------------------------------------------------------------------------------------------------------------
# What Grafana and Prometheus are given to evaluate


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every dashboard target, and the selector of every template variable."""
    dashboard = json.loads((DEPLOY / "grafana/dashboards/bertserve.json").read_text(encoding="utf-8"))
    out = [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p["targets"]]
    for variable in dashboard["templating"]["list"]:
        # label_values(SELECTOR, LABEL) is Grafana's; its selector is PromQL.
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["query"]["query"])
        assert match, variable["query"]
        out.append((f"variable {variable['name']}", match.group(1)))
    return out


def grafana_to_promql(expr: str, rate_interval: str) -> str:
    """A panel's expression as Grafana sends it: its built-in variables filled in, dashboard variables (job,
    instance) matching every value. Grafana's $__rate_interval is max(4 x scrape interval, $__interval + scrape)."""
    for name, value in {"$__rate_interval": rate_interval, "$__interval": "5s", "$__range": "5m"}.items():
        expr = expr.replace(name, value)
    return re.sub(r"\$\w+", ".*", expr)


def rule_exprs() -> list[tuple[str, str]]:
    """(alert or record name, PromQL) of every rule in deploy/rules."""
    out = []
    for path in sorted((DEPLOY / "rules").glob("*.yml")):
        for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]:
            out += [(rule.get("alert") or rule["record"], rule["expr"]) for rule in group["rules"]]
    return out


TEXTS = ["a great film, I loved it", "the hotel was terrible", "it was okay I guess", "fine", "x " * 40]


def send_traffic(url: str, headers: Mapping[str, str] | None = None) -> None:
    """Bounded traffic: single and batched predicts, some concurrent (so batches form), one v2 infer, and refused
    requests (a malformed body, too many inputs) so that error series exist too."""
    with httpx.Client(base_url=url, timeout=30.0, headers=dict(headers or {})) as client:
        for text in TEXTS:
            assert client.post("/v1/predict", json={"inputs": text}).status_code == 200
        assert client.post("/v1/predict", json={"inputs": TEXTS}).status_code == 200
        with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
            codes = list(pool.map(lambda t: client.post("/v1/predict", json={"inputs": t}).status_code, TEXTS * 4))
        assert codes == [200] * len(codes)
        name = client.get("/v1/models").json()["name"]
        v2 = {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": TEXTS[:2]}]}
        assert client.post(f"/v2/models/{name}/infer", json=v2).status_code == 200
        assert client.post("/v1/predict", json={"inputs": 42}).status_code == 422
        assert client.post("/v1/predict", json={"inputs": ["x"] * 10_000}).status_code == 413


# --------------------------------------------------------------------------------------------------------------
# A real server


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def logs(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")[-6000:]

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (the drain path), then SIGKILL if it has not exited within `timeout`."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        return int(self.process.returncode)


def start_server(
    argv: Sequence[str],
    port: int,
    log: Path,
    env: Mapping[str, str] | None = None,
    timeout: float = 120.0,
    cwd: Path = REPO,
    inherit: bool = True,
) -> Server:
    """Start `argv` (a `python -m service ...` command line) in `cwd` and wait until GET /readyz answers 200.

    `env` is added to this process's environment, or is the whole environment when `inherit` is false."""
    full_env = {**(os.environ if inherit else {}), **(env or {})}
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    handle = log.open("wb")
    process = subprocess.Popen(list(argv), cwd=cwd, env=full_env, stdout=handle, stderr=subprocess.STDOUT)
    handle.close()
    server = Server(process, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise AssertionError(f"server exited with {process.returncode}:\n{server.logs()}")
            with contextlib.suppress(httpx.HTTPError):
                if client.get(f"{server.url}/readyz").status_code == 200:
                    return server
            time.sleep(0.2)
    server.stop(timeout=5)
    raise AssertionError(f"server not ready within {timeout:.0f} s:\n{server.logs()}")
