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
