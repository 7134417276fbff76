"""Configuration of the receiver, the queue and the worker: one dataclass, filled from environment
variables (SKINREG_HOOKS_*, SKINREG_WEBHOOK_SECRET) and overridden by CLI options."""

from __future__ import annotations

import os
import typing
from dataclasses import dataclass, field, fields, replace
from enum import Enum
from typing import Any, Callable, Mapping

from skinreg.errors import InputError
from skinreg.export.settings import ExportSettings, from_strings

ENV_SECRET = "SKINREG_WEBHOOK_SECRET"
ENV_PREFIX = "SKINREG_HOOKS_"


class Executor(str, Enum):
    """Where a job's pipeline work runs (docs/hooks.md, "Executors")."""

    inprocess = "inprocess"  # skinreg.registry.pipeline called in the worker process
    subprocess = "subprocess"  # `skinreg export-version` / `skinreg promote` child processes
    mlflow_run = "mlflow-run"  # `mlflow run <project> -e export|promote [--backend ...]`


@dataclass
class HooksConfig(ExportSettings):
    """The export settings (every field of skinreg.export.settings.ExportSettings, as SKINREG_HOOKS_<FIELD>: the
    hooks can set everything `skinreg export-version` can) and the service's own settings."""

    # -- receiver ------------------------------------------------------------------------------
    sources: list[str] = field(default_factory=list)  # registered models the hooks act on; empty = none
    secret: str = ""  # the webhook's signing secret; the receiver refuses to start without one
    tolerance_s: int = 300  # max |now - X-MLflow-Timestamp|; replays older than this are rejected outright
    docs: bool = False  # serve /docs, /redoc and /openapi.json (off: they describe the service to anyone)
    # Limits against hostile clients (uvicorn's and the receiver's own):
    max_connections: int = 1000  # open connections at once (uvicorn limit_concurrency); more are answered 503
    backlog: int = 256  # connections waiting to be accepted (listen backlog)
    keep_alive_s: float = 5.0  # an idle keep-alive connection is closed after this long
    read_timeout_s: float = 5.0  # a request whose headers, or whose body, take longer to arrive is cut off (408)
    max_header_bytes: int = 16384  # request line + headers (h11_max_incomplete_event_size); more is refused (400/431)
    refusal_flush_s: float = 10.0  # refused-request counters are written to the queue database this often
    # -- queue -----------------------------------------------------------------------------------
    # The PostgreSQL the MLflow server uses (postgresql://... or MLflow's postgresql+psycopg2://...): the queue
    # (procrastinate) lives in its own schema there. `skinreg hooks init-db` creates it.
    database_url: str = ""
    # -- worker ----------------------------------------------------------------------------------
    executor: Executor = Executor.inprocess
    max_attempts: int = 5  # a job killed or failing this often is parked as 'dead' (poison-pill guard)
    backoff_s: float = 10.0  # first retry delay; doubles per attempt
    backoff_max_s: float = 300.0
    heartbeat_s: float = 10.0  # workers' heartbeat interval (procrastinate), and how often they look for stalled jobs
    stalled_s: float = 30.0  # a job whose worker sent no heartbeat for this long is taken over by another worker
    poll_s: float = 2.0  # fallback polling interval; LISTEN/NOTIFY wakes a worker as soon as a job is deferred
    stale_running_s: float = 7200.0  # an export marked 'running' this long, by a run we do not own, is dead
    dead_requeue_s: float = 21600.0  # the reconciler queues a dead job's work again after this long; 0: never
    # -- export settings passed to skinreg.registry.pipeline.ExportOptions --------------------------------
    # calibration_dir / eval_dir left unset: use the images the source version's training run logged
    # (`skinreg train --log-data`: runs:/RUN/data/calibration and data/val), when it has them
    source_run_data: bool = True
    name_pattern: str = "{source}-{variant}"
    candidate_alias: str = "candidate"
    # -- mlflow-run executor ---------------------------------------------------------------------
    project_uri: str = "."  # an MLproject with the `export` and `promote` entry points (this repo's)
    backend: str = "local"  # mlflow run --backend: local | kubernetes | databricks
    backend_config: str | None = None  # mlflow run --backend-config (JSON file or string)
    # -- service ---------------------------------------------------------------------------------
    reconcile_interval_s: float = 300.0  # periodic reconciler in `hooks serve`; 0 turns it off

    def export_options(self) -> Any:
        """The pipeline's own ExportOptions (imported lazily: it pulls in the exporters)."""
        from skinreg.registry.pipeline import ExportOptions

        from skinreg.registry.pipeline import HOOKS_ORIGIN

        settings, default = self.settings(), ExportSettings()
        origin = {f.name: HOOKS_ORIGIN for f in fields(ExportSettings)
                  if getattr(settings, f.name) != getattr(default, f.name)}
        return ExportOptions(**vars(settings), name_pattern=self.name_pattern,
                             candidate_alias=self.candidate_alias or None, origin=origin)

    def validate(self) -> "HooksConfig":
        """Reject bad settings at start-up, not at the first job (bad enum values already failed in
        ExportSettings.normalize)."""
        if self.tolerance_s <= 0 or self.max_attempts < 1 or self.heartbeat_s <= 0 or self.poll_s <= 0:
            raise InputError("tolerance_s, heartbeat_s, poll_s must be > 0 and max_attempts >= 1")
        if min(self.max_connections, self.backlog, self.max_header_bytes) < 1 or \
                min(self.keep_alive_s, self.read_timeout_s, self.refusal_flush_s) <= 0:
            raise InputError("max_connections, backlog, max_header_bytes, keep_alive_s, read_timeout_s and "
                             "refusal_flush_s must be > 0")
        if self.stalled_s <= 2 * self.heartbeat_s:
            raise InputError(f"stalled_s ({self.stalled_s:g}) must be over twice heartbeat_s ({self.heartbeat_s:g}): "
                             "a live worker would be taken for dead")
        if "{source}" not in self.name_pattern or "{variant}" not in self.name_pattern:
            raise InputError(f"bad name pattern {self.name_pattern!r}: it needs {{source}} and {{variant}}")
        return self

    def with_overrides(self, **overrides: Any) -> "HooksConfig":
        """CLI options win over the environment; None means 'not given'."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def require_secret(self) -> str:
        if not self.secret:
            raise InputError(f"no webhook secret: set {ENV_SECRET} (the same secret `skinreg hooks install` gives "
                             "MLflow); the receiver never accepts unsigned deliveries")
        if len(self.secret) < MIN_SECRET_LENGTH:
            raise InputError(f"the webhook secret in {ENV_SECRET} has {len(self.secret)} characters: use at least "
                             f"{MIN_SECRET_LENGTH} (e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
        return self.secret


MIN_SECRET_LENGTH = 16


def _bool(value: str) -> bool:
    if value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if value.strip().lower() in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected true or false")


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _cast(hint: Any) -> Callable[[str], Any]:
    """How one environment value becomes a HooksConfig field, from the field's declared type."""
    if hint is bool:
        return _bool
    if hint in (int, float):
        return hint
    if typing.get_origin(hint) is list:
        return _split
    if isinstance(hint, type) and issubclass(hint, Enum):
        def choice(value: str) -> Enum:
            try:
                return hint(value.strip())
            except ValueError:
                raise ValueError(f"expected one of {', '.join(e.value for e in hint)}") from None

        return choice
    return str  # str, and `str | None`


def from_env(env: Mapping[str, str] | None = None) -> HooksConfig:
    """HooksConfig from SKINREG_HOOKS_<FIELD> (upper case; lists comma-separated) and SKINREG_WEBHOOK_SECRET.
    Each value is cast by its field's declared type; the export settings' fields by export.settings.from_strings
    (choices and gates checked as on the command line)."""
    env = os.environ if env is None else env
    cfg = HooksConfig(secret=env.get(ENV_SECRET, ""))
    export_fields = set(ExportSettings.__dataclass_fields__)
    values: dict[str, Any] = from_strings({name: env[ENV_PREFIX + name.upper()] for name in export_fields
                                           if ENV_PREFIX + name.upper() in env},
                                          what=lambda name: ENV_PREFIX + name.upper())
    hints = typing.get_type_hints(HooksConfig)
    for name in HooksConfig.__dataclass_fields__:
        raw = env.get(ENV_PREFIX + name.upper())
        if raw is None or name == "secret" or name in export_fields:
            continue
        try:
            values[name] = _cast(hints[name])(raw)
        except ValueError as exc:
            raise InputError(f"bad {ENV_PREFIX}{name.upper()}={raw!r}: {exc}") from None
    return replace(cfg, **values)
