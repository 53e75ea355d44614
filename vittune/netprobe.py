"""One bounded question, asked before any library may wait on the network: does this server answer?

W&B and the Hugging Face hub each retry for minutes when their server is down (wandb's
init waits 90 s, then raises). Their clients have no "fail fast if unreachable" switch, so
vittune asks first, with a hard deadline, and picks offline mode or a one-line error itself.
"""

from __future__ import annotations

import threading
import urllib.error
import urllib.request

PROBE_TIMEOUT_S = 3.0


def _answers(url: str, timeout: float) -> bool:
    request = urllib.request.Request(url, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=timeout):  # noqa: S310 (http/https only)
            return True
    except urllib.error.HTTPError:
        return True  # an HTTP status, even 4xx/5xx, means a server is there and answering
    except (urllib.error.URLError, OSError, ValueError):
        return False


def endpoint_reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """True when an HTTP(S) server at `url` answers within `timeout` seconds in total.

    An HTTP request rather than a TCP connect: a port that accepts connections but never
    answers (a stuck proxy or tunnel) passes a connect check and then hangs the client. The
    request runs in a daemon thread joined with the deadline, because name resolution is not
    covered by socket timeouts and can take much longer on a machine without DNS.
    """
    if not url.startswith(("http://", "https://")):
        return False
    result: list[bool] = []
    worker = threading.Thread(target=lambda: result.append(_answers(url, timeout)), daemon=True)
    worker.start()
    worker.join(timeout)
    return bool(result and result[0])
