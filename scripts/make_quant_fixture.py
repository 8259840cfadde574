"""Writes crates/ytrainer-models/tests/fixtures/quants.gguf and quants.expected.json.

The GGUF file is written by llama.cpp's own Python package (`pip install gguf`): one tensor per block format,
filled with random blocks (scales drawn as finite f16 values), and the expected values are that package's
reference dequantisation (`gguf.quants.dequantize`). The Rust test reads the file through `GgufFile` and must
reproduce every value. Run once; the outputs are committed (CI has no Python):

    python3 scripts/make_quant_fixture.py
"""

import json
import pathlib

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES

OUT = pathlib.Path(__file__).resolve().parent.parent / "crates/ytrainer-models/tests/fixtures"
rng = np.random.default_rng(20261128)

# Byte offsets of the f16 scale fields in each block, which must hold finite values.
F16_FIELDS = {
    T.Q8_0: [0],
    T.Q4_0: [0],
    T.Q4_1: [0, 2],
    T.Q5_0: [0],
    T.Q5_1: [0, 2],
    T.Q4_K: [0, 2],
    T.Q5_K: [0, 2],
    T.Q6_K: [208],
}


def random_blocks(ty, n_blocks):
    block_size, type_size = GGML_QUANT_SIZES[ty]
    raw = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for off in F16_FIELDS[ty]:
        scales = rng.uniform(-0.05, 0.05, size=n_blocks).astype(np.float16)
        raw[:, off : off + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    return raw, block_size


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(OUT / "quants.gguf"), arch="llama")
    expected = {}
    for ty in F16_FIELDS:
        n_blocks = 3
        raw, block_size = random_blocks(ty, n_blocks)
        rows = 1 if block_size == 256 else 3
        cols = n_blocks * block_size // rows
        data = raw.reshape(rows, -1)
        name = f"{ty.name.lower()}.weight"
        writer.add_tensor(name, data, raw_dtype=ty)
        values = gguf.quants.dequantize(data, ty).astype(np.float32).reshape(-1)
        assert values.size == rows * cols and np.isfinite(values).all()
        expected[name] = {"type": ty.name, "shape": [rows, cols], "values": values.tolist()}
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    (OUT / "quants.expected.json").write_text(json.dumps(expected) + "\n")
    print(f"wrote {OUT / 'quants.gguf'} and quants.expected.json ({len(expected)} tensors)")


if __name__ == "__main__":
    main()
