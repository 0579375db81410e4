"""Every file in deploy/ parsed and checked for the properties that matter: non-root, secrets
never inline, Redis persistent and never evicting, workers that reach only Redis and the forge,
a Slack manifest whose scopes are exactly the ones the code needs. Real validators where one
exists: the Kubernetes OpenAPI schemas (kubernetes-validate), `docker-compose config` and
`systemd-analyze verify` (Debian packages docker-compose and systemd, installed by .ci/run)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from intake.channels.slack.transport import SLACK_PATH
from tests.conftest import REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"
K8S_VERSION = "1.31.0"
SANDBOX_CAPS = {"SETUID", "SETGID", "CHOWN", "FOWNER"}

# What a secret looks like when someone pastes one: Slack tokens, a Redis URL with a password,
# PEM private keys, long base64 or hex blobs (but not an image digest, `@sha256:<hex>`), password=… assignments.
SECRET = re.compile(
    r"xox[abposr]-[0-9A-Za-z-]{6,}|xapp-[0-9A-Za-z-]{6,}|rediss?://[^:@\s/]*:[^@\s]{6,}@"
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----|(?<![\w/.-])(?<!@sha256:)[A-Za-z0-9+/]{40,}={0,2}(?![\w/.-])"
    r"|(?i:password|passwd|secret|token)\s*[:=]\s*['\"]?(?![/.$])[A-Za-z0-9+/_-]{12,}"
)


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _deploy_texts() -> dict[Path, str]:
    return {p: p.read_text() for p in DEPLOY.rglob("*") if p.is_file() and p.suffix not in (".pyc",)
            and "__pycache__" not in p.parts}


def test_the_secret_pattern_catches_what_it_must() -> None:
    for planted in ("SLACK_BOT_TOKEN: xoxb-1234-5678-abcdef", "redis://intake-broker:s3cretpassword@redis/0",
                    "-----BEGIN PRIVATE KEY-----", "password = 'hunter2hunter2hunter2'",
                    "key: " + "QUJD" * 11):
        assert SECRET.search(planted), planted
    assert not SECRET.search("INTAKE_SIGNING_KEY: /run/secrets/signing_key")
    assert not SECRET.search("FROM redis:7.2@sha256:" + "ab" * 32)
    assert SECRET.search("token:" + "ab" * 32), "only an image digest is exempt, not any hex after a colon"


def test_no_deploy_file_holds_a_secret() -> None:
    found = {str(p.relative_to(DEPLOY)): m.group(0)[:20] for p, text in _deploy_texts().items()
             if (m := SECRET.search(text))}
    assert not found, found


# -- Dockerfile --------------------------------------------------------------------------------
def _dockerfile() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_dockerfile_is_multi_stage_non_root_with_bubblewrap_and_a_healthcheck() -> None:
    steps = _dockerfile()
    froms = [i for i, (op, _) in enumerate(steps) if op == "FROM"]
    assert len(froms) >= 2, "multi-stage: build and runtime"
    runtime = steps[froms[-1]:]
    assert any(op == "COPY" and "--from=build" in arg for op, arg in runtime), "runtime takes the built wheels"
    users = [arg for op, arg in runtime if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), "the image runs as a non-root user"
    assert any(op == "RUN" and "bubblewrap" in arg for op, arg in runtime)
    assert any(op == "HEALTHCHECK" and "/readyz" in arg for op, arg in runtime)
    assert not [arg for op, arg in steps if op in ("ENV", "ARG") and re.search(r"(?i)token|password|secret_key", arg)
                and "SECRETS_DIR" not in arg]
    assert not any(op == "COPY" and re.search(r"\.intake|keys", arg) for op, arg in steps)


DIGEST = re.compile(r"[a-z0-9./-]+(:[A-Za-z0-9._-]+)?@sha256:[0-9a-f]{64}")
OWN_IMAGE = "intake:0.1.0"  # built from deploy/Dockerfile: its digest exists only once built and pushed


def _dockerfile_bases() -> list[str]:
    """The FROM images as a build with no --build-arg gets them: ``${NAME}`` is the default of a
    global ARG (one before the first FROM); an ARG without a default stays unresolved."""
    steps = _dockerfile()
    first = next(i for i, (op, _) in enumerate(steps) if op == "FROM")
    defaults = dict(arg.split("=", 1) for op, arg in steps[:first] if op == "ARG" and "=" in arg)
    return [re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: defaults.get(m[1] or m[2], m[0]), arg.split()[0])
            for op, arg in steps if op == "FROM"]


def _images() -> dict[str, list[str]]:
    """Every image each recipe names: FROM lines, compose and Kubernetes ``image:`` values."""
    found: dict[str, list[str]] = {"Dockerfile": _dockerfile_bases()}
    # A `# syntax=` parser directive is an image too (BuildKit pulls that frontend before building).
    found["Dockerfile"] += re.findall(r"(?im)^#\s*syntax\s*=\s*(\S+)", (DEPLOY / "Dockerfile").read_text())
    found["compose.yaml"] = [s["image"] for s in yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
                             .values() if "image" in s]
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in _docs(path):
            pod = doc.get("spec", {}).get("template", {}).get("spec", {})
            found.setdefault(f"k8s/{path.name}", []).extend(
                c["image"] for c in pod.get("containers", []) + pod.get("initContainers", []))
    return found


def test_every_base_and_third_party_image_is_pinned_by_digest() -> None:
    images = _images()
    assert len(images["Dockerfile"]) >= 2 and images["compose.yaml"] and images["k8s/redis.yaml"]
    loose = {where: image for where, names in images.items() for image in names
             if image != OWN_IMAGE and not DIGEST.fullmatch(image)}
    assert not loose, f"images named by a tag only: {loose}"
    for bad in ("redis:7.2-bookworm", "redis@sha256:abc", "caddy:2.8@sha256:" + "A" * 64):
        assert not DIGEST.fullmatch(bad), bad
    # The bases are build arguments (tests/deploy/test_image_build.py swaps them for local ones);
    # a build passing none gets the pinned python images.
    assert [image.split("@")[0] for image in images["Dockerfile"]] == ["python:3.11-bookworm",
                                                                       "python:3.11-slim-bookworm"]


def test_compose_and_kubernetes_name_every_image_the_same_way() -> None:
    images = _images()
    by_repo: dict[str, set[str]] = {}
    for where, names in images.items():
        if where == "Dockerfile":
            continue
        for image in names:
            by_repo.setdefault(image.split("@")[0].rsplit(":", 1)[0], set()).add(image)
    assert {r: v for r, v in by_repo.items() if len(v) > 1} == {}, "one image, one name, in every recipe"
    assert by_repo["intake"] == {OWN_IMAGE} and by_repo["redis"] <= set(images["k8s/redis.yaml"])
    assert OWN_IMAGE in images["k8s/broker.yaml"] and OWN_IMAGE in images["k8s/worker.yaml"]
    assert f"-t {OWN_IMAGE} " in (DEPLOY / "Dockerfile").read_text(), "the tag the build comment gives"


def test_dockerignore_keeps_local_state_and_keys_out_of_the_build_context() -> None:
    lines = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    assert lines[[i for i, l in enumerate(lines) if not l.startswith("#")][0]] == "*", "allow-list, not deny-list"
    assert "**/.intake" in lines and "**/*.key" in lines and "**/*.pem" in lines and "deploy/state" in lines
    # (tests/deploy/test_build_context.py lists the actual context with the recipe's state in place.)


# -- compose -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_compose_services_are_hardened_and_non_root_except_the_sandboxing_worker(compose: dict[str, Any]) -> None:
    services = compose["services"]
    brokers = [s for s in services.values() if s.get("command") == ["serve"]]
    assert len(brokers) == 2, "two broker replicas"
    for name, svc in services.items():
        assert svc.get("read_only") is True, name
        assert svc.get("cap_drop") == ["ALL"], name
        assert "no-new-privileges:true" in svc.get("security_opt", []), name
        user = str(svc.get("user", ""))
        if name.startswith("worker"):
            assert user == "0:0" and set(svc.get("cap_add", [])) <= SANDBOX_CAPS, "the worker: uid 0, four caps"
            assert "INTAKE_AUDIT_KEY" not in svc.get("environment", {}) and "INTAKE_SIGNING_KEY" not in svc.get(
                "environment", {}), "a worker never gets a broker key"
        else:
            assert user and user.split(":")[0] not in ("0", "root"), name
            assert not svc.get("cap_add"), name
        for key, value in (svc.get("environment") or {}).items():
            assert not SECRET.search(f"{key}: {value}"), (name, key)


def test_compose_secrets_are_files_and_redis_is_private_and_persistent(compose: dict[str, Any]) -> None:
    assert all(set(s) == {"file"} for s in compose["secrets"].values()), "secrets come from files"
    assert compose["networks"]["backend"].get("internal") is True
    assert compose["services"]["redis"]["networks"] == ["backend"], "Redis is reachable from nowhere else"
    assert "ports" not in compose["services"]["redis"]
    conf = _redis_conf((DEPLOY / "compose" / "redis.conf").read_text())
    _assert_durable(conf)
    caddy = (DEPLOY / "compose" / "Caddyfile").read_text()
    assert "broker-1:8080" in caddy and "broker-2:8080" in caddy and "health_uri /readyz" in caddy


def _redis_conf(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            out[key.lower()] = value.strip()
    return out


def _assert_durable(conf: dict[str, str]) -> None:
    assert conf["appendonly"] == "yes" and conf["appendfsync"] == "always"
    assert conf["save"] == '""', "no RDB snapshots"
    assert conf["maxmemory-policy"] == "noeviction", "an evicted ledger key would be lost state"
    assert "aclfile" in conf


def test_docker_compose_accepts_the_file(tmp_path: Path) -> None:
    tool = shutil.which("docker-compose")
    assert tool, "docker-compose (Debian package docker-compose) is needed to validate deploy/compose.yaml"
    shutil.copytree(DEPLOY, tmp_path / "deploy", ignore=shutil.ignore_patterns("__pycache__"))
    state = tmp_path / "deploy" / "state"
    for rel in ("policy.toml", "worker.toml", "slack_signing_secret", "slack_bot_token", "forge_token",
                "keys/broker_ed25519.pem", "keys/broker_ed25519.pub.pem", "keys/audit.key", "keys/secrets.key",
                "keys/console.key", "keys/workers/worker-1.key", "redis/users.acl", "redis/intake-broker.url",
                "redis/intake-worker-worker-1.url", "redis/intake-readonly.url"):
        (state / rel).parent.mkdir(parents=True, exist_ok=True)
        (state / rel).touch()
    done = subprocess.run([tool, "-f", str(tmp_path / "deploy" / "compose.yaml"), "config", "-q"],
                          env={"PATH": "/usr/bin:/bin", "INTAKE_DOMAIN": "intake.example.com"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    unset = subprocess.run([tool, "-f", str(tmp_path / "deploy" / "compose.yaml"), "config", "-q"],
                           env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=120)
    assert unset.returncode != 0 and "INTAKE_DOMAIN" in unset.stderr, "a missing domain is refused by name"


# -- Kubernetes --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def k8s() -> dict[tuple[str, str], dict[str, Any]]:
    out = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in _docs(path):
            out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


def test_every_manifest_validates_against_the_kubernetes_schema(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    for doc in k8s.values():
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)  # raises, naming the field
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in (DEPLOY / "k8s").glob("*.yaml")} - {"kustomization.yaml"}


def test_the_validator_rejects_a_misspelt_field(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    import copy

    doc = copy.deepcopy(k8s[("Deployment", "intake-broker")])
    doc["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesytem"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def _pod(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["template"]["spec"]


def test_broker_pods_are_non_root_read_only_with_secrets_mounted_read_only(k8s) -> None:  # type: ignore[no-untyped-def]
    broker = k8s[("Deployment", "intake-broker")]
    assert broker["spec"]["replicas"] == 2
    pod = _pod(broker)
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["automountServiceAccountToken"] is False
    for c in pod["containers"]:
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert not [e for e in c.get("env", []) if "valueFrom" in e], "secrets as files, never env"
        for e in c.get("env", []):
            assert not SECRET.search(f"{e['name']}: {e.get('value', '')}"), e["name"]
        secret_volumes = {v["name"] for v in pod["volumes"] if "secret" in v}
        assert secret_volumes == {"keys", "secrets"}
        for m in c["volumeMounts"]:
            if m["name"] in secret_volumes:
                assert m.get("readOnly") is True, m
    assert k8s[("PodDisruptionBudget", "intake-broker")]["spec"]["minAvailable"] == 1
    ingress = k8s[("Ingress", "intake-broker")]
    assert ingress["spec"]["tls"], "TLS terminates at the ingress"


def test_the_worker_pod_gets_only_the_sandbox_capabilities_in_its_own_user_namespace(k8s) -> None:  # type: ignore[no-untyped-def]
    pod = _pod(k8s[("Deployment", "intake-worker")])
    assert pod["hostUsers"] is False, "uid 0 in the pod is an unprivileged uid on the node"
    (c,) = pod["containers"]
    sc = c["securityContext"]
    assert sc["capabilities"]["drop"] == ["ALL"] and set(sc["capabilities"]["add"]) == SANDBOX_CAPS
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert "privileged" not in sc
    names = {e["name"] for e in c["env"]}
    assert not names & {"INTAKE_AUDIT_KEY", "INTAKE_SIGNING_KEY", "INTAKE_SECRETS_KEY", "INTAKE_CONSOLE_KEY"}


def test_network_policy_lets_workers_reach_only_redis_the_forge_and_dns(k8s) -> None:  # type: ignore[no-untyped-def]
    deny = k8s[("NetworkPolicy", "default-deny")]["spec"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny and "egress" not in deny
    worker = k8s[("NetworkPolicy", "worker")]["spec"]
    assert worker["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "intake-worker"}
    assert worker["ingress"] == []
    for rule in worker["egress"]:
        for peer in rule["to"]:
            if "ipBlock" in peer:
                assert peer["ipBlock"]["cidr"] != "0.0.0.0/0", "the forge's addresses, not the internet"
            else:
                assert peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "intake-redis"}
    dns = k8s[("NetworkPolicy", "dns")]["spec"]
    assert {p["port"] for r in dns["egress"] for p in r["ports"]} == {53}
    redis_in = k8s[("NetworkPolicy", "redis")]["spec"]["ingress"][0]["from"]
    assert {p["podSelector"]["matchLabels"]["app.kubernetes.io/name"] for p in redis_in} == {
        "intake-broker", "intake-worker"}


def test_kubernetes_redis_is_persistent_and_never_evicts(k8s) -> None:  # type: ignore[no-untyped-def]
    conf = _redis_conf(k8s[("ConfigMap", "intake-redis-conf")]["data"]["redis.conf"])
    _assert_durable(conf)
    sts = k8s[("StatefulSet", "intake-redis")]
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert _pod(sts)["securityContext"]["runAsNonRoot"] is True


# -- systemd -----------------------------------------------------------------------------------
def _unit(name: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in (DEPLOY / "systemd" / name).read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


@pytest.mark.parametrize("name", ["intake-broker.service", "intake-worker.service"])
def test_systemd_units_are_hardened_and_pass_systemd_analyze(name: str, tmp_path: Path) -> None:
    unit = _unit(name)
    assert unit["User"] == ["intake"] and unit["NoNewPrivileges"] == ["yes"]
    assert unit["ProtectSystem"] == ["strict"] and unit["PrivateTmp"] == ["yes"] and unit["ProtectHome"] == ["yes"]
    for env in unit.get("Environment", []):
        assert not SECRET.search(env), env
    assert all(c.split(":", 1)[1].startswith("/etc/intake/credentials/") for c in unit["LoadCredential"])
    if name == "intake-broker.service":
        assert unit["CapabilityBoundingSet"] == [""] and unit["RestrictNamespaces"] == ["yes"]
    else:
        caps = {c.removeprefix("CAP_") for c in unit["AmbientCapabilities"][0].split()}
        assert caps == SANDBOX_CAPS
        assert {c.removeprefix("CAP_") for c in unit["CapabilityBoundingSet"][0].split()} == SANDBOX_CAPS
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze (Debian package systemd) is needed to verify deploy/systemd"
    copy = tmp_path / name
    intake_bin = Path(sys.executable).parent / "intake"
    copy.write_text((DEPLOY / "systemd" / name).read_text().replace("/opt/intake/bin/intake", str(intake_bin)))
    done = subprocess.run([tool, "verify", str(copy)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and not done.stderr.strip() and not done.stdout.strip(), done.stderr


def test_systemd_analyze_catches_a_misspelt_option(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    assert tool
    copy = tmp_path / "intake-broker.service"
    text = (DEPLOY / "systemd" / "intake-broker.service").read_text()
    copy.write_text(text.replace("/opt/intake/bin/intake", str(Path(sys.executable).parent / "intake"))
                    .replace("ProtectHome=yes", "ProtectHomes=yes"))
    done = subprocess.run([tool, "verify", str(copy)], capture_output=True, text=True, timeout=120)
    assert "ProtectHomes" in done.stderr


# -- Slack app manifest ------------------------------------------------------------------------
#: The scope each Slack Web API method the code calls needs (None: no scope, e.g. views.open
#: rides on a trigger id). A method missing here fails the test: add it with its scope.
METHOD_SCOPES: dict[str, tuple[str, ...]] = {
    "chat_postMessage": ("chat:write",), "chat_postEphemeral": ("chat:write",), "chat_update": ("chat:write",),
    "chat_delete": ("chat:write",),
    "views_open": (), "views_update": (), "views_push": (), "auth_test": (),
    # the approvals channel may be public or private: reading it back needs both
    "conversations_history": ("channels:history", "groups:history"),
    "conversations_replies": ("channels:history", "groups:history"),
    "conversations_open": ("im:write",),
}
EVENT_SCOPES = {"app_mention": "app_mentions:read"}


def _code_needs() -> tuple[set[str], set[str]]:
    """(scopes, events) the code needs, read off the source."""
    source = {p: p.read_text() for p in (REPO_ROOT / "intake").rglob("*.py")}
    methods = {m for text in source.values() for m in re.findall(
        r"\b(?:client|web|slack)\.((?:chat|views|auth|conversations|users|reactions|im)_[A-Za-z]+)\(", text)}
    unknown = methods - METHOD_SCOPES.keys()
    assert not unknown, f"Slack methods without a known scope (add them to METHOD_SCOPES): {unknown}"
    scopes = {s for m in methods for s in METHOD_SCOPES[m]}
    events = {e for text in source.values() for e in re.findall(r"app\.event\(\"([a-z_]+)\"\)", text)}
    scopes |= {EVENT_SCOPES[e] for e in events}
    if any(re.search(r"app\.(command|shortcut)\(", t) for t in source.values()):
        scopes.add("commands")
    # Enrolment links go to the approver's DM with the app as chat.postMessage with the user id as
    # the channel (the app's Messages tab): chat:write, no im:write (that is conversations.open's).
    assert "channel=slack_user" in source[REPO_ROOT / "intake" / "console" / "enrol.py"]
    return scopes, events


@pytest.mark.parametrize("name", ["slack-app-manifest.yaml", "slack-app-manifest.socket.yaml"])
def test_slack_manifest_asks_for_exactly_the_scopes_and_events_the_code_uses(name: str) -> None:
    manifest = yaml.safe_load((DEPLOY / name).read_text())
    scopes, events = _code_needs()
    assert set(manifest["oauth_config"]["scopes"]["bot"]) == scopes
    assert set(manifest["settings"]["event_subscriptions"]["bot_events"]) == events
    (command,) = manifest["features"]["slash_commands"]
    assert command["command"] == "/intake"
    (shortcut,) = manifest["features"]["shortcuts"]
    assert shortcut["callback_id"] == "intake_send" and shortcut["type"] == "message"
    assert manifest["settings"]["interactivity"]["is_enabled"] is True
    assert manifest["features"]["app_home"]["messages_tab_enabled"] is True, "enrolment DMs"
    urls = re.findall(r"https://[^\s\"']+", (DEPLOY / name).read_text().split("\n", 5)[-1])
    if manifest["settings"]["socket_mode_enabled"]:
        assert not urls, "Socket Mode needs no request URL"
    else:
        assert urls and all(u.endswith(SLACK_PATH) for u in urls), urls
