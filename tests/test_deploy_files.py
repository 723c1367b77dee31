"""The shipped deployment files, read as their tools would read them: the commands in the compose files and the systemd
unit are ones our start commands accept, only the Fleet port is published, and the ClientApps' container holds nothing
of the hospital's but the exchange volume. (No container engine here: the containers themselves are not run.)"""

from __future__ import annotations

import configparser
import re
import shlex
from pathlib import Path

import yaml

from client.supernode import command_line as hospital_command_line
from common.deployment import DEFAULT_USER
from server.superlink import command_line as server_command_line
from server.superlink import register_command_line

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def _compose(name: str) -> dict:
    """A compose file, with ${VAR:?...} placeholders filled as the operator would."""
    text = re.sub(r"\$\{(\w+):\?[^}]*\}", lambda m: {"SUPERLINK": "fl.example.org:9092", "FLEET_ADDRESS": "203.0.113.10"}[m.group(1)], (DEPLOY / name).read_text())
    return yaml.safe_load(text)


def _dockerfile_uid() -> str:
    """The ClientApp user's id in the image."""
    (uid,) = re.findall(rf"useradd .*--uid (\d+) .*{DEFAULT_USER}", (DEPLOY / "Dockerfile").read_text())
    return uid


def test_the_server_compose_file_publishes_the_fleet_port_alone_on_the_address_the_operator_names():
    server = _compose("compose-server.yml")["services"]["server"]
    assert server["ports"] == ["203.0.113.10:9092:9092"]  # not 0.0.0.0, not the Control API's 9091
    command = server["command"]
    assert command[:3] == ["python", "-m", "server.superlink"]
    args = server_command_line().parse_args(command[3:])
    assert args.listen == ("0.0.0.0", 9092) and not args.insecure and args.internal_port == 9091  # inside the container
    assert str(args.state) == "/state" and any(v.startswith("./state:/state") for v in server["volumes"])
    assert server["restart"] == "unless-stopped"
    header = (DEPLOY / "compose-server.yml").read_text()
    (register,) = re.findall(r"exec server python -m server.superlink register (.*)", header)
    assert register_command_line().parse_args(shlex.split(register)).state == Path("/state")


def test_the_hospitals_clientapps_container_has_no_images_no_key_and_no_way_out():
    compose = _compose("compose-hospital.yml")
    hospital, apps = compose["services"]["hospital"], compose["services"]["clientapps"]
    assert hospital["command"][:3] == ["python", "-m", "client.supernode"]
    args = hospital_command_line().parse_args(hospital["command"][3:])
    uid = _dockerfile_uid()
    assert str(args.exchange) == "/exchange" and str(args.clientapp_gid) == uid and not args.insecure and args.key is not None
    assert any(v.endswith(":/data:ro") for v in hospital["volumes"])  # the images, read-only, in this container only
    assert apps["user"] == f"{uid}:{uid}" and apps["volumes"] == ["exchange:/exchange"]
    assert apps["read_only"] is True and apps["cap_drop"] == ["ALL"] and "ports" not in apps and "ports" not in hospital
    assert apps["networks"] == ["apps"] and compose["networks"]["apps"]["internal"] is True
    assert f"--runtime-api-address hospital:{args.port}" in apps["entrypoint"][-1] and "/exchange/superexec.secret" in apps["entrypoint"][-1]
    assert hospital["restart"] == apps["restart"] == "unless-stopped"


def test_the_systemd_unit_runs_the_checked_command_isolated_and_always_comes_back():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read_string((DEPLOY / "fedimaging-supernode.service").read_text().replace("\\\n", " "))
    service = unit["Service"]
    python, flag, module, *options = shlex.split(service["ExecStart"])
    assert python.endswith("/.venv/bin/python") and (flag, module) == ("-m", "client.supernode")
    args = hospital_command_line().parse_args(options)
    assert args.clientapp_user == DEFAULT_USER and not args.unisolated and not args.insecure
    assert "User" not in service  # root: only root can start the ClientApps as their own user
    assert service["Restart"] == "always" and unit["Unit"]["StartLimitIntervalSec"] == "0"
