"""Opening a saved patched model: graphpatch.load(OUT) against mlx_lm.load
of the original, time (interleaved medians, weights evaluated) and peak memory.

    python benchmarks/save_load.py [--layers N] [--quant affine4]
"""

import argparse
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx_lm

import graphpatch
from graphpatch.testing import zoo
from graphpatch.timing import interleaved_times

WIDTHS = {"hidden_size": 1024, "intermediate_size": 4096, "vocab_size": 32000}


def opened(load) -> None:
    model = load()[0]
    mx.eval(model.parameters())


def peak_mib(load) -> float:
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    opened(load)
    return (mx.get_peak_memory() - base) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--quant", default="affine4")
    args = parser.parse_args()
    passes = "fuse_glu,last_token"
    with tempfile.TemporaryDirectory() as tmp:
        source = zoo.build(
            "llama_untied",
            Path(tmp) / "source",
            quant=args.quant or None,
            num_hidden_layers=args.layers,
            **WIDTHS,
        )
        model = graphpatch.load(source)[0]
        graphpatch.apply(model, passes, model_dir=str(source))
        saved = graphpatch.save(model, source, Path(tmp) / "saved")
        del model
        loads = {
            "mlx_lm.load(original)": lambda: mlx_lm.load(str(source)),
            "graphpatch.load(saved)": lambda: graphpatch.load(saved),
        }
        times = interleaved_times(
            {k: (lambda f=f: opened(f)) for k, f in loads.items()},
            rounds=5,
            target=0.2,
        )
        print(f"device: {mx.default_device()}, {args.layers} layers, {args.quant}")
        for name, load in loads.items():
            print(
                f"{name:24} {1e3 * times[name]:8.1f} ms  peak {peak_mib(load):7.1f} MiB"
            )
        ratio = times["graphpatch.load(saved)"] / times["mlx_lm.load(original)"]
        print(f"graphpatch.load / mlx_lm.load time: {ratio:.3f}")


if __name__ == "__main__":
    main()
