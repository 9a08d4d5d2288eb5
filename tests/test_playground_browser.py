"""The playground in a real browser: headless Chromium runs the page, which streams a completion."""

from __future__ import annotations

import re
import shutil
import subprocess

import httpx
import pytest

from fixtures_train import trained_model
from serve_support import running_server

BROWSER = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


@pytest.mark.skipif(BROWSER is None, reason="no Chromium on this machine (Debian: apt-get install chromium)")
def test_the_playground_streams_a_completion_in_headless_chromium(tmp_path):
    with running_server(trained_model()) as url:
        httpx.post(f"{url}/v1/completions", json={"prompt": "def ", "max_tokens": 8}, timeout=60)  # warm
        page = f"{url}/?autorun=1&prompt=def%20"
        # the classic headless mode lets the page's fetch stream run in virtual time before the DOM is dumped
        cmd = [BROWSER, "--headless=old", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path}",
               "--virtual-time-budget=20000", "--dump-dom", page]
        # Virtual time can run out while the stream is still in flight on a loaded machine: a few tries.
        for _ in range(3):
            dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
            if 'class="drafted"' in dom:
                break
    out = re.search(r'<div id="out"[^>]*>(.*?)</div>', dom, re.S)
    assert out is not None, dom[-2000:]
    assert len(out.group(1)) > 20 and 'class="drafted"' in out.group(1), out.group(1)  # streamed, drafts shaded
    assert re.search(r'<span id="stats">[0-9.]+ bytes/(step|forward)', dom)
