"""Regular expressions from adapter files, matched in bounded time.

`target_modules`, `exclude_modules`, `rank_pattern`, `alpha_pattern` and `layers_pattern` are
regexes written by whoever made the adapter. Python's `re` can backtrack for hours on a pattern
like `([\\w.]+)+\\d` while holding the GIL, freezing every thread of the server. The `regex`
package accepts the same syntax, releases the GIL while it matches and takes a timeout, so a
pathological pattern costs at most MATCH_TIMEOUT_S and is refused with its name.
"""

from __future__ import annotations

import regex

from adapters.errors import AdapterConfigError

MATCH_TIMEOUT_S = 0.25  # a sane pattern matches a module name in microseconds
MAX_PATTERN_CHARS = 2048  # PEFT's own patterns are tens of characters


def fullmatch(pattern: str, name: str) -> regex.Match | None:
    return _run(pattern, name, "fullmatch")


def match(pattern: str, name: str) -> regex.Match | None:
    return _run(pattern, name, "match")


def _run(pattern: str, name: str, how: str) -> regex.Match | None:
    if not isinstance(pattern, str):
        raise AdapterConfigError(f"module pattern {pattern!r} must be a string")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise AdapterConfigError(
            f"module pattern {pattern[:40]!r}... is {len(pattern)} characters long, over {MAX_PATTERN_CHARS}; "
            "list the module names instead"
        )
    try:
        compiled = regex.compile(pattern)  # regex caches compiled patterns
    except regex.error as err:
        raise AdapterConfigError(f"module pattern {pattern!r} is not a valid regular expression ({err})") from None
    try:
        return getattr(compiled, how)(name, timeout=MATCH_TIMEOUT_S)
    except TimeoutError:
        raise AdapterConfigError(
            f"module pattern {pattern!r} takes too long to match module names (it backtracks catastrophically); "
            "rewrite it without nested repetition, or list the module names"
        ) from None
