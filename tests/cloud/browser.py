"""Headless Debian chromium through its chromedriver (Selenium), fenced off from the network.

Selenium is given both binaries, so Selenium Manager never looks for (or downloads) a
browser or a driver. Anything that is not loopback goes to a proxy on the discard port
that nobody serves, so the page cannot quietly load something from the internet: a CDN
reference would fail to load here as it would on an offline site.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
SCREENSHOTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "ui"

FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-extensions", "--disable-default-apps", "--no-pings",
         "--disable-domain-reliability", "--disable-client-side-phishing-detection", "--metrics-recording-only",
         "--disable-dev-shm-usage", "--window-size=1400,1000", "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=127.0.0.1;localhost"]


def available() -> str | None:
    """Why the browser cannot run here, or None when it can."""
    if not Path(CHROMIUM).exists() or not Path(CHROMEDRIVER).exists():
        return "Debian's chromium and chromium-driver are not installed (bash .ci/setup installs them)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (the dev extra has it)"
    return None


def spki_pin(cert_pem: Path) -> str:
    """base64(sha256(SubjectPublicKeyInfo)) of a PEM certificate: what chromium's SPKI list takes."""
    import base64
    import hashlib

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    key = x509.load_pem_x509_certificate(cert_pem.read_bytes()).public_key()
    spki = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


class Browser:
    """One headless chromium with a fresh profile; :meth:`shot` saves a screenshot by name."""

    def __init__(self, base_url: str, shots: Path = SCREENSHOTS, *, trust_cert: Path | None = None) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.base_url = base_url.rstrip("/")
        self.shots = shots
        shots.mkdir(parents=True, exist_ok=True)
        self._profile = tempfile.mkdtemp(prefix="lepton-chromium-")
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        # Over HTTPS the browser trusts exactly the service's key (its SPKI pin), not every certificate.
        pin = [f"--ignore-certificate-errors-spki-list={spki_pin(trust_cert)}"] if trust_cert else []
        for flag in FLAGS + pin + [f"--user-data-dir={self._profile}"]:
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
        self.driver.set_page_load_timeout(30)

    def open(self, path: str) -> None:
        self.driver.get(self.base_url + path)

    def css(self, selector: str) -> Any:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, selector)

    def all(self, selector: str) -> list[Any]:
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.CSS_SELECTOR, selector)

    def click(self, selector: str, timeout: float = 10.0) -> None:
        """Click, retrying when the element was swapped out by the page's live refresh meanwhile."""
        from selenium.common.exceptions import StaleElementReferenceException

        def attempt() -> bool:
            try:
                self.css(selector).click()
                return True
            except StaleElementReferenceException:
                return False

        self.wait(attempt, timeout, f"a click on {selector}")

    def wait(self, predicate: Callable[[], Any], timeout: float = 30.0, what: str = "the page") -> Any:
        """Poll ``predicate`` (a bound on waiting, not a speed target); stale elements count as not yet."""
        from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

        deadline = time.monotonic() + timeout
        while True:
            try:
                value = predicate()
                if value:
                    return value
            except (NoSuchElementException, StaleElementReferenceException):
                pass
            if time.monotonic() > deadline:
                self.shot(f"timeout-{what.replace(' ', '-')[:40]}")
                raise AssertionError(f"timed out waiting for {what} (screenshot saved)")
            time.sleep(0.1)

    def shot(self, name: str) -> Path:
        """A screenshot of the whole page (beyond the window), through the DevTools protocol."""
        import base64

        path = self.shots / f"{name}.png"
        size = self.driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], 6000), "scale": 1}
        shot = self.driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip})
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    def console_errors(self) -> list[str]:
        return [e["message"] for e in self.driver.get_log("browser") if e.get("level") == "SEVERE"]

    def close(self) -> None:
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self._profile, ignore_errors=True)
