"""Static checks of deploy/: every YAML file parses, and the Kubernetes manifests, the compose
file, the nginx config, the systemd units and the Prometheus rules carry the TLS and proxy
pieces that docs/operations.md ("TLS and proxies") describes, consistently with each other
(names, ports, paths, Secrets) and with the gateway's defaults (proxy timeouts longer than
``heartbeat.idle_timeout``).

Real tools check what they can without a network or a daemon; each is installed from Debian
on demand like redis-server (support/debian.py), and a test whose tool cannot be installed
fails:

- ``nginx -t`` on deploy/nginx/livegate.conf, with a throwaway self-signed certificate, the
  upstream names pointed at 127.0.0.1 and the listener on a free loopback port
  (support/nginx.py; tests/integration/test_deploy_nginx.py runs the same config for real,
  in front of a gateway);
- ``docker-compose config`` (Debian's docker-compose 1.29) validates the compose file without
  a Docker engine. Its ``config`` lists every service whatever the profile, so which services
  a profile starts is checked on the file's structure;
- ``systemd-analyze verify`` on the units (with ExecStart pointed at /bin/true, as the
  gateway is not installed in /opt here).

The Kubernetes manifests are checked structurally only: no validator runs offline here
(kubectl, kubeconform and kustomize are not in Debian). promtool runs the alert rules' unit
tests (deploy/prometheus/alerts_test.yml) in tests/integration/test_observability.py.
"""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.debian import require_program
from support.nginx import NGINX_CONF, NginxSetup

from gateway.config import HeartbeatConfig, ServerConfig

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
COMPOSE = DEPLOY / "docker" / "docker-compose.yml"
SYSTEMD = DEPLOY / "systemd"
PROM = DEPLOY / "prometheus"

IDLE_TIMEOUT = HeartbeatConfig().idle_timeout
PLAIN_PORT = ServerConfig().port
TLS_PORT = 8443  # server.tls.port's default
CERT_DIR = "/etc/gateway/tls"

#: Installing a Debian package may take a while on a fresh machine (3 apt-get runs, 600 s each).
APT_TIMEOUT = pytest.mark.timeout(1900)

YAML_FILES = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml"))


def load_yaml(path: Path) -> list[Any]:
    """Every document of a YAML file (empty ones left out)."""
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def toml_value(text: str) -> Any:
    """A GATEWAY_* environment value read the way gateway.config reads it (TOML, else text)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def cidrs(values: Any, where: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """``values`` as a list of networks; fails on anything that is not a CIDR or trusts everyone."""
    assert isinstance(values, list), f"{where}: trusted_proxies must be a list, got {values!r}"
    nets = []
    for v in values:
        net = ipaddress.ip_network(v, strict=True)  # raises on a typo or host bits set
        assert net.prefixlen > 0, f"{where}: {v} trusts every address, so anyone can claim any client IP"
        nets.append(net)
    return nets


def seconds(value: str) -> float:
    """An nginx time (``120s``, ``2m``, ``120``) or an ingress-nginx annotation (seconds)."""
    m = re.fullmatch(r"(\d+)(ms|s|m|h)?", value.strip())
    assert m, f"not a time: {value!r}"
    return int(m.group(1)) * {"ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600}[m.group(2)]


# ---- every YAML file ---------------------------------------------------------------------------


def test_deploy_has_yaml_files() -> None:
    names = {p.relative_to(DEPLOY).as_posix() for p in YAML_FILES}
    assert {"docker/docker-compose.yml", "kubernetes/gateway.yaml", "kubernetes/ingress.yaml",
            "kubernetes/tls-passthrough.yaml", "prometheus/alerts.yml", "prometheus/alerts_test.yml"} <= names


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_yaml_file_parses(path: Path) -> None:
    docs = load_yaml(path)
    assert docs, f"{path} has no document"
    assert all(isinstance(d, dict) for d in docs), f"{path}: every document must be a mapping"


# ---- Kubernetes ---------------------------------------------------------------------------------


def k8s_objects(*files: str) -> list[dict[str, Any]]:
    paths = [K8S / f for f in files] if files else sorted(K8S.glob("*.y*ml"))
    return [d for p in paths for d in load_yaml(p)]


def one(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def gateway_container() -> dict[str, Any]:
    dep = one(k8s_objects("gateway.yaml"), "Deployment", "gateway")
    (c,) = [c for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == "gateway"]
    return c


def container_port(name: str) -> int:
    (port,) = [p["containerPort"] for p in gateway_container()["ports"] if p["name"] == name]
    return int(port)


def test_kubernetes_documents_are_objects() -> None:
    seen: dict[tuple[str, str], dict[str, Any]] = {}
    for obj in k8s_objects():
        assert obj.get("apiVersion") and obj.get("kind") and obj.get("metadata", {}).get("name"), obj
        key = (obj["kind"], obj["metadata"]["name"])
        # The one object in two files (the Certificate of ingress.yaml and tls-passthrough.yaml)
        # must be the same object, or applying both files would flip it.
        assert key not in seen or seen[key] == obj, f"{key} differs between files"
        seen[key] = obj
    assert {k for k, _ in seen} >= {"ConfigMap", "Deployment", "Service", "NetworkPolicy", "Ingress", "Certificate", "ClusterIssuer"}


def test_ingress_serves_tls_from_a_cert_manager_certificate() -> None:
    objs = k8s_objects("ingress.yaml")
    ing = one(objs, "Ingress")
    assert ing["apiVersion"] == "networking.k8s.io/v1"
    assert ing["spec"]["ingressClassName"] == "nginx"
    (tls,) = ing["spec"]["tls"]
    cert = one(objs, "Certificate")
    assert cert["apiVersion"] == "cert-manager.io/v1"
    assert cert["spec"]["secretName"] == tls["secretName"], "the Ingress must serve the Secret the Certificate fills"
    assert set(tls["hosts"]) <= set(cert["spec"]["dnsNames"])
    assert {r["host"] for r in ing["spec"]["rules"]} <= set(tls["hosts"]), "a host without TLS"
    issuer = one(k8s_objects("cluster-issuer.example.yaml"), "ClusterIssuer")
    assert cert["spec"]["issuerRef"]["kind"] == "ClusterIssuer"
    assert cert["spec"]["issuerRef"]["name"] == issuer["metadata"]["name"]
    assert issuer["spec"]["acme"]["solvers"], "the example issuer has no solver"

    # The backend is the gateway's plain listener.
    svc = one(k8s_objects("gateway.yaml"), "Service", "gateway")
    for rule in ing["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            backend = path["backend"]["service"]
            assert backend["name"] == "gateway"
            (port,) = [p for p in svc["spec"]["ports"] if p["name"] == backend["port"]["name"]]
            assert container_port(port["targetPort"]) == PLAIN_PORT


def test_ingress_timeouts_outlast_the_idle_timeout() -> None:
    ann = one(k8s_objects("ingress.yaml"), "Ingress")["metadata"]["annotations"]
    for key in ("proxy-read-timeout", "proxy-send-timeout"):
        value = seconds(ann[f"nginx.ingress.kubernetes.io/{key}"])
        assert value > IDLE_TIMEOUT, f"{key} {value}s would cut sockets the gateway keeps ({IDLE_TIMEOUT}s idle timeout)"
    assert ann["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"


def test_kubernetes_gateway_trusts_only_listed_proxies() -> None:
    cm = one(k8s_objects("gateway.yaml"), "ConfigMap", "gateway-config")
    config = tomllib.loads(cm["data"]["gateway.toml"])
    assert cidrs(config["server"]["trusted_proxies"], "gateway.yaml"), "the ingress pods' CIDR is missing"
    assert not config["server"].get("tls", {}).get("cert_file"), "behind the Ingress the gateway serves plain ws://"


def test_tls_passthrough_service_reaches_the_gateway_tls_listener() -> None:
    objs = k8s_objects("tls-passthrough.yaml")
    svc = one(objs, "Service")
    assert svc["spec"]["type"] == "LoadBalancer"
    (port,) = svc["spec"]["ports"]
    assert port["port"] == 443 and port.get("protocol", "TCP") == "TCP"
    assert port["targetPort"] == "wss"
    assert svc["spec"]["selector"] == one(k8s_objects("gateway.yaml"), "Deployment")["spec"]["selector"]["matchLabels"]

    env = one(objs, "ConfigMap", "gateway-tls-passthrough")["data"]
    assert all(isinstance(v, str) for v in env.values()), "ConfigMap values must be strings"
    assert toml_value(env.get("GATEWAY_SERVER__TLS__PORT", str(TLS_PORT))) == container_port("wss") == TLS_PORT
    assert isinstance(toml_value(env["GATEWAY_SERVER__TLS__PROXY_PROTOCOL"]), bool)
    assert isinstance(toml_value(env["GATEWAY_SERVER__TLS__WATCH_INTERVAL"]), int)
    trusted = cidrs(toml_value(env["GATEWAY_SERVER__TRUSTED_PROXIES"]), "tls-passthrough.yaml")
    if toml_value(env["GATEWAY_SERVER__TLS__PROXY_PROTOCOL"]):
        assert trusted, "PROXY protocol without trusted_proxies believes any peer's header"

    # The Deployment reads that ConfigMap, and the files it names come from the Certificate's
    # Secret through a volume that follows updates (no subPath).
    c = gateway_container()
    assert {"configMapRef": {"name": "gateway-tls-passthrough", "optional": True}} in c["envFrom"]
    secret = one(objs, "Certificate")["spec"]["secretName"]
    dep = one(k8s_objects("gateway.yaml"), "Deployment")
    files: dict[str, str] = {}  # path in the container -> key of the Secret
    for vol in dep["spec"]["template"]["spec"]["volumes"]:
        if "secret" in vol:  # a secret volume: every key (or the listed items)
            sources = [{"name": vol["secret"]["secretName"], "items": vol["secret"].get("items")}]
        else:  # a projected volume: its secret sources
            sources = [src["secret"] for src in vol.get("projected", {}).get("sources", []) if "secret" in src]
        for src in sources:
            if src["name"] != secret:
                continue
            items = src["items"] or [{"key": k, "path": k} for k in ("tls.crt", "tls.key")]
            for mount in c["volumeMounts"]:
                if mount["name"] == vol["name"]:
                    assert "subPath" not in mount, "a subPath mount never sees the renewed certificate"
                    for item in items:
                        files[f"{mount['mountPath']}/{item['path']}"] = item["key"]
    assert files.get(env["GATEWAY_SERVER__TLS__CERT_FILE"]) == "tls.crt"
    assert files.get(env["GATEWAY_SERVER__TLS__KEY_FILE"]) == "tls.key"

    policy = one(k8s_objects("gateway.yaml"), "NetworkPolicy")
    open_ports = {p["port"] for rule in policy["spec"]["ingress"] if "from" not in rule for p in rule["ports"]}
    assert {PLAIN_PORT, TLS_PORT} <= open_ports


# ---- docker compose -----------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    (doc,) = load_yaml(COMPOSE)
    return doc


def ports(svc: dict[str, Any]) -> set[tuple[int, int]]:
    out = set()
    for p in svc.get("ports", []):
        host, _, container = str(p).rpartition(":")
        out.add((int(host.rpartition(":")[2]), int(container)))
    return out


def test_compose_serves_wss_on_443_with_a_read_only_certificate() -> None:
    services = compose()["services"]
    assert services["redis"]["image"].startswith("redis:"), "the Redis broker the nodes share"
    default = {n: s for n, s in services.items() if not s.get("profiles")}
    gateways = {n: s for n, s in default.items() if n.startswith("gateway")}
    assert len(gateways) >= 2
    published: list[int] = []
    for name, svc in gateways.items():
        env = svc["environment"]
        tls_port = toml_value(env.get("GATEWAY_SERVER__TLS__PORT", str(TLS_PORT)))
        assert env["GATEWAY_SERVER__TLS__CERT_FILE"].startswith(CERT_DIR + "/"), name
        assert env["GATEWAY_SERVER__TLS__KEY_FILE"].startswith(CERT_DIR + "/"), name
        assert f"./certs:{CERT_DIR}:ro" in svc["volumes"], f"{name}: mount the certificate read-only"
        assert {c for _, c in ports(svc)} == {tls_port}, f"{name}: publish the TLS listener only"
        assert env["GATEWAY_AUTH__SECRET"].startswith("${GATEWAY_AUTH__SECRET:?"), "no default JWT secret"
        published += [h for h, _ in ports(svc)]
    assert 443 in published
    assert len(published) == len(set(published)), "two services on one host port"
    ignored = (COMPOSE.parent / ".gitignore").read_text().split()
    assert "certs/" in ignored, "the certificate directory must be git-ignored"


def test_compose_nginx_profile_terminates_tls_for_plain_gateways() -> None:
    doc = compose()
    services = doc["services"]
    nginx = services["nginx"]
    assert nginx["profiles"] == ["nginx"]
    assert ports(nginx) == {(443, 443)}
    mounts = {v.split(":")[1]: v for v in nginx["volumes"]}
    conf_src = mounts["/etc/nginx/conf.d/default.conf"].split(":")[0]
    assert (COMPOSE.parent / conf_src).resolve() == NGINX_CONF, "nginx must load deploy/nginx/livegate.conf"
    assert mounts["/etc/nginx/tls"] == "./certs:/etc/nginx/tls:ro"
    for directive in ("ssl_certificate", "ssl_certificate_key"):
        (path,) = [args[0] for name, args, _ in walk(nginx_tree(NGINX_CONF.read_text())) if name == directive]
        assert path.startswith("/etc/nginx/tls/"), f"{directive} {path} is not in the mounted directory"

    # The gateways behind it: in the profile, nothing published, the plain port proxied to,
    # X-Forwarded-For believed from the compose network only.
    behind = {n: s for n, s in services.items() if n.startswith("gateway") and s.get("profiles") == ["nginx"]}
    assert behind and set(nginx["depends_on"]) == set(behind)
    subnets = [ipaddress.ip_network(c["subnet"]) for c in doc["networks"]["default"]["ipam"]["config"]]
    for name, svc in behind.items():
        assert not svc.get("ports"), f"{name} must be reachable through nginx only"
        env = svc["environment"]
        assert "GATEWAY_SERVER__TLS__CERT_FILE" not in env, f"{name}: nginx terminates TLS"
        assert cidrs(toml_value(env["GATEWAY_SERVER__TRUSTED_PROXIES"]), name) == subnets
    upstream = [args[0] for name, args, _ in walk(nginx_tree(NGINX_CONF.read_text()), within="upstream") if name == "server"]
    assert sorted(upstream) == sorted(f"{n}:{PLAIN_PORT}" for n in behind)


def docker_compose(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    exe = require_program("docker-compose", "docker-compose", recommends=False)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "COMPOSE_", "DOCKER_"))}
    return subprocess.run([exe, "-f", str(COMPOSE), *args], env={**base, **(env or {})}, cwd=COMPOSE.parent,
                          capture_output=True, text=True, timeout=60, check=False)


@APT_TIMEOUT
def test_compose_file_passes_docker_compose_config() -> None:
    secrets = {"GATEWAY_AUTH__SECRET": "test-secret", "GATEWAY_API__API_KEY": "test-key"}
    for profile in ([], ["--profile", "nginx"]):
        p = docker_compose(*profile, "config", env=secrets)
        assert p.returncode == 0, f"docker-compose {' '.join(profile)} config:\n{p.stderr}"
        services = yaml.safe_load(p.stdout)["services"]
        gw = services["gateway-1"]
        assert {"published": 443, "target": TLS_PORT} in gw["ports"]
        assert any(v.endswith(f":{CERT_DIR}:ro") for v in gw["volumes"])
        assert gw["environment"]["GATEWAY_AUTH__SECRET"] == "test-secret"
        assert services["nginx"]["profiles"] == ["nginx"]
    # The secrets have no default: without them the file does not load.
    p = docker_compose("config", "-q")
    assert p.returncode != 0 and "set a JWT secret" in p.stderr, p.stderr


# ---- nginx --------------------------------------------------------------------------------------

Directive = tuple[str, list[str], list[Any] | None]


def nginx_tree(text: str) -> list[Directive]:
    """nginx config text as (name, args, children or None) directives; comments dropped."""
    tokens = re.findall(r"'[^']*'|\"[^\"]*\"|[{};]|[^\s{};]+", re.sub(r"(?m)#.*$", "", text))

    def block(i: int) -> tuple[list[Directive], int]:
        out: list[Directive] = []
        words: list[str] = []
        while i < len(tokens):
            t = tokens[i]
            i += 1
            if t == ";":
                out.append((words[0], words[1:], None))
                words = []
            elif t == "{":
                children, i = block(i)
                out.append((words[0], words[1:], children))
                words = []
            elif t == "}":
                assert not words, f"unterminated directive {words}"
                return out, i
            else:
                words.append(t.strip("'\"") if t[0] in "'\"" else t)
        assert not words, f"unterminated directive {words}"
        return out, i

    tree, end = block(0)
    assert end == len(tokens), "unbalanced braces"
    return tree


def walk(tree: list[Directive], within: str | None = None, _inside: bool = False) -> list[Directive]:
    """Every directive, recursively; with ``within``, only those inside a block of that name."""
    out = []
    for name, args, children in tree:
        if _inside or within is None:
            out.append((name, args, children))
        if children is not None:
            out += walk(children, within, _inside or name == within)
    return out


def find_block(tree: list[Directive], name: str, *args: str) -> list[Directive]:
    found = [c for n, a, c in walk(tree) if n == name and c is not None and (not args or tuple(a) == args)]
    assert len(found) == 1, f"expected one {name} {' '.join(args)} block, found {len(found)}"
    return found[0]


def test_nginx_config_proxies_websockets() -> None:
    tree = nginx_tree(NGINX_CONF.read_text())
    upgrade_map = {n: a[0] for n, a, _ in find_block(tree, "map", "$http_upgrade", "$connection_upgrade")}
    assert upgrade_map == {"default": "upgrade", "": "close"}
    (server,) = [c for n, _, c in tree if n == "server" and c and any(d[0] == "listen" and "443" in d[1] for d in c)]
    settings = {n: a for n, a, _ in server}
    assert "ssl" in settings["listen"]
    assert settings["ssl_protocols"] == ["TLSv1.2", "TLSv1.3"], "TLS 1.2 and 1.3 only"
    location = find_block(server, "location", "/")
    d = {n: a for n, a, _ in location}
    headers = {a[0].lower(): a[1] for n, a, _ in location if n == "proxy_set_header"}
    upstreams = {a[0] for n, a, _ in tree if n == "upstream"}
    assert d["proxy_pass"][0].removeprefix("http://") in upstreams, "proxy_pass must go to the gateways' plain listeners"
    assert d["proxy_http_version"] == ["1.1"], "WebSocket upgrades need HTTP/1.1 to the upstream"
    assert headers["upgrade"] == "$http_upgrade"
    assert headers["connection"] == "$connection_upgrade"
    assert headers["x-real-ip"] == "$remote_addr"
    assert headers["x-forwarded-for"] == "$remote_addr", "the edge overwrites X-Forwarded-For: clients' own values are not passed on"
    for key in ("proxy_read_timeout", "proxy_send_timeout"):
        assert seconds(d[key][0]) > IDLE_TIMEOUT, f"{key} must outlast heartbeat.idle_timeout ({IDLE_TIMEOUT}s)"
    assert d["proxy_buffering"] == ["off"]


@APT_TIMEOUT
def test_nginx_config_passes_nginx_t(tmp_path: Path) -> None:
    p = NginxSetup(tmp_path).test_config()
    assert p.returncode == 0 and "test is successful" in p.stderr, f"nginx -t failed:\n{p.stderr}"
    # The harness itself catches a broken config (so a pass above means something).
    broken = NGINX_CONF.read_text().replace("proxy_buffering off;", "proxy_buffering sideways;")
    assert NginxSetup(tmp_path / "broken", broken).test_config().returncode != 0


# ---- systemd ------------------------------------------------------------------------------------


def unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file as {section: {key: [values]}} (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        assert current is not None, f"{path}: {line!r} outside a section"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_systemd_units_reload_on_sighup_and_on_certificate_change() -> None:
    service = unit(SYSTEMD / "gateway.service")["Service"]
    assert service["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert service["Environment"] == ["GATEWAY_CONFIG=/etc/gateway/gateway.toml"]
    watch = unit(SYSTEMD / "gateway-cert.path")
    (watched,) = watch["Path"].get("PathChanged", []) + watch["Path"].get("PathModified", [])
    assert watched.startswith(CERT_DIR + "/"), watched
    (target,) = watch["Path"].get("Unit", ["gateway-cert.service"])
    assert watch["Install"]["WantedBy"] == ["multi-user.target"]
    reload = unit(SYSTEMD / target)["Service"]
    assert reload["Type"] == ["oneshot"]
    (cmd,) = reload["ExecStart"]
    assert re.fullmatch(r"/(usr/)?bin/systemctl (reload|try-reload-or-restart) gateway(\.service)?", cmd), cmd
    assert "--deploy-hook" in (SYSTEMD / "gateway-cert.path").read_text(), "the certbot example"


@APT_TIMEOUT
def test_systemd_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    exe = require_program("systemd-analyze", "systemd")
    names = sorted(p.name for p in SYSTEMD.iterdir() if p.suffix in (".service", ".path"))
    assert {"gateway.service", "gateway-cert.path", "gateway-cert.service"} <= set(names)
    for name in names:
        text = (SYSTEMD / name).read_text().replace("/opt/gateway/venv/bin/gateway", "/bin/true")
        (tmp_path / name).write_text(text)
    p = subprocess.run([exe, "verify", "--man=no", *(str(tmp_path / n) for n in names)],
                       capture_output=True, text=True, timeout=60, check=False)
    out = p.stdout + p.stderr
    assert p.returncode == 0 and not re.search(r"(?i)unknown|ignoring|bad|refusing", out), f"systemd-analyze verify:\n{out}"


# ---- Prometheus ---------------------------------------------------------------------------------


def test_prometheus_alerts_cover_tls_expiry_and_reloads() -> None:
    (doc,) = load_yaml(PROM / "alerts.yml")
    rules = {r["alert"]: r for g in doc["groups"] for r in g["rules"]}
    expiry = rules["GatewayTLSCertExpiringSoon"]
    assert " ".join(expiry["expr"].split()) == "gateway_tls_cert_expiry_timestamp_seconds - time() < 14 * 86400"
    failed = " ".join(rules["GatewayTLSReloadFailed"]["expr"].split())
    assert failed.startswith("increase(") and 'gateway_tls_reloads_total{result="error"}' in failed
    # Each has a promtool unit test that sees it fire and sees it quiet (run by
    # tests/integration/test_observability.py).
    (tests,) = load_yaml(PROM / "alerts_test.yml")
    for name in ("GatewayTLSCertExpiringSoon", "GatewayTLSReloadFailed"):
        cases = [c for t in tests["tests"] for c in t.get("alert_rule_test", []) if c["alertname"] == name]
        assert any(c["exp_alerts"] for c in cases) and any(not c["exp_alerts"] for c in cases), name


def test_prometheus_alerts_cover_the_store_and_the_outbox() -> None:
    (doc,) = load_yaml(PROM / "alerts.yml")
    rules = {r["alert"]: " ".join(r["expr"].split()) for g in doc["groups"] for r in g["rules"]}
    assert rules["GatewayOutboxLagging"].startswith("gateway_outbox_lag_seconds >")
    assert "gateway_outbox_dead_letters_total" in rules["GatewayOutboxDeadLetters"]
    assert "gateway_store_unavailable_total" in rules["GatewayStoreUnavailable"]
    (tests,) = load_yaml(PROM / "alerts_test.yml")
    for name in ("GatewayOutboxLagging", "GatewayOutboxDeadLetters", "GatewayStoreUnavailable"):
        cases = [c for t in tests["tests"] for c in t.get("alert_rule_test", []) if c["alertname"] == name]
        assert any(c["exp_alerts"] for c in cases) and any(not c["exp_alerts"] for c in cases), name


# ---- docs ---------------------------------------------------------------------------------------


def test_operations_doc_names_every_tls_setting_and_metric() -> None:
    text = (ROOT / "docs" / "operations.md").read_text()
    assert "## TLS and proxies" in text
    for name in ("server.proxy_protocol", "server.trusted_proxies", "server.tls.cert_file", "server.tls.key_file",
                 "server.tls.host", "server.tls.port", "server.tls.proxy_protocol", "server.tls.watch_interval",
                 "SIGHUP", "gateway_tls_cert_expiry_timestamp_seconds", "gateway_tls_reloads_total",
                 "gateway_tls_handshakes_total", "gateway_tls_handshake_failures_total", "GatewayTLSCertExpiringSoon",
                 "gateway-cert.path", "X-Forwarded-For", "PROXY protocol"):
        assert name in text, f"docs/operations.md does not mention {name}"
