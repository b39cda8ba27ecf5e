"""The torchrun that ``resumable train`` starts: bound to the wrapper's life, then torchrun itself.

    python -m resumable.train.launch --standalone --nproc-per-node=2 -m resumable.train ...

takes torchrun's arguments. It dies with the wrapper (``proctree.bind_to_launcher``:
SIGKILLed the moment the wrapper ends, however it ended; at once if the wrapper already
ended while this process was starting) and tells its workers its pid, so they die with
it in turn.
"""

from __future__ import annotations

import sys

from resumable.proctree import bind_to_launcher


def main(argv: list[str]) -> None:
    bind_to_launcher()
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun

    try:
        torchrun(argv)
    except SignalException as stop:  # the workers were told and waited for; no traceback for a stop
        raise SystemExit(128 + int(stop.sigval)) from None


if __name__ == "__main__":
    main(sys.argv[1:])
