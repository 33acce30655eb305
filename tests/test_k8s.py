"""deploy/k8s/, checked without a cluster.

Every manifest is validated offline against the schemas of a pinned Kubernetes release
(``kubernetes-validate`` bundles them); the rest reads what the manifests must agree with from
where the project keeps it: ports and flags from ``flood serve``, health paths from the API,
drain times from ``serving.shutdown``, variable names from ``Settings``, the production
environment from docker-compose.yml, and the gate from ``ops.configcheck``.
"""

from __future__ import annotations

import ast
import copy
import re
import socket
from datetime import datetime
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from bundle.bentos import BentoSummary, serve_argv
from core.settings import Settings, get_settings
from ops.configcheck import find_config_problems
from ops.tasks import BACKUP_QUEUE, HEARTBEAT_SUFFIX, MAINTENANCE_QUEUE
from serving import shutdown
from serving.api.app import create_app
from serving.health import CHECK_TIMEOUT_S
from tests.test_compose import COMPOSE, ENVIRONMENT, interpolate

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
KUSTOMIZATION = K8S / "kustomization.yaml"
SECRET_TEMPLATE = K8S / "secrets.example.yaml"
# The oldest release the manifests target (persistentVolumeClaimRetentionPolicy is GA from
# 1.32); schemas of later releases only add fields.
KUBERNETES_VERSION = "1.32.0"
NAMESPACE = "floodingnaque"
SECRET_NAME = "flood-secrets"
FLOOD_COMPONENTS = ("bento", "worker", "beat", "migrate")
# Read by BentoML itself, not by Settings; each is explained where bento.yaml sets it.
READ_BY_BENTOML = {"BENTOML_HOME", "BENTOML_DO_NOT_TRACK"}
# RUNBOOK 7: every worker process (API or model) is ~370 MB RSS.
WORKER_RSS_MIB = 370
TAG = ENVIRONMENT["BENTO_TAG"]


def model_outlives_api_s() -> float:
    """serving.services.MODEL_OUTLIVES_API_S, read from its source: importing that module
    needs a built Bento (it pins the served model at import)."""
    source = (ROOT / "serving" / "services.py").read_text(encoding="utf-8")
    (value,) = [
        node.value
        for node in ast.parse(source).body
        if isinstance(node, ast.Assign)
        and [getattr(target, "id", None) for target in node.targets] == ["MODEL_OUTLIVES_API_S"]
    ]
    result = eval(
        compile(ast.Expression(value), "services.py", "eval"),
        {"GRACEFUL_SHUTDOWN_S": shutdown.GRACEFUL_SHUTDOWN_S},
    )
    assert isinstance(result, int | float)
    return float(result)


Manifest = dict[str, Any]


def documents(path: Path) -> list[Manifest]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def set_image_tag(manifest: Manifest, images: list[dict[str, str]]) -> Manifest:
    """Kustomize's ``images:`` transformer, for the fields it rewrites in our manifests."""
    result = copy.deepcopy(manifest)
    for container in containers_of(result):
        name, _, _ = container["image"].partition(":")
        for image in images:
            if image["name"] == name:
                container["image"] = f"{image.get('newName', name)}:{image['newTag']}"
    return result


def pod_spec(manifest: Manifest) -> dict[str, Any] | None:
    spec = manifest.get("spec", {})
    if manifest["kind"] in ("Deployment", "StatefulSet", "Job"):
        result: dict[str, Any] = spec["template"]["spec"]
        return result
    return None


def containers_of(manifest: Manifest) -> list[dict[str, Any]]:
    spec = pod_spec(manifest)
    if spec is None:
        return []
    return [*spec.get("initContainers", []), *spec["containers"]]


@pytest.fixture(scope="module")
def kustomization() -> Manifest:
    (parsed,) = documents(KUSTOMIZATION)
    return parsed


@pytest.fixture(scope="module")
def manifests(kustomization: Manifest) -> list[Manifest]:
    """What ``kubectl apply -k deploy/k8s`` applies, with the image tag set to TAG."""
    images = [{**image, "newTag": TAG} for image in kustomization["images"]]
    return [
        set_image_tag(doc, images)
        for resource in kustomization["resources"]
        for doc in documents(K8S / resource)
    ]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    parsed: dict[str, Any] = interpolate(yaml.safe_load(COMPOSE.read_text(encoding="utf-8")), ENVIRONMENT)
    return parsed


def one(manifests: list[Manifest], kind: str, name: str) -> Manifest:
    (found,) = [m for m in manifests if m["kind"] == kind and m["metadata"]["name"] == name]
    return found


def workload(manifests: list[Manifest], component: str) -> Manifest:
    (found,) = [
        m
        for m in manifests
        if pod_spec(m) is not None and m["metadata"]["labels"]["app.kubernetes.io/component"] == component
    ]
    return found


def container(manifests: list[Manifest], component: str) -> dict[str, Any]:
    (found,) = containers_of(workload(manifests, component))
    return found


def pod_labels(manifest: Manifest) -> dict[str, str]:
    labels: dict[str, str] = manifest["spec"]["template"]["metadata"]["labels"]
    return labels


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def env_names(entry: dict[str, Any], config: dict[str, str]) -> set[str]:
    names = {variable["name"] for variable in entry.get("env", [])}
    for source in entry.get("envFrom", []):
        assert set(source) == {"configMapRef"}, "secrets are read key by key (secretKeyRef), never whole"
        names |= set(config)
    return names


def environment(entry: dict[str, Any], config: dict[str, str], secrets: dict[str, str]) -> dict[str, str]:
    """The environment the container gets, with the Secret's keys taken from ``secrets``."""
    env = dict(config) if entry.get("envFrom") else {}
    for variable in entry.get("env", []):
        if "value" in variable:
            env[variable["name"]] = variable["value"]
        else:
            ref = variable["valueFrom"]["secretKeyRef"]
            env[variable["name"]] = secrets[ref["key"]]
    return env


def secret_refs(entry: dict[str, Any]) -> dict[str, str]:
    """Variable name -> Secret key, for every variable taken from flood-secrets."""
    refs = {}
    for variable in entry.get("env", []):
        ref = variable.get("valueFrom", {}).get("secretKeyRef")
        if ref is not None:
            assert ref["name"] == SECRET_NAME and not ref.get("optional", False), variable
            refs[variable["name"]] = ref["key"]
    return refs


def cores(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def mebibytes(quantity: str) -> float:
    units = {"Mi": 1.0, "Gi": 1024.0, "Ki": 1 / 1024}
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi)", quantity).groups()  # type: ignore[union-attr]
    return float(number) * units[unit]


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def bento_port(compose: dict[str, Any]) -> int:
    """The Bento's port in the production shape: the container side of compose's mapping."""
    (mapping,) = compose["services"]["bento"]["ports"]
    return int(mapping.split(":")[-1])


def config_data(manifests: list[Manifest]) -> dict[str, str]:
    data: dict[str, str] = one(manifests, "ConfigMap", "flood-config")["data"]
    return data


def secret_template() -> Manifest:
    (template,) = documents(SECRET_TEMPLATE)
    return template


# -- validity ------------------------------------------------------------------------------


def test_every_manifest_is_valid_for_the_pinned_kubernetes_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*_: object) -> None:
        raise AssertionError("kubernetes-validate tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    checked = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in documents(path):
            if doc["apiVersion"].startswith("kustomize.config.k8s.io/"):
                continue
            # strict: unknown fields (a misspelt probe, a field in the wrong place) fail.
            version = kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
            # validate() silently falls back to an older bundled release; the pin must be real.
            assert version == KUBERNETES_VERSION.rsplit(".", 1)[0], (path.name, version)
            checked.append(doc["kind"])
    assert {"StatefulSet", "Deployment", "Job", "Service", "HorizontalPodAutoscaler"} <= set(checked)
    assert {"PodDisruptionBudget", "ConfigMap", "Secret", "PersistentVolumeClaim"} <= set(checked)


def test_the_validation_refuses_a_misspelt_field(manifests: list[Manifest]) -> None:
    broken = copy.deepcopy(workload(manifests, "bento"))
    probes = broken["spec"]["template"]["spec"]["containers"][0]
    probes["readinessprobe"] = probes.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_the_kustomization_applies_every_manifest_but_the_secret_template(kustomization: Manifest) -> None:
    on_disk = {path.name for path in K8S.glob("*.yaml")} - {KUSTOMIZATION.name}
    assert set(kustomization["resources"]) == on_disk - {SECRET_TEMPLATE.name}
    assert kustomization["namespace"] == NAMESPACE
    # Each file also names the namespace, so `kubectl apply -f` of one file lands there too.
    for name in on_disk:
        for doc in documents(K8S / name):
            if doc["kind"] != "Namespace":
                assert doc["metadata"]["namespace"] == NAMESPACE, (name, doc["kind"])
    (namespace,) = [doc for doc in documents(K8S / "namespace.yaml") if doc["kind"] == "Namespace"]
    assert namespace["metadata"]["name"] == NAMESPACE


# -- the image -----------------------------------------------------------------------------


def test_every_flood_pod_runs_the_one_pinned_image(
    kustomization: Manifest, manifests: list[Manifest]
) -> None:
    (image,) = kustomization["images"]
    assert image["name"] == "flood_risk"
    assert image["newTag"] and image["newTag"] != "latest"
    raw = [doc for resource in kustomization["resources"] for doc in documents(K8S / resource)]
    # Unset, the tag is a placeholder no one builds: pulling it fails instead of running
    # something unintended, as compose refuses an unset BENTO_TAG.
    assert {c["image"] for doc in raw for c in containers_of(doc)} == {f"flood_risk:{image['newTag']}"}
    applied = [c for doc in manifests for c in containers_of(doc)]
    assert {c["image"] for c in applied} == {f"flood_risk:{TAG}"}
    # A pinned tag never changes, so a node's copy is the image.
    assert {c["imagePullPolicy"] for c in applied} == {"IfNotPresent"}
    assert {m["metadata"]["labels"]["app.kubernetes.io/component"] for m in manifests if pod_spec(m)} == set(
        FLOOD_COMPONENTS
    )


def test_the_documented_sed_sets_the_tag(kustomization: Manifest) -> None:
    text = KUSTOMIZATION.read_text(encoding="utf-8")
    (expression,) = re.findall(r"sed -i '(s/.*/)' deploy/k8s/kustomization\.yaml", text)
    _, pattern, replacement, _ = expression.split("/")
    # POSIX basic regular expression to Python: \( \) group, \1 back-reference.
    edited = re.sub(
        pattern.replace(r"\(", "(").replace(r"\)", ")"),
        replacement.replace("<version>", TAG),
        text,
        flags=re.MULTILINE,
    )
    assert yaml.safe_load(edited)["images"] == [{**kustomization["images"][0], "newTag": TAG}]
    assert "kustomize edit set image flood_risk=flood_risk:<version>" in text


# -- the Bento: port, probes, drain ----------------------------------------------------------


def test_the_bento_serves_like_flood_serve_on_the_bentos_port(
    manifests: list[Manifest], compose: dict[str, Any]
) -> None:
    port = bento_port(compose)
    bento = container(manifests, "bento")
    summary = BentoSummary(
        tag="flood_risk:x", created_at=datetime.now(), model_tag="m", model_version=1, path=Path("B")
    )
    argv = serve_argv(summary, host="0.0.0.0", port=port)
    # The image's entrypoint appends $BENTO_PATH to these flags, as serve_argv puts the path first.
    assert bento["args"] == argv[argv.index("--host") :]
    assert "command" not in bento
    (http,) = bento["ports"]
    assert http == {"name": "http", "containerPort": port, "protocol": "TCP"}
    annotations = workload(manifests, "bento")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port)
    for name in ("flood-bento", "flood-bento-headless"):
        service = one(manifests, "Service", name)
        assert service["spec"]["selector"] == {
            k: v
            for k, v in pod_labels(workload(manifests, "bento")).items()
            if k.startswith("app.kubernetes.io/")
        }
        (service_port,) = service["spec"]["ports"]
        assert service_port["targetPort"] == http["name"] and service_port["port"] == port
    assert workload(manifests, "bento")["spec"]["serviceName"] == "flood-bento-headless"
    assert one(manifests, "Service", "flood-bento-headless")["spec"]["clusterIP"] == "None"


def test_probes_use_the_apis_liveness_and_readiness_routes(manifests: list[Manifest]) -> None:
    paths = {
        operation["summary"]: path
        for path, item in create_app().openapi()["paths"].items()
        for operation in item.values()
        if operation.get("summary") in ("liveness", "readiness")
    }
    bento = container(manifests, "bento")
    port_name = bento["ports"][0]["name"]
    for probe, summary in (
        ("livenessProbe", "liveness"),
        ("startupProbe", "liveness"),
        ("readinessProbe", "readiness"),
    ):
        assert bento[probe]["httpGet"] == {"path": paths[summary], "port": port_name}, probe
    # The readiness checks run concurrently, each bounded at CHECK_TIMEOUT_S: a probe timeout
    # below that would mark a slow but healthy replica unready.
    assert bento["readinessProbe"]["timeoutSeconds"] > CHECK_TIMEOUT_S
    # Liveness counts only once the start (model load, checks) is over.
    startup = bento["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60
    assert bento["livenessProbe"]["failureThreshold"] >= 3


def test_termination_grace_outlasts_the_drain(manifests: list[Manifest], compose: dict[str, Any]) -> None:
    bento = container(manifests, "bento")
    drain_s = int(flag(bento["args"], "--timeout-graceful-shutdown"))
    assert drain_s == shutdown.GRACEFUL_SHUTDOWN_S
    assert model_outlives_api_s() >= drain_s
    command = bento["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop_s = int(command[1])
    # The SIGKILL comes this long after preStop starts: the sleep, then the model worker
    # serving until the API has drained, then the prediction-log flush after the drain.
    grace_s = workload(manifests, "bento")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace_s > pre_stop_s + model_outlives_api_s() + shutdown._HARD_EXIT_MARGIN_S
    assert grace_s >= int(compose["services"]["bento"]["stop_grace_period"].removesuffix("s"))


def test_the_worker_finishes_a_backup_before_it_is_killed(
    manifests: list[Manifest], monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in config_data(manifests).items():
        monkeypatch.setenv(key, value)
    limit_s = Settings().backup_time_limit_seconds
    grace_s = workload(manifests, "worker")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace_s > limit_s


# -- security --------------------------------------------------------------------------------


def test_every_pod_runs_as_the_images_non_root_user(manifests: list[Manifest]) -> None:
    from serving.bentoml_internals import resolve

    BENTO_UID_GID = resolve("bento_uid_gid")  # noqa: N806 - the user `bentoml containerize` makes

    assert f"(uid {BENTO_UID_GID})" in (ROOT / "deploy" / "bento-setup.sh").read_text()
    for manifest in manifests:
        spec = pod_spec(manifest)
        if spec is None:
            continue
        name = manifest["metadata"]["name"]
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True, name
        assert pod["runAsUser"] == pod["runAsGroup"] == pod["fsGroup"] == BENTO_UID_GID, name
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert spec["automountServiceAccountToken"] is False, name
        assert not {"hostNetwork", "hostPID", "hostIPC"} & set(spec), name
        assert all(set(volume) & {"emptyDir", "persistentVolumeClaim"} for volume in spec["volumes"]), name
        for entry in containers_of(manifest):
            context = entry["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["capabilities"] == {"drop": ["ALL"]}, name
            assert not context.get("privileged") and context.get("runAsUser", BENTO_UID_GID) != 0, name
    (namespace,) = [m for m in manifests if m["kind"] == "Namespace"]
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_what_is_written_lands_on_volumes(manifests: list[Manifest]) -> None:
    config = config_data(manifests)
    for manifest in manifests:
        for entry in containers_of(manifest):
            mounts = {mount["mountPath"] for mount in entry["volumeMounts"]}
            # Temporary files (the process manager's sockets, restore's copy) and FLOOD_HOME.
            assert {"/tmp", config["FLOOD_HOME"]} <= mounts, manifest["metadata"]["name"]
    bento = container(manifests, "bento")
    home = {variable["name"]: variable.get("value") for variable in bento["env"]}["BENTOML_HOME"]
    assert home in {mount["mountPath"] for mount in bento["volumeMounts"]}


def test_only_the_bentos_http_port_accepts_connections(manifests: list[Manifest]) -> None:
    deny = one(manifests, "NetworkPolicy", "flood-default-deny-ingress")["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress"]}
    allow = one(manifests, "NetworkPolicy", "flood-bento-http")["spec"]
    assert allow["podSelector"]["matchLabels"] == pod_labels(workload(manifests, "bento"))
    assert allow["ingress"] == [{"ports": [{"port": "http", "protocol": "TCP"}]}]


# -- state: journal, backups, beat ------------------------------------------------------------


def test_each_bento_replica_keeps_its_own_journal_and_reads_the_backups(manifests: list[Manifest]) -> None:
    bento = workload(manifests, "bento")
    assert bento["kind"] == "StatefulSet"  # stable host names: journals are adopted by host name
    settings = Settings(flood_home=Path(config_data(manifests)["FLOOD_HOME"]))
    (template,) = bento["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m for m in container(manifests, "bento")["volumeMounts"]}
    assert mounts[template["metadata"]["name"]]["mountPath"] == str(settings.flood_home / "journal")
    assert template["spec"]["accessModes"] == ["ReadWriteOnce"]
    # A replica scaled in keeps its unshipped rows until it is back.
    assert bento["spec"]["persistentVolumeClaimRetentionPolicy"]["whenScaled"] == "Retain"
    backups = {
        component: next(
            (m, v)
            for m in container(manifests, component)["volumeMounts"]
            for v in workload(manifests, component)["spec"]["template"]["spec"]["volumes"]
            if m["name"] == v["name"] and m["mountPath"] == str(settings.backup_dir)
        )
        for component in ("bento", "worker")
    }
    claims = {v["persistentVolumeClaim"]["claimName"] for _, v in backups.values()}
    assert claims == {"flood-backups"}
    assert backups["bento"][0]["readOnly"] is True and not backups["worker"][0].get("readOnly")
    # Replicas and the worker may be on different nodes.
    assert one(manifests, "PersistentVolumeClaim", "flood-backups")["spec"]["accessModes"] == [
        "ReadWriteMany"
    ]


def test_exactly_one_beat_and_one_worker_even_during_a_rollout(manifests: list[Manifest]) -> None:
    for component in ("beat", "worker"):
        deployment = workload(manifests, component)
        assert deployment["kind"] == "Deployment"
        assert deployment["spec"]["replicas"] == 1, component
        assert deployment["spec"]["strategy"] == {"type": "Recreate"}, component
    targets = {
        m["spec"]["scaleTargetRef"]["name"] for m in manifests if m["kind"] == "HorizontalPodAutoscaler"
    }
    assert targets == {workload(manifests, "bento")["metadata"]["name"]}
    assert flag(container(manifests, "worker")["args"], "--concurrency") == "1"


def test_worker_beat_and_migration_run_composes_commands(
    manifests: list[Manifest], compose: dict[str, Any]
) -> None:
    services = compose["services"]
    for component, service in (("worker", "worker"), ("beat", "beat"), ("migrate", "migrate")):
        entry = container(manifests, component)
        expected = services[service]["command"]
        assert entry["args"] == expected, component
        assert entry["workingDir"] == services[service]["working_dir"], component
    worker = container(manifests, "worker")["args"]
    assert set(flag(worker, "-Q").split(",")) == {BACKUP_QUEUE, MAINTENANCE_QUEUE}
    beat = container(manifests, "beat")
    schedule = flag(beat["args"], "--schedule")
    assert str(Path(schedule).parent) in {m["mountPath"] for m in beat["volumeMounts"]}
    assert f"{schedule}{HEARTBEAT_SUFFIX}" in beat["livenessProbe"]["exec"]["command"][-1]
    job = workload(manifests, "migrate")
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    assert job["spec"]["backoffLimit"] >= 1 and job["spec"]["activeDeadlineSeconds"] > 0


# -- scaling: HPA, PDB, resources ------------------------------------------------------------


def test_the_autoscaler_and_disruption_budget_cover_the_bento(manifests: list[Manifest]) -> None:
    bento = workload(manifests, "bento")
    hpa = one(manifests, "HorizontalPodAutoscaler", "flood-bento")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": bento["kind"], "name": "flood-bento"}
    # The autoscaler owns the count: a replicas field would reset it on every apply.
    assert "replicas" not in bento["spec"]
    assert 2 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    (metric,) = hpa["metrics"]
    resource = metric["resource"]["name"]
    # Utilization is relative to the request, so there must be one.
    assert resource in container(manifests, "bento")["resources"]["requests"]
    pdb = one(manifests, "PodDisruptionBudget", "flood-bento")["spec"]
    selector = pdb["selector"]["matchLabels"]
    assert selects(selector, pod_labels(bento))
    others = [workload(manifests, c) for c in FLOOD_COMPONENTS if c != "bento"]
    assert not any(selects(selector, pod_labels(other)) for other in others)
    # At the minimum, one replica may be evicted and one still serves.
    assert 1 <= pdb["maxUnavailable"] < hpa["minReplicas"]


def test_every_container_has_requests_and_a_memory_limit(manifests: list[Manifest]) -> None:
    for manifest in manifests:
        for entry in containers_of(manifest):
            resources = entry["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]), manifest["metadata"]["name"]
            assert mebibytes(resources["limits"]["memory"]) >= mebibytes(resources["requests"]["memory"])
    bento = container(manifests, "bento")
    workers = int({v["name"]: v.get("value") for v in bento["env"]}["SERVING_API_WORKERS"])
    requests = bento["resources"]["requests"]
    # API workers plus the model worker, each a process of its own (RUNBOOK 7).
    assert mebibytes(requests["memory"]) >= (workers + 1) * WORKER_RSS_MIB
    assert cores(requests["cpu"]) >= workers


# -- settings and secrets ------------------------------------------------------------------


def test_every_variable_is_one_the_code_reads(manifests: list[Manifest]) -> None:
    known = {field.upper() for field in Settings.model_fields}
    config = config_data(manifests)
    assert set(config) <= known
    names = {}
    for component in FLOOD_COMPONENTS:
        names[component] = env_names(container(manifests, component), config)
        assert names[component] <= known | READ_BY_BENTOML, component
    # One environment for the image's every use, as compose's x-flood-environment; the
    # Bento adds only what sizes and houses its server.
    assert names["worker"] == names["beat"] == names["migrate"]
    assert names["bento"] - names["worker"] == READ_BY_BENTOML | {"SERVING_API_WORKERS"}


def test_secrets_come_from_the_one_secret_the_template_documents(manifests: list[Manifest]) -> None:
    template = secret_template()
    assert template["metadata"]["name"] == SECRET_NAME
    keys = set(template["stringData"])
    for component in FLOOD_COMPONENTS:
        refs = secret_refs(container(manifests, component))
        assert set(refs.values()) == keys, component
        assert all(name == key for name, key in refs.items()), component
    # The documented command creates exactly those keys, in that namespace.
    text = SECRET_TEMPLATE.read_text(encoding="utf-8")
    assert f"kubectl -n {NAMESPACE} create secret generic {SECRET_NAME}" in text
    assert set(re.findall(r"--from-literal=(\w+)=", text)) == keys
    assert not [m for m in manifests if m["kind"] == "Secret"]


def test_the_environment_is_composes_and_passes_the_production_gate(
    manifests: list[Manifest], compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = config_data(manifests)
    compose_env: dict[str, str] = compose["services"]["bento"]["environment"]
    secret_keys = set(secret_template()["stringData"])
    for name, value in compose_env.items():
        assert name in config or name in secret_keys, name
        if name in config:
            assert config[name] == value, name
    # Real secrets, as an operator's `kubectl create secret` gives them.
    env = environment(container(manifests, "bento"), config, {key: compose_env[key] for key in secret_keys})
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    settings = get_settings()
    assert settings.is_production and settings.signature_required
    assert find_config_problems(settings) == []


def test_the_secret_template_as_it_is_would_be_refused(
    manifests: list[Manifest], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = environment(container(manifests, "bento"), config_data(manifests), secret_template()["stringData"])
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    refused = {problem.variable for problem in find_config_problems(get_settings())}
    assert {"SECRET_KEY", "MODEL_SIGNING_KEY", "BACKUP_SIGNING_KEY"} <= refused
