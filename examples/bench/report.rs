//! Writes the results: JSON for the plot, and a markdown section between markers in the docs,
//! with the machine, the command, every table, and PASS/MISS with the ratio for each target.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::Context;

use crate::scenarios::{LoadResult, Results};
use crate::Args;

const BEGIN: &str = "<!-- bench:results:begin (written by the bench; edit outside these markers) -->";
const END: &str = "<!-- bench:results:end -->";

/// Writes `args.json` and the results section of the markdown file.
pub fn write(args: &Args, results: &Results) -> anyhow::Result<()> {
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(if args.quick { "target/bench/benchmarks.md" } else { "docs/benchmarks.md" }));
    for path in [&args.json, &out] {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
    }
    std::fs::write(&args.json, serde_json::to_string_pretty(results)?)?;
    let section = markdown(args, results)?;
    let doc = std::fs::read_to_string(&out).unwrap_or_default();
    let doc = match (doc.find(BEGIN), doc.find(END)) {
        (Some(b), Some(e)) if b < e => format!("{}{section}{}", &doc[..b], &doc[e + END.len()..]),
        _ => format!("# countersink benchmarks\n\n{section}\n"),
    };
    std::fs::write(&out, doc).with_context(|| format!("writing {}", out.display()))?;
    println!("wrote {} and {}", out.display(), args.json.display());
    Ok(())
}

fn load<'a>(r: &'a Results, id: &str) -> anyhow::Result<&'a LoadResult> {
    r.loads.iter().find(|l| l.id == id).with_context(|| format!("no scenario {id}"))
}

fn verdict(pass: bool) -> &'static str {
    if pass {
        "**PASS**"
    } else {
        "**MISS**"
    }
}

fn markdown(args: &Args, r: &Results) -> anyhow::Result<String> {
    let mut s = String::new();
    let m = |k: &str| r.machine.get(k).cloned().unwrap_or_default();
    writeln!(s, "{BEGIN}\n")?;
    if r.quick {
        writeln!(s, "> A `--quick` smoke run: short scenarios and small tables. Not the numbers to quote.\n")?;
    }
    writeln!(
        s,
        "Measured {} on {} ({} cores, {}), Redis {}, PostgreSQL {}, commit `{}`, with:\n\n```sh\n{}\n```\n\n\
         Load: {} keep-alive HTTP/1.1 connections in closed loops (each sends its next request when the answer \
         arrives), {} s measured per scenario after {} s of warm-up. The load generator, the servers, Redis and \
         PostgreSQL share the same cores.\n",
        m("date"),
        m("cpu"),
        m("cores (nproc)"),
        m("memory"),
        m("redis"),
        m("postgresql"),
        m("commit"),
        args.command,
        args.connections,
        r.seconds,
        r.seconds as f64 / 5.0,
    )?;
    writeln!(s, "![throughput, latency and flush rates](benchmarks.png)\n")?;

    let single = load(r, "ingest_single_spread")?;
    let single_hot = load(r, "ingest_single_hot")?;
    let batch = load(r, "ingest_batch_spread")?;
    let batch_hot = load(r, "ingest_batch_hot")?;
    let minimal = load(r, "minimal_single")?;
    let peer = load(r, "peer_spread")?;
    let peer_hot = load(r, "peer_hot")?;
    let reads_c = load(r, "reads_c")?;
    let reads_1 = load(r, "reads_1")?;
    let healthz = load(r, "reads_healthz")?;
    let reads_batch = load(r, "reads_batch")?;
    let reads_peer = load(r, "reads_peer")?;
    let flushed = r.sidecar_rows.users_flushed.unwrap_or(0).max(1) as f64;
    let rows_per_user = r.sidecar_rows.count_table_rows.unwrap_or(0) as f64 / flushed;

    writeln!(s, "### Targets\n\n| target | measured | ratio to target | result |\n|---|---|---|---|")?;
    let ratio = single.measured.requests_per_s / minimal.measured.requests_per_s;
    writeln!(
        s,
        "| single-event ingest ≥ 60% of the minimal axum endpoint's requests/s | {:.0} vs {:.0} req/s = {:.0}% | {:.2} | {} |",
        single.measured.requests_per_s,
        minimal.measured.requests_per_s,
        100.0 * ratio,
        ratio / 0.6,
        verdict(ratio >= 0.6)
    )?;
    for (l, what) in [(batch, "spread users"), (batch_hot, "one hot user")] {
        writeln!(
            s,
            "| batched ingest ≥ 150,000 events/s ({what}) | {:.0} events/s | {:.2} | {} |",
            l.measured.events_per_s,
            l.measured.events_per_s / 150_000.0,
            verdict(l.measured.events_per_s >= 150_000.0)
        )?;
    }
    for (ours, theirs, times, what) in
        [(single, peer, 3.0, "spread users"), (single_hot, peer_hot, 10.0, "one hot user")]
    {
        let x = ours.measured.events_per_s / theirs.measured.events_per_s;
        writeln!(
            s,
            "| ≥ {times:.0}x the SQL peer's events/s, {what} (1 event/request both) | {:.0} vs {:.0} = {x:.1}x | {:.2} | {} |",
            ours.measured.events_per_s,
            theirs.measured.events_per_s,
            x / times,
            verdict(x >= times)
        )?;
    }
    writeln!(
        s,
        "| ≤ 1 database row per user per flush | {} rows for {} users = {rows_per_user:.3} | {:.2} | {} |",
        r.sidecar_rows.count_table_rows.unwrap_or(0),
        flushed,
        rows_per_user,
        verdict(rows_per_user <= 1.0)
    )?;
    for f in &r.flushes {
        let raw = f.raw_upsert_users_per_s.max(f.raw_unnest_users_per_s);
        let x = f.flush_users_per_s / raw;
        writeln!(
            s,
            "| flush ≥ 80% of the raw upsert rate ({} users; the faster raw form) | {:.0} vs {:.0} users/s = {:.0}% | {:.2} | {} |",
            f.users,
            f.flush_users_per_s,
            raw,
            100.0 * x,
            x / 0.8,
            verdict(x >= 0.8)
        )?;
    }
    let of_healthz = reads_c.measured.requests_per_s / healthz.measured.requests_per_s;
    writeln!(
        s,
        "| reads ({} connections) ≥ 60% of the same process's `/healthz` requests/s | {:.0} vs {:.0} req/s = {:.0}% | {:.2} | {} |",
        reads_c.connections,
        reads_c.measured.requests_per_s,
        healthz.measured.requests_per_s,
        100.0 * of_healthz,
        of_healthz / 0.6,
        verdict(of_healthz >= 0.6)
    )?;
    let of_peer = reads_c.measured.requests_per_s / reads_peer.measured.requests_per_s;
    writeln!(
        s,
        "| reads ≥ 1.0x a peer answering with the primary-key `SELECT` | {:.0} vs {:.0} req/s = {of_peer:.2}x | {of_peer:.2} | {} |",
        reads_c.measured.requests_per_s,
        reads_peer.measured.requests_per_s,
        verdict(of_peer >= 1.0)
    )?;
    for (l, limit) in [(reads_c, 2.0), (reads_1, 0.5)] {
        writeln!(
            s,
            "| reads p99 < {limit} ms ({} connection{}) | p99 {:.3} ms | {:.2} | {} |",
            l.connections,
            if l.connections == 1 { "" } else { "s" },
            l.measured.p99_ms,
            limit / l.measured.p99_ms,
            verdict(l.measured.p99_ms < limit)
        )?;
    }
    writeln!(
        s,
        "| batch reads of 100 users ≥ 50,000 user counts/s | {:.0} counts/s | {:.2} | {} |",
        reads_batch.measured.events_per_s,
        reads_batch.measured.events_per_s / 50_000.0,
        verdict(reads_batch.measured.events_per_s >= 50_000.0)
    )?;
    let answers: u64 = [reads_c, reads_1, reads_batch].iter().map(|l| l.measured.requests).sum();
    let wrong: u64 = [reads_c, reads_1, reads_batch].iter().map(|l| l.measured.wrong).sum();
    writeln!(
        s,
        "| every read taken during the load equals the model (the stored counts) | {wrong} wrong of {answers} answers (and of the first reads of all users) | | {} |",
        verdict(wrong == 0)
    )?;
    writeln!(
        s,
        "| ≤ 1 byte of Redis per tracked notification | {:.3} bytes | {:.2} | {} |\n",
        r.redis_bytes_per_notification,
        1.0 / r.redis_bytes_per_notification,
        verdict(r.redis_bytes_per_notification <= 1.0)
    )?;
    writeln!(s, "(ratio to target: above 1 is better than the target.)\n")?;

    writeln!(s, "### 1–2. Ingest, the machine's limits and the per-event SQL peer\n")?;
    writeln!(s, "| scenario | connections | events/s | requests/s | p50 ms | p99 ms | max ms | errors |\n|---|---|---|---|---|---|---|---|")?;
    for l in r.loads.iter().filter(|l| !l.id.starts_with("reads")) {
        row(&mut s, l)?;
    }
    writeln!(
        s,
        "\nDatabase rows written per event (from `pg_stat_user_tables`, inserts + updates): sidecar **{:.4}** \
         ({} rows for {} events: {} into the count table for {} users, the rest batch records), SQL peer \
         **{:.2}** ({} rows for {} events).\n",
        r.sidecar_rows.rows as f64 / r.sidecar_rows.events.max(1) as f64,
        r.sidecar_rows.rows,
        r.sidecar_rows.events,
        r.sidecar_rows.count_table_rows.unwrap_or(0),
        flushed,
        r.peer_rows.rows as f64 / r.peer_rows.events.max(1) as f64,
        r.peer_rows.rows,
        r.peer_rows.events,
    )?;

    writeln!(s, "### 3. Flush\n\n| dirty users | sidecar flush users/s | raw upsert (multi-row VALUES) users/s | raw `unnest` upsert users/s |\n|---|---|---|---|")?;
    for f in &r.flushes {
        writeln!(
            s,
            "| {} | {:.0} | {:.0} | {:.0} |",
            f.users, f.flush_users_per_s, f.raw_upsert_users_per_s, f.raw_unnest_users_per_s
        )?;
    }

    writeln!(
        s,
        "\n### 4. Reads\n\n| read | connections | requests/s | p50 ms | p99 ms | max ms |\n|---|---|---|---|---|---|"
    )?;
    for (l, what) in [
        (reads_1, "`GET /v1/users/{id}/unread-count`"),
        (reads_c, "`GET /v1/users/{id}/unread-count`"),
        (reads_batch, "`GET /v1/unread-counts`, 100 random users (requests/s × 100 = counts/s)"),
        (healthz, "`GET /healthz` of the same process (the ceiling)"),
        (reads_peer, "SQL peer: `SELECT unread_count … WHERE user_id = $1` per request"),
    ] {
        writeln!(
            s,
            "| {what} | {} | {:.0} | {:.3} | {:.3} | {:.2} |",
            l.connections, l.measured.requests_per_s, l.measured.p50_ms, l.measured.p99_ms, l.measured.max_ms
        )?;
    }
    for c in &r.counts {
        writeln!(
            s,
            "| `SELECT count(*)`, 5,000 unread of {} rows, index-only scans {} | 1 | {:.0} | {:.3} | {:.3} | |",
            r.count_table_rows,
            if c.index_only_scans { "on" } else { "off" },
            c.per_s,
            c.p50_ms,
            c.p99_ms
        )?;
    }
    writeln!(
        s,
        "\nFirst reads: every one of the {} users read once, 1,000 per request over 4 connections, before the \
         scenarios above (each loads the stored count and the Redis deltas, then holds the count in Redis): \
         **{:.0} users/s**, every answer equal to the stored count.\n",
        r.first_reads_users, r.first_reads_users_per_s
    )?;
    for c in &r.counts {
        writeln!(s, "- index-only scans {}: plan `{}`", if c.index_only_scans { "on" } else { "off" }, c.plan)?;
    }

    writeln!(
        s,
        "\n### 5. Memory\n\n- Redis, state bitmaps: **{:.3} bytes per tracked notification** ({} notifications \
         with dense ids, `MEMORY USAGE` of the state keys).\n- Redis, pending set: {:.0} bytes per dirty user \
         until the next flush; idempotency record: {:.1} bytes per request for `--idempotency-ttl-secs` (1 h by default; \
         `MEMORY USAGE` of the record buckets over the records they hold; docs/security.md, *Redis memory*).\n\
         - Redis, held real-time counts: **{:.2} bytes per user** (every user read once; buckets of 128 users).\n\
         - Sidecar resident memory: {:.1} MiB idle, **{:.1} MiB peak** (VmHWM) over the ingest and read scenarios.\n",
        r.redis_bytes_per_notification,
        r.notifications_tracked,
        r.redis_pending_bytes_per_user,
        r.redis_webhook_record_bytes,
        r.redis_count_bytes_per_user,
        r.sidecar_rss_idle_mib,
        r.sidecar_rss_peak_mib
    )?;

    writeln!(s, "### Where the CPU went (percent of one core; the machine has {})\n", m("cores (nproc)"))?;
    let labels: Vec<&String> = r.loads.first().map(|l| l.cpu.keys().collect()).unwrap_or_default();
    write!(s, "| scenario |")?;
    for label in &labels {
        write!(s, " {label} |")?;
    }
    write!(s, "\n|---|")?;
    for _ in &labels {
        write!(s, "---|")?;
    }
    writeln!(s)?;
    for l in &r.loads {
        write!(s, "| {} |", l.label)?;
        for label in &labels {
            write!(s, " {:.0} |", l.cpu.get(*label).copied().unwrap_or(0.0))?;
        }
        writeln!(s)?;
    }
    writeln!(
        s,
        "\nThe same as CPU time per request (µs; a 100-event request is one request). Unlike the rates, \
         these hold when other work shares the machine.\n"
    )?;
    write!(s, "| scenario |")?;
    for label in &labels {
        write!(s, " {label} |")?;
    }
    write!(s, " all |\n|---|")?;
    for _ in &labels {
        write!(s, "---|")?;
    }
    writeln!(s, "---|")?;
    for l in &r.loads {
        write!(s, "| {} |", l.label)?;
        let per_request = |percent: f64| percent / 100.0 / l.measured.requests_per_s.max(1.0) * 1e6;
        for label in &labels {
            write!(s, " {:.0} |", per_request(l.cpu.get(*label).copied().unwrap_or(0.0)))?;
        }
        writeln!(s, " {:.0} |", per_request(l.cpu.values().sum()))?;
    }
    for p in &r.profiles {
        writeln!(
            s,
            "\n#### Profile: {} during \"{}\" (perf, CPU clock, self time)\n\n```\n{}\n\n{}\n```",
            p.process, p.scenario, p.by_object, p.by_symbol
        )?;
    }
    writeln!(s, "\n{END}")?;
    Ok(s)
}

fn row(s: &mut String, l: &LoadResult) -> anyhow::Result<()> {
    let m = &l.measured;
    writeln!(
        s,
        "| {} | {} | {:.0} | {:.0} | {:.2} | {:.2} | {:.1} | {} |",
        l.label, l.connections, m.events_per_s, m.requests_per_s, m.p50_ms, m.p99_ms, m.max_ms, m.errors
    )?;
    Ok(())
}
