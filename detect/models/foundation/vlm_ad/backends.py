"""VLM backends: an OpenAI-compatible chat-completions client and a local transformers image-text-to-text model.

Both take the backend-neutral messages of :mod:`.prompt` and return the reply text; parsing and the
malformed-reply retries live in :class:`~.torch_model.VlmAdModel`, so both backends share them.

The API key is read from the environment variable named by ``api_key_env`` at every request and kept nowhere
else: not in the config, the saved model, attributes, logs, reprs or error messages (:func:`redact` removes it,
and OpenAI-style partial echoes of it, from every server message that is shown).
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import os
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import cv2
import numpy as np

from detect.models.foundation.vlm_ad.prompt import Message
from detect.models.foundation.vlm_ad.schema import MalformedReply
from synth.core.errors import InputError

logger = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
MAX_RETRY_AFTER_S = 60.0
_KEY_PATTERNS = (
    re.compile(r"(Bearer\s+)\S+", re.IGNORECASE),
    # OpenAI echoes rejected keys partially ("sk-proj-****abcd"); keep only the prefix.
    re.compile(r"\b(sk-)[A-Za-z0-9_\-*.]{4,}"),
)
_LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "0.0.0.0"}


class VlmBackend(Protocol):
    """What :class:`VlmAdModel` needs from a backend."""

    concurrent: bool  # whether requests may run in parallel threads

    def complete(self, messages: list[Message]) -> str: ...

    def describe(self) -> str: ...

    def identity(self) -> str: ...

    def redact(self, text: str) -> str: ...


def redact(text: str, secret: str | None) -> str:
    """``text`` without ``secret`` and without anything that looks like a bearer token or an OpenAI key."""
    if secret:
        text = text.replace(secret, "***")
    for pattern in _KEY_PATTERNS:
        text = pattern.sub(r"\1***", text)
    return text


def png_data_url(image: np.ndarray) -> str:
    """uint8 HxWx3 RGB -> ``data:image/png;base64,...`` (lossless, so the model sees exactly the pixels)."""
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2BGR))
    if not ok:
        raise InputError("vlm_ad: could not encode an image as PNG.")
    return "data:image/png;base64," + base64.b64encode(encoded.tobytes()).decode("ascii")


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


class OpenAIChatBackend:
    """Client for ``POST {base_url}/chat/completions`` (OpenAI, Azure-style proxies, vLLM, Ollama, LM Studio ...).

    Transport failures (timeouts, refused connections, HTTP 408/409/425/429/5xx) are retried ``max_retries``
    times with exponential back-off (``retry_backoff`` * 2**attempt seconds, or the server's Retry-After);
    401/403 and other 4xx fail at once with an :class:`InputError` that names the key's environment variable.
    """

    concurrent = True

    def __init__(self, *, base_url: str, model: str, api_key_env: str, timeout: float, max_retries: int,
                 retry_backoff: float, max_tokens: int, temperature: float, seed: int, json_mode: bool,
                 image_detail: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.url = f"{self.base_url}/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self.timeout = timeout
        self.max_retries = max_retries
        self.retry_backoff = retry_backoff
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.seed = seed
        self.json_mode = json_mode
        self.image_detail = image_detail
        self._warned_plain_http = False

    def __repr__(self) -> str:
        return f"OpenAIChatBackend(base_url={self.base_url!r}, model={self.model!r}, api_key_env={self.api_key_env!r})"

    def describe(self) -> str:
        return f"model '{self.model}' at {self.base_url}"

    def identity(self) -> str:
        return f"openai|{self.base_url}|{self.model}|{self.temperature}|{self.max_tokens}|{self.json_mode}"

    def _key(self) -> str:
        return os.environ.get(self.api_key_env, "").strip()

    def redact(self, text: str) -> str:
        return redact(text, self._key())

    # ----- request ------------------------------------------------------------------------------------------
    def _content(self, parts: Sequence[dict[str, Any]]) -> str | list[dict[str, Any]]:
        if all(p["type"] == "text" for p in parts):  # plain string: accepted by every compatible server
            return "\n".join(p["text"] for p in parts)
        content: list[dict[str, Any]] = []
        for part in parts:
            if part["type"] == "text":
                content.append({"type": "text", "text": part["text"]})
            else:
                image_url: dict[str, Any] = {"url": png_data_url(part["image"])}
                if self.image_detail != "auto":
                    image_url["detail"] = self.image_detail
                content.append({"type": "image_url", "image_url": image_url})
        return content

    def payload(self, messages: list[Message]) -> dict[str, Any]:
        """The JSON body of the chat-completions request."""
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": m["role"], "content": self._content(m["content"])} for m in messages],
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "seed": self.seed,
        }
        if self.json_mode:
            body["response_format"] = {"type": "json_object"}
        return body

    def complete(self, messages: list[Message]) -> str:
        data = json.dumps(self.payload(messages)).encode("utf-8")
        key = self._key()
        headers = {"Content-Type": "application/json", "Accept": "application/json",
                   "User-Agent": "pixelvision-vlm-ad"}
        if key:
            self._warn_plain_http()
        failure = ""
        for attempt in range(self.max_retries + 1):
            request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            if key:  # unredirected: a redirect to another host never receives the key
                request.add_unredirected_header("Authorization", f"Bearer {key}")
            delay = self.retry_backoff * (2 ** attempt)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw = response.read()
                return self._reply_text(raw)
            except urllib.error.HTTPError as exc:
                status = exc.code
                detail = redact(_server_message(exc), key)
                retry_after = _retry_after(exc.headers.get("Retry-After") if exc.headers else None)
                exc.close()
                if status in (401, 403):
                    state = "is set but was rejected" if key else "is not set"
                    raise InputError(
                        f"vlm_ad: {self.url} answered HTTP {status} ({detail}): the API key in the environment "
                        f"variable {self.api_key_env} {state}. Set {self.api_key_env} to a valid key for this "
                        f"server (or choose another variable with api_key_env=NAME); keys are never stored in "
                        f"the config.") from None
                if status not in RETRY_STATUSES:
                    hint = ""
                    if status == 404:
                        hint = f"; check base_url (requests go to {self.url}) and the model name '{self.model}'"
                    elif status in (400, 422) and self.json_mode:
                        hint = ("; servers without JSON mode reject response_format: try json_mode=false, "
                                "and a model that accepts images")
                    raise InputError(f"vlm_ad: {self.url} answered HTTP {status}: {detail}{hint}.") from None
                failure = f"HTTP {status}: {detail}"
                if retry_after is not None:
                    delay = retry_after
            except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
                reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
                failure = f"cannot reach the server ({redact(_short(str(reason) or type(reason).__name__), key)})"
                # An unknown host name does not start resolving on a retry (unlike EAI_AGAIN, a DNS hiccup).
                if isinstance(reason, socket.gaierror) and reason.errno == socket.EAI_NONAME:
                    raise InputError(f"vlm_ad: {self.url}: {failure}: the host name in base_url does not resolve; "
                                     f"check base_url (and that this machine has network access).") from None
            if attempt < self.max_retries:
                logger.warning("vlm_ad: %s: %s; retry %d/%d in %.1f s", self.url, failure, attempt + 1,
                               self.max_retries, delay)
                time.sleep(delay)
        raise InputError(f"vlm_ad: {self.url} failed {self.max_retries + 1} time(s), last: {failure}. Check that "
                         f"base_url is right and the server is up; raise max_retries/timeout for a busy server.")

    def _reply_text(self, raw: bytes) -> str:
        """The assistant text of a chat-completions response body (MalformedReply when there is none)."""
        try:
            body = json.loads(raw.decode("utf-8", errors="replace"))
            choice = body["choices"][0]
            message = choice["message"]
        except (json.JSONDecodeError, KeyError, IndexError, TypeError) as exc:
            raise MalformedReply(f"the server's response is not a chat completion ({type(exc).__name__}: "
                                 f"{_short(str(exc), 80)})") from None
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):  # some servers return content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str) or not content.strip():
            refusal = message.get("refusal") if isinstance(message, dict) else None
            raise MalformedReply(f"the model refused: {_short(refusal, 120)}" if refusal else "empty reply")
        if choice.get("finish_reason") == "length":
            logger.warning("vlm_ad: reply cut off at max_tokens=%d; raise max_tokens if replies are malformed",
                           self.max_tokens)
        return content

    def _warn_plain_http(self) -> None:
        parts = urlsplit(self.base_url)
        if parts.scheme == "http" and (parts.hostname or "") not in _LOCAL_HOSTS and not self._warned_plain_http:
            self._warned_plain_http = True
            logger.warning("vlm_ad: sending the API key from %s over plain http to %s; use https",
                           self.api_key_env, parts.hostname)


def _server_message(exc: urllib.error.HTTPError) -> str:
    """The error message of an HTTP error response (OpenAI's {"error": {"message": ...}} or the raw text)."""
    try:
        raw = exc.read().decode("utf-8", errors="replace")
    except (OSError, http.client.HTTPException):
        raw = ""
    try:
        body = json.loads(raw)
        error = body.get("error", body) if isinstance(body, dict) else body
        message = error.get("message", error) if isinstance(error, dict) else error
        text = message if isinstance(message, str) else json.dumps(message)
    except (json.JSONDecodeError, TypeError, AttributeError):
        text = raw
    return _short(text or exc.reason or "no message", 300)


def _retry_after(value: str | None) -> float | None:
    try:
        return min(max(float(value), 0.0), MAX_RETRY_AFTER_S) if value is not None else None
    except ValueError:
        return None  # an HTTP date: fall back to the exponential back-off


# ----- transformers ------------------------------------------------------------------------------------------

def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _offline_reason() -> str | None:
    """Why the Hugging Face hub cannot be used now (None when a download can be tried)."""
    from synth.core.hub import hub_unavailable_reason

    return hub_unavailable_reason()


def _missing_model_message(model_id: str, reason: str) -> str:
    name = model_id.rstrip("/").rsplit("/", 1)[-1]
    return (f"vlm_ad: the vision-language model '{model_id}' is not available: {reason}. Download it where there "
            f"is internet (e.g. `hf download {model_id} --local-dir ./{name}`), copy the folder here and pass it as "
            f"model=/path/to/{name} (CLI: --set model=/path/to/{name}), or point HF_HOME at a Hugging Face cache "
            f"that holds it.")


def load_vlm(model_id: str, *, device: str, dtype: str) -> tuple[Any, Any]:
    """(processor, model) of an image-text-to-text model from a local folder, the hub cache or the hub.

    Offline (HF_HUB_OFFLINE, or the hub does not answer a 3 s probe) a model missing from the cache fails at
    once with one InputError naming it and how to pass a local folder, instead of hanging in download retries.
    """
    try:
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor
    except ImportError as exc:
        raise InputError(f"vlm_ad: backend 'transformers' needs the transformers package ({exc}); "
                         f"pip install 'pixelvision[vlm]'.") from None
    path = Path(model_id).expanduser()
    local = path.is_dir()
    if not local and (model_id.startswith((".", "/", "~")) or model_id.count("/") > 1 or "\\" in model_id):
        raise InputError(f"vlm_ad: model folder {model_id} not found; pass an existing folder with the model's "
                         f"config.json, weights and processor files, or a hub id like 'Qwen/Qwen2-VL-2B-Instruct'.")
    resolved = _resolve_device(device)
    torch_dtype = {"auto": torch.bfloat16 if resolved.startswith("cuda") else torch.float32,
                   "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    import transformers

    dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    source = str(path) if local else model_id

    def load(local_only: bool) -> tuple[Any, Any]:
        processor = AutoProcessor.from_pretrained(source, local_files_only=local_only)
        model = AutoModelForImageTextToText.from_pretrained(source, local_files_only=local_only,
                                                            **{dtype_key: torch_dtype})
        return processor, model

    try:
        processor, model = load(True)
    except (OSError, ValueError, KeyError) as exc:
        if local:
            raise InputError(f"vlm_ad: {path} does not hold a loadable image-text-to-text model and processor "
                             f"({_short(str(exc), 200)}); save both with save_pretrained into that folder.") from None
        reason = _offline_reason()
        if reason is not None:
            raise InputError(_missing_model_message(model_id, f"it is not in the local Hugging Face cache and "
                                                              f"cannot be downloaded ({reason})")) from None
        try:
            processor, model = load(False)
        except (OSError, ValueError, KeyError) as download_exc:
            raise InputError(_missing_model_message(model_id, f"download failed ({_short(str(download_exc), 200)})")
                             ) from None
    return processor, model.to(resolved).eval()


class TransformersBackend:
    """A local image-text-to-text model (Qwen2-VL, LLaVA, Idefics, ...) through its processor's chat template.

    Greedy decoding (deterministic); a retry after a malformed reply differs because the conversation then
    carries the bad reply and a correction request.
    """

    concurrent = False

    def __init__(self, model_id: str, *, device: str, dtype: str, max_new_tokens: int) -> None:
        self.model_id = model_id
        self.device = _resolve_device(device)
        self.max_new_tokens = max_new_tokens
        self.processor, self.model = load_vlm(model_id, device=device, dtype=dtype)

    def __repr__(self) -> str:
        return f"TransformersBackend(model={self.model_id!r}, device={self.device!r})"

    def describe(self) -> str:
        return f"local model '{self.model_id}'"

    def identity(self) -> str:
        return f"transformers|{self.model_id}|{self.max_new_tokens}"

    def redact(self, text: str) -> str:
        return redact(text, None)

    def complete(self, messages: list[Message]) -> str:
        import torch
        from PIL import Image

        conversation = [{"role": m["role"], "content": [
            {"type": "image", "image": Image.fromarray(p["image"])} if p["type"] == "image" else dict(p)
            for p in m["content"]]} for m in messages]
        try:
            inputs = self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                                        return_dict=True, return_tensors="pt")
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            raise InputError(f"vlm_ad: the processor of '{self.model_id}' rejected the prompt "
                             f"({_short(str(exc), 200)}); the model must take images in chat messages "
                             f"(an image-text-to-text model with a chat template).") from None
        # Float inputs (pixel values) in the model's precision, token ids stay integers.
        inputs = inputs.to(device=self.device, dtype=self.model.dtype)
        with torch.inference_mode():
            output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        return self.processor.batch_decode(new_tokens, skip_special_tokens=True)[0]
