"""Save a model and SIGKILL this process when save reports a step starting
with ARGV[3]: a real kill -9 at a known point of a save.

    python killed_save.py MODEL_DIR OUT STEP
"""

import os
import signal
import sys

import graphpatch

model_dir, out, step = sys.argv[1:4]
model, _ = graphpatch.load(model_dir)
graphpatch.apply(model, "fuse_glu", verify=False)


def progress(line: str) -> None:
    if line.startswith(step):
        os.kill(os.getpid(), signal.SIGKILL)


graphpatch.save(model, model_dir, out, True, 200_000, progress)
print("finished")
