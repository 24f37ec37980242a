"""The web UI in a real browser: Playwright for Python driving the system's Chromium.

One walk through the life of an adapter on a tiny base: the New run form (the validator's own
message for a bad field, the calc estimate), a `lorakit train` process started from it whose loss
curve gains points while it trains, its evaluation (the accuracy cell equals report.json), the
adapter registered (a traversal path refused with the server's error), and the base beside the
adapter in Compare and chat, each answer equal to `lorakit generate`'s.

With LORAKIT_UI_SCREENSHOTS=DIR the walk also saves a screenshot of each screen into DIR
(docs/ui/ holds the committed ones: `LORAKIT_UI_SCREENSHOTS=docs/ui make test-ui-shots`, see
docs/ui.md).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.ui.helpers import make_sweep, make_workspace, ui_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium on this machine: `apt-get install chromium` (make setup does it as root) "
           "to run the web UI's browser tests")
PROMPT = "what colour is the bike? the bike is red 7"
MAX_TOKENS = 12


def _generate(root: Path, adapter: Path | None) -> subprocess.Popen:
    """`lorakit generate` as a user runs it, greedy, on the same base (started, not awaited)."""
    argv = [sys.executable, "-m", "lorakit", "generate", "--model", str(root / "base"),
            "--prompt", PROMPT, "--max-new-tokens", str(MAX_TOKENS), "--dtype", "fp32",
            "--device", "cpu"] + (["--adapter", str(adapter)] if adapter else [])
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _answer(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    return out.strip()


def _points(page) -> int:
    return int(page.get_attribute("#chart-loss svg", "data-points") or 0)


def test_life_of_an_adapter_in_the_browser(tmp_path):
    from playwright.sync_api import expect, sync_playwright

    shots = os.environ.get("LORAKIT_UI_SCREENSHOTS")
    root = make_workspace(tmp_path / "work")
    if shots:  # the Adapters screen's picture shows a sweep too
        make_sweep(root)
    base_answer = _generate(root, None)  # runs while the browser works
    with ui_server(root) as (url, _service, _runs), sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1360, "height": 900})
        page.set_default_timeout(60_000)
        expect.set_options(timeout=60_000)

        def shot(name):
            if shots:
                page.screenshot(path=str(Path(shots) / f"{name}.png"), full_page=True)

        # New run: a bad field gets the YAML path's message; then a valid form shows calc.
        page.goto(f"{url}/ui/#new")
        fields = {"name": "run1", "model.name": "base", "model.device": "cpu",
                  "data.train": "data/train.jsonl", "data.val_fraction": "0.25",
                  "data.max_seq_len": "64", "eval.data": "data/test.jsonl", "lora.r": "4",
                  "lora.lora_alpha": "8", "lora.target_modules": "all-linear",
                  "train.max_steps": "60", "train.batch_size": "4", "train.lr": "-1",
                  "train.warmup_ratio": "0", "train.eval_every": "20", "train.save_every": "20"}
        for name, value in fields.items():
            page.fill(f"#new-form [name='{name}']", value)
        page.select_option("#new-form [name='model.dtype']", "fp32")
        (root / "bad.yaml").write_text(yaml.safe_dump({"data": {"train": "x.jsonl"},
                                                       "train": {"lr": -1}}))
        from lorakit.config import load_config
        from lorakit.errors import ConfigError

        with pytest.raises(ConfigError) as yaml_error:
            load_config(root / "bad.yaml")
        expected = next(line.strip() for line in str(yaml_error.value).splitlines()
                        if "train.lr" in line)
        expect(page.locator("#form-errors")).to_contain_text(expected)
        page.fill("#new-form [name='train.lr']", "0.005")
        expect(page.locator("#form-check")).to_have_text("the config is valid")
        expect(page.locator("#calc-table tr[data-key='trainable parameters']")).to_contain_text("8,192")
        shot("new-run")

        # Start it; the loss curve gains points while the run is running.
        page.click("#new-start")
        expect(page.locator("#run-name")).to_have_text("run1")
        page.wait_for_function("() => +(document.querySelector('#chart-loss svg')"
                               "?.getAttribute('data-points') || 0) >= 2")
        first = _points(page)
        assert page.get_attribute("#run-detail", "data-status") == "running"
        page.wait_for_function(f"() => +document.querySelector('#chart-loss svg')"
                               f".getAttribute('data-points') > {first}")
        assert page.get_attribute("#run-detail", "data-status") == "running", \
            "the run ended before the page saw its curve grow"
        expect(page.locator("#run-detail")).to_have_attribute("data-status", "finished",
                                                              timeout=240_000)
        rows = [json.loads(x) for x in (root / "run1" / "metrics.jsonl").read_text().splitlines()]
        page.wait_for_function("() => +document.querySelector('#chart-loss svg')"
                               f".getAttribute('data-points') === {sum('loss' in r for r in rows)}")
        shot("runs")

        # Evaluation: the accuracy cells are report.json's.
        report = json.loads((root / "run1" / "eval" / "report.json").read_text())
        page.click("#run-eval")
        for column in ("base", "adapter"):
            accuracy = f"{100 * report[column]['report']['accuracy']:.1f}%"
            expect(page.locator(f"#eval-summary td[data-col='{column}'][data-metric='accuracy']")
                   ).to_have_text(accuracy)
        adapter = report["adapter"]["report"]
        label = report["labels"][0]
        expect(page.locator(f"#eval-per-class td[data-col='adapter'][data-class='{label}']"
                            "[data-metric='F1']")).to_have_text(
            f"{100 * adapter['per_class'][label]['f1']:.1f}%")
        counts = [int(x) for x in page.eval_on_selector_all(
            "#eval-heatmap rect.hm-cell", "cells => cells.map(c => c.dataset.count)")]
        assert counts == [v for row in adapter["confusion_matrix"] for v in row]
        wrong = [t for t, p in zip(report["adapter"]["y_true"], report["adapter"]["predictions"])
                 if t != p]
        expect(page.locator("#eval-wrong tbody tr")).to_have_count(len(wrong))
        if wrong:
            page.select_option("#wrong-filter", wrong[0])
            expect(page.locator("#eval-wrong tbody tr")).to_have_count(wrong.count(wrong[0]))
        shot("evaluation")

        # Adapters: a traversal path gets the server's error; the run's adapter registers.
        page.goto(f"{url}/ui/#adapters")
        page.fill("#reg-form [name=name]", "escape")
        page.fill("#reg-form [name=path]", "../../etc")
        page.click("#reg-form button")
        expect(page.locator("#reg-error")).to_contain_text("'..' is refused")
        page.fill("#reg-form [name=name]", "run1")
        page.fill("#reg-form [name=path]", "run1/adapter")
        page.click("#reg-form button")
        expect(page.locator("#adapters-table tr[data-adapter='run1']")).to_have_count(1)
        expect(page.locator("#reg-error")).to_be_hidden()
        expect(page.locator("td[data-eval='run1']")).to_contain_text(
            f"accuracy {100 * adapter['accuracy']:.1f}%")
        page.click("#adapters-table tr[data-adapter='run1'] button[data-action='check']")
        expect(page.locator("#check-out")).to_contain_text("check-adapter run1")
        shot("adapters")

        # Compare and chat: base and adapter side by side equal `lorakit generate`'s answers.
        adapter_answer = _generate(root, root / "run1" / "adapter")
        page.goto(f"{url}/ui/#compare")
        page.check("#chat-models input[value='run1']")
        page.fill("#chat-prompt", PROMPT)
        page.fill("#s-max_tokens", str(MAX_TOKENS))
        page.click("#chat-send")
        expect(page.locator(".answer[data-done='1']")).to_have_count(2)
        shot("compare")
        got = {m: page.inner_text(f".answer[data-model='{m}'] .text").strip()
               for m in (str(root / "base"), "run1")}
        want = {str(root / "base"): _answer(base_answer), "run1": _answer(adapter_answer)}
        assert got == want
        assert want["run1"] != want[str(root / "base")], "the adapter should change the answer"
        browser.close()


def test_the_page_asks_for_the_key_and_then_works(tmp_path):
    from playwright.sync_api import expect, sync_playwright

    key = "ui-browser-key-42"
    root = make_workspace(tmp_path / "work")
    with ui_server(root, api_key=key) as (url, _service, _runs), sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(f"{url}/ui/")
        expect(page.locator("#keybar")).to_be_visible()
        expect(page.locator("#toast")).to_contain_text("Missing or incorrect API key")
        page.fill("#key", "wrong-key-000")
        page.click("#key-save")
        expect(page.locator("#keybar")).to_be_visible()
        page.fill("#key", key)
        page.click("#key-save")
        expect(page.locator("#runs-root")).to_have_text(str(root.resolve()))
        expect(page.locator("#keybar")).to_be_hidden()
        page.goto(f"{url}/ui/#compare")
        expect(page.locator("#chat-models input")).to_have_count(1)  # the key lasts the tab
        browser.close()
