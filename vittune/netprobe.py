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


def _answers(url: str, timeout: float, body: bytes | None = None) -> bool:
    headers = {"Content-Type": "application/json"} if body else {}
    request = urllib.request.Request(
        url, data=body, method="POST" if body else "HEAD", headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            response.read(1 << 16)  # the whole answer must come, not only its headers
            return True
    except urllib.error.HTTPError as err:
        # an HTTP status means a server is there and answering; an API call (a body) must
        # also not fail on the server's side (5xx: a proxy up, the application behind it not)
        return body is None or err.code < 500
    except (urllib.error.URLError, OSError, ValueError):
        return False


def endpoint_reachable(
    url: str, timeout: float = PROBE_TIMEOUT_S, body: bytes | None = None
) -> bool:
    """True when an HTTP(S) server at `url` answers within `timeout` seconds in total.

    An HTTP request rather than a TCP connect: a port that accepts connections but never
    answers (a stuck proxy or tunnel) passes a connect check and then hangs the client. The
    request runs in a daemon thread joined with the deadline, because name resolution is not
    covered by socket timeouts and can take much longer on a machine without DNS. With a
    `body` the request is a POST of that JSON, and a 5xx answer counts as not answering.
    """
    if not url.startswith(("http://", "https://")):
        return False
    result: list[bool] = []
    worker = threading.Thread(
        target=lambda: result.append(_answers(url, timeout, body)), daemon=True
    )
    worker.start()
    worker.join(timeout)
    return bool(result and result[0])
