"""Recorded Kong transcripts (../shared/kong-transcripts) the stand-in cannot replay
yet, each with the reason: tests/test_replay.py reports them as xfail. Keys are
``<version>/<scenario>`` or a bare scenario name (every version). The goal is none."""

from typing import Dict

__all__ = ["UNMODELLED"]

_LIFE = ("lifecycle scenario (Kong-managed start_cmd: kill/SIGSTOP/exit-code timeline, several exchanges); the replay driver does not orchestrate life_* timelines yet, and the stand-in's respawn timing (>1 s run: at once; exit 127 respawned) is not done")

UNMODELLED: Dict[str, str] = {
    "life_claim_timeout": _LIFE,
    "life_concurrent_after_respawn": _LIFE,
    "life_concurrent_restart": _LIFE,
    "life_exit_127": _LIFE,
    "life_exit_1_loop": _LIFE,
    "life_kill_during_event": _LIFE,
    "life_kill_idle": _LIFE,
    "life_reload_while_down": _LIFE,
    "life_sigterm_on_stop": _LIFE,
    "life_start": _LIFE,
}
