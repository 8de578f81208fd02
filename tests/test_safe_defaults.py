"""Issue 15 item 4: safe defaults. No token check on a listener other hosts can reach is refused
(run and check, with file and line); a listener other hosts can reach without TLS is warned about.
Nothing here listens on anything but loopback: the refusal comes before any socket is bound, and the
warnings are checked with `radbridge check`, which binds nothing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from engine.config import load_settings
from engine.connectors.exposure import is_loopback
from tests.certs import make_pki
from tests.conftest import REPO
from tests.test_cli import radbridge


def write_config(path: Path, *, bind: str, auth: str) -> Path:
    path.write_text(f'# test settings\nbind = "{bind}"\n\n[http]\nport = 0\nauth = "{auth}"\n'
                    '\n[mllp]\nport = 0\n\n[dicom]\nport = 0\n')
    return path


def env_for(tmp_path: Path) -> dict[str, str]:
    return {"RADBRIDGE_STORAGE_DIR": str(tmp_path / "var"), "RADBRIDGE_CHANNELS_DIR": str(REPO / "channels"),
            "RADBRIDGE_MAPPINGS_DIR": str(REPO / "mappings")}


@pytest.mark.parametrize("host", ["127.0.0.1", "127.3.2.1", "::1", "localhost", "LOCALHOST", "::ffff:127.0.0.1"])
def test_loopback_addresses(host: str) -> None:
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "10.0.0.5", "192.168.1.20", "radbridge.hospital.org",
                                  "128.0.0.1"])
def test_addresses_other_hosts_reach(host: str) -> None:
    assert not is_loopback(host)


def test_check_refuses_auth_none_on_a_non_loopback_bind_naming_file_and_line(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "radbridge.toml", bind="0.0.0.0", auth="none")
    out = radbridge("check", "--config", str(cfg), env=env_for(tmp_path))
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"{cfg}:6: http.auth: \"none\" on bind 0.0.0.0" in out.stderr, out.stderr
    # the same bind from the environment names the variable
    cfg = write_config(tmp_path / "local.toml", bind="127.0.0.1", auth="none")
    out = radbridge("check", "--config", str(cfg), env={**env_for(tmp_path), "RADBRIDGE_BIND": "10.1.2.3"})
    assert out.returncode == 1 and f"{cfg}:6: http.auth: \"none\" on bind 10.1.2.3" in out.stderr, out.stderr
    assert "RADBRIDGE_BIND" in out.stderr


@pytest.mark.parametrize("bind", ["127.0.0.1", "::1", "localhost"])
def test_auth_none_on_loopback_is_allowed(tmp_path: Path, bind: str) -> None:
    cfg = write_config(tmp_path / "radbridge.toml", bind=bind, auth="none")
    out = radbridge("check", "--config", str(cfg), env=env_for(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "without TLS" not in out.stdout + out.stderr


def test_run_refuses_to_start_with_auth_none_on_a_non_loopback_bind(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "radbridge.toml", bind="0.0.0.0", auth="none")
    out = radbridge("run", "--config", str(cfg), env=env_for(tmp_path), cwd=tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "not started, configuration has errors" in out.stderr
    assert f"{cfg}:6: http.auth: \"none\" on bind 0.0.0.0" in out.stderr
    # the start logs the listeners that would be reachable without TLS, at WARNING, before refusing
    assert sum("WARNING" in line and "without TLS" in line for line in out.stderr.splitlines()) == 3, out.stderr
    assert not (tmp_path / "var").exists()  # refused before the store was opened or a port bound


def test_listeners_other_hosts_reach_without_tls_are_warned_about(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "radbridge.toml", bind="0.0.0.0", auth="token")
    out = radbridge("check", "--config", str(cfg), env=env_for(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    warnings = [line for line in out.stdout.splitlines() if "without TLS" in line]
    # HTTP (/api, /fhir, console), the MLLP channel and the DICOM channel; the file channel is not a listener
    assert any(line.startswith(f"{cfg}:2: bind:") and "HTTP" in line for line in warnings), out.stdout
    assert any("hl7-inbound.yaml" in line for line in warnings), out.stdout
    assert any("dicom.yaml" in line for line in warnings), out.stdout
    assert all(line.endswith("(warning)") for line in warnings) and len(warnings) == 3, warnings


def test_settings_know_the_line_of_each_key(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "radbridge.toml", bind="127.0.0.1", auth="token")
    s = load_settings(cfg, env={"RADBRIDGE_MLLP_PORT": "2576"})
    assert s.origin("bind") == (str(cfg), 2, "bind")
    assert s.origin("http.auth") == (str(cfg), 6, "http.auth")
    assert s.origin("mllp.port") == ("environment", 0, "RADBRIDGE_MLLP_PORT")


def test_listeners_with_tls_are_not_warned_about(tmp_path: Path) -> None:
    """The warning asks the listener's own TLS settings: HTTPS and an MLLP channel with a tls: block
    are not reported; the DICOM channel without one still is."""
    pki = make_pki(tmp_path / "pki")
    cfg = write_config(tmp_path / "radbridge.toml", bind="0.0.0.0", auth="token")
    cfg.write_text(cfg.read_text() + f'\n[http.tls]\ncert = "{pki.server.cert}"\nkey = "{pki.server.key}"\n')
    channels = tmp_path / "channels"
    shutil.copytree(REPO / "channels", channels)
    inbound = channels / "hl7-inbound.yaml"
    inbound.write_text(inbound.read_text() + f"tls:\n  cert: {pki.server.cert}\n  key: {pki.server.key}\n")
    out = radbridge("check", "--config", str(cfg), env={**env_for(tmp_path), "RADBRIDGE_CHANNELS_DIR": str(channels)})
    assert out.returncode == 0, out.stdout + out.stderr
    warnings = [line for line in out.stdout.splitlines() if "without TLS" in line]
    assert len(warnings) == 1 and "dicom.yaml" in warnings[0], warnings
