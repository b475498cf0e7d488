"""Test stand-in for faults at exact moments: with ``NEQUIX_FW_TEST_KILL`` set, this process
kills itself with SIGKILL (what ``kill -9`` sends) at one point, once (``NEQUIX_FW_TEST_KILL_
MARKER``, a file, records that it did):

- ``after_add_wf:TEXT``: right after `LaunchPad.add_wf` added a workflow whose name has TEXT
  (a validation appending the next iteration);
- ``after_stage:TASK``: right after that FireTask's stage ran, before FireWorks completes its
  launch and appends what it returned.

Without the variable it does nothing. Python imports it at start from ``PYTHONPATH``.
"""

import os
import signal

_SPEC = os.environ.get("NEQUIX_FW_TEST_KILL")


def _die() -> None:
    marker = os.environ["NEQUIX_FW_TEST_KILL_MARKER"]
    if not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)


if _SPEC:
    _POINT, _, _ARG = _SPEC.partition(":")
    if _POINT == "after_add_wf":
        from fireworks.core.launchpad import LaunchPad

        _add_wf = LaunchPad.add_wf

        def _add_wf_then_die(self, wf, *args, **kwargs):
            out = _add_wf(self, wf, *args, **kwargs)
            if _ARG in getattr(wf, "name", ""):
                _die()
            return out

        LaunchPad.add_wf = _add_wf_then_die
    elif _POINT == "after_stage":
        from nequix_fw import workflows

        _task = getattr(workflows, _ARG)
        _run_stage = _task.run_stage

        def _run_stage_then_die(self, fw_spec):
            out = _run_stage(self, fw_spec)
            _die()
            return out

        _task.run_stage = _run_stage_then_die
    else:
        raise ValueError(f"NEQUIX_FW_TEST_KILL: unknown point {_POINT!r}")
