"""docker-compose.yml run for real on one machine: image, start, keys, predictions, backups,
Prometheus, down/up, rollback and a graceful stop, each with its figure."""

from __future__ import annotations

import json
import time
import uuid

import httpx
import pytest

from bundle.bentos import KEEP_ALIVE_S
from serving.shutdown import GRACEFUL_SHUTDOWN_S
from tests.containers.conftest import DAY, BuiltImage, Stack, new_key, run, wait_until
from tests.reliability.conftest import Figure, record_figure
from tests.reliability.load import BackgroundLoad

pytestmark = [pytest.mark.containers, pytest.mark.slow, pytest.mark.timeout(1800)]


def predict(url: str, key: str, *, request_id: str | None = None) -> httpx.Response:
    headers = {"X-API-Key": key, **({"X-Request-ID": request_id} if request_id else {})}
    return httpx.post(f"{url}/api/v1/predict", json=DAY, headers=headers, timeout=35)


def test_the_image_runs_as_a_user_with_flood_and_the_served_flags(images: list[BuiltImage]) -> None:
    image = images[-1]
    config = json.loads(run(["docker", "image", "inspect", image.tag, "--format", "{{json .Config}}"]))
    command = config["Cmd"]
    assert command[0] == "serve"
    assert command[command.index("--timeout-keep-alive") + 1] == str(KEEP_ALIVE_S)
    assert command[command.index("--timeout-graceful-shutdown") + 1] == str(GRACEFUL_SHUTDOWN_S)
    identity = run(["docker", "run", "--rm", image.tag, "id", "-u"]).strip()
    assert identity != "0" and config["User"] == "bentoml"
    commands = run(["docker", "run", "--rm", image.tag, "flood", "--help"])
    assert all(name in commands for name in ("keys", "db", "backup", "config"))
    record_figure(
        Figure("image: non-root, flood CLI", 0, 0, None, image.build_s, f"uid {identity}, {image.tag}")
    )


def test_the_stack_comes_up_healthy(stack: Stack) -> None:
    seconds = stack.up()
    states = stack.services()
    assert set(states) == {"bento", "migrate", "worker", "beat", "redis", "postgres", "prometheus"}
    assert states["migrate"]["State"] == "exited" and states["migrate"]["ExitCode"] == 0
    unhealthy = {
        name: row["Status"]
        for name, row in states.items()
        if name != "migrate" and row["Health"] != "healthy"
    }
    assert not unhealthy
    # Published on 127.0.0.1 only.
    published = {p["URL"] for row in states.values() for p in row["Publishers"] if p["PublishedPort"]}
    assert published == {"127.0.0.1"}
    assert httpx.get(f"{stack.url}/health/ready", timeout=10).json()["ready"] is True
    record_figure(Figure("stack up (cold volumes)", 0, 0, None, seconds, f"{len(states)} services"))


def test_a_key_made_in_the_container_predicts_with_the_pinned_version(
    stack: Stack, images: list[BuiltImage]
) -> None:
    key = new_key(stack, tier="pro")
    answers = [predict(stack.url, key) for _ in range(10)]
    assert [a.status_code for a in answers] == [200] * 10
    model = answers[0].json()["model"]
    assert model["version"] == images[-1].model_version
    assert model["bento_tag"] == images[-1].tag
    assert answers[0].headers["X-Model-Version"] == str(images[-1].model_version)
    errors = sum(a.status_code != 200 for a in answers)
    record_figure(
        Figure("exec flood keys create + predict", len(answers), errors, None, None, model["bento_tag"])
    )


def send_logged(stack: Stack, key: str, count: int) -> tuple[str, set[str]]:
    prefix = f"ct-{uuid.uuid4().hex[:8]}-"
    ok = {
        f"{prefix}{n}"
        for n in range(count)
        if predict(stack.url, key, request_id=f"{prefix}{n}").status_code == 200
    }
    return prefix, ok


def back_up_through_the_worker(stack: Stack) -> str:
    """A full backup by the Celery worker (the task beat schedules); the new file's name."""
    before = stack.exec("worker", "flood", "backup", "list")
    stack.exec(
        "worker", "celery", "-A", "ops.tasks", "call", "flood.backup.run",
        "--kwargs", '{"kind": "full"}', "--queue", "flood.backups",
    )  # fmt: skip

    def new_backup() -> str | None:
        listed = stack.exec("worker", "flood", "backup", "list")
        fresh = [line for line in listed.splitlines() if "_full.dump" in line and line not in before]
        return fresh[0].split()[0] if fresh else None

    wait_until(new_backup, timeout_s=120, every_s=1)
    name = new_backup()
    assert name
    return name


def test_the_worker_backs_up_into_the_volume_and_verify_passes(stack: Stack) -> None:
    started = time.monotonic()
    name = back_up_through_the_worker(stack)
    seconds = time.monotonic() - started
    verified = stack.exec("worker", "flood", "backup", "verify", name)
    assert f"ok: {name} (signature valid, sha256 matches" in verified
    # The same volume, read-only in the Bento (its /metrics backup gauges read it).
    assert name in stack.exec("bento", "ls", "/var/lib/flood/backups").split()
    record_figure(Figure("celery backup + flood backup verify", 1, 0, None, seconds, name))


def test_restore_through_the_worker_brings_back_the_backed_up_state(stack: Stack) -> None:
    """RUNBOOK 4 in compose: stop the Bento, restore in the worker, start the Bento."""
    kept = new_key(stack, tier="pro")
    prefix, answered = send_logged(stack, kept, 10)
    # Rows reach PostgreSQL a moment after their answers (the journal holds them meanwhile);
    # the backup must hold them for "kept" to mean something.
    wait_until(lambda: answered <= stack.logged_client_ids(prefix), timeout_s=30)
    name = back_up_through_the_worker(stack)
    rows_in_backup = int(stack.sql("SELECT count(*) FROM prediction_log")[0])
    dropped = new_key(stack, tier="pro")  # made after the backup: the restore removes it
    assert predict(stack.url, dropped).status_code == 200
    started = time.monotonic()
    stack.command("stop", "-t", "90", "bento")
    restored = stack.exec("worker", "flood", "backup", "restore", name, "--yes")
    assert f"restored {name}" in restored and "safety backup:" in restored
    stack.up("bento")
    seconds = time.monotonic() - started
    database, code = stack.exec("worker", "flood", "db", "current").split()[1::2]
    assert database == code  # the restored schema is at the image's head
    assert predict(stack.url, kept).status_code == 200
    assert predict(stack.url, dropped).status_code == 401
    rows_after = int(stack.sql("SELECT count(*) FROM prediction_log")[0])
    # The rows logged since (the predictions above) come after the backup's rows.
    assert rows_after >= rows_in_backup
    lost = len(answered - stack.logged_client_ids(prefix))
    assert lost == 0
    record_figure(
        Figure(
            "restore in compose: stop bento, worker restore, up",
            len(answered) + 3,
            0,
            lost,
            seconds,
            f"{name}; key made after it refused (401)",
        )
    )


def test_prometheus_scrapes_the_bento(stack: Stack) -> None:
    key = new_key(stack, tier="pro")
    assert predict(stack.url, key).status_code == 200
    api = f"http://127.0.0.1:{stack.prometheus_port}/api/v1"

    def bento_target_up() -> bool:
        targets = httpx.get(f"{api}/targets", timeout=5).json()["data"]["activeTargets"]
        return any(t["labels"]["job"] == "flood-bento" and t["health"] == "up" for t in targets)

    def predictions_seen() -> float:
        result = httpx.get(f"{api}/query", params={"query": "sum(flood_predictions_total)"}, timeout=5).json()
        return float(result["data"]["result"][0]["value"][1]) if result["data"]["result"] else 0.0

    seconds = wait_until(bento_target_up, timeout_s=60, every_s=1)
    seconds += wait_until(predictions_seen, timeout_s=60, every_s=1)
    assert predictions_seen() >= 1
    record_figure(
        Figure(
            "prometheus: bento up, flood_predictions_total",
            0,
            0,
            None,
            seconds,
            f"{predictions_seen():.0f} seen",
        )
    )


def test_down_and_up_keep_every_logged_row(stack: Stack) -> None:
    key = new_key(stack, tier="pro")
    prefix, answered = send_logged(stack, key, 40)
    assert len(answered) == 40
    rows_before = int(stack.sql("SELECT count(*) FROM prediction_log")[0])
    stack.command("down", "-t", "90")
    seconds = stack.up()
    logged = stack.logged_client_ids(prefix)
    rows_after = int(stack.sql("SELECT count(*) FROM prediction_log")[0])
    # The key lives in the same database: it still works after the restart.
    assert predict(stack.url, key).status_code == 200
    assert answered <= logged and rows_after >= rows_before
    lost = len(answered - logged)
    record_figure(
        Figure("compose down / up", 40, 0, lost, seconds, f"{rows_before} rows before, {rows_after} after")
    )


def test_rollback_to_the_older_image_keeps_every_row(stack: Stack, images: list[BuiltImage]) -> None:
    older, newer = images[0], images[-1]
    key = new_key(stack, tier="pro")
    prefix, answered = send_logged(stack, key, 20)
    rows_before = set(stack.sql("SELECT request_id FROM prediction_log"))
    seconds = stack.up(bento_tag=older.version)
    answer = predict(stack.url, key)
    assert answer.status_code == 200
    model = answer.json()["model"]
    assert (model["version"], model["bento_tag"]) == (older.model_version, older.tag)
    assert older.model_version != newer.model_version
    rows_after = set(stack.sql("SELECT request_id FROM prediction_log"))
    lost = len(rows_before - rows_after) + len(answered - stack.logged_client_ids(prefix))
    assert lost == 0
    states = stack.services()
    assert {states[name]["Image"] for name in ("bento", "worker", "beat")} == {older.tag}
    record_figure(
        Figure("rollback: BENTO_TAG older, up -d", 21, 0, lost, seconds, f"{newer.tag} -> {older.tag}")
    )
    stack.up(bento_tag=newer.version)


def test_docker_compose_stop_drains_in_flight_requests(stack: Stack) -> None:
    key = new_key(stack, tier="load")
    # Batches of 256 rows: requests that take long enough to be caught in flight.
    body = {"observations": [DAY] * 256}
    load = BackgroundLoad(stack.url, {"X-API-Key": key}, concurrency=4, pause_s=0.0, body=body,
                          path="/api/v1/predict/batch").start()  # fmt: skip
    time.sleep(3)
    stop_at = time.monotonic()
    stack.command("stop", "-t", "90", "bento")
    stopped_s = time.monotonic() - stop_at
    outcomes = load.stop()
    before = [o for o in outcomes if o.started < stop_at]
    in_flight = [o for o in before if o.started + o.latency_s > stop_at]
    failed_before = [o for o in before if o.status != 200]
    answered = {o.request_id for o in outcomes if o.status == 200}
    seconds = stack.up()
    logged = {row for row in stack.sql("SELECT client_request_id FROM prediction_log") if row}
    lost = len(answered - logged)
    assert not failed_before, failed_before[:5]
    assert lost == 0
    record_figure(
        Figure(
            "SIGTERM: compose stop bento under load",
            len(outcomes),
            len(failed_before),
            lost,
            stopped_s,
            f"{len(in_flight)} in flight at stop, all 200; "
            f"{len(outcomes) - len(before)} sent after; up again {seconds:.0f} s",
        )
    )
