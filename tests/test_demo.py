"""The demo page: the generate call behind it, the Space a release writes, and the page itself in a real headless
browser (Debian's chromium and chromium-driver, driven by selenium; skipped when they are not installed)."""

import importlib.util
import io
import os
import re
import runpy
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml
from PIL import Image, ImageChops

from diffalign.demo import NO_STEERING, Demo

WORLD = "builtin:world-sd3"
PROMPT = "a photo of a red circle left of a blue square"


@pytest.fixture(scope="module")
def demo():
    return Demo(WORLD)


def test_generate_reports_reward_and_nfe_and_the_method_changes_the_image(demo):
    plain = demo.generate(PROMPT, NO_STEERING, 0, seed=3)
    assert plain.image.size == (64, 64) and plain.nfe == 20 * 2  # 20 CFG steps, 2 NFE each
    assert 0 <= plain.reward <= 1
    again = demo.generate(PROMPT, NO_STEERING, 0, seed=3)
    assert ImageChops.difference(plain.image, again.image).getbbox() is None  # same seed, same image
    steered = demo.generate(PROMPT, "best_of_n", 200, seed=3)
    assert 160 <= steered.nfe <= 200 and steered.reward >= 0
    assert ImageChops.difference(plain.image, steered.image).getbbox() is not None
    assert f"**NFE** {steered.nfe} of 200" in steered.summary("world", "best_of_n", 200)


def test_generate_rejects_what_it_cannot_do(demo):
    with pytest.raises(ValueError, match="world's grammar"):
        demo.generate("an astronaut riding a horse", NO_STEERING, 0)
    with pytest.raises(ValueError, match="enter a prompt"):
        demo.generate("  ", "best_of_n", 200)
    with pytest.raises(ValueError, match="budget|NFE"):
        demo.generate(PROMPT, "best_of_n", 10)  # less than one sample (40 NFE)


def test_demo_command_rejects_a_bad_model_or_reward(tmp_path, capsys):
    from diffalign.cli import main

    assert main(["demo", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    if importlib.util.find_spec("gradio") is not None:
        assert main(["demo", "--reward", "no_such_reward"]) == 2
        assert "unknown reward 'no_such_reward'" in capsys.readouterr().err


def test_release_writes_a_space_that_builds_the_page(tmp_path):
    pytest.importorskip("gradio")
    from diffalign.pipelines import load_flow_model
    from diffalign.release import release

    run = tmp_path / "run"
    run.mkdir()
    flow = load_flow_model("sd3", WORLD, max_sequence_length=16)
    flow.add_lora(rank=2, alpha=2.0)
    flow.save_lora(run / "final")
    config = {"model": {"family": "sd3", "path": WORLD, "max_sequence_length": 16}, "algorithm": "flow_grpo",
              "rewards": [{"name": "world"}], "eval_prompts": "world:test",
              "sampling": {"num_steps": 8, "height": 64, "width": 64, "guidance_scale": 2.0}}  # fmt: skip
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    out = release(run, tmp_path / "rel", space=True)
    space = os.path.join(out, "space")
    assert sorted(os.listdir(space)) == ["README.md", "app.py", "requirements.txt"]
    assert "diffalign[demo]" in open(os.path.join(space, "requirements.txt")).read()
    assert "sdk: gradio" in open(os.path.join(space, "README.md")).read()
    app = runpy.run_path(os.path.join(space, "app.py"), run_name="space")["demo"]  # builds, does not serve
    assert app.demo.lora == out and app.demo.settings.steps == 8 and app.demo.settings.guidance_scale == 2.0


# -------------------------------------------------------------------------------------------- in a browser
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    pytest.importorskip("gradio")
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "GRADIO_ANALYTICS_ENABLED": "False",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    log = open(tmp_path / "demo.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "diffalign", "demo", "--port", str(port)], stdout=log,
                            stderr=subprocess.STDOUT, env=env)  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 240
    while True:
        try:
            urllib.request.urlopen(url, timeout=5)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"the demo did not start: {(tmp_path / 'demo.log').read_text()[-2000:]}")
            time.sleep(1)
    yield url
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,800"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(DRIVER), options=options)


@pytest.mark.skipif(CHROMIUM is None or DRIVER is None,
                    reason="no headless browser: apt-get install chromium chromium-driver (.ci/run does)")  # fmt: skip
def test_demo_page_in_a_headless_browser(server):
    pytest.importorskip("selenium")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _browser()
    try:
        browser.get(server)
        wait = WebDriverWait(browser, 120)
        prompt = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "#prompt textarea")))
        assert browser.title == f"diffalign demo: {WORLD}"

        def generate(method: str) -> tuple[Image.Image, str]:
            box = browser.find_element(By.CSS_SELECTOR, "#method input")
            box.click()
            box.send_keys(Keys.CONTROL, "a")
            box.send_keys(method)
            option = (By.CSS_SELECTOR, f"ul[role=listbox] li[aria-label='{method}']")
            wait.until(ec.element_to_be_clickable(option)).click()
            browser.find_element(By.CSS_SELECTOR, "#generate").click()

            def done(b) -> bool:  # the result names its method (the previous one had another method)
                idle = "hide" in b.find_element(By.CSS_SELECTOR, "#info [data-testid=status-tracker]").get_attribute(
                    "class")  # fmt: skip
                text = b.find_element(By.CSS_SELECTOR, "#info").text
                return idle and "NFE" in text and method in text

            wait.until(done)
            src = browser.find_element(By.CSS_SELECTOR, "#image img").get_attribute("src")
            with urllib.request.urlopen(src, timeout=30) as r:
                image = Image.open(io.BytesIO(r.read())).convert("RGB")
            return image, browser.find_element(By.CSS_SELECTOR, "#info").text

        prompt.clear()
        prompt.send_keys(PROMPT)
        plain, info = generate("none")
        assert plain.size == (256, 256) and "NFE 40" in info and "world" in info
        steered, info = generate("best_of_n")
        assert re.search(r"NFE \d+ of 200", info) and "best_of_n" in info
        assert ImageChops.difference(plain, steered).getbbox() is not None  # the method changed the output
    finally:
        browser.quit()
