"""The web page at `/`: open without a key, holds no data, and allows only its own script and style."""
from __future__ import annotations

import json
import re
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from api import create_app
from api.auth import SECURITY_HEADERS
from shared.auth import new_key
from tests.support import browser

DEAD_REDIS = "redis://127.0.0.1:1/0"  # the page needs no Redis, and no route it loads here does
STATIC = Path(__file__).resolve().parents[2] / "api" / "static"


@pytest.fixture
def make_client(tmp_path):
    def make(**config):
        return create_app({"REDIS_URL": DEAD_REDIS, "MODELS_DIR": str(tmp_path / "models"),
                           "RATE_LIMIT_PER_MINUTE": 0, **config}).test_client()
    return make


@pytest.fixture
def keys_path(tmp_path) -> str:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": [new_key("web", ["predict", "jobs"])[1]]}))
    return str(path)


class Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.script_text = ""
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.script_text += data


def test_the_page_is_open_and_says_whether_keys_are_configured(make_client, keys_path):
    """With keys, `/` answers without one and flags them; without keys (on loopback) it flags none."""
    for config, flag in (({"API_KEYS_FILE": keys_path}, "true"), ({}, "false")):
        response = make_client(**config).get("/")
        assert response.status_code == 200 and response.mimetype == "text/html"
        assert f'data-keys-required="{flag}"' in response.get_data(as_text=True)


def test_the_page_and_its_files_need_no_key_but_the_data_does(make_client, keys_path):
    """The script and style are served without a key, with a type the browser will run; /v1 still needs one."""
    client = make_client(API_KEYS_FILE=keys_path)
    for name, mimetype in (("predq.js", "text/javascript"), ("predq.css", "text/css")):
        with client.get(f"/static/{name}") as response:  # a file response holds the file open until closed
            assert response.status_code == 200 and response.mimetype == mimetype
    assert client.get("/static/nothing.js").status_code == 404
    assert client.get("/static/../auth.py").status_code == 404
    assert client.get("/v1/jobs").status_code == 401


def test_the_page_allows_only_its_own_script_and_style(make_client):
    """The page's CSP allows scripts, styles and fetches from its own origin only; its other headers are the API's."""
    response = make_client().get("/")
    csp = dict(part.strip().split(" ", 1) for part in response.headers["Content-Security-Policy"].split(";"))
    assert csp["default-src"] == "'none'" and csp["script-src"] == "'self'" and csp["connect-src"] == "'self'"
    assert csp["style-src"] == "'self'" and csp["frame-ancestors"] == "'none'"
    assert "unsafe-inline" not in response.headers["Content-Security-Policy"]
    for name in ("X-Content-Type-Options", "X-Frame-Options", "Referrer-Policy", "Cache-Control"):
        assert response.headers[name] == SECURITY_HEADERS[name]


def test_the_page_has_no_inline_script_and_the_script_writes_no_html(make_client):
    """Every script is a file, no element has an event attribute, and the script only ever sets text."""
    parser = Tags()
    parser.feed(make_client().get("/").get_data(as_text=True))
    scripts = [attrs for tag, attrs in parser.tags if tag == "script"]
    assert scripts and all(a.get("src", "").startswith("/static/") for a in scripts)
    assert parser.script_text.strip() == ""
    assert not [(tag, name) for tag, attrs in parser.tags for name in attrs if name.startswith("on")]
    script = (STATIC / "predq.js").read_text()
    assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|eval\(|new Function", script)
    assert "localStorage" not in script and "document.cookie" not in script


# -- the browser the page's integration test drives ----------------------------------------------------------

class FakeApt:
    """apt-get as the browser setup calls it: each call's arguments, and an exit status per step."""

    def __init__(self, monkeypatch, *, fail_first_install: bool, installs: bool = True):
        self.calls: list[tuple[str, ...]] = []
        self.present = False
        self.fail_first_install = fail_first_install
        self.installs = installs
        monkeypatch.setattr(browser, "_present", lambda: self.present)
        monkeypatch.setattr(browser.os, "geteuid", lambda: 0)
        monkeypatch.setattr(browser.shutil, "which", lambda name: "/usr/bin/" + name)
        monkeypatch.setattr(browser, "_apt", self)

    def __call__(self, *args: str) -> subprocess.CompletedProcess:
        self.calls.append(args)
        failed = args[0] == "install" and self.fail_first_install and len(self.calls) == 1
        if args[0] == "install" and not failed and self.installs:
            self.present = True
        return subprocess.CompletedProcess(args, 100 if failed else 0, "", "E: Unable to locate package" if failed else "")


def test_the_browser_is_installed_with_apt_when_missing(monkeypatch):
    """Missing Chromium is installed; an install that fails is retried once after apt-get update."""
    apt = FakeApt(monkeypatch, fail_first_install=False)
    assert browser.ensure_chromium() is None
    assert apt.calls == [("install", "-y", "chromium", "chromium-driver")]
    apt = FakeApt(monkeypatch, fail_first_install=True)
    assert browser.ensure_chromium() is None
    assert [c[0] for c in apt.calls] == ["install", "update", "install"]


def test_the_browser_setup_says_why_it_cannot_install(monkeypatch):
    """Not root, or apt-get failing even after an update: a reason naming the packages (the test then skips)."""
    apt = FakeApt(monkeypatch, fail_first_install=False, installs=False)
    reason = browser.ensure_chromium()
    assert reason is not None and "could not install chromium chromium-driver" in reason
    monkeypatch.setattr(browser.os, "geteuid", lambda: 1000)
    apt.calls.clear()
    reason = browser.ensure_chromium()
    assert "not root" in reason and "apt-get install -y chromium chromium-driver" in reason and apt.calls == []
