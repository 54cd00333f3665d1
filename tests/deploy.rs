//! The files an operator copies from deploy/ are valid for the real tools.

mod support;

use std::path::Path;
use std::process::Command;

use support::*;

fn deploy(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy").join(name)
}

#[test]
fn haproxy_cfg_passes_haproxy_c() {
    require_tool("haproxy", "haproxy");
    let (status, out) = run_bounded(
        Command::new("haproxy")
            .arg("-c")
            .arg("-f")
            .arg(deploy("haproxy.cfg")),
        WAIT,
    );
    assert!(status.is_some_and(|s| s.success()), "{out}");
    let cfg = std::fs::read_to_string(deploy("haproxy.cfg")).expect("read");
    assert!(cfg.contains("send-proxy-v2") && cfg.contains("mode tcp"));
}

#[test]
fn systemd_unit_raises_nofile_and_reloads_tls_with_sighup() {
    let unit = std::fs::read_to_string(deploy("tickstream.service")).expect("read");
    let nofile: u64 = unit
        .lines()
        .find_map(|l| l.strip_prefix("LimitNOFILE="))
        .expect("LimitNOFILE")
        .parse()
        .expect("a number");
    assert!(nofile > 100_000);
    assert!(unit.contains("ExecReload=/bin/kill -HUP $MAINPID"));
}

#[test]
fn sysctl_conf_is_key_equals_value_and_covers_100k_connections() {
    let conf = std::fs::read_to_string(deploy("sysctl.conf")).expect("read");
    let keys: Vec<&str> = conf
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (key, value) = l
                .split_once(" = ")
                .unwrap_or_else(|| panic!("not `key = value`: {l}"));
            assert!(!value.trim().is_empty(), "{l}");
            key
        })
        .collect();
    for key in [
        "fs.file-max",
        "net.core.somaxconn",
        "net.ipv4.ip_local_port_range",
        "net.ipv4.tcp_mem",
        "net.ipv4.tcp_max_syn_backlog",
    ] {
        assert!(keys.contains(&key), "{key} missing");
    }
    // Each key exists on this kernel.
    for key in keys {
        let path = Path::new("/proc/sys").join(key.replace('.', "/"));
        assert!(path.exists(), "{key} is not a sysctl here");
    }
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    require_tool("promtool", "prometheus");
    let dir = deploy("prometheus");
    for args in [
        &["check", "rules", "alerts.yml"][..],
        &["check", "config", "prometheus.yml"][..],
        &["test", "rules", "alerts.test.yml"][..],
    ] {
        let (status, out) = run_bounded(Command::new("promtool").args(args).current_dir(&dir), WAIT);
        assert!(status.is_some_and(|s| s.success()), "promtool {args:?}: {out}");
    }
    // Every alert has a unit test and a runbook entry an on-call can follow.
    let rules = std::fs::read_to_string(dir.join("alerts.yml")).expect("read alerts.yml");
    let tests = std::fs::read_to_string(dir.join("alerts.test.yml")).expect("read alerts.test.yml");
    let operations =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("OPERATIONS.md")).expect("read");
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert!(alerts.len() >= 8, "{alerts:?}");
    for alert in &alerts {
        assert!(
            tests.contains(&format!("alertname: {alert}\n")),
            "{alert} fires in no promtool test"
        );
        assert!(
            operations.contains(&format!("`{alert}`")),
            "{alert} has no runbook line in OPERATIONS.md"
        );
    }
    for anchor in rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("runbook: \"OPERATIONS.md#"))
    {
        let anchor = anchor.trim_end_matches('"');
        let heading = operations
            .lines()
            .filter_map(|l| l.strip_prefix("### "))
            .any(|h| h.to_ascii_lowercase().replace(' ', "-") == anchor);
        assert!(
            heading,
            "runbook anchor #{anchor} matches no ### heading in OPERATIONS.md"
        );
    }
}
