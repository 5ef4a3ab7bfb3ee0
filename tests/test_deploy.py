"""The files under `deploy/` stay true to the code: configurations load, every metric a
dashboard, alert or recording rule names exists, rules and units pass their own tools'
checks, the container build installs pinned dependencies.

`promtool` (Debian's `prometheus` package) and PyYAML (the `test` extra) are what CI
installs: without them these tests skip, or fail when `CI=true` (`.ci/run` sets it).
`systemd-analyze` and `kubectl` are optional: their checks skip without them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
import urllib.parse
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement

from stream.config import load_config
from stream.metrics import (
    DROP_REASONS,
    JIT_PROCESSORS,
    PHASES,
    SINK_DROP_REASONS,
    SINKS,
    SOURCES,
    STAGES,
    Metrics,
)
from stream.protocol import REASONS
from stream.security import check_policy, exposed, unprotected

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yml"
RULES = DEPLOY / "prometheus" / "rules.yml"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "enactive-stream.json"
UNIT = DEPLOY / "systemd" / "enactive-stream.service"
KUBERNETES = DEPLOY / "kubernetes"
CONTAINERFILE = DEPLOY / "container" / "Containerfile"
CONSTRAINTS = DEPLOY / "container" / "constraints.txt"
OPERATIONS = ROOT / "docs" / "operations.md"
PYPROJECT = ROOT / "pyproject.toml"
# Where the alerts' runbook links point: a placeholder for the repository's web address,
# documented in docs/operations.md ("Runbook links").
RUNBOOK_BASE = "https://git.example.com/enactive-stream/blob/main/docs/operations.md"

TOMLS = sorted(DEPLOY.rglob("*.toml"))
YAMLS = sorted([*DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml")])
METRIC = re.compile(r"\benactive_[a-z0-9_]+")
RECORDED = re.compile(r"\benactive:[a-z0-9_]+:[a-z0-9_]+")  # recording rules' series
RUNTIME_METRIC = re.compile(r"\b(?:process|python_gc)_[a-z0-9_]+")
SELECTOR = re.compile(r"\b(enactive_[a-z0-9_]+)\{([^}]*)\}")
MATCHER = re.compile(r'(\w+)\s*=\s*"([^"]*)"')  # `label="value"` (not `=~`, `!=`)
# The values a label can take, per family (`None`: any); families not listed: any.
LABEL_VALUES: dict[str, dict[str, tuple[str, ...] | None]] = {
    "enactive_frames_received_total": {"source": SOURCES},
    "enactive_frames_rejected_total": {"source": SOURCES, "reason": REASONS},
    "enactive_frames_dropped_total": {"reason": DROP_REASONS},
    "enactive_stage_latency_seconds": {"stage": STAGES},
    "enactive_jit_compilations_total": {"phase": PHASES},
    "enactive_jit_fallback_total": {"processor": JIT_PROCESSORS, "reason": None},
    "enactive_moments_emitted_total": {"sink": SINKS},
    "enactive_moments_dropped_total": {"sink": SINKS, "reason": SINK_DROP_REASONS},
}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
TOOL_TIMEOUT_S = 60
IN_CI = os.environ.get("CI", "").lower() == "true"
# Tools `.ci/run` installs, and from where: missing in CI fails the test instead of skipping.
CI_TOOLS = {"promtool": "Debian's prometheus package"}
# The container image's interpreter, for the markers of pinned requirements.
IMAGE_MARKERS = {
    "python_version": "3.11",
    "python_full_version": "3.11.0",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "os_name": "posix",
    "extra": "",
}


def _families() -> dict[str, str]:
    """`{name: type}` of every family the daemon exposes, as `# TYPE` lines name them."""
    metrics = Metrics(
        buckets=(1, 8), sources=("tcp", "nats"), sinks=("tcp", "nats"), partitions=(0, 3)
    )
    metrics.watch_queue("ingest", lambda: 0)
    metrics.jit_fallback("slab_step", "XlaRuntimeError")  # its series appear at the first
    text = metrics.exposition().decode()
    return dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE))


def _unknown_metrics(text: str, families: dict[str, str]) -> set[str]:
    """The `enactive_*` identifiers in `text` that name no exposed series."""
    unknown = set()
    for name in set(METRIC.findall(text)):
        if name in families:
            continue
        base = next((name[: -len(s)] for s in HISTOGRAM_SUFFIXES if name.endswith(s)), None)
        if base is not None and families.get(base) == "histogram":
            continue
        unknown.add(name)
    return unknown


def _unknown_label_values(text: str) -> set[str]:
    """The `name{label="value"}` matchers in `text` whose value the daemon never exposes."""
    unknown = set()
    for name, matchers in SELECTOR.findall(text):
        base = next((name[: -len(s)] for s in HISTOGRAM_SUFFIXES if name.endswith(s)), name)
        known = LABEL_VALUES.get(base, {})
        for label, value in MATCHER.findall(matchers):
            values = known.get(label)
            if values is not None and value not in values:
                unknown.add(f'{name}{{{label}="{value}"}}')
    return unknown


def _dashboard_exprs(node: Any) -> list[str]:
    """Every PromQL expression of a Grafana dashboard: panel targets and variable queries."""
    out: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition") and isinstance(value, str):
                out.append(value)
            else:
                out.extend(_dashboard_exprs(value))
    elif isinstance(node, list):
        for item in node:
            out.extend(_dashboard_exprs(item))
    return out


def _run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False, **kwargs
    )


def _missing(message: str) -> None:
    """Skips the test, or fails it in CI, which installs what the tests need."""
    if IN_CI:
        pytest.fail(f"{message} (CI=true: CI must install it)")
    pytest.skip(message)


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        source = CI_TOOLS.get(name)
        if source is None:
            pytest.skip(f"{name} is not on PATH (optional; CI does not install it)")
        _missing(f"{name} is not on PATH: install {source}, as .ci/run does")
    assert path is not None
    return path


def _yaml() -> Any:
    try:
        import yaml
    except ImportError:
        _missing("PyYAML is not installed: pip install -e '.[test]' installs it")
    return yaml


def _recording_rules() -> dict[str, str]:
    """`{record: expr}` of `deploy/prometheus/rules.yml`."""
    groups = _yaml().safe_load(RULES.read_text())["groups"]
    return {rule["record"]: rule["expr"] for group in groups for rule in group["rules"]}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins() -> dict[str, str]:
    """`{canonical name: version}` of `deploy/container/constraints.txt`."""
    pins = {}
    for raw in CONSTRAINTS.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!]+)", line)
        assert match, f"constraints.txt: {raw!r} is not an exact pin (name==version)"
        assert _canonical(match[1]) not in pins, f"constraints.txt pins {match[1]} twice"
        pins[_canonical(match[1])] = match[2]
    return pins


# --- configuration files ------------------------------------------------------------------


def test_deploy_has_the_expected_configs() -> None:
    names = {p.relative_to(DEPLOY).as_posix() for p in TOMLS}
    assert {"systemd/enactive-stream.toml", "container/enactive-stream.toml"} <= names


@pytest.mark.parametrize("path", TOMLS, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_toml_loads(path: Path) -> None:
    cfg = load_config(path, env={})
    assert cfg.model.state_dim >= 1


def test_container_config_binds_every_interface() -> None:
    cfg = load_config(DEPLOY / "container" / "enactive-stream.toml", env={})
    for address in (cfg.ingest.tcp, cfg.ingest.udp, cfg.output.tcp, cfg.metrics.listen):
        assert address.startswith("0.0.0.0:"), address
    assert cfg.state.dir == "/var/lib/enactive-stream"
    assert cfg.device.compilation_cache_dir == "/var/cache/enactive-stream/jax"


def test_systemd_config_keeps_metrics_local_and_takes_dirs_from_the_unit() -> None:
    unit = UNIT.read_text()
    env = dict(re.findall(r"^Environment=(ENACTIVE_\w+)=(\S+)$", unit, re.MULTILINE))
    cfg = load_config(DEPLOY / "systemd" / "enactive-stream.toml", env=env)
    assert cfg.metrics.listen == "127.0.0.1:9400"
    assert cfg.state.dir == "/var/lib/enactive-stream"
    assert cfg.device.compilation_cache_dir == "/var/cache/enactive-stream/jax"
    assert env["ENACTIVE_CONFIG"] == "/etc/enactive-stream/enactive-stream.toml"


def test_configmap_matches_the_container_config() -> None:
    yaml = _yaml()
    configmap = yaml.safe_load((KUBERNETES / "configmap.yaml").read_text())
    embedded = configmap["data"]["enactive-stream.toml"]
    container = (DEPLOY / "container" / "enactive-stream.toml").read_text()
    assert tomllib.loads(embedded) == tomllib.loads(container)


# --- security -------------------------------------------------------------------------------


def _unit_env() -> dict[str, str]:
    return dict(re.findall(r"^Environment=(ENACTIVE_\w+)=(\S+)$", UNIT.read_text(), re.MULTILINE))


@pytest.mark.parametrize("path", TOMLS, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_configs_binding_beyond_loopback_configure_tls_and_auth(path: Path) -> None:
    """What `run` checks at start (`stream.security.prepare`), without the files: every
    listener beyond loopback is protected, and never by `security.insecure`."""
    env = _unit_env() if path.parent.name == "systemd" else {}
    cfg = load_config(path, env=env)
    assert cfg.security.insecure is False
    assert unprotected(cfg) == []
    assert check_policy(cfg) == []  # what check-config and run apply: no refusal, no warning
    keys = {key for key, _ in exposed(cfg)}
    if keys & {"ingest.tcp", "output.tcp", "metrics.listen"}:
        assert cfg.security.tls_cert_file and cfg.security.tls_key_file
        assert cfg.security.auth_file
    if "ingest.udp" in keys:
        assert cfg.ingest.udp_allow
    assert "ingest.tcp" in keys  # the shipped configurations serve sensors on the network


def test_kubernetes_mounts_the_secrets_the_config_names() -> None:
    yaml = _yaml()
    cfg = load_config(DEPLOY / "container" / "enactive-stream.toml", env={})
    sts = yaml.safe_load((KUBERNETES / "statefulset.yaml").read_text())
    pod = sts["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    secrets = {v["name"]: v["secret"] for v in pod["volumes"] if "secret" in v}
    mounted = {m["mountPath"]: m for m in container["volumeMounts"] if m["name"] in secrets}
    # kubernetes.io/tls Secrets hold tls.crt and tls.key; the auth Secret identities.toml.
    expected = {
        cfg.security.tls_cert_file: ("enactive-stream-tls", "tls.crt"),
        cfg.security.tls_key_file: ("enactive-stream-tls", "tls.key"),
        cfg.security.auth_file: ("enactive-stream-auth", "identities.toml"),
    }
    for path, (secret, name) in expected.items():
        directory, _, filename = path.rpartition("/")
        assert filename == name, path
        mount = mounted.get(directory)
        assert mount is not None, f"{path}: {directory} is not a Secret mount"
        assert mount.get("readOnly") is True
        assert secrets[mount["name"]]["secretName"] == secret
    for secret in secrets.values():
        assert secret["defaultMode"] & 0o007 == 0, secret  # nothing for "other"
    assert "kubectl create secret tls enactive-stream-tls" in OPERATIONS.read_text()


def test_systemd_unit_passes_the_files_the_config_names_as_credentials() -> None:
    cfg = load_config(DEPLOY / "systemd" / "enactive-stream.toml", env=_unit_env())
    credentials = dict(
        re.findall(r"^LoadCredential=([^:\s]+):(\S+)$", UNIT.read_text(), re.MULTILINE)
    )
    prefix = "/run/credentials/enactive-stream.service/"
    for path in (cfg.security.tls_cert_file, cfg.security.tls_key_file, cfg.security.auth_file):
        assert path.startswith(prefix), path
        assert path.removeprefix(prefix) in credentials, path


def test_container_run_command_mounts_the_secrets() -> None:
    cfg = load_config(DEPLOY / "container" / "enactive-stream.toml", env={})
    text = CONTAINERFILE.read_text()
    for path in (cfg.security.tls_cert_file, cfg.security.tls_key_file, cfg.security.auth_file):
        assert f":{path.rpartition('/')[0]}:ro" in text, path


def test_networkpolicy_admits_sensors_and_prometheus_only() -> None:
    yaml = _yaml()
    (policy,) = [
        d
        for d in yaml.safe_load_all((KUBERNETES / "networkpolicy.yaml").read_text())
        if d is not None
    ]
    assert policy["apiVersion"] == "networking.k8s.io/v1"
    assert policy["kind"] == "NetworkPolicy"
    spec = policy["spec"]
    sts = yaml.safe_load((KUBERNETES / "statefulset.yaml").read_text())
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    assert spec["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert spec["policyTypes"] == ["Ingress"]
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: (p["containerPort"], p.get("protocol", "TCP")) for p in container["ports"]}
    allowed: dict[tuple[str, str], list[dict]] = {}
    for rule in spec["ingress"]:
        assert rule["from"], "a rule without peers admits everyone"
        for port in rule["ports"]:
            name, protocol = port["port"], port.get("protocol", "TCP")
            assert ports[name][1] == protocol, port  # a named port of the container
            allowed.setdefault((name, protocol), []).extend(rule["from"])
    assert set(allowed) == {
        ("ingest-tcp", "TCP"),
        ("ingest-udp", "UDP"),
        ("moments", "TCP"),
        ("metrics", "TCP"),
    }
    sensor_peers = allowed[("ingest-tcp", "TCP")]
    assert sensor_peers == allowed[("ingest-udp", "UDP")]
    assert all("ipBlock" not in peer for peer in sensor_peers)  # labelled pods/namespaces
    for peer in allowed[("metrics", "TCP")]:
        assert peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}
        assert peer["namespaceSelector"]["matchLabels"]


# --- metric names -------------------------------------------------------------------------


def test_unknown_metric_names_are_caught() -> None:
    families = _families()
    text = "rate(enactive_frames_processed_total[1m]) + enactive_end_to_end_latency_seconds_sum"
    assert _unknown_metrics(text, families) == set()
    bad = "enactive_frames_processed + enactive_ready_bucket + enactive_nope_total"
    assert _unknown_metrics(bad, families) == {
        "enactive_frames_processed",
        "enactive_ready_bucket",
        "enactive_nope_total",
    }


def test_dashboard_names_only_real_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = _dashboard_exprs(dashboard)
    assert len(exprs) >= 20
    named = {m for e in exprs for m in METRIC.findall(e)}
    families = _families()
    assert _unknown_metrics(DASHBOARD.read_text(), families) == set()
    # ... and the families its recording rules read.
    rules = _recording_rules()
    named |= {m for e in exprs for r in RECORDED.findall(e) for m in METRIC.findall(rules[r])}
    # The dashboard shows every family the daemon exposes (except _created samples).
    shown = {next((m[: -len(s)] for s in HISTOGRAM_SUFFIXES if m.endswith(s)), m) for m in named}
    own = {f for f in families if f.startswith("enactive_") and not f.endswith("_created")}
    assert own <= shown


def test_dashboard_process_panels_name_real_metrics() -> None:
    exprs = _dashboard_exprs(json.loads(DASHBOARD.read_text()))
    named = {m for e in exprs for m in RUNTIME_METRIC.findall(e)}
    assert {
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "python_gc_collections_total",
    } <= named
    assert any("enactive_device_memory_bytes" in e for e in exprs)
    if not Path("/proc/self/stat").exists():
        pytest.skip("process_* metrics exist on Linux only")
    text = Metrics().exposition().decode()
    exposed = set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]", text, re.MULTILINE))
    assert named <= exposed


def test_unknown_label_values_are_caught() -> None:
    ok = 'enactive_frames_dropped_total{job="x", reason="overload"} + enactive_jit_fallback_total'
    assert _unknown_label_values(ok) == set()
    bad = (
        'enactive_frames_dropped_total{reason="slow_sink"}'
        ' + enactive_frames_received_total{source=~"tcp|nats", source="kafka"}'
        ' + enactive_stage_latency_seconds_bucket{stage="nope", le="0.001"}'
    )
    assert _unknown_label_values(bad) == {
        'enactive_frames_dropped_total{reason="slow_sink"}',
        'enactive_frames_received_total{source="kafka"}',
        'enactive_stage_latency_seconds_bucket{stage="nope"}',
    }


@pytest.mark.parametrize("path", [ALERTS, ALERTS_TEST, DASHBOARD], ids=lambda p: p.name)
def test_deploy_names_only_real_label_values(path: Path) -> None:
    if path == DASHBOARD:
        text = "\n".join(_dashboard_exprs(json.loads(path.read_text())))
    else:
        text = path.read_text()
    assert SELECTOR.search(text)
    assert _unknown_label_values(text) == set()


def test_dashboard_uses_a_prometheus_datasource_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    uids = {
        t["datasource"]["uid"]
        for p in dashboard["panels"]
        if p["type"] != "row"
        for t in p["targets"]
    }
    assert uids == {"${datasource}"}
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_alerts_name_only_real_metrics() -> None:
    text = ALERTS.read_text()
    assert len(METRIC.findall(text)) >= 9
    assert _unknown_metrics(text, _families()) == set()


def test_recording_rules_are_quantiles_of_real_histograms() -> None:
    rules = _recording_rules()
    families = _families()
    assert len(rules) >= 6
    for record, expr in rules.items():
        match = re.fullmatch(r"enactive:([a-z0-9_]+):p(\d+)_(\d+[smh])", record)
        assert match, f"{record}: not enactive:<metric>:p<quantile>_<window>"
        metric, quantile, window = match.groups()
        assert families.get(f"enactive_{metric}") == "histogram", record
        shape = (
            rf"histogram_quantile\(([0-9.]+), sum by \(job, instance(?:, \w+)*, le\) "
            rf"\(rate\(enactive_{metric}_bucket\[{window}\]\)\)\)"
        )
        found = re.fullmatch(shape, expr.strip())
        assert found, f"{record}: {expr}"
        assert float(found[1]) == float(f"0.{quantile}"), record
    assert _unknown_metrics(RULES.read_text(), families) == set()


def test_alerts_and_dashboard_take_quantiles_from_recording_rules() -> None:
    rules = _recording_rules()
    alerts = ALERTS.read_text()
    dashboard = "\n".join(_dashboard_exprs(json.loads(DASHBOARD.read_text())))
    for text in (alerts, dashboard):
        assert "histogram_quantile" not in text
        assert set(RECORDED.findall(text)) <= set(rules)
    assert "enactive:end_to_end_latency_seconds:p99_5m" in RECORDED.findall(alerts)
    # Every rule is read by something.
    assert set(RECORDED.findall(alerts)) | set(RECORDED.findall(dashboard)) == set(rules)


def test_prometheus_loads_recording_rules_with_the_alerts() -> None:
    yaml = _yaml()
    for path in (PROMETHEUS, ALERTS_TEST):
        assert yaml.safe_load(path.read_text())["rule_files"] == ["rules.yml", "alerts.yml"]


def test_an_alert_fires_when_the_scrape_target_is_absent() -> None:
    yaml = _yaml()
    (job,) = [c["job_name"] for c in yaml.safe_load(PROMETHEUS.read_text())["scrape_configs"]]
    alerts = {
        rule["alert"]: rule
        for group in yaml.safe_load(ALERTS.read_text())["groups"]
        for rule in group["rules"]
    }
    assert alerts["EnactiveStreamAbsent"]["expr"] == f'absent(up{{job="{job}"}})'
    assert set(re.findall(r'\bjob="([^"]*)"', ALERTS.read_text())) == {job}
    # Every alert has a promtool unit test.
    tests = yaml.safe_load(ALERTS_TEST.read_text())["tests"]
    assert set(alerts) <= {t["alertname"] for group in tests for t in group["alert_rule_test"]}


def test_alert_runbooks_exist() -> None:
    headings = {
        re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-")
        for h in re.findall(r"^#{1,6} (.+)$", OPERATIONS.read_text(), re.MULTILINE)
    }
    alerts = re.findall(r"^\s+- alert: (\w+)$", ALERTS.read_text(), re.MULTILINE)
    runbooks = re.findall(r"^\s+runbook_url: (\S+)$", ALERTS.read_text(), re.MULTILINE)
    assert len(alerts) == len(runbooks) >= 10
    for alert, url in zip(alerts, runbooks, strict=True):
        parts = urllib.parse.urlsplit(url)
        assert parts.scheme == "https" and parts.netloc, f"{alert}: {url} is not absolute"
        base, _, anchor = url.partition("#")
        assert base == RUNBOOK_BASE, f"{alert}: {url} does not start with {RUNBOOK_BASE}"
        assert anchor == alert.lower()
        assert anchor in headings, f"docs/operations.md has no section for {alert}"
    # The runbook links' base is documented, with how to change it.
    assert RUNBOOK_BASE in OPERATIONS.read_text()


# --- tools ----------------------------------------------------------------------------------


def test_promtool_checks_rules_and_config(tmp_path: Path) -> None:
    promtool = _tool("promtool")
    # The config names the CA and token files of a real install, which promtool opens: a
    # copy points them at stand-ins here, next to copies of the rule files it loads.
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "ca.crt").write_text("")
    (secrets / "token").write_text("token\n")
    for rules in (RULES, ALERTS):
        shutil.copy(rules, tmp_path / rules.name)
    text = PROMETHEUS.read_text()
    assert text.count(SCRAPE_SECRETS) == 4
    config = tmp_path / "prometheus.yml"
    config.write_text(text.replace(SCRAPE_SECRETS, f"{secrets}/"))
    for argv in (
        [promtool, "check", "rules", str(RULES), str(ALERTS)],
        [promtool, "check", "config", str(config)],
        [promtool, "test", "rules", str(ALERTS_TEST)],
    ):
        result = _run(argv)
        assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """Every dashboard expression, with Grafana's variables filled in, as a recording rule
    that `promtool check rules` parses."""
    promtool = _tool("promtool")
    exprs = _dashboard_exprs(json.loads(DASHBOARD.read_text()))
    rules = []
    for i, expr in enumerate(e for e in exprs if not e.startswith("label_values(")):
        expr = expr.replace("$__rate_interval", "1m").replace("$__interval", "1m")
        rules.append({"record": f"dashboard:expr_{i}", "expr": expr})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = _run([promtool, "check", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    """`systemd-analyze verify` returns 0 even for unknown keys, so its warnings about the
    unit count as failures. The install path of the binary is replaced by the one here."""
    analyze = _tool("systemd-analyze")
    binary = shutil.which("enactive-stream")
    if binary is None:
        pytest.skip("the enactive-stream console script is not installed")
    unit = UNIT.read_text().replace("/opt/enactive-stream/bin/enactive-stream", binary)
    path = tmp_path / UNIT.name
    path.write_text(unit)
    result = _run([analyze, "verify", str(path)])
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert UNIT.name not in output, output


def test_systemd_unit_has_the_lifecycle_settings() -> None:
    unit = UNIT.read_text()
    settings = dict(re.findall(r"^(\w+)=(.*)$", unit, re.MULTILINE))
    assert settings["KillSignal"] == "SIGTERM"
    assert settings["TimeoutStopSec"] == "30"
    assert settings["Restart"] == "on-failure"
    assert settings["DynamicUser"] == "yes"
    assert "check-config" in settings["ExecStartPre"]
    assert " run --config " in settings["ExecStart"]
    # XLA writes machine code at run time: W^X enforcement would kill the daemon.
    assert "MemoryDenyWriteExecute" not in settings


# --- YAML -----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_yaml_parses(path: Path) -> None:
    yaml = _yaml()
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert documents


SCRAPE_SECRETS = "/etc/prometheus/enactive-stream/"
"""Where `prometheus.yml` reads the daemon's CA (`ca.crt`) and its scrape token (`token`)."""


def test_prometheus_scrapes_over_https_with_a_token() -> None:
    yaml = _yaml()
    config = yaml.safe_load(PROMETHEUS.read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "enactive-stream"]
    assert job["scheme"] == "https"
    assert job["tls_config"]["ca_file"] == SCRAPE_SECRETS + "ca.crt"
    assert not job["tls_config"].get("insecure_skip_verify", False)
    assert job["authorization"] == {
        "type": "Bearer",
        "credentials_file": SCRAPE_SECRETS + "token",
    }
    for path in TOMLS:  # every shipped configuration serves /metrics over TLS with identities
        env = _unit_env() if path.parent.name == "systemd" else {}
        cfg = load_config(path, env=env)
        assert cfg.metrics.listen and cfg.security.tls_cert_file and cfg.security.auth_file
    sts = yaml.safe_load((KUBERNETES / "statefulset.yaml").read_text())
    annotations = sts["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scheme"] == "https"
    operations = OPERATIONS.read_text()
    for needed in ("credentials_file", "metrics = true", SCRAPE_SECRETS + "token"):
        assert needed in operations, needed


def test_kustomization_lists_every_manifest() -> None:
    yaml = _yaml()
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    manifests = {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == manifests


def test_kubernetes_probes_and_ports() -> None:
    yaml = _yaml()
    docs = [
        d
        for p in sorted(KUBERNETES.glob("*.yaml"))
        for d in yaml.safe_load_all(p.read_text())
        if d is not None
    ]
    kinds = {d["kind"]: d for d in docs}
    assert {"StatefulSet", "Service", "ConfigMap", "PodDisruptionBudget"} <= set(kinds)
    sts = kinds["StatefulSet"]
    pod = sts["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["startupProbe"]["httpGet"]["path"] == "/readyz"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):  # TLS is configured
        assert container[probe]["httpGet"]["scheme"] == "HTTPS", probe
        assert container[probe]["httpGet"]["port"] == "metrics", probe
    assert pod["terminationGracePeriodSeconds"] == 30
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    cfg = load_config(DEPLOY / "container" / "enactive-stream.toml", env={})
    assert cfg.state.dir in mounts
    assert any(cfg.device.compilation_cache_dir.startswith(m + "/") for m in mounts)
    claims = {c["metadata"]["name"] for c in sts["spec"]["volumeClaimTemplates"]}
    assert {"state", "cache"} <= claims
    ports = {(p["containerPort"], p.get("protocol", "TCP")) for p in container["ports"]}
    assert ports == {(7400, "TCP"), (7400, "UDP"), (7401, "TCP"), (9400, "TCP")}
    services = [d for d in docs if d["kind"] == "Service"]
    for service in services:
        assert all(p.get("name") for p in service["spec"]["ports"])


def test_kustomize_builds() -> None:
    kubectl = _tool("kubectl")
    result = _run([kubectl, "kustomize", str(KUBERNETES)])
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\nkind: ") + result.stdout.startswith("kind: ") >= 5


# --- container ------------------------------------------------------------------------------


def test_containerfile_essentials() -> None:
    text = CONTAINERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim$", text, re.MULTILINE)
    assert re.search(r"^EXPOSE 7400/tcp 7400/udp 7401/tcp 9400/tcp$", text, re.MULTILINE)
    assert re.search(r"^STOPSIGNAL SIGTERM$", text, re.MULTILINE)
    assert re.search(r"^USER \d+", text, re.MULTILINE), "run as a numeric non-root user"
    healthcheck = text.split("HEALTHCHECK", 1)[1].split("\n\n", 1)[0]
    assert "/healthz" in healthcheck
    # The metrics listener speaks HTTPS; the slim image has no curl, Python asks, unverified
    # (from inside the container 127.0.0.1 is not a name in the certificate).
    assert "https://127.0.0.1:9400/healthz" in healthcheck
    assert "ssl._create_unverified_context()" in healthcheck and "curl" not in healthcheck
    assert '"python", "-c"' in healthcheck
    for copied in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, re.MULTILINE):
        for source in copied.split():
            assert (ROOT / source).exists(), f"COPY source {source} does not exist"


def test_container_build_installs_with_the_constraints() -> None:
    text = CONTAINERFILE.read_text()
    copied = re.search(
        r"^COPY (?:--\S+ )*deploy/container/constraints\.txt (\S+)$", text, re.MULTILINE
    )
    assert copied, "the Containerfile does not copy deploy/container/constraints.txt"
    installs = re.findall(r"^RUN .*\bpip install\b.*$", text, re.MULTILINE)
    assert installs
    for install in installs:
        assert re.search(rf"(?:-c|--constraint)[ =]{re.escape(copied[1])}(?:\s|$)", install), (
            f"not constrained by {copied[1]}: {install}"
        )


def test_constraints_pin_every_runtime_dependency() -> None:
    pins = _pins()
    assert "enactive-stream" not in pins
    for dependency in tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]:
        requirement = Requirement(dependency)
        version = pins.get(_canonical(requirement.name))
        assert version is not None, f"constraints.txt has no pin for {requirement.name}"
        assert requirement.specifier.contains(version, prereleases=True), (
            f"constraints.txt pins {requirement.name}=={version}, pyproject wants {requirement}"
        )
    # The closure: a pinned distribution installed here at its pinned version has its own
    # requirements (for the image's Python 3.11 on Linux) pinned too.
    for name, version in pins.items():
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        if dist.version != version:
            continue
        for raw in dist.requires or []:
            requirement = Requirement(raw)
            if requirement.marker and not requirement.marker.evaluate(IMAGE_MARKERS):
                continue
            assert _canonical(requirement.name) in pins, (
                f"{name}=={version} requires {requirement}, which constraints.txt does not pin"
            )


# --- Kubernetes, scaled out -------------------------------------------------------------------

KUBERNETES_CLUSTER = DEPLOY / "kubernetes-cluster"


def _cluster_patch() -> tuple[int, dict[str, str]]:
    """The overlay's StatefulSet replicas and the environment it adds."""
    yaml = _yaml()
    kustomization = yaml.safe_load((KUBERNETES_CLUSTER / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["../kubernetes", "nats.yaml"]
    (patch,) = kustomization["patches"]
    ops = yaml.safe_load(patch["patch"])
    (replicas,) = [op["value"] for op in ops if op["path"] == "/spec/replicas"]
    env = {op["value"]["name"]: op["value"]["value"] for op in ops if op["path"].endswith("/env/-")}
    return replicas, env


def test_the_scaled_out_form_configures_every_pod_as_an_instance() -> None:
    from stream.daemon import cluster_of

    replicas, env = _cluster_patch()
    cfg = load_config(DEPLOY / "container" / "enactive-stream.toml", env=env)
    assert cfg.cluster.instances == replicas == 3
    assert cfg.cluster.partitions % replicas == 0  # every pod owns as many
    assert cfg.nats.replicas == 3 and cfg.nats.consume
    clusters = [cluster_of(cfg, f"enactive-stream-{i}") for i in range(replicas)]
    owned = sorted(p for c in clusters if c is not None for p in c.owned)
    assert owned == list(range(cfg.cluster.partitions))
    yaml = _yaml()
    nats = {
        d["kind"]: d for d in yaml.safe_load_all((KUBERNETES_CLUSTER / "nats.yaml").read_text())
    }
    nodes = nats["StatefulSet"]["spec"]["replicas"]
    assert [u.split("//")[1].split(".")[0] for u in cfg.nats.url.split(",")] == [
        f"nats-{i}" for i in range(nodes)
    ]
    assert nodes >= cfg.nats.replicas  # R3 streams need three nodes
    conf = nats["ConfigMap"]["data"]["nats.conf"]
    assert "jetstream" in conf
    # Lame duck before a node stops: the signal finds the server by the pid file it writes.
    (server,) = nats["StatefulSet"]["spec"]["template"]["spec"]["containers"]
    pid_file = conf.split("pid_file:", 1)[1].split()[0]
    assert server["lifecycle"]["preStop"]["exec"]["command"][-1] == f"ldm={pid_file}"


def test_the_scaled_out_form_builds() -> None:
    kubectl = _tool("kubectl")
    result = _run([kubectl, "kustomize", str(KUBERNETES_CLUSTER)])
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\nkind: StatefulSet") == 2
