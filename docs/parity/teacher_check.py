"""Section 4's verdicts on the second teacher (docs/results.md section 5), from the fp32 arm's report (stdin):
    python -m mdistiller_blockkd report --root output/fmnist_parity_fp32 | python docs/parity/teacher_check.py
Teacher s0: the means and stds published in docs/blockkd.md (its run folders are not kept); both teachers pooled.
"""
import math, re, sys
text = sys.stdin.read()

def cells(heading):
    part = text.split(heading, 1)[1].split("\n## ", 1)[0]
    out = {}
    for l in [l for l in part.splitlines() if l.startswith("| ")][1:]:
        c = [x.strip() for x in l.strip("|").split("|")]
        m = re.match(r"([\d.]+) ± ([\d.]+) \((\d) seeds\)", c[1])
        if m:
            out[c[0]] = (float(m[1]), float(m[2]), int(m[3]))
    return out

val, test = cells("## Validation top-1, last epoch (%)"), cells("## Last-epoch top-1 (%)")
# section 4 (teacher seed 0), mean, std, n: docs/blockkd.md ablations and method table
s4 = {"val": {"BLOCKKD": (88.90, 0.23, 3), "BLOCKKD DETACH_ENSEMBLE=True": (88.57, 0.05, 3),
              "BLOCKKD last:2": (88.79, 0.52, 3), "DKD": (87.99, 0.98, 3), "KD": (87.35, 1.02, 3)},
      "test": {"BLOCKKD": (87.69, 0.38, 3), "BLOCKKD DETACH_ENSEMBLE=True": (87.32, 0.28, 3),
               "BLOCKKD last:2": (87.63, 0.35, 3), "DKD": (86.96, 0.96, 3), "KD": (86.41, 0.91, 3)}}

def welch(a, b):
    d = a[0] - b[0]
    se = math.sqrt(a[1] ** 2 / a[2] + b[1] ** 2 / b[2])
    return f"{d:+.2f} ± {se:.2f} ({d / se:+.1f})"

def pool(a, b):
    n = a[2] + b[2]
    m = (a[0] * a[2] + b[0] * b[2]) / n
    ss = (a[2] - 1) * a[1] ** 2 + (b[2] - 1) * b[1] ** 2 + a[2] * (a[0] - m) ** 2 + b[2] * (b[0] - m) ** 2
    return (m, math.sqrt(ss / (n - 1)), n)

pairs = [("BLOCKKD", "BLOCKKD DETACH_ENSEMBLE=True", "default (not detached) minus `DETACH_ENSEMBLE True`"),
         ("BLOCKKD last:2", "BLOCKKD", "`last:2` minus `all`"),
         ("BLOCKKD", "DKD", "Block-KD (default) minus DKD"),
         ("BLOCKKD", "KD", "Block-KD (default) minus KD")]
print("| comparison | split | teacher s0 (section 4) | teacher s1 (this study, fp32) | both teachers (6 runs a side) |")
print("|---|---|---|---|---|")
for a, b, name in pairs:
    for split, tab in (("validation", val), ("test", test)):
        k = "val" if split == "validation" else "test"
        if a not in tab or b not in tab:
            print(f"| {name} | {split} | – | missing | – |"); continue
        print(f"| {name} | {split} | {welch(s4[k][a], s4[k][b])} | {welch(tab[a], tab[b])} | "
              f"{welch(pool(s4[k][a], tab[a]), pool(s4[k][b], tab[b]))} |")
