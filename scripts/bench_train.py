"""Benchmark where the feature stage trains: in the client process vs as a task on a worker.

On the default LocalCluster (``start_client()``: one single-threaded worker per core, pinned),
the demo beamtime's training (its manifest's ``[features]``, ``--epochs`` to override) runs,
side by side in one session:

- in the client process, as before: the sample is gathered to the client and torch trains on
  all its cores (``train(..., on_worker=False)``);
- as a task on a worker (``on_worker=True``, the default under a client): the workers read the
  sample and send it to the training worker, which trains on all the cores it was pinned from;
  the client receives each epoch as it ends. The first such run includes the worker importing
  torch and the model code (a later ``encode`` pays that anyway); the second is warm.

Printed: wall seconds of each (the whole ``train`` call: sampling, reading, fitting, writing),
the ratios on-worker / in-process, the torch threads of each fit, and whether the weights are
identical (same seed, same threads → bit-identical).

Usage: ``python scripts/bench_train.py [--dir /tmp/spndi-bench-train] [--epochs N]
[--repeat 1]``
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

from bench_features import _prepare


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dir", default="/tmp/spndi-bench-train")
    ap.add_argument("--epochs", type=int, default=None, help="max_epochs (default: manifest's)")
    ap.add_argument("--repeat", type=int, default=1, help="rounds of (in-process, on-worker)")
    args = ap.parse_args()
    logging.getLogger("distributed").setLevel(logging.ERROR)

    import torch

    from spndi_dask.config import Manifest
    from spndi_dask.dask_clusters import start_client
    from spndi_dask.features import load_checkpoint, train

    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    cores = len(os.sched_getaffinity(0))
    print(f"machine: {cores} cores, torch {torch.__version__}, CUDA {torch.cuda.is_available()}")
    m = _prepare(root / "demo")
    if args.epochs:
        data = m.to_dict()
        data["features"] = {**m.features.model_dump(mode="json"), "max_epochs": args.epochs}
        m = Manifest.from_dict(data, base_dir=m.base_dir, source=m.source)

    def weights(path: str) -> dict[str, torch.Tensor]:
        model, _ = load_checkpoint(path)
        return {k: v.clone() for k, v in model.state_dict().items()}

    rows: list[tuple[str, float, dict]] = []
    with start_client() as client:
        n_workers = len(client.scheduler_info(n_workers=-1)["workers"])
        print(f"default LocalCluster: {n_workers} workers x 1 thread, pinned one per core")
        ref = None
        for r in range(args.repeat):
            for label, on_worker in (("in the client process", False), ("on a worker", True)):
                if on_worker and r == 0:
                    label += " (cold: first torch use there)"
                t0 = time.perf_counter()
                s = train(m, force=True, on_worker=on_worker)
                rows.append((label, time.perf_counter() - t0, s))
                w = weights(s["checkpoint"])
                ref = ref or w
                s["identical"] = all(torch.equal(ref[k], v) for k, v in w.items())
            if r == 0:  # the warm case: torch already imported on the workers
                t0 = time.perf_counter()
                s = train(m, force=True, on_worker=True)
                rows.append(("on a worker (warm)", time.perf_counter() - t0, s))
                s["identical"] = all(
                    torch.equal(ref[k], v) for k, v in weights(s["checkpoint"]).items()
                )
    s = rows[0][2]
    print(
        f"training conv3d on the demo: {s['n_train']} + {s['n_val']} patterns, "
        f"{s['epochs']} epochs, device {s['device']}"
    )
    print(f"    {'where':<46}{'seconds':>9}{'threads':>9}{'same weights':>14}")
    for label, seconds, s in rows:
        print(f"    {label:<46}{seconds:>9.1f}{s['threads']:>9}{s['identical']!s:>14}")
    base = [t for label, t, _ in rows if label.startswith("in the client")]
    warm = [t for label, t, _ in rows if label.startswith("on a worker") and "cold" not in label]
    cold = [t for label, t, _ in rows if "cold" in label]
    print(
        f"    on-worker / in-process: warm {min(warm) / min(base):.2f}, "
        f"cold {cold[0] / min(base):.2f}   (goal: warm <= 1.05)"
    )


if __name__ == "__main__":
    main()
