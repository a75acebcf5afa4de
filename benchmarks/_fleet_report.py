"""The fleet benchmark's table: one row per measured size and variant, the targets, the slopes per 1,000 devices."""

from __future__ import annotations

from typing import Any

from lepton_edge.console import print_table

TARGET_ROLLOUT_10K_S = 120.0
TARGET_BYTES_RATIO = 1.05


def _cpu(r: dict, phase: str, who: str) -> str:
    c = (r.get(phase) or {}).get(who)
    return f"{c['cpu_pct']:.0f}%" if c else "-"


def _met(ok: bool | None) -> str:
    return "-" if ok is None else ("met" if ok else "NOT met")


def row_facts(r: dict) -> dict[str, Any]:
    api = r.get("api_rollout") or {}
    loss = r.get("telemetry_lost")
    rollout = r.get("rollout_all_devices_s") if r.get("rollout_status") == "completed" else None
    return {
        "connect_s": r.get("connect_s"),
        "ingest_per_s": r.get("telemetry_ingested_per_s"),
        "offered_per_s": r.get("telemetry_offered_per_s"),
        "loss": loss,
        "rollout_s": max(rollout, r.get("rollout_s") or 0) if rollout else None,
        "bytes_ratio": r.get("bytes_per_device_ratio"),
        "devices_p95_ms": (api.get("devices_page") or {}).get("p95_ms"),
        "deployment_p95_ms": (api.get("deployment") or {}).get("p95_ms"),
        "service_cpu_steady_pct": ((r.get("cpu_steady") or {}).get("service") or {}).get("cpu_pct"),
        "broker_cpu_steady_pct": ((r.get("cpu_steady") or {}).get("broker") or {}).get("cpu_pct"),
        "service_rss_mb": (r.get("peak_rss_mb") or {}).get("service"),
        "broker_rss_mb": (r.get("peak_rss_mb") or {}).get("broker"),
    }


def slopes(runs: list[dict]) -> dict[str, float | None]:
    """Least-squares slope per 1,000 devices of each cost, over the sizes of one variant."""
    facts = [(r["devices"] / 1000, row_facts(r)) for r in runs]
    out: dict[str, float | None] = {}
    for k in facts[0][1] if facts else []:
        pts = [(x, f[k]) for x, f in facts if isinstance(f[k], (int, float))]
        if len(pts) < 2:
            out[k] = None
            continue
        mx = sum(x for x, _ in pts) / len(pts)
        my = sum(y for _, y in pts) / len(pts)
        den = sum((x - mx) ** 2 for x, _ in pts)
        out[k] = round(sum((x - mx) * (y - my) for x, y in pts) / den, 3) if den else None
    return out


def print_report(runs: dict[str, dict]) -> dict[str, Any]:
    ordered = sorted(runs.values(), key=lambda r: (r["db"], not r["tls"], r["broker"], r["devices"]))
    rows = []
    for r in ordered:
        f = row_facts(r)
        rollout_ok = None if f["rollout_s"] is None and r.get("rollout_status") is None else (
            f["rollout_s"] is not None and (r["devices"] < 10000 or f["rollout_s"] <= TARGET_ROLLOUT_10K_S))
        rows.append((
            f"{r['devices']:,}", r["db"], "TLS" if r["tls"] else "plain",
            f"{f['connect_s']} s",
            f"{f['ingest_per_s']}/{f['offered_per_s']} ({r.get('telemetry_expected_per_s')})",
            f"{f['loss']} {_met(f['loss'] == 0 if f['loss'] is not None else None)}",
            f"{f['rollout_s'] or r.get('rollout_status')} s {_met(rollout_ok)}",
            f"{f['bytes_ratio']}x {_met(f['bytes_ratio'] <= TARGET_BYTES_RATIO if f['bytes_ratio'] else None)}",
            f"{f['devices_p95_ms']} / {f['deployment_p95_ms']}",
            f"{_cpu(r, 'cpu_steady', 'service')} {_cpu(r, 'cpu_rollout', 'service')} / {f['service_rss_mb']} MB",
            f"{_cpu(r, 'cpu_steady', 'broker')} {_cpu(r, 'cpu_rollout', 'broker')} / {f['broker_rss_mb']} MB",
            f"{r['load_before'][0]:.1f}-{r['load_after'][0]:.1f}",
        ))
    print_table("Fleet benchmark (targets: loss 0 at 10 s; rollout <= 120 s at 10,000; bytes <= 1.05x)",
                ["devices", "db", "link", "connect", "telemetry/s ingested/offered (expected)", "loss", "rollout 1/10/100 %",
                 "bytes/device", "API p95 ms devices page / deployment", "service CPU steady rollout / RSS",
                 "broker CPU steady rollout / RSS", "load 1 min"], rows)
    groups: dict[tuple, list[dict]] = {}
    for r in ordered:
        groups.setdefault((r["db"], r["tls"], r["broker"]), []).append(r)
    out = {}
    for (dbname, tls, broker), rs in groups.items():
        if len({r["devices"] for r in rs}) < 2:
            continue
        s = slopes(rs)
        out[f"{dbname}-{'tls' if tls else 'plain'}-{broker}"] = s
        print_table(f"Growth per 1,000 devices ({dbname}, {'TLS' if tls else 'plaintext'}, {broker} broker)", ["cost", "slope"],
                    [(k, v) for k, v in s.items()])
    return out
