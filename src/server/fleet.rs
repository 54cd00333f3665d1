//! This instance's place in a fleet (PROTOCOL.md §6.5, §6.8): its name, its
//! clock and numbering, and how far back a resume is regenerated. The
//! connection task asks it for SUBSCRIBE ACKs and regenerated batches.

use std::ops::Range;
use std::time::Duration;

use bytes::Bytes;

use crate::config::Config;
use crate::metrics as m;
use crate::proto::Mode;
use crate::ring::Ring;
use crate::session;
use crate::tick::{self, Numbering, Resumption, WallClock};

pub(super) struct Fleet {
    instance_id: String,
    clock: WallClock,
    numberings: [Numbering; 2],
    schemes: [String; 2],
    resume_horizon: Duration,
    /// Looked up once: every HEARTBEAT records into it.
    clock_offsets: metrics::Histogram,
}

impl Fleet {
    pub(super) fn new(config: &Config, clock: WallClock) -> Fleet {
        let numberings = [Mode::Second, Mode::Minute].map(|mode| Numbering::new(mode, config.synthetic_rate));
        Fleet {
            instance_id: config.instance_id.clone(),
            clock,
            schemes: numberings.map(|n| n.scheme()),
            numberings,
            resume_horizon: config.resume_horizon,
            clock_offsets: metrics::histogram!(m::HEARTBEAT_CLOCK_OFFSET_SECONDS),
        }
    }

    /// Where a subscription to `mode` on `ring` starts ([`tick::resume`]).
    pub(super) fn start(&self, ring: &Ring, mode: Mode, resume_from_seq: Option<u64>) -> Resumption {
        let numbering = &self.numberings[mode as usize];
        tick::resume(ring, numbering, resume_from_seq, &self.clock, self.resume_horizon)
    }

    /// The SUBSCRIBE ACK, naming this instance and its numbering.
    pub(super) fn ack(&self, mode: Mode, next_seq: u64) -> Bytes {
        let identity = (self.instance_id.as_str(), self.schemes[mode as usize].as_str());
        session::subscribe_ack_from(mode, next_seq, Some(identity))
    }

    /// Records our clock minus a HEARTBEAT's `client_time_ms` (OPERATIONS.md
    /// "Clock discipline"): the median over many clients shows this
    /// instance's clock drifting from theirs.
    pub(super) fn record_clock_offset(&self, client_time_ms: Option<i64>) {
        let Some(sent) = client_time_ms else { return };
        let offset_ms = self.clock.now_ms().saturating_sub(sent);
        self.clock_offsets.record(offset_ms as f64 / 1000.0);
    }

    /// A batch of `ticks` made from the clock (the tail of a ring batch a
    /// resumed client has partly seen).
    pub(super) fn regenerate(&self, mode: Mode, ticks: Range<u64>) -> Bytes {
        self.numberings[mode as usize].encode(ticks, self.clock.now_us())
    }
}
