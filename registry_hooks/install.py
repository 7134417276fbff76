"""Create or update the MLflow webhook that feeds the receiver (idempotent: keyed by name)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from skinreg.errors import InputError

from registry_hooks.config import ENV_SECRET
from skinreg.registry.client import Registry

log = logging.getLogger(__name__)

DESCRIPTION = "skinreg registry_hooks: exports and promotes variants of configured source models"


@dataclass(frozen=True)
class Installed:
    action: str  # created | updated
    webhook_id: str
    events: list[str]


def install(*, url: str, name: str, events: list[str], secret: str, registry: Registry | None = None) -> Installed:
    """The secret is always written: MLflow stores it encrypted and never returns it, so an existing
    webhook's secret cannot be compared, only replaced."""
    reg = registry or Registry()
    existing = [w for w in reg.webhooks() if w.name == name]
    if existing:
        hook = reg.update_webhook(existing[0].webhook_id, url=url, events=events, secret=secret, description=DESCRIPTION)
        action = "updated"
        for extra in existing[1:]:
            log.warning("another webhook is also named %s (%s): left as is", name, extra.webhook_id)
    else:
        hook = reg.create_webhook(name=name, url=url, events=events, secret=secret, description=DESCRIPTION)
        action = "created"
    try:
        prove(reg, hook.webhook_id, url)
    except InputError:
        if action == "created":  # never leave a webhook behind whose every delivery fails silently
            reg.delete_webhook(hook.webhook_id)
        raise
    return Installed(action=action, webhook_id=hook.webhook_id, events=[str(e) for e in hook.events])


def prove(reg: Registry, webhook_id: str, url: str) -> None:
    """MLflow sends its own signed test delivery; the receiver must verify and acknowledge it (2xx), else
    every real delivery would fail as silently (MLflow only logs failed deliveries)."""
    result = reg.test_webhook(webhook_id)
    if result.success:
        return
    status = result.response_status
    if status == 401:
        why = f"the receiver refused its signature: give `hooks install` the same {ENV_SECRET} as the receiver"
    elif status == 404:
        why = "nothing answers there: the receiver's URL ends in /webhook (e.g. http://host:8731/webhook)"
    elif status is None:
        why = (f"MLflow could not reach it ({(result.error_message or 'no answer').splitlines()[0][:200]}): start "
               "`skinreg hooks serve` and check that the MLflow server can reach that host and port")
    else:
        why = f"the receiver answered HTTP {status}; see its log"
    raise InputError(f"MLflow's test delivery to {url} failed: {why}")
