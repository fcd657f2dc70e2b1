"""Loading pretrained models from a local folder, the Hugging Face cache or the hub, failing fast offline.

Every ``from_pretrained`` in PixelVision goes through :func:`load_pretrained`, so a user without internet gets,
within seconds, one :class:`~synth.core.errors.WeightsUnavailableError` that names the model and the option that takes
a local folder, instead of minutes of download retries and a traceback:

    >>> vae = load_pretrained(AutoencoderKL.from_pretrained, "stabilityai/stable-diffusion-2-inpainting",
    ...                       what="Stable Diffusion inpainting VAE", option="--set pretrained=/path",
    ...                       subfolder="vae")

Order: an existing local folder or file -> the hub cache (``local_files_only=True``) -> a download, tried only when
``HF_HUB_OFFLINE`` is unset and the hub endpoint answers a TCP probe within 3 s.
"""

from __future__ import annotations

import os
import socket
import threading
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from synth.core.errors import InputError, WeightsUnavailableError

__all__ = ["hub_unavailable_reason", "load_pretrained", "looks_like_path", "network_reachable", "offline_requested"]

NETWORK_PROBE_TIMEOUT_S = 3.0
_TRUTHY = {"1", "on", "yes", "true"}
LoadedT = TypeVar("LoadedT")


def offline_requested() -> bool:
    """True when the user asked for offline mode: ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` (read now), or
    huggingface_hub's own flag (read from the environment when it was imported)."""
    return _offline_variable() is not None


def _offline_variable() -> str | None:
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(key, "").strip().lower() in _TRUTHY:
            return key
    try:
        from huggingface_hub import constants
    except ImportError:
        return None
    return "HF_HUB_OFFLINE" if constants.HF_HUB_OFFLINE else None


def network_reachable(url: str, timeout: float = NETWORK_PROBE_TIMEOUT_S) -> tuple[bool, str]:
    """Try a TCP connection to ``url``'s host (or the configured proxy) within ``timeout`` seconds in total.

    The connection runs in a daemon thread because DNS lookups ignore socket timeouts and can block much longer.
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if proxy and host and not urllib.request.proxy_bypass(host):
        proxy_parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxy_parts.hostname or "", proxy_parts.port or 8080
    if not host:
        return False, f"no host in {url!r}"

    outcome: dict[str, BaseException | None] = {}

    def connect() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                outcome["error"] = None
        except OSError as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=connect, name="pixelvision-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    if "error" not in outcome:
        return False, f"no answer from {host}:{port} within {timeout:g} s"
    if outcome["error"] is not None:
        return False, f"cannot reach {host}:{port}: {outcome['error']}"
    return True, ""


def hub_unavailable_reason(url: str | None = None) -> str | None:
    """Why a download cannot start now; None when it can be tried. ``url``: where the weights come from (default:
    the Hugging Face hub endpoint). The one check every weights load makes before it lets a library download:
    offline mode requested, or no answer from the host (or proxy) within one quick probe."""
    variable = _offline_variable()
    if variable is not None:
        return f"{variable} is set"
    if url is None:
        try:
            from huggingface_hub import constants
        except ImportError:
            return "huggingface_hub is not installed"
        url = constants.ENDPOINT
    ok, reason = network_reachable(url)
    return None if ok else reason


def looks_like_path(model_id: str) -> bool:
    """A string meant as a local path rather than a hub id ``owner/name``."""
    return model_id.startswith((".", "/", "~")) or model_id.count("/") > 1 or "\\" in model_id


def unavailable_message(model_id: str, what: str, option: str, reason: str) -> str:
    name = model_id.rstrip("/").rsplit("/", 1)[-1]
    return (f"{what} '{model_id}' is not available: {reason}. Download it where there is internet "
            f"(`hf download {model_id} --local-dir ./{name}`), copy the folder here and pass it with "
            f"{option.replace('/path', f'./{name}')}, or point HF_HOME at a Hugging Face cache that holds it.")


def _short(exc: BaseException, limit: int = 240) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_pretrained(
    loader: Callable[..., LoadedT],
    model_id: str | Path,
    *,
    what: str,
    option: str,
    **kwargs: Any,
) -> LoadedT:
    """Call ``loader(model_id, **kwargs)`` (any ``from_pretrained``) with offline handling.

    Args:
        loader: e.g. ``UNet2DConditionModel.from_pretrained`` or ``AutoModel.from_pretrained``.
        model_id: hub id (``owner/name``) or local folder.
        what: what the model is, for messages ("Stable Diffusion inpainting UNet").
        option: how the user passes a local folder ("--set pretrained=/path"); ``/path`` is filled in.
        kwargs: passed to ``loader`` (``subfolder=``, ``torch_dtype=`` ...).

    Raises:
        InputError: a local path that does not exist or does not hold a loadable model.
        WeightsUnavailableError: a hub id that is not cached and cannot be downloaded now.
    """
    text = str(model_id)
    path = Path(text).expanduser()
    if path.exists():
        try:
            return loader(str(path), **kwargs)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise InputError(f"{path}: does not hold a loadable {what} ({_short(exc)}); save it with "
                             f"save_pretrained into that folder, or pass the right folder with {option}.") from None
    if looks_like_path(text):
        raise InputError(f"{text}: {what} folder not found; pass an existing folder with {option}.")
    try:
        return loader(text, local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        cache_error = exc
    reason = hub_unavailable_reason()
    if reason is not None:
        raise WeightsUnavailableError(unavailable_message(
            text, what, option, f"it is not in the local Hugging Face cache and cannot be downloaded ({reason})"
        )) from None
    try:
        return loader(text, **kwargs)
    except Exception as exc:  # hub, HTTP and IO errors come from several libraries
        raise WeightsUnavailableError(unavailable_message(
            text, what, option, f"the download failed ({_short(exc)}; cache lookup: {_short(cache_error)})"
        )) from None
