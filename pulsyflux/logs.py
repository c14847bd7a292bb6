"""What ``twistd pulsyflux`` logs, and how: a level, text or JSON lines.

twistd chooses its log observer before any service starts, from its own
options; ``--logger`` names a factory it calls with no arguments. So the
pulsyflux options (``--log-level``, ``--log-format``) point twistd's
``--logger`` at :func:`twistd_observer`, which builds what twistd would have
built (the same file, stdout or syslog choice, or the ``--logger`` the user
gave) and puts a filter in front of it:

    twistd -n pulsyflux --log-level warn --log-format json

The filter drops events below the level, and Twisted's "Unable to write to
plugin cache" (logged on every start by a user who cannot write a
root-owned install's ``twisted/plugins``: harmless, and fixed by
regenerating the cache as its owner, docs/twistd.md) unless the level is
``debug``.
"""

from __future__ import annotations

import json
import signal
import sys
from types import FrameType
from typing import Any, Callable, Optional, cast

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    LegacyLogObserverWrapper,
    LogLevel,
    LogLevelFilterPredicate,
    PredicateResult,
    formatEvent,
    textFileLogObserver,
)
from twisted.python import usage
from twisted.python.reflect import namedAny

__all__ = ["LEVELS", "FORMATS", "check_options", "configure", "twistd_observer", "json_line"]

LEVELS = {level.name: level for level in LogLevel.iterconstants()}  # debug, info, warn, error, critical
FORMATS = ("text", "json")

# Set by configure() while twistd parses its options; read by twistd_observer() after.
_settings: dict[str, Any] = {}


def check_options(level: str, log_format: str) -> None:
    """``usage.UsageError`` unless ``level`` is in :data:`LEVELS` and ``log_format`` in :data:`FORMATS`."""
    if level not in LEVELS:
        raise usage.UsageError(f"--log-level must be one of {', '.join(LEVELS)}, not {level!r}")
    if log_format not in FORMATS:
        raise usage.UsageError(f"--log-format must be one of {', '.join(FORMATS)}, not {log_format!r}")


def configure(twistd_options: usage.Options, level: str = "info", log_format: str = "text") -> None:
    """Make twistd (whose parsed options are ``twistd_options``) log through :func:`twistd_observer`.

    Raises ``usage.UsageError`` for a bad level or format, or a ``--logger``
    that cannot be imported.
    """
    check_options(level, log_format)
    chosen = twistd_options.get("logger")
    factory: Optional[Callable[[], Any]] = None
    if chosen:
        if log_format != "text":
            raise usage.UsageError("--log-format and twistd's --logger both choose how to log: give one")
        try:
            factory = chosen if callable(chosen) else namedAny(chosen)
        except Exception as error:
            raise usage.UsageError(f"--logger {chosen!r} could not be imported: {error}") from None
    if log_format == "json" and twistd_options.get("syslog"):
        raise usage.UsageError("--log-format json cannot go to --syslog: log to a file or stdout")
    _settings.clear()
    _settings.update(
        level=LEVELS[level],
        format=log_format,
        factory=factory,
        logfile=twistd_options.get("logfile") or "",
        nodaemon=bool(twistd_options.get("nodaemon")),
        syslog=bool(twistd_options.get("syslog")),
        prefix=twistd_options.get("prefix") or "",
    )
    twistd_options["logger"] = f"{__name__}.twistd_observer"  # twistd imports it by name


def twistd_observer() -> ILogObserver:
    """The observer twistd logs to (its ``--logger``): see the module docstring."""
    settings = _settings or {"level": LogLevel.info, "format": "text", "factory": None, "logfile": "",
                             "nodaemon": True, "syslog": False, "prefix": ""}  # fmt: skip
    base: Any
    if settings["factory"] is not None:
        base = settings["factory"]()
    elif settings["syslog"]:
        from twisted.python import syslog

        base = syslog.SyslogObserver(settings["prefix"]).emit
    else:
        out = _log_file(settings["logfile"], settings["nodaemon"])
        base = FileLogObserver(out, json_line) if settings["format"] == "json" else textFileLogObserver(out)
    if not ILogObserver.providedBy(base):
        base = LegacyLogObserverWrapper(base)
    level = settings["level"]
    predicates: list[Any] = [LogLevelFilterPredicate(defaultLogLevel=level)]
    if level > LogLevel.debug:
        predicates.append(_not_plugin_cache_noise)
    return FilteringLogObserver(base, predicates)


def _log_file(name: str, nodaemon: bool) -> Any:
    """Where twistd itself would log: stdout with ``-n`` and no ``--logfile`` (or ``--logfile -``),
    else the file (default ``twistd.log``), rotated at 1 MB and on SIGUSR1."""
    if name == "-":
        if not nodaemon:
            sys.exit("Daemons cannot log to stdout, exiting!")
        return sys.stdout
    if nodaemon and not name:
        return sys.stdout
    from twisted.python.logfile import LogFile

    log_file = LogFile.fromFullPath(name or "twistd.log")
    usr1 = getattr(signal, "SIGUSR1", None)
    if usr1 is not None and not signal.getsignal(usr1):

        def rotate(signum: int, frame: Optional[FrameType]) -> None:
            from twisted.internet import reactor

            cast(Any, reactor).callFromThread(log_file.rotate)  # the installed reactor: it has threads

        signal.signal(usr1, rotate)
    return log_file


def _not_plugin_cache_noise(event: dict[str, Any]) -> PredicateResult:
    text = event.get("format") or event.get("log_format")
    if isinstance(text, str) and text.startswith("Unable to write to plugin cache"):
        return PredicateResult.no
    return PredicateResult.maybe


def json_line(event: dict[str, Any]) -> Optional[str]:
    """One event as one JSON object per line: ``time``, ``level``, ``logger``, ``message``
    (and ``traceback`` when it carries a failure), for jq and log shippers."""
    from datetime import datetime, timezone

    when = event.get("log_time")
    level = event.get("log_level")
    record: dict[str, Any] = {
        "time": datetime.fromtimestamp(when, timezone.utc).isoformat() if when is not None else None,
        "level": level.name if isinstance(level, type(LogLevel.info)) else None,
        "logger": event.get("log_namespace"),
        "message": formatEvent(event),
    }
    failure = event.get("log_failure")
    if failure is not None:
        try:
            record["traceback"] = failure.getTraceback()
        except Exception:  # a failure that cannot be rendered still gets its line
            record["traceback"] = repr(failure)
    return json.dumps(record, ensure_ascii=False) + "\n"
