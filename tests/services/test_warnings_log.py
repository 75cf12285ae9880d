"""`log_warnings`: a server process's Python warnings as log lines, each different one once per process, as README
says (QA: four responses with negative usage logged one `UsageExtractionFailedWarning`; README read as one each)."""

from __future__ import annotations

import logging
import warnings

import pytest
from pydantic_ai import UsageExtractionFailedWarning

from agentrt.services.warnings_log import log_warnings

EXTRACTION = 'Failed to extract usage with `genai-prices`: ValueError: Invalid usage value for input_tokens'


def _warn(text: str) -> None:
    warnings.warn(text, UsageExtractionFailedWarning, stacklevel=1)  # one place, as pydantic-ai's for every response


def test_each_different_warning_is_one_line_once_per_process(caplog: pytest.LogCaptureFixture) -> None:
    saved = warnings.showwarning
    try:
        with warnings.catch_warnings(), caplog.at_level(logging.WARNING, logger='agentrt.warnings'):
            warnings.simplefilter('default')  # Python's own for such a warning
            log_warnings()
            for _ in range(4):
                _warn(EXTRACTION)
            _warn(f'{EXTRACTION} (another text)')
    finally:
        warnings.showwarning = saved
    assert [record.getMessage() for record in caplog.records] == [
        f'UsageExtractionFailedWarning: {EXTRACTION}',
        f'UsageExtractionFailedWarning: {EXTRACTION} (another text)',
    ]
