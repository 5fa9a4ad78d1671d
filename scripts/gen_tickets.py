#!/usr/bin/env python3
"""Writes N synthetic tickets as JSONL to stdout, cycling through examples/tickets.jsonl
with unique ticket ids, so benchmarks see the realistic mix of languages and routes.

usage: scripts/gen_tickets.py N [examples/tickets.jsonl]
"""
import json
import sys


def main() -> None:
    n = int(sys.argv[1])
    src = sys.argv[2] if len(sys.argv) > 2 else "examples/tickets.jsonl"
    with open(src, encoding="utf-8") as f:
        base = [json.loads(line) for line in f if line.strip()]
    out = sys.stdout
    for i in range(n):
        t = dict(base[i % len(base)])
        t["ticket_id"] = f"{t['ticket_id']}-{i}"
        t["conversation_id"] = f"{t.get('conversation_id') or t['ticket_id']}-{i}"
        out.write(json.dumps(t, ensure_ascii=False, separators=(",", ":")))
        out.write("\n")


if __name__ == "__main__":
    main()
