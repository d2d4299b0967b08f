"""Container health check: exit 0 when GET URL answers 200, else 1. Standard library only (no curl in slim images).

    python healthcheck.py http://127.0.0.1:8000/healthz

When BERTSERVE_AUTH_ALL is true the service closes /healthz behind the API key too, so the key from
BERTSERVE_API_KEY is sent as `Authorization: Bearer <key>` when both are set.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

_TRUE = {"1", "true", "yes", "on"}


def check(url: str, timeout: float = 3.0) -> bool:
    request = urllib.request.Request(url, method="GET")
    key = os.environ.get("BERTSERVE_API_KEY")
    if key and os.environ.get("BERTSERVE_AUTH_ALL", "").strip().lower() in _TRUE:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError) as exc:
        print(f"healthcheck: {url}: {exc}", file=sys.stderr)
        return False


def main(argv: list[str]) -> int:
    url = argv[1] if len(argv) > 1 else "http://127.0.0.1:8000/healthz"
    return 0 if check(url) else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
