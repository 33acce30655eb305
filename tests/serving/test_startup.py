"""What the service establishes before serving: schema, signature at build, clear refusals."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from bundle.model_import import import_registry_version
from core.errors import ConfigurationError, DependencyUnavailableError, ModelIntegrityError
from core.settings import get_settings
from ops.database import dispose_engines
from ops.migrations import current_revision, head_revision, prepare_database
from ops.signing import verify_model_dir
from serving.model_store import read_model
from tests.conftest import fresh_postgres_database
from tests.serving.conftest import BuiltHome, free_port

SIGNING_KEY = "model-signing-key-for-startup-tests-0123456789"


@pytest.fixture(autouse=True)
def _dispose_engines() -> Iterator[None]:
    yield
    dispose_engines()


def test_development_sqlite_is_migrated_at_start_even_by_racing_workers(flood_home: Path) -> None:
    settings = get_settings()
    errors: list[BaseException] = []

    def start() -> None:
        try:
            prepare_database(settings)
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    workers = [threading.Thread(target=start) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert errors == []
    assert current_revision(settings.effective_database_url) == head_revision()


@pytest.mark.postgres
def test_another_database_must_already_be_at_head(monkeypatch: pytest.MonkeyPatch) -> None:
    with fresh_postgres_database("flood_empty") as empty:
        try:
            monkeypatch.setenv("DATABASE_URL", empty)
            get_settings.cache_clear()
            with pytest.raises(ConfigurationError, match="flood db upgrade"):
                prepare_database(get_settings())
            # Refused, not migrated: a service does not migrate a shared database.
            assert current_revision(empty) is None
        finally:
            dispose_engines()


def test_an_unreachable_database_is_named_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", f"postgresql+psycopg2://postgres@127.0.0.1:{free_port()}/none")
    get_settings.cache_clear()
    with pytest.raises(DependencyUnavailableError, match="DATABASE_URL"):
        prepare_database(get_settings())


def test_bento_build_signs_the_imported_model(
    built_home: BuiltHome, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A copy: the registry's artifacts are read where they are, the BentoML store is ours.
    home = tmp_path / "home"
    home.mkdir()
    for name in ("mlflow.db", "dev-secret-key"):
        shutil.copy2(built_home.settings.flood_home / name, home / name)
    shutil.copytree(built_home.settings.bentoml_home, home / "bentoml")
    monkeypatch.setenv("FLOOD_HOME", str(home))
    monkeypatch.setenv("MODEL_SIGNING_KEY", SIGNING_KEY)
    get_settings.cache_clear()
    version = max(built_home.model_tags)
    tag = import_registry_version(version, settings=get_settings(), workdir=tmp_path / "download")
    assert tag == built_home.model_tags[version]
    _, model_dir = read_model(tag, store_dir=home / "bentoml" / "models")
    verify_model_dir(model_dir, SIGNING_KEY.encode())
    # Building again keeps the signature; it is never rewritten over changed files.
    (model_dir / "compiled.json").write_text("{}")
    with pytest.raises(ModelIntegrityError, match="signature check failed"):
        import_registry_version(version, settings=get_settings(), workdir=tmp_path / "again")
