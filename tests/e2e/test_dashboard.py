"""The dashboard in a real headless Chromium (Debian's chromium + chromium-driver)."""

import shutil
import tempfile
import time
import urllib.error
import urllib.request

import openai
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

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


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    mock = Mock(["mock-upstream", "--listen", "127.0.0.1:0", "--record", "--keys", UPSTREAM_KEY])
    config = f"""
access: {{keys: [{{name: dash, key: {GATEWAY_KEY}}}]}}
upstreams: [{{name: mock, base_url: 'http://{mock.address}', keys: [{UPSTREAM_KEY}]}}]
admin: {{key: {ADMIN_KEY}}}
pricing: {{gpt-4o: {{input: 2.5, output: 10}}}}
"""
    gateway = start_gateway(tmp_path_factory.mktemp("dashboard"), config)
    client = openai.OpenAI(base_url=f"http://{gateway.address}/v1", api_key=GATEWAY_KEY, max_retries=0)
    client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "find the needle-alpha"}])
    stream = client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "stream please"}], stream=True
    )
    for _ in stream:
        pass
    for i in range(55):
        client.embeddings.create(model="text-embedding-3-small", input=f"row {i}")
    total = 57
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
    SHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SHOTS / f"{name}.png"))


def assert_no_secret(driver):
    html = driver.page_source
    for secret in SECRETS:
        assert secret not in html, f"{secret} appears in the page"


def login(driver, address, key):
    driver.get(f"http://{address}/")
    driver.delete_all_cookies()
    driver.get(f"http://{address}/")
    field = wait(driver, EC.presence_of_element_located((By.NAME, "key")))
    field.clear()
    field.send_keys(key)
    driver.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()


def test_without_the_admin_key_nothing_is_shown(site):
    gateway, _ = site
    base = f"http://{gateway.address}"
    assert status_of(f"{base}/") == 401
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
    wait(browser, EC.presence_of_element_located((By.CSS_SELECTOR, "#chart-hourly canvas")))
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
    assert "healthy" in panel.text
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
