"""Two visitors in two browser contexts (separate storage, as two strangers' browsers): each controls only their own
training job, the other sees the public summary, and a reload keeps control."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app import AppConfig
from app_support.owners import owner_of_login

pytestmark = pytest.mark.filterwarnings("ignore:.*no_silent_downcasting.*", "ignore:The copy keyword is deprecated.*")

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")

TIMEOUT_MS = 90_000


@pytest.fixture(scope="module")
def app_url(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, launched_app) -> Iterator[str]:
    root = tmp_path_factory.mktemp("sharing-browser")
    config = AppConfig(model=str(tiny_model_dir), models_dir=root / "models", runs_dir=root / "runs")
    with launched_app(config) as (_, url):
        yield url


@pytest.fixture(scope="module")
def browser(chromium_executable: str) -> Iterator[object]:
    with sync_api.sync_playwright() as playwright:
        # --no-sandbox: CI containers run as root, where Chromium's sandbox cannot start.
        browser = playwright.chromium.launch(executable_path=chromium_executable, args=["--no-sandbox"])
        yield browser
        browser.close()


def visitor_page(browser, url: str):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    page.wait_for_selector("#model-info :text('classes')")  # loaded, the visitor's token issued
    page.get_by_role("tab", name="Fine-tune").click()
    return context, page


def choose(page, dropdown_id: str, option: str) -> None:
    page.locator(f"#{dropdown_id} input").click()
    page.get_by_role("option", name=option).first.click()


def status(page) -> str:
    return page.locator("#finetune-status-text").inner_text()


def test_two_visitors_each_control_only_their_own_job(browser, app_url: str):
    context_a, a = visitor_page(browser, app_url)
    context_b, b = visitor_page(browser, app_url)
    try:
        for slider, value in (("shapes-train", "16"), ("shapes-validation", "4")):
            a.locator(f"#{slider} input[type=number]").fill(value)
            a.keyboard.press("Enter")
        choose(a, "shapes-size", "128")
        choose(a, "base-model", "tiny preset")
        a.locator("#epochs input").fill("200")  # far more than it will run: Stop must end it
        a.locator("#finetune-start").click()
        a.wait_for_function(
            "() => { const s = document.querySelector('#finetune-status-text');"
            " return s && s.innerText.includes('your run') && /step [2-9]/.test(s.innerText); }"
        )
        run = re.search(r"your run (\S+)", status(a)).group(1)

        # B sees that someone trains, not whose run, and B's Stop does not touch it.
        b.wait_for_selector('#finetune-status-text:has-text("another visitor\'s job")')
        b.locator("#finetune-stop").click()
        b.wait_for_function(
            "() => document.querySelector('#finetune-notice textarea').value.includes('no job running')"
        )
        assert run not in b.locator("body").inner_text()
        a.wait_for_timeout(2500)  # two polls
        assert "running" in status(a)

        # A reloads: the page finds A's job and A's Stop stops it.
        a.reload()
        a.get_by_role("tab", name="Fine-tune").click()
        a.wait_for_selector(f"#finetune-status-text:has-text('your run {run}')")
        a.locator("#finetune-stop").click()
        a.wait_for_selector("#finetune-status-text:has-text('stopped')")
        b.wait_for_selector("#finetune-status-text:has-text('No training job is running')")
        assert run not in b.locator("body").inner_text()  # nor is it among B's stopped runs
    finally:
        context_a.close()
        context_b.close()


def mocked_login(username: str) -> dict:
    """What Gradio's local stand-in for HF OAuth stores in the session (it would ask the Hub who we are)."""
    userinfo = {"name": username.title(), "preferred_username": username, "profile": "", "picture": ""}
    return {
        "access_token": "mock-token",
        "scope": "openid profile",
        "expires_at": time.time() + 3600,
        "userinfo": userinfo,
    }


def test_a_signed_in_visitor_owns_jobs_by_login_in_any_browser(
    browser, tmp_path: Path, tiny_model_dir: Path, launched_app, monkeypatch: pytest.MonkeyPatch
):
    import gradio.oauth

    monkeypatch.setattr(gradio.oauth, "_get_mocked_oauth_info", lambda: mocked_login("tester"))
    config = AppConfig(
        model=str(tiny_model_dir), models_dir=tmp_path / "models", runs_dir=tmp_path / "runs", login=True
    )
    with launched_app(config) as (_, url):
        pages = []
        for _ in range(2):  # two browsers of the same person: separate storage, one login
            context, page = visitor_page(browser, url)
            page.get_by_role("button", name="Sign in with Hugging Face").click()
            page.wait_for_selector("text=Logout (tester)")
            page.get_by_role("tab", name="Fine-tune").click()
            pages.append((context, page))
        (context_a, a), (context_b, b) = pages
        try:
            choose(a, "base-model", "tiny preset")
            a.locator("#epochs input").fill("200")
            a.locator("#finetune-start").click()
            a.wait_for_selector("#finetune-status-text:has-text('your run')")
            run = re.search(r"your run (\S+)", status(a)).group(1)
            assert list((tmp_path / "runs").glob(f"{owner_of_login('tester').key}/{run}"))  # filed under the login
            b.wait_for_selector(f"#finetune-status-text:has-text('your run {run}')")
            b.locator("#finetune-stop").click()
            a.wait_for_selector("#finetune-status-text:has-text('stopped')")
        finally:
            context_a.close()
            context_b.close()


def test_in_slices_mode_the_page_trains_its_job_slice_by_slice(
    browser, tmp_path: Path, tiny_model_dir: Path, launched_app
):
    config = AppConfig(
        model=str(tiny_model_dir), models_dir=tmp_path / "models", runs_dir=tmp_path / "runs", training="slices"
    )
    with launched_app(config) as (_, url):
        context, page = visitor_page(browser, url)
        try:
            choose(page, "base-model", "tiny preset")
            page.locator("#epochs input").fill("1")
            page.locator("#max-steps input").fill("30")
            page.locator("#finetune-start").click()
            page.wait_for_selector("#finetune-status-text:has-text('finished')")
            assert "GPU slices" in status(page) and "daily GPU quota used" in status(page)
            # The driving event reported each slice, then the end.
            page.wait_for_function(
                "() => document.querySelector('#finetune-notice textarea').value.includes('finished')"
            )
        finally:
            context.close()
