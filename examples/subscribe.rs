//! Subscribe to the SECOND stream and print ten ticks.
//!
//! ```text
//! TICKSTREAM_USERS=alice:secret cargo run --release -- serve --listen 127.0.0.1:7000
//! TICKSTREAM_PASSWORD=secret cargo run --example subscribe -- 127.0.0.1:7000 alice
//! ```
//!
//! Reconnects with backoff and resumes where it stopped; a lost range is
//! printed, never hidden.

use std::time::Duration;

use tickstream::client::{Backoff, Client, ClientOptions, Event};
use tickstream::proto::Mode;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:7000".into());
    let user = args.next().unwrap_or_else(|| "alice".into());
    let password = std::env::var("TICKSTREAM_PASSWORD").unwrap_or_else(|_| "secret".into());

    let options = ClientOptions {
        reconnect: Some(Backoff::default()),
        timeout: Duration::from_secs(5),
        ..ClientOptions::default()
    };
    let mut client = Client::connect_with(&addr, options).await?;
    let session = client.authenticate(&user, &password).await?;
    println!("session {}", session.session_id);
    let next_seq = client.subscribe(Mode::Second).await?;
    println!("subscribed to SECOND from seq {next_seq}");

    let mut printed = 0;
    while printed < 10 {
        match client.next_event().await? {
            Event::Batch(batch) => {
                for (i, tick) in batch.ticks.iter().enumerate() {
                    println!("seq {} epoch_ms {}", batch.first_seq + i as u64, tick.epoch_ms);
                    printed += 1;
                }
            }
            Event::Gap { mode, expected, got } => println!("LOST {mode:?} {expected}..{got}"),
            Event::Reset { mode, expected, got } => {
                println!("server restarted: {mode:?} was at {expected}, now {got}")
            }
            Event::Reconnected { attempts, .. } => println!("reconnected after {attempts} attempt(s)"),
        }
    }
    Ok(())
}
