"""
Tests for uploader.folders: client resolution from folder names, ignore rules and
drop path splitting.
"""

from __future__ import annotations

import os
import unicodedata

import pytest

from uploader.constants import STATUS_FILE_NAME
from uploader.folders import (
    BUILTIN_IGNORE_PATTERNS,
    IgnoreRules,
    Resolution,
    normalise_alias,
    parse_guid,
    resolve_folder,
    split_drop_path,
)

GUID = "1b4e28ba-2fa1-11d2-883f-0016d3cca427"
OTHER_GUID = "6fa459ea-ee8a-3ca4-894e-db77e160355e"


class TestParseGuid:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            (GUID, GUID),
            (GUID.upper(), GUID),
            ("{" + GUID + "}", GUID),
            ("{" + GUID.upper() + "}", GUID),
            ("  " + GUID + "\t", GUID),
            ("{" + GUID, None),
            (GUID + "}", None),
            (GUID[:-1], None),
            (GUID + "0", None),
            (GUID.replace("-", ""), None),
            ("g" + GUID[1:], None),
            ("Smith [" + GUID + "]", None),
            ("", None),
            (GUID[:-1] + "\udcff", None),
        ],
    )
    def test_parse_guid_cases(self, text: str, expected: str | None) -> None:
        """Bare GUIDs in any case, with balanced braces, parse to lower case; others give None."""
        assert parse_guid(text) == expected


class TestResolveFolder:
    @pytest.mark.parametrize(
        ("name", "aliases", "client_id", "rule"),
        [
            (GUID, {}, GUID, "guid"),
            (GUID.upper(), {}, GUID, "guid"),
            ("{" + GUID + "}", {}, GUID, "guid"),
            (f"Nguyen, Thi [{GUID}]", {}, GUID, "bracketed"),
            (f"Nguyen, Thi ({GUID})", {}, GUID, "bracketed"),
            (f"Nguyen, Thi [{{{GUID.upper()}}}]", {}, GUID, "bracketed"),
            (f"Nguyen, Thi [ {GUID} ]  ", {}, GUID, "bracketed"),
            (f"Nguyen, Thi({GUID})", {}, GUID, "bracketed"),
            (f"[{GUID}]", {}, GUID, "bracketed"),
            ("Smith, John", {"smith, john": OTHER_GUID}, OTHER_GUID, "alias"),
            ("SMITH, JOHN", {"smith, john": OTHER_GUID}, OTHER_GUID, "alias"),
            (f"Smith [{GUID}]", {f"smith [{GUID}]": GUID}, GUID, "bracketed"),
            (GUID, {GUID: GUID}, GUID, "guid"),
        ],
    )
    def test_resolve_folder_rules(
        self, name: str, aliases: dict[str, str], client_id: str, rule: str
    ) -> None:
        """Each naming rule resolves the folder to its lower-case GUID and names the rule."""
        result = resolve_folder(name, aliases)
        assert result.client_id == client_id
        assert result.rule == rule
        assert result.problem is None

    def test_resolve_folder_nfd_name(self) -> None:
        """A folder name in NFD (as macOS sends it) matches an alias written in NFC."""
        aliases = {normalise_alias("José Núñez"): GUID}
        nfd_name = unicodedata.normalize("NFD", "JOSÉ NÚÑEZ")
        assert nfd_name != "JOSÉ NÚÑEZ"
        assert resolve_folder(nfd_name, aliases) == Resolution(GUID, "alias")

    @pytest.mark.parametrize(
        "name",
        [f"Smith [{GUID}]", GUID],
    )
    def test_resolve_folder_conflict(self, name: str) -> None:
        """A GUID in the name that differs from the alias's GUID leaves the folder unmapped."""
        aliases = {normalise_alias(name): OTHER_GUID}
        result = resolve_folder(name, aliases)
        assert result.client_id is None
        assert result.rule is None
        assert result.problem is not None
        assert GUID in result.problem
        assert OTHER_GUID in result.problem
        assert "corrected" in result.problem

    @pytest.mark.parametrize(
        "name",
        [
            "Smith, John",
            "",
            "Smith [not-a-guid]",
            f"Smith [{GUID}] copy",
            f"Smith [{GUID}",
            f"Smith [{{{GUID}]",
            "Caf\udce9",
        ],
    )
    def test_resolve_folder_unmapped(self, name: str) -> None:
        """A name with no GUID at its end and no alias is unmapped with a how-to-fix sentence."""
        result = resolve_folder(name, {"jones": GUID})
        assert result.client_id is None
        assert result.rule is None
        assert result.problem is not None
        assert "[clients]" in result.problem
        assert "Rename the folder" in result.problem

    def test_resolve_folder_problem_hides_name(self) -> None:
        """Problem sentences never repeat the folder name, so hidden file names stay hidden."""
        name = "Private Patient Name"
        assert name not in (resolve_folder(name, {}).problem or "")
        bracketed = f"{name} [{GUID}]"
        conflict = resolve_folder(bracketed, {normalise_alias(bracketed): OTHER_GUID})
        assert name not in (conflict.problem or "")


class TestNormaliseAlias:
    @pytest.mark.parametrize(
        ("left", "right"),
        [
            ("Smith", "SMITH"),
            ("Straße", "STRASSE"),
            (unicodedata.normalize("NFD", "Zoë"), "zoë"),
            (unicodedata.normalize("NFD", "ÅSA"), unicodedata.normalize("NFC", "åsa")),
        ],
    )
    def test_normalise_alias_equal(self, left: str, right: str) -> None:
        """Names that differ only in case or Unicode form normalise to the same key."""
        assert normalise_alias(left) == normalise_alias(right)

    def test_normalise_alias_surrogates(self) -> None:
        """A name with surrogate escapes from os.fsdecode normalises without error."""
        name = os.fsdecode(b"Caf\xe9")
        assert normalise_alias(name) == "caf\udce9"


# One matching example for every built-in pattern, in a different case where it has letters.
BUILTIN_EXAMPLES = {
    ".*": ".hidden",
    "~$*": "~$Report.DOCX",
    ".~lock.*#": ".~lock.letter.odt#",
    "*.tmp": "scan.TMP",
    "*.temp": "scan.Temp",
    "*.part": "download.PART",
    "*.partial": "download.partial",
    "*.crdownload": "referral.pdf.CRDOWNLOAD",
    "*.swp": "notes.SWP",
    "*~": "letter.doc~",
    "Thumbs.db": "thumbs.DB",
    "desktop.ini": "Desktop.INI",
    ".DS_Store": ".ds_store",
    "._*": "._referral.pdf",
    "@eaDir": "@EADIR",
    "#recycle": "#Recycle",
    STATUS_FILE_NAME: STATUS_FILE_NAME.lower(),
}


class TestIgnoreRules:
    def test_builtin_examples_cover_list(self) -> None:
        """Every built-in pattern has an example below, so none goes untested."""
        assert set(BUILTIN_EXAMPLES) == set(BUILTIN_IGNORE_PATTERNS)

    @pytest.mark.parametrize(("pattern", "name"), sorted(BUILTIN_EXAMPLES.items()))
    def test_builtin_pattern_ignored(self, pattern: str, name: str) -> None:
        """Each built-in pattern ignores its example in the root, in a folder, and as a folder."""
        rules = IgnoreRules()
        assert rules.is_ignored(name), pattern
        assert rules.is_ignored(f"Smith, John/{name}"), pattern
        assert rules.is_ignored(f"Smith, John/{name}/inner.pdf"), pattern

    @pytest.mark.parametrize(
        "rel_path",
        [
            "Smith, John/referral.pdf",
            "Smith, John/sub/letter.docx",
            "report.pdf",
            "Smith, John/tmp.pdf",
            "Smith, John/thumbs.db.pdf",
            "Smith, John/a~b.pdf",
            "Smith, John/recycle/x.pdf",
        ],
    )
    def test_ordinary_paths_kept(self, rel_path: str) -> None:
        """Ordinary documents, including names that merely contain a pattern's text, are kept."""
        assert not IgnoreRules().is_ignored(rel_path)

    @pytest.mark.parametrize(
        ("patterns", "rel_path", "ignored"),
        [
            (["*.bak"], "Smith/old/letter.BAK", True),
            (["*.bak"], "Smith/letter.pdf", False),
            (["drafts"], "Smith/Drafts/letter.pdf", True),
            (["drafts"], "Smith/final/letter.pdf", False),
            (["Smith/private"], "smith/PRIVATE/a.pdf", True),
            (["Smith/private"], "Smith/private", True),
            (["Smith/private"], "Jones/Smith/private/a.pdf", False),
            (["Smith/*.docx"], "Smith/sub/x.DOCX", True),
            (["Smith/*.docx"], "Jones/x.docx", False),
            (["/Smith/*.docx"], "Smith/x.docx", True),
            (["scans/"], "Jones/scans/x.pdf", True),
            (["/"], "Jones/x.pdf", False),
        ],
    )
    def test_user_patterns(self, patterns: list[str], rel_path: str, ignored: bool) -> None:
        """User patterns without "/" match any component; with "/" they match the path."""
        assert IgnoreRules(patterns).is_ignored(rel_path) is ignored

    def test_user_patterns_keep_builtins(self) -> None:
        """Adding user patterns keeps the built-in list in force."""
        rules = IgnoreRules(["*.bak"])
        assert rules.is_ignored("Smith/Thumbs.db")


class TestSplitDropPath:
    @pytest.mark.parametrize(
        ("rel_path", "expected"),
        [
            ("Smith/a.pdf", ("Smith", "a.pdf")),
            ("Smith/sub/deeper/a.pdf", ("Smith", "sub/deeper/a.pdf")),
            ("a.pdf", (None, "a.pdf")),
            ("/Smith/a.pdf", ("Smith", "a.pdf")),
        ],
    )
    def test_split_drop_path_cases(self, rel_path: str, expected: tuple[str | None, str]) -> None:
        """The first component is the drop folder; a file in the root has none."""
        assert split_drop_path(rel_path) == expected

    def test_split_drop_path_empty(self) -> None:
        """An empty path is a caller's mistake and raises ValueError."""
        with pytest.raises(ValueError):
            split_drop_path("")


def test_bracketed_guid_with_other_clients_alias_is_unmapped() -> None:
    """A copied folder renamed to one client's alias but keeping another's GUID is refused."""
    alpha, bravo = "54c8f0b4-632b-49af-99e8-cf729198846d", "0ed45329-5157-40a6-b055-8d5ccf67fc9e"
    aliases = {normalise_alias("Democlient, Alpha"): alpha}

    wrong = resolve_folder(f"Democlient, Alpha [{bravo}]", aliases)
    right = resolve_folder(f"Democlient, Alpha [{alpha}]", aliases)
    unknown_name = resolve_folder(f"Someone Else [{bravo}]", aliases)

    assert wrong.client_id is None
    assert wrong.problem is not None and alpha in wrong.problem
    assert right.client_id == alpha
    assert unknown_name.client_id == bravo


def test_two_guids_in_name_is_unmapped() -> None:
    """A folder name carrying two client ids maps to neither."""
    alpha, bravo = "54c8f0b4-632b-49af-99e8-cf729198846d", "0ed45329-5157-40a6-b055-8d5ccf67fc9e"

    result = resolve_folder(f"X [{alpha}] [{bravo}]", {})

    assert result.client_id is None
    assert result.problem is not None and "more than one" in result.problem
