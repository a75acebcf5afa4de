"""The web page in a real browser: headless Debian chromium against a real `lepton-edge cloud serve`.

The service is a child process with its own Mosquitto (per-device passwords and ACL);
the devices are simulated ones speaking lepton/v1 over MQTT and downloading over HTTP;
the bundles come from the real converter, so the report page shows real candidates.
Screenshots land in benchmarks/results/ui/.
"""

from __future__ import annotations


import pytest

from lepton_edge.cloud.client import CloudClient
from lepton_edge.cloud.service import spawn_service
from lepton_edge.cloud.simdevice import SimFleet

from browser import Browser, available
from cloud_helpers import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.skipif(available() is not None, reason=str(available()))]

TOKEN = "ui-test-operator-token"


@pytest.fixture
def served(tmp_path, keypair):
    proc = spawn_service(["--db", str(tmp_path / "cloud.db"), "--state-dir", str(tmp_path / "state"), "--port", "0",
                          "--artifacts", str(tmp_path / "artifacts"), "--trusted-key", str(keypair[1]), "--token", TOKEN,
                          "--tick", "0.2s", "--resend", "2s", "--lease-ttl", "2s"], log_path=tmp_path / "serve.log")
    yield proc
    proc.stop()


@pytest.fixture
def browser(served):
    b = Browser(served.url)
    yield b
    b.close()


def _status_of(browser: Browser, device_id: str) -> str | None:
    rows = browser.all(f'#fleet-table tr[data-device="{device_id}"]')
    return rows[0].get_attribute("data-status") if rows else None


def test_operator_signs_in_watches_the_fleet_deploys_in_waves_rolls_back_and_reads_a_report(served, browser, converted_bundles):
    client = CloudClient(served.url, served.token)
    for archive in converted_bundles.values():
        client.push(archive)
    fleet = SimFleet(served.info["broker"], telemetry_interval_s=0.5)
    try:
        lab = fleet.enroll(client, [f"lab-{i}" for i in range(5)], profile="x86-avx2", tags={"site": "lab"})
        fleet.enroll(client, ["berlin-0"], profile="x86-avx2", tags={"site": "berlin"})
        fleet.start(initial={"digits": "1"})
        wait_for(lambda: all(d["status"] == "online" and d["p95_ms"] for d in client.devices()), 30, "devices online with telemetry")
        _sign_in(browser)
        _fleet_updates_in_place(browser, fleet)
        dep_id = _deploy_in_waves(browser)
        _roll_back(browser, client, dep_id, [d.device_id for d in lab])
        _device_page(browser, dep_id)
        _report(browser)
        _api_docs(browser)
        _sign_out(browser)
    finally:
        fleet.stop()
    # The one expected error: the wrong token's 401 at sign-in.
    unexpected = [e for e in browser.console_errors() if not ("/ui/login" in e and "401" in e)]
    assert not unexpected, f"the page logged errors in the browser console: {unexpected}"


def _sign_in(b: Browser) -> None:
    b.open("/ui/fleet")
    b.wait(lambda: b.driver.current_url.endswith("/ui/login"), 10, "the redirect to sign-in")
    b.css("#token").send_keys("not-the-token")
    b.css("#sign-in").click()
    b.wait(lambda: "not the operator token" in b.css("#login-error").text, 10, "the refusal")
    assert "not-the-token" not in b.driver.current_url and TOKEN not in b.driver.page_source
    b.css("#token").send_keys(TOKEN)
    b.shot("01-sign-in")
    b.css("#sign-in").click()
    b.wait(lambda: b.driver.current_url.endswith("/ui/fleet"), 10, "the fleet page")
    assert TOKEN not in b.driver.current_url
    cookie = b.driver.get_cookie("lepton_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and TOKEN not in cookie["value"]
    assert b.driver.execute_script("return document.cookie").find("lepton_session") == -1  # HttpOnly: no script sees it


def _fleet_updates_in_place(b: Browser, fleet: SimFleet) -> None:
    b.wait(lambda: len(b.all("#fleet-table tr[data-device]")) == 6, 10, "six devices in the table")
    assert {_status_of(b, f"lab-{i}") for i in range(5)} == {"online"}
    assert "x86_64" in b.css('#fleet-table tr[data-device="lab-0"]').text and "digits 1" in b.css('#fleet-table tr[data-device="lab-0"]').text
    b.shot("02-fleet-online")
    # A marker on the window survives only if the table changes without a page load.
    b.driver.execute_script("window.__noReload = 1")
    fleet.devices["berlin-0"].crash()
    b.wait(lambda: _status_of(b, "berlin-0") == "offline", 30, "berlin-0 to show offline")
    assert b.driver.execute_script("return window.__noReload") == 1, "the page reloaded instead of refreshing its table"
    assert "1 offline" in b.css("#total-offline").text
    b.shot("03-fleet-device-offline")
    # Filters run on the server: by tag, then by status.
    b.open("/ui/fleet?tag=site%3Dberlin")
    assert [r.get_attribute("data-device") for r in b.all("#fleet-table tr[data-device]")] == ["berlin-0"]
    b.open("/ui/fleet?status=online&profile=x86-avx2")
    assert len(b.all("#fleet-table tr[data-device]")) == 5


def _deploy_in_waves(b: Browser) -> str:
    from selenium.webdriver.support.ui import Select

    b.open("/ui/deployments")
    Select(b.css("#deploy-model")).select_by_value("digits@2")
    for field, value in (("#deploy-to", "tag:site=lab"), ("#deploy-waves", "20%,60%,100%"), ("#deploy-soak", "3s"),
                         ("#deploy-timeout", "60s")):
        b.css(field).clear()
        b.css(field).send_keys(value)
    b.shot("04-deployment-form")
    b.css("#deploy-create").click()
    b.wait(lambda: "/ui/deployments/" in b.driver.current_url and b.all("#waves .wave"), 15, "the deployment page")
    dep_id = b.driver.current_url.rsplit("/", 1)[1]
    assert "Deployment of digits 2 started" in b.css("#flash").text
    assert len(b.all("#waves .wave")) == 3  # 1, 3 and 5 of the five lab devices
    b.driver.execute_script("window.__noReload = 1")
    seen: list[tuple[str, ...]] = []

    def progress() -> bool:
        state = (b.css("#deployment-status").text, *(w.get_attribute("data-gate") for w in b.all("#waves .wave")))
        if not seen or seen[-1] != state:
            seen.append(state)
            if state[:3] == ("running", "passed", "none"):
                b.shot("05-deployment-wave-1-passed")
        return state[0] == "completed"

    b.wait(progress, 90, "the deployment to complete")
    # Watched from one page that refreshed itself: wave 1 passed while the rollout was still running.
    assert ("running", "passed", "none", "none") in seen, seen
    assert [w.get_attribute("data-gate") for w in b.all("#waves .wave")] == ["passed"] * 3
    assert b.driver.execute_script("return window.__noReload") == 1
    gate = b.css('.wave[data-wave="2"]').text
    assert "p95 x86-avx2" in gate and "baseline" in gate and "healthy" in gate and "error rate" in gate
    assert {r.get_attribute("data-status") for r in b.all("#deployment-devices tr[data-device]")} == {"activated"}
    b.shot("06-deployment-completed")
    return dep_id


def _roll_back(b: Browser, client: CloudClient, dep_id: str, lab: list[str]) -> None:
    b.click("#action-rollback")
    b.driver.switch_to.alert.accept()  # the page asks first
    b.wait(lambda: b.css("#deployment-status").text == "rolled_back", 60, "the rollback to finish")
    assert {r.get_attribute("data-status") for r in b.all("#deployment-devices tr[data-device]")} == {"rolled_back"}
    b.shot("07-rolled-back")
    # The devices report version 1 again, and the fleet page says so.
    wait_for(lambda: all(client.device(d)["active"].get("digits") == "1" for d in lab), 30, "every lab device back on 1")
    b.open("/ui/fleet?tag=site%3Dlab")
    assert all("digits 1" in r.text for r in b.all("#fleet-table tr[data-device]"))
    assert client.deployment(dep_id)["status"] == "rolled_back"


def _device_page(b: Browser, dep_id: str) -> None:
    b.open("/ui/fleet")
    b.click('#fleet-table tr[data-device="lab-0"] a')
    b.wait(lambda: b.driver.current_url.endswith("/ui/devices/lab-0"), 10, "the device page")
    events = b.css("#events").text
    for step in ("command_received", "download_complete", "activated", "rolled_back"):
        assert step in events, f"{step} is not in the events timeline"
    assert dep_id[:12] in events
    # Both charts drew a line from the telemetry (p95 and request rate), on the server, as SVG.
    charts = b.all("svg.chart")
    assert len(charts) == 2 and all(c.find_elements("css selector", "polyline") for c in charts)
    b.shot("08-device")


def _report(b: Browser) -> None:
    b.open("/ui/models")
    links = b.all('.model-version[data-version="2"] .report-link')
    assert links, "no report link for digits 2"
    links[0].click()
    b.wait(lambda: b.all("#candidates-table tbody tr"), 15, "the candidates table")
    rows = b.all("#candidates-table tbody tr")
    assert len(rows) >= 2 and len(b.all("#candidates-table tr.chosen")) == 1
    assert "int8" in b.css("#candidates-table").text.lower()
    b.shot("09-conversion-report")


def _api_docs(b: Browser) -> None:
    b.open("/docs")
    b.wait(lambda: "lepton-edge cloud" in b.css(".swagger-ui .info .title").text, 20, "Swagger UI to render offline")
    assert b.all(".opblock"), "Swagger UI shows no operation"
    b.shot("10-api-docs")


def _sign_out(b: Browser) -> None:
    b.open("/ui/fleet")
    b.css("#logout").click()
    b.wait(lambda: b.driver.current_url.endswith("/ui/login"), 10, "the sign-in page after signing out")
    b.open("/ui/fleet")
    assert b.driver.current_url.endswith("/ui/login")
