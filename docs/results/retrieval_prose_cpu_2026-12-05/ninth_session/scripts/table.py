"""per-head table from analyze.py outputs: needle-block kept (gate rank <= k_row) / strong readers, mean answer-row recall."""
import os
import json, sys, collections
for f in sys.argv[1:]:
    rs = [json.loads(l) for l in open(f) if l.startswith('{')]
    by = collections.defaultdict(list)
    for r in rs: by[f"{r['layer']}.{r['head']}"].append(r)
    print(f)
    print("| head | strong-reader prompts | needle block in gate top-k_row | mean rank of needle block (gate) | max rank | teacher rank 1 | answer-row top-k recall |")
    for h in sorted(by):
        v = by[h]; n = len(v)
        kept = sum(r['gate_rank'] <= r['k_row'] or r['qb'] in r['needle_blocks'] for r in v)
        print(f"| {h} | {n} | {kept}/{n} | {sum(r['gate_rank'] for r in v)/n:.1f} | {max(r['gate_rank'] for r in v)} | {sum(r['teacher_rank']==1 for r in v)}/{n} | {sum(r['row_recall'] for r in v)/n:.2f} |")
