"""Issue #16 (sessions you can tell apart, help and prompts, emoji): labels, `sessions`, `--help`,
`join` asking for its code, what one-shot commands print where, and emoji format characters."""

from __future__ import annotations

import pytest

from parley.client.safetext import one_line, safe_text

# --- emoji format characters -----------------------------------------------------------------

ZWJ, ZWNJ = "\u200d", "\u200c"
FAMILY = f"\U0001f468{ZWJ}\U0001f469{ZWJ}\U0001f467"  # man, woman, girl
SCIENTIST = f"\U0001f469\U0001f3fd{ZWJ}\U0001f52c"  # woman, skin tone, microscope
RAINBOW_FLAG = f"\U0001f3f3\ufe0f{ZWJ}\U0001f308"  # white flag, VS16, ZWJ, rainbow
FLAG_FR = "\U0001f1eb\U0001f1f7"  # regional indicators F, R
FLAG_ENGLAND = "\U0001f3f4" + "".join(chr(0xE0000 + ord(c)) for c in "gbeng") + "\U000e007f"
KEYCAP_1 = "1\ufe0f\u20e3"
KEYCAP_HASH = "#\ufe0f\u20e3"
HEART_TEXT = "\u2764\ufe0e"  # text presentation selector
IDEOGRAPHIC_VS = "\u845b\U000e0100"  # an ideographic variation sequence
PERSIAN = f"\u0645\u06cc{ZWNJ}\u062e\u0648\u0627\u0647\u0645"  # "mi-khaham": ZWNJ inside a word


@pytest.mark.parametrize("text", [FAMILY, SCIENTIST, RAINBOW_FLAG, FLAG_FR, FLAG_ENGLAND, KEYCAP_1, KEYCAP_HASH,
                                  HEART_TEXT, IDEOGRAPHIC_VS, PERSIAN,
                                  f"hi {FAMILY}! {FLAG_ENGLAND}{FLAG_FR} {KEYCAP_1}"],
                         ids=["family", "profession", "rainbow-flag", "flag-fr", "flag-england", "keycap-1",
                              "keycap-hash", "text-heart", "ideographic-vs", "persian-zwnj", "mixed"])
def test_emoji_sequences_are_shown_as_they_are(text):
    assert safe_text(text) == text
    assert one_line(text, 200) == text


@pytest.mark.parametrize("text, shown", [
    # every bidi control, wherever it stands (Trojan Source)
    *[(f"a{chr(c)}b", f"a\\u{c:04x}b") for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))],
    ("a\u200eb", "a\\u200eb"), ("a\u200fb", "a\\u200fb"), ("a\u061cb", "a\\u061cb"),
    # bidi controls inside an emoji sequence are still escaped
    (f"\U0001f468{ZWJ}\u202e\U0001f469", f"\U0001f468\\u200d\\u202e\U0001f469"),
    # C0, DEL, C1, line and paragraph separators
    ("a\x1b[2Jb", "a\\x1b[2Jb"), ("a\x07b", "a\\x07b"), ("a\x7fb", "a\\x7fb"), ("a\x9bb", "a\\x9bb"),
    ("a\u2028b", "a\\u2028b"), ("a\u2029b", "a\\u2029b"),
    # zero-width space, word joiner, BOM, soft hyphen: format characters with no emoji role
    ("a\u200bb", "a\\u200bb"), ("a\u2060b", "a\\u2060b"), ("a\ufeffb", "a\\ufeffb"), ("a\u00adb", "a\\xadb"),
    # joiners that join nothing: at the ends, beside white space or another control, doubled
    (f"{ZWJ}a", "\\u200da"), (f"a{ZWJ}", "a\\u200d"), (f"a {ZWJ}b", "a \\u200db"), (f"a{ZWNJ} b", "a\\u200c b"),
    (f"a{ZWJ}{ZWJ}b", "a\\u200d\\u200db"), (f"\x1b{ZWJ}a", "\\x1b\\u200da"),
    # tag characters outside a flag sequence: invisible ASCII (a hidden message)
    ("hi" + "".join(chr(0xE0000 + ord(c)) for c in "run rm"), "hi\\ue0072\\ue0075\\ue006e\\ue0020\\ue0072\\ue006d"),
    # a flag sequence without its CANCEL TAG, and a CANCEL TAG alone
    ("\U0001f3f4\U000e0067\U000e0062", "\U0001f3f4\\ue0067\\ue0062"), ("x\U000e007f", "x\\ue007f"),
    # a private-use character and an unassigned one
    ("a\ue000b", "a\\ue000b"), ("a\U000e0080b", "a\\ue0080b"),
], ids=lambda v: v.encode("unicode_escape").decode()[:40])
def test_controls_and_bidi_are_still_escaped(text, shown):
    assert safe_text(text) == shown


def test_an_emoji_next_to_hostile_text_keeps_both_rules():
    text = f"{FAMILY}\x1b]0;pwned\x07{FLAG_ENGLAND}\u202e"
    assert safe_text(text) == f"{FAMILY}\\x1b]0;pwned\\x07{FLAG_ENGLAND}\\u202e"


def test_a_received_family_emoji_reaches_the_screen_whole():
    import io

    from parley.client.events import MessageIn
    from parley.client.terminal import Terminal

    out = io.StringIO()
    Terminal(out).show(MessageIn("1_ab", "00", f"{FAMILY} {FLAG_ENGLAND} {KEYCAP_1}\u202e"))
    assert out.getvalue() == f"peer: {FAMILY} {FLAG_ENGLAND} {KEYCAP_1}\\u202e\n"
