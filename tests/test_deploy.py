"""examples/deploy: the Kubernetes manifests checked against the Kubernetes schemas and against
fastws itself (probes, preStop command, grace period, the container's command), and the drain
they rely on run for real: readiness fails, accepting goes on for drain_unready, then stops,
tunnels are closed politely, and `fastws -s drain` returns once fastws has exited."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from websockets.sync.client import connect

from fastws import cli, config
from support import (EchoBackend, Proxy, closes_of, free_port, http_get, port_refused, to_toml,
                     wait_until)

DEPLOY = Path(__file__).resolve().parent.parent / "examples" / "deploy"
KUBERNETES = "1.30.0"      # a version every supported cluster runs or exceeds


def manifests() -> dict[str, dict[str, Any]]:
    docs = list(yaml.safe_load_all((DEPLOY / "k8s.yaml").read_text()))
    return {d["kind"]: d for d in docs}


def container() -> dict[str, Any]:
    (c,) = manifests()["Deployment"]["spec"]["template"]["spec"]["containers"]
    return c


def test_the_manifests_are_valid_kubernetes() -> None:
    docs = list(yaml.safe_load_all((DEPLOY / "k8s.yaml").read_text()))
    assert sorted(d["kind"] for d in docs) == ["ConfigMap", "Deployment", "Service"]
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_the_configmap_is_the_configuration_and_it_checks() -> None:
    text = manifests()["ConfigMap"]["data"]["fastws.toml"]
    assert text == (DEPLOY / "fastws.toml").read_text()
    data = tomllib.loads(text)
    data["upstream"][0]["servers"] = ["127.0.0.1:8000"]   # (the cluster's name resolves there)
    cfg = config.from_dict(data)
    assert cfg.drain_on_term == 30 and cfg.pid


def test_probes_prestop_and_grace_period_match_fastws() -> None:
    m = manifests()
    data = tomllib.loads(m["ConfigMap"]["data"]["fastws.toml"])
    pod = m["Deployment"]["spec"]["template"]["spec"]
    c = container()
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    (server,) = data["server"]
    assert [int(a.rsplit(":", 1)[1]) for a in server["listen"]] == [ports["http"]]
    status_of = {loc["path"]: loc.get("status") for loc in server["location"]}
    for probe, kind in (("readinessProbe", "ready"), ("livenessProbe", "live")):
        get = c[probe]["httpGet"]
        assert ports[get["port"]] == ports["http"]
        assert status_of[f"= {get['path']}"] == kind, (probe, get)
    # the preStop command is fastws's own drain, on the mounted configuration
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "fastws"
    args = cli._parser().parse_args(command[1:])
    assert args.signal == "drain"
    (mount,) = c["volumeMounts"]
    assert Path(args.config).parent == Path(mount["mountPath"])
    assert pod["volumes"][0]["configMap"]["name"] == m["ConfigMap"]["metadata"]["name"]
    assert data["pid"] and data["drain_on_term"]
    window = config.parse_duration(data["drain_on_term"])
    assert pod["terminationGracePeriodSeconds"] >= window + 10
    # the Service selects the pods and targets the port fastws listens on
    service = m["Service"]["spec"]
    assert service["selector"] == m["Deployment"]["spec"]["selector"]["matchLabels"]
    assert service["ports"][0]["targetPort"] == "http"
    # and the image runs fastws on that same file
    entry = re.search(r"^ENTRYPOINT (.+)$", (DEPLOY / "Containerfile").read_text(), re.M)
    assert entry is not None and eval(entry.group(1)) == ["fastws", "-c", args.config]


def test_the_drain_as_kubernetes_runs_it(tmp_path: Path) -> None:
    backend = EchoBackend()
    port = free_port()
    data = tomllib.loads((DEPLOY / "fastws.toml").read_text())
    data["processes"] = 2
    data["pid"] = str(tmp_path / "fastws.pid")
    data["drain_on_term"], data["drain_unready"] = "8s", "1s"
    data["upstream"][0]["servers"] = [backend.address]
    data["server"][0]["listen"] = [f"127.0.0.1:{port}"]
    path = tmp_path / "fastws.toml"
    path.write_text(to_toml(data))
    proxy = Proxy(tmp_path, path, port=port)
    try:
        assert http_get("127.0.0.1", port, "/ready") == (200, b"ready\n")
        assert http_get("127.0.0.1", port, "/live") == (200, b"alive\n")
        ws = connect(f"ws://127.0.0.1:{port}/chat")
        ws.send("before")
        assert ws.recv(timeout=10) == "before"
        closes = closes_of(ws)        # the tunnel goes on until the proxy closes it, politely
        # the preStop command, as the kubelet runs it
        prestop = subprocess.Popen([sys.executable, "-m", "fastws", "-s", "drain", "-c",
                                    str(path)], stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT)
        wait_until(lambda: http_get("127.0.0.1", port, "/ready")[0] == 503)
        # not ready, and still accepting: a client routed here before the change is served
        assert http_get("127.0.0.1", port, "/live") == (200, b"alive\n")
        with connect(f"ws://127.0.0.1:{port}/chat") as late:
            late.send("late")
            assert late.recv(timeout=10) == "late"
        wait_until(lambda: port_refused(port))
        wait_until(lambda: closes != [], timeout=15)
        assert closes == [(1001, "server shutting down")]
        assert prestop.wait(20) == 0, prestop.stdout.read() if prestop.stdout else ""
        assert proxy.proc.wait(5) == 0            # exited by itself, within the window
        out = proxy.output()
        assert "draining: not ready from now" in out and "Traceback" not in out
    finally:
        proxy.stop()
        backend.close()


def test_drain_needs_drain_on_term(tmp_path: Path) -> None:
    data = tomllib.loads((DEPLOY / "fastws.toml").read_text())
    del data["drain_on_term"], data["drain_unready"]
    data["upstream"][0]["servers"] = ["127.0.0.1:9"]
    path = tmp_path / "fastws.toml"
    path.write_text(to_toml(data))
    r = subprocess.run([sys.executable, "-m", "fastws", "-s", "drain", "-c", str(path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "drain_on_term: is not set" in r.stderr


@pytest.mark.parametrize("drain, unready, problem", [
    ("10s", "10s", "drain_unready: is a part of drain_on_term"),
    ("10s", "-1s", "drain_unready"),
])
def test_drain_mistakes(drain: str, unready: str, problem: str) -> None:
    with pytest.raises(Exception, match=problem):
        config.from_dict({"drain_on_term": drain, "drain_unready": unready,
                          "upstream": [{"name": "b", "servers": ["127.0.0.1:9"]}],
                          "server": [{"listen": ["127.0.0.1:8080"],
                                      "location": [{"path": "/", "proxy_pass": "b"}]}]})
