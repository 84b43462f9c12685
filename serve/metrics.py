"""Request counts for /metrics, in TGI's metric names where TGI has one."""

from __future__ import annotations

import threading
from collections import Counter


class Metrics:
    """Responses by status, and tokens generated."""

    def __init__(self):
        self._lock = threading.Lock()
        self._statuses: Counter = Counter()
        self._generated_tokens = 0

    def count(self, status: int, generated_tokens: int = 0) -> None:
        with self._lock:
            self._statuses[status] += 1
            self._generated_tokens += generated_tokens

    def text(self) -> str:
        with self._lock:
            statuses, tokens = dict(self._statuses), self._generated_tokens
        success = sum(n for status, n in statuses.items() if status < 400)
        lines = ["# TYPE tgi_request_count counter", f"tgi_request_count {sum(statuses.values())}",
                 "# TYPE tgi_request_success counter", f"tgi_request_success {success}",
                 "# TYPE tgi_request_failure counter", f"tgi_request_failure {sum(statuses.values()) - success}",
                 "# TYPE tgi_request_generated_tokens_total counter", f"tgi_request_generated_tokens_total {tokens}",
                 "# TYPE llm_twin_responses_total counter"]
        lines += [f'llm_twin_responses_total{{status="{status}"}} {n}' for status, n in sorted(statuses.items())]
        return "\n".join(lines) + "\n"
