"""demo.py in a real browser: headless Chromium loads the page, places two objects by clicking
the canvas, generates, reads the judge's verdict and saves a screenshot (docs/demo.png, the one
README shows). Writes results/demo-browser.json.

Needs Debian's chromium and chromium-driver and the selenium package (not in requirements.txt:
only this check uses them):
    apt-get install -y chromium chromium-driver && .venv/bin/pip install selenium==4.50.0
    python bench/demo_browser.py                     # ~1 minute on 2 cores
"""
import argparse
import platform
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dataloader  # noqa: E402

ROOT = dataloader.ROOT
# Two objects (label, x, y in pixels of the 64x64 image), clicked in this order.
PLACE = [("red sphere", 18, 42), ("cyan cube", 44, 38)]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_demo(port):
    proc = subprocess.Popen([sys.executable, str(ROOT / "demo.py"), "--port", str(port)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # up once gradio prints its address
        if f"127.0.0.1:{port}" in line:
            return proc
    raise SystemExit(f"demo.py exited before serving the page (status {proc.wait()})")


def browser(chromium, chromedriver, width, height):
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu",
                f"--window-size={width},{height}"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=webdriver.ChromeService(chromedriver), options=opts)


def choose_label(driver, name):
    box = driver.find_element(By.CSS_SELECTOR, "#object input")
    box.click()
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(name)
    box.send_keys(Keys.ENTER)


def click_canvas(driver, x, y):
    """Click the canvas where pixel (x, y) of the 64x64 image is shown."""
    img = driver.find_element(By.CSS_SELECTOR, "#canvas img")
    w, h = img.size["width"], img.size["height"]
    # selenium's offsets count from the element's centre
    ActionChains(driver).move_to_element_with_offset(
        img, round((x + 0.5) / 64 * w - w / 2), round((y + 0.5) / 64 * h - h / 2)).click().perform()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chromium", default=shutil.which("chromium"),
                    help="the browser (default: chromium on PATH)")
    ap.add_argument("--chromedriver", default=shutil.which("chromedriver"),
                    help="its driver (default: chromedriver on PATH)")
    ap.add_argument("--screenshot", type=Path, default=ROOT / "docs" / "demo.png")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "demo-browser.json")
    args = ap.parse_args()
    if not (args.chromium and args.chromedriver):
        raise dataloader.DataError("no chromium or chromedriver on PATH: apt-get install -y "
                                   "chromium chromium-driver, or pass --chromium/--chromedriver")
    port = free_port()
    demo = start_demo(port)
    driver = browser(args.chromium, args.chromedriver, 1400, 1400)
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(driver, 180)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#canvas img"))
        objects = driver.find_element(By.CSS_SELECTOR, "#objects textarea")
        for k, (name, x, y) in enumerate(PLACE):
            choose_label(driver, name)
            click_canvas(driver, x, y)
            wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#objects textarea")
                       .get_attribute("value").count("@") == k + 1)
        placed = objects.get_attribute("value")
        driver.find_element(By.CSS_SELECTOR, "#marks input").click()
        t0 = time.time()
        driver.find_element(By.CSS_SELECTOR, "#generate").click()
        verdict_box = (By.CSS_SELECTOR, "#verdict textarea")
        wait.until(lambda d: d.find_element(*verdict_box).get_attribute("value")
                   .startswith("judge:"))
        seconds = time.time() - t0
        verdict = driver.find_element(*verdict_box).get_attribute("value")
        driver.execute_script("window.scrollTo(0, 0)")
        time.sleep(1)  # let the gallery's images paint
        args.screenshot.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(args.screenshot))
        chromium = driver.capabilities.get("browserVersion")
    finally:
        driver.quit()
        demo.terminate()
        demo.wait(timeout=30)
    print(f"placed: {placed}\n{verdict}\nGenerate to verdict: {seconds:.1f} s; screenshot: "
          f"{dataloader._rel(args.screenshot)}")
    dataloader.write_json(args.out, {
        "command": dataloader.command_line(), "device": platform.processor() or "cpu",
        "chromium": chromium, "placed": placed, "verdict": verdict.splitlines(),
        "generate_to_verdict_s": round(seconds, 1),
        "screenshot": dataloader._rel(args.screenshot)})


if __name__ == "__main__":
    dataloader.run_cli(main)
