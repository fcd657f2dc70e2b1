"""VLM-AD: OpenAI-compatible client against a scripted local server, JSON parsing, plumbing, transformers path.

No internet: a ThreadingHTTPServer on 127.0.0.1 plays the chat-completions API. Scripted replies cover valid
JSON, fenced JSON, malformed-then-valid, always malformed, 401 and 5xx/429; an "oracle" server answers from the
test's own label/mask lookup (by image hash), so scores, maps, metrics, save/load and the CLI are checked
end to end (an oracle gives image AUROC 1.0 by construction: this tests plumbing, not a VLM's skill).
The transformers backend runs a tiny random Qwen2-VL built from a config (its replies are garbage, so the
malformed-reply handling is what is asserted) and the offline missing-model error.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch

import detect
from detect.cli import main as detect_main
from detect.data import resize_mask
from detect.metrics import auroc
from detect.models.foundation.vlm_ad import VlmAd
from detect.models.foundation.vlm_ad.backends import redact
from detect.models.foundation.vlm_ad.schema import MalformedReply, parse_reply
from detect.models.foundation.vlm_ad.torch_model import paint_map
from synth.core.errors import ConfigError, InputError
from synth.core.io import read_image

SIZE = 64
KEY = "sk-test-SECRET-0123456789abcdef"
VALID = {"is_anomaly": True, "confidence": 0.8,
         "defects": [{"type": "scratch", "location": [0.25, 0.5, 0.5, 1.0], "severity": "high"}]}

Reply = tuple[int, Any, dict[str, str]]  # status, JSON body (or text), extra headers


def chat(content: str) -> Reply:
    return 200, {"id": "x", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]}, {}


class ScriptedServer:
    """/v1/chat/completions answered by ``script(request_json, call_index)``; every request is recorded."""

    def __init__(self) -> None:
        self.script: Callable[[dict[str, Any], int], Reply] = lambda body, n: chat(json.dumps(VALID))
        self.requests: list[tuple[str, dict[str, str], dict[str, Any]]] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server API)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.requests.append((self.path, dict(self.headers), body))
                    index = len(outer.requests) - 1
                status, payload, headers = (404, {"error": {"message": "no such route"}}, {}) \
                    if self.path != "/v1/chat/completions" else outer.script(body, index)
                data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out on purpose
                    pass

            def log_message(self, *args: Any) -> None:  # keep the test output quiet
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def server(monkeypatch) -> Iterator[ScriptedServer]:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    srv = ScriptedServer()
    yield srv
    srv.close()


def make(server: ScriptedServer, **options: Any) -> VlmAd:
    config = {"base_url": server.url, "model": "test-vlm", "image_size": SIZE, "k_shot": 0, "max_retries": 2,
              "retry_backoff": 0.0, "workers": 1, "cache": False, **options}
    return VlmAd(**config)


def images(n: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def image_urls(body: dict[str, Any]) -> list[str]:
    return [part["image_url"]["url"] for message in body["messages"] if isinstance(message["content"], list)
            for part in message["content"] if part["type"] == "image_url"]


def decode(url: str) -> np.ndarray:
    data = base64.b64decode(url.split(",", 1)[1])
    return cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def digest(image: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()


# ----- parsing ----------------------------------------------------------------------------------------------

def test_parse_prose_fences_and_normalisation():
    verdict = parse_reply('Sure. ```json\n{"is_anomaly": "true", "confidence": 85, "defects": [{"type": "crack", '
                          '"location": [48, 16, 16, 32], "severity": "HIGH"}, {"type": "dent", "location": '
                          '[500, 0, 1000, 250]}, "stain"]}\n``` Hope that helps.', SIZE)
    assert verdict.is_anomaly and verdict.confidence == pytest.approx(0.85) and verdict.score == pytest.approx(0.85)
    crack, dent, stain = verdict.defects
    assert crack.location == (0.25, 0.25, 0.75, 0.5) and crack.severity == "high"  # pixels of the 64-px image
    assert dent.location == (0.5, 0.0, 1.0, 0.25) and dent.severity == "medium"  # per-mille (Qwen2-VL grid)
    assert stain.location is None
    normal = parse_reply('The verdict is {"is_anomaly": false, "confidence": 0.9} as requested.', SIZE)
    assert normal.score == pytest.approx(0.1) and normal.defects == []
    nested = parse_reply('{"result": {"is_anomaly": true, "confidence": "70%", "defects": null}}', SIZE)
    assert nested.score == pytest.approx(0.7) and nested.defects == []


@pytest.mark.parametrize("reply", ["", "no json here", "[1, 2]", '{"confidence": 0.5}', '{"is_anomaly": "maybe", '
                                   '"confidence": 0.5}', '{"is_anomaly": true, "confidence": -3}',
                                   '{"is_anomaly": true, "confidence": 0.5, "defects": 7}', '{"is_anomaly": true,'])
def test_parse_malformed_is_one_error_type(reply):
    with pytest.raises(MalformedReply):
        parse_reply(reply, SIZE)


def test_redact_removes_the_key_and_partial_echoes():
    text = f"bad key {KEY}; Incorrect API key provided: sk-test-****cdef; header Bearer {KEY[:10]}"
    clean = redact(text, KEY)
    assert KEY not in clean and "cdef" not in clean and KEY[:10] not in clean and "bad key ***" in clean


def test_paint_map_boxes_severity_and_unlocalised():
    verdict = parse_reply(json.dumps(VALID), SIZE)
    amap = paint_map(verdict, SIZE)
    assert amap[40, 20] == pytest.approx(0.8) and amap[10, 10] == 0 and amap[40, 40] == 0
    verdict.defects[0].severity = "low"
    assert paint_map(verdict, SIZE)[40, 20] == pytest.approx(0.8 / 3)
    anywhere = parse_reply('{"is_anomaly": true, "confidence": 0.7, "defects": []}', SIZE)
    assert np.all(paint_map(anywhere, SIZE) == pytest.approx(0.7))
    assert not paint_map(parse_reply('{"is_anomaly": false, "confidence": 0.7}', SIZE), SIZE).any()


# ----- OpenAI-compatible client ---------------------------------------------------------------------------------

def test_request_carries_image_model_key_and_json_mode(server):
    detector = make(server)
    scores, maps = detector.model(images(1))
    assert scores.tolist() == [pytest.approx(0.8)] and maps.shape == (1, SIZE, SIZE)
    assert maps[0, 40, 20] == pytest.approx(0.8) and maps[0, 10, 10] == 0
    path, headers, body = server.requests[0]
    assert path == "/v1/chat/completions"
    assert headers["Authorization"] == f"Bearer {KEY}"
    assert body["model"] == "test-vlm" and body["response_format"] == {"type": "json_object"}
    assert body["messages"][0]["role"] == "system" and "JSON" in body["messages"][0]["content"]
    (url,) = image_urls(body)
    assert url.startswith("data:image/png;base64,")
    np.testing.assert_array_equal(decode(url), (images(1)[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())
    assert KEY not in repr(detector) and KEY not in repr(detector.model.backend)


def test_fenced_reply_and_prompt_options(server):
    server.script = lambda body, n: chat("Here you go:\n```json\n" + json.dumps(VALID) + "\n```")
    detector = make(server, object_description="a brick wall", defect_types=["spot", "scratch"])
    (verdict,) = detector.model.inspect(images(1))
    assert verdict.defects[0].type == "scratch" and verdict.attempts == 1
    user = server.requests[0][2]["messages"][1]["content"]
    text = " ".join(p["text"] for p in user if p["type"] == "text")
    assert "a brick wall" in text and "spot, scratch" in text


def test_malformed_then_valid_retries_with_correction(server):
    server.script = lambda body, n: chat("It looks fine to me." if n == 0 else json.dumps(VALID))
    (verdict,) = make(server).model.inspect(images(1))
    assert verdict.attempts == 2 and verdict.score == pytest.approx(0.8)
    retry = server.requests[1][2]["messages"]
    assert retry[-2] == {"role": "assistant", "content": "It looks fine to me."}
    assert "JSON" in retry[-1]["content"] and image_urls(server.requests[1][2])


def test_always_malformed_is_a_clear_error_or_the_fallback(server, caplog):
    server.script = lambda body, n: chat('{"is_anomaly": "perhaps"}')
    with pytest.raises(InputError, match="no usable answer in 3 attempt") as info:
        make(server).model.inspect(images(1))
    assert "fallback_score" in str(info.value) and len(server.requests) == 3
    (verdict,) = make(server, fallback_score=0.5, max_retries=0).model.inspect(images(1))
    assert verdict.score == 0.5 and "is_anomaly" in verdict.error
    assert np.all(paint_map(verdict, SIZE) == 0.5)


def test_401_names_the_env_var_and_never_shows_the_key(server, caplog, monkeypatch):
    monkeypatch.setenv("MY_VLM_KEY", KEY)
    caplog.set_level(logging.DEBUG)
    server.script = lambda body, n: (401, {"error": {"message": f"Incorrect API key provided: {KEY}."}}, {})
    with pytest.raises(InputError, match="MY_VLM_KEY") as info:
        make(server, api_key_env="MY_VLM_KEY").model.inspect(images(1))
    assert KEY not in str(info.value) and "sk-test" not in str(info.value) and "401" in str(info.value)
    assert len(server.requests) == 1  # not retried
    monkeypatch.delenv("MY_VLM_KEY")
    with pytest.raises(InputError, match="MY_VLM_KEY is not set"):
        make(server, api_key_env="MY_VLM_KEY").model.inspect(images(1))
    assert "Authorization" not in server.requests[-1][1]
    assert KEY not in caplog.text


def test_server_errors_and_rate_limits_are_retried(server, caplog):
    replies = [(500, {"error": {"message": "boom"}}, {}), (429, "slow down", {"Retry-After": "0"}),
               chat(json.dumps(VALID))]
    server.script = lambda body, n: replies[n]
    (verdict,) = make(server).model.inspect(images(1))
    assert verdict.score == pytest.approx(0.8) and len(server.requests) == 3
    assert "HTTP 500" in caplog.text and "HTTP 429" in caplog.text
    server.script = lambda body, n: (503, "down", {})
    with pytest.raises(InputError, match="failed 2 time.*HTTP 503"):
        make(server, max_retries=1).model.inspect(images(1))
    server.script = lambda body, n: (400, {"error": {"message": "response_format unsupported"}}, {})
    with pytest.raises(InputError, match="json_mode=false"):
        make(server).model.inspect(images(1))


def test_unknown_host_fails_at_once_but_dns_hiccups_are_retried(monkeypatch):
    import urllib.error
    import urllib.request

    calls: list[int] = []

    def failing_urlopen(errno: int):
        def urlopen(request, timeout=None):
            calls.append(errno)
            raise urllib.error.URLError(socket.gaierror(errno, "resolver says no"))
        return urlopen

    model = VlmAd(base_url="http://no-such-host.invalid/v1", image_size=SIZE, k_shot=0, max_retries=3,
                  retry_backoff=0.0).model
    monkeypatch.setattr(urllib.request, "urlopen", failing_urlopen(socket.EAI_NONAME))
    with pytest.raises(InputError, match="host name in base_url does not resolve"):
        model.inspect(images(1))
    assert calls == [socket.EAI_NONAME]  # no retries for a name that does not exist
    calls.clear()
    monkeypatch.setattr(urllib.request, "urlopen", failing_urlopen(socket.EAI_AGAIN))
    with pytest.raises(InputError, match="failed 4 time"):
        model.inspect(images(1))
    assert len(calls) == 4


def test_unreachable_and_slow_servers_fail_quickly(server):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    start = time.perf_counter()
    with pytest.raises(InputError, match="cannot reach the server"):
        VlmAd(base_url=f"http://127.0.0.1:{closed_port}/v1", image_size=SIZE, k_shot=0, max_retries=1,
              retry_backoff=0.0).model.inspect(images(1))
    server.script = lambda body, n: (time.sleep(1.0), chat(json.dumps(VALID)))[1]
    with pytest.raises(InputError, match="cannot reach"):
        make(server, timeout=0.2, max_retries=0).model.inspect(images(1))
    assert time.perf_counter() - start < 5


def test_parallel_workers_keep_order_and_cache_saves_requests(server):
    def by_brightness(body: dict[str, Any], n: int) -> Reply:
        mean = decode(image_urls(body)[-1]).mean() / 255
        return chat(json.dumps({"is_anomaly": True, "confidence": round(float(mean), 4), "defects": []}))

    server.script = by_brightness
    batch = torch.stack([torch.full((3, SIZE, SIZE), v) for v in (0.1, 0.5, 0.9, 0.3)])
    detector = make(server, workers=4, cache=True)
    scores, _ = detector.model(batch)
    np.testing.assert_allclose(scores.numpy(), [0.1, 0.5, 0.9, 0.3], atol=0.003)
    detector.model(batch)
    assert len(server.requests) == 4  # the second pass came from the cache


def test_constant_answers_fall_back_to_the_verdict_threshold(server, caplog):
    server.script = lambda body, n: chat('{"is_anomaly": false, "confidence": 0.95, "defects": []}')
    train = [images(1, seed)[0].permute(1, 2, 0).mul(255).byte().numpy() for seed in range(6)]
    detector = make(server, k_shot=1).fit(train, progress=False)
    assert detector.calibration.method == "vlm-verdict"
    assert "every validation image got score 0.05" in caplog.text
    assert detector.predict(train[:2]).labels.tolist() == [False, False]


def test_key_pasted_as_env_var_name_is_not_echoed():
    with pytest.raises(ConfigError, match="key 'api_key_env'") as info:
        VlmAd(api_key_env=KEY)
    assert KEY not in str(info.value)


# ----- end to end with an oracle server ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def oracle(brick_set) -> Iterator[tuple[ScriptedServer, dict[str, Any]]]:
    """A server that knows every brick image (by pixel hash): normal, or anomalous with the mask's bounding box."""
    truth: dict[str, Any] = {}
    for sample in brick_set.select():
        image = read_image(brick_set.image_path(sample))
        box = None
        if sample.is_anomalous:
            rows, cols = np.nonzero(resize_mask(brick_set.load_mask(sample), SIZE))
            box = [cols.min() / SIZE, rows.min() / SIZE, (cols.max() + 1) / SIZE, (rows.max() + 1) / SIZE]
        truth[digest(image)] = box if sample.is_anomalous else False

    def answer(body: dict[str, Any], n: int) -> Reply:
        known = truth.get(digest(decode(image_urls(body)[-1])))
        if known is None:  # e.g. the synthetic validation anomalies: undecided
            reply = {"is_anomaly": False, "confidence": 0.5, "defects": []}
        elif known is False:
            reply = {"is_anomaly": False, "confidence": 0.9, "defects": []}
        else:
            reply = {"is_anomaly": True, "confidence": 0.9,
                     "defects": [{"type": "spot", "location": known, "severity": "high"}]}
        text = json.dumps(reply)
        return chat(f"```json\n{text}\n```" if n % 2 else text)  # mix plain and fenced replies

    srv = ScriptedServer()
    srv.script = answer
    yield srv, truth
    srv.close()


ORACLE_CONFIG = {"image_size": SIZE, "k_shot": 2, "model": "oracle-vlm", "retry_backoff": 0.0, "seed": 0}


@pytest.fixture(scope="module")
def fitted(oracle, brick_set):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OPENAI_API_KEY", KEY)
        yield VlmAd(base_url=oracle[0].url, **ORACLE_CONFIG).fit(brick_set, progress=False)


def test_oracle_scores_maps_and_metrics(fitted, oracle, test_split, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    paths, labels, masks = test_split
    prediction = fitted.predict(paths)
    assert prediction.scores.shape == (len(paths),) and prediction.anomaly_maps.shape == (len(paths), SIZE, SIZE)
    np.testing.assert_allclose(prediction.scores, np.where(labels, 0.9, 0.1), atol=1e-6)
    assert auroc(prediction.scores, labels) == 1.0
    assert auroc(prediction.anomaly_maps, masks) > 0.95  # boxes around the masks
    assert prediction.labels is not None and (prediction.labels == labels).all()  # calibrated threshold
    # Every query showed the 2 normal references first, then the image.
    last = oracle[0].requests[-1][2]
    assert len(image_urls(last)) == 3 and all(oracle[1][digest(decode(u))] is False for u in image_urls(last)[:2])
    verdicts = fitted.predict_structured(paths)
    assert [v.is_anomaly for v in verdicts] == labels.tolist()
    assert all(v.defects[0].type == "spot" for v, a in zip(verdicts, labels, strict=True) if a)
    json.dumps([v.to_dict() for v in verdicts])  # serialisable


def test_save_load_round_trip_keeps_references_not_the_key(fitted, test_split, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    caplog.set_level(logging.DEBUG)
    before = fitted.predict(test_split[0])
    fitted.save(tmp_path / "vlm")
    assert KEY not in (tmp_path / "vlm" / "config.json").read_text()
    loaded = detect.load(tmp_path / "vlm")
    assert isinstance(loaded, VlmAd) and loaded.config.base_url == fitted.config.base_url
    refs = loaded.model.reference_images
    assert refs.shape == (2, SIZE, SIZE, 3) and refs.dtype == torch.uint8
    assert torch.equal(refs, fitted.model.reference_images)
    after = loaded.predict(test_split[0])  # fresh cache: asks the server again
    np.testing.assert_array_equal(before.scores, after.scores)
    np.testing.assert_array_equal(before.anomaly_maps, after.anomaly_maps)
    np.testing.assert_array_equal(before.labels, after.labels)
    assert KEY not in caplog.text


def test_same_seed_same_references(oracle, brick_set, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    train = [brick_set.image_path(s) for s in brick_set.select(split="train")][:8]
    runs = [VlmAd(base_url=oracle[0].url, **{**ORACLE_CONFIG, "seed": seed}).fit(
        train, val=train[:2], progress=False) for seed in (0, 0, 1)]
    assert torch.equal(runs[0].model.reference_images, runs[1].model.reference_images)
    assert not torch.equal(runs[0].model.reference_images, runs[2].model.reference_images)


def test_cli_fit_predict_eval(oracle, brick_set, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    out = tmp_path / "model"
    assert detect_main(["fit", "-q", "--model", "vlm_ad", "--data", str(brick_set.root), "--out", str(out),
                        "--image-size", "64", "--set", f"base_url={oracle[0].url}", "--set", "retry_backoff=0",
                        "--set", "k_shot=1"]) == 0
    assert detect.load(out).name == "vlm_ad" and KEY not in (out / "config.json").read_text()
    assert detect_main(["predict", "-q", "--model-dir", str(out),
                        *(str(brick_set.root / "test" / c) for c in ("good", "spot", "scratch")),
                        "--out", str(tmp_path / "pred")]) == 0
    assert len((tmp_path / "pred" / "scores.csv").read_text().splitlines()) == 25  # header + 24 test images
    assert detect_main(["eval", "-q", "--model-dir", str(out), "--data", str(brick_set.root),
                        "--out", str(tmp_path / "eval")]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["image_auroc"] == 1.0
    assert KEY not in caplog.text


# ----- transformers backend ------------------------------------------------------------------------------------

def build_tiny_qwen2_vl(folder: Path) -> Path:
    """A randomly initialised ~80k-parameter Qwen2-VL with a character tokenizer, saved like a hub model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
    )
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
               "<|image_pad|>", "<|video_pad|>"]
    vocab = {token: i for i, token in enumerate(special + [chr(c) for c in range(32, 127)] + ["\n"])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(special)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}"
                "{% endif %}{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                "{% endif %}")
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=56 * 56),
                                 tokenizer=fast, video_processor=Qwen2VLVideoProcessor(), chat_template=template)
    ids = {"eos_token_id": vocab["<|im_end|>"], "pad_token_id": vocab["<|endoftext|>"], "bos_token_id": None}
    config = Qwen2VLConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 2048,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2]},
                     **ids},
        vision_config={"depth": 1, "embed_dim": 32, "hidden_size": 32, "num_heads": 2, "mlp_ratio": 2,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
        image_token_id=vocab["<|image_pad|>"], video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"], vision_end_token_id=vocab["<|vision_end|>"], **ids)
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory) -> Path:
    pytest.importorskip("transformers")
    return build_tiny_qwen2_vl(tmp_path_factory.mktemp("tiny_qwen2_vl"))


def test_transformers_backend_runs_generation_and_handles_garbage(tiny_vlm, brick_set, tmp_path):
    options = {"backend": "transformers", "model": str(tiny_vlm), "image_size": SIZE, "k_shot": 1, "max_tokens": 16,
               "max_retries": 1}
    train = [brick_set.image_path(s) for s in brick_set.select(split="train")][:4]
    strict = VlmAd(**options)
    assert type(strict.model.backend.model).__name__ == "Qwen2VLForConditionalGeneration"
    with pytest.raises(InputError, match="no usable answer in 2 attempt"):
        strict.model.inspect(images(1))  # random weights: the replies are not JSON
    # fallback_score scores such images instead; verdict_threshold: no calibration requests.
    tolerant = VlmAd(**options, fallback_score=0.5, verdict_threshold=True).fit(train, progress=False)
    assert tolerant.model.reference_images.shape == (1, SIZE, SIZE, 3)
    (verdict,) = tolerant.predict_structured(train[:1])
    assert verdict.score == 0.5 and verdict.attempts == 2 and verdict.error
    prediction = tolerant.predict(train[:1])  # cached: no second generation
    assert prediction.scores.tolist() == [0.5] and np.all(prediction.anomaly_maps == 0.5)
    assert tolerant.calibration.method == "vlm-verdict" and prediction.labels.tolist() == [True]
    tolerant.save(tmp_path / "local")
    loaded = detect.load(tmp_path / "local")  # reloads the VLM from its folder; the examples come from the file
    assert torch.equal(loaded.model.reference_images, tolerant.model.reference_images)


def test_transformers_missing_model_offline_is_one_clear_error(monkeypatch, tmp_path):
    pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(InputError, match="'pixelvision-test/no-such-vlm' is not available") as info:
        VlmAd(backend="transformers", model="pixelvision-test/no-such-vlm")
    assert "--set model=" in str(info.value) and "HF_HUB_OFFLINE" in str(info.value)
    with pytest.raises(InputError, match="not found"):
        VlmAd(backend="transformers", model=str(tmp_path / "missing" / "folder"))
    with pytest.raises(InputError, match="does not hold a loadable"):
        VlmAd(backend="transformers", model=str(tmp_path))
    assert time.perf_counter() - start < 10
