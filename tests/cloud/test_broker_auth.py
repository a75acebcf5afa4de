"""Broker password and ACL files: format, compatibility with mosquitto_passwd, hostile input."""

from __future__ import annotations

import base64
import shutil
import subprocess

import pytest

from lepton_edge.cloud.broker_auth import (
    ACL_FILE,
    CLIENTID_FILE,
    PASSWORD_FILE,
    SERVICE_USER,
    BrokerAuthError,
    hash_password,
    mosquitto_auth_conf,
    new_password,
    render_acl_file,
    render_password_file,
    verify_password,
    write_auth_files,
)


def test_hash_is_mosquitto_7_format_and_salted():
    h1, h2 = hash_password("s3cret"), hash_password("s3cret")
    assert h1.startswith("$7$101$") and h1.count("$") == 4
    assert h1 != h2, "each hash gets its own salt"
    assert verify_password("s3cret", h1) and verify_password("s3cret", h2)
    assert not verify_password("s3cret!", h1)


def test_hash_matches_mosquitto_passwd_with_the_same_salt(tmp_path):
    tool = shutil.which("mosquitto_passwd")
    assert tool, "mosquitto_passwd is missing; install mosquitto (apt-get install mosquitto)"
    pwfile = tmp_path / "pw"
    subprocess.run([tool, "-c", "-b", str(pwfile), "alice", "correct horse"], check=True, capture_output=True)
    theirs = pwfile.read_text().strip().split(":", 1)[1]
    assert verify_password("correct horse", theirs)
    salt = base64.b64decode(theirs.split("$")[3])
    assert hash_password("correct horse", salt=salt) == theirs


def test_new_passwords_are_random_and_long():
    pw = {new_password() for _ in range(50)}
    assert len(pw) == 50 and min(len(p) for p in pw) >= 32


def test_acl_gives_devices_only_their_own_prefix():
    text = render_acl_file([("demo", "pi-01", "pi-01"), ("demo", "pi-02", "pi-02")])
    sections = {s.splitlines()[0]: s.splitlines()[1:] for s in text.split("\n\n")[1:]}
    assert sections[f"user {SERVICE_USER}"] == [
        "topic read lepton/v1/+/+/state", "topic read lepton/v1/+/+/telemetry",
        "topic read lepton/v1/+/+/events", "topic write lepton/v1/+/+/cmd",
        "topic readwrite lepton/v1/+/alerts",  # the fleet's alerts: published by the service, read by its operators
    ]
    pi1 = sections["user pi-01"]
    assert "topic read lepton/v1/demo/pi-01/cmd" in pi1
    assert "topic write lepton/v1/demo/pi-01/telemetry" in pi1
    assert all("pi-02" not in line and "+" not in line and "#" not in line for line in pi1)
    assert not any(line.startswith("topic write") and line.endswith("/cmd") for line in pi1)
    # No anonymous rules: every topic line sits under a user line.
    first_topic = text.index("topic ")
    assert text.rindex("user ", 0, first_topic) < first_topic


def test_password_file_lines():
    text = render_password_file({"b": hash_password("x"), "a": hash_password("y")})
    lines = text.splitlines()
    assert [line.split(":")[0] for line in lines] == ["a", "b"]
    assert all(line.split(":", 1)[1].startswith("$7$") for line in lines)


@pytest.mark.parametrize("username", [
    "", "a b", "a:b", "a\nuser lepton-cloud", "dev#", "dev+", "-lead", "x" * 65, "é", "a/b", None, 7,
])
def test_hostile_usernames_are_refused(username):
    with pytest.raises(BrokerAuthError):
        render_password_file({username: hash_password("pw")})
    with pytest.raises(BrokerAuthError):
        render_acl_file([("demo", "dev-1", username)])


@pytest.mark.parametrize("fleet,device_id", [
    ("demo", "+"), ("demo", "#"), ("+", "dev"), ("demo", "a/b"), ("demo", "a\ntopic readwrite #"), ("", "dev"),
    ("demo", "x" * 65),
])
def test_hostile_device_ids_and_fleets_are_refused(fleet, device_id):
    with pytest.raises(BrokerAuthError, match="cannot write an ACL"):
        render_acl_file([(fleet, device_id, "dev-1")])


@pytest.mark.parametrize("hashed", [
    "plaintext", "", "$6$abc$def", "$7$101$salt$hash\nuser evil", "$7$x$AAAA$AAAA", None,
])
def test_values_that_are_not_7_hashes_are_refused(hashed):
    with pytest.raises(BrokerAuthError, match=r"\$7\$"):
        render_password_file({"dev-1": hashed})
    assert not verify_password("anything", hashed)


@pytest.mark.parametrize("password", ["", "a\nb", "a\0b", None])
def test_unhashable_passwords_are_refused(password):
    with pytest.raises(BrokerAuthError):
        hash_password(password)


def test_duplicate_and_malformed_acl_entries_are_refused():
    with pytest.raises(BrokerAuthError, match="twice"):
        render_acl_file([("demo", "a", "same"), ("other", "b", "same")])
    with pytest.raises(BrokerAuthError, match="twice"):
        render_acl_file([("demo", "a", SERVICE_USER)])
    with pytest.raises(BrokerAuthError, match="must be"):
        render_acl_file([("demo", "a")])


def test_write_auth_files_is_atomic_and_keeps_old_files_on_bad_input(tmp_path):
    users = {SERVICE_USER: hash_password("c"), "dev-1": hash_password("d")}
    passwd, acl = write_auth_files(tmp_path / "auth", users, [("demo", "dev-1", "dev-1")])
    assert (passwd.name, acl.name) == (PASSWORD_FILE, ACL_FILE)
    assert passwd.stat().st_mode & 0o077 == 0, "hashes are not world-readable"
    before = passwd.read_text(), acl.read_text()
    with pytest.raises(BrokerAuthError):
        write_auth_files(tmp_path / "auth", {**users, "bad user": hash_password("x")}, [("demo", "dev-1", "dev-1")])
    with pytest.raises(BrokerAuthError):
        write_auth_files(tmp_path / "auth", users, [("demo", "dev/1", "dev-1")])
    assert (passwd.read_text(), acl.read_text()) == before
    assert sorted(p.name for p in (tmp_path / "auth").iterdir()) == sorted([ACL_FILE, CLIENTID_FILE, PASSWORD_FILE]), "no temp files left"


def test_write_auth_files_reports_an_unwritable_directory_in_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(BrokerAuthError, match="cannot write broker auth files"):
        write_auth_files(blocker / "auth", {SERVICE_USER: hash_password("c")}, [])


def test_operator_conf_points_at_the_files(tmp_path):
    conf = mosquitto_auth_conf(tmp_path)
    assert "allow_anonymous false" in conf
    assert f"password_file {tmp_path.resolve() / PASSWORD_FILE}" in conf
    assert f"acl_file {tmp_path.resolve() / ACL_FILE}" in conf
