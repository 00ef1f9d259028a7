"""Keys, teams and admins managed at run time (issue 16), end to end with the real binary:
the official openai SDK with a key made through the admin API, revoked → AuthenticationError;
the dashboard in real Chromium (an admin creates and copies a key, a viewer sees no create
button and gets 403, the audit log shows both); and a sweep of every output of the run
(log, database files, API answers, dashboard pages, metrics) for every secret it made."""

import json
import pathlib
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

from conftest import Mock, start_gateway

ADMIN_KEY = "adm-e2e-manage-secret-0016"
UPSTREAM_KEY = "sk-e2e-manage-upstream-16"
VIEWER_PASSWORD = "viewer-password-e2e-16"
ADMIN_PASSWORD = "admin-password-e2e-16"

# Every secret the run makes or uses; the sweep at the end looks for each.
SECRETS = {ADMIN_KEY, UPSTREAM_KEY, VIEWER_PASSWORD, ADMIN_PASSWORD}


def call(address, method, path, body=None, admin_key=ADMIN_KEY, cookie=None):
    """An admin API call; answers (status, JSON or text)."""
    headers = {"content-type": "application/json"}
    if cookie:
        headers["cookie"] = cookie
    elif admin_key:
        headers["authorization"] = f"Bearer {admin_key}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://{address}{path}", data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        status, text = error.code, error.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    mock = Mock(["mock-upstream", "--listen", "127.0.0.1:0", "--keys", UPSTREAM_KEY])
    directory = tmp_path_factory.mktemp("manage")
    config = f"""
upstreams: [{{name: mock, base_url: 'http://{mock.address}', keys: [{UPSTREAM_KEY}]}}]
admin: {{key: {ADMIN_KEY}}}
storage: {{url: 'sqlite://{directory}/sluice.db'}}
"""
    gateway = start_gateway(directory, config)
    answers = []
    yield gateway, directory, answers
    gateway.stop()
    mock.stop()


def test_a_key_made_through_the_api_works_with_the_sdk_until_revoked(site):
    gateway, _, answers = site
    status, created = call(gateway.address, "POST", "/api/keys", {"name": "sdk-user", "models": ["gpt-4o"]})
    assert status == 201, created
    secret = created["key"]
    SECRETS.add(secret)
    client = openai.OpenAI(base_url=f"http://{gateway.address}/v1", api_key=secret, max_retries=0)
    reply = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content

    status, rotated = call(gateway.address, "POST", f"/api/keys/{created['id']}/rotate", {"grace": "0s"})
    assert status == 200
    SECRETS.add(rotated["key"])
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "old"}])
    client = openai.OpenAI(base_url=f"http://{gateway.address}/v1", api_key=rotated["key"], max_retries=0)
    client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "new"}])

    status, _ = call(gateway.address, "DELETE", f"/api/keys/{created['id']}")
    assert status == 200
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "after"}])
    # A model the key may not use is refused in the SDK's terms too.
    status, other = call(gateway.address, "POST", "/api/keys", {"name": "narrow", "models": ["gpt-4o"]})
    SECRETS.add(other["key"])
    narrow = openai.OpenAI(base_url=f"http://{gateway.address}/v1", api_key=other["key"], max_retries=0)
    with pytest.raises(openai.PermissionDeniedError):
        narrow.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])


def wait(driver, condition, timeout=10):
    return WebDriverWait(driver, timeout).until(condition)


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


def login(driver, address, password, name=""):
    driver.get(f"http://{address}/")
    driver.delete_all_cookies()
    driver.get(f"http://{address}/")
    wait(driver, EC.presence_of_element_located((By.NAME, "key")))
    if name:
        driver.find_element(By.NAME, "name").send_keys(name)
    driver.find_element(By.NAME, "key").send_keys(password)
    driver.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
    wait(driver, EC.visibility_of_element_located((By.ID, "logout")))


def open_view(driver, base, view):
    """Loads the dashboard at `view` afresh (no view of the previous page still rendering)."""
    driver.get(f"{base}/#/{view}")
    driver.refresh()


def page_fetch(driver, method, path, body):
    """A fetch from inside the page, with its session cookie; answers the status."""
    return driver.execute_async_script(
        """const [method, path, body, done] = arguments;
        fetch(path, {method, credentials: 'same-origin', headers: {'content-type': 'application/json'},
                     body: body === null ? undefined : JSON.stringify(body)}).then((r) => done(r.status), () => done(0));""",
        method, path, body,
    )


def test_admin_creates_and_copies_a_key_a_viewer_cannot_and_the_audit_shows_both(site, browser):
    gateway, _, answers = site
    base = f"http://{gateway.address}"
    status, _ = call(gateway.address, "POST", "/api/admins", {"name": "olga", "password": ADMIN_PASSWORD, "role": "admin"})
    assert status == 201

    # An admin account creates a key in the dashboard and copies its secret.
    login(browser, gateway.address, ADMIN_PASSWORD, name="olga")
    browser.execute_cdp_cmd("Browser.grantPermissions", {
        "origin": base, "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]})
    open_view(browser, base, "keys")
    wait(browser, EC.element_to_be_clickable((By.ID, "new-key"))).click()
    form = wait(browser, EC.presence_of_element_located((By.ID, "key-form")))
    form.find_element(By.NAME, "name").send_keys("from-the-browser")
    form.find_element(By.NAME, "rpm").send_keys("60")
    form.find_element(By.NAME, "budget_cost").send_keys("5")
    browser.find_element(By.ID, "save-key").click()
    shown = wait(browser, EC.presence_of_element_located((By.ID, "new-secret"))).text
    assert shown.startswith("sk-sl-")
    SECRETS.add(shown)
    browser.find_element(By.ID, "copy-secret").click()
    wait(browser, EC.text_to_be_present_in_element((By.ID, "copy-secret"), "Copied"))
    copied = browser.execute_async_script(
        "const done = arguments[0]; navigator.clipboard.readText().then(done, (e) => done('error: ' + e));")
    assert copied == shown
    # The copied key works.
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=copied, max_retries=0)
    client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "copied"}])
    open_view(browser, base, "keys")
    row = wait(browser, EC.presence_of_element_located((By.XPATH, "//td[text()='from-the-browser']/..")))
    assert shown[:10] in row.text and shown not in browser.page_source, "listed by prefix only"
    assert browser.find_elements(By.CSS_SELECTOR, ".budget .bar")
    answers.append(browser.page_source)

    # The admin makes a viewer account in the dashboard.
    open_view(browser, base, "admins")
    form = wait(browser, EC.presence_of_element_located((By.ID, "admin-form")))
    form.find_element(By.NAME, "admin_name").send_keys("vic")
    form.find_element(By.NAME, "admin_password").send_keys(VIEWER_PASSWORD)
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait(browser, EC.presence_of_element_located((By.XPATH, "//td[text()='vic']")))
    assert VIEWER_PASSWORD not in browser.page_source

    # At 390 px the page does not overflow sideways (tables scroll in their box).
    browser.set_window_size(390, 844)
    open_view(browser, base, "keys")
    wait(browser, EC.presence_of_element_located((By.ID, "new-key")))
    width = browser.execute_script("return document.documentElement.scrollWidth")
    assert width <= 390, width
    browser.set_window_size(1400, 1000)

    # A viewer: no create button, and 403 from the API.
    login(browser, gateway.address, VIEWER_PASSWORD, name="vic")
    open_view(browser, base, "keys")
    wait(browser, EC.presence_of_element_located((By.XPATH, "//td[text()='from-the-browser']")))
    assert not browser.find_elements(By.ID, "new-key")
    assert not browser.find_elements(By.XPATH, "//button[text()='Revoke']")
    assert page_fetch(browser, "POST", "api/keys", {"name": "viewer-try"}) == 403
    assert page_fetch(browser, "PATCH", "api/keys/config:none", {"rpm": 1}) == 403

    # The audit log shows the admin's key and the viewer's account, to the viewer too.
    open_view(browser, base, "audit")
    table = wait(browser, EC.presence_of_element_located((By.ID, "audit")))
    text = table.text
    assert "key.create" in text and "admin:olga" in text
    assert "admin.create" in text and "admin:vic" in text
    answers.append(browser.page_source)
    for cookie in browser.get_cookies():
        SECRETS.add(cookie["value"])


def test_no_secret_is_in_any_output_of_the_run(site):
    gateway, directory, answers = site
    address = gateway.address
    # What an operator or a viewer can read back, after everything above.
    for path in ("/api/keys", "/api/teams", "/api/admins", "/api/audit", "/api/requests", "/api/stats",
                 "/v1/status", "/metrics", "/", "/assets/app.js", "/assets/manage.js"):
        status, body = call(address, "GET", path)
        assert status == 200, (path, body)
        answers.append(body if isinstance(body, str) else json.dumps(body))
    status, listing = call(address, "GET", "/api/requests?per_page=500")
    for row in listing["data"]:
        answers.append(json.dumps(call(address, "GET", f"/api/requests/{row['id']}")[1]))
    status, keys = call(address, "GET", "/api/keys")
    for key in keys["data"]:
        answers.append(json.dumps(call(address, "GET", f"/api/keys/{key['id']}")[1]))
    # A bad request's error echoes nothing secret either.
    secret = next(s for s in SECRETS if s.startswith("sk-sl-"))
    answers.append(json.dumps(call(address, "POST", "/api/keys", {"name": "x", secret: 1})[1]))
    time.sleep(0.5)
    outputs = {"log": "".join(gateway.log), "answers": "\n".join(answers)}
    for file in pathlib.Path(directory).iterdir():
        if file.is_file() and file.name != "sluice.yaml":  # the config is input, not output
            outputs[file.name] = file.read_bytes().decode("latin-1")
    assert any(name.startswith("sluice.db") for name in outputs)
    assert len(SECRETS) >= 8
    for name, text in outputs.items():
        for secret in SECRETS:
            assert secret not in text, f"a secret ({secret[:6]}…) appears in {name}"
            if secret.startswith("sk-sl-"):
                assert secret[6:] not in text, f"a key's random part appears in {name}"
