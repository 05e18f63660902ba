"""The front page in a real headless Chromium (Debian's, driven by Playwright): a chat that streams
answers over /v1/ws, keeps the conversation, shows TTFT / tok/s / cached tokens, and stops on demand.

Needs /usr/bin/chromium (`make browser` installs it as root); skipped without it. Playwright never
downloads a browser here: it launches that executable."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import expect, sync_playwright

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOT = Path("/tmp/kvserve-front.png")   # for a human to look at after the run
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
STATS = re.compile(r"TTFT (\d+) ms · (\d+) tokens · ([\d.]+) tok/s · (\d+) cached tokens of (\d+)")
TIMEOUT_MS = 20_000

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make browser)")


def test_front_page_streams_answers(tiny_server, tmp_path):
    base_url, _ = tiny_server
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 960, "height": 760})
            problems: list[str] = []
            page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
            page.on("console", lambda m: problems.append(f"console: {m.text}") if m.type == "error" else None)
            page.goto(f"{base_url}/")
            expect(page.locator("#status")).to_have_text("connected", timeout=TIMEOUT_MS)
            expect(page.locator("#model option")).to_have_text(["tiny"])
            page.fill("#max-tokens", "40")
            page.fill("#temperature", "0")

            # 1. an answer streams in (several DOM updates), and its stats line fills in
            first = ask(page, "Hello, who are you?", answer_index=0)
            expected = httpx.post(f"{base_url}/v1/chat/completions", timeout=30, json={
                "model": "tiny", "messages": [{"role": "user", "content": "Hello, who are you?"}],
                "max_tokens": 40, "temperature": 0}).json()
            assert first["text"] == expected["choices"][0]["message"]["content"]
            assert first["updates"] >= 2, "the answer arrived in one piece, not streamed"
            assert first["completion_tokens"] == expected["usage"]["completion_tokens"]

            # 2. the conversation is kept: the second prompt holds the first exchange, whose
            #    prompt blocks the prefix cache now serves
            second = ask(page, "And what can you do?", answer_index=1)
            assert second["prompt_tokens"] > first["prompt_tokens"] + len("And what can you do?")
            assert second["cached_tokens"] >= 16

            # 3. Stop cancels a long answer mid-stream
            page.fill("#max-tokens", "3000")
            page.fill("#prompt", "Tell me a very long story.")
            page.click("#send")
            third = page.locator(".assistant").nth(2)
            expect(third.locator(".content")).not_to_have_text("", timeout=TIMEOUT_MS)
            page.click("#stop")
            expect(third.locator(".stats")).to_contain_text("stopped", timeout=TIMEOUT_MS)
            expect(page.locator("#send")).to_be_enabled()
            expect(page.locator("#stop")).to_be_disabled()

            page.screenshot(path=str(tmp_path / "front.png"))
            page.screenshot(path=str(SCREENSHOT))
            assert problems == []
        finally:
            browser.close()


def ask(page, prompt: str, answer_index: int) -> dict:
    """Type a prompt, send it, wait for the answer's stats; → its text, DOM update count and usage."""
    page.fill("#prompt", prompt)
    page.evaluate("""() => {   // count the text updates of the next assistant bubble
        window.updates = 0;
        new MutationObserver((records) => {
            for (const r of records) for (const n of r.addedNodes)
                if (n.classList?.contains("assistant"))
                    new MutationObserver(() => { window.updates += 1; })
                        .observe(n.querySelector(".content"), {childList: true, characterData: true, subtree: true});
        }).observe(document.getElementById("messages"), {childList: true});
    }""")
    page.click("#send")
    bubble = page.locator(".assistant").nth(answer_index)
    expect(bubble.locator(".stats")).to_have_text(STATS, timeout=TIMEOUT_MS)
    expect(page.locator("#send")).to_be_enabled()
    text = bubble.locator(".content").text_content()
    assert text, "the assistant bubble stayed empty"
    ttft_ms, completion_tokens, per_second, cached_tokens, prompt_tokens = STATS.search(
        bubble.locator(".stats").text_content()).groups()
    assert float(per_second) > 0
    return {"text": text, "updates": page.evaluate("window.updates"), "ttft_ms": int(ttft_ms),
            "completion_tokens": int(completion_tokens), "cached_tokens": int(cached_tokens),
            "prompt_tokens": int(prompt_tokens)}
