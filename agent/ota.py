"""Over-the-air commands on the device: deploy, rollback, ping.

:meth:`OtaHandler.handle` is called on the MQTT thread and only queues the command; one
worker thread carries commands out in order:

* **deploy**: download the ``.lepton`` archive over HTTP(S) into ``state_dir/downloads``,
  resuming a partial file with ``Range`` (after a dropped connection, and after an agent
  restart), never reading more than ``min(cmd.size, config.download_max_bytes)``, with
  connect/read timeouts and an overall deadline; check its sha256 against the command;
  then hand it to the service's safe activation, which verifies the signature and the
  golden vectors and emits the activation events.
* **rollback**: the service's rollback. A rollback of a model first supersedes every deploy
  of that model queued or downloading before it: the download stops at its next chunk
  (not after the whole bundle), the deploy ends ``activation_failed`` naming the rollback,
  and the rollback then finds the device on the version it asks for. Otherwise a rolled-back
  deployment would still download, and briefly activate, the release it rolled back.
* **ping**: answered with a ``command_received`` event carrying ``pong``.
* **deploy with** ``shadow``: downloaded and verified the same way, then handed to the
  service's shadow install (loaded beside the active version, never served); a later plain
  deploy of the same version activates it, a rollback of the model drops it.

Each step is reported as an :class:`~lepton_edge.protocol.EventMessage` through the link.
Commands are idempotent by ``cmd_id``: the outcome is remembered on disk, and a repeat
of a finished command re-reports its result without applying it again. A transient
download failure (network, timeout, 5xx) is not final: a repeat resumes the download.
A command interrupted by an agent crash is resumed when the agent starts again.

The handler's collaborators are typed by the Protocols of :mod:`.seams` (what it activates
through, where its events go, its settings) and by :class:`~.download.DownloaderInterface`.

Public API: :class:`OtaHandler`; :class:`HttpDownloader`, :class:`DownloadError` and
:class:`TransientDownloadError` are re-exported from :mod:`.download`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from lepton_edge.protocol import DeployCommand, EventMessage, PingCommand, RollbackCommand

from .download import DownloadError, DownloaderInterface, HttpDownloader, TransientDownloadError
from .seams import ActivationTarget, EventSink, OtaSettings

__all__ = ["OtaHandler", "HttpDownloader", "DownloadError", "TransientDownloadError", "verify_sha256"]

log = logging.getLogger(__name__)

Command = DeployCommand | RollbackCommand | PingCommand

_MAX_PENDING_COMMANDS = 32
_REMEMBERED_COMMANDS = 1000
# A command that crashed the agent this many times is given up on (no crash loop).
_MAX_RESUMES = 3
_TERMINAL_EVENTS = {"activated", "activation_failed", "rolled_back", "watchdog_rollback", "error", "shadow_started"}


class _Superseded(DownloadError):
    """A rollback of the same model arrived: this deploy must not go on."""


# ---------------------------------------------------------------------------------------------
# remembering commands


class _CommandLog:
    """One small JSON file per command id under ``state_dir/ota/commands`` (atomic writes)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def _path(self, cmd_id: str) -> Path:
        return self.root / (hashlib.sha256(cmd_id.encode()).hexdigest()[:32] + ".json")

    def get(self, cmd_id: str) -> dict[str, Any] | None:
        try:
            raw = self._path(cmd_id).read_bytes()[:256 * 1024]
            entry = json.loads(raw)
        except (OSError, ValueError):
            return None
        return entry if isinstance(entry, dict) and entry.get("cmd_id") == cmd_id else None

    def put(self, entry: dict[str, Any]) -> None:
        path = self._path(entry["cmd_id"])
        tmp = path.with_suffix(".tmp")
        try:
            with open(tmp, "w") as f:
                json.dump(entry, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            log.error("cannot remember command %s: %s (a repeat of it may be applied again)", entry["cmd_id"], e)

    def unfinished(self) -> list[dict[str, Any]]:
        out = []
        for p in sorted(self.root.glob("*.json"), key=lambda p: p.stat().st_mtime):
            try:
                entry = json.loads(p.read_bytes()[:256 * 1024])
            except (OSError, ValueError):
                continue
            if isinstance(entry, dict) and entry.get("status") == "running":
                out.append(entry)
        return out

    def prune(self, keep: int = _REMEMBERED_COMMANDS) -> None:
        files = sorted(self.root.glob("*.json"), key=lambda p: p.stat().st_mtime)
        for p in files[:-keep] if len(files) > keep else []:
            p.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# the handler


class OtaHandler:
    """Carries out cloud commands on one worker thread (see the module docstring)."""

    def __init__(self, service: ActivationTarget, link: EventSink, config: OtaSettings, *,
                 downloader: DownloaderInterface | None = None,
                 progress_every_s: float = 2.0) -> None:
        self.service = service
        self.link = link
        self.config = config
        tls = getattr(config, "tls", None)
        self.downloader = downloader or HttpDownloader(ca_file=tls.ca_file if tls else None)
        self.progress_every_s = progress_every_s
        self.downloads = Path(config.state_dir) / "downloads"
        self.downloads.mkdir(parents=True, exist_ok=True)
        self._log = _CommandLog(Path(config.state_dir) / "ota" / "commands")
        self._queue: queue.Queue[Command | None] = queue.Queue(maxsize=_MAX_PENDING_COMMANDS)
        self._pending: set[str] = set()
        self._pending_lock = threading.Lock()
        self._deploys_queued: dict[str, str] = {}  # cmd_id -> model, for deploys queued or running
        self._superseded: dict[str, str] = {}  # deploy cmd_id -> the rollback cmd_id that supersedes it
        self._terminal_seen: set[str] = set()
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        service.add_event_listener(self._on_service_event)
        self._worker = threading.Thread(target=self._run, name="ota-worker", daemon=True)
        self._worker.start()
        self._resume_interrupted()

    # -- public API ----------------------------------------------------------------------------

    def handle(self, cmd: Command) -> None:
        """Queue a command (returns at once; never raises)."""
        if self._stop.is_set():
            log.warning("OTA is shutting down; command %s is left for the cloud to send again", cmd.cmd_id)
            return
        with self._pending_lock:
            if cmd.cmd_id in self._pending:
                log.info("command %s is already queued or running; ignoring the repeat", cmd.cmd_id)
                return
            if not self._enqueue(cmd, cmd):
                self._event("error", cmd, f"too many pending commands ({_MAX_PENDING_COMMANDS}); send it again later")

    def _enqueue(self, item: Any, cmd: Command) -> bool:
        """Queue under ``_pending_lock``; a rollback supersedes the deploys of its model ahead of it."""
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            return False
        self._pending.add(cmd.cmd_id)
        self._idle.clear()
        if isinstance(cmd, DeployCommand):
            self._deploys_queued[cmd.cmd_id] = cmd.model
        elif isinstance(cmd, RollbackCommand):
            for deploy_id, model in self._deploys_queued.items():
                if model == cmd.model:
                    self._superseded.setdefault(deploy_id, cmd.cmd_id)
        return True

    def wait_idle(self, timeout: float) -> bool:
        """True once every queued command is finished (for tests and an orderly shutdown)."""
        return self._idle.wait(timeout)

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
        self._worker.join(timeout)

    # -- worker --------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            item = self._queue.get()
            if item is None:
                return
            resumed = isinstance(item, _Resumed)
            cmd = item.cmd if isinstance(item, _Resumed) else item
            try:
                self._carry_out(cmd, resumed=resumed)
            except Exception as e:  # noqa: BLE001 - a bug in one command must not stop OTA for good
                log.exception("command %s failed unexpectedly", cmd.cmd_id)
                self._event("error", cmd, f"unexpected {type(e).__name__}: {e}")
            finally:
                with self._pending_lock:
                    self._pending.discard(cmd.cmd_id)
                    self._deploys_queued.pop(cmd.cmd_id, None)
                    self._superseded.pop(cmd.cmd_id, None)
                    if not self._pending:
                        self._idle.set()

    def _carry_out(self, cmd: Command, resumed: bool = False) -> None:
        entry = self._log.get(cmd.cmd_id)
        if entry and entry.get("status") == "done":
            self._rereport(cmd, entry)
            return
        if isinstance(cmd, PingCommand):
            self._event("command_received", cmd, "pong", data={"pong": True, "sent_ts": cmd.ts})
            return
        resumes = int(entry.get("resumes", 0)) + 1 if (entry and resumed) else 0
        if resumes > _MAX_RESUMES:
            self._finish(cmd, ok=False, reason=f"gave up after the agent stopped {_MAX_RESUMES} times while running it",
                         stage="resume")
            return
        self._log.put({"cmd_id": cmd.cmd_id, "status": "running", "resumes": resumes, "ts": time.time(),
                       "command": cmd.model_dump(mode="json")})
        self._event("command_received", cmd, f"{cmd.type} {getattr(cmd, 'model', '')}".strip(),
                    data={"resumed": True} if resumed else {})
        if isinstance(cmd, RollbackCommand):
            self._rollback(cmd)
        else:
            self._deploy(cmd)

    def _deploy(self, cmd: DeployCommand) -> None:
        limit = int(self.config.download_max_bytes)
        if cmd.size > limit:
            self._finish(cmd, ok=False, stage="download",
                         reason=f"bundle is {cmd.size} bytes; this device downloads at most {limit} (download_max_bytes)")
            return
        final = self.downloads / f"{cmd.sha256}.lepton"
        part = self.downloads / f"{cmd.sha256}.lepton.part"
        self._discard_other_parts(keep=part)
        try:
            self._check_superseded(cmd)
            if final.exists():  # left by an agent that stopped before activating: checked again below
                os.replace(final, part)
            for attempt in (1, 2):
                kept = part.stat().st_size if part.exists() else 0
                self._download(cmd, part)
                try:
                    self._verify(cmd, part, final)
                    break
                except DownloadError:
                    if attempt == 2 or kept == 0:
                        raise
                    log.warning("the resumed download of %s does not verify; downloading it again whole", cmd.cmd_id)
        except TransientDownloadError as e:
            # Not final: the partial file stays, and a repeat of this command resumes it.
            self._log.put({"cmd_id": cmd.cmd_id, "status": "interrupted", "ts": time.time(),
                           "command": cmd.model_dump(mode="json")})
            self._event("activation_failed", cmd, f"download failed: {e}", data={"stage": "download", "retryable": True})
            return
        except _Superseded as e:
            part.unlink(missing_ok=True)
            final.unlink(missing_ok=True)
            self._finish(cmd, ok=False, stage="download", reason=str(e))
            return
        except DownloadError as e:
            part.unlink(missing_ok=True)
            self._finish(cmd, ok=False, stage="download", reason=f"download failed: {e}")
            return
        except OSError as e:
            self._finish(cmd, ok=False, stage="download", reason=f"cannot write {self.downloads}: {e.strerror or e}")
            return
        try:
            self._check_superseded(cmd)
            if cmd.shadow is not None:
                result = self.service.install_shadow(final, sample=cmd.shadow, cmd_id=cmd.cmd_id, deployment_id=cmd.deployment_id)
            else:
                result = self.service.activate(final, cmd_id=cmd.cmd_id, deployment_id=cmd.deployment_id)
        except _Superseded as e:
            self._finish(cmd, ok=False, stage="download", reason=str(e))
            return
        finally:
            final.unlink(missing_ok=True)
        self._finish(cmd, ok=result.ok, reason=result.reason, stage="shadow" if cmd.shadow is not None else "activate",
                     result=result)

    def _download(self, cmd: DeployCommand, part: Path) -> None:
        free = shutil.disk_usage(self.downloads).free
        have = part.stat().st_size if part.exists() else 0
        if free < cmd.size - have:
            raise DownloadError(f"{cmd.size - have} bytes needed in {self.downloads}, {free} free")
        started = False
        last_report = [time.monotonic(), 0]

        def on_attempt(offset: int) -> None:
            self._check_superseded(cmd)
            nonlocal started
            if not started:
                started = True
                self._event("download_started", cmd, f"from byte {offset}" if offset else "",
                            data={"size": cmd.size, "resume_from": offset})

        def progress(done: int, total: int) -> None:
            self._check_superseded(cmd)
            now = time.monotonic()
            tenth = done * 10 // total
            if done < total and tenth > last_report[1] and now - last_report[0] >= self.progress_every_s:
                last_report[:] = [now, tenth]
                self._event("download_progress", cmd, f"{done * 100 // total}%", data={"bytes": done, "size": total})

        t0 = time.monotonic()
        transferred = self.downloader.fetch(cmd.url, part, cmd.size, token=cmd.token, progress=progress,
                                            on_attempt=on_attempt)
        self._event("download_complete", cmd, f"{cmd.size} bytes",
                    data={"size": cmd.size, "transferred": transferred, "resumed_from": have,
                          "seconds": round(time.monotonic() - t0, 3)})

    def _check_superseded(self, cmd: DeployCommand) -> None:
        rollback_id = self._superseded.get(cmd.cmd_id)
        if rollback_id is not None:
            raise _Superseded(f"superseded by rollback command {rollback_id} before activation; not applied")

    def _verify(self, cmd: DeployCommand, part: Path, final: Path) -> None:
        digest = verify_sha256(part, cmd.sha256)
        os.replace(part, final)
        self._event("verified", cmd, "sha256 matches", data={"sha256": digest})

    def _rollback(self, cmd: RollbackCommand) -> None:
        result = self.service.rollback(cmd.model, cmd.to_version, reason=f"rollback command {cmd.cmd_id}",
                                       cmd_id=cmd.cmd_id, deployment_id=cmd.deployment_id)
        self._finish(cmd, ok=result.ok, reason=result.reason, stage="rollback", result=result)

    # -- outcomes ------------------------------------------------------------------------------

    def _finish(self, cmd: Command, *, ok: bool, reason: str, stage: str, result: Any = None) -> None:
        outcome = {
            "ok": bool(ok), "reason": str(reason)[:1000], "stage": stage,
            "model": getattr(result, "model", None) or getattr(cmd, "model", None),
            "version": getattr(result, "version", None) if result is not None else getattr(cmd, "version", None),
            "previous": getattr(result, "previous", None),
        }
        self._log.put({"cmd_id": cmd.cmd_id, "status": "done", "ts": time.time(), "type": cmd.type,
                       "outcome": outcome, "command": cmd.model_dump(mode="json")})
        self._log.prune()
        # The service reports its own outcome; when it did not (or it never ran), report it here.
        if cmd.cmd_id not in self._terminal_seen:
            self._report_outcome(cmd, outcome, repeat=False)
        self._terminal_seen.discard(cmd.cmd_id)

    def _rereport(self, cmd: Command, entry: dict[str, Any]) -> None:
        outcome = entry.get("outcome") or {}
        log.info("command %s was already carried out; reporting its result again", cmd.cmd_id)
        self._report_outcome(cmd, outcome, repeat=True)

    def _report_outcome(self, cmd: Command, outcome: dict[str, Any], *, repeat: bool) -> None:
        ok = bool(outcome.get("ok"))
        kind = "rollback" if cmd.type == "rollback" else "deploy"
        etype = ("rolled_back" if kind == "rollback" else "activated") if ok else (
            "error" if kind == "rollback" else "activation_failed")
        if ok and outcome.get("stage") == "shadow":
            etype = "shadow_started"
        data = {"stage": outcome.get("stage"), "previous": outcome.get("previous")}
        if repeat:
            data["repeat"] = True
        self._event(etype, cmd, str(outcome.get("reason", "")), data=data, model=outcome.get("model"),
                    version=outcome.get("version"))

    def _on_service_event(self, event: EventMessage) -> None:
        if event.cmd_id and event.type in _TERMINAL_EVENTS:
            self._terminal_seen.add(event.cmd_id)

    def _event(self, etype: str, cmd: Command, detail: str = "", *, data: dict[str, Any] | None = None,
               model: str | None = None, version: str | None = None) -> None:
        try:
            msg = EventMessage(type=etype, cmd_id=cmd.cmd_id, deployment_id=cmd.deployment_id,  # type: ignore[arg-type]
                               model=model or getattr(cmd, "model", None),
                               version=version or getattr(cmd, "version", None) or getattr(cmd, "to_version", None),
                               detail=detail[:4096], data=data or {})
            self.link.publish_event(msg)
        except Exception:  # noqa: BLE001 - reporting must never break the command itself
            log.exception("could not report %s for command %s", etype, cmd.cmd_id)

    # -- housekeeping --------------------------------------------------------------------------

    def _discard_other_parts(self, keep: Path) -> None:
        # One download at a time: a partial file of an older command only wastes the SD card.
        for p in self.downloads.glob("*.lepton.part"):
            if p != keep:
                p.unlink(missing_ok=True)

    def _resume_interrupted(self) -> None:
        from pydantic import TypeAdapter, ValidationError

        from lepton_edge.protocol import CommandMessage

        adapter = TypeAdapter(CommandMessage)
        for entry in self._log.unfinished():
            try:
                cmd = adapter.validate_python(entry.get("command"))
            except ValidationError:
                continue
            log.info("resuming command %s, interrupted when the agent stopped", cmd.cmd_id)
            with self._pending_lock:
                if not self._enqueue(_Resumed(cmd), cmd):
                    log.warning("too many interrupted commands; %s waits for the cloud to send it again", cmd.cmd_id)
                    return


class _Resumed:
    """Marks a command taken up again after an agent restart."""

    def __init__(self, cmd: Command) -> None:
        self.cmd = cmd
        self.cmd_id = cmd.cmd_id


def verify_sha256(path: Path, expected: str) -> str:
    """The file's sha256 when it is ``expected``; otherwise the file is deleted and DownloadError says so.

    What every download the cloud sends is checked with before anything opens it (deploys and benchmarks).
    """
    digest = _sha256(path)
    if digest != expected:
        path.unlink(missing_ok=True)
        raise DownloadError(f"sha256 of the download is {digest[:16]}…, the command says {expected[:16]}…")
    return digest


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
