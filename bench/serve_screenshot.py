"""Screenshot of the ``imgfeat serve`` page after uploading an image, in Debian's chromium (docs/serving_page.png).

    python bench/serve_screenshot.py --url http://127.0.0.1:8000 --image xray.jpeg --out docs/serving_page.png
"""

from __future__ import annotations

import argparse

from playwright.sync_api import sync_playwright

FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--image", required=True)
    p.add_argument("--out", default="docs/serving_page.png")
    p.add_argument("--chromium", default="/usr/bin/chromium")
    a = p.parse_args()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=a.chromium, args=FLAGS)
        page = browser.new_page(viewport={"width": 1000, "height": 900})
        page.goto(a.url)
        page.wait_for_function("document.getElementById('model').textContent.includes('+')")
        page.set_input_files("#file", a.image)
        page.wait_for_selector("#result:not([hidden])", timeout=60_000)
        page.wait_for_function("document.getElementById('heatmap').naturalWidth > 0")
        print("label:", page.text_content("#label"), "|", page.text_content("#heatcap"))
        page.screenshot(path=a.out, full_page=True)
        browser.close()


if __name__ == "__main__":
    main()
