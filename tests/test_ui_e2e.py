"""The web app in a real browser (Playwright driving Debian's chromium): a bad upload is refused with its specific
error and registers nothing; then upload a file, train a few steps on tiny-moe, find the new version in the
Registry tab, compare it with the base (two panes of text and a metrics table), and reload the page.

Screenshots are saved under test-artifacts/ui-e2e/ (git-ignored). Skipped only when /usr/bin/chromium is absent
(`.ci/run` installs it).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

try:
    from test_ui_api import REPO, serve_app, write_bad, write_jsonl
except ImportError:  # run from the repository root as a package
    from tests.test_ui_api import REPO, serve_app, write_bad, write_jsonl

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = REPO / "test-artifacts" / "ui-e2e"

pytestmark = [
    pytest.mark.skipif(not Path(CHROMIUM).exists(),
                       reason=f"{CHROMIUM} is absent: install Debian's chromium (`apt-get install chromium`) to run "
                              "the browser test"),
    pytest.mark.timeout(600),
    pytest.mark.slow,
]


@pytest.fixture
def browser_page():
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(30_000)
        try:
            yield page
        except BaseException:
            page.screenshot(path=str(ARTIFACTS / "failure.png"), full_page=True)
            raise
        finally:
            browser.close()


def shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_upload_train_registry_compare_in_a_browser(tmp_path, browser_page):
    from playwright.sync_api import expect

    from studio.data import DatasetRegistry
    from studio.registry import AdapterRegistry
    from studio.ui.jobs import JobManager

    page = browser_page
    bad = write_bad(tmp_path / "broken.jsonl")
    good = write_jsonl(tmp_path / "contracts.jsonl", 16)
    with serve_app(tmp_path) as (url, _):
        page.goto(url)
        expect(page.locator("#train-plan-summary")).to_contain_text("QLoRA 4-bit")  # the plan loaded

        # ---- a bad upload: the specific error in the page, nothing registered, the app keeps working
        page.get_by_label("Upload a file").check()
        page.locator("#train-file input[type=file]").set_input_files(str(bad))
        info = page.locator("#train-data-info")
        expect(info).to_contain_text("This file cannot be used")
        expect(info).to_contain_text("broken.jsonl: line 2")
        page.locator("#train-start").click()
        toast = page.locator(".toast-body").filter(has_text="broken.jsonl: line 2")
        expect(toast).to_be_visible()
        expect(toast).to_contain_text("invalid JSON")
        shot(page, "01-bad-upload")
        shipped = {"law", "medicine", "code"}  # samples register themselves when first previewed
        assert {v.name for v in DatasetRegistry(tmp_path / "datasets").list()} <= shipped
        assert JobManager(tmp_path / "jobs").list() == []
        page.locator(".toast-body button, .toast-close").first.click()

        # ---- upload a good file and train a few steps
        page.locator("#train-file button[aria-label='Clear']").click()
        page.locator("#train-file input[type=file]").set_input_files(str(good))
        expect(info).to_contain_text("Detected format:")
        expect(info).to_contain_text("alpaca")
        expect(page.locator("#train-preview")).to_contain_text("Term 0 is a rule of contract law.")
        expect(page.locator("#train-name input, #train-name textarea").first).to_have_value("contracts")
        steps = page.locator("#train-steps input")
        steps.fill("8")
        steps.press("Tab")
        page.locator("#train-start").click()
        expect(page.locator("#train-start-status")).to_contain_text("started", timeout=30_000)
        result = page.locator("#train-result")
        expect(result).to_contain_text("Registered contracts@v1", timeout=240_000)
        expect(page.locator("#train-progress")).to_contain_text("step 8/8")
        expect(page.locator("#train-job-facts")).to_contain_text("done")
        page_height = page.evaluate("() => document.documentElement.scrollHeight")
        assert page_height < 4000, f"the Train tab grew to {page_height}px"  # an empty live plot once did
        shot(page, "02-trained")

        # ---- the new version in the Registry tab, with its lineage
        page.get_by_role("tab", name="Registry").click()
        table = page.locator("#registry-table")
        expect(table).to_contain_text("contracts@v1")
        table.get_by_text("contracts@v1", exact=True).filter(visible=True).first.click()
        details = page.locator("#registry-details")
        expect(details).to_contain_text("contracts@v1")
        expect(details).to_contain_text("tiny-moe")
        expect(details).to_contain_text("eval_loss")
        shot(page, "03-registry")

        # ---- Compare: the base and that adapter side by side, then the metrics
        page.get_by_role("tab", name="Train").click()
        page.locator("#train-to-compare").click()
        expect(page.locator("#compare-adapters")).to_contain_text("contracts@v1")
        expect(page.locator("#compare-base input")).to_be_checked()
        page.locator("#compare-run").click()
        expect(page.locator("#compare-status")).to_contain_text("2 models", timeout=120_000)
        panes = [page.locator(f"#compare-pane-{k}") for k in range(5)]
        expect(panes[0]).to_be_visible()
        expect(panes[1]).to_be_visible()
        for k in (2, 3, 4):
            expect(panes[k]).to_be_hidden()
        expect(panes[0]).to_contain_text("base (tiny-moe)")
        expect(panes[1]).to_contain_text("contracts@v1")
        texts = [panes[k].locator("textarea").input_value() for k in (0, 1)]
        assert all(t.startswith("[1] ") and len(t) > 8 for t in texts), texts
        metrics = page.locator("#compare-metrics")
        expect(metrics).to_contain_text("contracts@v1", timeout=180_000)
        expect(metrics).to_contain_text("held-out loss")
        expect(metrics.get_by_role("row")).to_have_count(3)  # the header, the base, the adapter
        expect(page.locator("#compare-verdict")).to_contain_text("contracts@v1")
        expect(page.locator("#compare-loss-plot img")).to_be_visible()  # the eval module's held-out loss figure
        shot(page, "04-compare")

        # ---- the job and its result survive a page reload
        page.reload()
        expect(page.locator("#train-result")).to_contain_text("Registered contracts@v1")
        expect(page.locator("#train-job-id input, #train-job-id textarea").first).to_have_value(
            JobManager(tmp_path / "jobs").list()[0].id)
        page.get_by_role("tab", name="Jobs").click()
        expect(page.locator("#jobs-table")).to_contain_text("contracts@v1")
        shot(page, "05-after-reload-jobs")

    # exactly one dataset and one adapter version were registered, with the eval results recorded
    assert [v.ref for v in DatasetRegistry(tmp_path / "datasets").list() if v.name not in shipped] == \
        ["contracts@v1"]
    versions = AdapterRegistry(tmp_path / "adapters").list()
    assert [v.ref for v in versions] == ["contracts@v1"]
    assert any(e["source"] == "eval" for e in versions[0].metrics_history), json.dumps(versions[0].metrics_history)
