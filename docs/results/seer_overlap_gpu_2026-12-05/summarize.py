"""Summarise the GPU run: per check set and setting, passkey, needle kept / reading heads, strong readers
(heads with >= 0.5 of their answer rows' dense attention on the value) kept, and the strong misses
(prompt, layer.head), from the retrieval check's check_*.json and each group's needle.json.
Usage: python summarize.py CHECK_DIR OUT_PREFIX -> OUT_PREFIX.md and OUT_PREFIX.json."""
import json
import sys
from pathlib import Path


def strong_of(needle_json: Path) -> dict:
    """{(method, setting): (kept, n, misses)} over the strong readers in one group's needle.json."""
    out = {}
    if not needle_json.is_file():
        return out
    for r in json.loads(needle_json.read_text())["rows"]:
        kept = n = 0
        misses = []
        for i, s in enumerate(r.get("samples", [])):
            for h in s["heads"]:
                layer, head, mass, frac, k = h[:5]
                if mass >= 0.5:
                    n += 1
                    kept += int(k)
                    if not k:
                        misses.append(f"({s.get('sample', i)}, {layer}.{head})")
        out[(r["method"], r["setting"])] = (kept, n, misses)
    return out


def main(check_dir, prefix):
    check_dir = Path(check_dir)
    table = []
    for cj in sorted(check_dir.glob("check_*.json")):
        doc = json.loads(cj.read_text())
        strong = {}  # label -> {(method, setting): ...}
        for key, sub in doc["protocol"]["runs"].items():
            sub = Path(sub)
            if not sub.is_dir():  # unpacked elsewhere: the group folder beside the check json
                sub = cj.parent / cj.stem / sub.name
            strong[key.rsplit("_d", 1)[0]] = strong_of(sub / "needle.json")
        for r in doc["rows"]:
            base, _, label = r["method"].partition("@")
            groups = [strong.get(label or "shipped", {})] + list(strong.values())  # dense: any group
            k, n, miss = next((g[(base, r["setting"])] for g in groups if (base, r["setting"]) in g), (None, None, []))
            table.append({"set": cj.stem, "method": r["method"], "setting": r["setting"], "density": r["density"],
                          "passkey": f"{r['correct']}/{r['n']}", "kept": f"{r['needle_kept']}/{r['needle_reading']}",
                          "strong": None if k is None else f"{k}/{n}", "strong_misses": miss, "error": r.get("error", "")})
    Path(prefix + ".json").write_text(json.dumps(table, indent=1) + "\n")
    lines = ["| set | setting | density | passkey | kept / reading | strong readers | strong misses (prompt, head) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for t in table:
        lines.append(f"| {t['set']} | `{t['method']}` {t['setting']} | {t['density']} | {t['passkey']} | {t['kept']} | "
                     f"{t['strong']} | {' '.join(t['strong_misses']) or '-'}{' ERROR ' + t['error'] if t['error'] else ''} |")
    Path(prefix + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
