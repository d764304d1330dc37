"""An Airflow notifier that POSTs a JSON message to a webhook named by an ``http`` Connection.

Point it at a chat (a Slack or Microsoft Teams incoming webhook: both take ``{"text": ...}``) or at an
e-mail/SMS gateway that accepts a JSON POST. The Connection holds the whole address: host with scheme (or
``schema`` as the scheme), optional port, and the webhook path in ``extra`` ``{"path": "/services/..."}``
or in the host itself; its password, if set, goes as ``Authorization: Bearer``. The URL is never logged
(webhook URLs are credentials).

Use it as any notifier (``on_failure_callback=WebhookNotifier(http_conn_id="ops_webhook")``); the wildfire
DAGs call it from :func:`wildfire.airflow.callbacks.record_failure` when the Variable
``wildfire_failure_notify_conn_id`` names a Connection.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseHook
from airflow.sdk.bases.notifier import BaseNotifier


class WebhookError(RuntimeError):
    retriable = True


class WebhookNotifier(BaseNotifier):
    template_fields: Sequence[str] = ("text",)

    def __init__(self, *, http_conn_id: str, text: str | None = None, timeout_s: float = 10.0) -> None:
        super().__init__()
        self.http_conn_id = http_conn_id
        self.text = text
        self.timeout_s = timeout_s

    def _url_and_headers(self) -> tuple[str, dict[str, str]]:
        conn = BaseHook.get_connection(self.http_conn_id)
        host = (conn.host or "").rstrip("/")
        if not host:
            raise ValueError(f"Connection {self.http_conn_id!r} has no host: put the webhook URL in its host field")
        if "://" not in host:
            host = f"{conn.schema or 'https'}://{host}"
        if conn.port:
            host = f"{host}:{conn.port}"
        path = str((conn.extra_dejson or {}).get("path") or "")
        url = host + (path if not path or path.startswith("/") else "/" + path)
        headers = {"Content-Type": "application/json"}
        if conn.password:
            headers["Authorization"] = f"Bearer {conn.password}"
        return url, headers

    def post(self, text: str, detail: dict[str, Any] | None = None) -> None:
        import httpx

        url, headers = self._url_and_headers()
        body = {"text": text, **({"detail": detail} if detail else {})}
        try:
            resp = httpx.post(url, json=body, headers=headers, timeout=self.timeout_s)
        except httpx.HTTPError as exc:
            raise WebhookError(f"webhook of Connection {self.http_conn_id!r} unreachable: "
                               f"{type(exc).__name__}") from None
        if resp.status_code >= 300:
            raise WebhookError(f"webhook of Connection {self.http_conn_id!r} answered HTTP {resp.status_code}")

    def send(self, failure: dict[str, Any]) -> None:
        """POST one recorded task failure (a ``task_failures`` row)."""
        text = self.text or (f"wildfire: task {failure['dag_id']}.{failure['task_id']} failed "
                             f"(run {failure['run_id']}, try {failure.get('try_number')}): {failure['exception']}")
        detail = {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in failure.items()}
        self.post(text, detail)

    def notify(self, context: Any) -> None:
        from wildfire.airflow.callbacks import failure_row

        self.send(failure_row(context))
