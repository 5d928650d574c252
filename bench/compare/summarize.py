#!/usr/bin/env python3
"""Summary of a bench/compare/lmcache.sh run: reads OUT/raw/*.json, prints the kvtier / LMCache
table (min / median / max over rounds) and the limits, writes OUT/summary.txt, OUT/ratios.dat
and OUT/ratios.png (gnuplot). Usage: summarize.py OUT [--into DIR] [--no-plot]; --into writes
those three files to DIR instead of OUT."""

import glob
import json
import os
import re
import statistics
import subprocess
import sys

MIB = 1048576.0


def fail(msg):
    sys.exit("summarize.py: " + msg)


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        fail("cannot read %s: %s" % (path, e))


def lmcache_mbps(doc, path):
    """{op: MB/s} from `lmcache bench l2 --format json`: the best measured round per op."""
    out = {}
    for sec in doc.get("metrics", {}).values():
        if isinstance(sec, dict) and "operation" in sec:
            op = str(sec["operation"]).lower()
            if op in ("store", "load"):
                if sec.get("total_success") != sec.get("total_keys"):
                    fail("%s: LMCache %s succeeded for %s of %s keys"
                         % (path, op, sec.get("total_success"), sec.get("total_keys")))
                out[op] = float(sec["throughput_max_mbps"]) * MIB / 1e6
    if set(out) != {"store", "load"}:
        fail("%s: no store and load sections (is this lmcache bench l2 --format json?)" % path)
    return out


def kvtier_mbps(doc, path):
    """{op: (MB/s, limit MB/s or None)} from kvtier-bench --json."""
    out = {}
    for row in doc.get("rows", []):
        op = row.get("op")
        if op in ("store", "load") and isinstance(row.get("GB/s"), (int, float)):
            lim = row.get("limit GB/s")
            out[op] = (row["GB/s"] * 1e3, lim * 1e3 if isinstance(lim, (int, float)) else None)
    if set(out) != {"store", "load"}:
        fail("%s: no store and load rows (is this kvtier-bench --json?)" % path)
    return out


def mmm(v):
    v = [x for x in v if x is not None]
    if not v:
        return None
    return (min(v), statistics.median(v), max(v))


def fmt(t, digits=2):
    if t is None:
        return "-"
    return "%.*f / %.*f / %.*f" % (digits, t[0], digits, t[1], digits, t[2])


def main():
    argv = sys.argv[1:]
    plot = "--no-plot" not in argv
    into = None
    if "--into" in argv:
        i = argv.index("--into")
        if i + 1 >= len(argv):
            fail("--into needs a directory")
        into = argv[i + 1]
        del argv[i:i + 2]
    args = [a for a in argv if not a.startswith("--")]
    if len(args) != 1:
        fail("usage: summarize.py OUT [--into DIR] [--no-plot]")
    raw = os.path.join(args[0], "raw")
    out = into or args[0]
    os.makedirs(out, exist_ok=True)
    runs = {}  # (medium, kib) -> round -> {"lmcache": .., "stack": .., "alone": ..}
    pat = re.compile(r"r(\d+)-(lmcache|kvtier|kvtier-alone)-(disk|redis)-(\d+)\.json$")
    for path in sorted(glob.glob(os.path.join(raw, "r*.json"))):
        m = pat.search(os.path.basename(path))
        if not m:
            continue
        r, who, medium, kib = int(m.group(1)), m.group(2), m.group(3), int(m.group(4))
        doc = load(path)
        side = {"lmcache": "lmcache", "kvtier": "stack", "kvtier-alone": "alone"}[who]
        val = lmcache_mbps(doc, path) if who == "lmcache" else kvtier_mbps(doc, path)
        runs.setdefault((medium, kib), {}).setdefault(r, {})[side] = val
    if not runs:
        fail("no r*-{lmcache,kvtier}-*.json outputs under %s" % raw)

    lines = []
    say = lines.append
    machine = os.path.join(raw, "machine.txt")
    if os.path.exists(machine):
        with open(machine) as f:
            say(f.read().rstrip())
    say("")
    say("kvtier / LMCache, min / median / max over rounds (stack: kvtier's whole tier stack, gather")
    say("from paged blocks + checksum + scatter; alone: kvtier's lower tier alone, contiguous objects)")
    head = ("row", "rounds", "stack / LMCache", "alone / LMCache", "LMCache MB/s", "stack MB/s",
            "alone MB/s", "limit MB/s", "stack / limit", "alone / limit", "LMCache / limit")
    table = []
    dat = []
    for (medium, kib) in sorted(runs, key=lambda k: (k[0], k[1])):
        rounds = runs[(medium, kib)]
        for op in ("store", "load"):
            lm, st, al, lim = [], [], [], []
            r_st, r_al, q_st, q_al, q_lm = [], [], [], [], []
            for r in sorted(rounds):
                d = rounds[r]
                if "lmcache" not in d or "stack" not in d:
                    continue
                lmv = d["lmcache"][op]
                stv, limv = d["stack"][op]
                alv = d["alone"][op][0] if "alone" in d else None
                lm.append(lmv)
                st.append(stv)
                al.append(alv)
                lim.append(limv)
                r_st.append(stv / lmv)
                r_al.append(alv / lmv if alv else None)
                if limv:
                    q_st.append(stv / limv)
                    q_al.append(alv / limv if alv else None)
                    q_lm.append(lmv / limv)
            if not lm:
                continue
            name = "%s %s %s" % (medium, "%d KiB" % kib if kib < 1024 else "%d MiB" % (kib // 1024), op)
            med = lambda v: "%.0f" % statistics.median([x for x in v if x]) if any(v) else "-"
            table.append((name, str(len(lm)), fmt(mmm(r_st)), fmt(mmm(r_al)), med(lm), med(st),
                          med(al), med(lim), fmt(mmm(q_st)), fmt(mmm(q_al)), fmt(mmm(q_lm))))
            a, b = mmm(r_st), mmm(r_al)
            dat.append((name, a, b))
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(head)]
    say("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    for t in table:
        say("  ".join(c.ljust(w) for c, w in zip(t, widths)))

    lim_rows = []
    for path in sorted(glob.glob(os.path.join(raw, "limits-*.json"))):
        kib = int(re.search(r"limits-(\d+)\.json$", path).group(1))
        for row in load(path).get("rows", []):
            lim_rows.append((kib, row))
    if lim_rows:
        say("")
        say("limits (first round): new = swept raw limit, old = the earlier baseline; MB/s")
        say("  %-6s %-4s %-10s %-10s %-10s %s" % ("what", "kind", "object", "write", "read", "best at"))
        for kib, row in lim_rows:
            say("  %-6s %-4s %-10s %-10.0f %-10.0f %s" % (
                row["what"], row["limit"], "%d KiB" % kib, row["write GB/s"] * 1e3,
                row["read GB/s"] * 1e3, row.get("best at", "")))
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    with open(os.path.join(out, "summary.txt"), "w") as f:
        f.write(text)

    with open(os.path.join(out, "ratios.dat"), "w") as f:
        f.write("# i row stack_min stack_med stack_max alone_min alone_med alone_max\n")
        for i, (name, a, b) in enumerate(dat):
            b = b or (float("nan"),) * 3
            f.write('%d "%s" %g %g %g %g %g %g\n' % (i, name, a[0], a[1], a[2], b[0], b[1], b[2]))
    if plot:
        png = os.path.join(out, "ratios.png")
        script = (
            "set terminal png size 1000,560 noenhanced; set output '%s'; set grid ytics;"
            " set title 'kvtier / LMCache 0.5.6 (median, min-max over rounds)';"
            " set ylabel 'kvtier / LMCache'; set xtics rotate by -30; set key top left;"
            " set xrange [-0.5:%g]; set yrange [0:*];"
            " plot 1 with lines lc 'black' dt 2 title 'parity',"
            " '%s' using ($1-0.1):4:3:5:xtic(2) with yerrorbars pt 7 ps 1.5 title 'kvtier stack',"
            " '' using ($1+0.1):7:6:8 with yerrorbars pt 5 ps 1.5 title 'kvtier tier alone'\n"
            % (png, len(dat) - 0.5, os.path.join(out, "ratios.dat")))
        try:
            subprocess.run(["gnuplot"], input=script.encode(), check=True)
        except (OSError, subprocess.CalledProcessError) as e:
            fail("gnuplot failed (Debian: apt-get install gnuplot-nox): %s" % e)
        print("plot: " + png)


if __name__ == "__main__":
    main()
