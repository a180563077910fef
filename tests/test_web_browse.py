"""The file browser and thumbnails over HTTP against a real daemon, as the UI and an
attacker use them (protocol/http-api.md, "Browsing a share" and "Thumbnails")."""

from __future__ import annotations

import io
import json
import os
import threading
from collections.abc import Iterator
from urllib.parse import quote

import pytest

from tests.daemons import DaemonProcess, wait_until
from tests.test_thumbnails import image_bytes, png_bomb
from tests.test_web import Web

pytestmark = pytest.mark.slow
Image = pytest.importorskip("PIL.Image", reason="needs Pillow")

FILES = 250


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Web]:
    daemon = DaemonProcess(tmp_path_factory.mktemp("browse"), "browser")
    daemon.start()
    try:
        root = daemon.shares
        (root / "many").mkdir()
        for n in range(FILES):
            (root / "many" / ("f%03d.txt" % n)).write_text(str(n))
        (root / "photos" / "2024").mkdir(parents=True)
        (root / "photos" / "2024" / "beach.jpg").write_bytes(image_bytes("JPEG", (640, 480)))
        for kind in ("png", "gif", "webp"):
            (root / "photos" / ("pic." + kind)).write_bytes(
                image_bytes(kind.upper(), (300, 200), "P" if kind == "gif" else "RGB"))
        (root / "photos" / "garbage.jpg").write_bytes(os.urandom(4000))
        (root / "photos" / "bomb.png").write_bytes(png_bomb(60_000, 60_000))
        (root / "photos" / "notes.txt").write_text("not an image")
        for n in range(100):
            (root / "photos" / ("small-%02d.png" % n)).write_bytes(
                image_bytes("PNG", (40 + n, 30)))
        outside = daemon.shares.parent / "outside"
        outside.mkdir()
        (outside / "secret.jpg").write_bytes(image_bytes("JPEG", (100, 100)))
        os.symlink(outside, root / "escape")
        os.symlink(outside / "secret.jpg", root / "photos" / "link.jpg")
        daemon.cli_json("share", str(root))
        yield Web(daemon)
        assert daemon.running, "the daemon must survive everything the tests sent\n" + \
            daemon.log_tail()
    finally:
        daemon.cleanup()


def browse(web: Web, **arguments: object):
    arguments.setdefault("path", str(web.daemon.shares))
    return web.api("POST", "/rest/.clearskies.browse", arguments)


def thumbnail(web: Web, file: str, headers: dict[str, str] | None = None, **extra: str):
    query = "path=%s&file=%s" % (quote(str(web.daemon.shares)), quote(file))
    for key, value in extra.items():
        query += "&%s=%s" % (key, quote(value))
    return web.request("GET", "/rest/thumbnail?" + query,
                       headers=headers if headers is not None else {"X-API-Key": web.key})


def test_without_credentials_nothing_is_listed_or_shown(web: Web) -> None:
    """Browse and thumbnail answer 401 without the API key or a session, naming nothing."""
    for reply in (thumbnail(web, "photos/2024/beach.jpg", headers={}),
                  web.request("GET", "/rest/.clearskies.browse?path=" + str(web.daemon.shares)),
                  thumbnail(web, "photos/2024/beach.jpg", headers={"X-API-Key": "x" * 43})):
        assert reply.status == 401 and b"photos" not in reply.body
        assert str(web.daemon.shares).encode() not in reply.body


def test_a_folder_of_250_files_comes_in_pages(web: Web) -> None:
    """The listing is paged: at most `limit` entries per reply, each page after the
    cursor of the one before, every file once, in order; the limit is bounded."""
    wait_until(lambda: len(browse(web, dir="many", limit=500).json()["entries"]) == FILES,
               timeout=30)
    seen: list[str] = []
    after = None
    pages = 0
    while True:
        reply = browse(web, dir="many", limit=100, **({"after": after} if after else {}))
        assert reply.status == 200
        body = reply.json()
        assert len(body["entries"]) <= 100
        seen += [e["name"] for e in body["entries"]]
        pages += 1
        after = body["next"]
        if after is None:
            break
    assert pages == 3 and seen == ["f%03d.txt" % n for n in range(FILES)]
    assert browse(web, dir="many", limit=100_000).status == 400
    top = browse(web).json()
    names = {e["name"]: e for e in top["entries"]}
    assert names["many"]["type"] == "dir" and names["photos"]["type"] == "dir"
    assert "escape" not in names  # a symbolic link is not part of the share
    photos = {e["name"]: e for e in browse(web, dir="photos", limit=500).json()["entries"]}
    assert photos["pic.png"]["thumbnail"] and photos["pic.png"]["held"]
    assert not photos["notes.txt"]["thumbnail"] and "link.jpg" not in photos
    assert len(photos["pic.png"]["sha256"]) == 64


def test_get_keeps_folder_names_that_look_like_numbers_or_flags(web: Web) -> None:
    """GET arguments are text but for counts and flags: ``dir=2024`` and ``dir=true``
    browse those folders; a count that is none (``limit=ten``, ``limit=²``) is refused."""
    for name in ("2024", "true"):
        (web.daemon.shares / name).mkdir(exist_ok=True)
        (web.daemon.shares / name / "inside.txt").write_text(name)

    def listed(name: str) -> list[str] | None:
        reply = web.api("GET", "/rest/.clearskies.browse?path=%s&dir=%s&limit=5"
                        % (quote(str(web.daemon.shares)), name))
        if reply.status == 404:  # not scanned yet
            return None
        assert reply.status == 200, reply.body
        return [e["name"] for e in reply.json()["entries"]]

    wait_until(lambda: listed("2024") == ["inside.txt"] and listed("true") == ["inside.txt"],
               timeout=30)
    for bad in ("ten", quote("²"), "-1"):
        reply = web.api("GET", "/rest/.clearskies.browse?path=%s&limit=%s"
                        % (quote(str(web.daemon.shares)), bad))
        assert (reply.status, reply.json()["error"]) == (400, "bad_request"), bad


def test_paths_outside_the_share_are_refused(web: Web) -> None:
    """`..`, absolute paths, empty parts, the versions folder and a symbolic link's folder:
    a 4xx with a reason, never a listing of something outside."""
    for bad in ("..", "../", "many/../..", "/etc", "many//x", ".clearskies-versions"):
        reply = browse(web, dir=bad)
        assert reply.status == 400, (bad, reply.body)
        assert reply.json()["message"]
    assert browse(web, dir="escape").status == 404
    assert browse(web, dir="nothing-here").status == 404
    assert browse(web, path="/etc").status == 404
    assert browse(web, dir="many", after="photos/x").status == 400
    for bad in ("../outside/secret.jpg", "/etc/passwd", "escape/secret.jpg",
                "photos/link.jpg", "photos/../../outside/secret.jpg"):
        reply = thumbnail(web, bad)
        assert reply.status in (400, 404), (bad, reply.status)
        assert reply.headers["Content-Type"] == "application/json"


def test_thumbnails_of_each_format_and_refusals_of_hostile_files(web: Web) -> None:
    """JPEG, PNG, GIF and WebP give a JPEG of at most 256 pixels; garbage and a text file
    415, a decompression bomb 422, another content 409, no such file 404."""
    for file in ("photos/2024/beach.jpg", "photos/pic.png", "photos/pic.gif",
                 "photos/pic.webp"):
        reply = thumbnail(web, file)
        assert reply.status == 200, (file, reply.body)
        assert reply.headers["Content-Type"] == "image/jpeg"
        with Image.open(io.BytesIO(reply.body)) as image:
            assert max(image.size) == 256 or file.endswith(("png", "gif", "webp"))
            assert max(image.size) <= 256
    assert thumbnail(web, "photos/garbage.jpg").status == 415
    assert thumbnail(web, "photos/notes.txt").status == 415
    bomb = thumbnail(web, "photos/bomb.png")
    assert bomb.status == 422 and "pixels" in bomb.json()["message"]
    assert thumbnail(web, "photos/none.jpg").status == 404
    entry = {e["name"]: e for e in browse(web, dir="photos/2024").json()["entries"]}
    keyed = thumbnail(web, "photos/2024/beach.jpg", sha256=entry["beach.jpg"]["sha256"])
    assert keyed.status == 200 and "max-age" in keyed.headers["Cache-Control"]
    assert thumbnail(web, "photos/2024/beach.jpg", sha256="0" * 64).status == 409
    assert thumbnail(web, "photos/2024/beach.jpg", sha256="../x").status == 400
    cache = os.path.join(web.daemon.data_dir, "thumbnails")
    assert entry["beach.jpg"]["sha256"] + "-%d.jpg" % entry["beach.jpg"]["size"] in \
        os.listdir(cache)


def test_a_flood_of_thumbnail_requests_is_refused_not_queued(web: Web) -> None:
    """100 requests at once for 100 different images: each answered 200 or 503 with a
    Retry-After, none left hanging; the daemon stays up and answers afterwards."""
    statuses: list[tuple[int, str | None]] = []
    lock = threading.Lock()

    def one(n: int) -> None:
        reply = thumbnail(web, "photos/small-%02d.png" % n)
        with lock:
            statuses.append((reply.status, reply.headers.get("Retry-After")))
    threads = [threading.Thread(target=one, args=(n,)) for n in range(100)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(statuses) == 100
    assert {s for s, _ in statuses} <= {200, 503}
    assert all(retry and int(retry) > 0 for s, retry in statuses if s == 503)
    assert thumbnail(web, "photos/small-00.png").status == 200
    assert json.loads(web.api("GET", "/rest/status").body)["name"] == "browser"
