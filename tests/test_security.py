"""Security: app.py's listening rule, typed paths and names, and what the running studio
serves: only workspace files, whatever the URL spelling, and nothing without the
password when --auth is set."""

from __future__ import annotations

import http.client
import json
import os
import socket
import urllib.parse
from pathlib import Path

import pytest

import app
from engine import config
from studio.paths import NAME_MAX, PathError, names_local_path, resolve_inside, safe_name

SYMLINKS = pytest.mark.skipif(os.name == "nt", reason="symlinks need privileges on Windows")


# --------------------------------------------------------------------------------------
# app.py
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag", ["0", "5000"])
def test_the_upload_limit_flag_is_checked(flag, capsys):
    with pytest.raises(SystemExit):
        app.parse_args(["--max-upload-mb", flag])
    assert "--max-upload-mb" in capsys.readouterr().err
    assert app.serving_rules(Path("w"), max_upload_mb=3)["max_file_size"] == 3 * 2**20


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


def test_a_path_typed_in_other_letter_case_on_a_case_insensitive_disk(tree, monkeypatch):
    """macOS: /Users/me/Workspace and /Users/me/workspace are one folder, and resolving
    keeps the case as typed. The disk says they are the same file, so the path is inside;
    `workspace-evil` and `outside` stay outside. (A case-insensitive disk simulated.)"""
    import studio.paths as paths
    ws, allowed, outside = tree

    def fold(p) -> Path:
        return Path(str(p).lower())
    real_exists = Path.exists
    monkeypatch.setattr(Path, "exists", lambda self, **kw: real_exists(fold(self)))
    monkeypatch.setattr(paths.os.path, "samefile", lambda a, b: fold(a) == fold(b))
    typed = ws.parent / "WorkSpace" / "datasets" / "CATS"
    assert resolve_inside(str(typed), [ws, allowed]) == typed
    for evil in (ws.parent / "Workspace-Evil", outside / "secret.txt"):
        with pytest.raises(PathError, match="outside"):
            resolve_inside(str(evil), [ws, allowed])


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
# Path-valued settings of a run: the overrides box cannot point the trainer elsewhere
# --------------------------------------------------------------------------------------

@pytest.fixture
def studio_ctx(tree):
    from studio.workspace import Studio
    ws, allowed, outside = tree
    (ws / "models" / "qwen").mkdir(parents=True)
    (allowed / "dino").mkdir()
    return Studio(ws, [allowed]), ws, allowed, outside


def _cfg(**paths) -> config.RunConfig:
    cfg = config.load_preset("tiny-cpu", ["loss.repa_layer=1"])
    cfg.data.path = paths.get("data", "")
    cfg.loss.repa_teacher = paths.get("teacher", "")
    cfg.text.name_or_path = paths.get("text", "Qwen/Qwen3-0.6B")
    cfg.text.cache_dir = paths.get("cache", "")
    cfg.data.cache_dir = paths.get("crops", "")
    return cfg


def test_run_paths_inside_the_roots_become_real_absolute_paths(studio_ctx):
    studio, ws, allowed, _ = studio_ctx
    cfg = _cfg(data="datasets/cats", teacher=str(allowed / "dino"), text="models/qwen",
               cache="cache/text", crops="cache/crops")
    out = studio.check_paths(cfg)
    assert out.text.cache_dir == str(ws / "cache" / "text")            # need not exist yet
    assert out.data.cache_dir == str(ws / "cache" / "crops")
    assert out.data.path == str(ws / "datasets" / "cats")             # relative: the workspace
    assert out.loss.repa_teacher == str(allowed / "dino")             # an --allow-dir folder
    assert out.text.name_or_path == str(ws / "models" / "qwen")       # a local folder
    assert cfg.data.path == "datasets/cats"                           # the input is unchanged
    # a hub id stays a hub id; an empty teacher means iREPA off
    plain = studio.check_paths(_cfg(data=str(ws / "datasets" / "cats")))
    assert (plain.text.name_or_path, plain.loss.repa_teacher) == ("Qwen/Qwen3-0.6B", "")
    assert plain.text.cache_dir == plain.data.cache_dir == ""          # the default: allowed


@pytest.mark.parametrize("key, paths", [
    ("data.path", {"data": "{outside}"}),
    ("data.path", {"data": "../outside"}),
    ("loss.repa_teacher", {"teacher": "{outside}"}),
    ("loss.repa_teacher", {"teacher": "datasets/../../outside"}),
    ("text.name_or_path", {"text": "{outside}"}),
    ("text.name_or_path", {"text": "../outside"}),
    ("text.name_or_path", {"text": "~/../outside"}),
    ("text.cache_dir", {"cache": "{outside}"}),
    ("text.cache_dir", {"cache": "../outside"}),
    ("data.cache_dir", {"crops": "{outside}"}),
    ("data.cache_dir", {"crops": "../outside"}),
])
def test_run_paths_outside_the_roots_are_refused_by_name(studio_ctx, key, paths):
    studio, ws, allowed, outside = studio_ctx
    paths = {k: v.format(outside=outside) for k, v in paths.items()}
    paths.setdefault("data", "datasets/cats")
    with pytest.raises(PathError) as e:
        studio.check_paths(_cfg(**paths))
    message = str(e.value)
    assert message.startswith(f"{key}:") and str(ws) in message and str(allowed) in message


def test_a_run_needs_an_existing_dataset_folder(studio_ctx):
    studio, ws, _, _ = studio_ctx
    with pytest.raises(PathError, match="data.path: no dataset chosen"):
        studio.check_paths(_cfg())
    with pytest.raises(PathError, match="does not exist"):
        studio.check_paths(_cfg(data="datasets/dogs"))
    # the Train tab's inline check, before a dataset is chosen, still checks the others
    assert studio.check_paths(_cfg(), require_data=False).data.path == ""
    with pytest.raises(PathError, match="loss.repa_teacher"):
        studio.check_paths(_cfg(teacher="/"), require_data=False)


def test_the_train_tab_config_takes_the_dataset_only_from_the_choice(studio_ctx):
    """What Start and Dry run use: overrides cannot set data.path, and without a chosen
    dataset nothing starts."""
    studio, ws, _, outside = studio_ctx
    with pytest.raises(PathError, match="no dataset chosen"):
        studio.run_config("tiny-cpu", "train.max_steps=5")
    with pytest.raises(config.ConfigError, match="data.path cannot be set by an override"):
        studio.run_config("tiny-cpu", f"data.path={outside}")
    with pytest.raises(config.ConfigError, match="data.path cannot be set by an override"):
        studio.run_config("tiny-cpu", f"data.path={outside}", "cats")
    with pytest.raises(PathError, match="loss.repa_teacher"):
        studio.run_config("tiny-cpu", f"loss.repa_teacher={outside}\nloss.repa_layer=1", "cats")
    with pytest.raises(PathError, match="text.name_or_path"):
        studio.run_config("tiny-cpu", f"text.name_or_path={outside}", None, "datasets/cats")
    cfg = studio.run_config("tiny-cpu", "text.name_or_path=models/qwen", "cats")
    assert cfg.data.path == str(ws / "datasets" / "cats")
    assert cfg.text.name_or_path == str(ws / "models" / "qwen")
    # a folder of weights that is not there is refused with how the path was read (the
    # path as written from the project folder led inside workspace/workspace/...)
    for key, line in (("text.name_or_path", f"text.name_or_path={ws.name}/models/qwen"),
                      ("loss.repa_teacher", "loss.repa_teacher=models/dino\nloss.repa_layer=1")):
        with pytest.raises(PathError) as e:
            studio.run_config("tiny-cpu", line, "cats")
        assert str(e.value).startswith(f"{key}: no folder {ws}/") and \
            f"write models/NAME for {ws.name}/models/NAME" in str(e.value)


@SYMLINKS
def test_run_paths_are_judged_by_where_links_lead(studio_ctx):
    studio, ws, _, outside = studio_ctx
    (ws / "models" / "escape").symlink_to(outside, target_is_directory=True)
    (ws / "datasets" / "escape").symlink_to(outside, target_is_directory=True)
    for paths in ({"data": "datasets/escape"}, {"data": "datasets/cats", "text": "models/escape"},
                  {"data": "datasets/cats", "teacher": "models/escape"}):
        with pytest.raises(PathError, match="which leads to"):
            studio.check_paths(_cfg(**paths))
    with pytest.raises(PathError):
        studio.run_config("tiny-cpu", "", "escape")          # listed, but leads outside


@pytest.mark.parametrize("name, local", [
    ("Qwen/Qwen3-0.6B", False), ("gpt2", False), ("", False),
    ("./qwen", True), ("/models/qwen", True), ("~/qwen", True), ("..", True),
    ("C:\\models\\qwen", True), ("models\\qwen", True), ("a/b/c", True),
    ("models/qwen", True),                     # exists in the workspace
])
def test_name_or_path_tells_folders_from_hub_ids(tree, name, local):
    ws = tree[0]
    (ws / "models" / "qwen").mkdir(parents=True)
    assert names_local_path(name, [ws]) is local


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
    demo.launch(server_name="127.0.0.1", server_port=port,
                **app.serving_rules(ws, max_upload_mb=1))
    try:
        yield port, ws, outside
    finally:
        demo.close()


def _upload(port: int, size: int) -> tuple[int, bytes]:
    boundary = "phdmboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; "
            f"filename=\"big.png\"\r\nContent-Type: image/png\r\n\r\n").encode() \
        + b"\x89PNG" + b"\0" * (size - 4) + f"\r\n--{boundary}--\r\n".encode()
    status, data, _ = get(port, "/gradio_api/upload", method="POST", body=body, headers={
        "Content-Type": f"multipart/form-data; boundary={boundary}"})
    return status, data


def test_uploads_above_the_limit_are_refused_before_they_reach_the_disk(served):
    """Every upload (a start image, a PNG to recall, dataset images) goes through the one
    upload route, under app.py's --max-upload-mb (1 MB here)."""
    port, ws, _ = served
    status, data = _upload(port, 1024 * 1024 + 4096)
    assert status == 413, (status, data[:200])
    status, data = _upload(port, 200 * 1024)
    assert status == 200, (status, data[:200])


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
        is_running = False   # (as if stopped at once)

        def launch(self, **kw):
            seen.update(kw)
            return None, "http://127.0.0.1:1/", None

        def close(self):
            return None

    import studio.ui
    monkeypatch.setattr(studio.ui, "build_ui", lambda *args, **kwargs: FakeDemo())
    extra = tmp_path / "extra"
    extra.mkdir()
    assert app.main(["--workspace", str(tmp_path / "ws"), "--allow-dir", str(extra)]) == 0
    assert seen["allowed_paths"] == [str((tmp_path / "ws").resolve()), str(extra.resolve())]
    assert seen["server_name"] == "127.0.0.1" and seen["auth"] is None
    assert not seen.get("share")


# --------------------------------------------------------------------------------------
# Every field that names a file or folder, reading and writing: traversal is refused,
# and nothing outside the workspace is read, changed or deleted
# --------------------------------------------------------------------------------------

TRAVERSALS = ["../outside/victim", "..", "/tmp", "a/../../outside/victim", "x\x00y", "",
              "escape"]   # (escape: a link in runs/ that leads outside the workspace)


@pytest.fixture
def victim_ctx(tmp_path):
    """A studio whose workspace has one real run, and a run-like folder outside it that a
    link in runs/ and in models/ point to."""
    from engine.config import dump_yaml, load_preset
    from studio.workspace import Studio
    ws, outside = tmp_path / "workspace", tmp_path / "outside"
    studio = Studio(ws)
    victim = outside / "victim"
    (victim / "checkpoints").mkdir(parents=True)
    (victim / "config.yaml").write_text(dump_yaml(load_preset("tiny-cpu")))
    (victim / "checkpoints" / "step_0000005.safetensors").write_bytes(b"not yours")
    (outside / "model.safetensors").write_bytes(b"not yours either")
    if os.name != "nt":
        (studio.runner.runs_root / "escape").symlink_to(victim, target_is_directory=True)
        (studio.models_dir / "escape.safetensors").symlink_to(outside / "model.safetensors")
        (studio.datasets_dir / "escape").symlink_to(victim, target_is_directory=True)
    before = {p: p.read_bytes() for p in outside.rglob("*") if p.is_file()}
    yield studio, outside
    after = {p: p.read_bytes() for p in outside.rglob("*") if p.is_file()}
    assert after == before, "a file outside the workspace was changed, added or deleted"
    assert not (victim / "control").exists() and not (victim / "launch.json").exists()


def _operations(studio):
    """(field, reads or writes, call) for every studio entry point that takes a name."""
    from engine.config import load_preset
    r = studio.runner
    cfg = load_preset("tiny-cpu")
    return [
        ("run (monitor)", "reads", lambda v: r.info(v)),
        ("run (metrics)", "reads", lambda v: r.metrics(v)),
        ("run (log)", "reads", lambda v: r.log_tail(v)),
        ("checkpoint id", "reads", lambda v: studio.checkpoint_path(f"run/{v}/5")),
        ("checkpoint id (exported)", "reads",
         lambda v: studio.checkpoint_path(f"model/{v}.safetensors")),
        ("dataset choice", "reads", lambda v: studio.dataset_dir(v)),
        ("dataset folder typed", "reads", lambda v: studio.chosen_dataset(
            None, "datasets/escape" if v == "escape" else v or "/")),
        ("new run name", "writes", lambda v: r.start(cfg, run_id=v)),
        ("resume", "writes", lambda v: r.resume(v)),
        ("stop / pause / save / sample request", "writes", lambda v: r.request(v, "stop")),
        ("force stop", "writes", lambda v: r.force_stop(v, grace=0.1)),
        ("delete run", "writes", lambda v: r.delete_run(v)),
        ("checkpoints of a run", "reads", lambda v: studio.run_checkpoints(v)),
        ("pin a checkpoint", "writes", lambda v: studio.toggle_pin(v, 5)),
        ("delete a checkpoint", "writes", lambda v: studio.delete_checkpoint(v, 5)),
        ("export a checkpoint", "writes",
         lambda v: studio.export(f"run/{v}/5", "exported-from-elsewhere")),
        ("export file name", "writes", lambda v: safe_name(v)),
    ]


@pytest.mark.parametrize("value", TRAVERSALS, ids=repr)
def test_no_field_reads_or_writes_outside_the_workspace(victim_ctx, value):
    from studio.runner import RunnerError
    studio, outside = victim_ctx
    if value == "escape" and os.name == "nt":
        pytest.skip("symlinks need privileges on Windows")
    for field, kind, call in _operations(studio):
        if field == "export file name" and value == "escape":
            continue   # a fine file name: the models folder is where it goes
        try:
            call(value)
        except (PathError, RunnerError) as e:
            assert str(e), (field, kind)
        else:
            raise AssertionError(f"{field} ({kind}) took {value!r}")
    assert "escape" not in [i.run_id for i in studio.runner.runs()]
    assert not [c for c in studio.checkpoint_choices() if "escape" in c[1] and
                c[1].startswith("run/")]


SOURCE_DIRS = ("engine", "studio")


def _sources():
    root = Path(__file__).resolve().parent.parent
    files = [root / "app.py"] + [p for d in SOURCE_DIRS for p in (root / d).rglob("*.py")]
    return [(p.relative_to(root).as_posix(), p.read_text(encoding="utf-8")) for p in files]


def _problems(name: str, text: str) -> list[str]:
    """Unpicklers and shells in one source file."""
    import ast
    problems = []
    for node in ast.walk(ast.parse(text, name)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            if any(m.split(".")[0] in ("pickle", "cPickle", "dill", "marshal", "shelve",
                                       "joblib") for m in mods):
                problems.append(f"{name}:{node.lineno} imports an unpickler")
        if not isinstance(node, ast.Call):
            continue
        func = ast.unparse(node.func)
        if func.endswith(("torch.load", "np.load", "numpy.load")) and not any(
                k.arg in ("weights_only", "allow_pickle") and isinstance(k.value, ast.Constant)
                and k.value.value is (k.arg == "weights_only") for k in node.keywords):
            problems.append(f"{name}:{node.lineno} {func} may unpickle")
        if func in ("os.system", "os.popen", "subprocess.getoutput",
                    "subprocess.getstatusoutput", "eval", "exec"):
            problems.append(f"{name}:{node.lineno} calls {func}")
        for k in node.keywords:
            if k.arg == "shell" and not (isinstance(k.value, ast.Constant)
                                         and k.value.value is False):
                problems.append(f"{name}:{node.lineno} starts a process through a shell")
    return problems


def test_nothing_is_unpickled_and_no_subprocess_uses_a_shell():
    """Scans the code: training state and weights load through safetensors only, and every
    process is started from an argument list."""
    sources = _sources()
    assert len(sources) > 20
    assert [p for name, text in sources for p in _problems(name, text)] == []


def test_the_scan_finds_planted_offenders():
    planted = ("import pickle\nimport subprocess, os\nsubprocess.run('ls', shell=True)\n"
               "torch.load(f)\ntorch.load(f, weights_only=True)\nos.system('x')\n"
               "np.load(f, allow_pickle=True)\n")
    assert [p.split(" ", 1)[1] for p in _problems("x.py", planted)] == [
        "imports an unpickler", "starts a process through a shell", "torch.load may unpickle",
        "calls os.system", "np.load may unpickle"]
