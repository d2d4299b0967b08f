#!/usr/bin/env bash
# Dependency vulnerability audit of the installed environment (.venv) with pip-audit.
#
#   scripts/audit.sh [REPORT_DIR]        default REPORT_DIR: build/audit
#
# Writes REPORT_DIR/pip-audit.json (pip-audit's raw JSON), REPORT_DIR/pip-audit.log (its stderr) and
# REPORT_DIR/report.md (what was audited, every vulnerability found, accepted or not, and what was skipped).
#
# Exit status:
#   1  a vulnerability was found that docs/SECURITY.md does not accept (table "Accepted vulnerabilities":
#      id, package, a reason, and a review-by date that has not passed);
#   0  otherwise. Also 0 when the vulnerability service cannot be reached or answers for none of the packages
#      (an offline runner, or a PyPI mirror without the JSON API): the script then says so loudly, on stderr and
#      in the report, instead of failing the build or, worse, printing "No known vulnerabilities found".
#
# Environment: PYTHON (default .venv/bin/python), PIP_AUDIT_ARGS (extra pip-audit flags, e.g. "-s osv"),
# AUDIT_TIMEOUT_S (whole-run limit, default 600); AUDIT_JSON=FILE judges an existing pip-audit JSON report instead
# of running pip-audit, and SECURITY_MD=FILE reads the accepted list from another file (both for checking this
# script itself).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${1:-build/audit}
mkdir -p "$OUT"
rm -f "$OUT/pip-audit.json"

if [ -n "${AUDIT_JSON:-}" ]; then
  cp "$AUDIT_JSON" "$OUT/pip-audit.json" && : >"$OUT/pip-audit.log"
  PIP_AUDIT_RC=0
else
  # shellcheck disable=SC2086  # PIP_AUDIT_ARGS is a list of flags
  timeout "${AUDIT_TIMEOUT_S:-600}" "$PY" -m pip_audit --skip-editable --progress-spinner off --timeout 15 \
    --desc off --aliases on --format json --output "$OUT/pip-audit.json" ${PIP_AUDIT_ARGS:-} \
    2>"$OUT/pip-audit.log"
  PIP_AUDIT_RC=$?
fi

PIP_AUDIT_RC=$PIP_AUDIT_RC OUT=$OUT SECURITY_MD=${SECURITY_MD:-docs/SECURITY.md} "$PY" - <<'PYEOF'
"""Judge pip-audit's findings against the accepted list in docs/SECURITY.md and write the report."""
import datetime
import json
import os
import re
import sys
from pathlib import Path

out = Path(os.environ["OUT"])
rc = int(os.environ["PIP_AUDIT_RC"])
raw = out / "pip-audit.json"
log = (out / "pip-audit.log").read_text(errors="replace") if (out / "pip-audit.log").exists() else ""
report: list[str] = ["# Dependency audit (pip-audit)", "", f"Generated {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC.", ""]


def finish(lines: list[str], status: int, headline: str) -> None:
    report.extend([f"**{headline}**", "", *lines])
    (out / "report.md").write_text("\n".join(report) + "\n", encoding="utf-8")
    print(f"audit: {headline} (report: {out / 'report.md'})", file=sys.stderr)
    sys.exit(status)


def unavailable(why: str) -> None:
    tail = "\n".join(log.strip().splitlines()[-5:])
    finish(["pip-audit's own last words (its \"no known vulnerabilities\" means nothing here):", "", "```", tail,
            "```"] if tail else [], 0,
           f"WARNING: audit NOT performed: {why}. This is not a pass; run it where the service is reachable")


if rc == 124:
    unavailable("pip-audit ran past AUDIT_TIMEOUT_S")
if not raw.exists() or not raw.read_text().strip():
    unreachable = re.search(r"ConnectionError|NameResolution|Max retries|timed out|Temporary failure", log)
    unavailable("the vulnerability service could not be reached" if unreachable else f"pip-audit failed (exit {rc})")

data = json.loads(raw.read_text())
deps = data.get("dependencies", [])
skipped = [d for d in deps if "skip_reason" in d]
editable = [d for d in skipped if "editable" in d["skip_reason"]]
not_found = [d for d in skipped if d not in editable]
audited = [d for d in deps if "skip_reason" not in d]
report += [f"Packages: {len(deps)} installed, {len(audited)} audited, {len(editable)} editable (this project, "
           f"skipped), {len(not_found)} not answered by the service.", ""]
if not audited:
    unavailable(f"the vulnerability service answered for none of the {len(not_found)} packages "
                "(offline, or a PyPI mirror without the per-release JSON API)")

# Accepted vulnerabilities: rows of the table under "## Accepted vulnerabilities" in docs/SECURITY.md:
# | ID | package | reason | review by (YYYY-MM-DD) |
accepted: dict[str, tuple[str, str, str]] = {}
security = Path(os.environ["SECURITY_MD"])
section = ""
if security.exists():
    text = security.read_text(encoding="utf-8")
    match = re.search(r"^## Accepted vulnerabilities\s*$(.*?)(?=^## |\Z)", text, re.M | re.S)
    section = match.group(1) if match else ""
today = datetime.date.today()
for line in section.splitlines():
    cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
    if len(cells) < 4 or not re.match(r"^(PYSEC|GHSA|CVE|OSV)-", cells[0]):
        continue
    vid, package, reason, review = cells[:4]
    try:
        current = datetime.date.fromisoformat(review) >= today
    except ValueError:
        current = False
    if reason and current:
        accepted[vid.upper()] = (package.lower(), reason, review)

rows, blocking = [], 0
for dep in audited:
    for vuln in dep.get("vulns", []):
        ids = [vuln["id"], *vuln.get("aliases", [])]
        hit = next((accepted[i.upper()] for i in ids if i.upper() in accepted), None)
        ok = hit is not None and hit[0] in (dep["name"].lower(), "*")
        blocking += not ok
        fixes = ", ".join(vuln.get("fix_versions", [])) or "none"
        verdict = f"accepted until {hit[2]}: {hit[1]}" if ok else "NOT ACCEPTED"
        rows.append(f"| {vuln['id']} | {dep['name']} {dep['version']} | {fixes} | {' '.join(vuln.get('aliases', []))} | {verdict} |")
lines = []
if rows:
    lines += ["| ID | package | fixed in | aliases | verdict |", "| --- | --- | --- | --- | --- |", *rows, ""]
if not_found:
    lines += ["Not audited (the service had no answer): " + ", ".join(f"{d['name']} {d.get('version', '')}".strip()
                                                                   for d in not_found), ""]
if blocking:
    finish(lines, 1, f"FAIL: {blocking} vulnerabilit{'y' if blocking == 1 else 'ies'} not accepted in docs/SECURITY.md "
                     "(upgrade or pin around it, or accept it there with a reason and a review-by date)")
finish(lines, 0, f"OK: {len(audited)} packages audited, {len(rows)} known vulnerabilit{'y' if len(rows) == 1 else 'ies'}"
                 f", all accepted" if rows else f"OK: {len(audited)} packages audited, no known vulnerabilities")
PYEOF
