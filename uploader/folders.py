"""
Decide which coreplus client a drop folder stands for, and which paths to ignore.

Everything here works on names only and never touches the filesystem, so the
watcher, the rescan and ``check`` can all call it freely. Folder names are ``str``
as ``os.fsdecode`` returns them, so they may contain surrogate escapes for bytes
that are not valid UTF-8; those never match a GUID or an alias.
"""

from __future__ import annotations

import fnmatch
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from uploader.constants import STATUS_FILE_NAME

_HEX_GUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
# Braces must be balanced: "{guid}" or "guid", never "{guid" alone.
_GUID_WITH_OPTIONAL_BRACES = rf"(?:\{{({_HEX_GUID})\}}|({_HEX_GUID}))"
_BARE_GUID_RE = re.compile(rf"\s*{_GUID_WITH_OPTIONAL_BRACES}\s*")
_TRAILING_GUID_RE = re.compile(
    rf"(?:\[\s*{_GUID_WITH_OPTIONAL_BRACES}\s*\]|\(\s*{_GUID_WITH_OPTIONAL_BRACES}\s*\))\s*\Z"
)

#: Names that are never uploaded: editor lock and temporary files, partial
#: downloads, and the metadata that Windows, macOS and NAS systems scatter about.
#: ``.*`` already covers several of the dotted entries; they are listed so that the
#: list reads the same as the documentation.
BUILTIN_IGNORE_PATTERNS: tuple[str, ...] = (
    ".*",
    "~$*",
    ".~lock.*#",
    "*.tmp",
    "*.temp",
    "*.part",
    "*.partial",
    "*.crdownload",
    "*.swp",
    "*~",
    "Thumbs.db",
    "desktop.ini",
    ".DS_Store",
    "._*",
    "@eaDir",
    "#recycle",
    STATUS_FILE_NAME,
)

ResolutionRule = Literal["guid", "bracketed", "alias"]


def normalise_alias(name: str) -> str:
    """
    Return the key under which a folder name or alias is compared.

    The name is put in Unicode NFC (macOS sends NFD) and case-folded. NFC is applied
    again after case folding, because folding can produce a decomposed sequence.
    """
    folded = unicodedata.normalize("NFC", name).casefold()
    return unicodedata.normalize("NFC", folded)


def _guid_from_match(match: re.Match[str]) -> str:
    for group in match.groups():
        if group is not None:
            return group.lower()
    raise AssertionError("the GUID pattern matched without capturing a GUID")


def parse_guid(text: str) -> str | None:
    """
    Parse a bare GUID in 8-4-4-4-12 hex form, with or without braces.

    Args:
        text: The candidate; surrounding whitespace is ignored.

    Returns:
        The GUID in lower case without braces, or None when ``text`` is anything else.
    """
    match = _BARE_GUID_RE.fullmatch(text)
    return None if match is None else _guid_from_match(match)


_ALL_GUIDS_RE = re.compile(
    r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _trailing_guid(name: str) -> str | None:
    match = _TRAILING_GUID_RE.search(name)
    return None if match is None else _guid_from_match(match)


@dataclass(frozen=True)
class Resolution:
    """
    The client a drop folder name resolves to, or why it resolves to none.
    """

    client_id: str | None
    """The client GUID in lower case, or None when the folder is unmapped."""
    rule: ResolutionRule | None
    """The naming rule that matched: a bare GUID, a bracketed GUID or an alias."""
    problem: str | None = None
    """A plain sentence for the unmapped report when ``client_id`` is None."""


def _unmapped_problem() -> str:
    return (
        "The folder name is not a client id and matches no alias in [clients]. "
        "Rename the folder to end in the client id in brackets, for example "
        "'Nguyen, Thi [1b4e28ba-2fa1-11d2-883f-0016d3cca427]', "
        "or add an alias for it under [clients] in the configuration."
    )


def _several_ids_problem() -> str:
    return (
        "The folder name contains more than one client id, so it is unclear which client "
        "its files belong to. Rename the folder so that it ends in exactly one client id."
    )


def _conflict_problem(named_id: str, alias_id: str) -> str:
    return (
        f"The folder name contains client id {named_id}, but its name matches an alias "
        f"in [clients] for client id {alias_id}. Nothing from this folder "
        "is uploaded until the folder name or the alias is corrected so that they agree."
    )


def resolve_folder(name: str, aliases: Mapping[str, str]) -> Resolution:
    """
    Resolve a drop folder name to a client id.

    The rules are tried in this order. First, the name is a bare GUID. Second, the
    name ends in a GUID in square brackets or parentheses. Third, the name, after
    ``normalise_alias``, is a key of ``aliases``. When the name carries a GUID and also matches an alias that names a
    different GUID, the result is unmapped, because one of the two is a mistake. The
    problem sentences never contain the folder name, so they are safe to log when file
    names are hidden.

    Args:
        name: The drop folder's name (one path component).
        aliases: Normalised alias to lower-case GUID, as ``Config.clients`` holds them.

    Returns:
        The resolution; ``client_id`` is None when the folder is unmapped.
    """
    alias_id = aliases.get(normalise_alias(name))
    named_id = parse_guid(name)
    rule: ResolutionRule | None = "guid"
    if named_id is None:
        named_id = _trailing_guid(name)
        rule = "bracketed"
        if named_id is not None and len(set(_ALL_GUIDS_RE.findall(name.lower()))) > 1:
            return Resolution(None, None, _several_ids_problem())
    if named_id is None:
        if alias_id is None:
            return Resolution(None, None, _unmapped_problem())
        return Resolution(alias_id, "alias")
    if alias_id is not None and alias_id != named_id:
        return Resolution(None, None, _conflict_problem(named_id, alias_id))
    # "Smith, John [guid]" copied and renamed to "Nguyen, Thi [guid]" keeps the wrong id;
    # when the text before the brackets is another client's alias, refuse the folder.
    prefix_id = None
    if rule == "bracketed":
        prefix_id = aliases.get(normalise_alias(_name_before_guid(name)))
    if prefix_id is not None and prefix_id != named_id:
        return Resolution(None, None, _conflict_problem(named_id, prefix_id))
    return Resolution(named_id, rule)


def _name_before_guid(name: str) -> str:
    """Return the part of a folder name before its trailing bracketed GUID."""
    cut = max(name.rfind("["), name.rfind("("))
    return name[:cut].strip() if cut > 0 else ""


def _compile_patterns(patterns: Sequence[str]) -> re.Pattern[str]:
    if not patterns:
        return re.compile(r"(?!)")  # matches nothing
    alternatives = "|".join(f"(?:{fnmatch.translate(pattern)})" for pattern in patterns)
    return re.compile(alternatives, re.IGNORECASE)


class IgnoreRules:
    """
    Decide which paths under the drop root are never uploaded.

    Patterns are fnmatch globs (``*``, ``?``, ``[seq]``) matched without regard to
    case, the built-in ones and the user's alike, so ``*.TMP`` and ``thumbs.db``
    match as well. A pattern without ``/`` is matched against every component of the
    path, so ``@eaDir`` also ignores everything inside an ``@eaDir`` folder. A pattern
    with ``/`` is matched against the path relative to the drop root and against the
    path of each folder above it, so ``Smith/private`` ignores everything inside that
    folder. In such a pattern ``*`` also matches ``/``. A leading ``/`` is ignored, and a trailing ``/`` is
    dropped, which turns ``scans/`` into the component pattern ``scans``.

    Args:
        extra_patterns: The user's patterns from ``watch.ignore``, added to
            ``BUILTIN_IGNORE_PATTERNS``.
    """

    def __init__(self, extra_patterns: Sequence[str] = ()) -> None:
        component_patterns = list(BUILTIN_IGNORE_PATTERNS)
        path_patterns: list[str] = []
        for raw in extra_patterns:
            pattern = raw.strip("/")
            if not pattern:
                continue
            (path_patterns if "/" in pattern else component_patterns).append(pattern)
        self._component_re = _compile_patterns(component_patterns)
        self._path_re = _compile_patterns(path_patterns)

    def is_ignored(self, rel_path: str) -> bool:
        """
        Return whether a path is ignored.

        Args:
            rel_path: The path relative to the drop root, with ``/`` separators.
        """
        components = [part for part in rel_path.split("/") if part]
        if any(self._component_re.match(part) for part in components):
            return True
        prefixes = ("/".join(components[:end]) for end in range(1, len(components) + 1))
        return any(self._path_re.match(prefix) for prefix in prefixes)


def split_drop_path(rel_path: str) -> tuple[str | None, str]:
    """
    Split a path relative to the drop root into its drop folder and the rest.

    Args:
        rel_path: The path relative to the drop root, with ``/`` separators.

    Returns:
        ``(drop folder name, path inside it)``; a file directly in the drop root
        gives ``(None, file name)``.

    Raises:
        ValueError: ``rel_path`` is empty.
    """
    path = rel_path.strip("/")
    if not path:
        raise ValueError(f"expected a path relative to the drop root, got {rel_path!r}")
    folder, separator, rest = path.partition("/")
    if not separator:
        return None, folder
    return folder, rest
