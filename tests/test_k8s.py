"""The Kubernetes deployment (deploy/k8s): render every kustomization, validate each object offline and
strictly against the Kubernetes 1.32 schemas (kubernetes-validate ships them), and check the wiring
that a schema cannot see: probe and Service ports, selectors, the coordinator's endpoints, the
autoscalers' targets and metrics, GPU placement, non-root containers, image tags vs the Dockerfiles,
and that every container's args parse with the real `r2r` command line.

Needs `kubectl` (for `kubectl kustomize`): skipped locally without it, a failure in CI (CI is set).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
KUBE_VERSION = "1.32"
NAMESPACE = "r2r"
TARGETS = ["base", "overlays/cpu", "overlays/gpu"]
ROLE_OF_COMPONENT = {"slm-worker": "slm", "llm-worker": "llm"}
GPU = "nvidia.com/gpu"
VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def _need(what: str, why: str) -> None:
    message = f"{what} is not available: {why}"
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI must have it: install kubectl / the dev extra)")
    pytest.skip(message)


def _kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        _need("kubectl", "the deployment tests render deploy/k8s with `kubectl kustomize`")
    return path


def _render(target: str) -> list[dict]:
    proc = subprocess.run([_kubectl(), "kustomize", str(K8S / target)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, f"kubectl kustomize {target} failed:\n{proc.stderr}"
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    assert docs, f"kubectl kustomize {target} rendered nothing"
    return docs


_RENDERED: dict[str, list[dict]] = {}


@pytest.fixture(params=TARGETS, ids=lambda t: t.split("/")[-1])
def rendered(request) -> tuple[str, list[dict]]:
    target = request.param
    if target not in _RENDERED:
        _RENDERED[target] = _render(target)
    return target, _RENDERED[target]


def overlay(name: str) -> list[dict]:
    if name not in _RENDERED:
        _RENDERED[name] = _render(name)
    return _RENDERED[name]


# ---- helpers over rendered objects ---------------------------------------------------------------
def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def by_name(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in of_kind(docs, kind)}


def pod_spec(deploy: dict) -> dict:
    return deploy["spec"]["template"]["spec"]


def pod_labels(deploy: dict) -> dict:
    return deploy["spec"]["template"]["metadata"].get("labels", {})


def selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def container_ports(deploy: dict) -> tuple[set[int], set[str]]:
    numbers, names = set(), set()
    for c in pod_spec(deploy)["containers"]:
        for p in c.get("ports", []):
            numbers.add(p["containerPort"])
            if "name" in p:
                names.add(p["name"])
    return numbers, names


def resolve_port(deploy: dict, port) -> int | None:
    """A containerPort number for `port` (a number or a port name), None if it is not declared."""
    for c in pod_spec(deploy)["containers"]:
        for p in c.get("ports", []):
            if port in (p["containerPort"], p.get("name")):
                return p["containerPort"]
    return None


def config_data(docs: list[dict]) -> dict[str, dict]:
    return {d["metadata"]["name"]: d.get("data", {}) for d in of_kind(docs, "ConfigMap")}


def container_env(docs: list[dict], deploy: dict, container: dict) -> dict[str, str]:
    """The container's env as the kubelet would set it (config maps and the downward API resolved)."""
    maps = config_data(docs)
    env = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
            continue
        src = e["valueFrom"]
        if "configMapKeyRef" in src:
            ref = src["configMapKeyRef"]
            assert ref["name"] in maps, f"{container['name']}: env {e['name']} names a missing ConfigMap {ref['name']}"
            assert ref["key"] in maps[ref["name"]], (
                f"{container['name']}: env {e['name']}: ConfigMap {ref['name']} has no key {ref['key']}")
            env[e["name"]] = maps[ref["name"]][ref["key"]]
        elif "fieldRef" in src:
            field = src["fieldRef"]["fieldPath"]
            assert field == "metadata.namespace", f"unexpected fieldRef {field}"
            env[e["name"]] = deploy["metadata"]["namespace"]
        else:
            raise AssertionError(f"unexpected env source {src}")
    return env


def expanded_args(docs: list[dict], deploy: dict, container: dict) -> list[str]:
    env = container_env(docs, deploy, container)
    out = []
    for arg in container.get("args", []):
        for var in VAR.findall(arg):
            assert var in env, (f"{deploy['metadata']['name']}/{container['name']}: arg {arg!r} uses $({var}), "
                                f"which the container's env does not define (Kubernetes would pass it literally)")
        out.append(VAR.sub(lambda m: env[m.group(1)], arg))
    return out


def flag(args: list[str], name: str) -> str | None:
    for i, a in enumerate(args):
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
        if a == name and i + 1 < len(args):
            return args[i + 1]
    return None


def deployment_of_component(docs: list[dict], component: str) -> dict:
    found = [d for d in of_kind(docs, "Deployment") if pod_labels(d).get("app.kubernetes.io/component") == component]
    assert len(found) == 1, f"expected one Deployment for {component}, found {[d['metadata']['name'] for d in found]}"
    return found[0]


def main_container(deploy: dict) -> dict:
    containers = pod_spec(deploy)["containers"]
    assert len(containers) == 1, f"{deploy['metadata']['name']}: one container expected"
    return containers[0]


def probes(container: dict) -> dict[str, dict]:
    return {k: container[k] for k in ("startupProbe", "readinessProbe", "livenessProbe") if k in container}


def probe_port(probe: dict):
    for kind in ("grpc", "httpGet", "tcpSocket"):
        if kind in probe:
            return kind, probe[kind]["port"]
    raise AssertionError(f"probe without grpc/httpGet/tcpSocket: {probe}")


def service_backend(docs: list[dict], service: dict) -> dict:
    """The one Deployment whose pods the Service selects."""
    hits = [d for d in of_kind(docs, "Deployment") if selects(service["spec"].get("selector", {}), pod_labels(d))]
    assert len(hits) == 1, (f"Service {service['metadata']['name']} selects "
                            f"{[d['metadata']['name'] for d in hits] or 'no Deployment'}; expected exactly one")
    return hits[0]


def endpoint_target(docs: list[dict], endpoint: str, namespace: str) -> tuple[dict, int]:
    """Service and port named by a gRPC target `[dns:///]HOST:PORT`, HOST being a Service's short or
    cluster name (NAME, NAME.NS, NAME.NS.svc, NAME.NS.svc.cluster.local)."""
    m = re.fullmatch(r"(?:dns:///)?([a-z0-9.-]+):(\d+)", endpoint)
    assert m, f"endpoint {endpoint!r} is not [dns:///]HOST:PORT"
    host, port = m.group(1), int(m.group(2))
    parts = host.split(".")
    name, ns = parts[0], parts[1] if len(parts) > 1 else namespace
    if len(parts) > 2:
        domain = config_data(docs)
        assert parts[2] == "svc" and (len(parts) == 3 or ".".join(parts[3:]) == "cluster.local"
                                      or any(".".join(parts[3:]) == d.get("R2R_CLUSTER_DOMAIN")
                                             for d in domain.values())), f"{host} is not a Service DNS name"
    services = [s for s in of_kind(docs, "Service") if s["metadata"]["name"] == name
                and s["metadata"].get("namespace") == ns]
    assert services, f"endpoint {endpoint!r}: no Service {name} in namespace {ns}"
    service = services[0]
    assert port in [p["port"] for p in service["spec"]["ports"]], (
        f"endpoint {endpoint!r}: Service {name} has no port {port}")
    return service, port


def service_target_port(service: dict, port: int):
    for p in service["spec"]["ports"]:
        if p["port"] == port:
            return p.get("targetPort", port)
    raise AssertionError(f"Service {service['metadata']['name']} has no port {port}")


# ---- schema validation ---------------------------------------------------------------------------
def _kubernetes_validate():
    try:
        import kubernetes_validate
    except ImportError:
        _need("kubernetes-validate", "pip install the dev extra (it ships the Kubernetes JSON schemas)")
    return kubernetes_validate


def test_every_object_validates_strictly_offline(rendered):
    kubernetes_validate = _kubernetes_validate()
    target, docs = rendered
    errors = []
    for doc in docs:
        what = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{what}: {'.'.join(map(str, exc.path))}: {exc.message}")
        except (kubernetes_validate.SchemaNotFoundError, kubernetes_validate.InvalidSchemaError) as exc:
            errors.append(f"{what}: {exc.message}")
    assert not errors, f"{target} does not validate against Kubernetes {KUBE_VERSION}:\n" + "\n".join(errors)


def test_adapter_rules_configmap_validates_and_serves_the_hpa_metrics():
    kubernetes_validate = _kubernetes_validate()

    docs = [d for d in yaml.safe_load_all((K8S / "prometheus-adapter" / "rules.yaml").read_text()) if d]
    served = set()
    for doc in docs:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        for rule in yaml.safe_load(doc["data"]["config.yaml"])["rules"]:
            assert {v["resource"] for v in rule["resources"]["overrides"].values()} == {"namespace", "pod"}
            served.add(rule["name"]["as"])
    for target in ("overlays/cpu", "overlays/gpu"):
        for hpa in of_kind(overlay(target), "HorizontalPodAutoscaler"):
            for metric in hpa["spec"]["metrics"]:
                assert metric["type"] == "Pods"
                assert metric["pods"]["metric"]["name"] in served, (
                    f"{target}: HPA {hpa['metadata']['name']} uses {metric['pods']['metric']['name']}, "
                    f"which the prometheus-adapter rules do not serve")


# ---- the shape of the deployment -----------------------------------------------------------------
def test_one_deployment_and_service_per_role(rendered):
    _, docs = rendered
    deployments = by_name(docs, "Deployment")
    services = by_name(docs, "Service")
    assert set(deployments) == {"r2r-slm-worker", "r2r-llm-worker", "r2r-router", "r2r-coordinator", "r2r-gateway"}
    assert set(services) == {"r2r-slm-workers", "r2r-llm-workers", "r2r-router", "r2r-coordinator", "r2r-gateway"}
    for name in ("r2r-slm-workers", "r2r-llm-workers"):
        assert services[name]["spec"].get("clusterIP") == "None", f"{name} must be headless"
        assert not services[name]["spec"].get("publishNotReadyAddresses"), f"{name} must list ready pods only"
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == NAMESPACE, f"{doc['kind']}/{doc['metadata']['name']}"
    assert [d["metadata"]["name"] for d in of_kind(docs, "Namespace")] == [NAMESPACE]


def test_probe_ports_are_declared_container_ports(rendered):
    _, docs = rendered
    for deploy in of_kind(docs, "Deployment"):
        name = deploy["metadata"]["name"]
        for c in pod_spec(deploy)["containers"]:
            ps = probes(c)
            assert set(ps) == {"startupProbe", "readinessProbe", "livenessProbe"}, f"{name}: probes {sorted(ps)}"
            for kind_name, probe in ps.items():
                kind, port = probe_port(probe)
                assert resolve_port(deploy, port) is not None, f"{name} {kind_name}: port {port} is not declared"
                if kind == "grpc":
                    assert isinstance(port, int), f"{name} {kind_name}: gRPC probes take a port number"
            if c["args"][0] == "gateway":
                # readiness follows the coordinator (/health is 503 without it); liveness does not
                ready = ps["readinessProbe"]
                assert ready.get("httpGet", {}).get("path") == "/health", f"{name}: readiness on GET /health"
                assert "httpGet" not in ps["livenessProbe"], f"{name}: a coordinator outage must not restart it"
            else:
                # native gRPC health probes on every gRPC service
                assert all(probe_port(p)[0] == "grpc" for p in ps.values()), f"{name}: use native gRPC probes"


def test_every_service_selects_a_deployment_and_targets_a_declared_port(rendered):
    _, docs = rendered
    for service in of_kind(docs, "Service"):
        backend = service_backend(docs, service)
        for p in service["spec"]["ports"]:
            target = p.get("targetPort", p["port"])
            assert resolve_port(backend, target) is not None, (
                f"Service {service['metadata']['name']} port {p['port']}: targetPort {target} is not a "
                f"containerPort of {backend['metadata']['name']}")


def test_container_flags_match_their_ports_and_scrape_annotations(rendered):
    _, docs = rendered
    for deploy in of_kind(docs, "Deployment"):
        c = main_container(deploy)
        args = expanded_args(docs, deploy, c)
        name = deploy["metadata"]["name"]
        assert c["image"].split(":")[0].endswith("r2r-serve") and "command" not in c, (
            f"{name}: run the r2r-serve image's `r2r` entrypoint with args")
        numbers, names = container_ports(deploy)
        port = int(flag(args, "--port"))
        assert flag(args, "--host") == "0.0.0.0", f"{name}: listen on all interfaces"
        if args[0] == "gateway":
            assert resolve_port(deploy, "http") == port
            continue
        assert resolve_port(deploy, "grpc") == port, f"{name}: --port {port} vs containerPort grpc"
        metrics = int(flag(args, "--metrics-port"))
        assert resolve_port(deploy, "metrics") == metrics, f"{name}: --metrics-port {metrics} vs containerPort"
        ann = deploy["spec"]["template"]["metadata"].get("annotations", {})
        assert ann.get("prometheus.io/scrape") == "true", name
        assert ann.get("prometheus.io/port") == str(metrics), name
        assert ann.get("prometheus.io/path") == "/metrics", name
    expected = {"slm-worker": 50052, "llm-worker": 50053, "router": 50054, "coordinator": 50051, "gateway": 8000}
    for component, port in expected.items():
        deploy = deployment_of_component(docs, component)
        assert int(flag(expanded_args(docs, deploy, main_container(deploy)), "--port")) == port, component


def test_worker_roles_and_model_settings_come_from_the_configmap(rendered):
    _, docs = rendered
    for component, role in ROLE_OF_COMPONENT.items():
        deploy = deployment_of_component(docs, component)
        c = main_container(deploy)
        raw = c["args"]
        assert raw[0] == "worker" and flag(raw, "--role") == role, component
        for f in ("--model", "--dtype", "--device"):
            assert VAR.search(flag(raw, f) or ""), f"{component}: {f} should come from the ConfigMap"
        args = expanded_args(docs, deploy, c)
        assert flag(args, "--dtype") in {"auto", "float32", "bfloat16", "float16"}
        assert flag(args, "--model"), component
    router = deployment_of_component(docs, "router")
    args = expanded_args(docs, router, main_container(router))
    assert flag(args, "--strategy") in {"auto", "entropy", "top1", "neural", "random"}
    assert flag(args, "--pair") == "qwen2.5-coder"  # the default pair's trained router, shipped in the image
    coordinator = deployment_of_component(docs, "coordinator")
    float(flag(expanded_args(docs, coordinator, main_container(coordinator)), "--threshold"))


def test_coordinator_and_gateway_endpoints_name_the_right_services(rendered):
    _, docs = rendered
    coordinator = deployment_of_component(docs, "coordinator")
    args = expanded_args(docs, coordinator, main_container(coordinator))
    ns = coordinator["metadata"]["namespace"]
    for flag_name, component in (("--slm", "slm-worker"), ("--llm", "llm-worker"), ("--router", "router")):
        endpoint = flag(args, flag_name)
        assert endpoint, f"coordinator has no {flag_name}"
        service, port = endpoint_target(docs, endpoint, ns)
        backend = service_backend(docs, service)
        assert pod_labels(backend).get("app.kubernetes.io/component") == component, (
            f"coordinator {flag_name}={endpoint} reaches {backend['metadata']['name']}, not the {component}")
        backend_port = resolve_port(backend, service_target_port(service, port))
        assert backend_port == int(flag(expanded_args(docs, backend, main_container(backend)), "--port")), (
            f"coordinator {flag_name}={endpoint}: the Service forwards to {backend_port}, where nothing listens")
        if component.endswith("worker"):
            # a pool: every replica's address, re-resolved by the coordinator
            assert endpoint.startswith("dns:///"), f"{flag_name} should be dns:///<headless service>:PORT"
            assert service["spec"].get("clusterIP") == "None", f"{flag_name} should name the headless Service"
    gateway = deployment_of_component(docs, "gateway")
    endpoint = flag(expanded_args(docs, gateway, main_container(gateway)), "--coordinator")
    service, port = endpoint_target(docs, endpoint, gateway["metadata"]["namespace"])
    backend = service_backend(docs, service)
    assert pod_labels(backend)["app.kubernetes.io/component"] == "coordinator"
    assert resolve_port(backend, service_target_port(service, port)) == 50051


def test_autoscalers_target_the_model_pools(rendered):
    _, docs = rendered
    deployments = by_name(docs, "Deployment")
    hpas = of_kind(docs, "HorizontalPodAutoscaler")
    targets = {}
    for hpa in hpas:
        ref = hpa["spec"]["scaleTargetRef"]
        assert ref["kind"] == "Deployment" and ref["apiVersion"] == "apps/v1"
        assert ref["name"] in deployments, f"HPA {hpa['metadata']['name']} targets a missing {ref['name']}"
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        assert "replicas" not in deployments[ref["name"]]["spec"], (
            f"{ref['name']} is autoscaled: leave `replicas` to the HPA (a re-apply would reset it)")
        component = pod_labels(deployments[ref["name"]])["app.kubernetes.io/component"]
        targets[component] = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]]
    assert targets == {"slm-worker": ["r2r_worker_active_sessions"], "llm-worker": ["r2r_worker_queue_items"]}


def test_pdb_selectors_match_one_deployment_each(rendered):
    _, docs = rendered
    covered = set()
    for pdb in of_kind(docs, "PodDisruptionBudget"):
        selector = pdb["spec"]["selector"]["matchLabels"]
        hits = [d["metadata"]["name"] for d in of_kind(docs, "Deployment") if selects(selector, pod_labels(d))]
        assert len(hits) == 1, f"PDB {pdb['metadata']['name']} selects {hits}"
        covered.add(hits[0])
        # a single replica must stay evictable (node drains), so no minAvailable
        assert "maxUnavailable" in pdb["spec"] and "minAvailable" not in pdb["spec"]
    assert covered == set(by_name(docs, "Deployment")), "every Deployment needs a PodDisruptionBudget"


def test_graceful_drain_fits_the_grace_period(rendered):
    _, docs = rendered
    for deploy in of_kind(docs, "Deployment"):
        name = deploy["metadata"]["name"]
        c = main_container(deploy)
        grace = pod_spec(deploy)["terminationGracePeriodSeconds"]
        cmd = c["lifecycle"]["preStop"]["exec"]["command"]
        assert cmd[0] == "sleep", f"{name}: preStop should sleep while endpoints update"
        pre_stop = int(cmd[1])
        args = expanded_args(docs, deploy, c)
        # the coordinator finishes sessions within --drain-s, then stops its server (5 s); the gateway
        # waits --drain-s for open requests; workers and router stop their server with a 30 s grace
        drain = {"coordinator": float(flag(args, "--drain-s") or 30) + 5,
                 "gateway": float(flag(args, "--drain-s") or 30)}.get(args[0], 30)
        assert grace >= pre_stop + drain + 5, f"{name}: grace {grace}s < preStop {pre_stop}s + drain {drain}s + 5"
        live = c["livenessProbe"]
        assert live["periodSeconds"] * live["failureThreshold"] > grace, (
            f"{name}: NOT_SERVING while draining must not trip the liveness probe before the grace period ends")
        start = c["startupProbe"]
        budget = start["periodSeconds"] * start["failureThreshold"]
        minimum = {"worker": 300, "coordinator": 600}.get(args[0], 60)
        assert budget >= minimum, f"{name}: startupProbe allows {budget}s, model loading needs >= {minimum}s"


def test_every_container_runs_non_root_and_locked_down(rendered):
    _, docs = rendered
    for deploy in of_kind(docs, "Deployment"):
        name = deploy["metadata"]["name"]
        spec = pod_spec(deploy)
        pod_sc = spec.get("securityContext", {})
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", name
        assert spec.get("automountServiceAccountToken") is False, name
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = c.get("securityContext", {})
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, f"{name}/{c['name']}"
            assert sc.get("runAsUser", pod_sc.get("runAsUser", 0)) != 0, f"{name}/{c['name']}: numeric non-root uid"
            assert sc.get("allowPrivilegeEscalation") is False, f"{name}/{c['name']}"
            assert sc.get("readOnlyRootFilesystem") is True, f"{name}/{c['name']}"
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{name}/{c['name']}"
            assert not sc.get("privileged"), f"{name}/{c['name']}"
            tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
            assert tmp and "emptyDir" in volumes[tmp[0]["name"]], f"{name}/{c['name']}: /tmp: a writable emptyDir"
            res = c.get("resources", {})
            for key in ("cpu", "memory"):
                assert key in res.get("requests", {}) and key in res.get("limits", {}), f"{name}: {key} requests/limits"


# ---- overlays --------------------------------------------------------------------------------------
def _gpus(container: dict) -> tuple[str | None, str | None]:
    res = container.get("resources", {})
    return res.get("requests", {}).get(GPU), res.get("limits", {}).get(GPU)


def test_gpu_overlay_puts_the_model_pools_on_gpus():
    docs = overlay("overlays/gpu")
    cfg = config_data(docs)
    for deploy in of_kind(docs, "Deployment"):
        component = pod_labels(deploy)["app.kubernetes.io/component"]
        c = main_container(deploy)
        spec = pod_spec(deploy)
        if component in ROLE_OF_COMPONENT:
            assert _gpus(c) == ("1", "1"), f"{component}: nvidia.com/gpu 1 in requests and limits"
            assert spec.get("nodeSelector"), f"{component}: pin to GPU nodes"
            assert any(t.get("key") == GPU for t in spec.get("tolerations", [])), f"{component}: tolerate GPU taints"
            args = expanded_args(docs, deploy, c)
            assert flag(args, "--device").startswith("cuda") and flag(args, "--dtype") == "bfloat16", component
        else:
            assert _gpus(c) == (None, None), f"{component} must not take a GPU"
            assert not spec.get("tolerations"), f"{component} belongs on ordinary nodes"
    assert all(d.get("R2R_DEVICE") in (None, "cuda") for d in cfg.values())
    # more replicas, higher ceilings than the single-node CPU setup
    cpu_hpas = {h["metadata"]["name"]: h["spec"] for h in of_kind(overlay("overlays/cpu"), "HorizontalPodAutoscaler")}
    for hpa in of_kind(docs, "HorizontalPodAutoscaler"):
        cpu = cpu_hpas[hpa["metadata"]["name"]]
        assert hpa["spec"]["maxReplicas"] > cpu["maxReplicas"] and hpa["spec"]["minReplicas"] >= 2
    for name in ("r2r-router", "r2r-coordinator", "r2r-gateway"):
        assert by_name(docs, "Deployment")[name]["spec"]["replicas"] >= 2, name


def test_cpu_overlay_is_one_small_cpu_node():
    docs = overlay("overlays/cpu")
    for deploy in of_kind(docs, "Deployment"):
        c = main_container(deploy)
        assert _gpus(c) == (None, None), deploy["metadata"]["name"]
        assert deploy["spec"].get("replicas", 1) == 1, deploy["metadata"]["name"]
        if c["args"][0] == "worker":
            args = expanded_args(docs, deploy, c)
            # auto: the worker picks for its node (bf16, or bfloat16/float32 on AVX2 CPUs)
            assert flag(args, "--device") == "cpu" and flag(args, "--dtype") == "auto"
            # torch threads = the CPU limit
            assert int(flag(args, "--threads")) == int(c["resources"]["limits"]["cpu"])
    for hpa in of_kind(docs, "HorizontalPodAutoscaler"):
        assert hpa["spec"]["minReplicas"] == 1 and hpa["spec"]["maxReplicas"] <= 2


# ---- images ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("target,dockerfile", [("overlays/cpu", "Dockerfile"), ("overlays/gpu", "Dockerfile.gpu")])
def test_images_are_what_the_dockerfiles_build(target, dockerfile):
    text = (ROOT / "deploy" / dockerfile).read_text()
    built = re.findall(rf"docker build -f deploy/{re.escape(dockerfile)} -t (\S+) \.", text)
    assert built, f"deploy/{dockerfile} should document its `docker build -f deploy/{dockerfile} -t IMAGE .`"
    images = {c["image"] for d in of_kind(overlay(target), "Deployment") for c in pod_spec(d)["containers"]}
    assert images == {built[0]}, f"{target} runs {images}, deploy/{dockerfile} builds {built[0]}"
    assert re.search(r'^ENTRYPOINT \["r2r"\]', text, re.M), f"deploy/{dockerfile}: entrypoint r2r"
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].split(":")[0] == "10001", f"deploy/{dockerfile}: run as uid 10001 (numeric)"
    uids = {pod_spec(d)["securityContext"]["runAsUser"] for d in of_kind(overlay(target), "Deployment")}
    assert uids == {10001}
    assert "r2r models prepare --cache-dir /models" in text, f"deploy/{dockerfile}: bake the default pair"
    for env in ("R2R_CACHE_DIR=/models", "HF_HUB_OFFLINE=1"):
        assert env in text, f"deploy/{dockerfile}: ENV {env}"
    dockerignore = (ROOT / ".dockerignore").read_text().split()
    for needed in ("!pyproject.toml", "!README.md", "!services/", "!clients/"):
        assert needed in dockerignore, f".dockerignore must let {needed[1:]} into the build context"


# ---- the contract with the `r2r` command -----------------------------------------------------------
def test_every_container_args_parse_with_the_r2r_cli():
    """What the manifests run must be what `r2r` accepts (flags, choices, types)."""
    import contextlib
    import io

    from r2r_serve.cli import build_parser

    parser = build_parser()
    problems = []
    for target in ("overlays/cpu", "overlays/gpu"):
        docs = overlay(target)
        for deploy in of_kind(docs, "Deployment"):
            args = expanded_args(docs, deploy, main_container(deploy))
            err = io.StringIO()
            try:
                with contextlib.redirect_stderr(err):
                    parser.parse_args(args)
            except SystemExit:
                problems.append(f"{target} {deploy['metadata']['name']}: r2r {' '.join(args)}\n    "
                                + err.getvalue().strip().splitlines()[-1])
    assert not problems, "the `r2r` command rejects these container args:\n" + "\n".join(problems)
