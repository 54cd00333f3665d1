//! The `tickstream` binary: parses flags, sets up logging, calls the library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tickstream::config::ServeArgs;

mod bench;
mod hash_password;
mod serve;
mod sub;
mod tls_args;

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "tickstream",
    version,
    about = "TCP fan-out server for time-based tick data"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at startup: the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve(ServeArgs),
    /// Read a password from stdin and print its argon2id hash for TICKSTREAM_USERS.
    HashPassword(hash_password::HashPasswordArgs),
    /// Subscribe and print ticks.
    Sub(sub::SubArgs),
    /// Load generator: N connections, latency percentiles, server CPU and RSS.
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::HashPassword(args) => hash_password::run(args),
        Command::Sub(args) => sub::run(args),
        Command::Bench(args) => bench::run(args),
    }
}
