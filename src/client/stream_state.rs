//! The gap, reset and resume rules of one subscribed mode (PROTOCOL.md §6.5,
//! §6.8), without I/O: fed the SUBSCRIBE ACKs and DATA_BATCHes a client
//! receives, it says what the application sees.
//!
//! Two kinds of server number ticks differently, and the ACK says which:
//!
//! - **Clock numbering** (`Ack.numbering` set, e.g. `clock`): a tick's number
//!   is a function of its time, the same on every instance with the same
//!   numbering. Numbers are absolute, so the rules are simple whatever
//!   happened between two connections (another instance, a restart, a clock
//!   a few ms apart): a batch's ticks below `expected` were delivered
//!   already and are dropped; a batch starting above it shows the exact
//!   ticks lost. There are no resets while the numbering stays the same.
//! - **Process numbering** (field absent: servers before the fleet
//!   extension): numbers count from 0 in each server process; a resume whose
//!   ACK goes back is either a replay or a restart, and the first batch
//!   tells which (§6.8).
//!
//! A change of numbering between two connections (a fleet mid-upgrade, an
//! instance with another `--synthetic-rate`) makes the numbers incomparable,
//! which is reported as a reset.

use crate::proto::DataBatch;

/// What an ACK or a batch means for the application, besides the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loss {
    /// Ticks `[expected, got)` were lost.
    Gap { expected: u64, got: u64 },
    /// The numbering started over or changed: the client was at `expected`,
    /// the new stream continues at `got`; how much was lost is unknown.
    Reset { expected: u64, got: u64 },
}

/// A batch that cannot belong to this stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    #[error("batch before its SUBSCRIBE ACK")]
    BatchBeforeAck,
    #[error("first_seq {got} went back from {expected}")]
    WentBack { expected: u64, got: u64 },
}

/// One mode's position in the stream. See the [module docs](self).
#[derive(Debug, Default, Clone)]
pub struct StreamState {
    /// The next sequence number to deliver; the resume point after a break.
    expected: Option<u64>,
    /// `Ack.numbering` of the stream `expected` counts in (`None`: process).
    numbering: Option<String>,
    /// `Ack.instance_id` of the current subscription, when the server says.
    instance_id: Option<String>,
    /// Process numbering only: set between a resume ACK below the resume
    /// point and the first batch, which tells a replay from a restart.
    resume_floor: Option<u64>,
}

impl StreamState {
    /// The `resume_from_seq` for the next SUBSCRIBE: `None` before the first ACK.
    pub fn resume_point(&self) -> Option<u64> {
        self.expected
    }

    /// The instance serving the current subscription, if it said.
    pub fn instance_id(&self) -> Option<&str> {
        self.instance_id.as_deref()
    }

    /// The numbering of the stream, once an ACK said it (`None`: process numbering).
    pub fn numbering(&self) -> Option<&str> {
        self.numbering.as_deref()
    }

    /// A SUBSCRIBE ACK (not a repeated one for a subscription in place).
    pub fn on_ack(
        &mut self,
        next_seq: u64,
        numbering: Option<&str>,
        instance_id: Option<&str>,
    ) -> Option<Loss> {
        self.instance_id = instance_id.map(str::to_owned);
        self.resume_floor = None;
        let same_numbering = self.numbering.as_deref() == numbering;
        self.numbering = numbering.map(str::to_owned);
        let Some(resume) = self.expected else {
            self.expected = Some(next_seq);
            return None;
        };
        if !same_numbering {
            self.expected = Some(next_seq);
            return Some(Loss::Reset {
                expected: resume,
                got: next_seq,
            });
        }
        if next_seq > resume {
            self.expected = Some(next_seq);
            return Some(Loss::Gap {
                expected: resume,
                got: next_seq,
            });
        }
        if next_seq < resume && self.numbering.is_none() {
            self.expected = Some(next_seq);
            self.resume_floor = Some(resume);
        }
        // Clock numbering with next_seq below the resume point: a replay, or
        // an instance whose clock is a little behind; the batches below it
        // are dropped as duplicates in on_batch.
        None
    }

    /// A DATA_BATCH of this mode: returns the loss it reveals and what is
    /// left of the batch to deliver (`None` when all of it was delivered
    /// before).
    pub fn on_batch(
        &mut self,
        mut batch: DataBatch,
    ) -> Result<(Option<Loss>, Option<DataBatch>), StreamError> {
        let expected = self.expected.ok_or(StreamError::BatchBeforeAck)?;
        let len = batch.ticks.len() as u64;
        let end = batch.first_seq + len;
        if self.numbering.is_none() {
            return self.on_process_numbered_batch(batch, expected, end);
        }
        if end <= expected {
            return Ok((None, None));
        }
        let mut loss = None;
        if batch.first_seq < expected {
            drop_before(&mut batch, expected);
        } else if batch.first_seq > expected {
            loss = Some(Loss::Gap {
                expected,
                got: batch.first_seq,
            });
        }
        self.expected = Some(end);
        Ok((loss, Some(batch)))
    }

    fn on_process_numbered_batch(
        &mut self,
        mut batch: DataBatch,
        expected: u64,
        end: u64,
    ) -> Result<(Option<Loss>, Option<DataBatch>), StreamError> {
        let mut loss = None;
        if let Some(resume) = self.resume_floor.take() {
            if batch.first_seq == expected && (batch.first_seq..end).contains(&resume) {
                // Replay: drop what was already delivered before the break.
                drop_before(&mut batch, resume);
            } else {
                loss = Some(Loss::Reset {
                    expected: resume,
                    got: batch.first_seq,
                });
            }
        } else if batch.first_seq > expected {
            loss = Some(Loss::Gap {
                expected,
                got: batch.first_seq,
            });
        } else if batch.first_seq < expected {
            return Err(StreamError::WentBack {
                expected,
                got: batch.first_seq,
            });
        }
        self.expected = Some(end);
        Ok((loss, Some(batch)))
    }
}

/// Drops the ticks of `batch` numbered below `seq` (which it holds).
fn drop_before(batch: &mut DataBatch, seq: u64) {
    batch.ticks.drain(..(seq - batch.first_seq) as usize);
    batch.first_seq = seq;
}

#[cfg(test)]
mod tests;
