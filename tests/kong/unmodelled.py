"""Recorded Kong transcripts (../shared/kong-transcripts) the stand-in cannot replay
yet, each with the reason: tests/test_replay.py reports them as xfail. Keys are
``<version>/<scenario>`` or a bare scenario name (every version). The goal is none."""

from typing import Dict

__all__ = ["UNMODELLED"]

UNMODELLED: Dict[str, str] = {}
