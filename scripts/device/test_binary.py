#!/usr/bin/env python3
"""Prints the path of the integration-test binary (`tests/main.rs`) from the JSON messages of
`cargo test --no-run --message-format=json` on standard input; exits 1 when there is none."""
import json
import sys

found = None
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == "main" and m.get("executable"):
        found = m["executable"]
if not found:
    sys.exit(1)
print(found)
