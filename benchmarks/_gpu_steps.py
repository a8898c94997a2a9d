"""`gpu_check.sh`'s training-step part: one JSON line per case from a benchmark's
output (no JAX, no torch).

  python benchmarks/_gpu_steps.py line NAME RC START END DEVICE LIMIT OUT ERR
      prints the case's line: `case`, `rc` (124 or 137: timed out), `wall_s`,
      `limit_s`, `device`, the benchmark's last summary line (its `"summary": true`
      line, less that key: its ratios, PEER_over_ctmodels > 1 meaning ctmodels is
      faster), `median_s` per implementation (`impl`, or `case/impl`), and for a
      case that failed or gave no summary, `error` and the tail of its stderr.
  python benchmarks/_gpu_steps.py check FILE N
      exits 0 when FILE holds N lines and none has an `error`.
"""

from __future__ import annotations

import json
import sys


def line(name, rc, start, end, device, limit, out, err) -> dict:
    rc = int(rc)
    row = {
        "case": name,
        "rc": rc,
        "wall_s": round(float(end) - float(start), 1),
        "limit_s": int(limit),
        "device": device,
    }
    records = []
    with open(out) as f:
        for text in f:
            try:
                records.append(json.loads(text))
            except ValueError:
                pass  # a stray print: not a record
    summary = [r for r in records if isinstance(r, dict) and r.get("summary")]
    if summary:
        row.update({k: v for k, v in summary[-1].items() if k != "summary"})
    row["median_s"] = {
        (f"{r['case']}/{r['impl']}" if "case" in r else r["impl"]): r["median_s"]
        for r in records
        if isinstance(r, dict) and "impl" in r and "median_s" in r
    }
    if rc != 0 or not summary:
        row["error"] = (
            "timed out"
            if rc in (124, 137)
            else f"exit status {rc}"
            if rc
            else "no summary line"
        )
        with open(err) as f:
            row["stderr_tail"] = f.read()[-800:]
    return row


def check(path, n) -> int:
    with open(path) as f:
        rows = [json.loads(x) for x in f if x.strip()]
    return 0 if len(rows) == int(n) and all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    if sys.argv[1] == "line":
        print(json.dumps(line(*sys.argv[2:])))
    elif sys.argv[1] == "check":
        sys.exit(check(*sys.argv[2:]))
    else:
        raise SystemExit(__doc__)
