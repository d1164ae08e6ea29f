"""Service config validation and TLS settings."""

from __future__ import annotations

import json
import ssl
from pathlib import Path

import pytest
import trustme

from websocketserver.settings import Settings, SettingsError, load_service_config


def write(tmp_path: Path, content: str) -> Path:
    path = tmp_path / "services.json"
    path.write_text(content)
    return path


def test_valid_config_resolves_scripts_relative_to_file(tmp_path: Path) -> None:
    path = write(tmp_path, json.dumps({
        "Local Software Session": {"script": "desktop.py", "count": 2,
                                   "options": {"sizes": ["1600x1200"], "display_base": 100}},
        "Cluster": {"script": "/abs/x.py", "count": 1,
                    "options": {"group": "ClusterRendering", "file_ext": [".evsn"]}},
    }))
    first, second = load_service_config(path)
    assert first.name == "Local Software Session" and first.count == 2
    assert first.script == tmp_path.resolve() / "desktop.py"
    assert first.options == {"sizes": ["1600x1200"], "display_base": 100}
    assert second.script == Path("/abs/x.py")


@pytest.mark.parametrize("content, message", [
    ('{"a": ', "invalid JSON at line 1 column 7"),
    ("[]", "expected a JSON object of services"),
    ('{"svc": {"count": 1}}', "service 'svc': field 'script': is required"),
    ('{"svc": {"script": "x.py"}}', "service 'svc': field 'count': is required"),
    ('{"svc": {"script": "x.py", "count": 0}}', "service 'svc': field 'count': must be >= 1"),
    ('{"svc": {"script": "x.py", "count": "2"}}', "field 'count': must be of type integer"),
    ('{"svc": {"script": 5, "count": 1}}', "field 'script': must be of type string"),
    ('{"svc": {"script": "x.py", "count": 1, "options": []}}', "field 'options'"),
    ('{"svc": {"script": "x.py", "count": 1, "options": {"group": 3}}}',
     "field 'options.group'"),
    ('{"svc": 3}', "service 'svc'"),
])
def test_config_errors_name_service_and_field(tmp_path: Path, content: str,
                                              message: str) -> None:
    with pytest.raises(SettingsError) as error:
        load_service_config(write(tmp_path, content))
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_tls_context_is_tls12_or_newer(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    cert.cert_chain_pems[0].write_to_path(tmp_path / "c.pem")
    cert.private_key_pem.write_to_path(tmp_path / "k.pem")
    context = Settings(ws_port=1, cert=tmp_path / "c.pem", key=tmp_path / "k.pem").ssl_context()
    assert context is not None
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert Settings(ws_port=1).ssl_context() is None


SLURM_COMMAND = ["start-viz", "--port", "{port}", "--title={title}"]


@pytest.mark.parametrize(("entry", "message"), [
    ({"script": "x.py", "count": 1, "slurm": {}},
     "field 'slurm': needs a 'command'"),
    ({"command": ["true"], "count": 1, "start": "reserve"},
     "field 'start': only a service with 'slurm' has it"),
    ({"command": SLURM_COMMAND, "count": 1, "slurm": {"sbatch": ["{title}"]}},
     "a placeholder may only be the value of a fixed option"),
    ({"command": SLURM_COMMAND, "count": 1, "slurm": {"sbatch": ["--{title}=1"]}},
     "a placeholder may only be the value of a fixed option"),
    ({"command": SLURM_COMMAND, "count": 1, "slurm": {"sbatch": ["--x={port}"]}},
     "unknown placeholder {port}"),
    ({"command": SLURM_COMMAND, "count": 1, "slurm": {"user_prefix": ["sudo", "-n"]}},
     "names no {user}"),
    ({"command": SLURM_COMMAND, "count": 1, "slurm": {"sbatch": [], "partition": "x"}},
     "field 'slurm'"),
    ({"command": SLURM_COMMAND, "count": 1, "slurm": {}, "start": "later"},
     "field 'start'"),
])
def test_slurm_config_errors(tmp_path: Path, entry: dict[str, object], message: str) -> None:
    entry.setdefault("options", {"title": "t"})
    with pytest.raises(SettingsError, match=message):
        load_service_config(write(tmp_path, json.dumps({"viz": entry})))


def test_a_slurm_command_runs_on_the_node_and_substitutes_there_only_its_port(
        tmp_path: Path) -> None:
    """Its program is not looked for here (it runs on a compute node); ``{port}`` is
    the node's, option values keep their braces literal for the in-job launcher."""
    from websocketserver.slurm_service import ConfiguredSlurmCommand

    (service,) = load_service_config(write(tmp_path, json.dumps({"viz": {
        "command": SLURM_COMMAND, "count": 2, "options": {"title": "t", "queue": "viz"},
        "slurm": {"sbatch": ["--partition={queue}", "--comment={{x}}"]},
        "start": "reserve", "queue_timeout": 30}})))
    assert service.slurm is not None and service.start == "reserve"
    script = ConfiguredSlurmCommand(service)
    assert (script.start_mode, script.queue_timeout) == ("reserve", 30.0)
    options = {"title": "{a}", "queue": "gpu", "unknown": "x"}
    assert script.command(1, options) == ["start-viz", "--port", "{port}", "--title={{a}}"]
    assert script.sbatch(1, options) == ["--partition=gpu", "--comment={x}"]
    assert script.working_directory() == tmp_path.resolve()


def test_the_example_slurm_config_loads() -> None:
    """examples/slurm_services.json: the manual's "Cluster Node Session" on Slurm."""
    (service,) = load_service_config(
        Path(__file__).resolve().parent.parent / "examples" / "slurm_services.json")
    assert service.name == "Cluster Node Session" and service.slurm is not None
    assert service.slurm.sbatch[:2] == ("-w", "n8") and service.start == "reserve"


def test_a_vnc_password_placeholder_needs_an_rfb_service(tmp_path: Path) -> None:
    """{vnc_password_file}: the proxy logs in with the password, so the service must say
    it speaks RFB; then the command gets a file of its own, and the start the password."""
    from websocketserver.scripts import ConfiguredCommand

    command = ["x11vnc", "-rfbport", "{port}", "-rfbauth", "{vnc_password_file}"]
    with pytest.raises(SettingsError, match="need \"protocol\": \"rfb\""):
        load_service_config(write(tmp_path, json.dumps({"d": {"command": command,
                                                               "count": 1}})))
    (service,) = load_service_config(write(tmp_path, json.dumps({"d": {
        "command": command, "count": 1, "protocol": "rfb"}})))
    script = ConfiguredCommand(service, 5)
    argv = script.command(0, {}, 5900)
    password_file = Path(argv[-1])
    assert password_file.stat().st_mode & 0o777 == 0o600 and len(password_file.read_bytes()) == 8
    script.stop(0)  # never started: its password's folder goes all the same
    assert not password_file.parent.exists()
