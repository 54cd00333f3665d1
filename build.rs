//! Compiles `proto/stream.proto` with the pure-Rust `protox` compiler, so a
//! fresh machine needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    // scripts/loom.sh sets `--cfg tickstream_loom` for the whole build and we
    // turn it into `cfg(loom)` for this crate alone: a global `--cfg loom`
    // also switches tokio into its own loom mode, which has no `tokio::net`.
    if std::env::var_os("CARGO_CFG_TICKSTREAM_LOOM").is_some() {
        println!("cargo:rustc-cfg=loom");
    }
    let descriptors = protox::compile(["proto/stream.proto"], ["proto"])?;
    prost_build::Config::new().compile_fds(descriptors)?;
    Ok(())
}
