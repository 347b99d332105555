"""The service's own docs page (`GET /`, `/docs`): written by mlkit from the contract, loads nothing from anywhere,
names the model and its version, and shows what a client needs, every value HTML-escaped.

The served page is opened in headless Chromium (Debian's `chromium`, as in `test_html_render.py`)."""
import html.parser
import json
import urllib.error
import urllib.request
from pathlib import Path

import browser
import pytest
from browser import CHROMIUM, MISSING, Chromium
from conftest import bento_served, champion_bento

KEY = "docs-page-key"
PURPOSE = "Tell a penguin's species from <its> measurements & sex"  # markup-like text: shown as text, never markup
ROW = {"island": "Biscoe", "bill_length_mm": 45.1, "bill_depth_mm": 14.5, "flipper_length_mm": 215,
       "body_mass_g": 5000, "sex": "female"}


@pytest.fixture(scope="module")
def served(trained):
    "penguins@champion served with an API key and a `[card] purpose` for the model."
    env = trained["env"]
    bento = champion_bento(env)
    extra = {"MLKIT_API_KEYS": KEY, "MLKIT_MODEL_PENGUINS__CARD_PURPOSE": PURPOSE}
    with bento_served(bento, trained["ini"], env, trained["root"] / "docs-page.log", extra_env=extra) as (url, _):
        req = urllib.request.Request(url + "/predict", json.dumps({"rows": [ROW]}).encode(),
                                     {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
        with urllib.request.urlopen(req, timeout=30) as r: version = json.loads(r.read())["version"]
        with urllib.request.urlopen(url + "/docs.json", timeout=30) as r: spec = json.loads(r.read())
        yield {"url": url, "version": version, "spec": spec}


def _get(url: str, headers: dict | None = None):
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as r: return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e: return e.code, e.headers, e.read()


class _Address:
    "What `Chromium.open` makes of its argument (`Path(path).resolve().as_uri()`), for a page served over HTTP."
    def __init__(self, url): self.url = url
    def resolve(self): return self
    def as_uri(self): return self.url


@pytest.mark.serve
def test_docs_page_loads_nothing_and_says_what_a_client_needs(served, monkeypatch):
    if not Path(CHROMIUM).exists(): pytest.fail(MISSING, pytrace=False)
    url = served["url"] + "/"
    with Chromium() as b:
        monkeypatch.setattr(browser, "Path", _Address)  # open the served page (not a file); restored below
        try: page = b.open(url)
        finally: monkeypatch.undo()
    assert page.requests == [url] and not page.problems, (page.requests, page.problems)  # nothing but the page itself
    dom, text = page.dom, page.dom["text"]
    assert "penguins" in dom["title"] and served["version"] in dom["title"], dom["title"]
    assert dom["scripts"] == 0 and dom["images"] == [], dom
    assert "Authorization: Bearer <key>" in text and PURPOSE in text, text[:3000]
    fields = served["spec"]["components"]["schemas"]["PredictRequest"]["properties"]["rows"]["items"]["properties"]
    assert set(fields) == set(ROW) and all(f in text for f in fields), (list(fields), text[:3000])
    assert all(code in text for code in ("400", "401", "408", "413", "415", "422", "431", "503")), text[-2000:]
    info = served["spec"]["info"]  # the model's, not BentoML's (its Bento tag, its README with outside badge images)
    assert (info["title"], info["version"], info["description"]) == ("penguins", served["version"], PURPOSE), info
    spec = json.dumps(served["spec"])
    assert "://" not in spec, [u for u in spec.split('"') if "://" in u][:5]  # no outside URL (BentoML's badges were)
    for link in ("/docs.json", "/readyz", "/metrics"): assert link in text


@pytest.mark.serve
def test_docs_page_headers_and_routes(served):
    "Open without a key (`docs_need_key` is off), with a CSP that forbids loading anything; Swagger's files are gone."
    status, headers, body = _get(served["url"] + "/")
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8", (status, headers)
    assert headers["content-security-policy"].startswith("default-src 'none'") and headers["x-content-type-options"] == "nosniff"
    assert _get(served["url"] + "/docs")[2] == body  # the same page, made once
    assert b"<script" not in body and b"swagger" not in body.lower() and b"Bearer &lt;key&gt;" in body
    assert _get(served["url"] + "/static_content/swagger-ui.css")[0] == 401  # no longer open
    assert _get(served["url"] + "/static_content/swagger-ui.css", {"Authorization": f"Bearer {KEY}"})[0] == 404


class _Tags(html.parser.HTMLParser):
    "Every element and attribute name of a page."
    def __init__(self):
        super().__init__()
        self.tags, self.attrs = set(), set()
    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self.attrs |= {a for a, _ in attrs}


def test_hostile_names_are_escaped():
    "A field, a category, a model name, a version and a purpose that look like markup are text on the page."
    from mlkit.openapi import docs_page
    contract = {"label": "y", "columns": {
        '<script>alert(1)</script>': {"dtype": "string", "categories": ['"><img src=x onerror=alert(2)>']},
        "<style>*{display:none}</style>": {"dtype": "float", "min": 0, "max": 1},
        "y": {"dtype": "string", "categories": ["</td><iframe src=//x>", "b"]}}}
    page = docs_page(contract, "<b>m</b>", "1<a href=//x>", "<script src=//x></script>&", 10, secured=True).decode()
    tags = _Tags()
    tags.feed(page)
    assert tags.tags <= {"html", "head", "meta", "link", "title", "style", "body", "h1", "h2", "p", "code", "table", "tr",
                         "th", "td", "br", "pre", "ul", "li", "a"}, tags.tags
    assert page.count("<style>") == 1 and page.count("<a ") == 4 and "onerror" not in tags.attrs
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;script src=//x&gt;&lt;/script&gt;&amp;" in page
    assert "<title>&lt;b&gt;m&lt;/b&gt;, version 1&lt;a href=//x&gt;</title>" in page
