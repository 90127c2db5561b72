"""The same encoder as TorchScript and as ONNX (onnxruntime), one thread each, interleaved: images/s at
batch 1 and 256 and their ratio, and the largest difference between the two runtimes' vectors.

    python -m devtools.bench.onnx [--artifacts artifacts] [--model v2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch

from devtools.bench.common import time_pair


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    ap.add_argument("--model", default="v2")
    ap.add_argument("--images", type=int, default=2048)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    from models.artifacts import OnnxModule, export_onnx, load_encoder
    from models.data import load

    x, _ = load("fashion-mnist", "test")
    images = x[: args.images]
    with tempfile.TemporaryDirectory() as tmp:
        ts = load_encoder(args.artifacts / args.model)
        ox = load_encoder(export_onnx(args.artifacts / args.model, Path(tmp) / "onnx"))
        ox.module = OnnxModule(Path(tmp) / "onnx" / "model.onnx", threads=1)
        gap = float(np.abs(ts.embed(images) - ox.embed(images)).max())
        print(f"{args.model}: largest |TorchScript - ONNX| over {len(images)} images: {gap:.2e}")
        for batch in (1, 256):
            n = len(images) // batch

            def run(enc, b=batch):
                return lambda i: enc.embed(images[i * b : (i + 1) * b], batch_size=b)

            t_ts, t_ox = time_pair(run(ts), run(ox), n, warmup=min(5, n))
            ratio = statistics.median(t_ts) / statistics.median(t_ox)
            print(
                f"batch {batch:>3}: TorchScript {batch / statistics.median(t_ts):7.0f} images/s, "
                f"ONNX {batch / statistics.median(t_ox):7.0f} images/s, ONNX / TorchScript {ratio:.2f}x"
            )


if __name__ == "__main__":
    main()
