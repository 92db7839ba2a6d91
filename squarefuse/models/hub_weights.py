"""Fail in seconds, naming the config keys that avoid the download, when hub weights cannot be fetched.

Without network access, huggingface_hub retries every file timm asks for with exponential backoff:
a ViT's pretrained weights took 53 s to fail. One request to the host the weights come from, with a
short timeout and no retries, tells the same thing at once.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import huggingface_hub
import timm.models

# Long enough for a slow but working connection to answer a HEAD request, short enough to fail fast.
PROBE_TIMEOUT_S = 5.0


def _weights_host(name: str) -> str | None:
    """The URL of the server timm fetches ``name``'s pretrained weights from (None: timm has none)."""
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        return huggingface_hub.constants.ENDPOINT
    if cfg.url:
        parts = urlsplit(cfg.url)
        return f"{parts.scheme}://{parts.netloc}"
    return None


def check_weights_reachable(name: str) -> None:
    """Raises RuntimeError at once when the server holding ``name``'s pretrained weights does not answer.

    With ``HF_HUB_OFFLINE=1`` nothing is probed: timm then reads the Hugging Face cache only.
    """
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return
    host = _weights_host(name)
    if host is None:
        return
    try:
        # The hub's own HTTP client: the same proxies and certificates as the download would use.
        huggingface_hub.get_session().head(host, timeout=PROBE_TIMEOUT_S)
    except Exception as e:  # noqa: BLE001 - the client's error types differ between huggingface_hub versions
        raise RuntimeError(
            f"backbone.name={name!r}: cannot reach {host} to fetch its pretrained weights "
            f"({type(e).__name__}: {e}). Without network access, set backbone.pretrained_path to a local "
            f"weights file, or train a small model from scratch with recipe=tiny_scratch (the CPU recipe); "
            f"HF_HUB_OFFLINE=1 reads weights already in the Hugging Face cache."
        ) from e
