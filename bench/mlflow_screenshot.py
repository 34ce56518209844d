"""Screenshot of the MLflow UI's runs view of the demo experiment, as a person would open it.

    .venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5055 &   # after make demo
    python bench/mlflow_screenshot.py http://127.0.0.1:5055/#/experiments/1/runs docs/mlflow_runs.png

Needs ``playwright`` (pip; not part of the tested stack) and Debian's ``chromium`` (apt-get install chromium):
playwright drives the system browser, nothing is downloaded. It switches the UI to "Model training", expands
the parent run's children and adds metric columns.
"""

from __future__ import annotations

import sys


def main(url: str, out: str) -> int:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1600, "height": 900})
        page.goto(url)
        page.wait_for_timeout(6000)
        page.get_by_role("button", name="Model training").click(timeout=5000)
        page.wait_for_timeout(3000)
        page.mouse.click(319, 265)  # the parent run's expand control: show its backbone x head children
        page.wait_for_timeout(2000)
        page.get_by_role("button", name="Columns").first.click()
        page.wait_for_timeout(1500)
        for name in ("test_accuracy", "test_accuracy_ci_low", "test_accuracy_ci_high", "test_f1_macro", "test_roc_auc"):
            page.get_by_text(name, exact=True).first.click()
            page.wait_for_timeout(400)
        page.keyboard.press("Escape")
        page.mouse.click(800, 700)
        page.wait_for_timeout(1500)
        page.mouse.click(1564, 35)  # close the assistant panel
        page.wait_for_timeout(1500)
        page.screenshot(path=out)
        browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
