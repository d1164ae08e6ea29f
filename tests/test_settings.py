"""Service config validation and TLS settings."""

from __future__ import annotations

import json
import re
import ssl
from pathlib import Path

import pytest
import trustme

from websocketserver.settings import (
    SERVICE_FIELDS,
    Settings,
    SettingsError,
    load_service_config,
    unknown_field,
)

ROOT = Path(__file__).resolve().parent.parent


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


@pytest.mark.parametrize(("entry", "message"), [
    ({"scrip": "x.py", "count": 1}, "unknown field 'scrip' (did you mean 'script'?)"),
    ({"scrip": "x.py"}, "unknown field 'scrip' (did you mean 'script'?)"),  # not "count"
    ({"script": "x.py", "count": 1, "option": {}},
     "unknown field 'option' (did you mean 'options'?)"),
    ({"script": "x.py", "count": 1, "reconect_grace": 5},
     "unknown field 'reconect_grace' (did you mean 'reconnect_grace'?)"),
    ({"script": "x.py", "count": 1, "group": "viz"},
     f"unknown field 'group' (known: {', '.join(SERVICE_FIELDS)})"),
])
def test_an_unknown_field_is_named_with_the_one_meant(tmp_path: Path, entry: dict[str, object],
                                                      message: str) -> None:
    """Reported before any other check of the service, so that a misspelled field is
    not taken for a missing one; the line names the file and the service as well."""
    path = write(tmp_path, json.dumps({"svc": entry}))
    with pytest.raises(SettingsError) as error:
        load_service_config(path)
    assert str(error.value) == f"--remote_session_config {path}: service 'svc': {message}"


def test_the_options_are_free_form(tmp_path: Path) -> None:
    options = {"sizes": ["1600x1200"], "scrip": 1, "anything": {"nested": [True]}}
    (service,) = load_service_config(write(tmp_path, json.dumps({"svc": {
        "script": "x.py", "count": 1, "options": options}})))
    assert service.options == options


def test_every_documented_field_is_known() -> None:
    """The fields of the table in docs/services.md are exactly those a service may have,
    so that no field a config uses is refused and none goes undocumented."""
    text = (ROOT / "docs" / "services.md").read_text()
    table = text.split("### The config file", 1)[1].split("\n\n### ", 1)[0]
    documented = re.findall(r"^\| `(\w+)` \|", table, re.MULTILINE)
    assert sorted(documented) == sorted(SERVICE_FIELDS)


def test_a_service_with_every_field_loads(tmp_path: Path) -> None:
    (script, command) = load_service_config(write(tmp_path, json.dumps({
        "script": {"script": "x.py", "count": 2, "reconnect_grace": 30, "scope": "cluster",
                   "protocol": "rfb", "max_viewers": 0, "options": {"group": "viz"}},
        "command": {"command": ["start-viz", "{port}", "--title={title}"], "count": 1,
                    "options": {"title": "t", "file_ext": [".evsn"]}, "protocol": "rfb",
                    "slurm": {"sbatch": ["--time=01:00:00"], "user_prefix": ["sudo", "-u",
                                                                               "{user}"]},
                    "start": "reserve", "queue_timeout": 60, "scope": "node",
                    "reconnect_grace": 0, "max_viewers": 2}})))
    assert (script.reconnect_grace, script.cluster_scope, script.max_viewers) == (30, True, 0)
    assert command.slurm is not None and command.slurm.user_prefix[-1] == "{user}"
    assert (command.start, command.queue_timeout, command.protocol) == ("reserve", 60.0, "rfb")


def test_the_manuals_example_config_loads(tmp_path: Path) -> None:
    """The original manual's example (its service configuration section), but for
    where its lines break."""
    manual = """{
  "Local Software Session": {"script": "desktop_session.py", "count": 2,
                             "options": {"sizes": ["12080x1024", "1600x1200"],
                                         "display_base": 100}},
  "Cluster Node Session": {"script": "x11vnc_desktop_session.py", "count": 1,
                           "options": {"sizes": ["1600x1200"], "group": "ClusterRendering",
                                       "host": "n8"}}
}"""
    local, cluster = load_service_config(write(tmp_path, manual))
    assert (local.count, cluster.options["group"]) == (2, "ClusterRendering")


@pytest.mark.parametrize("example", sorted((ROOT / "examples").glob("*.json")),
                         ids=lambda path: path.name)
def test_the_example_configs_load(example: Path) -> None:
    assert load_service_config(example)


def test_the_service_configs_of_the_docs_have_only_known_fields() -> None:
    """Every ```json block of the docs that is a service config (or a "slurm" object)."""
    checked = 0
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for block in re.findall(r"```json\n(.*?)```", page.read_text(), re.DOTALL):
            document = json.loads(block if block.lstrip().startswith("{")
                                  else "{" + block + "}")
            if "slurm" in document:  # a fragment: the "slurm" object alone
                document = {"fragment": {"count": 1, **document}}
            for name, entry in document.items():
                if isinstance(entry, dict) and "count" in entry:
                    assert unknown_field(entry) is None, (page.name, name)
                    checked += 1
    assert checked >= 8


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
     "unknown field 'slurm.partition' \\(known: sbatch, user_prefix\\)"),
    ({"command": SLURM_COMMAND, "count": 1, "slurm": {"sbach": ["-w", "n8"]}},
     "unknown field 'slurm.sbach' \\(did you mean 'slurm.sbatch'\\?\\)"),
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
