"""The parity table of docs/results.md section 5 from the report (stdin):
    python -m mdistiller_blockkd report --root output/fmnist_parity_fp32 --root output/fmnist_parity_bf16 --twin AMP=bf16 | python docs/parity/parity_table.py
"""
import sys
text = sys.stdin.read()

def rows(heading):
    part = text.split(heading, 1)[1].split("\n## ", 1)[0]
    lines = [l for l in part.splitlines() if l.startswith("| ")]
    out = {}
    for l in lines[1:]:
        c = [x.strip() for x in l.strip("|").split("|")]
        out[c[0]] = c[1]
    return out

val = rows("## Validation top-1, last epoch (%)")
test = rows("## Last-epoch top-1 (%)")
dval = rows("## Validation top-1 (last epoch): AMP=bf16 minus")
dtest = rows("## Test top-1 (last epoch): AMP=bf16 minus")
cost = rows("## Training cost")
names = {"NONE": "NONE (vanilla)", "KD": "KD", "DKD": "DKD", "BLOCKKD": "Block-KD (default)",
         "BLOCKKD DETACH_ENSEMBLE=True": "Block-KD `DETACH_ENSEMBLE True`", "BLOCKKD last:2": "Block-KD `last:2`"}
def bf(m):
    want = set(m.split()) | {"AMP=bf16"}
    return next((k for k in val if set(k.split()) == want), None)
strip = lambda s: s.replace(" (3 seeds)", "")
print("| method | val fp32 | val bf16 | val bf16 − fp32 | test fp32 | test bf16 | test bf16 − fp32 | steps/s fp32 | steps/s bf16 |")
print("|---|---|---|---|---|---|---|---|---|")
for m, name in names.items():
    sp = lambda c: c.split("(")[1].split(" steps/s")[0] if c and "steps/s" in c else "–"
    print(f"| {name} | {strip(val.get(m,'–'))} | {strip(val.get(bf(m),'–'))} | {dval.get(m,'–')} | {strip(test.get(m,'–'))} | "
          f"{strip(test.get(bf(m),'–'))} | {dtest.get(m,'–')} | {sp(cost.get(m))} | {sp(cost.get(bf(m)))} |")
