import os

# a torchrun rank (engine/ddp.py ENV): the CLI runs there and the rank ends cleanly (ddp.run_module)
if all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")):
    from .cli import main
    from .engine.ddp import run_module
    run_module(main)
else:
    from .cli import entry
    entry()
