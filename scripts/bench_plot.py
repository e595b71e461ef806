"""Plots the bench's results (target/bench/results.json) as one PNG: ingest and peer throughput,
their latencies, flush rates and read latencies. Run by scripts/bench.sh after the bench."""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(results_path: str, png_path: str) -> None:
    with open(results_path) as f:
        r = json.load(f)
    loads = {l["id"]: l for l in r["loads"]}
    fig, axes = plt.subplots(2, 2, figsize=(15, 10))

    ingest_ids = [
        "ingest_single_spread", "ingest_single_hot", "peer_spread", "peer_hot", "minimal_single",
        "redis_single", "ingest_batch_spread", "ingest_batch_hot", "minimal_batch", "redis_batch",
    ]
    ids = [i for i in ingest_ids if i in loads]
    colors = {"ingest": "tab:blue", "peer": "tab:red", "minimal": "tab:gray", "redis": "tab:green"}
    ax = axes[0][0]
    values = [loads[i]["measured"]["events_per_s"] for i in ids]
    ax.barh([loads[i]["label"] for i in ids], values, color=[colors[i.split("_")[0]] for i in ids])
    ax.set_xscale("log")
    ax.axvline(150_000, color="black", linestyle="--", linewidth=1, label="target: 150,000 events/s batched")
    ax.set_xlabel("events/s (log scale)")
    ax.set_title("1–2. Ingest events/s: sidecar (blue), SQL peer (red), limits (gray, green)")
    ax.invert_yaxis()
    ax.legend(loc="lower right", fontsize=8)
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:,.0f}", va="center", fontsize=8)

    ax = axes[0][1]
    lat_ids = [i for i in ingest_ids if i in loads and not i.startswith("redis")]
    y = range(len(lat_ids))
    ax.barh([v - 0.2 for v in y], [loads[i]["measured"]["p50_ms"] for i in lat_ids], height=0.4, label="p50")
    ax.barh([v + 0.2 for v in y], [loads[i]["measured"]["p99_ms"] for i in lat_ids], height=0.4, label="p99")
    ax.set_yticks(list(y), [loads[i]["label"] for i in lat_ids])
    ax.set_xscale("log")
    ax.set_xlabel("latency, ms (log scale)")
    ax.set_title(f"Request latency at {loads[lat_ids[0]]['connections']} connections")
    ax.invert_yaxis()
    ax.legend(fontsize=8)

    ax = axes[1][0]
    sizes = [f["users"] for f in r["flushes"]]
    x = range(len(sizes))
    for offset, key, label in [
        (-0.27, "flush_users_per_s", "sidecar flush"),
        (0.0, "raw_upsert_users_per_s", "raw upsert (multi-row VALUES)"),
        (0.27, "raw_unnest_users_per_s", "raw unnest upsert"),
    ]:
        vals = [f[key] for f in r["flushes"]]
        ax.bar([v + offset for v in x], vals, width=0.27, label=label)
        for xv, v in zip(x, vals):
            ax.text(xv + offset, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x), [f"{s:,} dirty users" for s in sizes])
    ax.set_ylabel("users/s")
    ax.set_title("3. Flush into PostgreSQL vs the raw upsert rate")
    ax.set_ylim(0, max(max(f[k] for k in ("flush_users_per_s", "raw_upsert_users_per_s", "raw_unnest_users_per_s")) for f in r["flushes"]) * 1.3)
    ax.legend(fontsize=8, loc="upper left")

    ax = axes[1][1]
    names, p50, p99 = [], [], []
    for i in ["reads_1", "reads_c"]:
        if i in loads:
            names.append(f"sidecar read, {loads[i]['connections']} conn.")
            p50.append(loads[i]["measured"]["p50_ms"])
            p99.append(loads[i]["measured"]["p99_ms"])
    for c in r["counts"]:
        names.append(f"SELECT count(*), index-only {'on' if c['index_only_scans'] else 'off'}")
        p50.append(c["p50_ms"])
        p99.append(c["p99_ms"])
    y = range(len(names))
    ax.barh([v - 0.2 for v in y], p50, height=0.4, label="p50")
    ax.barh([v + 0.2 for v in y], p99, height=0.4, label="p99")
    ax.axvline(2.0, color="black", linestyle="--", linewidth=1, label="target: p99 < 2 ms")
    ax.set_yticks(list(y), names)
    ax.set_xscale("log")
    ax.set_xlabel("ms (log scale)")
    ax.set_title(f"4. Reads (5,000 unread of {r['count_table_rows']:,})")
    ax.invert_yaxis()
    ax.legend(fontsize=8)

    m = r["machine"]
    fig.suptitle(f"countersink benchmarks — {m.get('cpu', '?')}, {m.get('cores (nproc)', '?')} cores, {m.get('date', '')}")
    fig.tight_layout()
    fig.savefig(png_path, dpi=90)
    print(f"wrote {png_path}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
