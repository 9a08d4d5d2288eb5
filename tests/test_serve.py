"""``bytemtp serve``: a real server on a loopback port, driven by the official ``openai`` client and httpx."""

from __future__ import annotations

import base64
import json
import multiprocessing
import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from fixtures_train import trained_model
from serve_support import metric, running_server, sse_events
from test_batching import alone, corpus_prompts
from test_generate import random_model

from bytemtp import BOS
from bytemtp.decode.generate import GenerationConfig, generate
from bytemtp.serve.server import listen


@pytest.fixture(scope="module")
def url():
    with running_server(trained_model(), max_batch=4, max_queue=16) as url:
        yield url


def complete(url: str, **body) -> dict:
    r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", **body}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def stream(url: str, **body) -> list:
    with httpx.stream("POST", f"{url}/v1/completions", json={"model": "tiny", "stream": True, **body}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        return sse_events(r.iter_lines())


def streamed_text(events: list, index: int = 0) -> str:
    return "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"][0]["index"] == index)


PROMPTS = [b"", *corpus_prompts([5, 40, 17, 23])]


def test_openai_client_plain_streamed_and_a_list_of_prompts(url):
    model = trained_model()
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    want = [alone(model, p, max_new_bytes=40, speculative=False).decode() for p in PROMPTS[1:4]]
    plain = client.completions.create(model="tiny", prompt=PROMPTS[1].decode(), max_tokens=40, temperature=0)
    assert plain.choices[0].text == want[0] and plain.usage.completion_tokens == len(want[0].encode())
    assert plain.choices[0].finish_reason in ("length", "stop")
    chunks = client.completions.create(model="tiny", prompt=PROMPTS[2].decode(), max_tokens=40, temperature=0,
                                       stream=True)
    assert "".join(c.choices[0].text for c in chunks) == want[1]
    listed = client.completions.create(model="tiny", prompt=[p.decode() for p in PROMPTS[1:4]], max_tokens=40,
                                       temperature=0)
    assert [c.index for c in listed.choices] == [0, 1, 2]
    assert [c.text for c in listed.choices] == want
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=4)


def test_concurrent_greedy_requests_equal_single_ones_and_seeded_samples_repeat(url):
    """Ten requests at once through four rows (joining and leaving mid-batch), greedy and sampled
    mixed: each greedy answer is greedy decoding alone, byte for byte; a seeded sampled request
    gets the same bytes each time, and what its settings give alone."""
    model = trained_model()
    prompts = corpus_prompts([3 * i + 2 for i in range(8)], start=5000)
    sampled = dict(prompt=prompts[0].decode(), max_tokens=50, temperature=0.9, top_k=30, seed=11)
    bodies = [dict(prompt=p.decode(), max_tokens=20 + 9 * i, temperature=0) for i, p in enumerate(prompts)]
    bodies[3:3] = [sampled]
    bodies.append(sampled)
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda b: complete(url, **b)["choices"][0]["text"], bodies))
    for body, answer in zip(bodies, answers):
        if body["temperature"] == 0:
            assert answer.encode() == alone(model, body["prompt"].encode(), max_new_bytes=body["max_tokens"],
                                            speculative=False)
    assert answers[3] == answers[-1]
    config = GenerationConfig(max_new_bytes=50, temperature=0.9, top_k=30, seed=11)
    assert answers[3].encode() == generate(model, config, [prompts[0]]).read()


def test_streaming_frames_and_stop_string_across_chunks(url):
    model = trained_model()
    prompt = PROMPTS[3]
    events = stream(url, prompt=prompt.decode(), max_tokens=80, temperature=0)
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
    full = streamed_text(events)
    assert full.encode() == alone(model, prompt, max_new_bytes=80, speculative=False)
    # a stop string that straddles two chunks: never sent, and the text ends right before it
    ends = [len("".join(e["choices"][0]["text"] for e in events[: i + 1])) for i in range(len(events) - 1)]
    cut = next(b for b in ends if b >= 8 and full.find(full[b - 3 : b + 3]) == b - 3 and b + 3 <= len(full))
    stop = full[cut - 3 : cut + 3]
    events = stream(url, prompt=prompt.decode(), max_tokens=80, temperature=0, stop=[stop, "\x00never"])
    assert streamed_text(events) == full[: cut - 3]
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    assert not any(stop[:1] and stop in e["choices"][0]["text"] for e in events[:-1])


def test_a_character_split_across_steps_is_never_split_across_chunks():
    """High-temperature bytes from random weights: multi-byte characters and invalid bytes, about one
    byte per step. The streamed chunks decode, each alone, to exactly the text of the whole."""
    model = random_model(n_future=4, max_seq_len=128)
    with running_server(model) as url:
        # a random model may end its document (a BOS) early: the first seed that gives a long text
        # holding a real multi-byte character is the test's
        for seed in range(20):
            body = dict(prompt="\u00e9t\u00e9 ", max_tokens=300, temperature=3.0, seed=seed)
            whole = complete(url, **body)["choices"][0]
            data = base64.b64decode(whole["bytemtp"]["base64"])
            if len(data) > 50 and any(len(ch.encode()) > 1 and ch != "\ufffd" for ch in whole["text"]):
                break
        else:
            pytest.fail("no seed gave 50 bytes with a multi-byte character")
        assert data.decode("utf-8", "replace") == whole["text"]
        assert whole["bytemtp"]["bytes"] == len(data) < len(whole["text"].encode())  # U+FFFD is 3 bytes of text
        events = stream(url, **body)
        assert streamed_text(events) == whole["text"]


@pytest.mark.parametrize(
    "body, param",
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        (json.dumps({"prompt": 3}).encode(), "prompt"),
        (json.dumps({"prompt": [1, 2, 3]}).encode(), "prompt"),
        (json.dumps({"prompt": []}).encode(), "prompt"),
        (json.dumps({"max_tokens": 3}).encode(), "prompt"),
        (json.dumps({"prompt": "x", "max_tokens": -1}).encode(), "max_tokens"),
        (json.dumps({"prompt": "x", "max_tokens": 10**12}).encode(), "max_tokens"),
        (json.dumps({"prompt": "x", "max_tokens": "5"}).encode(), "max_tokens"),
        (json.dumps({"prompt": "x", "temperature": -0.5}).encode(), "temperature"),
        (b'{"prompt": "x", "temperature": NaN}', "temperature"),
        (b'{"prompt": "x", "temperature": Infinity}', "temperature"),
        (json.dumps({"prompt": "x", "top_p": 0}).encode(), "top_p"),
        (json.dumps({"prompt": "x", "top_p": 1.5}).encode(), "top_p"),
        (json.dumps({"prompt": "x", "top_k": 2.5}).encode(), "top_k"),
        (json.dumps({"prompt": "x", "stop": ""}).encode(), "stop"),
        (json.dumps({"prompt": "x", "stop": [3]}).encode(), "stop"),
        (json.dumps({"prompt": "x", "seed": -1}).encode(), "seed"),
        (json.dumps({"prompt": "x", "stream": "yes"}).encode(), "stream"),
        (json.dumps({"prompt": "x", "logprobs": 99}).encode(), "logprobs"),
        (json.dumps({"prompt": "x" * 200, "logprobs": 1, "max_tokens": 1}).encode(), "logprobs"),
        (json.dumps({"prompt": "x", "n": 2}).encode(), "n"),
        (json.dumps({"prompt": "x", "model": 7}).encode(), "model"),
    ],
)
def test_bad_requests_answer_400_in_openai_shape(url, body, param):
    r = httpx.post(f"{url}/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


def test_unknown_paths_models_and_oversized_bodies(url):
    r = httpx.get(f"{url}/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/completions", json={"model": "other", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "x" * 70_000})
    assert r.status_code == 413 and r.json()["error"]["message"]
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    assert metric(url, "bytemtp_requests_total") == 0  # labelled: only the per-outcome samples exist
    assert metric(url, "vllm:spec_decode_num_draft_tokens_total") > 0


def test_echo_and_logprobs_are_head_ones_teacher_forced_log_probabilities(url):
    model = trained_model()
    prompt = PROMPTS[2]
    scored = complete(url, prompt=prompt.decode(), max_tokens=0, echo=True, logprobs=3)["choices"][0]
    assert scored["text"] == prompt.decode()
    ids = torch.tensor([[BOS, *prompt]])
    with torch.no_grad():
        logits = model.head_logits(model.trunk(ids[:, :-1]), 0)[0].double()  # head 1: 0-based k = 0
    want = logits.log_softmax(-1)[torch.arange(len(prompt)), ids[0, 1:]]
    lp = scored["logprobs"]
    assert lp["tokens"] == list(prompt.decode()) and len(lp["top_logprobs"]) == len(prompt)
    # float32 log-softmax over 257 logits of magnitude ~10: rounding well below 1e-4
    torch.testing.assert_close(torch.tensor(lp["token_logprobs"], dtype=torch.float64), want, rtol=0, atol=1e-4)
    assert all(max(top.values()) >= chosen - 1e-6 for top, chosen in zip(lp["top_logprobs"], lp["token_logprobs"]))
    generated = complete(url, prompt=prompt.decode(), max_tokens=12, temperature=0, logprobs=1)["choices"][0]
    assert len(generated["logprobs"]["tokens"]) == len(generated["text"].encode())


def test_a_full_queue_answers_429_and_a_disconnect_frees_its_row():
    """One row, one place in the queue: a streaming request holds the row (random weights, greedy: a
    long loop of bytes), a second waits, a third is refused; the first client leaves, its row is
    retired at the next step and the waiting request runs."""
    with running_server(random_model(max_seq_len=128), max_batch=1, max_queue=1) as url:
        long = {"prompt": "def ", "max_tokens": 60_000, "temperature": 0, "stream": True}
        with httpx.Client(timeout=60) as first, first.stream("POST", f"{url}/v1/completions", json=long) as r:
            lines = r.iter_lines()
            next(lines)  # decoding: the one row is taken
            with ThreadPoolExecutor(1) as pool:
                queued = pool.submit(httpx.post, f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 5},
                                     timeout=60)
                wait_until(lambda: metric(url, "bytemtp_queue_depth") == 1)
                full = httpx.post(f"{url}/v1/completions", json={"prompt": "y", "max_tokens": 5})
                assert full.status_code == 429 and full.headers["retry-after"] == "1"
                assert full.json()["error"]["type"] == "rate_limit_error"
                assert next(lines) == ""  # still streaming: the long request holds its row
                r.close()  # the streaming client leaves: its row is retired, the queued request runs
                assert queued.result().status_code == 200
        wait_until(lambda: metric(url, 'bytemtp_requests_total{outcome="cancelled"}') == 1)
        wait_until(lambda: metric(url, "bytemtp_running_rows") == 0)


def test_an_engine_that_dies_fails_its_requests_and_the_health_check():
    """The engine runs in a process of its own. Killed mid-request, its streaming client gets an
    error event at once (no hang), the next request a 503, and ``/health`` turns 503."""
    others = set(multiprocessing.active_children())  # the engines of other tests' servers
    with running_server(random_model(max_seq_len=128), max_batch=1) as url:
        (engine,) = [p for p in multiprocessing.active_children() if p.name == "bytemtp-engine" and p not in others]
        long = {"prompt": "def ", "max_tokens": 60_000, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=long, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: {") and next(lines) == ""  # decoding
            os.kill(engine.pid, signal.SIGKILL)
            events = sse_events(lines)
        assert events[-1]["error"]["type"] == "server_error", events[-1]
        assert all("choices" in e for e in events[:-1])
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 5})
        assert r.status_code == 503 and "stopped" in r.json()["error"]["message"]
        assert httpx.get(f"{url}/health").status_code == 503


def wait_until(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out: {condition.__code__.co_consts}"
        time.sleep(0.01)


def test_the_playground_page_is_served(url):
    r = httpx.get(url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "/v1/completions" in r.text and 'id="prompt"' in r.text and "drafted" in r.text


def test_connections_send_small_writes_at_once():
    """The server's connections have Nagle's algorithm off: a response's headers and body are two
    small writes, and on a kept-alive connection the body would otherwise wait 40 ms for the
    client's delayed ACK. The accepted socket is what a client's connection gets."""
    with listen("127.0.0.1", 0) as sock, socket.create_connection(sock.getsockname()[:2]):
        conn, _ = sock.accept()
        with conn:
            assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
