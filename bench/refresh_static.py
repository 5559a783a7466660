"""Refresh the committed static profiles for some kernels only (after a change to those kernels):
``python bench/refresh_static.py KERNEL[,KERNEL...]`` recompiles the rows of these kernels with
``lora_kernels.bench.static`` and keeps every other row of bench/results/static-sm{90,80}.json,
in the order a full ``python -m lora_kernels.bench.static`` run writes (its --check passes only
if the file is what a full run would write). Run with the GPU machine's Triton (3.6) and
TRITON_INTERPRET=0, like the full run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lora_kernels.bench import static as S


def main() -> int:
    kernels = set(sys.argv[1].split(","))
    launches = S.headline_launches()
    for path in sorted(Path("bench/results").glob("static-sm*.json")):
        doc = json.loads(path.read_text())
        arch = int(doc["arch"].removeprefix("sm_"))

        def key(kernel, launch, cfg, mnk):
            return json.dumps([kernel, launch, cfg, mnk])

        old = {key(r["kernel"], r["launch"], r["config"], r.get("MNK")): r for r in doc["rows"]}
        fresh = S.profile([ln for ln in launches if ln["name"] in kernels], (arch,),
                          log=print)[arch]
        new = {key(r["kernel"], r["launch"], r["config"], r["MNK"]): r for r in fresh}
        rows = []
        for ln in launches:
            for _, _, cfg in S.variants(ln):
                k = key(ln["name"], ln["label"], cfg, S._mnk(ln))
                rows.append(new[k] if ln["name"] in kernels else old[k])
        doc["rows"] = rows
        path.write_text(json.dumps(doc, indent=1))
        print(f"{path}: {len(rows)} rows; problems: {S.check_rows(rows) if arch == 90 else '-'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
