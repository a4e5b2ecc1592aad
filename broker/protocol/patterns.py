"""``channel_capacity`` patterns: regexes a client sends and the broker matches member names with.

The broker evaluates a sender's patterns against the names of a group's members on every group
send, in its one thread, so a pattern must match in bounded time whatever the name: a regex
that backtracks catastrophically (``(a+)+b`` on a long run of ``a``) would stall every client.
``compile_pattern`` therefore accepts only regexes whose backtracking is bounded:

- no repetition (``*``, ``+``, ``?``, ``{m,n}``) inside another repetition;
- no alternation (``|``) inside a repetition (``(?:a|b)*`` is fine: it is a character class);
- no backreference (``\\1``, ``(?P=name)``, ``(?(1)...)``);
- at most MAX_PATTERN_REPEATS repetitions in the whole pattern (``a{3}``, a fixed count, does
  not count). A glob's ``*`` is one repetition, so a glob may have up to that many stars.

With names under 100 characters that bounds one match to a few thousand steps (k repetitions
can split a name in about n^(k-1)/(k-1)! ways). Pure: the rules read the regex's parse tree
from ``re._parser``, the parser behind ``re.compile``.
"""

from __future__ import annotations

import re
from re import _constants as sre
from re import _parser as sre_parse

from .errors import ProtocolError

MAX_PATTERN_REPEATS = 3
_REPEATS = (sre.MAX_REPEAT, sre.MIN_REPEAT, sre.POSSESSIVE_REPEAT)
_BACKREFERENCES = (sre.GROUPREF, sre.GROUPREF_EXISTS)
RULES = (
    "no repetition or alternation inside a repetition, no backreference, and at most"
    f" {MAX_PATTERN_REPEATS} repetitions (a glob's * is one)"
)


def compile_pattern(source: str) -> re.Pattern:
    """Compile a channel_capacity regex; raise ``ProtocolError('bad-value')`` if it is not a
    valid regex or breaks the rules above (the message names the rule)."""
    try:
        pattern = re.compile(source)
        tree = sre_parse.parse(source)
    except (re.error, RecursionError, OverflowError, ValueError) as exc:
        # (re raises OverflowError for a{4294967296}, ValueError for (?a)(?u)x)
        raise ProtocolError(
            "bad-value", f"channel_capacity pattern {source!r} is not a valid regex: {exc}"
        ) from None
    repeats, why = _walk(tree, inside_repeat=False)
    if why is None and repeats > MAX_PATTERN_REPEATS:
        why = f"it has {repeats} repetitions (at most {MAX_PATTERN_REPEATS})"
    if why:
        raise ProtocolError(
            "bad-value",
            f"channel_capacity pattern {source!r} is refused: {why}. The broker matches these"
            f" patterns on every group send, so they must match in bounded time: {RULES}",
            limit=MAX_PATTERN_REPEATS,
        )
    return pattern


def _walk(items, inside_repeat: bool) -> tuple[int, str | None]:
    """(the repetitions in ``items``, a parsed sequence; the first rule broken, or None)."""
    repeats = 0
    for op, av in items:
        if op in _REPEATS:
            low, high, body = av
            if inside_repeat:
                return repeats, "it has a repetition inside a repetition"
            _, why = _walk(body, inside_repeat=True)
            if why:
                return repeats, why
            repeats += low != high  # (a fixed count never backtracks)
            continue
        if op in _BACKREFERENCES:
            return repeats, "it has a backreference"
        if op is sre.BRANCH and inside_repeat:
            return repeats, "it has an alternation (|) inside a repetition"
        for sub in _children(op, av):
            inner, why = _walk(sub, inside_repeat)
            repeats += inner
            if why:
                return repeats, why
    return repeats, None


def _children(op, av) -> list:
    """The parsed sequences nested in one node: groups, branches, lookarounds, atomic groups."""
    if op is sre.BRANCH:
        return av[1]
    if op is sre.SUBPATTERN:
        return [av[3]]
    if op in (sre.ASSERT, sre.ASSERT_NOT):
        return [av[1]]
    if op is sre.ATOMIC_GROUP:
        return [av]
    return []
