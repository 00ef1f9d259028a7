"""The dashboard in a real headless Chromium (Debian's chromium + chromium-driver)."""

import shutil
import tempfile
import time
import urllib.error
import urllib.request

import base64
import csv
import io
import json

import openai
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import Select, WebDriverWait

from conftest import ROOT, Mock, admin_get, start_gateway

ADMIN_KEY = "adm-e2e-dashboard-secret-1"
GATEWAY_KEY = "fk-e2e-dashboard-key-0001"
UPSTREAM_KEY = "sk-e2e-dashboard-upstream-1"
SECRETS = (ADMIN_KEY, GATEWAY_KEY, UPSTREAM_KEY)
SHOTS = ROOT / "target" / "screenshots"



def status_of(url, headers=None):
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


CAPPED_KEY = "fk-e2e-dashboard-capped-02"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    mock = Mock(["mock-upstream", "--listen", "127.0.0.1:0", "--record", "--keys", UPSTREAM_KEY])
    config = f"""
access:
  keys:
    - {{name: dash, key: {GATEWAY_KEY}}}
    - {{name: capped, key: {CAPPED_KEY}, rpm: 50, budget: {{tokens: 10, period: day}}}}
upstreams: [{{name: mock, base_url: 'http://{mock.address}', keys: [{UPSTREAM_KEY}]}}]
admin: {{key: {ADMIN_KEY}}}
pricing: {{gpt-4o: {{input: 2.5, output: 10}}}}
"""
    gateway = start_gateway(tmp_path_factory.mktemp("dashboard"), config)
    client = openai.OpenAI(base_url=f"http://{gateway.address}/v1", api_key=GATEWAY_KEY, max_retries=0)
    client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "find the needle-alpha"}], user="ann@example.com"
    )
    stream = client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "stream please"}], stream=True, user="bo"
    )
    for _ in stream:
        pass
    for i in range(55):
        client.embeddings.create(model="text-embedding-3-small", input=f"row {i}")
    # The capped key spends its day's budget, then is refused by sluice itself.
    capped = openai.OpenAI(base_url=f"http://{gateway.address}/v1", api_key=CAPPED_KEY, max_retries=0)
    capped.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "spend it all"}])
    for _ in range(200):  # settled off the request path
        keys = admin_get(gateway.address, "/v1/status", ADMIN_KEY)["keys"]
        if next(k for k in keys if k["name"] == "capped")["usage"]["day"]["tokens"] >= 10:
            break
        time.sleep(0.05)
    with pytest.raises(openai.RateLimitError):
        capped.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "one more"}])
    # An upstream failure.
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "fail"}], extra_headers={"x-mock-fault": "500"}
        )
    total = 60
    for _ in range(200):
        if admin_get(gateway.address, "/api/requests", ADMIN_KEY)["total"] == total:
            break
        time.sleep(0.05)
    yield gateway, total
    gateway.stop()
    mock.stop()


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    profile = tempfile.mkdtemp(prefix="sluice-chrome-")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-quic", "--window-size=1400,1000", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def wait(driver, condition, timeout=10):
    return WebDriverWait(driver, timeout).until(condition)


def shot(driver, name):
    """The whole page (not only the window) as target/screenshots/{name}.png."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    width, height = driver.execute_script(
        "window.scrollTo(0, 0); return [window.innerWidth, Math.min(document.documentElement.scrollHeight, 12000)]"
    )
    image = driver.execute_cdp_cmd(
        "Page.captureScreenshot",
        {"captureBeyondViewport": True, "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}},
    )
    (SHOTS / f"{name}.png").write_bytes(base64.b64decode(image["data"]))


def assert_no_secret(driver):
    html = driver.page_source
    for secret in SECRETS:
        assert secret not in html, f"{secret} appears in the page"


def forget_session(driver, address):
    """Drops the session from a page that runs no script (the login page would move on)."""
    driver.get(f"http://{address}/favicon.ico")
    driver.delete_all_cookies()


def login(driver, address, key, fragment=""):
    forget_session(driver, address)
    driver.get(f"http://{address}/{fragment}")
    field = wait(driver, EC.presence_of_element_located((By.NAME, "key")))
    field.clear()
    field.send_keys(key)
    driver.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()


def test_without_the_admin_key_nothing_is_shown(site):
    gateway, _ = site
    base = f"http://{gateway.address}"
    # The page redirects to the login page, which holds no data.
    with urllib.request.urlopen(f"{base}/") as response:
        assert response.url == f"{base}/login"
        assert ADMIN_KEY not in response.read().decode()
    assert status_of(f"{base}/favicon.ico") == 200
    assert status_of(f"{base}/api/requests") == 401
    assert status_of(f"{base}/api/stats", {"cookie": "sluice_session=forged"}) == 401
    assert status_of(f"{base}/api/requests", {"authorization": f"Bearer {GATEWAY_KEY}"}) == 401


def test_login_and_overview_match_the_api(site, browser):
    gateway, total = site
    login(browser, gateway.address, "wrong-key")
    error = wait(browser, EC.text_to_be_present_in_element((By.ID, "login-error"), "not right"))
    assert error
    shot(browser, "login")
    login(browser, gateway.address, ADMIN_KEY)
    card = wait(browser, EC.presence_of_element_located((By.CSS_SELECTOR, "[data-stat=requests] .value")))
    stats = admin_get(gateway.address, f"/api/stats?from={int(time.time() * 1000) - 86400000}", ADMIN_KEY)
    assert card.text == f"{stats['totals']['requests']:,}" == f"{total:,}"
    tokens = browser.find_element(By.CSS_SELECTOR, "[data-stat=total_tokens] .value").text
    assert tokens == f"{stats['totals']['total_tokens']:,}"
    for chart in ("outcomes", "errors", "cost", "latency", "tokens"):
        wait(browser, EC.presence_of_element_located((By.CSS_SELECTOR, f"#chart-{chart} canvas")))
    cookie = browser.get_cookie("sluice_session")
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"
    assert_no_secret(browser)
    shot(browser, "overview")


def test_upstreams_and_keys(site, browser):
    gateway, _ = site
    login(browser, gateway.address, ADMIN_KEY)
    wait(browser, EC.presence_of_element_located((By.CSS_SELECTOR, "[data-stat=requests]")))
    browser.get(f"http://{gateway.address}/#/upstreams")
    panel = wait(browser, EC.presence_of_element_located((By.CSS_SELECTOR, "[data-upstream=mock]")))
    # The failure the fixture provoked may still rest it: either state is shown.
    state = panel.find_element(By.CSS_SELECTOR, ".section-head .status").text
    assert state == "healthy" or state.startswith("resting"), state
    assert "sk-…" in panel.text
    assert_no_secret(browser)
    shot(browser, "upstreams")


def test_requests_search_filter_page_and_detail(site, browser):
    gateway, total = site
    login(browser, gateway.address, ADMIN_KEY)
    wait(browser, EC.presence_of_element_located((By.CSS_SELECTOR, "[data-stat=requests]")))
    browser.get(f"http://{gateway.address}/#/requests?auto=0")
    info = wait(browser, EC.presence_of_element_located((By.ID, "page-info")))
    assert info.text == f"Page 1 of 2 · {total} requests"
    assert len(browser.find_elements(By.CSS_SELECTOR, "tbody tr")) == 50
    shot(browser, "requests")
    browser.find_element(By.ID, "next").click()
    wait(browser, EC.text_to_be_present_in_element((By.ID, "page-info"), "Page 2 of 2"))
    assert len(browser.find_elements(By.CSS_SELECTOR, "tbody tr")) == total - 50

    browser.get(f"http://{gateway.address}/#/requests?auto=0")
    # The view re-renders on the hash change: take the search field of the new render.
    wait(browser, EC.text_to_be_present_in_element((By.ID, "page-info"), "Page 1 of 2"))
    search = wait(browser, EC.presence_of_element_located((By.NAME, "search")))
    search.send_keys("needle-alpha")
    browser.find_element(By.CSS_SELECTOR, "#filters button[type=submit]").click()
    wait(browser, EC.text_to_be_present_in_element((By.ID, "page-info"), "· 1 requests"))

    browser.get(f"http://{gateway.address}/#/requests?auto=0&model=text-embedding-3-small")
    wait(browser, EC.text_to_be_present_in_element((By.ID, "page-info"), "· 55 requests"))

    browser.get(f"http://{gateway.address}/#/requests?auto=0&search=stream%20please")
    wait(browser, EC.text_to_be_present_in_element((By.ID, "page-info"), "· 1 requests"))
    browser.find_element(By.CSS_SELECTOR, "tbody tr").click()
    reply = wait(browser, EC.presence_of_element_located((By.ID, "reply-text")))
    assert reply.text.strip() == "".join(f"word{i} " for i in range(8)).strip()
    body = browser.find_element(By.ID, "request-body").text
    assert '"stream": true' in body
    headers = browser.find_element(By.TAG_NAME, "main").text
    assert "Bearer fk-…0001" in headers
    assert_no_secret(browser)
    shot(browser, "detail")


def no_sideways_scroll(driver):
    """The page is no wider than the window: nothing scrolls sideways."""
    return driver.execute_script(
        "return [document.documentElement.scrollWidth, document.body.scrollWidth, window.innerWidth]"
    )


def in_view(driver, element):
    return driver.execute_script(
        "const r = arguments[0].getBoundingClientRect();"
        "return r.width > 0 && r.left >= 0 && r.right <= window.innerWidth && r.top >= 0;",
        element,
    )


def test_the_login_page_shows_no_navigation_and_keeps_the_deep_link(site, browser):
    gateway, total = site
    forget_session(browser, gateway.address)
    browser.get(f"http://{gateway.address}/#/requests?auto=0")
    wait(browser, EC.presence_of_element_located((By.NAME, "key")))
    assert browser.current_url.endswith("/login#/requests?auto=0")
    assert not browser.find_element(By.ID, "nav").is_displayed()
    assert not browser.find_element(By.ID, "logout").is_displayed()
    assert "admin.key_env" in browser.find_element(By.ID, "login-hint").text
    browser.find_element(By.NAME, "key").send_keys(ADMIN_KEY)
    browser.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
    wait(browser, EC.text_to_be_present_in_element((By.ID, "page-info"), f"{total} requests"))
    assert browser.current_url == f"http://{gateway.address}/#/requests?auto=0"
    assert browser.find_element(By.CSS_SELECTOR, "nav a.active").text == "Requests"


def test_numbers_explain_themselves(site, browser):
    gateway, _ = site
    login(browser, gateway.address, ADMIN_KEY)
    wait(browser, EC.presence_of_element_located((By.CSS_SELECTOR, "[data-stat=requests]")))
    stats = admin_get(gateway.address, f"/api/stats?from={int(time.time() * 1000) - 86400000}", ADMIN_KEY)
    totals = stats["totals"]
    assert totals["refused"] == 1 and totals["upstream_errors"] == 1
    value = lambda key: browser.find_element(By.CSS_SELECTOR, f"[data-stat={key}] .value").text
    assert value("refused").startswith("1 (")
    assert value("upstream_errors").startswith("1 (")
    # The success rate leaves sluice's refusal out: of those that reached an upstream.
    assert value("success_rate") == f"{totals['succeeded'] / totals['reached'] * 100:.1f}%"
    assert "reached an upstream" in browser.find_element(By.CSS_SELECTOR, "[data-stat=success_rate] .note").text
    note = browser.find_element(By.ID, "no-upstream-note").text
    assert "before any upstream was tried" in note
    users = browser.find_element(By.ID, "top-users").text
    assert "ann@example.com" in users and "bo" in users
    assert "capped" in browser.find_element(By.ID, "top-keys").text

    browser.get(f"http://{gateway.address}/#/upstreams")
    capped = wait(browser, EC.presence_of_element_located((By.CSS_SELECTOR, "[data-key=capped]")))
    budget = capped.find_element(By.CSS_SELECTOR, "[data-meter^='Token budget']")
    assert "level-full" in budget.get_attribute("class").split()
    assert "at limit" in budget.text
    rpm = capped.find_element(By.CSS_SELECTOR, "[data-meter^='Requests this minute']")
    assert "of 50" in rpm.text and "left" in rpm.text
    assert "not counted here" in browser.find_element(By.ID, "today-note").text
    shot(browser, "upstreams-budget")


def test_requests_filters_are_choices_columns_and_export(site, browser):
    gateway, total = site
    login(browser, gateway.address, ADMIN_KEY)
    wait(browser, EC.presence_of_element_located((By.CSS_SELECTOR, "[data-stat=requests]")))
    browser.get(f"http://{gateway.address}/#/requests?auto=0")
    wait(browser, EC.text_to_be_present_in_element((By.ID, "page-info"), f"{total} requests"))
    values = admin_get(gateway.address, "/api/values", ADMIN_KEY)
    for name, key in (("model", "models"), ("key", "keys"), ("upstream", "upstreams"), ("user", "users")):
        select = Select(browser.find_element(By.CSS_SELECTOR, f"#filters select[name={name}]"))
        offered = [o.get_attribute("value") for o in select.options if o.get_attribute("value")]
        assert offered == values[key], name
    statuses = Select(browser.find_element(By.CSS_SELECTOR, "#filters select[name=status]"))
    assert {"200", "429", "500", "error"} <= {o.get_attribute("value") for o in statuses.options}
    headers = [th.text for th in browser.find_elements(By.CSS_SELECTOR, "thead th")]
    for column in ("Cause", "Cost", "Stream", "TTFB", "User"):
        assert column in headers
    causes = {c.text for c in browser.find_elements(By.CSS_SELECTOR, "tbody .cause")}
    assert {"ok", "refused", "upstream error"} <= causes

    Select(browser.find_element(By.CSS_SELECTOR, "#filters select[name=user]")).select_by_value("ann@example.com")
    browser.find_element(By.CSS_SELECTOR, "#filters button[type=submit]").click()
    wait(browser, EC.text_to_be_present_in_element((By.ID, "page-info"), "· 1 requests"))
    assert "user=ann%40example.com" in browser.current_url

    browser.get(f"http://{gateway.address}/#/requests?auto=0&status=error")
    wait(browser, EC.text_to_be_present_in_element((By.ID, "page-info"), "· 2 requests"))
    # The export links carry the filter; what they download parses.
    fetch = (
        "const done = arguments[arguments.length - 1];"
        "fetch(document.getElementById(arguments[0]).href, {credentials: 'same-origin'})"
        ".then(r => r.text().then(t => done([r.status, r.headers.get('content-type'), t])));"
    )
    status, content_type, text = browser.execute_async_script(fetch, "export-csv")
    assert status == 200 and content_type.startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 2
    assert {row["cause"] for row in rows} == {"refused", "upstream_error"}
    status, content_type, text = browser.execute_async_script(fetch, "export-jsonl")
    lines = [json.loads(line) for line in text.splitlines()]
    assert status == 200 and len(lines) == 2 and all(line["status"] >= 400 for line in lines)
    assert_no_secret(browser)


def test_a_search_hit_is_highlighted_in_the_detail(site, browser):
    gateway, _ = site
    login(browser, gateway.address, ADMIN_KEY)
    wait(browser, EC.presence_of_element_located((By.CSS_SELECTOR, "[data-stat=requests]")))
    browser.get(f"http://{gateway.address}/#/requests?auto=0&search=needle-ALPHA")
    wait(browser, EC.text_to_be_present_in_element((By.ID, "page-info"), "· 1 requests"))
    browser.find_element(By.CSS_SELECTOR, "tbody tr").click()
    body = wait(browser, EC.presence_of_element_located((By.ID, "request-body")))
    marks = body.find_elements(By.TAG_NAME, "mark")
    assert [m.text for m in marks] == ["needle-alpha"]
    assert "What the client received" in browser.find_element(By.TAG_NAME, "main").text
    assert "ann@example.com" in browser.find_element(By.ID, "summary").text


VIEWS = [
    ("overview", "", "#chart-latency canvas"),
    ("upstreams", "#/upstreams", "[data-key=capped]"),
    ("requests", "#/requests?auto=0", "#page-info"),
    ("detail", "#/requests?auto=0&search=stream%20please", "#page-info"),
]


@pytest.mark.parametrize("width,height", [(1440, 900), (390, 844), (360, 740), (3840, 2160)])
def test_every_view_fits_the_screen(site, browser, width, height):
    gateway, _ = site
    browser.set_window_size(width, height)
    try:
        forget_session(browser, gateway.address)
        browser.get(f"http://{gateway.address}/")
        wait(browser, EC.presence_of_element_located((By.NAME, "key")))
        scroll, body, inner = no_sideways_scroll(browser)
        assert scroll <= inner and body <= inner, (scroll, body, inner)
        shot(browser, f"login-{width}")
        browser.find_element(By.NAME, "key").send_keys(ADMIN_KEY)
        browser.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
        wait(browser, EC.presence_of_element_located((By.CSS_SELECTOR, "[data-stat=requests]")))
        for name, fragment, ready in VIEWS:
            browser.get(f"http://{gateway.address}/{fragment}")
            wait(browser, EC.presence_of_element_located((By.CSS_SELECTOR, ready)))
            if name == "detail":
                # The same page as the list before: wait for the search's own render.
                wait(browser, EC.text_to_be_present_in_element((By.ID, "page-info"), "· 1 requests"))
                browser.find_element(By.CSS_SELECTOR, "tbody tr").click()
                wait(browser, EC.presence_of_element_located((By.ID, "reply-text")))
            time.sleep(0.3)  # charts settle to their containers' width
            scroll, body, inner = no_sideways_scroll(browser)
            assert scroll <= inner and body <= inner, (name, scroll, body, inner)
            assert in_view(browser, browser.find_element(By.ID, "logout")), f"log out reachable on {name}"
            if name == "overview":
                for canvas in browser.find_elements(By.CSS_SELECTOR, ".chart canvas"):
                    box = canvas.find_element(By.XPATH, "./ancestor::div[contains(@class, 'chart')][1]")
                    assert canvas.size["width"] <= box.size["width"], (canvas.size, box.size)
            shot(browser, f"{name}-{width}")
        # A chart follows its container when the window changes.
        browser.get(f"http://{gateway.address}/")
        canvas = wait(browser, EC.presence_of_element_located((By.CSS_SELECTOR, "#chart-cost canvas")))
        before = canvas.size["width"]
        browser.set_window_size(700 if width > 800 else 320, height)
        wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#chart-cost canvas").size["width"] != before)
        scroll, body, inner = no_sideways_scroll(browser)
        assert scroll <= inner, (scroll, inner)
    finally:
        browser.set_window_size(1400, 1000)
