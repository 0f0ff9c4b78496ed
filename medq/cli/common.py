"""What every command file shares: the consoles, the exit codes, failing with a message, Redis.

Exit codes: 0 done; 1 some jobs failed; 2 bad input or usage; 3 timed out waiting; 4 the
batch waited on lost its job states (``BatchGone``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import redis
import typer
from redis.sentinel import MasterNotFoundError
from rich.console import Console
from rich.markup import escape

from medq.core.settings import get_settings
from medq.state.connect import connect, shown_url
from medq.tools.evaluate import records_by_id

out = Console()
err = Console(stderr=True)

# medq.tools.local_model.DEFAULT_MODEL, repeated: importing that module's model packages is the local extra
DEFAULT_LOCAL_MODEL = "qwen2.5-coder-1.5b"

EXIT_FAILED_JOBS = 1
EXIT_BAD_INPUT = 2
EXIT_TIMEOUT = 3
EXIT_GONE = 4


def fail(message: str, code: int = EXIT_BAD_INPUT) -> typer.Exit:
    """Print ``message`` as an error and return the exit to raise (``raise fail(...)``)."""
    # escaped: Rich reads any [word] as markup and drops it (it ate the "[local]" of an install hint)
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def connect_redis() -> redis.Redis:
    """The configured Redis, checked now: a command fails with the URL to fix, not a traceback."""
    s = get_settings()
    try:
        r = connect(s.redis_url)
        r.ping()
    except ValueError as exc:  # a sentinel URL without its master's name, ...
        raise fail(f"MEDQ_REDIS_URL: {exc}") from None
    except redis.ConnectionError as exc:
        # without its userinfo: the one redaction for every URL shown
        why = f": {exc}" if isinstance(exc, MasterNotFoundError) else ""
        raise fail(f"cannot reach Redis at {shown_url(s.redis_url)} (MEDQ_REDIS_URL){why}") from None
    return r


def read_gold(path: Path) -> dict[str, Any]:
    """A gold file (JSONL of {"id", "data"}) by record id; a clear error if it cannot be read."""
    try:
        return records_by_id(path.read_text(encoding="utf-8").splitlines())
    except OSError as exc:
        raise fail(f"cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise fail(f"{path}: {exc}") from None
