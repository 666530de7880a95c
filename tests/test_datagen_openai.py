"""The OpenAI-compatible generator backend against a loopback /v1/chat/completions server.

The server (stdlib ``ThreadingHTTPServer`` on 127.0.0.1) stands in for a remote API: it
answers every request with a numbered list of well-formed prompts derived from the
request's seed (so a repeated call gets the same answer, as a seeded model would), with
an exact duplicate and a refusal mixed in now and then so filters and dedup have work.
Other test modules import :func:`loopback_server`, :func:`fake_completion` and
:func:`openai_config` from here.
"""

from __future__ import annotations

import copy
import json
import random
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from dynalign.config import GeneratorConfig
from dynalign.datagen.backends import OpenAIChatGenerator
from dynalign.rollout.base import SamplingParams
from dynalign.runtime import step_seed

_SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "ta", "vo", "si", "pe", "da", "go", "fu", "ri", "zo", "be",
              "la", "mo", "ni", "te", "sa", "ko", "vi", "ma", "po")


def fake_prompt(rng: random.Random) -> str:
    words = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4))) for _ in range(12)]
    return f"How can my {words[0]} help the {' '.join(words[1:])}?"


def fake_completion(seed: int, n: int = 4) -> str:
    """A numbered list of ``n`` distinct prompts that depends only on ``seed``.

    Every 5th seed repeats its first prompt in upper case (an exact duplicate); every 7th
    answers one item with a refusal.
    """
    rng = random.Random(seed)
    items = [fake_prompt(rng) for _ in range(n)]
    if seed % 5 == 0:
        items[-1] = items[0].upper()
    if seed % 7 == 0:
        items[1] = "I'm sorry, but I can't help with that request."
    return f"Here are {n} requests:\n\n" + "\n".join(f"{i + 1}. {p}" for i, p in enumerate(items))


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server = self.server
        with server.lock:
            server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
            fail = server.fail_next > 0
            server.fail_next -= fail
        if server.delay_s:
            time.sleep(server.delay_s)
        if self.path.rstrip("/") != "/v1/chat/completions" or fail:
            error = {"error": {"message": "unavailable", "type": "server_error"}}
            self._send(500 if fail else 404, error)
            return
        self._send(200, {
            "id": f"chatcmpl-{body.get('seed')}", "object": "chat.completion", "created": int(time.time()),
            "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": fake_completion(body.get("seed", 0))}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20},
        })

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


class _Server(ThreadingHTTPServer):
    request_queue_size = 256  # the default backlog (5) drops concurrent connections
    daemon_threads = True


@contextmanager
def loopback_server(delay_s: float = 0.0):
    """Yields ``(server, base_url)``; ``server.requests`` records every request body."""
    server = _Server(("127.0.0.1", 0), _Handler)
    server.lock, server.requests, server.delay_s, server.fail_next = threading.Lock(), [], delay_s, 0
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def openai_config(base_url: str, output_dir, **values) -> GeneratorConfig:
    """A generator config whose only model is the loopback endpoint."""
    cfg = GeneratorConfig(output_dir=str(output_dir))
    endpoint = copy.deepcopy(cfg.endpoint)
    endpoint.base_url, endpoint.max_retries, endpoint.timeout_s = base_url, 0, 10.0
    cfg.endpoint = endpoint
    cfg.models = ["openai:loopback-model"]
    for key, value in values.items():
        setattr(cfg, key, value)
    return cfg


# ------------------------------------------------------------------------- tests


def test_backend_sends_seeds_params_and_key(monkeypatch):
    monkeypatch.setenv("DATAGEN_TEST_KEY", "sk-test")
    with loopback_server() as (server, url):
        generator = OpenAIChatGenerator("m1", base_url=url, api_key_env="DATAGEN_TEST_KEY", max_retries=0,
                                        concurrency=4)
        requests = [[{"role": "user", "content": f"meta {i}"}] for i in range(6)]
        texts = generator.generate(requests, [11, 12, 13, 14, 15, 16],
                                   SamplingParams(max_new_tokens=77, temperature=0.5, top_p=0.9))
        generator.close()
    assert texts == [fake_completion(s) for s in (11, 12, 13, 14, 15, 16)]  # in request order
    by_seed = {r["seed"]: r for r in server.requests}
    assert sorted(by_seed) == [11, 12, 13, 14, 15, 16]
    first = by_seed[11]
    assert first["path"] == "/v1/chat/completions" and first["model"] == "m1"
    assert first["messages"] == [{"role": "user", "content": "meta 0"}]
    assert (first["max_tokens"], first["temperature"], first["top_p"]) == (77, 0.5, 0.9)
    assert first["auth"] == "Bearer sk-test"


def test_backend_raises_after_retries_so_the_shard_is_not_written(tmp_path):
    from dynalign.datagen import generate_prompts

    with loopback_server() as (server, url):
        server.fail_next = 1000
        cfg = openai_config(url, tmp_path / "out", num_prompts=8, calls_per_shard=2)
        with pytest.raises(Exception, match="unavailable|500|Internal"):
            generate_prompts(cfg, progress=False)
    assert not list((tmp_path / "out" / "shards").glob("shard_*.json"))


def test_endpoint_run_writes_a_dataset_with_num_prompts_rows(tmp_path):
    import datasets

    from dynalign.datagen import generate_prompts

    out = tmp_path / "out"
    with loopback_server() as (server, url):
        cfg = openai_config(url, out, num_prompts=30, calls_per_shard=4, eval_fraction=0.2)
        data = generate_prompts(cfg, progress=False)
    assert len(data["train"]) + len(data["eval"]) == 30
    loaded = datasets.load_from_disk(str(out / "dataset"))
    rows = list(loaded["train"]) + list(loaded["eval"])
    assert len(rows) == 30 and len({r["id"] for r in rows}) == 30
    assert set(loaded["train"].features) >= {
        "id", "prompt", "generator_model", "template_id", "domain", "task_type", "aspects", "sampling_seed",
        "call_index", "shard", "iteration", "timestamp", "meta_prompt", "source"}
    assert {r["source"] for r in rows} == {"generated"}
    assert {r["generator_model"] for r in rows} == {"openai:loopback-model"}
    sent = {r["seed"]: r for r in server.requests}
    for row in rows:  # each row's provenance names the request that produced it
        assert row["sampling_seed"] == step_seed(cfg.seed, 0, row["call_index"])
        request = sent[row["sampling_seed"]]
        assert request["messages"][0]["content"] == row["meta_prompt"]
        assert row["prompt"] in fake_completion(row["sampling_seed"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"] == 30 and summary["topped_up_with_seed_prompts"] == 0
    assert summary["candidates"] == (summary["kept"] + summary["filtered_total"]
                                     + sum(summary["duplicates"].values()))
    assert summary["filtered"]["refusal"] >= 1 and summary["duplicates"]["exact_duplicate"] >= 1
    assert summary["coverage"]["cells_with_generated_prompts"] >= 8
    lines = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
    assert {r["id"] for r in lines} == {r["id"] for r in rows}
    assert [r["call_index"] for r in lines] == sorted(r["call_index"] for r in lines)  # call order
    assert {r["id"] for r in lines if r["split"] == "eval"} == {r["id"] for r in loaded["eval"]}
