"""The one line evaluate and demo print when an edit misses the project's design bars."""

from __future__ import annotations

from weightedit.evaluation.report import bars_line


def summary(**bars_met):
    return {
        "summary": {
            "kl_max": 0.265,
            "perplexity_ratio_max": 1.04,
            "meets_design_bars": not any(v is False for v in bars_met.values() if not isinstance(v, dict)),
            "bars_met": {
                "reduction": True,
                "kl": True,
                "perplexity_ratio": True,
                "reduction_per_language": {},
                **bars_met,
            },
        }
    }


def test_a_missed_bar_is_named_with_its_numbers():
    report = summary(
        reduction=False,
        kl=False,
        reduction_per_language={
            "ar": {"before": 0.375, "after": 0.25, "relative_reduction": 1 / 3, "met": False},
            "en": {"before": 1.0, "after": 0.0, "relative_reduction": 1.0, "met": True},
        },
    )
    assert bars_line(report) == "design bars not met: refusal reduction < 80% in ar 38% → 25%; max KL 0.265 > 0.1"


def test_no_line_when_the_bars_are_met_or_there_is_no_baseline():
    assert bars_line(summary()) is None
    assert bars_line({"summary": {"refusal_rate_edited_mean": 0.1}}) is None
