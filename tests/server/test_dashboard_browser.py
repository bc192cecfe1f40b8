"""The dashboard in a real browser: Debian's chromium, headless, driven by selenium through the
system chromedriver (nothing is downloaded). One server with 200 adapters and one browser
session serve the whole module; the tests run in file order, as an operator would click.

Every figure on the page is checked against the server's own API (`/v1/models`, `/metrics`,
the engine); screenshots go to $LORAPLEX_TEST_ARTIFACTS, else the pytest temporary folder."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from dashboard_fixtures import ADMIN_KEY, EVAL_LOSS, HTML_NAME, RUN_NAME, TENANT_KEY, DashboardEnv, dashboard_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="chromium and chromedriver are not installed; `apt-get install chromium chromium-driver` (as .ci/run does)",
)

ADAPTERS = 200  # alpha, beta, gamma, the HTML-named one and 196 more
PAGE_SIZE = 25
WAIT_S = 30
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1400,1800",
)
CHAT = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> DashboardEnv:
    with dashboard_server(tmp_path_factory.mktemp("dashboard_browser"), bulk_adapters=ADAPTERS - 4) as env:
        yield env


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    folder = os.environ.get("LORAPLEX_TEST_ARTIFACTS")
    path = Path(folder) / "dashboard" if folder else tmp_path_factory.mktemp("dashboard_screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def browser(env, tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium_profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.get(env.server.base_url + "/dashboard")
    yield driver
    driver.quit()


def wait_for(driver, condition, message: str):
    return WebDriverWait(driver, WAIT_S, poll_frequency=0.1, ignored_exceptions=[StaleElementReferenceException]).until(
        condition, message
    )


def screenshot(driver, artifacts: Path, name: str) -> None:
    path = artifacts / f"{name}.png"
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")


def text_of(driver, element_id: str) -> str:
    return driver.find_element(By.ID, element_id).text


def row_names(driver, table_id: str) -> list[str]:
    """Read in one script, so a re-render between two reads cannot mix two versions of a table."""
    return driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0])).map(row => row.dataset.name)",
        f"#{table_id} tbody tr[data-name]",
    )


def text_at(driver, css: str) -> str | None:
    return driver.execute_script("const node = document.querySelector(arguments[0]); return node && node.textContent", css)


def click(driver, css: str) -> None:
    """Click what `css` finds now; the page re-renders its tables every poll, so retry a click
    that lands on a row replaced in between."""
    def attempt(d):
        d.find_element(By.CSS_SELECTOR, css).click()
        return True

    wait_for(driver, attempt, f"could not click {css}")


def filter_adapters(driver, text: str) -> None:
    box = driver.find_element(By.ID, "adapter-filter")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.BACKSPACE)  # as a user types it: clear() would fire no input event
    if text:
        box.send_keys(text)


def use_key(driver, key: str) -> None:
    driver.find_element(By.ID, "key-input").send_keys(key)
    driver.find_element(By.ID, "key-use").click()


def severe_console_entries(driver) -> list[dict]:
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def test_page_asks_for_a_key_then_loads_with_no_console_errors(env, browser, artifacts):
    wait_for(browser, lambda d: "needs an API key" in text_of(d, "status"), "the page did not ask for a key")
    assert not browser.find_element(By.ID, "content").is_displayed()
    use_key(browser, ADMIN_KEY)
    wait_for(browser, lambda d: text_of(d, "adapters-page") == f"1–{PAGE_SIZE} of {ADAPTERS}", "the adapter table did not load")
    assert "ops (admin)" in text_of(browser, "viewer")
    screenshot(browser, artifacts, "01-admin-loaded")
    assert severe_console_entries(browser) == []


def test_adapter_table_pages_through_exactly_the_models_list(env, browser):
    with env.http() as client:
        models = [card["id"] for card in client.get("/v1/models").json()["data"] if card["id"] != "tiny"]
    seen: list[str] = []
    for page in range(-(-ADAPTERS // PAGE_SIZE)):
        first = page * PAGE_SIZE + 1
        last = min(first + PAGE_SIZE - 1, ADAPTERS)
        wait_for(browser, lambda d: text_of(d, "adapters-page") == f"{first}–{last} of {ADAPTERS}", f"page {page + 1} did not show")
        names = row_names(browser, "adapters-table")
        assert len(names) == last - first + 1
        seen += names
        if last < ADAPTERS:
            click(browser, "#page-next")
    assert sorted(seen) == sorted(models) and len(seen) == len(set(seen))
    assert not browser.find_element(By.ID, "page-next").is_enabled()


def test_a_name_made_of_html_renders_as_text(env, browser, artifacts):
    filter_adapters(browser, "onerror")
    wait_for(browser, lambda d: row_names(d, "adapters-table") == [HTML_NAME], "the HTML-named adapter did not show")
    assert text_at(browser, "#adapters-table tbody tr td.name") == HTML_NAME
    assert browser.find_elements(By.CSS_SELECTOR, "#adapters-table img") == []
    assert browser.execute_script("return window.__injected") is None
    screenshot(browser, artifacts, "02-html-name-as-text")


def test_traffic_panel_counts_equal_the_metrics_endpoint(env, browser, artifacts):
    with env.http() as client:
        for model, times in (("alpha", 3), ("beta", 2)):
            for _ in range(times):
                response = client.post("/v1/chat/completions", json={"model": model, "messages": CHAT, "max_tokens": 4})
                assert response.status_code == 200, response.text
        for user in range(4):
            response = client.post(
                "/v1/chat/completions", json={"model": "ab", "messages": CHAT, "max_tokens": 2, "user": f"user-{user}"}
            )
            assert response.status_code == 200, response.text
    requests = env.metric_totals("loraplex_requests_total", "adapter")
    tokens = env.metric_totals("loraplex_generation_tokens_total", "adapter")
    routed = env.metric_totals("loraplex_task_requests_total", "task", "adapter")
    assert requests["alpha"] + requests["beta"] == 3 + 2 + 4

    def shown(name: str, column: str) -> str | None:
        return text_at(browser, f'#traffic-adapters tr[data-name="{name}"] td.{column}')

    # A poll taken while the last request was running counts it but not yet its tokens: wait
    # for one that saw everything.
    for name in ("alpha", "beta"):
        wait_for(
            browser,
            lambda d: (shown(name, "requests"), shown(name, "tokens")) == (str(int(requests[name])), str(int(tokens[name]))),
            f"{name}'s request and token counts did not show",
        )
    for arm in ("alpha", "beta"):
        count = str(int(routed.get(("ab", arm), 0)))
        wait_for(
            browser,
            lambda d: (text_at(d, f'#tasks-table tr[data-name="ab"] div[data-arm="{arm}"]') or "").split(" ")[0] == count,
            f"the ab task's {arm} arm does not show {count} requests",
        )
    browser.execute_script("document.getElementById('traffic-panel').scrollIntoView()")
    screenshot(browser, artifacts, "03-traffic")


EXPERIMENT_READ = """
const block = document.querySelector(arguments[0]);
if (!block) return null;
const cells = (row) => Object.fromEntries(Array.from(row.cells).map((td) => [td.className, td.textContent]));
const rows = (css) => Array.from(block.querySelectorAll(css)).map(cells);
return {arms: rows("table.arms tbody tr"), comparisons: rows("table.comparisons tbody tr"),
        srm_p: block.querySelector(".srm-p").textContent, srm_flagged: block.querySelector(".srm-flag").dataset.flagged};
"""


def shown_number(text: str) -> float | None:
    return None if text == "–" else float(text)


def shown_interval(text: str) -> list[float] | None:
    return None if text == "–" else [float(bound) for bound in text.strip("[]").split(", ")]


def panel_matches_api(panel: dict | None, summary: dict) -> bool:
    """Every figure the panel shows equals the API's, to the four decimals it shows."""
    if panel is None:
        return False
    close = lambda shown, exact: (shown is None and exact is None) or (  # noqa: E731
        shown is not None and exact is not None and shown == pytest.approx(exact, rel=1e-3, abs=6e-5))
    arms = [{"name": a["name"], "adapter": a["adapter"], "assignments": str(a["assignments"]),
             "requests": str(a["requests"]), "errors": str(a["errors"]), "feedback": str(a["feedback_count"])}
            for a in summary["arms"]]
    if [{key: row[key] for key in arms[0]} for row in panel["arms"]] != arms:
        return False
    if not all(close(shown_number(row["reward-mean"]), a["reward_mean"]) for row, a in zip(panel["arms"], summary["arms"])):
        return False
    if [(row["arm"], row["vs"], row["metric"]) for row in panel["comparisons"]] != [
            (c["arm"], c["vs"], c["metric"]) for c in summary["comparisons"]]:
        return False
    for row, comparison in zip(panel["comparisons"], summary["comparisons"]):
        if not close(shown_number(row["diff"]), comparison["diff"]) or not close(shown_number(row["p-value"]), comparison["p_value"]):
            return False
        for column, key in (("ci95", "ci95"), ("always-valid", "always_valid_ci95")):
            shown, exact = shown_interval(row[column]), comparison[key]
            if not all(close(s, e) for s, e in zip(shown, exact)):
                return False
    return close(shown_number(panel["srm_p"]), summary["srm"]["p_value"]) and \
        panel["srm_flagged"] == str(summary["srm"]["flagged"]).lower()


def test_experiments_panel_shows_the_figures_of_the_experiments_api(env, browser, artifacts):
    body = {"task": "trial", "control": "a", "arms": [{"name": "a", "adapter": "alpha", "weight": 1.0},
                                                     {"name": "b", "adapter": "beta", "weight": 1.0}]}
    sent = {"a": 0, "b": 0}
    with env.http() as client:
        assert client.put("/v1/experiments/dash-exp", json=body).status_code == 200
        for i in range(12):  # 8 users, some twice, and no feedback for the last request: the columns differ
            response = client.post("/v1/chat/completions", headers={"X-Task-Id": "trial"},
                                   json={"model": "tiny", "messages": CHAT, "max_tokens": 2, "user": f"u{i % 8}"})
            assert response.status_code == 200, response.text
            if i == 11:
                break
            arm = response.headers["x-experiment-arm"]
            sent[arm] += 1
            reward = i % 3 + (0.7 if arm == "b" else 0.0)
            posted = client.post("/v1/feedback", json={"request_id": response.headers["x-request-id"], "reward": reward})
            assert posted.status_code == 200, posted.text
        assert sent["a"] >= 2 and sent["b"] >= 2  # enough on each side for a comparison with an interval

        def summary() -> dict:
            return client.get("/v1/experiments/dash-exp").json()

        wait_for(browser, lambda d: sum(arm["requests"] for arm in summary()["arms"]) == 12, "the outcomes were not recorded")
        expected = summary()
        (reward,) = expected["comparisons"]
        assert reward["metric"] == "reward" and reward["ci95"] is not None and reward["always_valid_ci95"] is not None
        css = '#experiments-list .experiment[data-name="dash-exp"]'
        wait_for(browser, lambda d: panel_matches_api(d.execute_script(EXPERIMENT_READ, css), expected),
                 "the experiments panel does not show the API's figures")
        browser.execute_script("document.getElementById('experiments-panel').scrollIntoView()")
        screenshot(browser, artifacts, "03-experiments")
        assert client.delete("/v1/experiments/dash-exp").status_code == 200
    wait_for(browser, lambda d: d.execute_script(EXPERIMENT_READ, css) is None, "the deleted experiment still shows")


def test_unload_from_the_page_removes_the_adapter_from_the_server(env, browser, artifacts):
    filter_adapters(browser, "gamma")
    wait_for(browser, lambda d: row_names(d, "adapters-table") == ["gamma"], "gamma did not show")
    click(browser, '#adapters-table tr[data-name="gamma"] button[data-action="unload"]')
    wait_for(browser, lambda d: d.find_element(By.ID, "confirm").is_displayed(), "no confirmation was asked")
    assert '"gamma"' in text_of(browser, "confirm-text")
    screenshot(browser, artifacts, "04-confirm-unload")
    click(browser, "#confirm-yes")
    wait_for(browser, lambda d: "removed" in text_of(d, "status"), "the unload did not report success")
    with env.http() as client:
        assert "gamma" not in {card["id"] for card in client.get("/v1/models").json()["data"]}
    wait_for(browser, lambda d: row_names(d, "adapters-table") == [], "the table still lists gamma")


def test_pin_from_the_page_pins_in_the_engine(env, browser):
    filter_adapters(browser, "beta")
    wait_for(browser, lambda d: row_names(d, "adapters-table") == ["beta"], "beta did not show")
    click(browser, '#adapters-table tr[data-name="beta"] button[data-action="pin"]')
    click(browser, "#confirm-yes")
    wait_for(browser, lambda d: "pinned" in text_of(d, "status"), "the pin did not report success")
    assert "beta" in env.server.state.engine.tiers.pinned_names()
    wait_for(browser, lambda d: text_at(d, '#adapters-table tr[data-name="beta"] td.pinned') == "pinned",
             "the table does not show beta pinned")


def test_load_from_the_page_adds_a_version_from_the_adapter_root(env, browser):
    filter_adapters(browser, "alpha")
    browser.find_element(By.ID, "load-name").send_keys("alpha")
    browser.find_element(By.ID, "load-path").send_keys("beta")  # relative to the adapter root
    click(browser, "#load-submit")
    wait_for(browser, lambda d: d.find_element(By.ID, "confirm").is_displayed(), "no confirmation was asked")
    click(browser, "#confirm-yes")
    wait_for(browser, lambda d: "replaced by version 2" in text_of(d, "status"), "the load did not report success")
    with env.http() as client:
        alpha = next(card for card in client.get("/v1/models").json()["data"] if card["id"] == "alpha")
    assert alpha["version"] == 2 and alpha["root"] == str((env.root / "beta").resolve())
    wait_for(browser, lambda d: text_at(d, '#adapters-table tr[data-name="alpha"] td.version') == "v2", "the table still shows v1")


def test_training_runs_panel_shows_the_logged_eval(env, browser, artifacts):
    run = f'#runs-list .run[data-name="{RUN_NAME}"]'
    text = wait_for(browser, lambda d: text_at(d, run), "the run did not show")
    for task, loss in EVAL_LOSS.items():
        assert task in text and f"{loss:.4f}" in text
    curves = browser.execute_script("return document.querySelectorAll(arguments[0]).length", run + " svg.curve polyline")
    assert curves == 3  # the total loss and the two tasks'
    browser.execute_script("document.getElementById('runs-panel').scrollIntoView()")
    screenshot(browser, artifacts, "05-training-runs")


def test_tenant_key_sees_only_its_own_adapter_and_cannot_write(env, browser, artifacts):
    filter_adapters(browser, "")
    browser.find_element(By.ID, "key-forget").click()
    wait_for(browser, lambda d: "needs an API key" in text_of(d, "status"), "forgetting the key did not lock the page")
    use_key(browser, TENANT_KEY)
    wait_for(browser, lambda d: "team-a" in text_of(d, "viewer"), "the tenant's view did not load")
    wait_for(browser, lambda d: row_names(d, "adapters-table") == ["alpha"], "the tenant sees other adapters")
    assert row_names(browser, "traffic-adapters") == ["alpha"]
    assert row_names(browser, "tasks-table") == ["summarize"]
    assert browser.find_elements(By.CSS_SELECTOR, "#adapters-table button") == []
    assert not browser.find_element(By.ID, "load-form").is_displayed()
    wait_for(browser, lambda d: "admin keys" in text_of(d, "runs-note"), "the runs panel did not say it is for admins")
    assert "admin keys" in text_of(browser, "experiments-note")
    screenshot(browser, artifacts, "06-tenant-view")
    status = browser.execute_async_script(
        """const done = arguments[arguments.length - 1];
        fetch('/v1/unload_lora_adapter', {method: 'POST', headers: {'Content-Type': 'application/json',
          Authorization: 'Bearer ' + sessionStorage.getItem('loraplex-dashboard-key')},
          body: JSON.stringify({lora_name: 'alpha'})}).then(r => done(r.status));"""
    )
    assert status == 403
    with env.http() as client:
        assert "alpha" in {card["id"] for card in client.get("/v1/models").json()["data"]}
