"""A small client for the service's HTTP API (what the CLI, the demo and tests use).

Public API: :class:`CloudClient`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx

from .errors import AuthError, CloudError, ServerUnreachableError

__all__ = ["CloudClient", "DEFAULT_URL", "default_token", "default_ca", "CA_ENV"]

DEFAULT_URL = "https://127.0.0.1:8800"
CA_ENV = "LEPTON_CLOUD_CA"
_MAX_RESPONSE = 32 << 20


def default_token(state_dir: Path = Path("lepton-cloud")) -> str | None:
    """``LEPTON_CLOUD_TOKEN``, else the token file a local ``cloud serve`` wrote."""
    if os.environ.get("LEPTON_CLOUD_TOKEN"):
        return os.environ["LEPTON_CLOUD_TOKEN"]
    f = state_dir / "token"
    try:
        return f.read_text().strip() if f.stat().st_size < 1024 else None
    except OSError:
        return None


def default_ca(state_dir: Path = Path("lepton-cloud")) -> str | None:
    """``LEPTON_CLOUD_CA``, else the CA a local ``cloud serve`` made in ``lepton-cloud/tls/ca.pem``, else None (system CAs)."""
    if os.environ.get(CA_ENV):
        return os.environ[CA_ENV]
    ca = state_dir / "tls" / "ca.pem"
    return str(ca) if ca.is_file() else None


def _is_loopback(url: str) -> bool:
    """Plain HTTP to this host never crosses a wire (development servers started with --insecure-plaintext)."""
    from urllib.parse import urlsplit

    return (urlsplit(url).hostname or "") in ("127.0.0.1", "localhost", "::1")


class CloudClient:
    """The API over HTTPS, verifying the server against ``ca`` (a CA file; default :func:`default_ca`)."""

    def __init__(self, url: str = DEFAULT_URL, token: str | None = None, *, timeout: float = 30.0,
                 ca: str | Path | None = None) -> None:
        import ssl

        self.url = url.rstrip("/")
        ca = ca or default_ca()
        try:
            verify: Any = ssl.create_default_context(cafile=str(ca)) if ca else True
        except (OSError, ssl.SSLError) as e:
            raise CloudError(f"cannot read the CA file {ca}: {e}", hint=f"pass --ca or {CA_ENV} with the service's ca.pem") from None
        self._http = httpx.Client(base_url=self.url, timeout=timeout, verify=verify,
                                  headers={"Authorization": f"Bearer {token}"} if token else {})

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "CloudClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kw: Any) -> Any:
        try:
            r = self._http.request(method, path, **kw)
        except httpx.TimeoutException:
            raise ServerUnreachableError(f"{self.url} did not answer in time") from None
        except httpx.ConnectError as e:
            if "CERTIFICATE_VERIFY_FAILED" in str(e):
                raise ServerUnreachableError(f"{self.url} presented a certificate this client does not trust: {e}",
                                             hint=f"pass --ca (or {CA_ENV}) with the service's STATE_DIR/tls/ca.pem") from None
            raise ServerUnreachableError(f"cannot reach the cloud service at {self.url}: {e}",
                                         hint="start it with `lepton-edge cloud serve`, or pass --server / LEPTON_CLOUD_URL") from None
        except httpx.TransportError as e:
            raise ServerUnreachableError(f"cannot reach the cloud service at {self.url}: {e}",
                                         hint="start it with `lepton-edge cloud serve`, or pass --server / LEPTON_CLOUD_URL") from None
        if len(r.content) > _MAX_RESPONSE:
            raise CloudError(f"{self.url} sent an oversized response")
        try:
            body = r.json()
        except ValueError:
            body = None
        if r.status_code >= 400:
            msg = body.get("error") if isinstance(body, dict) else None
            hint = body.get("hint") if isinstance(body, dict) else None
            err = AuthError if r.status_code == 401 else CloudError
            raise err(msg or f"{method} {path} failed with HTTP {r.status_code}", hint=hint)
        return body

    # ------------------------------------------------------------------ typed helpers
    def health(self) -> dict[str, Any]:
        return self.request("GET", "/v1/health")

    def metrics(self) -> dict[str, Any]:
        return self.request("GET", "/v1/metrics")

    def push(self, archive: Path) -> dict[str, Any]:
        with open(archive, "rb") as f:
            return self.request("POST", "/v1/models", content=f, headers={"Content-Type": "application/octet-stream"})

    def models(self) -> list[dict[str, Any]]:
        return self.request("GET", "/v1/models")

    def enroll(self, device_id: str, profile: str, *, fleet: str = "default", tags: dict[str, str] | None = None,
               telemetry_interval_s: float = 10.0, allow_plaintext: bool = False) -> dict[str, Any]:
        """Enrol a device; its answer holds the device's password, so it is refused over plain HTTP unless allowed."""
        if not self.url.startswith("https://") and not allow_plaintext and not _is_loopback(self.url):
            raise CloudError(f"refusing to enrol over plain HTTP ({self.url}): the answer carries the device's password",
                             hint="use the service's https:// URL (pass --insecure-plaintext only for a development server)")
        return self.request("POST", "/v1/devices", json={"device_id": device_id, "profile": profile, "fleet": fleet,
                                                         "tags": tags or {}, "telemetry_interval_s": telemetry_interval_s})

    def enroll_many(self, device_ids: list[str], profile: str, *, fleet: str = "default", tags: dict[str, str] | None = None,
                    telemetry_interval_s: float = 10.0, allow_plaintext: bool = False) -> list[dict[str, Any]]:
        """Enrol up to 1,000 devices in one request (one broker auth rewrite); each answer as :meth:`enroll`'s."""
        if not self.url.startswith("https://") and not allow_plaintext and not _is_loopback(self.url):
            raise CloudError(f"refusing to enrol over plain HTTP ({self.url}): the answer carries the devices' passwords",
                             hint="use the service's https:// URL (pass --insecure-plaintext only for a development server)")
        return self.request("POST", "/v1/devices/bulk", json={"device_ids": list(device_ids), "profile": profile, "fleet": fleet,
                                                              "tags": tags or {}, "telemetry_interval_s": telemetry_interval_s})["devices"]

    def devices(self, include_revoked: bool = False, *, limit: int | None = None, after: str | None = None) -> list[dict[str, Any]]:
        """Every device, or one page of ``limit`` after the device id ``after``."""
        params: dict[str, Any] = {"include_revoked": include_revoked}
        if limit is not None:
            params["limit"] = limit
        if after is not None:
            params["after"] = after
        return self.request("GET", "/v1/devices", params=params)

    def device(self, device_id: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/devices/{device_id}")

    def revoke(self, device_id: str) -> dict[str, Any]:
        return self.request("POST", f"/v1/devices/{device_id}/revoke")

    def deploy(self, model: str, version: str, to: list[str], **policy: Any) -> dict[str, Any]:
        return self.request("POST", "/v1/deployments", json={"model": model, "version": version, "to": to, **policy})

    def request_capture(self, device_id: str, max_bytes: int = 16 << 20) -> dict[str, Any]:
        return self.request("POST", f"/v1/devices/{device_id}/capture", params={"max_bytes": max_bytes})

    def request_benchmark(self, device_id: str, archive: Path, *, model: str, candidate: str, runs: int = 50,
                          threads: int = 0, timeout_s: float = 120.0) -> dict[str, Any]:
        """Upload a candidate bundle as a benchmark artifact and have ``device_id`` measure it."""
        with open(archive, "rb") as f:
            return self.request("POST", "/v1/benchmarks", content=f, headers={"Content-Type": "application/octet-stream"},
                                params={"device_id": device_id, "model": model, "candidate": candidate, "runs": runs,
                                        "threads": threads, "timeout_s": timeout_s})

    def benchmark(self, benchmark_id: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/benchmarks/{benchmark_id}")

    def capture(self, capture_id: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/captures/{capture_id}")

    def download_capture(self, capture_id: str, dest: Path) -> int:
        """Stream the uploaded capture into ``dest``; returns its size."""
        self.capture(capture_id)  # a clear error for an unknown or not-yet-uploaded capture comes from here
        size = 0
        with self._http.stream("GET", f"/v1/captures/{capture_id}/download") as r:
            if r.status_code >= 400:
                raise CloudError(f"downloading capture {capture_id} failed with HTTP {r.status_code}")
            with open(dest, "wb") as f:
                for chunk in r.iter_bytes():
                    f.write(chunk)
                    size += len(chunk)
        return size

    def deployments(self) -> list[dict[str, Any]]:
        return self.request("GET", "/v1/deployments")

    def deployment(self, dep_id: str, *, devices_limit: int | None = None, devices_offset: int = 0) -> dict[str, Any]:
        """A deployment with its waves; every per-device row, or one page of ``devices_limit`` (0: none)."""
        params = {} if devices_limit is None else {"devices_limit": devices_limit, "devices_offset": devices_offset}
        return self.request("GET", f"/v1/deployments/{dep_id}", params=params)

    def steer(self, dep_id: str, action: str) -> dict[str, Any]:
        return self.request("POST", f"/v1/deployments/{dep_id}/{action}")
