"""The web UI's routes over HTTP (httpx): the API key, the roots every path must stay inside, the
form's validation against the YAML path's, and a run stopped and resumed from the page."""

from __future__ import annotations

import json
import os
import time

import httpx
import pytest
import yaml

from tests.ui.helpers import make_workspace, ui_server

KEY = "ui-test-key-0123"


@pytest.fixture
def workspace(tmp_path):
    return make_workspace(tmp_path / "work")


def test_the_key_guards_every_route_but_the_page(workspace):
    with ui_server(workspace, api_key=KEY) as (url, _service, _runs):
        bare = httpx.Client(base_url=url, timeout=30)
        keyed = httpx.Client(base_url=url, timeout=30, headers={"authorization": f"Bearer {KEY}"})
        assert bare.get("/ui/").status_code == 200 and "lorakit" in bare.get("/ui/").text
        assert bare.get("/ui/static/app.js").status_code == 200
        assert bare.get("/ui/static/nothing.js").status_code == 404
        for path in ("/ui/api/info", "/ui/api/runs", "/ui/api/reports", "/ui/api/sweeps",
                     "/ui/api/report?path=x/report.json", "/admin/adapters", "/v1/models"):
            r = bare.get(path)
            assert r.status_code == 401, path
            assert r.json()["error"]["code"] == "invalid_api_key"
        assert bare.post("/ui/api/runs", json={"name": "x", "config": {}}).status_code == 401
        assert keyed.get("/ui/api/runs").json() == {"data": []}
        assert keyed.get("/ui/api/info").json()["runs_root"] == str(workspace.resolve())


def test_paths_outside_the_roots_are_refused(workspace, tmp_path):
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "report.json").write_text('{"task": "generation", "rows": 1}')
    (workspace / "link").symlink_to(tmp_path / "outside")
    with ui_server(workspace) as (url, _service, _runs):
        c = httpx.Client(base_url=url, timeout=30)
        for path in ("../outside/report.json", str(tmp_path / "outside" / "report.json"),
                     "link/report.json", "data/../../outside/report.json"):
            r = c.get("/ui/api/report", params={"path": path})
            assert r.status_code == 400, path
            assert r.json()["error"]["code"] == "path_outside_roots", path
            assert "outside the runs folder" in r.json()["error"]["message"]
        assert c.get("/ui/api/file", params={"path": "../outside/report.json"}).status_code == 400
        form = {"model": {"name": "base"}, "data": {"train": "../outside/report.json"}}
        r = c.post("/ui/api/validate", json={"name": "r", "config": form})
        assert r.status_code == 400 and r.json()["error"]["param"] == "data.train"
        r = c.post("/ui/api/validate", json={"name": "r", "config": {"model": {"name": "/etc"}}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "model.name"
        for name in ("..", "../x", "a/b", ".hidden"):
            r = c.post("/ui/api/runs", json={"name": name, "config": {}})
            assert r.status_code == 400 and r.json()["error"]["param"] == "name", name
        r = c.post("/admin/adapters", json={"name": "a", "path": "../outside"})
        assert r.status_code == 400 and "'..' is refused" in r.json()["error"]["message"]
        assert not any(p.name.startswith("r") for p in workspace.iterdir() if p.is_dir())


def test_the_form_gets_the_yaml_paths_messages(workspace):
    raw = {"model": {"dtype": "fp64"}, "lora": {"r": 0}, "data": {"train": "data/train.jsonl"},
           "train": {"lr": -1, "batch_size": "many", "bogus": 1}}
    (workspace / "bad.yaml").write_text(yaml.safe_dump(raw))
    from lorakit.config import load_config
    from lorakit.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        load_config(workspace / "bad.yaml")
    yaml_problems = str(e.value).splitlines()[1:]
    with ui_server(workspace) as (url, _service, _runs):
        r = httpx.post(f"{url}/ui/api/validate", json={"name": "r", "config": raw}, timeout=30)
        assert r.status_code == 400
        message = r.json()["error"]["message"]
    # The HTTP error body may join the lines; the problems and their order are the YAML path's.
    assert len(yaml_problems) >= 4
    where = [message.find(p.strip()) for p in yaml_problems]
    assert -1 not in where and where == sorted(where), (message, yaml_problems)


def _wait(predicate, what: str, timeout: float = 240):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow  # two `lorakit train` processes: ~20 s on a quiet machine, ~45 s on a busy one
def test_stop_and_resume_a_run(workspace):
    config = {"model": {"name": "base", "dtype": "fp32", "device": "cpu"},
              "data": {"train": "data/train.jsonl", "max_seq_len": 64},
              "lora": {"r": 4, "lora_alpha": 8}, "train": {"max_steps": 2000, "batch_size": 4,
                                                           "save_every": 2}}
    with ui_server(workspace) as (url, _service, runs):
        c = httpx.Client(base_url=url, timeout=60)
        r = c.post("/ui/api/runs", json={"name": "long", "config": config})
        assert r.status_code == 201, r.text
        assert c.post("/ui/api/runs", json={"name": "long", "config": config}).status_code == 409
        ckpts = workspace / "long" / "checkpoints"
        _wait(lambda: ckpts.is_dir() and any(p.name.startswith("step") for p in ckpts.iterdir()),
              "a checkpoint")
        stopped = c.post("/ui/api/runs/long/stop").json()
        assert (stopped["status"], stopped["resumable"]) == ("interrupted", True), stopped
        steps = len(c.get("/ui/api/runs/long/metrics").json()["rows"])
        resumed = c.post("/ui/api/runs/long/resume").json()
        assert resumed["status"] == "running"
        _wait(lambda: "--resume" in (workspace / "long" / "train.log").read_text()
              and len(c.get("/ui/api/runs/long/metrics").json()["rows"]) > steps,
              "steps after the resume")
        listed = c.get("/ui/api/runs").json()["data"]
        assert [(x["name"], x["status"]) for x in listed] == [("long", "running")]
        proc = runs.procs["long"]
        assert c.post("/ui/api/runs/long/stop").json()["status"] == "interrupted"
        assert proc.poll() is not None and os.path.exists(workspace / "long" / "train.exit")


@pytest.mark.slow  # a real two-trial sweep: ~10 s on a quiet machine
def test_sweeps_show_their_rows_summary_and_plots(workspace):
    from lorakit.sweep.results import read_results
    from tests.ui.helpers import make_sweep

    results = make_sweep(workspace)
    with ui_server(workspace) as (url, _service, _runs):
        c = httpx.Client(base_url=url, timeout=30)
        (sweep,) = c.get("/ui/api/sweeps").json()["data"]
        assert sweep["path"] == "sweep/results.jsonl"
        assert sweep["rows"] == json.loads(json.dumps(read_results(results)))
        assert sweep["summary"] == (results.parent / "plots" / "summary.md").read_text()
        plots = sorted(p.name for p in (results.parent / "plots").glob("*.png"))
        assert plots and sweep["plots"] == [f"sweep/plots/{name}" for name in plots]
        r = c.get("/ui/api/file", params={"path": sweep["plots"][0]})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert r.content == (workspace / sweep["plots"][0]).read_bytes()
        r = c.get("/ui/api/file", params={"path": "sweep/results.jsonl"})
        assert r.status_code == 400 and "not a plot" in r.json()["error"]["message"]


def test_override_lines_reach_every_field_and_stay_inside_the_roots(workspace):
    form = {"model": {"name": "base"}, "data": {"train": "data/train.jsonl"}}
    with ui_server(workspace) as (url, _service, _runs):
        c = httpx.Client(base_url=url, timeout=30)
        r = c.post("/ui/api/validate", json={"name": "r", "config": form, "overrides": [
            "train.gradient_checkpointing=true", "lora.target_modules=q_proj,v_proj"]})
        assert r.status_code == 200, r.text
        cfg = r.json()["config"]
        assert cfg["train"]["gradient_checkpointing"] is True
        assert cfg["lora"]["target_modules"] == ["q_proj", "v_proj"]
        assert cfg["train"]["output_dir"] == str(workspace.resolve() / "r")
        r = c.post("/ui/api/validate", json={"name": "r", "config": form,
                                             "overrides": ["data.train=../../etc/passwd"]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "path_outside_roots"
        r = c.post("/ui/api/validate", json={"name": "r", "config": form, "overrides": ["lr=1"]})
        assert r.status_code == 400
        assert r.json()["error"]["message"] == "override 'lr=1': expected section.key=value, " \
                                               "e.g. train.lr=1e-4"
        by_line = c.post("/ui/api/calc", json={"config": form, "overrides": ["lora.r=16"]}).json()
        by_field = c.post("/ui/api/calc", json={"config": {**form, "lora": {"r": 16}}}).json()
        plain = c.post("/ui/api/calc", json={"config": form}).json()
        assert by_line == by_field and by_line["r"] == 16
        assert by_line["parameters"]["trainable"] == 2 * plain["parameters"]["trainable"]
