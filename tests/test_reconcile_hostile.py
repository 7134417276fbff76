"""The reconciler and the registry filters against hostile registry content: anyone who may write to the
MLflow registry sets any tag and registers models under any name. Tiny hand-made models in a real SQLite
MLflow store (no exports), the job queue on a real throwaway PostgreSQL cluster."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.utils.search_utils import SearchModelUtils, SearchModelVersionUtils

from registry_hooks.config import HooksConfig
from registry_hooks.queue import JobQueue
from registry_hooks.reconcile import reconcile
from registry_hooks.runner import work
from skinreg.errors import RegistryError
from skinreg.registry.client import Registry
from skinreg.registry.tags import EXPORT_RUN_ID, EXPORT_STATUS, EXPORT_VARIANTS, GATE, SOURCE_VERSION, VARIANT_OF

SECRET = "skinreg-hooks-test-secret"


@pytest.fixture(autouse=True)
def _signing_key(monkeypatch):
    """The key skinreg seals its records with (skinreg/seal.py): this test's own."""
    monkeypatch.setenv("SKINREG_SIGNING_KEY", "reconcile-hostile-test-signing-key-0123456789")


def version(name: str, tags: dict[str, str] | None = None) -> str:
    """A new version of `name` (the registered model is created when missing); no model behind it."""
    client = MlflowClient()
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    return str(client.create_model_version(name, "file:///nonexistent/model", tags=tags).version)


def exported(name: str, facts: dict[str, str]) -> str:
    """A new version of `name` with the export record a skinreg export seals (and its plain tags)."""
    reg = Registry()
    ref = reg.get(name, version(name))
    reg.record_export(ref, facts)
    return ref.version


def aliases(name: str) -> dict[str, str]:
    return {k: str(v) for k, v in MlflowClient().get_registered_model(name).aliases.items()}


def keys(report) -> list[str]:
    return sorted(q.spec.key for q in report.queued)


def logged(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def test_malformed_variants_records_are_treated_as_absent_and_stop_no_other_source(tracking, queue_db, caplog):
    client = MlflowClient()
    bad = {"1": "{not json", "2": "[1, 2]", "3": '{"onnx": 5}', "4": '{"onnx": "no-version"}'}
    for v, garbage in bad.items():  # sealed, so acted on: whatever a record holds must not stop a round
        assert exported("hr-bad", {EXPORT_STATUS: "passed", EXPORT_VARIANTS: garbage}) == v
        client.set_registered_model_alias("hr-bad", f"channel{v}", v)  # each is read for an alias
    # plain tags only (anyone can set them): no export record, so never exported
    assert version("hr-bad", {EXPORT_STATUS: "passed", EXPORT_VARIANTS: "{not json"}) == "5"
    client.set_registered_model_alias("hr-bad", "production", "5")
    assert version("hr-good") == "1"
    cfg = HooksConfig(sources=["hr-bad", "hr-good"], secret=SECRET, database_url=queue_db)

    with caplog.at_level(logging.WARNING, logger="registry_hooks.reconcile"):
        report = reconcile(cfg, JobQueue(queue_db))

    # the versions whose export finished cannot follow an alias until they are exported again
    assert keys(report) == ["alias:hr-bad:production:5", "export:hr-bad:5", "export:hr-good:1"]
    assert report.checked_versions == 6 and report.failures == []
    assert [b.split(": ", 1)[0] for b in report.bad_tags] == [f"models:/hr-bad/{v}" for v in bad]
    for item in report.bad_tags:  # each logged once and listed in the notes
        assert f"recorded {EXPORT_VARIANTS} " in item and item.endswith("treated as absent")
        assert logged(caplog, item.split(": ", 1)[0] + ":") == [f"reconcile: {item}"]
        assert item in report.notes


def test_a_version_that_cannot_be_read_stops_no_other_version_of_its_source(tracking, queue_db, caplog):
    # marked running by a run that does not exist: reading the run fails, for this version only
    assert exported("hr-run", {EXPORT_STATUS: "running", EXPORT_RUN_ID: "0" * 32}) == "1"
    assert version("hr-run") == "2"
    MlflowClient().set_registered_model_alias("hr-run", "production", "2")
    cfg = HooksConfig(sources=["hr-run"], secret=SECRET, database_url=queue_db)

    with caplog.at_level(logging.WARNING, logger="registry_hooks.reconcile"):
        report = reconcile(cfg, JobQueue(queue_db))

    assert keys(report) == ["alias:hr-run:production:2", "export:hr-run:2"]
    [failure] = report.failures
    assert failure.startswith("models:/hr-run/1: not reconciled: RegistryError: run " + "0" * 32)
    assert failure in report.notes and logged(caplog, "models:/hr-run/1") == [f"reconcile: {failure}"]


def test_an_alias_deleted_on_the_source_while_the_receiver_was_down_is_removed_from_its_variants(
        tracking, queue_db):
    client, reg = MlflowClient(), Registry()
    variants = {"onnx": "hr-s-onnx/1", "tflite-float32": "hr-s-tflite-float32/1"}
    assert exported("hr-s", {EXPORT_STATUS: "passed", EXPORT_VARIANTS: json.dumps(variants)}) == "1"
    for name in ("hr-s-onnx", "hr-s-tflite-float32"):  # registered as an export registers variants
        reg.register(name, "file:///nonexistent/variant", {GATE: "passed", SOURCE_VERSION: "1"},
                     model_tags={VARIANT_OF: "hr-s"})
    # a plain tag does not make a variant: this model's production is its own
    version("hr-fake")
    client.set_registered_model_tag("hr-fake", VARIANT_OF, "hr-s")
    for name in ("hr-s-onnx", "hr-s-tflite-float32", "hr-fake"):
        for alias in ("candidate", "staging", "production"):
            client.set_registered_model_alias(name, alias, "1")
    client.set_registered_model_alias("hr-s", "staging", "1")
    client.set_registered_model_alias("hr-s", "production", "1")
    client.delete_registered_model_alias("hr-s", "production")  # revoked; its delivery is lost (no receiver)
    cfg = HooksConfig(sources=["hr-s"], secret=SECRET, database_url=queue_db)
    queue = JobQueue(queue_db)

    report = reconcile(cfg, queue)

    [item] = report.queued
    assert (item.spec.key, item.merged) == ("unalias:hr-s:production", False)
    assert item.why == "production is not on hr-s but still on hr-s-onnx, hr-s-tflite-float32"
    assert report.failures == [] and report.bad_tags == []
    asyncio.run(work(cfg, until_idle=True, install_signal_handlers=False))  # a worker runs the queued job
    job = queue.get(item.job_id)
    assert (job.state, job.outcome) == ("done", "production removed from hr-s-onnx, hr-s-tflite-float32"), job
    # the candidate alias (set on variants by their export) and the aliases the source still has stay
    assert aliases("hr-s-onnx") == aliases("hr-s-tflite-float32") == {"candidate": "1", "staging": "1"}
    assert aliases("hr-fake") == {"candidate": "1", "staging": "1", "production": "1"}
    assert reconcile(cfg, queue).queued == []


TRICKY = ["evil'name", 'dq"name', "x' AND name = 'y", "x' OR name='y", "'", "trail'", "a'b\\", "a\\",
          "a''b", "semi;co'lon", "-- c'", "/*'*/", "tab\t'x", "a'b`c"]


@pytest.mark.parametrize("parser", [SearchModelUtils, SearchModelVersionUtils])
def test_quoted_names_parse_back_to_themselves_in_mlflow_search_filters(parser):
    from skinreg.registry.client import _quoted

    for name in TRICKY:
        assert parser.parse_search_filter(f"name = {_quoted(name)}") == [
            {"type": "attribute", "key": "name", "comparator": "=", "value": name}], name
    with pytest.raises(RegistryError, match="cannot be written in an MLflow search filter"):
        _quoted("both'\"quotes")


def test_model_names_with_quotes_neither_break_nor_alter_registry_filters(tracking, queue_db):
    reg = Registry()
    assert [version("hr-q") for _ in range(2)] == ["1", "2"]
    trap = "hr-q' AND name = 'hr-q"  # single-quoted, it would select hr-q's versions
    assert version(trap) == "1"
    assert version("evil'name") == "1"
    assert version("evil'and\"both") == "1"  # MLflow allows the name; no filter literal can hold it

    assert [(v.name, v.version) for v in reg.versions(trap)] == [(trap, "1")]
    assert [(v.name, v.version) for v in reg.versions("evil'name")] == [("evil'name", "1")]
    assert reg.exists("evil'name") and reg.exists(trap)
    assert not reg.exists("hr-q' AND name LIKE 'hr-%")  # no such model, although hr-q matches the LIKE
    assert reg.versions("nope' AND name LIKE 'hr-%") == []
    with pytest.raises(RegistryError, match="cannot be written in an MLflow search filter"):
        reg.versions("evil'and\"both")

    cfg = HooksConfig(sources=["evil'and\"both", "evil'name", trap], secret=SECRET, database_url=queue_db)
    report = reconcile(cfg, JobQueue(queue_db))
    assert keys(report) == sorted(["export:evil'name:1", f"export:{trap}:1"])
    [failure] = report.failures
    assert failure.startswith("evil'and\"both: not reconciled: RegistryError: ")
