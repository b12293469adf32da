"""One process of the 2-process DDP test (tests/test_distributed.py runs two of these).

Not a test module: `python tests/ddp_worker.py OUT` with torchrun's environment (RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT) trains the test's tiny model with `fit` inside a
data-parallel stage and saves this rank's final weights and metrics to OUT/rank<r>.pt.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_distributed import make_data, make_model, optim  # noqa: E402

from compress import distributed  # noqa: E402
from compress.training import fit  # noqa: E402

torch.set_num_threads(1)
out = Path(sys.argv[1])
device = distributed.init(torch.device("cpu"))
model = make_model()
seen = []  # images this process trained on
model.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]) if m.training else None)
with distributed.training_stage():
    metrics = fit(model, make_data(), optim(), 2, device=device, progress=False, log=lambda m: None,
                  checkpoint=out / "checkpoint.pt")
torch.save({"state": model.state_dict(), "metrics": metrics, "world": distributed.world(), "seen": seen},
           out / f"rank{distributed.rank()}.pt")
distributed.shutdown()
