"""`megaseg show-segments`: the page rendered by a real browser (headless Chromium) holds one element per segment the
reward model scored, with the values of the slow reference (one sequence per forward, ends by the method's loop);
PPO samples open the same way; the page is self-contained; the colour scale is the documented one.

Chromium comes from Debian's `chromium` package: the test installs it with scripts/install_chromium.sh when it is
missing (CI runs as root on Debian) and fails with the reason when that is impossible. Set
MEGASEG_SCREENSHOT_DIR to keep the screenshot (it is always written under the test's tmp_path)."""
from __future__ import annotations

import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from megaseg.evaluation.segment_report import diverging_color, items_from_samples, render_report
from scoring_test_helpers import command_fixture, last_json_line, run_cli

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if found:
        return found
    result = subprocess.run(["bash", str(REPO / "scripts" / "install_chromium.sh")], capture_output=True, text=True,
                            timeout=900)
    if result.returncode != 0:
        pytest.fail(f"headless Chromium is needed to render the segment report and could not be installed by "
                    f"scripts/install_chromium.sh: {result.stderr[-2000:]}", pytrace=False)
    return result.stdout.strip().splitlines()[-1]


def _browser(chromium: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / "chromium-profile"
    command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--no-first-run", f"--user-data-dir={profile}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=180)


class _Segments(HTMLParser):
    """Per response (in document order): its label, data-reward and the data-* of its scored segments."""

    def __init__(self) -> None:
        super().__init__()
        self.responses: list[dict] = []
        self.unscored = 0
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        classes = (attributes.get("class") or "").split()
        for name in ("src", "href"):
            if attributes.get(name):
                self.external.append(attributes[name])
        if tag == "link":
            self.external.append(str(attributes))
        if "response" in classes:
            self.responses.append({"label": attributes["data-label"], "reward": float(attributes["data-reward"]),
                                   "segments": []})
        elif "seg" in classes:
            self.responses[-1]["segments"].append(attributes)
        elif "unscored" in classes:
            self.unscored += 1


def test_diverging_scale():
    assert diverging_color(0.3, 0.3, 1.0) == "rgb(255, 255, 255)"
    assert diverging_color(-5.0, 0.0, 1.0) == "rgb(214, 47, 39)"      # clipped to the low end
    assert diverging_color(1.0, 0.0, 1.0) == "rgb(33, 102, 172)"
    assert diverging_color(0.2, 0.0, 1.0) == "rgb(211, 224, 238)"     # a fifth of the way from white to blue


def test_ppo_samples_render_self_contained():
    samples = [{"step": 3, "prompt_id": "q1", "prompt": "<b>hi</b>", "response": "A. B", "rm_score": 0.25, "kl": 0.1,
                "segments": [{"text": "A.", "raw": 1.5, "normalized": 0.5, "p": 0.5},
                             {"text": " B", "raw": -1.0, "normalized": -0.5, "p": 1.0},
                             {"text": "<|im_end|>", "raw": None, "normalized": None, "p": None}]}]
    page = render_report(items_from_samples(samples, "samples.jsonl"), title="t", color="normalized")
    parser = _Segments()
    parser.feed(page)
    assert parser.external == []
    for marker in ("http://", "https://", "@import", "url("):
        assert marker not in page
    (response,) = parser.responses
    assert [float(s["data-raw"]) for s in response["segments"]] == [1.5, -1.0]
    assert [float(s["data-normalized"]) for s in response["segments"]] == [0.5, -0.5]
    assert parser.unscored == 1
    assert "&lt;b&gt;hi&lt;/b&gt;" in page  # text is escaped, never markup
    # normalized colours centre at 0 with the largest |value| at the ends
    assert "--c-normalized: rgb(33, 102, 172)" in page and "--c-normalized: rgb(214, 47, 39)" in page


@pytest.mark.distributed
def test_report_rendered_in_chromium_shows_the_reward_models_segments(tmp_path_factory, tmp_path, chromium):
    root, reference = command_fixture(tmp_path_factory.getbasetemp())
    page = tmp_path / "report.html"
    result = run_cli("show-segments", "--reward-model", str(root / "rm"), "--data", str(root / "pairs.jsonl"),
                     "--out", str(page))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = last_json_line(result.stdout)
    n = reference["num_pairs"]
    assert summary["items"] == n and summary["segments"] == sum(reference["segment_counts"])

    rendered = _browser(chromium, tmp_path, "--dump-dom", page.as_uri())
    assert rendered.returncode == 0, rendered.stderr[-2000:]
    parser = _Segments()
    parser.feed(rendered.stdout)
    assert parser.external == []
    assert len(parser.responses) == 2 * n
    assert sum(len(r["segments"]) for r in parser.responses) == sum(reference["segment_counts"])
    for i in range(n):
        chosen, rejected = parser.responses[2 * i], parser.responses[2 * i + 1]
        assert (chosen["label"], rejected["label"]) == ("chosen", "rejected")  # side by side, per pair
        for response, row in ((chosen, i), (rejected, n + i)):
            # abs 1e-5: the page's rewards come from packed forwards, the reference's from one sequence at a time;
            # fp32 sums in another order differ by ~1e-6 beside rewards of ~6.
            assert [float(s["data-raw"]) for s in response["segments"]] == pytest.approx(
                reference["rewards"][row], rel=1e-4, abs=1e-5)
            assert [float(s["data-p"]) for s in response["segments"]] == pytest.approx(reference["positions"][row])
            assert response["reward"] == pytest.approx(reference["sequence_rewards"][row], rel=1e-4, abs=1e-6)
            for segment in response["segments"]:
                assert int(segment["data-tokens"]) >= 1
                assert "raw " in segment["title"] and " p " in segment["title"] and "tokens" in segment["title"]

    shot = tmp_path / "report.png"
    rendered = _browser(chromium, tmp_path, f"--screenshot={shot}", "--window-size=1400,1600",
                        "--hide-scrollbars", page.as_uri())
    assert rendered.returncode == 0 and shot.is_file(), rendered.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    keep = os.environ.get("MEGASEG_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / "segment_report.png")
        shutil.copy(page, Path(keep) / "segment_report.html")
