"""Create or update the MLflow webhook that feeds the receiver (idempotent: keyed by name)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from skinreg.registry import Registry

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
    return Installed(action=action, webhook_id=hook.webhook_id, events=[str(e) for e in hook.events])
