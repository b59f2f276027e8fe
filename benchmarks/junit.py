"""JUnit XML for CI systems: one test case per budget check (a failure for fail / inconclusive / missing),
and one passing case per measured variant that carries its numbers, so a run without budgets still shows."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET

from edgepipe.atomic import write_bytes


def write_junit(path, report: dict) -> None:
    checks = report["budgets"]
    failures = [c for c in checks if c["verdict"] != "pass"]
    suite = ET.Element("testsuite", name="edgepipe-bench", tests=str(len(checks) + len(report["variants"])),
                       failures=str(len(failures)), errors="0", skipped="0",
                       time=str(report["machine"].get("seconds", 0)))
    for r in report["variants"]:
        case = ET.SubElement(suite, "testcase", classname="edgepipe.bench.measured", name=r["id"])
        ET.SubElement(case, "system-out").text = json.dumps(
            {k: r.get(k) for k in ("backend", "precision", "top1", "agreement_with_fp32", "latency_ms", "throughput_fps", "size_mb")})
    for c in checks:
        case = ET.SubElement(suite, "testcase", classname=f"edgepipe.bench.budget{c['budget']}",
                             name=f"{c['row']}: {c['check']}" + (f" of {c['of']}" if c.get("of") else ""))
        if c["verdict"] != "pass":
            msg = (f"{c['verdict']}: measured {c['measured']}, limit {c['limit']}, margin {c['margin']}"
                   + (f"; {c['detail']}" if c.get("detail") else ""))
            ET.SubElement(case, "failure", message=msg, type=c["verdict"]).text = msg
    root = ET.Element("testsuites")
    root.append(suite)
    ET.indent(root)
    write_bytes(path, ET.tostring(root, encoding="utf-8", xml_declaration=True))
