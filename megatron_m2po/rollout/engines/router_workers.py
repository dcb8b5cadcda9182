"""sglang-router 0.3.2's worker API: which servers the router routes to, and adding or removing one at run time.

A supervised server that died or hung is taken out of the router at once, and put back only when it holds the
weights the others serve, so the router never sends generation to a server with start-up weights. Routes and
bodies of the pinned router (its handlers and request fields checked in its binary by
tests/test_sglang_contract.py; the calls run against it in tests/test_engine_supervisor.py):

- `GET /workers` -> 200 `{"workers": [{"id": "<uuid>", "url", "is_healthy", ...}], "total", "stats"}`
- `POST /workers` `{"url", "api_key"?}` -> 202 `{"status": "accepted", "worker_id", "url", "location",
  "message"}`; the worker is added by a background job (health checked first), so it is listed a moment later.
  A body without `url` is 422; a url already listed is accepted and its job fails ("already exists").
- `DELETE /workers/{id}` -> 202 `{"status": "accepted", "worker_id", "message"}` (also a background job);
  the id is the router's uuid, never the url (400 "expected UUID"); an unknown id is 404 `WORKER_NOT_FOUND`.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any


class RouterError(RuntimeError):
    """The router refused a worker call or did not answer."""


class RouterWorkers:
    """The worker list of one sglang-router; `api_key` is sent as `Authorization: Bearer` when given, and
    `worker_api_key` is the key the router itself uses for calls to a worker it adds."""

    def __init__(
        self, router_url: str, *, api_key: str | None = None, worker_api_key: str | None = None, timeout=10.0
    ):
        self.url = router_url.rstrip("/")
        self.api_key, self.worker_api_key, self.timeout = api_key, worker_api_key, timeout

    def _call(self, method: str, path: str, body: dict | None = None) -> tuple[int, Any]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{self.url}{path}", data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as r:
                status, text = r.status, r.read().decode(errors="replace")
        except urllib.error.HTTPError as e:
            status, text = e.code, e.read().decode(errors="replace")
        except OSError as e:
            raise RouterError(f"{method} {self.url}{path}: {type(e).__name__}: {e}") from e
        try:
            return status, json.loads(text) if text.strip() else {}
        except ValueError:
            return status, text

    def workers(self) -> dict[str, dict[str, Any]]:
        """The router's workers by url (its records: `id`, `is_healthy`, ...)."""
        status, body = self._call("GET", "/workers")
        if status != 200 or not isinstance(body, dict) or not isinstance(body.get("workers"), list):
            raise RouterError(f"GET {self.url}/workers: HTTP {status}: {str(body)[:300]}")
        return {w["url"].rstrip("/"): w for w in body["workers"] if isinstance(w, dict) and "url" in w}

    def add(self, worker_url: str) -> str:
        """Queue the worker's addition; returns the router's id for it."""
        body: dict[str, Any] = {"url": worker_url.rstrip("/")}
        if self.worker_api_key:
            body["api_key"] = self.worker_api_key
        status, reply = self._call("POST", "/workers", body)
        if status != 202 or not isinstance(reply, dict) or "worker_id" not in reply:
            raise RouterError(f"POST {self.url}/workers {worker_url}: HTTP {status}: {str(reply)[:300]}")
        return str(reply["worker_id"])

    def remove(self, worker_url: str) -> bool:
        """Queue the worker's removal; False if the router does not list it."""
        record = self.workers().get(worker_url.rstrip("/"))
        if record is None:
            return False
        status, reply = self._call("DELETE", f"/workers/{record['id']}")
        if status == 404:
            return False  # removed meanwhile
        if status != 202:
            raise RouterError(
                f"DELETE {self.url}/workers/{record['id']} ({worker_url}): HTTP {status}: {reply}"
            )
        return True

    def wait_listed(self, worker_url: str, listed: bool = True, timeout: float = 60.0) -> None:
        """Block until the router lists the worker as healthy (`listed`), or no longer lists it."""
        url, deadline = worker_url.rstrip("/"), time.monotonic() + timeout
        while True:
            record = self.workers().get(url)
            if (record is not None and record.get("is_healthy", True)) == listed:
                return
            if time.monotonic() > deadline:
                state = "listed and healthy" if listed else "removed"
                raise RouterError(f"{self.url}: worker {url} not {state} after {timeout}s")
            time.sleep(0.2)
