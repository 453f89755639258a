"""Checks the deployment artefacts in deploy/ with real tools; run by tests/tests/deploy.rs.

    validate_deploy.py CHECK EXPECT_JSON

CHECK is one of kubernetes, helm, grafana, prometheus, dockerfile. EXPECT_JSON holds what the
artefacts must agree with, from the Rust test: the capability set, the exported metrics and
their labels, the workspace and toolchain versions, the promtool and flyprobe paths.

Prints one "ok: ..." line per check passed and, last, "RESULT <json>" with what the Rust
side checks further (the command lines, for flyprobe's own argument parser). Every failure
is listed on stderr and the exit status is 1. Nothing is skipped.

The tools:
- Kubernetes objects: the Kubernetes JSON schemas bundled by kubernetes-validate, strict (an
  unknown field is an error), for every Kubernetes version it carries.
- The Helm chart: rendered by Helm's own engine (the Helm Go SDK, as the shared library that
  helm-python-sdk ships), linted by Helm's linter, values checked against values.schema.json.
- ServiceMonitor: the prometheus-operator CRD is not in the Kubernetes schemas, and no
  allowed registry ships its openAPIV3Schema as a file. cloudcoil-models-prometheus-operator
  ships models generated from that CRD's openAPIV3Schema (types, enums, patterns, required
  fields); the object must validate against them, and against their JSON schema made strict
  (no unknown field anywhere), since the models themselves ignore unknown fields.
- Grafana: the dashboard's PromQL is parsed by promtool (as recording rules), and every
  metric and label it names must be one flyprobe exports.
- Prometheus: the Rust side runs `promtool check config` on the file; here the commented
  Kubernetes example is uncommented and checked too (see check_prometheus).
- Dockerfile: hadolint (with ShellCheck on the RUN scripts) and BuildKit's own parser (the
  `dockerfile` package); it is not built: there is no container engine here.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "flyprobe"

FAILURES: list[str] = []


def fail(message: str) -> None:
    FAILURES.append(message)


def expect(condition: bool, message: str) -> bool:
    if not condition:
        fail(message)
    return condition


def ok(message: str) -> None:
    print(f"ok: {message}", flush=True)


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# ---------------------------------------------------------------------------------------------
# Kubernetes objects


def load_yaml_docs(text: str, where: str) -> list[dict]:
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        fail(f"{where}: not YAML: {e}")
        return []
    for d in docs:
        expect(isinstance(d, dict), f"{where}: a document is not a mapping: {d!r}")
    return [d for d in docs if isinstance(d, dict)]


def name_of(doc: dict) -> str:
    return f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"


def kubernetes_versions() -> list[str]:
    from kubernetes_validate import utils

    return sorted(set(utils.all_versions()), key=lambda v: tuple(int(x) for x in v.split(".")))


def validate_core(doc: dict, where: str) -> None:
    """Against the Kubernetes schemas, strict, for every version kubernetes-validate has."""
    import kubernetes_validate

    versions = kubernetes_versions()
    for version in versions:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = "/".join(str(p) for p in e.path)
            fail(f"{where}: {name_of(doc)}: Kubernetes {version} schema: {e.message} (at /{path})")
            return
        except kubernetes_validate.SchemaNotFoundError as e:
            fail(f"{where}: {name_of(doc)}: {e.message}")
            return
    ok(f"{where}: {name_of(doc)} matches the Kubernetes {versions[0]}..{versions[-1]} schemas (strict)")


def strict_schema(schema: Any) -> Any:
    """Every object that lists its properties admits no others (kubectl --validate=strict)."""
    if isinstance(schema, dict):
        out = {k: strict_schema(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict_schema(v) for v in schema]
    return schema


_SERVICE_MONITOR_SCHEMA: dict | None = None


def validate_service_monitor(doc: dict, where: str) -> None:
    global _SERVICE_MONITOR_SCHEMA
    import pydantic
    from cloudcoil.models.prometheus_operator import v1 as monitoring_v1

    try:
        monitoring_v1.ServiceMonitor.model_validate(doc)
    except pydantic.ValidationError as e:
        fail(f"{where}: {name_of(doc)}: ServiceMonitor CRD model: {e}")
        return
    if _SERVICE_MONITOR_SCHEMA is None:
        _SERVICE_MONITOR_SCHEMA = strict_schema(
            monitoring_v1.ServiceMonitor.model_json_schema(by_alias=True)
        )
    validator = jsonschema.Draft202012Validator(_SERVICE_MONITOR_SCHEMA)
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.path))
    for e in errors:
        path = "/".join(str(p) for p in e.path)
        fail(f"{where}: {name_of(doc)}: ServiceMonitor CRD schema (strict): {e.message} (at /{path})")
    if not errors:
        ok(f"{where}: {name_of(doc)} matches the ServiceMonitor CRD (monitoring.coreos.com/v1, strict)")


def validate_object(doc: dict, where: str) -> None:
    if doc.get("apiVersion") == "monitoring.coreos.com/v1":
        expect(doc.get("kind") == "ServiceMonitor", f"{where}: unexpected {name_of(doc)}")
        validate_service_monitor(doc, where)
    else:
        validate_core(doc, where)


RBAC_KINDS = {"Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding", "ServiceAccount"}

# flyprobe's command line as designed: flag -> takes a value.
FLAGS = {
    "--pid-tree": True,
    "--port": True,
    "--comm": True,
    "--cgroup": True,
    "--all-listeners": False,
    "--listen": True,
    "--web.config.file": True,
    "--server-name": True,
    "--max-connections": True,
    "--max-processes": True,
    "--max-request-series": True,
    "--access-log": True,
    "--pin-path": True,
    "--exit-with-target": False,
}
SELECTORS = {"--pid-tree", "--port", "--comm", "--cgroup", "--all-listeners"}


def parse_args(args: list[str], where: str) -> dict[str, list[str]]:
    """flag -> values, for the flags above; anything else is a failure."""
    out: dict[str, list[str]] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        flag, eq, inline = arg.partition("=")
        if flag not in FLAGS:
            fail(f"{where}: unknown flyprobe argument {arg!r} in {args}")
            i += 1
            continue
        if FLAGS[flag]:
            if eq:
                value = inline
            elif i + 1 < len(args):
                i += 1
                value = args[i]
            else:
                fail(f"{where}: {flag} without a value in {args}")
                value = ""
            out.setdefault(flag, []).append(value)
        else:
            expect(not eq, f"{where}: {flag} takes no value")
            out.setdefault(flag, []).append("")
        i += 1
    expect(
        bool(SELECTORS & out.keys()),
        f"{where}: no selector ({', '.join(sorted(SELECTORS))}) in {args}",
    )
    return out


def check_daemonset(ds: dict, exp: dict, where: str) -> dict[str, list[str]]:
    """The security-relevant shape of flyprobe's DaemonSet; returns its parsed arguments."""
    spec = ds["spec"]["template"]["spec"]
    caps = set(exp["capabilities"])
    expect(spec.get("hostPID") is True, f"{where}: hostPID must be true (flyprobe reads every process's /proc)")
    expect(
        spec.get("hostNetwork") is True,
        f"{where}: hostNetwork must be true (flyprobe labels a process's netns only when it is not its own: "
        "in the node's namespace, host servers get no netns label, pods do)",
    )
    expect(
        spec.get("dnsPolicy") == "ClusterFirstWithHostNet",
        f"{where}: dnsPolicy must be ClusterFirstWithHostNet with hostNetwork",
    )
    expect(not spec.get("hostIPC"), f"{where}: hostIPC is not needed")
    expect(
        spec.get("automountServiceAccountToken") is False,
        f"{where}: automountServiceAccountToken must be false (flyprobe uses no Kubernetes API)",
    )
    expect(
        {"operator": "Exists"} in (spec.get("tolerations") or []),
        f"{where}: needs a toleration {{operator: Exists}} to run on every node: {spec.get('tolerations')}",
    )
    containers = spec.get("containers") or []
    if not expect(len(containers) == 1, f"{where}: one container expected, got {len(containers)}"):
        return {}
    expect(not spec.get("initContainers"), f"{where}: no init containers expected")
    c = containers[0]
    sc = c.get("securityContext") or {}
    added = (sc.get("capabilities") or {}).get("add") or []
    expect(
        sorted(added) == sorted(caps),
        f"{where}: capabilities.add must be exactly {sorted(caps)}, got {added}",
    )
    expect(
        (sc.get("capabilities") or {}).get("drop") == ["ALL"],
        f"{where}: capabilities.drop must be [ALL], got {(sc.get('capabilities') or {}).get('drop')}",
    )
    expect(sc.get("privileged") is not True, f"{where}: must not be privileged")
    expect(sc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation must be false")
    expect(sc.get("readOnlyRootFilesystem") is True, f"{where}: readOnlyRootFilesystem must be true")
    expect(sc.get("runAsUser") == 0, f"{where}: runs as uid 0 (capabilities bounded), got {sc.get('runAsUser')}")
    pod_sc = spec.get("securityContext") or {}
    expect("sysctls" not in pod_sc, f"{where}: no sysctls expected")

    args = c.get("args") or []
    expect(not c.get("command"), f"{where}: the image's entrypoint runs flyprobe; no command override")
    parsed = parse_args(args, where)

    # hostPath volumes: tracefs, cgroup and the kubelet's log directories read-only, the BPF
    # filesystem only with --pin-path.
    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    mounts = {m["name"]: m for m in c.get("volumeMounts") or []}
    host_paths = {v["hostPath"]["path"]: name for name, v in volumes.items() if "hostPath" in v}
    allowed = {
        "/sys/kernel/tracing",
        "/sys/fs/cgroup",
        "/sys/fs/bpf",
        "/run/flyprobe",
        "/var/log/pods",
        "/var/log/containers",
    }
    expect(
        set(host_paths) <= allowed,
        f"{where}: hostPath volumes beyond {sorted(allowed)}: {sorted(set(host_paths) - allowed)}",
    )
    read_only_mounts = ["/sys/kernel/tracing", "/sys/fs/cgroup", "/var/log/pods", "/var/log/containers"]
    for path, read_only in [(p, True) for p in read_only_mounts]:
        name = host_paths.get(path)
        if not expect(name is not None, f"{where}: no hostPath volume for {path}"):
            continue
        mount = mounts.get(name)
        if expect(mount is not None, f"{where}: volume {name} ({path}) is not mounted"):
            expect(mount.get("mountPath") == path, f"{where}: {path} mounted at {mount.get('mountPath')}")
            expect(mount.get("readOnly") is read_only, f"{where}: {path} must be mounted readOnly")
    pin = "--pin-path" in parsed
    expect(
        ("/sys/fs/bpf" in host_paths) == pin,
        f"{where}: /sys/fs/bpf must be mounted exactly when --pin-path is given (pin-path: {pin}, "
        f"mounted: {'/sys/fs/bpf' in host_paths})",
    )
    expect(
        ("/run/flyprobe" in host_paths) == pin,
        f"{where}: /run/flyprobe (the --pin-path ledger) must be mounted exactly when --pin-path is given",
    )
    if "/run/flyprobe" in host_paths:
        mount = mounts.get(host_paths["/run/flyprobe"]) or {}
        expect(mount.get("mountPath") == "/run/flyprobe", f"{where}: the ledger must be mounted at /run/flyprobe")
    for pin_path in parsed.get("--pin-path", []):
        expect(pin_path.startswith("/sys/fs/bpf/"), f"{where}: --pin-path {pin_path} is not under /sys/fs/bpf/")

    # The metrics port: named "metrics", the one --listen binds, probed on /metrics.
    ports = c.get("ports") or []
    listen = (parsed.get("--listen") or ["127.0.0.1:9464"])[-1]
    listen_port = int(listen.rsplit(":", 1)[1])
    expect(
        [(p.get("name"), p.get("containerPort")) for p in ports] == [("metrics", listen_port)],
        f"{where}: one container port named metrics = the --listen port {listen_port}, got {ports}",
    )
    expect(
        not listen.startswith("127.") and listen != "[::1]:" + str(listen_port),
        f"{where}: --listen {listen} is loopback: nothing outside the pod could scrape it",
    )
    for probe in ["startupProbe", "livenessProbe", "readinessProbe"]:
        p = c.get(probe)
        if not expect(p is not None, f"{where}: no {probe}"):
            continue
        handler = p.get("httpGet") or p.get("tcpSocket")
        expect(handler is not None and handler.get("port") == "metrics", f"{where}: {probe} must target port metrics: {p}")
        if "httpGet" in p:
            expect(p["httpGet"].get("path") == "/metrics", f"{where}: {probe} must GET /metrics")
    res = c.get("resources") or {}
    for kind in ["requests", "limits"]:
        for r in ["cpu", "memory"]:
            expect(r in (res.get(kind) or {}), f"{where}: resources.{kind}.{r} is not set")
    return parsed


def check_service_and_monitor(objects: list[dict], where: str) -> None:
    """The Service selects the DaemonSet's pods and names its port metrics; the ServiceMonitor
    (when there is one) selects the Service and scrapes that port."""
    by_kind: dict[str, list[dict]] = {}
    for o in objects:
        by_kind.setdefault(o["kind"], []).append(o)
    ds = by_kind.get("DaemonSet", [None])[0]
    svc = by_kind.get("Service", [None])[0]
    if not expect(ds is not None and svc is not None, f"{where}: needs a DaemonSet and a Service"):
        return
    pod_labels = ds["spec"]["template"]["metadata"].get("labels") or {}
    selector = svc["spec"].get("selector") or {}
    expect(
        bool(selector) and all(pod_labels.get(k) == v for k, v in selector.items()),
        f"{where}: the Service selector {selector} does not select the pods {pod_labels}",
    )
    expect(
        ds["spec"]["selector"].get("matchLabels", {}).items() <= pod_labels.items(),
        f"{where}: the DaemonSet selector does not match its own pods",
    )
    ports = svc["spec"].get("ports") or []
    expect(
        [(p.get("name"), p.get("targetPort")) for p in ports] == [("metrics", "metrics")],
        f"{where}: the Service needs one port named metrics targeting the container port metrics: {ports}",
    )
    for sm in by_kind.get("ServiceMonitor", []):
        match = sm["spec"]["selector"].get("matchLabels") or {}
        svc_labels = svc["metadata"].get("labels") or {}
        expect(
            bool(match) and match.items() <= svc_labels.items(),
            f"{where}: the ServiceMonitor selects {match}, not the Service's labels {svc_labels}",
        )
        endpoints = sm["spec"].get("endpoints") or []
        expect(
            [e.get("port") for e in endpoints] == ["metrics"],
            f"{where}: the ServiceMonitor must scrape port metrics: {endpoints}",
        )
        for e in endpoints:
            expect(e.get("path", "/metrics") == "/metrics", f"{where}: ServiceMonitor path {e.get('path')}")


def must_fail(what: str, check: Callable[[], Any]) -> None:
    """The checks are not vacuous: a broken object must fail them."""
    global FAILURES
    saved, FAILURES = FAILURES, []
    try:
        check()
    finally:
        caught, FAILURES = FAILURES, saved
    expect(bool(caught), f"the checks accept {what}")


def checks_bite(ds: dict, sm: dict, exp: dict) -> None:
    def edit(obj: dict, change: Callable[[dict], Any]) -> dict:
        obj = copy.deepcopy(obj)
        change(obj)
        return obj

    pod = lambda d: d["spec"]["template"]["spec"]  # noqa: E731
    sc = lambda d: pod(d)["containers"][0]["securityContext"]  # noqa: E731
    cases = [
        ("a misspelt field", lambda: validate_core(edit(ds, lambda d: sc(d).update(capabilitiez={})), "bite")),
        ("a wrong type", lambda: validate_core(edit(ds, lambda d: pod(d).update(hostPID="yes")), "bite")),
        ("CAP_SYS_ADMIN", lambda: check_daemonset(
            edit(ds, lambda d: sc(d)["capabilities"]["add"].append("SYS_ADMIN")), exp, "bite")),
        ("privileged: true", lambda: check_daemonset(edit(ds, lambda d: sc(d).update(privileged=True)), exp, "bite")),
        ("a missing capability", lambda: check_daemonset(
            edit(ds, lambda d: sc(d)["capabilities"]["add"].remove("SYS_PTRACE")), exp, "bite")),
        ("an unknown flyprobe flag", lambda: check_daemonset(
            edit(ds, lambda d: pod(d)["containers"][0]["args"].append("--all-listener")), exp, "bite")),
        ("a ServiceMonitor field typo", lambda: validate_service_monitor(
            edit(sm, lambda d: d["spec"]["endpoints"][0].update(intervall="15s")), "bite")),
        ("a ServiceMonitor scheme ftp", lambda: validate_service_monitor(
            edit(sm, lambda d: d["spec"]["endpoints"][0].update(scheme="ftp")), "bite")),
        ("a ServiceMonitor interval 15 seconds", lambda: validate_service_monitor(
            edit(sm, lambda d: d["spec"]["endpoints"][0].update(interval="15 seconds")), "bite")),
    ]
    for what, check in cases:
        must_fail(what, check)
    ok(f"the checks refuse {len(cases)} broken variants ({', '.join(w for w, _ in cases)})")


def check_kubernetes(exp: dict) -> dict:
    directory = DEPLOY / "kubernetes"
    files = sorted(directory.glob("*.yaml")) + sorted(directory.glob("*.yml"))
    expect(bool(files), f"no manifests in {rel(directory)}")
    objects: list[dict] = []
    for f in files:
        for doc in load_yaml_docs(f.read_text(), rel(f)):
            where = rel(f)
            expect(
                "namespace" not in (doc.get("metadata") or {}),
                f"{where}: {name_of(doc)} sets a namespace; the manifests are namespace-agnostic (kubectl apply -n)",
            )
            expect(doc.get("kind") not in RBAC_KINDS, f"{where}: {name_of(doc)}: no RBAC expected (no API use)")
            validate_object(doc, where)
            objects.append(doc)
    kinds = sorted(o.get("kind") for o in objects)
    expect(kinds == ["DaemonSet", "Service", "ServiceMonitor"], f"{rel(directory)}: objects {kinds}")
    result: dict = {"command_lines": {}}
    failures_before = len(FAILURES)
    for o in objects:
        if o.get("kind") == "DaemonSet":
            parsed = check_daemonset(o, exp, rel(directory))
            expect(
                parsed.get("--all-listeners") == [""] and parsed.get("--listen") == ["0.0.0.0:9464"],
                f"{rel(directory)}: the DaemonSet must run --all-listeners --listen 0.0.0.0:9464: {parsed}",
            )
            image = o["spec"]["template"]["spec"]["containers"][0]["image"]
            expect(
                image.endswith(":" + exp["version"]),
                f"{rel(directory)}: image {image} is not tagged with the workspace version {exp['version']}",
            )
            result["command_lines"]["deploy/kubernetes DaemonSet"] = o["spec"]["template"]["spec"]["containers"][0]["args"]
    check_service_and_monitor(objects, rel(directory))
    by_kind = {o.get("kind"): o for o in objects}
    if "DaemonSet" in by_kind and "ServiceMonitor" in by_kind:
        checks_bite(by_kind["DaemonSet"], by_kind["ServiceMonitor"], exp)
    if len(FAILURES) == failures_before:
        ok(f"{rel(directory)}: DaemonSet capabilities are exactly {sorted(exp['capabilities'])}, not privileged; "
           "Service and ServiceMonitor select it")
    return result


# ---------------------------------------------------------------------------------------------
# Helm


def render(values: dict | None, name: str = "flyprobe", namespace: str = "monitoring") -> dict[str, str]:
    import helm_python as helm

    with helm.Chart.load(str(CHART)) as chart:
        return chart.render(values, name=name, namespace=namespace)


def render_objects(values: dict | None, label: str) -> tuple[list[dict], dict[str, str]]:
    import helm_python as helm

    try:
        rendered = render(values)
    except helm.HelmError as e:
        fail(f"helm template ({label}): {e}")
        return [], {}
    objects = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        expect("<no value>" not in text, f"helm template ({label}): {path} renders '<no value>'")
        for doc in load_yaml_docs(text, f"helm template ({label}) {path}"):
            expect(
                (doc.get("metadata") or {}).get("namespace") == "monitoring",
                f"helm template ({label}): {name_of(doc)} is not in the release namespace",
            )
            expect(doc.get("kind") not in RBAC_KINDS, f"helm template ({label}): {name_of(doc)}: no RBAC expected")
            validate_object(doc, f"helm template ({label})")
            objects.append(doc)
    notes = next((t for p, t in rendered.items() if p.endswith("NOTES.txt")), "")
    expect(bool(notes.strip()), f"helm template ({label}): NOTES.txt renders empty")
    expect("<no value>" not in notes, f"helm template ({label}): NOTES.txt renders '<no value>'")
    ok(f"helm template ({label}): {len(objects)} objects rendered by Helm {helm.helm_sdk_version()}")
    return objects, rendered


def one(objects: list[dict], kind: str) -> dict:
    found = [o for o in objects if o.get("kind") == kind]
    expect(len(found) == 1, f"expected one {kind}, got {len(found)}")
    return found[0] if found else {}


def render_fails(values: dict, needle: str, label: str) -> None:
    import helm_python as helm

    try:
        render(values)
    except helm.HelmError as e:
        expect(needle in str(e), f"helm template ({label}) failed, but without {needle!r}: {e}")
        ok(f"helm template ({label}) is refused: {str(e).splitlines()[-1].strip()}")
        return
    fail(f"helm template ({label}) rendered; it must be refused ({needle})")


def container(ds: dict) -> dict:
    return ds["spec"]["template"]["spec"]["containers"][0]


def check_helm(exp: dict) -> dict:
    import helm_python as helm

    result: dict = {"command_lines": {}}
    metadata = yaml.safe_load((CHART / "Chart.yaml").read_text())
    expect(
        str(metadata.get("appVersion")) == exp["version"],
        f"Chart.yaml appVersion {metadata.get('appVersion')} != workspace version {exp['version']}",
    )

    # Helm's own linter, warnings as errors.
    report = helm.lint(str(CHART), strict=True)
    problems = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2]
    expect(not problems and not report.get("errors"), f"helm lint --strict: {problems or report.get('errors')}")
    ok(f"helm lint --strict: no warnings ({len(report.get('messages', []))} info)")

    # values.schema.json: the defaults pass, typos and wrong types do not.
    with helm.Chart.load(str(CHART)) as chart:
        expect(chart.schema is not None, "the chart has no values.schema.json")
        chart.validate_schema(None)
        for bad, what in [
            ({"selectors": {"port": [8080]}}, "a misspelt selector"),
            ({"selectors": {"ports": ["http"]}}, "a port that is not a number"),
            ({"serviceMonitor": {"enable": False}}, "a misspelt serviceMonitor key"),
        ]:
            try:
                chart.validate_schema(bad)
                fail(f"values.schema.json accepts {what}: {bad}")
            except helm.HelmValuesError:
                pass
    ok("values.schema.json: defaults valid; misspelt keys and wrong types refused")

    # 1. Defaults.
    objects, _ = render_objects(None, "default values")
    kinds = sorted(o.get("kind") for o in objects)
    expect(kinds == ["DaemonSet", "Service", "ServiceMonitor"], f"helm template (default values): objects {kinds}")
    ds = one(objects, "DaemonSet")
    if ds:
        parsed = check_daemonset(ds, exp, "helm template (default values)")
        expect(
            parsed.get("--all-listeners") == [""] and parsed.get("--listen") == ["0.0.0.0:9464"],
            f"helm template (default values): must run --all-listeners --listen 0.0.0.0:9464: {parsed}",
        )
        result["command_lines"]["helm default values"] = container(ds)["args"]
    check_service_and_monitor(objects, "helm template (default values)")

    # The chart's defaults are the plain manifests: same pod, same Service and scrape.
    failures_before = len(FAILURES)
    plain = {o["kind"]: o for o in
             [d for f in sorted((DEPLOY / "kubernetes").glob("*.yaml")) for d in load_yaml_docs(f.read_text(), rel(f))]}
    if ds and "DaemonSet" in plain:
        expect(
            ds["spec"]["template"]["spec"] == plain["DaemonSet"]["spec"]["template"]["spec"],
            "the chart's default pod spec differs from deploy/kubernetes/daemonset.yaml:\n"
            + diff(plain["DaemonSet"]["spec"]["template"]["spec"], ds["spec"]["template"]["spec"]),
        )
        expect(
            ds["spec"].get("updateStrategy") == plain["DaemonSet"]["spec"].get("updateStrategy"),
            "the chart's default updateStrategy differs from deploy/kubernetes/daemonset.yaml",
        )
    svc = one(objects, "Service")
    if svc and "Service" in plain:
        strip = lambda s: {k: v for k, v in s["spec"].items() if k != "selector"}  # noqa: E731
        expect(strip(svc) == strip(plain["Service"]), "the chart's Service differs from deploy/kubernetes/service.yaml")
    sm = one(objects, "ServiceMonitor")
    if sm and "ServiceMonitor" in plain:
        expect(
            sm["spec"]["endpoints"] == plain["ServiceMonitor"]["spec"]["endpoints"],
            "the chart's ServiceMonitor endpoints differ from deploy/kubernetes/servicemonitor.yaml",
        )
    if len(FAILURES) == failures_before:
        ok("the chart's defaults render the same pod, Service and scrape as deploy/kubernetes/")

    # 2. Selectors and bounds set, ServiceMonitor off.
    values = {
        "serviceMonitor": {"enabled": False},
        "selectors": {
            "allListeners": False,
            "pidTree": [1],
            "ports": [8000, 8443],
            "comms": ["nginx", "uvicorn"],
            "cgroups": ["/sys/fs/cgroup/kubepods.slice"],
        },
        "serverName": "api",
        "maxConnections": 1000000,
        "maxProcesses": 4096,
        "maxRequestSeries": 131072,
        "accessLog": "-",
    }
    objects, _ = render_objects(values, "selectors, serviceMonitor off")
    kinds = sorted(o.get("kind") for o in objects)
    expect(kinds == ["DaemonSet", "Service"], f"helm template (serviceMonitor off): objects {kinds}")
    ds = one(objects, "DaemonSet")
    if ds:
        check_daemonset(ds, exp, "helm template (selectors)")
        want = [
            "--pid-tree", "1", "--port", "8000", "--port", "8443", "--comm", "nginx", "--comm", "uvicorn",
            "--cgroup", "/sys/fs/cgroup/kubepods.slice", "--listen", "0.0.0.0:9464", "--server-name", "api",
            "--max-connections", "1000000", "--max-processes", "4096", "--max-request-series", "131072",
            "--access-log", "-",
        ]
        expect(container(ds)["args"] == want, f"helm template (selectors): args {container(ds)['args']} != {want}")
        result["command_lines"]["helm selectors"] = container(ds)["args"]
    check_service_and_monitor(objects, "helm template (selectors)")

    # 3. TLS + basic auth web config, pinned maps, an access log file, IPv6 listen.
    web_config = {
        "tls_server_config": {"cert_file": "/etc/flyprobe/tls/tls.crt", "key_file": "/etc/flyprobe/tls/tls.key"},
        "basic_auth_users": {"prometheus": "$2y$10$" + "x" * 53},
    }
    values = {
        "listen": "[::]:9100",
        "webConfig": {"config": web_config, "tlsSecret": "flyprobe-tls"},
        "pinPath": "/sys/fs/bpf/flyprobe",
        "accessLog": "/var/log/flyprobe/access.log",
        "serviceMonitor": {
            "labels": {"release": "kube-prometheus-stack"},
            "tlsConfig": {"insecureSkipVerify": True},
            "basicAuth": {
                "username": {"name": "flyprobe-scrape", "key": "username"},
                "password": {"name": "flyprobe-scrape", "key": "password"},
            },
        },
    }
    objects, _ = render_objects(values, "web config, pin path")
    kinds = sorted(o.get("kind") for o in objects)
    expect(kinds == ["DaemonSet", "Secret", "Service", "ServiceMonitor"], f"helm template (web config): objects {kinds}")
    ds = one(objects, "DaemonSet")
    secret = one(objects, "Secret")
    if ds and secret:
        parsed = check_daemonset(ds, exp, "helm template (web config)")
        expect(parsed.get("--web.config.file") == ["/etc/flyprobe/web/web-config.yml"], f"--web.config.file: {parsed}")
        expect(parsed.get("--pin-path") == ["/sys/fs/bpf/flyprobe"], f"--pin-path: {parsed}")
        expect(parsed.get("--listen") == ["[::]:9100"], f"--listen: {parsed}")
        expect(
            yaml.safe_load(secret["stringData"]["web-config.yml"]) == web_config,
            "the web config Secret does not hold webConfig.config",
        )
        spec = ds["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["name"]: m["mountPath"] for m in container(ds)["volumeMounts"]}
        expect(volumes.get("web-config", {}).get("secret", {}).get("secretName") == secret["metadata"]["name"],
               "the web config Secret is not mounted")
        expect(mounts.get("web-config") == "/etc/flyprobe/web", f"web config mounted at {mounts.get('web-config')}")
        expect(volumes.get("tls", {}).get("secret", {}).get("secretName") == "flyprobe-tls", "the TLS Secret is not mounted")
        expect(mounts.get("tls") == "/etc/flyprobe/tls", f"TLS Secret mounted at {mounts.get('tls')}")
        expect(mounts.get("access-log") == "/var/log/flyprobe" and "emptyDir" in volumes.get("access-log", {}),
               "the access log directory needs a writable volume (read-only root filesystem)")
        for probe in ["startupProbe", "livenessProbe", "readinessProbe"]:
            expect(
                container(ds)[probe].get("tcpSocket") == {"port": "metrics"},
                f"with basic auth the kubelet cannot authenticate: {probe} must be tcpSocket: {container(ds)[probe]}",
            )
        result["command_lines"]["helm web config, pin path"] = container(ds)["args"]
    sm = one(objects, "ServiceMonitor")
    if sm:
        endpoint = sm["spec"]["endpoints"][0]
        expect(endpoint.get("scheme") == "https", f"with TLS the ServiceMonitor must scrape https: {endpoint}")
        expect(sm["metadata"]["labels"].get("release") == "kube-prometheus-stack", "serviceMonitor.labels not applied")
    check_service_and_monitor(objects, "helm template (web config)")

    # 4. Values the chart must refuse, with Helm's own error.
    render_fails({"selectors": {"allListeners": False}}, "selectors: set at least one", "no selector")
    render_fails({"listen": "9464"}, "is not HOST:PORT", "listen without a host")
    render_fails({"pinPath": "/var/lib/flyprobe"}, "must be a directory under /sys/fs/bpf/", "pin path outside bpffs")
    render_fails({"webConfig": {"config": {"a": 1}, "existingSecret": "s"}}, "not both", "two web configs")
    render_fails({"selectors": {"comm": ["nginx"]}}, "additional properties 'comm' not allowed", "misspelt selector")
    return result


def diff(a: Any, b: Any, path: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        return "".join(diff(a.get(k), b.get(k), f"{path}/{k}") for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return "".join(diff(x, y, f"{path}/{i}") for i, (x, y) in enumerate(zip(a, b)) if x != y)
    return f"  {path}: {a!r} != {b!r}\n"


# ---------------------------------------------------------------------------------------------
# Grafana

PROMQL_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
    "and", "or", "unless", "offset", "atan2", "inf", "nan", "start", "end",
}
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
MATCHERS = re.compile(r"\{([^}]*)\}")
MATCHER_LABEL = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
GRAFANA_MACROS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}


def promql_refs(expr: str) -> tuple[list[tuple[str, set[str]]], set[str]]:
    """(metric, labels matched on it) for every selector, and the label names in groupings."""
    no_strings = STRING.sub('""', expr)
    grouping_labels = {
        label.strip() for m in GROUPING.finditer(no_strings) for label in m.group(2).split(",") if label.strip()
    }
    e = GROUPING.sub(" ", no_strings)
    e = re.sub(r"\[[^\]]*\]", "[]", e)
    selectors = []
    for m in IDENT.finditer(e):
        token = m.group(0)
        if token in PROMQL_KEYWORDS or (m.start() > 0 and e[m.start() - 1] in "{,$"):
            continue
        rest = e[m.end():].lstrip()
        if rest.startswith("("):  # a function or an aggregation
            continue
        if rest.startswith(("=", "!=", "=~", "!~")):  # a label inside a matcher
            continue
        labels: set[str] = set()
        matcher = MATCHERS.match(rest)
        if matcher:
            labels = set(MATCHER_LABEL.findall(matcher.group(1)))
        selectors.append((token, labels))
    # Label names inside matchers (already excluded from metric names above).
    return selectors, grouping_labels


def check_grafana(exp: dict) -> dict:
    path = DEPLOY / "grafana" / "flyprobe.json"
    where = rel(path)
    try:
        dash = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        fail(f"{where}: not JSON: {e}")
        return {}
    ok(f"{where}: parses")
    metrics: dict[str, list[str]] = exp["metrics"]
    histograms = set(exp["histograms"])
    node_wide = set(exp["node_wide_labels"])
    target_labels = set(exp["target_labels"])
    all_labels = {l for ls in metrics.values() for l in ls} | node_wide | target_labels | {"le"}

    for key in ["title", "uid", "schemaVersion", "panels", "templating"]:
        expect(key in dash, f"{where}: no {key}")
    variables = {v["name"]: v for v in dash.get("templating", {}).get("list", [])}
    for name in ["datasource", "server", "pod_uid"]:
        expect(name in variables, f"{where}: no template variable {name}")
    expect(variables.get("datasource", {}).get("type") == "datasource"
           and variables.get("datasource", {}).get("query") == "prometheus",
           f"{where}: the datasource variable must pick a Prometheus data source")
    defined = {f"${n}" for n in variables} | {"${" + n + "}" for n in variables} | set(GRAFANA_MACROS)

    used_metrics: set[str] = set()
    exprs: list[tuple[str, str]] = []

    def check_expr(expr: str, what: str) -> None:
        for var in re.findall(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", expr):
            expect(var in defined, f"{where}: {what}: undefined variable {var}")
        selectors, grouping = promql_refs(expr)
        expect(bool(selectors), f"{what}: no metric in {expr!r}")
        for metric, labels in selectors:
            base = metric
            for suffix in ["_bucket", "_sum", "_count"]:
                if metric.endswith(suffix) and metric[: -len(suffix)] in histograms:
                    base = metric[: -len(suffix)]
            if not expect(base in metrics, f"{where}: {what}: {metric} is not a metric flyprobe exports"):
                continue
            if base in histograms:
                expect(metric != base, f"{where}: {what}: histogram {base} is queried without _bucket/_sum/_count")
            used_metrics.add(base)
            own = set(metrics[base]) | target_labels | (node_wide if base.startswith("server_") else set())
            if metric.endswith("_bucket"):
                own.add("le")
            for label in labels - own:
                fail(f"{where}: {what}: {metric} has no label {label!r} (it has {sorted(own)})")
        for label in grouping - all_labels:
            fail(f"{where}: {what}: no exported series has the label {label!r}")

    for name, var in variables.items():
        if var.get("type") != "query":
            continue
        query = var.get("query")
        query = query.get("query") if isinstance(query, dict) else query
        m = re.fullmatch(r"\s*label_values\((.*),\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)\s*", query or "")
        if expect(m is not None, f"{where}: variable {name}: expected label_values(selector, label): {query!r}"):
            check_expr(m.group(1), f"variable {name}")
            expect(m.group(2) in all_labels, f"{where}: variable {name}: no series has the label {m.group(2)}")
            exprs.append((f"variable_{name}", m.group(1)))

    panels = []
    for p in dash.get("panels", []):
        panels.append(p)
        panels.extend(p.get("panels", []))  # collapsed rows hold their panels
    ids = [p.get("id") for p in panels]
    expect(len(ids) == len(set(ids)), f"{where}: duplicate panel ids: {ids}")
    occupied: dict[tuple[int, int], str] = {}
    for p in panels:
        title = p.get("title", "?")
        what = f"panel {title!r}"
        g = p.get("gridPos") or {}
        expect(all(k in g for k in "hwxy") and g.get("x", 0) + g.get("w", 0) <= 24, f"{where}: {what}: gridPos {g}")
        for x in range(g.get("x", 0), g.get("x", 0) + g.get("w", 0)):
            for y in range(g.get("y", 0), g.get("y", 0) + g.get("h", 0)):
                other = occupied.setdefault((x, y), title)
                if other != title:
                    fail(f"{where}: {what} overlaps panel {other!r} at ({x}, {y})")
                    break
        if p.get("type") == "row":
            continue
        ds = p.get("datasource") or {}
        expect(ds.get("type") == "prometheus" and ds.get("uid") == "${datasource}",
               f"{where}: {what}: datasource must be the Prometheus ${{datasource}} variable, got {ds}")
        targets = p.get("targets") or []
        if not expect(bool(targets), f"{where}: {what}: no targets"):
            continue
        refs = [t.get("refId") for t in targets]
        expect(len(refs) == len(set(refs)) and all(refs), f"{where}: {what}: refIds {refs}")
        for t in targets:
            expr = t.get("expr") or ""
            if not expect(bool(expr.strip()), f"{where}: {what}: target {t.get('refId')} has no expr"):
                continue
            expect((t.get("datasource") or ds) == ds, f"{where}: {what}: target datasource differs from the panel's")
            check_expr(expr, f"{what} {t.get('refId')}")
            for label in re.findall(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}", t.get("legendFormat") or ""):
                expect(label in all_labels, f"{where}: {what}: legend uses {label!r}, which no series has")
            exprs.append((f"panel_{p.get('id')}_{t.get('refId')}", expr))

    # What the issue asks the dashboard to show.
    required = set(exp["dashboard_requires"])
    expect(required <= used_metrics, f"{where}: no panel uses {sorted(required - used_metrics)}")
    quantiles = {
        q for _, e in exprs
        for q in re.findall(r"histogram_quantile\(\s*([0-9.]+)\s*,[^\n]*server_request_duration_seconds_bucket", e)
    }
    expect({float(q) for q in quantiles} >= {0.5, 0.9, 0.99},
           f"{where}: latency needs p50, p90 and p99 from histogram_quantile, got {sorted(quantiles)}")
    table = [p for p in panels if p.get("type") == "table"]
    expect(any("server_worker_info" in t.get("expr", "") and "server_requests_total" in t.get("expr", "")
               for p in table for t in p.get("targets", [])),
           f"{where}: the per-worker table must join server_worker_info with server_requests_total")

    # promtool parses every expression (as a recording rule), Grafana's macros substituted.
    def promtool_parses(exprs: list[tuple[str, str]]) -> bool:
        rules = []
        for record, expr in exprs:
            for macro, value in GRAFANA_MACROS.items():
                expr = expr.replace(macro, value)
            rules.append({"record": f"flyprobe_dashboard:{record}", "expr": expr})
        with tempfile.NamedTemporaryFile("w", suffix=".yml", prefix="flyprobe-dashboard-") as f:
            json.dump({"groups": [{"name": "dashboard", "rules": rules}]}, f)
            f.flush()
            run = subprocess.run([exp["promtool"], "check", "rules", f.name], capture_output=True, text=True)
        return expect(run.returncode == 0, f"{where}: promtool check rules on the PromQL:\n{run.stdout}{run.stderr}")

    if promtool_parses(exprs):
        ok(f"{where}: promtool parses all {len(exprs)} PromQL expressions")

    # The checks bite: a misspelt metric, a label the metric lacks, a grouping by an unknown
    # label, a missing variable, unbalanced PromQL.
    bad = [
        ("a misspelt metric", lambda: check_expr('sum(rate(server_request_total[$__rate_interval]))', "bite")),
        ("a label the metric lacks", lambda: check_expr('sum(server_workers{pid="1"})', "bite")),
        ("an unknown grouping label", lambda: check_expr("sum by (pod_id) (server_up)", "bite")),
        ("an undefined variable", lambda: check_expr('server_up{server=~"$sever"}', "bite")),
        ("a bare histogram name", lambda: check_expr("server_request_duration_seconds", "bite")),
        ("unbalanced PromQL", lambda: promtool_parses([("bite", "sum(rate(server_up[5m])")])),
    ]
    for what, check in bad:
        must_fail(what, check)
    ok(f"{where}: the checks refuse {', '.join(w for w, _ in bad)}")
    ok(f"{where}: {len(panels)} panels use only exported metrics ({len(used_metrics)} of {len(metrics)}) and labels")
    return {}


# ---------------------------------------------------------------------------------------------
# Prometheus


def check_prometheus(exp: dict) -> dict:
    """The commented Kubernetes job, uncommented. Debian's promtool is built without Kubernetes
    service discovery (kubernetes_sd_configs is an unknown field to it), so promtool checks
    the job with its kubernetes_sd_configs swapped for a static target: the relabelling and
    the rest of the job are checked by Prometheus's own config loader; the discovery block is
    checked here for shape, and its relabelling for agreeing with the DaemonSet."""
    path = DEPLOY / "prometheus" / "prometheus.yml"
    where = rel(path)
    text = path.read_text()
    m = re.search(r"^[ \t]*# BEGIN kubernetes example\n(.*?)^[ \t]*# END kubernetes example", text, re.M | re.S)
    if not expect(m is not None, f"{where}: no '# BEGIN kubernetes example' ... '# END kubernetes example' block"):
        return {}
    lines = m.group(1).splitlines()
    expect(all(re.match(r"^\s*#", l) for l in lines if l.strip()), f"{where}: the Kubernetes example must stay commented")
    block = "\n".join(re.sub(r"^(\s*)# ?", r"\1", l, count=1) for l in lines)
    config = yaml.safe_load(text)
    try:
        jobs = yaml.safe_load("scrape_configs:\n" + block)["scrape_configs"]
    except (yaml.YAMLError, TypeError, KeyError) as e:
        fail(f"{where}: the uncommented Kubernetes example is not a scrape config list: {e}")
        return {}
    if not expect(len(jobs) == 1, f"{where}: one Kubernetes example job expected"):
        return {}
    job = jobs[0]
    expect(job.get("kubernetes_sd_configs") == [{"role": "pod"}], f"{where}: kubernetes_sd_configs: [{{role: pod}}] expected")
    keep = {
        tuple(r.get("source_labels", [])): r.get("regex")
        for r in job.get("relabel_configs", []) if r.get("action") == "keep"
    }
    pod = yaml.safe_load((DEPLOY / "kubernetes" / "daemonset.yaml").read_text())["spec"]["template"]
    name = pod["metadata"]["labels"]["app.kubernetes.io/name"]
    expect(keep.get(("__meta_kubernetes_pod_label_app_kubernetes_io_name",)) == name,
           f"{where}: the Kubernetes job must keep pods labelled app.kubernetes.io/name={name}: {keep}")
    port = pod["spec"]["containers"][0]["ports"][0]["name"]
    expect(keep.get(("__meta_kubernetes_pod_container_port_name",)) == port,
           f"{where}: the Kubernetes job must keep the container port {port}: {keep}")

    checked = copy.deepcopy(config)
    static = copy.deepcopy(job)
    del static["kubernetes_sd_configs"]
    static["static_configs"] = [{"targets": ["127.0.0.1:9464"]}]
    checked["scrape_configs"].append(static)
    with tempfile.NamedTemporaryFile("w", suffix=".yml", prefix="flyprobe-prometheus-") as f:
        yaml.safe_dump(checked, f)
        f.flush()
        run = subprocess.run([exp["promtool"], "check", "config", f.name], capture_output=True, text=True)
    if expect(run.returncode == 0, f"{where}: promtool check config with the Kubernetes example:\n{run.stdout}{run.stderr}"):
        ok(f"{where}: the commented Kubernetes job passes promtool (discovery swapped for a static target)")
    return {}


# ---------------------------------------------------------------------------------------------
# Dockerfile


def check_dockerfile(exp: dict) -> dict:
    import dockerfile

    path = DEPLOY / "docker" / "Dockerfile"
    where = rel(path)
    hadolint = Path(sys.executable).parent / "hadolint"
    run = subprocess.run([str(hadolint), "--no-color", str(path)], capture_output=True, text=True)
    if expect(run.returncode == 0 and not run.stdout.strip(), f"{where}: hadolint:\n{run.stdout}{run.stderr}"):
        ok(f"{where}: hadolint (with ShellCheck on RUN) reports nothing")
    try:
        commands = dockerfile.parse_file(str(path))
    except dockerfile.GoParseError as e:
        fail(f"{where}: BuildKit's parser refuses it: {e}")
        return {}
    ok(f"{where}: BuildKit's parser reads {len(commands)} instructions")
    args = {}
    stages: list[list] = []
    for c in commands:
        if c.cmd == "FROM":
            stages.append([])
        if c.cmd == "ARG" and not stages and "=" in c.value[0]:
            k, v = c.value[0].split("=", 1)
            args[k] = v
        if stages:
            stages[-1].append(c)
    expect(
        args.get("RUST_VERSION", "").startswith(exp["rust_version"] + "."),
        f"{where}: ARG RUST_VERSION={args.get('RUST_VERSION')} is not the workspace's rust-version {exp['rust_version']}",
    )
    expect(
        args.get("BPF_LINKER_VERSION") == exp["bpf_linker_version"],
        f"{where}: ARG BPF_LINKER_VERSION={args.get('BPF_LINKER_VERSION')} differs from xtask/src/setup.rs "
        f"({exp['bpf_linker_version']})",
    )
    expect(len(stages) >= 2, f"{where}: a multi-stage build expected")
    if len(stages) < 2:
        return {}
    build_text = " ".join(" ".join(c.value) for c in stages[0])
    for needle in ["rust-src", "bpf-linker", "cargo build --release --locked --package probe-user --bin flyprobe"]:
        expect(needle in build_text, f"{where}: the build stage does not mention {needle!r}")
    final = stages[-1]
    copies = [c for c in final if c.cmd == "COPY"]
    expect(
        len(copies) == 1 and any(f.startswith("--from=") for f in copies[0].flags)
        and copies[0].value[-1] == "/usr/local/bin/flyprobe",
        f"{where}: the runtime stage must copy only the binary from the build stage: {[c.original for c in copies]}",
    )
    expect(not any(c.cmd == "RUN" for c in final), f"{where}: the runtime stage runs nothing (binary only)")
    entry = [c for c in final if c.cmd == "ENTRYPOINT"]
    cmd = [c for c in final if c.cmd == "CMD"]
    expect(len(entry) == 1 and entry[0].json and list(entry[0].value) == ["/usr/local/bin/flyprobe"],
           f"{where}: ENTRYPOINT [\"/usr/local/bin/flyprobe\"] expected")
    expect(len(cmd) == 1 and cmd[0].json, f"{where}: one exec-form CMD expected")
    expose = [v for c in final if c.cmd == "EXPOSE" for v in c.value]
    expect(expose == ["9464"], f"{where}: EXPOSE 9464 expected, got {expose}")
    ignore = path.with_name("Dockerfile.dockerignore")
    expect(ignore.exists() and "target/" in ignore.read_text().split(),
           f"{rel(ignore)} must keep target/ out of the build context")
    result = {"command_lines": {}}
    if cmd:
        parse_args(list(cmd[0].value), f"{where} CMD")
        result["command_lines"]["Dockerfile CMD"] = list(cmd[0].value)
    return result


CHECKS: dict[str, Callable[[dict], dict]] = {
    "kubernetes": check_kubernetes,
    "helm": check_helm,
    "grafana": check_grafana,
    "prometheus": check_prometheus,
    "dockerfile": check_dockerfile,
}


def main() -> int:
    if len(sys.argv) != 3 or sys.argv[1] not in CHECKS:
        print(f"usage: {sys.argv[0]} {{{','.join(CHECKS)}}} EXPECT_JSON", file=sys.stderr)
        return 2
    exp = json.loads(sys.argv[2])
    result = CHECKS[sys.argv[1]](exp)
    for f in FAILURES:
        print(f"FAIL: {f}", file=sys.stderr)
    print("RESULT " + json.dumps({"command_lines": result.get("command_lines", {})}))
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
