"""Security: app.py's listening rule, typed paths and names, and what the running studio
serves: only workspace files, whatever the URL spelling, and nothing without the
password when --auth is set."""

from __future__ import annotations

import http.client
import json
import os
import socket
import urllib.parse

import pytest

import app
from studio.paths import NAME_MAX, PathError, resolve_inside, safe_name

SYMLINKS = pytest.mark.skipif(os.name == "nt", reason="symlinks need privileges on Windows")


# --------------------------------------------------------------------------------------
# app.py
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::"])
def test_app_refuses_other_interfaces_without_auth(host, capsys):
    with pytest.raises(SystemExit) as e:
        app.parse_args(["--host", host])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"refusing to listen on {host} without --auth" in err
    assert app.parse_args(["--host", host, "--auth", "ann:pw"]).host == host


# --------------------------------------------------------------------------------------
# resolve_inside and safe_name
# --------------------------------------------------------------------------------------

@pytest.fixture
def tree(tmp_path):
    """workspace/ and allowed/ as roots; outside/ and workspace-evil/ beside them."""
    ws, allowed, outside = tmp_path / "workspace", tmp_path / "allowed", tmp_path / "outside"
    for d in (ws / "datasets" / "cats", allowed, outside, tmp_path / "workspace-evil"):
        d.mkdir(parents=True)
    (outside / "secret.txt").write_text("secret")
    return ws, allowed, outside


def test_paths_inside_the_roots_are_accepted_and_resolved(tree, monkeypatch):
    ws, allowed, _ = tree
    roots = [ws, allowed]
    assert resolve_inside("datasets/cats", roots) == ws / "datasets" / "cats"
    assert resolve_inside(str(ws / "datasets" / "cats"), roots) == ws / "datasets" / "cats"
    assert resolve_inside("datasets/cats/../cats/./", roots) == ws / "datasets" / "cats"
    assert resolve_inside(f'  "{allowed}"  ', roots) == allowed        # pasted with quotes
    assert resolve_inside("new/folder", roots) == ws / "new" / "folder"   # need not exist yet
    assert resolve_inside(".", roots) == ws
    monkeypatch.setenv("HOME", str(ws))
    monkeypatch.setenv("USERPROFILE", str(ws))
    assert resolve_inside("~/datasets", roots) == ws / "datasets"


@pytest.mark.parametrize("typed", [
    "..", "../outside/secret.txt", "datasets/../../outside", "datasets/cats/../../../outside",
    "{outside}/secret.txt", "{tmp}", "/", "{tmp}/workspace-evil", "~",
])
def test_paths_outside_the_roots_are_refused(tree, typed, monkeypatch):
    ws, allowed, outside = tree
    monkeypatch.setenv("HOME", str(outside))
    monkeypatch.setenv("USERPROFILE", str(outside))
    text = typed.format(outside=outside, tmp=ws.parent)
    with pytest.raises(PathError, match="outside the folders the studio may use") as e:
        resolve_inside(text, [ws, allowed])
    message = str(e.value)
    assert str(ws) in message and str(allowed) in message and "--allow-dir" in message


@SYMLINKS
def test_symlinks_are_judged_by_where_they_lead(tree):
    ws, _, outside = tree
    (ws / "datasets" / "escape").symlink_to(outside, target_is_directory=True)
    (ws / "datasets" / "secret.txt").symlink_to(outside / "secret.txt")
    (ws / "datasets" / "alias").symlink_to(ws / "datasets" / "cats", target_is_directory=True)
    for typed in ("datasets/escape", "datasets/escape/secret.txt", "datasets/secret.txt",
                  "datasets/escape/new-file"):
        with pytest.raises(PathError, match="which leads to"):
            resolve_inside(typed, [ws])
    assert resolve_inside("datasets/alias", [ws]) == ws / "datasets" / "cats"
    # a root reached through a symlink still holds its own folders
    link = ws.parent / "ws-link"
    link.symlink_to(ws, target_is_directory=True)
    assert resolve_inside("datasets/cats", [link]) == ws / "datasets" / "cats"
    assert resolve_inside(str(link / "datasets"), [ws]) == ws / "datasets"


@pytest.mark.parametrize("typed, message", [
    ("", "no path given"), ("   ", "no path given"), ('""', "no path given"),
    ("data\x00/../../x", "NUL character"),
])
def test_empty_and_nul_paths_are_refused(tree, typed, message):
    with pytest.raises(PathError, match=message):
        resolve_inside(typed, [tree[0]])
    with pytest.raises(PathError, match="no folder"):
        resolve_inside("datasets", [])


@pytest.mark.parametrize("name", ["run-1", "my_run.v2", "A" * NAME_MAX, "2026.11.25", "con-test"])
def test_safe_names_are_accepted(name):
    assert safe_name(f"  {name} ") == name


@pytest.mark.parametrize("name, message", [
    ("", "no name"), ("   ", "no name"), (".hidden", "starts with a dot"),
    ("..", "starts with a dot"), ("../etc", "'/'"), ("a/b", "'/'"), ("a\\b", "'\\\\\\\\'"),
    ("a b", "' '"), ("caf\u00e9", "'\u00e9'"),
    ("x\x00", "'\\\\x00'"), ("A" * (NAME_MAX + 1), "the most is 80"), ("run.", "ends with a dot"),
    ("CON", "reserved"), ("nul.png", "reserved"), ("lpt1.txt", "reserved"),
])
def test_unsafe_names_are_refused(name, message):
    with pytest.raises(PathError, match=message):
        safe_name(name)


# --------------------------------------------------------------------------------------
# The running studio
# --------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port: int, path: str, *, method: str = "GET", body: bytes | None = None,
        headers: dict | None = None) -> tuple[int, bytes, http.client.HTTPResponse]:
    """One request with `path` sent exactly as written (no client-side normalisation)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read(), resp
    finally:
        conn.close()


@pytest.fixture
def served(tmp_path):
    """The studio page launched on a free port as app.py does, plus the file layout."""
    from studio.ui import build_ui

    ws, outside = tmp_path / "workspace", tmp_path / "outside"
    (ws / "outputs").mkdir(parents=True)
    outside.mkdir()
    (ws / "outputs" / "ok.txt").write_text("inside the workspace")
    (outside / "secret.txt").write_text("the secret")
    port = free_port()
    demo = build_ui(ws)
    demo.launch(server_name="127.0.0.1", server_port=port, allowed_paths=[str(ws)],
                prevent_thread_lock=True, quiet=True)
    try:
        yield port, ws, outside
    finally:
        demo.close()


def test_the_server_serves_workspace_files_and_nothing_else(served):
    port, ws, outside = served
    inside = (ws / "outputs" / "ok.txt").as_posix()
    secret = (outside / "secret.txt").as_posix()
    status, body, _ = get(port, f"/gradio_api/file={inside}")
    assert (status, body) == (200, b"inside the workspace")

    rel = os.path.relpath(secret, ws / "outputs").replace(os.sep, "/")   # ../../outside/...
    enc = urllib.parse.quote
    attempts = [
        f"/gradio_api/file={secret}",
        f"/gradio_api/file/{secret}",
        f"/gradio_api/file={ws.as_posix()}/outputs/{rel}",
        f"/gradio_api/file={ws.as_posix()}/outputs/{rel.replace('..', '%2e%2e')}",
        f"/gradio_api/file={ws.as_posix()}/outputs/{rel.replace('/', '%2F')}",
        f"/gradio_api/file={enc(ws.as_posix() + '/outputs/' + rel, safe='')}",
        f"/gradio_api/file={ws.as_posix()}/outputs/{rel.replace('../', '..%5c')}",
        f"/file={secret}",
        f"/gradio_api/file=..%2f..%2f{enc(secret.lstrip('/'), safe='')}",
    ]
    if os.name != "nt":
        (ws / "outputs" / "link.txt").symlink_to(outside / "secret.txt")
        attempts.append(f"/gradio_api/file={ws.as_posix()}/outputs/link.txt")
    for path in attempts:
        status, body, _ = get(port, path)
        assert status in (400, 403, 404), (path, status)
        assert b"the secret" not in body, path


def test_auth_guards_the_config_the_api_and_the_files(tmp_path):
    from studio.ui import build_ui

    ws = tmp_path / "workspace"
    ws.mkdir()
    (ws / "ok.txt").write_text("inside")
    port = free_port()
    demo = build_ui(ws)
    demo.launch(server_name="127.0.0.1", server_port=port, auth=("ann", "pa:ss"),
                allowed_paths=[str(ws)], prevent_thread_lock=True, quiet=True)
    try:
        for method, path in [("GET", "/config"), ("GET", "/gradio_api/info"),
                             ("GET", f"/gradio_api/file={(ws / 'ok.txt').as_posix()}"),
                             ("POST", "/gradio_api/queue/join"), ("POST", "/gradio_api/upload")]:
            status, body, _ = get(port, path, method=method,
                                  body=b"{}" if method == "POST" else None,
                                  headers={"Content-Type": "application/json"})
            assert status == 401, (path, status)
            assert str(ws).encode() not in body

        form = {"Content-Type": "application/x-www-form-urlencoded"}
        wrong = urllib.parse.urlencode({"username": "ann", "password": "nope"}).encode()
        assert get(port, "/login", method="POST", body=wrong, headers=form)[0] == 400
        right = urllib.parse.urlencode({"username": "ann", "password": "pa:ss"}).encode()
        status, _, resp = get(port, "/login", method="POST", body=right, headers=form)
        assert status == 200
        cookies = "; ".join(c.split(";", 1)[0] for c in resp.headers.get_all("set-cookie"))
        status, body, _ = get(port, "/config", headers={"Cookie": cookies})
        assert status == 200 and json.loads(body)["title"] == "PixelHDM Studio"
        status, body, _ = get(port, f"/gradio_api/file={(ws / 'ok.txt').as_posix()}",
                              headers={"Cookie": cookies})
        assert (status, body) == (200, b"inside")
    finally:
        demo.close()


def test_the_workspace_is_the_only_folder_app_py_serves_by_default(tmp_path, monkeypatch):
    """app.main hands gradio the workspace (and --allow-dir folders) and nothing else."""
    seen = {}

    class FakeDemo:
        def launch(self, **kw):
            seen.update(kw)
            return None, "http://127.0.0.1:1/", None

        def block_thread(self):
            return None

    import studio.ui
    monkeypatch.setattr(studio.ui, "build_ui", lambda *args, **kwargs: FakeDemo())
    extra = tmp_path / "extra"
    extra.mkdir()
    assert app.main(["--workspace", str(tmp_path / "ws"), "--allow-dir", str(extra)]) == 0
    assert seen["allowed_paths"] == [str((tmp_path / "ws").resolve()), str(extra.resolve())]
    assert seen["server_name"] == "127.0.0.1" and seen["auth"] is None
    assert not seen.get("share")
