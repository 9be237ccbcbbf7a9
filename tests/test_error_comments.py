"""Error Comments (0000,0902) fit their LO of 64 characters and say the cause in words."""

from __future__ import annotations

import errno

from shared.dicom.statuses import MAX_COMMENT, failure_cause, fit_comment


def test_a_long_comment_is_cut_after_a_whole_word():
    text = "event not acknowledged by JetStream: ConnectionError: no NATS servers available at the moment"
    fitted = fit_comment(text)
    assert len(fitted) <= MAX_COMMENT
    assert fitted.endswith("...")
    assert text.startswith(fitted[:-3])
    assert text[len(fitted) - 3] == " ", "cut mid-word"


def test_a_short_comment_is_kept_and_made_printable():
    assert fit_comment("bad UID") == "bad UID"
    assert fit_comment("a\\b\nc") == "a/b/c"
    assert len(fit_comment("x" * 200)) <= MAX_COMMENT


def test_causes_in_words():
    assert failure_cause(TimeoutError()) == "timed out"
    assert failure_cause(ConnectionRefusedError()) == "server unreachable"
    assert failure_cause(OSError(errno.ENOSPC, "No space left on device")) == "disk full"
    assert failure_cause(PermissionError()) == "permission denied"
    assert failure_cause(ValueError("x")) == "refused"
    for exc in (TimeoutError(), ConnectionRefusedError(), OSError(errno.ENOSPC, "x"), ValueError()):
        assert len(f"event not acknowledged by NATS: {failure_cause(exc)}") <= MAX_COMMENT
