"""The web UI in a real headless browser (Debian's chromium driven by Playwright) against
real daemons: log in through the printed URL, see the share, make a code and its QR code,
attach with it in a second daemon's page and watch its progress bar move."""

from __future__ import annotations

import io
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from tests.daemons import REPO_ROOT, wait_same_trees

pytestmark = pytest.mark.slow

CHROMIUM = next((path for path in (shutil.which("chromium"), shutil.which("chromium-browser"),
                                   "/usr/bin/chromium") if path and os.path.exists(path)), None)
#: The screenshot the README shows, taken by this test (written there only with
#: CLEARSKIES_SCREENSHOT=1 in the environment, so a test run leaves the checkout alone).
SCREENSHOT = REPO_ROOT / "docs" / "web-ui.png"


@pytest.fixture
def browser() -> Any:
    if CHROMIUM is None:
        pytest.skip("needs Debian's chromium (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright package")
    with sync_api.sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                                 args=["--no-sandbox"])
        except Exception as e:  # a chromium that cannot start here
            pytest.skip("chromium does not start: %s" % str(e).splitlines()[0])
        try:
            yield browser
        finally:
            browser.close()


def test_log_in_see_a_share_make_a_code_and_watch_a_peer_attach(
        browser: Any, daemon_factory: Any, tmp_path: Path) -> None:
    alice = daemon_factory("alice")
    for n in range(10):
        (alice.shares / ("photo-%02d.jpg" % n)).write_bytes(os.urandom(100_000))
    # One big file: the progress bar must move within it, not only between files.
    (alice.shares / "video.mkv").write_bytes(os.urandom(3_000_000))
    alice.cli_json("share", str(alice.shares))
    page = browser.new_page(viewport={"width": 1000, "height": 900})
    # Without logging in: told how, shown nothing.
    page.goto(alice.cli_json("web")["url"].split("/login")[0] + "/")
    page.get_by_text("Not logged in").wait_for()
    assert str(alice.shares) not in page.content()
    # The printed URL logs in; the share appears.
    url = alice.cli_json("web")["url"]
    page.goto(url)
    assert "token" not in page.url
    share = page.locator("#shares li", has_text=str(alice.shares))
    share.wait_for()
    page.get_by_text("11 files").wait_for(timeout=20_000)
    # The login link was used up.
    other = browser.new_page()
    other.goto(url)
    assert "used already" in other.content()
    other.close()
    # A code, as text and as a QR code.
    share.get_by_role("button", name="Code (read and write)").click()
    code = page.locator("#code-text")
    code.wait_for()
    page.locator("#code-qr").wait_for(state="visible")
    text = code.inner_text()
    assert text.startswith("SYNC")
    assert page.locator("#code-qr").get_attribute("alt").endswith(text)
    # Bob attaches with it in his own browser, downloading at 1 MiB/s: his progress bar
    # moves without a reload, and alice's page shows the peer live.
    bob = daemon_factory("bob")
    bob.cli("config", "set", "download_limit", "1M")
    target = Path(bob.shares) / "from-alice"
    bob_page = browser.new_page()
    bob_page.goto(bob.cli_json("web")["url"])
    bob_page.get_by_label("Access code").fill(text)
    bob_page.get_by_label("Into folder (absolute path)").fill(str(target))
    bob_page.get_by_label("Peer address", exact=False).fill(alice.address)
    bob_page.get_by_label("Peer address", exact=False).press("Enter")
    bar = bob_page.locator("#shares progress")
    bar.wait_for(timeout=30_000)
    values = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        now = bob_page.evaluate(
            "() => Array.from(document.querySelectorAll('#shares progress'), p => p.value)")
        if not now:
            break  # done: the bar is gone
        values.append(now[0])
        time.sleep(0.3)
    assert len(set(values)) >= 2 and values == sorted(values), values
    bob_page.locator("#shares li .state", has_text="in sync").wait_for(timeout=60_000)
    page.locator("#events li", has_text="peer connected").first.wait_for(timeout=30_000)
    wait_same_trees(alice.shares, target, timeout=60)
    bob_page.close()
    page.locator("#shares li", has_text="peers connected").first.wait_for()
    page.get_by_role("button", name="Peers").click()
    page.locator(".peers li", has_text="bob").wait_for(timeout=20_000)
    shot = SCREENSHOT if os.environ.get("CLEARSKIES_SCREENSHOT") == "1" else \
        tmp_path / "web-ui.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    # Keyboard: every control can be reached with Tab and has a label.
    for field in ("share-path", "share-mode", "attach-code", "attach-path", "attach-peer"):
        assert page.locator("label[for=%s]" % field).count() == 1
    # On a phone's screen nothing sticks out sideways.
    page.set_viewport_size({"width": 360, "height": 740})
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 360
    # Keyboard only: Tab reaches the first code button, Enter presses it.
    page.locator("#pause").focus()
    for _ in range(10):
        page.keyboard.press("Tab")
        if page.evaluate("() => document.activeElement.textContent") == "Code (read only)":
            break
    page.keyboard.press("Enter")
    page.locator("#code-qr").wait_for(state="visible")
    page.set_viewport_size({"width": 1000, "height": 900})
    # Pause and resume from the header.
    page.get_by_role("button", name="Pause").click()
    page.get_by_role("button", name="Resume").wait_for()
    assert alice.cli_json("status")["paused"] is True
    page.get_by_role("button", name="Resume").click()
    page.get_by_role("button", name="Pause").wait_for()
    assert alice.cli_json("status")["paused"] is False


def test_resolve_a_real_conflict_in_the_browser(browser: Any, daemon_factory: Any) -> None:
    """Both sides edit a file while apart; the conflicts view shows both versions and
    "Keep the other" puts the copy's content in place, on both machines."""
    alice, bob = daemon_factory("alice"), daemon_factory("bob")
    a, b = Path(alice.shares), Path(bob.shares)
    (a / "notes.txt").write_text("original\n")
    code = alice.cli_json("share", str(a))["access_code"]
    bob.cli("attach", code, str(b), "--peer", alice.address, "--wait")
    bob.stop()
    (a / "notes.txt").write_text("alice's version\n")
    alice.cli("scan", str(a))
    (b / "notes.txt").write_text("bob's version, a bit longer\n")
    bob.start()
    bob.cli("scan", str(b))
    page = browser.new_page(viewport={"width": 1000, "height": 900})
    page.goto(alice.cli_json("web")["url"])
    item = page.locator("#conflicts li", has_text="notes.txt")
    item.wait_for(timeout=60_000)
    assert "The other: notes.CONFLICT." in item.inner_text()
    copy = item.get_attribute("data-conflict")
    other = (a / copy).read_bytes()
    page.locator("#changes li", has_text="conflict").first.wait_for(timeout=20_000)
    if os.environ.get("CLEARSKIES_SCREENSHOT") == "1":
        top = page.locator("section", has=page.locator("#conflicts-title")).bounding_box()
        end = page.locator("section", has=page.locator("#changes-title")).bounding_box()
        page.screenshot(path=str(SCREENSHOT.with_name("web-ui-conflicts.png")), full_page=True,
                        clip={"x": 0, "y": top["y"] - 8, "width": 1000,
                              "height": end["y"] + end["height"] - top["y"] + 16})
    item.get_by_role("button", name="Keep the other").click()
    page.locator("#conflicts li").first.wait_for(state="detached", timeout=20_000)
    page.locator("#no-conflicts").wait_for(state="visible")
    assert (a / "notes.txt").read_bytes() == other and not (a / copy).exists()
    wait_same_trees(a, b, timeout=60)
    assert (b / "notes.txt").read_bytes() == other


def sunset() -> bytes:
    """A photo-like JPEG: a sky from orange to violet, a sun, the sea."""
    from PIL import Image, ImageDraw
    image = Image.new("RGB", (900, 600))
    draw = ImageDraw.Draw(image)
    for y in range(600):
        t = y / 420
        draw.line([(0, y), (900, y)], fill=(int(250 - 120 * t), int(160 - 110 * t),
                                             int(60 + 100 * t)) if y < 420
                  else (20, 40 + (y - 420) // 6, 90 + (y - 420) // 4))
    draw.ellipse((380, 300, 520, 440), fill=(255, 220, 120))
    draw.rectangle((0, 420, 900, 600), fill=(25, 50, 110))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


def test_browse_a_share_and_see_thumbnails_made_here_and_by_a_peer(
        browser: Any, daemon_factory: Any) -> None:
    """Alice's page browses her share's folders and shows the thumbnail of a photo; Bob,
    attached and still downloading, sees the photo he does not have yet with a thumbnail
    his daemon asked of Alice's (protocol/thumbnails.md).  Both with the keyboard, on a
    phone's screen."""
    from tests.test_thumbnails import image_bytes
    alice, bob = daemon_factory("alice"), daemon_factory("bob")
    a = Path(alice.shares)
    (a / "a-filler").mkdir()
    for n in range(48):
        (a / "a-filler" / ("part-%02d.bin" % n)).write_bytes(os.urandom(256 * 1024))
    (a / "z-photos").mkdir()
    (a / "z-photos" / "sunset.jpg").write_bytes(sunset())
    (a / "z-photos" / "tiles.png").write_bytes(image_bytes("PNG", (300, 300)))
    (a / "z-photos" / "notes.txt").write_text("no thumbnail for me\n")
    code = alice.cli_json("share", str(a))["access_code"]
    page = browser.new_page(viewport={"width": 1000, "height": 900})
    page.goto(alice.cli_json("web")["url"])
    share = page.locator("#shares li", has_text=str(a))
    share.get_by_text("51 files").wait_for(timeout=30_000)
    share.get_by_role("button", name="Files").click()
    page.get_by_role("button", name="Open folder z-photos").click()
    photo = page.locator("#entries li", has_text="sunset.jpg").locator("img")
    photo.wait_for(timeout=20_000)
    page.wait_for_function("(img) => img.complete && img.naturalWidth > 0", arg=photo
                           .element_handle(), timeout=20_000)
    assert photo.evaluate("(img) => img.naturalWidth") == 256
    assert photo.get_attribute("alt") == "Thumbnail of sunset.jpg"
    assert page.locator("#entries li", has_text="notes.txt").locator("img").count() == 0
    if os.environ.get("CLEARSKIES_SCREENSHOT") == "1":
        page.locator("#browser").screenshot(path=str(SCREENSHOT.with_name("web-ui-files.png")))
    # Back to the top with the keyboard, through the folder trail.
    page.get_by_role("button", name="Top").focus()
    page.keyboard.press("Enter")
    page.get_by_role("button", name="Open folder a-filler").wait_for()
    page.set_viewport_size({"width": 360, "height": 740})
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 360
    # Bob downloads slowly, the photo last (paths in order): meanwhile its thumbnail
    # comes from Alice.
    bob.cli("config", "set", "download_limit", "512K")
    target = Path(bob.shares) / "from-alice"
    bob.cli("attach", code, str(target), "--peer", alice.address)
    bob_page = browser.new_page(viewport={"width": 360, "height": 740})
    bob_page.goto(bob.cli_json("web")["url"])
    files = bob_page.locator("#shares li", has_text=str(target)).get_by_role(
        "button", name="Files")
    files.wait_for(timeout=30_000)
    coming = bob_page.locator("#entries li.coming", has_text="sunset.jpg")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        files.click()
        folder = bob_page.get_by_role("button", name="Open folder z-photos")
        try:
            folder.wait_for(timeout=2_000)
        except Exception:
            continue
        folder.click()
        try:
            coming.wait_for(timeout=3_000)
            break
        except Exception:
            continue
    assert "not downloaded yet" in coming.inner_text()
    assert not (target / "z-photos" / "sunset.jpg").exists()
    image = coming.locator("img")
    bob_page.wait_for_function("(img) => img.complete && img.naturalWidth > 0",
                               arg=image.element_handle(), timeout=30_000)
    assert image.evaluate("(img) => img.naturalWidth") == 256
    assert not (target / "z-photos" / "sunset.jpg").exists(), "the thumbnail must come " \
        "before the file: raise the filler or lower the limit"
    bob.cli("config", "set", "download_limit", "0")
    wait_same_trees(a, target, timeout=120)
    # Once it arrived the page says so, without a reload.
    coming.wait_for(state="detached", timeout=20_000)
    arrived = bob_page.locator("#entries li", has_text="sunset.jpg")
    assert "not downloaded yet" not in arrived.inner_text()
