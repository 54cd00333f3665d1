//! The one JSON line a run prints, the --plot image and the progress bars.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context as _};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use super::args::BenchArgs;
use super::procfs::ProcSample;
use super::worker::Tally;

pub struct Report {
    pub json: String,
    pub ok: bool,
}

/// The server's CPU and RSS over the run, sampled from /proc by the coordinator.
pub struct ServerSamples {
    pub idle: Option<ProcSample>,
    pub start: Option<ProcSample>,
    pub end: Option<ProcSample>,
}

pub fn report(args: &BenchArgs, tallies: Vec<Tally>, measured: Duration, server: ServerSamples) -> Report {
    let mut latency = new_histogram();
    let (mut connected, mut failed, mut errors, mut gaps, mut lost, mut frames, mut ticks) =
        (0, 0, 0, 0, 0, 0, 0);
    let mut first_error = None;
    for t in tallies {
        connected += t.connected;
        failed += t.failed;
        errors += t.errors;
        gaps += t.gaps;
        lost += t.lost_ticks;
        frames += t.frames;
        ticks += t.ticks;
        let _ = latency.add(&t.latency);
        first_error = first_error.or(t.first_error);
    }
    let secs = measured.as_secs_f64();
    let server = match (server.idle, server.start, server.end) {
        (Some(idle), Some(s), Some(e)) => {
            let cpu_s = e.cpu_s - s.cpu_s;
            json!({
                "pid": args.server_pid,
                "cpu_s": round(cpu_s, 3),
                "cpu_pct": round(100.0 * cpu_s / secs, 1),
                "cpu_us_per_frame": if frames > 0 { round(cpu_s * 1e6 / frames as f64, 3) } else { 0.0 },
                "cpu_ns_per_tick": if ticks > 0 { round(cpu_s * 1e9 / ticks as f64, 2) } else { 0.0 },
                "rss_kib_before_connect": idle.rss_kib,
                "rss_kib_start": s.rss_kib,
                "rss_kib_end": e.rss_kib,
                "rss_bytes_per_connection": (s.rss_kib.saturating_sub(idle.rss_kib) * 1024)
                    .checked_div(connected)
                    .unwrap_or(0),
            })
        }
        _ => serde_json::Value::Null,
    };
    if let Some(path) = &args.plot {
        let title = format!("{} connections, {}", args.connections, args.addr_list());
        if let Err(e) = plot(path, &args.plot_font, &latency, &title) {
            eprintln!("tickstream bench: --plot {}: {e:#}", path.display());
        }
    }
    let us = |q: f64| latency.value_at_quantile(q);
    let ok = failed == 0 && errors == 0 && gaps == 0 && connected == args.connections;
    let json = json!({
        "ok": ok,
        "protocol": format!("{:?}", args.protocol).to_lowercase(),
        "addr": args.addr_list(),
        "tls": args.tls.tls_ca.is_some(),
        "connections": args.connections,
        "connected": connected,
        "failed": failed,
        "errors": errors,
        "gaps": gaps,
        "lost_ticks": lost,
        "first_error": first_error,
        "duration_s": round(secs, 3),
        "frames": frames,
        "ticks": ticks,
        "frames_per_s": round(frames as f64 / secs, 1),
        "ticks_per_s": round(ticks as f64 / secs, 1),
        "latency_us": {
            "count": latency.len(),
            "p50": us(0.5), "p90": us(0.9), "p95": us(0.95), "p99": us(0.99), "p999": us(0.999),
            "max": latency.max(),
        },
        "server": server,
    });
    Report {
        json: json.to_string(),
        ok,
    }
}

/// Latency (ms) against percentile on a "nines" axis: x = -log10(1 - q),
/// so 90 %, 99 %, 99.9 % are evenly spaced.
fn plot(path: &Path, font: &Path, latency: &Histogram<u64>, title: &str) -> anyhow::Result<()> {
    use plotters::prelude::*;

    if latency.is_empty() {
        bail!("no latency samples to plot");
    }
    let bytes = std::fs::read(font).with_context(|| format!("font {} (set --plot-font)", font.display()))?;
    // register_font keeps the bytes for the life of the process; one plot per run.
    plotters::style::register_font(
        "sans-serif",
        FontStyle::Normal,
        Box::leak(bytes.into_boxed_slice()),
    )
    .map_err(|_| anyhow::anyhow!("font {} is not a usable TTF", font.display()))?;
    let points: Vec<(f64, f64)> = (0..=PLOT_POINTS)
        .map(|i| {
            let nines = MAX_NINES * i as f64 / PLOT_POINTS as f64;
            let q = 1.0 - 10f64.powf(-nines);
            (nines, latency.value_at_quantile(q) as f64 / 1000.0)
        })
        .collect();
    let y_max = points.iter().map(|p| p.1).fold(0.0, f64::max) * 1.1;
    let root = BitMapBackend::new(path, (960, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("tickstream bench latency: {title}"), ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..MAX_NINES, 0f64..y_max.max(0.001))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_labels(6)
        .x_label_formatter(&|n| format!("{}%", round(100.0 * (1.0 - 10f64.powf(-n)), 3)))
        .x_desc("percentile")
        .y_desc("latency (ms)")
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .draw_series(LineSeries::new(points, BLUE.stroke_width(2)))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

pub fn connect_progress(n: u64) -> ProgressBar {
    bar(n, "connecting {bar:40} {pos}/{len} ({per_sec})")
}

pub fn window_progress(window: Duration) -> ProgressBar {
    bar(window.as_secs().max(1), "measuring {bar:40} {pos}/{len} s")
}

fn bar(len: u64, template: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()));
    bar
}

pub fn new_histogram() -> Histogram<u64> {
    // 1 µs to 60 s at 3 significant digits; the bounds are constants, so this cannot fail.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

/// --plot's x axis runs to 99.999 %.
const MAX_NINES: f64 = 5.0;
/// Points sampled along --plot's curve.
const PLOT_POINTS: usize = 200;
