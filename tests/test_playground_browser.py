"""The playground in a real browser: headless Chromium runs the page, which streams a completion."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from fixtures_train import trained_model
from serve_support import running_server

BROWSER = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


@pytest.mark.skipif(BROWSER is None, reason="no Chromium on this machine (Debian: apt-get install chromium)")
def test_the_playground_streams_a_completion_in_headless_chromium(tmp_path):
    with running_server(trained_model()) as url:
        page = f"{url}/?autorun=1&prompt=def%20"
        cmd = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path}",
               "--virtual-time-budget=20000", "--dump-dom", page]
        dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    out = re.search(r'<div id="out" data-done="(\w+)">(.*?)</div>', dom, re.S)
    assert out is not None, dom[-2000:]
    assert out.group(1) == "yes" and len(out.group(2)) > 20
    assert "bytes/forward" in dom
