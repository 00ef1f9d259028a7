"""The OpenAI SDK through a model fallback and the response cache (issue 17)."""

import time

import openai

from conftest import Mock, start_gateway


def sdk(gateway):
    return openai.OpenAI(base_url=f"http://{gateway.address}/v1", api_key="sk-anything", max_retries=0)


def test_a_fallback_model_answers_when_the_first_fails(tmp_path_factory):
    """gpt-4o's only upstream answers 500: gpt-4o-mini's answers, and says so."""
    big = Mock(["mock-upstream", "--listen", "127.0.0.1:0", "--record", "--fault", "500", "--name", "big"])
    small = Mock(["mock-upstream", "--listen", "127.0.0.1:0", "--record", "--name", "small"])
    config = f"""
routing: {{retries: 0, fallbacks: {{gpt-4o: [gpt-4o-mini]}}}}
upstreams:
  - {{name: big, base_url: 'http://{big.address}', models: [gpt-4o]}}
  - {{name: small, base_url: 'http://{small.address}', models: [gpt-4o-mini]}}
"""
    gateway = start_gateway(tmp_path_factory.mktemp("fallback"), config)
    try:
        raw = sdk(gateway).chat.completions.with_raw_response.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
        )
        assert raw.headers["x-sluice-model"] == "gpt-4o-mini"
        assert raw.headers["x-sluice-upstream"] == "small"
        reply = raw.parse()
        assert reply.model == "gpt-4o-mini"
        assert reply.choices[0].message.content
        assert len(big.requests()) == 1
        assert '"model":"gpt-4o-mini"' in small.last()["body"]
    finally:
        gateway.stop()
        big.stop()
        small.stop()


def test_a_cached_stream_replays_the_same_chunks(tmp_path_factory):
    upstream = Mock(["mock-upstream", "--listen", "127.0.0.1:0", "--record", "--name", "up"])
    config = f"""
upstreams:
  - {{name: up, base_url: 'http://{upstream.address}'}}
cache: {{enabled: true, ttl: 1m}}
"""
    gateway = start_gateway(tmp_path_factory.mktemp("cache"), config)
    try:
        client = sdk(gateway)

        def ask(headers=None):
            raw = client.chat.completions.with_raw_response.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": "cache me"}],
                temperature=0,
                stream=True,
                extra_headers=headers,
            )
            return raw.headers["x-sluice-cache"], [chunk.model_dump() for chunk in raw.parse()]

        state, first = ask()
        assert state == "miss"
        # The answer is stored off the hot path, just after it ended; until then a repeat
        # is a miss (kept out of the cache with no-store, so the first answer stays).
        misses = 1
        for _ in range(100):
            state, again = ask({"Cache-Control": "no-store"})
            if state == "hit":
                break
            misses += 1
            time.sleep(0.02)
        assert state == "hit"
        assert again == first, "the same chunks, ids included"
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in again if c["choices"])
        assert text == "".join(f"word{i} " for i in range(8))
        assert len(upstream.requests()) == misses
    finally:
        gateway.stop()
        upstream.stop()


def test_the_dashboard_shows_the_cache_hit_rate_and_saved_cost(tmp_path_factory):
    """Two asks of one question: one miss, one hit; the overview shows 50% and the saving."""
    import shutil
    import tempfile

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    from conftest import admin_get

    admin_key = "adm-e2e-cache-secret-0001"
    upstream = Mock(["mock-upstream", "--listen", "127.0.0.1:0", "--record", "--name", "up"])
    config = f"""
upstreams:
  - {{name: up, base_url: 'http://{upstream.address}'}}
cache: {{enabled: true, ttl: 1m}}
admin: {{key: {admin_key}}}
pricing: {{gpt-4o: {{input: 2.5, output: 10}}}}
"""
    gateway = start_gateway(tmp_path_factory.mktemp("cache-dashboard"), config)
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    profile = tempfile.mkdtemp(prefix="sluice-chrome-")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = None
    try:
        client = sdk(gateway)
        ask = dict(model="gpt-4o", messages=[{"role": "user", "content": "dashboard"}], temperature=0)
        assert client.chat.completions.with_raw_response.create(**ask).headers["x-sluice-cache"] == "miss"
        for _ in range(100):
            if client.chat.completions.with_raw_response.create(
                **ask, extra_headers={"Cache-Control": "no-store"}
            ).headers["x-sluice-cache"] == "hit":
                break
            time.sleep(0.02)
        for _ in range(200):
            totals = admin_get(gateway.address, "/api/stats", admin_key)["totals"]
            if totals["cache_hits"] == 1:
                break
            time.sleep(0.05)
        assert totals["cache_hits"] == 1 and totals["saved_cost"] > 0
        driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"))
        driver.get(f"http://{gateway.address}/")
        field = WebDriverWait(driver, 10).until(EC.presence_of_element_located((By.NAME, "key")))
        field.send_keys(admin_key)
        driver.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
        rate = WebDriverWait(driver, 10).until(
            EC.presence_of_element_located((By.CSS_SELECTOR, "[data-stat=cache_hit_rate] .value"))
        )
        expected = f"{totals['cache_hits'] / totals['cache_lookups'] * 100:.1f}%"
        assert rate.text == expected
        saved = driver.find_element(By.CSS_SELECTOR, "[data-stat=saved_cost] .value").text
        assert saved.startswith("$") and float(saved[1:]) > 0
        rows = admin_get(gateway.address, "/api/requests", admin_key)["data"]
        hit = next(r for r in rows if r["cache"] == "hit")
        driver.get(f"http://{gateway.address}/#/requests/{hit['id']}")
        cell = WebDriverWait(driver, 10).until(EC.presence_of_element_located((By.ID, "cache")))
        assert cell.text == f"hit, saved {saved}"
    finally:
        if driver is not None:
            driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
        gateway.stop()
        upstream.stop()
