//! `--server-pid`: the server's CPU time and RSS from /proc.

use anyhow::Context as _;

/// A server's cumulative CPU time and current RSS.
#[derive(Clone, Copy, Debug)]
pub struct ProcSample {
    pub cpu_s: f64,
    pub rss_kib: u64,
}

/// Reads /proc/PID/stat (utime + stime, in USER_HZ = 100 on Linux) and
/// /proc/PID/status (VmRSS).
pub fn read_proc(pid: u32) -> anyhow::Result<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("--server-pid {pid}"))?;
    // The command name may contain spaces; fields after its ')' are fixed.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("/proc stat format")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat, i.e. 11 and 12 after ')'.
    let ticks: u64 = fields.get(11).and_then(|f| f.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Ok(ProcSample {
        cpu_s: ticks as f64 / USER_HZ,
        rss_kib,
    })
}

/// /proc reports CPU time in USER_HZ, which Linux fixes at 100 for userspace.
const USER_HZ: f64 = 100.0;
