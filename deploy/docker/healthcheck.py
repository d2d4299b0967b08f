"""Container health check: exit 0 when the server's /healthz answers 200, else 1. Standard library only (no curl in
slim images).

    python healthcheck.py            # http://127.0.0.1:$BERTSERVE_PORT/healthz (8000 when unset)
    python healthcheck.py URL        # an explicit URL

The port comes from the same environment the server reads, so `-e BERTSERVE_PORT=9000` moves the server and its
health check together. When BERTSERVE_AUTH_ALL is true the service closes /healthz behind the API key too, so
the key (BERTSERVE_API_KEY, or the file BERTSERVE_API_KEY_FILE names) is sent as `Authorization: Bearer <key>`.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

_TRUE = {"1", "true", "yes", "on"}


def default_url() -> str:
    port = os.environ.get("BERTSERVE_PORT", "").strip() or "8000"
    return f"http://127.0.0.1:{port}/healthz"


def api_key() -> str | None:
    key = os.environ.get("BERTSERVE_API_KEY")
    path = os.environ.get("BERTSERVE_API_KEY_FILE")
    if not key and path:
        try:
            key = Path(path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            print(f"healthcheck: cannot read {path}: {exc}", file=sys.stderr)
    return key or None


def check(url: str, timeout: float = 3.0) -> bool:
    request = urllib.request.Request(url, method="GET")
    key = api_key()
    if key and os.environ.get("BERTSERVE_AUTH_ALL", "").strip().lower() in _TRUE:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError) as exc:
        print(f"healthcheck: {url}: {exc}", file=sys.stderr)
        return False


def main(argv: list[str]) -> int:
    url = argv[1] if len(argv) > 1 else default_url()
    return 0 if check(url) else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
