//! Worker processes: past `--per-process` connections the coordinator runs
//! copies of itself, one per share, each binding its own source address. It
//! steers them with lines on their stdin ("start", "stop"); each answers
//! "ready N F" once connected and its tally as one JSON line at the end.

use std::net::Ipv4Addr;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context as _};
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use hdrhistogram::Histogram;
use indicatif::ProgressBar;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use super::args::BenchArgs;
use super::worker::{self, Phase, Tally};

pub struct Child {
    pub process: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    stdout: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl Child {
    /// Starts worker `index` with `n` connections from source address `--source-ip + index`.
    pub fn spawn(args: &BenchArgs, n: u64, index: usize) -> anyhow::Result<Child> {
        let exe = std::env::current_exe()?;
        let source = Ipv4Addr::from(u32::from(args.source_ip) + index as u32);
        let mut process = tokio::process::Command::new(exe)
            .args(["bench", "--worker"])
            .args(args.worker_flags())
            .args(["--connections", &n.to_string()])
            .args(["--source-ip", &source.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("spawn bench worker")?;
        let stdin = process.stdin.take().context("worker stdin")?;
        let stdout = BufReader::new(process.stdout.take().context("worker stdout")?).lines();
        Ok(Child {
            process,
            stdin,
            stdout,
        })
    }

    pub async fn read_line(&mut self, limit: Duration) -> anyhow::Result<String> {
        match tokio::time::timeout(limit, self.stdout.next_line()).await {
            Ok(Ok(Some(line))) => Ok(line),
            Ok(Ok(None)) => bail!("worker exited early"),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => bail!("worker did not answer within {limit:?}"),
        }
    }

    pub async fn say(&mut self, word: &str) -> anyhow::Result<()> {
        self.stdin.write_all(format!("{word}\n").as_bytes()).await?;
        self.stdin.flush().await?;
        Ok(())
    }
}

/// Worker process: connect, say "ready N F", measure between "start" and
/// "stop" on stdin, then print the tally as one JSON line.
pub async fn worker_main(args: &BenchArgs, password: &str) -> anyhow::Result<()> {
    let local = worker::start_local(args, password, &ProgressBar::hidden()).await;
    let mut stdout = tokio::io::stdout();
    let ready = format!(
        "ready {} {}\n",
        local.shared.ready.load(std::sync::atomic::Ordering::Relaxed),
        local.shared.failed.load(std::sync::atomic::Ordering::Relaxed)
    );
    stdout.write_all(ready.as_bytes()).await?;
    stdout.flush().await?;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        match line.trim() {
            "start" => {
                let _ = local.phase.send(Phase::Measuring);
            }
            "stop" => break,
            _ => {}
        }
    }
    let _ = local.phase.send(Phase::Stop);
    let tally = local.task.await??;
    let mut hist = Vec::new();
    V2Serializer::new()
        .serialize(&tally.latency, &mut hist)
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let line = json!({
        "connected": tally.connected, "failed": tally.failed, "errors": tally.errors,
        "gaps": tally.gaps, "lost_ticks": tally.lost_ticks, "frames": tally.frames, "ticks": tally.ticks,
        "first_error": tally.first_error, "latency_hdr": hex(&hist),
    });
    stdout.write_all(format!("{line}\n").as_bytes()).await?;
    stdout.flush().await?;
    Ok(())
}

/// Reads a worker's final JSON line back into a tally.
pub fn parse_tally(line: &str) -> anyhow::Result<Tally> {
    let v: serde_json::Value =
        serde_json::from_str(line).with_context(|| format!("worker result {line:?}"))?;
    let get = |k: &str| v[k].as_u64().unwrap_or(0);
    let bytes = unhex(v["latency_hdr"].as_str().unwrap_or(""))?;
    let latency: Histogram<u64> = Deserializer::new()
        .deserialize(&mut &bytes[..])
        .map_err(|e| anyhow::anyhow!("histogram: {e:?}"))?;
    Ok(Tally {
        connected: get("connected"),
        failed: get("failed"),
        errors: get("errors"),
        gaps: get("gaps"),
        lost_ticks: get("lost_ticks"),
        frames: get("frames"),
        ticks: get("ticks"),
        latency,
        first_error: v["first_error"].as_str().map(str::to_owned),
    })
}

/// Splits `n` into shares of at most `per`, as even as possible.
pub fn split(n: u64, per: u64) -> Vec<u64> {
    let parts = n.div_ceil(per);
    (0..parts).map(|i| n / parts + u64::from(i < n % parts)).collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> anyhow::Result<Vec<u8>> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2).context("odd hex")?, 16).map_err(Into::into))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_even_and_bounded() {
        assert_eq!(split(10, 19_000), vec![10]);
        assert_eq!(split(40_000, 19_000), vec![13_334, 13_333, 13_333]);
        assert_eq!(split(38_000, 19_000), vec![19_000, 19_000]);
    }

    #[test]
    fn hex_round_trips() {
        assert_eq!(
            unhex(&hex(&[0, 1, 254, 255])).expect("valid hex"),
            vec![0, 1, 254, 255]
        );
    }
}
