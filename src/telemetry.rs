//! Structured JSON logs through `tracing`.

use tracing_subscriber::EnvFilter;

/// Installs the JSON log subscriber on stderr. `RUST_LOG`, when set, wins
/// over `level` (so operators can filter per module).
pub fn init(level: &str) -> Result<(), String> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.is_empty() => EnvFilter::try_new(spec),
        _ => EnvFilter::try_new(level),
    }
    .map_err(|e| format!("--log-level: {e}"))?;
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .with_current_span(false)
        .with_span_list(false)
        .with_writer(std::io::stderr)
        .try_init()
        .map_err(|e| e.to_string())
}

/// Lets the first [`LOG_BURST`] events of each [`LOG_WINDOW`] through and
/// counts the rest, so a flood (a scanner sending garbage, a reconnect storm)
/// cannot flood the log. Metrics still count every event: only the log line
/// is held back. The count of held-back lines is reported with the first line
/// let through after the window ends.
pub struct LogBudget {
    state: parking_lot::Mutex<BudgetState>,
}

struct BudgetState {
    window_start: Option<std::time::Instant>,
    used: u32,
    suppressed: u64,
}

/// Log lines of one kind let through per window.
pub const LOG_BURST: u32 = 10;
/// The window over which [`LOG_BURST`] applies.
pub const LOG_WINDOW: std::time::Duration = std::time::Duration::from_secs(2);

impl LogBudget {
    pub fn new() -> LogBudget {
        LogBudget {
            state: parking_lot::Mutex::new(BudgetState {
                window_start: None,
                used: 0,
                suppressed: 0,
            }),
        }
    }

    /// `Some(n)` when this event may be logged, `n` being how many were held
    /// back since the last one logged; `None` to hold it back.
    pub fn admit(&self, now: std::time::Instant) -> Option<u64> {
        let mut state = self.state.lock();
        let expired = match state.window_start {
            Some(start) => now.saturating_duration_since(start) >= LOG_WINDOW,
            None => true,
        };
        if expired {
            state.window_start = Some(now);
            state.used = 0;
        }
        if state.used >= LOG_BURST {
            state.suppressed += 1;
            return None;
        }
        state.used += 1;
        Some(std::mem::take(&mut state.suppressed))
    }
}

impl Default for LogBudget {
    fn default() -> Self {
        LogBudget::new()
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    #[test]
    fn a_flood_logs_a_burst_then_reports_what_it_held_back() {
        let budget = LogBudget::new();
        let t0 = Instant::now();
        let admitted = (0..100).filter(|_| budget.admit(t0).is_some()).count();
        assert_eq!(admitted, LOG_BURST as usize);
        assert_eq!(budget.admit(t0 + LOG_WINDOW - Duration::from_millis(1)), None);
        assert_eq!(budget.admit(t0 + LOG_WINDOW), Some(91));
        assert_eq!(budget.admit(t0 + LOG_WINDOW), Some(0));
    }
}
