"""A training worker: one rank of a training stage (``python -m training.worker``), started by
torchrun, or alone for one process.

training/distributed.py builds the torchrun command that starts these; each runs the stage exactly
as one process does, with the inputs the pipeline handed the launcher (as JSON on the command
line, so a worker needs no knowledge of the pipeline).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from pathlib import Path

from release import children
from training import cpt, distributed, sft

STAGES = {s.STAGE: s for s in (cpt, sft)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="training.worker")
    parser.add_argument("--spec", required=True)
    parser.add_argument("--stage", required=True, choices=sorted(STAGES))
    parser.add_argument("--inputs", required=True, help="JSON object: input name -> path")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    children.die_with_parent()
    import torch.distributed as dist

    from release import spec as spec_mod
    from release.errors import ReleaseError
    from release.quiet import known_notices

    rank = distributed.world()[0]
    inputs = {k: Path(v) for k, v in json.loads(args.inputs).items()}
    try:
        with known_notices():  # the libraries' known-harmless notices, dropped as in the tasks (release/quiet.py)
            STAGES[args.stage].run(spec_mod.load(Path(args.spec)), inputs, force=args.force,
                                   progress=rank == 0 and os.environ.get("QALB_PROGRESS", "1") == "1")
    except ReleaseError as e:
        print(f"error: [rank {rank}] {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group: the launcher says it, once
        return 130
    except OSError as e:
        if e.errno != errno.ENOSPC:  # anything else is a bug and keeps its traceback
            raise
        where = f" writing {e.filename}" if e.filename else ""
        print(f"error: [rank {rank}] the disk is full{where}; free space and run the same command to resume "
              "(finished stages and checkpoints are kept)", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
