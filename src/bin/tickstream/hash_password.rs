//! `tickstream hash-password`: reads a password from stdin and prints its
//! argon2id PHC string for `TICKSTREAM_USERS` (`user:<printed string>`).
//!
//! On a terminal it prompts on stderr; the password is echoed (there is no
//! portable way to turn echo off without `unsafe` or another dependency), so
//! prefer `printf '%s' "$PW" | tickstream hash-password` in scripts.

use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Args;

/// Flags of `tickstream hash-password` (none yet).
#[derive(Debug, Args)]
pub struct HashPasswordArgs {}

pub fn run(_args: HashPasswordArgs) -> ExitCode {
    match hash_from_stdin() {
        Ok(phc) => {
            println!("{phc}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tickstream: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn hash_from_stdin() -> anyhow::Result<String> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprint!("Password (will be echoed): ");
        std::io::stderr().flush().context("write the prompt")?;
    }
    let mut line = String::new();
    stdin
        .lock()
        .read_line(&mut line)
        .context("read the password from stdin")?;
    let password = line.strip_suffix('\n').unwrap_or(&line);
    let password = password.strip_suffix('\r').unwrap_or(password);
    if password.is_empty() {
        bail!("empty password");
    }
    Ok(tickstream::auth::hash_password(password)?)
}
