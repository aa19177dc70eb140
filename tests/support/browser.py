"""Headless Chromium for page tests: Debian's `chromium` and `chromium-driver`, installed when missing and allowed."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
PACKAGES = ("chromium", "chromium-driver")
APT_TIMEOUT = 1200  # seconds: a first install downloads a few hundred MB


def _present() -> bool:
    return os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)


def _apt(*args: str) -> subprocess.CompletedProcess[str]:
    # Wait for another apt or dpkg run to finish instead of failing on its lock.
    return subprocess.run(["apt-get", "-o", "DPkg::Lock::Timeout=600", *args], capture_output=True, text=True,
                          timeout=APT_TIMEOUT, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def ensure_chromium() -> str | None:
    """Install Chromium and its driver with apt-get when they are missing; the reason they cannot be had, else None."""
    if _present():
        return None
    if os.geteuid() != 0:
        return (f"{CHROMIUM} or {CHROMEDRIVER} is missing and this process is not root, so it cannot install them: "
                f"run 'apt-get install -y {' '.join(PACKAGES)}'")
    if shutil.which("apt-get") is None:
        return f"{CHROMIUM} or {CHROMEDRIVER} is missing and there is no apt-get to install {' '.join(PACKAGES)}"
    try:
        result = _apt("install", "-y", *PACKAGES)
        if result.returncode != 0:  # a stale or absent package list: refresh it and try once more
            update = _apt("update")
            result = _apt("install", "-y", *PACKAGES) if update.returncode == 0 else update
    except subprocess.TimeoutExpired:
        return f"apt-get did not finish installing {' '.join(PACKAGES)} within {APT_TIMEOUT} s"
    if result.returncode != 0 or not _present():
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-5:])
        return f"apt-get could not install {' '.join(PACKAGES)} (exit {result.returncode}):\n{tail}"
    return None


def start_chrome(log_path: Path, download_dir: Path):
    """A headless Chromium driven through chromedriver (selenium); downloads land in download_dir."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1400,900", "--lang=en-US", "--no-first-run", "--disable-extensions"):
        options.add_argument(argument)
    options.add_experimental_option("prefs", {"download.default_directory": str(download_dir),
                                              "download.prompt_for_download": False})
    # Both paths given: selenium looks for nothing else and downloads nothing.
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER, log_output=str(log_path)),
                              options=options)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(download_dir)})
    return driver
