"""Screenshots of a pushed Label Studio project for the README, taken in a real headless Chromium.

    python docs/screenshot_labelstudio.py URL "PROJECT TITLE" CREDENTIALS_JSON OUT_DIR

CREDENTIALS_JSON is what ``segloop queue label-studio`` / ``segloop demo --label-studio`` keep in
their data directory (``credentials.json``). Needs the ``playwright`` Python package (no browser
download: it drives Debian's ``/usr/bin/chromium``); a documentation tool, not part of the tests.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def main(argv: list[str]) -> int:
    from playwright.sync_api import sync_playwright

    from dataplane.annotation.ls_project import LabelStudioTarget, find_project, project_tasks

    url, title, creds_path, out = argv
    creds = json.loads(Path(creds_path).read_text())
    ls = LabelStudioTarget(url, title, api_key=creds["api_key"]).client()
    project = find_project(ls, title)
    if project is None:
        print(f"no project {title!r} at {url}", file=sys.stderr)
        return 2
    first = project_tasks(ls, project.id)[0]["id"]
    Path(out).mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1440, "height": 820})
        page.goto(f"{url}/user/login/")
        page.fill("input[name=email]", creds["username"])
        page.fill("input[name=password]", creds["password"])
        page.press("input[name=password]", "Enter")
        page.wait_for_url(lambda u: "/login" not in u, timeout=30_000)
        page.goto(f"{url}/projects/{project.id}/data")
        page.wait_for_timeout(5000)
        page.screenshot(path=str(Path(out) / "label-studio-project.png"))
        page.goto(f"{url}/projects/{project.id}/data?tab=&task={first}")
        page.wait_for_timeout(6000)
        page.screenshot(path=str(Path(out) / "label-studio-task.png"))
        browser.close()
    print(f"screenshots of project {project.id} in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
