//! What the processes of a run cost: CPU time and resident memory, read from `/proc` (Linux).
//! This is the bench's profile: which process used the two cores during each scenario.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::Context;

/// Clock ticks per second of `/proc/PID/stat` times (USER_HZ, 100 on Linux).
const TICKS_PER_S: f64 = 100.0;

/// A process to watch, by a label and either a pid or every process of a command name.
#[derive(Debug, Clone)]
pub enum Watched {
    /// One process.
    Pid(u32),
    /// Every process whose `comm` is this (PostgreSQL backends come and go).
    Command(&'static str),
}

/// CPU ticks of each watched process at one instant.
pub struct CpuSample {
    at: Instant,
    ticks: BTreeMap<String, u64>,
}

/// Takes a sample of every watched process.
pub fn sample(watched: &[(String, Watched)]) -> CpuSample {
    let ticks = watched
        .iter()
        .map(|(label, w)| {
            let t = match w {
                Watched::Pid(pid) => cpu_ticks(*pid).unwrap_or(0),
                Watched::Command(name) => pids_named(name).into_iter().filter_map(cpu_ticks).sum(),
            };
            (label.clone(), t)
        })
        .collect();
    CpuSample { at: Instant::now(), ticks }
}

/// Percent of one core each process used between two samples.
pub fn cpu_percent(before: &CpuSample, after: &CpuSample) -> BTreeMap<String, f64> {
    let wall = after.at.duration_since(before.at).as_secs_f64();
    after
        .ticks
        .iter()
        .map(|(label, t)| {
            let used = t.saturating_sub(*before.ticks.get(label).unwrap_or(&0)) as f64 / TICKS_PER_S;
            (label.clone(), 100.0 * used / wall)
        })
        .collect()
}

/// utime + stime of a process, in ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command may hold spaces; the fields after its closing parenthesis are fixed.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

fn pids_named(name: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == name))
        .collect()
}

/// A `/proc/PID/status` field in KiB (`VmRSS`, `VmHWM`).
pub fn status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.trim_start_matches(':').trim().strip_suffix(" kB")?.parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// Whether `perf` can sample here (it needs the CPU-clock event and permission to attach).
pub fn perf_available() -> bool {
    std::process::Command::new("perf")
        .args(["record", "-q", "-e", "cpu-clock", "-o", "/dev/null", "--", "true"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Starts sampling `pid` on the CPU clock for `seconds` into `data`.
pub fn start_perf(pid: u32, seconds: u64, data: &std::path::Path) -> anyhow::Result<std::process::Child> {
    std::process::Command::new("perf")
        .args(["record", "-q", "-e", "cpu-clock", "-F", "999", "-p", &pid.to_string(), "-o"])
        .arg(data)
        .args(["--", "sleep", &seconds.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("starting perf")
}

/// The flat profile of a `perf record` file: the top entries by shared object, then by symbol.
pub fn perf_summary(data: &std::path::Path) -> anyhow::Result<(String, String)> {
    let report = |sort: &str, limit: &str| -> anyhow::Result<String> {
        let out = std::process::Command::new("perf")
            .args(["report", "--stdio", "--no-children", "--sort", sort, "--percent-limit", limit, "-i"])
            .arg(data)
            .stderr(std::process::Stdio::null())
            .output()
            .context("running perf report")?;
        let text = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> =
            text.lines().map(str::trim_end).filter(|l| !l.is_empty() && !l.starts_with('#')).take(25).collect();
        Ok(lines.join("\n"))
    };
    Ok((report("dso", "1")?, report("sym", "1")?))
}
