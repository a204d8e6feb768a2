#!/usr/bin/env python3
"""Checks of the deployment files that JSON schemas cannot express; scripts/validate-deploy.sh
runs it on every rendered overlay after the schema validation.

Kubernetes (per rendered overlay):
  - every container: readiness and liveness probes, cpu/memory requests and limits, non-root,
    read-only root filesystem, no privilege escalation, all capabilities dropped, seccomp
    RuntimeDefault, a pinned image tag; pods do not mount a service-account token;
  - the shared ConfigMap holds a bridge.toml that parses, is mounted where `--config` points,
    and agrees with the manifests: listen ports = containerPorts, producer
    terminationGracePeriodSeconds > producer.shutdown_grace_secs + margin, gateway grace
    covers preStop + drain, the ingress read timeout far above gateway.keepalive_secs, no
    anonymous auth;
  - HPAs, PDBs, Services and Prometheus annotations point at things that exist; gateway and
    producer scale on separate HPAs; HPA-managed Deployments leave `replicas` unset;
  - no Secret is rendered and no secret-looking env var has a literal value; the ingress
    publishes no ops endpoint (/metrics, /healthz, /readyz).
docker-compose: the expected services, built from deploy/Dockerfile targets that exist, the
same config file mounted, hardened like the pods, ports and grace periods matching the config.
Dockerfile: one stage per service, EXPOSE = configured port, numeric non-root USER.
Secret example: placeholders only.

Prints every finding (not just the first) and exits 1 if there is any.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

import yaml

SERVICES = ("gateway", "producer", "processor", "mock-llm")
# Config section holding each service's `addr`.
ADDR_SECTION = {"gateway": "gateway", "producer": "producer", "processor": "processor",
                "mock-llm": "mock_llm"}
# Services that use Redis and therefore serve /readyz (mock-llm only has /healthz).
REDIS_SERVICES = ("gateway", "producer", "processor")
CONFIG_MAP = "bridge-config"
CONFIG_KEY = "bridge.toml"
# Seconds a pod must outlive producer.shutdown_grace_secs: the claim loop notices SIGTERM,
# the last writes and acks reach Redis, the ops server stops.
PRODUCER_MARGIN_SECS = 5
# The gateway drains its HTTP server within this many seconds of SIGTERM (actix
# shutdown_timeout in services/gateway).
GATEWAY_DRAIN_SECS = 5
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet")
SECRETISH = re.compile(r"(SECRET|PASSWORD|TOKEN|API_KEY|_KEY$|CREDENTIAL)", re.I)


class Findings:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, where: str, message: str) -> None:
        self.items.append(f"{where}: {message}")


def load_yaml_docs(path: Path) -> list[dict]:
    with path.open() as f:
        return [d for d in yaml.safe_load_all(f) if d]


def name_of(obj: dict) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def app_name(labels: dict | None) -> str | None:
    return (labels or {}).get("app.kubernetes.io/name")


def selector_matches(selector: dict, labels: dict) -> bool:
    wanted = selector.get("matchLabels", selector) if isinstance(selector, dict) else {}
    return bool(wanted) and all(labels.get(k) == v for k, v in wanted.items())


def seconds(value: object) -> float | None:
    """A compose duration ("35s", "1m30s", "500ms") or a number, in seconds."""
    if isinstance(value, (int, float)):
        return float(value)
    if not isinstance(value, str):
        return None
    total, rest = 0.0, value.strip()
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", rest):
        total += float(number) * {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}[unit]
    return total if re.fullmatch(r"((\d+(\.\d+)?)(ms|us|h|m|s))+", rest) else None


def port_of(addr: str) -> int | None:
    match = re.fullmatch(r".*:(\d+)", addr or "")
    return int(match.group(1)) if match else None


def config_port(config: dict, service: str) -> int | None:
    return port_of(config.get(ADDR_SECTION[service], {}).get("addr", ""))


# --- Kubernetes ----------------------------------------------------------------------------


def check_container(where: str, c: dict, pod_sc: dict, is_init: bool, out: Findings) -> None:
    where = f"{where} container {c.get('name')}"
    if not is_init:
        for probe in ("readinessProbe", "livenessProbe"):
            if not c.get(probe):
                out.add(where, f"has no {probe}")
    resources = c.get("resources") or {}
    for part in ("requests", "limits"):
        for res in ("cpu", "memory"):
            if not (resources.get(part) or {}).get(res):
                out.add(where, f"has no resources.{part}.{res}")
    sc = c.get("securityContext") or {}
    if not (sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True):
        out.add(where, "securityContext.runAsNonRoot is not true (container or pod)")
    if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
        out.add(where, "runs as UID 0")
    if sc.get("readOnlyRootFilesystem") is not True:
        out.add(where, "securityContext.readOnlyRootFilesystem is not true")
    if sc.get("allowPrivilegeEscalation") is not False:
        out.add(where, "securityContext.allowPrivilegeEscalation is not false")
    if sc.get("privileged"):
        out.add(where, "is privileged")
    caps = sc.get("capabilities") or {}
    if "ALL" not in (caps.get("drop") or []):
        out.add(where, "securityContext.capabilities.drop does not contain ALL")
    if caps.get("add"):
        out.add(where, f"adds capabilities {caps['add']}")
    seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
    if seccomp not in ("RuntimeDefault", "Localhost"):
        out.add(where, "seccompProfile.type is not RuntimeDefault (container or pod)")
    image = c.get("image", "")
    last = image.rsplit("/", 1)[-1]
    if "@sha256:" not in image and (":" not in last or last.endswith(":latest")):
        out.add(where, f"image {image!r} is not pinned to a tag or digest (or is :latest)")
    for env in c.get("env") or []:
        if "value" in env and SECRETISH.search(env.get("name", "")) and \
                not env["name"].endswith(("_FILE", "_KID", "_ENV")):
            out.add(where, f"env {env['name']} has a literal value; take it from a Secret")


def probe_path(c: dict, probe: str) -> str | None:
    return ((c.get(probe) or {}).get("httpGet") or {}).get("path")


def container_ports(pod: dict) -> dict[str, int]:
    ports = {}
    for c in pod.get("containers") or []:
        for p in c.get("ports") or []:
            ports[p.get("name") or str(p["containerPort"])] = p["containerPort"]
    return ports


def check_overlay(overlay: str, path: Path, out: Findings) -> None:
    docs = load_yaml_docs(path)
    where = f"overlay {overlay}"
    by_kind: dict[str, list[dict]] = {}
    for d in docs:
        by_kind.setdefault(d.get("kind", "?"), []).append(d)

    for secret in by_kind.get("Secret", []):
        out.add(where, f"renders {name_of(secret)}: Secrets are created out of band, never "
                       "kept in k8s/ (see k8s/base/secret.example.yaml)")

    # The shared config.
    config: dict = {}
    config_name = None
    maps = [m for m in by_kind.get("ConfigMap", [])
            if m["metadata"]["name"].startswith(CONFIG_MAP)]
    if len(maps) != 1:
        out.add(where, f"expected exactly one ConfigMap {CONFIG_MAP}(-hash), found {len(maps)}")
    else:
        config_name = maps[0]["metadata"]["name"]
        text = (maps[0].get("data") or {}).get(CONFIG_KEY)
        if text is None:
            out.add(where, f"ConfigMap {config_name} has no key {CONFIG_KEY}")
        else:
            try:
                config = tomllib.loads(text)
            except tomllib.TOMLDecodeError as e:
                out.add(where, f"ConfigMap {config_name}/{CONFIG_KEY} is not valid TOML: {e}")
    if config.get("auth", {}).get("allow_anonymous") is True:
        out.add(where, "bridge.toml sets auth.allow_anonymous = true (development only)")

    workloads = [w for k in WORKLOAD_KINDS for w in by_kind.get(k, [])]
    pods = {}  # app name -> (workload, pod spec)
    for w in workloads:
        wname = f"{where} {name_of(w)}"
        template = w["spec"]["template"]
        pod = template["spec"]
        pods[app_name(template["metadata"].get("labels"))] = (w, pod)
        pod_sc = pod.get("securityContext") or {}
        if pod.get("automountServiceAccountToken") is not False:
            out.add(wname, "automountServiceAccountToken is not false (no pod needs the API)")
        if pod.get("hostNetwork") or pod.get("hostPID") or pod.get("hostIPC"):
            out.add(wname, "uses host namespaces")
        for c in pod.get("containers") or []:
            check_container(wname, c, pod_sc, False, out)
        for c in pod.get("initContainers") or []:
            check_container(wname, c, pod_sc, True, out)
        annotations = template["metadata"].get("annotations") or {}
        if annotations.get("prometheus.io/scrape") == "true":
            port = annotations.get("prometheus.io/port", "")
            if not port.isdigit() or int(port) not in container_ports(pod).values():
                out.add(wname, f"prometheus.io/port {port!r} is not a containerPort")
            if annotations.get("prometheus.io/path") != "/metrics":
                out.add(wname, "prometheus.io/path is not /metrics")

    # The four services against the config.
    for service in SERVICES:
        if service not in pods:
            if service != "mock-llm":
                out.add(where, f"no workload for {service}")
            continue
        w, pod = pods[service]
        wname = f"{where} {name_of(w)}"
        c = (pod.get("containers") or [{}])[0]
        args = c.get("args") or []
        if "--config" not in args or args.index("--config") + 1 >= len(args):
            out.add(wname, "container args do not pass --config PATH")
            continue
        config_path = args[args.index("--config") + 1]
        volumes = {v["name"]: v for v in pod.get("volumes") or []}
        mounted = False
        for m in c.get("volumeMounts") or []:
            v = volumes.get(m["name"], {})
            cm = (v.get("configMap") or {}).get("name")
            if cm == config_name and config_path == f"{m['mountPath'].rstrip('/')}/{CONFIG_KEY}":
                mounted = True
        if not mounted:
            out.add(wname, f"--config {config_path} is not the mounted ConfigMap {config_name}"
                           f"/{CONFIG_KEY}")
        want = config_port(config, service)
        http = container_ports(pod).get("http")
        addr = config.get(ADDR_SECTION[service], {}).get("addr", "")
        if want is None or http != want:
            out.add(wname, f"containerPort http ({http}) differs from "
                           f"{ADDR_SECTION[service]}.addr ({addr or 'unset'}) in bridge.toml")
        if not addr.startswith("0.0.0.0:"):
            out.add(wname, f"{ADDR_SECTION[service]}.addr {addr!r} must bind 0.0.0.0 in a pod")
        readiness = probe_path(c, "readinessProbe")
        if service in REDIS_SERVICES and readiness != "/readyz":
            out.add(wname, f"readinessProbe path is {readiness!r}, expected /readyz")
        if probe_path(c, "livenessProbe") != "/healthz":
            out.add(wname, "livenessProbe path is not /healthz (liveness must not depend on "
                           "Redis)")

    # SIGTERM handling.
    if "producer" in pods:
        w, pod = pods["producer"]
        grace = config.get("producer", {}).get("shutdown_grace_secs")
        tgps = pod.get("terminationGracePeriodSeconds", 30)
        if not isinstance(grace, int):
            out.add(where, "bridge.toml must set producer.shutdown_grace_secs explicitly (the "
                           "producer's terminationGracePeriodSeconds is checked against it)")
        elif tgps <= grace + PRODUCER_MARGIN_SECS:
            out.add(f"{where} {name_of(w)}",
                    f"terminationGracePeriodSeconds {tgps} must exceed "
                    f"producer.shutdown_grace_secs {grace} + {PRODUCER_MARGIN_SECS} s, or "
                    "Kubernetes kills in-flight requests before the producer hands them back")
    if "gateway" in pods:
        w, pod = pods["gateway"]
        c = pod["containers"][0]
        sleep = (((c.get("lifecycle") or {}).get("preStop") or {}).get("sleep") or {}) \
            .get("seconds", 0)
        tgps = pod.get("terminationGracePeriodSeconds", 30)
        if tgps <= sleep + GATEWAY_DRAIN_SECS:
            out.add(f"{where} {name_of(w)}",
                    f"terminationGracePeriodSeconds {tgps} must exceed preStop sleep {sleep} s "
                    f"+ drain {GATEWAY_DRAIN_SECS} s")
        check_gateway_auth(f"{where} {name_of(w)}", by_kind, pod, out)

    # HPAs: targets exist, one per scaled service, and nothing fights them over replicas.
    targets: dict[str, str] = {}
    for hpa in by_kind.get("HorizontalPodAutoscaler", []):
        ref = hpa["spec"]["scaleTargetRef"]
        hname = f"{where} {name_of(hpa)}"
        match = [w for w in workloads
                 if w["kind"] == ref["kind"] and w["metadata"]["name"] == ref["name"]]
        if not match:
            out.add(hname, f"scaleTargetRef {ref['kind']}/{ref['name']} does not exist")
            continue
        if ref["name"] in targets:
            out.add(hname, f"{ref['name']} is also scaled by {targets[ref['name']]}")
        targets[ref["name"]] = name_of(hpa)
        if "replicas" in match[0]["spec"]:
            out.add(hname, f"{ref['kind']}/{ref['name']} sets spec.replicas; an HPA-managed "
                           "Deployment must not (every apply would reset the count)")
        if hpa["spec"].get("minReplicas", 1) > hpa["spec"]["maxReplicas"]:
            out.add(hname, "minReplicas > maxReplicas")
    for scaled in ("gateway", "producer"):
        if scaled not in targets:
            out.add(where, f"{scaled} has no HorizontalPodAutoscaler of its own")

    # PDBs and Services select real pods; Services target real ports.
    templates = [(w, w["spec"]["template"]) for w in workloads]
    for pdb in by_kind.get("PodDisruptionBudget", []):
        if not any(selector_matches(pdb["spec"].get("selector", {}),
                                    t["metadata"].get("labels") or {}) for _, t in templates):
            out.add(f"{where} {name_of(pdb)}", "selector matches no pod template")
    services = {s["metadata"]["name"]: s for s in by_kind.get("Service", [])}
    for s in services.values():
        sname = f"{where} {name_of(s)}"
        matched = [t for _, t in templates
                   if selector_matches(s["spec"].get("selector") or {},
                                       t["metadata"].get("labels") or {})]
        if not matched:
            out.add(sname, "selector matches no pod template")
            continue
        ports = container_ports(matched[0]["spec"])
        for p in s["spec"].get("ports") or []:
            target = p.get("targetPort", p["port"])
            if (isinstance(target, str) and target not in ports) or \
                    (isinstance(target, int) and target not in ports.values()):
                out.add(sname, f"targetPort {target!r} is no containerPort of the selected pods")

    # The ingress: routes to a real Service port and keeps SSE streaming.
    keepalive = config.get("gateway", {}).get("keepalive_secs")
    for ing in by_kind.get("Ingress", []):
        iname = f"{where} {name_of(ing)}"
        annotations = ing["metadata"].get("annotations") or {}
        if ing["spec"].get("ingressClassName") == "nginx":
            prefix = "nginx.ingress.kubernetes.io/"
            if annotations.get(prefix + "proxy-buffering") != "off":
                out.add(iname, "nginx proxy-buffering is not \"off\": SSE tokens would be held "
                               "back in nginx buffers")
            timeout = annotations.get(prefix + "proxy-read-timeout", "60")
            if not isinstance(keepalive, int):
                out.add(where, "bridge.toml must set gateway.keepalive_secs explicitly (the "
                               "ingress read timeout is checked against it)")
            elif not timeout.isdigit() or int(timeout) < 4 * keepalive:
                out.add(iname, f"proxy-read-timeout {timeout!r} is not at least 4 x "
                               f"gateway.keepalive_secs ({keepalive}): idle SSE streams would "
                               "be cut")
        for rule in ing["spec"].get("rules") or []:
            for p in (rule.get("http") or {}).get("paths") or []:
                ops = [o for o in ("/metrics", "/healthz", "/readyz")
                       if o == p["path"] or
                       (p.get("pathType") != "Exact" and o.startswith(p["path"]))]
                if ops:
                    out.add(iname, f"path {p['path']} ({p.get('pathType')}) publishes "
                                   f"{', '.join(ops)}; route /api and exact paths only")
                backend = p["backend"]["service"]
                svc = services.get(backend["name"])
                port = backend.get("port", {})
                if svc is None:
                    out.add(iname, f"backend Service {backend['name']} does not exist")
                elif not any(sp.get("name") == port.get("name") or
                             sp["port"] == port.get("number") for sp in svc["spec"]["ports"]):
                    out.add(iname, f"backend port {port} is not a port of {backend['name']}")


def check_gateway_auth(where: str, by_kind: dict, pod: dict, out: Findings) -> None:
    """Every gateway replica must sign stream tokens with one shared secret, and the API-key
    file must be a mounted Secret."""
    c = pod["containers"][0]
    env = {e["name"]: e for e in c.get("env") or []}
    token = env.get("BRIDGE__AUTH__STREAM_TOKEN_SECRET", {})
    ref = (token.get("valueFrom") or {}).get("secretKeyRef")
    if not ref:
        out.add(where, "BRIDGE__AUTH__STREAM_TOKEN_SECRET does not come from a Secret: "
                       "replicas would each sign stream tokens with a secret of their own")
    elif ref.get("optional"):
        out.add(where, "BRIDGE__AUTH__STREAM_TOKEN_SECRET is optional: a gateway started "
                       "without it issues tokens other replicas reject")
    keys_file = (env.get("BRIDGE__AUTH__API_KEYS_FILE") or {}).get("value")
    if not keys_file:
        out.add(where, "BRIDGE__AUTH__API_KEYS_FILE is not set: no API keys would be loaded")
        return
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    for m in c.get("volumeMounts") or []:
        secret = (volumes.get(m["name"]) or {}).get("secret")
        prefix = m["mountPath"].rstrip("/") + "/"
        if secret and keys_file.startswith(prefix):
            items = [i["path"] for i in secret.get("items") or []]
            if items and keys_file[len(prefix):] not in items:
                out.add(where, f"{keys_file} is not an item of Secret {secret['secretName']}")
            if secret.get("optional"):
                out.add(where, f"the Secret volume of {keys_file} is optional: the gateway "
                               "refuses to start without the file")
            return
    out.add(where, f"BRIDGE__AUTH__API_KEYS_FILE {keys_file} is not inside a mounted Secret")


# --- Dockerfile and docker-compose ---------------------------------------------------------


def dockerfile_stages(path: Path) -> dict[str, dict]:
    """Stage name -> {base, expose: [ports], user, entrypoint}, following line continuations."""
    text = re.sub(r"\\\n", " ", path.read_text())
    stages: dict[str, dict] = {}
    current: dict | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        word = word.upper()
        if word == "FROM":
            m = re.match(r"(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?", rest, re.I)
            base, name = (m.group(1), m.group(2)) if m else (rest, None)
            current = {"base": base, "expose": [], "user": None, "entrypoint": None}
            stages[name or f"#{len(stages)}"] = current
        elif current is not None and word == "EXPOSE":
            current["expose"] += [int(p.split("/")[0]) for p in rest.split()]
        elif current is not None and word == "USER":
            current["user"] = rest.strip()
        elif current is not None and word == "ENTRYPOINT":
            current["entrypoint"] = rest.strip()
    return stages


def effective_user(stages: dict, name: str) -> str | None:
    seen = set()
    while name in stages and name not in seen:
        seen.add(name)
        if stages[name]["user"]:
            return stages[name]["user"]
        name = stages[name]["base"]
    return None


def check_dockerfile(path: Path, config: dict, out: Findings) -> dict:
    where = str(path)
    stages = dockerfile_stages(path)
    for service in SERVICES:
        stage = stages.get(service)
        if stage is None:
            out.add(where, f"no stage `{service}` (docker build --target {service})")
            continue
        want = config_port(config, service)
        if want not in stage["expose"]:
            out.add(where, f"stage {service} does not EXPOSE {want} "
                           f"({ADDR_SECTION[service]}.addr)")
        user = effective_user(stages, service) or ""
        uid = user.split(":")[0]
        if not uid.isdigit() or int(uid) == 0:
            out.add(where, f"stage {service} runs as {user or 'root'!r}: use a numeric non-root "
                           "USER so Kubernetes runAsNonRoot can verify it")
        if not (stage["entrypoint"] or "").startswith("["):
            out.add(where, f"stage {service} has no exec-form ENTRYPOINT (no shell at runtime)")
    return stages


def check_compose(path: Path, stages: dict, out: Findings) -> None:
    where = str(path)
    compose = load_yaml_docs(path)[0]
    services = compose.get("services") or {}
    expected = {"redis", *SERVICES}
    if set(services) != expected:
        out.add(where, f"services are {sorted(services)}, expected {sorted(expected)}")
    root = path.parent
    config: dict = {}
    for service in SERVICES:
        s = services.get(service)
        if not s:
            continue
        sname = f"{where} service {service}"
        build = s.get("build") or {}
        context = (root / build.get("context", ".")).resolve()
        if not (context / "Cargo.toml").is_file():
            out.add(sname, f"build.context {build.get('context')} is not the workspace root")
        dockerfile = context / build.get("dockerfile", "Dockerfile")
        if not dockerfile.is_file():
            out.add(sname, f"build.dockerfile {dockerfile} does not exist")
        if build.get("target") not in stages:
            out.add(sname, f"build.target {build.get('target')!r} is no Dockerfile stage")
        mounts = [v for v in s.get("volumes") or [] if isinstance(v, dict)]
        cfg = [m for m in mounts if m.get("target") == "/etc/bridge/bridge.toml"]
        if not cfg:
            out.add(sname, "does not mount the config at /etc/bridge/bridge.toml")
        else:
            source = (root / cfg[0]["source"]).resolve()
            if not source.is_file():
                out.add(sname, f"config source {cfg[0]['source']} does not exist")
            else:
                config = tomllib.loads(source.read_text())
            if not cfg[0].get("read_only"):
                out.add(sname, "config is mounted writable")
        if s.get("read_only") is not True:
            out.add(sname, "read_only is not true")
        if "ALL" not in (s.get("cap_drop") or []):
            out.add(sname, "cap_drop does not contain ALL")
        if not any(str(o).startswith("no-new-privileges") for o in s.get("security_opt") or []):
            out.add(sname, "security_opt lacks no-new-privileges")
        if service in REDIS_SERVICES and "redis" not in (s.get("depends_on") or {}):
            out.add(sname, "does not depend on redis")
        want = config_port(config, service)
        published = [str(p).rsplit(":", 1)[-1] for p in s.get("ports") or []]
        if config and str(want) not in published:
            out.add(sname, f"publishes {published}, not the configured port {want}")
    producer = services.get("producer") or {}
    grace = config.get("producer", {}).get("shutdown_grace_secs")
    stop = seconds(producer.get("stop_grace_period", "10s"))
    if isinstance(grace, int) and (stop is None or stop <= grace + PRODUCER_MARGIN_SECS):
        out.add(f"{where} service producer",
                f"stop_grace_period {producer.get('stop_grace_period', '10s (default)')} must "
                f"exceed producer.shutdown_grace_secs {grace} + {PRODUCER_MARGIN_SECS} s")


def check_secret_example(path: Path, out: Findings) -> None:
    for secret in load_yaml_docs(path):
        where = f"{path} {name_of(secret)}"
        if secret.get("data"):
            out.add(where, "uses `data`; an example holds readable placeholders in stringData")
        for key, value in (secret.get("stringData") or {}).items():
            if key.endswith("-kid"):
                continue
            if "REPLACE" not in str(value):
                out.add(where, f"stringData.{key} is not a REPLACE... placeholder: an example "
                               "must never hold a real value")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--overlay", action="append", default=[], metavar="NAME=RENDERED.yaml",
                        help="an overlay rendered by `kubectl kustomize` (repeatable)")
    parser.add_argument("--compose", type=Path, required=True)
    parser.add_argument("--dockerfile", type=Path, required=True)
    parser.add_argument("--config", type=Path, required=True,
                        help="the config the images and compose run with (k8s/base/bridge.toml)")
    parser.add_argument("--secret-example", type=Path, required=True)
    args = parser.parse_args()

    out = Findings()
    for spec in args.overlay:
        name, _, rendered = spec.partition("=")
        check_overlay(name, Path(rendered), out)
    stages = check_dockerfile(args.dockerfile, tomllib.loads(args.config.read_text()), out)
    check_compose(args.compose, stages, out)
    check_secret_example(args.secret_example, out)

    if out.items:
        print(f"check_manifests: {len(out.items)} problem(s):", file=sys.stderr)
        for item in out.items:
            print(f"  - {item}", file=sys.stderr)
        return 1
    print(f"check_manifests: ok ({len(args.overlay)} overlays, compose, Dockerfile, "
          "secret example)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
