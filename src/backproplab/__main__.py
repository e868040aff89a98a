import os

if "WORLD_SIZE" in os.environ and "RANK" in os.environ:  # a torchrun rank: engine/ddp.py ends it cleanly
    from .cli import main
    from .engine.ddp import run_module
    run_module(main)
else:
    from .cli import entry
    entry()
