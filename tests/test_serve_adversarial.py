"""`modeldeploy serve` against hostile and careless clients: real processes on the real all-MiniLM-L6-v2 and the tiny
random generators, spoken to over raw HTTP. Every refusal is checked for its exact status, the called protocol's
error shape (OpenAI `{"error": {"message", "type", "param", "code"}}`, KServe v2 `{"error": "..."}`) and the field
it names; the server must answer the next request afterwards.

Bad inputs tried:
- sizes: two million inputs (OpenAI and v2), 1025 inputs (over `--max-inputs 1024`), a 5 MiB body (over
  `--max-body-mb 4`), 9 texts against `--max-queue 8` (idle and busy alike), a text over the model's 256 tokens;
- bodies: invalid JSON, JSON nested 100 000 deep, invalid UTF-8, a JSON array instead of an object;
- texts: numbers, null among strings, an empty string, a blank string, an empty list, an object;
- numbers: `max_tokens` "x", 1e400 (inf), -1, 0, 2.5, true, over `--max-new-tokens-limit`, past the context;
  `temperature` -0.5 and NaN; `top_p` 0 and 1.5; `dimensions` 0, 385 (MiniLM has 384) and NaN;
  `max_completion_tokens` -3; the same parameters through KServe v2 (`parameters.max_tokens` "x" and 1e400,
  `parameters.temperature` -1, five stop strings);
- others: `n: 2`, `stream: "yes"`, five stop strings, an empty stop string, a number as stop, two prompts, an
  unknown `encoding_format`, chat with no messages, an unknown role and an image part, an unknown model name
  (OpenAI and v2), KServe v2 with a FP32 tensor, a shape that does not match, two input tensors and numbers as
  data, two prompts to a v2 generator, an endpoint of another task, an unknown path and a wrong method;
- behaviour: `stop: "abc"` on v2 is one stop string, as on OpenAI; a request past `--request-timeout` (504, the
  stream ending with an error event) and a client that goes away (streaming and not) stop their generation; liveness
  and metrics answer while a big request is tokenized."""

from __future__ import annotations

import http.client
import json
import threading
import urllib.error
import urllib.request

import pytest

from tests.helpers import wait_for
from tests.models import MINILM, TINY_GENERATOR
from tests.serve_fixtures import LONG_GENERATOR, cache, embedder, generator, get, metric, serve  # noqa: F401

V2_EMBED = f"/v2/models/{MINILM}/infer"
V2_GENERATE = f"/v2/models/{TINY_GENERATOR}/infer"
FIELDS = {"message", "type", "param", "code"}


def v2_texts(data, **tensor) -> dict:
    return {"inputs": [{"name": "text", "datatype": "BYTES", "data": data, **tensor}]}


def v2_prompt(**parameters) -> dict:
    return {**v2_texts(["the weather"]), "parameters": parameters}


def call(url: str, body=None, method: str = "POST") -> tuple[int, dict, dict]:
    """Status, JSON answer and headers; `body` bytes go as they are, anything else as JSON."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), dict(error.headers)


def assert_error(url: str, path: str, answer: dict, status: int, field: str | None, fragment: str) -> None:
    """The protocol's own error shape, naming `field` (OpenAI: as `param`; v2: in the message)."""
    if path.startswith("/v2/"):
        assert set(answer) == {"error"} and isinstance(answer["error"], str), answer
        message = answer["error"]
        if field:
            assert field in message, message
    else:
        error = answer["error"]
        assert set(error) == FIELDS and error["code"] == status and error["param"] == field, error
        assert isinstance(error["type"], str) and error["type"], error
        message = error["message"]
    assert fragment in message, message
    assert get(f"{url}/v2/health/ready")[0] == 200      # and the server is still up


WORDS = " ".join(f"word{i}" for i in range(80))       # 176 tokens for MiniLM's tokenizer

EMBEDDER_CASES = [
    # sizes
    ("/v1/embeddings", {"input": [""] * 2_000_000}, 413, None, "larger than this server takes (4 MiB)"),
    (V2_EMBED, v2_texts([""] * 2_000_000), 413, None, "larger than this server takes (4 MiB)"),
    ("/v1/embeddings", {"input": ["a"] * 1025}, 413, "input", "1025 texts; this server takes at most 1024"),
    (V2_EMBED, v2_texts(["a"] * 1025), 413, "inputs[0].data", "1025 texts; this server takes at most 1024"),
    ("/v1/embeddings", b'{"input": "' + b"a" * (5 * 2**20) + b'"}', 413, None, "larger than"),
    (V2_EMBED, b'{"inputs": "' + b"a" * (5 * 2**20) + b'"}', 413, None, "larger than"),
    ("/v1/embeddings", {"input": "word " * 400}, 400, "input", "input[0] has 402 tokens; this model takes at most 256"),
    # bodies
    ("/v1/embeddings", b"{not json", 400, None, "not valid JSON"),
    ("/v1/embeddings", b"[" * 100_000, 400, None, "not valid JSON"),
    ("/v1/embeddings", b'{"input": "\xff"}', 400, None, "not valid JSON"),
    ("/v1/embeddings", [1, 2], 400, None, "must be a JSON object"),
    (V2_EMBED, b"{not json", 400, None, "not valid JSON"),
    # texts
    ("/v1/embeddings", {"input": [1, 2]}, 400, "input", "input[0]: Input should be a valid string"),
    ("/v1/embeddings", {"input": ["ok", None]}, 400, "input", "input[1]: Input should be a valid string"),
    ("/v1/embeddings", {"input": ""}, 400, "input", "input[0]: is empty"),
    ("/v1/embeddings", {"input": ["ok", "  \n"]}, 400, "input", "input[1]: is empty"),
    ("/v1/embeddings", {"input": []}, 400, "input", "input: must not be empty"),
    ("/v1/embeddings", {"input": {"a": 1}}, 400, "input", "must be a string or a list of strings"),
    (V2_EMBED, v2_texts([1.5]), 400, "inputs[0].data[0]", "Input should be a valid string"),
    (V2_EMBED, v2_texts([]), 400, "inputs[0].data", "must not be empty"),
    # other fields
    ("/v1/embeddings", {"input": "a", "encoding_format": "hex"}, 400, "encoding_format", "'float' or 'base64'"),
    ("/v1/embeddings", {"input": "a", "dimensions": 385}, 400, "dimensions", "at most 384"),
    ("/v1/embeddings", {"input": "a", "dimensions": 0}, 400, "dimensions", "greater than or equal to 1"),
    ("/v1/embeddings", b'{"input": "a", "dimensions": NaN}', 400, "dimensions", "valid integer"),
    ("/v1/embeddings", {"model": "gpt-4", "input": "a"}, 404, "model", "'gpt-4' does not exist"),
    ("/v2/models/other/model/infer", v2_texts(["a"]), 404, None, "'other/model' not found"),
    (V2_EMBED, {"inputs": [{"name": "t", "datatype": "FP32", "data": [1.0]}]}, 400, "inputs[0].datatype",
     "Input should be 'BYTES'"),
    (V2_EMBED, v2_texts(["a"], shape=[3]), 400, "inputs[0]", "shape [3] does not match its 1 elements"),
    (V2_EMBED, {"inputs": v2_texts(["a"])["inputs"] * 2}, 400, "inputs", "at most 1 item"),
    (V2_EMBED, {"inputs": []}, 400, "inputs", "at least 1 item"),
    ("/v1/completions", {"prompt": "x"}, 400, None, "serves feature-extraction"),
    ("/v1/nothing-here", {"input": "a"}, 404, None, "Not Found"),
    ("/v2/nothing-here", {}, 404, None, "Not Found"),
]


@pytest.mark.parametrize("path,body,status,field,fragment", EMBEDDER_CASES)
def test_bad_requests_to_an_embedder(embedder, path, body, status, field, fragment):
    code, answer, _ = call(f"{embedder.url}{path}", body)
    assert code == status, answer
    assert_error(embedder.url, path, answer, status, field, fragment)


def test_a_wrong_method_is_answered_in_the_protocols_shape(embedder):
    code, answer, headers = call(f"{embedder.url}/v1/embeddings", method="GET")
    assert code == 405 and headers["Allow"] == "POST"
    assert_error(embedder.url, "/v1/embeddings", answer, 405, None, "Method Not Allowed")


GENERATOR_CASES = [
    ("/v1/completions", {"prompt": "x", "max_tokens": "x"}, "max_tokens", "valid integer"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 1e400}', "max_tokens", "valid integer"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, "max_tokens", "greater than or equal to 1"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2.5}, "max_tokens", "valid integer"),
    ("/v1/completions", {"prompt": "x", "max_tokens": True}, "max_tokens", "valid integer"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 5000}, "max_tokens", "at most 4096 on this server"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 200}, "max_tokens", "the model's 128-token context"),
    ("/v1/completions", {"prompt": "x", "temperature": -0.5}, "temperature", "greater than or equal to 0"),
    ("/v1/completions", b'{"prompt": "x", "temperature": NaN}', "temperature", "finite number"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p", "greater than 0"),
    ("/v1/completions", {"prompt": "x", "top_p": 1.5}, "top_p", "less than or equal to 1"),
    ("/v1/completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4 items"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, "stop", "stop[0]: String should have at least 1 character"),
    ("/v1/completions", {"prompt": "x", "stop": 42}, "stop", "valid list"),
    ("/v1/completions", {"prompt": "x", "n": 2}, "n", "Input should be 1"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, "stream", "valid boolean"),
    ("/v1/completions", {"prompt": ["a", "b"]}, "prompt", "at most 1 item"),
    ("/v1/chat/completions", {"messages": []}, "messages", "at least 1 item"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages",
     "messages[0].role: Input should be 'system', 'user'"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages",
     "messages[0].content[0].type: Input should be 'text'"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": -3},
     "max_completion_tokens", "greater than or equal to 1"),
    ("/v1/embeddings", {"input": "x"}, None, "serves text-generation"),
    (V2_GENERATE, v2_prompt(max_tokens="x"), "parameters.max_tokens", "valid integer"),
    (V2_GENERATE, b'{"inputs": [{"name": "t", "datatype": "BYTES", "data": ["x"]}], "parameters": '
                  b'{"max_tokens": 1e400}}', "parameters.max_tokens", "valid integer"),
    (V2_GENERATE, v2_prompt(temperature=-1), "parameters.temperature", "greater than or equal to 0"),
    (V2_GENERATE, v2_prompt(stop=["a", "b", "c", "d", "e"]), "parameters.stop", "at most 4 items"),
    (V2_GENERATE, v2_texts(["a", "b"]), "inputs[0].data", "one prompt per request"),
]


@pytest.mark.parametrize("path,body,field,fragment", GENERATOR_CASES)
def test_bad_generation_parameters_are_400s_before_any_generation(generator, path, body, field, fragment):
    before = metric(generator, "model_batch_size_count", model_name=TINY_GENERATOR)
    code, answer, _ = call(f"{generator.url}{path}", body)
    assert code == 400, answer
    field = field if path.startswith("/v2/") else (field.split(".")[0] if field else None)
    assert_error(generator.url, path, answer, 400, field, fragment)
    assert metric(generator, "model_batch_size_count", model_name=TINY_GENERATOR) == before   # no model code ran


def test_a_v2_stop_string_is_one_stop_string_as_in_openai(generator):
    def text(protocol: str, **parameters) -> str:
        if protocol == "v2":
            code, answer, _ = call(f"{generator.url}{V2_GENERATE}", v2_prompt(temperature=0, **parameters))
            assert code == 200, answer
            return answer["outputs"][0]["data"][0]
        code, answer, _ = call(f"{generator.url}/v1/completions",
                               {"prompt": "the weather", "temperature": 0, **parameters})
        assert code == 200, answer
        return answer["choices"][0]["text"]

    full = text("v2", max_tokens=20)
    # A three-character stop with a character seen before it: cut at the string, not at that character.
    start = next(i for i in range(1, len(full) - 3) if any(c in full[:i] for c in full[i:i + 3])
                 and full.index(full[i:i + 3]) == i)
    stop = full[start:start + 3]
    assert text("v2", max_tokens=20, stop=stop) == full[:start]
    assert text("openai", max_tokens=20, stop=stop) == full[:start]


@pytest.fixture(scope="module")
def servers(cache):
    """Servers with their own limits, started side by side."""
    started = {"long": serve(cache, LONG_GENERATOR, "text-generation"),
               "impatient": serve(cache, LONG_GENERATOR, "text-generation", "--request-timeout", "1"),
               "small_queue": serve(cache, MINILM, "feature-extraction", "--max-queue", "8", "--max-batch-size", "4")}
    try:
        yield {name: server.wait_ready() for name, server in started.items()}
    finally:
        for server in started.values():
            server.stop()


def test_a_request_bigger_than_the_queue_is_refused_however_busy_the_server_is(servers):
    server = servers["small_queue"]
    nine = {"input": [f"text {i}" for i in range(9)]}
    code, answer, _ = call(f"{server.url}/v1/embeddings", nine)           # idle: an empty queue
    assert code == 413
    assert_error(server.url, "/v1/embeddings", answer, 413, None, "9 items are more than the queue holds (8")

    results, stop = [], threading.Event()

    def flood():
        while not stop.is_set():
            results.append(call(f"{server.url}/v1/embeddings", {"input": [WORDS] * 8})[0])

    flooding = [threading.Thread(target=flood) for _ in range(4)]
    for thread in flooding:
        thread.start()
    try:
        busy = wait_for(lambda: (answer := call(f"{server.url}/v1/embeddings", {"input": ["one"]}))[0] == 503
                        and answer, 60, "a 503 from the full queue", interval=0.01)
        assert busy[2]["Retry-After"] == "1", busy                       # fits the limits, not the room now
        code, answer, _ = call(f"{server.url}/v1/embeddings", nine)       # busy: the same answer as idle
        assert code == 413 and "more than the queue holds" in answer["error"]["message"], answer
    finally:
        stop.set()
        for thread in flooding:
            thread.join()
    assert set(results) <= {200, 503} and 200 in results


def stream_events(response: http.client.HTTPResponse) -> list[str]:
    return [line[len(b"data: "):].decode() for line in response.read().splitlines() if line.startswith(b"data: ")]


def settled_tokens(server) -> float:
    """Generated tokens so far, once every earlier generation is done: a one-token request queues behind them (the
    model runs one batch at a time), and its own token is not counted."""
    code, answer, _ = call(f"{server.url}/v1/completions", {"prompt": "the weather", "max_tokens": 1,
                                                            "temperature": 0})
    assert code == 200, answer
    return metric(server, "model_generated_tokens_total", model_name=LONG_GENERATOR) - \
        answer["usage"]["completion_tokens"]


def cancelled(server) -> float:
    return metric(server, "model_cancelled_requests_total", model_name=LONG_GENERATOR)


def test_a_request_past_the_time_limit_is_a_504_and_stops_its_generation(servers):
    server = servers["impatient"]
    cancelled_before, generated_before = cancelled(server), settled_tokens(server)
    long = {"prompt": "the weather", "max_tokens": 1000, "temperature": 0}
    code, answer, _ = call(f"{server.url}/v1/completions", long)
    assert code == 504
    assert_error(server.url, "/v1/completions", answer, 504, None, "longer than this server allows (1 s)")
    code, answer, _ = call(f"{server.url}/v2/models/{LONG_GENERATOR}/infer", v2_prompt(max_tokens=1000))
    assert code == 504
    assert_error(server.url, "/v2/", answer, 504, None, "longer than this server allows (1 s)")

    # A stream has sent its status already: it ends with the error as its last event.
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    connection.request("POST", "/v1/completions", json.dumps({**long, "stream": True}))
    response = connection.getresponse()
    events = stream_events(response)
    connection.close()
    assert response.status == 200 and "[DONE]" not in events and len(events) > 1, events   # tokens, then the end
    last = json.loads(events[-1])
    assert last["error"]["code"] == 504 and last["error"]["type"] == "timeout", last

    wait_for(lambda: cancelled(server) - cancelled_before == 3, 60, "three cancellations")
    generated = settled_tokens(server) - generated_before
    assert 0 < generated < 3 * 1000 / 2, generated                     # far short of their max_tokens


def test_a_generation_stops_when_its_client_goes_away(servers):
    server = servers["long"]
    # The precondition: uncut, this prompt runs to its max_tokens (no early EOS from the random weights).
    code, answer, _ = call(f"{server.url}/v1/completions", {"prompt": "the weather", "max_tokens": 50,
                                                            "temperature": 0})
    assert code == 200 and answer["usage"]["completion_tokens"] == 50, answer

    cancelled_before, generated_before = cancelled(server), settled_tokens(server)
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    connection.request("POST", "/v1/completions", json.dumps({"prompt": "the weather", "max_tokens": 1000,
                                                              "temperature": 0, "stream": True}))
    response = connection.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")   # the first chunk
    response.close()
    connection.close()
    wait_for(lambda: cancelled(server) > cancelled_before, 60, "the stream's cancellation")
    streamed = settled_tokens(server) - generated_before
    assert 0 < streamed < 100, streamed

    # Not streaming: the client gives up waiting after a second.
    cancelled_before, generated_before = cancelled(server), settled_tokens(server)
    with pytest.raises(TimeoutError):
        urllib.request.urlopen(urllib.request.Request(
            f"{server.url}/v1/completions", data=json.dumps({"prompt": "the weather", "max_tokens": 1000,
                                                             "temperature": 0}).encode()), timeout=1)
    wait_for(lambda: cancelled(server) > cancelled_before, 60, "the request's cancellation")
    assert 0 < settled_tokens(server) - generated_before < 500


def test_liveness_and_metrics_answer_while_a_big_request_is_tokenized(embedder):
    # 1024 texts are tokenized, and the last one is too long: a 400 after tokenization, with no forward pass.
    body = json.dumps({"input": [WORDS] * 1023 + [WORDS * 2]}).encode()
    sent, done, answer = threading.Event(), threading.Event(), {}

    def big():
        connection = http.client.HTTPConnection("127.0.0.1", embedder.port, timeout=120)
        connection.request("POST", "/v1/embeddings", body, {"Content-Type": "application/json"})
        sent.set()
        response = connection.getresponse()
        answer.update(status=response.status, body=json.loads(response.read()))
        connection.close()
        done.set()

    thread = threading.Thread(target=big)
    thread.start()
    sent.wait(60)
    answered = {"/v2/health/live": 0, "/metrics": 0}
    while not done.is_set():
        for path in answered:
            status = get(f"{embedder.url}{path}")[0]
            if not done.is_set():       # answered while the big request was in flight
                answered[path] += status == 200
    thread.join()
    assert answer["status"] == 400 and "input[1023] has" in answer["body"]["error"]["message"], answer
    assert min(answered.values()) >= 1, answered         # tokenizing on the event loop gives 0
