#!/usr/bin/env python3
"""Makes a copy of torch-sys 0.26.0 compile against libtorch 2.11.0 (the device's version).

torch-sys 0.26 is generated from libtorch 2.13.0. Its C wrapper (libtch/torch_api_generated.cpp)
calls 15 ATen operators that 2.11.0 does not have (or has with another signature). forge uses
none of them, so their wrappers are replaced by a body that raises a clear error if they were
ever called. Every other wrapper, and the Rust side, is untouched.

Usage: stub_torch_sys.py TORCH_SYS_DIR   (edits TORCH_SYS_DIR/libtch/torch_api_generated.cpp)
Fails, naming the operator, if a wrapper to stub is missing (another torch-sys version).
"""
import re
import sys

MISSING_IN_2_11 = [
    "_flash_attention_forward_no_dropout_inplace",
    "_philox_key_fold_in",
    "_philox_key_split",
    "_philox_normal",
    "_philox_normal_",
    "_philox_normal_out",
    "_philox_uniform",
    "_philox_uniform_",
    "_philox_uniform_out",
    "_scaled_dot_product_attention_math_for_mps",
    "_upsample_lanczos2d_aa",
    "_upsample_lanczos2d_aa_backward",
    "_upsample_lanczos2d_aa_backward_grad_input",
    "_upsample_lanczos2d_aa_out",
    "_upsample_lanczos2d_aa_vec",
]


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    path = sys.argv[1].rstrip("/") + "/libtch/torch_api_generated.cpp"
    try:
        src = open(path, encoding="utf-8").read()
    except OSError as e:
        print(f"stub_torch_sys: cannot read {path}: {e}", file=sys.stderr)
        return 1
    for op in MISSING_IN_2_11:
        # void atg_<op>(...) {\n  PROTECT(\n ... \n  )\n}
        pat = re.compile(r"(void atg_" + re.escape(op) + r"\([^)]*\) \{\n)  PROTECT\(\n.*?\n  \)\n\}", re.S)
        body = f'  PROTECT(throw std::runtime_error("torch::{op} is not in libtorch 2.11 (forge device build)");)\n}}'
        src, n = pat.subn(lambda m: m.group(1) + body, src, count=1)
        if n != 1:
            if f'"torch::{op} is not in libtorch 2.11' in src:
                continue  # already stubbed
            print(f"stub_torch_sys: wrapper atg_{op} not found in {path} (expected torch-sys 0.26.0)", file=sys.stderr)
            return 1
    with open(path, "w", encoding="utf-8") as f:
        f.write(src)
    print(f"stub_torch_sys: {len(MISSING_IN_2_11)} wrappers stubbed in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
